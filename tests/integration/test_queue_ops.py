"""Queue operations, end to end: every command against a running node (through
its control socket) and against a stopped one (straight on the spool, under the lock);
real SMTP on loopback, a clock the tests advance, the CLI through click and through
real processes (`python -m kanmon`, a pseudo-terminal for review)."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import signal
import smtplib
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pexpect
import pytest
from click.testing import CliRunner

import kanmon.admin.service as admin_service
import kanmon.policy.standard
from kanmon.admin.backup import BackupWriter
from kanmon.admin.queue_ops import QueueOps
from kanmon.cli import main
from kanmon.clock import ManualClock
from kanmon.config import parse_config
from kanmon.control import ControlClient, DataDirLock, LockBusy
from kanmon.policy.pipeline import ACCEPTED, Check, Pipeline, accept
from kanmon.policy.standard import standard_checks
from kanmon.records.query import search_events, search_history
from kanmon.spool.store import Spool
from tests.support.kanmon_node import KanmonProcess, RunningNode, free_port, maildir_messages, wait_banner, wait_for
from tests.support.smtpsink import SmtpSink

ROOT = Path(__file__).resolve().parents[2]

NODE = """
[server]
hostname = "mx1.example.test"
data_dir = "{data_dir}"
workers = 0
[smtp]
listen = ["127.0.0.1:{port}"]
min_free_disk = "1MB"
[[domain]]
name = "example.test"
mailboxes = ["alice", "bob"]
[[domain]]
name = "corp.example"
deliver = "relay"
servers = ["{corp}"]
tls = "none"
[[domain]]
name = "other.example"
deliver = "relay"
servers = ["{other}"]
tls = "none"
[queue]
retry = "5m..1h"
warn_after = "0"
lifetime = "10d"
{extra}
"""

# 2026-01-01 04:00 local time: the maintenance examples fire at 05:00 and 06:00.
T0 = time.mktime((2026, 1, 1, 4, 0, 0, 0, 0, -1))


class Site:
    """A node's config file and data_dir; start() runs it in this process on a ManualClock."""

    def __init__(self, tmp_path: Path, name: str, *, corp: str | None = None, other: str | None = None, extra: str = "",
                 start: float | None = None):
        self.dir = tmp_path / name
        self.dir.mkdir()
        self.port = free_port()
        self.corp = corp or f"127.0.0.7:{free_port('127.0.0.7')}"  # nothing listens: deferred
        self.other = other or f"127.0.0.8:{free_port('127.0.0.8')}"
        self.extra = extra
        self.config_file = self.dir / "kanmon.toml"
        self.write()
        # A stopped node's clock is the system clock: by default the test clock starts
        # 2 hours back, so after _queue_three() both agree on every message's age.
        self.clock = ManualClock(time.time() - 7200 if start is None else start)
        self.node: RunningNode | None = None

    def write(self) -> None:
        self.config_file.write_text(NODE.format(
            data_dir=self.dir / "data", port=self.port, corp=self.corp, other=self.other, extra=self.extra))

    @property
    def data_dir(self) -> Path:
        return self.dir / "data"

    def start(self) -> RunningNode:
        config = parse_config(self.config_file.read_text())
        self.node = RunningNode(config, clock=self.clock).start()
        return self.node

    def stop(self) -> None:
        if self.node is not None:
            self.node.stop()
            self.node = None

    def send(self, sender: str, rcpts: list[str], subject: str, body: str = "hello") -> str:
        assert self.node is not None
        msg = f"From: {sender}\r\nTo: {', '.join(rcpts)}\r\nSubject: {subject}\r\n\r\n{body}\r\n"
        with smtplib.SMTP("127.0.0.1", self.port, timeout=60) as s:
            s.sendmail(sender, rcpts, msg)
        self.node.wait_idle()
        return self.item(subject=subject)["id"] if subject else ""

    def cli(self, *args: str, input: str | None = None, code: int = 0):
        result = CliRunner().invoke(main, [*args, "-c", str(self.config_file)], input=input)
        assert result.exit_code == code, (result.output, result.exception)
        return result

    def cli_json(self, *args: str) -> dict:
        return json.loads(self.cli(*args, "--json").output)

    def ids(self, *args: str) -> list[str]:
        return [r["id"] for r in self.cli_json("queue", "list", *args)["items"]]

    def item(self, subject: str) -> dict:
        for r in self.cli_json("queue", "list")["items"]:
            if r["state"] != "corrupt" and subject in self.cli_json("queue", "show", r["id"])["headers"]:
                return r
        raise AssertionError(f"no queued message with subject {subject!r}")

    def spool_corrupt(self) -> list[str]:
        return sorted(p.name for p in (self.data_dir / "spool" / "corrupt").iterdir())

    def events(self) -> list[str]:
        if self.node is not None:
            self.node.flush()
        return [(e.queue_id or "") + ": " + e.text for e in search_events(self.data_dir)]

    def wait_event(self, needle: str, timeout: float = 10.0) -> str:
        found: list[str] = []

        def look() -> bool:
            found[:] = [t for t in self.events() if needle in t]
            return bool(found)

        wait_for(look, timeout, f"event containing {needle!r}")
        return found[0]


@pytest.fixture
def site(tmp_path):
    s = Site(tmp_path, "a")
    yield s
    s.stop()


def _queue_three(site: Site, other_sink: SmtpSink | None = None) -> dict[str, str]:
    """m1 alice -> corp (2h old), m2 bob -> corp, m3 alice -> other ('User unknown' if a sink answers)."""
    ids = {"m1": site.send("alice@example.test", ["u1@corp.example"], "m1")}
    site.node.advance(7200)
    ids["m2"] = site.send("bob@example.test", ["u2@corp.example"], "m2")
    ids["m3"] = site.send("alice@example.test", ["x@other.example"], "m3")
    return ids


# -- list and filters ----------------------------------------------------------------------


def _check_filters(site: Site, ids: dict[str, str]) -> None:
    assert sorted(site.ids()) == sorted(ids.values())
    assert site.ids("--from", "alice", "--older-than", "1h") == [ids["m1"]]
    assert site.ids("--domain", "other.example", "--reason", "user UNKNOWN") == [ids["m3"]]
    assert site.ids("--from", "bob@*", "--to", "*@corp.example") == [ids["m2"]]
    assert site.ids("--from", "alice", "--domain", "corp.example", "--older-than", "1h", "--reason", "refused") == [ids["m1"]]
    assert site.ids("--from", "alice", "--domain", "corp.example", "--older-than", "3h") == []
    assert site.ids("--state", "hold") == []
    assert site.ids("--state", "deferred", "--to", "u2") == [ids["m2"]]
    text = site.cli("queue", "list").output
    assert "Connection refused by 127.0.0.7" in text and "u1@corp.example" in text and "3 Requests" in text
    row = next(r for r in site.cli_json("queue", "list")["items"] if r["id"] == ids["m3"])
    assert row["from"] == "alice@example.test" and row["rcpts"] == ["x@other.example"]
    assert row["last_reply"].startswith("450 4.1.1") and row["next_attempt"] > row["arrival"] and row["attempts"] == 1


