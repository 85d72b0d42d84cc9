"""Alert mail: every category triggered for real, the mail received by a sink
on loopback (the alert recipient's domain is relayed to it), rate limiting on a clock the
test advances, `kanmon alert test` and `kanmon alert list`."""

from __future__ import annotations

import asyncio
import datetime
import email
import email.policy
import json
import re
import subprocess
import sys
from email.message import Message

import smtplib

import pytest
import trustme

from kanmon.alerts import CHECK_INTERVAL
from kanmon.clock import ManualClock
from kanmon.config import parse_config
from kanmon.control import ControlClient
from kanmon.records.events import ScannerFailed
from kanmon.records.query import search_events
from tests.support.dnsserver import DnsServer
from tests.support.kanmon_node import RunningNode, free_port, wait_for
from tests.support.smtpsink import SmtpSink

NODE = """
[server]
hostname = "mx1.example.test"
data_dir = "{data_dir}"
[smtp]
listen = ["127.0.0.1:{port}"]
relay_networks = ["127.0.0.0/8"]
min_free_disk = "1MB"
{tls}
[[domain]]
name = "example.test"
mailboxes = ["alice", "bob"]
[[domain]]
name = "admin.example"
deliver = "relay"
servers = ["{admin}"]
tls = "none"
[[domain]]
name = "corp.example"
deliver = "relay"
servers = [{corp}]
tls = "none"
[[domain]]
name = "down.example"
deliver = "relay"
servers = ["127.0.0.1:1"]
tls = "none"
[outbound]
connect_timeout = "2s"
[queue]
retry = "5m..1h"
[alerts]
to = ["admin@admin.example"]
from = "kanmon@mx1.example.test"
min_interval = "1h"
{alerts}
{extra}
"""


@pytest.fixture
def admin_sink():
    with SmtpSink("127.0.0.1") as sink:
        yield sink


def start(tmp_path, admin_sink, *, corp=("127.0.0.1:1",), alerts="", tls="", extra="", clock=None,
          before_start=None) -> RunningNode:
    text = NODE.format(
        data_dir=tmp_path / "data", port=free_port(), admin=admin_sink.address,
        corp=", ".join(f'"{c}"' for c in corp), alerts=alerts, tls=tls, extra=extra,
    )
    (tmp_path / "kanmon.toml").write_text(text)
    node = RunningNode(parse_config(text), clock=clock or ManualClock())
    if before_start:
        before_start(node)
    return node.start()


def alert_mails(sink: SmtpSink, category: str | None = None) -> list[Message]:
    out = []
    for m in sink.messages:
        msg = email.message_from_bytes(m.data)
        if m.rcpts == ["admin@admin.example"] and (category is None or msg["X-Kanmon-Alert"] == category):
            out.append(msg)
    return out


def wait_alert(sink: SmtpSink, category: str, count: int = 1, timeout: float = 15.0) -> list[Message]:
    wait_for(lambda: len(alert_mails(sink, category)) >= count, timeout, f"{count} {category} alert mail(s)")
    return alert_mails(sink, category)


def subject(msg: Message) -> str:
    """The Subject as a reader sees it: unfolded (RFC 5322 2.2.3) and decoded, by the email package."""
    return str(email.policy.default.header_fetch_parse("Subject", msg["Subject"])).strip()


def body(msg: Message) -> str:
    return msg.get_payload(decode=True).decode()


def send(node: RunningNode, rcpt: str, subject: str = "test") -> None:
    msg = f"From: alice@example.test\r\nSubject: {subject}\r\nMessage-ID: <{subject}@example.test>\r\n\r\nhello\r\n"
    with smtplib.SMTP(node.host, node.port, timeout=10) as s:
        s.sendmail("alice@example.test", [rcpt], msg)


def wait_event(node: RunningNode, needle: str, timeout: float = 15.0) -> None:
    def look() -> bool:
        node.flush()
        return any(needle in e.text for e in search_events(node.data_dir))

    wait_for(look, timeout, f"event containing {needle!r}")


def next_check(node: RunningNode, seconds: float = CHECK_INTERVAL) -> None:
    """Move the clock once the alerts' check loop sleeps on it, and wait for that round."""
    alerts = node.node.monitoring.alerts
    wait_for(lambda: alerts.checks >= 1, 10, "the first threshold check")
    done = alerts.checks
    node.advance(seconds)
    wait_for(lambda: alerts.checks > done, 10, "the next threshold check")


