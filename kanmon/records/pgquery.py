"""Searching the shared records in PostgreSQL: `kanmon log`, `trace` and `stats` over
every node, with a node filter (the tables are kanmon.records.pg's).

Role: read-only queries for the CLI, returning what kanmon.records.query, trace and stats
return for a node's SQLite, with the node that wrote each row. The trace runs the same
code as for SQLite over temporary views. Trusts: filter values from the admin, passed as
SQL parameters (the node name of a view as a quoted literal). Never: write to the shared
tables (log sessions are read-only; trace and stats only create temporary views).
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kanmon.records.pg import connect
from kanmon.state.pgconnect import READ_TIMEOUTS
from kanmon.records.query import EventRow, HistoryRow, address_like, message_ids
from kanmon.records.store import ACCEPTED
from kanmon.records.stats import BUCKETS, NO_CHECK, TOP, Stats, assemble, utc_offset
from kanmon.records.trace import Timeline, _trace

if TYPE_CHECKING:
    import psycopg

    from kanmon.config import RecordsSection


@contextlib.contextmanager
def reading(section: RecordsSection, read_only: bool = True) -> Iterator[psycopg.Connection]:
    """A connection to the shared records (read-only unless asked: temporary views)."""
    assert section.url is not None
    conn = connect(section.url, section.password_file, autocommit=True, timeouts=READ_TIMEOUTS)
    try:
        conn.read_only = read_only
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


def search_events(section: RecordsSection, *, since: float | None = None, until: float | None = None,
                  queue_id: str | None = None, grep: str | None = None, node: str | None = None,
                  limit: int = 10_000) -> list[EventRow]:
    where, args = [], []
    if since is not None:
        where.append("ts >= %s")
        args.append(since)
    if until is not None:
        where.append("ts < %s")
        args.append(until)
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


def search_history(section: RecordsSection, *, since: float | None = None, until: float | None = None,
                   mail_from: str | None = None, rcpt: str | None = None, subject: str | None = None,
                   queue_id: str | None = None, message_id: str | None = None,
                   node: str | None = None, limit: int = 10_000) -> list[HistoryRow]:
    where, args = [], []
    if since is not None:
        where.append("ts >= %s")
        args.append(since)
    if until is not None:
        where.append("ts < %s")
        args.append(until)
    if message_id:
        where.append("message_id IN (%s, %s)")
        args += message_ids(message_id)
    for column, value in (("mail_from", mail_from), ("rcpt", rcpt)):
        if value:  # as kanmon.records.query.search_history: <>, a shell pattern or a substring
            like = address_like(value)
            if like is None:
                where.append(f"{column} = ''")
            else:
                where.append(f"{column} ILIKE %s ESCAPE '\\'")
                args.append(like)
    if subject:
        where.append(_contains("subject"))
        args.append(subject)
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
    # NULL text reads as "", but a NULL sender (no MAIL command) stays None.
    return [HistoryRow(*("" if v is None and n != 2 else v for n, v in enumerate(r[:12])), node=r[12]) for r in rows]


def alert_events(section: RecordsSection, since: float, node: str | None = None,
                 limit: int = 100_000) -> list[tuple[float, dict | None, str]]:
    """The alert events (kind "alert") since `since`, oldest first: (ts, detail, node)."""
    where, args = ["kind = 'alert'", "ts >= %s"], [since]
    if node:
        where.append("node = %s")
        args.append(node)
    return [(ts, detail, n) for ts, detail, n in
            _newest(section, "SELECT ts, detail, node FROM events", where, args, limit)]


def nodes(section: RecordsSection) -> list[tuple[str, float]]:
    """The nodes that wrote records, with the time of their last batch."""
    with reading(section) as conn:
        return [(n, ts) for n, ts in conn.execute(
            "SELECT node, max(ts) FROM records_batches WHERE batch != 'live-since' GROUP BY node ORDER BY node")]


# -- kanmon trace and kanmon stats over every node ------------------------------------------

class _SqliteDialect:
    """Runs kanmon.records.trace's SQLite statements on PostgreSQL: `?` parameters,
    `COLLATE NOCASE` equality, json_extract and one DISTINCT ... ORDER BY, rewritten. The
    statements are kanmon's own (no admin text is ever part of them)."""

    def __init__(self, conn: psycopg.Connection):
        self.conn = conn

    @staticmethod
    def translate(sql: str) -> str:
        sql = re.sub(r" INDEXED BY \w+", "", sql)  # SQLite's plan pinning: PostgreSQL plans its own
        # Each step of a timeline names the node that wrote it (trace._step reads an 8th column).
        sql = sql.replace("SELECT id, ts, queue_id, kind, text, session, detail FROM events",
                          "SELECT id, ts, queue_id, kind, text, session, detail, node FROM events")
        sql = sql.replace("instr(detail, ", "strpos(detail, ").replace(" AND json_valid(detail)", "")  # jsonb: always valid
        sql = re.sub(r"(\w+) = \? COLLATE NOCASE", r"lower(\1) = lower(?)", sql)
        sql = re.sub(r"json_extract\(detail, '\$\.(\w+)'\)", r"(detail::jsonb->>'\1')", sql)
        if sql.startswith("SELECT DISTINCT queue_id FROM history"):
            sql = sql.replace("SELECT DISTINCT queue_id", "SELECT queue_id").replace(
                " ORDER BY ts LIMIT", " GROUP BY queue_id ORDER BY min(ts) LIMIT")
        return sql.replace("?", "%s")

    def execute(self, sql: str, args: tuple = ()):
        return self.conn.execute(self.translate(sql), args)