def test_list_with_combined_filters_running_and_stopped(site):
    with SmtpSink("127.0.0.8") as other:
        other.rcpt_replies = {"x@other.example": "450 4.1.1 <x@other.example>: User unknown in local recipient table"}
        site.other = other.address
        site.write()
        site.start()
        ids = _queue_three(site)
        assert site.node.node.admin.control is not None  # through the socket
        _check_filters(site, ids)
        site.stop()
        _check_filters(site, ids)  # straight on the spool


def test_bad_filter_values_are_usage_errors(site):
    site.start()
    assert "not a duration" in site.cli("queue", "list", "--older-than", "soon", code=2).output
    assert "--reason" in site.cli("queue", "list", "--reason", "(", code=2).output
    assert "give queue ids or filters" in site.cli("queue", "delete", code=2).output
    assert "not a queue id" in site.cli("queue", "delete", "../../etc/passwd", code=2).output


# -- show ----------------------------------------------------------------------------------


def test_show_running_and_stopped(site):
    site.start()
    qid = site.send("alice@example.test", ["u1@corp.example"], "shown", body="line1\r\nline2\r\nline3")
    for _ in range(2):
        d = site.cli_json("queue", "show", qid, "--lines", "2")
        assert d["from"] == "alice@example.test" and d["rcpts_all"][0]["status"] == "pending"
        assert "Subject: shown" in d["headers"] and d["body"] == "line1\r\nline2" and d["body_lines_total"] >= 3
        assert any(h.get("reply", "").startswith("451 4.4.1 Connection refused") for h in d["history"])
        text = site.cli("queue", "show", qid, "--lines", "1").output
        assert "Recipient: <u1@corp.example> pending" in text and "Connection refused" in text and "more line(s)" in text
        site.stop()
    assert "not in the queue" in site.cli("queue", "show", "0000000000000BB", code=1).output


# -- hold, release, delete, flush ------------------------------------------------------------


def test_hold_flush_release_delete_on_a_running_node(site):
    port = int(site.corp.rpartition(":")[2])
    site.start()
    ids = _queue_three(site)
    assert "1 message(s) held" in site.cli("queue", "hold", ids["m1"]).output
    assert site.ids("--state", "hold") == [ids["m1"]]
    site.wait_event(f"{ids['m1']}: held by administrator")
    # An id no message has (a typo) is said, not a silent "0 held"; one already held is no typo.
    out = site.cli("queue", "hold", "1M1RW0QD50M0HSZ", ids["m1"]).output
    assert "0 message(s) held" in out and "1 not in the queue: 1M1RW0QD50M0HSZ" in out, out
    assert "final: on hold, deferred for" in site.cli("trace", ids["m1"]).output
    with SmtpSink("127.0.0.7", port) as corp:
        site.cli("queue", "flush")  # m2 now; m1 is held, m3's server is still down
        (m,) = corp.wait_for_messages(1)
        assert b"Subject: m2" in m.data
        site.node.wait_idle()
        assert len(corp.messages) == 1 and sorted(site.ids()) == sorted([ids["m1"], ids["m3"]])
        site.cli("queue", "release", ids["m1"])
        corp.wait_for_messages(2)
        assert b"Subject: m1" in corp.messages[1].data
    # A filter match is counted and confirmed first.
    out = site.cli("queue", "delete", "--domain", "other.example", input="n\n").output
    assert "1 message(s) match" in out and "Nothing done" in out and site.ids() == [ids["m3"]]
    out = site.cli("queue", "delete", "--domain", "other.example", input="y\n").output
    assert "1 message(s) deleted" in out and site.ids() == []
    line = site.wait_event("admin: delete 1 message(s) by `kanmon queue delete`")
    assert ids["m3"] in line and "--domain 'other.example'" in line
    site.wait_event(f"{ids['m3']}: deleted by administrator")
    assert any(f"{ids['m1']}: held by administrator" in e for e in site.events())


def test_a_deleted_message_is_said_deleted_by_trace_and_history(site):
    """Not "in the queue, deferred": the final state and the history rows say who deleted it."""
    site.start()
    ids = _queue_three(site)
    site.cli("queue", "delete", ids["m2"], "--yes")
    site.node.flush()
    wait_for(lambda: search_history(site.data_dir, queue_id=ids["m2"])[0].status.startswith("Deleted"), 10,
             "the history row's status")
    (row,) = search_history(site.data_dir, queue_id=ids["m2"])
    assert row.status == "Deleted by administrator (kanmon queue delete)" and row.disposition == "Accept"
    out = site.cli("trace", ids["m2"]).output
    assert "final: deleted by administrator (kanmon queue delete), not delivered to u2@corp.example (last reply:" in out
    assert "in the queue" not in out.split("final:")[1]
    assert "Deleted by administrator" in site.cli("log", "history", "--to", "u2@").output
    # The others are untouched.
    assert search_history(site.data_dir, queue_id=ids["m1"])[0].status.startswith("Deferred")


def test_hold_waits_for_the_attempt_in_flight_then_nothing_more_is_tried(tmp_path):
    with SmtpSink("127.0.0.7") as corp:
        corp.hang = "data-end"  # the attempt stays in flight until our data timeout
        s = Site(tmp_path, "a", corp=corp.address, extra='[outbound]\ndata_timeout = "1s"\n')
        try:
            s.start()
            with smtplib.SMTP("127.0.0.1", s.port, timeout=60) as c:
                c.sendmail("alice@example.test", ["u1@corp.example"], "Subject: inflight\r\n\r\nx\r\n")
            wait_for(lambda: s.ids("--state", "active"), 60, "a delivery in flight")
            (qid,) = s.ids("--state", "active")
            assert "1 message(s) held" in s.cli("queue", "hold", qid).output
            d = s.cli_json("queue", "show", qid)
            assert d["state"] == "hold" and [h["status"] for h in d["history"] if h.get("k") == "result"] == ["deferred"]
            tried = corp.connections
            s.node.advance(3 * 3600)  # many retry intervals
            s.node.wait_idle()
            assert corp.connections == tried and s.ids("--state", "hold") == [qid]
        finally:
            s.stop()


def test_hold_release_delete_flush_on_a_stopped_node_then_start(site):
    port = int(site.corp.rpartition(":")[2])
    site.start()
    ids = _queue_three(site)
    m4 = site.send("bob@example.test", ["u4@corp.example"], "m4")
    site.stop()
    site.cli("queue", "hold", ids["m1"], ids["m2"])
    site.cli("queue", "release", ids["m2"])
    out = site.cli("queue", "delete", "--to", "x@other*", "--dry-run").output
    assert "1 message(s) match; would delete" in out and ids["m3"] in out
    assert ids["m3"] in site.ids()
    site.cli("queue", "delete", "--to", "x@other*", "--yes")
    # Like Postfix's "mail system is down": a flush needs the queue manager.
    out = site.cli("queue", "flush", m4, code=1).output
    assert "kanmon is not running" in out
    assert site.ids("--state", "hold") == [ids["m1"]] and ids["m3"] not in site.ids()
    assert any("admin: hold 2 message(s)" in e for e in site.events())
    with SmtpSink("127.0.0.7", port) as corp:
        site.start()  # released: due at once; no clock advance
        site.cli("queue", "flush", m4)
        corp.wait_for_messages(2)
        site.node.wait_idle()
        assert sorted(m.data.split(b"Subject: ")[1][:2] for m in corp.messages) == [b"m2", b"m4"]
        assert site.ids() == [ids["m1"]]


