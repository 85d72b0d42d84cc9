"""Each user's Sieve scripts on disk, and which one is active.

Role: ``<data_dir>/sieve/<domain>/<local-part>/`` (0700) holds the user's scripts as
``scripts/<name>.sieve`` (the name percent-encoded), the name of the active script in
``active``, and the vacation memory (kanmon.store.vacation). ManageSieve, the command
line (`kanmon user sieve`) and local delivery all go through ``ScriptStore``; a script
is checked by the compiler before it is stored, so a stored script compiles (a script
that no longer does, after an upgrade say, is treated as absent at delivery and the
message is kept).

Trusts: the account name (validated by the caller as one of our mailboxes). Script
names come from clients and are checked (``check_name``) and encoded before they touch
a path; script text is only compiled, never executed here.

Never: store a script that does not compile, leave a half-written script or active
file (written in a temporary file, fsynced, renamed), or write outside the user's
directory.
"""

from __future__ import annotations

import contextlib
import os
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from kanmon.store.maildir import MaildirError, make_dirs_private
from kanmon.store.sieve import Script, SieveError, compile_script

MAX_NAME = 128


class ScriptError(Exception):
    """A request on the script store that cannot be done; code is a ManageSieve
    response code (NONEXISTENT, ALREADYEXISTS, QUOTA/MAXSCRIPTS, ACTIVE) or ""."""

    def __init__(self, message: str, code: str = ""):
        super().__init__(message)
        self.code = code


def check_name(name: str) -> str:
    """RFC 5804 1.6: a script name is non-empty UTF-8 without control characters."""
    if not name or len(name) > MAX_NAME:
        raise ScriptError("a script name is 1 to 128 characters")
    if any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F or c in "\u2028\u2029" for c in name):
        raise ScriptError("a script name may not contain control characters")
    return name


def sieve_dir(data_dir: Path | str, address: str) -> Path:
    local, _, domain = address.lower().rpartition("@")
    for part in (domain, local):
        if not part or "/" in part or "\0" in part or part.startswith("."):
            raise MaildirError(f"{part!r} cannot name a directory")
    return Path(data_dir) / "sieve" / domain / local


@dataclass(frozen=True, slots=True)
class ScriptInfo:
    name: str
    active: bool


