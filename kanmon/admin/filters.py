"""Queue filters: which messages a `kanmon queue` command or a [[maintenance]] job acts on.

Role: the one matcher behind the one filter vocabulary (docs/queue.md, "Filters"):
`from`, `to`, `domain`, `state`, `older_than`, `reason`, `subject`, `header`, `body`,
`size`, `attempts`, plus queue ids. The names, their parsing and their validation are
kanmon.config.QueueFilter's (the same model checks a [[maintenance]] table and the
command-line flags of the same names); this module compiles them once and matches
messages in three steps, cheapest first: the envelope (ids, sender, recipients, age),
the journal (state, pending recipients, replies, attempts, size), then, only for
`subject`, `header` and `body`, the first BODY_SCAN_BYTES of the content, parsed with the
stdlib email package.

Trusts: nothing in a message (a stored message is network input: its MIME structure,
charsets and encodings may be anything; decoding errors are replaced, never raised) and
nothing in a filter until QueueFilter has validated it. Never: read more than
BODY_SCAN_BYTES of a message, read the content at all when no content filter is given,
or raise anything but ValueError for a bad filter.
"""

from __future__ import annotations

import email.header
import email.parser
import email.policy
import fnmatch
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from email.message import Message

from pydantic import ValidationError

from kanmon.config import QUEUE_STATES, MaintenanceJob, QueueFilter, parse_bound, parse_size_bound
from kanmon.model import Envelope, is_queue_id
from kanmon.spool.index import Entry
from kanmon.spool.store import SpoolEntry
from kanmon.units import format_duration

STATES = QUEUE_STATES
BODY_SCAN_BYTES = 64 * 1024  # content read for subject/header/body filters
TEXT_LIMIT = 256 * 1024  # decoded characters kept from those bytes (base64 of 64 KB is less)
MAX_PARTS = 200  # MIME parts looked at in those bytes

# Filters dataclass field -> vocabulary name (the config key; the flag is --name-with-dashes).
_NAMES = {"mail_from": "from"}
CONTENT_FILTERS = ("subject", "header", "body")


def flag(name: str) -> str:
    """The command-line flag of a vocabulary name: older_than -> --older-than."""
    return "--" + name.replace("_", "-")


def _pattern(pattern: str) -> re.Pattern[str]:
    """A shell glob (`*@example.com`) or, without wildcards, a substring; case-insensitive."""
    if any(ch in pattern for ch in "*?["):
        return re.compile(fnmatch.translate(pattern), re.I)
    return re.compile(re.escape(pattern), re.I)


def _compare(op: str, value: float, bound: float) -> bool:
    return {">": value > bound, ">=": value >= bound, "<": value < bound, "<=": value <= bound}[op]


def domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower()


