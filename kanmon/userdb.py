"""The users file: mailboxes, aliases and password hashes kept outside the main config.

Role: decode and encode ``<data_dir>/users.json`` (strictly: exact keys, exact types,
lower-case addresses), write it atomically under a lock (`kanmon user add/del/passwd/
alias`), and give the running server a cheap view that follows changes without a
reload (`UserFile.current()` looks at the file's stat at most once a second and
re-reads it only when it changed). `Directory` combines the file with the config's
``mailboxes``/``aliases``: the union of mailboxes; an alias defined in the config wins
over one of the same name in the file; a name that is a mailbox in either source is a
mailbox, never an alias.

Trusts: nothing in the file; a damaged file is refused as a whole (reported once
through ``on_error``) and the previous content keeps serving.
Never: leave a half-written file (temp file, fsync, rename), create it readable by
others (0600), or store a password (only argon2 hashes, made by the caller).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from kanmon.config import Config

FILE_NAME = "users.json"
FORMAT = "kanmon-users 1"
MAX_FILE = 64 * 1024 * 1024  # far above any sane directory; a bound for the decoder
CHECK_EVERY = 1.0  # seconds between two stat() calls of the file
MAX_ADDRESS = 320

_LOCAL_RE = re.compile(r"^[a-z0-9!#$%&'*+/=?^_`{|}~.-]{1,64}$")
_DOMAIN_RE = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


class UserFileError(ValueError):
    """The users file cannot be decoded; the message says where."""


def check_address(address: str, what: str = "address") -> str:
    """A lower-case local@domain address, or UserFileError."""
    if not isinstance(address, str) or address != address.lower() or len(address) > MAX_ADDRESS:
        raise UserFileError(f"{what} {address!r} is not a lower-case address")
    local, at, domain = address.rpartition("@")
    if not at or not _LOCAL_RE.match(local) or not _DOMAIN_RE.match(domain):
        raise UserFileError(f"{what} {address!r} is not an address")
    return address


@dataclass(frozen=True)
class UserData:
    """The decoded file: mailbox -> password hash (None: no password yet); alias ->
    its targets (full addresses)."""

    mailboxes: dict[str, str | None] = field(default_factory=dict)
    aliases: dict[str, tuple[str, ...]] = field(default_factory=dict)


EMPTY = UserData()


def decode(raw: bytes) -> UserData:
    """Strict decoder of the users file."""
    if len(raw) > MAX_FILE:
        raise UserFileError(f"the file is larger than {MAX_FILE} bytes")
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserFileError(f"not JSON: {e}") from None
    if not isinstance(doc, dict) or set(doc) != {"format", "mailboxes", "aliases"}:
        raise UserFileError('expected exactly the keys "format", "mailboxes", "aliases"')
    if doc["format"] != FORMAT:
        raise UserFileError(f"unknown format {doc['format']!r} (expected {FORMAT!r})")
    if not isinstance(doc["mailboxes"], dict) or not isinstance(doc["aliases"], dict):
        raise UserFileError('"mailboxes" and "aliases" must be objects')
    mailboxes: dict[str, str | None] = {}
    for address, entry in doc["mailboxes"].items():
        check_address(address, "mailbox")
        if not isinstance(entry, dict) or set(entry) != {"password"}:
            raise UserFileError(f'mailbox {address}: expected exactly the key "password"')
        pw = entry["password"]
        if pw is not None and (not isinstance(pw, str) or not pw.startswith("$argon2")):
            raise UserFileError(f"mailbox {address}: the password is not an argon2 hash or null")
        mailboxes[address] = pw
    aliases: dict[str, tuple[str, ...]] = {}
    for address, targets in doc["aliases"].items():
        check_address(address, "alias")
        if address in mailboxes:
            raise UserFileError(f"alias {address} has the same name as a mailbox")
        if not isinstance(targets, list) or not targets:
            raise UserFileError(f"alias {address}: targets must be a non-empty list")
        aliases[address] = tuple(check_address(t, f"alias {address} target") for t in targets)
    return UserData(mailboxes, aliases)


def encode(data: UserData) -> bytes:
    doc = {
        "format": FORMAT,
        "mailboxes": {a: {"password": data.mailboxes[a]} for a in sorted(data.mailboxes)},
        "aliases": {a: list(data.aliases[a]) for a in sorted(data.aliases)},
    }
    return (json.dumps(doc, indent=1) + "\n").encode()


def users_path(config: Config) -> Path:
    return Path(config.server.data_dir) / FILE_NAME


def read(path: Path) -> UserData:
    """The file's content (EMPTY when it does not exist); UserFileError when damaged."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return EMPTY
    return decode(raw)


