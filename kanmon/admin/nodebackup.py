"""Whole-node backup and restore: one archive for disaster recovery and new hardware
(docs/operations.md, "Backup and restore").

Role: `kanmon backup FILE` collects every part of a node into one POSIX tar archive,
with a SHA-256 of each member in the end record:

    kanmon-node-backup.json       {"format": "kanmon-node-backup", "version": 1, "parts": [...], ...}
    config/kanmon.toml            the configuration file
    users/accounts.json           the accounts table (password hashes, lock state)
    users/files/<name>            users data files in data_dir (users*), when present
    dkim/<path>                   <data_dir>/dkim/, when present
    tls/cert, tls/key             the [tls] certificate and key files
    tls/data/<path>               <data_dir>/tls/, when present
    alerts/events.json            the alert events (what `kanmon alert list` reads)
    alerts/alert-state.json       <data_dir>/alert-state.json (what was mailed when), when present
    quarantine/<path>             <data_dir>/quarantine/, when present
    mailboxes/<path>              <data_dir>/mailboxes/ (the mail store)
    queue/queue-backup.tar        the queue, in the queue backup format (docs/queue-backup.md)
    queue/maintenance.json        <data_dir>/maintenance.json (the [[maintenance]] jobs' last runs), when present
    queue/quarantine-digest.json  <data_dir>/quarantine-digest.json (the last digest's time), when present
    kanmon-node-backup-end.json   {"members": {name: sha256}}: a truncated archive lacks it

The queue part goes through the queue operations (the running server's control socket,
or the spool under the data_dir lock), so it is consistent while the node runs; the
accounts are read in one SQLite transaction. `restore_node` runs on a stopped node only
(it holds the data_dir lock): it verifies the whole archive first, then refuses to
replace anything that differs unless forced, and skips what is already there, so running
it twice changes nothing the second time. A config file that exists is kept (never
replaced by the archive's) and decides every target; without one, a restore must
include the config part (the archive's then decides), or it is refused before writing.

Trusts: nothing in an archive being read: member names are checked (a known part, no
absolute path, no `..`), sizes bounded, every checksum verified before anything is
written; the queue part is read by kanmon.admin.backup's own strict reader.
Never: write a partial archive under the final name, restore from an archive that failed
verification, write outside the data_dir and the configured TLS paths, or overwrite a
file that differs without `force`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sqlite3
import tarfile
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from kanmon.admin import lastdigest, maintenance
from kanmon.admin.queue_ops import offline_queue_ops
from kanmon.configpath import DEFAULT_DATA_DIR
from kanmon.admin.reach import Unreachable, reach_queue
from kanmon.alerts import STATE_FILE, StateFileError, decode_state
from kanmon.config import Config, ConfigError, parse_config
from kanmon.control import DataDirLock, LockBusy
from kanmon.privileges import hand_over_to_owner
from kanmon.records.store import open_db
from kanmon.store.maildir import make_dirs_private

FORMAT = "kanmon-node-backup"
VERSION = 1
HEAD = "kanmon-node-backup.json"
END = "kanmon-node-backup-end.json"
ALERT_STATE = "alerts/alert-state.json"
CONFIG = "config/kanmon.toml"
PARTS = ("config", "users", "dkim", "tls", "alerts", "quarantine", "mailboxes", "queue")
TREES = {"dkim": "dkim", "quarantine": "quarantine", "mailboxes": "mailboxes"}  # part -> dir in data_dir
MAX_MEMBER = 1 << 32
QUEUE_MEMBER = "queue/queue-backup.tar"
# Run logs (member -> the file in data_dir, its strict decoder): restored only where the
# node has none, since one there is newer (a node started once already keeps its own).
RUN_LOGS = {"queue/maintenance.json": (maintenance.FILE, maintenance.decode),
            "queue/quarantine-digest.json": (lastdigest.FILE, lastdigest.decode)}
# The accounts table as kanmon.store.users creates it (for a restore onto a fresh data_dir).
ACCOUNTS_TABLE = ("CREATE TABLE IF NOT EXISTS accounts (address TEXT PRIMARY KEY, hash TEXT, locked INTEGER NOT NULL "
                  "DEFAULT 0, last_login REAL, last_ip TEXT, changed REAL)")
TLS_PAIR = ("tls/cert", "tls/key")  # the [tls] certificate and key: restored to the config's paths
ALERT_KINDS = ("alert", "alert-mail", "alert-not-mailed", "alert-request")


class NodeBackupError(Exception):
    """The archive cannot be used, or the restore would overwrite something (str: why)."""


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def parse_parts(only: str | None) -> tuple[str, ...]:
    """--only "users,queue" -> the parts, in archive order; ValueError naming a bad one."""
    if not only:
        return PARTS
    names = [p.strip() for p in only.split(",") if p.strip()]
    bad = [p for p in names if p not in PARTS]
    if bad or not names:
        raise ValueError(f"unknown part {', '.join(bad) or only!r} (parts: {', '.join(PARTS)})")
    return tuple(p for p in PARTS if p in names)


# ---------------------------------------------------------------------------
# Writing


class _Writer:
    def __init__(self, path: Path, now: float):
        self.path = path
        self.partial = path.with_name(path.name + ".partial")
        self.now = now
        self.members: dict[str, str] = {}
        fd = os.open(self.partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        self._fh = os.fdopen(fd, "wb")
        self._tar = tarfile.open(fileobj=self._fh, mode="w|", format=tarfile.PAX_FORMAT)

    def add(self, name: str, data: bytes, *, checked: bool = True) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = int(self.now)
        info.mode = 0o600
        self._tar.addfile(info, io.BytesIO(data))
        if checked:
            self.members[name] = _sha(data)

    def add_file(self, name: str, path: Path) -> bool:
        """A file as it is now; False when it went away meanwhile (a message read and moved)."""
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return False
        self.add(name, data)
        return True

    def finish(self) -> None:
        self.add(END, json.dumps({"members": self.members}).encode(), checked=False)
        self._tar.close()
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        os.replace(self.partial, self.path)

    def abort(self) -> None:
        try:
            self._tar.close()
            self._fh.close()
        finally:
            self.partial.unlink(missing_ok=True)


def _tree(root: Path) -> Iterator[tuple[str, Path]]:
    """(relative posix path, path) of every regular file under root, sorted."""
    if not root.is_dir():
        return
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if p.is_file() and not p.is_symlink():
                yield p.relative_to(root).as_posix(), p


def _users_files(data_dir: Path) -> list[Path]:
    """Users data files kept beside the records database (users.*), when present."""
    if not data_dir.is_dir():
        return []
    return sorted(p for p in data_dir.iterdir()
                  if p.name.startswith("users") and not p.name.endswith(".lock") and p.is_file())  # no lock file


def _accounts(data_dir: Path) -> list[dict]:
    path = data_dir / "records.sqlite"
    if not path.exists():
        return []
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        db.row_factory = sqlite3.Row
        try:
            rows = db.execute("SELECT address, hash, locked, changed FROM accounts ORDER BY address").fetchall()
        except sqlite3.OperationalError:  # no accounts table yet: no passwords were ever set
            return []
        return [dict(r) for r in rows]
    finally:
        db.close()


def _alert_events(data_dir: Path) -> list[dict]:
    path = data_dir / "records.sqlite"
    if not path.exists():
        return []
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        db.row_factory = sqlite3.Row
        marks = ",".join("?" * len(ALERT_KINDS))
        try:
            rows = db.execute(f"SELECT ts, queue_id, kind, text, detail FROM events WHERE kind IN ({marks}) "
                              "ORDER BY id", ALERT_KINDS).fetchall()
        except sqlite3.OperationalError:
            return []
        return [dict(r) for r in rows]
    finally:
        db.close()


def backup_node(config: Config, config_path: Path | None, target: Path, parts: tuple[str, ...] = PARTS,
                *, force: bool = False, progress: Callable[[str], None] | None = None) -> dict:
    """Write the archive; a summary {"path", "parts": {part: files}, "queue": messages,
    "queue_set_aside": [ids set aside now], "queue_corrupt": damaged files left out}."""
    target = Path(target)
    if target.exists() and not force:
        raise NodeBackupError(f"{target} exists (use --force to replace it)")
    data_dir = Path(config.server.data_dir)
    say = progress or (lambda _text: None)
    now = time.time()
    summary: dict = {"path": str(target), "parts": {}, "queue": None}
    head = {"format": FORMAT, "version": VERSION, "created": now, "hostname": config.server.hostname,
            "data_dir": str(data_dir), "parts": list(parts),
            "config_path": str(config_path) if config_path else None,
            "tls": {k: str(getattr(config.tls, k)) for k in ("cert", "key")} if config.tls else None}
    w = _Writer(target, now)
    # The running server writes the queue part: into its own data_dir, which it can
    # always write (not beside the target: root's /root/backup.tar is not the server's).
    queue_tmp = data_dir / f".node-backup-queue-{os.getpid()}.tar"
    try:
        w.add(HEAD, json.dumps(head, indent=1).encode())
        for part in parts:
            n = 0
            if part == "config":
                if config_path is not None:
                    n += w.add_file(CONFIG, Path(config_path))
            elif part == "users":
                w.add("users/accounts.json", json.dumps(_accounts(data_dir)).encode())
                n += 1
                for p in _users_files(data_dir):
                    n += w.add_file(f"users/files/{p.name}", p)
            elif part in TREES:
                for rel, p in _tree(data_dir / TREES[part]):
                    n += w.add_file(f"{part}/{rel}", p)
            elif part == "tls":
                if config.tls is not None:
                    n += w.add_file("tls/cert", config.tls.cert)
                    n += w.add_file("tls/key", config.tls.key)
                for rel, p in _tree(data_dir / "tls"):
                    n += w.add_file(f"tls/data/{rel}", p)
            elif part == "alerts":
                w.add("alerts/events.json", json.dumps(_alert_events(data_dir)).encode())
                n += 1
                # Replaced atomically by the running node: whole as of one moment.
                state = _read_if_present(data_dir / STATE_FILE)
                if state is not None:
                    w.add(ALERT_STATE, state)
                    n += 1
            elif part == "queue":
                for member, (file, _decode) in RUN_LOGS.items():
                    log = _read_if_present(data_dir / file)  # each replaced whole by the node: one moment
                    if log is not None:
                        w.add(member, log)
                        n += 1
                if (data_dir / "spool").is_dir():
                    try:
                        with reach_queue(config) as q:
                            result = q.call("backup", {"path": str(queue_tmp.resolve()), "filters": {},
                                                       "source": "kanmon backup"})
                    except Unreachable as e:
                        raise NodeBackupError(f"queue: {e}") from None
                    w.add_file(QUEUE_MEMBER, queue_tmp)
                    summary["queue"] = result["count"]
                    # Damaged queue files (set aside now, or before): in spool/corrupt/, not here.
                    summary["queue_set_aside"] = result["set_aside"]
                    summary["queue_corrupt"] = result["corrupt"]
                    if result["corrupt"]:
                        say(f"queue: {result['corrupt']} damaged queue file(s) in spool/corrupt/ left out"
                            + (f", {len(result['set_aside'])} of them set aside now" if result["set_aside"] else ""))
                    n += 1
            summary["parts"][part] = n
            say(f"{part}: {n} file(s)")
        w.finish()
    except BaseException:
        w.abort()
        raise
    finally:
        queue_tmp.unlink(missing_ok=True)
    return summary


# ---------------------------------------------------------------------------
# Reading and restoring


def _check_name(name: str) -> str:
    """A member name: HEAD/END, or <part>/<relative path> with no way out of the part."""
    if name in (HEAD, END):
        return name
    parts = name.split("/")
    if parts[0] not in PARTS or len(parts) < 2 or any(c in ("", ".", "..") for c in parts) \
            or "\\" in name or "\x00" in name:
        raise NodeBackupError(f"unexpected member {name!r}")
    return name


def _members(path: Path) -> Iterator[tuple[str, bytes]]:
    """(name, data) of each member, names checked, sizes bounded."""
    try:
        tar = tarfile.open(path, mode="r|*")
    except (OSError, tarfile.TarError) as e:
        raise NodeBackupError(f"{path}: not a readable tar archive: {e}") from None
    with tar:
        try:
            for m in tar:
                name = _check_name(m.name)
                if not m.isfile() or m.size > MAX_MEMBER:
                    raise NodeBackupError(f"member {name!r} is not a regular file of a sane size")
                fh = tar.extractfile(m)
                assert fh is not None
                data = fh.read()
                if len(data) != m.size:
                    raise NodeBackupError(f"member {name!r} is truncated")
                yield name, data
        except (OSError, tarfile.TarError, EOFError) as e:
            raise NodeBackupError(f"{path}: damaged archive: {e}") from None


def _json(name: str, data: bytes):
    try:
        return json.loads(data)
    except ValueError:
        raise NodeBackupError(f"member {name!r} is not JSON") from None


@dataclass
class Verified:
    head: dict
    members: dict[str, str]  # name -> sha256
    small: dict[str, bytes] = field(default_factory=dict)  # the JSON members and the config


def verify_node_archive(path: Path) -> Verified:
    """Read the whole archive, checking names, checksums and the end record."""
    seen: dict[str, str] = {}
    small: dict[str, bytes] = {}
    head = None
    end = None
    for name, data in _members(Path(path)):
        if end is not None:
            raise NodeBackupError(f"{path}: member {name!r} after the end record")
        if head is None:
            if name != HEAD:
                raise NodeBackupError(f"{path}: not a kanmon node backup (no {HEAD})")
            head = _json(name, data)
            if not isinstance(head, dict) or head.get("format") != FORMAT or head.get("version") != VERSION:
                raise NodeBackupError(f"{path}: unsupported backup format")
        elif name == END:
            end = _json(name, data)
            continue
        if name in seen:
            raise NodeBackupError(f"{path}: member {name!r} appears twice")
        seen[name] = _sha(data)
        if name.endswith(".json") or name == CONFIG:
            small[name] = data
    if head is None:
        raise NodeBackupError(f"{path}: empty archive")
    if not isinstance(end, dict) or not isinstance(end.get("members"), dict):
        raise NodeBackupError(f"{path}: truncated (no end record)")
    if end["members"] != seen:
        bad = sorted(set(end["members"].items()) ^ set(seen.items()))
        raise NodeBackupError(f"{path}: checksum mismatch or missing member: {bad[0][0]!r}")
    return Verified(head, seen, small)


@dataclass
class Targets:
    """Where a restore writes: from the config being restored onto."""

    config_path: Path
    data_dir: Path
    tls: dict[str, Path]


def restore_targets(config_path: Path, archived_config: bytes | None) -> Targets:
    """data_dir and TLS paths from the config file (or, when it does not exist yet, from
    the archived one). Read with tomllib only: its TLS files may not exist yet."""
    text = config_path.read_bytes() if config_path.exists() else archived_config
    if text is None:
        raise NodeBackupError(f"{config_path} does not exist and the archive holds no config")
    try:
        raw = tomllib.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise NodeBackupError(f"the configuration cannot be read: {e}") from None
    server = raw.get("server") or {}
    tls = raw.get("tls") or {}
    return Targets(config_path, Path(server.get("data_dir", DEFAULT_DATA_DIR)),
                   {k: Path(tls[k]) for k in ("cert", "key") if isinstance(tls.get(k), str)})


def _file_sha(path: Path) -> str | None:
    try:
        return _sha(path.read_bytes())
    except FileNotFoundError:
        return None


def _read_if_present(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _destination(name: str, t: Targets) -> Path | None:
    """The file a member restores to (None: not a plain file member)."""
    part, _, rest = name.partition("/")
    if name == CONFIG:
        return t.config_path
    if name == ALERT_STATE:
        return t.data_dir / STATE_FILE
    if name in RUN_LOGS:
        return t.data_dir / RUN_LOGS[name][0]
    if part in TREES:
        return t.data_dir / TREES[part] / rest
    if part == "users" and rest.startswith("files/"):
        return t.data_dir / PurePosixPath(rest).name
    if part == "tls":
        if rest in ("cert", "key"):
            return t.tls.get(rest)
        if rest.startswith("data/"):
            return t.data_dir / "tls" / rest[len("data/"):]
    return None


def _in_maildir(dest: Path) -> bool:
    """A Maildir message already there under new/ or cur/, whatever its flags (a message
    read since the backup moved from new/ to cur/ with ":2,S" added)."""
    if dest.parent.name not in ("new", "cur"):
        return False
    unique = dest.name.split(":", 1)[0]
    for sub in ("new", "cur"):
        d = dest.parent.parent / sub
        if d.is_dir() and any(n.split(":", 1)[0] == unique for n in os.listdir(d)):
            return True
    return False


def _maildir_folders(names: list[str]) -> set[PurePosixPath]:
    """The Maildir folders (relative to mailboxes/) the mailboxes members are in: each
    account's root <domain>/<local> (INBOX) and its Maildir++ folders <root>/.<name>."""
    folders = set()
    for name in names:
        rel = PurePosixPath(name).parts[1:]
        if name.startswith("mailboxes/") and len(rel) >= 3:
            folders.add(PurePosixPath(*rel[:2]))
            if len(rel) >= 4 and rel[2].startswith("."):
                folders.add(PurePosixPath(*rel[:3]))
    return folders


