"""One configuration for the cluster: `kanmon cluster push` stores a validated version in
the shared records' database; nodes with `[cluster] node = NAME` watch for new versions
(LISTEN/NOTIFY, and a check every POLL seconds for what a lost connection missed), apply
each by the node's graceful reload, and report `applied` or `refused` per node.

The pushed file is a kanmon configuration plus per-node overlays of the same shape,
`[node.mr1.server] hostname = ...`, `[node.mr1.smtp] listen = [...]`: a node's
configuration is the pushed one with its overlay's tables merged in (an overlay key
replaces the same key; a list is replaced whole), then the node's own `[records]` and
`[cluster]` from its local file (how it reaches the database stays its own).

Each node keeps the version it applied in <data_dir>/cluster-config.json (private,
replaced atomically): a node that starts (while the database is down, or before it
answers) runs that version, validated again, and says so in its event log; without it,
or when it no longer validates, the local file. The database then decides: a newer
version is applied as it is pushed. A reload of the local file (SIGHUP) runs what a
restart would: the newest version when it loads, else the one applied last.

Trusts: the database (written only by `kanmon cluster push`, which validates); every
version is validated again by each node before it applies it; nothing in the cache file
(decoded strictly, validated as a pushed version; a damaged one is moved aside). A version that fails to
validate or to load (a listen address that cannot be bound...) is refused with the old
configuration still serving (the reload's promise).
Never: apply a version without validating it for this node; stop serving on a refusal;
write a password (the URL holds none).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import socket
import sys
import threading
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kanmon.config import Config, ConfigError, parse_config, toml_line_finder

if TYPE_CHECKING:
    import psycopg

    from kanmon.config import RecordsSection

CHANNEL = "kanmon_config"
POLL = 30.0  # seconds between checks for a version a lost notification did not announce
LOCAL_SECTIONS = ("records", "cluster")  # a node keeps its own
CACHE_FILE = "cluster-config.json"
CACHE_FORMAT = 1


def _connect(section: RecordsSection, **kwargs: Any) -> psycopg.Connection:
    from kanmon.records.pg import connect, migrate

    conn = connect(section.url, section.password_file, autocommit=True, **kwargs)
    try:
        migrate(conn)
    except BaseException:
        conn.close()
        raise
    return conn


# -- building a node's configuration ------------------------------------------------------

def _merge(base: dict, overlay: dict) -> dict:
    out = dict(base)
    for key, value in overlay.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)  # a TOML basic string (the escapes JSON uses are TOML's)
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(k, ensure_ascii=False)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return v.isoformat()  # dates and times, as tomllib read them


def to_toml(data: dict) -> str:
    """TOML for a document tomllib read (every table inline, keys quoted)."""
    return "".join(f"{json.dumps(k, ensure_ascii=False)} = {_toml_value(v)}\n" for k, v in data.items())


def node_config(text: str, node: str, local: dict, source: str) -> tuple[Config, str]:
    """The configuration `node` runs from the pushed text: (Config, its text). ConfigError
    names every bad key, as for a file."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([f"{source}: not valid TOML: {e}"]) from None
    overlays = data.pop("node", {})
    if not isinstance(overlays, dict):
        raise ConfigError([f"{source}: node: must be tables [node.NAME.SECTION]"])
    overlay = overlays.get(node, {})
    merged = _merge(data, overlay)
    for section in LOCAL_SECTIONS:
        merged.pop(section, None)
        if section in local:
            merged[section] = local[section]
    out = to_toml(merged)
    in_file = toml_line_finder(text)

    def line_of(loc: tuple) -> int | None:
        """An error's line in the pushed file: in the node's overlay when the key comes
        from there, else in the shared part (the text parsed is made, all on line 1)."""
        if loc and loc[0] in LOCAL_SECTIONS:
            return None  # the node's own file's, not this one's
        found, d = 0, overlay
        for part in loc:
            if not isinstance(d, dict) or part not in d:
                break
            found, d = found + 1, d[part]
        if found >= min(2, len(loc)):
            return in_file(("node", node, *loc))
        return in_file(loc)

    return parse_config(out, f"{source} for node {node}" if node else source, line_of), out


