"""POP3 server: an I/O-free session state machine and the service that listens.

Role: RFC 1939 (POP3) with RFC 2449 (CAPA, response codes), RFC 2595 (STLS) and
RFC 5034 (AUTH PLAIN and LOGIN) over one account's INBOX (kanmon/store/maildir.py).
``Pop3Session`` is fed bytes and returns events (kanmon/store/connection.py); what
needs the mailbox's files (login, RETR, TOP, QUIT) yields FileWork for the adapter's
file executor and waits for ``file_done`` before it reads the next command;
``Pop3Service`` binds ``[pop3] listen`` (STLS offered) and ``listen_tls`` (implicit
TLS, RFC 8314) and drives sessions with the shared asyncio adapter.

Trusts: nothing the client sends. Lines are bounded (``MAX_LINE``); message numbers
are range-checked; passwords go only to ``Users.verify`` (in a worker thread) and
never into a log line.

Never: accept USER/PASS/AUTH on a plain connection before STLS; let bytes pipelined
before the TLS handshake reach the session after it (CVE-2011-0411); delete anything
unless the client said QUIT in the TRANSACTION state (RFC 1939 6: a dropped connection
deletes nothing); give a second session the same mailbox (``-ERR [IN-USE]``); touch a
file itself.
"""

from __future__ import annotations

import base64
import binascii
import fcntl
import os
import socket
import ssl
import threading
from collections.abc import Callable
from functools import partial

from kanmon.records.events import LoginFailed
from kanmon.config import Config
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
from kanmon.store.maildir import Folder, Mailbox, MaildirError, MessageInfo, to_crlf
from kanmon.store.users import AuthThrottle, Users, log_safe

MAX_LINE = 2048  # RFC 2449 4: commands are at most 255 octets; AUTH PLAIN lines are longer
MAX_ERRORS = 10
IDLE_TIMEOUT = 600.0  # RFC 1939 3: the autologout timer is at least 10 minutes

Emit = Callable[..., None]

# Replies (RFC 1939 3, response codes from RFC 2449 8 and RFC 3206).
OK_GREETING = "+OK {host} POP3 ready"
ERR_NEED_TLS = "-ERR [AUTH] TLS is required first: use STLS"
ERR_AUTH_FAILED = "-ERR [AUTH] authentication failed"
ERR_BLOCKED = "-ERR [SYS/TEMP] too many failed logins; try again later"
ERR_IN_USE = "-ERR [IN-USE] mailbox is in use by another session"
ERR_NO_MSG = "-ERR no such message"
ERR_GONE = "-ERR message was removed by another session"
ERR_UNKNOWN = "-ERR unknown command"
ERR_BAD_STATE = "-ERR command not valid in this state"
ERR_SYNTAX = "-ERR syntax error"
ERR_LINE_TOO_LONG = "-ERR line too long"
ERR_TOO_MANY_ERRORS = "-ERR too many errors, closing"
ERR_TIMEOUT = "-ERR autologout: idle for too long"
ERR_STORE = "-ERR [SYS/TEMP] the mailbox cannot be read now"
OK_TLS = "+OK begin TLS negotiation"


