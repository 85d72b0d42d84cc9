"""Accounts of the mail store and the brute-force throttle of every login path.

Role: mailboxes are declared in the config (``[[domain]] deliver = "local"``,
``mailboxes = [...]``) or in the users file ``<data_dir>/users.json`` (kanmon.userdb,
managed by `kanmon user add/del/alias`). A file mailbox keeps its password hash in the
file; a config mailbox in the table ``accounts`` of the records database
``<data_dir>/records.sqlite`` (SQLite, WAL), which also holds every mailbox's lock state
and last login. This module owns that table only; other tables in the file belong to
other modules.
Passwords are hashed with argon2id (argon2-cffi, RFC 9106 parameters). ``AuthThrottle``
counts failed logins per client IP and per account and answers with a growing delay,
then a temporary block; SMTP submission, POP3 and IMAP all use one instance, and given
the node's SharedState (kanmon.state.api) it counts in it, so every receiver process
and the main process see the same failures and blocks. Its calls then block on the
state's disk: callers run them off the event loop (an executor, or FileWork).

Trusts: the validated config. Addresses and passwords come from clients and are only
compared, hashed or used as SQL parameters.

Never: store or log a password, say *why* a login failed to the client (unknown,
locked and wrong password all look the same), or answer an unknown address faster
than a known one (a dummy hash is verified instead).
"""

from __future__ import annotations

import contextlib
import os
import socket
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from kanmon import userdb
from kanmon.config import Config
from kanmon.state.api import MemoryState, SharedState
from kanmon.records.store import create_private
from kanmon.store.maildir import Mailbox
from kanmon.userdb import Directory

MAX_ADDRESS = 320  # RFC 5321 4.5.3.1: 64 + "@" + 255
MAX_PASSWORD = 1024

_SCHEMA = """
CREATE TABLE IF NOT EXISTS accounts (
    address    TEXT PRIMARY KEY,
    hash       TEXT,
    locked     INTEGER NOT NULL DEFAULT 0,
    last_login REAL,
    last_ip    TEXT,
    changed    REAL
)
"""


BUSY_TIMEOUT = 10.0  # seconds a read of the accounts waits for another connection's lock


class AuthUnavailable(Exception):
    """The accounts cannot be read now: answer a temporary failure (454 4.7.0,
    NO [UNAVAILABLE], -ERR [SYS/TEMP]), never "wrong password"."""


class UnknownMailbox(Exception):
    """The address is not a mailbox of a local domain (config or users file)."""


@dataclass(frozen=True, slots=True)
class AccountInfo:
    address: str
    has_password: bool
    locked: bool
    last_login: float | None
    last_ip: str | None
    size: int
    messages: int


def normalize(address: str) -> str:
    return address.strip().lower()


def log_safe(text: str, limit: int = 100) -> str:
    """Client-supplied text (a user name) made safe for one event-log line."""
    text = text[:limit]
    if text.isprintable() and "\\" not in text:
        return text  # the common case, without a join over every character
    return "".join(ch if ch.isprintable() and ch != "\\" else ch.encode("unicode_escape").decode() for ch in text)


