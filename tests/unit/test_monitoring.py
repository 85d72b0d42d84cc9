"""Monitoring units: counters written with the events, schema migration of an old records
database, stats arithmetic, retention, alert fallback and rate limit, queue id ages."""

from __future__ import annotations

import asyncio
import io
import sqlite3
import time

import pytest

from kanmon.alerts import RATIO_WINDOW, Alerts
from kanmon.clock import ManualClock
from kanmon.config import parse_config
from kanmon.metrics import DeliveryMetrics, Metrics, queue_id_time
from kanmon.model import ClientInfo, Envelope, Reply, new_queue_id
from kanmon.records.counters import reason_class
from kanmon.records.events import Connected, Delivery
from kanmon.records.query import search_history
from kanmon.records.retention import Retention, prune
from kanmon.records.stats import collect
from kanmon.records.store import Records, open_db
from kanmon.spool.store import Spool
from tests.integration.test_trace_metrics import parse_metrics

OLD_SCHEMA = """
CREATE TABLE events (id INTEGER PRIMARY KEY, ts REAL NOT NULL, queue_id TEXT, kind TEXT NOT NULL, text TEXT NOT NULL);
CREATE TABLE history (id INTEGER PRIMARY KEY, ts REAL NOT NULL, client_ip TEXT, mail_from TEXT, rcpt TEXT,
    subject TEXT, message_id TEXT, size INTEGER, classification TEXT, disposition TEXT, queue_id TEXT,
    status TEXT, auth_user TEXT, updated REAL);
"""


def test_reason_class():
    assert reason_class("5.7.1") == "policy" and reason_class("4.4.1") == "network"
    assert reason_class("") == "other" and reason_class("x") == "other"


def test_an_old_records_database_is_migrated_and_keeps_working(tmp_path):
    db = sqlite3.connect(tmp_path / "records.sqlite")
    db.executescript(OLD_SCHEMA)
    now = time.time()
    rows = [
        (now, "127.0.0.1", "a@b.test", "x@example.test", "s", "<m@x>", 100, "NotSpam", "Accept", "Q1", "Delivered", ""),
        (now, "127.0.0.1", "a@b.test", "y@example.test", "s", "<m@x>", 100, "NotSpam", "Accept", "Q1", "Delivered", ""),
        (now, "127.0.0.1", "c@b.test", "z@example.test", "", "", 0, "NotSpam", "Reject", "", "550 5.1.1 no", ""),
    ]
    db.executemany("INSERT INTO history(ts, client_ip, mail_from, rcpt, subject, message_id, size, classification,"
                   " disposition, queue_id, status, auth_user) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", rows)
    db.execute("INSERT INTO events(ts, queue_id, kind, text) VALUES (?, 'Q1', 'info', 'removed')", (now,))
    db.commit()
    db.close()
    records = Records(tmp_path, "mx1.example.test", log_file=False)  # the writer migrates at open
    records.record(Connected("unknown", "127.0.0.1"), session="1.1")
    records.flush()
    records.close()
    db = open_db(tmp_path / "records.sqlite", readonly=True)
    assert [r[0] for r in db.execute("SELECT first FROM history ORDER BY id")] == [1, 0, 0]
    assert db.execute("SELECT session FROM events ORDER BY id DESC LIMIT 1").fetchone() == ("1.1",)
    assert db.execute("SELECT value FROM counters WHERE name = 'connections'").fetchone() == (1,)
    db.close()
    assert len(search_history(tmp_path)) == 3
    s = collect(tmp_path, now - 3600, by="hour")
    assert (s.totals.received, s.totals.bytes, s.totals.delivered, s.totals.rejected) == (1, 100, 2, 1)