def test_queue_over_threshold_alert_is_mailed_once_per_interval(tmp_path, admin_sink):
    node = start(tmp_path, admin_sink, alerts="queue_size_above = 3\nqueue_oldest_above = \"1d\"")
    try:
        for n in range(4):
            send(node, "user@down.example", f"stuck{n}")
        wait_event(node, "stat=Deferred")
        node.wait_idle()
        next_check(node)  # sees 4 > 3
        (mail,) = wait_alert(admin_sink, "queue")
        assert subject(mail).startswith("[kanmon mx1.example.test] queue: 4 messages in the queue")
        text = body(mail)
        assert "above the threshold 3" in text and "Since: " in text and "kanmon queue summary" in text
        assert mail["From"] == "kanmon on mx1.example.test <kanmon@mx1.example.test>"
        # Still over the threshold a minute later: noted, not mailed again.
        next_check(node)
        wait_event(node, "alert queue/size (already mailed")
        assert len(alert_mails(admin_sink, "queue")) == 1
        # After min_interval the alert, still true, is mailed again.
        next_check(node, 3600)
        second = wait_alert(admin_sink, "queue", 2)
        assert len(second) == 2
    finally:
        node.stop()


def test_failover_to_the_alternate_and_recovery_are_mailed(tmp_path, admin_sink):
    port = free_port("127.0.0.7")
    primary = SmtpSink("127.0.0.7", port)
    alternate = SmtpSink("127.0.0.17", port)
    primary.stop()
    node = start(tmp_path, admin_sink, corp=(f"127.0.0.7:{port}", f"127.0.0.17:{port}"))
    try:
        send(node, "user@corp.example", "while-down")
        alternate.wait_for_messages(1)
        (mail,) = wait_alert(admin_sink, "delivery")
        assert "relay failover" in subject(mail)
        text = body(mail)
        assert f"127.0.0.7:{port}" in text and "[127.0.0.17]" in text and "Connection refused" in text
        assert "trying next server" in text  # the command to look closer
        primary.start()
        send(node, "user@corp.example", "after-back")
        primary.wait_for_messages(1)
        mails = wait_alert(admin_sink, "delivery", 2)
        assert "resolved: relay recovered" in subject(mails[1])
        assert "Since" not in subject(mails[1]) and "The problem began" in body(mails[1])
    finally:
        node.stop()
        primary.close()
        alternate.close()


def test_certificate_expiring_in_three_days(tmp_path, admin_sink):
    ca = trustme.CA()
    cert = ca.issue_cert("mx1.example.test", not_after=datetime.datetime.now(datetime.timezone.utc)
                         + datetime.timedelta(days=3))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    node = start(tmp_path, admin_sink, tls=f'[tls]\ncert = "{cert_path}"\nkey = "{key_path}"',
                 alerts='cert_expires_within = "14d"')
    try:
        (mail,) = wait_alert(admin_sink, "expiry")  # certificate expiry is an `expiry` alert
        text = subject(mail)
        assert text.startswith("[kanmon mx1.example.test] expiry: our TLS certificate expires in 2d ")
        assert str(cert_path) not in text  # details go in the body: a long path must not fold the subject
        assert f"Certificate: {cert_path}" in body(mail)
        assert f"openssl x509 -noout -subject -enddate -in {cert_path}" in body(mail)
    finally:
        node.stop()


def test_free_disk_threshold_above_the_real_free_space(tmp_path, admin_sink):
    node = start(tmp_path, admin_sink, alerts='disk_free_below = "1000TB"')
    try:
        (mail,) = wait_alert(admin_sink, "disk")
        assert "below the threshold 1000.0 TB" in subject(mail) and str(tmp_path) not in subject(mail)
        assert f"Data directory: {tmp_path / 'data'}" in body(mail)
        assert f"df -h {tmp_path / 'data'}" in body(mail)
    finally:
        node.stop()


def test_injected_stage_failure_and_corrupt_spool_entry_are_critical(tmp_path, admin_sink):
    def corrupt_and_break(node: RunningNode) -> None:
        queue_dir = tmp_path / "data" / "spool" / "queue"
        queue_dir.mkdir(parents=True)
        (queue_dir / "0000000000000BAD").write_bytes(b"not a queue file")

    node = start(tmp_path, admin_sink, before_start=corrupt_and_break)
    try:
        (mail,) = wait_alert(admin_sink, "critical")
        assert "corrupt queue file moved to spool/corrupt/" in subject(mail)

        async def boom(*args, **kwargs):
            raise RuntimeError("injected stage failure")

        node.node.local.deliver = boom
        send(node, "bob@example.test", "doomed")
        mails = wait_alert(admin_sink, "critical", 2)
        assert "delivery agent error: RuntimeError: injected stage failure" in subject(mails[1])
        assert "kanmon trace " in body(mails[1])
    finally:
        node.stop()


