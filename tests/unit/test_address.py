"""MAIL FROM / RCPT TO argument parsing (RFC 5321 4.1.2)."""

from __future__ import annotations

import pytest

from kanmon.model import SmtpError, check_sendable
from kanmon.smtp.address import parse_path


def rcpt(text: str, utf8: bool = False):
    return parse_path(text, is_sender=False, smtputf8_allowed=utf8)


def code_of(text: str, is_sender: bool = False, utf8: bool = False) -> str:
    with pytest.raises(SmtpError) as e:
        parse_path(text, is_sender=is_sender, smtputf8_allowed=utf8)
    return f"{e.value.reply.code} {e.value.reply.enhanced}"


def test_plain_and_params():
    p = parse_path("<Alice@Example.TEST> SIZE=100 BODY=8BITMIME", is_sender=True, smtputf8_allowed=True)
    assert p.address == "Alice@example.test" and p.domain == "example.test" and p.local == "Alice"
    assert p.params == {"SIZE": "100", "BODY": "8BITMIME"}


def test_null_sender_only_for_mail():
    assert parse_path("<>", is_sender=True, smtputf8_allowed=False).address == ""
    assert code_of("<>") == "501 5.1.3"


def test_postmaster_without_domain():
    assert rcpt("<Postmaster>").local == "postmaster"


def test_quoted_local_part():
    assert rcpt('<"john smith"@example.test>').address == '"john smith"@example.test'
    assert rcpt('<"plain"@example.test>').address == "plain@example.test"
    assert rcpt('<"<b>q</b>"@example.test>').address == '"<b>q</b>"@example.test'  # qtextSMTP has < and >
    assert rcpt('<"a\\"<"@example.test>').address == '"a\\"<"@example.test'


@pytest.mark.parametrize("local", ['"a\u2028b"', "a\u2028b", '"a\x85b"', "a\u2029b"])
def test_what_the_outbound_client_refuses_is_refused_at_mail_and_rcpt(local):
    # Line ends to some peers: the outbound client would not write them (check_sendable).
    assert code_of(f"<{local}@example.test> SMTPUTF8", is_sender=True, utf8=True) == "553 5.1.7"
    assert code_of(f"<{local}@example.test>", utf8=True) == "553 5.1.3"


@pytest.mark.parametrize("text", ["", "a@b.example", '"john doe"@b.example', '"<b>q</b>"@b.example', '"a\\"<"@b'])
def test_sendable(text):
    check_sendable(text)


@pytest.mark.parametrize("text", ["<a@b>", 'a"<"@b', '"a"<@b', "a@b>", '"a\u2028"@b', "a@b\r\nDATA", "a@" + "b" * 1000])
def test_not_sendable(text):
    with pytest.raises(ValueError):
        check_sendable(text)


def test_ip_literals():
    assert rcpt("<u@[192.0.2.1]>").domain == "[192.0.2.1]"
    assert rcpt("<u@[IPv6:2001:db8::1]>").domain == "[IPv6:2001:db8::1]"
    assert code_of("<u@[300.1.1.1]>") == "501 5.1.3"


@pytest.mark.parametrize(
    "text", ["<u%v@example.test>", "<v!u@example.test>", '<"u@v"@example.test>', "<@a.example:u@b.example>",
             "<u@v@example.test>", '<"u%v"@example.test>', "<@a.example,@b.example:u@c.example>"],
)
def test_routed(text):
    assert code_of(text) == "550 5.7.1"


@pytest.mark.parametrize(
    "text",
    ["<u@victim.example.>", "<u@>", "<u..v@example.test>", "<.u@example.test>", "<u@-bad.example>",
     "<u@exa mple.test>", "<u@example.test", "u@example.test>", "<u\x00@example.test>", "<u@example.test\x01>"],
)
def test_bad_syntax(text):
    assert code_of(text) == "501 5.1.3"


@pytest.mark.parametrize("text", ["\x1c<u@example.test>", "\x0b<u@example.test>", "<u@example.test>\x1f",
                                  "<u@example.test>\x0c", "\x1cu@example.test"])
def test_control_characters_at_either_end_are_refused_not_dropped(text):
    assert code_of(text).startswith("501 ")


def test_length_limits():
    assert code_of("<" + "a" * 65 + "@example.test>") == "501 5.1.3"
    assert code_of("<u@" + ("a" * 60 + ".") * 5 + "example>") == "501 5.1.3"
    assert rcpt("<" + "a" * 64 + "@example.test>").local == "a" * 64


def test_eight_bit_needs_smtputf8():
    assert code_of("<jöran@example.test>", is_sender=True, utf8=True) == "553 5.6.7"  # no SMTPUTF8 param
    p = parse_path("<jöran@exämple.test> SMTPUTF8", is_sender=True, smtputf8_allowed=True)
    assert p.address == "jöran@exämple.test"
    assert code_of("<jöran@example.test>", utf8=False) == "553 5.6.7"


def test_bad_params():
    assert code_of("<a@b.example> =x", is_sender=True) == "501 5.5.4"


# -- RFC 3461 xtext and the DSN parameters ------------------------------------------------------

from kanmon.smtp.address import parse_notify, parse_orcpt  # noqa: E402
from kanmon.smtp.xtext import xtext_decode, xtext_encode  # noqa: E402


@pytest.mark.parametrize("text", ["plain", "a+b=c", "with space", "+2B", ""])
def test_xtext_round_trip(text):
    encoded = xtext_encode(text)
    assert all("!" <= c <= "~" and c != "=" for c in encoded)
    assert xtext_decode(encoded) == text


def test_xtext_decode_is_strict():
    assert xtext_decode("a+2Bb+3D") == "a+b="
    for bad in ("a=b", "a+2", "a+G0", "a b", "\x01"):
        with pytest.raises(ValueError):
            xtext_decode(bad)


def test_notify_is_normalised_and_orcpt_decoded():
    assert parse_notify("delay,Success") == "SUCCESS,DELAY"
    assert parse_notify("never") == "NEVER"
    assert parse_orcpt("RFC822;a+2Bb@c.example") == "rfc822;a+b@c.example"