def test_stats_count_messages_once_and_deferrals_per_recipient(tmp_path):
    records = Records(tmp_path, "mx1.example.test", log_file=False)
    env = Envelope("a@b.test", ["x@example.test", "y@other.test"], client=ClientInfo("127.0.0.1", helo="c.test"))
    records.history_accept("Q1", env, 500, b"Subject: hi\r\nMessage-ID: <1@b>\r\n\r\nbody\r\n")
    records.history_accept("Q2", Envelope("a@b.test", ["x@example.test"], client=ClientInfo("127.0.0.1")), 300, b"\r\n")
    records.history_reject(Envelope("e@f.test"), "nobody@example.test", Reply(550, "5.1.1", "no"), "127.0.0.1")
    records.flush()
    records.history_status("Q1", "y@other.test", "Deferred: 451 later")
    records.flush()
    records.history_status("Q1", "y@other.test", "Delivered")
    records.history_status("Q1", "x@example.test", "Bounced: 550 no")
    records.history_status("Q2", "x@example.test", "Delivered")
    records.flush()
    records.close()
    s = collect(tmp_path, time.time() - 86400)
    t = s.totals
    assert (t.received, t.bytes, t.delivered, t.deferred, t.bounced, t.rejected) == (2, 800, 2, 1, 1, 1)
    assert s.top_senders == [("a@b.test", 2)]
    assert s.top_recipients == [("x@example.test", 2), ("y@other.test", 1)]
    assert s.top_domains == [("example.test", 2), ("other.test", 1)]
    assert len(s.buckets) == 1 and s.buckets[0].start <= time.time()
    # top=0: the buckets alone (the dashboard's charts), the same counts, no top lists
    b = collect(tmp_path, time.time() - 86400, top=0)
    assert (b.totals.received, b.totals.delivered, b.totals.bounced) == (2, 2, 1) and b.buckets == s.buckets
    assert b.top_senders == b.top_recipients == b.top_domains == b.rejected_by_check == []
    with pytest.raises(ValueError):
        collect(tmp_path, 0, by="week")


def test_pruning_deletes_only_old_rows(tmp_path):
    db = open_db(tmp_path / "records.sqlite")
    now = time.time()
    with db:
        db.executemany("INSERT INTO events(ts, kind, text) VALUES (?, 'info', ?)",
                       [(now - 100 * 86400, f"old {n}") for n in range(12)] + [(now, "new")])
        db.executemany("INSERT INTO history(ts, rcpt, disposition) VALUES (?, ?, 'Accept')",
                       [(now - 100 * 86400, "old@x"), (now, "new@x")])
    db.close()
    assert prune(tmp_path / "records.sqlite", now - 90 * 86400, batch=5) == (12, 1)
    db = open_db(tmp_path / "records.sqlite", readonly=True)
    assert [r[0] for r in db.execute("SELECT text FROM events")] == ["new"]
    db.close()
    cfg = parse_config(f'[server]\ndata_dir = "{tmp_path}"\n[records]\nkeep = "1d"\n')
    lines: list[str] = []
    clock = ManualClock(now + 2 * 86400)
    assert asyncio.run(Retention(cfg, lambda text, *a, **k: lines.append(text), clock).run_once()) == (1, 1)
    assert lines and lines[0].startswith("records: pruned 1 event line(s) and 1 history row(s)")
    keep_all = parse_config(f'[server]\ndata_dir = "{tmp_path}"\n[records]\nkeep = "0"\n')
    assert asyncio.run(Retention(keep_all, print, clock).run_once()) == (0, 0)


class FakeRecords:
    def __init__(self):
        self.lines: list[tuple[str, str | None, str]] = []

    def emit(self, text, queue_id=None, kind="info", **kw):
        self.lines.append((text, queue_id, kind))

    def record(self, event, queue_id=None, **kw):
        self.lines.append((event.line(), queue_id, event.KIND))

    def history_accept(self, *a):
        pass


class FakeQueue:
    def __init__(self):
        self.submitted: list[str] = []

    def submit_nowait(self, qid, env, content):
        self.submitted.append(qid)


def make_alerts(tmp_path, to='["admin@admin.example"]', spool=None):
    cfg = parse_config(f'[server]\ndata_dir = "{tmp_path}"\n[alerts]\nto = {to}\nmin_interval = "1h"\n')
    err = io.StringIO()
    records, queue = FakeRecords(), FakeQueue()
    clock = ManualClock(1_000_000.0)
    alerts = Alerts(cfg, records, spool or Spool(tmp_path, fsync=False), queue, clock, stderr=err)
    return alerts, records, queue, clock, err


