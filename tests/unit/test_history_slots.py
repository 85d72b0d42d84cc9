"""history_slots: the history's counts per quarter hour, kept by the records writer and by
retention, equal to a GROUP BY over the history rows; the stats' buckets read from it."""

from __future__ import annotations

import random
import sqlite3

import pytest

from kanmon.records.retention import prune
from kanmon.records.stats import _bucket_rows, bucket_query
from kanmon.records.store import SLOT, SLOT_SUMS, Records, open_db

T0 = 1_700_000_000.0  # a fixed time: nothing here depends on the date


def _hist(records: Records, ts: float, qid: str, rcpt: str, *, first: int = 1, size: int = 1000,
          disposition: str = "Accept", status: str = "Queued") -> None:
    """A history row at a chosen time, as history_accept/history_reject queue it."""
    records._put(("hist", ts, "192.0.2.1", "a@example.test", rcpt, "s", "<m>", size, "NotSpam", disposition,
                  qid, status, "", "helo", first))


def _slots(db: sqlite3.Connection) -> list[tuple]:
    return db.execute("SELECT * FROM history_slots WHERE received OR bytes OR delivered OR deferred OR bounced"
                      " OR rejected ORDER BY slot").fetchall()


def _group_by(db: sqlite3.Connection) -> list[tuple]:
    rows = db.execute(f"SELECT CAST(ts / {SLOT} AS INTEGER) AS s, {SLOT_SUMS} FROM history GROUP BY s ORDER BY s")
    return [r for r in rows if any(r[1:])]


def _fill(records: Records, rng: random.Random, n: int, span: float) -> list[tuple[str, str]]:
    accepted = []
    for i in range(n):
        ts = T0 + rng.uniform(0, span)
        if i % 7 == 0:
            _hist(records, ts, "", f"r{i}@example.test", first=0, disposition="Reject", status="550 5.1.1 unknown")
        else:
            qid = f"Q{i:08d}"
            for k in range(rng.choice((1, 1, 2, 3))):
                _hist(records, ts, qid, f"r{i}.{k}@example.test", first=1 if k == 0 else 0, size=rng.randrange(100, 9000))
                accepted.append((qid, f"r{i}.{k}@example.test"))
    return accepted


def test_slots_equal_the_group_by_after_inserts_status_updates_and_prune(tmp_path):
    rng = random.Random(5)
    records = Records(tmp_path, "mx1.example.test", log_file=False)
    try:
        accepted = _fill(records, rng, 300, 6 * 3600)
        records.flush()  # several batches: the slots add up across them
        accepted += _fill(records, rng, 200, 6 * 3600)
        records.flush()
        for qid, rcpt in accepted:
            for status in rng.choice([["Deferred (451 try later)", "Deferred (451 again)", "Delivered"],
                                      ["Delivered"], ["Deferred (451 x)", "Bounced (550 5.1.1 unknown)"],
                                      ["Bounced: returned"], []]):
                records.history_status(qid, rcpt, status)
        records.history_status("NOSUCH", "x@example.test", "Delivered")  # no row: counts nothing
        records.flush()
    finally:
        records._pending.clear()  # the status without a row would be retried
        records.close()
    db = open_db(tmp_path / "records.sqlite")
    try:
        expected = _group_by(db)
        assert len(expected) > 20
        assert sum(r[3] for r in expected) > 0 and sum(r[4] for r in expected) > 0 and sum(r[5] for r in expected) > 0
        assert _slots(db) == expected
        cutoff = T0 + 2 * 3600 + 123.4  # inside a slot: the slot keeps what is left of it
        _events, deleted = prune(tmp_path / "records.sqlite", cutoff, batch=50)
        assert deleted > 0
        assert _slots(db) == _group_by(db)
        assert db.execute("SELECT min(slot) FROM history_slots").fetchone()[0] == int(cutoff / SLOT)
    finally:
        db.close()


