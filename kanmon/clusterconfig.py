"""One configuration for the cluster: `kanmon cluster push` stores a validated version in
the shared records' database; nodes with `[cluster] node = NAME` watch for new versions
(LISTEN/NOTIFY, and a check every POLL seconds for what a lost connection missed), apply
each by the node's graceful reload, and report `applied` or `refused` per node.

The pushed file is a kanmon configuration plus per-node overlays of the same shape,
`[node.mr1.server] hostname = ...`, `[node.mr1.smtp] listen = [...]`: a node's
configuration is the pushed one with its overlay's tables merged in (an overlay key
replaces the same key; a list is replaced whole), then the node's own `[records]` and
`[cluster]` from its local file (how it reaches the database stays its own).

Trusts: the database (written only by `kanmon cluster push`, which validates); every
version is validated again by each node before it applies it. A version that fails to
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
import socket
import sys
import threading
import time
import tomllib
from typing import TYPE_CHECKING, Any

from kanmon.config import Config, ConfigError, parse_config

if TYPE_CHECKING:
    import psycopg

    from kanmon.config import RecordsSection

CHANNEL = "kanmon_config"
POLL = 30.0  # seconds between checks for a version a lost notification did not announce
LOCAL_SECTIONS = ("records", "cluster")  # a node keeps its own


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
    merged = _merge(data, overlays.get(node, {}))
    for section in LOCAL_SECTIONS:
        merged.pop(section, None)
        if section in local:
            merged[section] = local[section]
    out = to_toml(merged)
    return parse_config(out, f"{source} for node {node}" if node else source), out


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


# -- the node's watcher -------------------------------------------------------------------

class ClusterWatch:
    """In the node's TaskGroup: apply each new pushed version by node.reload()."""

    def __init__(self, node, reload_errors: tuple[type[Exception], ...]):
        """node: the running Node (its config is the local file's); reload_errors: what
        node.reload() raises when it refuses (the old configuration still serving)."""
        self.node = node
        config = node.config
        self.name = config.cluster.node
        self.section = config.records  # the local file's: how this node reaches the database
        self.local = {"records": config.records.model_dump(mode="json", exclude_defaults=True),
                      "cluster": config.cluster.model_dump(mode="json")}
        self.reload_errors = reload_errors
        self.applied: int | None = None  # the version running (None: the local file)
        self.seen = 0  # the newest version acted on (applied or refused)
        self._wake: asyncio.Event | None = None
        self._stop = threading.Event()

    def local_file_reloaded(self) -> None:
        """The node reloaded its local file (SIGHUP): the cluster's version applies again."""
        self.applied, self.seen = None, 0
        if self._wake is not None:
            self._wake.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        listener = threading.Thread(target=self._listen, args=(loop,), name="cluster-listen", daemon=True)
        listener.start()
        try:
            while True:
                try:
                    await self.check()
                except Exception as e:  # noqa: BLE001 - the database is down: the next check tries again
                    print(f"kanmon: cluster: {e}", file=sys.stderr)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), POLL)
                self._wake.clear()
        finally:
            self._stop.set()

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
            state, error = "applied", ""
            self.applied = version
            self.node.records.emit(f"cluster: configuration version {version} applied")
        await asyncio.to_thread(self._write_state, version, state, error)
        return state

    def _latest(self) -> tuple[int, str] | None:
        with _connect(self.section) as conn:
            return latest(conn)

    def _write_state(self, version: int, state: str, error: str) -> None:
        with _connect(self.section) as conn:
            _report(conn, self.name, version, state, error)
