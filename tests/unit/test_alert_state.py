"""Alerts that can be trusted: the saved alert state (strict decoding, damaged files moved
aside), the `queue oldest` alert and messages on hold, the expiry category (certificate,
DKIM key, the administrator's reminders), the archive hook, and the config keys."""

from __future__ import annotations

import datetime
import json
import os
import stat
import time

import pytest

import kanmon.alerts as alerts_module
from kanmon.alerts import STATE_FILE, Alerts, StateFileError, _fold_alerts, decode_state, encode_state, recent_alerts
from kanmon.clock import ManualClock
from kanmon.config import ConfigError, parse_config
from kanmon.model import Envelope, new_queue_id
from kanmon.records.events import AlertRequest, Error, ScannerFailed, ScannerRecovered
from kanmon.records.store import Records
from kanmon.spool.store import Spool
from tests.unit.test_monitoring import FakeQueue, FakeRecords

DAY = 86400.0


def make(tmp_path, extra: str = "", clock: ManualClock | None = None, records: FakeRecords | None = None):
    cfg = parse_config(f'[server]\ndata_dir = "{tmp_path}"\n[alerts]\nto = ["admin@admin.example"]\n'
                       f'min_interval = "1h"\n{extra}')
    records = records or FakeRecords()
    clock = clock or ManualClock(1_000_000.0)
    spool = Spool(tmp_path, fsync=False)
    alerts = Alerts(cfg, records, spool, FakeQueue(), clock)
    mails: list[tuple[str, str, str]] = []
    alerts._enqueue = lambda category, key, subject, body, force: mails.append((category, key, subject + "\n" + body))
    return alerts, records, clock, mails, spool


# -- the saved state -------------------------------------------------------------------


def test_the_alert_state_survives_a_restart_and_the_rate_limit_holds(tmp_path):
    alerts, _, clock, mails, spool = make(tmp_path)
    assert alerts.raise_alert("disk", "/data", "free disk space low") is True
    alerts.on_server_used("a:25, b:25", "[b]:25", [("[a]:25", "refused")])
    alerts.save_state()
    path = tmp_path / STATE_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    spool.close()

    clock.advance(600)  # a restart ten minutes later
    again, records, _, mails2, spool = make(tmp_path, clock=clock)
    st = again.states[("disk", "/data")]
    assert st.active and st.since == 1_000_000.0 and st.last_sent == 1_000_000.0
    assert again.raise_alert("disk", "/data", "free disk space low") is False  # within min_interval: no mail
    assert mails2 == [] and "already mailed" in records.lines[-1][0]
    # The failover outstanding before the restart is resolved (and said) after it.
    again.on_server_used("a:25, b:25", "[a]:25", [])
    ((category, key, text),) = mails2
    assert (category, key) == ("delivery", "failover a:25, b:25")
    assert text.startswith("[kanmon mx1.example.test] delivery: resolved: relay recovered: the first server [a]:25")
    clock.advance(3600)
    assert again.raise_alert("disk", "/data", "free disk space low") is True
    spool.close()


def test_a_damaged_state_file_is_moved_aside_with_an_event_and_alerts_start_afresh(tmp_path):
    (tmp_path / STATE_FILE).write_bytes(b'{"format": 1, "alerts": [{"category": "disk"')
    alerts, records, _, mails, spool = make(tmp_path)
    assert alerts.states == {} and not (tmp_path / STATE_FILE).exists()
    (aside,) = tmp_path.glob(STATE_FILE + ".damaged-*")
    assert aside.read_bytes().startswith(b'{"format": 1')
    (text, _, kind), = [line for line in records.lines if "alert state" in line[0]]
    assert kind == "critical" and "is damaged" in text and aside.name in text
    assert alerts.raise_alert("disk", "/data", "low") is True  # works on
    alerts.save_state()
    assert decode_state((tmp_path / STATE_FILE).read_bytes())[0][("disk", "/data")].active
    spool.close()


GOOD = {"category": "queue", "key": "size", "text": "t", "since": 1.0, "last_sent": None, "active": True,
        "last_seen": 2.0, "resolved_sent": None}


