"""Typed events: each type's line is the line kanmon wrote before events had types
(written out literally here), its fields round-trip through records.sqlite, counters
and trace read the fields."""

from __future__ import annotations

import json
import sqlite3
import time

import pytest

from kanmon.records import events as ev
from kanmon.records.counters import counts
from kanmon.records.query import search_events
from kanmon.records.store import Records, open_db

QID = "0000000000002BC"

LINES = [
    (ev.Connected("unknown", "127.0.0.1"), "connect from unknown[127.0.0.1]"),
    (ev.Disconnected("mail.example", "192.0.2.1"), "disconnect from mail.example[192.0.2.1]"),
    (ev.SessionCut("timeout", "DATA", "unknown", "::1"), "timeout after DATA from unknown[::1]"),
    (ev.Refused("RCPT", "unknown", "127.0.0.1", "550 5.1.1 <x@example.test>: Recipient address rejected: User unknown",
                "5.1.1", "a@b.test", "x@example.test", "ESMTP", "c", check="recipients"),
     "NOQUEUE: reject: RCPT from unknown[127.0.0.1]: 550 5.1.1 <x@example.test>: Recipient address rejected: "
     "User unknown; from=<a@b.test> to=<x@example.test> proto=ESMTP helo=<c> check=recipients"),
    (ev.Refused("MAIL", "unknown", "::1", "452 4.3.1 Insufficient system storage", "4.3.1", "a@b.test", "", "ESMTP", "c"),
     "NOQUEUE: reject: MAIL from unknown[::1]: 452 4.3.1 Insufficient system storage; from=<a@b.test> proto=ESMTP helo=<c>"),
    (ev.Refused("HELO", "unknown", "::1", "501 5.5.4 Syntax", "5.5.4", None, "", "SMTP", ""),
     "NOQUEUE: reject: HELO from unknown[::1]: 501 5.5.4 Syntax proto=SMTP helo=<>"),
    (ev.ConnectRefused("127.0.0.1", "421 4.7.0 mx1 Too many connections", "4.7.0", "limit"),
     "reject: connect from unknown[127.0.0.1]: 421 4.7.0 mx1 Too many connections (limit)"),
    (ev.ConnectRefused("127.0.0.1", "554 5.7.1 Service unavailable; client [127.0.0.1] blocked using zen.example",
                       "5.7.1", "dnsbl", check="dnsbl"),
     "reject: connect from unknown[127.0.0.1]: 554 5.7.1 Service unavailable; client [127.0.0.1] blocked using"
     " zen.example (dnsbl) check=dnsbl"),
    (ev.ProxyRefused("192.0.2.9"), "reject: PROXY header from untrusted 192.0.2.9"),
    (ev.ProxyRefused("192.0.2.9", "bad signature"), "reject: bad PROXY header from 192.0.2.9: bad signature"),
    (ev.EarlyTalker("unknown", "192.0.2.9", 6, "554 5.5.1 Protocol error"),
     "reject: early talker unknown[192.0.2.9] sent 6 bytes before the greeting: 554 5.5.1 Protocol error"),
    (ev.ProxyTimeout("192.0.2.9"), "timeout waiting for the PROXY header from 192.0.2.9"),
    (ev.TlsStarted("unknown", "127.0.0.1", "TLSv1.3", "TLS_AES_256_GCM_SHA384", 256),
     "STARTTLS=server, relay=unknown [127.0.0.1], version=TLSv1.3, verify=NO, cipher=TLS_AES_256_GCM_SHA384, bits=256/256"),
    (ev.TlsStarted("unknown", "127.0.0.1", error="EOF occurred"),
     "STARTTLS=server, relay=unknown [127.0.0.1], error: EOF occurred"),
    (ev.AuthSucceeded("pc1", "10.0.0.5", "PLAIN", "alice@example.test"),
     "pc1[10.0.0.5]: sasl_method=PLAIN, sasl_username=alice@example.test"),
    (ev.AuthFailed("pc1", "10.0.0.5", "LOGIN", "bob"),
     "warning: pc1[10.0.0.5]: SASL LOGIN authentication failed: authentication failure, sasl_username=bob"),
    (ev.AuthFailed("pc1", "10.0.0.5", "LOGIN", "bob", blocked="10.0.0.5"),
     "warning: pc1[10.0.0.5]: SASL LOGIN authentication failed: authentication failure, sasl_username=bob;"
     " blocked (10.0.0.5)"),
    (ev.AuthFailed("pc1", "10.0.0.5", "PLAIN", "bob", refused=True),
     "warning: pc1[10.0.0.5]: SASL PLAIN blocked for user=bob: too many failures"),
    (ev.Accepted("a@b.test", 120, 2, "ESMTPS", "unknown [127.0.0.1]", "<m@x>"),
     "from=<a@b.test>, size=120, nrcpts=2, msgid=<m@x>, proto=ESMTPS, relay=unknown [127.0.0.1]"),
    (ev.Accepted("a@b.test", 120, 1, "ESMTPSA", "pc1 [10.0.0.5]", "", auth="alice@example.test"),
     "from=<a@b.test>, size=120, nrcpts=1, proto=ESMTPSA, relay=pc1 [10.0.0.5], auth=alice@example.test"),
    (ev.Accepted("", 900, 1, "internal", "local"), "from=<>, size=900, nrcpts=1, proto=internal, relay=local"),
    (ev.Accepted("kanmon@mx1", 700, 1, "internal", "local", "<alert.1@mx1>"),
     "from=<kanmon@mx1>, size=700, nrcpts=1, msgid=<alert.1@mx1>, proto=internal, relay=local"),
    (ev.Accepted("a@b.test", 300, 2, "restore", held=True), "from=<a@b.test>, size=300, nrcpts=2, proto=restore, held"),
    (ev.Accepted("a@b.test", 300, 2, "restore"), "from=<a@b.test>, size=300, nrcpts=2, proto=restore"),
    (ev.Accepted("a@b.test", 300, 1, "ESMTP", "unknown [127.0.0.1]", "<m@x>", held=True),
     "from=<a@b.test>, size=300, nrcpts=1, msgid=<m@x>, proto=ESMTP, relay=unknown [127.0.0.1], held"),
    (ev.QuarantineHeld("virus: Eicar-Test-Signature"), "held for quarantine: virus: Eicar-Test-Signature"),
    (ev.Delivery("b@x.test", "Sent", "esmtp", "2.0.0", "250 2.0.0 ok", "[127.0.0.7]:25", delay=1, xdelay=1,
                 tls="TLSv1.3 X verify=OK"),
     "to=<b@x.test>, delay=00:00:01, xdelay=00:00:01, mailer=esmtp, relay=[127.0.0.7]:25, dsn=2.0.0, stat=Sent (250 2.0.0 ok)"),
    (ev.Delivery("b@x.test", "Sent", "local", "2.0.0", "250 2.0.0 ok", "local", "Alias@x.test", delay=90061, xdelay=0),
     "to=<b@x.test>, orig_to=<Alias@x.test>, delay=1+01:01:01, xdelay=00:00:00, mailer=local, dsn=2.0.0, stat=Sent"),
    (ev.Delivery("b@x.test", "Deferred", "esmtp", "4.4.1", "Connection refused", delay=1, xdelay=1),
     "to=<b@x.test>, delay=00:00:01, xdelay=00:00:01, mailer=esmtp, dsn=4.4.1, stat=Deferred: Connection refused"),
    (ev.Delivery("b@x.test", "Bounced", "esmtp", "5.4.7", "Connection refused", delay=5, xdelay=1,
                 note="message lifetime expired"),
     "to=<b@x.test>, delay=00:00:05, xdelay=00:00:01, mailer=esmtp, dsn=5.4.7, stat=Bounced: Connection refused "
     "(message lifetime expired)"),
    (ev.Delivery("b@x.test", "Bounced", "admin", "5.0.0", "Returned by the administrator", note="kanmon queue"),
     "to=<b@x.test>, mailer=admin, dsn=5.0.0, stat=Bounced: Returned by the administrator (kanmon queue)"),
    (ev.Delivery("b@x.test", "Sent", "drain", reply="250 ok", relay="[192.0.2.5]:25"),
     "to=<b@x.test>, relay=[192.0.2.5]:25, mailer=drain, stat=Sent (250 ok)"),
    (ev.Delivery("b@x.test", "Not drained", "drain", reply="451 4.3.0 busy", relay="new:25"),
     "to=<b@x.test>, relay=new:25, mailer=drain, stat=Not drained (451 4.3.0 busy)"),
    (ev.DomainFailed("x.test", "Host or domain name not found"), "domain x.test: Host or domain name not found"),
    (ev.HopUnresolved("gone.example", "Host or domain name not found", "; trying next server"),
     "relay=gone.example: Host or domain name not found; trying next server"),
    (ev.HopFailed("[192.0.2.1]:25", "Connection refused by 192.0.2.1", True),
     "relay=[192.0.2.1]:25, Connection refused by 192.0.2.1; trying next server"),
    (ev.HopFailed("[192.0.2.1]:25", "451 4.3.0 try later"), "relay=[192.0.2.1]:25, 451 4.3.0 try later"),
    (ev.TlsClient("mx.x.test", "TLSv1.3", "FAIL", "TLS_AES_256_GCM_SHA384", 256, 256),
     "STARTTLS=client, relay=mx.x.test, version=TLSv1.3, verify=FAIL, cipher=TLS_AES_256_GCM_SHA384, bits=256/256"),
    (ev.TlsClient("mx.x.test", note="STARTTLS refused: 454 4.7.0 no"),
     "STARTTLS=client, relay=mx.x.test, STARTTLS refused: 454 4.7.0 no"),
    (ev.NoticeQueued("delay", "0123456789BCDFG"), "sender delay notification: 0123456789BCDFG"),
    (ev.NoticeQueued("failure", "0123456789BCDFG"), "sender failure notification: 0123456789BCDFG"),
    (ev.NoticeSkipped("failed"), "no notice (failed) for a message from <> or a notice: dropped"),
    (ev.Removed(), "removed"),
    (ev.QuotaNotice("u@example.test", 1100, 1000, "0123456789BCDFG"),
     "over-quota notice for <u@example.test> (1100 of 1000 bytes): 0123456789BCDFG"),
    (ev.CheckFailed("dnsbl", "RCPT", "TimeoutError: ", "451 4.3.0 Local error"),
     "warning: check dnsbl failed at RCPT: TimeoutError: ; answered 451 4.3.0 Local error"),
    (ev.DnsblLookupFailed("192.0.2.9", "zen.example", "timed out"),
     "warning: dnsbl zen.example: lookup of [192.0.2.9] failed (timed out); counted as not listed"),
    (ev.ProbeFailed("OSError: [Errno 116] Stale file handle"), "check probe failed: OSError: [Errno 116] Stale file handle"),
    (ev.EffectFailed("QuotaNotice", "OSError: disk full"), "check effect QuotaNotice failed: OSError: disk full"),
    (ev.EffectUnhandled("'opened'"), "no handler for the check effect 'opened'"),
    (ev.AdminAction("hold", 2, "kanmon queue", "state=deferred", "A B"),
     "admin: hold 2 message(s) by `kanmon queue` matching state=deferred: A B"),
    (ev.AdminAction("delete", 0, "kanmon queue", "id=X", ""), "admin: delete 0 message(s) by `kanmon queue` matching id=X: none"),
    (ev.AdminChanged("bounce", "kanmon queue"), "returned to sender by administrator (`kanmon queue`)"),
    (ev.AdminChanged("hold", "console"), "held by administrator (`console`)"),
    (ev.Backup(3, "/tmp/q.tar", "kanmon queue backup"), "admin: backup of 3 message(s) to /tmp/q.tar by `kanmon queue backup`"),
    (ev.MaintenanceRun("stale"), "maintenance stale: scheduled run"),
    (ev.MaintenanceRun("stale", "delete", 3, 2, ["A", "B"]), "maintenance stale: delete matched 3, acted on 2: A B"),
    (ev.MaintenanceRun("stale", "delete", 0, 0, []), "maintenance stale: delete matched 0, acted on 0"),
    (ev.MaintenanceRun("stale", catch_up=True),
     "maintenance stale: catch-up run (a run was missed while the server was down)"),
    (ev.MaintenanceRun("stale", error="No space left on device"), "maintenance stale: failed: No space left on device"),
    (ev.Recovery(removed=2), "recovery: removed 2 unacknowledged incoming file(s)"),
    (ev.Recovery(5, 1), "recovery: 5 message(s) in the queue, 1 corrupt"),
    (ev.Reload("smtp"), "reload: new configuration in effect (changed: smtp)"),
    (ev.ReloadFailed("cannot listen on 127.0.0.1:9: in use"),
     "reload refused, the running configuration stays: cannot listen on 127.0.0.1:9: in use"),
    (ev.Stopped(), "stopped"),
    (ev.Alert("disk", "/data", "raised", 1.0, "free disk low\nmore"), "alert disk//data: free disk low"),
    (ev.Alert("dns", "x", "raised", 1.0, "worse", mailed=False), "alert dns/x (category not mailed): worse"),
    (ev.Alert("disk", "/data", "cleared", 1.0, "free disk low", "free disk space 9 GB"),
     "alert disk//data cleared: free disk space 9 GB"),
    (ev.AlertMailed("queue", "size", "[kanmon mx1] queue: 900 messages"),
     "alert mail (queue/size) queued: [kanmon mx1] queue: 900 messages"),
    (ev.AlertNotMailed("no [alerts] to", "[kanmon mx1] disk: low"), "alert not mailed (no [alerts] to): [kanmon mx1] disk: low"),
    (ev.AlertRequest("dns"), "test alert requested: dns"),
    (ev.Error("queue manager error: OSError: x; will retry"), "queue manager error: OSError: x; will retry"),
    (ev.Note("imap listening on 127.0.0.1:143"), "imap listening on 127.0.0.1:143"),
]