def validate_push(text: str) -> list[str]:
    """What is wrong with a file to push: the configuration without overlays and with
    each node's overlay must validate."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        return [f"not valid TOML: {e}"]
    overlays = data.get("node", {})
    if not isinstance(overlays, dict) or not all(isinstance(v, dict) for v in overlays.values()):
        return ["node: must be tables [node.NAME.SECTION]"]
    local = {k: data[k] for k in LOCAL_SECTIONS if k in data}
    try:
        node_config(text, "", local, "the file")
    except ConfigError as e:
        return e.messages  # the overlays would repeat them
    errors: list[str] = []
    for name in overlays:
        try:
            node_config(text, name, local, "the file")
        except ConfigError as e:
            errors += e.messages
    return errors


# -- pushing and reading ------------------------------------------------------------------

def push(section: RecordsSection, text: str) -> int:
    """Store a validated file as the newest version and tell the nodes; its version.
    ConfigError when it does not validate (nothing stored)."""
    errors = validate_push(text)
    if errors:
        raise ConfigError(errors)
    with _connect(section) as conn, conn.transaction():
        (version,) = conn.execute(
            "INSERT INTO cluster_config (text, pushed, pushed_by, sha256) VALUES (%s, %s, %s, %s) RETURNING version",
            (text, time.time(), socket.gethostname(), hashlib.sha256(text.encode()).hexdigest())).fetchone()
        conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, str(version)))
    return version


def latest(conn: psycopg.Connection) -> tuple[int, str] | None:
    return conn.execute("SELECT version, text FROM cluster_config ORDER BY version DESC LIMIT 1").fetchone()


def states(section: RecordsSection) -> dict[str, tuple[int, str, str, float]]:
    """node -> (version, "applied"|"refused", error, when)."""
    with _connect(section) as conn:
        return {n: (v, st, err, ts) for n, v, st, err, ts in conn.execute(
            "SELECT node, version, state, error, ts FROM cluster_config_state")}


def newest_version(section: RecordsSection) -> int | None:
    with _connect(section) as conn:
        row = latest(conn)
    return row[0] if row else None


def _report(conn: psycopg.Connection, node: str, version: int, state: str, error: str) -> None:
    conn.execute(
        "INSERT INTO cluster_config_state (node, version, state, error, ts) VALUES (%s, %s, %s, %s, %s)"
        " ON CONFLICT (node) DO UPDATE SET version = excluded.version, state = excluded.state,"
        " error = excluded.error, ts = excluded.ts", (node, version, state, error.replace("\x00", ""), time.time()))


# -- the applied version, kept on the node's disk ------------------------------------------

@dataclass(frozen=True, slots=True)
class Cached:
    version: int
    node: str
    text: str
    applied: float


class CacheError(ValueError):
    """The cache file is not one this kanmon wrote."""


def local_sections(config: Config) -> dict:
    """What a node keeps of its local file in every pushed version ([records], [cluster])."""
    out = {"records": config.records.model_dump(mode="json", exclude_defaults=True)}
    if config.cluster is not None:
        out["cluster"] = config.cluster.model_dump(mode="json")
    return out


def write_cache(data_dir: Path, version: int, node: str, text: str) -> Path:
    """Keep the version this node applied (0600, fsynced, replaced atomically)."""
    path = Path(data_dir) / CACHE_FILE
    data = json.dumps({"format": CACHE_FORMAT, "version": version, "node": node, "applied": time.time(),
                       "sha256": hashlib.sha256(text.encode()).hexdigest(), "text": text}, ensure_ascii=False)
    tmp = path.with_name(f".{CACHE_FILE}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return path


def read_cache(data_dir: Path) -> Cached:
    """The cached version; FileNotFoundError when there is none, CacheError when the file
    is not one kanmon wrote (truncated, edited, another format)."""
    raw = (Path(data_dir) / CACHE_FILE).read_bytes()
    try:
        d = json.loads(raw)
    except ValueError as e:
        raise CacheError(f"not JSON: {e}") from None
    if not isinstance(d, dict) or d.get("format") != CACHE_FORMAT:
        raise CacheError("not a cached cluster configuration of this format")
    version, node, text, applied = d.get("version"), d.get("node"), d.get("text"), d.get("applied")
    if (not isinstance(version, int) or isinstance(version, bool) or version < 1 or not isinstance(node, str)
            or not isinstance(text, str) or not isinstance(applied, (int, float))):
        raise CacheError("a field is missing or of the wrong type")
    if d.get("sha256") != hashlib.sha256(text.encode()).hexdigest():
        raise CacheError("its text does not match its checksum")
    return Cached(version, node, text, float(applied))


def starting_config(config: Config, text: str | None) -> tuple[Config, str | None, tuple[int | None, str] | None]:
    """The configuration a node with [cluster] starts with: its cached version when there
    is one that validates for it, else the local file `config` (text: its text). The
    third item, (the version started with or None, a line for the event log), says what
    was chosen when there was a cache."""
    assert config.cluster is not None
    data_dir = Path(config.server.data_dir)
    path = data_dir / CACHE_FILE
    try:
        cached = read_cache(data_dir)
    except FileNotFoundError:
        return config, text, None
    except (CacheError, OSError) as e:
        aside = path.with_name(f"{CACHE_FILE}.damaged-{time.strftime('%Y%m%d%H%M%S')}")
        try:
            os.replace(path, aside)
            where = f"moved to {aside.name}"
        except OSError as err:
            where = f"could not be moved aside ({err.strerror or err})"
        return config, text, (None, f"cluster: the cached configuration {path} is damaged ({e}); it {where}; "
                                    "started with the local file")
    name = config.cluster.node
    if cached.node != name:
        return config, text, (None, f"cluster: the cached configuration {path} is node {cached.node}'s, not "
                                    f"{name}'s; started with the local file")
    try:
        new, out = node_config(cached.text, name, local_sections(config), f"cached cluster config version {cached.version}")
    except ConfigError as e:
        return config, text, (None, f"cluster: cached configuration version {cached.version} does not validate "
                                    f"({'; '.join(e.messages)}); started with the local file")
    if Path(new.server.data_dir).resolve() != data_dir.resolve():
        return config, text, (None, f"cluster: cached configuration version {cached.version} names another data_dir "
                                    f"({new.server.data_dir}); started with the local file")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(cached.applied))
    return new, out, (cached.version, f"cluster: started with configuration version {cached.version}, the last one "
                                      f"this node applied ({when}, kept in {path}); newer versions apply as the "
                                      "database announces them")


# -- the node's watcher -------------------------------------------------------------------

class ClusterWatch:
    """In the node's TaskGroup: apply each new pushed version by node.reload()."""

    def __init__(self, node, reload_errors: tuple[type[Exception], ...],
                 start: tuple[int | None, str] | None = None):
        """node: the running Node (its config is the local file's, or the cached version
        starting_config chose: their [records] and [cluster] are the same); reload_errors:
        what node.reload() raises when it refuses (the old configuration still serving);
        start: starting_config's note (the version running, a line for the event log)."""
        self.node = node
        config = node.config
        self.name = config.cluster.node
        self.section = config.records  # the local file's: how this node reaches the database
        self.cluster = config.cluster
        self.local = local_sections(config)
        self.reload_errors = reload_errors
        self.start_note = start[1] if start else None
        self.applied: int | None = start[0] if start else None  # the version running (None: the local file)
        self.seen = self.applied or 0  # the newest version acted on (applied or refused)
        self._wake: asyncio.Event | None = None
        self._stop = threading.Event()
        self._cache_tried = self.applied is not None  # the cached version, once per local file
        self._lock = asyncio.Lock()  # one version applied at a time (the watch, a reload of the local file)

    async def reload_local(self, local: Config, text: str | None) -> dict:
        """A reload of the node's local file (SIGHUP, `kanmon reload`), `local` its new
        content, validated: the node runs the configuration a restart would run, never
        its local file while a pushed version applies. That is the newest pushed
        version when it loads; when it is refused (or the database does not answer), the
        version this node applied last, kept on its disk; the local file only when there
        is none. node.reload()'s result, with "cluster": {"version": the version now
        running or None, "refused": {"version", "error"} when the newest was refused}.
        reload_errors when nothing could be loaded (the old configuration still serving)."""
        # [records] and [cluster] take effect at a restart: the node keeps those it started with.
        local = local.model_copy(update={"records": self.section, "cluster": self.cluster})
        async with self._lock:
            refused = None
            try:
                row = await asyncio.to_thread(self._latest)
            except Exception as e:  # noqa: BLE001 - the database is down: the version kept on disk
                print(f"kanmon: cluster: {e}", file=sys.stderr)
                row = None
            if row is not None:
                version, pushed = row
                self.seen = max(self.seen, version)
                try:
                    new, out = node_config(pushed, self.name, self.local, f"cluster config version {version}")
                    result = await self.node.reload(new, out)
                except ConfigError as e:
                    refused = {"version": version, "error": "; ".join(e.messages)}
                except self.reload_errors as e:
                    refused = {"version": version, "error": str(e)}
                else:
                    await self._applied(version, pushed)
                    return {**result, "cluster": {"version": version, "refused": None}}
                self.node.records.emit(f"cluster: configuration version {version} refused: {refused['error']}",
                                       kind="error")
                await asyncio.to_thread(self._write_state, version, "refused", refused["error"])
            new, out, note = await asyncio.to_thread(starting_config, local, text)
            if note is not None and note[0] is None:
                self.node.records.emit(note[1], kind="error")
            result = await self.node.reload(new, out)
            self.applied = note[0] if note is not None else None
            self._cache_tried = True
            if self.applied is not None:
                why = (f"version {refused['version']} was refused" if refused is not None
                       else "the database does not answer" if row is None else "")
                self.node.records.emit(f"cluster: reload: runs configuration version {self.applied}, the last one "
                                       f"this node applied (kept in {self.node.data_dir / CACHE_FILE})"
                                       + (f": {why}" if why else ""))
            return {**result, "cluster": {"version": self.applied, "refused": refused}}

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        if self.start_note:
            self.node.records.emit(self.start_note, kind="error" if self.applied is None else "info")
        listener = threading.Thread(target=self._listen, args=(loop,), name="cluster-listen", daemon=True)
        listener.start()
        try:
            while True:
                async with self._lock:
                    try:
                        await self.check()
                    except Exception as e:  # noqa: BLE001 - the database is down: the next check tries again
                        print(f"kanmon: cluster: {e}", file=sys.stderr)
                        await self._apply_cached(e)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(POLL):
                        await self._wake.wait()
                self._wake.clear()
        finally:
            self._stop.set()

    async def _apply_cached(self, why: Exception) -> None:
        """The database does not answer and the node runs its local file (a reload of
        it): apply the version this node last applied, kept on its disk."""
        if self.applied is not None or self._cache_tried:
            return
        self._cache_tried = True
        new, out, note = await asyncio.to_thread(starting_config, self.node.config, None)
        if note is None or note[0] is None:
            if note is not None:
                self.node.records.emit(note[1], kind="error")
            return
        version = note[0]
        first = str(why).strip().splitlines()[0] if str(why).strip() else type(why).__name__
        try:
            await self.node.reload(new, out)
        except self.reload_errors as e:
            self.node.records.emit(f"cluster: cached configuration version {version} refused: {e}", kind="error")
            return
        self.applied = self.seen = version
        self.node.records.emit(f"cluster: the database does not answer ({first}): applied configuration version "
                               f"{version}, the last one this node applied (kept in {self.node.data_dir / CACHE_FILE})")

    def _listen(self, loop: asyncio.AbstractEventLoop) -> None:
        """LISTEN on its own connection; each notification wakes run()."""
        while not self._stop.is_set():
            try:
                with _connect(self.section) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    loop.call_soon_threadsafe(self._wake.set)  # what was pushed while not listening
                    while not self._stop.is_set():
                        for _n in conn.notifies(timeout=1.0):
                            loop.call_soon_threadsafe(self._wake.set)
            except Exception:  # noqa: BLE001 - reconnect after a pause; run() polls meanwhile
                if self._stop.wait(5.0):
                    return
            except BaseException:
                return

    async def check(self) -> str | None:
        """Apply the newest version when it is new to this node; "applied", "refused" or None."""
        row = await asyncio.to_thread(self._latest)
        if row is None or row[0] <= self.seen:
            return None
        version, text = row
        self.seen = version
        try:
            new, out = node_config(text, self.name, self.local, f"cluster config version {version}")
            await self.node.reload(new, out)
        except ConfigError as e:
            state, error = "refused", "; ".join(e.messages)
            self.node.records.emit(f"cluster: configuration version {version} refused: {error}", kind="error")
        except self.reload_errors as e:
            state, error = "refused", str(e)
            self.node.records.emit(f"cluster: configuration version {version} refused: {error}", kind="error")
        else:
            await self._applied(version, text)
            return "applied"
        await asyncio.to_thread(self._write_state, version, state, error)
        return state

    async def _applied(self, version: int, text: str) -> None:
        """`version` now runs: say so, keep it on disk, report it."""
        self.applied = version
        self.node.records.emit(f"cluster: configuration version {version} applied")
        try:
            await asyncio.to_thread(write_cache, self.node.data_dir, version, self.name, text)
        except OSError as e:
            self.node.records.emit(f"cluster: cannot keep configuration version {version} in "
                                   f"{self.node.data_dir / CACHE_FILE}: {e.strerror or e}", kind="error")
        await asyncio.to_thread(self._write_state, version, "applied", "")

    def _latest(self) -> tuple[int, str] | None:
        with _connect(self.section) as conn:
            return latest(conn)

    def _write_state(self, version: int, state: str, error: str) -> None:
        with _connect(self.section) as conn:
            _report(conn, self.name, version, state, error)
