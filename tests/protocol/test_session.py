"""The ESMTP session state machine, driven by bytes (no sockets)."""

from __future__ import annotations

import re
import time

import pytest

from kanmon.config import parse_config
from kanmon.model import ClientInfo
from kanmon.policy.access import RelayAccess
from kanmon.policy.standard import standard_pipeline
from kanmon.smtp import replies
from kanmon.smtp.session import Close, Rejected, Send, Session, SessionSettings, StartTls, State, StoreMessage

CONFIG = """
[server]
hostname = "mx1.example.test"
data_dir = "/nonexistent"
[smtp]
relay_networks = ["127.0.0.1/32"]
max_message_size = "10KB"
max_recipients = 100
min_free_disk = "0"
[[domain]]
name = "example.test"
mailboxes = ["alice", "bob", "postmaster"]
aliases = { info = ["alice", "bob"], all = ["alice", "bob", "ALICE"] }
[[domain]]
name = "corp.example"
deliver = "relay"
servers = ["127.0.0.7:25"]
"""


def make_session(ip: str = "127.0.0.1", *, free_disk: int = 10**12, config: str = CONFIG, **settings) -> Session:
    cfg = parse_config(config)
    pipeline = standard_pipeline(cfg, free_disk=lambda: free_disk)
    pipeline.refresh()  # the listener's probe refresh, here by hand
    s = SessionSettings(
        hostname="mx1.example.test",
        max_message_size=cfg.smtp.max_message_size,
        max_recipients=cfg.smtp.max_recipients,
        max_errors=settings.pop("max_errors", 10),
        **settings,
    )
    return Session(s, pipeline, ClientInfo(ip=ip), now=1_700_000_000.0)


def sent(actions) -> bytes:
    return b"".join(a.data for a in actions if isinstance(a, Send))


def stores(actions) -> list[StoreMessage]:
    return [a for a in actions if isinstance(a, StoreMessage)]


def codes(actions) -> list[str]:
    """The reply code of every reply line that ends a reply (no continuation lines)."""
    out = []
    for line in sent(actions).split(b"\r\n"):
        if len(line) >= 4 and line[3:4] == b" ":
            out.append(line[:3].decode())
    return out


def ready(s: Session) -> Session:
    s.greeting()
    s.feed(b"EHLO client.example\r\n")
    return s


TX = b"MAIL FROM:<sender@remote.example>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n"


def test_greeting_and_ehlo_advertise_extensions():
    s = make_session()
    assert sent(s.greeting()) == b"220 mx1.example.test ESMTP kanmon\r\n"
    reply = sent(s.feed(b"EHLO client.example\r\n")).decode()
    for ext in ("PIPELINING", "SIZE 10000", "8BITMIME", "ENHANCEDSTATUSCODES", "STARTTLS", "SMTPUTF8"):
        assert f"250-{ext}" in reply or f"250 {ext}" in reply
    assert reply.endswith("250 STARTTLS\r\n")


def test_pipelined_transaction_is_stored_and_acknowledged_only_after_storage():
    s = ready(make_session())
    actions = s.feed(TX + b"Subject: hi\r\n\r\nbody\r\n.\r\nQUIT\r\n")
    assert codes(actions) == ["250", "250", "354"]  # no reply to the dot yet, QUIT waits
    (store,) = stores(actions)
    assert store.envelope.mail_from == "sender@remote.example"
    assert store.envelope.rcpts == ["alice@example.test"]
    assert store.content.startswith(b"Received: from client.example (unknown [127.0.0.1])\r\n")
    assert store.content.endswith(b"Subject: hi\r\n\r\nbody\r\n")
    assert s.state is State.WAIT_STORE
    after = s.message_stored(store.queue_id)
    assert sent(after) == f"250 2.0.0 Ok: queued as {store.queue_id}\r\n221 2.0.0 Bye\r\n".encode()
    assert any(isinstance(a, Close) for a in after)


