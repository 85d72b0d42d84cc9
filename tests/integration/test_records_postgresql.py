"""Records shared in PostgreSQL (kanmon.records.pg), against the tests' own server: every
batch also goes there tagged with the node; an outage is bridged by the spill journal
and replayed in order, nothing lost and nothing twice; a batch written twice counts once."""

from __future__ import annotations

import pytest

from kanmon.config import RecordsSection
from kanmon.model import ClientInfo, Envelope
from kanmon.records import events as ev
from kanmon.records import pg, pgquery
from kanmon.records.query import search_events as local_events
from kanmon.records.store import Records

psycopg = pytest.importorskip("psycopg", reason="psycopg is not installed (pip install 'psycopg[binary]')")

QID = "4Q1a2B3c4D5e6F"


def section(url: str, node: str | None = None) -> RecordsSection:
    return RecordsSection(url=url, node=node)


def accept(records: Records, qid: str, subject: str = "hello") -> None:
    env = Envelope("alice@example.test", ["bob@example.test"], client=ClientInfo("192.0.2.7", helo="c.example"))
    records.history_accept(qid, env, 100, f"Subject: {subject}\r\n\r\nbody\r\n".encode())


def test_batches_go_to_postgresql_with_the_node_name_and_to_the_local_sqlite(tmp_path, pg_url):
    mr1 = Records(tmp_path / "mr1", "mr1.example.test", shared=section(pg_url))
    mr2 = Records(tmp_path / "mr2", "ignored.example.test", shared=section(pg_url, node="mr2"))
    mr1.record(ev.Removed(), QID)
    accept(mr1, QID)
    mr2.emit("hello from two")
    for r in (mr1, mr2):
        r.flush()
        assert r.shipper.flush()
    cfg = section(pg_url)
    rows = pgquery.search_events(cfg)
    assert {(r.node, r.text) for r in rows} >= {("mr1.example.test", "removed"), ("mr2", "hello from two")}
    assert [r.text for r in pgquery.search_events(cfg, node="mr2")] == ["hello from two"]
    assert "removed" in [e.text for e in local_events(tmp_path / "mr1")]  # the node's own SQLite as before
    hist = pgquery.search_history(cfg, queue_id=QID)
    assert [(h.node, h.rcpt, h.subject, h.status) for h in hist] == [("mr1.example.test", "bob@example.test", "hello", "Queued")]
    assert [n for n, _ts in pgquery.nodes(cfg)] == ["mr1.example.test", "mr2"]
    mr1.close()
    mr2.close()


def test_a_status_folds_into_its_history_row_whichever_arrives_first(tmp_path, pg_url):
    receiver = Records(tmp_path, "mr1", shared=section(pg_url))
    node = Records(tmp_path, "mr1", shared=section(pg_url))
    node.history_status(QID, "bob@example.test", "Deferred (451 try later)")
    node.flush()
    assert node.shipper.flush()
    accept(receiver, QID)  # written after the first status by another process of the node
    receiver.flush()
    assert receiver.shipper.flush()
    node.history_status(QID, "bob@example.test", "Delivered")
    node.flush()
    assert node.shipper.flush()
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT status, deferrals FROM history WHERE queue_id = %s", (QID,)).fetchall() == [
            ("Delivered", 1)]
    receiver.close()
    node.close()


def test_a_batch_key_written_twice_counts_once(pg_url):
    rows = {"events": [[1.0, QID, "removed", "removed", None, '{"a": 1}']], "hist": [], "status": [],
            "counts": [[7, "delivered", 2]]}
    with pg.connect(pg_url, autocommit=True) as conn:
        pg.migrate(conn)
        assert pg.commit_batch(conn, "mr1", "k1", rows) is True
        assert pg.commit_batch(conn, "mr1", "k1", rows) is False
        assert pg.commit_batch(conn, "mr2", "k1", rows) is True  # another node's key space
        assert conn.execute("SELECT count(*) FROM events").fetchone() == (2,)
        assert conn.execute("SELECT node, value FROM counters ORDER BY node").fetchall() == [("mr1", 2), ("mr2", 2)]
        assert conn.execute("SELECT detail->>'a' FROM events LIMIT 1").fetchone() == ("1",)