@contextlib.contextmanager
def _node_views(section: RecordsSection, node: str | None) -> Iterator[psycopg.Connection]:
    """A session whose `events` and `history` are temporary views over the shared tables
    (pg_temp comes first in the search path): only `node`'s rows when given, `detail` as
    JSON text as in SQLite. Nothing is written to the shared tables."""
    from psycopg import sql

    with reading(section, read_only=False) as conn:
        where = sql.SQL(" WHERE node = {}").format(sql.Literal(node)) if node else sql.SQL("")
        conn.execute(sql.SQL(
            "CREATE TEMP VIEW events AS SELECT id, node, ts, queue_id, kind, text, session, detail::text AS detail"
            " FROM public.events{}").format(where))
        conn.execute(sql.SQL("CREATE TEMP VIEW history AS SELECT * FROM public.history{}").format(where))
        yield conn


def trace(section: RecordsSection, query: str, since: float | None = None, node: str | None = None) -> list[Timeline]:
    """kanmon.records.trace.trace over every node's records (or one node's); each
    timeline names the node that handled it."""
    with _node_views(section, node) as conn:
        timelines = _trace(_SqliteDialect(conn), query.strip(), since or 0.0)
        for t in timelines:
            if t.queue_id:
                row = conn.execute("SELECT node FROM events WHERE queue_id = %s ORDER BY id LIMIT 1",
                                   (t.queue_id,)).fetchone()
            else:
                row = conn.execute("SELECT node FROM events WHERE kind = 'reject' AND ts = %s LIMIT 1",
                                   (t.steps[-1].ts,)).fetchone()
            t.node = row[0] if row else ""
    return timelines


PG_CHECK_LABEL = f"COALESCE(NULLIF(detail::jsonb->>'check', ''), '{NO_CHECK}')"
PG_LEGACY_ROWS = ("CASE WHEN detail::jsonb->>'reply' LIKE '421%%' THEN 0"
                  " WHEN detail::jsonb->>'stage' IN ('RCPT', 'DATA') THEN 1"
                  " WHEN detail::jsonb->>'stage' = 'MAIL' AND detail::jsonb->>'check' != '' THEN 1 ELSE 0 END")