def test_dns_check_getting_worse_is_mailed(tmp_path, admin_sink):
    records = {
        "example.test": ["MX 10 mx1.example.test.", 'TXT "v=spf1 ip4:192.0.2.1 -all"'],
        "mx1.example.test": ["A 192.0.2.1"],
    }  # no PTR, no DMARC
    with DnsServer(records=records) as dns:
        extra = f'[dns]\nservers = ["{dns.address}"]\ntimeout = "1s"\n[dnscheck]\nevery = "6h"\ndomains = ["example.test"]\nips = ["192.0.2.1"]'
        node = start(tmp_path, admin_sink, extra=extra)
        try:
            (mail,) = wait_alert(admin_sink, "dns")
            assert "DNS check of example.test" in subject(mail)
            assert "kanmon dns check" in body(mail)
            node.flush()
            listing = subprocess.run([sys.executable, "-m", "kanmon", "alert", "list", "-c", str(tmp_path / "kanmon.toml")],
                                     capture_output=True, text=True, timeout=60)
            lines = [x for x in listing.stdout.splitlines() if "DNS check of" in x]  # active, and recent
            assert len(lines) == 2 and all(x.count("DNS check of example.test") == 1 and x.endswith(": ok -> error")
                                           for x in lines), lines
        finally:
            node.stop()


def test_alert_test_and_list_commands(tmp_path, admin_sink):
    node = start(tmp_path, admin_sink, alerts='categories = ["critical"]')
    try:
        out = subprocess.run(
            [sys.executable, "-m", "kanmon", "alert", "test", "-c", str(tmp_path / "kanmon.toml"), "--category", "queue"],
            capture_output=True, text=True, timeout=60,
        )
        assert out.returncode == 0, out.stderr
        assert "alert mail (queue/test) queued" in out.stdout
        assert re.search(r"\(queue id [0-9A-Za-z]+\)", out.stdout) and "kanmon trace " in out.stdout, out.stdout
        (mail,) = wait_alert(admin_sink, "queue")  # the test button ignores the category list
        assert "test alert (queue)" in subject(mail)
        # ...but says that the real ones of this category are not mailed, as the CLI does.
        assert "note: queue is not in [alerts] categories: real queue alerts are recorded" in out.stdout, out.stdout
        assert "Real queue alerts are NOT mailed: queue is not in [alerts] categories" in body(mail)
        assert "mailed at most once" not in body(mail)
        # A category left out of [alerts] categories is recorded, not mailed.
        node.call(node.node.monitoring.alerts.raise_alert, "disk", "/data", "disk nearly full")
        # A scanner named "test" failing is a real alert, whose key is "test" too.
        node.node.records.record(ScannerFailed("test", "connection refused"))
        wait_event(node, "alert scanner/test")
        node.flush()
        listing = subprocess.run(
            [sys.executable, "-m", "kanmon", "alert", "list", "-c", str(tmp_path / "kanmon.toml"), "--json"],
            capture_output=True, text=True, timeout=60,
        )
        data = json.loads(listing.stdout)
        assert [(a["category"], a["key"]) for a in data["active"]] == [("disk", "/data"), ("scanner", "test")]
        assert {(a["category"], a["state"], a["test"]) for a in data["recent"]} == {
            ("queue", "raised", True), ("disk", "raised", False), ("scanner", "raised", False)}
        assert alert_mails(admin_sink, "disk") == []
        with ControlClient(node.data_dir) as client:  # what `kanmon status` reads
            status = client.request("status")["result"]
        assert sorted((a["category"], a["key"]) for a in status["alerts"]) == [("disk", "/data"), ("scanner", "test")]
    finally:
        node.stop()