def test_batches_of_one_pass_go_in_one_transaction_each_key_once(pg_url):
    def rows(n: int) -> dict:
        return {"events": [[float(n), QID, "removed", f"removed {n}", None, '{"n": %d}' % n]],
                "hist": [], "status": [], "counts": [[7, "delivered", n]]}

    with pg.connect(pg_url, autocommit=True) as conn:
        pg.migrate(conn)
        assert pg.commit_batch(conn, "mr1", "k2", rows(2)) is True
        assert pg.commit_batches(conn, "mr1", [("k1", rows(1)), ("k2", rows(2)), ("k3", rows(3))]) == [True, False, True]
        assert conn.execute("SELECT text FROM events ORDER BY id").fetchall() == [("removed 2",), ("removed 1",), ("removed 3",)]
        assert conn.execute("SELECT value FROM counters").fetchall() == [(6,)]  # 2, then 1 + 3: k2 not twice
        assert conn.execute("SELECT detail->>'n' FROM events ORDER BY id").fetchall() == [("2",), ("1",), ("3",)]
        assert pg.commit_batches(conn, "mr1", []) == []


def test_nul_characters_from_the_network_are_stored_not_refused(tmp_path, pg_url):
    records = Records(tmp_path, "mr1", shared=section(pg_url))
    accept(records, QID, subject="=?utf-8?q?a=00b?=")
    records.emit("x", detail={"why": "nul\x00here"})
    records.flush()
    assert records.shipper.flush()
    assert [h.subject for h in pgquery.search_history(section(pg_url))] == ["a\ufffdb"]
    assert [e.fields for e in pgquery.search_events(section(pg_url), grep="x")][-1] == {"why": "nul\ufffdhere"}
    records.close()


def test_migrations_are_versioned_and_applied_once(pg_url):
    with pg.connect(pg_url, autocommit=True) as conn:
        assert [m.version for m in pg.pending(conn)] == [m.version for m in pg.MIGRATIONS]
        assert [m.version for m in pg.migrate(conn)] == [m.version for m in pg.MIGRATIONS]
        assert pg.pending(conn) == []
        assert pg.migrate(conn) == []
        conn.execute("INSERT INTO schema_version VALUES (999, 'from a newer kanmon', 0)")
        assert pg.newer_than_known(conn) == [999]


def test_postgresql_down_and_back_loses_nothing_and_writes_nothing_twice(tmp_path, private_pg):
    url = private_pg.create_database()
    failures: list[str] = []
    records = Records(tmp_path, "mr1", shared=section(url), on_failure=failures.append)
    sent = []

    def traffic(first: int, n: int) -> None:
        for i in range(first, first + n):
            qid = f"{QID[:-4]}{i:04d}"
            records.record(ev.Removed(), qid)
            accept(records, qid, subject=f"message {i}")
            records.history_status(qid, "bob@example.test", "Delivered")
            sent.append(qid)
            if i % 10 == 0:
                records.flush()  # several batches

    traffic(0, 30)
    records.flush()
    assert records.shipper.flush()
    private_pg.stop()
    traffic(30, 40)
    records.flush()
    assert not records.shipper.flush(timeout=2)  # kept in the journal, not written
    assert failures and "PostgreSQL" in failures[0]
    assert len(failures) == 1  # once per outage
    assert list((tmp_path / pg.SPILL_DIR).glob("*.jsonl"))
    assert len(local_events(tmp_path, grep="removed")) == 70  # the node's own records never waited
    private_pg.start()
    traffic(70, 30)
    records.flush()
    records.shipper.retry_now()  # rather than at the end of the backoff
    assert records.shipper.flush(timeout=30)
    records.flush()
    records.close()
    with psycopg.connect(url) as conn:
        got = [q for (q,) in conn.execute("SELECT queue_id FROM events WHERE kind = 'removed' ORDER BY id")]
        hist = conn.execute("SELECT queue_id, status FROM history ORDER BY id").fetchall()
        texts = [t for (t,) in conn.execute("SELECT text FROM events WHERE node = 'mr1' AND text LIKE 'records:%%'")]
    assert got == sent  # every one, once, in order
    assert hist == [(q, "Delivered") for q in sent]
    assert any("takes writes again" in t for t in texts)
    assert not list((tmp_path / pg.SPILL_DIR).glob("*.jsonl"))


