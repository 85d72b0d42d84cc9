"""The per-session limits of a session profile and bare LF handling, driven by bytes."""

from __future__ import annotations

import base64

import pytest

from kanmon.config import parse_config
from kanmon.model import ClientInfo
from kanmon.policy.profiles import profile_for
from kanmon.policy.standard import standard_pipeline
from kanmon.smtp import replies
from kanmon.smtp.session import Authenticate, Close, Rejected, Session, SessionSettings
from tests.protocol.test_session import CONFIG, codes, sent, stores

LIMITS = CONFIG + """
[[session_profile]]
name = "default"
max_ehlo = 2
max_noop = 3
max_rset = 2
max_messages_per_session = 2
max_recipients = 2
max_header_size = "200B"
max_message_size = "1KB"
max_errors = 5
"""

OUTSIDE = "192.0.2.9"  # not in relay_networks: the "default" profile
MAIL = b"MAIL FROM:<sender@remote.example>\r\n"
RCPT = b"RCPT TO:<alice@example.test>\r\n"


def session(ip: str = OUTSIDE, config: str = LIMITS, **settings) -> Session:
    cfg = parse_config(config)
    pipeline = standard_pipeline(cfg, free_disk=lambda: 10**12)
    pipeline.refresh()
    s = SessionSettings(hostname="mx1.example.test", max_message_size=0, max_recipients=0, **settings)
    s.apply_profile(profile_for(ip, False, cfg))
    sess = Session(s, pipeline, ClientInfo(ip=ip), now=1_700_000_000.0)
    sess.greeting()
    return sess


def rejected(actions) -> list[Rejected]:
    return [a for a in actions if isinstance(a, Rejected)]


def closed(actions) -> bool:
    return any(isinstance(a, Close) for a in actions)


def test_apply_profile_takes_every_session_limit():
    s = session()
    st = s.settings
    assert (st.max_ehlo, st.max_noop, st.max_rset, st.max_messages, st.max_recipients) == (2, 3, 2, 2, 2)
    assert (st.max_header_size, st.max_message_size, st.max_errors, st.bare_lf) == (200, 1000, 5, False)
    assert st.profile is not None and st.profile.name == "default"
    trusted = session("127.0.0.1").settings  # relay_networks: the built-in "trusted"
    assert (trusted.max_ehlo, trusted.max_noop, trusted.max_rset, trusted.max_messages, trusted.bare_lf) == (0, 0, 0, 0, True)


@pytest.mark.parametrize("verb", [b"EHLO c", b"HELO c"])
def test_ehlo_limit_at_its_boundary(verb):
    s = session()
    assert codes(s.feed(b"EHLO c\r\n")) == ["250"]
    assert codes(s.feed(verb + b"\r\n")) == ["250"]  # the second: at the limit
    out = s.feed(verb + b"\r\n")
    assert sent(out) == replies.TOO_MANY_EHLO.wire()  # the third: 421
    assert closed(out)
    (r,) = rejected(out)
    assert (r.check, r.reply) == ("max_ehlo", replies.TOO_MANY_EHLO)


def test_noop_limit_at_its_boundary():
    s = session()
    s.feed(b"EHLO c\r\n")
    assert codes(s.feed(b"NOOP\r\n" * 3)) == ["250"] * 3
    out = s.feed(b"NOOP\r\n")
    assert codes(out) == ["421"] and closed(out)
    assert rejected(out)[0].check == "max_noop"


def test_rset_limit_at_its_boundary():
    s = session()
    s.feed(b"EHLO c\r\n")
    assert codes(s.feed(b"RSET\r\nRSET\r\n")) == ["250", "250"]
    out = s.feed(b"RSET\r\n")
    assert sent(out) == replies.TOO_MANY_RSET.wire() and closed(out)
    assert rejected(out)[0].check == "max_rset"


def send_message(s: Session, body: bytes = b"Subject: x\r\n\r\nbody\r\n") -> list:
    out = s.feed(MAIL + RCPT + b"DATA\r\n" + body + b".\r\n")
    for a in stores(out):
        out += s.message_stored(a.queue_id)
    return out