def test_storage_failure_answers_451_and_queues_nothing():
    s = ready(make_session())
    (store,) = stores(s.feed(TX + b"x\r\n.\r\n"))
    assert sent(s.message_failed(replies.STORAGE_ERROR)).startswith(b"451 4.3.0")
    assert s.state is State.READY


def test_data_split_across_many_feeds_and_terminator_split():
    s = ready(make_session())
    s.feed(TX)
    chunks = [b"Subject: a\r\n", b"\r\nline one\r", b"\n", b"line two\r\n", b".", b"\r", b"\n"]
    out = []
    for c in chunks:
        out += s.feed(c)
    (store,) = stores(out)
    assert store.content.endswith(b"\r\nline one\r\nline two\r\n")


def test_empty_message_is_ended_by_a_lone_dot():
    s = ready(make_session())
    (store,) = stores(s.feed(TX + b".\r\n"))
    assert store.content.endswith(b"for <alice@example.test>; " + store.content.split(b"; ")[-1])


def test_dot_unstuffing():
    s = ready(make_session())
    (store,) = stores(s.feed(TX + b"..leading\r\nmid\r\n...two\r\n.\r\n"))
    body = store.content.split(b"\r\n", 3)[-1]  # after the 3-line Received: header
    assert body == b".leading\r\nmid\r\n..two\r\n"


# RFC 5321 smuggling endings: none of these ends DATA; the message that contains one is
# rejected with 550 5.5.2 (bare CR/LF) and nothing is stored, so nothing can be smuggled.
@pytest.mark.parametrize(
    "ending",
    [b"\n.\n", b"\n.\r\n", b"\r.\r", b"\r\n.\r", b"\r.\n", b".\n"],
    ids=["LF.LF", "LF.CRLF", "CR.CR", "CRLF.CR", "CR.LF", "dotLF-at-start"],
)
def test_smuggling_endings_reject_the_whole_message(ending):
    s = ready(make_session())
    smuggled = b"MAIL FROM:<evil@remote.example>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\nevil\r\n"
    prefix = b"" if ending == b".\n" else b"Subject: x\r\n\r\nhello"
    actions = s.feed(TX + prefix + ending + smuggled + b".\r\n")
    assert stores(actions) == []
    assert codes(actions) == ["250", "250", "354", "550"]
    assert b"550 5.5.2" in sent(actions)
    assert s.state is State.READY


def test_nul_dot_is_not_an_end_of_data():
    s = ready(make_session())
    actions = s.feed(TX + b"a\r\n\x00.\r\nMAIL FROM:<evil@x.example>\r\n.\r\n")
    (store,) = stores(actions)
    assert b"\x00.\r\nMAIL FROM:<evil@x.example>\r\n" in store.content
    assert codes(actions) == ["250", "250", "354"]  # one message, no command run from DATA


def test_bare_lf_in_a_command_is_refused_and_resets_the_transaction():
    s = ready(make_session())
    actions = s.feed(b"MAIL FROM:<a@remote.example>\r\nRCPT TO:<alice@example.test>\nDATA\r\n")
    assert codes(actions) == ["250", "550", "503"]
    assert b"550 5.5.2" in sent(actions)


def test_starttls_discards_pipelined_commands():
    s = ready(make_session())
    actions = s.feed(b"STARTTLS\r\nMAIL FROM:<evil@remote.example>\r\n")
    assert sent(actions) == b"220 2.0.0 Ready to start TLS\r\n"
    assert any(isinstance(a, StartTls) for a in actions)
    assert s.feed(b"") == []
    assert s.tls_started("TLSv1.3", "TLS_AES_256_GCM_SHA384", 256) == []
    # The injected MAIL was never run: a RCPT now has no transaction.
    assert codes(s.feed(b"EHLO again\r\nRCPT TO:<alice@example.test>\r\n")) == ["250", "503"]


