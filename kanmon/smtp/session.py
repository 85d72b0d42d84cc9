"""The ESMTP server session: an I/O-free state machine (RFC 5321).

Role: fed whole buffers of client bytes, it returns Actions for the listener: bytes to
send, "store this message", "start TLS", "run these checks", "carry out these effects",
"close". It never touches a socket, a file or a clock; the listener (kanmon.smtp.server)
does, and reports back with message_stored(), message_failed(), tls_started(),
auth_result(), check_result(). The same object is driven by bytes in the protocol tests.

Policy is not here: at connect, HELO, MAIL, RCPT and end of DATA the session asks the
check pipeline (kanmon.policy.pipeline). An answer given at once is applied at once; an
answer that needs I/O puts the session in WAIT_CHECK (input stays buffered, nothing more
is read) until the listener calls check_result().

Trusts: nothing the client sends. Every buffer is bounded: a command line is at most
512 octets (RFC 5321 4.5.3.1.4) plus the 514 RFC 3461 allows for DSN parameters, and one that runs past 64 KiB closes the connection
(421); DATA beyond max_message_size is read to its end but not kept; DATA beyond the
data_buffer (128 KiB) goes out in checked, dot-unstuffed pieces (SpoolData) to the
listener's spill file and comes back whole (ReadSpooled, spooled_content()). A HELO client (not
offered PIPELINING) that sends a command before the reply to the previous one is
disconnected with 554 5.5.0 (RFC 2920; Postfix smtpd_forbid_unauth_pipelining). Only <CRLF>.<CRLF> ends DATA; a bare CR or LF anywhere in a command or in DATA
rejects it with 550 5.5.2 and nothing of it is queued (SMTP smuggling,
CVE-2023-51764/5/6) — except that a client whose profile says bare_newline =
"normalize" (relay networks, authenticated users) may end lines with a bare LF, which
becomes CRLF (a bare CR is still refused). After STARTTLS, bytes the client sent before
the handshake are discarded (CVE-2011-0411). The per-session limits of the client's
profile (EHLO, NOOP, RSET, messages, recipients, message and header size, errors) are
counted here; each refusal names the profile key as its check.

Never: answer 250 to DATA by itself — that is the listener's job, after the spool says
the message is durable (DESIGN.md promise 1).
"""

from __future__ import annotations

import base64
import enum
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email.utils import formatdate

from kanmon.config import SessionProfile
from kanmon.content.decode import prefix_subject
from kanmon.model import (
    ClientInfo, Envelope, Reply, SmtpError, crlf_only, has_dot_line, missing_origin_fields, new_queue_id,
)
from kanmon.policy.pipeline import Context, Decision, Finding, Pending, Pipeline, Stage, outranks
from kanmon.scan import find_short, line_ends
from kanmon.smtp import replies
from kanmon.smtp.address import Path, parse_envid, parse_notify, parse_orcpt, parse_path, parse_ret

# RFC 5321 4.5.3.1.4 (512, including CRLF), plus what RFC 3461 4 adds to RCPT for
# ORCPT (500) and NOTIFY (14) and RFC 1870 and 3461 add to MAIL at most.
MAX_COMMAND_LINE = 512 + 500 + 14
# RFC 4954 4: an AUTH command with its initial response, and each line of the SASL
# exchange after it, may be up to 12288 octets (a Kerberos ticket, a long OAuth token).
MAX_AUTH_LINE = 12288 + 2
MAX_PIPELINE_BUFFER = 64 * 1024  # unprocessed input kept while a command waits
MAX_DISCARDED_LINE = 64 * 1024  # an over-long command line this long is an attack: 421 and close
# DATA held in memory before it goes to the listener's spill file in pieces (SpoolData):
# a message up to this size never leaves memory (the fast path); a bigger one costs this
# much per session, not its size.
DATA_BUFFER = 128 * 1024


# ---------------------------------------------------------------------------
# Actions: what the session asks its listener to do.


@dataclass(slots=True)
class Send:
    data: bytes


@dataclass(slots=True)
class Close:
    reason: str = ""


@dataclass(slots=True)
class StartTls:
    pass


@dataclass(slots=True)
class StoreMessage:
    """Make the message durable, then call message_stored() or message_failed()."""

    queue_id: str
    envelope: Envelope
    content: bytes  # Received: header + added headers + message, CRLF line ends, dot-unstuffed
    classification: str = "NotSpam"  # for the history row: what the checks said
    score: float = 0.0
    quarantine: str = ""  # a check asked to quarantine the message, for this reason
    discard: str = ""  # a check asked to discard the message (250, nothing stored), for this reason
    findings: tuple[Finding, ...] = ()  # what the checks found, recorded with the queue id
    quarantine_check: str = ""  # the check that asked for quarantine
    tagged: bool = False  # a check put a prefix before the Subject (history disposition Tag)


@dataclass(slots=True)
class SpoolData:
    """Append these bytes (checked, dot-unstuffed, CRLF) to this transaction's spill file.
    Only a message bigger than the DATA buffer is spilled; the first SpoolData of a
    transaction creates the file."""

    data: bytes


@dataclass(slots=True)
class ReadSpooled:
    """The spilled message is complete (size octets): read it back and call
    spooled_content() (or spool_failed() when it cannot be read), then remove the file."""

    size: int


@dataclass(slots=True)
class DropSpooled:
    """The spilled message is refused (too big, bare newline): remove the file unread."""


@dataclass(slots=True)
class Rejected:
    """A refused command, for the event log (the reply itself is in a Send)."""

    command: str
    reply: Reply
    envelope: Envelope | None = None
    rcpt: str = ""
    check: str = ""  # the check that refused ("" for a protocol error)
    classification: str = "Protocol"  # for the history row
    error: str = ""  # the check failed (timeout, exception) and its failure mode answered


@dataclass(slots=True)
class Authenticate:
    """Check these credentials, then call auth_result() (RFC 4954)."""

    mechanism: str
    username: str
    password: str


@dataclass(slots=True)
class RunChecks:
    """Await pending.resolve() (each check bounded by its timeout), carry out the
    decision's effects, then call check_result() with it."""

    pending: Pending


@dataclass(slots=True)
class CarryOut:
    """Side effects the checks asked for (a quota notice...), for the listener to carry out."""

    effects: tuple


Action = (Send | Close | StartTls | StoreMessage | Rejected | Authenticate | RunChecks | CarryOut | SpoolData
          | ReadSpooled | DropSpooled)