class Users:
    """Accounts: config mailboxes + the ``accounts`` table. Safe to use from threads
    (each call opens its own short connection), so ``verify`` can run in an executor.
    """

    def __init__(
        self,
        config: Config,
        db_path: Path | None = None,
        hasher: PasswordHasher | None = None,
        clock: Callable[[], float] = time.time,
        directory: Directory | None = None,
    ):
        self.config = config
        self.directory = directory or Directory(config)
        self.users_file = self.directory.userfile.path
        self.data_dir = Path(config.server.data_dir)
        self.db_path = Path(db_path) if db_path else self.data_dir / "records.sqlite"
        self.hasher = hasher or PasswordHasher()  # argon2id, RFC 9106 low-memory profile
        self.clock = clock
        self._dummy: str | None = None  # made on the first login (a node that never authenticates never hashes)
        self._init_lock = threading.Lock()
        self._dummy_lock = threading.Lock()
        self._initialised = False

    def _dummy_hash(self) -> str:
        """The hash an unknown account is checked against, so that it takes as long as a
        known one. Made on first use: argon2 takes its memory_cost (64 MiB by default)
        for a moment, which a balance-only or relay-only node must never pay."""
        with self._dummy_lock:
            if self._dummy is None:
                self._dummy = self.hasher.hash("kanmon: no such account")
            return self._dummy

    # -- database
    def _init_db(self) -> None:
        """The database file (0600) and our table, when missing (first use, or the file
        was deleted while running: it is created anew, empty)."""
        with self._init_lock:
            self.db_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            create_private(self.db_path)  # the hashes: private
            with contextlib.closing(sqlite3.connect(self.db_path, timeout=BUSY_TIMEOUT)) as conn:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute(_SCHEMA)
                conn.commit()
            self._initialised = True

    @contextlib.contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        if not self._initialised:
            self._init_db()
        # mode=rw: a deleted file is an error here (then _init_db), never an empty
        # database without our table created behind our back.
        uri = f"file:{urllib.parse.quote(str(self.db_path))}?mode=rw"
        try:
            conn = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT)
        except sqlite3.OperationalError:
            self._init_db()
            conn = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT)
        try:
            with conn:
                yield conn
        finally:
            conn.close()

    # -- the config side and the users file
    def mailboxes(self) -> list[str]:
        """Every mailbox address, the config's in config order, then the file's."""
        out = []
        for d in self.config.domain:
            if d.deliver == "local":
                out.extend(f"{lp}@{d.name}" for lp in d.mailboxes)
        seen = set(out)
        tables = self.directory.tables()
        for domain, locals_ in tables.mailboxes.items():
            out.extend(a for a in sorted(f"{lp}@{domain}" for lp in locals_) if a not in seen)
        return out

    def is_mailbox(self, address: str) -> bool:
        address = normalize(address)
        if len(address) > MAX_ADDRESS:
            return False
        return self.directory.is_mailbox(address)

    def _require(self, address: str) -> str:
        address = normalize(address)
        if not self.is_mailbox(address):
            raise UnknownMailbox(f"{address} is not a mailbox of a local domain")
        return address

    def _local_domain(self, address: str) -> str:
        address = normalize(address)
        userdb.check_address(address)
        d = self.config.find_domain(address.rpartition("@")[2])
        if d is None or d.deliver != "local":
            raise ValueError(f"{address.rpartition('@')[2]} is not a local domain (deliver = \"local\") in the config")
        return address

    def in_config(self, address: str) -> bool:
        local, _, domain = normalize(address).rpartition("@")
        d = self.config.find_domain(domain)
        return d is not None and (local in d.mailboxes or local in {a.lower() for a in d.aliases})

    def add(self, address: str, password: str | None = None) -> None:
        """A new mailbox in the users file (with a password when given)."""
        address = self._local_domain(address)
        if self.in_config(address):
            raise ValueError(f"{address} is already declared in the config")
        h = self._hash(password) if password is not None else None
        with userdb.editing(self.users_file) as box:
            data = box[0]
            if address in data.mailboxes or address in data.aliases:
                raise ValueError(f"{address} already exists in the users file")
            box[0] = userdb.UserData({**data.mailboxes, address: h}, data.aliases)
        self.directory.userfile.reload()

    def delete(self, address: str) -> None:
        """Remove a mailbox of the users file (its Maildir stays on disk)."""
        address = normalize(address)
        with userdb.editing(self.users_file) as box:
            data = box[0]
            if address not in data.mailboxes:
                if self.in_config(address):
                    raise ValueError(f"{address} is declared in the config; remove it there")
                raise UnknownMailbox(f"{address} is not a mailbox of the users file")
            rest = {a: h for a, h in data.mailboxes.items() if a != address}
            box[0] = userdb.UserData(rest, data.aliases)
        self.directory.userfile.reload()

    def set_alias(self, address: str, targets: list[str]) -> None:
        """Define (or, with no targets, remove) an alias in the users file."""
        address = self._local_domain(address)
        if self.in_config(address):
            raise ValueError(f"{address} is already declared in the config")
        clean = []
        for t in targets:
            t = normalize(t)
            userdb.check_address(t, "target")
            if t not in clean:
                clean.append(t)
        with userdb.editing(self.users_file) as box:
            data = box[0]
            if address in data.mailboxes:
                raise ValueError(f"{address} is a mailbox")
            aliases = dict(data.aliases)
            if not clean:
                if aliases.pop(address, None) is None:
                    raise UnknownMailbox(f"{address} is not an alias of the users file")
            else:
                aliases[address] = tuple(clean)
            box[0] = userdb.UserData(data.mailboxes, aliases)
        self.directory.userfile.reload()

    def aliases(self) -> dict[str, tuple[str, ...]]:
        """Every alias (config and file combined) -> its targets."""
        out = {}
        for domain, table in self.directory.tables().aliases.items():
            for alias, targets in table.items():
                out[f"{alias}@{domain}"] = targets
        return out

    def quota(self, address: str) -> int | None:
        """The quota of the mailbox's domain in bytes (None: unlimited)."""
        d = self.config.find_domain(normalize(address).rpartition("@")[2])
        return d.quota if d is not None else None

    def mailbox(self, address: str) -> Mailbox:
        """The Maildir of a configured mailbox (created on first use)."""
        address = self._require(address)
        local, _, domain = address.rpartition("@")
        return Mailbox.for_address(self.data_dir, domain, local)

    # -- passwords
    def set_password(self, address: str, password: str) -> None:
        address = self._require(address)
        h = self._hash(password)
        with userdb.editing(self.users_file) as box:
            data = box[0]
            in_file = address in data.mailboxes
            if in_file:
                box[0] = userdb.UserData({**data.mailboxes, address: h}, data.aliases)
        if in_file:
            self.directory.userfile.reload()  # this process changed it: no wait for the next look
            return
        with self._db() as db:
            db.execute(
                "INSERT INTO accounts(address, hash, changed) VALUES(?, ?, ?) "
                "ON CONFLICT(address) DO UPDATE SET hash = excluded.hash, changed = excluded.changed",
                (address, h, self.clock()),
            )

    def _hash(self, password: str) -> str:
        if not password:
            raise ValueError("the password is empty")
        if len(password) > MAX_PASSWORD:
            raise ValueError(f"the password is longer than {MAX_PASSWORD} characters")
        return self.hasher.hash(password)

    def _stored(self, address: str) -> tuple[str | None, bool, bool]:
        """(hash, locked, held in the users file) of a mailbox; AuthUnavailable when the
        database cannot be read (locked past BUSY_TIMEOUT, damaged)."""
        hashes = self.directory.tables().hashes
        try:
            row = self._account_row(address)
        except sqlite3.OperationalError as e:
            if "no such table" not in str(e):
                raise AuthUnavailable(f"the accounts database cannot be read: {e}") from None
            try:  # the file was deleted and created anew by another writer: our table again
                self._init_db()
                row = self._account_row(address)
            except sqlite3.Error as e2:
                raise AuthUnavailable(f"the accounts database cannot be read: {e2}") from None
        except sqlite3.Error as e:
            raise AuthUnavailable(f"the accounts database cannot be read: {e}") from None
        locked = bool(row[1]) if row else False
        if address in hashes:
            return hashes[address], locked, True
        return (row[0] if row and row[0] else None), locked, False

    def _account_row(self, address: str) -> tuple | None:
        with self._db() as db:
            return db.execute("SELECT hash, locked FROM accounts WHERE address = ?", (address,)).fetchone()

    def verify(self, address: str, password: str) -> bool:
        """True only for a configured, unlocked mailbox whose password matches.
        AuthUnavailable (a temporary failure, not a wrong password) when the accounts
        database cannot be read; nothing here needs it to be writable."""
        address = normalize(address)
        stored, locked, in_file = None, False, False
        if self.is_mailbox(address) and len(password) <= MAX_PASSWORD:
            stored, locked, in_file = self._stored(address)
        try:
            ok = self.hasher.verify(stored or self._dummy_hash(), password[:MAX_PASSWORD])
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            ok = False
        if not ok or stored is None or locked:
            return False
        if self.hasher.check_needs_rehash(stored) and not in_file:
            with contextlib.suppress(sqlite3.Error):
                with self._db() as db:
                    db.execute("UPDATE accounts SET hash = ? WHERE address = ?", (self.hasher.hash(password), address))
        return True

    def record_login(self, address: str, ip: str | None = None) -> None:
        """The last-login stamp; a database that cannot take it (locked, deleted) loses
        the stamp, never the login."""
        address = normalize(address)
        with contextlib.suppress(sqlite3.Error):
            with self._db() as db:
                db.execute(
                    "INSERT INTO accounts(address, last_login, last_ip) VALUES(?, ?, ?) "
                    "ON CONFLICT(address) DO UPDATE SET last_login = excluded.last_login, last_ip = excluded.last_ip",
                    (address, self.clock(), ip),
                )

    def set_locked(self, address: str, locked: bool) -> None:
        address = self._require(address)
        with self._db() as db:
            db.execute(
                "INSERT INTO accounts(address, locked) VALUES(?, ?) "
                "ON CONFLICT(address) DO UPDATE SET locked = excluded.locked",
                (address, int(locked)),
            )

    def lock(self, address: str) -> None:
        self.set_locked(address, True)

    def unlock(self, address: str) -> None:
        self.set_locked(address, False)

    def info(self, address: str) -> AccountInfo:
        address = self._require(address)
        with self._db() as db:
            row = db.execute(
                "SELECT hash, locked, last_login, last_ip FROM accounts WHERE address = ?", (address,)
            ).fetchone()
        local, _, domain = address.rpartition("@")
        messages, size = Mailbox.for_address(self.data_dir, domain, local).usage()
        hashes = self.directory.tables().hashes
        has_password = bool(hashes[address]) if address in hashes else bool(row and row[0])
        if row is None:
            return AccountInfo(address, has_password, False, None, None, size, messages)
        return AccountInfo(address, has_password, bool(row[1]), row[2], row[3], size, messages)

    def list(self) -> list[AccountInfo]:
        return [self.info(a) for a in self.mailboxes()]