@pytest.mark.parametrize("change", [
    {"category": "bogus"},
    {"since": "yesterday"},
    {"active": 1},
    {"last_sent": True},
    {"extra": 1},
])
def test_the_state_decoder_is_strict(change):
    item = {**GOOD, **change}
    for fmt in (1, 2):  # the format before test alerts were told apart by a flag is read too
        with pytest.raises(StateFileError):
            decode_state(json.dumps({"format": fmt, "alerts": [item], "failover": {}}).encode())
        with pytest.raises(StateFileError):
            decode_state(json.dumps({"format": fmt, "alerts": [GOOD, GOOD], "failover": {}}).encode())
        states, failover = decode_state(json.dumps({"format": fmt, "alerts": [GOOD], "failover": {"d": "s"}}).encode())
        assert states[("queue", "size")].since == 1.0 and failover == {"d": "s"}
    with pytest.raises(StateFileError):
        decode_state(json.dumps({"format": 3, "alerts": [], "failover": {}}).encode())
    with pytest.raises(StateFileError):
        decode_state(b"\xff\xfe")


def test_the_saved_state_keeps_what_matters_and_forgets_the_rest(tmp_path):
    alerts, _, clock, _, spool = make(tmp_path)
    alerts.raise_alert("queue", "size", "big")          # active: kept however old
    alerts.raise_alert("critical", "boom", "error event")  # critical alerts never clear: kept while rate-limited
    alerts.raise_alert("disk", "/d", "low")
    alerts.clear("disk", "/d", "ok")                     # cleared: kept while rate-limited
    alerts.save_state()
    assert set(decode_state((tmp_path / STATE_FILE).read_bytes())[0]) == {
        ("queue", "size"), ("critical", "boom"), ("disk", "/d")}
    clock.advance(2 * 3600)
    alerts.save_state()
    assert set(decode_state((tmp_path / STATE_FILE).read_bytes())[0]) == {("queue", "size")}
    spool.close()


# -- test alerts, and alerts whose state is lost ------------------------------------------


def with_records(tmp_path, clock: ManualClock | None = None):
    """make() with the real records (the events `kanmon alert list` reads back)."""
    records = Records(tmp_path, "mx1.example.test", log_file=False)
    alerts, _, clock, mails, spool = make(tmp_path, clock=clock, records=records)
    return alerts, records, clock, mails, spool


def listed(tmp_path, records) -> tuple[list[tuple[str, str, str]], list[tuple[str, str]]]:
    """(recent (category, key, state), active (category, key)) as `kanmon alert list` shows them."""
    records.flush()
    recent, active = recent_alerts(tmp_path, 0.0)
    return [(r.category, r.key, r.state) for r in recent], [(r.category, r.key) for r in active]


def test_a_real_alert_keyed_test_is_shown_and_the_test_button_leaves_it_alone(tmp_path):
    """A scanner named "test" is a real alert of key "test": active in the list and the
    status (kanmon.admin.status reads the states), and the test button of its category
    neither hides it nor changes it. Test alerts are told apart by their flag."""
    alerts, records, clock, mails, spool = with_records(tmp_path)
    alerts._on_event(ScannerFailed.KIND, None, "scanner test failed: connection refused")
    clock.advance(60)
    alerts._on_event(AlertRequest.KIND, None, "test alert requested: scanner", '{"category": "scanner"}')
    st = alerts.states[("scanner", "test")]
    assert st.active and st.text.startswith("scanner test failed") and st.since == 1_000_000.0
    assert list(alerts.states) == [("scanner", "test")]  # the test alert keeps no state
    recent, active = listed(tmp_path, records)
    assert recent == [("scanner", "test", "raised"), ("scanner", "test", "raised")] and active == [("scanner", "test")]
    records.flush()
    recent_records = recent_alerts(tmp_path, 0.0)[0]
    assert [r.test for r in recent_records] == [False, True]
    alerts.save_state()
    assert list(decode_state((tmp_path / STATE_FILE).read_bytes())[0]) == [("scanner", "test")]
    # The scanner answers again: cleared; the test button's event never made it active either.
    alerts._on_event(ScannerRecovered.KIND, None, "scanner test answers again")
    assert listed(tmp_path, records)[1] == []
    records.close()
    spool.close()