def test_after_tls_ehlo_no_longer_offers_starttls_and_received_shows_tls():
    s = ready(make_session())
    s.feed(b"STARTTLS\r\n")
    s.tls_started("TLSv1.3", "TLS_AES_256_GCM_SHA384", 256)
    assert b"STARTTLS" not in sent(s.feed(b"EHLO c\r\n"))
    (store,) = stores(s.feed(TX + b"x\r\n.\r\n"))
    assert b"(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits))" in store.content
    assert b"with ESMTPS id " + store.queue_id.encode() in store.content


def test_command_line_too_long_is_refused_without_buffering_it():
    s = ready(make_session())
    actions = s.feed(b"NOOP " + b"x" * 5000)
    assert codes(actions) == ["500"]
    assert s.buffered() == 0
    # The rest of the long line is skipped, then the session goes on.
    assert codes(s.feed(b"yyyy\r\nNOOP\r\n")) == ["250"]


def test_101_recipients_with_max_100():
    s = ready(make_session())
    s.feed(b"MAIL FROM:<a@remote.example>\r\n")
    out = []
    for i in range(101):
        out += s.feed(f"RCPT TO:<r{i}@corp.example>\r\n".encode())
    c = codes(out)
    assert c[:100] == ["250"] * 100 and c[100] == "452"
    assert b"452 4.5.3" in sent(out)


def test_size_parameter_over_the_limit():
    s = ready(make_session())
    actions = s.feed(b"MAIL FROM:<a@remote.example> SIZE=20000\r\n")
    assert sent(actions).startswith(b"552 5.3.4")


def test_message_growing_past_the_limit_is_read_to_the_end_then_refused():
    s = ready(make_session())
    s.feed(TX)
    out = []
    for _ in range(10):
        out += s.feed(b"x" * 998 + b"\r\n" + b"y" * 998 + b"\r\n")
    out += s.feed(b".\r\nNOOP\r\n")
    assert stores(out) == []
    assert codes(out) == ["552", "250"]
    assert len(s._data) <= 8  # only the scan tail was kept


def test_unknown_user_and_relay_denied_and_aliases():
    s = ready(make_session(ip="127.0.0.9"))
    out = s.feed(b"MAIL FROM:<a@remote.example>\r\n")
    out = s.feed(
        b"RCPT TO:<nobody@example.test>\r\nRCPT TO:<x@victim.example>\r\nRCPT TO:<info@example.test>\r\n"
        b"RCPT TO:<all@example.test>\r\nDATA\r\nx\r\n.\r\n"
    )
    assert codes(out)[:4] == ["550", "554", "250", "250"]
    assert b"550 5.1.1" in sent(out) and b"554 5.7.1 Relay access denied" in sent(out)
    (store,) = stores(out)
    assert store.envelope.rcpts == ["alice@example.test", "bob@example.test"]  # each once
    rejected = [a for a in out if isinstance(a, Rejected)]
    assert [r.rcpt for r in rejected] == ["nobody@example.test", "x@victim.example"]


@pytest.mark.parametrize(
    "rcpt",
    [
        b"<u%victim.example@example.test>",
        b"<victim.example!u@example.test>",
        b'<"u@victim.example"@example.test>',
        b"<@example.test:u@victim.example>",
        b"<u@victim.example@example.test>",
        b"<U%VICTIM.EXAMPLE@EXAMPLE.TEST>",
    ],
)
def test_routed_addresses_are_refused_even_from_relay_networks(rcpt):
    s = ready(make_session(ip="127.0.0.1"))
    s.feed(b"MAIL FROM:<a@remote.example>\r\n")
    assert sent(s.feed(b"RCPT TO:" + rcpt + b"\r\n")).startswith(b"550 5.7.1")


def test_trailing_dot_domain_is_not_accepted_from_outside():
    s = ready(make_session(ip="127.0.0.9"))
    s.feed(b"MAIL FROM:<a@remote.example>\r\n")
    assert sent(s.feed(b"RCPT TO:<u@victim.example.>\r\n"))[:1] == b"5"


def test_null_sender_is_accepted():
    s = ready(make_session(ip="127.0.0.9"))
    assert codes(s.feed(b"MAIL FROM:<>\r\nRCPT TO:<alice@example.test>\r\n")) == ["250", "250"]