def test_alert_without_recipients_or_spool_goes_to_log_and_stderr(tmp_path):
    alerts, records, queue, _, err = make_alerts(tmp_path, to="[]")
    assert asyncio.run(alerts.send("disk", "d", "[kanmon] disk: low", "What happened: low")) is None
    assert "kanmon: ALERT: [kanmon] disk: low" in err.getvalue()
    assert any(t.startswith("alert not mailed (no [alerts] to)") for t, _, _ in records.lines)

    class BrokenSpool:
        async def store(self, *a):
            raise OSError("disk full")

    alerts, records, queue, _, err = make_alerts(tmp_path, spool=BrokenSpool())
    assert asyncio.run(alerts.send("disk", "d", "[kanmon] disk: low", "body")) is None
    assert "queue refused it: disk full" in records.lines[-1][0] and queue.submitted == []


def test_alert_goes_through_the_spool_and_the_queue(tmp_path):
    spool = Spool(tmp_path, fsync=False)
    alerts, records, queue, _, _ = make_alerts(tmp_path, spool=spool)
    qid = asyncio.run(alerts.send("queue", "size", "[kanmon mx1] queue: 5 messages", "What happened: 5"))
    assert queue.submitted == [qid]
    entry = spool.load(qid)
    assert entry.envelope.rcpts == ["admin@admin.example"] and entry.envelope.is_notice
    assert entry.envelope.mail_from == ""  # from <>, as DSNs; [alerts] from is the From: header
    content = spool.read_content(qid)
    assert b"<kanmon@mx1.example.test>" in content.split(b"\r\n\r\n", 1)[0]
    assert b"Subject: [kanmon mx1] queue: 5 messages\r\n" in content and b"Auto-Submitted: auto-generated" in content
    spool.close()


def test_rate_limit_per_alert_on_the_clock(tmp_path):
    alerts, records, _, clock, _ = make_alerts(tmp_path)
    assert alerts.raise_alert("queue", "size", "5 messages") is True
    assert alerts.raise_alert("queue", "size", "6 messages") is False  # same alert within 1h
    assert alerts.raise_alert("queue", "oldest", "old") is True  # another key
    clock.advance(3599)
    assert alerts.raise_alert("queue", "size", "7 messages") is False
    clock.advance(1)
    assert alerts.raise_alert("queue", "size", "8 messages") is True
    st = alerts.states[("queue", "size")]
    assert st.since == 1_000_000.0 and st.text == "8 messages"
    alerts.clear("queue", "size", "ok")
    assert not st.active and alerts.raise_alert("queue", "size", "9 messages") is False  # still within the interval
    assert alerts.states[("queue", "size")].since == clock.now()  # a new episode


def test_queue_id_time_and_empty_metrics_are_well_formed(tmp_path):
    at = 1_700_000_000.25
    assert queue_id_time(new_queue_id(at)) == pytest.approx(at, abs=1e-6)
    assert queue_id_time("short") is None and queue_id_time("aaaaaaaaaaaaaaa") is None
    spool = Spool(tmp_path, fsync=False)
    m = parse_metrics(Metrics(tmp_path, spool, DeliveryMetrics()).render())
    assert m['kanmon_queue_messages{state="new"}'] == 0 and m["kanmon_smtp_open_connections"] == 0
    spool.close()


def test_deferred_ratio_over_the_last_hour(tmp_path):
    records = Records(tmp_path, "mx1.example.test", log_file=False)
    alerts, fake, _, clock, _ = make_alerts(tmp_path)
    clock.advance(time.time() - clock.now())  # the records' timestamps are wall time
    for n in range(9):
        records.record(Delivery(f"r{n}@x.test", "Deferred", "esmtp", "4.4.1", "refused", delay=1), "Q")
    records.record(Delivery("ok@x.test", "Sent", "esmtp", "2.0.0", "250 ok", delay=1), "Q")
    records.flush()
    alerts._check_ratio()
    st = alerts.states[("delivery", "deferred ratio")]
    assert st.active and st.text.startswith("9 of 10 delivery results in the last hour were deferred (90%")
    clock.advance(RATIO_WINDOW + 1)  # an hour later the window is empty: cleared
    alerts._check_ratio()
    assert not st.active
    records.close()


