"""Message trace: one timeline per message, made from the records (`kanmon trace`).

Role: answer "why didn't my mail arrive?". A query (a queue id, a Message-ID or an
address) is matched against the history; each message found gets its timeline from the
event log: the client session (joined by the events' `session` column: connect, TLS,
EHLO from the history row), accept/reject decisions with their replies, the spool
acceptance, every delivery attempt (next hop, TLS from the line's structured detail,
the remote reply), notices sent and the final state. A message refused at RCPT or DATA
has no queue id; it is found by its address in the `NOQUEUE: reject:` lines and shown
with its session.

Trusts: the admin's query (SQL parameters only). The event lines are kanmon's own.
Never: write to the records (the read-write connection only migrates an old schema),
or make a delivery decision.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kanmon.model import is_queue_id
from kanmon.records.stats import connect_records

MAX_MESSAGES = 200  # timelines per query; the newest are kept

_NOTICE_RE = re.compile(r"^sender (failure|delay) notification: (\S+)")
_ACCEPT_RE = re.compile(r"^from=<([^>]*)>, size=(\d+), nrcpts=(\d+)(?:, msgid=([^,]*))?")


@dataclass(slots=True)
class Step:
    ts: float
    step: str  # session | tls | reject | accepted | tls-out | hop | attempt | notice | removed | error | info
    text: str
    detail: dict = field(default_factory=dict)


@dataclass(slots=True)
class Timeline:
    queue_id: str | None
    message_id: str = ""
    mail_from: str = ""
    rcpts: list[str] = field(default_factory=list)
    subject: str = ""
    size: int = 0
    client_ip: str = ""
    helo: str = ""
    final: str = ""
    status: dict[str, str] = field(default_factory=dict)  # rcpt -> history status
    steps: list[Step] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def classify(text: str, queue_id: str | None, kind: str) -> str:
    if kind in ("error", "critical"):
        return "error"
    if queue_id is None:
        if text.startswith(("connect from ", "disconnect from ")):
            return "session"
        if text.startswith("STARTTLS=server"):
            return "tls"
        if text.startswith(("NOQUEUE: reject:", "reject:")):
            return "reject"
        return "session"
    if text.startswith("from=<"):
        return "accepted"
    if text.startswith("STARTTLS=client"):
        return "tls-out"
    if text.startswith("to=<"):
        return "attempt"
    if text.startswith(("relay=", "domain ")):
        return "hop"  # a next hop that did not take the message in this attempt
    if _NOTICE_RE.match(text):
        return "notice"
    if text == "removed":
        return "removed"
    return "info"


def trace(data_dir: Path, query: str, since: float | None = None) -> list[Timeline]:
    """Every message matching query (queue id, Message-ID or address), oldest first."""
    db = connect_records(data_dir)
    if db is None:
        return []
    try:
        return _trace(db, query.strip(), since or 0.0)
    finally:
        db.close()


def _trace(db, query: str, since: float) -> list[Timeline]:
    qids: list[str] = []
    rejects: list[int] = []  # event ids of NOQUEUE lines
    if is_queue_id(query):
        qids = [query]
    else:
        bare = query.strip("<>")
        rows = db.execute(
            "SELECT DISTINCT queue_id FROM history WHERE message_id IN (?, ?) AND queue_id != '' AND ts >= ?"
            " ORDER BY ts LIMIT ?",
            (f"<{bare}>", bare, since, MAX_MESSAGES),
        ).fetchall()
        qids = [r[0] for r in rows]
        if not qids and "@" in bare:
            rows = db.execute(
                "SELECT queue_id, min(ts) AS t FROM history WHERE (mail_from = ? COLLATE NOCASE OR rcpt = ? COLLATE NOCASE)"
                " AND disposition = 'Accept' AND ts >= ? GROUP BY queue_id ORDER BY t DESC LIMIT ?",
                (bare, bare, since, MAX_MESSAGES),
            ).fetchall()
            qids = [r[0] for r in reversed(rows)]
            needle = f"<{bare.lower()}>"
            rejects = [
                r[0] for r in db.execute(
                    "SELECT id FROM events WHERE ts >= ? AND text LIKE 'NOQUEUE: reject:%' AND instr(lower(text), ?) > 0"
                    " ORDER BY id DESC LIMIT ?",
                    (since, needle, MAX_MESSAGES),
                )
            ]
            rejects.reverse()
    timelines = [_message(db, qid) for qid in qids]
    timelines += [_rejected(db, event_id) for event_id in rejects]
    timelines = [t for t in timelines if t.steps]
    timelines.sort(key=lambda t: t.steps[0].ts)
    return timelines


def _step(row) -> Step:
    _id, ts, qid, kind, text, _session, detail = row
    d = {}
    if detail:
        try:
            d = json.loads(detail)
        except ValueError:
            d = {}
    return Step(ts, classify(text, qid, kind), text, d)


def _session_steps(db, session: str | None, before_id: int) -> list[Step]:
    """The session lines that belong to the transaction ending at before_id: the connect
    and TLS lines, and whatever happened after the session's previous message."""
    if not session:
        return []
    prev = db.execute(
        "SELECT max(id) FROM events WHERE session = ? AND id < ? AND queue_id IS NOT NULL AND text LIKE 'from=<%'",
        (session, before_id),
    ).fetchone()[0] or 0
    rows = db.execute(
        "SELECT id, ts, queue_id, kind, text, session, detail FROM events"
        " WHERE session = ? AND id < ? AND queue_id IS NULL ORDER BY id",
        (session, before_id),
    ).fetchall()
    out = []
    for row in rows:
        text = row[4]
        if row[0] > prev or text.startswith(("connect from ", "STARTTLS=server")):
            out.append(_step(row))
    return out


