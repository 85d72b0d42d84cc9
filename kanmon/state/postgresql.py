"""SharedState in PostgreSQL, shared by every process of every node (several relays).

Role: the several-node backend of kanmon.state.api, selected by `[records] url` (the
same database as the shared records, tables named state_*): a greylist triplet passed on
one relay passes on the other, a sender's rate counts on every relay it alternates
between, a verification result learned on one is known to all. Each read-modify-write is
one statement (INSERT ... ON CONFLICT DO UPDATE) or a transaction whose rows are locked,
so concurrent nodes never lose a hit. One connection per thread (submit() runs calls on
a thread of its own, off the event loop, in the order they were made); a broken connection is dropped and the call
raises, so the check that asked fails by its own failure mode (tempfail by default), and
the next call connects again.

Connection gauges (concurrent connections per client) belong to processes: their owner
is prefixed with the node's name, and clear() at a node's start forgets only this
node's owners, never what the other nodes' sessions hold.

Trusts: the URL and password file of the validated configuration. Keys and values are
bound parameters, never SQL.
Never: run on the event loop's thread (use submit); import another kanmon layer (the
schema is created here, idempotently, by each new connection); connect in the
constructor (a node starts while the database is down; its calls fail until it returns).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from kanmon.state.api import (
    AlertClaim,
    AlertResolution,
    CacheEntry,
    Triplet,
    TripletState,
    bucket_estimate,
    decide_resolution,
)
from kanmon.state.pgconnect import STATE_TIMEOUTS, libpq_parameters, read_password

if TYPE_CHECKING:
    import psycopg

T = TypeVar("T")

SCHEMA_LOCK = 0x6B616E6D6F6F  # pg_advisory_xact_lock key while creating the tables
WORKERS = 1  # one thread per process for submit(), as SQLite: a session's calls keep their order

_SCHEMA = """
CREATE TABLE IF NOT EXISTS state_rate (
    key TEXT NOT NULL, win DOUBLE PRECISION NOT NULL, bucket BIGINT NOT NULL, count BIGINT NOT NULL,
    PRIMARY KEY (key, win, bucket));
CREATE TABLE IF NOT EXISTS state_gauge (
    key TEXT NOT NULL, owner TEXT NOT NULL, held INTEGER NOT NULL, since DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (key, owner));
CREATE INDEX IF NOT EXISTS state_gauge_owner ON state_gauge (owner);
CREATE TABLE IF NOT EXISTS state_cache (
    ns TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL, stored DOUBLE PRECISION NOT NULL,
    expires DOUBLE PRECISION NOT NULL, PRIMARY KEY (ns, key));
CREATE TABLE IF NOT EXISTS state_greylist (
    client TEXT NOT NULL, sender TEXT NOT NULL, recipient TEXT NOT NULL, first_seen DOUBLE PRECISION NOT NULL,
    last_seen DOUBLE PRECISION NOT NULL, passed DOUBLE PRECISION, attempts INTEGER NOT NULL,
    PRIMARY KEY (client, sender, recipient));