def test_failover_and_recovery_mails_are_rate_limited_when_a_server_flaps(tmp_path):
    alerts, records, _, clock, _ = make_alerts(tmp_path)
    mails: list[str] = []
    alerts._enqueue = lambda category, key, subject, body, force: mails.append(subject)
    dest = "127.0.0.7:25, 127.0.0.17:25"
    for _ in range(3):  # down, up, down, up, ... within one interval
        alerts.on_server_used(dest, "[127.0.0.17]:25", [("[127.0.0.7]:25", "Connection refused by 127.0.0.7")])
        alerts.on_server_used(dest, "[127.0.0.7]:25", [])
        clock.advance(60)
    assert len(mails) == 2 and "relay failover" in mails[0] and "resolved: relay recovered" in mails[1]
    alerts.on_server_used(dest, "[127.0.0.7]:25", [])  # no failover outstanding: nothing to say
    assert len(mails) == 2
    clock.advance(3600)
    alerts.on_server_used(dest, "[127.0.0.17]:25", [("[127.0.0.7]:25", "refused")])
    assert len(mails) == 3


def test_alert_mail_text_cannot_inject_headers_and_is_encoded(tmp_path):
    spool = Spool(tmp_path, fsync=False)
    alerts, _, queue, _, _ = make_alerts(tmp_path, spool=spool)
    subject = "[kanmon] critical: error in Zürich\r\nBcc: victim@example.test"
    qid = asyncio.run(alerts.send("critical", "k", subject, "What happened: ünïcode\n" + "x" * 2000 + "\n"))
    import email as email_lib

    msg = email_lib.message_from_bytes(spool.read_content(qid))
    assert msg["Bcc"] is None and "Zürich" in str(email_lib.header.make_header(email_lib.header.decode_header(msg["Subject"])))
    assert "ünïcode" in msg.get_payload(decode=True).decode()
    assert all(len(line) <= 998 for line in spool.read_content(qid).split(b"\r\n"))
    spool.close()


def test_metric_label_values_are_escaped(tmp_path):
    db = open_db(tmp_path / "records.sqlite")
    with db:
        db.execute("INSERT INTO counters VALUES (1, ?, 2)", ('rejected|stage=a"b\\c|class=x',))
    db.close()
    spool = Spool(tmp_path, fsync=False)
    text = Metrics(tmp_path, spool, DeliveryMetrics()).render()
    assert 'kanmon_messages_rejected_total{class="x",stage="a\\"b\\\\c"} 2' in text.splitlines()
    spool.close()


def test_trace_of_the_second_message_of_a_session_shows_only_its_own_transaction(tmp_path):
    from kanmon.records.trace import trace

    from kanmon.records import events as ev

    records = Records(tmp_path, "mx1.example.test", log_file=False)
    s = "1f.7"
    records.record(ev.Connected("unknown", "127.0.0.1"), session=s)
    records.record(ev.TlsStarted("unknown", "127.0.0.1", "TLSv1.3", "X", 256), session=s)
    records.record(ev.Refused("RCPT", "unknown", "127.0.0.1", "550 5.1.1 no", "5.1.1", "a@b.test", "x@example.test",
                              "ESMTPS", "c"), session=s)
    records.record(ev.Accepted("a@b.test", 10, 1, "ESMTPS", "unknown [127.0.0.1]", "<one@b>"), "0000000000001BC", session=s)
    records.record(ev.Refused("RCPT", "unknown", "127.0.0.1", "550 5.1.1 no", "5.1.1", "a@b.test", "y@example.test",
                              "ESMTPS", "c"), session=s)
    records.record(ev.Accepted("a@b.test", 20, 1, "ESMTPS", "unknown [127.0.0.1]", "<two@b>"), "0000000000002BC", session=s)
    records.record(ev.Delivery("z@example.test", "Sent", "esmtp", "2.0.0", "250 ok", "[192.0.2.1]:25", delay=0, xdelay=0,
                               tls="TLSv1.3 X verify=OK"), "0000000000002BC")
    records.record(ev.Removed(), "0000000000002BC")
    records.flush()
    records.close()
    (t,) = trace(tmp_path, "0000000000002BC")
    assert [x.step for x in t.steps] == ["session", "tls", "reject", "accepted", "attempt", "removed"]
    assert "to=<y@example.test>" in t.steps[2].text  # not the first transaction's reject of x@
    assert t.steps[4].detail["tls"] == "TLSv1.3 X verify=OK"
    assert t.message_id == "<two@b>" and t.size == 20 and t.final == "delivered to z@example.test"
    (first,) = trace(tmp_path, "0000000000001BC")
    assert [x.step for x in first.steps] == ["session", "tls", "reject", "accepted"]
    assert first.final == "in the queue, not tried yet"


