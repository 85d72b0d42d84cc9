"""Volume statistics from the message history: `kanmon stats`.

Role: count what passed through in hour or day buckets (local time) — messages
received and their bytes, recipients delivered, deferred (at least once), bounced and
rejected — the top senders, recipients and destination domains, and refusals by check. Plain SQL over the
`history` table (one row per message and recipient); the `first` column marks one row
per message, so messages and bytes are counted once however many recipients they had.

Trusts: the admin's period (SQL parameters only). Never: write to the records (the
read-write connection is only for bringing an old database up to the current schema).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kanmon.records.store import open_db

BUCKETS = {"hour": 3600, "day": 86400}
TOP = 10


@dataclass(slots=True)
class Bucket:
    start: float
    received: int = 0
    bytes: int = 0
    delivered: int = 0
    deferred: int = 0
    bounced: int = 0
    rejected: int = 0


@dataclass(slots=True)
class Stats:
    since: float
    until: float
    by: str
    buckets: list[Bucket] = field(default_factory=list)
    totals: Bucket = field(default_factory=lambda: Bucket(0.0))
    top_senders: list[tuple[str, int]] = field(default_factory=list)
    top_recipients: list[tuple[str, int]] = field(default_factory=list)
    top_domains: list[tuple[str, int]] = field(default_factory=list)
    rejected_by_check: list[tuple[str, int]] = field(default_factory=list)  # refusals (commands, connections) by check

    def as_dict(self) -> dict:
        d = asdict(self)
        for key in ("top_senders", "top_recipients", "top_domains", "rejected_by_check"):
            d[key] = [{"name": n, "count": c} for n, c in getattr(self, key)]
        return d


def connect_records(data_dir: Path) -> sqlite3.Connection | None:
    """records.sqlite, migrated to the current schema when it can be; None if absent."""
    path = Path(data_dir) / "records.sqlite"
    if not path.exists():
        return None
    try:
        return open_db(path)
    except sqlite3.OperationalError:  # read-only file or directory: query as it is
        return open_db(path, readonly=True)


def _scan_hint(db: sqlite3.Connection, since: float, until: float) -> str:
    """NOT INDEXED when the period covers much of the table: a sequential scan is several
    times faster than following the ts index row by row (measured: bench/stats_history.py)."""
    # Two subqueries: SQLite answers a lone min() or max() from the ts index's end, but
    # both in one SELECT walk the whole index (~0.1 s for a million rows).
    first, last = db.execute("SELECT (SELECT min(ts) FROM history), (SELECT max(ts) FROM history)").fetchone()
    if first is None or last <= first:
        return ""
    covered = (min(until, last) - max(since, first)) / (last - first)
    return "NOT INDEXED" if covered > 0.25 else ""


def utc_offset(at: float | None = None) -> int:
    """Seconds east of UTC of local time now (buckets are local hours and days)."""
    return time.localtime(at).tm_gmtoff or 0


def collect(data_dir: Path, since: float, until: float | None = None, by: str = "day", top: int = TOP,
            progress: Callable[[int, int | None], None] | None = None) -> Stats:
    """The report for [since, until); top=0: the buckets alone (the other four are empty).

    A period covering much of the history: the five aggregations run at once, each on its
    own read-only connection scanning the table (sqlite3 releases the GIL while it steps),
    then are merged. A shorter period (the ts index is used): its rows are read through the
    index once, into a temporary table the aggregations then share — following the index
    to each row is most of the work, and it was done once per aggregation. The same SQL
    either way, so the same report.
    progress(done, total), if given, is called as each aggregation finishes."""
    if by not in BUCKETS:
        raise ValueError(f"by must be one of {', '.join(BUCKETS)}")
    until = time.time() if until is None else until
    out = Stats(since=since, until=until, by=by)
    db = connect_records(data_dir)  # migrates an old database first
    if db is None:
        return out
    try:
        scan = _scan_hint(db, since, until)
    finally:
        db.close()
    path = Path(data_dir) / "records.sqlite"
    size = BUCKETS[by]
    off = utc_offset(until)
    if top <= 0:  # the buckets only (the dashboard's chart): no top lists, no refusals by check
        queries = _queries(f"FROM history {scan} WHERE ts >= ? AND ts < ?", off, size, since, until, top)[:1]
    elif scan:
        queries = _queries(f"FROM history {scan} WHERE ts >= ? AND ts < ?", off, size, since, until, top)
    else:
        return assemble(out, size, off, *_one_pass(path, off, size, since, until, top, progress))

    def run(query: tuple[str, tuple]) -> list[tuple]:
        conn = open_db(path, readonly=True)
        try:
            return conn.execute(*query).fetchall()
        finally:
            conn.close()

    with ThreadPoolExecutor(max_workers=len(queries), thread_name_prefix="stats") as pool:
        futures = [pool.submit(run, q) for q in queries]
        if progress is not None:
            progress(0, len(futures))
            for n, _done in enumerate(as_completed(futures), 1):
                progress(n, len(futures))
        rows, senders, recipients, domains, checks = ([*(f.result() for f in futures), [], [], [], []])[:5]
    return assemble(out, size, off, rows, senders, recipients, domains, checks)


PERIOD_COLUMNS = "ts, first, size, status, deferrals, disposition, mail_from, rcpt"  # what _queries reads of history


def _queries(where: str, off: int, size: int, since: float, until: float, top: int) -> list[tuple[str, tuple]]:
    """The five aggregations, the history's four reading the rows of `where` (FROM ...
    WHERE ts >= ? AND ts < ?)."""
    return [
        ("SELECT CAST((ts + ?) / ? AS INTEGER) AS b, SUM(first), SUM(first * size),"
         " SUM(status = 'Delivered'), SUM(deferrals > 0 AND disposition = 'Accept'),"
         f" SUM(status LIKE 'Bounced%'), SUM(disposition = 'Reject') {where} GROUP BY b ORDER BY b",
         (off, size, since, until)),
        (f"SELECT mail_from, COUNT(*) AS c {where} AND first = 1 GROUP BY mail_from ORDER BY c DESC, mail_from LIMIT ?",
         (since, until, top)),
        (f"SELECT lower(rcpt) AS r, COUNT(*) AS c {where} AND disposition = 'Accept' GROUP BY r ORDER BY c DESC, r LIMIT ?",
         (since, until, top)),
        ("SELECT lower(substr(rcpt, instr(rcpt, '@') + 1)) AS d, COUNT(*) AS c"
         f" {where} AND disposition = 'Accept' GROUP BY d ORDER BY c DESC, d LIMIT ?",
         (since, until, top)),
        # Refusals by the check that made them (the typed event's detail, not its text);
        # "-" for a protocol refusal no check made (bad syntax, limits of the session).
        ("SELECT COALESCE(NULLIF(json_extract(detail, '$.check'), ''), '-') AS k, COUNT(*) AS c FROM main.events"
         " WHERE ts >= ? AND ts < ? AND kind IN ('reject', 'reject-connect') GROUP BY k ORDER BY c DESC, k",
         (since, until)),
    ]


def _one_pass(path: Path, off: int, size: int, since: float, until: float, top: int,
              progress: Callable[[int, int | None], None] | None) -> list[list[tuple]]:
    """The five aggregations' rows on one read-only connection (one snapshot), the
    period's history rows copied once into a temporary table in memory."""
    conn = open_db(path, readonly=True)
    try:
        conn.execute("PRAGMA temp_store = MEMORY")
        conn.execute(f"CREATE TEMP TABLE period AS SELECT {PERIOD_COLUMNS} FROM main.history WHERE ts >= ? AND ts < ?",
                     (since, until))
        queries = _queries("FROM temp.period WHERE ts >= ? AND ts < ?", off, size, since, until, top)
        results = []
        if progress is not None:
            progress(0, len(queries))
        for n, query in enumerate(queries, 1):
            results.append(conn.execute(*query).fetchall())
            if progress is not None:
                progress(n, len(queries))
        return results
    finally:
        conn.close()


def assemble(out: Stats, size: int, off: int, rows, senders, recipients, domains, checks) -> Stats:
    """The report from the five aggregations' rows (SQLite's here, PostgreSQL's in
    kanmon.records.pgquery: the same columns)."""
    for b, received, nbytes, delivered, deferred, bounced, rejected in rows:
        out.buckets.append(Bucket(b * size - off, received or 0, nbytes or 0, delivered or 0, deferred or 0,
                                  bounced or 0, rejected or 0))
    t = out.totals
    t.start = out.since
    for b in out.buckets:
        t.received += b.received
        t.bytes += b.bytes
        t.delivered += b.delivered
        t.deferred += b.deferred
        t.bounced += b.bounced
        t.rejected += b.rejected
    out.top_senders = [(s or "<>", c) for s, c in senders]
    out.top_recipients = [(r, c) for r, c in recipients]
    out.top_domains = [(d, c) for d, c in domains]
    out.rejected_by_check = [(k, c) for k, c in checks]
    return out
