"""Every kanmon connection to PostgreSQL carries TCP keepalives, a statement_timeout and
a lock_timeout (kanmon.state.pgconnect; a URL setting its own wins); a state call
behind a lock ends with an error instead of waiting; and the records Shipper keeps at
most max_pending batches in memory: while a lost database host holds its thread, put()
sends the rest straight to the durable journal, and every batch is written once, in
order, when the database answers again."""

from __future__ import annotations

import socket
import threading

import pytest

from kanmon.config import RecordsSection
from kanmon.records import pg
from kanmon.state.api import Triplet
from kanmon.state.pgconnect import libpq_parameters
from kanmon.state.postgresql import PostgresState
from tests.support.kanmon_node import free_port, wait_for

psycopg = pytest.importorskip("psycopg", reason="psycopg is not installed (pip install 'psycopg[binary]')")


def test_defaults_apply_only_to_what_the_url_does_not_set():
    params = libpq_parameters("postgresql://k@db.example.test/k?sslmode=verify-full&keepalives_idle=5",
                              "kanmon", (1000, 500))
    assert "keepalives_idle" not in params  # the URL's own
    assert params["keepalives"] == 1 and params["keepalives_count"] == 3 and params["tcp_user_timeout"] > 0
    assert params["options"] == "-c statement_timeout=1000 -c lock_timeout=500"
    assert "options" not in libpq_parameters("postgresql://k@db/k?options=-c%20work_mem%3D8MB", "kanmon", (1, 1))


def _settings(conn) -> tuple[str, str]:
    return (conn.execute("SHOW statement_timeout").fetchone()[0], conn.execute("SHOW lock_timeout").fetchone()[0])


def test_records_state_and_admin_connections_carry_timeouts_and_keepalives(pg_url):
    from kanmon.records import pgquery

    with pg.connect(pg_url) as conn:
        assert _settings(conn) == ("30s", "10s")
        params = conn.info.get_parameters()
        assert (params.get("keepalives"), params.get("keepalives_idle")) == ("1", "30")
    with pgquery.reading(RecordsSection(url=pg_url)) as conn:
        assert _settings(conn) == ("5min", "10s")
    state = PostgresState(pg_url, "mr1")
    try:
        assert _settings(state._db.conn) == ("5s", "2s")
    finally:
        state.close()
    with pg.connect(pg_url + "?options=-c%20statement_timeout%3D1234") as conn:
        assert _settings(conn)[0] == "1234ms"  # the URL's own


def test_a_state_call_behind_a_lock_fails_instead_of_waiting(pg_url):
    state = PostgresState(pg_url, "mr1")
    triplet = Triplet("192.0.2.0/24", "a@example.test", "b@corp.example")
    try:
        state.greylist.attempt(triplet, 1000.0)
        with psycopg.connect(pg_url) as holder, holder.transaction():
            holder.execute("SELECT * FROM state_greylist FOR UPDATE")
            with pytest.raises(psycopg.errors.LockNotAvailable):
                state.greylist.attempt(triplet, 1001.0)  # ends at lock_timeout: the check fails by its mode
        assert state.greylist.attempt(triplet, 1002.0).attempts == 2  # reconnects; the failed one left nothing
    finally:
        state.close()


class HangingHost:
    """A TCP port in front of PostgreSQL that, while `lost`, takes connections and never
    answers (a database host gone without a reset), and otherwise forwards them."""

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self.lost = True
        self.held: list[socket.socket] = []
        self.sock = socket.create_server(("127.0.0.1", free_port()))
        self.port = self.sock.getsockname()[1]
        self._closing = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closing:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            if self.lost:
                self.held.append(conn)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                conn.close()
                continue
            for a, b in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._closing = True
        self.sock.close()
        for c in self.held:
            c.close()


def _batch(i: int) -> dict:
    return {"events": [[1_000_000.0 + i, f"QUEUE{i:05d}", "removed", f"removed {i}", None, None]],
            "hist": [], "status": [], "counts": []}


def test_beyond_the_cap_batches_go_straight_to_the_journal_and_none_is_lost(tmp_path, private_pg):
    url = private_pg.create_database()
    dbname = url.rsplit("/", 1)[1]
    private_pg.stop()  # the database is down, and its host does not answer at all
    host = HangingHost((private_pg.host, private_pg.port))
    shipper = pg.Shipper(RecordsSection(url=f"postgresql://kanmon@127.0.0.1:{host.port}/{dbname}?connect_timeout=3"),
                         "mr1", tmp_path, max_pending=4)
    try:
        shipper.put(_batch(0))
        wait_for(lambda: host.held, 60, "the shipper's thread to hang on the lost host")
        for i in range(1, 41):
            shipper.put(_batch(i))  # returns at once: the thread is stuck in connect
        assert len(shipper._pending) <= 4  # memory stays bounded
        lines = sum(len(p.read_bytes().splitlines()) for p in (tmp_path / pg.SPILL_DIR).glob("*.jsonl"))
        assert lines == shipper.overflowed >= 36  # durable already, before any write was tried
        private_pg.start()
        host.lost = False
        wait_for(lambda: shipper.failing is not None, 60, "the connect attempt to time out")
        shipper.retry_now()
        assert shipper.flush(timeout=60)
    finally:
        shipper.close()
        host.close()
    with psycopg.connect(url) as conn:
        got = [q for (q,) in conn.execute("SELECT queue_id FROM events ORDER BY id")]
    assert got == [f"QUEUE{i:05d}" for i in range(41)]  # every one, once, in the order put
    assert not list((tmp_path / pg.SPILL_DIR).glob("*.jsonl"))


def _restart_fast(server) -> None:
    """A planned restart: sessions end with "terminating connection due to administrator
    command" (AdminShutdown), the server is back at once."""
    server._as_postgres([str(server.bindir / "pg_ctl"), "-D", str(server.data), "-m", "fast", "-w", "stop"])
    server.start()


def test_a_kept_connection_the_server_closed_is_replaced_once_not_reported(tmp_path, private_pg):
    """After PostgreSQL restarted, the first use of a kept connection fails (the server
    closed it): the shared state and the records writer try once more on a new
    connection, instead of answering a check with its failure mode or raising the
    records alert for a database that is up."""
    from kanmon.state.postgresql import PostgresState

    url = private_pg.create_database()
    state = PostgresState(url, "mr1")
    failures: list[str] = []
    shipper = pg.Shipper(RecordsSection(url=url), "mr1", tmp_path, on_failure=failures.append)
    try:
        assert state.counters.hit("k", 3600.0, 1000.0) == 1
        shipper.put(_batch(0))
        assert shipper.flush(timeout=60) and shipper.written == 1
        _restart_fast(private_pg)
        assert state.counters.hit("k", 3600.0, 1000.0) == 2  # not OperationalError (AdminShutdown)
        shipper.put(_batch(1))
        assert shipper.flush(timeout=60) and shipper.written == 2
        assert shipper.failing is None and failures == []
    finally:
        shipper.close()
        state.close()