def test_alert_subject_is_the_first_line_cut_short_and_the_details_stay_in_the_body(tmp_path):
    alerts, _, _, _, _ = make_alerts(tmp_path)
    mails: list[tuple[str, str]] = []
    alerts._enqueue = lambda category, key, subject, body, force: mails.append((subject, body))
    long_line = "relay failover: " + " ".join(["server.example.test"] * 20)
    alerts.raise_alert("delivery", "k", long_line + "\nFailed: /a/very/long/path/" + "d" * 200)
    (subject, body), = mails
    assert subject.startswith("[kanmon mx1.example.test] delivery: relay failover: server.example.test")
    assert subject.endswith("...") and len(subject) <= len("[kanmon mx1.example.test] delivery: ") + 100
    assert "/a/very/long/path" not in subject and "/a/very/long/path/" + "d" * 200 in body and long_line in body


def test_refusals_by_check_in_metrics_and_stats(tmp_path):
    from kanmon.records.events import CheckFailed, ConnectRefused, Refused

    records = Records(tmp_path, "mx1.example.test", log_file=False)
    for _ in range(2):
        records.record(Refused("RCPT", "unknown", "192.0.2.9", "550 5.1.1 <x@corp.example>: Recipient address rejected:"
                               " User unknown", "5.1.1", "a@b.test", "x@corp.example", "ESMTP", "h", check="verify",
                               history_rows=1))
    records.record(Refused("RCPT", "unknown", "192.0.2.9", "451 4.7.1 Greylisted", "4.7.1", "a@b.test", "y@corp.example",
                           "ESMTP", "h", check="greylist", history_rows=1))
    records.record(CheckFailed("dnsbl", "connect", "timed out", "451 4.3.0 try again"))
    records.record(ConnectRefused("192.0.2.9", "421 4.7.0 too many", "4.7.0", "rate", check="rate"))
    records.record(Refused("MAIL", "unknown", "192.0.2.9", "501 5.5.4 syntax", "5.5.4", None, "", "ESMTP", "h",
                           history_rows=0))
    # A message refused at DATA counts its recipients; a refusal of an older version (no
    # history_rows) one, as that version wrote one history row.
    records.record(Refused("DATA", "unknown", "192.0.2.9", "554 5.7.1 spam", "5.7.1", "a@b.test", "", "ESMTP", "h",
                           check="spam", history_rows=3))
    records.record(Refused("RCPT", "unknown", "192.0.2.9", "550 5.7.1 relay", "5.7.1", "a@b.test", "z@else.test",
                           "ESMTP", "h", check="relay"))
    records.flush()
    records.close()
    m = parse_metrics(Metrics(tmp_path, Spool(tmp_path / "spool"), DeliveryMetrics()).render())
    assert m['kanmon_checks_total{check="verify",result="reject"}'] == 2
    assert m['kanmon_checks_total{check="greylist",result="tempfail"}'] == 1
    assert m['kanmon_checks_total{check="dnsbl",result="error"}'] == 1
    assert m['kanmon_checks_total{check="rate",result="tempfail"}'] == 1
    s = collect(tmp_path, time.time() - 3600)
    assert s.rejected_by_check == [("spam", 3), ("verify", 2), ("greylist", 1), ("relay", 1)]
    assert s.connections_refused_by_check == [("rate", 1)]
    assert {"name": "verify", "count": 2} in s.as_dict()["rejected_by_check"]


