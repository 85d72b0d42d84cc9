"""Hardening: hostile input against the session state machine, driven by bytes.

Hand-written cases for what a hostile client sends (floods, pipelining without PIPELINING,
junk commands, envelope tricks), then hypothesis properties that must hold for any input:
no 250 for DATA not ended by <CRLF>.<CRLF>, one reply per command line and in order,
replies independent of how the bytes are split, and bounded buffers.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kanmon.smtp import replies
from kanmon.smtp.session import MAX_COMMAND_LINE, MAX_DISCARDED_LINE, Close, Session, State, StoreMessage
from tests.conftest import LONG
from tests.protocol.test_session import TX, codes, make_session, ready, sent, stores

EXAMPLES = 2000 if LONG else 150


def helo(s: Session) -> Session:
    s.greeting()
    assert codes(s.feed(b"HELO old.client.example\r\n")) == ["250"]
    return s


# -- pipelining without PIPELINING (RFC 2920; Postfix smtpd_forbid_unauth_pipelining) -----


def test_helo_client_that_pipelines_is_disconnected_with_554():
    s = helo(make_session())
    out = s.feed(b"MAIL FROM:<a@remote.example>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n")
    assert sent(out) == replies.UNAUTH_PIPELINING.wire()
    assert isinstance(out[-1], Close) and s.state is State.CLOSED
    assert stores(out) == [] and s.feed(b".\r\n") == []


def test_pipelining_is_detected_across_reads():
    s = helo(make_session())
    assert sent(s.feed(b"MAIL FROM:<a@remote.example>\r\nRC")) == replies.UNAUTH_PIPELINING.wire()


def test_helo_client_waiting_for_each_reply_is_served():
    s = helo(make_session())
    out = []
    for line in (b"MAIL FROM:<a@remote.example>\r\n", b"RCPT TO:<alice@example.test>\r\n", b"DATA\r\n",
                 b"Subject: x\r\n\r\nbody\r\n.\r\n"):
        out += s.feed(line)
    assert codes(out) == ["250", "250", "354"] and len(stores(out)) == 1
    assert codes(s.message_stored(stores(out)[0].queue_id)) == ["250"]


def test_ehlo_client_may_pipeline():
    s = ready(make_session())
    out = s.feed(TX + b"x\r\n.\r\n")
    assert codes(out) == ["250", "250", "354"] and len(stores(out)) == 1


# -- unbounded input ---------------------------------------------------------------------


def test_ten_megabyte_command_line_is_refused_then_the_connection_closed():
    s = ready(make_session())
    out = []
    chunk = b"x" * 65536
    for _ in range(160):  # 10 MB in 64 KiB reads, as the listener would feed them
        out += s.feed(chunk)
        assert s.buffered() <= MAX_COMMAND_LINE
        if s.state is State.CLOSED:
            break
    assert sent(out) == replies.LINE_TOO_LONG.wire() + replies.LINE_FLOOD.wire()
    assert isinstance(out[-1], Close)


def test_long_line_below_the_flood_limit_only_costs_an_error():
    s = ready(make_session())
    out = s.feed(b"NOOP " + b"x" * (MAX_DISCARDED_LINE - 1000) + b"\r\nNOOP\r\n")
    assert codes(out) == ["500", "250"] and s.state is State.READY


def test_ten_thousand_unknown_commands_close_after_max_errors():
    s = ready(make_session(max_errors=10))
    out = s.feed(b"XYZZY\r\n" * 10_000)
    assert codes(out) == ["500"] * 10 + ["421"]
    assert b"421 4.7.0 Too many errors" in sent(out) and isinstance(out[-1], Close)
    assert s.feed(b"NOOP\r\n") == []


def test_hundred_thousand_header_lines_are_bounded_by_the_size_limit():
    s = ready(make_session())  # max_message_size 10KB
    s.feed(TX)
    out = s.feed(b"X-H: v\r\n" * 100_000 + b"\r\nbody\r\n.\r\n")
    assert stores(out) == [] and codes(out) == ["552"]
    assert len(s._data) == 0


# -- envelope ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "reply"),
    [
        (b"MAIL FROM:<a\x00b@remote.example>", "501 5.1.7"),  # NUL
        (b"MAIL FROM:<\xe9t\xe9@remote.example>", "501 5.5.4"),  # 8-bit, not UTF-8
        ("MAIL FROM:<jöran@remote.example>".encode(), "553 5.6.7"),  # UTF-8 without SMTPUTF8
        (b"MAIL FROM:<" + b"a" * 65 + b"@remote.example>", "501 5.1.7"),  # local part > 64
        (b"MAIL FROM:<a@" + b"b" * 64 + b".example>", "501 5.1.7"),  # label > 63
        (b"MAIL FROM:<a@" + b"b." * 128 + b"example>", "501 5.1.7"),  # domain > 255
        (b"MAIL FROM:<" + b"a" * 64 + b"@" + (b"b" * 62 + b".") * 3 + b"bbbbb>", "501 5.1.7"),  # path 259 > 256
        (b"MAIL FROM:<a@remote.example>\rBcc: victim@elsewhere.example", "550 5.5.2"),  # CR injection
        (b'MAIL FROM:<"a\rb"@remote.example>', "550 5.5.2"),
        (b"MAIL FROM:<a@[300.0.0.1]>", "501 5.1.7"),
        (b"MAIL FROM:<a@[127.0.0.1>", "501 5.1.7"),
    ],
    ids=["nul", "8bit-latin1", "utf8-no-smtputf8", "local-65", "label-64", "domain-256", "path-256",
         "cr-header-injection", "cr-in-quotes", "bad-ip-literal", "unclosed-literal"],
)
def test_hostile_envelope_senders(line, reply):
    s = ready(make_session(ip="127.0.0.9"))
    out = s.feed(line + b"\r\n")
    assert sent(out).decode("latin-1").startswith(reply)
    assert s.state is State.READY  # no transaction began


@pytest.mark.parametrize(
    ("rcpt", "reply"),
    [
        (b"<postmaster@[127.0.0.1]>", "554 5.7.1"),  # an IP literal is not one of our domains
        (b"<u@[IPv6:::1]>", "554 5.7.1"),
        (b'<"alice"@example.test>', "250 2.1.5"),  # quoting that changes nothing is removed
        (b'<"ali ce"@example.test>', "550 5.1.1"),  # a quoted local part that is nobody
        (b'<"al\\"ice"@example.test>', "550 5.1.1"),
        (b"<ALICE@EXAMPLE.TEST>", "250 2.1.5"),
    ],
)
def test_ip_literals_and_quoted_local_parts_from_outside(rcpt, reply):
    s = ready(make_session(ip="127.0.0.9"))
    s.feed(b"MAIL FROM:<a@remote.example>\r\n")
    assert sent(s.feed(b"RCPT TO:" + rcpt + b"\r\n")).decode().startswith(reply)


# The classic relay-test list (as in the old relay testers), with case variants: all are
# refused for a client outside relay_networks (DESIGN.md promise 4).
RELAY_TRICKS = [
    b"<u%victim.example@example.test>", b"<U%Victim.Example@EXAMPLE.TEST>",
    b"<victim.example!u@example.test>", b"<VICTIM.EXAMPLE!U@Example.Test>",
    b'<"u@victim.example"@example.test>', b'<"U@VICTIM.EXAMPLE"@EXAMPLE.TEST>',
    b"<@example.test:u@victim.example>", b"<@EXAMPLE.TEST:U@VICTIM.EXAMPLE>",
    b"<@example.test,@example.test:u@victim.example>",
    b"<u@victim.example@example.test>", b"<U@Victim.Example@Example.Test>",
    b"<u@victim.example.>", b"<U@VICTIM.EXAMPLE.>",
    b"<u@victim.example>", b"<U@VICTIM.EXAMPLE>",
    b'<"u%victim.example"@example.test>', b"<u%victim.example@[127.0.0.1]>",
    b"<u@[127.0.0.1]>",
]


@pytest.mark.parametrize("rcpt", RELAY_TRICKS)
def test_relay_attempts_from_outside_are_refused(rcpt):
    s = ready(make_session(ip="127.0.0.9"))
    s.feed(b"MAIL FROM:<a@remote.example>\r\n")
    out = s.feed(b"RCPT TO:" + rcpt + b"\r\n")
    assert sent(out)[:1] == b"5" and s.state is State.MAIL  # refused, nothing accepted
    assert codes(s.feed(b"DATA\r\n")) == ["503"]


# -- properties (hypothesis) ---------------------------------------------------------------

# Pieces of command text: verbs, addresses, and the bytes that make trouble.
_PIECES = st.sampled_from([
    b"NOOP", b"RSET", b"VRFY x", b"HELP", b"EHLO c", b"BOGUS", b"MAIL FROM:<a@remote.example>",
    b"RCPT TO:<alice@example.test>", b"RCPT TO:<x@victim.example>", b"MAIL FROM:<>", b" ", b"<", b">", b":",
    b"\x00", b"\xff", b"\xc3\xa9", b"\r", b"x" * 100, b"%", b"@", b".",
])
_LINE = st.lists(_PIECES, max_size=8).map(b"".join).filter(lambda b: b"\n" not in b)
_SPLITS = st.lists(st.integers(min_value=0, max_value=4096), max_size=20)


def _chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, last = [], 0
    for p in points + [len(data)]:
        out.append(data[last:p])
        last = p
    return out


def _drive(s: Session, chunks: list[bytes], limit_slack: int = 0) -> list:
    """Feed chunks the way the listener does; complete storage at once; check the bounds."""
    out: list = []
    for chunk in chunks:
        actions = s.feed(chunk)
        while True:
            out += actions
            pending = [a for a in actions if isinstance(a, StoreMessage)]
            if not pending:
                break
            actions = s.message_stored(pending[0].queue_id)
        if not s.waiting:
            # Promise 6: in command mode at most one partial line is held; in DATA at most
            # the size limit plus the scan slack plus what arrived in this read.
            assert s.buffered() <= MAX_COMMAND_LINE
            assert len(s._data) <= s.settings.max_message_size + 4096 + len(chunk) + 2
    return out


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lines=st.lists(_LINE, max_size=30), crlf=st.lists(st.booleans(), max_size=30), cuts=_SPLITS)
def test_one_reply_per_command_line_in_order_whatever_the_split(lines, crlf, cuts):
    ends = [b"\r\n" if (crlf[i] if i < len(crlf) else True) else b"\n" for i in range(len(lines))]
    stream = b"".join(line + end for line, end in zip(lines, ends, strict=True))
    whole = make_session(max_errors=10**9)
    whole.greeting()
    once = _drive(whole, [b"EHLO c\r\n" + stream])
    split = make_session(max_errors=10**9)
    split.greeting()
    pieces = _drive(split, _chunks(b"EHLO c\r\n" + stream, cuts))
    # One final reply for EHLO and for every line, nothing more (no DATA was ever begun).
    assert len(codes(once)) == 1 + len(lines)
    # The replies do not depend on how TCP split the bytes.
    assert sent(pieces) == sent(once)


_BODY_PIECES = st.sampled_from([
    b"a", b"text ", b".", b"..", b"\r", b"\n", b"\r\n", b"\x00", b"\r\n.", b".\r\n", b"\r\n.\r", b"\n.\n",
    b"\r.\n", b"\r\n.\n", b"MAIL FROM:<evil@remote.example>\r\n", b"Received: x\r\n", b"\xff",
])
_ENDINGS = st.sampled_from([b"\r\n.\r\n", b"", b"\n.\n", b"\r.\r", b"\r\n.\r", b"\r.\n", b".\r\n", b"\n.\r\n"])


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=st.lists(_BODY_PIECES, max_size=40).map(b"".join), ending=_ENDINGS,
       after=st.sampled_from([b"", b"NOOP\r\n", b"QUIT\r\n", b"RCPT TO:<bob@example.test>\r\nDATA\r\n"]),
       cuts=_SPLITS)
def test_only_crlf_dot_crlf_ends_data_and_stored_content_is_clean(body, ending, after, cuts):
    s = ready(make_session())
    stream = TX + body + ending + after
    out = _drive(s, _chunks(stream, cuts))
    data = b"\r\n" + body + ending + after  # the virtual CRLF before the first line
    end = data.find(b"\r\n.\r\n")
    replies_ = codes(out)
    assert replies_[:3] == ["250", "250", "354"]
    if end < 0:
        # Not ended by <CRLF>.<CRLF>: nothing stored, no reply at all after 354.
        assert stores(out) == [] and replies_ == ["250", "250", "354"] and s.state is State.DATA
        return
    content = data[2 : end + 2]
    stored = stores(out)
    clean = content.count(b"\r") == content.count(b"\n") == content.count(b"\r\n")
    if not clean:
        assert stored == [] and replies_[3] == "550"
        return
    # The first stored message is exactly the content up to the first <CRLF>.<CRLF>.
    assert replies_[3] in ("250", "552", "554")
    if replies_[3] == "250":
        first = stored[0].content
        # RFC 5321 4.5.2: every line that starts with a dot loses it ("." alone ended DATA).
        unstuffed = (content[1:] if content.startswith(b".") else content).replace(b"\r\n.", b"\r\n")
        assert first.startswith(b"Received: ") and first.endswith(unstuffed)
    for m in stored:
        c = m.content
        assert c.count(b"\r") == c.count(b"\n") == c.count(b"\r\n")  # never a bare CR or LF queued
