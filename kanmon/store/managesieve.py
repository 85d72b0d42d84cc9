"""ManageSieve server (RFC 5804): users' mail clients edit their Sieve scripts.

Role: an I/O-free session (``ManageSieveSession``) fed bytes, returning events for the
shared asyncio adapter (kanmon/store/connection.py), and the service that listens
(``[managesieve] listen``, STARTTLS with the node's certificate; ``listen_tls`` for
implicit TLS). Commands: CAPABILITY, STARTTLS, AUTHENTICATE (PLAIN, LOGIN; RFC 4616 and
the LOGIN mechanism Outlook-era clients use), LOGOUT, NOOP, HAVESPACE, PUTSCRIPT,
LISTSCRIPTS, SETACTIVE, GETSCRIPT, DELETESCRIPT, RENAMESCRIPT, CHECKSCRIPT. Scripts are
kept by kanmon.store.sievescripts and compiled by kanmon.store.sieve before they are
stored: a script that does not compile is refused with its line and reason.

Trusts: nothing the client sends. The command line outside literals is bounded
(``MAX_LINE``), literals are bounded (``PREAUTH_MAX_LITERAL`` before the login, the
script size limit after; a larger one is read and dropped, and answered NO
(QUOTA/MAXSIZE)), passwords go only to ``Users.verify`` (in a worker thread) and
never into a log line; failed logins count in the same ``AuthThrottle`` as IMAP, POP3
and submission.

Never: accept AUTHENTICATE on a plain connection before STARTTLS when TLS is available
(no TLS at all: no login either); let bytes pipelined before the TLS handshake reach the
session after it (CVE-2011-0411); touch a file itself (the adapter's file executor does).
"""

from __future__ import annotations

import base64
import binascii
import socket
import ssl
from collections.abc import Callable
from functools import partial
from typing import Any

from kanmon.config import Config
from kanmon.records.events import LoginFailed
from kanmon.store.connection import (
    AccessService,
    Close,
    Delay,
    Event,
    FileWork,
    LineSteps,
    PeerInfo,
    Send,
    StartTls,
    Steps,
    Verify,
)
from kanmon.store.sieve import EXTENSIONS, SieveError
from kanmon.store.sievescripts import ScriptError, ScriptStore
from kanmon.store.users import AuthThrottle, Users, log_safe

MAX_LINE = 8192
PREAUTH_MAX_LITERAL = 8192
MAX_ERRORS = 10
IDLE_TIMEOUT = 1800.0  # RFC 5804 does not say; Dovecot's managesieve waits 30 minutes

Emit = Callable[..., None]


class _Bad(Exception):
    """Input that cannot be a command: where the next one starts is unknown (BYE)."""


class _TooLarge(Exception):
    """A literal over the bound: its bytes (from ``start`` in the buffer, ``size`` of them)
    and the rest of its line are read and dropped, and the command gets NO."""

    def __init__(self, start: int, size: int, limit: int):
        super().__init__(f"literal of {size} bytes is too large (at most {limit})")
        self.start, self.size, self.limit = start, size, limit


def quoted(text: str) -> bytes:
    """A string in a response: quoted when it can be, a literal otherwise (RFC 5804 4)."""
    data = text.encode("utf-8")
    if len(data) < 1024 and not any(c in data for c in b"\r\n\0"):
        return b'"' + data.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    return b"{%d}\r\n" % len(data) + data


def _reply(kind: str, text: str = "", code: str = "") -> bytes:
    out = kind.encode()
    if code:
        out += b" (" + code.encode() + b")"
    if text:
        out += b" " + quoted(text)
    return out + b"\r\n"


