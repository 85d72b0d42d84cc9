"""The DSN SMTP extension (RFC 3461) in the session: EHLO offers it, MAIL takes RET and
ENVID, RCPT takes NOTIFY and ORCPT, a malformed value is 501 5.5.4, and the envelope the
listener stores carries them (per final recipient, aliases expanded)."""

from __future__ import annotations

import pytest

from kanmon.smtp import replies
from tests.protocol.test_session import codes, make_session, ready, sent, stores


def transaction(mail: bytes, *rcpts: bytes):
    s = ready(make_session())
    out = s.feed(mail + b"\r\n" + b"".join(r + b"\r\n" for r in rcpts) + b"DATA\r\n")
    assert codes(out) == ["250"] * (1 + len(rcpts)) + ["354"], sent(out)
    (store,) = stores(s.feed(b"Subject: x\r\n\r\nhi\r\n.\r\n"))
    return store.envelope


def test_ehlo_offers_dsn():
    s = make_session()
    s.greeting()
    assert b"250-DSN\r\n" in sent(s.feed(b"EHLO client.example\r\n"))


def test_mail_ret_and_envid_reach_the_envelope():
    env = transaction(b"MAIL FROM:<s@remote.example> RET=hdrs ENVID=QQ+2B1+3DX", b"RCPT TO:<alice@example.test>")
    assert env.dsn_ret == "HDRS" and env.dsn_envid == "QQ+1=X"
    env = transaction(b"MAIL FROM:<s@remote.example> RET=FULL", b"RCPT TO:<alice@example.test>")
    assert env.dsn_ret == "FULL" and env.dsn_envid == ""


def test_rcpt_notify_and_orcpt_per_recipient():
    env = transaction(
        b"MAIL FROM:<s@remote.example>",
        b"RCPT TO:<alice@example.test> NOTIFY=success,failure ORCPT=rfc822;Alice+2Bx@example.test",
        b"RCPT TO:<bob@example.test> NOTIFY=NEVER",
    )
    assert env.dsn_notify == {"alice@example.test": "SUCCESS,FAILURE", "bob@example.test": "NEVER"}
    assert env.dsn_orcpt == {"alice@example.test": "rfc822;Alice+x@example.test"}
    assert env.wants_notice("alice@example.test", "SUCCESS") and not env.wants_notice("alice@example.test", "DELAY")
    assert not env.wants_notice("bob@example.test", "FAILURE")


def test_an_alias_passes_notify_and_orcpt_to_each_member():
    env = transaction(b"MAIL FROM:<s@remote.example>", b"RCPT TO:<info@example.test> NOTIFY=DELAY ORCPT=rfc822;info@example.test")
    assert sorted(env.dsn_notify) == ["alice@example.test", "bob@example.test"]
    assert set(env.dsn_notify.values()) == {"DELAY"}
    assert env.dsn_orcpt["bob@example.test"] == "rfc822;info@example.test"


def test_without_dsn_parameters_the_envelope_has_none_and_the_defaults_apply():
    env = transaction(b"MAIL FROM:<s@remote.example>", b"RCPT TO:<alice@example.test>")
    assert (env.dsn_ret, env.dsn_envid, env.dsn_notify, env.dsn_orcpt) == ("", "", {}, {})
    assert env.wants_notice("alice@example.test", "FAILURE") and env.wants_notice("alice@example.test", "DELAY")
    assert not env.wants_notice("alice@example.test", "SUCCESS")


@pytest.mark.parametrize("params", [
    b"RET=ALL", b"RET", b"ENVID=", b"ENVID=a=b", b"ENVID=bad+2", b"ENVID=bad+ZZ", b"ENVID=" + b"x" * 101,
    b"ENVID=a+0Ab",  # a decoded control character
])
def test_bad_mail_dsn_parameters_are_501(params):
    s = ready(make_session())
    name = params.partition(b"=")[0].decode()
    assert sent(s.feed(b"MAIL FROM:<s@remote.example> " + params + b"\r\n")) == replies.bad_parameter(name).wire()


@pytest.mark.parametrize("params", [
    b"NOTIFY=", b"NOTIFY", b"NOTIFY=NEVER,SUCCESS", b"NOTIFY=SOMETIMES", b"NOTIFY=SUCCESS,,DELAY",
    b"ORCPT=", b"ORCPT=rfc822", b"ORCPT=rfc822;", b"ORCPT=;a@b.example", b"ORCPT=rfc822;a=b@c.example",
    b"ORCPT=rfc822;a+2@b.example", b"ORCPT=rfc822;" + b"a" * 494,  # 501 characters
])
def test_bad_rcpt_dsn_parameters_are_501(params):
    s = ready(make_session())
    s.feed(b"MAIL FROM:<s@remote.example>\r\n")
    name = params.partition(b"=")[0].decode()
    assert sent(s.feed(b"RCPT TO:<alice@example.test> " + params + b"\r\n")) == replies.bad_parameter(name).wire()


@pytest.mark.parametrize("command, name", [
    (b"MAIL FROM:<x@example.org> ENVID=ab\x1bc", "ENVID"),
    (b"MAIL FROM:<x@example.org> RET=FULL ENVID=ab\x00c", "ENVID"),
    (b"MAIL FROM:<x@example.org> SIZE=1\x7f", "SIZE"),
    (b"RCPT TO:<alice@example.test> ORCPT=rfc822;carol+2B\x1bx@down.test", "ORCPT"),
    (b"RCPT TO:<alice@example.test> NOTIFY=SUCCESS\x1f,DELAY", "NOTIFY"),
])
def test_control_characters_in_a_parameter_are_501_5_5_4_naming_it(command, name):
    # A control character in a parameter's value is a parameter error, not a bad address.
    s = ready(make_session())
    if command.startswith(b"RCPT"):
        s.feed(b"MAIL FROM:<s@remote.example>\r\n")
    reply = sent(s.feed(command + b"\r\n"))
    assert reply == replies.bad_parameter(name).wire()
    assert reply.startswith(b"501 5.5.4 ") and name.encode() in reply


def test_control_characters_in_the_address_are_still_address_syntax():
    s = ready(make_session())
    assert sent(s.feed(b"MAIL FROM:<x\x1by@example.org> ENVID=abc\r\n")) == replies.BAD_SENDER_SYNTAX.wire()
    s.feed(b"MAIL FROM:<s@remote.example>\r\n")
    assert sent(s.feed(b"RCPT TO:<al\x00ice@example.test> NOTIFY=NEVER\r\n")) == replies.BAD_RCPT_SYNTAX.wire()


def test_unknown_rcpt_parameters_and_dsn_after_helo_are_still_555():
    s = ready(make_session())
    s.feed(b"MAIL FROM:<s@remote.example>\r\n")
    assert sent(s.feed(b"RCPT TO:<alice@example.test> FOO=1\r\n")).startswith(b"555")
    helo = make_session()
    helo.greeting()
    helo.feed(b"HELO client.example\r\n")
    assert sent(helo.feed(b"MAIL FROM:<s@remote.example> RET=FULL\r\n")).startswith(b"555")
    helo.feed(b"MAIL FROM:<s@remote.example>\r\n")
    assert sent(helo.feed(b"RCPT TO:<alice@example.test> NOTIFY=NEVER\r\n")).startswith(b"555")
