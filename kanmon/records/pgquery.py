"""Searching the shared records in PostgreSQL: `kanmon log` over every node, with a node
filter (the tables are kanmon.records.pg's).

Role: read-only queries for the CLI, returning the rows kanmon.records.query returns for
a node's SQLite, with the node that wrote each. Trusts: filter values from the admin,
passed as SQL parameters only. Never: write (the session is read-only).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

from kanmon.records.pg import connect
from kanmon.records.query import EventRow, HistoryRow

if TYPE_CHECKING:
    import psycopg

    from kanmon.config import RecordsSection


@contextlib.contextmanager
def reading(section: RecordsSection) -> Iterator[psycopg.Connection]:
    """A read-only connection to the shared records."""
    assert section.url is not None
    conn = connect(section.url, section.password_file, autocommit=True)
    try:
        conn.read_only = True
        yield conn
    finally:
        conn.close()


def _newest(section: RecordsSection, select: str, where: list[str], args: list, limit: int) -> list[tuple]:
    with reading(section) as conn:
        sql = select + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY ts DESC, id DESC LIMIT %s"
        rows = conn.execute(sql, [*args, limit]).fetchall()
    rows.reverse()
    return rows


def _contains(column: str) -> str:
    return f"strpos(lower(coalesce({column}, '')), lower(%s)) > 0"


def search_events(section: RecordsSection, *, since: float | None = None, queue_id: str | None = None,
                  grep: str | None = None, node: str | None = None, limit: int = 10_000) -> list[EventRow]:
    where, args = [], []
    if since is not None:
        where.append("ts >= %s")
        args.append(since)
    if queue_id:
        where.append("(queue_id = %s OR strpos(text, %s) > 0)")
        args += [queue_id, queue_id]
    if grep:
        where.append(f"({_contains('text')} OR {_contains('queue_id')})")
        args += [grep, grep]
    if node:
        where.append("node = %s")
        args.append(node)
    rows = _newest(section, "SELECT ts, queue_id, kind, text, detail, node FROM events", where, args, limit)
    return [EventRow(ts, qid, kind, text, detail if isinstance(detail, dict) else None, node=n)
            for ts, qid, kind, text, detail, n in rows]


def search_history(section: RecordsSection, *, since: float | None = None, mail_from: str | None = None,
                   rcpt: str | None = None, subject: str | None = None, queue_id: str | None = None,
                   node: str | None = None, limit: int = 10_000) -> list[HistoryRow]:
    where, args = [], []
    if since is not None:
        where.append("ts >= %s")
        args.append(since)
    for column, value in (("mail_from", mail_from), ("rcpt", rcpt), ("subject", subject)):
        if value:
            where.append(_contains(column))
            args.append(value)
    if queue_id:
        where.append("queue_id = %s")
        args.append(queue_id)
    if node:
        where.append("node = %s")
        args.append(node)
    rows = _newest(
        section,
        "SELECT ts, client_ip, mail_from, rcpt, subject, message_id, size, classification, disposition,"
        " queue_id, status, auth_user, node FROM history", where, args, limit)
    return [HistoryRow(*("" if v is None else v for v in r[:12]), node=r[12]) for r in rows]


def nodes(section: RecordsSection) -> list[tuple[str, float]]:
    """The nodes that wrote records, with the time of their last batch."""
    with reading(section) as conn:
        return [(n, ts) for n, ts in conn.execute("SELECT node, max(ts) FROM records_batches GROUP BY node ORDER BY node")]