def test_stats_of_a_short_period_read_once_answer_as_the_parallel_scans(tmp_path, monkeypatch):
    """A period the ts index serves is read once into a temporary table; the report is
    the same as the five aggregations over the table give (the path of longer periods)."""
    import json
    import random

    from kanmon.records import stats

    rng = random.Random(5)
    now = time.time()
    db = open_db(tmp_path / "records.sqlite")
    senders = ["a@b.test", "A@b.test", "", None, "c@d.test", "Ünï@e.test"]
    rcpts = ["x@example.test", "X@Example.TEST", "noat", "y@other.test", "z@ÄÖ.test", ""]
    statuses = ["Delivered", "Bounced: 550 no", "bounced: 550 no", "Deferred: 451 later", "Queued", None]
    with db:
        db.executemany(
            "INSERT INTO history(ts, mail_from, rcpt, size, disposition, queue_id, status, first, deferrals)"
            " VALUES (?,?,?,?,?,?,?,?,?)",
            [(now - rng.uniform(0, 10 * 86400), rng.choice(senders), rng.choice(rcpts), rng.choice([None, 0, 10, 999]),
              rng.choice(["Accept", "Accept", "Reject", "Discard"]), f"Q{i}", rng.choice(statuses), rng.randrange(2),
              rng.choice([0, 0, 1, 3])) for i in range(3000)])
        db.executemany("INSERT INTO events(ts, kind, text, detail) VALUES (?,?,?,?)",
                       [(now - rng.uniform(0, 10 * 86400), rng.choice(["reject", "reject-connect", "delivery"]), "line",
                         rng.choice([None, json.dumps({"check": rng.choice(["verify", "rate", ""]), "stage": "RCPT"})]))
                        for _ in range(500)])
    db.close()
    one_pass = []
    real_one_pass = stats._one_pass
    monkeypatch.setattr(stats, "_one_pass", lambda *a: one_pass.append(a) or real_one_pass(*a))
    for since, by in ((now - 86400, "hour"), (now - 2 * 86400, "day"), (now - 3 * 3600, "hour")):
        quick = collect(tmp_path, since, now, by=by, top=4)
        assert one_pass and one_pass.pop()  # the ts index's path: read once
        with monkeypatch.context() as m:
            m.setattr(stats, "_scan_hint", lambda *a: "NOT INDEXED")
            scanned = collect(tmp_path, since, now, by=by, top=4)
        assert not one_pass
        assert quick == scanned and quick.totals.received > 0 and quick.top_recipients and quick.rejected_by_check
    assert collect(tmp_path, now - 10 * 86400, now) is not None and not one_pass  # most of the table: scanned


def test_stats_count_the_whole_hours_once_and_again_when_rows_come_or_go(tmp_path, monkeypatch):
    """The last 24 hours asked again (the console): the whole hours are counted once and
    kept; an hour whose rows changed (a row added late, rows pruned) is counted again. The
    report stays what the SQL aggregations over the table give."""
    import random

    from kanmon.records import stats

    rng = random.Random(23)
    now = 1_800_000_000.0 + 1234.5  # not on an hour
    path = tmp_path / "records.sqlite"
    db = open_db(path)
    senders = ["a@b.test", "A@b.test", "", None, "c@d.test", "Ünï@e.test"]
    rcpts = ["x@example.test", "X@Example.TEST", "noat", "y@other.test", "z@ÄÖ.test", ""]
    with db:
        db.executemany("INSERT INTO history(ts, mail_from, rcpt, disposition, queue_id, first) VALUES (?,?,?,?,?,?)",
                       [(now - rng.uniform(0, 10 * 86400), rng.choice(senders), rng.choice(rcpts),
                         rng.choice(["Accept", "Accept", "Reject"]), f"Q{i}", rng.randrange(2)) for i in range(8000)])
    db.close()
    counted = []
    real_counted = stats._counted
    monkeypatch.setattr(stats, "_counted", lambda conn, a, b: counted.append((a, b)) or real_counted(conn, a, b))

    def both() -> tuple:
        quick = collect(tmp_path, now - 86400, now, by="hour", top=3)
        with monkeypatch.context() as m:
            m.setattr(stats, "_scan_hint", lambda *a: "NOT INDEXED")
            scanned = collect(tmp_path, now - 86400, now, by="hour", top=3)
        assert quick == scanned and quick.top_senders and quick.top_domains
        return quick

    both()
    assert len(counted) == 2 + 24 - 1  # the two ends and the 23 whole hours
    counted.clear()
    both()
    assert len(counted) == 2  # the ends only
    counted.clear()
    late = now - 10 * 3600
    db = open_db(path)
    with db:
        db.executemany("INSERT INTO history(ts, mail_from, rcpt, disposition, queue_id, first) VALUES (?,?,?,?,?,?)",
                       [(late, "late@x.test", f"r{i}@late.test", "Accept", f"L{i}", 1) for i in range(100)])
    db.close()
    report = both()
    assert len(counted) == 3 and ("late@x.test", 100) in report.top_senders and ("late.test", 100) in report.top_domains
    counted.clear()
    db = open_db(path)
    with db:
        db.execute("DELETE FROM history WHERE mail_from = 'late@x.test'")
        db.execute("DELETE FROM history WHERE id IN (SELECT id FROM history WHERE ts >= ? AND ts < ? LIMIT 5)",
                   (now - 5 * 3600, now - 2 * 3600))
    db.close()
    report = both()
    assert len(counted) >= 3 and ("late@x.test", 100) not in report.top_senders


