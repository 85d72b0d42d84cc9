"""SharedState in one SQLite database in data_dir, shared by every process of a node.

Role: the one-node backend of kanmon.state.api (the receivers of `workers = N` and the
main process open the same file). WAL journal, a busy timeout, and each read-modify-write
in a BEGIN IMMEDIATE transaction, so concurrent processes never lose a hit. One
connection per thread; SqliteState.submit runs calls on a thread of its own, so the
event loop never waits on the disk.

Trusts: the database file (ours, private). Keys and values are bound parameters.
Never: run on the event loop's thread (use submit), create a file others can read
(0600), or fsync per hit (synchronous = NORMAL: a crash may lose the last counts,
which only loosens a limit for a moment).
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from kanmon.state.api import (
    AlertClaim,
    AlertResolution,
    CacheEntry,
    Triplet,
    TripletState,
    bucket_estimate,
    decide_resolution,
)

T = TypeVar("T")

STATE_FILE = "state.db"
BUSY_TIMEOUT_MS = 10_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS rate (
    key TEXT NOT NULL, window REAL NOT NULL, bucket INTEGER NOT NULL, count INTEGER NOT NULL,
    PRIMARY KEY (key, window, bucket)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS gauge (
    key TEXT NOT NULL, owner TEXT NOT NULL, held INTEGER NOT NULL, since REAL NOT NULL,
    PRIMARY KEY (key, owner)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS gauge_owner ON gauge (owner);
CREATE TABLE IF NOT EXISTS cache (
    ns TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL, stored REAL NOT NULL, expires REAL NOT NULL,
    PRIMARY KEY (ns, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS greylist (
    client TEXT NOT NULL, sender TEXT NOT NULL, recipient TEXT NOT NULL,
    first_seen REAL NOT NULL, last_seen REAL NOT NULL, passed REAL, attempts INTEGER NOT NULL,
    PRIMARY KEY (client, sender, recipient)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS greylist_client (
    client TEXT PRIMARY KEY, passes INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS alert_claim (
    category TEXT NOT NULL, key TEXT NOT NULL, last_sent REAL NOT NULL, mailed_by TEXT NOT NULL,
    PRIMARY KEY (category, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS alert_seen (
    category TEXT NOT NULL, key TEXT NOT NULL, node TEXT NOT NULL, last_seen REAL NOT NULL,
    PRIMARY KEY (category, key, node)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS alert_cleared (
    category TEXT NOT NULL, key TEXT NOT NULL, node TEXT NOT NULL, cleared REAL NOT NULL,
    PRIMARY KEY (category, key, node)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS alert_resolved (
    category TEXT NOT NULL, key TEXT NOT NULL, resolved REAL NOT NULL, by_node TEXT NOT NULL,
    PRIMARY KEY (category, key)
) WITHOUT ROWID;
"""


def _like_prefix(prefix: str) -> str:
    return prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