def test_an_existing_database_is_counted_into_the_slots_once(tmp_path):
    path = tmp_path / "records.sqlite"
    records = Records(tmp_path, "mx1.example.test", log_file=False)
    _fill(records, random.Random(2), 100, 3 * 3600)
    records.close()
    db = sqlite3.connect(path)
    db.execute("DROP TABLE history_slots")  # as a database of the version before it
    db.commit()
    db.close()
    db = open_db(path)
    try:
        assert _slots(db) == _group_by(db) != []
        db2 = open_db(path)  # opened again: not counted twice
        db2.close()
        assert _slots(db) == _group_by(db)
    finally:
        db.close()


@pytest.mark.parametrize("off", [0, 9 * 3600, 5 * 3600 + 1800, -(3 * 3600 + 1800), 5 * 3600 + 2700])
@pytest.mark.parametrize("size", [3600, 86400])
def test_the_buckets_from_the_slots_equal_the_buckets_from_the_rows(tmp_path, off, size):
    rng = random.Random(off + size)
    records = Records(tmp_path, "mx1.example.test", log_file=False)
    try:
        for qid, rcpt in _fill(records, rng, 400, 3 * 86400):
            if rng.random() < 0.5:
                records.history_status(qid, rcpt, rng.choice(["Delivered", "Deferred (451)", "Bounced (550)"]))
        records.flush()
    finally:
        records.close()
    db = open_db(tmp_path / "records.sqlite")
    try:
        for since, until in [(T0 + 1234.5, T0 + 2 * 86400 + 77.25), (T0 - 86400, T0 + 4 * 86400),
                             (T0 + 100, T0 + 700), (T0 + 3600 * 5, T0 + 3600 * 30)]:
            expected = _bucket_rows(db, "ts >= ? AND ts < ?", (since, until), off, size)
            assert bucket_query(db, since, until, size, off) == [r for r in expected if any(r[1:])]
    finally:
        db.close()


def test_an_offset_of_no_whole_quarter_hours_counts_the_rows(tmp_path):
    records = Records(tmp_path, "mx1.example.test", log_file=False)
    _fill(records, random.Random(1), 50, 86400)
    records.close()
    db = open_db(tmp_path / "records.sqlite")
    try:
        db.execute("UPDATE history_slots SET received = received + 1000")  # would show if read
        rows = bucket_query(db, T0, T0 + 86400, 3600, 1234)
        assert rows == _bucket_rows(db, "ts >= ? AND ts < ?", (T0, T0 + 86400), 1234, 3600)
        assert bucket_query(db, T0, T0 + 86400, 3600, 0) != _bucket_rows(db, "ts >= ? AND ts < ?", (T0, T0 + 86400), 0, 3600)
    finally:
        db.close()


@pytest.mark.parametrize("span", ["whole", "part"])  # a scan of the table; the period through the ts index
def test_the_top_lists_equal_their_group_bys(tmp_path, span):
    from kanmon.records.stats import collect

    rng = random.Random(3)
    records = Records(tmp_path, "mx1.example.test", log_file=False)
    names = ["Bob@Example.TEST", "bob@example.test", "Ärger@Bücher.example", "ärger@bücher.example", "no-at-sign",
             "x@a.example", "y@a.example", "z@B.example", "w@b.example", "q@c@d.example"]
    for i in range(600):
        ts = T0 + rng.uniform(0, 10 * 86400)
        rcpt = rng.choice(names)
        records._put(("hist", ts, "192.0.2.1", rng.choice(names[:6]), rcpt, "s", "<m>", 10, "NotSpam",
                      rng.choice(["Accept", "Accept", "Reject"]), f"Q{i:06d}", "Queued", "", "h", int(rng.random() < 0.7)))
    records.close()
    since, until = (T0 - 1, T0 + 11 * 86400) if span == "whole" else (T0 + 86400, T0 + 2 * 86400 + 5)
    report = collect(tmp_path, since, until, by="hour", top=4)
    db = open_db(tmp_path / "records.sqlite")
    try:
        where = "FROM history WHERE ts >= ? AND ts < ?"
        rcpts = db.execute(f"SELECT lower(rcpt) AS r, COUNT(*) AS c {where} AND disposition = 'Accept'"
                           " GROUP BY r ORDER BY c DESC, r LIMIT 4", (since, until)).fetchall()
        domains = db.execute("SELECT lower(substr(rcpt, instr(rcpt, '@') + 1)) AS d, COUNT(*) AS c"
                             f" {where} AND disposition = 'Accept' GROUP BY d ORDER BY c DESC, d LIMIT 4",
                             (since, until)).fetchall()
        senders = db.execute(f"SELECT mail_from, COUNT(*) AS c {where} AND first = 1 GROUP BY mail_from"
                             " ORDER BY c DESC, mail_from LIMIT 4", (since, until)).fetchall()
    finally:
        db.close()
    assert report.top_recipients == rcpts and len(rcpts) == 4
    assert report.top_domains == domains and len(domains) == 4
    assert report.top_senders == senders