def test_the_hours_kept_for_stats_are_bounded_by_the_addresses_they_hold(tmp_path, monkeypatch):
    """A relay of many distinct addresses: the hours kept hold at most CACHE_KEYS names in
    all; the others are counted again on each request, and the report stays right."""
    from kanmon.records import stats

    now = 1_800_000_000.0 + 1234.5
    path = tmp_path / "records.sqlite"
    db = open_db(path)
    with db:  # each of the last 24 hours: 10 rows of distinct senders, recipients and domains
        db.executemany("INSERT INTO history(ts, mail_from, rcpt, disposition, queue_id, first) VALUES (?,?,?,?,?,?)",
                       [(now - h * 3600 - 60 * i, f"s{h}.{i}@a.test", f"r@d{h}.{i}.test", "Accept", f"Q{h}.{i}", 1)
                        for h in range(24) for i in range(10)])
        db.executemany("INSERT INTO history(ts, mail_from, rcpt, disposition, queue_id, first) VALUES (?,?,?,?,?,?)",
                       [(now - 2 * 86400 - 60 * i, "old@a.test", "r@old.test", "Accept", f"O{i}", 1)
                        for i in range(5000)])  # older rows: the day is a small part (read once, not scanned)
    db.close()
    monkeypatch.setattr(stats, "CACHE_KEYS", 5 * 30)  # an hour holds 30 names (10 senders, recipients, domains)
    stats._hour_cache.clear()
    counted = []
    real_counted = stats._counted
    monkeypatch.setattr(stats, "_counted", lambda conn, a, b: counted.append((a, b)) or real_counted(conn, a, b))
    first = collect(tmp_path, now - 86400, now, by="hour", top=3)
    kept = [k for k in stats._hour_cache if k[0][0] == str(path)]
    assert 0 < len(kept) and sum(sum(map(len, stats._hour_cache[k][1])) for k in kept) <= stats.CACHE_KEYS
    counted.clear()
    assert collect(tmp_path, now - 86400, now, by="hour", top=3) == first
    assert len(counted) == 2 + 23 - len(kept)  # the ends and every hour not kept


def test_dns_check_and_balancer_lines_have_kinds_of_their_own_also_in_an_old_database(tmp_path):
    """The console's DNS and balancer pages find these lines by kind (the events(kind, ts)
    index); the lines an older version wrote as "info" get their kind once, at migration."""
    from kanmon.records.events import BALANCER_KIND, DNSCHECK_KIND
    from kanmon.records.query import search_events

    db = sqlite3.connect(tmp_path / "records.sqlite")
    db.executescript(OLD_SCHEMA)
    now = time.time()
    old = [("info", "dnscheck: example.test got worse (ok -> error): x"), ("info", "balancer mail: real server a down"),
           ("info", "balancer: stopped"), ("info", "listening on 127.0.0.1:25 (the balancer is elsewhere)"),
           ("audit", "audit: alice (admin) from 127.0.0.1 via console: balancer disabled mail a -> now disabled"),
           ("error", "dnscheck: not a note")]
    db.executemany("INSERT INTO events(ts, kind, text) VALUES (?,?,?)", [(now, k, t) for k, t in old])
    db.commit()
    db.close()
    records = Records(tmp_path, "mx1.example.test", log_file=False)  # migrates at open
    records.emit("dnscheck: example.test better (error -> ok): fine", kind=DNSCHECK_KIND)
    records.emit("dnscheck: a line written as info after the migration")
    records.flush()
    records.close()
    open_db(tmp_path / "records.sqlite").close()  # opened again: the relabelling is not done twice

    def texts(kinds, grep=None):
        return [e.text for e in search_events(tmp_path, since=now - 60, kinds=kinds, grep=grep)]

    assert texts((DNSCHECK_KIND,)) == ["dnscheck: example.test got worse (ok -> error): x",
                                       "dnscheck: example.test better (error -> ok): fine"]
    assert texts((BALANCER_KIND,)) == ["balancer mail: real server a down", "balancer: stopped"]
    assert texts(("info",)) == ["listening on 127.0.0.1:25 (the balancer is elsewhere)",
                                "dnscheck: a line written as info after the migration"]
    assert texts(("audit",), "balancer ") == [old[4][1]]
    assert texts(("error", "audit")) == [old[4][1], old[5][1]]
    # the kind changes no line: the log file, stdout and `kanmon log events` print the text
    assert [e.text for e in search_events(tmp_path, grep="dnscheck")][:2] == [old[0][1], old[5][1]]