def test_low_disk_answers_452_at_mail():
    s = ready(make_session(free_disk=10, config=CONFIG.replace('min_free_disk = "0"', 'min_free_disk = "1GB"')))
    assert sent(s.feed(b"MAIL FROM:<a@remote.example>\r\n")).startswith(b"452 4.3.1")


def test_too_many_received_headers_is_a_loop():
    s = ready(make_session())
    headers = b"".join(b"Received: from hop%d\r\n" % i for i in range(51))
    out = s.feed(TX + headers + b"\r\nbody\r\n.\r\n")
    assert stores(out) == []
    assert b"554 5.4.6" in sent(out)


def test_fifty_received_headers_still_pass():
    s = ready(make_session())
    headers = b"".join(b"Received: from hop%d\r\n" % i for i in range(49))
    assert len(stores(s.feed(TX + headers + b"\r\nbody\r\n.\r\n"))) == 1


def test_too_many_errors_closes_with_421():
    s = ready(make_session(max_errors=3))
    out = s.feed(b"FOO\r\nBAR\r\nBAZ\r\nNOOP\r\n")
    assert codes(out) == ["500", "500", "500", "421"]
    assert isinstance(out[-1], Close)
    assert s.feed(b"NOOP\r\n") == []


def test_the_503s_a_refusal_causes_in_a_pipelined_group_do_not_count_toward_max_errors():
    """RFC 2920 3.1: a pipelining client sends RCPT and DATA before it reads MAIL's and
    RCPT's replies, so a refused MAIL brings 503s to its RCPTs and DATA, and a refused
    last RCPT a 503 to the DATA: the refusal counts, what follows from it does not (a
    relay reusing its connection for several User-unknown messages was cut at max_errors)."""
    s = ready(make_session(max_errors=3))
    unknown = b"MAIL FROM:<a@remote.example>\r\nRCPT TO:<nobody@example.test>\r\nDATA\r\nRSET\r\n"
    bad_mail = b"MAIL FROM:<a@remote.example> BODY=NONE\r\nRCPT TO:<alice@example.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\nRSET\r\n"
    assert codes(s.feed(unknown)) == ["250", "550", "503", "250"]
    assert codes(s.feed(bad_mail)) == ["501", "503", "503", "503", "250"]
    assert s.errors == 2 and s.state is not State.CLOSED
    # Outside such a group a 503 is the client's own error, and counts.
    out = s.feed(b"DATA\r\n")
    assert codes(out) == ["503", "421"] and isinstance(out[-1], Close)


def test_only_commands_sent_before_the_refusal_are_excused():
    s = ready(make_session(max_errors=3))
    assert codes(s.feed(b"MAIL FROM:<a@remote.example> BODY=NONE\r\n")) == ["501"]
    # The client read the 501 and goes on anyway, one command at a time: its own errors.
    assert codes(s.feed(b"RCPT TO:<alice@example.test>\r\n")) == ["503"]
    out = s.feed(b"RCPT TO:<alice@example.test>\r\n")
    assert codes(out) == ["503", "421"] and isinstance(out[-1], Close)


def test_excused_503s_are_bounded_by_the_refusal():
    s = ready(make_session(max_errors=3))
    s.settings.max_recipients = 2
    out = s.feed(b"MAIL FROM:<a@remote.example> BODY=NONE\r\n" + b"RCPT TO:<alice@example.test>\r\n" * 6)
    # One error for the MAIL, three RCPTs excused (max_recipients + 1), then two counted.
    assert codes(out) == ["501", "503", "503", "503", "503", "503", "421"]


