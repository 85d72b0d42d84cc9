"""Searching the records: event log and history, for the CLI and the web console.

Role: read-only queries over records.sqlite with filters. Trusts: filter values from
the admin, passed as SQL parameters only (never formatted into SQL).
Never: write, or lock the database against the running server (read-only connection).
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from typing import Any
from pathlib import Path

from kanmon.records.store import open_db


@dataclass(frozen=True, slots=True)
class EventRow:
    ts: float
    queue_id: str | None
    kind: str
    text: str
    fields: dict[str, Any] | None = None  # the typed event's fields (None: a free-text line)
    node: str = ""  # the node that wrote it (shared records in PostgreSQL; "" in a node's SQLite)

    def as_dict(self) -> dict[str, Any]:
        """The JSON of `kanmon log events --json`: `ts` as in the history's JSON."""
        out = {"ts": self.ts, "queue_id": self.queue_id, "kind": self.kind, "text": self.text, "fields": self.fields}
        if self.node:
            out["node"] = self.node
        return out


def _event_row(ts, queue_id, kind, text, detail) -> EventRow:
    try:
        fields = json.loads(detail) if detail else None
    except ValueError:
        fields = None
    return EventRow(ts, queue_id, kind, text, fields if isinstance(fields, dict) else None)


NULL_SENDER = "<>"  # --from '<>': the null sender (bounces and other notices), as in the queue's filters


def address_like(pattern: str) -> str | None:
    """An address filter of `kanmon log history` as a LIKE pattern (case-insensitive, a backslash
    escapes): with `*` or `?` a shell pattern over the whole address (`*@example.com`),
    without them a substring; None for `<>`, the null sender (an empty MAIL FROM)."""
    if pattern.strip() == NULL_SENDER:
        return None
    body = pattern.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    if "*" in pattern or "?" in pattern:
        return body.replace("*", "%").replace("?", "_")
    return f"%{body}%"


@dataclass(frozen=True, slots=True)
class HistoryRow:
    ts: float
    client_ip: str
    mail_from: str | None  # "" the null sender <>; None: no MAIL command (a refusal before it)
    rcpt: str
    subject: str
    message_id: str
    size: int
    classification: str
    disposition: str
    queue_id: str
    status: str
    auth_user: str
    node: str = ""  # the node that wrote it (shared records in PostgreSQL; "" in a node's SQLite)

    def as_dict(self) -> dict[str, Any]:
        """The JSON of `kanmon log history --json` (`node` only from the shared records)."""
        out = {f: getattr(self, f) for f in self.__slots__}
        if not self.node:
            del out["node"]
        return out


def _connect(data_dir: Path) -> sqlite3.Connection | None:
    path = Path(data_dir) / "records.sqlite"
    if not path.exists():
        return None
    return open_db(path, readonly=True)


def _newest(data_dir: Path, select: str, where: list[str], args: list, limit: int, row) -> list:
    """The newest `limit` rows matching `where`, returned oldest first."""
    db = _connect(data_dir)
    if db is None:
        return []
    try:
        if "detail" in select and "detail" not in {r[1] for r in db.execute("PRAGMA table_info(events)")}:
            select = select.replace("detail", "NULL")  # an old database, not migrated yet: no fields
        sql = select + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY ts DESC, id DESC LIMIT ?"
        if row is HistoryRow:  # NULL text columns read as "", but a NULL sender (no MAIL) stays None
            rows = [row(*(("" if v is None and n != 2 else v) for n, v in enumerate(r))) for r in db.execute(sql, [*args, limit])]
        else:
            rows = [row(*r) for r in db.execute(sql, [*args, limit])]
    finally:
        db.close()
    rows.reverse()
    return rows


def message_ids(value: str) -> tuple[str, str]:
    """A Message-ID as given (with or without its angle brackets): both spellings, as the
    history may hold either."""
    bare = value.strip().removeprefix("<").removesuffix(">")
    return f"<{bare}>", bare


