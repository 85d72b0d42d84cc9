"""The outbound SMTP client against a real SMTP server on loopback (tests/support/smtpsink).

Real sockets on 127.0.0.x, real TLS with trustme certificates.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import threading

import pytest
import trustme

from kanmon.model import DotFree, LocalReply
from kanmon.smtp.downgrade import MAX_DEPTH, downgrade_8bit
from kanmon.smtp.client import (
    ClientSettings,
    ConnectFailed,
    ConnectionLost,
    ServerRefused,
    TlsUnavailable,
    open_connection,
)
from tests.support.smtpsink import SmtpSink, tls_server_context

HOST = "127.0.0.31"
NAME = "store.corp.example"
BODY = b"Subject: test\r\nFrom: a@relay.test\r\n\r\nHello.\r\n"


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def ca_file(ca, tmp_path):
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture
def sink():
    with SmtpSink(HOST) as s:
        yield s


@pytest.fixture
def tls_sink(ca):
    with SmtpSink(HOST, ssl_context=tls_server_context(ca, NAME, HOST)) as s:
        yield s


def settings(**kw) -> ClientSettings:
    base = dict(hostname="relay.kanmon.test", connect_timeout=5.0, command_timeout=5.0, data_timeout=5.0)
    base.update(kw)
    return ClientSettings(**base)


async def send(sink: SmtpSink, *, policy="none", rcpts=("b@corp.example",), body=BODY, mail_from="a@relay.test", **kw):
    conn = await open_connection(sink.host, sink.port, server_name=NAME, policy=policy, settings=settings(**kw))
    try:
        result = await conn.send_message(mail_from, list(rcpts), body)
    finally:
        await conn.quit()
    return conn, result


def codes(result) -> dict[str, int]:
    return {r: reply.code for r, reply in result.replies}


# ---------------------------------------------------------------------------
# Transactions


def test_plain_delivery_is_pipelined_with_our_ehlo_name(sink):
    sink.require_pipelining = True  # replies to MAIL/RCPT held until DATA arrives
    conn, result = asyncio.run(send(sink, rcpts=["b@corp.example", "c@corp.example"], command_timeout=2.0))
    assert codes(result) == {"b@corp.example": 250, "c@corp.example": 250}
    msg = sink.wait_for_messages(1)[0]
    assert (msg.mail_from, msg.rcpts, msg.data) == ("a@relay.test", ["b@corp.example", "c@corp.example"], BODY)
    assert msg.helo == "relay.kanmon.test"
    assert f"SIZE={len(BODY) + 3}" in msg.params
    assert conn.tls is None
    assert sink.commands[-1] == "QUIT"


def test_without_pipelining_commands_go_one_by_one(sink):
    sink.pipelining = False
    sink.rcpt_replies = {"bad@corp.example": "550 5.1.1 <bad@corp.example>: User unknown"}
    _, result = asyncio.run(send(sink, rcpts=["b@corp.example", "bad@corp.example"]))
    assert codes(result) == {"b@corp.example": 250, "bad@corp.example": 550}
    assert sink.wait_for_messages(1)[0].rcpts == ["b@corp.example"]


def test_per_recipient_results_sent_deferred_bounced(sink):
    sink.rcpt_replies = {
        "full@corp.example": "452 4.2.2 <full@corp.example>: Mailbox full",
        "gone@corp.example": "550 5.1.1 <gone@corp.example>: User unknown",
    }
    _, result = asyncio.run(send(sink, rcpts=["ok@corp.example", "full@corp.example", "gone@corp.example"]))
    replies = dict(result.replies)
    assert replies["ok@corp.example"].code == 250
    assert replies["ok@corp.example"].enhanced == "2.0.0"
    assert str(replies["full@corp.example"]) == "452 4.2.2 <full@corp.example>: Mailbox full"
    assert replies["gone@corp.example"].is_permanent
    assert replies["gone@corp.example"].enhanced == "5.1.1"
    assert result.data_reply is not None and result.data_reply.code == 250


def test_all_recipients_refused_sends_no_body(sink):
    sink.default_rcpt_reply = "550 5.1.1 User unknown"
    _, result = asyncio.run(send(sink, rcpts=["x@corp.example", "y@corp.example"]))
    assert codes(result) == {"x@corp.example": 550, "y@corp.example": 550}
    assert sink.messages == []


def test_mail_from_refused_applies_to_every_recipient(sink):
    sink.mail_reply = "451 4.3.1 Insufficient system storage"
    _, result = asyncio.run(send(sink, rcpts=["x@corp.example", "y@corp.example"]))
    assert result.mail_reply is not None and result.mail_reply.code == 451
    assert {str(r) for _, r in result.replies} == {"451 4.3.1 Insufficient system storage"}


def test_data_end_reply_applies_to_accepted_recipients(sink):
    sink.data_reply = "554 5.7.1 Message rejected as spam"
    sink.rcpt_replies = {"later@corp.example": "451 4.3.0 try later"}
    _, result = asyncio.run(send(sink, rcpts=["x@corp.example", "later@corp.example"]))
    replies = dict(result.replies)
    assert str(replies["x@corp.example"]) == "554 5.7.1 Message rejected as spam"
    assert replies["later@corp.example"].code == 451


def test_helo_when_ehlo_is_not_understood(sink):
    sink.esmtp = False
    conn, result = asyncio.run(send(sink))
    assert codes(result) == {"b@corp.example": 250}
    assert not conn.esmtp
    assert "HELO relay.kanmon.test" in sink.commands
    assert sink.wait_for_messages(1)[0].params == ""  # no ESMTP parameters to a HELO server


def test_body_is_dot_stuffed_and_line_ends_normalised(sink):
    body = b".leading dot\r\nbare LF\nbare CR\r.\r\n..two\r\nno final newline"
    asyncio.run(send(sink, body=body))
    msg = sink.wait_for_messages(1)[0]
    assert msg.raw_data == b"..leading dot\r\nbare LF\r\nbare CR\r\n..\r\n...two\r\nno final newline\r\n"
    assert msg.data == b".leading dot\r\nbare LF\r\nbare CR\r\n.\r\n..two\r\nno final newline\r\n"


def test_smuggling_attempt_in_body_stays_one_message(sink):
    # A body that a lenient server would end at "\n.\n" and read a second MAIL from.
    body = b"Subject: x\r\n\r\nhello\n.\nMAIL FROM:<evil@x>\r\nRCPT TO:<victim@corp.example>\r\n"
    _, result = asyncio.run(send(sink, body=body))
    assert codes(result) == {"b@corp.example": 250}
    assert len(sink.wait_for_messages(1)) == 1
    assert sink.messages[0].raw_data.count(b"\r\n.\r\n") == 0
    assert not any(c.startswith("MAIL FROM:<evil") for c in sink.commands)


def test_8bit_body_and_utf8_addresses(sink):
    body = "Subject: grüße\r\n\r\nÄpfel\r\n".encode()
    asyncio.run(send(sink, body=body, rcpts=["jörg@corp.example"]))
    msg = sink.wait_for_messages(1)[0]
    assert "BODY=8BITMIME" in msg.params and "SMTPUTF8" in msg.params
    assert msg.rcpts == ["jörg@corp.example"]
    assert msg.data == body


EIGHT_BIT_MIME = (
    "From: a@relay.test\r\nTo: b@corp.example\r\nSubject: 8-bit body\r\nMIME-Version: 1.0\r\n"
    "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
    "本文です。 Grüße, 8-bit body line\r\n" + "長い行" * 60 + "\r\n"
).encode()


def test_8bit_body_to_a_server_without_8bitmime_goes_quoted_printable(sink):
    # RFC 6152 3: never 8-bit octets to a server that did not offer 8BITMIME.
    sink.eightbitmime = False
    _, result = asyncio.run(send(sink, body=EIGHT_BIT_MIME))
    assert codes(result) == {"b@corp.example": 250}
    msg = sink.wait_for_messages(1)[0]
    assert "BODY=" not in msg.params
    assert msg.data.isascii()
    assert max(len(line) for line in msg.data.split(b"\r\n")) <= 78
    assert b"Content-Transfer-Encoding: quoted-printable\r\n" in msg.data
    assert b"Content-Transfer-Encoding: 8bit" not in msg.data
    original = email.message_from_bytes(EIGHT_BIT_MIME, policy=email.policy.default)
    received = email.message_from_bytes(msg.data, policy=email.policy.default)
    assert received.get_content() == original.get_content()
    assert received["Subject"] == "8-bit body"


def test_7bit_body_to_a_server_without_8bitmime_is_byte_identical(sink):
    sink.eightbitmime = False
    body = (b"Subject: plain\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n"
            b"Content-Transfer-Encoding: 8bit\r\n\r\nJust ASCII.\r\n")
    asyncio.run(send(sink, body=body))
    assert sink.wait_for_messages(1)[0].data == body


def test_8bit_body_to_a_server_with_8bitmime_is_sent_as_it_is(sink):
    asyncio.run(send(sink, body=EIGHT_BIT_MIME))
    msg = sink.wait_for_messages(1)[0]
    assert "BODY=8BITMIME" in msg.params
    assert msg.data == EIGHT_BIT_MIME


def test_converted_body_is_dot_stuffed_although_the_original_had_no_dot_lines(sink):
    # A soft line break can put a dot at the start of a line: the DotFree promise of the
    # original no longer holds for the converted text.
    sink.eightbitmime = False
    text = "a" * 75 + ".ü\r\n"
    body = DotFree(b"Subject: dots\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n" + text.encode())
    asyncio.run(send(sink, body=body))
    msg = sink.wait_for_messages(1)[0]
    assert b"\r\n..=C3=BC\r\n" in msg.raw_data
    assert email.message_from_bytes(msg.data, policy=email.policy.default).get_content() == text


def test_8bit_body_to_a_helo_server_goes_quoted_printable(sink):
    sink.esmtp = False
    asyncio.run(send(sink, body=EIGHT_BIT_MIME))
    msg = sink.wait_for_messages(1)[0]
    assert msg.params == "" and msg.data.isascii()


def test_conversion_runs_off_the_event_loop(sink, monkeypatch):
    # DESIGN.md promise 6: converting a large message is CPU work; the loop keeps serving.
    import kanmon.smtp.client as client
    threads = []

    def recording(body):
        threads.append(threading.current_thread())
        return downgrade_8bit(body)

    monkeypatch.setattr(client, "downgrade_8bit", recording)
    sink.eightbitmime = False
    _, result = asyncio.run(send(sink, body=EIGHT_BIT_MIME))
    assert codes(result) == {"b@corp.example": 250}
    assert threads and threads[0] is not threading.main_thread()
    assert sink.wait_for_messages(1)[0].data.isascii()


def test_8bit_body_beyond_the_conversion_bounds_bounces_for_a_7bit_server(sink):
    # RFC 6152 3: convert or fail the delivery; 8-bit octets never go to this server.
    sink.eightbitmime = False
    body = b"Subject: deep\r\n\r\n" + "Grüße\r\n".encode()
    for _ in range(MAX_DEPTH + 2):
        body = b"MIME-Version: 1.0\r\nContent-Type: message/rfc822\r\n\r\n" + body
    _, result = asyncio.run(send(sink, body=body))
    reply = result.replies[0][1]
    assert isinstance(reply, LocalReply) and (reply.code, reply.enhanced) == (554, "5.6.3")
    assert not any(c.startswith("MAIL") for c in sink.commands)


def test_utf8_address_to_server_without_smtputf8_bounces(sink):
    sink.smtputf8 = False
    _, result = asyncio.run(send(sink, rcpts=["jörg@corp.example"]))
    reply = result.replies[0][1]
    assert isinstance(reply, LocalReply) and (reply.code, reply.enhanced) == (550, "5.6.7")
    assert not any(c.startswith("MAIL") for c in sink.commands)


def test_message_over_the_servers_size_limit_is_not_sent(sink):
    sink.size_limit = 100
    _, result = asyncio.run(send(sink, body=b"x" * 200 + b"\r\n"))
    reply = result.replies[0][1]
    assert (reply.code, reply.enhanced) == (552, "5.3.4")
    assert "exceeds size limit 100" in reply.text
    assert not any(c.startswith("MAIL") for c in sink.commands)


def test_address_with_crlf_is_refused_before_sending(sink):
    async def go():
        conn = await open_connection(sink.host, sink.port, server_name=NAME, policy="none", settings=settings())
        try:
            with pytest.raises(ValueError, match="control character"):
                await conn.send_message("a@relay.test", ["b@x\r\nRCPT TO:<c@y>"], BODY)
        finally:
            await conn.quit()

    asyncio.run(go())
    assert not any(c.startswith(("MAIL", "RCPT")) for c in sink.commands)


# ---------------------------------------------------------------------------
# Servers that will not talk


@pytest.mark.parametrize("greeting", ["421 4.3.2 Service not available", "554 5.7.1 No SMTP service here"])
def test_bad_greeting_is_a_server_refusal(sink, greeting):
    sink.greeting = greeting
    with pytest.raises(ServerRefused) as info:
        asyncio.run(send(sink))
    assert str(info.value.reply) == greeting
    assert info.value.try_next
    assert sink.commands == ([] if greeting.startswith("421") else ["QUIT"])


def test_ehlo_4xx_is_a_server_refusal(sink):
    sink.ehlo_reply = "421 4.7.0 Too many connections"
    with pytest.raises(ServerRefused) as info:
        asyncio.run(send(sink))
    assert info.value.reply.code == 421
    assert "HELO relay.kanmon.test" not in sink.commands


def test_connection_refused(sink):
    sink.stop()
    with pytest.raises(ConnectFailed) as info:
        asyncio.run(send(sink))
    assert info.value.reply.text == f"Connection refused by {HOST}"
    assert info.value.reply.is_transient
    sink.start()
    _, result = asyncio.run(send(sink))
    assert codes(result) == {"b@corp.example": 250}


def test_greeting_timeout(sink):
    sink.hang = "greeting"
    with pytest.raises(ConnectionLost) as info:
        asyncio.run(send(sink, connect_timeout=0.3))
    assert "timed out while receiving the initial server greeting" in info.value.reply.text


def test_no_reply_after_data_end_times_out_as_maybe_delivered(sink):
    sink.hang = "data-end"
    with pytest.raises(ConnectionLost) as info:
        asyncio.run(send(sink, data_timeout=0.3))
    assert info.value.after_data_end and not info.value.try_next
    assert "after end of data" in info.value.reply.text


def test_connection_dropped_after_data(sink):
    sink.drop = "after-data"
    with pytest.raises(ConnectionLost) as info:
        asyncio.run(send(sink))
    assert info.value.reply.text.startswith(f"lost connection with {HOST}")
    assert info.value.after_data_end


def test_connection_dropped_mid_data(sink):
    sink.drop = "mid-data"
    with pytest.raises(ConnectionLost) as info:
        asyncio.run(send(sink, body=b"line\r\n" * 1000))
    assert info.value.reply.text.startswith(f"lost connection with {HOST}")
    assert sink.messages == []


def test_overlong_reply_lines_are_cut_and_a_valid_code_still_decides(sink):
    # RFC 5321 4.5.3.1.5 says 512 octets; as Postfix, a longer line is cut, not fatal.
    sink.greeting = "220 " + "x" * 600
    sink.rcpt_replies = {"bad@corp.example": "550 5.1.1 <bad@corp.example>: " + "no such user " * 200}
    conn, result = asyncio.run(send(sink, rcpts=("b@corp.example", "bad@corp.example")))
    assert codes(result) == {"b@corp.example": 250, "bad@corp.example": 550}
    bad = dict(result.replies)["bad@corp.example"]
    assert bad.enhanced == "5.1.1" and bad.text.startswith("<bad@corp.example>: no such user")
    assert len(bad.text) < 512 and len(conn.greeting.text) < 512
    assert len(sink.wait_for_messages(1)) == 1


def test_reply_with_too_many_lines_is_a_protocol_error(sink):
    sink.ehlo_reply = "\r\n".join(["250-x"] * 150 + ["250 y"])
    with pytest.raises(ConnectionLost) as info:
        asyncio.run(send(sink))
    assert "longer than 100 lines" in info.value.reply.text


def test_control_characters_in_replies_are_cleaned(sink):
    sink.rcpt_replies = {"b@corp.example": "550 5.1.1 bad\x1b[2J\x00user"}
    _, result = asyncio.run(send(sink))
    assert result.replies[0][1].text == "bad?[2J?user"


# ---------------------------------------------------------------------------
# TLS


def test_opportunistic_tls_with_a_trusted_certificate(tls_sink, ca_file):
    conn, result = asyncio.run(send(tls_sink, policy="opportunistic", ca_file=ca_file))
    assert codes(result) == {"b@corp.example": 250}
    assert conn.tls is not None
    assert conn.tls.verify == "OK"
    assert conn.tls.version in ("TLSv1.2", "TLSv1.3")
    assert conn.tls.cipher and conn.tls.bits >= 128
    assert conn.tls.describe().endswith("verify=OK")
    msg = tls_sink.wait_for_messages(1)[0]
    assert msg.tls and msg.helo == "relay.kanmon.test"
    assert tls_sink.commands.count("EHLO relay.kanmon.test") == 2  # RFC 3207 4.2


def test_opportunistic_tls_with_an_untrusted_certificate_goes_on(tls_sink):
    conn, result = asyncio.run(send(tls_sink, policy="opportunistic"))  # system CAs only
    assert codes(result) == {"b@corp.example": 250}
    assert conn.tls is not None and conn.tls.verify == "FAIL"
    assert tls_sink.wait_for_messages(1)[0].tls


def test_opportunistic_tls_with_a_certificate_for_another_name(ca, ca_file):
    with SmtpSink(HOST, ssl_context=tls_server_context(ca, "other.example")) as s:
        conn, _ = asyncio.run(send(s, policy="opportunistic", ca_file=ca_file))
    assert conn.tls is not None and conn.tls.verify == "FAIL"


def test_opportunistic_without_starttls_sends_in_plaintext(sink):
    conn, result = asyncio.run(send(sink, policy="opportunistic"))
    assert codes(result) == {"b@corp.example": 250}
    assert conn.tls is None and "does not offer STARTTLS" in conn.tls_note
    assert not sink.wait_for_messages(1)[0].tls


def test_opportunistic_falls_back_to_a_new_plaintext_connection_when_the_handshake_fails(tls_sink):
    tls_sink.drop = "starttls"  # 220, then the connection is gone
    conn, result = asyncio.run(send(tls_sink, policy="opportunistic"))
    assert codes(result) == {"b@corp.example": 250}
    assert conn.tls is None and "continued without TLS" in conn.tls_note
    assert tls_sink.connections == 2
    assert tls_sink.commands.count("STARTTLS") == 1
    assert not tls_sink.wait_for_messages(1)[0].tls


def test_required_tls_against_a_plaintext_server(sink):
    with pytest.raises(TlsUnavailable) as info:
        asyncio.run(send(sink, policy="required"))
    assert (info.value.reply.code, info.value.reply.enhanced) == (451, "4.7.4")
    assert sink.messages == [] and "QUIT" in sink.commands


def test_required_tls_when_the_server_refuses_starttls(tls_sink):
    tls_sink.starttls_reply = "454 4.7.0 TLS not available due to local problem"
    with pytest.raises(TlsUnavailable) as info:
        asyncio.run(send(tls_sink, policy="required"))
    assert "454 4.7.0" in info.value.reply.text
    assert tls_sink.messages == []


def test_required_tls_does_not_check_the_certificate(tls_sink):
    conn, result = asyncio.run(send(tls_sink, policy="required"))
    assert codes(result) == {"b@corp.example": 250}
    assert conn.tls is not None and conn.tls.verify == "FAIL"


def test_verify_with_the_right_ca(tls_sink, ca_file):
    conn, _ = asyncio.run(send(tls_sink, policy="verify", ca_file=ca_file))
    assert conn.tls is not None and conn.tls.verify == "OK"
    assert tls_sink.wait_for_messages(1)[0].tls


def test_verify_without_the_ca_refuses(tls_sink):
    with pytest.raises(TlsUnavailable) as info:
        asyncio.run(send(tls_sink, policy="verify"))
    assert info.value.reply.enhanced == "4.7.5"
    assert "certificate" in info.value.reply.text.lower()
    assert tls_sink.messages == []


def test_verify_with_a_certificate_for_another_name_refuses(ca, ca_file):
    with SmtpSink(HOST, ssl_context=tls_server_context(ca, "other.example")) as s:
        with pytest.raises(TlsUnavailable):
            asyncio.run(send(s, policy="verify", ca_file=ca_file))
        assert s.messages == []


def test_smtps_implicit_tls(ca, ca_file):
    with SmtpSink(HOST, ssl_context=tls_server_context(ca, NAME), implicit_tls=True) as s:
        conn, result = asyncio.run(send(s, policy="smtps", ca_file=ca_file))
        assert codes(result) == {"b@corp.example": 250}
        assert conn.tls is not None and conn.tls.verify == "OK"
        assert s.wait_for_messages(1)[0].tls
        assert "STARTTLS" not in s.commands


def test_smtps_against_a_plaintext_server_fails(sink):
    with pytest.raises(TlsUnavailable):
        asyncio.run(send(sink, policy="smtps", connect_timeout=2.0))


def test_server_data_pipelined_after_starttls_220_is_discarded(tls_sink, ca_file):
    # CVE-2011-0411: a man in the middle appends a reply after the 220; a client that
    # kept it would take "554" as the answer to its EHLO inside TLS.
    tls_sink.starttls_junk = b"554 5.7.0 injected before TLS\r\n250 injected\r\n"
    conn, result = asyncio.run(send(tls_sink, policy="required", ca_file=ca_file))
    assert codes(result) == {"b@corp.example": 250}
    assert conn.tls is not None
    assert tls_sink.wait_for_messages(1)[0].tls


def test_unknown_policy_is_a_clear_error(sink):
    with pytest.raises(ValueError, match="unknown TLS policy"):
        asyncio.run(send(sink, policy="maybe"))