def test_sequence_errors():
    s = make_session()
    s.greeting()
    assert sent(s.feed(b"MAIL FROM:<a@b.example>\r\n")).startswith(b"503 5.5.1")
    ready(s)
    assert sent(s.feed(b"DATA\r\n")).startswith(b"503 5.5.1")
    s.feed(b"MAIL FROM:<a@b.example>\r\n")
    assert sent(s.feed(b"MAIL FROM:<a@b.example>\r\n")).startswith(b"503 5.5.1")
    assert sent(s.feed(b"DATA\r\n")).startswith(b"503 5.5.1")


def test_vrfy_help_noop_rset_quit():
    s = ready(make_session())
    assert codes(s.feed(b"VRFY alice\r\nHELP\r\nNOOP\r\nRSET\r\n")) == ["252", "214", "250", "250"]
    out = s.feed(b"QUIT\r\n")
    assert sent(out) == b"221 2.0.0 Bye\r\n" and isinstance(out[-1], Close)


def test_helo_then_esmtp_parameters_are_refused():
    s = make_session()
    s.greeting()
    assert codes(s.feed(b"HELO c\r\n")) == ["250"]
    assert sent(s.feed(b"MAIL FROM:<a@b.example> SIZE=10\r\n")).startswith(b"555")


HOSTILE_NAME = b"\x1b[31mevil\x07"


def test_greeting_replies_never_send_the_clients_name_back():
    """A terminal (telnet, openssl s_client) would run the client's control bytes: the
    EHLO reply does not echo the name (as Postfix: `250-hostname`), nor does HELO's,
    on port 25 or on submission."""
    port25 = make_session()
    port25.greeting()
    for s in (port25, submission_session(tls=False), submission_session()):  # greeted
        reply = sent(s.feed(b"EHLO " + HOSTILE_NAME + b"\r\n"))
        assert reply.startswith(b"250-mx1.example.test\r\n250-PIPELINING\r\n"), reply
        assert sent(s.feed(b"HELO " + HOSTILE_NAME + b"\r\n")) == b"250 mx1.example.test\r\n"
        assert s.client.helo == HOSTILE_NAME.decode()  # kept as sent: the event log escapes it


def test_a_helo_check_refusal_shows_the_name_escaped():
    s = make_session("192.0.2.9", config=CONFIG + '[[session_profile]]\nname = "default"\nhelo_strict = true\n')
    s.greeting()
    s.feed(b"EHLO " + HOSTILE_NAME + b"\r\n")
    assert sent(s.feed(b"MAIL FROM:<a@b.example>\r\n")) == (
        b"501 5.5.2 <\\x1b[31mevil\\x07>: Helo command rejected: Invalid name\r\n")


def test_every_reply_has_an_enhanced_status_code():
    s = ready(make_session())
    out = s.feed(b"NOOP\r\nBOGUS\r\nMAIL FROM:<>\r\nRCPT TO:<alice@example.test>\r\nRSET\r\nVRFY x\r\n")
    for line in sent(out).split(b"\r\n")[:-1]:
        assert line[4:5].isdigit() and line[5:6] == b".", line


# -- AUTH on a submission session (RFC 4954, RFC 6409) -------------------------------------

from kanmon.smtp.session import Authenticate  # noqa: E402


def submission_session(tls: bool = True) -> Session:
    cfg = parse_config(CONFIG)
    s = Session(
        SessionSettings("mx1.example.test", 10_000, 100, tls_active=tls, submission=True,
                        sender_addresses=RelayAccess(cfg).sender_addresses),
        standard_pipeline(cfg, free_disk=lambda: 10**12), ClientInfo(ip="192.0.2.50"),
    )
    s.greeting()
    return s


def b64(text: str) -> bytes:
    import base64

    return base64.b64encode(text.encode())


def test_auth_is_offered_only_over_tls_and_required_for_mail():
    plain = submission_session(tls=False)
    assert b"AUTH" not in sent(plain.feed(b"EHLO pc\r\n"))
    assert sent(plain.feed(b"AUTH PLAIN " + b64("\0alice@example.test\0pw") + b"\r\n")).startswith(b"538 5.7.11")
    s = submission_session()
    assert b"250 AUTH PLAIN LOGIN" in sent(s.feed(b"EHLO pc\r\n"))
    assert sent(s.feed(b"MAIL FROM:<alice@example.test>\r\n")).startswith(b"530 5.7.0")