def test_what_a_stopped_process_left_in_the_journal_is_written_by_the_next_node_start(tmp_path, private_pg):
    url = private_pg.create_database()
    private_pg.stop()
    records = Records(tmp_path, "mr1", shared=section(url))
    records.record(ev.Removed(), QID)
    records.close()  # PostgreSQL still down: the batch stays in the journal
    assert list((tmp_path / pg.SPILL_DIR).glob("*.jsonl"))
    private_pg.start()
    node = Records(tmp_path, "mr1", shared=section(url), replay_others=True)
    node.flush()
    assert node.shipper.flush(timeout=30)
    node.close()
    assert [e.queue_id for e in pgquery.search_events(section(url)) if e.kind == "removed"] == [QID]



def test_the_journal_of_a_process_still_running_is_left_to_it(tmp_path, private_pg):
    """The node replays what ended processes left, never the file a live receiver still
    appends to (taking it would delete what the receiver appends meanwhile)."""
    import subprocess
    import sys

    url = private_pg.create_database()
    private_pg.stop()
    records = Records(tmp_path, "mr1", shared=section(url))
    records.record(ev.Removed(), QID)
    records.close()
    (own,) = (tmp_path / pg.SPILL_DIR).glob("*.jsonl")
    receiver = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        live = own.with_name(f"{receiver.pid}.jsonl")
        own.rename(live)
        content = live.read_bytes()
        private_pg.start()
        node = Records(tmp_path, "mr1", shared=section(url), replay_others=True)
        node.record(ev.Removed(), "OTHERQUEUEID01")
        node.flush()
        assert node.shipper.flush(timeout=30)
        node.close()
        assert live.read_bytes() == content  # untouched
        assert [e.queue_id for e in pgquery.search_events(section(url)) if e.kind == "removed"] == ["OTHERQUEUEID01"]
    finally:
        receiver.communicate(b"")
    node = Records(tmp_path, "mr1", shared=section(url), replay_others=True)  # the next start: it has ended
    node.flush()
    assert node.shipper.flush(timeout=30)
    node.close()
    assert not live.exists()
    assert sorted(e.queue_id for e in pgquery.search_events(section(url)) if e.kind == "removed") == sorted([QID, "OTHERQUEUEID01"])

def test_the_url_may_not_hold_a_password():
    with pytest.raises(ValueError, match="password_file"):
        RecordsSection(url="postgresql://kanmon:secret@db.example.test/kanmon")


# -- the commands ------------------------------------------------------------------------

def write_config(tmp_path, url: str | None, node: str = "mr1", data: str = "data"):
    path = tmp_path / f"{node}.toml"
    records = f'[records]\nurl = "{url}"\nnode = "{node}"\n' if url else ""
    path.write_text(f'[server]\nhostname = "{node}.example.test"\ndata_dir = "{tmp_path / data}"\n{records}')
    return str(path)


def run(*argv):
    from click.testing import CliRunner

    from kanmon.cli import main

    return CliRunner().invoke(main, list(argv))


def test_migrate_check_exits_non_zero_while_migrations_are_pending(tmp_path, pg_url):
    cfg = write_config(tmp_path, pg_url)
    before = run("records", "migrate", "--check", "-c", cfg)
    assert before.exit_code == 1, before.output
    assert "pending: 1 " in before.output
    done = run("records", "migrate", "-c", cfg)
    assert done.exit_code == 0 and "applied: 1 " in done.output, done.output
    after = run("records", "migrate", "--check", "-c", cfg)
    assert after.exit_code == 0 and "schema up to date" in after.output