class _Db:
    """A connection per thread to one database file."""

    def __init__(self, path: Path):
        self.path = path
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        # Create the file private before SQLite opens it (and its -wal/-shm follow its mode);
        # only when missing: closing a descriptor of an open database drops this process's
        # POSIX locks on it, and another process would delete its -shm under us.
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            pass
        self.conn.executescript(_SCHEMA)

    @property
    def conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                                   check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction taken at once (BEGIN IMMEDIATE): no lost updates between processes."""
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            for conn in self._all:
                conn.close()
            self._all.clear()
        self._local = threading.local()


PRUNE_EVERY_HITS = 4096  # a process deletes the idle keys' rows once per this many hits


class SqliteCounters:
    def __init__(self, db: _Db):
        self._db = db
        self._hits = 0

    def hit(self, key: str, window: float, now: float, amount: int = 1) -> int:
        bucket = int(now // window)
        self._hits += 1
        if self._hits % PRUNE_EVERY_HITS == 0:
            self.prune(now)
        with self._db.transaction() as c:
            c.execute(
                "INSERT INTO rate (key, window, bucket, count) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (key, window, bucket) DO UPDATE SET count = count + excluded.count",
                (key, window, bucket, amount),
            )
            c.execute("DELETE FROM rate WHERE key = ? AND window = ? AND bucket < ?", (key, window, bucket - 1))
            return self._estimate(c, key, window, bucket, now)

    def peek(self, key: str, window: float, now: float) -> int:
        return self._estimate(self._db.conn, key, window, int(now // window), now)

    @staticmethod
    def _estimate(c: sqlite3.Connection, key: str, window: float, bucket: int, now: float) -> int:
        rows = dict(c.execute("SELECT bucket, count FROM rate WHERE key = ? AND window = ? AND bucket >= ?",
                              (key, window, bucket - 1)).fetchall())
        return bucket_estimate(rows.get(bucket, 0), rows.get(bucket - 1, 0), window, now)

    def reset(self, key: str) -> None:
        with self._db.transaction() as c:
            c.execute("DELETE FROM rate WHERE key = ?", (key,))

    def prune(self, now: float) -> int:
        """Delete the rows of keys idle for two windows (they count nothing any more), so
        names seen once (unknown users, one-off clients) do not stay forever."""
        with self._db.transaction() as c:
            return c.execute("DELETE FROM rate WHERE (bucket + 2) * window <= ?", (now,)).rowcount


class SqliteGauges:
    def __init__(self, db: _Db):
        self._db = db

    def acquire(self, key: str, owner: str, now: float) -> int:
        with self._db.transaction() as c:
            c.execute(
                "INSERT INTO gauge (key, owner, held, since) VALUES (?, ?, 1, ?)"
                " ON CONFLICT (key, owner) DO UPDATE SET held = held + 1",
                (key, owner, now),
            )
            return c.execute("SELECT COALESCE(SUM(held), 0) FROM gauge WHERE key = ?", (key,)).fetchone()[0]

    def release(self, key: str, owner: str) -> None:
        with self._db.transaction() as c:
            c.execute("UPDATE gauge SET held = held - 1 WHERE key = ? AND owner = ?", (key, owner))
            c.execute("DELETE FROM gauge WHERE key = ? AND owner = ? AND held <= 0", (key, owner))

    def apply(self, owner: str, releases: Sequence[str], acquires: Sequence[str], now: float) -> list[int]:
        with self._db.transaction() as c:
            for key in releases:
                c.execute("UPDATE gauge SET held = held - 1 WHERE key = ? AND owner = ?", (key, owner))
                c.execute("DELETE FROM gauge WHERE key = ? AND owner = ? AND held <= 0", (key, owner))
            out = []
            for key in acquires:
                c.execute(
                    "INSERT INTO gauge (key, owner, held, since) VALUES (?, ?, 1, ?)"
                    " ON CONFLICT (key, owner) DO UPDATE SET held = held + 1",
                    (key, owner, now),
                )
                out.append(c.execute("SELECT COALESCE(SUM(held), 0) FROM gauge WHERE key = ?", (key,)).fetchone()[0])
            return out

    def count(self, key: str) -> int:
        return self._db.conn.execute("SELECT COALESCE(SUM(held), 0) FROM gauge WHERE key = ?", (key,)).fetchone()[0]

    def drop_owner(self, owner: str) -> None:
        with self._db.transaction() as c:
            c.execute("DELETE FROM gauge WHERE owner = ?", (owner,))

    def clear(self) -> None:
        with self._db.transaction() as c:
            c.execute("DELETE FROM gauge")


class SqliteCache:
    def __init__(self, db: _Db, namespace: str):
        self._db = db
        self._ns = namespace

    def get(self, key: str, now: float) -> CacheEntry | None:
        row = self._db.conn.execute("SELECT value, stored, expires FROM cache WHERE ns = ? AND key = ? AND expires > ?",
                                    (self._ns, key, now)).fetchone()
        return CacheEntry(key, row[0], row[1], row[2]) if row else None

    def put(self, key: str, value: str, ttl: float, now: float) -> None:
        with self._db.transaction() as c:
            c.execute("INSERT OR REPLACE INTO cache (ns, key, value, stored, expires) VALUES (?, ?, ?, ?, ?)",
                      (self._ns, key, value, now, now + ttl))

    def delete(self, key: str) -> bool:
        with self._db.transaction() as c:
            return c.execute("DELETE FROM cache WHERE ns = ? AND key = ?", (self._ns, key)).rowcount > 0

    def list(self, now: float, prefix: str = "") -> list[CacheEntry]:
        rows = self._db.conn.execute(
            "SELECT key, value, stored, expires FROM cache WHERE ns = ? AND key LIKE ? ESCAPE '\\' AND expires > ?"
            " ORDER BY key", (self._ns, _like_prefix(prefix), now)).fetchall()
        return [CacheEntry(*r) for r in rows]

    def flush(self, prefix: str = "") -> int:
        with self._db.transaction() as c:
            return c.execute("DELETE FROM cache WHERE ns = ? AND key LIKE ? ESCAPE '\\'",
                             (self._ns, _like_prefix(prefix))).rowcount

    def prune(self, now: float) -> int:
        with self._db.transaction() as c:
            return c.execute("DELETE FROM cache WHERE ns = ? AND expires <= ?", (self._ns, now)).rowcount


class SqliteGreylist:
    def __init__(self, db: _Db):
        self._db = db

    def attempt(self, triplet: Triplet, now: float) -> TripletState:
        t = (triplet.client, triplet.sender, triplet.recipient)
        with self._db.transaction() as c:
            c.execute(
                "INSERT INTO greylist (client, sender, recipient, first_seen, last_seen, passed, attempts)"
                " VALUES (?, ?, ?, ?, ?, NULL, 1) ON CONFLICT (client, sender, recipient)"
                " DO UPDATE SET last_seen = excluded.last_seen, attempts = attempts + 1",
                (*t, now, now),
            )
            row = c.execute("SELECT first_seen, last_seen, passed, attempts FROM greylist"
                            " WHERE client = ? AND sender = ? AND recipient = ?", t).fetchone()
        return TripletState(triplet, *row)

    def mark_passed(self, triplet: Triplet, now: float) -> None:
        t = (triplet.client, triplet.sender, triplet.recipient)
        with self._db.transaction() as c:
            row = c.execute("SELECT passed FROM greylist WHERE client = ? AND sender = ? AND recipient = ?", t).fetchone()
            if row is not None and row[0] is not None:
                return
            c.execute(
                "INSERT INTO greylist (client, sender, recipient, first_seen, last_seen, passed, attempts)"
                " VALUES (?, ?, ?, ?, ?, ?, 1) ON CONFLICT (client, sender, recipient)"
                " DO UPDATE SET passed = excluded.passed, last_seen = excluded.last_seen",
                (*t, now, now, now),
            )
            c.execute("INSERT INTO greylist_client (client, passes) VALUES (?, 1)"
                      " ON CONFLICT (client) DO UPDATE SET passes = passes + 1", (triplet.client,))

    def client_passes(self, client: str) -> int:
        row = self._db.conn.execute("SELECT passes FROM greylist_client WHERE client = ?", (client,)).fetchone()
        return row[0] if row else 0

    def forget(self, triplet: Triplet) -> bool:
        with self._db.transaction() as c:
            return c.execute("DELETE FROM greylist WHERE client = ? AND sender = ? AND recipient = ?",
                             (triplet.client, triplet.sender, triplet.recipient)).rowcount > 0

    def list(self, prefix: str = "") -> list[TripletState]:
        rows = self._db.conn.execute(
            "SELECT client, sender, recipient, first_seen, last_seen, passed, attempts FROM greylist"
            " WHERE client LIKE ? ESCAPE '\\' ORDER BY client, sender, recipient", (_like_prefix(prefix),)).fetchall()
        return [TripletState(Triplet(r[0], r[1], r[2]), r[3], r[4], r[5], r[6]) for r in rows]

    def prune(self, now: float, window: float, remember: float) -> int:
        with self._db.transaction() as c:
            return c.execute(
                "DELETE FROM greylist WHERE (passed IS NULL AND first_seen < ?) OR (passed IS NOT NULL AND last_seen < ?)",
                (now - window, now - remember)).rowcount


class SqliteAlertClaims:
    def __init__(self, db: _Db):
        self._db = db

    def claim(self, category: str, key: str, node: str, now: float, interval: float) -> AlertClaim:
        with self._db.transaction() as c:
            c.execute("INSERT INTO alert_seen (category, key, node, last_seen) VALUES (?, ?, ?, ?)"
                      " ON CONFLICT (category, key, node) DO UPDATE SET last_seen = excluded.last_seen",
                      (category, key, node, now))
            nodes = tuple(n for (n,) in c.execute(
                "SELECT node FROM alert_seen WHERE category = ? AND key = ? AND last_seen > ? ORDER BY node",
                (category, key, now - interval)))
            row = c.execute("SELECT last_sent, mailed_by FROM alert_claim WHERE category = ? AND key = ?",
                            (category, key)).fetchone()
            if row is not None and row[0] > now - interval:
                return AlertClaim(False, nodes, row[1])
            c.execute("INSERT OR REPLACE INTO alert_claim (category, key, last_sent, mailed_by) VALUES (?, ?, ?, ?)",
                      (category, key, now, node))
            return AlertClaim(True, nodes, node)

    def resolve(self, category: str, key: str, node: str, now: float, interval: float) -> AlertResolution:
        with self._db.transaction() as c:
            c.execute("INSERT INTO alert_cleared (category, key, node, cleared) VALUES (?, ?, ?, ?)"
                      " ON CONFLICT (category, key, node) DO UPDATE SET cleared = excluded.cleared",
                      (category, key, node, now))
            sent = c.execute("SELECT last_sent FROM alert_claim WHERE category = ? AND key = ?",
                             (category, key)).fetchone()
            resolved = c.execute("SELECT resolved FROM alert_resolved WHERE category = ? AND key = ?",
                                 (category, key)).fetchone()
            seen = dict(c.execute("SELECT node, last_seen FROM alert_seen WHERE category = ? AND key = ?",
                                  (category, key)).fetchall())
            cleared = dict(c.execute("SELECT node, cleared FROM alert_cleared WHERE category = ? AND key = ?",
                                     (category, key)).fetchall())
            out, over = decide_resolution(node, now, interval, sent[0] if sent else None,
                                          resolved[0] if resolved else None, seen, cleared)
            if over:
                c.execute("INSERT OR REPLACE INTO alert_resolved (category, key, resolved, by_node) VALUES (?, ?, ?, ?)",
                          (category, key, now, node))
            return out


class SqliteState:
    """SharedState in data_dir/state.db. submit() runs calls on one thread of its own
    (SQLite serialises writers anyway; one thread keeps the order of a session's calls)."""

    def __init__(self, data_dir: Path, *, filename: str = STATE_FILE):
        self.path = Path(data_dir) / filename
        self._db = _Db(self.path)
        self.counters = SqliteCounters(self._db)
        self.gauges = SqliteGauges(self._db)
        self.greylist = SqliteGreylist(self._db)
        self.alert_claims = SqliteAlertClaims(self._db)
        self._caches: dict[str, SqliteCache] = {}
        self._executor: ThreadPoolExecutor | None = None

    def cache(self, namespace: str) -> SqliteCache:
        cache = self._caches.get(namespace)
        if cache is None:
            cache = self._caches[namespace] = SqliteCache(self._db, namespace)
        return cache

    def submit(self, fn: Callable[..., T], *args: Any) -> Awaitable[T]:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kanmon-state")
        return asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        self._db.close()
