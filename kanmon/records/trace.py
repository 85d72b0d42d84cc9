"""Message trace: one timeline per message, made from the records (`kanmon trace`).

Role: answer "why didn't my mail arrive?". A query (a queue id, a Message-ID or an
address) is matched against the history; each message found gets its timeline from the
event log: the client session (joined by the events' `session` column: connect, TLS,
EHLO from the history row), accept/reject decisions with their replies, the spool
acceptance, every delivery attempt (next hop, TLS, the remote reply), notices sent and
the final state. Steps and the final state come from the events' kinds and fields
(kanmon.records.events), never from their text. A message refused at RCPT or DATA has
no queue id; it is found by its address in the fields of `reject` events and shown with
its session. Rows written before events had fields show as `info` (or `session`) steps
with their text, and add nothing to the final state.

Trusts: the admin's query (SQL parameters only). The event rows are kanmon's own.
Never: write to the records (the read-write connection only migrates an old schema),
or make a delivery decision.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kanmon.model import is_queue_id
from kanmon.records.events import BOUNCED, DEFERRED, SENT
from kanmon.records.stats import connect_records

MAX_MESSAGES = 200  # timelines per query; the newest are kept

# Event kind (kanmon.records.events) -> the step a timeline shows it as.
STEPS = {
    "connect": "session", "disconnect": "session", "session-cut": "session", "auth": "session",
    "auth-failed": "session", "tls-in": "tls", "reject": "reject", "reject-connect": "reject",
    "reject-proxy": "reject", "reject-early": "reject", "accepted": "accepted", "tls-out": "tls-out", "tls-policy": "tls-out",
    "delivery": "attempt", "hop": "hop", "hop-domain": "hop", "hop-unresolved": "hop", "notice": "notice",
    "removed": "removed", "error": "error", "critical": "error", "check-failed": "error",
    "probe-failed": "error", "effect-failed": "error", "effect-unhandled": "error", "proxy-timeout": "session",
    "auth-results": "auth",
}


@dataclass(slots=True)
class Step:
    ts: float
    step: str  # session | tls | reject | accepted | tls-out | hop | attempt | notice | removed | error | info
    text: str
    detail: dict = field(default_factory=dict)  # the event's fields
    kind: str = ""  # the event's kind
    node: str = ""  # the node that wrote it (shared records; "" in a node's SQLite)


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
    node: str = ""  # the node that handled it (shared records; "" in a node's SQLite)

    def as_dict(self) -> dict:
        d = asdict(self)
        if not self.node:
            del d["node"]
        for step in d["steps"]:
            if not step["node"]:
                del step["node"]
        return d

    def nodes(self) -> list[str]:
        """The nodes its steps come from, in order (a message released on another node
        than the one that quarantined it has two)."""
        return list(dict.fromkeys(s.node for s in self.steps if s.node)) or ([self.node] if self.node else [])


def classify(kind: str, queue_id: str | None) -> str:
    """The step of an event of `kind`; a line without a type of its own (and every line
    of a database written before events had types) is `info`, or `session` without a
    queue id."""
    return STEPS.get(kind) or ("session" if queue_id is None else "info")


def trace(data_dir: Path, query: str, since: float | None = None) -> list[Timeline]:
    """Every message matching query (queue id, Message-ID or address), oldest first."""
    db = connect_records(data_dir)
    if db is None:
        return []
    try:
        return _trace(db, query.strip(), since or 0.0)
    finally:
        db.close()


def _indexed(db, index: str, sql: str, args: tuple) -> list[tuple]:
    """sql ("{}" where the INDEXED BY goes) through `index`, whatever ANALYZE's statistics
    say (they see one kind in a million events as unselective and scan the table); without
    it (a read-only database of an older version), as SQLite plans it."""
    try:
        return db.execute(sql.format(f"INDEXED BY {index}"), args).fetchall()
    except sqlite3.OperationalError as e:
        if "no such index" not in str(e):  # "no query solution" (the WHERE does not fit it) is a bug: raised
            raise
        return db.execute(sql.format(""), args).fetchall()


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
                " AND queue_id != '' AND ts >= ? GROUP BY queue_id ORDER BY t DESC LIMIT ?",
                (bare, bare, since, MAX_MESSAGES),
            ).fetchall()
            qids = [r[0] for r in reversed(rows)]
            needle = bare.lower()
            # An alias or a forward: the history holds the addresses delivered to; the
            # address the sender used is the deliveries' orig_to (as in the log line).
            # The partial index events_orig_rcpt holds the deliveries with an orig_rcpt (the
            # query repeats its WHERE so that SQLite uses it; the writer's json.dumps spells
            # an empty one '"orig_rcpt": ""', which the index leaves out without parsing).
            for (qid,) in _indexed(
                db, "events_orig_rcpt",
                "SELECT DISTINCT queue_id FROM events {} WHERE kind = 'delivery'"
                """ AND instr(detail, '"orig_rcpt": ""') = 0 AND json_valid(detail)"""
                " AND json_extract(detail, '$.orig_rcpt') != '' AND lower(json_extract(detail, '$.orig_rcpt')) = ? AND ts >= ? ORDER BY queue_id LIMIT ?",
                (needle, since, MAX_MESSAGES),
            ):
                if qid and qid not in qids:
                    qids.append(qid)
            rejects = [
                r[0] for r in _indexed(
                    db, "events_kind_ts",
                    "SELECT id FROM events {} WHERE ts >= ? AND kind = 'reject' AND detail IS NOT NULL"
                    " AND (lower(json_extract(detail, '$.rcpt')) = ? OR lower(json_extract(detail, '$.mail_from')) = ?)"
                    " ORDER BY id DESC LIMIT ?",
                    (since, needle, needle, MAX_MESSAGES),
                )
            ]
            rejects.reverse()
    timelines = [_message(db, qid) for qid in qids]
    timelines += [_rejected(db, event_id) for event_id in rejects]
    timelines = [t for t in timelines if t.steps]
    timelines.sort(key=lambda t: t.steps[0].ts)
    return timelines


def _step(row) -> Step:
    """A step from an events row (id, ts, queue_id, kind, text, session, detail[, node])."""
    _id, ts, qid, kind, text, _session, detail = row[:7]
    d = {}
    if detail:
        try:
            d = json.loads(detail)
        except ValueError:
            d = {}
    return Step(ts, classify(kind, qid), text, d if isinstance(d, dict) else {}, kind, row[7] if len(row) > 7 else "")


def _session_steps(db, session: str | None, before_id: int) -> list[Step]:
    """The session lines that belong to the transaction ending at before_id: the connect
    and TLS lines, and whatever happened after the session's previous message."""
    if not session:
        return []
    prev = db.execute(
        "SELECT max(id) FROM events WHERE session = ? AND id < ? AND queue_id IS NOT NULL AND kind = 'accepted'",
        (session, before_id),
    ).fetchone()[0] or 0
    rows = db.execute(
        "SELECT id, ts, queue_id, kind, text, session, detail FROM events"
        " WHERE session = ? AND id < ? AND queue_id IS NULL ORDER BY id",
        (session, before_id),
    ).fetchall()
    out = []
    for row in rows:
        if row[0] > prev or row[3] in ("connect", "tls-in"):
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
    accept = next((r for r in rows if r[3] == "accepted"), None)
    if accept is not None:
        t.steps.extend(_session_steps(db, accept[5], accept[0]))
    t.steps.extend(_step(r) for r in rows)
    if accept is not None and not hist:
        f = next(s for s in t.steps if s.kind == "accepted").detail
        t.mail_from, t.size = f.get("mail_from") or "", f.get("size") or 0
        t.message_id = (f.get("msgid") or "").strip()
    if t.helo:
        for s in t.steps:
            if s.kind == "connect":
                s.detail.setdefault("helo", t.helo)
    t.final = _final(t)
    return t