@pytest.mark.parametrize("event,line", LINES, ids=[type(e).__name__ for e, _ in LINES])
def test_each_event_makes_the_line_kanmon_always_wrote(event, line):
    assert event.line() == line
    assert str(event) == line


def test_a_suppressed_alert_says_when_it_was_last_mailed():
    sent = time.mktime((2026, 11, 30, 9, 5, 0, 0, 0, -1))
    e = ev.Alert("queue", "size", "suppressed", 1.0, "900 messages", last_sent=sent)
    assert e.line() == f"alert queue/size (already mailed {time.strftime('%Y-%m-%d %H:%M:%S %Z', time.localtime(sent))}): 900 messages"


def test_failures_of_probes_and_effects_are_alerted_like_errors():
    assert {"error", "critical", "check-failed", "probe-failed", "effect-failed", "effect-unhandled",
            "reload-failed"} == set(ev.ERROR_KINDS)
    assert ev.ReloadFailed.KIND in ev.ERROR_KINDS
    assert ev.ProxyTimeout.KIND not in ev.ERROR_KINDS and ev.QuarantineHeld.KIND not in ev.ERROR_KINDS


def test_every_kind_names_one_type():
    kinds = [cls.KIND for cls in ev.EVENT_TYPES.values() if cls is not ev.Note]
    assert len(kinds) == len(set(kinds))


