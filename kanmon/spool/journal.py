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

from kanmon.spool.schema import MAX_ADDRESS, MAX_COUNT, MAX_TEXT, MAX_TIME, SchemaError, count, flag, text, time_value

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


# ---------------------------------------------------------------------------
# Start-up recovery's fast path (kanmon.spool.recovery): the few values the queue index
# keeps, folded straight from the parsed lines without building records. It accepts only
# what from_dict() accepts (the same checks, written inline) and answers None for anything
# else, whereupon the caller decodes the journal with decode_all() and QueueState: a
# journal with a refused line, or of a shape this does not know, takes the strict path.

_MAX_TIME = MAX_TIME
_json_decode = json.JSONDecoder().decode  # json.loads() less its encoding detection


def _time_ok(v: Any) -> float | None:
    tv = type(v)
    if tv is float:
        return v if 0.0 <= v <= _MAX_TIME else None
    if tv is int:
        return float(v) if 0 <= v <= _MAX_TIME else None
    return None


def fold_fast(raw: bytes) -> tuple | None:
    """(done rcpts (a dict, insertion order), last {rcpt: (t, reply)}, [(rcpt, reply)] of the
    results with a reply in order, attempts, next attempt, hold) of a whole journal whose
    every line from_dict() accepts, as QueueState.from_bytes() would add them up; None when
    a line would be refused or the journal is not one JSON object per line (the caller then
    takes the strict path, which also counts the refused lines)."""
    if not raw:
        return {}, {}, [], 0, 0.0, False
    if not raw.endswith(b"\n") or b"\n\n" in raw or raw.startswith(b"\n"):
        return None
    try:
        # UTF-8 only (json.loads would also take UTF-16/32): what else parses here is refused
        # or read again by the strict path.
        items = _json_decode("[" + raw[:-1].replace(b"\n", b",").decode("utf-8") + "]")
    except (ValueError, RecursionError):
        return None
    if len(items) != raw.count(b"\n"):
        return None
    done: dict = {}
    last: dict = {}
    replies: list = []
    attempts, next_attempt, hold = 0, 0.0, False
    str_ = str
    for d in items:
        if type(d) is not dict:
            return None
        kind = d.get("k")
        t = d.get("t")
        tt = type(t)
        if tt is float:
            if not 0.0 <= t <= _MAX_TIME:
                return None
        elif tt is int and 0 <= t <= _MAX_TIME:
            t = float(t)
        else:
            return None
        if kind == "result":
            status, rcpt, reply = d.get("status"), d.get("rcpt"), d.get("reply")
            relay, mailer, tls = d.get("relay", ""), d.get("mailer", ""), d.get("tls", "")
            if (type(status) is not str_ or type(rcpt) is not str_ or type(reply) is not str_
                    or type(relay) is not str_ or type(mailer) is not str_ or type(tls) is not str_
                    or len(rcpt) > MAX_ADDRESS or len(reply) > MAX_TEXT or len(relay) > MAX_TEXT
                    or len(mailer) > 64 or len(tls) > MAX_TEXT):
                return None
            if status == "deferred":
                last[rcpt] = (t, reply)
            elif status == "sent" or status == "bounced":
                done[rcpt] = True
                last.pop(rcpt, None)
            else:
                return None
            if reply:
                replies.append((rcpt, reply))
        elif kind == "hold":
            on, by = d.get("on"), d.get("by", "")
            if type(on) is not bool or type(by) is not str_ or len(by) > MAX_TEXT:
                return None
            hold = on
        elif kind == "schedule":
            n = _time_ok(d.get("next"))
            if n is None:
                return None
            next_attempt = n
        elif kind == "attempt":
            n, nx = d.get("n"), _time_ok(d.get("next"))
            if type(n) is not int or not 0 <= n <= MAX_COUNT or nx is None:
                return None
            attempts, next_attempt = n, nx
        elif kind != "warned":
            return None
    return done, last, replies, attempts, next_attempt, hold