def _final(t: Timeline) -> str:
    removed = any(s.kind == "removed" for s in t.steps)
    results: dict[str, tuple[str, str]] = {}  # rcpt -> (status, reply) of its last attempt
    holds: list[str] = []
    deleted = ""  # who deleted the message from the queue (an administrator, a maintenance job)
    quarantine = ""  # the last quarantine step: in it, released, deleted; or discarded
    for s in t.steps:
        d = s.detail
        if s.kind == "delivery" and "rcpt" in d:
            reply = d.get("reply", "") + (f" ({d['note']})" if d.get("note") else "")
            results[d["rcpt"]] = (d.get("status", ""), reply)
        elif s.kind == "admin-message" and d.get("action") in ("hold", "release"):
            holds.append(d["action"])
        elif s.kind == "admin-message" and d.get("action") == "delete":
            deleted = d.get("source") or "?"
        elif s.kind == "admin-message" and d.get("action") == "bounce":
            removed = True  # returned to sender: each recipient bounced, the message deleted
        elif s.kind == "quarantine-hold":  # held at acceptance, until released
            holds.append("hold")
        elif s.kind in ("quarantine", "quarantine-release", "quarantine-delete", "discard"):
            quarantine = s.kind
    if quarantine == "quarantine":
        return "in the quarantine (kanmon quarantine show " + (t.queue_id or "ID") + ")"
    if quarantine == "quarantine-delete":
        return "deleted from the quarantine"
    if quarantine == "discard":
        return "discarded (accepted and dropped by a check)"
    delivered = [r for r, (st, _) in results.items() if st == SENT]
    bounced = [r for r, (st, _) in results.items() if st == BOUNCED]
    deferred = [r for r, (st, _) in results.items() if st == DEFERRED]
    parts = []
    if delivered:
        parts.append("delivered to " + ", ".join(delivered))
    if bounced:
        parts.append("bounced for " + ", ".join(f"{r} ({results[r][1]})" for r in bounced))
    on_hold = bool(holds) and holds[-1] == "hold" and not removed
    if deleted:
        # Deleted from the queue: what was still waiting will never be delivered.
        by = f"deleted by administrator ({deleted})"
        if deferred:
            parts.append(f"{by}, not delivered to " + ", ".join(f"{r} (last reply: {results[r][1]})" for r in deferred))
        elif not results:
            parts.append(f"{by}, not tried")
        elif not delivered and not bounced:
            parts.append(by)
        return "; ".join(parts)
    if deferred and not removed:
        state = "on hold" if on_hold else "in the queue"
        parts.append(f"{state}, deferred for " + ", ".join(f"{r} ({results[r][1]})" for r in deferred))
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
    step = _step(row)
    d = step.detail
    t.mail_from = d.get("mail_from") or ""
    if d.get("rcpt"):
        t.rcpts = [d["rcpt"]]
    t.client_ip, t.helo = d.get("ip", ""), d.get("helo", "")
    t.steps = _session_steps(db, row[5], row[0]) + [step]
    for s in t.steps:
        if t.helo and s.kind == "connect":
            s.detail.setdefault("helo", t.helo)
    t.final = "rejected: " + (d.get("reply") or row[4]) + (f" (check {d['check']})" if d.get("check") else "")
    return t