@pytest.mark.parametrize("event,line", [x for x in LINES if not isinstance(x[0], ev.FREE_TEXT)],
                         ids=[type(e).__name__ for e, _ in LINES if not isinstance(e, ev.FREE_TEXT)])
def test_fields_round_trip_through_the_database(tmp_path, event, line):
    records = Records(tmp_path, "mx1.example.test", log_file=False)
    records.record(event, QID, session="1f.7")
    records.flush()
    records.close()
    (row,) = search_events(tmp_path)
    assert (row.kind, row.text, row.queue_id) == (event.KIND, line, QID)
    back = ev.event_from_row(row.kind, row.text, row.fields)
    assert type(back) is type(event) and back.line() == line
    assert json.loads(json.dumps(event.fields())) == row.fields


def test_free_text_lines_keep_their_kind_and_store_no_fields(tmp_path):
    records = Records(tmp_path, "mx1.example.test", log_file=False)
    records.emit("pop3 login a@x ip=1 tls=no")
    records.emit("records: pruning failed: x", kind="error")
    records.emit(ev.Removed(), QID)  # a typed event through emit (callables handed `emit`)
    records.flush()
    records.close()
    rows = search_events(tmp_path)
    assert [(r.kind, r.text, r.fields) for r in rows] == [
        ("info", "pop3 login a@x ip=1 tls=no", None), ("error", "records: pruning failed: x", None),
        ("removed", "removed", {})]
    assert rows[2].as_dict() == {"ts": rows[2].ts, "queue_id": QID, "kind": "removed", "text": "removed", "fields": {}}


