"""Delivery status notifications (RFC 3464): the failure, delay and success notices.

Role: build the bytes of a notice to a message's envelope sender — a multipart/report
(RFC 6522) with a human-readable part, a message/delivery-status part and the original
headers (text/rfc822-headers; the whole message only when asked: RET=FULL). The sender's
RFC 3461 ENVID and ORCPT come back as Original-Envelope-Id and Original-Recipient. The
queue manager puts the result into the spool like any other message, from `<>`.

Trusts: nothing about its input's content. Addresses, remote replies, host names and the
original message come from the network; any control character (CR, LF, NUL, ...) in
them is replaced before it lands in a header or a report field, so nothing can inject a
header or a recipient (test_dsn.py). Long values are cut to keep lines under RFC 5322's
998 octets.

Never: build a notice about a message from the null sender (DESIGN.md promise 5; that
is a ValueError), send anything itself, or copy the original body unless include_body.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import format_datetime
from typing import NamedTuple

from kanmon.model import LocalReply, RecipientResult, Reply
from kanmon.units import format_duration

FAILURE_SUBJECT = "Undelivered Mail Returned to Sender"
SUCCESS_SUBJECT = "Successful Mail Delivery Report"
DELAY_SUBJECT = "Warning: could not send message for past {duration}"

# Original headers quoted in a notice, at most (RFC 3462 allows truncation).
MAX_QUOTED_HEADERS = 64 * 1024
# A report field value, at most (RFC 5322 2.1.1: lines of at most 998 octets).
MAX_FIELD = 900

_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f\x85\u2028\u2029]")
_STATUS_RE = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})$")


class Notice(NamedTuple):
    """A notice ready for the spool: `data, mail_from = build_failure_notice(...)`."""

    data: bytes  # the whole message, CRLF line ends
    mail_from: str  # always "" (RFC 3464 / RFC 5321 4.5.5: notices come from <>)


@dataclass(frozen=True, slots=True)
class NoticeRecipient:
    """One recipient the notice is about."""

    rcpt: str
    reply: Reply  # the last reply (remote or a LocalReply)
    remote_mta: str = ""  # host name or [ip] of the server that said it, if any
    original_rcpt: str = ""  # the address as the client wrote it (alias), if different
    orcpt: str = ""  # RFC 3461 ORCPT as given, "addr-type;address" (decoded): always reported

    @classmethod
    def from_result(cls, result: RecipientResult, original_rcpt: str = "", orcpt: str = "") -> NoticeRecipient:
        """From a delivery result; Remote-MTA is taken from its relay
        (`store.corp.example. [192.0.2.7]:25` -> `store.corp.example`, `[192.0.2.7]` as is)
        when a remote server gave the reply. A reply we made up ourselves (a LocalReply:
        connection refused, a timeout before the greeting, a lost connection, a DNS
        failure) has none: no remote MTA said anything (RFC 3464 2.3.5; as Postfix)."""
        relay = result.relay.strip()
        if not relay or relay == "local" or isinstance(result.reply, LocalReply):
            mta = ""
        elif relay.startswith("["):
            mta = relay[: relay.find("]") + 1] if "]" in relay else ""
        else:
            mta = relay.split()[0].rstrip(".")
        return cls(result.rcpt, result.reply, mta, original_rcpt, orcpt)


def _clean(text: str, limit: int = MAX_FIELD) -> str:
    """One safe header-field line: no control characters, bounded length."""
    text = _CONTROL_RE.sub("?", text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _date(ts: float) -> str:
    return format_datetime(datetime.fromtimestamp(ts, timezone.utc))


def _status(reply: Reply, *, failed: bool) -> str:
    """RFC 3464 2.3.4 Status: the enhanced code, or one made from the reply's class.

    A failure notice says 5.x.x even for a last reply of 4.x.x (lifetime expired)."""
    m = _STATUS_RE.match(reply.enhanced or "")
    if m:
        cls, subject, detail = m.groups()
    else:
        cls = str(reply.code // 100) if reply.code >= 200 else "4"
        subject, detail = "0", "0"
    if failed:
        cls = "5"
    elif cls == "5":
        cls = "4"
    return f"{cls}.{subject}.{detail}"


def _diagnostic(reply: Reply) -> str:
    """RFC 3464 2.3.6 Diagnostic-Code: `smtp; 550 5.1.1 ...` for a server's reply."""
    text = " ".join(reply.text.split("\n"))
    if isinstance(reply, LocalReply):
        return _clean(f"X-Kanmon; {text}")
    return _clean(f"smtp; {reply.code} {reply.enhanced + ' ' if reply.enhanced else ''}{text}".rstrip())