def collect(section: RecordsSection, since: float, until: float | None = None, by: str = "day", top: int = TOP,
            node: str | None = None) -> Stats:
    """kanmon.records.stats.collect over every node's history (or one node's)."""
    if by not in BUCKETS:
        raise ValueError(f"by must be one of {', '.join(BUCKETS)}")
    until = time.time() if until is None else until
    out = Stats(since=since, until=until, by=by)
    size = BUCKETS[by]
    off = utc_offset(until)
    where = "FROM history WHERE ts >= %s AND ts < %s"
    queries = [
        ("SELECT floor((ts + %s) / %s)::bigint AS b, SUM(first), SUM(first * size),"
         f" SUM((status = 'Delivered')::int), SUM((deferrals > 0 AND {ACCEPTED})::int),"
         f" SUM((status LIKE 'Bounced%%')::int), SUM((disposition = 'Reject')::int) {where} GROUP BY b ORDER BY b",
         (off, size, since, until)),
        (f"SELECT mail_from, COUNT(*) AS c {where} AND first = 1 GROUP BY mail_from ORDER BY c DESC, mail_from LIMIT %s",
         (since, until, top)),
        (f"SELECT lower(rcpt) AS r, COUNT(*) AS c {where} AND {ACCEPTED} GROUP BY r ORDER BY c DESC, r"
         " LIMIT %s", (since, until, top)),
        ("SELECT lower(substr(rcpt, strpos(rcpt, '@') + 1)) AS d, COUNT(*) AS c"
         f" {where} AND {ACCEPTED} GROUP BY d ORDER BY c DESC, d LIMIT %s", (since, until, top)),
        # As kanmon.records.stats._queries: the history rows each refusal wrote, by check.
        (f"SELECT 'rcpt', {PG_CHECK_LABEL}, SUM(COALESCE((detail::jsonb->>'history_rows')::int, {PG_LEGACY_ROWS})) AS c"
         " FROM events WHERE ts >= %s AND ts < %s AND kind = 'reject' GROUP BY 2"
         f" HAVING SUM(COALESCE((detail::jsonb->>'history_rows')::int, {PG_LEGACY_ROWS})) > 0"
         f" UNION ALL SELECT 'connect', {PG_CHECK_LABEL}, COUNT(*) FROM events"
         " WHERE ts >= %s AND ts < %s AND kind = 'reject-connect' GROUP BY 2",
         (since, until, since, until)),
    ]
    with _node_views(section, node) as conn:
        results = [conn.execute(q, args).fetchall() for q, args in queries]
    rows = [(b, *(int(v or 0) for v in rest)) for b, *rest in results[0]]
    return assemble(out, size, off, rows, *results[1:])


# -- kanmon cluster status ------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class NodeStatus:
    node: str
    hostname: str
    version: str
    started: float
    last_seen: float
    queue: dict  # counts by state, "size", "oldest_waiting" (epoch seconds or None), as of last_seen
    alerts: list  # active alerts: {"category", "key", "text", "since"}
    stopped: bool = False  # the last heartbeat was the one a graceful stop sends

    def as_dict(self) -> dict:
        return {f: getattr(self, f) for f in self.__slots__}


def cluster_nodes(section: RecordsSection) -> list[NodeStatus]:
    """Every node's last heartbeat, by name."""
    with reading(section) as conn:
        if conn.execute("SELECT to_regclass('cluster_nodes') IS NULL").fetchone()[0]:
            return []
        rows = conn.execute("SELECT node, hostname, version, started, last_seen, queue, alerts FROM cluster_nodes"
                            ' ORDER BY node COLLATE "C"').fetchall()
    out = []
    for node, hostname, version, started, last_seen, queue, alerts in rows:
        stopped = bool(queue.pop("stopped", False)) if isinstance(queue, dict) else False
        out.append(NodeStatus(node, hostname, version, started, last_seen, queue, alerts, stopped))
    return out