def test_the_log_file_has_the_line(tmp_path):
    records = Records(tmp_path, "mx1.example.test")
    records.record(ev.Connected("unknown", "127.0.0.1"), session="1")
    records.record(ev.Removed(), QID)
    records.flush()
    records.close()
    lines = (tmp_path / "log" / "kanmon.log").read_text().splitlines()
    assert lines[0].endswith("]: connect from unknown[127.0.0.1]") and " mx1.example.test kanmon/smtpd[" in lines[0]
    assert lines[1].endswith(f"]: {QID}: removed")


def test_a_row_written_before_events_had_fields_comes_back_as_text():
    assert ev.event_from_row("info", "removed", None) == ev.Note("removed")
    assert ev.event_from_row("error", "boom", None) == ev.Error("boom")
    assert ev.event_from_row("delivery", "to=<x>", None) == ev.Note("to=<x>", "delivery")
    assert ev.event_from_row("delivery", "to=<x>", {"unknown": 1}) == ev.Note("to=<x>", "delivery")


# -- counters ----------------------------------------------------------------------------------


@pytest.mark.parametrize("event,expected", [
    (ev.Connected("unknown", "127.0.0.1"), [("connections", 1)]),
    (ev.Disconnected("unknown", "127.0.0.1"), [("disconnections", 1)]),
    # a refusal by a check counts for kanmon_checks_total too
    (LINES[3][0], [("rejected|stage=RCPT|class=address", 1), ("checks|check=recipients|result=reject", 1)]),
    (ev.Refused("RCPT", "unknown", "192.0.2.9", "451 4.7.1 Greylisted", "4.7.1", "a@b.test", "c@d.test", "ESMTP",
                "h", check="greylist"),
     [("rejected|stage=RCPT|class=policy", 1), ("checks|check=greylist|result=tempfail", 1)]),
    (ev.CheckFailed("dnsbl", "connect", "TimeoutError", "451 4.3.0 try again"), [("checks|check=dnsbl|result=error", 1)]),
    (ev.DnsblLookupFailed("192.0.2.9", "zen.example", "timed out"), [("checks|check=dnsbl|result=dnsfail", 1)]),
    (ev.ConnectRefused("192.0.2.9", "421 4.7.0 too many", "4.7.0", "rate", check="rate"),
     [("rejected|stage=CONNECT|class=policy", 1), ("checks|check=rate|result=tempfail", 1)]),
    (LINES[4][0], [("rejected|stage=MAIL|class=system", 1)]),
    (ev.ConnectRefused("127.0.0.1", "421 4.7.0 mx1 Too many connections", "4.7.0", "limit"),
     [("rejected|stage=CONNECT|class=policy", 1)]),
    (ev.ProxyRefused("192.0.2.9"), []),
    (ev.TlsStarted("unknown", "127.0.0.1", "TLSv1.3", "X", 256), [("tls_sessions_in", 1)]),
    (ev.TlsStarted("unknown", "127.0.0.1", error="EOF"), []),
    (ev.Accepted("a@b.test", 120, 2, "ESMTPS", "unknown [127.0.0.1]", "<m@x>"),
     [("received|source=smtp", 1), ("received_bytes|source=smtp", 120), ("received_tls", 1)]),
    (ev.Accepted("a@b.test", 120, 1, "UTF8SMTPSA", "pc [10.0.0.5]", "<m@x>"),  # RFC 6531 3.7.3: over TLS too
     [("received|source=smtp", 1), ("received_bytes|source=smtp", 120), ("received_tls", 1)]),
    (ev.Accepted("", 900, 1, "internal", "local"), [("received|source=internal", 1), ("received_bytes|source=internal", 900)]),
    (ev.Delivery("b@x.test", "Sent", "esmtp", "2.0.0", "250 ok"), [("delivered|mailer=esmtp", 1)]),
    (ev.Delivery("b@x.test", "Sent", "", "2.0.0", ""), [("delivered|mailer=local", 1)]),
    (ev.Delivery("b@x.test", "Deferred", "esmtp", "4.4.1", "Connection refused"), [("deferred|class=network", 1)]),
    (ev.Delivery("b@x.test", "Bounced", "esmtp", "5.1.1", "550 unknown"), [("bounced|class=address", 1)]),
    (ev.Delivery("b@x.test", "Not drained", "drain", reply="451 busy", relay="h:25"), []),
    (ev.NoticeQueued("delay", "0123456789BCDFG"), [("notices|type=delay", 1)]),
    (ev.Removed(), []),
    (ev.Note(""), []),
])
def test_counters_from_events(event, expected):
    assert counts(event) == expected