def test_auth_plain_initial_response_then_sender_rules():
    s = submission_session()
    s.feed(b"EHLO pc\r\n")
    out = s.feed(b"AUTH PLAIN " + b64("\0alice@example.test\0secret") + b"\r\nMAIL FROM:<alice@example.test>\r\n")
    (auth,) = [a for a in out if isinstance(a, Authenticate)]
    assert (auth.mechanism, auth.username, auth.password) == ("PLAIN", "alice@example.test", "secret")
    assert sent(out) == b""  # nothing answered until the credentials are checked
    after = s.auth_result("alice@example.test")
    assert codes(after) == ["235", "250"]  # the pipelined MAIL ran after AUTH succeeded
    s.feed(b"RSET\r\n")
    assert sent(s.feed(b"MAIL FROM:<bob@example.test>\r\n")).startswith(b"553 5.7.1")
    assert sent(s.feed(b"MAIL FROM:<info@example.test>\r\n")).startswith(b"250")  # an alias of alice
    s.feed(b"RSET\r\n")
    # Authenticated users may send anywhere.
    assert codes(s.feed(b"MAIL FROM:<alice@example.test>\r\nRCPT TO:<x@far.example>\r\n")) == ["250", "250"]


def test_auth_login_dialogue_and_failures():
    s = submission_session()
    s.feed(b"EHLO pc\r\n")
    assert sent(s.feed(b"AUTH LOGIN\r\n")) == b"334 VXNlcm5hbWU6\r\n"
    assert sent(s.feed(b64("alice@example.test") + b"\r\n")) == b"334 UGFzc3dvcmQ6\r\n"
    (auth,) = [a for a in s.feed(b64("pw") + b"\r\n") if isinstance(a, Authenticate)]
    assert auth.username == "alice@example.test" and auth.password == "pw"
    assert sent(s.auth_result(None)).startswith(b"535 5.7.8")
    assert sent(s.feed(b"AUTH PLAIN\r\n")) == b"334 \r\n"
    assert sent(s.feed(b"%%%\r\n")).startswith(b"501")
    s.feed(b"AUTH LOGIN\r\n")
    assert sent(s.feed(b"*\r\n")).startswith(b"501 5.7.0")
    assert sent(s.feed(b"AUTH CRAM-MD5\r\n")).startswith(b"504")
    out = s.feed(b"AUTH PLAIN " + b64("\0alice@example.test\0pw") + b"\r\n")
    out = s.auth_result(None, replies.AUTH_BLOCKED)
    assert sent(out).startswith(b"421 4.7.0") and isinstance(out[-1], Close)