def test_test_alerts_of_the_old_format_are_not_alerts(tmp_path):
    """Before the flag, the key "test" was all that told a test alert: the events and the
    state file written then are read that way (the state file: format 1)."""
    item = {"text": "t", "since": 1.0, "last_sent": 1.0, "active": True, "last_seen": 1.0, "resolved_sent": None}
    old = {"format": 1, "failover": {}, "alerts": [{"category": "queue", "key": "test", **item},
                                                    {"category": "disk", "key": "/data", **item}]}
    (tmp_path / STATE_FILE).write_text(json.dumps(old))
    alerts, _, _, _, spool = make(tmp_path)
    assert list(alerts.states) == [("disk", "/data")]
    alerts.save_state()
    assert json.loads((tmp_path / STATE_FILE).read_text())["format"] == 2
    rows = [(1.0, json.dumps({"category": "queue", "key": "test", "state": "raised", "since": 1.0, "text": "t"}), "")]
    assert _fold_alerts(rows)[1] == []
    spool.close()


def test_an_alert_whose_state_was_lost_is_no_longer_active_in_the_list(tmp_path):
    """The state file damaged or removed: the alerts its events show active are said
    "unknown" at start (not active), instead of staying active until a later event of
    theirs, which a check that finds all well never makes (it clears only what it knows)."""
    alerts, records, clock, _, spool = with_records(tmp_path)
    alerts.raise_alert("disk", "/data", "free disk space low")
    alerts.raise_alert("queue", "size", "900 messages")
    alerts.raise_alert("critical", "boom", "error event")  # active for its interval only: left alone
    alerts.save_state()
    spool.close()
    kept = decode_state((tmp_path / STATE_FILE).read_bytes())[0]
    del kept[("disk", "/data")]  # its state lost; the queue's kept
    (tmp_path / STATE_FILE).write_bytes(encode_state(kept, {}))
    records.flush()
    again, _, _, _, spool = make(tmp_path, clock=clock, records=records)
    recent, active = listed(tmp_path, records)
    assert recent[-1] == ("disk", "/data", "unknown") and ("disk", "/data") not in active
    assert ("queue", "size") in active and again.states[("queue", "size")].active
    again.clear("disk", "/data", "free disk space 9 GB")  # nothing known: nothing said, nothing active
    assert listed(tmp_path, records)[1] == active
    # Raised again (the disk still full): active again, a new episode.
    assert again.raise_alert("disk", "/data", "free disk space low") is True
    assert ("disk", "/data") in listed(tmp_path, records)[1]
    records.close()
    spool.close()


def test_an_active_alert_pruned_from_the_state_is_no_longer_active_in_the_list(tmp_path, monkeypatch):
    monkeypatch.setattr(alerts_module, "STATE_MAX_ALERTS", 2)
    alerts, records, clock, _, spool = with_records(tmp_path)
    for n in range(3):
        alerts.raise_alert("dns", f"example{n}.test", "no MX")
        clock.advance(60)
    alerts.save_state()
    assert set(alerts.states) == {("dns", "example1.test"), ("dns", "example2.test")}
    recent, active = listed(tmp_path, records)
    assert recent[-1] == ("dns", "example0.test", "unknown") and ("dns", "example0.test") not in active
    assert len(active) == 2
    records.close()
    spool.close()


def test_a_reload_goes_on_with_the_state_in_memory(tmp_path):
    """The alerts a reload makes take the running state, not the file (which a change of
    the last moment may not have reached): nothing is forgotten or said unknown; and its
    watcher goes on from the last event the old one acted on."""
    alerts, records, clock, _, spool = with_records(tmp_path)
    alerts.raise_alert("disk", "/data", "free disk space low")  # not saved yet
    records.record(Error("delivery: stage failed"))  # not looked at yet by the old one's watcher
    records.flush()
    again = Alerts(alerts.config, records, spool, FakeQueue(), clock, previous=alerts)
    assert again.states[("disk", "/data")].active
    assert listed(tmp_path, records) == ([("disk", "/data", "raised")], [("disk", "/data")])
    rows, _top = again.poll_events()  # nor is an event of the reload's moment skipped
    assert [(kind, text) for kind, _, text, _ in rows] == [("error", "delivery: stage failed")]
    records.close()
    spool.close()