def test_migrate_refuses_a_schema_newer_than_this_kanmon(tmp_path, pg_url):
    with pg.connect(pg_url, autocommit=True) as conn:
        pg.migrate(conn)
        conn.execute("INSERT INTO schema_version VALUES (999, 'newer', 0)")
    result = run("records", "migrate", "--check", "-c", write_config(tmp_path, pg_url))
    assert result.exit_code == 2 and "newer than this kanmon" in result.output


def test_an_unreachable_database_is_one_line_not_a_traceback(tmp_path, private_pg):
    url = private_pg.create_database()
    private_pg.stop()
    (tmp_path / "data").mkdir()
    result = run("log", "events", "-c", write_config(tmp_path, url))
    assert result.exit_code == 1
    assert "shared records" in result.output and "Traceback" not in result.output


def test_log_shows_every_node_and_filters_by_node(tmp_path, pg_url):
    for node in ("mr1", "mr2"):
        r = Records(tmp_path / node, f"{node}.example.test", shared=section(pg_url, node=node))
        accept(r, QID if node == "mr1" else QID[:-1] + "X", subject=f"via {node}")
        r.emit(f"hello from {node}\x1b[31m")
        r.flush()
        assert r.shipper.flush()
        r.close()
    cfg = write_config(tmp_path, pg_url, data="mr1")
    out = run("log", "events", "-c", cfg).output
    assert "mr1 hello from mr1" in out and "mr2 hello from mr2" in out
    assert "\x1b" not in out  # escaped for the terminal
    only = run("log", "events", "--node", "mr2", "-c", cfg).output
    assert "hello from mr2" in only and "hello from mr1" not in only
    hist = run("log", "history", "--json", "-c", cfg).output.splitlines()
    import json

    assert sorted((json.loads(h)["node"], json.loads(h)["subject"]) for h in hist) == [("mr1", "via mr1"), ("mr2", "via mr2")]
    table = run("log", "history", "--node", "mr1", "-c", cfg).output
    assert "via mr1" in table and "via mr2" not in table


def test_node_filter_needs_shared_records(tmp_path):
    (tmp_path / "data").mkdir()
    result = run("log", "events", "--node", "mr1", "-c", write_config(tmp_path, None))
    assert result.exit_code == 2 and "[records] url" in result.output


def test_export_moves_a_single_nodes_history_once(tmp_path, pg_url):
    single = Records(tmp_path / "data", "mr1.example.test")  # before the cluster: SQLite only
    accept(single, QID, subject="old mail")
    single.record(ev.Removed(), QID)
    single.history_status(QID, "bob@example.test", "Delivered")
    single.flush()
    single.close()
    cfg = write_config(tmp_path, pg_url)
    first = run("records", "export", "--since", "2000-01-01", "-c", cfg)
    assert first.exit_code == 0, first.output
    assert "1 history row(s)" in first.output
    again = run("records", "export", "--since", "30d", "-c", cfg)
    assert "0 event(s), 0 history row(s)" in again.output
    hist = pgquery.search_history(section(pg_url), node="mr1")
    assert [(h.subject, h.status) for h in hist] == [("old mail", "Delivered")]
    assert [e.kind for e in pgquery.search_events(section(pg_url)) if e.queue_id == QID] == ["removed"]


def test_export_never_copies_what_the_node_wrote_to_the_shared_records_itself(tmp_path, pg_url):
    single = Records(tmp_path / "data", "mr1.example.test")
    accept(single, QID, subject="before the cluster")
    single.flush()
    single.close()
    live = Records(tmp_path / "data", "mr1.example.test", shared=section(pg_url, node="mr1"))
    accept(live, QID[:-1] + "L", subject="shipped live")
    live.flush()
    assert live.shipper.flush()
    live.close()
    result = run("records", "export", "--since", "2000-01-01", "-c", write_config(tmp_path, pg_url))
    assert "1 history row(s)" in result.output, result.output
    assert sorted(h.subject for h in pgquery.search_history(section(pg_url))) == ["before the cluster", "shipped live"]