def search_events(
    data_dir: Path, *, since: float | None = None, until: float | None = None, queue_id: str | None = None,
    grep: str | None = None, limit: int = 10_000, kinds: tuple[str, ...] = (),
) -> list[EventRow]:
    """The newest `limit` event lines matching every filter given, oldest first; since
    and until: the period [since, until).
    kinds: only lines of these kinds (found by the events(kind, ts) index)."""
    where, args = [], []
    if kinds:
        where.append(f"kind IN ({', '.join('?' * len(kinds))})")
        args += kinds
    if since is not None:
        where.append("ts >= ?")
        args.append(since)
    if until is not None:
        where.append("ts < ?")
        args.append(until)
    if queue_id:
        where.append("(queue_id = ? OR text LIKE ?)")
        args += [queue_id, f"%{queue_id}%"]
    if grep:
        where.append("(instr(lower(text), lower(?)) > 0 OR instr(lower(coalesce(queue_id, '')), lower(?)) > 0)")
        args += [grep, grep]
    return _newest(data_dir, "SELECT ts, queue_id, kind, text, detail FROM events", where, args, limit, _event_row)


def tail_events(data_dir: Path, after: int | None, *, grep: str | None = None,
                limit: int = 200) -> tuple[int, list[EventRow]]:
    """The event lines written after the line numbered `after` (oldest first, at most
    `limit`), and the number to ask after next time: a live tail. With `after` None, no
    lines and the newest line's number (where a tail starts)."""
    db = _connect(data_dir)
    if db is None:
        return (after or 0), []
    try:
        newest = db.execute("SELECT coalesce(max(id), 0) FROM events").fetchone()[0]
        if after is None or newest <= after:
            return (newest if after is None else after), []
        detail = "detail" if "detail" in {r[1] for r in db.execute("PRAGMA table_info(events)")} else "NULL"
        where, args = ["id > ?", "id <= ?"], [after, newest]
        if grep:
            where.append("(instr(lower(text), lower(?)) > 0 OR instr(lower(coalesce(queue_id, '')), lower(?)) > 0)")
            args += [grep, grep]
        found = db.execute(f"SELECT id, ts, queue_id, kind, text, {detail} FROM events WHERE {' AND '.join(where)}"
                           " ORDER BY id LIMIT ?", [*args, limit]).fetchall()
    finally:
        db.close()
    cursor = found[-1][0] if len(found) == limit else newest  # more to come: go on from the last one read
    return cursor, [_event_row(*r[1:]) for r in found]


def search_history(
    data_dir: Path, *, since: float | None = None, until: float | None = None, mail_from: str | None = None,
    rcpt: str | None = None, subject: str | None = None, queue_id: str | None = None, message_id: str | None = None,
    limit: int = 10_000,
) -> list[HistoryRow]:
    """The newest `limit` history rows matching every filter given, oldest first; since
    and until: the period [since, until); message_id: exactly, brackets or not."""
    where, args = [], []
    if since is not None:
        where.append("ts >= ?")
        args.append(since)
    if until is not None:
        where.append("ts < ?")
        args.append(until)
    if message_id:
        where.append("message_id IN (?, ?)")
        args += message_ids(message_id)
    for column, value in (("mail_from", mail_from), ("rcpt", rcpt)):
        if value:
            like = address_like(value)
            if like is None:
                where.append(f"{column} = ''")
            else:
                where.append(f"lower({column}) LIKE lower(?) ESCAPE '\\'")
                args.append(like)
    if subject:
        where.append("instr(lower(subject), lower(?)) > 0")
        args.append(subject)
    if queue_id:
        where.append("queue_id = ?")
        args.append(queue_id)
    return _newest(
        data_dir,
        "SELECT ts, client_ip, mail_from, rcpt, subject, message_id, size, classification, disposition,"
        " queue_id, status, auth_user FROM history",
        where, args, limit, HistoryRow,
    )