def test_a_reload_sends_the_mail_the_old_alerts_had_not_sent_yet(tmp_path):
    """The old one's state says the alert was mailed once its mail was queued: a reload
    that dropped its outbox would have lost the mail and kept the alert quiet for
    min_interval."""
    import asyncio

    alerts, records, clock, _, spool = with_records(tmp_path)
    del alerts._enqueue  # make()'s stand-in: the real one, to the outbox
    alerts._outbox = asyncio.Queue()  # running, its sender not yet at this mail
    assert alerts.raise_alert("disk", "/data", "free disk space low") is True
    again = Alerts(alerts.config, records, spool, FakeQueue(), clock, previous=alerts)
    assert again.raise_alert("disk", "/data", "free disk space low") is False  # mailed, says the state
    sent: list[str] = []

    async def sender() -> None:
        while True:
            category, key, _subject, _body, _ask, _rcpts = await again._outbox.get()
            sent.append(f"{category} {key}")

    async def scenario() -> None:
        again._sender = sender
        task = asyncio.create_task(again.run())
        for _ in range(100):
            await asyncio.sleep(0.01)
            if sent:
                break
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(scenario())
    assert sent == ["disk /data"]
    records.close()
    spool.close()


# -- queue oldest and messages on hold --------------------------------------------------


def test_queue_oldest_ignores_held_messages_and_says_how_many_there_are(tmp_path):
    now = time.time()
    alerts, _, clock, mails, spool = make(tmp_path, 'queue_oldest_above = "4h"', clock=ManualClock(now))
    env = Envelope("a@b.test", ["c@d.test"], received_at=now)
    held = new_queue_id(now - 2 * DAY - 60)  # a minute more: ids keep whole microseconds
    spool.store_blocking(held, env, b"Subject: x\r\n\r\nx\r\n")
    spool.set_hold(held, True, now, "admin")
    recent = new_queue_id(now - 3600)
    spool.store_blocking(recent, env, b"Subject: y\r\n\r\ny\r\n")
    alerts._check_queue()
    assert ("queue", "oldest") not in alerts.states and mails == []  # only the held one is old

    old = new_queue_id(now - 5 * 3600 - 60)
    spool.store_blocking(old, env, b"Subject: z\r\n\r\nz\r\n")
    alerts._check_queue()
    ((category, key, text),) = mails
    assert (category, key) == ("queue", "oldest")
    assert f"the oldest message not on hold ({old}) has waited 5h" in text
    assert "1 message(s) on hold are not counted (the oldest held for 2d" in text
    assert "kanmon queue list --state hold" in text and f"kanmon trace {old}" in text
    spool.close()


# -- expiry -----------------------------------------------------------------------------


def test_reminders_of_the_admin_are_expiry_alerts_mailed_once_a_day(tmp_path):
    due = time.mktime(datetime.date(2027, 3, 31).timetuple())  # the day begins, local time
    extra = ('[[alerts.reminder]]\nwhat = "renew the support contract"\ndue = "2027-03-31"\n'
             '[[alerts.reminder]]\nwhat = "domain example.test"\ndue = 2027-12-01\nbefore = "7d"\n')
    alerts, _, clock, mails, spool = make(tmp_path, extra, clock=ManualClock(due - 32 * DAY))
    alerts._check_reminders()
    assert mails == []  # 32 days before: not yet
    clock.advance(3 * DAY)  # 29 days before: within the default 30d
    alerts._check_reminders()
    ((category, key, text),) = mails
    assert (category, key) == ("expiry", "reminder renew the support contract")
    assert "expiry: reminder: renew the support contract: due 2027-03-31 (in 29d" in text
    assert "[[alerts.reminder]]" in text and "at most once every 1d" in text
    clock.advance(12 * 3600)
    alerts._check_reminders()
    assert len(mails) == 1  # once a day (expiry_every), not every min_interval
    clock.advance(DAY + 30 * DAY)
    alerts._check_reminders()
    assert len(mails) == 2 and "overdue since 2d 12h" in mails[1][2]
    # Taken out of the configuration (a reload): the reminder is over.
    alerts.cfg = parse_config(f'[server]\ndata_dir = "{tmp_path}"\n').alerts
    alerts._check_reminders()
    assert not alerts.states[("expiry", "reminder renew the support contract")].active
    spool.close()