def test_counters_are_written_with_the_events(tmp_path):
    records = Records(tmp_path, "mx1.example.test", log_file=False)
    records.record(ev.Connected("unknown", "127.0.0.1"), session="1")
    records.record(ev.Delivery("b@x.test", "Deferred", "esmtp", "4.4.1", "refused"), QID)
    records.record(ev.Delivery("c@x.test", "Deferred", "esmtp", "4.4.1", "refused"), QID)
    records.emit("connect from unknown[127.0.0.1]")  # free text counts nothing
    records.flush()
    records.close()
    db = open_db(tmp_path / "records.sqlite", readonly=True)
    got = dict(db.execute("SELECT name, value FROM counters").fetchall())
    db.close()
    assert got == {"connections": 1, "deferred|class=network": 2}


# -- trace -------------------------------------------------------------------------------------------


def test_trace_reads_the_fields(tmp_path):
    from kanmon.records.trace import trace

    records = Records(tmp_path, "mx1.example.test", log_file=False)
    s = "2a.1"
    records.record(ev.Connected("unknown", "127.0.0.1"), session=s)
    records.record(ev.Refused("RCPT", "unknown", "127.0.0.1", "550 5.1.1 no", "5.1.1", "a@b.test", "x@example.test",
                              "ESMTP", "c"), session=s)
    records.record(ev.Accepted("a@b.test", 10, 2, "ESMTP", "unknown [127.0.0.1]", "<one@b>"), QID, session=s)
    records.record(ev.AdminChanged("hold", "kanmon queue"), QID)
    records.record(ev.Delivery("y@example.test", "Bounced", "esmtp", "5.1.1", "550 5.1.1 unknown user"), QID)
    records.record(ev.Delivery("z@example.test", "Deferred", "esmtp", "4.4.1", "Connection refused"), QID)
    records.flush()
    records.close()
    (t,) = trace(tmp_path, QID)
    assert [x.step for x in t.steps] == ["session", "reject", "accepted", "info", "attempt", "attempt"]
    # no history rows: the envelope comes from the accept event's fields
    assert (t.mail_from, t.size, t.message_id) == ("a@b.test", 10, "<one@b>")
    assert t.steps[4].detail["rcpt"] == "y@example.test" and t.steps[4].kind == "delivery"
    assert t.final == ("bounced for y@example.test (550 5.1.1 unknown user); "
                       "on hold, deferred for z@example.test (Connection refused)")
    (rejected,) = trace(tmp_path, "x@example.test")
    assert rejected.queue_id is None and rejected.rcpts == ["x@example.test"] and rejected.mail_from == "a@b.test"
    assert rejected.client_ip == "127.0.0.1" and rejected.helo == "c"
    assert rejected.final == "rejected: 550 5.1.1 no"
    assert [x.step for x in rejected.steps] == ["session", "reject"]