def test_a_restart_does_not_mail_again_what_was_mailed_within_the_interval(tmp_path, admin_sink):
    clock = ManualClock()
    node = start(tmp_path, admin_sink, alerts='disk_free_below = "1000TB"', clock=clock)
    try:
        wait_alert(admin_sink, "disk")
        node.wait_idle()  # the alert mail is out of the queue (not redelivered after the restart)
    finally:
        node.stop()
    assert (tmp_path / "data" / "alert-state.json").exists()
    # The same node started again ten minutes later; the disk is still "full".
    node = start(tmp_path, admin_sink, alerts='disk_free_below = "1000TB"', clock=ManualClock(clock.now() + 600))
    try:
        wait_event(node, "alert disk/")
        wait_event(node, "(already mailed")
        assert len({m["Message-ID"] for m in alert_mails(admin_sink, "disk")}) == 1
        next_check(node, 3600)  # past min_interval it is mailed again
        wait_for(lambda: len({m["Message-ID"] for m in alert_mails(admin_sink, "disk")}) == 2, 15, "a second disk mail")
    finally:
        node.stop()


def test_an_alert_whose_state_was_lost_is_not_listed_active_after_the_restart(tmp_path, admin_sink):
    """The disk was full; the state file is damaged while the node is stopped, and the disk
    has room again when it starts: the check finds all well but knows no disk alert to
    clear, so the start says the alert unknown instead of leaving it active for ever."""
    node = start(tmp_path, admin_sink, alerts='disk_free_below = "1000TB"')
    try:
        wait_alert(admin_sink, "disk")
    finally:
        node.stop()
    (tmp_path / "data" / "alert-state.json").write_bytes(b"\x00garbage")
    node = start(tmp_path, admin_sink)
    try:
        next_check(node)  # a round that finds the disk fine has run
        node.flush()
        listing = subprocess.run([sys.executable, "-m", "kanmon", "alert", "list", "-c", str(tmp_path / "kanmon.toml"),
                                  "--json"], capture_output=True, text=True, timeout=60)
        data = json.loads(listing.stdout)
        assert [a["category"] for a in data["active"] if a["category"] != "critical"] == [], data["active"]
        assert [a["state"] for a in data["recent"] if a["category"] == "disk"] == ["raised", "unknown"]
    finally:
        node.stop()


def test_a_damaged_alert_state_file_is_moved_aside_and_the_node_starts(tmp_path, admin_sink):
    def damage(node: RunningNode) -> None:
        (tmp_path / "data").mkdir(parents=True, exist_ok=True)
        (tmp_path / "data" / "alert-state.json").write_bytes(b"\x00garbage")

    node = start(tmp_path, admin_sink, before_start=damage)
    try:
        send(node, "bob@example.test", "still-works")
        wait_event(node, "stat=Sent")
        (mail,) = wait_alert(admin_sink, "critical")
        assert "alerts: the saved alert state" in subject(mail) and "is damaged" in body(mail)
        assert list((tmp_path / "data").glob("alert-state.json.damaged-*"))
    finally:
        node.stop()


def reload_now(node: RunningNode, config) -> None:
    asyncio.run_coroutine_threadsafe(node.node.reload(config), node.loop).result(60)


def status_alerts(node: RunningNode) -> list[tuple[str, str]]:
    with ControlClient(node.data_dir) as client:  # what `kanmon status` reads
        doc = client.request("status")["result"]
    return [(a["category"], a["key"]) for a in doc["alerts"]]


def test_a_refused_reload_is_resolved_by_a_reload_that_takes_effect(tmp_path, admin_sink):
    """The critical "reload refused" alert ends when a later reload takes effect: `kanmon
    status` is healthy again at once (not an hour later), `alert list` shows it cleared,
    and the administrator, who had its mail, gets a "resolved" mail."""
    from kanmon.node import ReloadError

    node = start(tmp_path, admin_sink)
    try:
        good = node.node.config
        moved = parse_config((tmp_path / "kanmon.toml").read_text().replace(str(tmp_path / "data"),
                                                                              str(tmp_path / "elsewhere")))
        with pytest.raises(ReloadError):
            reload_now(node, moved)
        (mail,) = wait_alert(admin_sink, "critical")
        assert "reload refused" in subject(mail)
        wait_for(lambda: [c for c, _k in status_alerts(node)] == ["critical"], 15, "the alert in the status")
        reload_now(node, good)
        mails = wait_alert(admin_sink, "critical", 2)
        assert "resolved: reload: new configuration in effect" in subject(mails[1])
        assert "The alert it resolves: error event: reload refused" in body(mails[1])
        assert status_alerts(node) == []
        node.flush()
        listing = subprocess.run([sys.executable, "-m", "kanmon", "alert", "list", "-c", str(tmp_path / "kanmon.toml"),
                                  "--json"], capture_output=True, text=True, timeout=60)
        data = json.loads(listing.stdout)
        assert data["active"] == []
        assert [a["state"] for a in data["recent"] if a["category"] == "critical"] == ["raised", "cleared"]
    finally:
        node.stop()