def test_messages_per_session_at_its_boundary():
    s = session()
    s.feed(b"EHLO c\r\n")
    assert codes(send_message(s))[-1] == "250"
    assert codes(send_message(s))[-1] == "250"  # the second: at the limit
    out = s.feed(MAIL)
    assert sent(out) == replies.TOO_MANY_MESSAGES.wire() and closed(out)
    assert rejected(out)[0].check == "max_messages_per_session"


def test_a_refused_transaction_counts_toward_the_messages_per_session():
    s = session()
    s.feed(b"EHLO c\r\n")
    assert codes(s.feed(MAIL + b"RSET\r\n" + MAIL + b"RSET\r\n")) == ["250"] * 4
    assert codes(s.feed(MAIL)) == ["421"]


def test_recipients_per_message_at_its_boundary():
    s = session()
    s.feed(b"EHLO c\r\n")
    out = s.feed(MAIL + RCPT + b"RCPT TO:<bob@example.test>\r\nRCPT TO:<postmaster@example.test>\r\n")
    assert codes(out) == ["250", "250", "250", "452"]
    (r,) = rejected(out)
    assert (r.check, r.reply) == ("max_recipients", replies.TOO_MANY_RECIPIENTS)
    assert not closed(out) and s.errors == 0  # the client sends the rest later; never an error


def test_message_size_names_its_limit_at_mail_and_at_data():
    s = session()
    s.feed(b"EHLO c\r\n")
    out = s.feed(b"MAIL FROM:<sender@remote.example> SIZE=1001\r\n")
    assert codes(out) == ["552"] and rejected(out)[0].check == "max_message_size"
    out = send_message(s, b"Subject: x\r\n\r\n" + b"y" * 1000 + b"\r\n")
    assert codes(out)[-1] == "552" and rejected(out)[0].check == "max_message_size"


def test_header_size_at_its_boundary():
    s = session()
    s.feed(b"EHLO c\r\n")
    header = b"Subject: " + b"h" * (200 - 11) + b"\r\n"  # 200 octets with its CRLF
    assert len(header) == 200
    out = send_message(s, header + b"\r\nbody\r\n")
    assert codes(out)[-1] == "250"
    content = stores(out)[0].content
    assert content.endswith(header + b"\r\nbody\r\n")
    out = send_message(s, b"X" + header + b"\r\nbody\r\n")
    assert sent(out).endswith(replies.HEADER_TOO_BIG.wire())
    (r,) = rejected(out)
    assert (r.command, r.check) == ("DATA", "max_header_size")
    assert not stores(out)


def test_a_message_without_a_body_is_all_header():
    s = session()
    s.feed(b"EHLO c\r\n")
    out = send_message(s, b"Subject: x\r\n" * 20)  # 240 octets, no blank line
    assert codes(out)[-1] == "552"


def test_too_many_errors_names_the_limit():
    s = session()
    s.feed(b"EHLO c\r\n")
    out = s.feed(b"BOGUS\r\n" * 5)
    assert codes(out) == ["500"] * 5 + ["421"] and closed(out)
    assert rejected(out)[-1].check == "max_errors"
    assert rejected(out)[-1].reply == replies.TOO_MANY_ERRORS


def test_no_limit_when_the_profile_sets_none():
    s = session("127.0.0.1")  # "trusted": no EHLO/NOOP/RSET/messages limit
    out = s.feed(b"EHLO c\r\n" * 5 + b"NOOP\r\n" * 30 + b"RSET\r\n" * 30)
    assert codes(out) == ["250"] * 65
    for _ in range(5):
        assert codes(send_message(s))[-1] == "250"


def test_after_auth_the_authenticated_profile_applies():
    cfg = parse_config(LIMITS)
    s = session(submission=True, tls_active=True)
    s.feed(b"EHLO c\r\n")
    out = s.feed(b"AUTH PLAIN " + base64.b64encode(b"\0alice@example.test\0secret") + b"\r\n")
    assert any(isinstance(a, Authenticate) for a in out)
    s.auth_result("alice@example.test", profile=profile_for(OUTSIDE, True, cfg))
    assert s.settings.profile.name == "trusted" and s.settings.bare_lf
    assert codes(s.feed(b"EHLO c\r\n" * 3 + b"NOOP\r\n" * 10)) == ["250"] * 13  # no limits any more