class QuarantineSubject(Check):
    """DATA: a message whose Subject asks for it is to be quarantined (a content filter
    stands for this check)."""

    name = "quarantine_subject"

    def data(self, ctx):
        if b"Subject: quarantine me" in ctx.header:
            return accept(quarantine="test: the subject asked", classification="Spam")
        return ACCEPTED


def test_a_message_a_check_quarantines_waits_in_the_quarantine_until_released(site, monkeypatch):
    # A quarantine request puts the message in the quarantine store, not in the queue;
    # a release queues it under the same id and it is delivered.
    monkeypatch.setattr(kanmon.policy.standard, "standard_pipeline",
                        lambda config, **io: Pipeline([*standard_checks(config, **io), QuarantineSubject()]))
    site.start()
    site.send("x@remote.example", ["alice@example.test"], "")  # the Subject asks for nothing: delivered
    site.send("x@remote.example", ["alice@example.test"], "")
    with smtplib.SMTP("127.0.0.1", site.port, timeout=60) as s:
        s.sendmail("x@remote.example", ["alice@example.test"], "Subject: quarantine me\r\n\r\nhello\r\n")
    site.node.wait_idle()
    (item,) = site.cli_json("quarantine", "list")["items"]
    qid = item["id"]
    site.wait_event(f"{qid}: quarantined (spam): test: the subject asked")
    assert site.ids() == []
    assert [b"Subject: quarantine me" in m for m in maildir_messages(site.data_dir, "alice@example.test")] == [False, False]
    (row,) = search_history(site.data_dir, queue_id=qid)
    assert (row.disposition, row.classification) == ("Quarantine", "Spam")
    assert "final: in the quarantine" in site.cli("trace", qid).output
    assert f"{qid}: released" in site.cli("quarantine", "release", qid).output
    wait_for(lambda: len(maildir_messages(site.data_dir, "alice@example.test")) == 3, 60, "the released message")
    assert sum(b"Subject: quarantine me" in m for m in maildir_messages(site.data_dir, "alice@example.test")) == 1
    site.node.wait_idle()
    assert site.ids() == []


# -- bounce --------------------------------------------------------------------------------


def test_bounce_running_and_stopped(site):
    site.start()
    ids = _queue_three(site)
    assert "1 message(s) returned to sender" in site.cli("queue", "bounce", ids["m1"]).output
    wait_for(lambda: maildir_messages(site.data_dir, "alice@example.test"), 60, "failure notice to alice")
    (notice,) = maildir_messages(site.data_dir, "alice@example.test")
    assert b"Undelivered Mail Returned to Sender" in notice and b"returned to sender by the administrator" in notice
    assert b"Connection refused" in notice  # the last reply is reported too
    # Our administrator said it, not a remote host: no "host [...] said", no Remote-MTA.
    assert b"returned to sender by the administrator of mx1.example.test" in notice
    assert b"Remote-MTA" not in notice and b" said: " not in notice and b"Status: 5.0.0" in notice
    assert ids["m1"] not in site.ids()
    # The notice is in the mailbox before its queue file is removed: stopping in between
    # would deliver it again at the next start (at least once), and list it below.
    wait_for(lambda: sorted(site.ids()) == sorted([ids["m2"], ids["m3"]]), 30, "the notice removed from the queue")
    site.stop()
    site.cli("queue", "bounce", "--from", "bob@example.test", "--yes")
    (row,) = [r for r in site.cli_json("queue", "list")["items"] if r["id"] != ids["m3"]]
    assert row["from"] == "" and row["rcpts"] == ["bob@example.test"]  # the notice, queued
    site.start()
    wait_for(lambda: maildir_messages(site.data_dir, "bob@example.test"), 60, "failure notice to bob")
    # As above: the notice's queue file goes after its delivery, not with it.
    wait_for(lambda: site.ids() == [ids["m3"]], 30, "the notice to bob removed from the queue")


def test_bounce_of_a_message_from_the_null_sender_sends_no_notice(site):
    site.start()
    qid = site.send("", ["u1@corp.example"], "from-null")
    site.cli("queue", "bounce", qid)
    site.node.wait_idle()
    assert site.ids() == []  # removed, and no notice queued or delivered
    site.wait_event(f"{qid}: no notice (failed) for a message from <> or a notice")
    assert maildir_messages(site.data_dir, "alice@example.test") == []


# -- requeue ---------------------------------------------------------------------------------


def test_requeue_after_a_routing_change(site):
    site.start()
    a = site.send("alice@example.test", ["u1@corp.example"], "ra")
    b = site.send("alice@example.test", ["u2@corp.example"], "rb")
    site.stop()
    with SmtpSink("127.0.0.9") as new_store:
        site.corp = new_store.address  # corp.example moved to a new server
        site.write()
        site.cli("queue", "requeue", a)  # stopped: due at start, backoff restarted
        site.start()
        (m,) = new_store.wait_for_messages(1)
        assert b"Subject: ra" in m.data
        site.node.wait_idle()
        assert site.ids() == [b] and len(new_store.messages) == 1  # b waits for its retry time
        site.cli("queue", "requeue", "--domain", "corp.example")
        new_store.wait_for_messages(2)
        assert b"Subject: rb" in new_store.messages[1].data


# -- summary -------------------------------------------------------------------------------


def test_summary_by_domain_and_age(tmp_path):
    site = Site(tmp_path, "a", start=time.time() - 2 * 86400 - 25 * 60)
    site.start()
    site.send("alice@example.test", ["u1@corp.example", "u9@other.example"], "s1")
    site.node.advance(25 * 60)
    site.send("alice@example.test", ["u2@corp.example"], "s2")
    site.node.advance(2 * 86400)
    site.send("bob@example.test", ["u3@corp.example"], "s3")
    for _ in range(2):
        s = site.cli_json("queue", "summary")
        assert s["buckets"][0] == "5m" and s["buckets"][-1] == "1280m+"
        rows = {r["key"]: r["counts"] for r in s["rows"]}
        assert rows["corp.example"] == [1, 0, 0, 0, 0, 0, 0, 0, 0, 2]
        assert rows["other.example"] == [0] * 9 + [1]
        assert s["total"]["count"] == 3 and s["total"]["counts"] == [1] + [0] * 8 + [2]  # messages
        by_sender = {r["key"]: r["count"] for r in site.cli_json("queue", "summary", "--by", "sender")["rows"]}
        assert by_sender == {"example.test": 3}
        text = site.cli("queue", "summary", "--domain", "corp.example").output.splitlines()
        assert text[0].split() == ["T", "5", "10", "20", "40", "80", "160", "320", "640", "1280", "1280+"]
        assert text[1].split() == ["TOTAL", "3", "1", "0", "0", "0", "0", "0", "0", "0", "0", "2"]
        assert text[2].split()[0] == "corp.example" and len(text) == 3
        site.stop()  # and again on the stopped node, on the system clock


# -- review (a pseudo-terminal) ----------------------------------------------------------------


def _spawn(site: Site, *args: str) -> pexpect.spawn:
    return pexpect.spawn(sys.executable, ["-m", "kanmon", *args, "-c", str(site.config_file)], cwd=str(ROOT),
                         timeout=60, encoding="utf-8", env=dict(os.environ, PYTHONPATH=str(ROOT), COLUMNS="100"))


