"""The delivery engine, end to end: a kanmon node with real sinks, a real DNS
server on loopback and a clock the tests advance (no sleeps for retries or notices)."""

from __future__ import annotations

import asyncio
import email
import smtplib

import trustme

from kanmon.clock import ManualClock
from kanmon.config import parse_config
from kanmon.records.query import search_events
from tests.support.dnsserver import DnsServer
from tests.support.kanmon_node import RunningNode, free_port, maildir_messages, wait_for
from tests.support.smtpsink import SmtpSink, tls_server_context

NODE = """
[server]
hostname = "mx1.example.test"
data_dir = "{data_dir}"
[smtp]
listen = ["{host}:{port}"]
relay_networks = ["127.0.0.0/8"]
min_free_disk = "1MB"
[[domain]]
name = "example.test"
mailboxes = ["alice", "bob"]
[[domain]]
name = "corp.example"
deliver = "relay"
servers = [{servers}]
tls = "{corp_tls}"
[outbound]
tls = "{out_tls}"
mx_port = {mx_port}
connect_timeout = "2s"
command_timeout = "5s"
data_timeout = "5s"
{smarthost}
[dns]
servers = ["{dns}"]
timeout = "1s"
[queue]
retry = "5m..1h"
warn_after = "{warn_after}"
lifetime = "{lifetime}"
"""


def start_node(tmp_path, *, servers=(), dns="127.0.0.1:1", mx_port=25, corp_tls="opportunistic",
               out_tls="opportunistic", warn_after="4h", lifetime="3d", smarthost="", data_dir=None,
               port=None, clock=None) -> RunningNode:
    text = NODE.format(
        data_dir=data_dir or tmp_path / "data", host="127.0.0.1", port=port or free_port(),
        servers=", ".join(f'"{s}"' for s in servers) or '"127.0.0.1:1"', corp_tls=corp_tls, out_tls=out_tls,
        mx_port=mx_port, smarthost=smarthost, dns=dns, warn_after=warn_after, lifetime=lifetime,
    )
    return RunningNode(parse_config(text), clock=clock or ManualClock()).start()


def send(node: RunningNode, rcpts, sender="alice@example.test", subject="test") -> None:
    msg = f"From: {sender or 'MAILER-DAEMON'}\r\nSubject: {subject}\r\nMessage-ID: <{subject}@example.test>\r\n\r\nhello\r\n"
    with smtplib.SMTP(node.host, node.port, timeout=10) as s:
        assert s.sendmail(sender, list(rcpts), msg) == {}


def events(node: RunningNode) -> list[str]:
    node.flush()
    return [e.text for e in search_events(node.data_dir)]


def wait_event(node: RunningNode, needle: str, timeout: float = 10.0) -> str:
    found: list[str] = []

    def look() -> bool:
        found[:] = [t for t in events(node) if needle in t]
        return bool(found)

    wait_for(look, timeout, f"event containing {needle!r}")
    return found[0]


def notices_for(node: RunningNode, address: str) -> list[email.message.Message]:
    return [email.message_from_bytes(m) for m in maildir_messages(node.data_dir, address)]


# -- routing with failover -------------------------------------------------------------


def test_primary_down_alternate_takes_it_then_primary_back(tmp_path):
    port = free_port("127.0.0.7")
    primary = SmtpSink("127.0.0.7", port)
    alternate = SmtpSink("127.0.0.17", port)
    primary.stop()
    node = start_node(tmp_path, servers=[f"127.0.0.7:{port}", f"127.0.0.17:{port}"])
    try:
        send(node, ["user@corp.example"], subject="while-down")
        (m,) = alternate.wait_for_messages(1)
        assert m.rcpts == ["user@corp.example"] and b"Subject: while-down" in m.data
        line = wait_event(node, "to=<user@corp.example>")
        assert "relay=[127.0.0.17]" in line and "stat=Sent (250 2.0.0" in line
        primary.start()
        send(node, ["user@corp.example"], subject="after-back")
        (m,) = primary.wait_for_messages(1)
        assert b"Subject: after-back" in m.data
        assert len(alternate.messages) == 1
    finally:
        node.stop()
        primary.close()
        alternate.close()