def parse_command(buf: bytes | bytearray, max_literal: int) -> tuple[list[bytes], int] | None:
    """One command from the start of buf: (words: atoms and strings as bytes, bytes used),
    None when more input is needed, _Bad when it cannot be a command. Atoms are returned
    as they are; quoted strings unescaped; literals ({n} or {n+}) whole."""
    words: list[bytes] = []
    i, n = 0, len(buf)
    while True:
        while i < n and buf[i] == 0x20:
            i += 1
        if i >= n:
            if n > MAX_LINE:
                raise _Bad("line too long")
            return None
        c = buf[i]
        if c == 0x0D or c == 0x0A:
            end = i + 2 if buf[i:i + 2] == b"\r\n" else i + 1
            if c == 0x0D and i + 1 >= n:
                return None
            return words, end
        if len(words) > 16:
            raise _Bad("too many arguments")
        if c == 0x22:  # quoted string
            j = i + 1
            out = bytearray()
            while True:
                if j >= n:
                    if n - i > MAX_LINE:
                        raise _Bad("line too long")
                    return None
                ch = buf[j]
                if ch == 0x22:
                    break
                if ch in (0x0D, 0x0A, 0):
                    raise _Bad("a quoted string may not contain CR, LF or NUL")
                if ch == 0x5C:
                    if j + 1 >= n:
                        return None
                    ch = buf[j + 1]
                    j += 1
                out.append(ch)
                j += 1
                if len(out) > MAX_LINE:
                    raise _Bad("string too long")
            words.append(bytes(out))
            i = j + 1
        elif c == 0x7B:  # literal
            close = buf.find(b"}", i, i + 24)
            if close < 0:
                if n - i >= 24:
                    raise _Bad("bad literal")
                return None
            spec = bytes(buf[i + 1:close])
            if spec.endswith(b"+"):
                spec = spec[:-1]
            if not spec.isdigit() or len(spec) > 12:
                raise _Bad("bad literal")
            size = int(spec)
            if close + 1 >= n or (close + 2 >= n and buf[close + 1] == 0x0D):
                return None
            if buf[close + 1:close + 3] == b"\r\n":
                start = close + 3
            elif buf[close + 1] == 0x0A:
                start = close + 2
            else:
                raise _Bad("a literal's size is followed by CRLF")
            if size > max_literal:
                raise _TooLarge(start, size, max_literal)
            if n < start + size:
                return None
            words.append(bytes(buf[start:start + size]))
            i = start + size
        else:
            j = i
            while j < n and buf[j] not in (0x20, 0x0D, 0x0A, 0x22, 0x7B):
                j += 1
            if j >= n:
                if n > MAX_LINE:
                    raise _Bad("line too long")
                return None
            words.append(bytes(buf[i:j]))
            i = j