def test_dkim_key_due_for_rotation(tmp_path):
    key = tmp_path / "dkim.pem"
    key.write_text("-----BEGIN PRIVATE KEY-----\n")
    now = time.time()
    os.utime(key, (now - 200 * DAY - 60, now - 200 * DAY - 60))  # a minute more: mtimes are rounded
    extra = 'dkim_rotate_after = "180d"\n[dnscheck]\ndkim_key = "' + str(key) + '"\n'
    alerts, _, clock, mails, spool = make(tmp_path, extra, clock=ManualClock(now))
    alerts._check_dkim_key()
    ((category, key_name, text),) = mails
    assert category == "expiry" and key_name == f"DKIM key {key}"
    assert "our DKIM key is due for rotation: it is 200d" in text and "rotation every 180d" in text
    assert f"ls -l {key}; kanmon dns check" in text
    os.utime(key, (now, now))  # a new key
    alerts._check_dkim_key()
    assert not alerts.states[("expiry", f"DKIM key {key}")].active
    spool.close()


def test_active_signing_keys_are_due_for_rotation_too(tmp_path):
    old, new = tmp_path / "old.key", tmp_path / "new.key"
    now = time.time()
    for path in (old, new):
        path.write_text("-----BEGIN PRIVATE KEY-----\n")
        os.utime(path, (now - 200 * DAY - 60, now - 200 * DAY - 60))
    extra = ('dkim_rotate_after = "180d"\n'
             f'[[dkim]]\ndomain = "example.test"\nselector = "k1"\nkey = "{old}"\n'
             f'[[dkim]]\ndomain = "example.test"\nselector = "k2"\nkey = "{new}"\nactive = false\n')
    alerts, _, clock, mails, spool = make(tmp_path, extra, clock=ManualClock(now))
    alerts._check_dkim_key()
    # The signing key only: the one not signing yet is not due for anything.
    assert [key_name for _c, key_name, _t in mails] == [f"DKIM key {old}"]
    spool.close()


def test_the_archive_hook_raises_and_clears(tmp_path):
    alerts, _, _, mails, spool = make(tmp_path, "archive_used_above = 0.8")
    alerts.check_archive(70, 100, "/archive")
    assert mails == []
    alerts.check_archive(85, 100, "/archive")
    ((category, key, text),) = mails
    assert (category, key) == ("archive", "/archive") and "(85%, threshold 80%)" in text
    alerts.check_archive(10, 100, "/archive")
    assert not alerts.states[("archive", "/archive")].active
    spool.close()


def test_alert_config_keys():
    c = parse_config('[alerts]\ncategories = ["certificate", "ha"]\n[[alerts.reminder]]\nwhat = "x"\ndue = "2027-03-31"\n')
    assert c.alerts.categories == ["expiry", "ha"]  # the old name of certificate expiry still reads
    assert c.alerts.reminder[0].due == datetime.date(2027, 3, 31) and c.alerts.reminder[0].before == 30 * DAY
    assert "ha" in parse_config("").alerts.categories and "archive" in parse_config("").alerts.categories
    for bad in ('[[alerts.reminder]]\nwhat = "x"\ndue = "2027-03-31"\n[[alerts.reminder]]\nwhat = "x"\ndue = "2028-01-01"\n',
                '[[alerts.reminder]]\nwhat = "x"\ndue = "31.3.2027"\n',
                '[[alerts.reminder]]\nwhat = "a\\nb"\ndue = "2027-03-31"\n',
                '[alerts]\ncategories = ["license"]\n'):
        with pytest.raises(ConfigError):
            parse_config(bad)


def test_an_alert_raised_before_the_window_is_still_active_in_the_list() -> None:
    """`kanmon alert list --since 1m` (and the console's, and the API's) lists as active an
    alert raised before the minute and not cleared since; the recent events are the
    window's only; a test alert is never active."""
    import json

    from kanmon.alerts import _fold_alerts

    def row(ts: float, key: str, state: str) -> tuple:
        return (ts, json.dumps({"category": "dns", "key": key, "state": state, "since": ts, "text": key}), "")

    rows = [row(100.0, "example.test", "raised"), row(150.0, "other.test", "raised"), row(900.0, "other.test", "cleared"),
            row(950.0, "test", "raised")]
    recent, active = _fold_alerts(rows, since=800.0)
    assert [(r.key, r.state) for r in recent] == [("other.test", "cleared"), ("test", "raised")]
    assert [r.key for r in active] == ["example.test"]
    # A critical alert (an error event: nothing clears it) is active within the window only.
    critical = (120.0, json.dumps({"category": "critical", "key": "stage", "state": "raised", "since": 120.0,
                                   "text": "stage failed"}), "")
    assert [r.key for r in _fold_alerts([*rows, critical], since=800.0)[1]] == ["example.test"]
    assert [r.key for r in _fold_alerts([*rows, critical], since=100.0)[1]] == ["example.test", "stage"]