def _complete_maildirs(t: Targets, names: list[str]) -> None:
    """The archive holds files only: a folder's empty cur/, new/ or tmp/ is not in it, and
    without cur/ a folder does not exist for IMAP, POP3 or `kanmon user list` (its read
    mail in cur/ neither). Every folder restored gets all three (0700), as delivery makes them."""
    for rel in sorted(_maildir_folders(names)):
        for sub in ("cur", "new", "tmp"):
            make_dirs_private(t.data_dir / TREES["mailboxes"] / rel / sub)


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.restore-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def restore_node(archive: Path, config_path: Path, parts: tuple[str, ...] = PARTS, *, force: bool = False,
                 load: Callable[[Path], Config] | None = None,
                 progress: Callable[[str], None] | None = None) -> dict:
    """Restore onto a stopped node; {"parts": {part: {"restored": n, "same": n}}, "queue": ..}.

    load(config_path) -> Config: how the restored config is validated and loaded (for the
    queue part, whose operations need the whole config)."""
    say = progress or (lambda _text: None)
    v = verify_node_archive(Path(archive))
    # A config file that exists decides where every part goes, and is kept: the archive's
    # written over it would send the parts restored after it (the queue) to its data_dir.
    config_existed = Path(config_path).exists()
    if not config_existed and "config" not in parts:
        # The archive's paths would be used but its config not written: the parts would
        # land where no config of this node points, and the users and queue parts need the
        # node's config loaded. Refused before anything is written.
        raise NodeBackupError(
            f"{config_path} does not exist and the config is not among the parts restored: the node's config "
            f"decides where each part goes. Restore it too (--only config,{','.join(parts)}), or install "
            "this node's config first (kanmon service install)")
    t = restore_targets(Path(config_path), v.small.get(CONFIG))
    if "queue" in parts and "tls" not in parts:
        # The queue part loads the config: validated before anything is written (with the
        # tls part its certificate and key come from the archive, so it is loaded after).
        text = Path(config_path).read_bytes() if config_existed else v.small[CONFIG]
        try:
            parse_config(text.decode("utf-8", "replace"), str(config_path))
        except ConfigError as e:
            raise NodeBackupError("the config restored onto is not valid: " + "; ".join(e.messages)) from None
    wanted = [n for n in v.members if n not in (HEAD, END) and n.partition("/")[0] in parts
              and not (n == CONFIG and config_existed)]
    if ALERT_STATE in wanted:
        try:  # the node would move a damaged one aside at start: refuse it here instead
            decode_state(v.small[ALERT_STATE])
        except StateFileError as e:
            raise NodeBackupError(f"{ALERT_STATE}: {e}") from None
    for name in set(RUN_LOGS) & set(wanted):
        try:  # likewise
            RUN_LOGS[name][1](v.small[name])
        except (ValueError, RecursionError, OverflowError) as e:
            raise NodeBackupError(f"{name}: {e}") from None
    # Refuse before writing anything: files that exist and differ, accounts that differ.
    conflicts = []
    for name in wanted:
        dest = _destination(name, t)
        if dest is not None and name not in RUN_LOGS and not (name.startswith("mailboxes/") and _in_maildir(dest)):
            have = _file_sha(dest)
            if have is not None and have != v.members[name]:
                conflicts.append(str(dest))
    accounts = _json("users/accounts.json", v.small["users/accounts.json"]) if (
        "users" in parts and "users/accounts.json" in v.small) else []
    current = {a["address"]: a for a in _accounts(t.data_dir)}
    for a in accounts:
        have = current.get(a.get("address"))
        if have is not None and (have["hash"], have["locked"]) != (a.get("hash"), a.get("locked")):
            conflicts.append(f"account {a.get('address')}")
    if conflicts and not force:
        raise NodeBackupError("restore would replace what differs (use --force): " + ", ".join(conflicts[:10])
                              + (f" and {len(conflicts) - 10} more" if len(conflicts) > 10 else ""))
    # As `kanmon serve` does: what is made without an explicit mode (SQLite's own files,
    # the parents mkdir makes) is private too, whatever umask root runs this with.
    umask = os.umask(0o077)
    try:
        t.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        lock = DataDirLock(t.data_dir)
        try:
            lock.acquire(wait=0)
        except LockBusy as e:
            raise NodeBackupError(f"{e}: stop kanmon before restoring") from None
        try:
            return _restore_locked(archive, v, t, parts, wanted, accounts, load, say, config_existed)
        finally:
            try:
                _hand_over(t, config_existed)
            finally:
                lock.release()
    finally:
        os.umask(umask)