class ManageSieveSession(LineSteps):
    """One ManageSieve conversation. Feed it bytes with receive(); it returns events."""

    poll_interval = None
    internal_error = b'BYE "internal error"\r\n'  # what the adapter sends if this session fails

    @property
    def authenticated(self) -> bool:
        return self._address is not None

    def __init__(self, *, hostname: str, users: Users, throttle: AuthThrottle, peer: PeerInfo,
                 tls_available: bool, emit: Emit, data_dir, max_script_size: int = 65536,
                 max_scripts: int = 20, max_redirects: int = 4, idle_timeout: float = IDLE_TIMEOUT):
        self.hostname = hostname
        self.users = users
        self.throttle = throttle
        self.peer = peer
        self.tls_active = peer.tls
        self.tls_available = tls_available
        self.emit = emit
        self.data_dir = data_dir
        self.max_script_size = max_script_size
        self.max_scripts = max_scripts
        self.max_redirects = max_redirects
        self.idle_timeout = idle_timeout
        self._buf = bytearray()
        self._address: str | None = None
        self._store: ScriptStore | None = None
        self._pending: str | None = None
        self._reserved: tuple[str, str] | None = None
        self.owed: Callable[[], None] | None = None
        self._steps: Steps | None = None
        self._sasl: tuple[str, str | None] | None = None  # (mechanism, LOGIN user) while a response is awaited
        self._errors = 0
        self._dropping: str | None = None  # refusal of an oversized literal being dropped
        self._drop_left = 0  # its bytes not yet received
        self._failed_logins = 0
        self._closed = False

    # -- adapter interface
    def start(self) -> list[Event]:
        return [Send(self._capabilities() + _reply("OK", f"{self.hostname} ManageSieve ready"))]

    def receive(self, data: bytes) -> list[Event]:
        if self._closed:
            return []
        self._buf += data
        return self._process()

    def tls_started(self) -> list[Event]:
        self.tls_active = True
        self._buf.clear()  # CVE-2011-0411
        # RFC 5804 2.2: after STARTTLS the server sends its capabilities again.
        return [Send(self._capabilities() + _reply("OK", "TLS active"))]

    def timed_out(self) -> list[Event]:
        self._closed = True
        return [Send(_reply("BYE", "idle for too long")), Close()]

    def connection_lost(self) -> None:
        if self._reserved is not None:
            self.owed = partial(self.throttle.release, *self._reserved)
            self._reserved = None
        if self._steps is not None:
            self._steps.close()
            self._steps = None
        self._closed = True

    # -- input
    def _capabilities(self) -> bytes:
        lines = [b'"IMPLEMENTATION" "kanmon"']
        login_ok = self.tls_active
        if not self.authenticated:
            lines.append(b'"SASL" ' + quoted("PLAIN LOGIN" if login_ok else ""))
        lines.append(b'"SIEVE" ' + quoted(" ".join(EXTENSIONS)))
        if not self.tls_active and self.tls_available:
            lines.append(b'"STARTTLS"')
        lines.append(b'"MAXREDIRECTS" ' + quoted(str(self.max_redirects)))
        if self.authenticated:
            lines.append(b'"OWNER" ' + quoted(self._address or ""))
        lines.append(b'"VERSION" "1.0"')
        return b"".join(line + b"\r\n" for line in lines)

    def _process(self) -> list[Event]:
        out: list[Event] = []
        while not self._closed and self._pending is None and self._steps is None:
            limit = self.max_script_size + 1024 if self.authenticated else PREAUTH_MAX_LITERAL
            if self._dropping is not None:
                if not self._drop():
                    break
                out += self._error(self._dropping, "QUOTA/MAXSIZE")
                self._dropping = None
                continue
            try:
                parsed = parse_command(self._buf, limit)
            except _TooLarge as e:
                del self._buf[:e.start]
                self._drop_left, self._dropping = e.size, str(e)
                continue
            except _Bad as e:
                self._closed = True  # where the next command starts is unknown: end the connection
                out += [Send(_reply("BYE", str(e))), Close()]
                break
            if parsed is None:
                break
            words, used = parsed
            del self._buf[:used]
            if not words:
                continue
            events = self._command(words)
            out += events
            if any(isinstance(e, StartTls) for e in events):
                self._buf.clear()  # CVE-2011-0411: what followed STARTTLS is not ours to read
                break
        return out

    def _drop(self) -> bool:
        """Drop what is left of an oversized literal, then the rest of its line; True once
        the line has ended (bounded: the rest of the line may be MAX_LINE long)."""
        if self._drop_left:
            gone = min(self._drop_left, len(self._buf))
            del self._buf[:gone]
            self._drop_left -= gone
            if self._drop_left:
                return False
        nl = self._buf.find(b"\n")
        if nl < 0:
            if len(self._buf) > MAX_LINE:
                self._buf.clear()
            return False
        del self._buf[:nl + 1]
        return True

    def _error(self, text: str, code: str = "") -> list[Event]:
        self._errors += 1
        if self._errors >= MAX_ERRORS:
            self._closed = True
            return [Send(_reply("NO", text, code) + _reply("BYE", "too many errors")), Close()]
        return [Send(_reply("NO", text, code))]

    def _command(self, words: list[bytes]) -> list[Event]:
        try:
            if self._sasl is not None:
                return self._steps_or(self._sasl_response(words))
            verb = words[0].decode("ascii").upper()
            args = [w.decode("utf-8") for w in words[1:]] if verb not in ("PUTSCRIPT", "CHECKSCRIPT") else words[1:]
        except UnicodeDecodeError:
            return self._error("not UTF-8")
        handler = getattr(self, f"_cmd_{verb.lower()}", None) if verb.isalpha() else None
        if handler is None:
            return self._error("unknown command")
        if verb in _AUTHENTICATED and not self.authenticated:
            return self._error("log in first (AUTHENTICATE)")
        if verb in ("AUTHENTICATE", "STARTTLS") and self.authenticated:
            return self._error(f"{verb} is not allowed after the login")
        try:
            return self._steps_or(handler(args))
        except _Bad as e:
            return self._error(str(e))

    def _steps_or(self, result: list[Event] | Steps) -> list[Event]:
        return result if isinstance(result, list) else self._run(result)

    # -- not authenticated
    def _cmd_capability(self, args: list[str]) -> list[Event]:
        return [Send(self._capabilities() + _reply("OK", "capability completed"))]

    def _cmd_noop(self, args: list[str]) -> list[Event]:
        if args:  # RFC 5804 2.11: the tag is echoed
            return [Send(_reply("OK", "done", "TAG " + quoted(args[0]).decode("utf-8", "replace")))]
        return [Send(_reply("OK", "done"))]

    def _cmd_logout(self, args: list[str]) -> list[Event]:
        self._closed = True
        return [Send(_reply("OK", "logout completed")), Close()]

    def _cmd_starttls(self, args: list[str]) -> list[Event]:
        if self.tls_active or not self.tls_available:
            return self._error("TLS is already active" if self.tls_active else "TLS is not available here")
        return [Send(_reply("OK", "begin TLS negotiation")), StartTls()]

    def _cmd_authenticate(self, args: list[str]) -> list[Event] | Steps:
        if not self.tls_active:
            return self._error("use STARTTLS first", "ENCRYPT-NEEDED")
        if not args or len(args) > 2:
            raise _Bad("AUTHENTICATE needs a mechanism")
        mech = args[0].upper()
        if mech not in ("PLAIN", "LOGIN"):
            return self._error("unsupported mechanism (PLAIN or LOGIN)")
        if len(args) == 2:
            if mech == "PLAIN":
                return self._plain(args[1])
            return self._login_step(args[1], None)
        self._sasl = (mech, None)
        return [Send(quoted("" if mech == "PLAIN" else "VXNlcm5hbWU6") + b"\r\n")]

    def _sasl_response(self, words: list[bytes]) -> list[Event] | Steps:
        mech, user = self._sasl or ("PLAIN", None)
        self._sasl = None
        try:
            text = words[0].decode("ascii") if len(words) == 1 else ""
        except UnicodeDecodeError:
            text = ""
        if len(words) != 1 or text == "*":
            return self._error("authentication cancelled")
        if mech == "PLAIN":
            return self._plain(text)
        return self._login_step(text, user)

    def _plain(self, text: str) -> list[Event] | Steps:
        try:
            authzid, authcid, password = base64.b64decode(text, validate=True).decode("utf-8").split("\0")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            return self._error("malformed PLAIN response")
        if authzid and authzid.lower() != authcid.lower():
            return self._failed(authcid, reserved=False)
        return self._check(authcid, password)

    def _login_step(self, text: str, user: str | None) -> list[Event] | Steps:
        try:
            value = base64.b64decode(text, validate=True).decode("utf-8")
            if "\0" in value:
                raise ValueError
        except (binascii.Error, UnicodeDecodeError, ValueError):
            return self._error("malformed LOGIN response")
        if user is None:
            self._sasl = ("LOGIN", value)
            return [Send(quoted("UGFzc3dvcmQ6") + b"\r\n")]
        return self._check(user, value)

    def _check(self, user: str, password: str) -> Steps:
        if (yield FileWork(self.throttle.reserve, (self.peer.ip, user))) > 0:
            return self._refuse_blocked(user)
        self._reserved = (self.peer.ip, user)
        self._pending = user
        return [Verify(user, password)]

    def _failed(self, user: str, reserved: bool = True) -> Steps:
        self._reserved = None
        f = yield FileWork(self.throttle.failed, (self.peer.ip, user, reserved))
        self._failed_logins += 1
        self.emit(LoginFailed("managesieve", log_safe(user), "PLAIN", self.peer.ip, self._failed_logins,
                              f.key if f.blocked else ""))
        if f.blocked:
            self.emit(f"managesieve login blocked {f.key} after repeated failures")
            self._closed = True
            return [Delay(f.delay), Send(_reply("BYE", "too many failed logins; try again later")), Close()]
        return [Delay(f.delay), *self._error("authentication failed")]

    def _unavailable(self, user: str) -> Steps:
        self._reserved = None
        yield FileWork(self.throttle.release, (self.peer.ip, user))
        self.emit(f"managesieve login of {log_safe(user)} ip={self.peer.ip}: accounts unavailable")
        return [Send(_reply("NO", "authentication is temporarily unavailable", "TRYLATER"))]

    def _refuse_blocked(self, user: str) -> list[Event]:
        self.emit(f"managesieve login refused (blocked) user={log_safe(user)} ip={self.peer.ip}")
        self._closed = True
        return [Send(_reply("BYE", "too many failed logins; try again later")), Close()]

    def _login(self, user: str) -> Steps:
        address = user.strip().lower()
        self._reserved = None
        if not (yield FileWork(self.throttle.succeeded, (self.peer.ip, address))):
            return self._refuse_blocked(user)
        self._address = address
        self._store = ScriptStore(self.data_dir, address, max_size=self.max_script_size, max_scripts=self.max_scripts)
        try:
            yield FileWork(self.users.record_login, (address, self.peer.ip))
        except Exception:  # noqa: BLE001 - a records hiccup must not refuse the login
            pass
        self.emit(f"managesieve login {address} ip={self.peer.ip}")
        return [Send(_reply("OK", "logged in"))]

    # -- authenticated (RFC 5804 2.5-2.12)
    def _store_call(self, call: Callable[..., Any], *args: Any) -> Steps:
        """Run a store operation in the file executor: (True, its result), or (False, the
        NO to answer) when it refuses."""
        try:
            result = yield FileWork(call, args)
        except ScriptError as e:
            return (False, self._error(str(e), e.code))  # type: ignore[return-value]
        except SieveError as e:
            return (False, self._error(str(e)))  # type: ignore[return-value]
        except OSError as e:
            return (False, [Send(_reply("NO", f"cannot do it now: {e.strerror or e}", "TRYLATER"))])  # type: ignore[return-value]
        return (True, result)  # type: ignore[return-value]

    def _cmd_havespace(self, args: list[str]) -> list[Event] | Steps:
        if len(args) != 2 or not args[1].isdigit() or len(args[1]) > 12:
            raise _Bad("HAVESPACE needs a script name and a size")
        return self._simple(self._store_call(self._need().space_for, args[0], int(args[1])))

    def _simple(self, steps: Steps, text: str = "done") -> Steps:
        ok, result = yield from steps
        return [Send(_reply("OK", text))] if ok else result

    def _need(self) -> ScriptStore:
        assert self._store is not None
        return self._store

    def _cmd_putscript(self, args: list[bytes]) -> list[Event] | Steps:
        if len(args) != 2:
            raise _Bad("PUTSCRIPT needs a script name and the script")
        try:
            name = args[0].decode("utf-8")
        except UnicodeDecodeError:
            raise _Bad("the script name is not UTF-8") from None
        return self._put(name, args[1])

    def _put(self, name: str, text: bytes) -> Steps:
        ok, result = yield from self._store_call(self._need().put, name, text)
        if not ok:
            return result
        self.emit(f"managesieve {self._address} stored script {log_safe(name)} ({len(text)} bytes)")
        return [Send(_reply("OK", "script stored"))]

    def _cmd_checkscript(self, args: list[bytes]) -> list[Event] | Steps:
        if len(args) != 1:
            raise _Bad("CHECKSCRIPT needs the script")
        return self._simple(self._store_call(self._need().check, args[0]), "script is valid")

    def _cmd_listscripts(self, args: list[str]) -> list[Event] | Steps:
        if args:
            raise _Bad("LISTSCRIPTS takes no arguments")
        return self._list()

    def _list(self) -> Steps:
        ok, result = yield from self._store_call(self._need().list)
        if not ok:
            return result
        body = b"".join(quoted(s.name) + (b" ACTIVE" if s.active else b"") + b"\r\n" for s in result)
        return [Send(body + _reply("OK", "listscripts completed"))]

    def _cmd_setactive(self, args: list[str]) -> list[Event] | Steps:
        if len(args) != 1:
            raise _Bad("SETACTIVE needs a script name (\"\" deactivates)")
        return self._simple(self._store_call(self._need().activate, args[0] or None),
                            f"{args[0]} is active" if args[0] else "no script is active")

    def _cmd_getscript(self, args: list[str]) -> list[Event] | Steps:
        if len(args) != 1:
            raise _Bad("GETSCRIPT needs a script name")
        return self._get(args[0])

    def _get(self, name: str) -> Steps:
        ok, result = yield from self._store_call(self._need().get, name)
        if not ok:
            return result
        return [Send(b"{%d}\r\n" % len(result) + result + b"\r\n" + _reply("OK", "getscript completed"))]

    def _cmd_deletescript(self, args: list[str]) -> list[Event] | Steps:
        if len(args) != 1:
            raise _Bad("DELETESCRIPT needs a script name")
        return self._simple(self._store_call(self._need().delete, args[0]), "script deleted")

    def _cmd_renamescript(self, args: list[str]) -> list[Event] | Steps:
        if len(args) != 2:
            raise _Bad("RENAMESCRIPT needs the old and the new name")
        return self._simple(self._store_call(self._need().rename, args[0], args[1]), "script renamed")


