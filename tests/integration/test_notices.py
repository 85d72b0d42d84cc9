"""Delivery notices end to end: the RFC 3461 DSN extension (smtplib as the client with
mail_options/rcpt_options, SmtpSink as the next hop), success notices, RET, NOTIFY=NEVER,
pass-through to a next hop that offers DSN, the delay notice repeated every warn_every,
and min_attempts with lifetime 0 (a greylisting server gets its retry). Real sockets on
loopback, a clock the tests advance (no sleeps)."""

from __future__ import annotations

import email
import smtplib

from kanmon.clock import ManualClock
from kanmon.config import parse_config
from tests.integration.test_delivery_engine import NODE, events, notices_for, wait_event
from tests.support.kanmon_node import RunningNode, free_port, maildir_messages, wait_for
from tests.support.smtpsink import SmtpSink

BODY = "From: alice@example.test\r\nSubject: {subject}\r\nMessage-ID: <{subject}@example.test>\r\n\r\nBODY-LINE-{subject}\r\n"


def start(tmp_path, corp: str, *, warn_after="4h", lifetime="3d", extra="") -> RunningNode:
    text = NODE.format(
        data_dir=tmp_path / "data", host="127.0.0.1", port=free_port(), servers=f'"{corp}"', corp_tls="none",
        out_tls="none", mx_port=25, smarthost="", dns="127.0.0.1:1", warn_after=warn_after, lifetime=lifetime,
    ) + extra
    return RunningNode(parse_config(text), clock=ManualClock()).start()


def send(node: RunningNode, rcpts, subject: str, *, mail_options=(), rcpt_options=()) -> None:
    with smtplib.SMTP(node.host, node.port, timeout=10) as s:
        s.ehlo("client.example")
        assert s.has_extn("dsn")
        code, _ = s.mail("alice@example.test", list(mail_options))
        assert code == 250
        for r in rcpts:
            assert s.rcpt(r, list(rcpt_options))[0] == 250
        assert s.data(BODY.format(subject=subject).encode())[0] == 250


def status_fields(notice: email.message.Message) -> str:
    return str(notice.get_payload()[1])


def test_notify_success_local_delivery_gets_a_delivered_notice_with_envid_and_orcpt(tmp_path):
    node = start(tmp_path, "127.0.0.1:1")
    try:
        send(node, ["bob@example.test"], "hello", mail_options=["RET=HDRS", "ENVID=env+2B42"],
             rcpt_options=["NOTIFY=SUCCESS", "ORCPT=rfc822;Bob@Example.test"])
        wait_for(lambda: notices_for(node, "alice@example.test"), 10, "success notice")
        (notice,) = notices_for(node, "alice@example.test")
        assert notice["Subject"] == "Successful Mail Delivery Report"
        fields = status_fields(notice)
        assert "Action: delivered" in fields and "Status: 2.0.0" in fields
        assert "Original-Envelope-Id: env+42" in fields and "Original-Recipient: rfc822; Bob@Example.test" in fields
        assert b"BODY-LINE-hello" not in maildir_messages(node.data_dir, "alice@example.test")[0]
        assert len(maildir_messages(node.data_dir, "bob@example.test")) == 1
        wait_event(node, "sender success notification")
    finally:
        node.stop()


def test_notify_success_to_a_next_hop_without_dsn_is_relayed(tmp_path):
    port = free_port("127.0.0.7")
    with SmtpSink("127.0.0.7", port) as corp:
        node = start(tmp_path, f"127.0.0.7:{port}")
        try:
            send(node, ["user@corp.example"], "relayed", rcpt_options=["NOTIFY=SUCCESS,FAILURE"])
            (m,) = corp.wait_for_messages(1)
            assert "NOTIFY" not in m.params and m.rcpt_params == {}  # the sink did not offer DSN: nothing passed on
            wait_for(lambda: notices_for(node, "alice@example.test"), 10, "success notice")
            (notice,) = notices_for(node, "alice@example.test")
            fields = status_fields(notice)
            assert "Action: relayed" in fields and "Remote-MTA: dns; [127.0.0.7]" in fields
        finally:
            node.stop()


def test_dsn_parameters_pass_on_to_a_next_hop_that_offers_dsn_and_we_send_no_notice(tmp_path):
    port = free_port("127.0.0.7")
    with SmtpSink("127.0.0.7", port) as corp:
        corp.dsn = True
        node = start(tmp_path, f"127.0.0.7:{port}")
        try:
            send(node, ["user@corp.example", "other@corp.example"], "passed",
                 mail_options=["RET=HDRS", "ENVID=id+2Bone"],
                 rcpt_options=["NOTIFY=SUCCESS,DELAY", "ORCPT=rfc822;first+2Bx@corp.example"])
            (m,) = corp.wait_for_messages(1)
            assert "RET=HDRS" in m.params and "ENVID=id+2Bone" in m.params
            assert m.rcpt_params == {
                "user@corp.example": "NOTIFY=SUCCESS,DELAY ORCPT=rfc822;first+2Bx@corp.example",
                "other@corp.example": "NOTIFY=SUCCESS,DELAY ORCPT=rfc822;first+2Bx@corp.example",
            }
            wait_event(node, "stat=Sent")
            node.wait_idle()
            assert notices_for(node, "alice@example.test") == []  # the next hop reports success
        finally:
            node.stop()


