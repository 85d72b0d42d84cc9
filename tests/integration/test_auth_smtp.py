"""Sender authentication over SMTP (smtplib against a running node, the loopback DNS
server, dkimpy as the independent signer): the walkthrough of docs/authentication.md.
A spoofed mail "from" a DMARC p=reject domain gets 550; a signed one is delivered with
our Authentication-Results; the events, history, trace and metrics say what happened."""

from __future__ import annotations

import smtplib

import pytest

from kanmon.config import parse_config
from kanmon.metrics import read_counters
from kanmon.records.query import search_events, search_history
from kanmon.records.trace import trace
from tests.support.dkimkeys import rsa_key, sign
from tests.support.dnsserver import dns_server  # noqa: F401 - fixture
from tests.support.kanmon_node import RunningNode, free_port, maildir_messages, wait_for

OUTSIDE = "127.0.0.9"

CONFIG = """
[server]
hostname = "mx.example.test"
data_dir = "{data_dir}"
[smtp]
listen = ["127.0.0.1:{smtp}"]
relay_networks = ["127.0.0.1/32"]
min_free_disk = "1MB"
greet_pause = "0s"
[dns]
servers = ["{dns}"]
timeout = "1s"
[[domain]]
name = "example.test"
mailboxes = ["alice"]
[[session_profile]]
name = "default"
spf = "tag"
dkim = "none"
dmarc = "honor"
"""


@pytest.fixture
def node(tmp_path, dns_server):  # noqa: F811
    key = rsa_key()
    dns_server.set_records(records={
        "sender.test": ["MX 10 mail.sender.test.", 'TXT "v=spf1 ip4:127.0.0.9 -all"'],
        "mail.sender.test": ["A 127.0.0.9"],
        "_dmarc.sender.test": ['TXT "v=DMARC1; p=reject"'],
        "k1._domainkey.sender.test": [key.record()],
        "spoofer.test": ["MX 10 mail.spoofer.test."],
        "mail.spoofer.test": ["A 192.0.2.66"],
    })
    cfg = parse_config(CONFIG.format(data_dir=tmp_path / "data", dns=dns_server.address, smtp=free_port()))
    n = RunningNode(cfg).start()
    n.key = key
    yield n
    n.stop()


def message(frm: str, extra: bytes = b"") -> bytes:
    return extra + (f"From: Sender <{frm}>\r\nTo: <alice@example.test>\r\nSubject: quarterly figures\r\n"
                    "Message-ID: <m1@sender.test>\r\nDate: Mon, 30 Nov 2026 10:00:00 +0000\r\n\r\n"
                    "Please find the figures below.\r\n").encode()


def send(node, sender: str, content: bytes):
    with smtplib.SMTP(node.host, node.port, source_address=(OUTSIDE, 0), timeout=20) as s:
        s.ehlo("mail.sender.test")
        return s.sendmail(sender, ["alice@example.test"], content)


def test_spoofed_mail_from_a_p_reject_domain_gets_550(node):
    with pytest.raises(smtplib.SMTPDataError) as e:
        send(node, "bounce@spoofer.test", message("ceo@sender.test"))
    assert e.value.smtp_code == 550
    assert e.value.smtp_error == (b"5.7.1 Message rejected: the DMARC policy of sender.test is reject"
                                  b" (no aligned SPF or DKIM pass)")
    node.flush()
    rejects = [ev for ev in search_events(node.data_dir) if ev.kind == "reject"]
    assert [(ev.fields["check"], ev.fields["stage"]) for ev in rejects] == [("dmarc", "DATA")]
    rows = search_history(node.data_dir)
    assert [(r.disposition, r.classification) for r in rows] == [("Reject", "Spoofing")]
    counters, _ = read_counters(node.data_dir / "records.sqlite")
    assert counters["checks|check=dmarc|result=reject"] == 1


def test_signed_mail_passes_with_authentication_results(node):
    forged = b"Authentication-Results: mx.example.test; dkim=pass header.d=bank.test; dmarc=pass\r\n"
    signed = sign(message("a@sender.test", forged), node.key, "sender.test", "k1")
    assert send(node, "a@sender.test", signed) == {}
    wait_for(lambda: maildir_messages(node.data_dir, "alice@example.test"), what="delivery")
    delivered = maildir_messages(node.data_dir, "alice@example.test")[0]
    header = delivered.split(b"\r\n\r\n" if b"\r\n\r\n" in delivered else b"\n\n", 1)[0].decode()
    lines = header.replace("\r\n", "\n").split("\n")
    results = [line for line in lines if line.startswith("Authentication-Results:")]
    assert len(results) == 1  # ours; the forged one with our authserv-id is gone
    assert results[0].startswith("Authentication-Results: mx.example.test; spf=pass (")
    assert "; dkim=pass header.d=sender.test header.s=k1 header.a=rsa-sha256" in results[0]
    assert "; dmarc=pass (p=reject sp=reject dis=NONE; aligned dkim sender.test) header.from=sender.test" in results[0]
    assert any(line.startswith("Received-SPF: pass (mx.example.test: domain of a@sender.test designates 127.0.0.9")
               for line in lines)
    node.flush()
    auth = [ev for ev in search_events(node.data_dir) if ev.kind == "auth-results"]
    assert len(auth) == 1
    assert auth[0].text == "authentication: spf=pass dkim=pass dmarc=pass header.from=sender.test"
    counters, _ = read_counters(node.data_dir / "records.sqlite")
    assert counters["auth|method=dmarc|result=pass"] == 1 and counters["auth|method=dkim|result=pass"] == 1
    timeline = trace(node.data_dir, "a@sender.test")[0]
    assert "auth" in [step.step for step in timeline.steps]


def test_spf_fail_is_tagged_by_the_default_profile(node, dns_server):  # noqa: F811
    dns_server.set_records(records={
        "sender.test": ['TXT "v=spf1 ip4:192.0.2.1 -all"', "MX 10 mail.sender.test."],
        "mail.sender.test": ["A 127.0.0.9"],
        "_dmarc.sender.test": ['TXT "v=DMARC1; p=none"'],
    })
    assert send(node, "a@sender.test", message("a@sender.test")) == {}
    wait_for(lambda: maildir_messages(node.data_dir, "alice@example.test"), what="delivery")
    delivered = maildir_messages(node.data_dir, "alice@example.test")[0]
    assert b"\nSubject: [SUSPECT] quarterly figures" in delivered.replace(b"\r\n", b"\n")
    node.flush()
    rows = search_history(node.data_dir)
    assert [(r.disposition, r.classification) for r in rows] == [("Tag", "Spoofing")]  # as a content rule's tag
    (timeline,) = trace(node.data_dir, "a@sender.test")  # found by its sender, as an Accept row is
    assert timeline.queue_id == rows[0].queue_id