class State(enum.Enum):
    GREETING = "greeting"  # before HELO/EHLO
    READY = "ready"  # after HELO/EHLO, no transaction
    MAIL = "mail"  # MAIL accepted
    RCPT = "rcpt"  # at least one RCPT accepted
    DATA = "data"  # reading message content
    WAIT_STORE = "wait_store"  # content complete, the listener is storing it
    WAIT_CONTENT = "wait_content"  # a spilled message is complete, the listener reads it back
    WAIT_TLS = "wait_tls"  # 220 sent to STARTTLS, handshake pending
    AUTH_INPUT = "auth_input"  # 334 sent, the next line is the client's response
    WAIT_AUTH = "wait_auth"  # credentials handed to the listener
    WAIT_CHECK = "wait_check"  # a check needs I/O: the listener runs it (RunChecks)
    CLOSED = "closed"

    # Members are singletons compared by identity: the C-level identity hash (set
    # membership tests at every command), not Enum's hash of the name in Python.
    __hash__ = object.__hash__


# States in which no command line is read (the session waits, takes DATA, or is closed).
_NO_COMMANDS = frozenset({State.DATA, State.WAIT_STORE, State.WAIT_TLS, State.WAIT_AUTH, State.WAIT_CHECK,
                          State.WAIT_CONTENT, State.CLOSED})


@dataclass(slots=True)
class SessionSettings:
    hostname: str
    max_message_size: int
    max_recipients: int
    max_errors: int = 10
    tls_available: bool = True
    tls_active: bool = False  # implicit TLS listener
    submission: bool = False  # RFC 6409 port: AUTH offered after TLS, and required for MAIL
    sender_addresses: Callable[[str], set[str]] | None = None  # user -> envelope senders it may use
    profile: SessionProfile | None = None  # the client's session profile (None: a session without one, e.g. in tests)
    # Per-session limits of the profile (0: no limit). Each refusal names its profile key.
    max_messages: int = 0  # transactions (MAIL accepted) per session; the next MAIL gets 421
    max_header_size: int = 0  # octets of the header block; above it 552 5.3.4 at DATA
    max_ehlo: int = 0  # EHLO/HELO commands; the next one gets 421
    max_noop: int = 0
    max_rset: int = 0
    bare_lf: bool = False  # normalise a bare LF to CRLF (trusted clients) instead of refusing it
    data_buffer: int = DATA_BUFFER  # DATA kept in memory before the rest is spilled (SpoolData)

    def apply_profile(self, profile: SessionProfile) -> None:
        """Take the limits of a session profile (at connect, and again after AUTH)."""
        self.profile = profile
        self.max_message_size = profile.max_message_size
        self.max_recipients = profile.max_recipients
        self.max_errors = profile.max_errors
        self.max_messages = profile.max_messages_per_session
        self.max_header_size = profile.max_header_size
        self.max_ehlo = profile.max_ehlo
        self.max_noop = profile.max_noop
        self.max_rset = profile.max_rset
        self.bare_lf = profile.bare_newline == "normalize"


class LimitExceeded(SmtpError):
    """A profile limit refused a command; `check` is the profile key that did (for the
    event log and kanmon_checks_total). A 421 reply closes the session."""

    def __init__(self, reply: Reply, check: str):
        super().__init__(reply)
        self.check = check


@dataclass(slots=True)
class _Transaction:
    envelope: Envelope
    accepted_rcpts: int = 0
    original: list[str] = field(default_factory=list)
    headers: tuple[tuple[str, str], ...] = ()  # to add, from the checks at MAIL and RCPT
    score: float = 0.0
    quarantine: str = ""
    quarantine_check: str = ""
    classification: str = ""