@dataclass
class Filters:
    """Queue ids, a state and the criteria of QueueFilter (the control socket's JSON form)."""

    ids: list[str] = field(default_factory=list)
    state: str = "all"
    older_than: float | None = None  # seconds
    mail_from: str | None = None  # glob or substring; "<>" is the null sender
    to: str | None = None
    domain: str | None = None
    reason: str | None = None  # regex over any reply recorded for a pending recipient
    subject: str | None = None
    header: str | None = None
    body: str | None = None
    size: str | None = None  # ">1MB"
    attempts: str | None = None  # ">=5"

    def __post_init__(self) -> None:
        if self.state not in STATES:
            raise ValueError(f"state must be one of {', '.join(STATES)}")
        bad = [i for i in self.ids if not is_queue_id(str(i))]
        if bad:
            raise ValueError(f"not a queue id: {', '.join(map(str, bad[:5]))}")
        given = {_NAMES.get(k, k): v for k, v in self._criteria_fields().items() if v is not None}
        try:
            model = QueueFilter.model_validate(given)
        except ValidationError as e:
            err = e.errors()[0]
            name = str(err["loc"][0]) if err.get("loc") else "filter"
            msg = str(err.get("msg", "")).removeprefix("Value error, ")
            raise ValueError(f"{flag(name)} {given.get(name)!r}: {msg}") from None
        self.older_than = model.older_than
        self._compile(model)

    def _criteria_fields(self) -> dict:
        return {k: getattr(self, k) for k in ("mail_from", "to", "domain", "older_than", "reason", "subject",
                                              "header", "body", "size", "attempts")}

    def _compile(self, m: QueueFilter) -> None:
        self._idset = set(self.ids)
        self._null_sender = m.from_ == "<>"
        self._from = _pattern(m.from_) if m.from_ and not self._null_sender else None
        self._to = _pattern(m.to) if m.to else None
        self._domain = m.domain.lower().strip().rstrip(".") if m.domain else None
        self._reason = re.compile(m.reason, re.I) if m.reason else None
        self._reason_seen: dict[str, bool] = {}
        self._subject = re.compile(m.subject, re.I) if m.subject else None
        self._header = re.compile(m.header, re.I) if m.header else None
        self._body = re.compile(m.body, re.I) if m.body else None
        self._size = parse_size_bound(m.size) if m.size else None
        self._attempts = parse_bound(m.attempts) if m.attempts else None
        # Only a reason (and a state): the index walk's per-entry test is _reason_of alone.
        self._reason_only = self._reason is not None and not self._idset and all(
            v is None for k, v in self._criteria_fields().items() if k != "reason")

    # -- building -------------------------------------------------------------------------

    @classmethod
    def from_json(cls, data: dict | None) -> Filters:
        data = dict(data or {})
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)

    @classmethod
    def from_job(cls, job: MaintenanceJob) -> Filters:
        """A maintenance job's criteria (its `state` is applied by the caller: a job's
        "deferred" includes messages in the middle of an attempt)."""
        return cls(**{("mail_from" if k == "from" else k): v for k, v in job.criteria().items()})

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if not k.startswith("_")}

    # -- what it is ------------------------------------------------------------------------

    @property
    def empty(self) -> bool:
        """No ids and no criteria (the state alone does not count)."""
        return not self.ids and not self.has_criteria

    @property
    def has_criteria(self) -> bool:
        return any(v is not None for v in self._criteria_fields().values())

    @property
    def needs_content(self) -> bool:
        return self._subject is not None or self._header is not None or self._body is not None

    def describe(self) -> str:
        parts = list(self.ids[:5]) + ([f"... ({len(self.ids)} ids)"] if len(self.ids) > 5 else [])
        if self.state != "all":
            parts.append(f"--state {self.state}")
        for key, value in self._criteria_fields().items():
            if value is None:
                continue
            name = flag(_NAMES.get(key, key))
            parts.append(f"{name} {format_duration(value)}" if key == "older_than" else f"{name} {value!r}")
        return " ".join(parts) or "(whole queue)"

    # -- matching --------------------------------------------------------------------------

    def match_envelope(self, qid: str, env: Envelope, now: float) -> bool:
        """The checks that need only the envelope (before the journal is read)."""
        return self._match_head(qid, env.received_at, env.mail_from, env.rcpts, now)

    def _match_head(self, qid: str, received_at: float, mail_from: str, rcpts: list[str] | None, now: float) -> bool:
        """rcpts None: the recipients are left to match_entry()."""
        if self._idset and qid not in self._idset:
            return False
        if self.older_than is not None and now - (received_at or now) < self.older_than:
            return False
        if self._null_sender and mail_from:
            return False
        if self._from is not None and not self._from.search(mail_from or "<>"):
            return False
        if rcpts is None:
            return True
        if self._to is not None and not any(self._to.search(r) for r in rcpts):
            return False
        if self._domain is not None and not any(domain_of(r) == self._domain for r in rcpts):
            return False
        return True

    def match_entry(self, entry: SpoolEntry | Entry, state: str) -> bool:
        """The checks that need the journal (and the content size): on an entry read from
        the files or on the index's (both answer the same names)."""
        if self.state != "all" and self.state != state:
            return False
        if self._size is not None and not _compare(self._size[0], entry.size, self._size[1]):
            return False
        if self._attempts is not None and not _compare(self._attempts[0], entry.attempts, self._attempts[1]):
            return False
        if self._to is None and self._domain is None and self._reason is None:
            return True
        if self._domain is not None and not entry.pending_in(self._domain):
            return False
        if self._to is not None and not any(self._to.search(r) for r in entry.pending_rcpts()):
            return False
        if self._reason is not None:
            return self._reason_of(entry)
        return True

    def _reason_of(self, entry: SpoolEntry | Entry) -> bool:
        """The reason regex matches a reply recorded for a pending recipient."""
        seen = self._reason_seen  # each distinct reply text searched once per walk, then a dict lookup
        for reply in entry.pending_replies():
            hit = seen.get(reply)
            if hit is None:
                hit = self._reason_in(reply)
            if hit:
                return True
        return False

    @property
    def reason_only(self) -> bool:
        """A reason (and a state) and no other criterion, no ids."""
        return self._reason_only

    @property
    def reply_test(self) -> Callable[[str], bool] | None:
        """The reason filter on one reply text, None without one: what the index's reply
        map is asked with (kanmon.spool.index.QueueIndex.with_reply)."""
        return self._reason_in if self._reason is not None else None

    def _reason_in(self, reply: str) -> bool:
        """The reason regex on one reply text, once per distinct text in a walk (a stuck
        destination gives thousands of messages the same few replies)."""
        seen = self._reason_seen
        hit = seen.get(reply)
        if hit is None:
            if len(seen) >= 100_000:  # bounded, for a Filters kept across walks
                seen.clear()
            hit = seen[reply] = self._reason.search(reply) is not None
        return hit

    def match_indexed(self, entry: Entry, state: str, now: float) -> bool:
        """match_envelope() and match_entry() on an index entry. Its recipients checked
        are the pending ones: the same answer, since match_entry asks a pending one to
        match whatever the envelope's others do."""
        if self._reason_only:  # the console's and the cleanup's usual reason filter: one call per entry
            return (self.state == "all" or self.state == state) and self._reason_of(entry)
        return (self._match_head(entry.queue_id, entry.received_at, entry.mail_from, None, now)
                and self.match_entry(entry, state))

    def match_content(self, head: bytes) -> bool:
        """The checks on the first BODY_SCAN_BYTES of the content (`head`)."""
        if not self.needs_content:
            return True
        msg = parse_bounded(head)
        if self._subject is not None and not self._subject.search(_header_text(msg, "Subject")):
            return False
        if self._header is not None and not any(self._header.search(line) for line in header_lines(msg)):
            return False
        if self._body is not None and not self._body.search(body_text(msg)):
            return False
        return True