# ---------------------------------------------------------------------------
# Brute-force throttle


@dataclass(frozen=True, slots=True)
class Failure:
    """What one failed login costs: wait ``delay`` seconds before answering; ``blocked``
    is set when this failure started a block (log it once)."""

    delay: float
    blocked: bool
    key: str = ""  # "ip 192.0.2.1", "net 192.0.2.0/24" or "account a@b": what was blocked


_BLOCKS = "auth-block"  # the TtlCache namespace of the blocks (key -> until its expiry)


def source_network(ip: str) -> str:
    """The network one owner of addresses holds: an IPv4 /24, an IPv6 /64 (an IPv4-mapped
    address is its IPv4 /24); a text that is no address is itself. (inet_pton: this runs
    for every login, and ipaddress parsing costs ten times more.)"""
    try:
        b = socket.inet_pton(socket.AF_INET, ip)
    except OSError:
        try:
            b = socket.inet_pton(socket.AF_INET6, ip)
        except OSError:
            return ip[:MAX_ADDRESS]
        if b[:12] != b"\0" * 10 + b"\xff\xff":
            return ":".join(b[i:i + 2].hex() for i in range(0, 8, 2)) + "::/64"
        b = b[12:]
    return f"{b[0]}.{b[1]}.{b[2]}.0/24"