_AUTHENTICATED = {"HAVESPACE", "PUTSCRIPT", "CHECKSCRIPT", "LISTSCRIPTS", "SETACTIVE", "GETSCRIPT",
                  "DELETESCRIPT", "RENAMESCRIPT"}


class ManageSieveService(AccessService):
    """The ManageSieve listeners of ``kanmon serve`` (see AccessService)."""

    protocol = "ManageSieve"
    refusals = (b'BYE "too many connections"\r\n', b'BYE "too many connections from your address"\r\n')

    def __init__(self, config: Config, tls_context: ssl.SSLContext | None, users: Users, throttle: AuthThrottle,
                 emit: Emit, *, idle_timeout: float = IDLE_TIMEOUT, max_connections: int | None = None,
                 sockets: list[tuple[socket.socket, bool]] | None = None):
        self.idle_timeout = idle_timeout
        super().__init__(config, config.managesieve, tls_context, users, throttle, emit,
                         max_connections=max_connections, sockets=sockets)

    def _session(self, peer: PeerInfo, implicit: bool) -> ManageSieveSession:
        sv = self.config.sieve
        return ManageSieveSession(
            hostname=self.config.server.hostname, users=self.users, throttle=self.throttle, peer=peer,
            tls_available=self.tls_context is not None, emit=self.emit, data_dir=self.config.server.data_dir,
            max_script_size=sv.max_script_size, max_scripts=sv.max_scripts, max_redirects=sv.max_redirects,
            idle_timeout=self.idle_timeout,
        )
