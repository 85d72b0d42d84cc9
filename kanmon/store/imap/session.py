"""IMAP4rev1 session state machine (RFC 3501) with IDLE, UIDPLUS, LITERAL+, MOVE.

Role: one IMAP conversation over one account's Maildir++ folders. It is fed bytes and
returns events for the adapter (kanmon/store/connection.py): Send, Verify (password
check in a worker thread), FileWork (Maildir and account-record calls, run in the
adapter's file executor), StartTls, Delay, Close. A command that needs files is a
generator: it yields FileWork and waits, taking no further command, until the adapter
hands the result to ``file_done``; so pipelined commands still run in order, one at a
time. Extensions: IDLE (RFC 2177), UIDPLUS (RFC 4315), LITERAL+ (RFC 7888), MOVE
(RFC 6851), SPECIAL-USE (RFC 6154), UNSELECT (RFC 3691), NAMESPACE (RFC 2342), ID
(RFC 2971), SASL-IR (RFC 4959), SORT and THREAD (RFC 5256; the threading is thread.py's),
UTF8=ACCEPT (RFC 6855: after ENABLE, folder names in UTF-8, kept modified UTF-7 on disk).

Trusts: nothing the client sends. Command framing and literal sizes are bounded by
parser.CommandReader before memory is taken; folder names go through
maildir.check_folder_name; message numbers and UIDs are looked up, never indexed blindly.

Never: accept LOGIN/AUTHENTICATE on a plain connection before STARTTLS (LOGINDISABLED,
RFC 3501 6.2.3); keep bytes pipelined before the TLS handshake (CVE-2011-0411); send
EXPUNGE responses during FETCH, STORE or SEARCH (RFC 3501 7.4.1); answer a message
whose file another session removed with an empty body (RFC 2180 4.1.2: NO
[EXPUNGEISSUED]); change a mailbox
selected with EXAMINE; touch a file itself (every Maildir call is a FileWork, and the
calls it names read a snapshot, never the session).
"""

from __future__ import annotations

import base64
import binascii
import calendar
import email.utils
import errno
import re
import time
from collections.abc import Callable, Generator
from functools import partial
from dataclasses import dataclass
from typing import Any

from kanmon.content.decode import decode_header_value, decode_message, normalize
from kanmon.records.events import LoginFailed
from kanmon.store.connection import (
    Close,
    Delay,
    Event,
    FileWork,
    PeerInfo,
    Send,
    StartTls,
    Steps,
    Verify,
    advance,
)
from kanmon.store.imap import cache as icache
from kanmon.store.imap import message as mime
from kanmon.store.imap import mutf7
from kanmon.store.imap import thread as ithread
from kanmon.store.index import CacheEntry
from kanmon.store.modseq import MAX_MODSEQ
from kanmon.store.imap.parser import (
    CommandReader,
    Literal,
    ParseError,
    QStr,
    astring,
    in_set,
    parse_sequence_set,
    tokenize,
)
from kanmon.store.maildir import (
    CREATABLE_USES,
    DELIMITER,
    SYSTEM_FLAGS,
    BadFolderName,
    Folder,
    FolderExists,
    FolderNotFound,
    Mailbox,
    MAX_FOLDER_NAME,
    MaildirError,
    MessageInfo,
    Snapshot,
    check_folder_name,
    is_keyword,
    to_crlf,
)
from kanmon.store.users import AuthThrottle, Users, log_safe

IDLE_TIMEOUT = 1800.0  # RFC 3501 5.4: at least 30 minutes
PREAUTH_MAX_LITERAL = 8 * 1024  # the largest literal before the login (LOGIN, AUTHENTICATE)
IDLE_POLL = 2.0  # how often IDLE looks at the folder for new mail
MAX_ERRORS = 20
MAX_SEARCH_DEPTH = 50  # NOT/OR/parentheses nested deeper: BAD (a deep one used to raise RecursionError)
MAX_FOLDER_BYTES = 255  # one file name of the file system; longer: NO [LIMIT]
SYSTEM_ORDER = ["\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft"]
BASE_CAPS = "IMAP4rev1 LITERAL+ SASL-IR IDLE UIDPLUS MOVE SPECIAL-USE UNSELECT NAMESPACE ID SORT THREAD=ORDEREDSUBJECT THREAD=REFERENCES ENABLE UTF8=ACCEPT CREATE-SPECIAL-USE CONDSTORE QRESYNC"
AUTH_CAPS = " QUOTA QUOTA=RES-STORAGE"  # after the login (RFC 9208)
_SYSTEM_BY_LOWER = {f.lower(): f for f in SYSTEM_FLAGS}
_MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]

Emit = Callable[..., None]


class Bad(Exception):
    """Answer the command with BAD (syntax)."""


class No(Exception):
    """Answer the command with NO (a valid command that cannot be done)."""


def imap_date(ts: float) -> str:
    """INTERNALDATE: "dd-Mon-yyyy hh:mm:ss +zzzz" (RFC 3501 9 date-time), in UTC."""
    t = time.gmtime(ts)
    return f"{t.tm_mday:02d}-{_MONTHS[t.tm_mon - 1]}-{t.tm_year:04d} {t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} +0000"


def parse_date(text: str) -> tuple[int, int, int]:
    """SEARCH date (RFC 3501 9 date: d-Mon-yyyy) -> (y, m, d)."""
    m = re.match(r"^(\d{1,2})-([A-Za-z]{3})-(\d{4})$", text)
    if not m or m.group(2).capitalize() not in _MONTHS:
        raise Bad(f"bad date {text[:30]!r}")
    return int(m.group(3)), _MONTHS.index(m.group(2).capitalize()) + 1, int(m.group(1))


def parse_datetime(text: str) -> float:
    """APPEND date-time "dd-Mon-yyyy hh:mm:ss +zzzz" -> epoch seconds."""
    m = re.match(r"^\s?(\d{1,2})-([A-Za-z]{3})-(\d{4}) (\d\d):(\d\d):(\d\d) ([+-])(\d\d)(\d\d)$", text)
    if not m or m.group(2).capitalize() not in _MONTHS:
        raise Bad("bad date-time")
    d, mon, y, hh, mm, ss, sign, zh, zm = m.groups()
    base = calendar.timegm((int(y), _MONTHS.index(mon.capitalize()) + 1, int(d), int(hh), int(mm), int(ss)))
    offset = (int(zh) * 3600 + int(zm) * 60) * (1 if sign == "+" else -1)
    return float(base - offset)


def _flag_list(flags: frozenset[str] | set[str], recent: bool = False) -> str:
    """System flags in a fixed order, then \\Recent, then keywords."""
    items = [f for f in SYSTEM_ORDER if f in flags]
    if recent:
        items.append("\\Recent")
    items += sorted(f for f in flags if not f.startswith("\\"))
    return "(" + " ".join(items) + ")"


@dataclass
class _Selected:
    name: str
    folder: Folder
    readonly: bool
    uids: list[int]  # sequence number - 1 -> uid
    infos: dict[int, MessageInfo]
    recent: set[int]
    seen: Snapshot | None = None  # the folder's snapshot these lists were last brought up to
    shared: bool = False  # uids and infos are the snapshot's own lists: copy before changing them

    def own(self) -> None:
        """Copy the snapshot's lists before this session changes them (sessions on one
        folder share them while nothing changes: an idle session costs no copy)."""
        if self.shared:
            self.uids, self.infos, self.shared = list(self.uids), dict(self.infos), False


