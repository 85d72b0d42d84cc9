"""Submission (RFC 6409) inside `kanmon serve`, with real clients: smtplib,
curl, then reading the delivered mail back with poplib and imaplib."""

from __future__ import annotations

import base64
import imaplib
import poplib
import shutil
import smtplib
import ssl
import subprocess

import pytest

from kanmon.config import parse_config
from kanmon.records.query import search_events, search_history
from kanmon.store.users import AuthThrottle, Users
from tests.support.kanmon_node import RunningNode, free_port, maildir_messages, wait_for
from tests.support.smtpsink import SmtpSink

CONFIG = """
[server]
hostname = "mx1.example.test"
data_dir = "{data_dir}"
[smtp]
listen = ["127.0.0.1:{smtp}"]
relay_networks = ["127.0.0.1/32"]
min_free_disk = "1MB"
[submission]
listen = ["127.0.0.1:{sub}"]
listen_tls = ["127.0.0.1:{subs}"]
[pop3]
listen = ["127.0.0.1:{pop}"]
[imap]
listen = ["127.0.0.1:{imap}"]
[[domain]]
name = "example.test"
mailboxes = ["alice", "bob"]
aliases = {{ sales = ["alice"], info = ["alice", "bob"] }}
[outbound]
smarthost = ["127.0.0.9:{sink}"]
tls = "none"
"""


@pytest.fixture
def store(tmp_path):
    sink = SmtpSink("127.0.0.9", free_port("127.0.0.9"))
    ports = {k: free_port() for k in ("smtp", "sub", "subs", "pop", "imap")}
    cfg = parse_config(CONFIG.format(data_dir=tmp_path / "data", sink=sink.port, **ports))
    users = Users(cfg)
    users.set_password("alice@example.test", "correct horse")
    users.set_password("bob@example.test", "battery staple")
    throttle = AuthThrottle(free_failures=2, base_delay=0.01, max_delay=0.05, block_ip_after=5, block_account_after=5)
    node = RunningNode(cfg)
    node.node.auth_throttle = throttle
    node.start()
    node.ports = ports
    node.sink = sink
    yield node
    node.stop()
    sink.close()


def unverified() -> ssl.SSLContext:
    return ssl._create_unverified_context()


def submit(node, user="alice@example.test", password="correct horse", sender=None, rcpts=("bob@example.test",),
           subject="hi"):
    with smtplib.SMTP("127.0.0.1", node.ports["sub"], timeout=10) as s:
        s.starttls(context=unverified())
        s.login(user, password)
        return s.sendmail(sender or user, list(rcpts), f"From: {user}\r\nSubject: {subject}\r\n\r\nhello\r\n")


