"""Records in PostgreSQL, shared by several nodes: schema, migrations, the shipper that
writes each node's batches there (the searches over every node: kanmon.records.pgquery).

Role: when `[records] url` is set, every process's records writer (kanmon.records.store)
hands each batch it wrote to its local SQLite to a Shipper as well. The Shipper's own
thread writes the batches it holds at each pass to PostgreSQL, tagged with the node's
name, in one transaction (COPY a table), each keyed by a batch key (node, process, batch
number): a batch written twice (a replay after a commit whose answer was lost) is
skipped, so nothing is counted twice. When PostgreSQL
is unreachable or refuses a batch, the batch goes to a durable spill journal
(<data_dir>/records-spill-postgresql/<pid>.jsonl, fsynced, one JSON line per batch) and
every later batch follows it there, in order, until PostgreSQL takes writes again; then
the journal is written first, oldest batch first. on_failure(text) is told once per
outage (the node raises a `records` alert). The mail path never waits for PostgreSQL:
producers only append to a deque, and when PENDING_MAX batches wait there (PostgreSQL
answers too slowly, or a write hangs on a lost host until its timeouts), put() moves them
and every new batch to the journal itself, so memory stays bounded and nothing is lost.
The journal's order does not matter: a replay writes each process's batches by their
number.

Status updates are stored as rows of their own (history_status) and folded into the
history rows of their message in the same transaction: a status that arrives before its
history row (written by another process of the node) applies when the row arrives.

Trusts: the URL and password file from the validated configuration; rows made by
kanmon's records writer. Values from the network are bound parameters, never SQL.
Never: block a producer, drop a batch PostgreSQL refused, put a password in a log line
(libpq's error text holds no password; the URL holds none: the config refuses it).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kanmon.children import pid_alive
from kanmon.escape import for_log
from kanmon.state.pgconnect import WRITE_TIMEOUTS, libpq_parameters, read_password

if TYPE_CHECKING:
    import psycopg

    from kanmon.config import RecordsSection

SPILL_DIR = "records-spill-postgresql"
RETRY_MIN, RETRY_MAX = 0.5, 30.0  # seconds between attempts while PostgreSQL is down (doubling)
WRITE_INTERVAL = 1.0  # seconds between passes: the batches of several writer intervals in one transaction
BATCHES_PER_COMMIT = 100  # batches a pass writes in one transaction (each is one writer's interval)
PENDING_MAX = 256  # batches held in memory for PostgreSQL; beyond, put() appends them to the journal


# -- schema ---------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    description: str
    sql: str


# Versioned, applied in order, each in its own transaction with its row in schema_version.
# A released migration is never edited: a change is a new one.
MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "events, history, status, counters and batch keys, per node", """
CREATE TABLE records_batches (
    node TEXT NOT NULL, batch TEXT NOT NULL, ts DOUBLE PRECISION NOT NULL, PRIMARY KEY (node, batch));
CREATE TABLE events (
    id BIGSERIAL PRIMARY KEY, node TEXT NOT NULL, ts DOUBLE PRECISION NOT NULL, queue_id TEXT,
    kind TEXT NOT NULL, text TEXT NOT NULL, session TEXT, detail JSONB);
CREATE INDEX events_ts ON events (ts);
CREATE INDEX events_queue_id ON events (queue_id);
CREATE INDEX events_session ON events (node, session);
CREATE TABLE history (
    id BIGSERIAL PRIMARY KEY, node TEXT NOT NULL, ts DOUBLE PRECISION NOT NULL, client_ip TEXT, mail_from TEXT,
    rcpt TEXT, subject TEXT, message_id TEXT, size BIGINT, classification TEXT, disposition TEXT, queue_id TEXT,
    status TEXT, auth_user TEXT, helo TEXT, first SMALLINT NOT NULL DEFAULT 0,
    deferrals INTEGER NOT NULL DEFAULT 0, updated DOUBLE PRECISION);