def test_all_servers_down_defers_then_delivers_on_retry(tmp_path):
    port = free_port("127.0.0.7")
    store = SmtpSink("127.0.0.7", port)
    store.stop()
    node = start_node(tmp_path, servers=[f"127.0.0.7:{port}"])
    try:
        send(node, ["user@corp.example"], subject="queued")
        line = wait_event(node, "stat=Deferred")
        assert "Connection refused by 127.0.0.7" in line
        store.start()
        node.advance(200)  # before the first retry (5 minutes): nothing happens
        node.wait_idle()
        assert store.messages == []
        node.advance(200)
        (m,) = store.wait_for_messages(1)
        assert b"Subject: queued" in m.data
        wait_event(node, "stat=Sent")
    finally:
        node.stop()
        store.close()


# -- MX ----------------------------------------------------------------------------------


def test_mx_preference_and_a_fallback(tmp_path):
    port = free_port("127.0.0.21")
    best = SmtpSink("127.0.0.21", port)
    backup = SmtpSink("127.0.0.22", port)
    implicit = SmtpSink("127.0.0.23", port)
    with DnsServer(records={
        "dest.test": ["MX 20 mx-backup.dest.test.", "MX 10 mx-best.dest.test."],
        "mx-best.dest.test": ["A 127.0.0.21"],
        "mx-backup.dest.test": ["A 127.0.0.22"],
        "noMX.test": ["A 127.0.0.23"],
    }) as dns:
        node = start_node(tmp_path, dns=dns.address, mx_port=port)
        try:
            send(node, ["x@dest.test"], subject="pref")
            best.wait_for_messages(1)
            assert backup.messages == []
            best.stop()
            send(node, ["y@dest.test"], subject="pref2")
            (m,) = backup.wait_for_messages(1)
            assert m.rcpts == ["y@dest.test"]
            send(node, ["z@nomx.test"], subject="implicit")
            (m,) = implicit.wait_for_messages(1)
            assert m.rcpts == ["z@nomx.test"]
        finally:
            node.stop()
            for s in (best, backup, implicit):
                s.close()


def test_null_mx_bounces_at_once_with_5_1_10(tmp_path):
    with DnsServer(records={"nomail.test": ["MX 0 ."]}) as dns:
        node = start_node(tmp_path, dns=dns.address)
        try:
            send(node, ["someone@nomail.test"], subject="to-null-mx")
            wait_for(lambda: notices_for(node, "alice@example.test"), 10, "failure notice")
            (notice,) = notices_for(node, "alice@example.test")
            assert notice["Subject"] == "Undelivered Mail Returned to Sender"
            report = str(notice)
            assert "Action: failed" in report and "Status: 5.1.10" in report
            assert "Final-Recipient: rfc822; someone@nomail.test" in report
            assert "Subject: to-null-mx" in report  # the original headers are attached
            assert any("to=<someone@nomail.test>" in t and "stat=Bounced" in t for t in events(node))
        finally:
            node.stop()


def test_mx_pointing_back_at_ourselves_is_a_loop_not_a_retry_storm(tmp_path):
    port = free_port()
    with DnsServer(records={"loop.test": ["MX 10 mx1.example.test."], "mx1.example.test": ["A 127.0.0.1"]}) as dns:
        node = start_node(tmp_path, dns=dns.address, mx_port=port, port=port)
        try:
            send(node, ["u@loop.test"], subject="loop")
            wait_for(lambda: notices_for(node, "alice@example.test"), 10, "failure notice")
            (notice,) = notices_for(node, "alice@example.test")
            assert "Status: 5.4.6" in str(notice)
            assert sum("to=<u@loop.test>" in t for t in events(node)) == 1
        finally:
            node.stop()


# -- TLS -------------------------------------------------------------------------------------


def test_opportunistic_tls_to_a_server_without_starttls_goes_plaintext(tmp_path):
    port = free_port("127.0.0.7")
    with SmtpSink("127.0.0.7", port) as store:  # no ssl_context: no STARTTLS offered
        node = start_node(tmp_path, servers=[f"127.0.0.7:{port}"])
        try:
            send(node, ["user@corp.example"])
            (m,) = store.wait_for_messages(1)
            assert m.tls is False
        finally:
            node.stop()