def test_retention_prunes_this_nodes_old_shared_rows_only(tmp_path, pg_url):
    import asyncio

    from kanmon.config import parse_config
    from kanmon.records.retention import Retention

    rows = {"events": [[100.0, QID, "removed", "removed", None, None]],
            "hist": [[100.0, "192.0.2.7", "a@x", "b@y", "s", "", 1, "NotSpam", "Accept", QID, "Queued", "", "", 1]],
            "status": [[100.0, QID, "b@y", "Delivered"]], "counts": []}
    new = {**rows, "events": [[10_000.0, QID, "removed", "fresh", None, None]], "hist": [], "status": []}
    with pg.connect(pg_url, autocommit=True) as conn:
        pg.migrate(conn)
        for node in ("mr1", "mr2"):
            pg.commit_batch(conn, node, "old", rows)
            pg.commit_batch(conn, node, "new", new)
    cfg = parse_config(f'[server]\ndata_dir = "{tmp_path}"\n[records]\nurl = "{pg_url}"\nnode = "mr1"\nkeep = "1h"\n')

    class Clock:
        def now(self) -> float:
            return 10_000.0 + 1800

    lines: list[str] = []
    asyncio.run(Retention(cfg, lambda text, *a, **k: lines.append(text), Clock()).run_once())
    assert any("pruned 1 event line(s) and 1 history row(s) of node mr1" in line for line in lines)
    with psycopg.connect(pg_url) as conn:
        assert sorted(conn.execute("SELECT node, text FROM events").fetchall()) == [
            ("mr1", "fresh"), ("mr2", "fresh"), ("mr2", "removed")]
        assert conn.execute("SELECT node FROM history").fetchall() == [("mr2",)]
        # batch keys go by when they were written (now here), not by their rows' times
        assert len(conn.execute("SELECT batch FROM records_batches").fetchall()) == 4


def test_shared_stats_count_a_tagged_recipient_as_accepted(pg_url):
    """As the local stats (test_history_slots): Tag rows' deferrals and recipients count,
    Quarantine's do not."""
    hist = [[100.0 + n, "192.0.2.7", "a@x", f"{d.lower()}@y.example", "s", "", 1, "NotSpam", d, f"Q{n}", "Queued", "",
             "", 1] for n, d in enumerate(("Accept", "Tag", "Quarantine"))]
    deferred = [[200.0, f"Q{n}", f"{d.lower()}@y.example", "Deferred (451 4.4.1 try later)"]
                for n, d in enumerate(("Accept", "Tag", "Quarantine"))]
    with pg.connect(pg_url, autocommit=True) as conn:
        pg.migrate(conn)
        pg.commit_batch(conn, "mr1", "rows", {"events": [], "hist": hist, "status": [], "counts": []})
        pg.commit_batch(conn, "mr1", "deferred", {"events": [], "hist": [], "status": deferred, "counts": []})
    report = pgquery.collect(section(pg_url), 0.0, 3600.0, by="hour")
    assert (report.totals.received, report.totals.deferred) == (3, 2)
    assert sorted(report.top_recipients) == [("accept@y.example", 1), ("tag@y.example", 1)]
    assert report.top_domains == [("y.example", 2)]


def test_retention_on_a_database_without_the_schema_says_to_create_it(tmp_path, pg_url):
    import asyncio

    from kanmon.config import parse_config
    from kanmon.records.retention import Retention

    cfg = parse_config(f'[server]\ndata_dir = "{tmp_path}"\n[records]\nurl = "{pg_url}"\nnode = "mr1"\nkeep = "1h"\n')

    class Clock:
        def now(self) -> float:
            return 10_000.0

    lines: list[str] = []
    asyncio.run(Retention(cfg, lambda text, *a, **k: lines.append(text), Clock()).run_once())
    assert [line for line in lines if "shared records" in line] == [
        "records: pruning the shared records failed: the database has no records schema yet "
        "(create it: kanmon records migrate, docs/cluster.md step 3)"]