class MailboxLocks:
    """Which mailboxes have a POP3 session (RFC 1939 8: exclusive-access lock).

    In this process a set; across processes an flock on ``<mailbox>/kanmon-pop3.lock``.
    """

    def __init__(self) -> None:
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()

    def acquire(self, address: str, root: os.PathLike[str] | str) -> bool:
        with self._lock:
            if address in self._held:
                return False
            os.makedirs(root, exist_ok=True)
            fd = os.open(os.path.join(root, "kanmon-pop3.lock"), os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                return False
            self._held[address] = fd
            return True

    def release(self, address: str) -> None:
        with self._lock:
            fd = self._held.pop(address, None)
            if fd is not None:
                os.close(fd)

    def release_all(self) -> None:
        """Once no session is left: a login whose lock was taken in the file executor
        while its connection was cancelled never got to release it."""
        with self._lock:
            for fd in self._held.values():
                os.close(fd)
            self._held.clear()


def _dot_stuff(wire: bytes) -> bytes:
    """RFC 1939 3: lines starting with "." get one more; the body ends with CRLF."""
    if wire.startswith(b"."):
        wire = b"." + wire
    wire = wire.replace(b"\r\n.", b"\r\n..")
    if not wire.endswith(b"\r\n"):
        wire += b"\r\n"
    return wire


class Pop3Session(LineSteps):
    """One POP3 conversation. Feed it bytes with receive(); it returns events."""

    poll_interval = None

    @property
    def authenticated(self) -> bool:
        return self.state != "AUTHORIZATION"

    def __init__(
        self,
        *,
        hostname: str,
        users: Users,
        throttle: AuthThrottle,
        locks: MailboxLocks,
        peer: PeerInfo,
        tls_available: bool,
        emit: Emit,
        idle_timeout: float = IDLE_TIMEOUT,
    ):
        self.hostname = hostname
        self.users = users
        self.throttle = throttle
        self.locks = locks
        self.peer = peer
        self.tls_active = peer.tls
        self.tls_available = tls_available
        self.emit = emit
        self.idle_timeout = idle_timeout
        self.state = "AUTHORIZATION"  # -> TRANSACTION -> (UPDATE at QUIT)
        self._buf = bytearray()
        self._user: str | None = None
        self._pending: str | None = None  # address whose password is being verified
        self._reserved: tuple[str, str] | None = None  # (ip, user) of a throttle reservation not yet ended
        self.owed: Callable[[], None] | None = None  # blocking work the ended session still owes (the adapter runs it)
        self._steps: Steps | None = None  # a command waiting for FileWork
        self._sasl_wait: str | None = None  # AUTH PLAIN/LOGIN waiting for the client's next response
        self._sasl_user: str | None = None  # AUTH LOGIN: the user name, once sent
        self._errors = 0
        self._closed = False
        self._address: str | None = None
        self._folder: Folder | None = None
        self._messages: list[MessageInfo] = []
        self._sizes: list[int] = []
        self._deleted: set[int] = set()
        self._retrieved: set[int] = set()

    # -- adapter interface
    def start(self) -> list[Event]:
        return [Send(self._line(OK_GREETING.format(host=self.hostname)))]

    def receive(self, data: bytes) -> list[Event]:
        if self._closed:
            return []
        self._buf += data
        return self._process()

    def tls_started(self) -> list[Event]:
        self.tls_active = True
        self._buf.clear()  # CVE-2011-0411
        self._user = None
        return []

    def timed_out(self) -> list[Event]:
        self._closed = True
        return [Send(self._line(ERR_TIMEOUT)), Close()]

    def connection_lost(self) -> None:
        """The connection ended: release the lock, delete nothing (RFC 1939 6)."""
        if self._reserved is not None:  # gone while its password was verified: give the attempt back
            self.owed = partial(self.throttle.release, *self._reserved)
            self._reserved = None
        if self._steps is not None:
            self._steps.close()
            self._steps = None
        if self._address is not None:
            self.locks.release(self._address)
            self._address = None
        self._closed = True

    # -- input
    @staticmethod
    def _line(text: str) -> bytes:
        return text.encode("utf-8", "replace") + b"\r\n"

    def _process(self) -> list[Event]:
        out: list[Event] = []
        while not self._closed and self._pending is None and self._steps is None:
            nl = self._buf.find(b"\n")
            if nl < 0:
                if len(self._buf) > MAX_LINE:
                    self._closed = True
                    out += [Send(self._line(ERR_LINE_TOO_LONG)), Close()]
                break
            raw = bytes(self._buf[:nl]).rstrip(b"\r")
            del self._buf[: nl + 1]
            if len(raw) > MAX_LINE:
                out.append(Send(self._line(ERR_LINE_TOO_LONG)))
                out += self._error()
                continue
            events = self._command(raw)
            out += events
            if any(isinstance(e, StartTls) for e in events):
                self._buf.clear()  # CVE-2011-0411: what followed STLS is not ours to read
                break
        return out

    def _error(self) -> list[Event]:
        self._errors += 1
        if self._errors >= MAX_ERRORS:
            self._closed = True
            return [Send(self._line(ERR_TOO_MANY_ERRORS)), Close()]
        return []

    def _err(self, text: str) -> list[Event]:
        return [Send(self._line(text)), *self._error()]

    def _ok(self, text: str = "") -> list[Event]:
        return [Send(self._line("+OK" + (" " + text if text else "")))]

    def _command(self, raw: bytes) -> list[Event]:
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            return self._err(ERR_SYNTAX)
        if self._sasl_wait is not None:
            mech, self._sasl_wait = self._sasl_wait, None
            result = self._auth_plain(line.strip()) if mech == "PLAIN" else self._auth_login(line.strip())
            return result if isinstance(result, list) else self._run(result)
        verb, _, rest = line.lstrip().partition(" ")  # rest unstripped: PASS may end in spaces
        verb = verb.upper()
        args = rest.split()
        handler = getattr(self, f"_cmd_{verb.lower()}", None) if verb.isalpha() else None
        if handler is None:
            return self._err(ERR_UNKNOWN)
        if verb in _TRANSACTION_ONLY and self.state != "TRANSACTION":
            return self._err(ERR_BAD_STATE)
        if verb in _AUTH_ONLY and self.state != "AUTHORIZATION":
            return self._err(ERR_BAD_STATE)
        result = handler(rest) if verb == "PASS" else handler(args)  # a password may contain spaces
        return result if isinstance(result, list) else self._run(result)

    # -- AUTHORIZATION (RFC 1939 4, 7)
    def _cmd_capa(self, args: list[str]) -> list[Event]:
        # RFC 2449 5
        caps = ["TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING"]
        if self.state == "AUTHORIZATION":
            if self.tls_active:
                caps += ["USER", "SASL PLAIN LOGIN"]
            elif self.tls_available:
                caps.append("STLS")
        caps.append("IMPLEMENTATION kanmon")
        body = "".join(c + "\r\n" for c in caps)
        return [Send(b"+OK capability list follows\r\n" + body.encode() + b".\r\n")]

    def _cmd_stls(self, args: list[str]) -> list[Event]:
        # RFC 2595 4
        if self.tls_active or not self.tls_available:
            return self._err("-ERR TLS is not available here" if not self.tls_active else "-ERR TLS is already active")
        return [Send(self._line(OK_TLS)), StartTls()]

    def _cmd_user(self, args: list[str]) -> list[Event]:
        if not self.tls_active:
            return self._err(ERR_NEED_TLS)
        if len(args) != 1:
            return self._err(ERR_SYNTAX)
        self._user = args[0]
        return self._ok("send PASS")

    def _cmd_pass(self, rest: str) -> list[Event] | Steps:
        if not self.tls_active:
            return self._err(ERR_NEED_TLS)
        if self._user is None:
            return self._err("-ERR USER first")
        user, self._user = self._user, None
        return self._check(user, rest)

    def _cmd_auth(self, args: list[str]) -> list[Event] | Steps:
        # RFC 5034
        if not args:
            return [Send(b"+OK methods follow\r\nPLAIN\r\nLOGIN\r\n.\r\n")]
        if not self.tls_active:
            return self._err(ERR_NEED_TLS)
        mech = args[0].upper()
        if mech not in ("PLAIN", "LOGIN") or len(args) > 2:
            return self._err("-ERR [AUTH] unsupported mechanism (PLAIN or LOGIN)")
        self._sasl_user = None
        if len(args) == 2:
            return self._auth_plain(args[1]) if mech == "PLAIN" else self._auth_login(args[1])
        self._sasl_wait = mech
        # LOGIN (draft-murchison-sasl-login): the server asks "Username:", then "Password:".
        return [Send(b"+ VXNlcm5hbWU6\r\n" if mech == "LOGIN" else b"+ \r\n")]

    def _auth_login(self, text: str) -> list[Event] | Steps:
        """One step of AUTH LOGIN: the user name, then the password (base64 each)."""
        if text == "*":
            self._sasl_user = None
            return self._err("-ERR authentication cancelled")
        try:
            value = base64.b64decode(text, validate=True).decode("utf-8")
            if "\0" in value:
                raise ValueError
        except (binascii.Error, UnicodeDecodeError, ValueError):
            self._sasl_user = None
            return self._err("-ERR [AUTH] malformed AUTH LOGIN response")
        if self._sasl_user is None:
            self._sasl_user = value
            self._sasl_wait = "LOGIN"
            return [Send(b"+ UGFzc3dvcmQ6\r\n")]
        user, self._sasl_user = self._sasl_user, None
        return self._check(user, value)

    def _auth_plain(self, text: str) -> list[Event] | Steps:
        # RFC 4616: [authzid] NUL authcid NUL passwd
        if text == "*":
            return self._err("-ERR authentication cancelled")
        try:
            decoded = base64.b64decode(text, validate=True).decode("utf-8")
            authzid, authcid, password = decoded.split("\0")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            return self._err("-ERR [AUTH] malformed AUTH PLAIN response")
        if authzid and authzid.lower() != authcid.lower():
            return self._failed(authcid, reserved=False)
        return self._check(authcid, password)

    # The throttle may count in the shared state (blocking on its disk): its calls are FileWork.
    # The attempt is reserved before the password is verified, so parallel logins count.
    def _check(self, user: str, password: str) -> Steps:
        if (yield FileWork(self.throttle.reserve, (self.peer.ip, user))) > 0:
            return self._refuse_blocked(user)
        self._reserved = (self.peer.ip, user)
        self._pending = user
        return [Verify(user, password)]

    def _failed(self, user: str, reserved: bool = True) -> Steps:
        self._reserved = None  # ended by the file work below, which runs even if the client goes
        f = yield FileWork(self.throttle.failed, (self.peer.ip, user, reserved))
        self._failed_logins = getattr(self, "_failed_logins", 0) + 1
        self.emit(LoginFailed("pop3", log_safe(user), "PLAIN", self.peer.ip, self._failed_logins,
                              f.key if f.blocked else ""))
        if f.blocked:
            self.emit(f"pop3 login blocked {f.key} after repeated failures")
            self._closed = True
            return [Delay(f.delay), Send(self._line(ERR_BLOCKED)), Close()]
        return [Delay(f.delay), *self._err(ERR_AUTH_FAILED)]

    def _unavailable(self, user: str) -> Steps:
        """The credentials could not be checked: the reserved attempt is given back."""
        self._reserved = None  # ended by the file work below, which runs even if the client goes
        yield FileWork(self.throttle.release, (self.peer.ip, user))
        self.emit(f"pop3 login of {log_safe(user)} ip={self.peer.ip}: accounts unavailable, answered -ERR [SYS/TEMP]")
        return [Send(self._line("-ERR [SYS/TEMP] authentication is temporarily unavailable"))]

    def _refuse_blocked(self, user: str) -> list[Event]:
        self.emit(f"pop3 login refused (blocked) user={log_safe(user)} ip={self.peer.ip}")
        self._closed = True
        return [Send(self._line(ERR_BLOCKED)), Close()]

    def _login(self, user: str) -> Steps:
        address = user.strip().lower()
        self._reserved = None  # ended by the file work below, which runs even if the client goes
        if not (yield FileWork(self.throttle.succeeded, (self.peer.ip, address))):
            return self._refuse_blocked(user)  # blocked while it was verified: even a right password waits
        try:
            box = yield FileWork(self.users.mailbox(address).ensure)
        except (MaildirError, OSError):
            return self._err(ERR_STORE)
        if not (yield FileWork(self.locks.acquire, (address, box.root))):
            self.emit(f"pop3 login {address} ip={self.peer.ip}: mailbox in use")
            return self._err(ERR_IN_USE)
        self._address = address
        try:
            self._folder, self._messages, self._sizes = yield FileWork(_open_inbox, (box,))
        except (MaildirError, OSError):
            self.locks.release(address)
            self._address = None
            return self._err(ERR_STORE)
        self.state = "TRANSACTION"
        try:
            yield FileWork(self.users.record_login, (address, self.peer.ip))
        except Exception:  # noqa: BLE001 - a records hiccup must not refuse the login
            pass
        self.emit(f"pop3 login {address} ip={self.peer.ip} tls={'yes' if self.tls_active else 'no'}")
        return self._ok(f"{len(self._messages)} messages ({sum(self._sizes)} octets)")

    # -- TRANSACTION (RFC 1939 5)
    def _msg(self, arg: str) -> int | None:
        """Index into _messages for a message number, or None (bad or deleted)."""
        if not arg.isdigit() or len(arg) > 9:
            return None
        n = int(arg)
        if not 1 <= n <= len(self._messages) or (n - 1) in self._deleted:
            return None
        return n - 1

    def _live(self) -> list[int]:
        return [i for i in range(len(self._messages)) if i not in self._deleted]

    def _cmd_stat(self, args: list[str]) -> list[Event]:
        live = self._live()
        return self._ok(f"{len(live)} {sum(self._sizes[i] for i in live)}")

    def _listing(self, args: list[str], value: Callable[[int], str]) -> list[Event]:
        if len(args) > 1:
            return self._err(ERR_SYNTAX)
        if args:
            i = self._msg(args[0])
            if i is None:
                return self._err(ERR_NO_MSG)
            return self._ok(f"{i + 1} {value(i)}")
        lines = "".join(f"{i + 1} {value(i)}\r\n" for i in self._live())
        return [Send(b"+OK\r\n" + lines.encode() + b".\r\n")]

    def _cmd_list(self, args: list[str]) -> list[Event]:
        return self._listing(args, lambda i: str(self._sizes[i]))

    def _cmd_uidl(self, args: list[str]) -> list[Event]:
        # RFC 1939 7: unique-id; Dovecot's default pop3_uidl_format %08Xu%08Xv
        assert self._folder is not None
        v = self._folder.uidvalidity
        return self._listing(args, lambda i: f"{self._messages[i].uid:08X}{v:08X}")

    def _content(self, i: int) -> FileWork:
        assert self._folder is not None
        return FileWork(_read_wire, (self._folder, self._messages[i]))

    def _cmd_retr(self, args: list[str]) -> list[Event] | Steps:
        if len(args) != 1:
            return self._err(ERR_SYNTAX)
        i = self._msg(args[0])
        if i is None:
            return self._err(ERR_NO_MSG)
        return self._retr(i)

    def _retr(self, i: int) -> Steps:
        wire = yield self._content(i)
        if wire is None:
            return self._err(ERR_GONE)
        self._retrieved.add(i)
        return [Send(self._line(f"+OK {len(wire)} octets") + _dot_stuff(wire) + b".\r\n")]

    def _cmd_top(self, args: list[str]) -> list[Event] | Steps:
        if len(args) != 2 or not args[1].isdigit():
            return self._err(ERR_SYNTAX)
        i = self._msg(args[0])
        if i is None:
            return self._err(ERR_NO_MSG)
        return self._top(i, int(args[1][:9]))

    def _top(self, i: int, count: int) -> Steps:
        wire = yield self._content(i)
        if wire is None:
            return self._err(ERR_GONE)
        end = wire.find(b"\r\n\r\n")
        if end < 0:
            head, body = wire, b""
        else:
            head, body = wire[: end + 4], wire[end + 4 :]
        n = min(count, 10**9)
        lines = body.split(b"\r\n")
        if lines and lines[-1] == b"":
            lines.pop()
        part = b"".join(line + b"\r\n" for line in lines[:n])
        return [Send(b"+OK\r\n" + _dot_stuff(head + part) + b".\r\n")]

    def _cmd_dele(self, args: list[str]) -> list[Event]:
        if len(args) != 1:
            return self._err(ERR_SYNTAX)
        i = self._msg(args[0])
        if i is None:
            return self._err(ERR_NO_MSG)
        self._deleted.add(i)
        return self._ok(f"message {i + 1} deleted")

    def _cmd_rset(self, args: list[str]) -> list[Event]:
        self._deleted.clear()
        return self._ok(f"{len(self._messages)} messages")

    def _cmd_noop(self, args: list[str]) -> list[Event]:
        return self._ok()

    def _cmd_quit(self, args: list[str]) -> list[Event] | Steps:
        if self.state != "TRANSACTION":
            self._closed = True
            return [Send(self._line(f"+OK {self.hostname} POP3 signing off")), Close()]
        return self._update()

    def _update(self) -> Steps:
        # RFC 1939 6: the UPDATE state; only now are messages removed.
        assert self._folder is not None and self._address is not None
        self.state = "UPDATE"
        failed = False
        seen = [self._messages[i] for i in sorted(self._retrieved - self._deleted)]
        doomed = [self._messages[i] for i in sorted(self._deleted)]
        try:
            yield FileWork(_mark_seen_and_remove, (self._folder, seen, doomed))
        except OSError:
            failed = True
        self._closed = True
        if self._deleted:
            self.emit(f"pop3 {self._address} deleted {len(self._deleted)} messages")
        self.locks.release(self._address)
        self._address = None
        if failed:
            return [Send(self._line("-ERR [SYS/TEMP] some deleted messages not removed")), Close()]
        return [Send(self._line(f"+OK {self.hostname} POP3 signing off")), Close()]


def _open_inbox(box: Mailbox) -> tuple[Folder, list[MessageInfo], list[int]]:
    """INBOX, its messages (new ones moved to cur/) and their wire sizes (file executor)."""
    folder = box.folder("INBOX")
    messages = folder.sync(move_new=True)
    # Sizes from the file names (W=); for files without one (another program's), from the
    # folder's index when it has them, else by reading the file.
    unsized = [m for m in messages if m.vsize is None]
    if unsized:
        for m, e in zip(unsized, folder.index.get_many([m.base for m in unsized], True), strict=True):
            if e is not None:
                m.vsize = e.vsize
    return folder, messages, [folder.wire_size(m) for m in messages]


def _read_wire(folder: Folder, msg: MessageInfo) -> bytes | None:
    """A message in wire form (CRLF), None if it is gone (file executor)."""
    data = folder.read(msg)
    return None if data is None else to_crlf(data)


def _mark_seen_and_remove(folder: Folder, seen: list[MessageInfo], doomed: list[MessageInfo]) -> None:
    """QUIT's UPDATE: retrieved messages get \\Seen, deleted ones go (file executor)."""
    changes = [(m, m.flags | {"\\Seen"}, None) for m in seen if "\\Seen" not in m.flags]
    if changes:
        folder.store_flags(changes)  # one change for them all
    folder.remove(doomed)


_TRANSACTION_ONLY = {"STAT", "LIST", "UIDL", "RETR", "TOP", "DELE", "RSET"}
_AUTH_ONLY = {"USER", "PASS", "AUTH", "STLS"}


class Pop3Service(AccessService):
    """The POP3 listeners of ``kanmon serve`` (see AccessService)."""

    protocol = "POP3"
    refusals = (b"-ERR [SYS/TEMP] too many connections\r\n",
                b"-ERR [SYS/TEMP] too many connections from your address\r\n")

    def __init__(
        self,
        config: Config,
        tls_context: ssl.SSLContext | None,
        users: Users,
        throttle: AuthThrottle,
        emit: Emit,
        *,
        idle_timeout: float = IDLE_TIMEOUT,
        max_connections: int | None = None,
        sockets: list[tuple[socket.socket, bool]] | None = None,
    ):
        self.idle_timeout = idle_timeout
        self.locks = MailboxLocks()
        super().__init__(config, config.pop3, tls_context, users, throttle, emit, max_connections=max_connections,
                         sockets=sockets)

    async def stop(self) -> None:
        await super().stop()  # every session and its file work is done
        self.locks.release_all()

    def _session(self, peer: PeerInfo, implicit: bool) -> Pop3Session:
        return Pop3Session(
            hostname=self.config.server.hostname,
            users=self.users,
            throttle=self.throttle,
            locks=self.locks,
            peer=peer,
            tls_available=self.tls_context is not None,
            emit=self.emit,
            idle_timeout=self.idle_timeout,
        )