def test_required_tls_against_a_plaintext_server_defers(tmp_path):
    port = free_port("127.0.0.7")
    with SmtpSink("127.0.0.7", port) as store:
        node = start_node(tmp_path, servers=[f"127.0.0.7:{port}"], corp_tls="required")
        try:
            send(node, ["user@corp.example"])
            line = wait_event(node, "to=<user@corp.example>")
            assert "stat=Deferred" in line and "TLS" in line
            assert store.messages == []
        finally:
            node.stop()


def test_starttls_to_the_store_is_logged_with_details(tmp_path):
    ca = trustme.CA()
    port = free_port("127.0.0.7")
    with SmtpSink("127.0.0.7", port, ssl_context=tls_server_context(ca, "127.0.0.7")) as store:
        node = start_node(tmp_path, servers=[f"127.0.0.7:{port}"])
        try:
            send(node, ["user@corp.example"])
            (m,) = store.wait_for_messages(1)
            assert m.tls is True
            line = wait_event(node, "STARTTLS=client")
            assert "version=TLSv1.3" in line and "verify=FAIL" in line and "cipher=" in line and "bits=" in line
        finally:
            node.stop()


# -- per-recipient results, retries, notices ---------------------------------------------------


def test_partial_recipient_failure(tmp_path):
    port = free_port("127.0.0.7")
    with SmtpSink("127.0.0.7", port) as store:
        store.rcpt_replies = {"gone@corp.example": "550 5.1.1 <gone@corp.example>: User unknown",
                              "busy@corp.example": "451 4.2.1 mailbox busy"}
        node = start_node(tmp_path, servers=[f"127.0.0.7:{port}"])
        try:
            send(node, ["ok@corp.example", "gone@corp.example", "busy@corp.example"], subject="partial")
            (m,) = store.wait_for_messages(1)
            assert m.rcpts == ["ok@corp.example"]
            wait_for(lambda: notices_for(node, "alice@example.test"), 10, "failure notice")
            (notice,) = notices_for(node, "alice@example.test")
            text = str(notice)
            assert "gone@corp.example" in text and "550 5.1.1" in text and "busy@corp.example" not in text
            assert "Diagnostic-Code: smtp; 550 5.1.1" in text
            # busy is retried later, alone
            store.rcpt_replies = {}
            node.advance(400)
            msgs = store.wait_for_messages(2)
            assert msgs[1].rcpts == ["busy@corp.example"]
            wait_for(lambda: not list((node.data_dir / "spool/queue").iterdir()), 10, "queue empty")
        finally:
            node.stop()


def test_delay_notice_once_then_failure_notice_at_lifetime(tmp_path):
    port = free_port("127.0.0.7")
    with SmtpSink("127.0.0.7", port) as store:
        store.default_rcpt_reply = "451 4.3.0 try again later"
        node = start_node(tmp_path, servers=[f"127.0.0.7:{port}"], warn_after="40m", lifetime="3h")
        try:
            send(node, ["user@corp.example"], subject="slow")
            wait_event(node, "stat=Deferred: 451 4.3.0 try again later")
            for _ in range(12):  # 12 x 10 minutes: retries at 5m, 15m, 35m, 75m, 135m ...
                node.advance(600)
                node.wait_idle()
            delays = [n for n in notices_for(node, "alice@example.test") if n["Subject"].startswith("Warning")]
            assert len(delays) == 1
            (delay,) = delays
            assert delay["Subject"].startswith("Warning: could not send message for past ")
            assert "Action: delayed" in str(delay) and "451 4.3.0 try again later" in str(delay)
            assert delay.get("From", "").startswith("MAILER-DAEMON@")
            for _ in range(12):
                node.advance(600)
                node.wait_idle()
            failures = [n for n in notices_for(node, "alice@example.test") if n["Subject"].startswith("Undelivered")]
            assert len(failures) == 1
            assert "Action: failed" in str(failures[0]) and "Status: 5.3.0" in str(failures[0])
            assert list((node.data_dir / "spool/queue").iterdir()) == []
        finally:
            node.stop()