CREATE INDEX history_ts ON history (ts);
CREATE INDEX history_queue_id ON history (node, queue_id, rcpt);
CREATE INDEX history_message_id ON history (message_id);
CREATE TABLE history_status (
    id BIGSERIAL PRIMARY KEY, node TEXT NOT NULL, ts DOUBLE PRECISION NOT NULL, queue_id TEXT NOT NULL,
    rcpt TEXT NOT NULL, status TEXT NOT NULL);
CREATE INDEX history_status_queue_id ON history_status (node, queue_id, rcpt);
CREATE TABLE counters (
    node TEXT NOT NULL, pid INTEGER NOT NULL, name TEXT NOT NULL, value BIGINT NOT NULL,
    PRIMARY KEY (node, pid, name));
"""),
    Migration(2, "cluster_nodes: each node's heartbeat (queue, active alerts) for kanmon cluster status", """
CREATE TABLE cluster_nodes (
    node TEXT PRIMARY KEY, hostname TEXT NOT NULL, version TEXT NOT NULL, started DOUBLE PRECISION NOT NULL,
    last_seen DOUBLE PRECISION NOT NULL, queue JSONB NOT NULL, alerts JSONB NOT NULL);
"""),
    Migration(3, "cluster_config: pushed configuration versions and each node's outcome", """
CREATE TABLE cluster_config (
    version BIGSERIAL PRIMARY KEY, text TEXT NOT NULL, pushed DOUBLE PRECISION NOT NULL, pushed_by TEXT NOT NULL,
    sha256 TEXT NOT NULL);
CREATE TABLE cluster_config_state (
    node TEXT PRIMARY KEY, version BIGINT NOT NULL, state TEXT NOT NULL, error TEXT NOT NULL,
    ts DOUBLE PRECISION NOT NULL);
"""),
    Migration(4, "events(kind, ts): the alert, DNS-check and reject lines found by kind, not by a scan", """
