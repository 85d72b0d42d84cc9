"""Data passed between stages: queue ids, addresses, envelopes, replies, delivery results.

Role: plain values only. No I/O, no clocks except where a caller passes a time.
Trusts: its callers; parsing of untrusted text lives in smtp/ and policy/.
"""

from __future__ import annotations

import os
import re
import threading
import time
from dataclasses import dataclass, field
from email.utils import formatdate
from enum import Enum
from typing import Any

from kanmon.scan import line_ends

# ---------------------------------------------------------------------------
# Queue ids: sortable by arrival, unique across processes and restarts.
# 10 characters of time (microseconds, base 32) + 4 of process/counter entropy,
# like Postfix's long queue ids.

_ALPHABET = "0123456789BCDFGHJKLMNPQRSTVWXYZb"  # no vowels: ids never spell words
_counter_lock = threading.Lock()
_counter = int.from_bytes(os.urandom(2), "big")


def _b32(n: int, width: int) -> str:
    out = []
    for _ in range(width):
        out.append(_ALPHABET[n & 31])
        n >>= 5
    return "".join(reversed(out))


def new_queue_id(now: float | None = None) -> str:
    global _counter
    with _counter_lock:
        _counter = (_counter + 1) & 0xFFFFF
        c = _counter
    t = int((time.time() if now is None else now) * 1_000_000)
    return _b32(t, 11) + _b32(c ^ (os.getpid() << 4), 4)


def is_queue_id(text: str) -> bool:
    return len(text) == 15 and all(ch in _ALPHABET for ch in text)


# ---------------------------------------------------------------------------
# Replies


@dataclass(frozen=True, slots=True)
class Reply:
    """An SMTP reply: code, enhanced status code (RFC 3463), text."""

    code: int
    enhanced: str
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}" if self.enhanced else f"{self.code} {self.text}"

    @property
    def is_positive(self) -> bool:
        return 200 <= self.code < 400

    @property
    def is_transient(self) -> bool:
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        return self.code >= 500

    def wire(self) -> bytes:
        """CRLF-terminated reply line(s); a multi-line text becomes 250-... lines."""
        text = self.text
        if "\n" not in text:  # one line: most replies (the SMTP session sends seven a message)
            if self.enhanced:
                return f"{self.code} {self.enhanced} {text}\r\n".encode("utf-8", "replace")
            return f"{self.code} {text}\r\n".encode("utf-8", "replace")
        lines = text.split("\n")
        out = []
        for i, line in enumerate(lines):
            sep = "-" if i < len(lines) - 1 else " "
            prefix = f"{self.code}{sep}{self.enhanced} " if self.enhanced else f"{self.code}{sep}"
            out.append(prefix + line + "\r\n")
        return "".join(out).encode("utf-8", "replace")


@dataclass(frozen=True, slots=True)
class LocalReply(Reply):
    """A reply kanmon made up itself (connection refused, timeout, TLS missing...).

    Logged as its bare text (`stat=Deferred: Connection refused by 192.0.2.7`), and put
    in a DSN as `Diagnostic-Code: X-Kanmon; ...` rather than `smtp; ...`, because no
    server said it.
    """


def describe_reply(reply: Reply) -> str:
    """Text for the event log: a server's reply as `451 4.3.0 text`, ours as bare text."""
    return reply.text if isinstance(reply, LocalReply) else str(reply).replace("\n", " ")


class SmtpError(Exception):
    """The one error type that carries an SMTP reply (DESIGN.md promise 7)."""

    def __init__(self, reply: Reply):
        self.reply = reply
        super().__init__(str(reply))


# ---------------------------------------------------------------------------
# Envelopes


@dataclass(slots=True)
class ClientInfo:
    """Who is talking to us (the real client after a PROXY header)."""

    ip: str
    port: int = 0
    name: str = "unknown"  # reverse DNS name, when looked up
    helo: str = ""
    proto: str = "SMTP"  # SMTP | ESMTP | ESMTPS | ESMTPA | ESMTPSA | UTF8SMTP[S][A] (RFC 6531 3.7.3)
    tls_version: str = ""
    tls_cipher: str = ""
    tls_bits: int = 0
    auth_user: str = ""