@pytest.mark.parametrize("running", [True, False], ids=["running", "stopped"])
def test_review_in_a_terminal(site, running):
    site.start()
    ids = _queue_three(site)
    if not running:
        site.stop()
    child = _spawn(site, "queue", "review", "--from", "*@example.test")
    try:
        # m2 and m3 arrive at the same instant of the test's clock: review shows them in
        # queue id order, which is not their sending order. Answer by the Subject shown.
        seen = []
        for _ in range(3):
            index = child.expect([r"Subject: m1", r"Subject: m2", r"Subject: m3"])
            seen.append(index)
            child.expect(r"\[k\]eep, \[d\]elete, \[h\]old, \[q\]uit")
            child.sendline("dhk"[index])
        assert sorted(seen) == [0, 1, 2] and seen[0] == 0  # m1, two hours older, first
        child.expect("Reviewed: 1 kept, 1 deleted, 1 held")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
    assert sorted(site.ids()) == sorted([ids["m2"], ids["m3"]]) and site.ids("--state", "hold") == [ids["m2"]]
    assert any("`kanmon queue review`" in e and ids["m1"] in e for e in site.events())


# -- backup and restore ------------------------------------------------------------------------


def _backup_with_m2_held(a, tmp_path):
    """Site a started with three messages, m2 held there, the two for corp.example backed
    up: their ids by name, the archive, what the backup said."""
    a.start()
    ids = _queue_three(a)
    a.cli("queue", "hold", ids["m2"])
    archive = tmp_path / "queue.kbk"
    return ids, archive, a.cli("queue", "backup", str(archive), "--domain", "corp.example").output


def test_backup_on_a_restore_on_b_delivered_by_b(tmp_path):
    a = Site(tmp_path, "a")
    with SmtpSink("127.0.0.9") as store:
        b = Site(tmp_path, "b", corp=store.address)
        try:
            ids, archive, out = _backup_with_m2_held(a, tmp_path)
            assert "2 message(s) written" in out
            assert sorted(a.ids()) == sorted(ids.values())  # a backup takes nothing away
            b.start()
            out = b.cli("queue", "restore", str(archive)).output
            assert f"restored {ids['m1']}" in out and "2 message(s) restored, 0 already here" in out
            b.cli("queue", "release", ids["m2"])  # held on a, held here until released
            store.wait_for_messages(2)
            b.node.wait_idle()
            assert sorted(m.data.split(b"Subject: ")[1][:2] for m in store.messages) == [b"m1", b"m2"]
            out = b.cli("queue", "restore", str(archive)).output  # again: nothing twice
            assert "0 message(s) restored, 0 already here, 2 restored here before and gone since (delivered" in out
            b.node.wait_idle()
            assert len(store.messages) == 2 and b.ids() == []
            b.wait_event("admin: restore 2 message(s) by `kanmon queue restore`")
            b.stop()
            # On a stopped node, held: arrival time and attempt history travel along.
            c = Site(tmp_path, "c")
            Spool(c.data_dir).close()
            c.cli("queue", "restore", str(archive), "--hold")
            held = c.cli_json("queue", "list", "--state", "hold")["items"]
            assert sorted(r["id"] for r in held) == sorted([ids["m1"], ids["m2"]])
            m1 = next(r for r in held if r["id"] == ids["m1"])
            assert m1["arrival"] == pytest.approx(a.clock.now() - 7200, abs=5) and "Connection refused" in m1["last_reply"]
        finally:
            a.stop()
            b.stop()


def test_a_message_held_in_the_archive_stays_held_when_restored(tmp_path):
    a = Site(tmp_path, "a")
    with SmtpSink("127.0.0.9") as store:
        b = Site(tmp_path, "b", corp=store.address)
        try:
            ids, archive, _out = _backup_with_m2_held(a, tmp_path)  # m2: say, a suspicious message the admin held
            a.stop()
            b.start()
            out = b.cli("queue", "restore", str(archive)).output
            assert f"restored {ids['m2']} (held)" in out and f"restored {ids['m1']}\n" in out
            assert "2 message(s) restored" in out and "1 of them held, as they were in the archive" in out
            store.wait_for_messages(1)
            b.node.advance(86400)
            b.node.wait_idle()
            assert len(store.messages) == 1 and b"Subject: m1" in store.messages[0].data
            assert b.ids("--state", "hold") == [ids["m2"]]
            b.wait_event(f"{ids['m2']}: from=<bob@example.test>")
            assert any(ids["m2"] in e and "proto=restore" in e and "held" in e for e in b.events())
            b.cli("queue", "release", ids["m2"])  # released, it goes
            store.wait_for_messages(2)
            b.stop()
            # On a stopped node, with --json: the restored ids that are held.
            c = Site(tmp_path, "c")
            Spool(c.data_dir).close()
            r = c.cli_json("queue", "restore", str(archive))
            assert r["held"] is False and r["on_hold"] == [ids["m2"]]
            assert c.ids("--state", "hold") == [ids["m2"]] and c.ids("--state", "deferred") == [ids["m1"]]
        finally:
            a.stop()
            b.stop()


def test_a_restore_onto_a_node_never_served_makes_its_spool(site, tmp_path):
    """A new relay taking over a queue before its first start: no spool (no data_dir even)
    yet. The restore makes them, private whatever the umask, as `kanmon serve` would, and
    says so; other queue commands there still say the -c is probably wrong."""
    ids, archive = _corp_backup(site, tmp_path, running=False)
    b = Site(tmp_path, "b")
    assert not b.data_dir.exists()
    assert "no spool in" in b.cli("queue", "list", code=1).output
    old = os.umask(0o022)
    try:
        r = b.cli("queue", "restore", str(archive))
    finally:
        os.umask(old)
    assert f"no spool in {b.data_dir} yet (kanmon never served it): making one" in r.stderr
    assert "2 message(s) restored" in r.stdout
    assert sorted(b.ids()) == sorted([ids["m1"], ids["m2"]])
    loose = [f"{p} {oct(p.stat().st_mode & 0o777)}" for p in [b.data_dir, *b.data_dir.rglob("*")]
             if p.stat().st_mode & 0o777 not in (0o700 if p.is_dir() else 0o600,)]
    assert loose == []


@pytest.mark.parametrize("running", [True, False], ids=["running", "stopped"])
def test_a_damaged_spool_identity_is_moved_aside_with_an_event(site, tmp_path, running):
    """The identity's strict decoder refuses a damaged file: the backup moves it aside
    with an error event (by the server, or by the command on a stopped node) and writes
    a new one, instead of replacing it silently."""
    site.start()
    _queue_three(site)
    site.cli("queue", "backup", str(tmp_path / "first.kbk"))
    identity = site.data_dir / "spool" / "identity"
    made = identity.read_bytes()
    if not running:
        site.stop()
    identity.write_bytes(b"garbage\n")
    site.cli("queue", "backup", str(tmp_path / "second.kbk"))
    assert (site.data_dir / "spool" / "identity.bad").read_bytes() == b"garbage\n"
    assert identity.read_bytes() != made and len(identity.read_bytes()) == 33
    site.wait_event("spool/identity is not 32 hex digits: moved aside to spool/identity.bad")