def test_lifetime_zero_bounces_a_temporary_failure_at_the_second_attempt(tmp_path):
    # min_attempts defaults to 2 with lifetime 0: one retry after the first interval.
    port = free_port("127.0.0.7")
    with SmtpSink("127.0.0.7", port) as store:
        store.default_rcpt_reply = "452 4.2.2 mailbox full"
        node = start_node(tmp_path, servers=[f"127.0.0.7:{port}"], lifetime="0")
        try:
            send(node, ["user@corp.example"], subject="no-retries")
            wait_event(node, "stat=Deferred: 452 4.2.2 mailbox full")
            node.wait_idle()
            assert notices_for(node, "alice@example.test") == []
            node.advance(400)
            wait_for(lambda: notices_for(node, "alice@example.test"), 10, "failure notice")
            (notice,) = notices_for(node, "alice@example.test")
            assert "Status: 5.2.2" in str(notice)
        finally:
            node.stop()


def test_no_notice_about_a_message_from_null_sender(tmp_path):
    with DnsServer(records={"nomail.test": ["MX 0 ."]}) as dns:
        node = start_node(tmp_path, dns=dns.address)
        try:
            send(node, ["someone@nomail.test"], sender="", subject="from-null")
            wait_event(node, "no notice (failed) for a message from <>")
            node.wait_idle()
            assert not any("notification" in t for t in events(node))
            assert list((node.data_dir / "spool/queue").iterdir()) == []
        finally:
            node.stop()


def test_restart_keeps_the_retry_schedule(tmp_path):
    port = free_port("127.0.0.7")
    store = SmtpSink("127.0.0.7", port)
    store.stop()
    clock = ManualClock()
    data = tmp_path / "data"
    node = start_node(tmp_path, servers=[f"127.0.0.7:{port}"], clock=clock, data_dir=data)
    try:
        send(node, ["user@corp.example"], subject="persist")
        wait_event(node, "stat=Deferred")
        node.wait_idle()
    finally:
        node.stop()
    store.start()
    node = start_node(tmp_path, servers=[f"127.0.0.7:{port}"], clock=clock, data_dir=data)
    try:
        node.wait_idle()
        node.advance(60)  # not yet due: the restart did not reset the schedule
        node.wait_idle()
        assert store.messages == []
        node.advance(400)
        (m,) = store.wait_for_messages(1)
        assert b"Subject: persist" in m.data
    finally:
        node.stop()
        store.close()


def test_per_destination_slots_are_not_kept_after_delivery(tmp_path):
    port = free_port("127.0.0.7")
    with SmtpSink("127.0.0.7", port) as store:
        node = start_node(tmp_path, servers=[f"127.0.0.7:{port}"])
        try:
            send(node, ["a@corp.example"])
            store.wait_for_messages(1)
            node.wait_idle()
            assert node.node.queue._dest_limits == {}
        finally:
            node.stop()


def test_a_delivery_that_raises_cancelled_error_is_deferred_and_the_queue_goes_on(tmp_path):
    # One destination is awaited in the worker itself (no task of its own): a
    # CancelledError from the agent (not a stop of the node) must be reported and the
    # message deferred as any other agent failure, not end the worker silently.
    port = free_port("127.0.0.7")
    with SmtpSink("127.0.0.7", port) as store:
        node = start_node(tmp_path, servers=[f"127.0.0.7:{port}"])
        try:
            queue = node.node.queue
            real = queue.remote

            async def cancelled(*args, **kwargs):
                raise asyncio.CancelledError()

            queue.remote = cancelled
            send(node, ["a@corp.example"], subject="first")
            wait_event(node, "delivery agent error: CancelledError")
            wait_event(node, "a@corp.example>, delay=")  # deferred (to=<...>, stat=Deferred)
            queue.remote = real
            send(node, ["b@corp.example"], subject="second")
            (m,) = store.wait_for_messages(1)
            assert b"Subject: second" in m.data
        finally:
            node.stop()