@dataclass(slots=True)
class Envelope:
    """What the SMTP transaction said about a message (not its content)."""

    mail_from: str  # "" for the null sender <>
    rcpts: list[str] = field(default_factory=list)  # final recipients, aliases expanded
    original_rcpts: dict[str, str] = field(default_factory=dict)  # final -> as the client wrote it, when different
    client: ClientInfo | None = None
    size_hint: int = 0  # SIZE= parameter
    body_8bit: bool = False
    smtputf8: bool = False
    received_at: float = 0.0
    # DSN origin: a notice (bounce/delay) we generated; never causes another notice.
    is_notice: bool = False
    # The content was checked at DATA: CRLF line ends only (no bare CR or LF). The
    # outbound client then need not scan it again before sending.
    crlf_checked: bool = False
    # Whether a line of the content starts with a dot, seen by the scan at DATA: True, none
    # does (the outbound client need not double any dot, checked_body); False, one does;
    # None, not known (an older queue file, mail kanmon wrote itself): scan as before.
    no_dot_lines: bool | None = None
    # RFC 3461 DSN parameters the client gave (empty: none given, our defaults apply).
    dsn_ret: str = ""  # FULL | HDRS (MAIL RET=)
    dsn_envid: str = ""  # MAIL ENVID=, decoded from xtext
    dsn_notify: dict[str, str] = field(default_factory=dict)  # final rcpt -> NEVER | SUCCESS,FAILURE,DELAY
    dsn_orcpt: dict[str, str] = field(default_factory=dict)  # final rcpt -> "rfc822;addr" (ORCPT=, decoded)
    # What the checks keep between the stages of this transaction (SPF's result at MAIL
    # for DMARC at DATA). Never stored with the message.
    check_notes: dict[str, Any] | None = None

    def wants_notice(self, rcpt: str, kind: str) -> bool:
        """Whether the sender asked for a notice of this kind (SUCCESS | FAILURE | DELAY)
        about this recipient. Without NOTIFY: failures and delays, never success (RFC 3461 4.1)."""
        notify = self.dsn_notify.get(rcpt)
        if not notify:
            return kind != "SUCCESS"
        return kind in notify.split(",")


# ---------------------------------------------------------------------------
# Delivery: what the queue manager hands a delivery agent, and what comes back.


class Status(Enum):
    SENT = "sent"
    DEFERRED = "deferred"
    BOUNCED = "bounced"


@dataclass(frozen=True, slots=True)
class RecipientResult:
    """The outcome of one delivery attempt for one recipient."""

    rcpt: str
    status: Status
    reply: Reply
    relay: str = ""  # "host [ip]:port" or "local"
    mailer: str = ""  # local | esmtp
    tls: str = ""  # e.g. "TLSv1.3 TLS_AES_256_GCM_SHA384 verify=FAIL"
    # The next hop offered DSN and took the RFC 3461 parameters with the message: notices
    # about this recipient are its job from now on (RFC 3461 5.2.2).
    dsn_passed: bool = False


class CrlfChecked(bytes):
    """A message body whose line ends were already checked to be CRLF only (the SMTP
    session refuses anything else at DATA): the outbound client need not scan it again."""

    __slots__ = ()


class DotFree(CrlfChecked):
    """A CrlfChecked body in which no line starts with a dot (seen at DATA): the outbound
    client sends it without doubling dots (RFC 5321 4.5.2) and without scanning for them."""

    __slots__ = ()


def crlf_only(data: bytes) -> bool:
    """Whether every CR in data is followed by LF and every LF preceded by CR: the CRLF
    pairs, the CRs and the LFs number the same (one pass: kanmon.scan.line_ends)."""
    crlf, cr, lf = line_ends(data)
    return crlf == cr == lf