def test_damaged_archive_is_refused_whole(site, tmp_path):
    site.start()
    _queue_three(site)
    archive = tmp_path / "q.kbk"
    site.cli("queue", "backup", str(archive))
    data = bytearray(archive.read_bytes())
    at = data.index(b"Subject: m3")
    data[at + 9] ^= 0x20
    archive.write_bytes(bytes(data))
    b = Site(tmp_path, "b")
    Spool(b.data_dir).close()
    assert "SHA-256 mismatch" in b.cli("queue", "restore", str(archive), code=1).output
    archive.write_bytes(bytes(data[: len(data) // 2]))
    assert b.cli("queue", "restore", str(archive), code=1).output
    assert b.ids() == []


@pytest.mark.parametrize("running", [True, False], ids=["running", "stopped"])
def test_a_damaged_queue_file_is_set_aside_and_the_rest_backed_up(site, tmp_path, running):
    site.start()
    ids = _queue_three(site)
    if not running:
        site.stop()
    queue = site.data_dir / "spool" / "queue"
    data = bytearray((queue / ids["m2"]).read_bytes())
    data[-3] ^= 0x20  # the checksum no longer fits
    (queue / ids["m2"]).write_bytes(bytes(data))
    archive = tmp_path / "q.kbk"
    out = site.cli("queue", "backup", str(archive)).output
    assert "2 message(s) written" in out
    assert f"1 damaged queue file(s) set aside to spool/corrupt/, not in the archive: {ids['m2']}" in out
    assert ids["m2"] in site.spool_corrupt() and not (queue / ids["m2"]).exists()
    site.wait_event(f"{ids['m2']}: corrupt queue file moved to spool/corrupt/")
    assert site.ids("--state", "corrupt") == [ids["m2"]]
    # The next backup says the damaged file is left out too.
    r = site.cli_json("queue", "backup", str(tmp_path / "again.kbk"))
    assert r["count"] == 2 and r["set_aside"] == [] and r["corrupt"] == 1
    out = site.cli("queue", "backup", str(tmp_path / "again.kbk"), "--force").output
    assert "1 other damaged queue file(s) in spool/corrupt/, not in the archive" in out
    b = Site(tmp_path, "b")
    Spool(b.data_dir).close()
    assert "2 message(s) restored" in b.cli("queue", "restore", str(archive), "--hold").output
    assert sorted(b.ids()) == sorted([ids["m1"], ids["m3"]])


def _backup_of(site: Site, tmp_path: Path, n: int) -> tuple[Path, list[str]]:
    site.start()
    ids = [site.send("alice@example.test", [f"u{i}@corp.example"], f"r{i:02d}") for i in range(n)]
    site.stop()
    archive = tmp_path / "q.kbk"
    assert f"{n} message(s) written" in site.cli("queue", "backup", str(archive)).output  # stopped node
    return archive, ids


def _deliver_all_once(b: Site, store: SmtpSink, n: int) -> None:
    b.start()
    store.wait_for_messages(n)
    b.node.wait_idle()
    subjects = sorted(m.data.split(b"Subject: ")[1][:3] for m in store.messages)
    assert subjects == [f"r{i:02d}".encode() for i in range(n)]
    assert b.ids() == []


def _corp_backup(site, tmp_path, running: bool):
    """Three messages queued on the site, the two for corp.example backed up (then the site
    stopped unless running): their ids by name, and the archive."""
    site.start()
    ids = _queue_three(site)
    archive = tmp_path / "q.kbk"
    site.cli("queue", "backup", str(archive), "--domain", "corp.example")
    if not running:
        site.stop()
    return ids, archive


@pytest.mark.parametrize("running", [True, False], ids=["running", "stopped"])
def test_a_restore_never_brings_back_what_left_the_queue_unless_again(site, tmp_path, running):
    # Restored onto the node it came from while the messages are still queued there:
    # nothing restored. Once they have left the queue (delivered, or deleted), the same
    # backup does not bring them back (a delivered one would go twice) and says why;
    # --again does, on purpose, for a message deleted by mistake.
    ids, archive = _corp_backup(site, tmp_path, running)
    assert "0 message(s) restored, 2 already here" in site.cli("queue", "restore", str(archive)).output
    site.cli("queue", "delete", ids["m1"], ids["m2"], "--yes")
    out = site.cli("queue", "restore", str(archive)).output
    assert "0 message(s) restored, 0 already here, 2 restored here before and gone since" in out and "--again" in out
    assert sorted(site.ids()) == [ids["m3"]]
    out = site.cli("queue", "restore", str(archive), "--again").output
    assert "2 message(s) restored, 0 already here" in out
    assert sorted(site.ids()) == sorted(ids.values())
    assert "0 message(s) restored, 2 already here" in site.cli("queue", "restore", str(archive), "--again").output


def test_restore_interrupted_then_run_again_every_message_once(site, tmp_path, monkeypatch):
    archive, ids = _backup_of(site, tmp_path, 6)
    with SmtpSink("127.0.0.9") as store:
        b = Site(tmp_path, "b", corp=store.address)
        Spool(b.data_dir).close()
        calls = {"n": 0}
        real = QueueOps._append_ledger

        def dies_on_the_fourth(self, qid):
            calls["n"] += 1
            if calls["n"] == 4:  # the 4th queue file is durable, the ledger not yet written
                raise KeyboardInterrupt
            real(self, qid)

        monkeypatch.setattr(QueueOps, "_append_ledger", dies_on_the_fourth)
        assert b.cli("queue", "restore", str(archive), code=1).exit_code == 1
        assert len(b.ids()) == 4
        monkeypatch.setattr(QueueOps, "_append_ledger", real)
        out = b.cli("queue", "restore", str(archive)).output
        assert "2 message(s) restored, 4 already here" in out
        _deliver_all_once(b, store, 6)
        b.stop()


def test_restore_killed_then_run_again_every_message_once(site, tmp_path):
    archive, ids = _backup_of(site, tmp_path, 30)
    with SmtpSink("127.0.0.9") as store:
        b = Site(tmp_path, "b", corp=store.address)
        Spool(b.data_dir).close()
        ledger = b.data_dir / "spool" / "restored"
        proc = subprocess.Popen([sys.executable, "-m", "kanmon", "queue", "restore", str(archive), "-c", str(b.config_file)],
                                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env=dict(os.environ, PYTHONPATH=str(ROOT)))
        try:
            wait_for(lambda: ledger.exists() and ledger.read_bytes().count(b"\n") >= 3, 60, "restore under way")
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        b.cli("queue", "restore", str(archive))
        _deliver_all_once(b, store, 30)
        b.stop()


def _finish_command(output: str) -> list[str]:
    """The command restore printed, as argv for CliRunner (without the program name)."""
    lines = output.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("To finish the move, run on "))
    argv = shlex.split(lines[at + 1])
    assert argv[:3] == ["kanmon", "queue", "delete"]
    return argv[1:]


def test_backup_then_hold_restore_prints_what_finishes_the_move(tmp_path):
    a = Site(tmp_path, "a")
    with SmtpSink("127.0.0.9") as store:
        b = Site(tmp_path, "b", corp=store.address)
        try:
            a.start()
            ids = _queue_three(a)
            archive = tmp_path / "queue.kbk"
            out = a.cli("queue", "backup", str(archive), "--domain", "corp.example", "--then", "hold").output
            assert "2 message(s) written" in out and "2 of them held here" in out
            assert sorted(a.ids("--state", "hold")) == sorted([ids["m1"], ids["m2"]])
            assert a.ids("--state", "deferred") == [ids["m3"]]  # not in the archive: untouched
            a.wait_event("`kanmon queue backup --then hold`")
            a.stop()
            b.start()
            out = b.cli("queue", "restore", str(archive)).output
            assert "2 message(s) restored" in out and "To finish the move, run on mx1.example.test:" in out
            assert "Warning" not in out  # held there: nothing is delivered twice meanwhile
            store.wait_for_messages(2)
            argv = _finish_command(out)
            assert argv == ["queue", "delete", "--ids-from", str(archive), "-c", str(a.config_file)]
            assert "Finish a move" in out and "OLD-NODE-CONFIG" not in out  # or on the old node's console
            # The old relay started again (to flush what is left) delivers none of them.
            a.start()
            a.node.advance(86400)
            a.node.wait_idle()
            result = CliRunner().invoke(main, argv)  # exactly as printed, its -c included
            assert result.exit_code == 0, result.output
            assert "2 message(s) deleted" in result.output
            assert a.ids() == [ids["m3"]]
            b.node.wait_idle()
            assert len(store.messages) == 2
        finally:
            a.stop()
            b.stop()


@pytest.mark.parametrize("running", [True, False], ids=["running", "stopped"])
def test_a_backup_restored_onto_the_node_it_came_from_prints_no_delete_command(site, tmp_path, running):
    # The command would delete here what was just restored. Another node of the same
    # hostname (a replacement) still gets it: test_backup_then_hold_restore_prints_...
    ids, archive = _corp_backup(site, tmp_path, running)
    site.cli("queue", "delete", ids["m1"], ids["m2"], "--yes")  # by mistake
    out = site.cli("queue", "restore", str(archive)).output
    assert "2 message(s) restored" in out and "To finish the move" not in out and "--ids-from" not in out
    assert "Warning" not in out and "The backup was written by this node" in out
    site.cli("queue", "delete", ids["m1"], ids["m2"], "--yes")
    (site.data_dir / "spool" / "restored").unlink()
    r = site.cli_json("queue", "restore", str(archive))
    assert r["finish_command"] is None and r["same_node"] is True and len(r["restored"]) == 2


def test_backup_then_delete_on_a_stopped_node(site, tmp_path):
    site.start()
    ids = _queue_three(site)
    site.stop()
    archive = tmp_path / "q.kbk"
    out = site.cli("queue", "backup", str(archive), "--from", "alice*", "--then", "delete").output
    assert "2 message(s) written" in out and "2 of them deleted here" in out
    assert site.ids() == [ids["m2"]]
    b = Site(tmp_path, "b")
    Spool(b.data_dir).close()
    out = b.cli("queue", "restore", str(archive), "--hold").output
    assert "2 message(s) restored" in out and "Nothing to finish on mx1.example.test" in out
    assert "To finish" not in out
    # Without --then the command names the archive's ids, and warns the copies are still live.
    site.cli("queue", "backup", str(tmp_path / "rest.kbk"), "--state", "all")
    out = b.cli("queue", "restore", str(tmp_path / "rest.kbk"), "--hold").output
    assert "Warning: the backup left these messages queued on mx1.example.test" in out
    site.cli(*_finish_command(out))
    assert site.ids() == []


def test_backup_then_hold_with_no_archive_changes_nothing(site, tmp_path, monkeypatch):
    site.start()
    ids = _queue_three(site)
    monkeypatch.setattr(BackupWriter, "finish", lambda self: (_ for _ in ()).throw(OSError(28, "No space left")))
    archive = tmp_path / "q.kbk"
    assert "No space left" in site.cli("queue", "backup", str(archive), "--then", "hold", code=1).output
    assert not archive.exists() and not (tmp_path / "q.kbk.partial").exists()
    assert site.ids("--state", "hold") == [] and sorted(site.ids()) == sorted(ids.values())
    # Back on their schedule: the next retry still happens.
    before = {r["id"]: r["attempts"] for r in site.cli_json("queue", "list")["items"]}
    site.node.advance(3600)
    site.node.wait_idle()
    after = {r["id"]: r["attempts"] for r in site.cli_json("queue", "list")["items"]}
    assert all(after[q] > before[q] for q in before)


def test_ids_from_a_list_file(site, tmp_path):
    site.start()
    ids = _queue_three(site)
    listing = tmp_path / "ids.txt"
    listing.write_text(f"{ids['m1']}\n{ids['m3']}  \n")
    assert "2 message(s) held" in site.cli("queue", "hold", "--ids-from", str(listing)).output
    assert sorted(site.ids("--state", "hold")) == sorted([ids["m1"], ids["m3"]])
    listing.write_text("not-an-id\n")
    assert "not a queue id" in site.cli("queue", "delete", "--ids-from", str(listing), code=2).output


# -- drain -------------------------------------------------------------------------------------


def test_drain_to_a_second_instance(tmp_path):
    a = Site(tmp_path, "a")
    target = Site(tmp_path, "b")
    # b: corp.example is a local domain with three mailboxes (u9 is not one).
    target.config_file.write_text(target.config_file.read_text().replace(
        'name = "corp.example"\ndeliver = "relay"\nservers = ["%s"]\ntls = "none"' % target.corp,
        'name = "corp.example"\nmailboxes = ["u1", "u2", "u3"]'))
    try:
        target.start()
        a.start()
        m1 = a.send("alice@example.test", ["u1@corp.example"], "d1")
        m2 = a.send("alice@example.test", ["u2@corp.example", "u9@corp.example"], "d2")
        m3 = a.send("bob@example.test", ["u3@corp.example"], "d3")
        to = f"--to=127.0.0.1:{target.port}"
        out = a.cli("queue", "drain", to, "--from", "alice*", "--tls", "none", "--yes", code=1).output
        assert "1 message(s) delivered" in out and f"kept {m2}: <u9@corp.example> 550 5.1.1" in out
        assert sorted(a.ids()) == sorted([m2, m3])
        # What the new relay took is not sent again; what it refused stays here.
        assert [r["rcpts"] for r in a.cli_json("queue", "list") ["items"] if r["id"] == m2] == [["u9@corp.example"]]
        a.wait_event("admin: drain 1 message(s) by `kanmon queue drain`")
        a.stop()
        out = a.cli("queue", "drain", to, "--rcpt", "u3@*", "--tls", "none", "--yes").output  # stopped node
        assert "1 message(s) delivered" in out and a.ids() == [m2]
        target.node.wait_idle()
        for box in ("u1", "u2", "u3"):
            assert len(maildir_messages(target.data_dir, f"{box}@corp.example")) == 1
        assert m1 not in a.ids() and m3 not in a.ids()
    finally:
        a.stop()
        target.stop()


def test_drain_needs_a_selection_asks_and_has_a_dry_run(tmp_path):
    a = Site(tmp_path, "a")
    target = Site(tmp_path, "b", corp=None)
    target.config_file.write_text(target.config_file.read_text().replace(
        'name = "corp.example"\ndeliver = "relay"\nservers = ["%s"]\ntls = "none"' % target.corp,
        'name = "corp.example"\nmailboxes = ["u1", "u2", "u3"]'))
    try:
        target.start()
        a.start()
        m1 = a.send("alice@example.test", ["u1@corp.example"], "d1")
        m2 = a.send("bob@example.test", ["u2@corp.example"], "d2")
        m3 = a.send("bob@example.test", ["u3@corp.example"], "d3")
        a.cli("queue", "hold", m3)
        to = f"--to=127.0.0.1:{target.port}"
        # Nothing selected: refused, like delete and bounce.
        assert "give queue ids, filters or --all" in a.cli("queue", "drain", to, code=2).output
        assert "give queue ids or filters" in a.cli("queue", "delete", code=2).output
        # --dry-run lists what would move and moves nothing.
        out = a.cli("queue", "drain", to, "--all", "--dry-run").output
        assert "2 message(s) match; would move to 127.0.0.1:" in out and m1 in out and m2 in out and m3 not in out
        assert a.cli_json("queue", "drain", to, "--from", "bob*", "--dry-run")["ids"] == [m2]
        assert sorted(a.cli_json("queue", "drain", to, "--state", "all", "--dry-run")["ids"]) == sorted([m1, m2])
        # A filter match without --yes and without a terminal to ask on: refused.
        out = a.cli("queue", "drain", to, "--all", "--tls", "none", code=1).output
        assert "2 message(s) match; not moving them without --yes" in out
        assert sorted(a.ids()) == sorted([m1, m2, m3])
        out = a.cli("queue", "drain", to, "--all", "--tls", "none", "--yes").output
        assert "2 message(s) delivered" in out and a.ids() == [m3]  # held: only when named by id
        out = a.cli("queue", "drain", to, m3, "--tls", "none").output  # by id: at once
        assert "1 message(s) delivered" in out and a.ids() == []
    finally:
        a.stop()
        target.stop()


def test_drain_asks_in_a_terminal(site):
    site.start()
    ids = _queue_three(site)
    site.stop()
    child = _spawn(site, "queue", "drain", "--to", "127.0.0.1:9", "--from", "alice*")
    try:
        child.expect("2 message\\(s\\) match.")
        child.expect(r"Move them to 127.0.0.1:9\? \[y/N\]")
        child.sendline("n")
        child.expect("Nothing done.")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0 and sorted(site.ids()) == sorted(ids.values())


# -- maintenance -------------------------------------------------------------------------------

MAINTENANCE = """
[[maintenance]]
schedule = "0 5 * * *"
action = "delete"
older_than = "4d"

[[maintenance]]
schedule = "0 6 * * *"
action = "delete"
reason = "User unknown|5\\\\.1\\\\.1"
"""


def test_both_maintenance_examples_fire_on_an_advanced_clock(tmp_path):
    with SmtpSink("127.0.0.8") as other:
        other.rcpt_replies = {"ghost@other.example": "450 4.1.1 <ghost@other.example>: Recipient address rejected: User unknown"}
        s = Site(tmp_path, "a", other=other.address, extra=MAINTENANCE, start=T0)
        try:
            s.start()
            stale = s.send("alice@example.test", ["u1@corp.example"], "stale")
            ghost = s.send("alice@example.test", ["ghost@other.example"], "ghost")
            jobs = s.cli_json("maintenance", "list")["jobs"]
            assert [(j["name"], j["next_run"]) for j in jobs] == [("job1", T0 + 3600), ("job2", T0 + 7200)]
            assert "would delete" in s.cli("maintenance", "run", "2", "--dry-run").output
            s.node.advance(3600)  # 05:00: job1 runs; nothing is 4 days old yet
            s.wait_event("maintenance job1: delete matched 0, acted on 0")
            s.node.advance(3600)  # 06:00: job2 deletes the "User unknown" message
            line = s.wait_event("maintenance job2: delete matched 1, acted on 1")
            assert ghost in line and sorted(s.ids()) == [stale]
            s.node.advance(4 * 86400)  # the 05:00 run after 4 days takes the stale one
            line = s.wait_event("maintenance job1: delete matched 1")
            assert stale in line and s.ids() == []
            assert any(f"{stale}: deleted by administrator (`maintenance job1`)" in e for e in s.events())
            s.stop()
            listing = s.cli("maintenance", "list").output  # stopped: next runs from the system clock
            assert '1. job1: "0 5 * * *" delete deferred messages older than 4d;' in listing  # not 345600s
            assert "last run" in listing and "(scheduled), 0s: delete matched 1, acted on 1" in listing
            assert "job2: matched 0, acted on 0" not in s.cli("maintenance", "run", "job2").output
            assert "no maintenance job 'nope'" in s.cli("maintenance", "run", "nope", code=1).output
        finally:
            s.stop()


def test_malformed_schedule_is_a_config_error_naming_the_key(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[[maintenance]]\nschedule = "0 5 * * *"\naction = "flush"\n\n'
                   '[[maintenance]]\nschedule = "0 25 * * *"\naction = "delete"\nolder_than = "4d"\n'
                   '[[maintenance]]\nschedule = "0 6 * * *"\naction = "delete"\nreason = "User (unknown"\n')
    for cmd in (["config", "check"], ["serve"]):
        r = subprocess.run([sys.executable, "-m", "kanmon", *cmd, "-c", str(bad)], capture_output=True, text=True,
                           cwd=ROOT, timeout=30)
        assert r.returncode == 2
        assert "maintenance[1].schedule (line 6): hour: 25 is out of range 0-23" in r.stderr
        assert "maintenance[2].reason" in r.stderr and "not a regular expression" in r.stderr


# -- the control socket and the lock -------------------------------------------------------------


def test_control_socket_is_owner_only_and_the_lock_keeps_others_out(site, monkeypatch):
    site.start()
    sock = site.data_dir / "control.sock"
    assert stat.S_ISSOCK(sock.stat().st_mode) and stat.S_IMODE(sock.stat().st_mode) == 0o600
    with pytest.raises(LockBusy):
        DataDirLock(site.data_dir).acquire()
    with ControlClient(site.data_dir) as c:
        assert c.request("nonsense")["ok"] is False
        assert c.request("list", {"filters": {"ids": ["../x"]}})["error"].startswith("not a queue id")
    # A second server on the same data_dir does not start while the first runs.
    monkeypatch.setattr(admin_service, "LOCK_WAIT", 0.2)
    second = RunningNode(parse_config(site.config_file.read_text().replace(str(site.port), str(free_port()))),
                         clock=ManualClock(T0))
    with pytest.raises(RuntimeError, match="held by another kanmon process"):
        second.start()
    second.stop()
    site.stop()
    assert not sock.exists()
    lock = DataDirLock(site.data_dir)
    lock.acquire()  # free again
    lock.release()


def test_a_second_serve_says_at_once_that_it_waits_for_the_lock_and_starts_once_it_is_free(tmp_path):
    """A restart whose old process is still finishing: the new `kanmon serve` says on
    stderr at once which process holds the lock and how long it waits (it said nothing
    for 30 s, then refused), and starts as soon as the old one has exited."""
    s = Site(tmp_path, "a")
    first = KanmonProcess(s.config_file, "127.0.0.1", s.port).start()
    second = subprocess.Popen([sys.executable, "-m", "kanmon", "serve", "-c", str(s.config_file), "--quiet"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    lines: list[str] = []

    def read() -> None:
        assert second.stderr is not None
        for line in second.stderr:
            lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        wait_for(lambda: any("waiting up to" in line for line in lines), 20, "the second serve to say it waits")
        assert first.proc is not None and first.proc.poll() is None  # said while the holder still runs
        (said,) = lines
        assert said.startswith(f"kanmon: {s.data_dir / 'kanmon.lock'} is held by another kanmon process "
                               f"(pid {first.proc.pid}); waiting up to 30 s for it to finish"), said
        first.terminate()
        wait_banner("127.0.0.1", s.port, 30)  # the second serves
        assert second.poll() is None
        second.terminate()
        assert second.wait(20) == 0, lines
    finally:
        first.kill()
        if second.poll() is None:
            second.kill()
        second.wait(10)
        reader.join(10)  # EOF once the second has exited
        second.stderr.close()


def test_serve_keeps_the_lock_it_waited_for_until_its_node_has_it(tmp_path, monkeypatch):
    """`kanmon serve` waits for the lock before its event loop and keeps it for the node:
    it never takes it for a moment and lets it go (a probe, during which another
    process's acquire(wait=0) is refused), and no offline command can take it between
    the wait and the node's start."""
    import kanmon.node

    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o700)
    seen: dict = {}

    class StubNode:
        def __init__(self, config, **kw):
            try:
                other = DataDirLock(data_dir)
                other.acquire(wait=0)
                other.release()
                seen["free"] = True
            except LockBusy:
                seen["free"] = False
            lock = kw.get("data_dir_lock")
            seen["handed"] = lock is not None and lock.held
            self.started = asyncio.Event()

        async def run(self) -> None:
            return None

    monkeypatch.setattr(kanmon.node, "Node", StubNode)
    config = parse_config(f'[server]\ndata_dir = "{data_dir}"\n')
    umask = os.umask(0o022)
    try:
        assert kanmon.node.run_node(config, echo=None) == 0
    finally:
        os.umask(umask)  # run_node makes it 077, for a serve; not for the other tests of this worker
    assert seen == {"free": False, "handed": True}
    lock = DataDirLock(data_dir)
    lock.acquire(wait=0)  # let go when serve ends
    lock.release()


def test_a_serve_waiting_for_the_lock_ends_at_once_on_sigterm(tmp_path):
    """The wait happens before the event loop: SIGTERM (a `systemctl stop`) ends it at
    once, not after the 30 s it would otherwise wait."""
    s = Site(tmp_path, "a")
    first = KanmonProcess(s.config_file, "127.0.0.1", s.port).start()
    second = subprocess.Popen([sys.executable, "-m", "kanmon", "serve", "-c", str(s.config_file), "--quiet"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert second.stderr is not None
        line = second.stderr.readline()  # blocks until it says it waits
        assert "waiting up to 30 s" in line, line
        second.terminate()
        second.wait(10)  # well inside the 30 s wait: a TimeoutExpired here is the defect
        assert first.proc is not None and first.proc.poll() is None  # the holder never let go
    finally:
        first.kill()
        if second.poll() is None:
            second.kill()
        second.wait(10)
        second.stderr.close()


def test_serve_and_cli_as_processes(tmp_path):
    s = Site(tmp_path, "a")
    s.config_file.write_text(s.config_file.read_text().replace("workers = 0", "workers = 1"))
    proc = KanmonProcess(s.config_file, "127.0.0.1", s.port).start()

    def kanmon(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "kanmon", *args, "-c", str(s.config_file)], capture_output=True,
                              text=True, cwd=ROOT, timeout=30)

    try:
        for n in (1, 2):
            with smtplib.SMTP("127.0.0.1", s.port, timeout=60) as c:
                c.sendmail("alice@example.test", [f"u{n}@corp.example"], f"Subject: p{n}\r\n\r\nx\r\n")

        def listed() -> list[dict]:
            return json.loads(kanmon("queue", "list", "--json").stdout)["items"]

        wait_for(lambda: len(listed()) == 2 and all(r["attempts"] for r in listed()), 60, "two deferred")
        first = listed()[0]["id"]
        r = kanmon("queue", "delete", first)
        assert r.returncode == 0 and "1 message(s) deleted" in r.stdout
        assert [x["id"] for x in listed()] != [] and first not in [x["id"] for x in listed()]
    finally:
        proc.terminate()
    r = kanmon("queue", "list", "--json")  # stopped: on the spool
    assert r.returncode == 0 and len(json.loads(r.stdout)["items"]) == 1


def test_corrupt_entries_listed_and_deleted(site):
    spool_queue = site.data_dir / "spool" / "queue"
    spool_queue.mkdir(parents=True)
    bad = "1M1C97Q7ZXJ5SSD"
    (spool_queue / bad).write_bytes(b"KANMON-Q1 10 10 00000000\nnot a message")
    site.start()  # recovery moves it to spool/corrupt/
    (row,) = site.cli_json("queue", "list", "--state", "corrupt")["items"]
    assert row["id"] == bad and "#" in site.cli("queue", "list").output
    assert site.ids("--from", "anyone") == []  # no envelope: only ids and --state find it
    assert "1 message(s) deleted" in site.cli("queue", "delete", "--state", "corrupt", "--yes").output
    assert site.ids("--state", "corrupt") == [] and not (site.data_dir / "spool" / "corrupt" / bad).exists()
    site.wait_event(f"{bad}: deleted by administrator")


def test_an_entry_damaged_while_running_is_set_aside_listed_and_deleted(site):
    # Valid JSON around a wrong type (the checksum fits), and a checksum-corrupt file:
    # neither stops `queue list` (which answers from the node's index, reading no file);
    # both go to spool/corrupt/ with a critical event when the queue manager reaches
    # them, are listed as corrupt and deleted by id.
    import zlib

    site.start()
    typed = site.send("alice@example.test", ["u1@corp.example"], "typed")
    flipped = site.send("alice@example.test", ["u1@corp.example"], "flipped")
    queue = site.data_dir / "spool" / "queue"
    envelope, content = b'{"from": "a@b", "rcpts": [12345], "at": "yesterday"}', b"Subject: typed\r\n\r\nx\r\n"
    crc = zlib.crc32(content, zlib.crc32(envelope))
    (queue / typed).write_bytes(b"KANMON-Q1 %d %d %08x\n" % (len(envelope), len(content), crc) + envelope + b"\n"
                                + content)
    data = bytearray((queue / flipped).read_bytes())
    data[-3] ^= 0x20
    (queue / flipped).write_bytes(bytes(data))
    rows = {r["id"]: r["state"] for r in site.cli_json("queue", "list")["items"]}
    assert rows[typed] == rows[flipped] == "deferred"  # as the index knew them: no file read for a listing
    site.node.advance(3600)  # the retry is due: the queue manager reads both back
    site.node.wait_idle()
    wait_for(lambda: not (queue / flipped).exists(), 60, "the checksum-corrupt file set aside")
    assert {typed, flipped} <= set(site.spool_corrupt())
    rows = {r["id"]: r["state"] for r in site.cli_json("queue", "list")["items"]}
    assert rows[typed] == rows[flipped] == "corrupt"
    for qid in (typed, flipped):
        site.wait_event(f"{qid}: corrupt queue file moved to spool/corrupt/")
    assert "1 message(s) deleted" in site.cli("queue", "delete", typed, "--yes").output
    assert "1 message(s) deleted" in site.cli("queue", "delete", flipped, "--yes").output
    assert site.spool_corrupt() == [] and site.ids() == []