def _hand_over(t: Targets, config_existed: bool) -> None:
    """Run as root for a data_dir of the service's user: what the restore wrote there
    becomes that user's (the server could not read a root-owned mailbox or database),
    and a config file it wrote is readable by the user's group (0640), as `kanmon
    service install` leaves it."""
    hand_over_to_owner(t.data_dir)
    st = os.stat(t.data_dir)
    if os.geteuid() != 0 or st.st_uid == 0:
        return
    if not config_existed and t.config_path.exists():
        os.chown(t.config_path, 0, st.st_gid)
        os.chmod(t.config_path, 0o640)


def _restore_locked(archive, v: Verified, t: Targets, parts, wanted, accounts, load, say, config_kept) -> dict:
    summary: dict = {"parts": {p: {"restored": 0, "same": 0} for p in parts}, "queue": None,
                     "config_kept": str(t.config_path) if config_kept and "config" in parts else None,
                     "tls_not_restored": []}
    queue_tmp = t.data_dir / f".restore-queue-{os.getpid()}.tar"
    try:
        for name, data in _members(Path(archive)):
            if name not in wanted:
                continue
            part = name.partition("/")[0]
            if _sha(data) != v.members[name]:  # changed since verification
                raise NodeBackupError(f"{archive}: {name!r} changed while restoring")
            if name == QUEUE_MEMBER:
                _write_private(queue_tmp, data)
                continue
            dest = _destination(name, t)
            if dest is None:
                if name in TLS_PAIR:  # the config restored onto has no [tls]: nowhere to go
                    summary["tls_not_restored"].append(name)
                continue
            if _file_sha(dest) == v.members[name] or (part == "mailboxes" and _in_maildir(dest)) or (
                    name in RUN_LOGS and dest.exists()):  # the node's own run log is newer
                summary["parts"][part]["same"] += 1
            else:
                _write_private(dest, data)
                summary["parts"][part]["restored"] += 1
        if "mailboxes" in parts:
            _complete_maildirs(t, wanted)
        config = load(t.config_path) if load is not None and "queue" in parts else None
        if "users" in parts and accounts:
            n = _restore_accounts(t.data_dir, accounts)
            summary["parts"]["users"]["restored"] += n
            summary["parts"]["users"]["same"] += len(accounts) - n
        if "alerts" in parts and "alerts/events.json" in v.small:
            n = _restore_alerts(t.data_dir, _json("alerts/events.json", v.small["alerts/events.json"]))
            summary["parts"]["alerts"]["restored"] += n
        if "queue" in parts and queue_tmp.exists():
            assert config is not None
            with offline_queue_ops(config) as ops:
                result = ops.restore(str(queue_tmp), source="kanmon restore")
            summary["queue"] = {"restored": len(result["restored"]), "skipped": len(result["skipped"]),
                                "held": len(result["on_hold"])}
            summary["parts"]["queue"]["restored"] = len(result["restored"])
            summary["parts"]["queue"]["same"] = len(result["skipped"])
    finally:
        queue_tmp.unlink(missing_ok=True)
    for part in parts:
        if part == "config" and summary["config_kept"]:
            say(f"config: kept {t.config_path} (its paths are used); the archive's is not restored")
            continue
        held = summary["queue"]["held"] if part == "queue" and summary["queue"] else 0
        say(f"{part}: {summary['parts'][part]['restored']} restored, {summary['parts'][part]['same']} already there"
            + (f" ({held} held, as they were)" if held else ""))
        if part == "tls" and summary["tls_not_restored"]:
            skipped = " and ".join(summary["tls_not_restored"])
            say(f"tls: the archive's {skipped} not restored: {t.config_path} has no [tls] section to say where "
                f"they go; to use them, extract them (umask 077; tar xOf {archive} tls/cert > cert.pem; likewise "
                "tls/key > key.pem) and set [tls] cert and key")
    return summary