class Session:
    _resume_state = State.READY  # the state to return to after WAIT_CHECK

    def __init__(self, settings: SessionSettings, pipeline: Pipeline, client: ClientInfo, now: float = 0.0):
        self.settings = settings
        self.pipeline = pipeline
        self.client = client
        self.state = State.GREETING
        self.tls_active = settings.tls_active
        self.esmtp = False
        self.errors = 0
        # Errors that follow from a refusal already counted, in a pipelined group (RFC 2920
        # 3.1: the client sends RCPT and DATA before it reads MAIL's and RCPT's replies):
        # 503 to the RCPTs after a refused MAIL and to the DATA after every RCPT was
        # refused. Those sent before the refusal's reply do not count toward max_errors
        # (bounded: one MAIL's worth of RCPTs and a DATA); the refusal itself did.
        self._excused = 0
        self.messages = 0
        self.transactions = 0  # MAIL commands accepted (max_messages)
        self.ehlos = self.noops = self.rsets = 0
        self._buf = bytearray()
        self._skip_line = False  # discarding an over-long line up to its LF
        self._skipped = 0  # bytes of that line discarded so far
        self.lines_read = 0  # complete command lines taken (the listener's per-command deadline)
        self._tx: _Transaction | None = None
        self._data = bytearray()
        self._scan_from = 0
        self._data_len = 0
        self._data_too_big = False
        self._spilling = False  # this message's content so far went out in SpoolData
        self._spilled_pre = 0  # octets spilled, before dot-unstuffing (CRLF line ends)
        self._spilled = 0  # octets spilled (what the message will be)
        self._spill_bad = False  # a bare CR or LF was in what was spilled
        self._line_start = True  # the next content octet begins a line
        self._dot_seen = False  # a line of this DATA starts with a dot (the scan for its end saw it)
        self._dot_kept = False  # a line of the message starts with a dot once unstuffed (it came as "..x")
        self._now = now
        self._auth_mech = ""  # mechanism waiting for input (AUTH_INPUT)
        self._auth_user = ""  # LOGIN: the user name given so far
        self._then: Callable[[Decision, list[Action]], None] | None = None  # WAIT_CHECK: what the decision continues
        self._pending: Pending | None = None

    # -- listener interface -------------------------------------------------------

    def greeting(self) -> list[Action]:
        out: list[Action] = []
        if self.pipeline.has_hooks(Stage.CONNECT, self.settings.profile):
            self._ask(Stage.CONNECT, Context(self.client), self._connect_decided, out)
        else:
            self._connect_decided(None, out)
        return out

    def _connect_decided(self, d: Decision | None, out: list[Action]) -> None:
        self._restore_state()
        if d is not None and not d.accepted:
            # RFC 5321 3.1: a server that will not serve this client says so in the greeting.
            assert d.reply is not None
            self.state = State.CLOSED
            out.append(Send(d.reply.wire()))
            out.append(Rejected("CONNECT", d.reply, None, "", d.check, d.classification, d.error))
            out.append(Close("refused at connect"))
            return
        out.append(Send(Reply(220, "", f"{self.settings.hostname} ESMTP kanmon").wire()))

    def set_time(self, now: float) -> None:
        """The listener tells the session the wall-clock time (for Received: dates)."""
        self._now = now

    @property
    def waiting(self) -> bool:
        return self.state in (State.WAIT_STORE, State.WAIT_TLS, State.WAIT_AUTH, State.WAIT_CHECK, State.WAIT_CONTENT)

    @property
    def in_data(self) -> bool:
        return self.state is State.DATA

    def feed(self, data: bytes) -> list[Action]:
        """Process client bytes; returns the actions to carry out, in order."""
        if self.state is State.CLOSED:
            return []
        out: list[Action] = []
        if self.state is State.DATA:
            self._feed_data(data, out)
        else:
            self._buf += data
        self._run(out)
        return out

    def buffered(self) -> int:
        """Unprocessed bytes held; the listener pauses reading above MAX_PIPELINE_BUFFER."""
        return len(self._buf)

    def message_stored(self, queue_id: str) -> list[Action]:
        if self.state is State.CLOSED:
            return []  # closed meanwhile (shutdown): nothing more to say
        assert self.state is State.WAIT_STORE
        self.messages += 1
        self._end_transaction()
        out: list[Action] = [Send(replies.queued(queue_id).wire())]
        self._run(out)
        return out

    def message_failed(self, reply: Reply) -> list[Action]:
        if self.state is State.CLOSED:
            return []  # closed meanwhile (shutdown): nothing more to say
        assert self.state is State.WAIT_STORE
        self._end_transaction()
        out: list[Action] = [Send(reply.wire())]
        self._run(out)
        return out

    def spooled_content(self, content: bytes) -> list[Action]:
        """The listener read the spilled message back (ReadSpooled): ask the checks."""
        if self.state is State.CLOSED:
            return []
        assert self.state is State.WAIT_CONTENT
        self.state = State.DATA
        out: list[Action] = []
        self._content_ready(content, out)
        self._run(out)
        return out

    def spool_failed(self, reply: Reply) -> list[Action]:
        """The spilled message could not be written or read back: refuse it (451)."""
        if self.state is State.CLOSED:
            return []
        assert self.state is State.WAIT_CONTENT
        self._end_transaction()
        out: list[Action] = [Send(reply.wire())]
        self._run(out)
        return out

    def tls_started(self, version: str, cipher: str, bits: int) -> list[Action]:
        if self.state is State.CLOSED:
            return []  # closed meanwhile (shutdown): nothing more to say
        assert self.state is State.WAIT_TLS
        # RFC 3207 4.2: forget everything, the client must EHLO again.
        self.tls_active = True
        self.client.tls_version, self.client.tls_cipher, self.client.tls_bits = version, cipher, bits
        self.client.helo = ""
        self.esmtp = False
        self._tx = None
        self.state = State.GREETING
        # Plaintext pipelined behind STARTTLS was dropped when 220 was sent (CVE-2011-0411);
        # what is buffered now came through the TLS layer after the handshake.
        out: list[Action] = []
        self._run(out)
        return out

    def auth_result(self, username: str | None, reply: Reply | None = None,
                    profile: SessionProfile | None = None) -> list[Action]:
        """The listener checked the credentials: username when they were right (and the
        profile of an authenticated client, "trusted" by default, whose limits apply from
        now on), or the reply to give (535 by default; 421 closes, for a blocked client)."""
        if self.state is State.CLOSED:
            return []
        assert self.state is State.WAIT_AUTH
        self.state = State.READY
        out: list[Action] = []
        if username:
            self.client.auth_user = username
            if profile is not None:
                self.settings.apply_profile(profile)
            out.append(Send(replies.AUTH_OK.wire()))
        else:
            reply = reply or replies.AUTH_FAILED
            if reply.code == 421:
                self.state = State.CLOSED
                out += [Send(reply.wire()), Close("auth blocked")]
                return out
            self._error(reply, "AUTH", out)
        self._run(out)
        return out

    def check_result(self, decision: Decision) -> list[Action]:
        """The listener resolved the pending checks (RunChecks) and carried out the effects
        of this decision: continue where the session stopped."""
        if self.state is State.CLOSED:
            return []  # closed meanwhile (shutdown, timeout): nothing more to say
        assert self.state is State.WAIT_CHECK and self._then is not None
        then, self._then, self._pending = self._then, None, None
        out: list[Action] = []
        then(decision, out)
        self._run(out)
        return out

    def close(self, reply: Reply | None = None) -> list[Action]:
        """Close from the listener's side (timeout, shutdown)."""
        if self.state is State.CLOSED:
            return []
        if self._pending is not None:
            self._pending.discard()  # never resolved: release what it holds
            self._pending = self._then = None
        self.state = State.CLOSED
        self._buf.clear()  # input not read yet is never read
        self._data = bytearray()
        out: list[Action] = []
        if reply is not None:
            out.append(Send(reply.wire()))
        out.append(Close(str(reply) if reply else ""))
        return out

    # -- command mode ----------------------------------------------------------------

    def _run(self, out: list[Action]) -> None:
        self._run_commands(out)
        if self.state is State.CLOSED:
            self._buf.clear()  # closed with input left (too many errors, QUIT): none of it is read
            self._data = bytearray()

    def _run_commands(self, out: list[Action]) -> None:
        while self.state not in _NO_COMMANDS:
            lf = self._buf.find(b"\n")
            if self._skip_line:
                if lf < 0:
                    self._skipped += len(self._buf)
                    self._buf.clear()
                    if self._skipped > MAX_DISCARDED_LINE:
                        # No client sends a 64 KiB command by mistake (a 1 GB "line" is an
                        # attack on memory or time): stop reading it.
                        self.state = State.CLOSED
                        out += [Send(replies.LINE_FLOOD.wire()), Close("command line flood")]
                    return
                del self._buf[: lf + 1]
                self._skip_line = False
                continue
            limit = MAX_COMMAND_LINE
            if self.state is State.AUTH_INPUT or self._buf[:5].upper() == b"AUTH ":
                limit = MAX_AUTH_LINE
            if lf < 0:
                if len(self._buf) > limit:
                    # RFC 5321 4.5.3.1.4: never buffer an unbounded line.
                    self._skipped = len(self._buf)
                    self._buf.clear()
                    self._skip_line = True
                    self._error(replies.LINE_TOO_LONG, "line", out)
                return
            if lf + 1 > limit:
                del self._buf[: lf + 1]
                self._error(replies.LINE_TOO_LONG, "line", out)
                continue
            raw = bytes(self._buf[:lf])
            del self._buf[: lf + 1]
            self.lines_read += 1
            if self._buf and self.client.helo and not self.esmtp and self.state is not State.AUTH_INPUT:
                # RFC 2920 / RFC 5321 4.1.1: a client that was not offered PIPELINING (it said
                # HELO) must wait for each reply. One that does not is a bulk sender or an
                # attack on reply synchronisation (Postfix smtpd_forbid_unauth_pipelining).
                self.state = State.CLOSED
                out += [Send(replies.UNAUTH_PIPELINING.wire()), Close("pipelining without PIPELINING")]
                return
            if raw.endswith(b"\r") and b"\r" not in raw[:-1]:
                line = raw[:-1]
            elif self.settings.bare_lf and b"\r" not in raw:
                line = raw  # a trusted client's bare LF ends the line as CRLF would
            else:
                # Bare LF (or bare CR inside the line): RFC 5321 2.3.8.
                self._tx = None
                if self.state in (State.MAIL, State.RCPT):
                    self.state = State.READY
                self._reject("line", replies.BARE_NEWLINE, out, check="bare_newline")
                continue
            if self.state is State.AUTH_INPUT:
                self._auth_input(line, out)
            else:
                self._command(line, out)
        if self.state is State.DATA and self._buf:
            pending = bytes(self._buf)
            self._buf.clear()
            self._feed_data(pending, out)
            self._run_commands(out)

    def _reject(self, command: str, reply: Reply | None, out: list[Action], envelope: Envelope | None = None,
                rcpt: str = "", decision: Decision | None = None, *, may_close: bool = True, check: str = "") -> None:
        """A refused command: its reply (None: 451 4.3.0), a Rejected for the records
        (naming the check when a decision or a limit refused), and one more error; at
        max_errors the session closes, unless may_close is False (after a message's
        content). A 421 reply closes the session."""
        reply = reply or replies.LOCAL_ERROR
        self.errors += 1
        # Only commands the client sent before this reply (already buffered) were pipelined.
        if command == "MAIL":
            self._excused = min(self._buf.count(b"\n"), self.settings.max_recipients + 1)
        elif command == "RCPT" and self._tx is not None and not self._tx.accepted_rcpts and b"\n" in self._buf:
            self._excused = max(self._excused, 1)
        out.append(Send(reply.wire()))
        if decision is None and not check and reply is replies.STRICT_SYNTAX:
            check = "strict_syntax"  # the profile's strict_syntax, named like a check's (events, metrics)
        if decision is not None:
            out.append(Rejected(command, reply, envelope, rcpt, decision.check, decision.classification, decision.error))
        elif check:
            out.append(Rejected(command, reply, envelope, rcpt, check, "Policy"))
        else:
            out.append(Rejected(command, reply, envelope, rcpt))
        if reply.code == 421:
            out.append(Close(str(reply)))
            self.state = State.CLOSED
        elif may_close and self.errors >= self.settings.max_errors:
            out.append(Send(replies.TOO_MANY_ERRORS.wire()))
            out.append(Rejected(command, replies.TOO_MANY_ERRORS, envelope, "", "max_errors", "Policy"))
            out.append(Close("too many errors"))
            self.state = State.CLOSED

    def _error(self, reply: Reply, command: str, out: list[Action]) -> None:
        """A protocol error (no check involved), in the transaction if there is one."""
        self._reject(command, reply, out, self._tx.envelope if self._tx else None)

    def _command(self, line: bytes, out: list[Action]) -> None:
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            self._error(replies.SYNTAX_PARAMS, "line", out)
            return
        verb, _, arg = text.partition(" ")
        verb = verb.upper()
        handler = _HANDLERS.get(verb)
        if handler is None:
            self._error(replies.UNKNOWN_COMMAND, verb[:20] or "empty", out)
            return
        try:
            handler(self, arg, out)
        except LimitExceeded as e:
            self._reject(verb, e.reply, out, self._tx.envelope if self._tx else None, check=e.check)
        except SmtpError as e:
            self._error(e.reply, verb, out)

    @property
    def _strict_syntax(self) -> bool:
        profile = self.settings.profile
        return profile is not None and profile.strict_syntax

    def _reply(self, reply: Reply, out: list[Action]) -> None:
        out.append(Send(reply.wire()))

    # -- the check pipeline ----------------------------------------------------------------

    def _ask(self, stage: Stage, ctx: Context, then: Callable[[Decision, list[Action]], None], out: list[Action]) -> None:
        """Ask the pipeline; continue with then(decision, out) now, or once the listener
        has run the checks that need I/O (state WAIT_CHECK, input stays buffered)."""
        ctx.profile = self.settings.profile
        d = self.pipeline.run(stage, ctx)
        if isinstance(d, Decision):
            if d.effects:
                out.append(CarryOut(d.effects))
            then(d, out)
            return
        self._then = then
        self._pending = d
        self._resume_state = self.state
        self.state = State.WAIT_CHECK
        out.append(RunChecks(d))

    def _restore_state(self) -> None:
        if self.state is State.WAIT_CHECK:
            self.state = self._resume_state

    def _end_transaction(self) -> None:
        self._tx = None
        self._data = bytearray()
        self._data_len = 0
        self._data_too_big = False
        self._spilling = False
        if self.state is not State.CLOSED:
            self.state = State.READY

    # -- commands (RFC 5321 4.1.1) -------------------------------------------------------

    def _count_greeting(self) -> None:
        self.ehlos += 1
        if self.settings.max_ehlo and self.ehlos > self.settings.max_ehlo:
            raise LimitExceeded(replies.TOO_MANY_EHLO, "max_ehlo")

    def _ehlo(self, arg: str, out: list[Action]) -> None:
        self._count_greeting()
        name = arg.strip()
        if not name or " " in name:
            raise SmtpError(replies.EHLO_SYNTAX)
        self.client.helo = name
        self.client.proto = "ESMTPS" if self.tls_active else "ESMTP"
        self.esmtp = True
        self._tx = None
        self.state = State.READY
        lines = [
            self.settings.hostname,  # the client's name is not echoed (as Postfix): it may carry controls
            "PIPELINING",
            f"SIZE {self.settings.max_message_size}",
            "8BITMIME",
            "ENHANCEDSTATUSCODES",
            "SMTPUTF8",
            "DSN",  # RFC 3461: RET, ENVID on MAIL; NOTIFY, ORCPT on RCPT
        ]
        if self.settings.tls_available and not self.tls_active:
            lines.append("STARTTLS")
        if self.settings.submission and self.tls_active:
            lines.append("AUTH PLAIN LOGIN")  # RFC 4954; only over TLS (RFC 8314 / smtpd_tls_auth_only)
        self._ask_helo("EHLO", Reply(250, "", "\n".join(lines)), out)

    def _ask_helo(self, command: str, reply: Reply, out: list[Action]) -> None:
        if not self.pipeline.has_hooks(Stage.HELO, self.settings.profile):
            self._reply(reply, out)
            return

        def decided(d: Decision, out: list[Action]) -> None:
            self._restore_state()
            if d.accepted:
                self._reply(reply, out)
                return
            self.client.helo = ""  # refused: the client must greet again
            self.esmtp = False
            self.state = State.GREETING
            self._reject(command, d.reply, out, decision=d)

        self._ask(Stage.HELO, Context(self.client), decided, out)

    def _helo(self, arg: str, out: list[Action]) -> None:
        self._count_greeting()
        name = arg.strip()
        if not name or " " in name:
            raise SmtpError(replies.HELO_SYNTAX)
        self.client.helo = name
        self.client.proto = "SMTP"
        self.esmtp = False
        self._tx = None
        self.state = State.READY
        self._ask_helo("HELO", Reply(250, "", self.settings.hostname), out)

    def _mail(self, arg: str, out: list[Action]) -> None:
        if self.state is State.GREETING:
            raise SmtpError(replies.NEED_HELO)
        if self._tx is not None:
            raise SmtpError(replies.NESTED_MAIL)
        if not arg[:5].upper() == "FROM:":
            raise SmtpError(replies.MAIL_SYNTAX)
        if self.settings.max_messages and self.transactions >= self.settings.max_messages:
            raise LimitExceeded(replies.TOO_MANY_MESSAGES, "max_messages_per_session")
        if self.settings.submission and not self.client.auth_user:
            raise SmtpError(replies.AUTH_REQUIRED)  # RFC 6409 4.3
        path = parse_path(arg[5:], is_sender=True, smtputf8_allowed=self.esmtp, strict=self._strict_syntax)
        if self.client.auth_user and path.address and self.settings.sender_addresses is not None:
            # RFC 6409 8.1: an authenticated user sends as itself (or one of its aliases).
            if path.address.lower() not in self.settings.sender_addresses(self.client.auth_user):
                raise SmtpError(replies.SENDER_NOT_OWNED)
        env = Envelope(mail_from=path.address, client=self.client)
        for key, value in path.params.items():
            if not self.esmtp:
                raise SmtpError(replies.PARAM_UNKNOWN)
            if key == "SIZE":
                # RFC 1870: refuse at MAIL when the declared size is over the limit.
                if value is None or not value.isdigit() or len(value) > 20:
                    raise SmtpError(replies.bad_parameter(key))
                env.size_hint = int(value)
                if env.size_hint > self.settings.max_message_size:
                    raise LimitExceeded(replies.MESSAGE_TOO_BIG, "max_message_size")
            elif key == "BODY":
                if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                    raise SmtpError(replies.bad_parameter(key))
                env.body_8bit = value.upper() == "8BITMIME"
            elif key == "SMTPUTF8":
                if value is not None:
                    raise SmtpError(replies.bad_parameter(key))
                env.smtputf8 = True
            elif key == "RET":
                env.dsn_ret = parse_ret(value)  # RFC 3461 4.3
            elif key == "ENVID":
                env.dsn_envid = parse_envid(value)  # RFC 3461 4.4
            else:
                raise SmtpError(replies.PARAM_UNKNOWN)
        self._ask(Stage.MAIL, Context(self.client, env, sender=path), lambda d, out: self._mail_decided(env, d, out), out)

    def _mail_decided(self, env: Envelope, d: Decision, out: list[Action]) -> None:
        self._restore_state()
        if not d.accepted:
            self._reject("MAIL", d.reply, out, env, decision=d)  # the event and history name the sender
            return
        tx = self._tx = _Transaction(env)
        self._excused = 0
        self.transactions += 1
        _merge(tx, d)
        self.state = State.MAIL
        self._reply(replies.SENDER_OK, out)

    def _rcpt(self, arg: str, out: list[Action]) -> None:
        if self._tx is None:
            if self._excused:  # after a refused MAIL, pipelined
                self._excused -= 1
                self.errors -= 1
            raise SmtpError(replies.NEED_MAIL if self.state is not State.GREETING else replies.NEED_HELO)
        if not arg[:3].upper() == "TO:":
            raise SmtpError(replies.RCPT_SYNTAX)
        if self._tx.accepted_rcpts >= self.settings.max_recipients:
            # RFC 5321 4.5.3.1.10: 452 and the client sends the rest later.
            self.errors -= 1  # not the client's fault; never counts toward max_errors
            raise LimitExceeded(replies.TOO_MANY_RECIPIENTS, "max_recipients")
        path = parse_path(arg[3:], is_sender=False, smtputf8_allowed=self._tx.envelope.smtputf8, strict=self._strict_syntax)
        notify = orcpt = ""
        try:
            for key, value in path.params.items():
                if not self.esmtp:
                    raise SmtpError(replies.PARAM_UNKNOWN)
                if key == "NOTIFY":
                    notify = parse_notify(value)  # RFC 3461 4.1
                elif key == "ORCPT":
                    orcpt = parse_orcpt(value)  # RFC 3461 4.2
                else:
                    raise SmtpError(replies.PARAM_UNKNOWN)
        except SmtpError as e:
            # The address parsed: the refusal names it (to=<..>, the history row), as Postfix logs it.
            self._reject("RCPT", e.reply, out, self._tx.envelope, path.address)
            return
        self._ask(Stage.RCPT, Context(self.client, self._tx.envelope, rcpt=path),
                  lambda d, out: self._rcpt_decided(path, d, out, notify, orcpt), out)

    def _rcpt_decided(self, path: Path, d: Decision, out: list[Action], notify: str = "", orcpt: str = "") -> None:
        self._restore_state()
        tx = self._tx
        assert tx is not None
        if not d.accepted:
            self._reject("RCPT", d.reply, out, tx.envelope, path.address, d)
            return
        env = tx.envelope
        for target in d.recipients:
            if target not in env.rcpts:
                env.rcpts.append(target)
                if target != path.address:
                    env.original_rcpts[target] = path.address
                # Each final recipient of an alias keeps what its RCPT asked (RFC 3461 4.1, 4.2).
                if notify:
                    env.dsn_notify[target] = notify
                if orcpt:
                    env.dsn_orcpt[target] = orcpt
        _merge(tx, d)
        tx.accepted_rcpts += 1
        self.state = State.RCPT
        self._reply(replies.RCPT_OK, out)

    def _data_cmd(self, arg: str, out: list[Action]) -> None:
        if arg.strip():
            raise SmtpError(replies.SYNTAX_PARAMS)
        excused, self._excused = self._excused, 0  # the pipelined group ends here
        if self._tx is None or self.state is not State.RCPT:
            if excused:  # after a refused MAIL, or every RCPT refused
                self.errors -= 1
            if self._tx is None:
                raise SmtpError(replies.NEED_MAIL if self.state is not State.GREETING else replies.NEED_HELO)
            raise SmtpError(replies.NEED_RCPT)
        self.state = State.DATA
        # A virtual CRLF before the content lets ".\r\n" as the very first line end DATA.
        self._data = bytearray(b"\r\n")
        self._scan_from = 0
        self._data_len = 0
        self._data_too_big = False
        self._spilling = self._spill_bad = False
        self._spilled_pre = self._spilled = 0
        self._line_start = True
        self._dot_seen = self._dot_kept = False
        self._reply(replies.START_DATA, out)

    def _rset(self, arg: str, out: list[Action]) -> None:
        self.rsets += 1
        if self.settings.max_rset and self.rsets > self.settings.max_rset:
            raise LimitExceeded(replies.TOO_MANY_RSET, "max_rset")
        self._tx = None
        self._excused = 0
        if self.state not in (State.GREETING,):
            self.state = State.READY
        self._reply(replies.RSET_OK, out)

    def _noop(self, arg: str, out: list[Action]) -> None:
        self.noops += 1
        if self.settings.max_noop and self.noops > self.settings.max_noop:
            raise LimitExceeded(replies.TOO_MANY_NOOP, "max_noop")
        self._reply(replies.NOOP_OK, out)

    def _quit(self, arg: str, out: list[Action]) -> None:
        self.state = State.CLOSED
        self._reply(replies.BYE, out)
        out.append(Close("QUIT"))

    def _vrfy(self, arg: str, out: list[Action]) -> None:
        # RFC 5321 3.5.3: 252 neither confirms nor denies (no address harvesting).
        self._reply(replies.VRFY_CANNOT, out)

    def _help(self, arg: str, out: list[Action]) -> None:
        self._reply(replies.HELP, out)

    def _starttls(self, arg: str, out: list[Action]) -> None:
        if arg.strip():
            raise SmtpError(replies.SYNTAX_PARAMS)
        if self.tls_active:
            raise SmtpError(replies.ALREADY_TLS)
        if not self.settings.tls_available:
            raise SmtpError(replies.TLS_NOT_AVAILABLE)
        if self.state is State.GREETING and not self.esmtp and not self.client.helo:
            pass  # RFC 3207 allows STARTTLS right after EHLO; be liberal before it too
        self._reply(replies.READY_TLS, out)
        self._buf.clear()  # CVE-2011-0411: discard whatever was pipelined behind STARTTLS
        self.state = State.WAIT_TLS
        out.append(StartTls())

    # -- AUTH (RFC 4954; PLAIN RFC 4616; LOGIN draft-murchison-sasl-login) ------------------

    def _auth(self, arg: str, out: list[Action]) -> None:
        if not self.settings.submission:
            raise SmtpError(replies.UNKNOWN_COMMAND)
        if self.state is State.GREETING or not self.esmtp:
            raise SmtpError(replies.NEED_HELO)
        if not self.tls_active:
            raise SmtpError(replies.ENCRYPTION_REQUIRED)  # RFC 4954 4: 538 5.7.11
        if self.client.auth_user:
            raise SmtpError(replies.ALREADY_AUTHENTICATED)
        if self._tx is not None:
            raise SmtpError(replies.AUTH_IN_TRANSACTION)
        mech, _, initial = arg.strip().partition(" ")
        mech = mech.upper()
        initial = initial.strip()
        if mech == "PLAIN":
            self._auth_mech = "PLAIN"
            if initial:
                self._auth_input(initial.encode(), out)
            else:
                self.state = State.AUTH_INPUT
                self._reply(Reply(334, "", ""), out)
        elif mech == "LOGIN":
            self._auth_mech = "LOGIN"
            self._auth_user = ""
            if initial:
                self._auth_input(initial.encode(), out)
            else:
                self.state = State.AUTH_INPUT
                self._reply(Reply(334, "", "VXNlcm5hbWU6"), out)  # "Username:"
        else:
            raise SmtpError(replies.AUTH_MECHANISM)

    def _auth_input(self, line: bytes, out: list[Action]) -> None:
        self.state = State.READY
        text = line.strip()
        if text == b"*":
            self._error(replies.AUTH_ABORTED, "AUTH", out)  # RFC 4954 4: client cancelled
            return
        try:
            decoded = base64.b64decode(text, validate=True) if text not in (b"", b"=") else b""
            value = decoded.decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            self._error(replies.AUTH_BAD_BASE64, "AUTH", out)
            return
        if self._auth_mech == "LOGIN" and not self._auth_user:
            if not value:
                self._error(replies.AUTH_BAD_BASE64, "AUTH", out)
                return
            self._auth_user = value
            self.state = State.AUTH_INPUT
            self._reply(Reply(334, "", "UGFzc3dvcmQ6"), out)  # "Password:"
            return
        if self._auth_mech == "LOGIN":
            user, password = self._auth_user, value
        else:
            parts = value.split("\x00")  # authzid NUL authcid NUL passwd (RFC 4616 2)
            if len(parts) != 3 or not parts[1] or (parts[0] and parts[0] != parts[1]):
                self._error(replies.AUTH_BAD_BASE64, "AUTH", out)
                return
            user, password = parts[1], parts[2]
        self.state = State.WAIT_AUTH
        out.append(Authenticate(self._auth_mech, user, password))

    # -- DATA (RFC 5321 4.1.1.4, 4.5.2) ------------------------------------------------

    def _feed_data(self, data: bytes, out: list[Action]) -> None:
        limit = self.settings.max_message_size
        self._data += data
        self._data_len += len(data)
        if self.settings.bare_lf:
            self._feed_data_lf(out)
            return
        if self._dot_seen:
            end = self._data.find(b"\r\n.\r\n", self._scan_from)
        else:
            end = self._find_end_noting_dots()
        if end < 0:
            if self._data_len > limit + 4096:
                # Too big: keep reading to the end, keep only the tail for the scan.
                self._too_big(out)
                del self._data[:-4]
                self._scan_from = 0
            elif len(self._data) > self.settings.data_buffer:
                self._spill(out)
                self._scan_from = 0
            else:
                self._scan_from = max(0, len(self._data) - 4)
            return
        rest = bytes(self._data[end + 5 :])
        content = bytes(self._data[2 : end + 2])  # drop the context (virtual CRLF), keep the last CRLF
        self._data = bytearray()
        self._buf[:0] = rest  # pipelined commands after the dot
        if self._spilling:
            self._finish_spilled(content, out)
            return
        self._finish_data(content, out)

    def _find_end_noting_dots(self) -> int:
        """Where <CRLF>.<CRLF> starts (-1: not read yet), found by a scan for "<CRLF>."
        that notes a line starting with a dot on its way (the virtual CRLF before the
        content covers the first line). Most messages have none: then the only hit is the
        end, the scan costs what the search for the end alone costs, and neither the
        unstuffing nor the outbound client need look for dots again (Envelope.no_dot_lines).
        After the first such line, the search for the end alone goes on."""
        data = self._data
        i = find_short(data, b"\r\n.", self._scan_from)
        if i < 0:
            return -1
        after = data[i + 3 : i + 5]
        if after == b"\r\n":
            return i
        if after in (b"", b"\r"):
            return -1  # not read yet: the caller scans again from at most 4 octets back
        self._dot_seen = True
        return data.find(b"\r\n.\r\n", i)

    def _feed_data_lf(self, out: list[Action]) -> None:
        """DATA from a client whose bare LF is normalised: a "." line ends it whether the
        lines around it end in CRLF or LF (<LF>.<LF>, <LF>.<CRLF>; as Postfix before
        3.9, which still serves $mynetworks so). Such a client is trusted not to smuggle.
        One scan for "<LF>." per read (kanmon.scan.find_short); a CRLF-only message is not copied again."""
        data = self._data
        pos = self._scan_from
        n = len(data)
        while True:
            i = find_short(data, b"\n.", pos)
            if i < 0 or i + 2 >= n:
                if self._data_len > self.settings.max_message_size + 4096:
                    self._too_big(out)  # too big: read to the end, keep only the tail
                    del self._data[:-4]
                    self._scan_from = 0
                elif n > self.settings.data_buffer:
                    self._spill(out)
                    self._scan_from = 0
                else:
                    self._scan_from = i if i >= 0 else max(0, n - 1)
                return
            c = data[i + 2]
            if c == 10:  # <LF>.<LF>
                end, after = i, i + 3
                break
            if c == 13:
                if i + 3 >= n:
                    if self._data_len > self.settings.max_message_size + 4096:
                        self._too_big(out)
                        del self._data[:-4]
                        self._scan_from = 0
                    elif n > self.settings.data_buffer:
                        self._spill(out)
                        self._scan_from = 0
                    else:
                        self._scan_from = i  # <LF>.<CR> and the rest not read yet
                    return
                if data[i + 3] == 10:  # <LF>.<CRLF>
                    end, after = i, i + 4
                    break
            self._dot_seen = True  # a line starts with a dot
            pos = i + 2
        rest = bytes(data[after:])
        content = bytes(data[2 : end + 1])  # drop the context (virtual CRLF), keep the last line end
        self._data = bytearray()
        self._buf[:0] = rest
        if self._spilling:
            self._finish_spilled(content, out)
            return
        crlf, cr, lf = line_ends(content)
        if not crlf == cr == lf:
            if cr != crlf:
                self._finish_data(content, out)  # a bare CR: refused there
                return
            # bare LFs: every line end becomes CRLF
            content = (content.replace(b"\r\n", b"\n") if crlf else content).replace(b"\n", b"\r\n")
        self._finish_data(content, out, checked=True)

    def _finish_data(self, content: bytes, out: list[Action], checked: bool = False) -> None:
        """checked: the line ends are known to be CRLF only (normalised)."""
        tx = self._tx
        assert tx is not None
        if self._data_too_big or len(content) > self.settings.max_message_size + 2:
            self._end_transaction()
            self._reject("DATA", replies.MESSAGE_TOO_BIG, out, tx.envelope, may_close=False, check="max_message_size")
            return
        # Every CR must be followed by LF and every LF preceded by CR (one pass: kanmon.scan.line_ends).
        if not checked and not crlf_only(content):
            self._end_transaction()
            self._reject("DATA", replies.BARE_NEWLINE, out, tx.envelope, may_close=False, check="bare_newline")
            return
        # RFC 5321 4.5.2: a line that starts with a dot (and has more: "." alone ended DATA)
        # loses that dot, whether the client doubled it ("..x") or not (".x"), as Postfix's
        # smtpd does. No line starts with one: nothing to do.
        if self._dot_seen:
            if content.startswith(b"."):
                content = content[1:]
            content = content.replace(b"\r\n.", b"\r\n")
            self._dot_kept = has_dot_line(content)
        if len(content) > self.settings.max_message_size:
            self._end_transaction()
            self._reject("DATA", replies.MESSAGE_TOO_BIG, out, tx.envelope, may_close=False, check="max_message_size")
            return
        self._content_ready(content, out)

    def _content_ready(self, content: bytes, out: list[Action]) -> None:
        """The whole message, checked and dot-unstuffed: the header limit, then the checks."""
        tx = self._tx
        assert tx is not None
        header_end = content.find(b"\r\n\r\n")
        if self.settings.max_header_size and (
                len(content) if header_end < 0 else header_end + 2) > self.settings.max_header_size:
            self._end_transaction()
            self._reject("DATA", replies.HEADER_TOO_BIG, out, tx.envelope, may_close=False, check="max_header_size")
            return
        if self.client.auth_user:
            # Submission (RFC 6409 8.2, 8.3): a missing Date: or Message-ID: is added, as
            # Postfix's cleanup does for its local clients; before the checks see the
            # message, and before DKIM signs it (docs/mail-clients.md, "Date and Message-ID").
            added = missing_origin_fields(content, self._now or time.time(), self.settings.hostname)
            if added:
                content = added + content
                header_end = content.find(b"\r\n\r\n")
        ctx = Context(self.client, tx.envelope, content=content, header_end=header_end)
        no_dots = not self._dot_kept
        self._ask(Stage.DATA, ctx, lambda d, out: self._data_decided(content, no_dots, d, out), out)

    # -- a message bigger than the DATA buffer: spilled as it arrives ------------------------
    #
    # self._data always begins with two octets of context: the virtual CRLF before the
    # first line, then the last two octets already spilled. A cut never splits a CRLF, a
    # "<LF>." (a dot-stuffed line start or the terminator) or the terminator's last four
    # octets, so each piece is checked (bare CR/LF), normalised (a trusted client's bare LF)
    # and dot-unstuffed on its own, with the same counts (kanmon.scan.line_ends) and replaces as a whole
    # message, and the result is the same octets (tests/protocol/test_session_spill.py).

    def _spill(self, out: list[Action]) -> None:
        data = self._data
        q = len(data) - 4
        while q > 2 and (data[q - 1] == 13 or (data[q - 1] == 46 and data[q - 2] == 10)):
            q -= 1
        if q <= 2:
            return
        piece = bytes(data[2:q])
        line_start = self._line_start
        self._line_start = data[q - 1] == 10
        del data[: q - 2]
        self._spilling = True
        piece = self._clean_piece(piece, line_start)
        if piece:
            out.append(SpoolData(piece))

    def _clean_piece(self, piece: bytes, line_start: bool) -> bytes:
        """One piece of content: counted, checked for bare CR/LF (or normalised), unstuffed."""
        crlf, cr, lf = line_ends(piece)
        if crlf == cr == lf:
            pass
        elif not self.settings.bare_lf or cr != crlf:
            self._spill_bad = True
        else:
            piece = (piece.replace(b"\r\n", b"\n") if crlf else piece).replace(b"\n", b"\r\n")
        self._spilled_pre += len(piece)
        if self._spill_bad:
            return b""  # refused at the end: nothing more is written
        if self._dot_seen:  # the scan for the end has seen every line start of the piece
            if line_start and piece.startswith(b"."):
                piece = piece[1:]  # RFC 5321 4.5.2, as in _finish_data
            piece = piece.replace(b"\r\n.", b"\r\n")
            if (line_start and piece.startswith(b".")) or b"\r\n." in piece:
                self._dot_kept = True
        self._spilled += len(piece)
        return piece

    def _too_big(self, out: list[Action]) -> None:
        self._data_too_big = True
        if self._spilling:
            self._spilling = False  # read to the end, refused there; nothing more is written
            out.append(DropSpooled())

    def _finish_spilled(self, tail: bytes, out: list[Action]) -> None:
        tx = self._tx
        assert tx is not None
        tail = self._clean_piece(tail, self._line_start)
        limit = self.settings.max_message_size
        reply, check = None, ""
        if self._spilled_pre > limit + 2:
            reply, check = replies.MESSAGE_TOO_BIG, "max_message_size"
        elif self._spill_bad:
            reply, check = replies.BARE_NEWLINE, "bare_newline"
        elif self._spilled > limit:
            reply, check = replies.MESSAGE_TOO_BIG, "max_message_size"
        if reply is not None:
            out.append(DropSpooled())
            self._end_transaction()
            self._reject("DATA", reply, out, tx.envelope, may_close=False, check=check)
            return
        if tail:
            out.append(SpoolData(tail))
        self._spilling = False
        self.state = State.WAIT_CONTENT
        out.append(ReadSpooled(self._spilled))

    def _data_decided(self, content: bytes, no_dots: bool, d: Decision, out: list[Action]) -> None:
        """no_dots: no line of content starts with a dot (the scan at DATA saw none)."""
        tx = self._tx
        assert tx is not None
        if not d.accepted:
            self._end_transaction()
            self._reject("DATA", d.reply, out, tx.envelope, decision=d, may_close=False)  # as the other DATA refusals
            return
        _merge(tx, d)
        rewritten = d.content is not None
        if rewritten:
            content = d.content  # a check rewrote the message (a forged field removed, the Subject tagged)
        queue_id = new_queue_id(self._now or None)
        env = tx.envelope
        env.received_at = self._now
        env.crlf_checked = True  # checked above: only CRLF line ends
        env.client = self.client
        amend = d.amend
        if amend is not None:
            if amend.subject_prefix:
                content = prefix_subject(content, amend.subject_prefix)
                rewritten = True
            if amend.redirect or amend.bcc:
                _reroute(env, amend.redirect, amend.bcc)
        trace = self._received_header(queue_id, env)
        if tx.headers:
            trace += _header_lines(tx.headers)  # a content rule's field name may start with a dot
        # What is stored is said of, whatever changed it: a rewritten message is scanned again.
        env.no_dot_lines = not has_dot_line(trace) and (not has_dot_line(content) if rewritten else no_dots)
        self.state = State.WAIT_STORE
        out.append(StoreMessage(queue_id, env, trace + content, tx.classification or "NotSpam", tx.score, tx.quarantine,
                                amend.discard if amend is not None else "", d.findings, tx.quarantine_check,
                                d.tagged or bool(amend is not None and amend.subject_prefix)))

    def _received_header(self, queue_id: str, env: Envelope) -> bytes:
        """RFC 5321 4.4 trace field, folded like Postfix's."""
        c = self.client
        # RFC 3848 (ESMTPS/ESMTPA/ESMTPSA) and RFC 6531 3.7.3: a transaction with the
        # SMTPUTF8 parameter is UTF8SMTP, UTF8SMTPS, UTF8SMTPA or UTF8SMTPSA.
        if env.smtputf8:
            proto = "UTF8SMTP"
        else:
            proto = "ESMTP" if self.esmtp or c.auth_user or self.tls_active else "SMTP"
        if proto != "SMTP":
            proto += ("S" if self.tls_active else "") + ("A" if c.auth_user else "")
        c.proto = proto  # the accept line's proto= and the queue file say the same
        helo = _printable(c.helo or "unknown")
        lines = [f"Received: from {helo} ({_printable(c.name)} [{c.ip}])"]
        if self.tls_active and c.tls_version:
            lines.append(f"\t(using {c.tls_version} with cipher {c.tls_cipher} ({c.tls_bits}/{c.tls_bits} bits))")
        lines.append(f"\tby {self.settings.hostname} (kanmon) with {proto} id {queue_id}")
        if len(env.rcpts) == 1:
            lines.append(f"\tfor <{_printable(env.rcpts[0])}>; {_received_date(self._now)}")
        else:
            lines.append(f"\t; {_received_date(self._now)}")
        return ("\r\n".join(lines) + "\r\n").encode("utf-8", "replace")


