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

import heapq
import math
import os
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from itertools import compress
from operator import itemgetter
from pathlib import Path

from kanmon.records.store import ACCEPTED, SLOT, SLOT_COLUMNS, SLOT_SUMS, has_table, open_db

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
    # The "rejected" column's refusals (recipients, senders refused by a check) by check: the same sum.
    rejected_by_check: list[tuple[str, int]] = field(default_factory=list)
    connections_refused_by_check: list[tuple[str, int]] = field(default_factory=list)  # before the greeting

    def as_dict(self) -> dict:
        d = asdict(self)
        for key in ("top_senders", "top_recipients", "top_domains", "rejected_by_check", "connections_refused_by_check"):
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

    The buckets come from the history's counts per quarter hour (bucket_query), not from
    the rows. The top lists and the refusals by check are aggregations over the period's
    rows: for a period covering much of the history they run at once, each on its own
    read-only connection scanning the table (sqlite3 releases the GIL while it steps),
    then are merged. A shorter period (the ts index is used): its rows are counted in
    Python (_one_pass), the whole hours of a period up to two days from counts kept per
    hour. The same counts and the same order either way, so the same report.
    progress(done, total), if given, is called as each aggregation finishes."""
    if by not in BUCKETS:
        raise ValueError(f"by must be one of {', '.join(BUCKETS)}")
    until = time.time() if until is None else until
    out = Stats(since=since, until=until, by=by)
    db = connect_records(data_dir)  # migrates an old database first
    if db is None:
        return out
    size = BUCKETS[by]
    off = utc_offset(until)
    try:
        buckets = bucket_query(db, since, until, size, off)
        if top <= 0:  # the buckets only (the dashboard's chart): no top lists, no refusals by check
            return assemble(out, size, off, buckets, [], [], [], [])
        scan = _scan_hint(db, since, until)
    finally:
        db.close()
    path = Path(data_dir) / "records.sqlite"
    if not scan:
        return assemble(out, size, off, buckets, *_one_pass(path, since, until, top, progress))
    queries = _queries(f"FROM history {scan} WHERE ts >= ? AND ts < ?", since, until, top)

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
        senders, recipients, checks = (f.result() for f in futures)
    return assemble(out, size, off, buckets, senders, *_top_recipients(recipients, top), checks)


def _top_recipients(recipients: list[tuple], top: int) -> tuple[list[tuple], list[tuple]]:
    """The top recipients and the top destination domains from every (lower(rcpt), count)
    of the period: the domains summed here rather than by a GROUP BY of their own over the
    rows again (`lower(substr(rcpt, instr(rcpt, '@') + 1))`: what follows the first @,
    the whole address without one). Ties in name order, NULL first, as SQLite orders them."""
    domains: dict = {}
    for r, c in recipients:
        d = None if r is None else r[r.find("@") + 1:]
        domains[d] = domains.get(d, 0) + c

    return sorted(recipients, key=_order)[:top], sorted(domains.items(), key=_order)[:top]


def _bucket_rows(db: sqlite3.Connection, where: str, args: tuple, off: int, size: int) -> list[tuple]:
    """The buckets of the history rows of `where`, counted from the rows themselves."""
    return db.execute(f"SELECT CAST((ts + ?) / ? AS INTEGER) AS b, {SLOT_SUMS} FROM history WHERE {where}"
                      " GROUP BY b ORDER BY b", (off, size, *args)).fetchall()


def bucket_query(db: sqlite3.Connection, since: float, until: float, size: int, off: int) -> list[tuple]:
    """Rows (bucket, received, bytes, delivered, deferred, bounced, rejected) of the
    buckets of `size` seconds (local time, `off` seconds east of UTC) in [since, until),
    in order: the one way `kanmon stats`, the API and the dashboard's charts count them.

    The whole quarter hours of the period are read from history_slots (a few thousand
    rows for 30 days, however many messages); the parts at either end that are not whole
    slots, from the history rows (through the ts index). Without history_slots (a
    database this version has not opened for writing yet) or with an offset that is not
    whole quarter hours: the rows alone, as before."""
    if off % SLOT or size % SLOT or not has_table(db, "history_slots"):
        return _bucket_rows(db, "ts >= ? AND ts < ?", (since, until), off, size)
    first = math.ceil(since / SLOT)  # the first whole slot
    end = math.floor(until / SLOT)  # slots before it end by `until`
    if first >= end:
        return _bucket_rows(db, "ts >= ? AND ts < ?", (since, until), off, size)
    sums: dict[int, list[int]] = {}
    parts = [
        db.execute(f"SELECT (slot * {SLOT} + ?) / ? AS b, " + ", ".join(f"SUM({c})" for c in SLOT_COLUMNS)
                   + " FROM history_slots WHERE slot >= ? AND slot < ? GROUP BY b", (off, size, first, end)).fetchall(),
        # The ends: rows of the period in slots not wholly in it (the slot as the writer counts it).
        _bucket_rows(db, f"ts >= ? AND ts < ? AND CAST(ts / {SLOT} AS INTEGER) < ?",
                     (since, min(until, first * SLOT + 1), first), off, size),
        _bucket_rows(db, f"ts >= ? AND ts < ? AND CAST(ts / {SLOT} AS INTEGER) >= ?",
                     (max(since, end * SLOT - 1), until, end), off, size),
    ]
    for rows in parts:
        for b, *counts in rows:
            s = sums.setdefault(b, [0] * len(SLOT_COLUMNS))
            for i, n in enumerate(counts):
                s[i] += n or 0
    return [(b, *sums[b]) for b in sorted(sums) if any(sums[b])]


def _queries(where: str, since: float, until: float, top: int) -> list[tuple[str, tuple]]:
    """The three aggregations besides the buckets (senders, recipients, refusals by check),
    the history's two reading the rows of `where` (FROM ... WHERE ts >= ? AND ts < ?)."""
    return [
        (f"SELECT mail_from, COUNT(*) AS c {where} AND first = 1 GROUP BY mail_from ORDER BY c DESC, mail_from LIMIT ?",
         (since, until, top)),
        # Every recipient's count (not only the top ones): the domains are summed from them.
        (f"SELECT lower(rcpt) AS r, COUNT(*) AS c {where} AND {ACCEPTED} GROUP BY r", (since, until)),
        # Refusals by the check that made them (the typed event's detail, not its text):
        # the history rows each refusal wrote (so they add up to the "rejected" column),
        # and the connections refused; "(session)" where no check did (a bad parameter,
        # a limit of the session).
        (f"SELECT 'rcpt', {CHECK_LABEL}, SUM(COALESCE(json_extract(detail, '$.history_rows'), {LEGACY_ROWS})) AS c"
         " FROM main.events WHERE ts >= ? AND ts < ? AND kind = 'reject' GROUP BY 2 HAVING c > 0"
         f" UNION ALL SELECT 'connect', {CHECK_LABEL}, COUNT(*) FROM main.events"
         " WHERE ts >= ? AND ts < ? AND kind = 'reject-connect' GROUP BY 2",
         (since, until, since, until)),
    ]


