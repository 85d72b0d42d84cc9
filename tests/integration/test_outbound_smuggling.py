"""Hardening: what kanmon relays cannot smuggle a second message into the next hop.

The session never queues a bare CR or LF (tests/protocol), but queue files also come from
notices, alerts and restored backups; so the outbound client normalises every line end to
CRLF and dot-stuffs (RFC 5321 4.5.2) whatever it is given. Each smuggling ending is sent
through the real client to a real server on loopback, and the bytes on the wire after 354
are checked (SmtpSink.raw_data: exactly what arrived, the final "." line excluded).
"""

from __future__ import annotations

import asyncio

import pytest

from tests.integration.test_smtp_client import send
from tests.support.smtpsink import SmtpSink

ENDINGS = [b"\n.\n", b"\n.\r\n", b"\r.\n", b"\r.\r", b"\r\n.\r", b"\r\n\x00.\r\n", b"\r\n.\n", b"\r\r\n.\r\n"]
SMUGGLED = b"MAIL FROM:<evil@x.example>\r\nRCPT TO:<victim@corp.example>\r\nDATA\r\nsmuggled\r\n.\r\n"


@pytest.fixture
def sink():
    with SmtpSink("127.0.0.32") as s:
        yield s


def assert_clean_wire(raw: bytes) -> None:
    # Every CR is followed by LF and every LF preceded by CR ...
    assert raw.count(b"\r") == raw.count(b"\n") == raw.count(b"\r\n"), raw
    # ... and no line is a lone "." before the real end (it would end DATA there).
    lines = raw.split(b"\r\n")
    assert b"." not in lines, raw


@pytest.mark.parametrize("ending", ENDINGS, ids=[e.decode("latin-1").encode("unicode_escape").decode() for e in ENDINGS])
def test_smuggling_endings_in_a_queued_body_are_normalised_on_the_wire(sink, ending):
    body = b"Subject: x\r\n\r\nhello" + ending + SMUGGLED
    asyncio.run(send(sink, body=body))
    (msg,) = sink.wait_for_messages(1)
    assert_clean_wire(msg.raw_data)
    assert len(sink.messages) == 1
    assert not any(c.startswith("MAIL FROM:<evil") for c in sink.commands)


@pytest.mark.parametrize("start", [b".\n", b".\r\n", b".\r", b"\n.\n"])
def test_a_dot_line_at_the_very_start_is_stuffed(sink, start):
    asyncio.run(send(sink, body=start + SMUGGLED))
    (msg,) = sink.wait_for_messages(1)
    assert_clean_wire(msg.raw_data)
    assert msg.raw_data.startswith(b"..") or msg.raw_data.startswith(b"\r\n..")
    assert not any(c.startswith("MAIL FROM:<evil") for c in sink.commands)
