"""The tests' own PostgreSQL (tests/support/postgres.py): a fresh database per test, and
a private server a test can stop and start again."""

import pytest

psycopg = pytest.importorskip("psycopg", reason="psycopg is not installed (pip install 'psycopg[binary]')")


def test_each_test_gets_a_fresh_database(pg_server, pg_url):
    other = pg_server.create_database()
    assert other != pg_url
    with psycopg.connect(pg_url) as conn:
        conn.execute("CREATE TABLE t (x int)")
    with psycopg.connect(other) as conn:
        assert conn.execute("SELECT count(*) FROM pg_tables WHERE tablename = 't'").fetchone() == (0,)


def test_a_private_server_stops_and_starts_with_its_data(private_pg):
    url = private_pg.create_database()
    with psycopg.connect(url) as conn:
        conn.execute("CREATE TABLE t (x int); INSERT INTO t VALUES (7)")
    private_pg.stop()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(url, connect_timeout=5)
    private_pg.start()
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT x FROM t").fetchone() == (7,)