def test_recovery_events_resolve_the_alerts_they_end_and_no_others(tmp_path):
    """The watcher's recoveries (kanmon.alerts.RECOVERIES): the shared state answering a
    receiver again ends its "connection gauge unavailable" alert (whatever the pid or
    port in it), with a "resolved" mail; an unrelated critical alert stays."""
    alerts, _records, _clock, mails, spool = make(tmp_path)
    alerts._on_event("error", None, "connection gauge unavailable (the connection limits count this process's "
                     "connections only until it answers): OperationalError: connection to 127.0.0.1:5432 refused")
    alerts._on_event("error", None, "shared state unavailable: the connection counts of SMTP receiver pid 4242 are "
                     "not dropped yet, trying again in the background: OperationalError: refused")
    alerts._on_event("error", None, "delivery agent error: RuntimeError: boom")
    assert len(mails) == 3
    alerts._on_event("info", None, "connection gauge available again")
    alerts._on_event("info", None, "shared state: the connection counts of SMTP receiver pid 4242 dropped")
    alerts._on_event("info", None, "a login, nothing to do with it")
    active = [key for (cat, key), st in alerts.states.items() if st.active]
    assert active == ["delivery agent error: RuntimeError: boom"]
    resolved = [text for _c, _k, text in mails[3:]]
    assert len(resolved) == 2 and all("critical: resolved: " in t.splitlines()[0] for t in resolved)
    assert "The alert it resolves: error event: connection gauge unavailable" in resolved[0]
    spool.close()


def test_a_refused_cluster_version_is_resolved_by_a_version_applied_not_by_any_reload(tmp_path):
    """A reload after a refusal runs the version applied last, which records a reload: that
    must not resolve the refusal it has just raised; a version applied does."""
    from kanmon.records.events import Reload

    alerts, _records, _clock, mails, spool = make(tmp_path)
    alerts._on_event("error", None, "cluster: configuration version 7 refused: cannot listen on 192.0.2.1:25")
    alerts._on_event("reload", None, Reload("nothing").line())
    assert [key for (_c, key), st in alerts.states.items() if st.active] == [
        "cluster: configuration version # refused: cannot listen on #.#.#.#:#"]
    alerts._on_event("info", None, "cluster: configuration version 8 applied")
    assert not [key for (_c, key), st in alerts.states.items() if st.active]
    assert "critical: resolved: " in mails[-1][2].splitlines()[0]
    spool.close()


def test_an_alert_title_is_its_text_shortened_at_a_word_with_a_marker():
    from kanmon.alerts import alert_title, critical_key

    text = "error event: cannot listen on 192.0.2.1:25: Address not available\nmore details"
    assert critical_key(text) == "error event: cannot listen on #.#.#.#:#: Address not available\nmore details"
    assert alert_title("critical", critical_key(text), text) == "error event: cannot listen on 192.0.2.1:25: Address not available"
    assert alert_title("critical", "k", text, limit=40) == "error event: cannot listen on..."
    assert alert_title("critical", "k", "x" * 50, limit=20) == "x" * 17 + "..."  # no space: cut within, marked
    assert alert_title("disk", "/data", "free disk space low") == "/data: free disk space low"
    assert alert_title("dns", "DNS check of a.example", "DNS check of a.example: ok -> error") == \
        "DNS check of a.example: ok -> error"


def test_a_test_alerts_to_address_is_one_mailbox():
    from kanmon.alerts import is_test_address

    assert is_test_address("admin@example.test")
    for bad in ("", "admin", "a@b.test>, c@d.test", "a b@c.test", "<a@b.test>", "@relay:a@b.test",
                "a@[192.0.2.1]", "a@b.test\r\nBcc: x@y.test", "\u00e9@b.test"):
        assert not is_test_address(bad), bad