def replies(entry: SpoolEntry | Entry) -> list[str]:
    """The replies the journal recorded for recipients still pending."""
    return entry.pending_replies()


# ---------------------------------------------------------------------------
# Message text, bounded


def parse_bounded(head: bytes) -> Message:
    """The first BODY_SCAN_BYTES of a message as an email.message object (a truncated
    last part is parsed as far as it goes). The compat32 policy: header values stay
    text until asked for (ten times faster than the default policy on a DSN)."""
    parser = email.parser.BytesParser(policy=email.policy.compat32)
    return parser.parsebytes(head[:BODY_SCAN_BYTES])


def _decoded(raw: object) -> str:
    """A header value with its RFC 2047 encoded words decoded; raw bytes that are not
    UTF-8 come back replaced, never as an error."""
    if isinstance(raw, email.header.Header):  # raw 8-bit bytes in the header
        return "".join(_bytes_text(b, cs) if isinstance(b, bytes) else b for b, cs in email.header.decode_header(raw))
    text = str(raw)
    try:
        return str(email.header.make_header(email.header.decode_header(text)))
    except (ValueError, LookupError, UnicodeError):
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _bytes_text(data: bytes, charset: str | None) -> str:
    try:
        return data.decode(charset if charset and charset != "unknown-8bit" else "utf-8", "replace")
    except LookupError:  # an unknown charset name
        return data.decode("latin-1")


def _header_text(msg: Message, name: str) -> str:
    value = msg.get(name)
    return _decoded(value) if value is not None else ""


def header_lines(msg: Message) -> list[str]:
    """"Name: value" for each header field of the top-level message, values decoded."""
    return [f"{name}: {_decoded(value)}" for name, value in msg.items()]


def body_text(msg: Message) -> str:
    """The decoded text of a message, bounded: every text/* part (transfer encoding and
    charset undone), and each field of a message/delivery-status part (RFC 3464: its
    Status, Remote-MTA and Diagnostic-Code lines), at any depth, up to TEXT_LIMIT characters."""
    chunks: list[str] = []
    size = 0
    for n, part in enumerate(msg.walk()):
        if n >= MAX_PARTS or size >= TEXT_LIMIT:
            break
        ctype = part.get_content_type()
        text = ""
        if ctype == "message/delivery-status":
            payload = part.get_payload()
            blocks = payload if isinstance(payload, list) else []
            text = "\n".join(f"{k}: {_decoded(v)}" for b in blocks if isinstance(b, Message) for k, v in b.items())
            if not blocks and isinstance(payload, str):
                text = payload
        elif part.get_content_maintype() == "text" and not part.is_multipart():
            text = _part_text(part)
        if text:
            chunks.append(text[: TEXT_LIMIT - size])
            size += len(chunks[-1])
    return "\n".join(chunks)


def _part_text(part: Message) -> str:
    raw = part.get_payload(decode=True)
    if not isinstance(raw, bytes):
        return ""
    return _bytes_text(raw, part.get_content_charset())