def test_the_records_alert_is_resolved_when_the_database_takes_writes_again(tmp_path, admin_sink):
    """The writer says the database refuses writes (as its failing commit does); its next
    write works and says "takes writes again": that ends the `records` alert."""
    node = start(tmp_path, admin_sink)
    try:
        records = node.node.records
        node.call(records._fail, "records database: writes fail (injected)")  # the alert is raised before the next write
        (mail,) = wait_alert(admin_sink, "records")
        assert "writes fail (injected)" in subject(mail)
        mails = wait_alert(admin_sink, "records", 2)
        assert "resolved: records: the database takes writes again" in subject(mails[1])
        assert status_alerts(node) == []
    finally:
        node.stop()


def test_lists_show_an_alerts_real_text_shortened_not_its_masked_key(tmp_path, admin_sink):
    """A critical alert's key is its event's line with the digits masked and cut at 80
    characters (the same failure again is the same alert); `alert list` and `kanmon
    status` show the line itself, cut at a word with "...", escaped."""
    from kanmon.records.events import ReloadFailed

    node = start(tmp_path, admin_sink)
    try:
        reason = ("mr1.toml: session_profile[0].greylist: cannot listen on 192.0.2.1:25: Address not available "
                  "(the address is not on this host: check [smtp] listen) \x1b[31m")
        node.node.records.record(ReloadFailed(reason))
        wait_alert(admin_sink, "critical")
        node.flush()
        config = str(tmp_path / "kanmon.toml")
        listing = subprocess.run([sys.executable, "-m", "kanmon", "alert", "list", "-c", config],
                                 capture_output=True, text=True, timeout=60).stdout
        status = subprocess.run([sys.executable, "-m", "kanmon", "status", "-c", config],
                                capture_output=True, text=True, timeout=60).stdout
        for out in (listing, status):
            lines = [x for x in out.splitlines() if "reload refused" in x]
            assert lines, out
            for line in lines:
                assert "#" not in line and "session_profile[0].greylist: cannot listen on 192.0.2.1:25:" in line, line
                assert line.endswith("...") and not line.endswith(" ...") and "\x1b" not in line, line
                assert "error event: reload refused" in line
    finally:
        node.stop()


def test_alert_mail_is_sent_from_the_null_sender(tmp_path, admin_sink):
    """The envelope sender is <> (as DSNs, FortiMail's and Postfix's notices): a store that
    refuses our own domain as sender from outside its relay_networks takes it; [alerts]
    from is the From: header."""
    node = start(tmp_path, admin_sink, alerts='disk_free_below = "1000TB"')
    try:
        wait_alert(admin_sink, "disk")
        (tx,) = [m for m in admin_sink.messages if m.rcpts == ["admin@admin.example"]]
        assert tx.mail_from == ""
        assert "<kanmon@mx1.example.test>" in email.message_from_bytes(tx.data)["From"]
    finally:
        node.stop()


REFUSED = "550 5.7.1 <admin@admin.example>: Recipient address rejected: not logged in"