# -- bare LF ---------------------------------------------------------------------------------


def test_bare_lf_from_an_untrusted_client_is_refused_in_commands_and_data():
    s = session()
    out = s.feed(b"EHLO c\n")
    assert sent(out) == replies.BARE_NEWLINE.wire()
    assert rejected(out)[0].check == "bare_newline"
    s.feed(b"EHLO c\r\n")
    out = s.feed(MAIL + RCPT + b"DATA\r\nSubject: x\n\nbody\r\n.\r\n")
    assert codes(out)[-1] == "550" and not stores(out)
    assert rejected(out)[0].check == "bare_newline"


@pytest.mark.parametrize("end", [b"\n.\n", b"\n.\r\n", b"\r\n.\r\n", b"\r\n.\n"])
def test_bare_lf_from_a_trusted_client_is_normalised(end):
    s = session("127.0.0.1")
    out = s.feed(b"EHLO c\nMAIL FROM:<a@remote.example>\nRCPT TO:<alice@example.test>\nDATA\n")
    assert codes(out) == ["250", "250", "250", "354"]
    out = s.feed(b"Subject: lf\n\nline one\r\n..dot\nlast" + end + b"QUIT\n")
    (m,) = stores(out)
    body = m.content.split(b"Subject: lf", 1)[1]
    assert body == b"\r\n\r\nline one\r\n.dot\r\nlast\r\n"  # CRLF only, dot-unstuffed
    assert b"\n" not in m.content.replace(b"\r\n", b"")
    out = s.message_stored(m.queue_id)
    assert codes(out) == ["250", "221"]


def test_bare_lf_data_split_across_reads_is_found():
    s = session("127.0.0.1")
    s.feed(b"EHLO c\n" + MAIL + RCPT + b"DATA\n")
    out = []
    for chunk in (b"Subject: s\n\nbody\n", b".", b"\n"):
        out += s.feed(chunk)
    (m,) = stores(out)
    assert m.content.endswith(b"Subject: s\r\n\r\nbody\r\n")


def test_a_bare_cr_is_refused_even_when_lf_is_normalised():
    s = session("127.0.0.1")
    assert codes(s.feed(b"EHLO c\rx\n")) == ["550"]
    s.feed(b"EHLO c\n" + MAIL + RCPT + b"DATA\n")
    out = s.feed(b"Subject: s\n\nbo\rdy\n.\n")
    assert codes(out) == ["550"] and not stores(out)


def test_a_trusted_profile_may_still_refuse_bare_lf():
    config = LIMITS + '[[session_profile]]\nname = "trusted"\nbare_newline = "reject"\n'
    s = session("127.0.0.1", config=config)
    assert codes(s.feed(b"EHLO c\n")) == ["550"]


def test_normalised_data_ends_the_same_however_it_is_split():
    """Every split point of a message with LF, CRLF, dot-stuffed lines and a terminator
    split across reads: one message, the same content, the commands after it run."""
    data = b"Subject: s\n\n.hidden?\n..dot\r\nx\n.\r\nNOOP\n"
    want = None
    for cut in range(len(data) + 1):
        s = session("127.0.0.1")
        s.feed(b"EHLO c\n" + MAIL + RCPT + b"DATA\n")
        out = s.feed(data[:cut]) + s.feed(data[cut:])
        (m,) = stores(out)
        out += s.message_stored(m.queue_id)
        assert codes(out)[-2:] == ["250", "250"]  # queued, then NOOP
        body = m.content.split(b"Subject: s", 1)[1]
        want = want or body
        assert body == want == b"\r\n\r\nhidden?\r\n.dot\r\nx\r\n"  # a leading dot is deleted (RFC 5321 4.5.2)


def test_normalised_data_without_an_end_is_bounded():
    s = session("127.0.0.1")
    s.feed(b"EHLO c\n" + MAIL + RCPT + b"DATA\n")
    for _ in range(300):  # 30 KB, max_message_size 10 KB ([smtp] of CONFIG)
        s.feed(b"y" * 98 + b"\n.")  # every read ends in a possible terminator
        assert len(s._data) <= 10_000 + 4096 + 100
    out = s.feed(b"\n")  # the last read's "<LF>." ends it
    assert codes(out) == ["552"]