CREATE TABLE IF NOT EXISTS state_greylist_client (client TEXT PRIMARY KEY, passes INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS state_alert_claim (
    category TEXT NOT NULL, key TEXT NOT NULL, last_sent DOUBLE PRECISION NOT NULL, mailed_by TEXT NOT NULL,
    PRIMARY KEY (category, key));
CREATE TABLE IF NOT EXISTS state_alert_seen (
    category TEXT NOT NULL, key TEXT NOT NULL, node TEXT NOT NULL, last_seen DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (category, key, node));
CREATE TABLE IF NOT EXISTS state_alert_cleared (
    category TEXT NOT NULL, key TEXT NOT NULL, node TEXT NOT NULL, cleared DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (category, key, node));
CREATE TABLE IF NOT EXISTS state_alert_resolved (
    category TEXT NOT NULL, key TEXT NOT NULL, resolved DOUBLE PRECISION NOT NULL, by_node TEXT NOT NULL,
    PRIMARY KEY (category, key));
"""


def _like_prefix(prefix: str) -> str:
    return prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def _text(value: str) -> str:
    """PostgreSQL text holds no NUL; keys may come from the network."""
    return value.replace("\x00", "\ufffd") if "\x00" in value else value


class _Db:
    """A connection per thread to one PostgreSQL database."""

    def __init__(self, url: str, password_file: Path | None, schema: str = _SCHEMA):
        self.url = url
        self.password_file = password_file
        self.schema = schema  # made sure of by each new connection
        self._local = threading.local()
        self._all: list[psycopg.Connection] = []
        self._lock = threading.Lock()

    def _connect(self) -> psycopg.Connection:
        import psycopg

        # keepalives, and a check waits no longer than STATE_TIMEOUTS on a locked row
        extra: dict[str, Any] = {**libpq_parameters(self.url, "kanmon-state", STATE_TIMEOUTS), "autocommit": True}
        if self.password_file is not None:
            extra["password"] = read_password(self.password_file)
        return psycopg.connect(self.url, **extra)

    @property
    def conn(self) -> psycopg.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None or conn.closed:
            conn = self._connect()
            try:
                # Each new connection makes sure of the tables (idempotent): a node starts
                # while the database is down, or the database comes back recreated.
                with conn.transaction():
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
                    conn.execute(self.schema)
            except BaseException:
                conn.close()
                raise
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    @contextmanager
    def transaction(self) -> Iterator[psycopg.Connection]:
        """One transaction; on a connection error the thread's connection is dropped. A
        kept connection the server closed meanwhile (PostgreSQL restarted: "terminating
        connection due to administrator command") fails at its BEGIN, before anything of
        the transaction ran: it is replaced by a new one once, not reported as an outage."""
        import psycopg

        for attempt in (1, 2):
            kept = getattr(self._local, "conn", None) is not None and not self._local.conn.closed
            conn = self.conn
            stack = ExitStack()
            try:
                stack.enter_context(conn.transaction())  # BEGIN
            except psycopg.OperationalError:
                self._drop(conn)
                if kept and attempt == 1:
                    continue
                raise
            break
        try:
            with stack:
                yield conn
        except psycopg.OperationalError:
            self._drop(conn)
            raise

    def read(self, sql: str, args: tuple) -> list[tuple]:
        with self.transaction() as c:
            return c.execute(sql, args).fetchall()

    def _drop(self, conn: psycopg.Connection) -> None:
        with suppress(Exception):
            conn.close()
        with self._lock:
            with suppress(ValueError):
                self._all.remove(conn)
        self._local.conn = None

    def close(self) -> None:
        with self._lock:
            for conn in self._all:
                with suppress(Exception):
                    conn.close()
            self._all.clear()
        self._local = threading.local()


class PgCounters:
    def __init__(self, db: _Db):
        self._db = db

    def hit(self, key: str, window: float, now: float, amount: int = 1) -> int:
        key = _text(key)
        bucket = int(now // window)
        with self._db.transaction() as c:
            c.execute(
                "INSERT INTO state_rate (key, win, bucket, count) VALUES (%s, %s, %s, %s)"
                " ON CONFLICT (key, win, bucket) DO UPDATE SET count = state_rate.count + excluded.count",
                (key, window, bucket, amount))
            c.execute("DELETE FROM state_rate WHERE key = %s AND win = %s AND bucket < %s", (key, window, bucket - 1))
            return self._estimate(c, key, window, bucket, now)

    def peek(self, key: str, window: float, now: float) -> int:
        with self._db.transaction() as c:
            return self._estimate(c, _text(key), window, int(now // window), now)

    @staticmethod
    def _estimate(c: psycopg.Connection, key: str, window: float, bucket: int, now: float) -> int:
        rows = dict(c.execute("SELECT bucket, count FROM state_rate WHERE key = %s AND win = %s AND bucket >= %s",
                              (key, window, bucket - 1)).fetchall())
        return bucket_estimate(rows.get(bucket, 0), rows.get(bucket - 1, 0), window, now)

    def reset(self, key: str) -> None:
        with self._db.transaction() as c:
            c.execute("DELETE FROM state_rate WHERE key = %s", (_text(key),))

    def prune(self, now: float) -> int:
        """Delete the rows of keys idle for two windows."""
        with self._db.transaction() as c:
            return c.execute("DELETE FROM state_rate WHERE (bucket + 2) * win <= %s", (now,)).rowcount


class PgGauges:
    def __init__(self, db: _Db, node: str):
        self._db = db
        self._node = node

    def _owner(self, owner: str) -> str:
        return f"{self._node}:{owner}"

    @staticmethod
    def _acquire(c: psycopg.Connection, key: str, owner: str, now: float) -> int:
        c.execute("INSERT INTO state_gauge (key, owner, held, since) VALUES (%s, %s, 1, %s)"
                  " ON CONFLICT (key, owner) DO UPDATE SET held = state_gauge.held + 1", (key, owner, now))
        return c.execute("SELECT COALESCE(SUM(held), 0) FROM state_gauge WHERE key = %s", (key,)).fetchone()[0]

    @staticmethod
    def _release(c: psycopg.Connection, key: str, owner: str) -> None:
        c.execute("UPDATE state_gauge SET held = held - 1 WHERE key = %s AND owner = %s", (key, owner))
        c.execute("DELETE FROM state_gauge WHERE key = %s AND owner = %s AND held <= 0", (key, owner))

    def acquire(self, key: str, owner: str, now: float) -> int:
        with self._db.transaction() as c:
            return self._acquire(c, _text(key), self._owner(owner), now)

    def release(self, key: str, owner: str) -> None:
        with self._db.transaction() as c:
            self._release(c, _text(key), self._owner(owner))

    def apply(self, owner: str, releases: Sequence[str], acquires: Sequence[str], now: float) -> list[int]:
        owner = self._owner(owner)
        with self._db.transaction() as c:
            for key in releases:
                self._release(c, _text(key), owner)
            return [self._acquire(c, _text(key), owner, now) for key in acquires]

    def count(self, key: str) -> int:
        return self._db.read("SELECT COALESCE(SUM(held), 0) FROM state_gauge WHERE key = %s", (_text(key),))[0][0]

    def drop_owner(self, owner: str) -> None:
        with self._db.transaction() as c:
            c.execute("DELETE FROM state_gauge WHERE owner = %s", (self._owner(owner),))

    def clear(self) -> None:
        """This node's owners only: the other nodes' sessions are still open."""
        with self._db.transaction() as c:
            c.execute("DELETE FROM state_gauge WHERE owner LIKE %s ESCAPE '\\'", (_like_prefix(self._node + ":"),))


class PgCache:
    def __init__(self, db: _Db, namespace: str):
        self._db = db
        self._ns = namespace

    def get(self, key: str, now: float) -> CacheEntry | None:
        rows = self._db.read("SELECT value, stored, expires FROM state_cache WHERE ns = %s AND key = %s AND expires > %s",
                             (self._ns, _text(key), now))
        return CacheEntry(key, *rows[0]) if rows else None

    def put(self, key: str, value: str, ttl: float, now: float) -> None:
        with self._db.transaction() as c:
            c.execute("INSERT INTO state_cache (ns, key, value, stored, expires) VALUES (%s, %s, %s, %s, %s)"
                      " ON CONFLICT (ns, key) DO UPDATE SET value = excluded.value, stored = excluded.stored,"
                      " expires = excluded.expires", (self._ns, _text(key), _text(value), now, now + ttl))

    def delete(self, key: str) -> bool:
        with self._db.transaction() as c:
            return c.execute("DELETE FROM state_cache WHERE ns = %s AND key = %s", (self._ns, _text(key))).rowcount > 0

    def list(self, now: float, prefix: str = "") -> list[CacheEntry]:
        rows = self._db.read(
            "SELECT key, value, stored, expires FROM state_cache WHERE ns = %s AND key LIKE %s ESCAPE '\\'"
            " AND expires > %s ORDER BY key COLLATE \"C\"", (self._ns, _like_prefix(_text(prefix)), now))
        return [CacheEntry(*r) for r in rows]

    def flush(self, prefix: str = "") -> int:
        with self._db.transaction() as c:
            return c.execute("DELETE FROM state_cache WHERE ns = %s AND key LIKE %s ESCAPE '\\'",
                             (self._ns, _like_prefix(_text(prefix)))).rowcount

    def prune(self, now: float) -> int:
        with self._db.transaction() as c:
            return c.execute("DELETE FROM state_cache WHERE ns = %s AND expires <= %s", (self._ns, now)).rowcount


class PgGreylist:
    def __init__(self, db: _Db):
        self._db = db

    @staticmethod
    def _key(triplet: Triplet) -> tuple[str, str, str]:
        return _text(triplet.client), _text(triplet.sender), _text(triplet.recipient)

    def attempt(self, triplet: Triplet, now: float) -> TripletState:
        with self._db.transaction() as c:
            row = c.execute(
                "INSERT INTO state_greylist (client, sender, recipient, first_seen, last_seen, passed, attempts)"
                " VALUES (%s, %s, %s, %s, %s, NULL, 1) ON CONFLICT (client, sender, recipient)"
                " DO UPDATE SET last_seen = excluded.last_seen, attempts = state_greylist.attempts + 1"
                " RETURNING first_seen, last_seen, passed, attempts", (*self._key(triplet), now, now)).fetchone()
        return TripletState(triplet, *row)

    def mark_passed(self, triplet: Triplet, now: float) -> None:
        t = self._key(triplet)
        with self._db.transaction() as c:
            # Whichever node marks it first counts the client's pass: the UPDATE waits for
            # a concurrent one and then sees `passed` set.
            changed = c.execute(
                "UPDATE state_greylist SET passed = %s, last_seen = %s"
                " WHERE client = %s AND sender = %s AND recipient = %s AND passed IS NULL", (now, now, *t)).rowcount
            if not changed:
                changed = c.execute(
                    "INSERT INTO state_greylist (client, sender, recipient, first_seen, last_seen, passed, attempts)"
                    " VALUES (%s, %s, %s, %s, %s, %s, 1) ON CONFLICT DO NOTHING", (*t, now, now, now)).rowcount
            if changed:
                c.execute("INSERT INTO state_greylist_client (client, passes) VALUES (%s, 1)"
                          " ON CONFLICT (client) DO UPDATE SET passes = state_greylist_client.passes + 1", (t[0],))

    def client_passes(self, client: str) -> int:
        rows = self._db.read("SELECT passes FROM state_greylist_client WHERE client = %s", (_text(client),))
        return rows[0][0] if rows else 0

    def forget(self, triplet: Triplet) -> bool:
        with self._db.transaction() as c:
            return c.execute("DELETE FROM state_greylist WHERE client = %s AND sender = %s AND recipient = %s",
                             self._key(triplet)).rowcount > 0

    def list(self, prefix: str = "") -> list[TripletState]:
        rows = self._db.read(
            "SELECT client, sender, recipient, first_seen, last_seen, passed, attempts FROM state_greylist"
            " WHERE client LIKE %s ESCAPE '\\'"
            ' ORDER BY client COLLATE "C", sender COLLATE "C", recipient COLLATE "C"', (_like_prefix(_text(prefix)),))
        return [TripletState(Triplet(r[0], r[1], r[2]), r[3], r[4], r[5], r[6]) for r in rows]

    def prune(self, now: float, window: float, remember: float) -> int:
        with self._db.transaction() as c:
            return c.execute(
                "DELETE FROM state_greylist WHERE (passed IS NULL AND first_seen < %s)"
                " OR (passed IS NOT NULL AND last_seen < %s)", (now - window, now - remember)).rowcount


class PgAlertClaims:
    def __init__(self, db: _Db):
        self._db = db

    def claim(self, category: str, key: str, node: str, now: float, interval: float) -> AlertClaim:
        category, key = _text(category), _text(key)
        with self._db.transaction() as c:
            c.execute("INSERT INTO state_alert_seen (category, key, node, last_seen) VALUES (%s, %s, %s, %s)"
                      " ON CONFLICT (category, key, node) DO UPDATE SET last_seen = excluded.last_seen",
                      (category, key, node, now))
            # The claim and its condition in one statement: of two nodes claiming at once,
            # the second waits for the first's row and then finds it mailed.
            won = c.execute(
                "INSERT INTO state_alert_claim (category, key, last_sent, mailed_by) VALUES (%s, %s, %s, %s)"
                " ON CONFLICT (category, key) DO UPDATE SET last_sent = excluded.last_sent,"
                " mailed_by = excluded.mailed_by WHERE state_alert_claim.last_sent <= %s RETURNING 1",
                (category, key, now, node, now - interval)).fetchone() is not None
            by = node if won else c.execute("SELECT mailed_by FROM state_alert_claim WHERE category = %s AND key = %s",
                                            (category, key)).fetchone()[0]
            nodes = tuple(n for (n,) in c.execute(
                "SELECT node FROM state_alert_seen WHERE category = %s AND key = %s AND last_seen > %s"
                ' ORDER BY node COLLATE "C"', (category, key, now - interval)))
        return AlertClaim(won, nodes, by)

    def resolve(self, category: str, key: str, node: str, now: float, interval: float) -> AlertResolution:
        category, key = _text(category), _text(key)
        with self._db.transaction() as c:
            # The claim's row, locked first: two nodes resolving at once go one after the
            # other, and the second sees the first's end.
            sent = c.execute("SELECT last_sent FROM state_alert_claim WHERE category = %s AND key = %s FOR UPDATE",
                             (category, key)).fetchone()
            c.execute("INSERT INTO state_alert_cleared (category, key, node, cleared) VALUES (%s, %s, %s, %s)"
                      " ON CONFLICT (category, key, node) DO UPDATE SET cleared = excluded.cleared",
                      (category, key, node, now))
            resolved = c.execute("SELECT resolved FROM state_alert_resolved WHERE category = %s AND key = %s",
                                 (category, key)).fetchone()
            seen = dict(c.execute("SELECT node, last_seen FROM state_alert_seen WHERE category = %s AND key = %s",
                                  (category, key)).fetchall())
            cleared = dict(c.execute("SELECT node, cleared FROM state_alert_cleared WHERE category = %s AND key = %s",
                                     (category, key)).fetchall())
            out, over = decide_resolution(node, now, interval, sent[0] if sent else None,
                                          resolved[0] if resolved else None, seen, cleared)
            if over:
                c.execute("INSERT INTO state_alert_resolved (category, key, resolved, by_node) VALUES (%s, %s, %s, %s)"
                          " ON CONFLICT (category, key) DO UPDATE SET resolved = excluded.resolved,"
                          " by_node = excluded.by_node", (category, key, now, node))
        return out


class PostgresState:
    """SharedState in PostgreSQL (`[records] url`); node: this node's name (gauge owners)."""

    def __init__(self, url: str, node: str, *, password_file: Path | None = None):
        self.node = node
        self._db = _Db(url, password_file)
        self.counters = PgCounters(self._db)
        self.gauges = PgGauges(self._db, node)
        self.greylist = PgGreylist(self._db)
        self.alert_claims = PgAlertClaims(self._db)
        self._caches: dict[str, PgCache] = {}
        self._executor: ThreadPoolExecutor | None = None

    def cache(self, namespace: str) -> PgCache:
        cache = self._caches.get(namespace)
        if cache is None:
            cache = self._caches[namespace] = PgCache(self._db, namespace)
        return cache

    def submit(self, fn: Callable[..., T], *args: Any) -> Awaitable[T]:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="kanmon-state-pg")
        return asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        self._db.close()
