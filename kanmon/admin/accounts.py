"""Console administrators: accounts, roles, API tokens, and the audit log of their writes.

Role: the accounts of the web console and its HTTP API, kept apart from mailbox users
in ``<data_dir>/admins.json`` (0600, written whole: temp file, fsync, rename, under a
lock file). Each account has a role — ``admin`` (everything), ``operator`` (queue,
quarantine, the alert test; no configuration, no accounts), ``auditor`` (read only) — an
argon2id password hash (argon2-cffi, as mailbox passwords in kanmon.store.users), at
most one API token (only its SHA-256 is stored: the token is 256 random bits, so a fast
hash is enough and a request need not pay argon2), and an optional language. `audit()`
writes one event-log line (kind ``audit``) per write an administrator makes: who, role,
what, on what, from where, through what, and the outcome; `kanmon log events --grep
audit:` and the console's audit page show them.

Trusts: nothing in the file (a strict decoder; a damaged file refuses every login and
says why in the exception); names and roles only after `check_name`/`check_role`.
Never: store or log a password or a token, say why a login failed (unknown name and
wrong password look the same, and an unknown name costs a dummy verification), or leave
a half-written file.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import hmac
import json
import os
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from kanmon.escape import for_log

FILE_NAME = "admins.json"
FORMAT = "kanmon-admins 1"
MAX_FILE = 4 * 1024 * 1024
MAX_PASSWORD = 1024
ROLES = ("admin", "operator", "auditor")
LANGUAGES = ("en", "ja")
TOKEN_PREFIX = "kmn_"

# What each role may do: "read" every page and GET; the rest are writes.
PERMISSIONS = {
    "admin": frozenset({"read", "queue", "quarantine", "alerts", "balancer", "config", "accounts", "backup"}),
    "operator": frozenset({"read", "queue", "quarantine", "alerts", "balancer"}),
    "auditor": frozenset({"read"}),
}

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_hasher = PasswordHasher()  # argon2id, RFC 9106 low-memory profile (as kanmon.store.users)


@functools.cache
def _dummy_hash() -> str:
    """What an unknown name's password is verified against (as long as a known one's).
    Made on first use: an argon2 hash costs ~0.2-0.3 s of CPU and its memory, which every
    `kanmon` command and process importing this module paid at import."""
    return _hasher.hash("kanmon: a password nobody has")


class AccountError(ValueError):
    """A bad name, role or password, an unknown account, or a damaged accounts file."""


@dataclass(frozen=True, slots=True)
class Account:
    name: str
    role: str
    hash: str
    token_sha256: str | None = None
    lang: str | None = None
    created: float = 0.0

    def can(self, permission: str) -> bool:
        return permission in PERMISSIONS.get(self.role, frozenset())

    @property
    def password_version(self) -> str:
        """Changes with the password: a session made before a password change ends."""
        return hashlib.sha256(self.hash.encode()).hexdigest()[:16]

    def public(self) -> dict:
        return {"name": self.name, "role": self.role, "token": self.token_sha256 is not None,
                "lang": self.lang, "created": self.created}


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise AccountError(f"{name!r} is not an admin name (lower-case letters, digits, . _ -; up to 64)")
    return name


def check_role(role: str) -> str:
    if role not in ROLES:
        raise AccountError(f"{role!r} is not a role ({', '.join(ROLES)})")
    return role


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()


def decode(raw: bytes) -> dict[str, Account]:
    """Strict decoder of admins.json."""
    if len(raw) > MAX_FILE:
        raise AccountError(f"{FILE_NAME} is larger than {MAX_FILE} bytes")
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise AccountError(f"{FILE_NAME} is not JSON: {e}") from None
    if not isinstance(doc, dict) or set(doc) != {"format", "admins"} or doc["format"] != FORMAT:
        raise AccountError(f'{FILE_NAME}: expected {{"format": "{FORMAT}", "admins": {{...}}}}')
    if not isinstance(doc["admins"], dict):
        raise AccountError(f"{FILE_NAME}: admins is not an object")
    out: dict[str, Account] = {}
    for name, a in doc["admins"].items():
        check_name(name)
        if not isinstance(a, dict) or not set(a) <= {"role", "hash", "token_sha256", "lang", "created"}:
            raise AccountError(f"{FILE_NAME}: admin {name}: unexpected keys")
        role, h = a.get("role"), a.get("hash")
        token, lang, created = a.get("token_sha256"), a.get("lang"), a.get("created", 0.0)
        check_role(role)
        if not isinstance(h, str) or not h.startswith("$argon2"):
            raise AccountError(f"{FILE_NAME}: admin {name}: the password is not an argon2 hash")
        if token is not None and not (isinstance(token, str) and re.fullmatch(r"[0-9a-f]{64}", token)):
            raise AccountError(f"{FILE_NAME}: admin {name}: token_sha256 is not a SHA-256")
        if lang is not None and lang not in LANGUAGES:
            raise AccountError(f"{FILE_NAME}: admin {name}: lang is one of {', '.join(LANGUAGES)}")
        if not isinstance(created, (int, float)):
            raise AccountError(f"{FILE_NAME}: admin {name}: created is not a time")
        out[name] = Account(name, role, h, token, lang, float(created))
    return out


def encode(accounts: dict[str, Account]) -> bytes:
    admins = {a.name: {"role": a.role, "hash": a.hash, "token_sha256": a.token_sha256, "lang": a.lang,
                       "created": a.created} for a in sorted(accounts.values(), key=lambda a: a.name)}
    return (json.dumps({"format": FORMAT, "admins": admins}, indent=1) + "\n").encode()


class AdminAccounts:
    """The accounts file of one data_dir. Reads follow the file (re-read when its stat
    changes), so a `kanmon admin` command takes effect in the running console at once."""

    def __init__(self, data_dir: Path | str):
        self.path = Path(data_dir) / FILE_NAME
        self._seen: tuple | None = None
        self._cache: dict[str, Account] = {}

    # -- reading ---------------------------------------------------------------------------

    def _stat(self) -> tuple | None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def all(self) -> dict[str, Account]:
        seen = self._stat()
        if seen != self._seen:
            self._cache = decode(self.path.read_bytes()) if seen is not None else {}
            self._seen = seen
        return self._cache

    def get(self, name: str) -> Account | None:
        return self.all().get(name)

    def list(self) -> list[Account]:
        return sorted(self.all().values(), key=lambda a: a.name)

    def verify(self, name: str, password: str) -> Account | None:
        """The account when the password is right; None otherwise, after about the same
        work for an unknown name (a dummy hash is verified)."""
        account = self.get(name) if isinstance(name, str) and _NAME_RE.match(name) else None
        try:
            ok = _hasher.verify(account.hash if account else _dummy_hash(), password[:MAX_PASSWORD])
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            ok = False
        return account if ok and account is not None and len(password) <= MAX_PASSWORD else None

    def by_token(self, token: str) -> Account | None:
        if not token.startswith(TOKEN_PREFIX):
            return None
        digest = token_digest(token)
        found = None
        for a in self.all().values():
            if a.token_sha256 is not None and hmac.compare_digest(a.token_sha256, digest):
                found = a
        return found

    # -- writing ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def _editing(self) -> Iterator[dict[str, Account]]:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        lock_path = self.path.with_name(FILE_NAME + ".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        _keep_owner(fd, self.path.parent)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            accounts = dict(decode(self.path.read_bytes())) if self.path.exists() else {}
            yield accounts
            tmp = self.path.with_name(f".{FILE_NAME}.{os.getpid()}.tmp")
            wfd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            _keep_owner(wfd, self.path.parent)
            with os.fdopen(wfd, "wb") as f:
                f.write(encode(accounts))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            dfd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
            self._seen = None
        finally:
            os.close(fd)

    def add(self, name: str, role: str, password: str) -> Account:
        check_name(name)
        check_role(role)
        h = _hash(password)
        with self._editing() as accounts:
            if name in accounts:
                raise AccountError(f"admin {name} exists already")
            accounts[name] = account = Account(name, role, h, created=time.time())
        return account

    def remove(self, name: str) -> None:
        with self._editing() as accounts:
            if accounts.pop(name, None) is None:
                raise AccountError(f"no admin named {name!r}")

    def _change(self, name: str, **changes) -> Account:
        with self._editing() as accounts:
            if name not in accounts:
                raise AccountError(f"no admin named {name!r}")
            accounts[name] = account = replace(accounts[name], **changes)
        return account

    def set_password(self, name: str, password: str) -> Account:
        return self._change(name, hash=_hash(password))

    def set_role(self, name: str, role: str) -> Account:
        return self._change(name, role=check_role(role))

    def set_lang(self, name: str, lang: str | None) -> Account:
        if lang is not None and lang not in LANGUAGES:
            raise AccountError(f"{lang!r} is not a language ({', '.join(LANGUAGES)})")
        return self._change(name, lang=lang)

    def new_token(self, name: str) -> str:
        """A new API token for `name` (replacing the previous one); shown once, never stored."""
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        self._change(name, token_sha256=token_digest(token))
        return token

    def revoke_token(self, name: str) -> None:
        self._change(name, token_sha256=None)


def _keep_owner(fd: int, directory: Path) -> None:
    """root ran the command in a data_dir that belongs to the service user: the file
    stays that user's, or the server could no longer read it (as kanmon.userdb)."""
    parent = os.stat(directory)
    if os.geteuid() == 0 and parent.st_uid != 0:
        os.fchown(fd, parent.st_uid, parent.st_gid)