NO_CHECK = "(session)"  # a refusal no check made: the SMTP session's own (syntax, parameters, limits)
CHECK_LABEL = f"COALESCE(NULLIF(json_extract(detail, '$.check'), ''), '{NO_CHECK}')"
# The history rows of a refusal recorded before its event counted them (no history_rows):
# as that version wrote them, one for each refusal at RCPT or DATA and each sender refused
# at MAIL by a check, none for a 421.
LEGACY_ROWS = ("CASE WHEN json_extract(detail, '$.reply') LIKE '421%' THEN 0"
               " WHEN json_extract(detail, '$.stage') IN ('RCPT', 'DATA') THEN 1"
               " WHEN json_extract(detail, '$.stage') = 'MAIL' AND json_extract(detail, '$.check') != '' THEN 1"
               " ELSE 0 END")


def _one_pass(path: Path, since: float, until: float, top: int,
              progress: Callable[[int, int | None], None] | None) -> tuple[list, list, list, list]:
    """The top senders, recipients and domains and the refusals by check on one read-only
    connection, in one read transaction (one snapshot). The top lists are counted here
    from the period's rows (a hash count: no sort of every distinct address in SQL), the
    whole hours of a period up to CACHE_SPAN long from the counts kept per hour
    (_hour_counts), the rest from the rows."""
    conn = open_db(path, readonly=True)
    try:
        conn.execute("BEGIN")
        if progress is not None:
            progress(0, 2)
        senders, recipients, domains = _period_counts(conn, path, since, until)
        if progress is not None:
            progress(1, 2)
        checks = conn.execute(*_queries("", since, until, top)[2]).fetchall()
        if progress is not None:
            progress(2, 2)
        return _top(senders, top), _top(recipients, top), _top(domains, top), checks
    finally:
        conn.close()