def _split_headers(original: bytes) -> bytes:
    """The header block of the original message (CRLF), bounded, ending with CRLF."""
    end = original.find(b"\r\n\r\n")
    alt = original.find(b"\n\n")
    if end < 0 and alt < 0:
        head = original
    elif end < 0 or (0 <= alt < end):
        head = original[: alt + 1]
    else:
        head = original[: end + 2]
    if len(head) > MAX_QUOTED_HEADERS:
        cut = head.rfind(b"\n", 0, MAX_QUOTED_HEADERS)
        head = head[: cut + 1 if cut > 0 else MAX_QUOTED_HEADERS]
    head = head.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    if head and not head.endswith(b"\r\n"):
        head += b"\r\n"
    return head


def _normalise_body(original: bytes) -> bytes:
    body = original.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    return body if body.endswith(b"\r\n") or not body else body + b"\r\n"


def _message_id(hostname: str, now: float) -> str:
    return f"<{int(now * 1000)}.{os.urandom(8).hex()}@{hostname}>"


def _build(
    *,
    action: str,
    subject: str,
    human: list[str],
    original: bytes,
    sender: str,
    hostname: str,
    recipients: Sequence[NoticeRecipient | tuple[str, Reply, str]],
    arrival: float,
    now: float,
    queue_id: str,
    will_retry_until: float | None,
    include_body: bool,
    envid: str = "",
) -> Notice:
    if sender == "":
        raise ValueError("no notice is sent about a message from the null sender <> (RFC 3464 / promise 5)")
    if not recipients:
        raise ValueError("a notice needs at least one recipient to report on")
    recipients = [r if isinstance(r, NoticeRecipient) else NoticeRecipient(*r) for r in recipients]
    hostname = _clean(hostname, 253) or "localhost"
    sender_h = _clean(sender, 512)
    failed = action == "failed"
    boundary = f"{queue_id or 'notice'}.{os.urandom(12).hex()}/{hostname}"
    boundary = _clean(boundary, 70).replace('"', "")

    headers = [
        f"From: MAILER-DAEMON@{hostname} (Mail Delivery System)",
        f"To: <{sender_h}>",
        f"Subject: {subject}",
        f"Date: {_date(now)}",
        f"Message-ID: {_message_id(hostname, now)}",
        "Auto-Submitted: auto-replied",  # RFC 3834
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary="{boundary}"',
        "Content-Transfer-Encoding: 8bit",
    ]

    human_part = [
        "Content-Description: Notification",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: 8bit",
        "",
        *human,
        "",
    ]
    for r in recipients:
        where = f"host {_clean(r.remote_mta, 255)} said: " if r.remote_mta and not isinstance(r.reply, LocalReply) else ""
        reason = " ".join(r.reply.text.split("\n")) if isinstance(r.reply, LocalReply) else " ".join(str(r.reply).split("\n"))
        human_part.append(_clean(f"<{r.rcpt}>: {where}{reason}"))
        human_part.append("")

    # RFC 3464 2.2: per-message fields, then a blank line and per-recipient fields.
    status_part = [
        "Content-Description: Delivery report",
        "Content-Type: message/delivery-status",
        "",
    ]
    if envid:
        status_part.append(f"Original-Envelope-Id: {_clean(envid, 100)}")  # RFC 3464 2.2.1
    status_part.append(f"Reporting-MTA: dns; {hostname}")
    if queue_id:
        status_part.append(f"X-Kanmon-Queue-ID: {_clean(queue_id, 64)}")
    status_part.append(f"Arrival-Date: {_date(arrival)}")
    for r in recipients:
        status_part.append("")
        if r.orcpt:
            # RFC 3464 2.3.1: the ORCPT the sender gave, whenever it gave one.
            addr_type, _, address = r.orcpt.partition(";")
            status_part.append(f"Original-Recipient: {_clean(addr_type, 32)}; {_clean(address, 512)}")
        elif r.original_rcpt and r.original_rcpt != r.rcpt:
            status_part.append(f"Original-Recipient: rfc822; {_clean(r.original_rcpt, 512)}")
        status_part += [
            f"Final-Recipient: rfc822; {_clean(r.rcpt, 512)}",
            f"Action: {action}",
            f"Status: {_status(r.reply, failed=failed)}",
        ]
        if r.remote_mta:
            status_part.append(f"Remote-MTA: dns; {_clean(r.remote_mta, 255)}")
        status_part.append(f"Diagnostic-Code: {_diagnostic(r.reply)}")
        status_part.append(f"Last-Attempt-Date: {_date(now)}")
        if will_retry_until is not None:
            status_part.append(f"Will-Retry-Until: {_date(will_retry_until)}")
    status_part.append("")

    label = "Undelivered Message" if action in ("failed", "delayed") else "Delivered Message"
    if include_body:
        original_head = [f"Content-Description: {label}", "Content-Type: message/rfc822", "", ""]
        original_bytes = _normalise_body(original)
    else:
        original_head = [
            f"Content-Description: {label} Headers",
            "Content-Type: text/rfc822-headers",
            "",
            "",
        ]
        original_bytes = _split_headers(original)

    def lines(parts: list[str]) -> bytes:
        return "\r\n".join(parts).encode("utf-8", "replace")

    delimiter = f"--{boundary}\r\n".encode()
    out = bytearray()
    out += lines(headers) + b"\r\n\r\n"
    out += b"This is a MIME-encapsulated message.\r\n\r\n"
    out += delimiter + lines(human_part) + b"\r\n"
    out += delimiter + lines(status_part) + b"\r\n"
    out += delimiter + lines(original_head) + original_bytes
    out += f"\r\n--{boundary}--\r\n".encode()
    return Notice(bytes(out), "")