def _hash(password: str) -> str:
    if not password:
        raise AccountError("the password is empty")
    if len(password) > MAX_PASSWORD:
        raise AccountError(f"the password is longer than {MAX_PASSWORD} characters")
    return _hasher.hash(password)


# ---------------------------------------------------------------------------
# The audit log


AUDIT_KIND = "audit"


def audit_fields(who: str, role: str, action: str, target: str, source: str, via: str, outcome: str) -> dict:
    return {"who": who, "role": role, "action": action, "target": target, "from": source, "via": via,
            "outcome": outcome}


def audit_line(fields: dict) -> str:
    """`audit: alice (admin) from 127.0.0.1 via console: queue hold 4Xb... -> ok`; every
    part escaped (a target or an address may come from the network)."""
    f = {k: for_log(str(v)) for k, v in fields.items()}
    target = f" {f['target']}" if f["target"] else ""
    return f"audit: {f['who']} ({f['role']}) from {f['from']} via {f['via']}: {f['action']}{target} -> {f['outcome']}"


def audit(emit, who: str, role: str, action: str, target: str = "", *, source: str = "-", via: str = "console",
          outcome: str = "ok") -> None:
    """One event-log line for one administrator's write. emit: Records.emit."""
    fields = audit_fields(who, role, action, target, source, via, outcome)
    emit(audit_line(fields), kind=AUDIT_KIND, detail=fields)


def audit_offline(config, who: str, role: str, action: str, target: str = "", *, via: str = "kanmon admin",
                  outcome: str = "ok") -> None:
    """audit() from a command when the node may not run: written into the records of
    data_dir directly (the node's records writer and this one share the database)."""
    from kanmon.records.store import Records  # noqa: PLC0415 - only commands that write

    records = Records(Path(config.server.data_dir), config.server.hostname, echo=None, log=config.log, rotate=False)
    try:
        user = os.environ.get("SUDO_USER") or os.environ.get("USER") or str(os.getuid())
        audit(records.emit, who, role, action, target, source=f"local user {user}", via=via, outcome=outcome)
        records.flush()
    finally:
        records.close()
