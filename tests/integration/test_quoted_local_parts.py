"""Quoted local parts through a real relay: smtplib -> `kanmon serve` -> a loopback sink.

RFC 5321 4.1.2 allows a Quoted-string local part ("john smith"@x, even "<b>q</b>"@x).
The receiver and the outbound client run the same syntax check
(kanmon.smtp.address.check_sendable): what kanmon accepts at MAIL/RCPT it sends on,
quoted exactly as it was received; what it could not send on it refuses at MAIL/RCPT
(553 5.1.7 / 5.1.3), never accepts and then bounces.
"""

from __future__ import annotations

import smtplib

import pytest

from tests.integration.test_delivery_agents import Node
from tests.support.kanmon_node import wait_for
from tests.support.smtpsink import SmtpSink


@pytest.fixture
def sink():
    with SmtpSink("127.0.0.2") as s:
        yield s


@pytest.fixture
def relay(tmp_path, sink):
    node = Node(tmp_path, sink, agents=0, workers=1)
    node.proc.start()
    yield node
    node.proc.terminate()


SENDERS_AND_RCPTS = [
    ('"<b>q</b>"@example.org', '"<i>x</i>"@relay.test'),
    ('"john smith"@example.org', '"jane doe"@relay.test'),
    ('"a\\"b"@example.org', '"c\\\\d"@relay.test'),  # quoted-pairs stay as they came
]


def test_legal_quoted_local_parts_are_relayed_quoted_as_received(relay, sink):
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as s:
        s.ehlo()
        for sender, rcpt in SENDERS_AND_RCPTS:
            assert s.mail(sender)[0] == 250
            assert s.rcpt(rcpt)[0] == 250
            assert s.data(b"Subject: quoted\r\n\r\nbody\r\n")[0] == 250
    sink.wait_for_messages(len(SENDERS_AND_RCPTS), 30)
    wait_for(lambda: relay.queued() == [], 30, "an empty queue (no bounce queued)")
    assert sorted((t.mail_from, t.rcpts) for t in sink.messages) == sorted((f, [r]) for f, r in SENDERS_AND_RCPTS)
    for sender, rcpt in SENDERS_AND_RCPTS:  # on the wire exactly as received
        assert any(c.startswith(f"MAIL FROM:<{sender}>") for c in sink.commands)
        assert f"RCPT TO:<{rcpt}>" in sink.commands
    wait_for(lambda: relay.log().count("stat=Sent") == len(SENDERS_AND_RCPTS), 30, "the delivery lines")
    assert "Bounced" not in relay.log()


@pytest.mark.parametrize("local", ['"a\u2028b"', "a\u2028b", '"a\x85b"'])
def test_what_cannot_be_sent_on_is_refused_at_mail_and_rcpt(relay, sink, local):
    # U+2028 and U+0085 are line ends to some peers: legal-looking UTF-8 quoted text the
    # outbound client will not write on a command line, so the receiver refuses it at once.
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as s:
        s.ehlo()
        code, text = s.mail(f"{local}@example.org", ["SMTPUTF8"])
        assert (code, text[:5]) == (553, b"5.1.7")
        assert s.mail("a@example.org", ["SMTPUTF8"])[0] == 250
        code, text = s.rcpt(f"{local}@relay.test")
        assert (code, text[:5]) == (553, b"5.1.3")
        s.rset()
    assert relay.queued() == [] and sink.messages == []