def test_notify_never_sends_no_failure_notice(tmp_path):
    port = free_port("127.0.0.7")
    with SmtpSink("127.0.0.7", port) as corp:
        corp.default_rcpt_reply = "550 5.1.1 User unknown"
        node = start(tmp_path, f"127.0.0.7:{port}")
        try:
            send(node, ["gone@corp.example"], "never", rcpt_options=["NOTIFY=NEVER"])
            wait_event(node, "no notice (failed) for some recipients: not asked for (NOTIFY)")
            node.wait_idle()
            assert notices_for(node, "alice@example.test") == []
            assert not any("sender failure notification" in t for t in events(node))
        finally:
            node.stop()


def test_ret_hdrs_returns_headers_and_ret_full_the_whole_message(tmp_path):
    port = free_port("127.0.0.7")
    with SmtpSink("127.0.0.7", port) as corp:
        corp.default_rcpt_reply = "550 5.1.1 User unknown"
        node = start(tmp_path, f"127.0.0.7:{port}")
        try:
            send(node, ["gone@corp.example"], "hdrs", mail_options=["RET=HDRS"])
            wait_for(lambda: len(notices_for(node, "alice@example.test")) == 1, 10, "first failure notice")
            send(node, ["gone@corp.example"], "full", mail_options=["RET=FULL"])
            wait_for(lambda: len(notices_for(node, "alice@example.test")) == 2, 10, "second failure notice")
            raw = {b"hdrs" if b"Subject: hdrs" in m else b"full": m for m in maildir_messages(node.data_dir, "alice@example.test")}
            assert b"text/rfc822-headers" in raw[b"hdrs"] and b"BODY-LINE-hdrs" not in raw[b"hdrs"]
            assert b"message/rfc822" in raw[b"full"] and b"BODY-LINE-full" in raw[b"full"]
        finally:
            node.stop()


def test_warn_every_repeats_the_delay_notice(tmp_path):
    port = free_port("127.0.0.7")
    with SmtpSink("127.0.0.7", port) as corp:
        corp.default_rcpt_reply = "451 4.3.0 try again later"
        node = start(tmp_path, f"127.0.0.7:{port}", warn_after="40m", lifetime="5h", extra='warn_every = "1h"\n')
        try:
            arrived = node.clock.now()
            send(node, ["user@corp.example"], "slow")
            wait_event(node, "stat=Deferred: 451 4.3.0 try again later")
            node.wait_idle()
            # Attempts near 5m, 15m, 35m, 75-83m, 135-143m, 195m+ (retry 5m..1h, jitter up to
            # 10%): warned at the first attempt after 40m, again at the first one an hour later.
            # The clock goes to each attempt's due time and the test waits for that attempt,
            # so every attempt runs at the time it was planned for, however loaded the machine.
            (qid,) = [p.name for p in (node.data_dir / "spool/queue").iterdir()]
            attempts = 1
            while (due := node.node.spool.read_state(qid).next_attempt) - arrived < 3 * 3600:
                node.advance(max(0.0, due - node.clock.now()))
                attempts += 1
                wait_for(lambda: sum("stat=Deferred" in t for t in events(node)) >= attempts, 10, f"attempt {attempts}")
                node.wait_idle()
            assert attempts == 6
            delays = [n for n in notices_for(node, "alice@example.test") if n["Subject"].startswith("Warning")]
            assert len(delays) == 2
            assert all("Action: delayed" in status_fields(n) for n in delays)
        finally:
            node.stop()


def test_lifetime_zero_gives_a_greylisting_server_its_retry(tmp_path):
    port = free_port("127.0.0.7")
    with SmtpSink("127.0.0.7", port) as corp:
        corp.default_rcpt_reply = "451 4.7.1 Greylisted, try again in 5 minutes"
        node = start(tmp_path, f"127.0.0.7:{port}", lifetime="0")
        try:
            send(node, ["grey@corp.example"], "grey")
            send(node, ["stays@corp.example"], "stays")
            wait_for(lambda: sum("stat=Deferred" in t for t in events(node)) == 2, 10, "both deferred")
            node.wait_idle()
            assert notices_for(node, "alice@example.test") == []  # not bounced at the first 451
            corp.rcpt_replies = {"stays@corp.example": "451 4.7.1 still greylisted"}
            corp.default_rcpt_reply = "250 2.1.5 Ok"
            node.advance(400)  # the retry after the first interval
            (m,) = corp.wait_for_messages(1)
            assert m.rcpts == ["grey@corp.example"]
            wait_for(lambda: notices_for(node, "alice@example.test"), 10, "failure notice for the second")
            (notice,) = notices_for(node, "alice@example.test")
            assert "stays@corp.example" in str(notice) and "Action: failed" in status_fields(notice)
            wait_for(lambda: not list((node.data_dir / "spool/queue").iterdir()), 10, "queue empty")
        finally:
            node.stop()
