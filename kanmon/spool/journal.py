"""Journal records: what happened to a queued message, one JSON line each (the on-disk contract).

Role: the one owner of the per-message journal (spool/state/<id>): its record types,
their encoding and their decoding, and the state a journal adds up to (QueueState).
Every writer (queue manager, spool, admin operations) builds these types and every
reader (spool, admin CLI) decodes through decode()/from_dict(); nobody else spells
`{"k": ...}`.

Format (docs/spool-format.md), one compact JSON object per line, key order as below:
    {"k":"result","t":..,"rcpt":..,"status":"sent|deferred|bounced","reply":..,"relay":..,"mailer":..,"tls":..}
    {"k":"attempt","t":..,"n":..,"next":..}     attempts so far and the next one (n=0: requeue)
    {"k":"warned","t":..}                        a delay notice went out (one per [queue] warn_every)
    {"k":"hold","on":true|false,"t":..,"by":..}  held or released by the admin
    {"k":"schedule","t":..,"next":..}            next attempt set by the admin (0: now)

Trusts: nothing it decodes. Never: accept a record of an unknown kind, a missing
required field or a field of the wrong type (JournalError; the reader decides whether
a line is skipped); change the bytes of a record kind that exists on disk.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from kanmon.spool.schema import MAX_ADDRESS, SchemaError, count, flag, text, time_value

STATUSES = ("sent", "deferred", "bounced")
FINAL = ("sent", "bounced")


class JournalError(SchemaError):
    """A journal line that is not a record this module knows."""


@dataclass(frozen=True, slots=True)
class Result:
    """One recipient's outcome of an attempt (or of an admin drain)."""

    t: float
    rcpt: str
    status: str  # sent | deferred | bounced
    reply: str
    relay: str = ""
    mailer: str = ""
    tls: str = ""

    @property
    def final(self) -> bool:
        return self.status in FINAL


@dataclass(frozen=True, slots=True)
class Attempt:
    """Attempts so far and when the next is due (n=0 restarts the backoff: requeue)."""

    t: float
    n: int
    next: float


@dataclass(frozen=True, slots=True)
class Warned:
    """A delay notice was sent (once, or once per [queue] warn_every)."""

    t: float


@dataclass(frozen=True, slots=True)
class Hold:
    """Held (the queue manager leaves the message alone) or released, by whom."""

    t: float
    on: bool
    by: str = ""


@dataclass(frozen=True, slots=True)
class Schedule:
    """The admin set the next attempt (0: as soon as the queue manager sees it)."""

    t: float
    next: float


Record = Result | Attempt | Warned | Hold | Schedule


# ---------------------------------------------------------------------------
# Encoding


def to_dict(rec: Record) -> dict[str, Any]:
    """The record as its JSON object (the on-disk key order)."""
    if isinstance(rec, Result):
        return {"k": "result", "t": rec.t, "rcpt": rec.rcpt, "status": rec.status, "reply": rec.reply,
                "relay": rec.relay, "mailer": rec.mailer, "tls": rec.tls}
    if isinstance(rec, Attempt):
        return {"k": "attempt", "t": rec.t, "n": rec.n, "next": rec.next}
    if isinstance(rec, Warned):
        return {"k": "warned", "t": rec.t}
    if isinstance(rec, Hold):
        return {"k": "hold", "on": rec.on, "t": rec.t, "by": rec.by}
    if isinstance(rec, Schedule):
        return {"k": "schedule", "t": rec.t, "next": rec.next}
    raise TypeError(f"not a journal record: {rec!r}")


def encode(records: list[Record] | tuple[Record, ...]) -> bytes:
    """Journal lines for these records, each ending in a newline."""
    return b"".join(json.dumps(to_dict(r), separators=(",", ":")).encode() + b"\n" for r in records)


# ---------------------------------------------------------------------------
# Decoding (strict)