# What can end or split an SMTP command line anywhere (also U+0085, U+2028, U+2029, which
# some peers read as line ends), and the angle brackets, which end a path unless quoted.
_LINE_BREAKING = re.compile(r"[\x00-\x1f\x7f\x85\u2028\u2029]")
_ANGLE = re.compile(r"[<>]")
# A leading RFC 5321 4.1.2 Quoted-string local part: "..." with backslash pairs, then @.
_QUOTED_LOCAL = re.compile(r'^"(?:[^"\\]|\\.)*"(?=@)')
MAX_SENDABLE = 1000


def check_sendable(address: str) -> None:
    """Raise ValueError if `address` cannot be written as <address> on an outbound MAIL
    FROM or RCPT TO line: a control or line-breaking character anywhere, an angle
    bracket outside a quoted local part ("<b>"@example.org is legal, RFC 5321 4.1.2
    qtextSMTP), or more than 1000 characters. The outbound client refuses these, and
    kanmon.smtp.address.parse_path refuses them at MAIL/RCPT (553), so the two agree:
    nothing the receiver accepts is bounced at delivery for its syntax."""
    if _LINE_BREAKING.search(address):
        raise ValueError(f"address {address!r} contains a control character")
    quoted = _QUOTED_LOCAL.match(address)
    if _ANGLE.search(address, quoted.end() if quoted else 0):
        raise ValueError(f"address {address!r} contains an angle bracket outside a quoted local part")
    if len(address) > MAX_SENDABLE:
        raise ValueError(f"address is longer than {MAX_SENDABLE} characters")


# A Date or Message-ID field's name at a line's start (a folded line starts with WSP).
_ORIGIN_FIELD = re.compile(rb"^(date|message-id)[ \t]*:", re.IGNORECASE | re.MULTILINE)


def missing_origin_fields(content: bytes, now: float, hostname: str) -> bytes:
    """The Date: and Message-ID: fields content's header lacks (RFC 5322 3.6.1, 3.6.4 and
    3.6: both should be there), to put on top of it, or b"": what Postfix's cleanup adds
    for its local clients (always_add_missing_headers = no). Date in this process's
    local time zone (formatdate, as our Received: fields), Message-ID at hostname.
    content: CRLF text; its header ends at the first empty line (none: all of it)."""
    end = content.find(b"\r\n\r\n")
    header_end = 0 if content.startswith(b"\r\n") else (end + 2 if end >= 0 else len(content))
    present = {m.group(1).lower() for m in _ORIGIN_FIELD.finditer(content, 0, header_end)}
    added = b""
    if b"date" not in present:
        added += f"Date: {formatdate(now, localtime=True)}\r\n".encode("ascii")
    if b"message-id" not in present:
        added += f"Message-ID: <{int(now * 1000)}.{os.urandom(8).hex()}@{hostname}>\r\n".encode("utf-8")
    return added


def has_dot_line(block: bytes) -> bool:
    """Whether a line of block (CRLF line ends, starting at a line's start) starts with a dot."""
    return block.startswith(b".") or b"\r\n." in block


def flags_problem(env: Envelope, content: bytes) -> str | None:
    """What the envelope says of its content that the content does not bear out, or None.
    For a file that comes from elsewhere (a backup, another node, the shared quarantine):
    the outbound client trusts "crlf" and "nodots" (checked_body), and a bare LF or a dot
    line sent on that trust would reach the next hop unnormalised or undoubled, where a
    lone "." ends DATA (smuggling)."""
    if env.crlf_checked:
        if not crlf_only(content):
            return "crlf is true but a line ends in a bare CR or LF"
    if env.no_dot_lines and has_dot_line(content):
        return "nodots is true but a line starts with a dot"
    return None


def checked_body(env: Envelope, content: bytes) -> bytes:
    """content as its envelope lets the outbound client trust it: DotFree when it is CRLF
    only and no line starts with a dot, CrlfChecked when it is CRLF only, else unchanged."""
    if not env.crlf_checked:
        return content
    kind = DotFree if env.no_dot_lines is True else CrlfChecked
    return content if type(content) is kind else kind(content)