CREATE INDEX events_kind_ts ON events (kind, ts);
"""),
)

VERSION_TABLE = """CREATE TABLE IF NOT EXISTS schema_version (
    version INTEGER PRIMARY KEY, description TEXT NOT NULL, applied DOUBLE PRECISION NOT NULL)"""
MIGRATION_LOCK = 0x6B616E6D6F6E  # pg_advisory_xact_lock key: one node migrates at a time


def connect(url: str, password_file: Path | None = None, *, timeouts: tuple[int, int] = WRITE_TIMEOUTS,
            **kwargs: Any) -> psycopg.Connection:
    """A connection to the shared records. The password comes from password_file, else
    from libpq (PGPASSFILE, ~/.pgpass); TLS options in the URL go to libpq unchanged.
    Keepalives, statement_timeout and lock_timeout: kanmon.state.pgconnect (timeouts:
    (statement, lock) in milliseconds, unless the URL sets them)."""
    import psycopg

    extra: dict[str, Any] = libpq_parameters(url, "kanmon", timeouts)
    if password_file is not None:
        extra["password"] = read_password(password_file)
    extra.update(kwargs)
    return psycopg.connect(url, **extra)


def applied_versions(conn: psycopg.Connection) -> set[int]:
    exists = conn.execute("SELECT to_regclass('schema_version') IS NOT NULL").fetchone()[0]
    if not exists:
        return set()
    return {v for (v,) in conn.execute("SELECT version FROM schema_version")}


def pending(conn: psycopg.Connection) -> list[Migration]:
    """The migrations this database lacks, in order."""
    have = applied_versions(conn)
    return [m for m in MIGRATIONS if m.version not in have]


def newer_than_known(conn: psycopg.Connection) -> list[int]:
    """Versions in the database this kanmon does not know (a newer node migrated it)."""
    known = {m.version for m in MIGRATIONS}
    return sorted(v for v in applied_versions(conn) if v not in known)


def migrate(conn: psycopg.Connection) -> list[Migration]:
    """Apply the pending migrations (each in its own transaction, under an advisory lock
    so that nodes starting together do not race); the ones applied."""
    done = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        conn.execute(VERSION_TABLE)
    for m in MIGRATIONS:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            if m.version in applied_versions(conn):
                continue
            conn.execute(m.sql)
            conn.execute("INSERT INTO schema_version (version, description, applied) VALUES (%s, %s, %s)",
                         (m.version, m.description, time.time()))
            done.append(m)
    return done


# -- writing --------------------------------------------------------------------------------

def _no_nul(value: Any) -> Any:
    """PostgreSQL text holds no NUL character (SQLite does): a NUL from the network
    (an encoded-word in a Subject) is stored as U+FFFD."""
    return value.replace("\x00", "\ufffd") if isinstance(value, str) and "\x00" in value else value


def _clean_detail(detail: str | None) -> str | None:
    if detail is None or "\\u0000" not in detail:
        return detail

    def walk(v: Any) -> Any:
        if isinstance(v, dict):
            return {_no_nul(k): walk(x) for k, x in v.items()}
        if isinstance(v, list):
            return [walk(x) for x in v]
        return _no_nul(v)

    return json.dumps(walk(json.loads(detail)))


LIVE_SINCE = "live-since"  # records_batches key: the time of this node's first shipped row


def commit_batch(conn: psycopg.Connection, node: str, key: str, rows: dict, *, first: bool = False) -> bool:
    """One batch in one transaction; False when this batch key was written before
    (nothing is written again). first: the first batch of a process, whose oldest row
    moves the node's `live-since` mark earlier if needed (kanmon records export copies
    only what is older)."""
    return commit_batches(conn, node, [(key, rows)], first=first) == [True]


def commit_batches(conn: psycopg.Connection, node: str, batches: list[tuple[str, dict]], *,
                   first: bool = False) -> list[bool]:
    """Several batches in one transaction (what the Shipper holds at one pass: one
    commit, one COPY a table, one status fold, instead of each); per batch, False when
    its key was written before (its rows are not written again)."""
    if not batches:
        return []
    with conn.transaction():
        new = {k for (k,) in conn.execute(
            "INSERT INTO records_batches (node, batch, ts) SELECT %s, unnest(%s::text[]), %s"
            " ON CONFLICT DO NOTHING RETURNING batch", (node, [k for k, _r in batches], time.time()))}
        todo = [rows for key, rows in batches if key in new]
        events = [r for rows in todo for r in rows["events"]]
        hist = [r for rows in todo for r in rows["hist"]]
        status = [r for rows in todo for r in rows["status"]]
        counts: dict[tuple[int, str], int] = {}
        for rows in todo:
            for pid, name, value in rows["counts"]:
                counts[(pid, name)] = counts.get((pid, name), 0) + value
        with conn.cursor() as c:
            # COPY: the rows go in one stream (the JSON detail as text, parsed by the
            # server), not a statement each.
            if events:
                with c.copy("COPY events (node, ts, queue_id, kind, text, session, detail) FROM STDIN") as cp:
                    for r in events:
                        cp.write_row((node, *map(_no_nul, r[:5]), _clean_detail(r[5])))
            if hist:
                with c.copy("COPY history (node, ts, client_ip, mail_from, rcpt, subject, message_id, size,"
                            " classification, disposition, queue_id, status, auth_user, helo, first) FROM STDIN") as cp:
                    for r in hist:
                        cp.write_row((node, *map(_no_nul, r)))
            if status:
                with c.copy("COPY history_status (node, ts, queue_id, rcpt, status) FROM STDIN") as cp:
                    for r in status:
                        cp.write_row((node, *map(_no_nul, r[:4])))
            if counts:
                c.executemany(
                    "INSERT INTO counters (node, pid, name, value) VALUES (%s,%s,%s,%s)"
                    " ON CONFLICT (node, pid, name) DO UPDATE SET value = counters.value + excluded.value",
                    [(node, pid, name, value) for (pid, name), value in counts.items()])
        if first:
            oldest = min((r[0] for part in (events, hist, status) for r in part), default=None)
            if oldest is not None:
                conn.execute(
                    "INSERT INTO records_batches (node, batch, ts) VALUES (%s, %s, %s) ON CONFLICT (node, batch)"
                    " DO UPDATE SET ts = LEAST(records_batches.ts, excluded.ts)", (node, LIVE_SINCE, oldest))
        touched = sorted({r[1] for r in status} | {r[9] for r in hist if r[9]})
        if touched:
            # Each touched message's rows take their newest status (whichever arrived first).
            conn.execute(
                "UPDATE history h SET status = s.status, updated = s.ts, deferrals = s.deferrals FROM ("
                " SELECT queue_id, rcpt, (array_agg(status ORDER BY ts DESC, id DESC))[1] AS status, max(ts) AS ts,"
                " count(*) FILTER (WHERE status LIKE 'Deferred%%') AS deferrals"
                " FROM history_status WHERE node = %s AND queue_id = ANY(%s) GROUP BY queue_id, rcpt) s"
                " WHERE h.node = %s AND h.queue_id = s.queue_id AND h.rcpt = s.rcpt",
                (node, touched, node))
        orphans = sorted({r[1] for r in status} - {r[9] for r in hist if r[9]})
        if orphans:
            # A message this node delivers under another node's history row: released here
            # from the shared quarantine, where the node that took it wrote its row
            # ("Quarantined"). That row takes this node's newest status for its recipient.
            # The other nodes are those with batches (a loose index scan of their key).
            conn.execute(
                "WITH RECURSIVE n AS (SELECT min(node) AS node FROM records_batches"
                " UNION ALL SELECT (SELECT min(node) FROM records_batches WHERE node > n.node) FROM n"
                " WHERE n.node IS NOT NULL)"
                " UPDATE history h SET status = s.status, updated = s.ts, deferrals = s.deferrals FROM ("
                " SELECT queue_id, rcpt, (array_agg(status ORDER BY ts DESC, id DESC))[1] AS status, max(ts) AS ts,"
                " count(*) FILTER (WHERE status LIKE 'Deferred%%') AS deferrals"
                " FROM history_status st WHERE node = %s AND queue_id = ANY(%s) AND NOT EXISTS ("
                "  SELECT 1 FROM history o WHERE o.node = %s AND o.queue_id = st.queue_id AND o.rcpt = st.rcpt)"
                " GROUP BY queue_id, rcpt) s"
                " WHERE h.node = ANY(ARRAY(SELECT node FROM n WHERE node IS NOT NULL AND node != %s))"
                " AND h.queue_id = s.queue_id AND h.rcpt = s.rcpt",
                (node, orphans, node, node))
    return [key in new for key, _rows in batches]


def heartbeat(conn: psycopg.Connection, node: str, hostname: str, version: str, started: float, now: float,
              queue: dict, alerts: list[dict]) -> None:
    """This node is alive at now, with its queue and active alerts (kanmon cluster status).
    A heartbeat older than the one stored (two beats of a node written out of order) is
    dropped."""
    from psycopg.types.json import Jsonb

    with conn.transaction():
        conn.execute(
            "INSERT INTO cluster_nodes (node, hostname, version, started, last_seen, queue, alerts)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (node) DO UPDATE SET hostname = excluded.hostname,"
            " version = excluded.version, started = excluded.started, last_seen = excluded.last_seen,"
            " queue = excluded.queue, alerts = excluded.alerts WHERE cluster_nodes.last_seen <= excluded.last_seen",
            (node, _no_nul(hostname), version, started, now, Jsonb(queue),
             Jsonb(json.loads(_clean_detail(json.dumps(alerts))))))


PRUNE_BATCH = 5000


def prune(conn: psycopg.Connection, node: str, before: float, batch: int = PRUNE_BATCH) -> tuple[int, int]:
    """Delete this node's events, history (with its statuses) and batch keys older than
    before, in small transactions; (events, history rows) deleted. Other nodes prune
    their own."""
    counts = []
    for table in ("events", "history", "history_status", "records_batches"):
        key = "batch" if table == "records_batches" else "id"
        keep = f" AND batch != '{LIVE_SINCE}'" if table == "records_batches" else ""  # export's mark stays
        total = 0
        while True:
            with conn.transaction():
                n = conn.execute(
                    f"DELETE FROM {table} WHERE node = %s AND {key} IN"  # noqa: S608 - our table names
                    f" (SELECT {key} FROM {table} WHERE node = %s AND ts < %s{keep} ORDER BY ts LIMIT %s)",
                    (node, node, before, batch)).rowcount
            total += n
            if n < batch:
                break
        counts.append(total)
    return counts[0], counts[1]


class Shipper:
    """Writes a process's record batches to PostgreSQL from a thread of its own,
    through the spill journal while PostgreSQL is unreachable."""

    def __init__(self, section: RecordsSection, node: str, data_dir: Path, *,
                 on_failure: Callable[[str], None] | None = None, replay_others: bool = False,
                 notify: Callable[[str], None] | None = None, max_pending: int = PENDING_MAX):
        """notify(text): a line for the event log (the outage is over); on_failure(text):
        PostgreSQL refuses writes (once per outage); replay_others: also write what other
        (ended) processes left in the journal (the node, at its start); max_pending:
        batches kept in memory before put() spills them."""
        assert section.url is not None
        self.url = section.url
        self.password_file = section.password_file
        self.node = node
        self.spill_dir = Path(data_dir) / SPILL_DIR
        self.spill_path = self.spill_dir / f"{os.getpid()}.jsonl"
        self._replay_others = replay_others
        self._on_failure = on_failure
        self._notify = notify
        self._prefix = f"{os.getpid()}.{time.time_ns()}"  # batch keys: unique per process run
        self._numbers = itertools.count(1)
        self._pending: deque[tuple[str, dict]] = deque()
        self.max_pending = max_pending
        self._journal_lock = threading.Lock()  # appends, and the rename that starts a replay
        self._replays = itertools.count(1)
        self.overflowed = 0  # batches put() sent straight to the journal (tests, status)
        self._cond = threading.Condition()
        self._idle = threading.Condition()
        self._queued = 0
        self._done = 0
        self._cycles = 0  # passes of the thread (flush() waits for one)
        self._stop = False
        self._conn: psycopg.Connection | None = None
        self._failing: str | None = None
        self._retry_at = 0.0
        self._backoff = RETRY_MIN
        self.written = 0  # batches written (tests, status)
        self._marked = False  # this process's first batch has marked the node's live-since
        self._thread = threading.Thread(target=self._run, name="records-postgresql", daemon=True)
        self._thread.start()

    # -- producers -----------------------------------------------------------------------

    def put(self, rows: dict) -> None:
        """One batch (the records writer's rows); never waits for PostgreSQL: beyond
        max_pending batches in memory, they go to the journal (an fsynced append)."""
        item = (f"{self._prefix}.{next(self._numbers)}", rows)
        self._queued += 1
        if len(self._pending) < self.max_pending:
            self._pending.append(item)
            return
        moved = []
        with contextlib.suppress(IndexError):
            while True:
                moved.append(self._pending.popleft())
        moved.append(item)
        self._spill(moved)
        self.overflowed += len(moved)
        with self._idle:
            self._done += len(moved)
            self._idle.notify_all()

    def retry_now(self) -> None:
        """Try PostgreSQL at the next pass instead of at the end of the backoff (the
        database is known to be back)."""
        self._retry_at = 0.0
        with self._cond:
            self._cond.notify()

    @property
    def failing(self) -> str | None:
        return self._failing

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every batch put so far is written or spilled; True when nothing
        is left in the journal either."""
        target = self._queued
        with self._idle:
            cycle = self._cycles
        deadline = time.monotonic() + timeout
        with self._idle:
            # ...and one whole pass begun after this call (the journal is tried too)
            while (self._done < target or self._cycles < cycle + 2) and self._thread.is_alive():
                with self._cond:
                    self._cond.notify()
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._idle.wait(left)
        return self._done >= target and not self._spill_files()

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout=30)
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()

    # -- the thread ----------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._stop:
                    self._cond.wait(WRITE_INTERVAL)
                stopping = self._stop
            batch = []
            with contextlib.suppress(IndexError):
                while True:
                    batch.append(self._pending.popleft())
            try:
                self._ship(batch, stopping)
            except Exception as e:  # noqa: BLE001 - records must never stop mail
                print(f"kanmon: records (PostgreSQL): {for_log(str(e))}", file=sys.stderr)
            with self._idle:
                self._done += len(batch)
                self._cycles += 1
                self._idle.notify_all()
            if stopping and not self._pending:
                return

    def _ship(self, batch: list[tuple[str, dict]], stopping: bool) -> None:
        import psycopg

        spilled = bool(self._spill_files())
        if (spilled or self._failing) and time.monotonic() < self._retry_at and not stopping:
            self._spill(batch)  # still down: keep the order, try again later
            return
        if not batch and not spilled:
            return
        failed: Exception | None = None
        for attempt in (1, 2):
            kept = self._conn is not None and not self._conn.closed
            try:
                conn = self._connection()
                if batch and self._spill_files():
                    # put() spilled newer batches while these were taken: all go by the
                    # journal, which is written in the batches' order.
                    self._spill(batch)
                    batch = []
                replayed = self._replay(conn)
                for i in range(0, len(batch), BATCHES_PER_COMMIT):
                    self._commit_many(conn, batch[i:i + BATCHES_PER_COMMIT])
            except psycopg.OperationalError as e:
                self._drop_connection()
                if kept and attempt == 1:
                    # The kept connection was closed by the server (PostgreSQL restarted):
                    # once more on a new one (a batch already committed is skipped by its key).
                    continue
                failed = e
            except (psycopg.Error, OSError) as e:
                failed = e
            break
        if failed is not None:
            e = failed
            self._drop_connection()
            self._spill(batch)  # those already committed are skipped by their key on replay
            self._retry_at = time.monotonic() + self._backoff
            self._backoff = min(self._backoff * 2, RETRY_MAX)
            text = for_log(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
            if self._failing is None:
                self._failing = text
                print(f"kanmon: records (PostgreSQL): writes fail ({text}); kept in {self.spill_dir}", file=sys.stderr)
                if self._on_failure is not None:
                    try:
                        self._on_failure(f"shared records database (PostgreSQL) refuses writes: {text}; "
                                         f"batches kept in {self.spill_dir} and written when it returns")
                    except Exception as e2:  # noqa: BLE001 - reporting must not stop the thread
                        print(f"kanmon: records: cannot report the failure: {e2}", file=sys.stderr)
            return
        self._backoff = RETRY_MIN
        if self._failing is not None:
            self._failing = None
            if self._notify is not None:
                self._notify(f"records: the shared records database (PostgreSQL) takes writes again "
                             f"({replayed} spilled batch(es) written)")

    def _commit_many(self, conn: psycopg.Connection, batches: list[tuple[str, dict]]) -> None:
        """The batches of one pass in one transaction; when PostgreSQL refuses it for
        its data, each batch again on its own (only the refused one is set aside)."""
        import psycopg

        try:
            commit_batches(conn, self.node, batches, first=not self._marked)
            self._marked = True
        except (psycopg.DataError, psycopg.IntegrityError, psycopg.ProgrammingError):
            for key, rows in batches:
                self._commit(conn, key, rows)
        self.written += len(batches)

    def _commit(self, conn: psycopg.Connection, key: str, rows: dict) -> bool:
        """commit_batch; a batch PostgreSQL refuses for its data (not for an outage) is
        set aside in the journal directory (refused-<pid>.jsonl) instead of blocking the
        ones after it."""
        import psycopg

        try:
            done = commit_batch(conn, self.node, key, rows, first=not self._marked)
            self._marked = True
            return done
        except (psycopg.DataError, psycopg.IntegrityError, psycopg.ProgrammingError) as e:
            text = for_log(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
            print(f"kanmon: records (PostgreSQL): batch {key} refused ({text}); set aside in {self.spill_dir}",
                  file=sys.stderr)
            self._spill([(key, rows)], self.spill_dir / f"refused-{os.getpid()}.jsonl")
            return False

    def _connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            conn = connect(self.url, self.password_file, autocommit=True)
            try:
                migrate(conn)  # a fresh database, or a newer kanmon: safe (additive, locked)
            except BaseException:
                conn.close()
                raise
            self._conn = conn
        return self._conn

    def _drop_connection(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None

    # -- the spill journal ---------------------------------------------------------------

    def _spill(self, batch: list[tuple[str, dict]], path: Path | None = None) -> None:
        if not batch:
            return
        data = b"".join(json.dumps({"key": k, "rows": r}, separators=(",", ":"), default=str).encode() + b"\n"
                        for k, r in batch)
        try:
            self.spill_dir.mkdir(exist_ok=True, mode=0o700)
            with self._journal_lock:
                fd = os.open(path or self.spill_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                try:
                    os.write(fd, data)
                    os.fsync(fd)
                finally:
                    os.close(fd)
        except OSError as e:  # the disk refuses too: the local SQLite and the log line remain
            print(f"kanmon: records (PostgreSQL): cannot spill {len(batch)} batch(es): {e}", file=sys.stderr)

    def _spill_files(self) -> list[Path]:
        """The journal files to write: this process's (<pid>.jsonl, and <pid>.replay-N.jsonl
        of a replay that did not finish), and with replay_others those of ended processes."""
        try:
            names = [p for p in self.spill_dir.iterdir() if p.suffix == ".jsonl" and not p.name.startswith("refused-")]
        except FileNotFoundError:
            return []
        mine = str(os.getpid())
        return sorted(p for p in names if p.name.split(".", 1)[0] == mine
                      or (self._replay_others and not _writer_alive(p)))

    def _replay(self, conn: psycopg.Connection) -> int:
        """Write the journal's batches, each process's in the order of their numbers; a
        file goes when all of it is written. This process's live file is renamed first:
        what put() appends meanwhile goes to a new one, never into a file being deleted."""
        written = 0
        by_process: dict[str, list[Path]] = {}
        for path in self._spill_files():
            if path == self.spill_path:
                replaying = path.with_name(f"{os.getpid()}.replay-{time.time_ns()}-{next(self._replays)}.jsonl")
                with self._journal_lock:
                    try:
                        path.rename(replaying)
                    except FileNotFoundError:
                        continue
                path = replaying
            by_process.setdefault(path.name.split(".", 1)[0], []).append(path)
        for paths in by_process.values():
            items = []
            for path in paths:
                for line in path.read_bytes().split(b"\n"):
                    try:
                        item = json.loads(line)
                        items.append((_batch_order(item["key"]), item))
                    except (ValueError, KeyError, TypeError):
                        continue  # a torn last line (a crash during the append): never acknowledged
            items.sort(key=lambda pair: pair[0])
            for _order, item in items:
                if self._commit(conn, item["key"], item["rows"]):
                    written += 1
            for path in paths:
                path.unlink(missing_ok=True)
        self._replay_others = False
        return written


def _batch_order(key: str) -> tuple[str, int]:
    """A batch key (<pid>.<start ns>.<number>) in the order its process made it."""
    run, _, number = key.rpartition(".")
    return run, int(number)


def _writer_alive(path: Path) -> bool:
    """Whether the process that spills into path (named <pid>.jsonl) still runs: its file
    is its own to replay (it may append to it while we read), never another's to take."""
    try:
        pid = int(path.name.split(".", 1)[0])
    except ValueError:
        return False
    return pid != os.getpid() and pid_alive(pid)