def test_a_tagged_recipient_counts_as_accepted_in_the_columns_and_the_top_lists(tmp_path):
    """Tag (accepted with a Subject prefix: a spam tag, SPF's or DMARC's tag) is mail
    delivered as Accept is: its deferrals and its recipients count; Quarantine and Discard
    (never queued for delivery) do not."""
    from kanmon.records.stats import collect

    records = Records(tmp_path, "mx1.example.test", log_file=False)
    try:
        for n, disposition in enumerate(("Accept", "Tag", "Quarantine", "Discard")):
            _hist(records, T0 + n, f"Q{n}", f"{disposition.lower()}@example.test", disposition=disposition)
        records.flush()
        for n, disposition in enumerate(("Accept", "Tag", "Quarantine", "Discard")):
            records.history_status(f"Q{n}", f"{disposition.lower()}@example.test", "Deferred (451 4.4.1 try later)")
        records.flush()
        records.history_status("Q1", "tag@example.test", "Delivered")
        records.flush()
    finally:
        records.close()
    report = collect(tmp_path, T0 - 1, T0 + 3600, by="hour")
    assert (report.totals.received, report.totals.deferred, report.totals.delivered) == (4, 2, 1)
    assert sorted(report.top_recipients) == [("accept@example.test", 1), ("tag@example.test", 1)]
    assert report.top_domains == [("example.test", 2)]
    db = open_db(tmp_path / "records.sqlite")
    try:
        assert _slots(db) == _group_by(db)
    finally:
        db.close()


def test_an_older_database_counts_its_tagged_rows_again_once(tmp_path):
    """A database of the version that counted only Accept rows as deferred (its trigger
    and its slots) gets the current trigger and its slots counted again at open, once."""
    from kanmon.records.store import SLOTS_STATUS_TRIGGER, TAGGED_VERSION

    path = tmp_path / "records.sqlite"
    records = Records(tmp_path, "mx1.example.test", log_file=False)
    try:
        for n in range(6):
            _hist(records, T0 + n, f"Q{n}", f"r{n}@example.test", disposition="Tag" if n % 2 else "Accept")
        records.flush()
        for n in range(6):
            records.history_status(f"Q{n}", f"r{n}@example.test", "Deferred (451 4.4.1 try later)")
        records.flush()
    finally:
        records.close()
    db = sqlite3.connect(path)
    old_trigger = SLOTS_STATUS_TRIGGER.replace("disposition IN ('Accept', 'Tag')", "disposition = 'Accept'")
    assert old_trigger != SLOTS_STATUS_TRIGGER
    with db:
        db.execute("DROP TRIGGER history_slots_status")
        db.execute(old_trigger)
        db.execute("UPDATE history_slots SET deferred = 3")  # what that version counted: the Accept rows
        db.execute("PRAGMA user_version = 1")
    db.close()
    db = open_db(path)
    try:
        assert db.execute("PRAGMA user_version").fetchone()[0] == TAGGED_VERSION
        assert db.execute("SELECT sum(deferred) FROM history_slots").fetchone()[0] == 6
        assert _slots(db) == _group_by(db)
        db.execute("UPDATE history SET status = 'Delivered', deferrals = 0 WHERE queue_id = 'Q1'")  # the new trigger
        assert db.execute("SELECT sum(deferred) FROM history_slots").fetchone()[0] == 5
        db.execute("UPDATE history_slots SET received = received + 7")  # opened again: not counted again
        open_db(path).close()
        assert db.execute("SELECT sum(received) FROM history_slots").fetchone()[0] == 6 + 7
    finally:
        db.close()