class ImapSession:
    """One IMAP conversation. Feed it bytes with receive(); it returns events."""

    def __init__(
        self,
        *,
        hostname: str,
        users: Users,
        throttle: AuthThrottle,
        peer: PeerInfo,
        tls_available: bool,
        emit: Emit,
        max_literal: int = 50_000_000,
        idle_timeout: float = IDLE_TIMEOUT,
        idle_poll: float = IDLE_POLL,
    ):
        self.hostname = hostname
        self.users = users
        self.throttle = throttle
        self.peer = peer
        self.tls_active = peer.tls
        self.tls_available = tls_available
        self.emit = emit
        self.idle_timeout = idle_timeout
        self.idle_poll = idle_poll
        # Before the login a literal carries a user name or a password: a few KB, as
        # Dovecot allows (RFC 7888 4 lets a server refuse more before authentication).
        self.max_literal = max_literal
        self.reader = CommandReader(min(max_literal, PREAUTH_MAX_LITERAL))
        self._preauth_literals = True
        self.state = "NOT_AUTHENTICATED"  # AUTHENTICATED, SELECTED, LOGOUT
        self.user: str | None = None
        self.mailbox: Mailbox | None = None
        self.sel: _Selected | None = None
        self._pending_tag: str | None = None  # tag of a LOGIN/AUTHENTICATE being verified
        self._reserved: tuple[str, str] | None = None  # (ip, user) of a throttle reservation not yet ended
        self.owed: Callable[[], None] | None = None  # blocking work the ended session still owes (the adapter runs it)
        self._pending_user = ""
        self._sasl_tag: str | None = None  # AUTHENTICATE waiting for a client response
        self._sasl_mech = "PLAIN"  # PLAIN, or LOGIN (user name, then password)
        self._sasl_user: str | None = None  # LOGIN: the user name, once sent
        self._idle_tag: str | None = None
        self._steps: Steps | None = None  # a command waiting for FileWork
        self._steps_tag: str | None = None  # its tag (None: an IDLE poll)
        self._errors = 0
        self._closed = False
        self._search_index = False
        self.utf8 = False  # ENABLE UTF8=ACCEPT (RFC 6855): folder names in UTF-8
        self.condstore = False  # RFC 7162 3.1: a CONDSTORE enabling command was given
        self.qresync = False  # ENABLE QRESYNC (RFC 7162 3.2.3): VANISHED instead of EXPUNGE
        self._search_modseq = False  # the SEARCH being parsed has a MODSEQ key

    # -- adapter interface
    @property
    def authenticated(self) -> bool:
        return self.state != "NOT_AUTHENTICATED"

    @property
    def poll_interval(self) -> float | None:
        return self.idle_poll if self._idle_tag is not None else None

    @property
    def watch_paths(self) -> tuple[str, ...] | None:
        """The directories whose changes the adapter should wake us for (inotify, see
        kanmon.store.watch): the selected folder's new/ and cur/ while in IDLE."""
        if self._idle_tag is None or self.sel is None:
            return None
        p = self.sel.folder.path
        return (str(p / "new"), str(p / "cur"))

    def start(self) -> list[Event]:
        return [Send(f"* OK [CAPABILITY {self.capabilities()}] {self.hostname} IMAP4rev1 ready\r\n".encode())]

    def receive(self, data: bytes) -> list[Event]:
        if self._closed:
            return []
        self.reader.feed(data)
        return self._process()

    def tls_started(self) -> list[Event]:
        self.tls_active = True
        self.reader.clear()  # CVE-2011-0411
        return []

    def auth_result(self, ok: bool | None) -> list[Event]:
        """ok None: the credentials could not be checked (accounts unreadable): a
        temporary NO [UNAVAILABLE] (RFC 5530), not counted as a failed login."""
        tag, user = self._pending_tag, self._pending_user
        self._pending_tag = None
        assert tag is not None
        if ok is None:
            out = self._run(tag, self._login_unavailable(tag, user))
        else:
            out = self._run(tag, self._login_ok(tag, user) if ok else self._login_failed(tag, user))
        if not self._closed and self._steps is None:
            out += self._process()
        return out

    def file_done(self, result: Any, error: BaseException | None = None) -> list[Event]:
        """The FileWork we asked for returned result (or raised error): go on with the
        command that waited for it, then with the commands pipelined behind it."""
        steps, tag = self._steps, self._steps_tag
        assert steps is not None
        self._steps = self._steps_tag = None
        out = self._run(tag, steps, result, error)
        if not self._closed and self._steps is None:
            out += self._process()
        return out

    def poll(self) -> list[Event]:
        if self._idle_tag is None or self.sel is None or self._steps is not None:
            return []
        return self._run(None, self._idle_poll())

    def _idle_poll(self) -> Steps:
        return [Send(b"".join((yield from self._refresh(allow_expunge=True))))]

    def timed_out(self) -> list[Event]:
        self._closed = True
        return [Send(b"* BYE autologout; idle for too long\r\n"), Close()]

    def connection_lost(self) -> None:
        self._closed = True
        self.sel = None
        if self._reserved is not None:  # gone while its password was verified: give the attempt back
            self.owed = partial(self.throttle.release, *self._reserved)
            self._reserved = None
        if self._steps is not None:  # the FileWork may still finish; nobody waits for it
            self._steps.close()
            self._steps = None

    # -- capabilities
    def capabilities(self) -> str:
        caps = BASE_CAPS
        if self.state == "NOT_AUTHENTICATED":
            if self.tls_active:
                caps += " AUTH=PLAIN AUTH=LOGIN"
            else:
                if self.tls_available:
                    caps += " STARTTLS"
                caps += " LOGINDISABLED"
        if self.state != "NOT_AUTHENTICATED":
            caps += AUTH_CAPS
        return caps

    # -- framing
    def _process(self) -> list[Event]:
        out: list[Event] = []
        while not self._closed and self._pending_tag is None and self._steps is None:
            if self._preauth_literals and self.authenticated:
                self._preauth_literals = False  # logged in: literals up to max_literal (APPEND)
                self.reader.max_literal = self.max_literal
            frame = self.reader.next()
            if frame is None:
                break
            if frame.kind == "continue":
                out.append(Send(b"+ Ready for literal data\r\n"))
                continue
            if frame.kind == "line_too_long":
                self._closed = True
                out += [Send(b"* BYE line too long\r\n"), Close()]
                break
            if frame.kind == "fatal":
                self._closed = True
                m = re.match(rb"[\x21-\x7e]{1,64}(?= )", frame.data)
                if m:  # the command's refusal first, then the end of the session
                    out.append(Send(m.group(0) + f" NO [TOOBIG] literal of {frame.size} octets is too large\r\n".encode()))
                out += [Send(b"* BYE literal too large\r\n"), Close()]
                break
            if frame.kind == "too_big":
                m = re.match(rb"[\x21-\x7e]{1,64}(?= )", frame.data)
                tag = m.group(0).decode("ascii") if m else "*"
                out.append(Send(f"{tag} NO [TOOBIG] literal of {frame.size} octets is too large\r\n".encode()))
                out += self._error()
                continue
            events = self._frame(frame.data)
            if self._closed and not any(isinstance(e, Close) for e in events):
                events.append(Close())  # a command that ended the session closes it
            out += events
            if any(isinstance(e, StartTls) for e in events):
                self.reader.clear()  # CVE-2011-0411: anything after STARTTLS is dropped
                break
        return out

    def _error(self) -> list[Event]:
        self._errors += 1
        if self._errors >= MAX_ERRORS:
            self._closed = True
            return [Send(b"* BYE too many errors\r\n"), Close()]
        return []

    def _frame(self, data: bytes) -> list[Event]:
        line = data[:-2] if data.endswith(b"\r\n") else data.rstrip(b"\n")
        if self._idle_tag is not None:
            return self._idle_input(line)
        if self._sasl_tag is not None:
            tag, self._sasl_tag = self._sasl_tag, None
            result = self._sasl_response(tag, line.strip().decode("ascii", "replace"))
            return self._run(tag, result) if isinstance(result, Generator) else result
        if not line.strip():
            return []
        try:
            tokens = tokenize(line)
        except ParseError as e:
            m = re.match(rb"[\x21-\x7e]{1,64}(?= )", line)
            tag = m.group(0).decode("ascii") if m else "*"
            return [Send(f"{tag} BAD {e}\r\n".encode()), *self._error()]
        tag = tokens[0] if tokens and isinstance(tokens[0], str) and not isinstance(tokens[0], QStr) else ""
        if not re.match(r"^[\x21-\x7e]{1,64}$", tag) or "+" in tag:
            return [Send(b"* BAD invalid tag\r\n"), *self._error()]
        if len(tokens) < 2 or not isinstance(tokens[1], str) or isinstance(tokens[1], QStr):
            return [Send(f"{tag} BAD missing command\r\n".encode()), *self._error()]
        cmd = tokens[1].upper()
        args = tokens[2:]
        uid = False
        if cmd == "UID":
            if not args or not isinstance(args[0], str):
                return [Send(f"{tag} BAD UID needs a command\r\n".encode()), *self._error()]
            uid = True
            cmd = args[0].upper()
            args = args[1:]
            if cmd not in _UID_COMMANDS:
                return [Send(f"{tag} BAD UID {cmd[:20]} is not a command\r\n".encode()), *self._error()]
        handler = getattr(self, f"_cmd_{cmd.lower()}", None) if re.match(r"^[A-Z]+$", cmd) else None
        if handler is None:
            return [Send(f"{tag} BAD unknown command\r\n".encode()), *self._error()]
        allowed = _STATES.get(cmd, ("NOT_AUTHENTICATED", "AUTHENTICATED", "SELECTED"))
        if self.state not in allowed:
            return [Send(f"{tag} BAD {cmd} is not allowed now\r\n".encode()), *self._error()]
        try:
            result = handler(tag, args, uid) if cmd in _UID_COMMANDS else handler(tag, args)
        except (Bad, ParseError, No, MaildirError, OSError) as e:
            return self._failed(tag, e)
        return self._run(tag, result) if isinstance(result, Generator) else result

    def _run(self, tag: str | None, steps: Steps, result: Any = None, error: BaseException | None = None) -> list[Event]:
        """Take a command on to the FileWork it waits for (then hold it in self._steps)
        or to its end. tag None (an IDLE poll): a failure ends the connection."""
        try:
            out, done = advance(steps, result, error)
        except (Bad, ParseError, No, MaildirError, OSError) as e:
            if tag is None:
                raise
            out, done = self._failed(tag, e), True
        if not done:
            self._steps, self._steps_tag = steps, tag
        elif self._closed and not any(isinstance(e, Close) for e in out):
            out.append(Close())  # e.g. BYE because the selected folder was deleted
        return out

    def _failed(self, tag: str, e: Exception) -> list[Event]:
        """The tagged answer to a command that raised e."""
        if isinstance(e, (Bad, ParseError)):
            return [Send(f"{tag} BAD {e}\r\n".encode()), *self._error()]
        if isinstance(e, No):
            return [Send(f"{tag} NO {e}\r\n".encode())]
        if isinstance(e, OSError) and e.errno == errno.ENAMETOOLONG:
            return [Send(f"{tag} NO [LIMIT] name too long\r\n".encode())]
        self.emit(f"imap {self.user or '-'} store error: {e}")
        return [Send(f"{tag} NO [SERVERBUG] the mailbox cannot be accessed now\r\n".encode())]

    # -- any state (RFC 3501 6.1)
    def _cmd_capability(self, tag: str, args: list) -> list[Event]:
        return [Send(f"* CAPABILITY {self.capabilities()}\r\n{tag} OK CAPABILITY completed\r\n".encode())]

    def _cmd_noop(self, tag: str, args: list) -> Steps:
        updates = (yield from self._refresh(allow_expunge=True)) if self.sel else []
        return [Send(b"".join(updates) + f"{tag} OK NOOP completed\r\n".encode())]

    _cmd_check = _cmd_noop

    def _cmd_logout(self, tag: str, args: list) -> list[Event]:
        self._closed = True
        self.state = "LOGOUT"
        return [Send(f"* BYE {self.hostname} logging out\r\n{tag} OK LOGOUT completed\r\n".encode()), Close()]

    def _cmd_id(self, tag: str, args: list) -> list[Event]:
        return [Send(f'* ID ("name" "kanmon")\r\n{tag} OK ID completed\r\n'.encode())]

    # -- not authenticated (RFC 3501 6.2)
    def _cmd_starttls(self, tag: str, args: list) -> list[Event]:
        if self.tls_active:
            raise Bad("TLS is already active")
        if not self.tls_available:
            raise No("TLS is not available")
        return [Send(f"{tag} OK Begin TLS negotiation now\r\n".encode()), StartTls()]

    def _cmd_login(self, tag: str, args: list) -> list[Event] | Steps:
        if not self.tls_active:
            return [Send(f"{tag} NO [PRIVACYREQUIRED] LOGIN is disabled until STARTTLS\r\n".encode())]
        if len(args) != 2:
            raise Bad("LOGIN needs a user name and a password")
        return self._check(tag, astring(args[0]), astring(args[1]))

    def _cmd_authenticate(self, tag: str, args: list) -> list[Event] | Steps:
        if not self.tls_active:
            return [Send(f"{tag} NO [PRIVACYREQUIRED] AUTHENTICATE is disabled until STARTTLS\r\n".encode())]
        if not args or not isinstance(args[0], str) or len(args) > 2:
            raise Bad("AUTHENTICATE needs a mechanism")
        mech = args[0].upper()
        if mech not in ("PLAIN", "LOGIN"):
            raise No("unsupported mechanism (PLAIN or LOGIN)")
        self._sasl_mech, self._sasl_user = mech, None
        if len(args) == 2:  # RFC 4959 SASL-IR
            return self._sasl_response(tag, astring(args[1]))
        self._sasl_tag = tag
        # LOGIN (draft-murchison-sasl-login): the server asks "Username:", then "Password:".
        return [Send(b"+ VXNlcm5hbWU6\r\n" if mech == "LOGIN" else b"+ \r\n")]

    def _sasl_response(self, tag: str, text: str) -> list[Event] | Steps:
        if text == "*":
            self._sasl_user = None
            return [Send(f"{tag} BAD AUTHENTICATE cancelled\r\n".encode())]
        if self._sasl_mech == "LOGIN":
            return self._sasl_login(tag, text)
        try:
            decoded = base64.b64decode(text if text != "=" else "", validate=True).decode("utf-8")
            authzid, authcid, password = decoded.split("\0")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            return [Send(f"{tag} BAD malformed AUTHENTICATE PLAIN response\r\n".encode()), *self._error()]
        if authzid and authzid.lower() != authcid.lower():
            return self._login_failed(tag, authcid, reserved=False)
        return self._check(tag, authcid, password)

    def _sasl_login(self, tag: str, text: str) -> list[Event] | Steps:
        """One step of AUTHENTICATE LOGIN: the user name, then the password (base64 each)."""
        try:
            value = base64.b64decode(text if text != "=" else "", validate=True).decode("utf-8")
            if "\0" in value:
                raise ValueError
        except (binascii.Error, UnicodeDecodeError, ValueError):
            self._sasl_user = None
            return [Send(f"{tag} BAD malformed AUTHENTICATE LOGIN response\r\n".encode()), *self._error()]
        if self._sasl_user is None:
            self._sasl_user = value
            self._sasl_tag = tag
            return [Send(b"+ UGFzc3dvcmQ6\r\n")]
        user, self._sasl_user = self._sasl_user, None
        return self._check(tag, user, value)

    # The throttle may count in the shared state (blocking on its disk): its calls are FileWork.
    # The attempt is reserved before the password is verified, so parallel logins count.
    def _check(self, tag: str, user: str, password: str) -> Steps:
        if (yield FileWork(self.throttle.reserve, (self.peer.ip, user))) > 0:
            return self._refuse_blocked(tag, user)
        self._reserved = (self.peer.ip, user)
        self._pending_tag = tag
        self._pending_user = user
        return [Verify(user, password)]

    def _login_failed(self, tag: str, user: str, reserved: bool = True) -> Steps:
        self._reserved = None  # ended by the file work below, which runs even if the client goes
        f = yield FileWork(self.throttle.failed, (self.peer.ip, user, reserved))
        self._failed_logins = getattr(self, "_failed_logins", 0) + 1
        self.emit(LoginFailed("imap", log_safe(user), "PLAIN", self.peer.ip, self._failed_logins,
                              f.key if f.blocked else ""))
        if f.blocked:
            self.emit(f"imap login blocked {f.key} after repeated failures")
            self._closed = True
            return [Delay(f.delay), Send(f"* BYE too many failed logins; try again later\r\n{tag} NO [UNAVAILABLE] blocked\r\n".encode()), Close()]
        return [Delay(f.delay), Send(f"{tag} NO [AUTHENTICATIONFAILED] Authentication failed\r\n".encode()), *self._error()]

    def _login_unavailable(self, tag: str, user: str) -> Steps:
        """The credentials could not be checked: the reserved attempt is given back."""
        self._reserved = None  # ended by the file work below, which runs even if the client goes
        yield FileWork(self.throttle.release, (self.peer.ip, user))
        self.emit(f"imap login of {log_safe(user)} ip={self.peer.ip}: accounts unavailable, answered NO [UNAVAILABLE]")
        return [Send(f"{tag} NO [UNAVAILABLE] authentication is temporarily unavailable\r\n".encode())]

    def _refuse_blocked(self, tag: str, user: str) -> list[Event]:
        self.emit(f"imap login refused (blocked) user={log_safe(user)} ip={self.peer.ip}")
        self._closed = True
        return [Send(f"* BYE too many failed logins; try again later\r\n{tag} NO [UNAVAILABLE] blocked\r\n".encode()), Close()]

    def _login_ok(self, tag: str, user: str) -> Steps:
        address = user.strip().lower()
        self._reserved = None  # ended by the file work below, which runs even if the client goes
        if not (yield FileWork(self.throttle.succeeded, (self.peer.ip, address))):
            return self._refuse_blocked(tag, user)  # blocked while it was verified: even a right password waits
        try:
            self.mailbox = yield FileWork(self.users.mailbox(address).ensure)
        except (MaildirError, OSError):
            return [Send(f"{tag} NO [UNAVAILABLE] the mailbox cannot be opened now\r\n".encode())]
        self.user = address
        self.state = "AUTHENTICATED"
        try:
            yield FileWork(self.users.record_login, (address, self.peer.ip))
        except Exception:  # noqa: BLE001 - a records hiccup must not refuse the login
            pass
        self.emit(f"imap login {address} ip={self.peer.ip} tls={'yes' if self.tls_active else 'no'}")
        return [Send(f"{tag} OK [CAPABILITY {self.capabilities()}] Logged in\r\n".encode())]

    # -- authenticated (RFC 3501 6.3)
    def _folder_name(self, value: object) -> str:
        name = astring(value)
        if self.utf8:
            # RFC 6855 3: the name is UTF-8; on disk it stays modified UTF-7 (as Dovecot
            # keeps it, and as other clients of the account see it)
            if "\ufffd" in name:
                raise Bad("folder name is not valid UTF-8")
            name = mutf7.encode(name)
        elif not name.isascii():
            # RFC 3501 5.1.3: names are 7-bit (modified UTF-7); RFC 6855 3: 8-bit ones
            # only after ENABLE UTF8=ACCEPT.
            raise Bad("folder names are 7-bit: use modified UTF-7 (RFC 3501 5.1.3)")
        if len(name) > MAX_FOLDER_BYTES:
            raise No(f"[LIMIT] folder name longer than {MAX_FOLDER_BYTES} bytes")
        try:
            return check_folder_name(name)
        except BadFolderName as e:
            if len(name) > MAX_FOLDER_NAME:
                raise No(f"[LIMIT] {e}") from None
            raise No(str(e)) from None

    def _name_out(self, name: str) -> bytes:
        """A folder name as the client reads it: UTF-8 once it enabled UTF8=ACCEPT (a
        name on disk that is not well-formed modified UTF-7 is sent as it is)."""
        if self.utf8:
            try:
                name = mutf7.decode(name)
            except ValueError:
                pass
            if not name.isascii() and name.isprintable() and len(name) < 1000:
                # RFC 6855 3: UTF-8 in a quoted string, once the client enabled it
                return b'"' + name.replace("\\", "\\\\").replace('"', '\\"').encode("utf-8", "surrogateescape") + b'"'
        return mime.iastring(name)

    def _cmd_namespace(self, tag: str, args: list) -> list[Event]:
        return [Send(f'* NAMESPACE (("" "{DELIMITER}")) NIL NIL\r\n{tag} OK NAMESPACE completed\r\n'.encode())]

    def _select_params(self, params: object) -> tuple | None:
        """SELECT/EXAMINE parameters (RFC 4466): (CONDSTORE) or (QRESYNC (uidvalidity
        modseq [known-uids [(seq-set uid-set)]])) (RFC 7162 3.1.8, 3.2.5); returns the
        QRESYNC values or None."""
        if not isinstance(params, list) or not params:
            raise Bad("bad SELECT parameters")
        qresync = None
        pos = 0
        while pos < len(params):
            p = params[pos]
            name = p.upper() if isinstance(p, str) and not isinstance(p, (QStr, Literal)) else ""
            if name == "CONDSTORE":
                self.condstore = True
                pos += 1
            elif name == "QRESYNC":
                if not self.qresync:
                    raise Bad("QRESYNC is not enabled (ENABLE QRESYNC first)")
                v = params[pos + 1] if pos + 1 < len(params) else None
                if not isinstance(v, list) or not 2 <= len(v) <= 4:
                    raise Bad("QRESYNC needs (uidvalidity modseq [known-uids [seq-match-data]])")
                validity, modseq = _number(v[0], "uidvalidity"), _number(v[1], "mod-sequence")
                known = parse_sequence_set(v[2]) if len(v) >= 3 and not isinstance(v[2], list) else None
                if len(v) >= 3 and isinstance(v[2], list) or len(v) == 4 and (
                        not isinstance(v[3], list) or len(v[3]) != 2):
                    raise Bad("bad QRESYNC known-uids or seq-match-data")
                if len(v) == 4:  # validated; the tombstones make it unnecessary here
                    parse_sequence_set(v[3][0])
                    parse_sequence_set(v[3][1])
                if validity == 0 or modseq == 0:
                    raise Bad("QRESYNC uidvalidity and mod-sequence are non-zero")
                qresync = (validity, modseq, known)
                pos += 2
            else:
                raise Bad("unknown SELECT parameter")
        return qresync

    def _select(self, tag: str, args: list, readonly: bool) -> Steps:
        if len(args) not in (1, 2):
            raise Bad("SELECT needs a mailbox name")
        assert self.mailbox is not None
        qresync = self._select_params(args[1]) if len(args) == 2 else None
        closed = ["* OK [CLOSED] Previous mailbox closed"] if self.sel is not None else []  # RFC 7162 3.2.11
        self.sel = None
        self.state = "AUTHENTICATED"
        name = self._folder_name(args[0])
        try:
            folder = yield FileWork(self.mailbox.folder, (name,))
        except FolderNotFound:
            raise No("[NONEXISTENT] no such mailbox") from None
        snap = yield FileWork(folder.snapshot, (True,))
        msgs = snap.messages
        keywords = yield FileWork(folder.keyword_names)
        recent, snap.recent = snap.recent, set()  # RFC 3501 2.3.2: \\Recent to one session only
        sel = _Selected(folder.name, folder, readonly, snap.uids, snap.by_uid, recent, snap, shared=True)
        self.sel = sel
        self.state = "SELECTED"
        out = [
            *closed,
            *self._flags_announcement(keywords, readonly),
            f"* {len(msgs)} EXISTS",
            f"* {len(sel.recent)} RECENT",
        ]
        first_unseen = next((i + 1 for i, m in enumerate(msgs) if "\\Seen" not in m.flags), None)
        if first_unseen:
            out.append(f"* OK [UNSEEN {first_unseen}] First unseen")
        out += [f"* OK [UIDVALIDITY {folder.uidvalidity}] UIDs valid", f"* OK [UIDNEXT {folder.uidnext}] Predicted next UID"]
        # RFC 7162 3.1.2.1: HIGHESTMODSEQ in every SELECT of a folder that keeps them
        if snap.highest_modseq:
            out.append(f"* OK [HIGHESTMODSEQ {snap.highest_modseq}] Highest")
        else:
            out.append("* OK [NOMODSEQ] Sorry, this mailbox cannot keep mod-sequences now")
        lines = [("\r\n".join(out) + "\r\n").encode()]
        if qresync is not None and qresync[0] == folder.uidvalidity and snap.highest_modseq:
            lines += yield from self._resync(qresync[1], qresync[2], True)
        mode = "READ-ONLY" if readonly else "READ-WRITE"
        verb = "EXAMINE" if readonly else "SELECT"
        return [Send(b"".join(lines) + f"{tag} OK [{mode}] {verb} completed\r\n".encode())]

    def _resync(self, since: int, uid_ranges: list | None, earlier: bool) -> Generator[FileWork, Any, list[bytes]]:
        """RFC 7162 3.2.5/3.2.6: VANISHED (EARLIER) for the UIDs (within uid_ranges, all
        when None) expunged after mod-sequence since, then FETCH (UID FLAGS MODSEQ) for
        the messages there changed after it."""
        sel = self.sel
        assert sel is not None
        gone = yield FileWork(sel.folder.vanished_since, (since,))
        largest = sel.uids[-1] if sel.uids else 0
        out: list[bytes] = []
        vanished = _vanished_set(gone, sel.uids, sel.folder.uidnext, uid_ranges)
        if vanished:
            out.append(f"* VANISHED {'(EARLIER) ' if earlier else ''}{vanished}\r\n".encode())
        for seq, u in enumerate(sel.uids, 1):
            info = sel.infos[u]
            if info.modseq > since and (uid_ranges is None or in_set(uid_ranges, u, largest)):
                out.append(self._flags_fetch(seq, u, info, True))
        return out

    def _cmd_select(self, tag: str, args: list) -> Steps:
        return self._select(tag, args, readonly=False)

    def _cmd_examine(self, tag: str, args: list) -> Steps:
        return self._select(tag, args, readonly=True)

    def _cmd_create(self, tag: str, args: list) -> Steps:
        if len(args) not in (1, 2):
            raise Bad("CREATE needs a mailbox name")
        assert self.mailbox is not None
        use = None
        if len(args) == 2:  # RFC 6154 3: CREATE name (USE (\Attribute))
            opts = args[1]
            if (not isinstance(opts, list) or len(opts) != 2 or not isinstance(opts[0], str)
                    or opts[0].upper() != "USE" or not isinstance(opts[1], list) or not opts[1]):
                raise Bad("CREATE takes (USE (attributes))")
            if len(opts[1]) != 1:
                raise No("[USEATTR] one special use per folder")
            use = next((u for u in CREATABLE_USES if u.lower() == str(opts[1][0]).lower()), None)
            if use is None:
                raise No("[USEATTR] that special use is not supported")
        name = astring(args[0]).rstrip(DELIMITER)  # RFC 3501 6.3.3: a trailing delimiter is a hint
        name = self._folder_name(name)
        try:
            if use is None:
                yield FileWork(self.mailbox.create_folder, (name,))
            else:
                yield FileWork(self.mailbox.create_special_folder, (name, use))
        except FolderExists:
            raise No("[ALREADYEXISTS] mailbox already exists") from None
        except BadFolderName:
            raise
        except MaildirError as e:
            raise No(f"[USEATTR] {e}") from None
        return [Send(f"{tag} OK CREATE completed\r\n".encode())]

    def _cmd_delete(self, tag: str, args: list) -> Steps:
        if len(args) != 1:
            raise Bad("DELETE needs a mailbox name")
        assert self.mailbox is not None
        name = self._folder_name(args[0])
        if name == "INBOX":
            raise No("INBOX cannot be deleted")
        if self.sel and self.sel.name == name:
            self.sel = None
            self.state = "AUTHENTICATED"
        try:
            yield FileWork(self.mailbox.delete_folder, (name,))
        except FolderNotFound:
            raise No("[NONEXISTENT] no such mailbox") from None
        return [Send(f"{tag} OK DELETE completed\r\n".encode())]

    def _cmd_rename(self, tag: str, args: list) -> Steps:
        if len(args) != 2:
            raise Bad("RENAME needs two mailbox names")
        assert self.mailbox is not None
        old, new = self._folder_name(args[0]), self._folder_name(args[1])
        try:
            yield FileWork(self.mailbox.rename_folder, (old, new))
        except FolderNotFound:
            raise No("[NONEXISTENT] no such mailbox") from None
        except FolderExists:
            raise No("[ALREADYEXISTS] target mailbox exists") from None
        except MaildirError as e:
            raise No(str(e)) from None
        return [Send(f"{tag} OK RENAME completed\r\n".encode())]

    def _cmd_subscribe(self, tag: str, args: list) -> Steps:
        if len(args) != 1:
            raise Bad("SUBSCRIBE needs a mailbox name")
        assert self.mailbox is not None
        yield FileWork(self.mailbox.subscribe, (self._folder_name(args[0]),))
        return [Send(f"{tag} OK SUBSCRIBE completed\r\n".encode())]

    def _cmd_unsubscribe(self, tag: str, args: list) -> Steps:
        if len(args) != 1:
            raise Bad("UNSUBSCRIBE needs a mailbox name")
        assert self.mailbox is not None
        yield FileWork(self.mailbox.unsubscribe, (astring(args[0]),))
        return [Send(f"{tag} OK UNSUBSCRIBE completed\r\n".encode())]

    def _list(self, tag: str, args: list, verb: str) -> Steps:
        if len(args) != 2:
            raise Bad(f"{verb} needs a reference and a pattern")
        assert self.mailbox is not None
        ref, pattern = astring(args[0]), astring(args[1])
        if self.utf8:
            ref, pattern = mutf7.encode(ref), mutf7.encode(pattern)
        if pattern == "":
            # RFC 3501 6.3.8: the hierarchy delimiter and root name
            return [Send(f'* {verb} (\\Noselect) "{DELIMITER}" ""\r\n{tag} OK {verb} completed\r\n'.encode())]
        full = ref + pattern if ref and not ref.endswith(DELIMITER) and not pattern.startswith(DELIMITER) else ref + pattern
        rx = _pattern_regex(full)
        names = yield FileWork(self.mailbox.folder_names)
        uses = yield FileWork(self.mailbox.special_uses)
        existing = set(names)
        if verb == "LSUB":
            subs = yield FileWork(self.mailbox.subscriptions)
            candidates = [n for n in subs] + (["INBOX"] if "INBOX" not in subs else [])
            # RFC 3501 6.3.9: with "%" last, an unsubscribed level above a subscribed
            # name is returned, \Noselect
            levels = _missing_levels(candidates) if full.endswith("%") else set()
        else:
            candidates = names
            # RFC 3501 6.3.8, 6.3.4: a level that is no folder itself (Top after DELETE
            # Top, while Top.Sub is there; or made by another program) is \Noselect
            levels = _missing_levels(names)
        lines = []
        rows = candidates + sorted(levels)
        if verb == "LIST":
            rows.sort(key=lambda n: (n != "INBOX", n))  # each level before what it holds
        for name in rows:
            if name == "INBOX":
                if not re.match(rx.pattern, name, re.I):
                    continue
            elif not rx.match(name):
                continue
            attrs = []
            if name in levels:
                attrs.append("\\Noselect \\HasChildren" if verb == "LIST" else "\\Noselect")
            elif name not in existing:
                attrs.append("\\NonExistent" if verb == "LIST" else "\\Noselect")
            elif any(other.startswith(name + DELIMITER) for other in existing):
                attrs.append("\\HasChildren")
            else:
                attrs.append("\\HasNoChildren")
            if name in uses and name not in levels:
                attrs.append(uses[name])
            lines.append(f'* {verb} ({" ".join(attrs)}) "{DELIMITER}" '.encode() + self._name_out(name) + b"\r\n")
        return [Send(b"".join(lines) + f"{tag} OK {verb} completed\r\n".encode())]

    def _cmd_list(self, tag: str, args: list) -> Steps:
        return self._list(tag, args, "LIST")

    def _cmd_lsub(self, tag: str, args: list) -> Steps:
        return self._list(tag, args, "LSUB")

    def _cmd_status(self, tag: str, args: list) -> Steps:
        if len(args) != 2 or not isinstance(args[1], list) or not args[1]:
            raise Bad("STATUS needs a mailbox and a list of items")
        assert self.mailbox is not None
        name = self._folder_name(args[0])
        try:
            folder = yield FileWork(self.mailbox.folder, (name,))
        except FolderNotFound:
            raise No("[NONEXISTENT] no such mailbox") from None
        snap = yield FileWork(folder.snapshot, (False,))
        msgs = snap.messages
        items = []
        for item in args[1]:
            key = str(item).upper()
            if key == "MESSAGES":
                items.append(f"MESSAGES {len(msgs)}")
            elif key == "RECENT":
                items.append(f"RECENT {sum(1 for m in msgs if m.subdir == 'new')}")
            elif key == "UIDNEXT":
                items.append(f"UIDNEXT {folder.uidnext}")
            elif key == "UIDVALIDITY":
                items.append(f"UIDVALIDITY {folder.uidvalidity}")
            elif key == "HIGHESTMODSEQ":  # RFC 7162 3.1.6 (0: the folder keeps none now)
                self.condstore = True
                items.append(f"HIGHESTMODSEQ {snap.highest_modseq}")
            elif key == "UNSEEN":
                unseen = sum(1 for m in msgs if "\\Seen" not in m.flags)
                items.append(f"UNSEEN {unseen}")
            elif key == "DELETED":  # RFC 9208 4.2
                deleted = sum(1 for m in msgs if "\\Deleted" in m.flags)
                items.append(f"DELETED {deleted}")
            elif key == "DELETED-STORAGE":  # RFC 9208 4.2: KiB an EXPUNGE would free
                doomed = [m for m in msgs if "\\Deleted" in m.flags]
                used = yield FileWork(_stored_bytes, (folder, doomed))
                items.append(f"DELETED-STORAGE {_kib(used)}")
            else:
                raise Bad(f"unknown STATUS item {key[:30]}")
        line = b"* STATUS " + self._name_out(name) + f" ({' '.join(items)})\r\n".encode()
        return [Send(line + f"{tag} OK STATUS completed\r\n".encode())]

    def _cmd_enable(self, tag: str, args: list) -> list[Event]:
        """RFC 5161: UTF8=ACCEPT (RFC 6855), CONDSTORE and QRESYNC (RFC 7162) can be
        enabled; anything else is ignored. The answer names what this command enabled."""
        if not args or not all(isinstance(a, str) and not isinstance(a, QStr) for a in args):
            raise Bad("ENABLE needs capability names")
        enabled = ""
        asked = {a.upper() for a in args}
        if "UTF8=ACCEPT" in asked and not self.utf8:
            self.utf8 = True
            enabled = " UTF8=ACCEPT"
        if "CONDSTORE" in asked and not self.condstore:
            enabled += " CONDSTORE"
        if "QRESYNC" in asked and not self.qresync:  # RFC 7162 3.2.3: implies CONDSTORE
            self.qresync = True
            enabled += " QRESYNC"
        self.condstore = self.condstore or "CONDSTORE" in asked or "QRESYNC" in asked
        return [Send(f"* ENABLED{enabled}\r\n{tag} OK ENABLE completed\r\n".encode())]

    # -- QUOTA (RFC 9208): one root, "", per user: the domain's quota on all folders
    def _quota_line(self, limit: int) -> Steps:
        assert self.mailbox is not None
        used = (yield FileWork(self.mailbox.usage))[1]
        return f'* QUOTA "" (STORAGE {_kib(used)} {limit // 1024})\r\n'.encode()

    def _cmd_getquotaroot(self, tag: str, args: list) -> Steps:
        if len(args) != 1:
            raise Bad("GETQUOTAROOT needs a mailbox name")
        assert self.mailbox is not None
        name = self._folder_name(args[0])
        try:
            yield FileWork(self.mailbox.folder, (name,))
        except FolderNotFound:
            raise No("[NONEXISTENT] no such mailbox") from None
        limit = self.users.quota(self.user or "")
        line = b"* QUOTAROOT " + self._name_out(name)
        if limit is None:
            return [Send(line + f"\r\n{tag} OK GETQUOTAROOT completed\r\n".encode())]
        quota = yield from self._quota_line(limit)
        return [Send(line + b' ""\r\n' + quota + f"{tag} OK GETQUOTAROOT completed\r\n".encode())]

    def _cmd_getquota(self, tag: str, args: list) -> Steps:
        if len(args) != 1:
            raise Bad("GETQUOTA needs a quota root")
        limit = self.users.quota(self.user or "")
        if astring(args[0]) != "" or limit is None:
            raise No("[NONEXISTENT] no such quota root")
        quota = yield from self._quota_line(limit)
        return [Send(quota + f"{tag} OK GETQUOTA completed\r\n".encode())]

    def _cmd_setquota(self, tag: str, args: list) -> list[Event]:
        # RFC 9208 4.1.3: only with QUOTASET, which is not offered: quotas are the administrator's
        return [Send(f"{tag} NO [NOPERM] quotas are set by the administrator\r\n".encode())]

    def _cmd_append(self, tag: str, args: list) -> Steps:
        if (len(args) >= 3 and isinstance(args[-2], str) and not isinstance(args[-2], QStr)
                and args[-2].upper() == "UTF8" and isinstance(args[-1], list) and len(args[-1]) == 2
                and args[-1][0] == "~" and isinstance(args[-1][1], Literal)):
            # RFC 6855 4: UTF8 (~{n}...) carries a message with UTF-8 header fields
            args = [*args[:-2], args[-1][1]]
        if len(args) < 2 or not isinstance(args[-1], Literal):
            raise Bad("APPEND needs a mailbox and a message literal")
        assert self.mailbox is not None
        name = self._folder_name(args[0])
        flags: set[str] = set()
        when: float | None = None
        for extra in args[1:-1]:
            if isinstance(extra, list):
                flags = self._flags(extra)
            elif isinstance(extra, str):
                when = parse_datetime(extra)
            else:
                raise Bad("bad APPEND arguments")
        data = args[-1].data
        if not data:
            raise No("empty message")
        try:
            folder = yield FileWork(self.mailbox.folder, (name,))
        except FolderNotFound:
            raise No("[TRYCREATE] no such mailbox") from None
        quota = self.users.quota(self.user or "")
        if quota is not None and (yield FileWork(self.mailbox.usage))[1] + len(data) > quota:
            raise No("[OVERQUOTA] the mailbox is over its quota")  # RFC 5530 3
        info = yield FileWork(folder.append, (data, flags & SYSTEM_FLAGS, when, flags - SYSTEM_FLAGS))
        out = []
        if self.sel and self.sel.folder is folder:
            out = yield from self._refresh(allow_expunge=True)
        return [Send(b"".join(out) + f"{tag} OK [APPENDUID {folder.uidvalidity} {info.uid}] APPEND completed\r\n".encode())]

    def _cmd_idle(self, tag: str, args: list) -> Steps:
        # RFC 2177
        updates = (yield from self._refresh(allow_expunge=True)) if self.sel else []
        self._idle_tag = tag
        return [Send(b"+ idling\r\n" + b"".join(updates))]

    def _idle_input(self, line: bytes) -> list[Event]:
        tag, self._idle_tag = self._idle_tag, None
        assert tag is not None
        if line.strip().upper() != b"DONE":
            return [Send(f"{tag} BAD expected DONE\r\n".encode()), *self._error()]
        return self._run(tag, self._idle_done(tag))

    def _idle_done(self, tag: str) -> Steps:
        updates = (yield from self._refresh(allow_expunge=True)) if self.sel else []
        return [Send(b"".join(updates) + f"{tag} OK IDLE terminated\r\n".encode())]

    # -- selected (RFC 3501 6.4)
    def _refresh(self, allow_expunge: bool) -> Generator[FileWork, Any, list[bytes]]:
        """Untagged EXPUNGE/EXISTS/RECENT/FETCH for what changed since we last looked."""
        sel = self.sel
        assert sel is not None
        try:
            snap = yield FileWork(sel.folder.snapshot, (True,))
        except FolderNotFound:
            self._closed = True
            return [b"* BYE the selected mailbox was deleted\r\n"]
        if snap is sel.seen:
            return []  # nothing changed in the folder since we last looked
        sel.own()
        msgs = snap.messages
        now = snap.by_uid
        fresh, snap.recent = snap.recent, set()
        out: list[bytes] = []
        if allow_expunge:
            out += self._expunged({u for u in sel.uids if u not in now})
        condstore = self.condstore
        for seq, uid in enumerate(sel.uids, 1):
            m = now.get(uid)
            old = sel.infos[uid]
            if m is not None and (m.flags != old.flags or m.extra != old.extra or (condstore and m.modseq > old.modseq)):
                out.append(self._flags_fetch(seq, uid, m, True))
            if m is not None:
                sel.infos[uid] = m
        known = set(sel.uids)
        added = [m for m in msgs if m.uid not in known and m.uid > (sel.uids[-1] if sel.uids else 0)]
        if added:
            for m in added:
                sel.uids.append(m.uid)
                sel.infos[m.uid] = m
                if m.uid in fresh:
                    sel.recent.add(m.uid)
            out.append(f"* {len(sel.uids)} EXISTS\r\n* {len(sel.recent)} RECENT\r\n".encode())
        if allow_expunge or all(u in now for u in sel.uids):
            sel.seen = snap  # everything of it is reported (an expunge held back keeps us comparing)
            if sel.uids == snap.uids:  # the same as the snapshot: share its lists again
                sel.uids, sel.infos, sel.shared = snap.uids, snap.by_uid, True
        return out

    def _expunged(self, gone: set[int]) -> list[bytes]:
        """Take the UIDs gone out of the session's lists; the responses that say so:
        EXPUNGE per message (highest first), or one VANISHED once QRESYNC is enabled."""
        sel = self.sel
        assert sel is not None
        if not gone:
            return []
        sel.own()
        out = []
        for seq in range(len(sel.uids), 0, -1):
            uid = sel.uids[seq - 1]
            if uid in gone:
                if not self.qresync:
                    out.append(f"* {seq} EXPUNGE\r\n".encode())
                del sel.uids[seq - 1]
                sel.infos.pop(uid, None)
                sel.recent.discard(uid)
        if self.qresync:  # RFC 7162 3.2.10
            out.append(f"* VANISHED {_uid_set(sorted(gone))}\r\n".encode())
        return out

    def _flags_fetch(self, seq: int, uid: int, info: MessageInfo, with_uid: bool) -> bytes:
        """An untagged FETCH of a message's flags (with MODSEQ once CONDSTORE is on)."""
        sel = self.sel
        assert sel is not None
        text = f"* {seq} FETCH ({f'UID {uid} ' if with_uid else ''}FLAGS {_flag_list(self._all_flags(info), uid in sel.recent)}"
        if self.condstore:
            text += f" MODSEQ ({info.modseq})"
        return (text + ")\r\n").encode()

    @staticmethod
    def _flags_announcement(keywords: list[str], readonly: bool = False) -> list[str]:
        """* FLAGS and PERMANENTFLAGS (RFC 3501 7.2.6, 7.1): keywords may be created (\\*)."""
        names = " ".join([*SYSTEM_ORDER, *keywords])
        perm = "* OK [PERMANENTFLAGS ()] Read-only" if readonly else f"* OK [PERMANENTFLAGS ({names} \\*)] Flags permitted"
        return [f"* FLAGS ({names})", perm]

    def _all_flags(self, info: MessageInfo) -> frozenset[str]:
        """System flags and keywords of a message (from the folder's last scan: no I/O)."""
        assert self.sel is not None
        return info.flags | self.sel.folder.keywords_of(info)

    def _messages(self, spec: object, uid: bool) -> list[tuple[int, int]]:
        """[(seq, uid)] for a sequence set (RFC 3501 9) or UID set (6.4.8)."""
        sel = self.sel
        assert sel is not None
        if not isinstance(spec, str) or isinstance(spec, QStr):
            raise Bad("bad sequence set")
        ranges = parse_sequence_set(spec)
        if uid:
            largest = sel.uids[-1] if sel.uids else 0
            return [(i + 1, u) for i, u in enumerate(sel.uids) if in_set(ranges, u, largest)]
        n = len(sel.uids)
        if n == 0 and any(a is not None or b is not None for a, b in ranges):
            raise Bad("no messages")
        for a, b in ranges:
            for v in (a, b):
                if v is not None and v > n:
                    raise Bad("message number out of range")
        return [(i + 1, u) for i, u in enumerate(sel.uids) if in_set(ranges, i + 1, n)]

    def _flags(self, items: list) -> set[str]:
        """A flag list from the client: system flags (any case) and keywords."""
        flags = set()
        for f in items:
            if not isinstance(f, str) or isinstance(f, QStr):
                raise Bad("bad flag")
            if f.startswith("\\"):
                norm = _SYSTEM_BY_LOWER.get(f.lower())
                if f.lower() == "\\recent":
                    continue  # RFC 3501 2.3.2: the client cannot set \Recent
                if norm is None:
                    raise Bad(f"unknown system flag {f[:20]}")
                flags.add(norm)
            elif is_keyword(f):
                flags.add(f)
            else:
                raise Bad(f"bad keyword {f[:20]}")
        return flags

    def _cmd_close(self, tag: str, args: list) -> Steps:
        sel = self.sel
        assert sel is not None
        if not sel.readonly:
            yield from self._expunge(None, report=False)
        self.sel = None
        self.state = "AUTHENTICATED"
        return [Send(f"{tag} OK CLOSE completed\r\n".encode())]

    def _cmd_unselect(self, tag: str, args: list) -> list[Event]:
        self.sel = None
        self.state = "AUTHENTICATED"
        return [Send(f"{tag} OK UNSELECT completed\r\n".encode())]

    def _expunge(self, only: set[int] | None, report: bool) -> Generator[FileWork, Any, list[bytes]]:
        sel = self.sel
        assert sel is not None
        updates = (yield from self._refresh(allow_expunge=True)) if report else []
        doomed = [
            sel.infos[u] for u in sel.uids
            if "\\Deleted" in sel.infos[u].flags and (only is None or u in only)
        ]
        yield FileWork(sel.folder.remove, (doomed,))
        said = self._expunged({m.uid for m in doomed})
        return [*updates, *said] if report else list(updates)

    def _cmd_expunge(self, tag: str, args: list, uid: bool = False) -> Steps:
        sel = self.sel
        assert sel is not None
        if sel.readonly:
            raise No("[READ-ONLY] mailbox is read-only")
        only = None
        if uid:  # RFC 4315 2.1 UID EXPUNGE
            if len(args) != 1:
                raise Bad("UID EXPUNGE needs a UID set")
            only = {u for _, u in self._messages(args[0], uid=True)}
        out = yield from self._expunge(only, report=True)
        return [Send(b"".join(out) + f"{tag} OK EXPUNGE completed\r\n".encode())]

    def _cmd_store(self, tag: str, args: list, uid: bool = False) -> Steps:
        sel = self.sel
        assert sel is not None
        unchanged_since = None
        if len(args) == 4 and isinstance(args[1], list):  # RFC 7162 3.1.3: (UNCHANGEDSINCE n)
            mods = args[1]
            if (len(mods) != 2 or not isinstance(mods[0], str) or isinstance(mods[0], (QStr, Literal))
                    or mods[0].upper() != "UNCHANGEDSINCE"):
                raise Bad("unknown STORE modifier")
            unchanged_since = _number(mods[1], "mod-sequence", zero=True)
            self.condstore = True
            args = [args[0], args[2], args[3]]
        if len(args) != 3 or not isinstance(args[1], str):
            raise Bad("STORE needs a set, an item and flags")
        targets = self._messages(args[0], uid)
        item = args[1].upper()
        m = re.match(r"^([+-]?)FLAGS(\.SILENT)?$", item)
        if not m:
            raise Bad(f"unknown STORE item {item[:30]}")
        flags = self._flags(args[2] if isinstance(args[2], list) else [args[2]])
        if sel.readonly:
            raise No("[READ-ONLY] mailbox is read-only")
        op, silent = m.group(1), bool(m.group(2))
        out = yield from self._refresh(allow_expunge=False)
        changes: list[tuple[int, int, MessageInfo, frozenset[str] | None]] = []  # seq, uid, info, new flags
        for seq, u in targets:
            info = sel.infos.get(u)
            if info is None:
                continue
            current = self._all_flags(info)
            if op == "+":
                new = current | flags
            elif op == "-":
                new = current - flags
            else:
                new = frozenset(flags)
            changes.append((seq, u, info, new if new != current else None))
        keywords_before, results, modified, keywords_after = yield FileWork(
            _store_flags, (sel.folder, changes, unchanged_since))
        fetches = []
        sel.own()
        for (seq, u, _, new), changed in zip(changes, results, strict=True):
            if u in modified:
                continue
            if changed is not None:
                sel.infos[u] = changed
            if not silent:
                fetches.append(self._flags_fetch(seq, u, sel.infos[u], uid))
            elif self.condstore and new is not None and changed is not None:
                # RFC 7162 3.1.3: the new mod-sequence even for .SILENT
                fetches.append(f"* {seq} FETCH ({f'UID {u} ' if uid else ''}MODSEQ ({changed.modseq}))\r\n".encode())
        if keywords_after != keywords_before:  # RFC 3501 7.2.6: new keywords
            out += [(line + "\r\n").encode() for line in self._flags_announcement(keywords_after)]
        out += fetches
        code = ""
        if modified:
            failed = sorted(u for _, u, _, _ in changes if u in modified) if uid else \
                sorted(seq for seq, u, _, _ in changes if u in modified)
            code = f"[MODIFIED {_uid_set(failed)}] "
        return [Send(b"".join(out) + f"{tag} OK {code}STORE completed\r\n".encode())]

    def _copy(self, tag: str, args: list, uid: bool, move: bool) -> Steps:
        sel = self.sel
        assert sel is not None and self.mailbox is not None
        verb = "MOVE" if move else "COPY"
        if len(args) != 2:
            raise Bad(f"{verb} needs a set and a mailbox")
        targets = self._messages(args[0], uid)
        name = self._folder_name(args[1])
        if move and sel.readonly:
            raise No("[READ-ONLY] mailbox is read-only")
        try:
            dest = yield FileWork(self.mailbox.folder, (name,))
        except FolderNotFound:
            raise No("[TRYCREATE] no such mailbox") from None
        infos = [sel.infos[u] for _, u in targets if u in sel.infos]
        quota = self.users.quota(self.user or "")
        if not move and quota is not None:
            if (yield FileWork(_usage_after_copy, (self.mailbox, sel.folder, infos))) > quota:
                raise No("[OVERQUOTA] the mailbox is over its quota")
        pairs = yield FileWork(_copy_messages, (sel.folder, dest, infos))
        code = ""
        if pairs:
            code = f"[COPYUID {dest.uidvalidity} {_uid_set([a for a, _ in pairs])} {_uid_set([b for _, b in pairs])}] "
        if not move:
            out = yield from self._refresh(allow_expunge=False)
            return [Send(b"".join(out) + f"{tag} OK {code}COPY completed\r\n".encode())]
        # RFC 6851 3.3: COPYUID goes in an untagged OK before the EXPUNGEs
        moved = {a for a, _ in pairs}
        yield FileWork(sel.folder.remove, ([sel.infos[u] for u in moved if u in sel.infos],))
        out = [f"* OK {code}Moved\r\n".encode()] if code else []
        out += self._expunged(moved & set(sel.infos))
        out += yield from self._refresh(allow_expunge=True)
        return [Send(b"".join(out) + f"{tag} OK MOVE completed\r\n".encode())]

    def _cmd_copy(self, tag: str, args: list, uid: bool = False) -> Steps:
        return self._copy(tag, args, uid, move=False)

    def _cmd_move(self, tag: str, args: list, uid: bool = False) -> Steps:
        return self._copy(tag, args, uid, move=True)

    # -- FETCH (RFC 3501 6.4.5)
    def _cmd_fetch(self, tag: str, args: list, uid: bool = False) -> Steps:
        sel = self.sel
        assert sel is not None
        if len(args) not in (2, 3):
            raise Bad("FETCH needs a set and items")
        changed_since, vanished = self._fetch_modifiers(args[2], uid) if len(args) == 3 else (None, False)
        targets = self._messages(args[0], uid)
        items = args[1] if isinstance(args[1], list) else [args[1]]
        wanted = _fetch_items(items)
        if uid and "UID" not in [w[0] for w in wanted]:
            wanted.insert(0, ("UID", None, None))
        if changed_since is not None and "MODSEQ" not in [w[0] for w in wanted]:
            wanted.append(("MODSEQ", None, None))  # RFC 7162 3.1.4.1: CHANGEDSINCE implies MODSEQ
        names = {w[0] for w in wanted}
        if "MODSEQ" in names:
            self.condstore = True  # RFC 7162 3.1: a CONDSTORE enabling command
        content = any(not _from_cache(name, section) for name, section, _ in wanted
                      if name not in ("UID", "FLAGS", "MODSEQ", "INTERNALDATE", "RFC822.SIZE"))
        need = _FileNeeds(
            content=content,
            cache=not content and any(name not in ("UID", "FLAGS", "MODSEQ", "INTERNALDATE", "RFC822.SIZE")
                                      for name, _, _ in wanted),
            headers=any(section is not None for _, section, _ in wanted),
            date="INTERNALDATE" in names,
            size="RFC822.SIZE" in names,
            # RFC 3501 6.4.5: BODY[...], RFC822 and RFC822.TEXT set \Seen
            seen=not sel.readonly and any(
                n in ("RFC822", "RFC822.TEXT") or (n == "BODY" and section is not None) for n, section, _ in wanted
            ),
        )
        out = yield from self._refresh(allow_expunge=False)
        if vanished:  # RFC 7162 3.2.6: UID FETCH (CHANGEDSINCE n VANISHED)
            assert changed_since is not None
            out += yield from self._vanished_earlier(changed_since, parse_sequence_set(args[0]))
        if changed_since is not None:
            targets = [(seq, u) for seq, u in targets if u in sel.infos and sel.infos[u].modseq > changed_since]
        if not need.any and names <= {"UID", "FLAGS", "MODSEQ"}:  # the message list's refresh: no file, no index
            yield from self._fetch_flags(targets, "UID" in names, "FLAGS" in names, out, "MODSEQ" in names)
            return [Send(f"{tag} OK FETCH completed\r\n".encode())]
        chosen = [(seq, u, sel.infos[u]) for seq, u in targets if u in sel.infos]
        start = 0
        expunged = False
        while start < len(chosen):
            batch = chosen[start:start + (FETCH_BATCH if need.content else FETCH_BATCH_CACHED)]
            files = None
            if need.any:
                # The file work stops once it has read FETCH_BATCH_BYTES (sizes in file
                # names are hints a foreign Maildir may lack): the rest comes next round.
                files = yield FileWork(_message_files, (sel.folder, [i for _, _, i in batch], need))
                batch = batch[:len(files)]
            for n, (seq, u, info) in enumerate(batch):
                if files and files[n].gone:
                    # RFC 2180 4.1.2: nothing for a message expunged by another session
                    # whose file was needed (never an empty body); its EXPUNGE comes at
                    # the next command that may send one (RFC 3501 7.4.1)
                    expunged = True
                    continue
                out.append(self._fetch_one(seq, u, info, wanted, files[n] if files else None))
            start += len(batch)
            # Batch by batch: the adapter writes each and waits for the transport to drain
            # below its high-water mark before the next file work, so a large FETCH (or 20
            # pipelined ones: they run one at a time) is never held whole.
            yield Send(b"".join(out))
            out = []
        if expunged:
            return [Send(b"".join(out) + f"{tag} {FETCH_EXPUNGED}\r\n".encode())]
        return [Send(b"".join(out) + f"{tag} OK FETCH completed\r\n".encode())]

    def _fetch_modifiers(self, mods: object, uid: bool) -> tuple[int | None, bool]:
        """FETCH modifiers (RFC 4466): CHANGEDSINCE n and, with UID FETCH once QRESYNC
        is enabled, VANISHED (RFC 7162 3.1.4.1, 3.2.6)."""
        if not isinstance(mods, list) or not mods:
            raise Bad("bad FETCH modifiers")
        changed_since, vanished, pos = None, False, 0
        while pos < len(mods):
            m = mods[pos]
            name = m.upper() if isinstance(m, str) and not isinstance(m, (QStr, Literal)) else ""
            if name == "CHANGEDSINCE" and pos + 1 < len(mods):
                changed_since = _number(mods[pos + 1], "mod-sequence")
                pos += 2
            elif name == "VANISHED":
                vanished = True
                pos += 1
            else:
                raise Bad("unknown FETCH modifier")
        if vanished and (not uid or not self.qresync or changed_since is None):
            raise Bad("VANISHED needs UID FETCH, CHANGEDSINCE and ENABLE QRESYNC")
        if changed_since is not None:
            self.condstore = True
        return changed_since, vanished

    def _vanished_earlier(self, since: int, ranges: list) -> Generator[FileWork, Any, list[bytes]]:
        sel = self.sel
        assert sel is not None
        gone = yield FileWork(sel.folder.vanished_since, (since,))
        text = _vanished_set(gone, sel.uids, sel.folder.uidnext, ranges)
        return [f"* VANISHED (EARLIER) {text}\r\n".encode()] if text else []

    def _fetch_flags(self, targets: list[tuple[int, int]], with_uid: bool, with_flags: bool,
                     out: list[bytes], with_modseq: bool = False) -> Generator[Send, Any, None]:
        """FETCH of UID and FLAGS only, as _fetch_one would answer it (FLAGS last), with
        each distinct flag list formatted once."""
        sel = self.sel
        assert sel is not None
        memo: dict[tuple[frozenset[str], str, bool], str] = {}
        lines = out
        for n, (seq, u) in enumerate(targets, 1):
            info = sel.infos.get(u)
            if info is None:
                continue
            parts = f"UID {u}" if with_uid else ""
            if with_flags:
                key = (info.flags, info.extra, u in sel.recent)
                flags = memo.get(key)
                if flags is None:
                    flags = memo[key] = _flag_list(self._all_flags(info), key[2])
                parts = f"{parts} FLAGS {flags}" if parts else f"FLAGS {flags}"
            if with_modseq:
                parts = f"{parts} MODSEQ ({info.modseq})" if parts else f"MODSEQ ({info.modseq})"
            lines.append(f"* {seq} FETCH ({parts})\r\n".encode())
            if n % FETCH_BATCH_CACHED == 0:  # written batch by batch, as the general path does
                yield Send(b"".join(lines))
                lines.clear()
        if lines:
            yield Send(b"".join(lines))
            lines.clear()

    def _fetch_one(self, seq: int, u: int, info: MessageInfo, wanted: list, files: _MessageFiles | None) -> bytes:
        """One FETCH response from what _message_files found (no I/O here)."""
        sel = self.sel
        assert sel is not None
        parts: list[bytes] = []

        def load() -> tuple[bytes, mime.Part]:
            assert files is not None and files.tree is not None
            return files.wire, files.tree

        entry = files.entry if files is not None else None

        for name, section, span in wanted:
            if name == "UID":
                parts.append(f"UID {u}".encode())
            elif name in ("FLAGS", "MODSEQ"):
                continue  # added at the end, after a possible \Seen
            elif name == "INTERNALDATE":
                assert files is not None
                parts.append(f'INTERNALDATE "{imap_date(files.date)}"'.encode())
            elif name == "RFC822.SIZE":
                assert files is not None
                parts.append(f"RFC822.SIZE {files.size}".encode())
            elif name == "ENVELOPE":
                parts.append(b"ENVELOPE " + (entry.envelope if entry else mime.envelope(load()[1])))
            elif name in ("BODYSTRUCTURE", "BODY") and section is None:
                if entry:
                    parts.append(name.encode() + b" " + (entry.bodystructure if name == "BODYSTRUCTURE" else entry.body))
                else:
                    parts.append(name.encode() + b" " + mime.bodystructure(load()[1], extended=name == "BODYSTRUCTURE"))
            elif name in ("RFC822", "RFC822.HEADER", "RFC822.TEXT"):
                w, t = load()
                data = w if name == "RFC822" else (t.header if name == "RFC822.HEADER" else t.body)
                parts.append(name.encode() + b" " + mime.istr(data) if data else name.encode() + b' ""')
            else:  # BODY[...] / BODY.PEEK[...]
                if entry is not None:  # HEADER.FIELDS of cached fields (_from_cache)
                    data = mime.filter_header(entry.headers, list(section.fields), True)
                else:
                    w, t = load()
                    data = mime.section_bytes(t, w, section) or b""
                label = f"BODY[{section.label()}]"
                if span is not None:
                    start, length = span
                    data = data[start:] if length is None else data[start:start + length]
                    label += f"<{start}>"
                parts.append(label.encode() + b" " + (b"{%d}\r\n" % len(data) + data))
        if files is not None and files.marked_seen:
            if files.info is not None:
                sel.own()
                sel.infos[u] = files.info
            if not any(w[0] == "FLAGS" for w in wanted):
                wanted = [*wanted, ("FLAGS", None, None)]
        if any(w[0] == "FLAGS" for w in wanted):
            parts.append(f"FLAGS {_flag_list(self._all_flags(sel.infos[u]), u in sel.recent)}".encode())
        if self.condstore and (files is not None and files.marked_seen or any(w[0] == "MODSEQ" for w in wanted)):
            parts.append(f"MODSEQ ({sel.infos[u].modseq})".encode())  # RFC 7162 3.1.4.1, 3.1.3
        return f"* {seq} FETCH (".encode() + b" ".join(parts) + b")\r\n"

    # -- SEARCH (RFC 3501 6.4.4)
    def _cmd_search(self, tag: str, args: list, uid: bool = False) -> Steps:
        sel = self.sel
        assert sel is not None
        args = list(args)
        if len(args) >= 2 and isinstance(args[0], str) and args[0].upper() == "CHARSET":
            if self.utf8:
                raise Bad("no CHARSET after ENABLE UTF8=ACCEPT (RFC 6855 3)")
            charset = astring(args[1]).upper()
            if charset not in ("US-ASCII", "UTF-8"):
                raise No("[BADCHARSET (US-ASCII UTF-8)] unsupported charset")
            args = args[2:]
        if not args:
            raise Bad("SEARCH needs a key")
        pos = 0
        keys = []
        self._search_index = False  # set by _search_key for a key the index answers
        self._search_modseq = False
        while pos < len(args):
            key, pos = self._search_key(args, pos, 0)
            keys.append(key)
        out = yield from self._refresh(allow_expunge=False)
        # The lists are the session's or the snapshot's; neither changes while the file work runs.
        found = yield FileWork(_search, (sel.folder, sel.uids, sel.infos, sel.recent, keys, self._search_index))
        hits = [str(u if uid else seq) for seq, u in found]
        tail = ""
        if self._search_modseq and found:  # RFC 7162 3.1.5: the highest mod-sequence found
            tail = f" (MODSEQ {max(sel.infos[u].modseq for _, u in found if u in sel.infos)})"
        line = ("* SEARCH" + ("".join(" " + h for h in hits)) + tail + "\r\n").encode()
        return [Send(b"".join(out) + line + f"{tag} OK SEARCH completed\r\n".encode())]

    def _cmd_sort(self, tag: str, args: list, uid: bool = False) -> Steps:
        """RFC 5256 SORT: the SEARCH result ordered by the criteria, ties by sequence number."""
        sel = self.sel
        assert sel is not None
        if len(args) < 3 or not isinstance(args[0], list) or not args[0]:
            raise Bad("SORT needs (criteria), a charset and search keys")
        criteria: list[tuple[str, bool]] = []
        reverse = False
        for item in args[0]:
            if not isinstance(item, str) or isinstance(item, QStr) or item.upper() not in _SORT_KEYS | {"REVERSE"}:
                raise Bad("unknown SORT criterion")
            if item.upper() == "REVERSE":
                if reverse:
                    raise Bad("REVERSE twice")
                reverse = True
                continue
            criteria.append((item.upper(), reverse))
            reverse = False
        if reverse:
            raise Bad("REVERSE must precede a criterion")
        charset = astring(args[1]).upper()
        if charset not in ("US-ASCII", "UTF-8"):
            raise No("[BADCHARSET (US-ASCII UTF-8)] unsupported charset")
        pos, keys = 2, []
        self._search_index = False
        while pos < len(args):
            key, pos = self._search_key(args, pos, 0)
            keys.append(key)
        out = yield from self._refresh(allow_expunge=False)
        found = yield FileWork(_search, (sel.folder, sel.uids, sel.infos, sel.recent, keys, self._search_index))
        ordered = yield FileWork(_sort, (sel.folder, [(seq, u, sel.infos[u]) for seq, u in found], criteria))
        line = ("* SORT" + "".join(f" {u if uid else seq}" for seq, u in ordered) + "\r\n").encode()
        return [Send(b"".join(out) + line + f"{tag} OK SORT completed\r\n".encode())]

    def _cmd_thread(self, tag: str, args: list, uid: bool = False) -> Steps:
        """RFC 5256 THREAD: the SEARCH result threaded by ORDEREDSUBJECT or REFERENCES."""
        sel = self.sel
        assert sel is not None
        if len(args) < 3 or not isinstance(args[0], str) or isinstance(args[0], (QStr, Literal)):
            raise Bad("THREAD needs an algorithm, a charset and search keys")
        algorithm = args[0].upper()
        if algorithm not in ("ORDEREDSUBJECT", "REFERENCES"):
            raise Bad("unknown THREAD algorithm")
        charset = astring(args[1]).upper()
        if charset not in ("US-ASCII", "UTF-8"):
            raise No("[BADCHARSET (US-ASCII UTF-8)] unsupported charset")
        pos, keys = 2, []
        self._search_index = False
        while pos < len(args):
            key, pos = self._search_key(args, pos, 0)
            keys.append(key)
        out = yield from self._refresh(allow_expunge=False)
        found = yield FileWork(_search, (sel.folder, sel.uids, sel.infos, sel.recent, keys, self._search_index))
        rows = yield FileWork(_thread_rows, (sel.folder, [(seq, u, sel.infos[u]) for seq, u in found]))
        roots = ithread.references(rows) if algorithm == "REFERENCES" else ithread.ordered_subject(rows)
        line = ("* THREAD " + ithread.render(roots, uid)).rstrip() + "\r\n"
        return [Send(b"".join(out) + line.encode() + f"{tag} OK THREAD completed\r\n".encode())]

    def _search_key(self, args: list, pos: int, depth: int):  # noqa: C901 - one branch per key
        if pos >= len(args):
            raise Bad("SEARCH key missing")
        if depth > MAX_SEARCH_DEPTH:  # NOT, OR and parentheses nest: bound the recursion
            raise Bad(f"SEARCH keys nested deeper than {MAX_SEARCH_DEPTH}")
        a = args[pos]
        pos += 1
        if isinstance(a, list):
            subs = []
            p = 0
            while p < len(a):
                k, p = self._search_key(a, p, depth + 1)
                subs.append(k)
            return (lambda c, subs=subs: all(k(c) for k in subs)), pos
        if not isinstance(a, str) or isinstance(a, QStr):
            raise Bad("bad SEARCH key")
        key = a.upper()

        def arg() -> str:
            nonlocal pos
            if pos >= len(args):
                raise Bad(f"SEARCH {key} needs an argument")
            v = args[pos]
            pos += 1
            return astring(v)

        flag_keys = {
            "ANSWERED": ("\\Answered", True), "UNANSWERED": ("\\Answered", False),
            "DELETED": ("\\Deleted", True), "UNDELETED": ("\\Deleted", False),
            "DRAFT": ("\\Draft", True), "UNDRAFT": ("\\Draft", False),
            "FLAGGED": ("\\Flagged", True), "UNFLAGGED": ("\\Flagged", False),
            "SEEN": ("\\Seen", True), "UNSEEN": ("\\Seen", False),
        }
        if key == "ALL":
            return (lambda c: True), pos
        if key in flag_keys:
            flag, want = flag_keys[key]
            return (lambda c: (flag in c.info.flags) == want), pos
        if key == "RECENT":
            return (lambda c: c.recent), pos
        if key == "OLD":
            return (lambda c: not c.recent), pos
        if key == "NEW":
            return (lambda c: c.recent and "\\Seen" not in c.info.flags), pos
        if key in ("KEYWORD", "UNKEYWORD"):
            word = arg().lower()
            want = key == "KEYWORD"
            return (lambda c: (word in {k.lower() for k in c.all_flags()}) == want), pos
        if key in ("FROM", "TO", "CC", "BCC", "SUBJECT"):
            needle = normalize(arg())
            field = key.lower()
            self._search_index = True
            return _text_key(lambda c: needle in c.header(field), needle), pos
        if key == "HEADER":
            field = arg().lower()
            needle = normalize(arg())
            self._search_index = self._search_index or field in icache.SEARCH_FIELDS
            k = (lambda c: (needle in c.header(field)) if needle else c.has_header(field))
            return (_text_key(k, needle) if needle and field in icache.SEARCH_FIELDS else k), pos
        if key == "BODY":
            needle = normalize(arg())
            return (lambda c: c.body_has(needle)), pos
        if key == "TEXT":
            needle = normalize(arg())
            return (lambda c: needle in c.all_headers() or c.body_has(needle)), pos
        if key in ("BEFORE", "ON", "SINCE", "SENTBEFORE", "SENTON", "SENTSINCE"):
            day = parse_date(arg())
            self._search_index = True
            sent = key.startswith("SENT")
            op = key[4:] if sent else key

            def cmp(c, day=day, sent=sent, op=op) -> bool:
                d = c.sent_day() if sent else c.internal_day()
                if d is None:
                    return False
                return d < day if op == "BEFORE" else (d == day if op == "ON" else d >= day)

            return cmp, pos
        if key in ("LARGER", "SMALLER"):
            text = arg()
            if not text.isdigit() or len(text) > 15:
                raise Bad(f"{key} needs a number")
            size = int(text)
            self._search_index = True
            if key == "LARGER":
                return (lambda c: c.size() > size), pos
            return (lambda c: c.size() < size), pos
        if key == "MODSEQ":  # RFC 7162 3.1.5: MODSEQ ["/flags/<flag>" priv|shared|all] n
            if pos < len(args) and isinstance(args[pos], QStr):
                if pos + 1 >= len(args) or not isinstance(args[pos + 1], str) or \
                        args[pos + 1].lower() not in ("priv", "shared", "all"):
                    raise Bad("MODSEQ entry name needs an entry type")
                pos += 2  # one mod-sequence per message: the entry does not narrow it
            if pos >= len(args):
                raise Bad("SEARCH MODSEQ needs a mod-sequence")
            since = _number(args[pos], "mod-sequence", zero=True)
            pos += 1
            self.condstore = True
            self._search_modseq = True
            return (lambda c: c.info.modseq >= since), pos
        if key == "UID":
            ranges = parse_sequence_set(arg())
            return (lambda c: in_set(ranges, c.uid, c.largest_uid)), pos
        if key == "NOT":
            k, pos = self._search_key(args, pos, depth + 1)
            return (lambda c: not k(c)), pos
        if key == "OR":
            k1, pos = self._search_key(args, pos, depth + 1)
            k2, pos = self._search_key(args, pos, depth + 1)
            return (lambda c: k1(c) or k2(c)), pos
        if re.match(r"^[\d*:,]+$", key):
            ranges = parse_sequence_set(key)
            return (lambda c: in_set(ranges, c.seq, c.count)), pos
        raise Bad(f"unknown SEARCH key {key[:30]}")