class AuthThrottle:
    """Failed logins per client IP, per source network and per account, in a sliding window.

    After ``free_failures`` failures in ``window`` seconds each further failure is
    answered after a delay that doubles from ``base_delay`` up to ``max_delay``. At
    ``block_ip_after`` failures from one IP (``block_network_after`` from its /24 or /64,
    ``block_account_after`` for one account) that IP (network, account) is refused for
    ``block_for`` seconds, even with the right password. A success clears the account's
    count (not the IP's). The network bound caps what one owner of many addresses (an
    IPv6 /64 is 2**64 of them) can make us remember.

    A login is reserved before its password is verified (``reserve``): an attempt in
    flight counts like a failure, so parallel attempts cannot all pass the check before
    any of them is counted. The reservation ends with ``failed``, ``succeeded`` (which
    still refuses when a block started meanwhile) or ``release``.

    Everything is counted in a SharedState (kanmon.state.api): failures as RateCounter
    hits, attempts in flight as ConnectionGauge entries owned by this process (dropped
    with a dead process), blocks as TtlCache entries. Given the node's state every
    receiver process sees the same counts; without one, a MemoryState of its own. The
    counters forget idle keys in amortised constant time, so names that are never seen
    again cost nothing later. ``clock`` is epoch seconds by default (every process reads
    the same entries); tests pass one they can advance. Calls may block on the state's
    disk: callers run them off the event loop (an executor, or FileWork).
    """

    def __init__(
        self,
        clock: Callable[[], float] | None = None,
        *,
        state: SharedState | None = None,
        window: float = 900.0,
        free_failures: int = 3,
        base_delay: float = 1.0,
        max_delay: float = 10.0,
        block_ip_after: int = 20,
        block_network_after: int = 100,
        block_account_after: int = 10,
        block_for: float = 900.0,
        max_keys: int = 100_000,
    ):
        self.state: SharedState = state if state is not None else MemoryState(max_keys=max_keys)
        self.clock = clock or time.time
        self.window = window
        self.free_failures = free_failures
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.block_ip_after = block_ip_after
        self.block_network_after = block_network_after
        self.block_account_after = block_account_after
        self.block_for = block_for
        self.owner = str(os.getpid())  # the gauge owner of attempts in flight, as of connections: dropped with a dead process

    def _keys(self, ip: str, account: str | None) -> list[tuple[str, int]]:
        """(key, limit) for the IP, its network and the account (when named)."""
        keys = [(f"ip {ip}", self.block_ip_after), (f"net {source_network(ip)}", self.block_network_after)]
        if account:
            keys.append((f"account {normalize(account)[:MAX_ADDRESS]}", self.block_account_after))
        return keys

    def _blocked_left(self, keys: list[tuple[str, int]], now: float) -> float:
        blocks = self.state.cache(_BLOCKS)
        entries = [blocks.get(k, now) for k, _ in keys]
        return max((e.expires - now for e in entries if e is not None), default=0.0)

    def blocked_for(self, ip: str, account: str | None = None) -> float:
        """Seconds until this IP (network, account) may try again; 0.0 when not blocked."""
        return self._blocked_left(self._keys(ip, account), self.clock())

    def reserve(self, ip: str, account: str | None) -> float:
        """Take one attempt in flight before verifying a password. 0.0: go ahead (end it
        with failed(), succeeded() or release()); else refuse now, for about that many
        seconds: blocked, or the failures and attempts in flight already make the limit."""
        now = self.clock()
        keys = self._keys(ip, account)
        gauges, counters = self.state.gauges, self.state.counters
        taken: list[str] = []
        over = False
        # Take the in-flight share first, then read the failures, then the blocks: a
        # block (which resets the counts) started after our read is seen by the last step.
        for key, limit in keys:
            held = gauges.acquire(f"auth {key}", self.owner, now)
            taken.append(key)
            if held + counters.peek(f"auth {key}", self.window, now) > limit:
                over = True
                break
        left = self._blocked_left(keys, now)
        if over or left > 0:
            for key in taken:
                gauges.release(f"auth {key}", self.owner)
            return left if left > 0 else max(1.0, self.base_delay)
        return 0.0

    def release(self, ip: str, account: str | None) -> None:
        """End a reservation that was neither a failure nor a success (the check failed)."""
        for key, _ in self._keys(ip, account):
            self.state.gauges.release(f"auth {key}", self.owner)

    def failed(self, ip: str, account: str | None, reserved: bool = True) -> Failure:
        """Record a failed login (ending its reservation unless ``reserved`` is False: a
        failure decided without verifying); return how long to wait before answering."""
        now = self.clock()
        state = self.state
        blocks = state.cache(_BLOCKS)
        worst = 0
        blocked_key = ""
        for key, limit in self._keys(ip, account):
            # Counted before the reservation is given back: the sum never dips meanwhile.
            n = state.counters.hit(f"auth {key}", self.window, now)
            if not key.startswith("net "):
                worst = max(worst, n)
            if n >= limit and blocks.get(key, now) is None:
                blocks.put(key, "", self.block_for, now)
                state.counters.reset(f"auth {key}")
                blocked_key = blocked_key or key
            if reserved:
                state.gauges.release(f"auth {key}", self.owner)
        return self._failure(worst, blocked_key)

    def _failure(self, worst: int, blocked_key: str) -> Failure:
        over = worst - self.free_failures
        delay = 0.0 if over <= 0 else min(self.max_delay, self.base_delay * 2 ** (over - 1))
        if blocked_key:
            delay = self.max_delay
        return Failure(delay, bool(blocked_key), blocked_key)

    def succeeded(self, ip: str, account: str) -> bool:
        """The password was right: end the reservation and clear the account's count.
        False when the IP, its network or the account is blocked now (a block that
        started while this attempt was verified): the caller refuses the login."""
        keys = self._keys(ip, account)
        self.release(ip, account)
        if self._blocked_left(keys, self.clock()) > 0:
            return False
        self.state.counters.reset(f"auth {keys[-1][0]}")
        return True