def from_dict(d: Any) -> Record:
    """A decoded JSON object -> its record; JournalError for anything else (the field
    checks of kanmon.spool.schema: times finite and in range, bounded texts and counts)."""
    if type(d) is not dict:
        raise JournalError("a journal record is a JSON object")
    kind = d.get("k")
    try:
        if kind == "result":
            status = text(d, "status", None, 16)
            if status not in STATUSES:
                raise JournalError(f"result: unknown status {status!r}")
            return Result(time_value(d, "t"), text(d, "rcpt", None, MAX_ADDRESS), status, text(d, "reply"),
                          text(d, "relay", ""), text(d, "mailer", "", 64), text(d, "tls", ""))
        if kind == "attempt":
            return Attempt(time_value(d, "t"), count(d, "n"), time_value(d, "next"))
        if kind == "warned":
            return Warned(time_value(d, "t"))
        if kind == "hold":
            return Hold(time_value(d, "t"), flag(d, "on"), text(d, "by", ""))
        if kind == "schedule":
            return Schedule(time_value(d, "t"), time_value(d, "next"))
    except JournalError:
        raise
    except SchemaError as e:
        raise JournalError(f"{kind}: {e}") from None
    raise JournalError(f"unknown journal record kind {kind!r}"[:200])


def decode(line: bytes) -> Record:
    """One journal line (without its newline) -> its record; JournalError if it is not one."""
    try:
        d = json.loads(line)
    except (ValueError, RecursionError) as e:
        raise JournalError(f"not JSON: {e}") from None
    return from_dict(d)


def decode_all(raw: bytes) -> tuple[list[Record], int]:
    """(records, lines refused) of a whole journal file.

    A refused line is skipped: after a crash the last line may be torn, and a damaged
    line costs at most a retry (the queue file, not the journal, is the message).
    """
    records: list[Record] = []
    refused = 0
    if raw.endswith(b"\n") and b"\n\n" not in raw and not raw.startswith(b"\n"):
        # The usual journal, whole: its lines as one JSON array (one parse, not one per
        # line; a line is one JSON object without a newline inside). Anything that does
        # not parse so, or a line that is refused, is read again line by line.
        try:
            items = json.loads(b"[" + raw[:-1].replace(b"\n", b",") + b"]")
            if len(items) == raw.count(b"\n"):
                return [from_dict(d) for d in items], 0
        except (ValueError, RecursionError, JournalError):
            pass
    for line in raw.split(b"\n"):
        if not line:
            continue
        try:
            records.append(decode(line))
        except JournalError:
            refused += 1
    return records, refused


# ---------------------------------------------------------------------------
# What a journal adds up to


@dataclass(slots=True)
class QueueState:
    """What the journal says about one message."""

    done: dict[str, Result] = field(default_factory=dict)  # rcpt -> final result
    last: dict[str, Result] = field(default_factory=dict)  # rcpt -> last (deferred) result
    attempts: int = 0
    next_attempt: float = 0.0
    hold: bool = False
    warned: bool = False
    warned_at: float = 0.0  # when the last delay notice went out (0: never)
    history: list[Record] = field(default_factory=list)  # results, holds, warnings in order
    refused: int = 0  # lines the decoder refused (skipped)

    def apply(self, rec: Record) -> None:
        if isinstance(rec, Result):
            if rec.final:
                self.done[rec.rcpt] = rec
                self.last.pop(rec.rcpt, None)
            else:
                self.last[rec.rcpt] = rec
            self.history.append(rec)
        elif isinstance(rec, Attempt):
            self.attempts = rec.n
            self.next_attempt = rec.next
        elif isinstance(rec, Hold):
            self.hold = rec.on
            self.history.append(rec)
        elif isinstance(rec, Warned):
            self.warned = True
            self.warned_at = max(self.warned_at, rec.t)
            self.history.append(rec)
        elif isinstance(rec, Schedule):
            self.next_attempt = rec.next

    @classmethod
    def from_bytes(cls, raw: bytes) -> QueueState:
        records, refused = decode_all(raw)
        state = cls(refused=refused)
        for rec in records:
            state.apply(rec)
        return state