def _restore_accounts(data_dir: Path, accounts: list) -> int:
    if not isinstance(accounts, list):
        raise NodeBackupError("users/accounts.json is not a list")
    rows = []
    for a in accounts:
        if not isinstance(a, dict) or not isinstance(a.get("address"), str) \
                or not isinstance(a.get("hash"), (str, type(None))):
            raise NodeBackupError("users/accounts.json holds a bad account")
        rows.append((a["address"], a.get("hash"), int(bool(a.get("locked"))), a.get("changed")))
    db = sqlite3.connect(data_dir / "records.sqlite", timeout=30)
    try:
        with db:
            db.execute(ACCOUNTS_TABLE)
            before = {r[0]: (r[1], r[2]) for r in db.execute("SELECT address, hash, locked FROM accounts")}
            n = 0
            for address, hash_, locked, changed in rows:
                if before.get(address) == (hash_, locked):
                    continue
                db.execute("INSERT INTO accounts (address, hash, locked, changed) VALUES (?, ?, ?, ?) "
                           "ON CONFLICT(address) DO UPDATE SET hash = excluded.hash, locked = excluded.locked, "
                           "changed = excluded.changed", (address, hash_, locked, changed))
                n += 1
        return n
    finally:
        db.close()


def _restore_alerts(data_dir: Path, events: list) -> int:
    if not isinstance(events, list):
        raise NodeBackupError("alerts/events.json is not a list")
    db = open_db(data_dir / "records.sqlite")
    try:
        n = 0
        with db:
            for e in events:
                if not isinstance(e, dict) or e.get("kind") not in ALERT_KINDS or not isinstance(e.get("text"), str) \
                        or not isinstance(e.get("ts"), (int, float)):
                    raise NodeBackupError("alerts/events.json holds a bad event")
                same = db.execute("SELECT 1 FROM events WHERE ts = ? AND kind = ? AND text = ?",
                                  (e["ts"], e["kind"], e["text"])).fetchone()
                if same:
                    continue
                detail = e.get("detail")
                db.execute("INSERT INTO events (ts, queue_id, kind, text, detail) VALUES (?, ?, ?, ?, ?)",
                           (e["ts"], e.get("queue_id") if isinstance(e.get("queue_id"), str) else None, e["kind"],
                            e["text"], detail if isinstance(detail, str) else None))
                n += 1
        return n
    finally:
        db.close()