class ScriptStore:
    """One user's scripts. Every method does file I/O (call it off the event loop)."""

    def __init__(self, data_dir: Path | str, address: str, *, max_size: int = 64 * 1024, max_scripts: int = 20):
        self.data_dir = Path(data_dir)
        self.root = sieve_dir(data_dir, address)
        self.address = address.lower()
        self.max_size = max_size
        self.max_scripts = max_scripts

    def _path(self, name: str) -> Path:
        return self.root / "scripts" / (urllib.parse.quote(check_name(name), safe="") + ".sieve")

    def _owner(self) -> tuple[int, int] | None:
        """When root runs the command line in a data_dir that belongs to the service user:
        that user (what is written here stays the server's to read and change)."""
        if os.geteuid() != 0:
            return None
        st = os.stat(self.data_dir)
        return None if st.st_uid == 0 else (st.st_uid, st.st_gid)

    def _write(self, path: Path, data: bytes) -> None:
        make_dirs_private(path.parent)
        owner = self._owner()
        if owner is not None:
            for d in (self.data_dir / "sieve", self.root.parent, self.root, path.parent):
                os.chown(d, *owner)
        tmp = path.with_name(f".tmp.{os.getpid()}.{path.name}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            if owner is not None:
                os.fchown(fd, *owner)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        with contextlib.suppress(OSError):
            dfd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)

    def names(self) -> list[str]:
        try:
            entries = os.listdir(self.root / "scripts")
        except FileNotFoundError:
            return []
        out = []
        for e in entries:
            if e.endswith(".sieve") and not e.startswith("."):
                out.append(urllib.parse.unquote(e[: -len(".sieve")]))
        return sorted(out)

    def active_name(self) -> str | None:
        try:
            name = (self.root / "active").read_text("utf-8").strip()
        except (OSError, UnicodeDecodeError):
            return None
        return name if name and self._path(name).exists() else None

    def list(self) -> list[ScriptInfo]:
        active = self.active_name()
        return [ScriptInfo(n, n == active) for n in self.names()]

    def get(self, name: str) -> bytes:
        try:
            return self._path(name).read_bytes()
        except FileNotFoundError:
            raise ScriptError(f"there is no script named {name!r}", "NONEXISTENT") from None

    def check(self, text: bytes) -> Script:
        """The compiled script, or SieveError (with its line)."""
        return compile_script(text, self.max_size)

    def space_for(self, name: str, size: int) -> None:
        """RFC 5804 2.5 HAVESPACE: ScriptError(QUOTA/...) when it would not fit."""
        check_name(name)
        if size > self.max_size:
            raise ScriptError(f"a script may be at most {self.max_size} bytes", "QUOTA/MAXSIZE")
        if name not in self.names() and len(self.names()) >= self.max_scripts:
            raise ScriptError(f"at most {self.max_scripts} scripts per user", "QUOTA/MAXSCRIPTS")

    def put(self, name: str, text: bytes) -> None:
        """Store a script (replacing one of that name) after it compiled; SieveError or
        ScriptError otherwise."""
        self.space_for(name, len(text))
        self.check(text)
        self._write(self._path(name), text)

    def activate(self, name: str | None) -> None:
        """Make name the active script; None (or "") deactivates every script."""
        if not name:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.root / "active")
            return
        if not self._path(name).exists():
            raise ScriptError(f"there is no script named {name!r}", "NONEXISTENT")
        self._write(self.root / "active", name.encode("utf-8"))

    def delete(self, name: str) -> None:
        path = self._path(name)
        if not path.exists():
            raise ScriptError(f"there is no script named {name!r}", "NONEXISTENT")
        if self.active_name() == name:
            raise ScriptError("the active script cannot be deleted (deactivate it first)", "ACTIVE")
        os.unlink(path)

    def rename(self, old: str, new: str) -> None:
        src, dst = self._path(old), self._path(new)
        if not src.exists():
            raise ScriptError(f"there is no script named {old!r}", "NONEXISTENT")
        if dst.exists():
            raise ScriptError(f"a script named {new!r} exists", "ALREADYEXISTS")
        was_active = self.active_name() == old
        os.rename(src, dst)
        if was_active:
            self._write(self.root / "active", new.encode("utf-8"))

    def active_path(self) -> Path | None:
        name = self.active_name()
        return self._path(name) if name else None


class ActiveScripts:
    """The compiled active script of each user, for delivery: recompiled when the file
    changed (its inode, size or mtime), cached otherwise. Thread-safe enough for the
    delivery executor (a dict of immutable entries)."""

    def __init__(self, data_dir: Path | str, max_size: int = 64 * 1024):
        self.data_dir = Path(data_dir)
        self.max_size = max_size
        self._cache: dict[str, tuple[tuple[int, int, int], str, Script | SieveError]] = {}

    def lookup(self, address: str) -> tuple[str, Script | SieveError] | None:
        """(script name, compiled script or the error it gives) of the user's active script;
        None without one. One small read and a stat when nothing changed."""
        store = ScriptStore(self.data_dir, address, max_size=self.max_size)
        try:
            path = store.active_path()
        except (ScriptError, MaildirError):
            return None
        if path is None:
            self._cache.pop(address, None)
            return None
        try:
            st = path.stat()
        except OSError:
            return None
        key = (st.st_ino, st.st_size, st.st_mtime_ns)
        hit = self._cache.get(address)
        name = urllib.parse.unquote(path.name[: -len(".sieve")])
        if hit is not None and hit[0] == key and hit[1] == name:
            return name, hit[2]
        try:
            compiled: Script | SieveError = compile_script(path.read_bytes(), max(self.max_size, st.st_size))
        except SieveError as e:
            compiled = e
        except OSError:
            return None
        self._cache[address] = (key, name, compiled)
        return name, compiled