def _message(db, qid: str) -> Timeline:
    t = Timeline(queue_id=qid)
    rows = db.execute(
        # In time order: with receiver processes, a message's lines come from two writers
        # whose batches land in either order, so ids alone do not order them.
        "SELECT id, ts, queue_id, kind, text, session, detail FROM events WHERE queue_id = ? ORDER BY ts, id", (qid,)
    ).fetchall()
    hist = db.execute(
        "SELECT rcpt, mail_from, message_id, subject, size, client_ip, helo, status FROM history"
        " WHERE queue_id = ? ORDER BY id",
        (qid,),
    ).fetchall()
    for rcpt, mail_from, message_id, subject, size, client_ip, helo, status in hist:
        t.rcpts.append(rcpt)
        t.status[rcpt] = status or ""
        t.mail_from, t.message_id, t.subject, t.size = mail_from or "", message_id or "", subject or "", size or 0
        t.client_ip, t.helo = client_ip or "", helo or ""
    accept = next((r for r in rows if r[4].startswith("from=<")), None)
    if accept is not None:
        t.steps.extend(_session_steps(db, accept[5], accept[0]))
        m = _ACCEPT_RE.match(accept[4])
        if m and not hist:
            t.mail_from, t.size = m.group(1), int(m.group(2))
            t.message_id = (m.group(4) or "").strip()
    t.steps.extend(_step(r) for r in rows)
    if t.helo:
        for s in t.steps:
            if s.text.startswith("connect from "):
                s.detail.setdefault("helo", t.helo)
    t.final = _final(t, rows)
    return t


def _final(t: Timeline, rows) -> str:
    removed = any(r[4] == "removed" for r in rows)
    results = {}
    for s in t.steps:
        if s.step == "attempt" and s.text.startswith("to=<"):
            rcpt = s.text[4 : s.text.index(">")]
            stat = s.text.rsplit(", stat=", 1)[-1]
            results[rcpt] = stat
    delivered = [r for r, st in results.items() if st.startswith("Sent")]
    bounced = [r for r, st in results.items() if st.startswith("Bounced")]
    deferred = [r for r, st in results.items() if st.startswith("Deferred")]
    parts = []
    if delivered:
        parts.append("delivered to " + ", ".join(delivered))
    if bounced:
        parts.append("bounced for " + ", ".join(f"{r} ({results[r][len('Bounced: '):]})" for r in bounced))
    holds = [r[4] for r in rows if r[4].startswith(("held by administrator", "released by administrator"))]
    on_hold = bool(holds) and holds[-1].startswith("held") and not removed
    if deferred and not removed:
        state = "on hold" if on_hold else "in the queue"
        parts.append(f"{state}, deferred for " + ", ".join(f"{r} ({results[r][len('Deferred: '):]})" for r in deferred))
    if not results:
        parts.append("removed" if removed else "on hold, not tried yet" if on_hold else "in the queue, not tried yet")
    elif not removed and not deferred:
        parts.append("still in the queue")
    return "; ".join(parts)


def _rejected(db, event_id: int) -> Timeline:
    row = db.execute(
        "SELECT id, ts, queue_id, kind, text, session, detail FROM events WHERE id = ?", (event_id,)
    ).fetchone()
    t = Timeline(queue_id=None)
    text = row[4]
    m = re.search(r"; from=<([^>]*)>(?: to=<([^>]*)>)?", text)
    if m:
        t.mail_from = m.group(1)
        if m.group(2):
            t.rcpts = [m.group(2)]
    ip = re.search(r" from [^\[]*\[([^\]]*)\]", text)
    t.client_ip = ip.group(1) if ip else ""
    helo = re.search(r" helo=<([^>]*)>", text)
    t.helo = helo.group(1) if helo else ""
    t.steps = _session_steps(db, row[5], row[0]) + [_step(row)]
    for s in t.steps:
        if t.helo and s.text.startswith("connect from "):
            s.detail.setdefault("helo", t.helo)
    reply = re.search(r"\]: (.*?)(?:; from=<|$)", text)
    t.final = "rejected: " + (reply.group(1) if reply else text)
    return t
