"""The console's session cookie, CSRF tokens and the secret they are signed with: pure logic.

Role: a session is a small JSON document (admin name, session id, client IP, login time,
last request time, the account's password version) signed with HMAC-SHA256 under a
secret kept in <data_dir>/console/secret (0600, made once). `read_session` accepts a
cookie only when the signature holds, it was used within `timeout` seconds, its login is
younger than `lifetime`, it comes from the IP it was issued to (a cookie stolen and
replayed from elsewhere is refused), and the account still exists with the same
password (a password change or removal ends every session at once). The CSRF token of a
session is an HMAC of its session id, so it needs no storage and changes at each login.

Trusts: nothing in a cookie or a form until its MAC is checked (constant-time compare);
nothing in the revocation file (a strict decoder: a damaged file is moved aside and every
session made before that moment is refused, never accepted again).
Never: put a password or a hash in a cookie, or accept an unsigned or expired session.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kanmon import secretfile
from kanmon.secretfile import b64, unb64

SECRET_BYTES = secretfile.SECRET_BYTES
COOKIE_NAME = "kanmon_session"
MAX_COOKIE = 2048


def load_secret(data_dir: Path | str) -> bytes:
    """The signing secret, created 0600 on first use (kept across restarts, so sessions
    survive a reload; delete the file to end every session)."""
    return secretfile.load_secret(Path(data_dir) / "console", "secret")


@dataclass(frozen=True, slots=True)
class Session:
    name: str
    sid: str
    ip: str
    login: float
    seen: float
    pv: str  # the account's password version at login


class Sessions:
    def __init__(self, secret: bytes, timeout: float, lifetime: float):
        self.secret = secret
        self.timeout = timeout
        self.lifetime = lifetime

    def _mac(self, purpose: bytes, data: bytes) -> bytes:
        return hmac.new(self.secret, purpose + b"\0" + data, hashlib.sha256).digest()

    def new(self, name: str, ip: str, password_version: str, now: float) -> Session:
        return Session(name, secrets.token_urlsafe(16), ip, now, now, password_version)

    def encode(self, s: Session) -> str:
        body = json.dumps([s.name, s.sid, s.ip, s.login, s.seen, s.pv], separators=(",", ":")).encode()
        return b64(body) + "." + b64(self._mac(b"session", body))

    def decode(self, cookie: str | None) -> Session | None:
        """The session in a cookie whose signature holds (no time or IP checks)."""
        if not cookie or len(cookie) > MAX_COOKIE or cookie.count(".") != 1:
            return None
        body_text, mac_text = cookie.split(".")
        try:
            body, mac = unb64(body_text), unb64(mac_text)
        except (ValueError, TypeError):
            return None
        if not hmac.compare_digest(mac, self._mac(b"session", body)):
            return None
        try:
            name, sid, ip, login, seen, pv = json.loads(body)
            return Session(str(name), str(sid), str(ip), float(login), float(seen), str(pv))
        except (ValueError, TypeError):
            return None

    def check(self, s: Session | None, ip: str, password_version: str | None, now: float) -> str | None:
        """Why the session is refused, or None when it is good."""
        if s is None:
            return "no session"
        if now - s.seen > self.timeout:
            return "session timed out"
        if now - s.login > self.lifetime or s.login > now + 60:
            return "session expired"
        if s.ip != ip:
            return "session used from another address"
        if password_version is None or not hmac.compare_digest(s.pv, password_version):
            return "account removed or password changed"
        return None

    def csrf_token(self, s: Session) -> str:
        return b64(self._mac(b"csrf", s.sid.encode()))

    def csrf_ok(self, s: Session, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(str(token).encode(), self.csrf_token(s).encode())

    def status_token(self, s: Session, kind: str, text: str) -> str:
        """The MAC of a status line (kind: msg or error) the console wrote for this session
        and put in the address it redirects to: only such a line is shown, never text a
        crafted link brings along."""
        return b64(self._mac(b"status", "\0".join((s.sid, kind, text)).encode("utf-8", "surrogatepass")))

    def status_ok(self, s: Session, kind: str, text: str, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(str(token).encode(), self.status_token(s, kind, text).encode())


REVOKED_FILE = "revoked.json"
REVOKED_FORMAT = "kanmon-console-revoked 1"
MAX_REVOKED = 100_000  # logouts within one session lifetime; the oldest go first beyond it
MAX_REVOKED_FILE = 16 * 1024 * 1024


class Revocations:
    """Logged-out session ids, each kept until the session would have expired anyway.

    The file is read at start and again whenever its stat changes (another console of
    the node, after a reload, may have written it); it is written whole (temp file,
    fsync, rename) at each logout. `not_before`: sessions that logged in earlier are
    refused (set when a damaged file had to be moved aside: what it held is unknown).
    """

    def __init__(self, data_dir: Path | str, warn: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.time):
        self.dir = Path(data_dir) / "console"
        self.path = self.dir / REVOKED_FILE
        self.warn = warn or (lambda text: None)
        self.clock = clock
        self.revoked: dict[str, float] = {}
        self.not_before = 0.0
        self._stat: tuple | None = None
        self._lock = threading.Lock()  # logouts run in threads; other processes: the flock below
        self._load()

    def _file_stat(self) -> tuple | None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def _load(self) -> None:
        stat = self._file_stat()
        if stat == self._stat:
            return
        if stat is None:
            self.revoked, self._stat = {}, None
            return
        try:
            raw = self.path.read_bytes()
            self.not_before, self.revoked = decode_revoked(raw)
            self._stat = stat
        except ValueError as e:
            now = self.clock()
            aside = self.path.with_name(f"{REVOKED_FILE}.bad-{int(now)}")
            os.replace(self.path, aside)
            self.warn(f"console: {self.path} is damaged ({e}); moved to {aside.name}: every session made "
                      "before now is refused")
            self.not_before, self.revoked = now, {}
            self._write()

    def is_revoked(self, sid: str, login: float) -> bool:
        self._load()
        return login < self.not_before or sid in self.revoked

    def revoke(self, sid: str, until: float) -> None:
        with self._lock, self._file_lock():
            self._stat = None  # read what another thread or process wrote, whatever its stat
            self._load()
            now = self.clock()
            kept = {k: v for k, v in self.revoked.items() if v > now}
            kept[sid] = until
            if len(kept) > MAX_REVOKED:
                kept = dict(sorted(kept.items(), key=lambda kv: kv[1])[-MAX_REVOKED:])
            self.revoked = kept
            self._write()

    @contextlib.contextmanager
    def _file_lock(self):
        """The read-modify-write of the file, one at a time across processes."""
        self.dir.mkdir(mode=0o700, exist_ok=True)
        fd = os.open(self.dir / f"{REVOKED_FILE}.lock", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _write(self) -> None:
        self.dir.mkdir(mode=0o700, exist_ok=True)
        body = json.dumps({"format": REVOKED_FORMAT, "not_before": self.not_before, "revoked": self.revoked},
                          separators=(",", ":")).encode()
        tmp = self.path.with_name(f".{REVOKED_FILE}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(body)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        dfd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)  # the rename is durable: a logout holds after a crash
        finally:
            os.close(dfd)
        self._stat = self._file_stat()


def decode_revoked(raw: bytes) -> tuple[float, dict[str, float]]:
    """Strict decoder of revoked.json: (not_before, {session id: until})."""
    if len(raw) > MAX_REVOKED_FILE:
        raise ValueError(f"larger than {MAX_REVOKED_FILE} bytes")
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"not JSON: {e}") from None
    if not isinstance(doc, dict) or set(doc) != {"format", "not_before", "revoked"} or doc["format"] != REVOKED_FORMAT:
        raise ValueError(f'expected {{"format": "{REVOKED_FORMAT}", "not_before": ..., "revoked": {{...}}}}')
    nb, revoked = doc["not_before"], doc["revoked"]
    if isinstance(nb, bool) or not isinstance(nb, int | float) or not isinstance(revoked, dict):
        raise ValueError("not_before is a number and revoked an object")
    out: dict[str, float] = {}
    for sid, until in revoked.items():
        if not (0 < len(sid) <= 64) or isinstance(until, bool) or not isinstance(until, int | float):
            raise ValueError(f"bad entry {sid[:64]!r}")
        out[sid] = float(until)
    return float(nb), out
