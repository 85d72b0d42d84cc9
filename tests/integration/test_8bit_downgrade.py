"""8-bit mail relayed to a next hop without 8BITMIME (RFC 6152 3), end to end: smtplib
submits with BODY=8BITMIME to a running node, which relays to an SmtpSink that offers no
8BITMIME; what arrives is 7-bit and decodes to the original text."""

from __future__ import annotations

import email
import email.policy
import smtplib

from tests.integration.test_notices import start
from tests.support.kanmon_node import free_port
from tests.support.smtpsink import SmtpSink

TEXT = "本文です。 Grüße — 8-bit body line\r\n"
MESSAGE = ("From: alice@example.test\r\nTo: user@corp.example\r\nSubject: 8bit\r\nMIME-Version: 1.0\r\n"
           "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n"
           "Message-ID: <8bit-1@example.test>\r\n\r\n" + TEXT).encode()


def test_8bitmime_submission_reaches_a_7bit_next_hop_as_quoted_printable(tmp_path):
    port = free_port("127.0.0.7")
    with SmtpSink("127.0.0.7", port) as corp:
        corp.eightbitmime = False
        node = start(tmp_path, f"127.0.0.7:{port}")
        try:
            with smtplib.SMTP(node.host, node.port, timeout=10) as s:
                s.ehlo("client.example")
                s.sendmail("alice@example.test", ["user@corp.example"], MESSAGE, mail_options=["BODY=8BITMIME"])
            (m,) = corp.wait_for_messages(1, timeout=10)
        finally:
            node.stop()
    assert "BODY=" not in m.params
    assert m.data.isascii()
    received = email.message_from_bytes(m.data, policy=email.policy.default)
    assert received["Content-Transfer-Encoding"] == "quoted-printable"
    assert received.get_content() == TEXT
    assert received["Message-ID"] == "<8bit-1@example.test>"