def test_submit_then_read_with_pop3_and_imap(store):
    assert submit(store, subject="to-bob") == {}
    wait_for(lambda: maildir_messages(store.data_dir, "bob@example.test"), 10, "delivery")
    (m,) = maildir_messages(store.data_dir, "bob@example.test")
    assert b"with ESMTPSA id" in m
    store.flush()
    (row,) = [r for r in search_history(store.data_dir) if r.rcpt == "bob@example.test"]
    assert row.auth_user == "alice@example.test"
    assert any("sasl_method=PLAIN, sasl_username=alice@example.test" in e.text for e in search_events(store.data_dir))

    pop = poplib.POP3("127.0.0.1", store.ports["pop"], timeout=10)
    pop.stls(context=unverified())
    pop.user("bob@example.test")
    pop.pass_("battery staple")
    count, _ = pop.stat()
    assert count == 1
    assert b"Subject: to-bob" in b"\r\n".join(pop.retr(1)[1])
    pop.quit()

    imap = imaplib.IMAP4("127.0.0.1", store.ports["imap"], timeout=10)
    imap.starttls(ssl_context=unverified())
    imap.login("bob@example.test", "battery staple")
    imap.select("INBOX")
    typ, data = imap.search(None, "SUBJECT", "to-bob")
    assert typ == "OK" and data[0].split() == [b"1"]
    typ, data = imap.fetch(b"1", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    assert b"Subject: to-bob" in data[0][1]
    imap.logout()


def test_implicit_tls_submission_and_relay_to_another_domain(store):
    with smtplib.SMTP_SSL("127.0.0.1", store.ports["subs"], context=unverified(), timeout=10) as s:
        s.login("alice@example.test", "correct horse")
        assert s.sendmail("alice@example.test", ["friend@elsewhere.example"], "Subject: out\r\n\r\nx\r\n") == {}
    (m,) = store.sink.wait_for_messages(1, timeout=10)
    assert m.rcpts == ["friend@elsewhere.example"]
    # The session's TLS is in the event log as a STARTTLS's is (sendmail's line for both).
    from kanmon.records.query import search_events

    store.flush()
    assert any(e.text.startswith("STARTTLS=server, relay=") and "version=TLSv1." in e.text
               for e in search_events(store.data_dir)), "no TLS line for the implicit-TLS session"


def test_auth_before_tls_is_refused_with_538(store):
    with smtplib.SMTP("127.0.0.1", store.ports["sub"], timeout=10) as s:
        s.ehlo()
        assert "auth" not in s.esmtp_features  # not advertised before TLS
        plain = base64.b64encode(b"\0alice@example.test\0correct horse").decode()
        code, text = s.docmd("AUTH", f"PLAIN {plain}")
        assert (code, text[:6]) == (538, b"5.7.11")


def test_mail_without_auth_on_submission_is_refused(store):
    with smtplib.SMTP("127.0.0.1", store.ports["sub"], timeout=10) as s:
        s.starttls(context=unverified())
        s.ehlo()
        code, text = s.mail("alice@example.test")
        assert (code, text[:5]) == (530, b"5.7.0")


def test_bad_credentials_bad_base64_and_cancel(store):
    with smtplib.SMTP("127.0.0.1", store.ports["sub"], timeout=10) as s:
        s.starttls(context=unverified())
        s.ehlo()
        with pytest.raises(smtplib.SMTPAuthenticationError) as e:
            s.login("alice@example.test", "wrong")
        assert e.value.smtp_code == 535 and e.value.smtp_error.startswith(b"5.7.8")
        assert s.docmd("AUTH", "PLAIN !!!notbase64")[0] == 501
        assert s.docmd("AUTH", "LOGIN")[0] == 334
        assert s.docmd("*")[0] == 501


def test_a_4_kb_auth_plain_line_is_read_as_credentials(store):
    # RFC 4954 4: AUTH lines up to 12288 octets; before, "500 5.5.2 Error: line too long".
    import base64

    token = base64.b64encode(b"\0alice@example.test\0" + b"x" * 3000).decode()
    with smtplib.SMTP("127.0.0.1", store.ports["sub"], timeout=10) as s:
        s.starttls(context=unverified())
        s.ehlo()
        code, text = s.docmd("AUTH", "PLAIN " + token)
        assert (code, text[:5]) == (535, b"5.7.8")
        s.login("alice@example.test", "correct horse")


def test_sender_spoofing_is_refused_but_aliases_are_allowed(store):
    with pytest.raises(smtplib.SMTPSenderRefused) as e:
        submit(store, sender="bob@example.test")
    assert e.value.smtp_code == 553
    assert submit(store, sender="sales@example.test") == {}
    assert submit(store, sender="info@example.test") == {}


def test_brute_force_is_slowed_then_blocked(store):
    codes = []
    for _ in range(6):
        try:
            with smtplib.SMTP("127.0.0.1", store.ports["sub"], timeout=10) as s:
                s.starttls(context=unverified())
                s.ehlo()
                plain = base64.b64encode(b"\0alice@example.test\0guess").decode()
                codes.append(s.docmd("AUTH", f"PLAIN {plain}")[0])
        except smtplib.SMTPServerDisconnected:
            codes.append("closed")
    assert codes[:4] == [535, 535, 535, 535] and 421 in codes
    # Blocked now even with the right password.
    with smtplib.SMTP("127.0.0.1", store.ports["sub"], timeout=10) as s:
        s.starttls(context=unverified())
        s.ehlo()
        plain = base64.b64encode(b"\0alice@example.test\0correct horse").decode()
        assert s.docmd("AUTH", f"PLAIN {plain}")[0] == 421
    store.flush()
    assert any("authentication failed" in e.text and "blocked" in e.text for e in search_events(store.data_dir))


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_submits_with_starttls_and_login(store, tmp_path):
    mail = tmp_path / "mail.txt"
    mail.write_text("From: alice@example.test\r\nSubject: via curl\r\n\r\nsent by curl\r\n")
    out = subprocess.run(
        ["curl", "-sS", "--ssl-reqd", "-k", f"smtp://127.0.0.1:{store.ports['sub']}", "--user",
         "alice@example.test:correct horse", "--mail-from", "alice@example.test", "--mail-rcpt", "bob@example.test",
         "--upload-file", str(mail)],
        capture_output=True, text=True, timeout=30,
    )
    assert out.returncode == 0, out.stderr
    wait_for(lambda: any(b"Subject: via curl" in m for m in maildir_messages(store.data_dir, "bob@example.test")),
             10, "curl's message")