def test_auth_lines_up_to_12288_octets_are_taken():
    # RFC 4954 4: the AUTH command with an initial response, and each continuation line of
    # the exchange, may be 12288 octets long (a long token); other commands keep their limit.
    from kanmon.smtp.session import MAX_AUTH_LINE, MAX_COMMAND_LINE

    s = submission_session()
    s.feed(b"EHLO pc\r\n")
    password = "p" * 4000
    line = b"AUTH PLAIN " + b64("\0alice@example.test\0" + password)
    assert MAX_COMMAND_LINE < len(line) + 2
    (auth,) = [a for a in s.feed(line + b"\r\n") if isinstance(a, Authenticate)]
    assert auth.password == password
    assert sent(s.auth_result(None)).startswith(b"535 5.7.8")
    # The continuation line of a SASL exchange, at the limit exactly (with its CRLF).
    assert sent(s.feed(b"AUTH PLAIN\r\n")) == b"334 \r\n"
    prefix = "\0alice@example.test\0"
    token = b64(prefix + "q" * ((MAX_AUTH_LINE - 2) // 4 * 3 - len(prefix)))
    assert len(token) + 2 == MAX_AUTH_LINE
    (auth,) = [a for a in s.feed(token + b"\r\n") if isinstance(a, Authenticate)]
    assert auth.password == "q" * ((MAX_AUTH_LINE - 2) // 4 * 3 - len(prefix))


def test_auth_lines_beyond_12288_octets_and_long_other_commands_are_refused():
    from kanmon.smtp.session import MAX_AUTH_LINE

    s = submission_session()
    s.feed(b"EHLO pc\r\n")
    long_auth = b"AUTH PLAIN " + b"A" * (MAX_AUTH_LINE - 11 - 2 + 1)  # one octet over, with CRLF
    assert sent(s.feed(long_auth + b"\r\n")) == replies.LINE_TOO_LONG.wire()
    # Arriving in pieces, the buffer never holds more than the AUTH limit.
    s.feed(b"AUTH PLAIN ")
    out = []
    for _ in range(4):
        out += s.feed(b"A" * 4096)
        assert s.buffered() <= MAX_AUTH_LINE
    assert sent(out) == replies.LINE_TOO_LONG.wire()
    s.feed(b"\r\n")
    assert sent(s.feed(b"NOOP " + b"x" * 2000 + b"\r\n")) == replies.LINE_TOO_LONG.wire()
    assert sent(s.feed(b"NOOP\r\n")).startswith(b"250")


def _submitted(message: bytes) -> bytes:
    """What an authenticated user's message is stored as (the session's clock: now=...)."""
    s = submission_session()
    s.set_time(1_790_000_000.0)
    s.feed(b"EHLO pc\r\n")
    s.feed(b"AUTH PLAIN " + b64("\0alice@example.test\0secret") + b"\r\n")
    s.auth_result("alice@example.test")
    out = s.feed(b"MAIL FROM:<alice@example.test>\r\nRCPT TO:<x@far.example>\r\nDATA\r\n" + message + b".\r\n")
    (store,) = stores(out)
    return store.content


def test_submission_adds_a_missing_date_and_message_id(monkeypatch):
    # RFC 6409 8.2, 8.3 (Postfix's cleanup for local clients): under the Received: field,
    # Date in the local time zone, Message-ID at the node's hostname.
    monkeypatch.setenv("TZ", "JST-9")  # POSIX form: no tzdata needed
    time.tzset()
    try:
        content = _submitted(b"From: alice@example.test\r\nSubject: bare\r\n\r\nhello\r\n")
    finally:
        monkeypatch.undo()
        time.tzset()
    fields = content.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    received = [i for i, f in enumerate(fields) if f.startswith(b"Received: ")]
    assert received == [0]
    date, msgid = [f for f in fields if f.startswith((b"Date: ", b"Message-ID: "))]
    assert date == b"Date: Mon, 21 Sep 2026 23:13:20 +0900"  # 1_790_000_000 (14:13:20 UTC) in Tokyo
    assert re.fullmatch(rb"Message-ID: <\d+\.[0-9a-f]{16}@mx1\.example\.test>", msgid)
    assert content.endswith(b"\r\nFrom: alice@example.test\r\nSubject: bare\r\n\r\nhello\r\n")


@pytest.mark.parametrize("message", [
    b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\nMESSAGE-ID: <m1@pc.example>\r\nSubject: s\r\n\r\nx\r\n",
    b"subject: s\r\nmessage-id : <m1@pc.example>\r\ndate:Mon, 1 Jan 2024 00:00:00 +0000\r\n\r\nx\r\n",
])
def test_submission_keeps_the_date_and_message_id_it_has(message):
    content = _submitted(message)
    assert content.count(b"Date:") + content.count(b"date:") == 1
    assert content.lower().count(b"message-id") == 1 and content.endswith(message)


def test_only_a_missing_field_is_added_and_one_in_the_body_does_not_count():
    content = _submitted(b"Message-ID: <m1@pc.example>\r\n\r\nDate: in the body\r\n")
    assert content.count(b"\r\nDate: ") == 2 and content.count(b"Message-ID:") == 1


def test_mail_from_strangers_and_relay_networks_gets_no_date_or_message_id():
    # Postfix adds them only for its local clients; relayed mail is passed on as it came.
    for ip in ("192.0.2.9", "127.0.0.1"):  # outside; in relay_networks
        s = ready(make_session(ip))
        (store,) = stores(s.feed(TX + b"Subject: bare\r\n\r\nhello\r\n.\r\n"))
        assert b"Date:" not in store.content and b"Message-ID:" not in store.content


UTF8_TX = ("MAIL FROM:<jöran@remote.example> SMTPUTF8\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n"
           "Subject: ü\r\n\r\nx\r\n.\r\n").encode()


def test_an_smtputf8_transaction_is_utf8smtp_in_received_and_proto():
    # RFC 6531 3.7.3: UTF8SMTP (UTF8SMTPS with TLS); the next plain message is ESMTP(S) again.
    s = ready(make_session())
    (store,) = stores(s.feed(UTF8_TX))
    assert b"with UTF8SMTP id " + store.queue_id.encode() in store.content
    assert store.envelope.client.proto == "UTF8SMTP"
    s.message_stored(store.queue_id)
    (plain,) = stores(s.feed(TX + b"x\r\n.\r\n"))
    assert b"with ESMTP id " in plain.content and plain.envelope.client.proto == "ESMTP"
    s.message_stored(plain.queue_id)
    s.feed(b"STARTTLS\r\n")
    s.tls_started("TLSv1.3", "TLS_AES_256_GCM_SHA384", 256)
    s.feed(b"EHLO c\r\n")
    (tls,) = stores(s.feed(UTF8_TX))
    assert b"with UTF8SMTPS id " in tls.content and tls.envelope.client.proto == "UTF8SMTPS"


def test_an_authenticated_smtputf8_submission_is_utf8smtpsa():
    s = submission_session()
    s.feed(b"EHLO pc\r\n")
    s.feed(b"AUTH PLAIN " + b64("\0alice@example.test\0secret") + b"\r\n")
    s.auth_result("alice@example.test")
    out = s.feed("MAIL FROM:<alice@example.test> SMTPUTF8\r\nRCPT TO:<jörg@far.example>\r\nDATA\r\n"
                 "Subject: ü\r\n\r\nx\r\n.\r\n".encode())
    (store,) = stores(out)
    assert b"with UTF8SMTPSA id " in store.content and store.envelope.client.proto == "UTF8SMTPSA"


def test_auth_is_unknown_on_port_25():
    s = ready(make_session())
    assert sent(s.feed(b"AUTH PLAIN " + b64("\0a\0b") + b"\r\n")).startswith(b"500 5.5.2")


def test_results_arriving_after_a_close_are_ignored():
    s = ready(make_session())
    (store,) = stores(s.feed(TX + b"x\r\n.\r\n"))
    s.close(replies.SHUTTING_DOWN)
    assert s.message_stored(store.queue_id) == []


def test_received_date_is_formatdate_of_its_second_and_follows_a_time_zone_change(monkeypatch):
    """The Received: header's date is made once per second (a cache): the cached text must
    be what formatdate gives for that second, a new second gets its own, and a change of
    the process's time zone is not hidden by the cache."""
    import time
    from email.utils import formatdate

    from kanmon.smtp import session as session_mod

    monkeypatch.setattr(session_mod, "_DATE_CACHE", (-1, 0, ""))
    t = 1_796_083_860.75
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    try:
        assert session_mod._received_date(t) == formatdate(t, localtime=True) == "Tue, 01 Dec 2026 00:11:00 +0000"
        assert session_mod._received_date(t + 0.2) == "Tue, 01 Dec 2026 00:11:00 +0000"
        assert session_mod._received_date(t + 1) == "Tue, 01 Dec 2026 00:11:01 +0000"
        monkeypatch.setenv("TZ", "JST-9")
        time.tzset()
        assert session_mod._received_date(t + 1) == "Tue, 01 Dec 2026 09:11:01 +0900"
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