@contextlib.contextmanager
def editing(path: Path) -> Iterator[list[UserData]]:
    """Read-modify-write under an exclusive lock: yields [data]; put the new UserData in
    slot 0 and it is written atomically (0600) when the block ends without an error.
    A damaged file is refused (UserFileError), never overwritten."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    lock_fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        box = [read(path)]
        before = box[0]
        yield box
        if box[0] is not before:
            write(path, box[0])
    finally:
        os.close(lock_fd)


def write(path: Path, data: UserData) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        parent = os.stat(path.parent)
        if os.geteuid() == 0 and parent.st_uid != 0:
            # root ran the command in a data_dir that belongs to the service user: the
            # file stays that user's, or the server could no longer read it.
            os.fchown(fd, parent.st_uid, parent.st_gid)
        os.write(fd, encode(data))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _warn(message: str) -> None:
    print(f"kanmon: {message}", file=sys.stderr, flush=True)


class UserFile:
    """The users file as the running server sees it: `current()` is cheap (a clock read;
    a stat() at most every CHECK_EVERY seconds; a read only when the stat changed)."""

    def __init__(self, path: Path, *, clock: Callable[[], float] = time.monotonic,
                 on_error: Callable[[str], None] = _warn):
        self.path = Path(path)
        self.clock = clock
        self.on_error = on_error
        # (generation, data): one attribute, so a reader in another thread than the one
        # reloading never pairs new data with an old generation, or the reverse. The
        # generation is bumped at each accepted change (readers cache derived tables).
        self._seen: tuple[int, UserData] = (0, EMPTY)
        self._stat: tuple | None = None
        self._checked = float("-inf")
        self._lock = threading.Lock()
        self.trouble = ""  # why the file as it is now was not taken ("": it was, or there is none)

    @property
    def generation(self) -> int:
        return self._seen[0]

    def seen(self) -> tuple[int, UserData]:
        """(generation, data) as taken last, without looking at the file."""
        return self._seen

    def current(self) -> UserData:
        now = self.clock()
        if now - self._checked < CHECK_EVERY:
            return self._seen[1]
        with self._lock:
            if now - self._checked >= CHECK_EVERY:
                self._checked = now
                self._refresh()
        return self._seen[1]

    def reload(self) -> UserData:
        """Look at the file now (after this process changed it)."""
        with self._lock:
            self._checked = self.clock()
            self._refresh()
        return self._seen[1]

    def _refresh(self) -> None:
        try:
            st = os.stat(self.path)
            sig: tuple | None = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        except FileNotFoundError:
            sig = None
        except OSError as e:
            sig = ("error", str(e))
        if sig == self._stat:
            return
        self._stat = sig
        if sig is None:
            new = EMPTY
        else:
            try:
                new = read(self.path)
            except (UserFileError, OSError) as e:
                self.trouble = f"users file {self.path} refused: {e}"
                self.on_error(f"users file {self.path} refused, the previous users stay: {e}")
                return
        self.trouble = ""
        generation, data = self._seen
        if new != data:
            self._seen = (generation + 1, new)


@dataclass(frozen=True)
class Tables:
    """Mailboxes and aliases of the local domains, from the config and the file combined."""

    mailboxes: dict[str, frozenset[str]]  # domain -> local parts
    aliases: dict[str, dict[str, tuple[str, ...]]]  # domain -> alias local part -> targets
    hashes: dict[str, str | None]  # mailboxes of the file -> their hash


class Directory:
    """The combined view, rebuilt only when the file changed."""

    def __init__(self, config: Config, userfile: UserFile | None = None):
        self.config = config
        self.userfile = userfile or UserFile(users_path(config))
        # (generation, tables): one attribute, as UserFile's (deliverable's look at the
        # file runs in a worker thread while the event loop asks).
        self._cache: tuple[int, Tables] | None = None

    def tables(self) -> Tables:
        self.userfile.current()  # a look at the file when one is due
        gen, data = self.userfile.seen()
        cache = self._cache
        if cache is None or cache[0] != gen:
            cache = (gen, self._combine(data))
            self._cache = cache
        return cache[1]

    def _combine(self, data: UserData) -> Tables:
        local_domains = [d for d in self.config.domain if d.deliver == "local"]
        mailboxes: dict[str, set[str]] = {d.name: set(d.mailboxes) for d in local_domains}
        hashes: dict[str, str | None] = {}
        for address, h in data.mailboxes.items():
            local, _, domain = address.rpartition("@")
            if domain in mailboxes:  # a domain no longer local in the config: ignored
                mailboxes[domain].add(local)
                hashes[address] = h
        aliases: dict[str, dict[str, tuple[str, ...]]] = {}
        for d in self.config.domain:
            table: dict[str, tuple[str, ...]] = {}
            for alias, targets in d.aliases.items():
                if alias.lower() in table:
                    continue  # the first spelling wins
                seen: dict[str, None] = {}
                for t in targets:
                    seen[t.lower() if "@" in t else f"{t.lower()}@{d.name}"] = None
                table[alias.lower()] = tuple(seen)
            aliases[d.name] = table
        for address, targets in data.aliases.items():
            local, _, domain = address.rpartition("@")
            table = aliases.get(domain)
            if domain not in mailboxes or table is None or local in table or local in mailboxes[domain]:
                continue  # config aliases and mailboxes win
            table[local] = targets
        return Tables({k: frozenset(v) for k, v in mailboxes.items()}, aliases, hashes)

    def is_mailbox(self, address: str) -> bool:
        local, at, domain = address.lower().rpartition("@")
        return bool(at) and local in self.tables().mailboxes.get(domain, ())

    def deliverable(self, address: str) -> bool | None:
        """Local delivery's question: True, a mailbox; False, not one, after reading the
        users file again now (a mailbox `kanmon user add` made a moment ago, which a
        receiver may have seen first, is not refused); None, the users file cannot be read
        or was refused, so a mailbox of it cannot be told from an unknown one (deferred,
        never bounced, until it can)."""
        if self.is_mailbox(address):
            return True
        self.userfile.reload()
        if self.userfile.trouble:
            return None
        return self.is_mailbox(address)

    async def wait_deliverable(self, address: str) -> bool | None:
        """deliverable() for the event loop: a mailbox known now is answered at once; the
        users file is read again (a stat, a read if it changed) in a worker thread."""
        if self.is_mailbox(address):
            return True
        return await asyncio.to_thread(self.deliverable, address)

    def is_unknown_local(self, address: str) -> bool:
        """An address of a local domain that is neither a mailbox nor an alias leading to
        one (or out of our local domains): what a `release --to` or a Sieve redirect must
        not queue, whose bounce would go to the message's outside sender."""
        def unknown() -> bool:
            local_domains = self.tables().mailboxes
            if address.rpartition("@")[2].lower() not in local_domains:
                return False
            return not any(self.is_mailbox(t) or t.rpartition("@")[2].lower() not in local_domains
                           for t in self.expand(address))

        if not unknown():
            return False
        self.userfile.reload()  # as deliverable(): not refused for want of a look at the file now
        return unknown()

    def local_targets(self, address: str) -> tuple[str, ...] | None:
        """What `address` of a local domain stands for, as RCPT TO expands it (one level):
        its mailbox in the lower-case spelling, or an alias's targets; None for a local
        part that is neither, or a domain that is not delivered here."""
        local, at, domain = address.rpartition("@")
        tables = self.tables()
        domain = domain.lower()
        if not at or domain not in tables.mailboxes:
            return None
        local = local.lower()
        if local in tables.mailboxes[domain]:
            return (f"{local}@{domain}",)
        return tables.aliases.get(domain, {}).get(local)

    def expand(self, address: str) -> tuple[str, ...]:
        """Where mail kanmon queues itself for `address` goes: local_targets, else the
        address as it is (an unknown local part is refused by local delivery, 550 5.1.1;
        other domains are not ours to expand)."""
        return self.local_targets(address) or (address,)


def quiet_directory(config: Config) -> Directory:
    """A Directory of config's mailboxes and aliases for what delivers and queues mail
    (local delivery, the injectors, a release): the users file's refusals are reported by
    the receivers' Directory and `kanmon user` (Directory.deliverable defers meanwhile),
    not once more by each of these."""
    return Directory(config, UserFile(users_path(config), on_error=lambda _message: None))