_DATE_CACHE: tuple[int, int, str] = (-1, 0, "")


def _received_date(now: float | None) -> str:
    """The Received: header's date (RFC 5322, local time), formatted once per second:
    email.utils.formatdate is a noticeable share of a small message's accept cost."""
    global _DATE_CACHE
    second = int(now or time.time())
    cached = _DATE_CACHE
    if cached[0] == second and cached[1] == time.timezone:  # a test's tzset() changes the zone
        return cached[2]
    text = formatdate(second, localtime=True)
    _DATE_CACHE = (second, time.timezone, text)
    return text


def _reroute(env: Envelope, redirect: tuple[str, ...], bcc: tuple[str, ...]) -> None:
    """A content check redirected the message (its recipients replaced) or added bcc
    recipients. A recipient added here asked for no DSN of its own: failures go to the
    sender as for any other recipient."""
    if redirect:
        env.rcpts = []
        env.original_rcpts = {}
        env.dsn_notify = {}
        env.dsn_orcpt = {}
    for addr in (*redirect, *bcc):
        if addr not in env.rcpts:
            env.rcpts.append(addr)


def _merge(tx: _Transaction, d: Decision) -> None:
    """Keep what an accepting decision adds to the message (headers, score...)."""
    if d.headers:
        tx.headers += d.headers
    if d.score:
        tx.score += d.score
    if d.quarantine and not tx.quarantine:
        tx.quarantine = d.quarantine
        tx.quarantine_check = d.quarantine_check
    if d.classification and outranks(d.classification, tx.classification):
        tx.classification = d.classification


_FIELD_VALUE_BREAK = re.compile(r"[\r\n\x00]+")


def _header_lines(headers: tuple[tuple[str, str], ...]) -> bytes:
    """Header fields the checks add (a value may quote the network: no line breaks)."""
    return "".join(f"{name}: {_FIELD_VALUE_BREAK.sub(' ', value)}\r\n" for name, value in headers).encode("utf-8", "replace")


_UNPRINTABLE = re.compile(r"[^\x21-\x7e\u00a0-\uffff]")


def _printable(text: str) -> str:
    return _UNPRINTABLE.sub("?", text)[:255]


_HANDLERS = {
    "EHLO": Session._ehlo,
    "HELO": Session._helo,
    "MAIL": Session._mail,
    "RCPT": Session._rcpt,
    "DATA": Session._data_cmd,
    "RSET": Session._rset,
    "NOOP": Session._noop,
    "QUIT": Session._quit,
    "VRFY": Session._vrfy,
    "HELP": Session._help,
    "STARTTLS": Session._starttls,
    "AUTH": Session._auth,
}