# -- file work: what these functions are handed is a snapshot; they run in the adapter's
# file executor (FileWork), never on the event loop, and never touch a session.


class _SearchContext:
    """One message as SEARCH sees it. Header fields, dates and sizes come from the
    folder's index entry (``entry``, set by _search); other header fields and the body
    are read from the file, once, only when a key needs them. Text is compared decoded
    (RFC 2047, the message's charsets: ISO-2022-JP, Shift_JIS, UTF-8...) and normalized
    (NFKC, case folded), on both sides. Keys are evaluated by _search, in the file executor."""

    __slots__ = ("folder", "seq", "uid", "info", "count", "largest_uid", "recent", "entry", "_fields", "_wire",
                 "_tree", "_text")

    def __init__(self, folder: Folder, seq: int, uid: int, info: MessageInfo, count: int, largest: int,
                 recent: bool):
        self.folder = folder
        self.count = count
        self.largest_uid = largest
        self.at(seq, uid, info, recent, None)

    def at(self, seq: int, uid: int, info: MessageInfo, recent: bool, entry: CacheEntry | None) -> None:
        """Point this context at another message (one context serves a whole SEARCH)."""
        self.seq = seq
        self.uid = uid
        self.info = info
        self.recent = recent
        self.entry = entry
        self._fields: list[bytes] | None = None
        self._wire: bytes | None = None
        self._tree: mime.Part | None = None
        self._text: str | None = None

    def _load(self) -> tuple[bytes, mime.Part]:
        if self._wire is None:
            self._wire, self._tree = _read_parsed(self.folder, self.info)
        assert self._tree is not None
        return self._wire, self._tree

    def forget(self) -> None:
        self._wire = self._tree = self._text = None
        self.entry = self._fields = None

    def all_flags(self) -> frozenset[str]:
        return self.info.flags | self.folder.keywords_of(self.info)

    def header(self, name: str) -> str:
        if self.entry is not None and name in icache.SEARCH_FIELDS:
            if self._fields is None:
                self._fields = self.entry.search.split(b"\0")
            i = icache.SEARCH_FIELDS.index(name)
            return self._fields[i].decode("utf-8", "surrogatepass") if i < len(self._fields) else ""
        t = self._load()[1]
        return normalize(" ".join(decode_header_value(v) for n, v, _ in t.fields if n == name))

    def has_header(self, name: str) -> bool:
        return any(n == name for n, _, _ in self._load()[1].fields)

    def all_headers(self) -> str:
        return normalize(" ".join(decode_header_value(v) for _, v, _ in self._load()[1].fields))

    def body_has(self, needle: str) -> bool:
        """needle (normalized) in the body: its text parts decoded, or its raw bytes."""
        wire = self._load()[0]
        if self._text is None:
            self._text = normalize(decode_message(wire).text)
        if needle in self._text:
            return True
        body = self._load()[1].body
        return needle.encode("utf-8", "surrogateescape") in body.lower()

    def size(self) -> int:
        return self.entry.vsize if self.entry is not None else self.folder.wire_size(self.info)

    def internal_day(self) -> tuple[int, int, int]:
        when = self.entry.internal_date if self.entry is not None else self.folder.internal_date(self.info)
        t = time.gmtime(when)
        return (t.tm_year, t.tm_mon, t.tm_mday)

    def sent_day(self) -> tuple[int, int, int] | None:
        day = self.entry.sent_day if self.entry is not None else icache.sent_day(self._load()[1].get("date"))
        if not day:
            return None
        return (day // 10000, day // 100 % 100, day % 100)


SEARCH_BATCH = 1000  # index entries looked up at a time


def _text_key(key: Callable[[_SearchContext], bool], needle: str) -> Callable[[_SearchContext], bool]:
    """Mark a key that matches only messages whose index search text (all of its
    SEARCH_FIELDS) contains needle, so _search can skip the others without a context."""
    key.needle = needle  # type: ignore[attr-defined]
    return key


def _candidates(folder: Folder, uids: list[int], infos: dict[int, MessageInfo],
                needles: list[str]) -> list[tuple[int, int, MessageInfo]]:
    """(seq, uid, info) of the messages whose index search text holds every needle. A
    message without an entry gets one made first; one still without (gone, or too large
    to cache) stays a candidate: the keys then read its file."""
    bases = [info.base if (info := infos.get(u)) is not None else "" for u in uids]
    texts = folder.index.search_texts(bases)
    missing = [infos[u] for u, t, b in zip(uids, texts, bases, strict=True) if t is None and b]
    if missing:
        icache.entries(folder, missing, True)
        texts = folder.index.search_texts(bases)
    if len(needles) == 1:
        n = needles[0]
        chosen = [i for i, t in enumerate(texts) if t is None or n in t]
    else:
        chosen = [i for i, t in enumerate(texts) if t is None or all(n in t for n in needles)]
    return [(i + 1, uids[i], info) for i in chosen if (info := infos.get(uids[i])) is not None]


def _search(folder: Folder, uids: list[int], infos: dict[int, MessageInfo], recent: set[int],
            keys: list[Callable[[_SearchContext], bool]], use_index: bool) -> list[tuple[int, int]]:
    """(seq, uid) of the messages that match every key (SEARCH). With use_index, each
    message's index entry is looked up first (in batches; missing ones are made from the
    file and added); keys read files only for what the index does not hold, one message
    at a time. Header keys the index answers narrow the messages first, on the folder's
    decoded search texts (MailboxIndex.search_texts), so the other keys, and the key
    itself on its own field, run only where the text can match."""
    hits = []
    count = len(uids)
    c = _SearchContext(folder, 0, 0, MessageInfo(0, "", "cur", frozenset()), count, uids[-1] if uids else 0, False)
    needles = [k.needle for k in keys if hasattr(k, "needle")]
    if use_index and needles:
        rows = _candidates(folder, uids, infos, needles)
    else:
        rows = [(seq, u, info) for seq, u in enumerate(uids, 1) if (info := infos.get(u)) is not None]
    for start in range(0, len(rows), SEARCH_BATCH):
        batch = rows[start:start + SEARCH_BATCH]
        found = icache.entries(folder, [b[2] for b in batch], True) if use_index else [None] * len(batch)
        for (seq, u, info), e in zip(batch, found, strict=True):
            c.at(seq, u, info, u in recent, e)
            if all(k(c) for k in keys):
                hits.append((seq, u))
            c.forget()  # one message's content in memory at a time
    return hits


_SORT_KEYS = {"ARRIVAL", "CC", "DATE", "FROM", "SIZE", "SUBJECT", "TO"}
_SUBJ_LEADER = re.compile(r"^(?:\s+|(?:re|fwd?)\s*(?:\[[^\[\]]*\])?\s*:)", re.I)
_SUBJ_BLOB = re.compile(r"^\[[^\[\]]*\]\s*")
_SUBJ_TRAILER = re.compile(r"(?:\s+|\(fwd\))$", re.I)


def base_subject(subject: str) -> str:
    """RFC 5256 2.1 base subject of a decoded subject: reply and forward markers,
    [blob] prefixes and [fwd: ...] wrappers removed, whitespace collapsed."""
    text = " ".join(subject.split())
    while True:
        before = text
        while True:  # (1)-(2): trailers, then leaders and blobs, until nothing changes
            t = _SUBJ_TRAILER.sub("", text)
            if t == text:
                break
            text = t
        while True:
            t = _SUBJ_LEADER.sub("", text, count=1)
            if t == text:
                t = _SUBJ_BLOB.sub("", text, count=1)
                if not t or t == text:  # (3): a blob goes only if something is left
                    break
            text = t
        low = text.lower()
        if low.startswith("[fwd:") and text.endswith("]"):  # (6)
            text = text[5:-1].strip()
        if text == before:
            return text


def _first_mailbox(value: str | None) -> str:
    """The addr-mailbox (local part) of the first address, for SORT FROM/TO/CC."""
    if not value:
        return ""
    for _, addr in email.utils.getaddresses([value]):
        if addr:
            return addr.rpartition("@")[0].lower() if "@" in addr else addr.lower()
    return ""


def _sent_time(value: str | None, fallback: float) -> float:
    """RFC 5256 DATE: the Date: header in UTC, else the internal date."""
    if value:
        try:
            return email.utils.parsedate_to_datetime(value).timestamp()
        except (TypeError, ValueError, IndexError, OverflowError):
            pass
    return fallback


def _sort(folder: Folder, rows: list[tuple[int, int, MessageInfo]],
          criteria: list[tuple[str, bool]]) -> list[tuple[int, int]]:
    """SORT's ordering of (seq, uid) rows, from the index entries (file executor)."""
    entries = icache.entries(folder, [r[2] for r in rows], texts=True) if rows else []
    keyed = []
    for (seq, u, info), e in zip(rows, entries, strict=True):
        got: dict[str, str] = {}
        if e is not None:
            for n, v, _ in mime.header_fields(e.headers):
                got.setdefault(n, v)  # the first of each field
        values = {}
        for name, _ in criteria:
            if name == "ARRIVAL":
                values[name] = e.internal_date if e else 0
            elif name == "SIZE":
                values[name] = e.vsize if e else 0
            elif name == "DATE":
                values[name] = _sent_time(got.get("date"), e.internal_date if e else 0)
            elif name == "SUBJECT":
                subject = icache.search_fields(e).get("subject", "") if e else ""
                values[name] = base_subject(subject)
            else:
                values[name] = _first_mailbox(decode_header_value(got.get(name.lower(), "")))
        keyed.append((seq, u, values))
    # Stable sorts from the last criterion to the first; sequence order breaks ties.
    keyed.sort(key=lambda r: r[0])
    for name, rev in reversed(criteria):
        keyed.sort(key=lambda r, name=name: r[2][name], reverse=rev)
    return [(seq, u) for seq, u, _ in keyed]


_THREAD_FIELDS = ("message-id", "references", "in-reply-to", "date")


def _thread_rows(folder: Folder, rows: list[tuple[int, int, MessageInfo]]) -> list[ithread.Row]:
    """THREAD's view of (seq, uid) rows: from the index entries, or the message's file
    when the entry does not hold its header fields (file executor)."""
    out = []
    for start in range(0, len(rows), SEARCH_BATCH):
        batch = rows[start:start + SEARCH_BATCH]
        entries = icache.entries(folder, [r[2] for r in batch], texts=True)
        for (seq, u, info), e in zip(batch, entries, strict=True):
            got: dict[str, str] = {}
            subject = ""
            if e is not None and e.headers:
                for n, v, _ in mime.header_fields(e.headers):
                    got.setdefault(n, v)
                subject = icache.search_fields(e).get("subject", "")
            else:
                _, tree = _read_parsed(folder, info)
                for n in _THREAD_FIELDS:
                    got[n] = tree.get(n) or ""
                subject = normalize(decode_header_value(tree.get("subject") or ""))
            internal = e.internal_date if e is not None else 0.0
            out.append(ithread.Row(
                seq=seq, uid=u, message_id=got.get("message-id", ""), references=got.get("references", ""),
                in_reply_to=got.get("in-reply-to", ""), subject=base_subject(subject),
                refwd=ithread.is_reply_or_forward(subject), sent=_sent_time(got.get("date"), internal)))
    return out


def _read_parsed(folder: Folder, info: MessageInfo) -> tuple[bytes, mime.Part]:
    """A message in wire form (CRLF) and its MIME tree; an expunged one reads as empty
    (SEARCH, SORT and THREAD: it matches nothing; FETCH uses _read_message)."""
    return _read_message(folder, info) or (b"", mime.parse(b""))


def _read_message(folder: Folder, info: MessageInfo) -> tuple[bytes, mime.Part] | None:
    """A message in wire form (CRLF) and its MIME tree; None when its file is gone."""
    raw = folder.read(info)
    if raw is None:
        return None
    wire = to_crlf(raw)
    return wire, mime.parse(wire)


def _from_cache(name: str, section: mime.Section | None) -> bool:
    """Whether a FETCH item is answered from the folder's index (no message file read)."""
    if name in ("ENVELOPE", "BODYSTRUCTURE", "BODY") and section is None:
        return True
    return (name in ("BODY", "BODY.PEEK") and section is not None and not section.nums
            and section.text == "HEADER.FIELDS" and all(f.lower() in icache.CACHED_HEADERS for f in section.fields))


@dataclass(frozen=True, slots=True)
class _FileNeeds:
    """What a FETCH needs from each message's file."""

    content: bool
    cache: bool  # everything else comes from the index (kanmon.store.index)
    headers: bool  # a HEADER.FIELDS item is answered from the index
    date: bool
    size: bool
    seen: bool  # set \Seen (a BODY[...], RFC822 or RFC822.TEXT item, folder not read-only)

    @property
    def any(self) -> bool:
        return self.content or self.cache or self.date or self.size or self.seen


@dataclass(slots=True)
class _MessageFiles:
    wire: bytes = b""
    tree: mime.Part | None = None
    date: float = 0.0
    size: int = 0
    marked_seen: bool = False  # \Seen was not set and we set it
    info: MessageInfo | None = None  # the message after that (None: it is gone)
    entry: CacheEntry | None = None  # from the index (need.cache)
    gone: bool = False  # expunged by another session: its file was needed and is not there


FETCH_BATCH = 100  # messages per FileWork
# RFC 5530 3 (EXPUNGEISSUED), RFC 2180 4.1.2; Dovecot's words
FETCH_EXPUNGED = "NO [EXPUNGEISSUED] Some of the requested messages no longer exist"
FETCH_BATCH_CACHED = 1000  # messages per FileWork when the index answers (no file read)
FETCH_BATCH_BYTES = 1 << 20  # stored bytes per FileWork, when content is read


def _message_files(folder: Folder, infos: list[MessageInfo], need: _FileNeeds) -> list[_MessageFiles]:
    """Read what a FETCH needs of the first messages of infos; set \\Seen where the FETCH
    implies it. Stops after the message that brings the content read to FETCH_BATCH_BYTES
    (at least one message): the caller asks again for the rest."""
    out = []
    read = 0
    cached = icache.entries(folder, infos) if need.cache else None
    for n, info in enumerate(infos):
        if read >= FETCH_BATCH_BYTES:
            break
        f = _MessageFiles()
        out.append(f)
        entry = cached[n] if cached is not None else None
        if need.content or (need.cache and (entry is None or (need.headers and not entry.headers))):
            # (no entry: not indexed yet or gone meanwhile; or its header fields were
            # too large to cache): read the file
            got = _read_message(folder, info)
            if got is None:  # RFC 2180 4.1.2: no FETCH response for it, a tagged NO
                f.gone = True
                continue
            f.wire, f.tree = got
            read += len(f.wire)
        elif need.cache:
            f.entry = entry
        if need.date:
            if entry is not None:
                f.date = entry.internal_date
            else:
                date = folder.internal_date_or_none(info)
                if date is None:
                    f.gone = True
                    continue
                f.date = date
        if need.size:
            if entry is not None:
                f.size = entry.vsize
            elif info.vsize is None and f.tree is not None:
                f.size = len(f.wire)  # read above: no second read for wire_size
            else:
                size = folder.wire_size_or_none(info)
                if size is None:
                    f.gone = True
                    continue
                f.size = size
        if need.seen and "\\Seen" not in info.flags:
            f.marked_seen = True
            f.info = info  # replaced below by the message after its change
    seen = [f for f in out if f.marked_seen]
    if seen:  # one change (one mod-sequence, one write of the mod-sequence file) for the batch
        after, _ = folder.store_flags([(f.info, f.info.flags | {"\\Seen"}, None) for f in seen])
        for f, info_after in zip(seen, after):
            f.info = info_after
    return out


def _store_flags(
    folder: Folder, changes: list[tuple[int, int, MessageInfo, frozenset[str] | None]], unchanged_since: int | None
) -> tuple[list[str], list[MessageInfo | None], set[int], list[str]]:
    """STORE: (keywords before, each message after its change or None, the UIDs that
    failed UNCHANGEDSINCE, keywords after). The changes share one mod-sequence."""
    before = folder.keyword_names()
    results, modified = folder.store_flags(
        [(info, None if new is None else new & SYSTEM_FLAGS, None if new is None else new - SYSTEM_FLAGS)
         for _, _, info, new in changes], unchanged_since)
    # a message left as it was is not reported as changed
    results = [r if new is not None else None for r, (_, _, _, new) in zip(results, changes, strict=True)]
    return before, results, modified, folder.keyword_names()


def _kib(octets: int) -> int:
    """Storage in units of 1024 octets, rounded up (RFC 9208 5.1)."""
    return (octets + 1023) // 1024


def _stored_bytes(folder: Folder, infos: list[MessageInfo]) -> int:
    """Bytes these messages take on disk (file executor)."""
    total = 0
    for info in infos:
        if info.size is None:
            p = folder.locate(info)
            try:
                info.size = p.stat().st_size if p is not None else 0
            except FileNotFoundError:
                info.size = 0
        total += info.size
    return total


def _usage_after_copy(mailbox: Mailbox, src: Folder, infos: list[MessageInfo]) -> int:
    """Stored bytes of the mailbox once these messages are copied (the quota check)."""
    return mailbox.usage()[1] + sum(src.wire_size(i) for i in infos)


def _copy_messages(src: Folder, dest: Folder, infos: list[MessageInfo]) -> list[tuple[int, int]]:
    """COPY/MOVE: (source uid, new uid) of each message copied (gone ones are skipped)."""
    pairs = []
    for info in infos:
        copied = dest.copy_in(src, info, info.flags)
        if copied is not None:
            pairs.append((info.uid, copied.uid))
    return pairs




def _number(value: object, what: str, zero: bool = False) -> int:
    """A number argument (a mod-sequence or UIDVALIDITY: 63 bits at most)."""
    if not isinstance(value, str) or isinstance(value, (QStr, Literal)) or not value.isdigit() or len(value) > 19:
        raise Bad(f"bad {what}")
    n = int(value)
    if n > MAX_MODSEQ or (n == 0 and not zero):
        raise Bad(f"bad {what}")
    return n


def _vanished_set(gone: set[int] | None, uids: list[int], uidnext: int, ranges: list | None) -> str:
    """The uid-set for VANISHED (EARLIER): the expunged UIDs (gone) within ranges; when
    gone is None (not known that far back) every UID below UIDNEXT that is not in the
    folder, which RFC 7162 3.2.10 allows (the client ignores UIDs it does not know)."""
    top = uidnext - 1
    if gone is not None:
        return _uid_set(sorted(u for u in gone if ranges is None or in_set(ranges, u, top)))
    gaps = []
    prev = 0
    for u in uids:
        if u > prev + 1:
            gaps.append((prev + 1, u - 1))
        prev = max(prev, u)
    if prev < top:
        gaps.append((prev + 1, top))
    if ranges is not None:
        spans = []
        for a, b in ranges:
            lo, hi = (top if a is None else a), (top if b is None else b)
            spans.append((min(lo, hi), max(lo, hi)))
        cut = sorted((max(g0, s0), min(g1, s1)) for g0, g1 in gaps for s0, s1 in spans if max(g0, s0) <= min(g1, s1))
        gaps = []
        for lo, hi in cut:  # merge overlapping pieces
            if gaps and lo <= gaps[-1][1] + 1:
                gaps[-1] = (gaps[-1][0], max(gaps[-1][1], hi))
            else:
                gaps.append((lo, hi))
    return ",".join(f"{lo}:{hi}" if lo != hi else str(lo) for lo, hi in gaps)


def _uid_set(uids: list[int]) -> str:
    """[1, 2, 3, 7] -> '1:3,7' (RFC 4315 uid-set)."""
    out = []
    start = prev = None
    for u in uids:
        if start is None:
            start = prev = u
        elif u == prev + 1:
            prev = u
        else:
            out.append(f"{start}:{prev}" if start != prev else str(start))
            start = prev = u
    if start is not None:
        out.append(f"{start}:{prev}" if start != prev else str(start))
    return ",".join(out)


def _missing_levels(names: list[str]) -> set[str]:
    """The superior hierarchical names of names that are not among them (RFC 3501 6.3.8)."""
    have = set(names)
    out = set()
    for name in names:
        parts = name.split(DELIMITER)
        for n in range(1, len(parts)):
            level = DELIMITER.join(parts[:n])
            if level not in have:
                out.add(level)
    return out


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """LIST pattern: * matches anything, % anything but the delimiter (RFC 3501 6.3.8)."""
    out = []
    for ch in pattern:
        if ch == "*":
            out.append(".*")
        elif ch == "%":
            out.append(f"[^{re.escape(DELIMITER)}]*")
        else:
            out.append(re.escape(ch))
    return re.compile("^" + "".join(out) + "$")


_FETCH_MACROS = {
    "ALL": ["FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE"],
    "FAST": ["FLAGS", "INTERNALDATE", "RFC822.SIZE"],
    "FULL": ["FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY"],
}
_SIMPLE_ITEMS = {"UID", "FLAGS", "MODSEQ", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODYSTRUCTURE", "BODY",
                 "RFC822", "RFC822.HEADER", "RFC822.TEXT"}
_BODY_ITEM = re.compile(r"^(BODY|BODY\.PEEK)\[([^\]]*)\](?:<(\d{1,10})(?:\.(\d{1,10}))?>)?$", re.I)


def _fetch_items(items: list) -> list[tuple[str, mime.Section | None, tuple[int, int | None] | None]]:
    if len(items) == 1 and isinstance(items[0], str) and items[0].upper() in _FETCH_MACROS:
        items = _FETCH_MACROS[items[0].upper()]
    out: list = []
    for item in items:
        if not isinstance(item, str) or isinstance(item, QStr):
            raise Bad("bad FETCH item")
        up = item.upper()
        if up in _SIMPLE_ITEMS:
            out.append((up, None, None))
            continue
        m = _BODY_ITEM.match(item)
        if not m:
            raise Bad(f"unknown FETCH item {item[:40]}")
        section = mime.parse_section(m.group(2))
        if section is None:
            raise Bad(f"bad section {m.group(2)[:40]}")
        partial = None
        if m.group(3) is not None:
            if m.group(4) is None:
                raise Bad("a partial needs <start.length>")
            partial = (int(m.group(3)), int(m.group(4)))
        out.append(("BODY" if m.group(1).upper() == "BODY" else "BODY.PEEK", section, partial))
    return out


_AUTH = ("AUTHENTICATED", "SELECTED")
_STATES = {
    "STARTTLS": ("NOT_AUTHENTICATED",),
    "LOGIN": ("NOT_AUTHENTICATED",),
    "AUTHENTICATE": ("NOT_AUTHENTICATED",),
    "SELECT": _AUTH, "EXAMINE": _AUTH, "CREATE": _AUTH, "DELETE": _AUTH, "RENAME": _AUTH,
    "SUBSCRIBE": _AUTH, "UNSUBSCRIBE": _AUTH, "LIST": _AUTH, "LSUB": _AUTH, "STATUS": _AUTH,
    "APPEND": _AUTH, "IDLE": _AUTH, "NAMESPACE": _AUTH,
    "GETQUOTAROOT": _AUTH, "GETQUOTA": _AUTH, "SETQUOTA": _AUTH, "ENABLE": ("AUTHENTICATED",),
    "CHECK": ("SELECTED",), "CLOSE": ("SELECTED",), "UNSELECT": ("SELECTED",), "EXPUNGE": ("SELECTED",),
    "SEARCH": ("SELECTED",), "SORT": ("SELECTED",), "THREAD": ("SELECTED",), "FETCH": ("SELECTED",), "STORE": ("SELECTED",), "COPY": ("SELECTED",),
    "MOVE": ("SELECTED",),
}
_UID_COMMANDS = {"FETCH", "STORE", "SEARCH", "COPY", "MOVE", "EXPUNGE", "SORT", "THREAD"}

__all__ = ["ImapSession", "imap_date"]