def test_trace_of_an_old_database_shows_its_lines_as_text(tmp_path):
    """Rows written before events had fields: kind 'info', no detail."""
    from kanmon.records.trace import trace

    db = sqlite3.connect(tmp_path / "records.sqlite")
    db.executescript("CREATE TABLE events (id INTEGER PRIMARY KEY, ts REAL NOT NULL, queue_id TEXT, kind TEXT NOT NULL,"
                     " text TEXT NOT NULL);")
    now = time.time()
    db.executemany("INSERT INTO events(ts, queue_id, kind, text) VALUES (?, ?, 'info', ?)", [
        (now, QID, "from=<a@b.test>, size=10, nrcpts=1, proto=ESMTP, relay=unknown [127.0.0.1]"),
        (now, QID, "to=<z@example.test>, delay=00:00:00, xdelay=00:00:00, mailer=local, dsn=2.0.0, stat=Sent"),
        (now, QID, "removed"),
    ])
    db.commit()
    db.close()
    (t,) = trace(tmp_path, QID)
    assert [x.step for x in t.steps] == ["info", "info", "info"]
    assert t.steps[1].text.startswith("to=<z@example.test>") and t.steps[1].detail == {}
    assert t.final == "in the queue, not tried yet"


def test_log_events_reads_an_old_database_that_was_never_migrated(tmp_path):
    db = sqlite3.connect(tmp_path / "records.sqlite")
    db.executescript("CREATE TABLE events (id INTEGER PRIMARY KEY, ts REAL NOT NULL, queue_id TEXT, kind TEXT NOT NULL,"
                     " text TEXT NOT NULL);")
    db.execute("INSERT INTO events(ts, queue_id, kind, text) VALUES (1.0, ?, 'info', 'removed')", (QID,))
    db.commit()
    db.close()
    (row,) = search_events(tmp_path)
    assert row.as_dict() == {"ts": 1.0, "queue_id": QID, "kind": "info", "text": "removed", "fields": None}
