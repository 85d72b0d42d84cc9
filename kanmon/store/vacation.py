"""Vacation (RFC 5230): whether to answer a message, the answer, and who was answered.

Role: ``refusal`` decides, from the message's header fields and envelope, whether an
out-of-office reply may go at all (never to <>, to mailing lists and bulk mail, to
automatic mail, to our own addresses, or when the user is not a visible recipient);
``build_reply`` writes the reply (Auto-Submitted: auto-replied, In-Reply-To,
References); ``VacationMemory`` remembers, durably and per user, whom a script's
vacation already answered and until when (RFC 5230 4.2 ``:days``).

Trusts: the header fields are the network's (only compared, and put into the reply
after control characters are taken out); the memory file is ours but checked when read
(a damaged one is started afresh: at worst a sender gets a second reply).

Never: answer <> or a message that says it is automatic (RFC 3834 2), write a header
line with a CR or LF that came from the message, or grow the memory without bound.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from email.header import Header
from email.utils import formatdate, getaddresses, make_msgid
from pathlib import Path

from kanmon.content.decode import decode_header_value
from kanmon.store.sieve import MessageView, VacationArgs

MAX_REMEMBERED = 5000  # senders remembered per user; the oldest go first
_RECIPIENT_HEADERS = ("to", "cc", "bcc", "resent-to", "resent-cc", "resent-bcc")


def refusal(msg: MessageView, args: VacationArgs, own: set[str]) -> str | None:
    """Why no reply may be sent (a short reason for the event line), or None.
    own: the user's own addresses, lower case: the caller gives the mailbox's; its
    aliases are the script's :addresses (docs/sieve.md), as with Dovecot Pigeonhole's
    default (no sieve_vacation_use_original_recipient)."""
    sender = msg.mail_from.lower()
    if not sender:
        return "the sender is <>"
    mine = own | {a.lower() for a in args.addresses}
    if sender in mine:
        return "the sender is the user"
    local = sender.rpartition("@")[0]
    if local in ("mailer-daemon", "postmaster", "listserv", "majordomo") or local.startswith("owner-") \
            or local.endswith("-request") or local.startswith("bounce"):
        return "the sender is a list or mail system address"  # RFC 5230 4.6
    for name in ("list-id", "list-unsubscribe", "list-post", "list-help"):
        if msg.values(name):
            return f"the message has {name}"  # RFC 2369/2919: a mailing list
    for value in msg.values("precedence"):
        if value.strip().lower() in ("bulk", "list", "junk"):
            return f"Precedence: {value.strip().lower()}"
    for value in msg.values("auto-submitted"):
        if value.split(";")[0].strip().lower() != "no":  # RFC 3834 5
            return "the message is Auto-Submitted"
    if msg.values("x-auto-response-suppress") and any(
            "oof" in v.lower() or "all" in v.lower() for v in msg.values("x-auto-response-suppress")):
        return "the sender asked for no automatic replies"
    visible = {a.lower() for name in _RECIPIENT_HEADERS for v in msg.values(name)
               for _n, a in getaddresses([decode_header_value(v)[:4096]]) if a}
    if not visible & mine:
        return "the user is not in To/Cc"  # RFC 5230 4.5
    return None


def _clean(text: str, limit: int = 998) -> str:
    """One header line's worth of text: no control characters (CR/LF above all)."""
    return "".join(c if c.isprintable() else " " for c in text)[:limit].strip()


def _encoded(text: str) -> str:
    """A header value: as is when ASCII, else an RFC 2047 encoded-word."""
    if text.isascii():
        return text
    return Header(text, "utf-8").encode()


def build_reply(msg: MessageView, args: VacationArgs, user: str, hostname: str,
                now: float | None = None) -> bytes:
    """The reply, CRLF lines, to the envelope sender (RFC 5230 5)."""
    subjects = msg.values("subject")
    original = _clean(decode_header_value(subjects[0])) if subjects else ""
    subject = _clean(args.subject) if args.subject is not None else f"Auto: {original}" if original else "Auto: (no subject)"
    sender = _clean(args.sender) if args.sender else user
    ids = msg.values("message-id")
    msgid = _clean(ids[0]) if ids else ""
    refs = " ".join(_clean(v) for v in msg.values("references"))[:900]
    lines = [
        f"From: {_encoded(sender) if '<' not in sender else sender}",
        f"To: <{msg.mail_from}>",
        f"Subject: {_encoded(subject)}",
        f"Date: {formatdate(now if now is not None else time.time(), localtime=False)}",
        f"Message-ID: {make_msgid(domain=hostname)}",
        "Auto-Submitted: auto-replied (vacation)",  # RFC 3834 5, RFC 5230 5.7
        "Precedence: bulk",
        "MIME-Version: 1.0",
    ]
    if msgid.startswith("<") and msgid.endswith(">"):
        lines.append(f"In-Reply-To: {msgid}")  # RFC 5230 5.8
        lines.append(f"References: {(refs + ' ' if refs else '')}{msgid}")
    if args.mime:
        body = args.reason.replace("\r\n", "\n").replace("\n", "\r\n")
        return ("\r\n".join(lines) + "\r\n").encode("utf-8") + body.encode("utf-8")
    lines += ["Content-Type: text/plain; charset=utf-8", "Content-Transfer-Encoding: 8bit"]
    body = args.reason.replace("\r\n", "\n").replace("\n", "\r\n")
    if not body.endswith("\r\n"):
        body += "\r\n"
    return ("\r\n".join(lines) + "\r\n\r\n" + body).encode("utf-8")


def handle_of(args: VacationArgs, script: str) -> str:
    """RFC 5230 4.2: replies are remembered per script and per :handle (or per the
    vacation's text, when there is no :handle)."""
    if args.handle is not None:
        key = "h\0" + args.handle
    else:
        key = "t\0" + "\0".join([args.reason, args.subject or "", args.sender or "", ",".join(args.addresses)])
    return hashlib.sha256((script + "\0" + key).encode("utf-8")).hexdigest()[:24]


class VacationMemory:
    """Whom a user's vacation answered, until when: ``<dir>/vacation.json`` (0600),
    replaced atomically. Called from the delivery adapter's worker thread only."""

    def __init__(self, directory: Path):
        self.path = Path(directory) / "vacation.json"

    def _load(self) -> dict[str, float]:
        try:
            data = json.loads(self.path.read_text("utf-8"))
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict):
            return {}
        return {k: float(v) for k, v in data.items() if isinstance(k, str) and isinstance(v, (int, float))}

    def claim(self, handle: str, sender: str, days: int, now: float) -> bool:
        """True (and remembered until now + days) when this sender was not answered by this
        handle within the period; False when it was."""
        key = hashlib.sha256(f"{handle}\0{sender.lower()}".encode()).hexdigest()[:32]
        seen = {k: v for k, v in self._load().items() if v > now}
        if key in seen:
            return False
        seen[key] = now + days * 86400
        if len(seen) > MAX_REMEMBERED:
            for old in sorted(seen, key=seen.__getitem__)[: len(seen) - MAX_REMEMBERED]:
                del seen[old]
        self._write(seen)
        return True

    def _write(self, data: dict[str, float]) -> None:
        tmp = self.path.with_name(f".vacation.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