# The rows the top lists count: a message's sender once (first), each accepted recipient
# (lower case as SQLite's lower(): ASCII only) and its domain (what follows the first @,
# the whole address without one: as _top_recipients takes it).
_COUNTED_ROWS = (f"SELECT first = 1, mail_from, {ACCEPTED}, lower(rcpt),"
                 " substr(lower(rcpt), instr(lower(rcpt), '@') + 1) FROM history"
                 f" WHERE ts >= ? AND ts < ? AND (first = 1 OR {ACCEPTED})")
HOUR = 3600
CACHE_SPAN = 2 * 86400  # periods up to this long count their whole hours from _hour_cache
CACHE_KEYS = 100_000  # addresses and domains kept per database at most (~15 MB): hours past it are counted each time
_hour_cache: dict[tuple, tuple[tuple, tuple[Counter, Counter, Counter]]] = {}
_hour_lock = threading.Lock()


def _counted(conn: sqlite3.Connection, since: float, until: float) -> tuple[Counter, Counter, Counter]:
    """(senders, recipients, domains) -> count over the rows of [since, until) (the
    selection and grouping in C: itemgetter, compress, Counter)."""
    rows = conn.execute(_COUNTED_ROWS, (since, until)).fetchall()
    accepted = list(map(itemgetter(2), rows))
    return (Counter(compress(map(itemgetter(1), rows), map(itemgetter(0), rows))),
            Counter(compress(map(itemgetter(3), rows), accepted)),
            Counter(compress(map(itemgetter(4), rows), accepted)))


def _period_counts(conn: sqlite3.Connection, path: Path, since: float, until: float) -> tuple[Counter, Counter, Counter]:
    """_counted() over [since, until). For a period up to CACHE_SPAN: its whole (UTC) hours
    from the counts kept per hour for this database, each checked first against the hour's
    rows (their number and highest id, read from the ts index: a row added or pruned since
    changes them; the columns counted are never updated in place), the parts at either end
    from the rows. The console asks for the last 24 hours again and again: 22 or 23 of
    them are counted once, not on every request."""
    first, end = math.ceil(since / HOUR), math.floor(until / HOUR)
    if until - since > CACHE_SPAN or first >= end:
        return _counted(conn, since, until)
    try:
        st = os.stat(path)
        db = (str(path), st.st_dev, st.st_ino)
    except OSError:
        return _counted(conn, since, until)
    parts = [_counted(conn, since, first * HOUR), _counted(conn, end * HOUR, until)]
    kept: dict[tuple, tuple] = {}
    keys = 0
    for h in range(first, end):
        mark = tuple(conn.execute("SELECT COUNT(*), MAX(id) FROM history WHERE ts >= ? AND ts < ?",
                                  (h * HOUR, (h + 1) * HOUR)).fetchone())
        if not mark[0]:
            continue
        with _hour_lock:
            hit = _hour_cache.get((db, h))
        counts = hit[1] if hit is not None and hit[0] == mark else _counted(conn, h * HOUR, (h + 1) * HOUR)
        size = sum(map(len, counts))
        if keys + size <= CACHE_KEYS:  # a relay of many distinct addresses keeps fewer hours, not more memory
            kept[(db, h)] = (mark, counts)
            keys += size
        parts.append(counts)
    with _hour_lock:  # only the hours of the latest period of each database stay
        for key in [k for k in _hour_cache if k[0] == db and k not in kept]:
            del _hour_cache[key]
        _hour_cache.update(kept)
        if len({k[0] for k in _hour_cache}) > 4:  # a few databases at most (tests open many)
            for key in [k for k in _hour_cache if k[0] != db]:
                del _hour_cache[key]
    out: tuple[Counter, Counter, Counter] = (Counter(), Counter(), Counter())
    for part in parts:
        for total, counts in zip(out, part):
            total.update(counts)  # (a copy into the empty one: the kept counts stay as they are)
    return out


def _order(item: tuple) -> tuple:
    """ORDER BY c DESC, name: ties in name order, NULL first, as SQLite orders them."""
    return -item[1], item[0] is not None, item[0] or ""


def _top(counts: Counter, top: int) -> list[tuple]:
    """The `top` first (name, count) in _order: only those with at least the top-th
    count sorted."""
    if top <= 0 or not counts:
        return []
    floor = heapq.nlargest(top, counts.values())[-1]
    found = [item for item in counts.items() if item[1] >= floor]
    found.sort(key=_order)
    return found[:top]


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
    checks = sorted(checks, key=lambda r: (-r[2], r[1]))
    out.rejected_by_check = [(k, int(c)) for what, k, c in checks if what == "rcpt"]
    out.connections_refused_by_check = [(k, int(c)) for what, k, c in checks if what == "connect"]
    return out
