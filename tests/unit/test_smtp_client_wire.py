"""Pure functions of the outbound SMTP client: reply parsing, DATA encoding, addresses."""

from __future__ import annotations

import pytest

from kanmon.model import LocalReply, Reply, describe_reply
from kanmon.smtp.client import check_address, encode_data, parse_reply


def test_single_line_reply_with_enhanced_code():
    assert parse_reply([b"250 2.1.5 Ok"]) == Reply(250, "2.1.5", "Ok")


def test_reply_without_enhanced_code():
    assert parse_reply([b"220 mx.example ESMTP"]) == Reply(220, "", "mx.example ESMTP")


def test_bare_code_is_a_reply():
    assert parse_reply([b"250"]) == Reply(250, "", "")


def test_multiline_reply_drops_repeated_enhanced_codes():
    reply = parse_reply([b"550-5.1.1 The email account", b"550-5.1.1 does not", b"550 5.1.1 exist"])
    assert reply == Reply(550, "5.1.1", "The email account\ndoes not\nexist")


def test_enhanced_code_of_another_class_is_text():
    assert parse_reply([b"250 5.0.0 odd"]) == Reply(250, "", "5.0.0 odd")


@pytest.mark.parametrize(
    "lines",
    [
        [],
        [b"25 short"],
        [b"abc text"],
        [b"250-not last"],
        [b"250-a", b"251 b"],
        [b"250 a", b"250 b"],
        [b"250_x"],
        [b"999 out of range"],
        [b"100 too low"],
    ],
)
def test_malformed_replies_are_errors(lines):
    with pytest.raises(ValueError):
        parse_reply(lines)


def test_reply_text_loses_control_characters():
    reply = parse_reply([b"550 5.7.1 a\rb\x00c\x1bd\x7fe \xe2\x80\xa8f"])
    assert reply.text == "a?b?c?d?e ?f"


def test_undecodable_bytes_are_replaced():
    assert parse_reply([b"550 bad \xff\xfe"]).text == "bad \ufffd\ufffd"


@pytest.mark.parametrize(
    ("body", "wire"),
    [
        (b"", b".\r\n"),
        (b"a\r\n", b"a\r\n.\r\n"),
        (b"a", b"a\r\n.\r\n"),
        (b".a\r\n", b"..a\r\n.\r\n"),
        (b"a\r\n.\r\nb\r\n", b"a\r\n..\r\nb\r\n.\r\n"),
        (b"a\n.\nb", b"a\r\n..\r\nb\r\n.\r\n"),
        (b"a\r.\rb\r\n", b"a\r\n..\r\nb\r\n.\r\n"),
        (b"a\r\r\nb\n\r\n", b"a\r\n\r\nb\r\n\r\n.\r\n"),
        (b"..\r\n", b"...\r\n.\r\n"),
        (b"\r\n", b"\r\n.\r\n"),
    ],
)
def test_encode_data(body, wire):
    assert encode_data(body) == wire


def test_encoded_data_never_has_a_bare_cr_or_lf_or_an_early_end():
    body = b"x\r\n.\r\ny\n.\nz\r.\r" * 50 + b"\r\n.\r\n"
    wire = encode_data(body)
    assert wire.count(b"\r") == wire.count(b"\r\n") == wire.count(b"\n")
    assert wire.find(b"\r\n.\r\n") == len(wire) - 5


@pytest.mark.parametrize("address", ["a@b\r\nRCPT TO:<c@d>", "a\n@b", "a\x00@b", "<a@b>", "a@b\x7f", "a\u2028@b",
                                     'a"<"@b', '"a">@b'])
def test_addresses_that_could_inject_commands_are_refused(address):
    with pytest.raises(ValueError):
        check_address(address)


@pytest.mark.parametrize("address", ["", "a@b.example", '"john doe"@b.example', "jörg@b.example",
                                     '"<b>q</b>"@b.example'])
def test_ordinary_addresses_pass(address):
    check_address(address)


def test_describe_reply_local_and_remote():
    assert describe_reply(LocalReply(451, "4.4.1", "Connection refused by 192.0.2.7")) == "Connection refused by 192.0.2.7"
    assert describe_reply(Reply(451, "4.3.0", "try\nlater")) == "451 4.3.0 try later"