def test_an_alert_mail_that_bounces_is_recorded_and_the_test_command_says_so(tmp_path, admin_sink):
    """Alert mail from <> gets no bounce: its failure is recorded (alert-not-mailed, an
    "undelivered" alert event that `alert list` shows) and `kanmon alert test` waits for
    the delivery outcome and exits 1."""
    admin_sink.rcpt_replies = {"admin@admin.example": REFUSED}
    node = start(tmp_path, admin_sink, alerts='disk_free_below = "1000TB"')
    try:
        wait_event(node, "alert disk/")
        wait_event(node, "alert not mailed (not delivered to <admin@admin.example>: 550 5.7.1")
        wait_event(node, "mail not delivered: alert mail ")
        out = subprocess.run(
            [sys.executable, "-m", "kanmon", "alert", "test", "-c", str(tmp_path / "kanmon.toml"), "--category", "dns"],
            capture_output=True, text=True, timeout=60,
        )
        assert out.returncode == 1, (out.stdout, out.stderr)
        assert "alert mail (dns/test) queued" in out.stdout
        assert "kanmon: delivery: bounced for admin@admin.example (550 5.7.1" in out.stdout, out.stdout
        wait_event(node, "alert dns/test mail not delivered: alert mail ")  # the watcher's next look
        listing = subprocess.run(
            [sys.executable, "-m", "kanmon", "alert", "list", "-c", str(tmp_path / "kanmon.toml"), "--json"],
            capture_output=True, text=True, timeout=60,
        )
        data = json.loads(listing.stdout)
        assert [(a["category"], a["state"]) for a in data["active"]] == [("disk", "raised")]  # still active
        undelivered = [(a["category"], a["test"]) for a in data["recent"] if a["state"] == "undelivered"]
        assert ("disk", False) in undelivered and ("dns", True) in undelivered
        text = subprocess.run(
            [sys.executable, "-m", "kanmon", "alert", "list", "-c", str(tmp_path / "kanmon.toml")],
            capture_output=True, text=True, timeout=60,
        ).stdout
        assert "undelivered" in text and "not delivered to <admin@admin.example>: 550 5.7.1" in text, text
    finally:
        node.stop()


def test_the_test_command_reports_the_delivery(tmp_path, admin_sink):
    node = start(tmp_path, admin_sink)
    try:
        out = subprocess.run(
            [sys.executable, "-m", "kanmon", "alert", "test", "-c", str(tmp_path / "kanmon.toml")],
            capture_output=True, text=True, timeout=60,
        )
        assert out.returncode == 0, (out.stdout, out.stderr)
        assert "kanmon: delivery: delivered to admin@admin.example" in out.stdout, out.stdout
    finally:
        node.stop()


def test_a_reload_of_smtp_min_free_disk_moves_the_disk_alert_at_once(tmp_path, admin_sink):
    """The disk alert's threshold defaults to [smtp] min_free_disk: a reload that raises it
    (SMTP refuses with 452 4.3.1 at once) raises the disk alert too, without a restart."""
    node = start(tmp_path, admin_sink)
    try:
        next_check(node)
        assert alert_mails(admin_sink, "disk") == []
        text = (tmp_path / "kanmon.toml").read_text().replace('min_free_disk = "1MB"', 'min_free_disk = "1000TB"')
        reload_now(node, parse_config(text))
        (mail,) = wait_alert(admin_sink, "disk")  # on the clock the test never moves again
        assert "below the threshold" in body(mail)
    finally:
        node.stop()


def test_a_reload_that_adds_an_archive_quota_checks_it_at_once(tmp_path, admin_sink):
    arch = tmp_path / "archive"
    (arch / "new").mkdir(parents=True)
    (arch / "new" / "1.eml").write_bytes(b"x" * 4096)
    node = start(tmp_path, admin_sink, extra=f'[archive]\nmaildir = "{arch}"\n')
    try:
        next_check(node)
        assert alert_mails(admin_sink, "archive") == []
        text = (tmp_path / "kanmon.toml").read_text() + 'quota = "4KB"\n'
        reload_now(node, parse_config(text))
        (mail,) = wait_alert(admin_sink, "archive")
        assert "of its quota" in body(mail)
    finally:
        node.stop()


def test_the_test_command_sends_to_another_address_with_to(tmp_path, admin_sink):
    node = start(tmp_path, admin_sink, alerts='categories = ["critical"]')
    try:
        config = str(tmp_path / "kanmon.toml")
        bad = subprocess.run([sys.executable, "-m", "kanmon", "alert", "test", "-c", config, "--to", "x@y>, z@w"],
                             capture_output=True, text=True, timeout=60)
        assert bad.returncode == 2 and "--to" in bad.stderr and "is not a mail address" in bad.stderr, bad.stderr
        out = subprocess.run([sys.executable, "-m", "kanmon", "alert", "test", "-c", config, "--to", "other@admin.example"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, (out.stdout, out.stderr)
        assert "delivered to other@admin.example" in out.stdout, out.stdout
        assert "note:" not in out.stdout  # critical is mailed
        (tx,) = [m for m in admin_sink.messages if m.rcpts == ["other@admin.example"]]
        msg = email.message_from_bytes(tx.data)
        assert msg["To"] == "other@admin.example" and "alert mail reaches <other@admin.example>" in body(msg)
        assert "Real critical alerts are mailed at most once every 1h" in body(msg)
        assert alert_mails(admin_sink) == []  # nothing to [alerts] to
    finally:
        node.stop()