def build_failure_notice(
    original: bytes,
    sender: str,
    hostname: str,
    recipients: Sequence[NoticeRecipient | tuple[str, Reply, str]],
    arrival: float,
    now: float | None = None,
    *,
    queue_id: str = "",
    include_body: bool = False,
    envid: str = "",
) -> Notice:
    """A failure notice (`Action: failed`, `Status: 5.x.x`), Postfix's wording.

    original: the message as spooled; sender: its envelope sender (the notice goes to
    it; "" is a ValueError); hostname: ours (Reporting-MTA, From: MAILER-DAEMON@...);
    arrival/now: epoch seconds.
    """
    now = time.time() if now is None else now
    human = [
        f"This is the mail system at host {_clean(hostname, 253)}.",
        "",
        "I'm sorry to have to inform you that your message could not",
        "be delivered to one or more recipients. It's attached below.",
        "",
        "For further assistance, please send mail to postmaster.",
        "",
        "If you do so, please include this problem report. You can",
        "delete your own text from the attached returned message.",
        "",
        "                   The mail system",
    ]
    return _build(
        action="failed",
        subject=FAILURE_SUBJECT,
        human=human,
        original=original,
        sender=sender,
        hostname=hostname,
        recipients=recipients,
        arrival=arrival,
        now=now,
        queue_id=queue_id,
        will_retry_until=None,
        include_body=include_body,
        envid=envid,
    )


def build_delay_notice(
    original: bytes,
    sender: str,
    hostname: str,
    recipients: Sequence[NoticeRecipient | tuple[str, Reply, str]],
    arrival: float,
    now: float | None = None,
    *,
    will_retry_until: float,
    queue_id: str = "",
    envid: str = "",
) -> Notice:
    """A delay notice (`Action: delayed`, `Status: 4.x.x`, `Will-Retry-Until`).

    Subject: `Warning: could not send message for past 4 hours` with the actual time
    since arrival.
    """
    now = time.time() if now is None else now
    duration = format_duration(now - arrival, "words")
    human = [
        f"This is the mail system at host {_clean(hostname, 253)}.",
        "",
        "####################################################################",
        "# THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. #",
        "####################################################################",
        "",
        f"Your message could not be delivered for more than {duration}.",
        f"It will be retried until it is {format_duration(will_retry_until - arrival, 'words')} old.",
        "",
        "For further assistance, please send mail to postmaster.",
        "",
        "                   The mail system",
    ]
    return _build(
        action="delayed",
        subject=DELAY_SUBJECT.format(duration=duration),
        human=human,
        original=original,
        sender=sender,
        hostname=hostname,
        recipients=recipients,
        arrival=arrival,
        now=now,
        queue_id=queue_id,
        will_retry_until=will_retry_until,
        include_body=False,
        envid=envid,
    )


def build_success_notice(
    original: bytes,
    sender: str,
    hostname: str,
    recipients: Sequence[NoticeRecipient | tuple[str, Reply, str]],
    arrival: float,
    now: float | None = None,
    *,
    action: str = "delivered",
    queue_id: str = "",
    envid: str = "",
) -> Notice:
    """A success notice (RFC 3461 NOTIFY=SUCCESS): `Action: delivered` (into a mailbox
    here) or `Action: relayed` (taken by a next hop that does not do DSN, so no further
    notice can be promised). Headers of the original only."""
    if action not in ("delivered", "relayed"):
        raise ValueError(f"a success notice is delivered or relayed, not {action!r}")
    now = time.time() if now is None else now
    human = [
        f"This is the mail system at host {_clean(hostname, 253)}.",
        "",
        "Your message was successfully delivered to the destination(s)",
        "listed below. If the message was delivered to mailbox you will",
        "receive no further notifications. Otherwise you may still receive",
        "notifications of mail delivery errors from other systems.",
        "",
        "                   The mail system",
    ]
    return _build(
        action=action,
        subject=SUCCESS_SUBJECT,
        human=human,
        original=original,
        sender=sender,
        hostname=hostname,
        recipients=recipients,
        arrival=arrival,
        now=now,
        queue_id=queue_id,
        will_retry_until=None,
        include_body=False,
        envid=envid,
    )


__all__ = [
    "SUCCESS_SUBJECT",
    "build_success_notice",
    "DELAY_SUBJECT",
    "FAILURE_SUBJECT",
    "Notice",
    "NoticeRecipient",
    "build_delay_notice",
    "build_failure_notice",
]