def test_trace_final_says_deleted_returned_or_expired(tmp_path):
    """A message that left the queue by an administrator's delete, an administrator's
    bounce or its lifetime says so in `final:`, never "in the queue"."""
    from kanmon.records import events as ev
    from kanmon.records.trace import trace

    records = Records(tmp_path, "mx1.example.test", log_file=False)
    deferred = ev.Delivery("d@corp.example", ev.DEFERRED, "esmtp", "4.4.1", "Connection refused", delay=1, xdelay=1)
    for qid in ("0000000000001BC", "0000000000002BC", "0000000000003BC", "0000000000004BC"):
        records.record(ev.Accepted("a@b.test", 10, 1, "ESMTP", "unknown [127.0.0.1]", "<m@b>"), qid)
    records.record(deferred, "0000000000001BC")
    records.record(ev.AdminChanged("delete", "kanmon queue delete"), "0000000000001BC")
    records.record(ev.AdminChanged("delete", "maintenance stale"), "0000000000002BC")  # never tried
    records.record(deferred, "0000000000003BC")
    records.record(ev.Delivery("d@corp.example", ev.BOUNCED, "admin", "5.0.0",
                               "message returned to sender by the administrator", note="kanmon queue bounce"),
                   "0000000000003BC")
    records.record(ev.AdminChanged("bounce", "kanmon queue bounce"), "0000000000003BC")
    records.record(ev.Delivery("d@corp.example", ev.BOUNCED, "esmtp", "5.4.1", "Connection refused",
                               note="message expired in the queue"), "0000000000004BC")
    records.record(ev.Removed(), "0000000000004BC")
    records.flush()
    records.close()
    (t,) = trace(tmp_path, "0000000000001BC")
    assert t.final == ("deleted by administrator (kanmon queue delete), not delivered to d@corp.example"
                       " (last reply: Connection refused)")
    (t,) = trace(tmp_path, "0000000000002BC")
    assert t.final == "deleted by administrator (maintenance stale), not tried"
    (t,) = trace(tmp_path, "0000000000003BC")
    assert t.final == ("bounced for d@corp.example (message returned to sender by the administrator"
                       " (kanmon queue bounce))")
    (t,) = trace(tmp_path, "0000000000004BC")
    assert t.final == "bounced for d@corp.example (Connection refused (message expired in the queue))"


def test_a_retention_run_again_waits_out_its_day(tmp_path):
    """The alerts start again at every reload; the retention a reload keeps (its
    settings unchanged) does not prune again before its day is over."""
    cfg = parse_config(f'[server]\ndata_dir = "{tmp_path}"\n[records]\nkeep = "1d"\n')
    open_db(tmp_path / "records.sqlite").close()
    clock = ManualClock()
    runs: list[float] = []
    retention = Retention(cfg, print, clock)

    async def once() -> tuple[int, int]:
        runs.append(clock.now())
        return 0, 0

    retention.run_once = once

    async def scenario() -> None:
        task = asyncio.create_task(retention.run())
        for _ in range(5):
            await asyncio.sleep(0)
        assert len(runs) == 1
        task.cancel()
        again = asyncio.create_task(retention.run())  # the kept one, run again after a reload
        for _ in range(5):
            await asyncio.sleep(0)
        assert len(runs) == 1
        clock.advance(86400)
        for _ in range(5):
            await asyncio.sleep(0)
        assert len(runs) == 2
        again.cancel()

    asyncio.run(scenario())
    assert Retention(cfg, print, clock).settings() == retention.settings()
