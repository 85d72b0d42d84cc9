"""Sender checks, client identity and HELO checks over real sockets, against the loopback
DNS server: the built-in "default" profile for a client outside relay_networks
(127.0.0.9), "trusted" for the relay network (127.0.0.1) and after AUTH."""

from __future__ import annotations

import smtplib
import ssl

import pytest

from kanmon.config import parse_config
from kanmon.records.query import search_events, search_history
from kanmon.store.users import AuthThrottle, Users
from tests.support.dnsserver import dns_server  # noqa: F401 - fixture
from tests.support.kanmon_node import RunningNode, free_port

OUTSIDE = "127.0.0.9"

CONFIG = """
[server]
hostname = "mx1.example.test"
data_dir = "{data_dir}"
[smtp]
listen = ["127.0.0.1:{smtp}"]
relay_networks = ["127.0.0.1/32"]
min_free_disk = "1MB"
greet_pause = "0s"
[submission]
listen = ["127.0.0.1:{sub}"]
[dns]
servers = ["{dns}"]
timeout = "1s"
[[domain]]
name = "example.test"
mailboxes = ["alice", "bob"]
[queue]
suspend_delivery = true
{extra}
"""

RECORDS = {
    "mx.test": ["MX 10 mail.mx.test."],
    "mail.mx.test": ["A 192.0.2.25"],
    "aonly.test": ["A 192.0.2.26"],
    "nullmx.test": ["MX 0 ."],
    "client.test": ["A 127.0.0.9"],
    "9.0.0.127.in-addr.arpa": ["PTR client.test."],
    "helo.test": ["A 192.0.2.27"],
}


def start(tmp_path, dns, extra: str = "", records=RECORDS) -> RunningNode:
    dns.set_records(records=records)
    ports = {"smtp": free_port(), "sub": free_port()}
    cfg = parse_config(CONFIG.format(data_dir=tmp_path / "data", dns=dns.address, extra=extra, **ports))
    node = RunningNode(cfg)
    node.ports = ports
    return node.start()


@pytest.fixture
def node(tmp_path, dns_server):  # noqa: F811
    n = start(tmp_path, dns_server)
    yield n
    n.stop()


def smtp(node, source=OUTSIDE, helo="client.test") -> smtplib.SMTP:
    s = smtplib.SMTP(node.host, node.port, source_address=(source, 0), timeout=10)
    s.ehlo(helo)
    return s


def mail_from(node, sender, source=OUTSIDE, helo="client.test"):
    with smtp(node, source, helo) as s:
        return s.mail(sender)


@pytest.mark.parametrize("sender, code, text", [
    ("katou@nnn.con", 501, b"5.1.8 <katou@nnn.con>: Sender address rejected: Domain not found"),
    ("a@nullmx.test", 550, b"5.7.27 <a@nullmx.test>: Sender address rejected"),
    ("a@mx.test", 250, b"2.1.0 Ok"),
    ("a@aonly.test", 250, b"2.1.0 Ok"),
    ("", 250, b"2.1.0 Ok"),  # <> is never checked
])
def test_sender_domain(node, sender, code, text):
    got = mail_from(node, sender)
    assert got[0] == code and got[1].startswith(text)


def test_sender_domain_servfail_is_a_temporary_failure_and_events_name_the_check(node, dns_server):  # noqa: F811
    dns_server.servfail("broken.test")
    assert mail_from(node, "a@broken.test") == (
        451, b"4.1.8 <a@broken.test>: Sender address rejected: Domain not found (DNS temporary failure)")
    mail_from(node, "a@nnn.con")
    node.flush()
    rejects = [e for e in search_events(node.data_dir) if e.kind == "reject"]
    assert [(e.fields["check"], e.fields["reply"][:9]) for e in rejects] == [
        ("sender_domain", "451 4.1.8"), ("sender_domain", "501 5.1.8")]
    assert rejects[0].text.startswith("NOQUEUE: reject: MAIL from client.test[127.0.0.9]: 451 4.1.8")
    rows = search_history(node.data_dir)
    assert sorted(r.mail_from for r in rows) == ["a@broken.test", "a@nnn.con"]
    assert {r.disposition for r in rows} == {"Reject"}


def test_the_trusted_profile_does_not_check_the_sender_domain(node):
    assert mail_from(node, "katou@nnn.con", source="127.0.0.1")[0] == 250


def test_a_warm_cache_answers_without_asking_again(node, dns_server):  # noqa: F811
    assert mail_from(node, "a@mx.test")[0] == 250
    asked = len([q for q in dns_server.queries if q.name == "mx.test."])
    assert mail_from(node, "b@mx.test")[0] == 250
    assert len([q for q in dns_server.queries if q.name == "mx.test."]) == asked


def test_own_domain_spoof_refused_from_outside_accepted_from_relay_networks(node):
    assert mail_from(node, "alice@example.test") == (550, b"5.7.1 <alice@example.test>: Sender address rejected: not logged in")
    assert mail_from(node, "alice@example.test", source="127.0.0.1")[0] == 250
    node.flush()
    (reject,) = [e for e in search_events(node.data_dir) if e.kind == "reject"]
    assert reject.fields["check"] == "sender_spoof"


def test_own_domain_spoof_accepted_after_auth(tmp_path, dns_server):  # noqa: F811
    node = start(tmp_path, dns_server)
    try:
        Users(node.config).set_password("alice@example.test", "correct horse")
        node.node.auth_throttle = AuthThrottle(free_failures=2, base_delay=0.01, max_delay=0.05)
        with smtplib.SMTP("127.0.0.1", node.ports["sub"], source_address=(OUTSIDE, 0), timeout=10) as s:
            s.starttls(context=ssl._create_unverified_context())
            s.login("alice@example.test", "correct horse")
            assert s.sendmail("alice@example.test", ["bob@example.test"], "Subject: hi\r\n\r\nhello\r\n") == {}
    finally:
        node.stop()


def test_strict_syntax(tmp_path, dns_server):  # noqa: F811
    node = start(tmp_path, dns_server, '[[session_profile]]\nname = "default"\nstrict_syntax = true\n')
    try:
        with smtp(node) as s:
            assert s.docmd("MAIL FROM:a@mx.test") == (501, b"5.5.4 Syntax error: the address must be enclosed in <>")
            assert s.docmd("MAIL FROM:<a@mx.test>SIZE=10")[0] == 501
            assert s.docmd("MAIL FROM:<a@mx.test>")[0] == 250
            assert s.docmd("RCPT TO:alice@example.test")[0] == 501
            assert s.docmd("RCPT TO:<alice@example.test>")[0] == 250
        with smtp(node, source="127.0.0.1") as s:  # the trusted profile is not strict
            assert s.docmd("MAIL FROM:a@mx.test")[0] == 250
        node.flush()
        checks = [e.fields["check"] for e in search_events(node.data_dir) if e.kind == "reject"]
        assert checks == ["strict_syntax"] * 3
    finally:
        node.stop()


def deliver_one(node, sender="a@mx.test", source=OUTSIDE, helo="client.test") -> bytes:
    with smtp(node, source, helo) as s:
        assert s.sendmail(sender, ["alice@example.test"], "Subject: x\r\n\r\nbody\r\n") == {}
    node.flush()
    (accepted,) = [e for e in search_events(node.data_dir) if e.kind == "accepted"]
    return accepted.text.encode()


def received_header(node) -> bytes:
    # The queue is suspended: read the spooled copy.
    files = [p for p in (node.data_dir / "spool").rglob("*") if p.is_file()]
    for p in files:
        data = p.read_bytes()
        if b"\nReceived: " in data:
            return b"Received: " + data.split(b"\nReceived: ", 1)[1].split(b"\r\n\t", 1)[0]
    raise AssertionError(f"no spooled message in {files}")


def test_client_name_confirmed_in_received_and_events(node):
    accepted = deliver_one(node)
    assert b"relay=client.test [127.0.0.9]" in accepted
    assert received_header(node) == b"Received: from client.test (client.test [127.0.0.9])"


def test_the_connect_event_names_a_client_seen_recently(node):
    """The first connection's lookup runs after its connect event (unknown); the name is
    remembered, so the next connection's connect event already carries it."""
    assert mail_from(node, "a@mx.test")[0] == 250  # MAIL waits for the lookup
    assert mail_from(node, "a@mx.test")[0] == 250
    node.flush()
    connects = [e.text for e in search_events(node.data_dir) if e.text.startswith("connect from")]
    assert connects == ["connect from unknown[127.0.0.9]", "connect from client.test[127.0.0.9]"]


def test_ptr_missing_without_require_ptr_is_accepted_as_unknown(tmp_path, dns_server):  # noqa: F811
    records = {k: v for k, v in RECORDS.items() if "in-addr" not in k}
    node = start(tmp_path, dns_server, records=records)
    try:
        assert b"relay=unknown [127.0.0.9]" in deliver_one(node)
        assert received_header(node) == b"Received: from client.test (unknown [127.0.0.9])"
    finally:
        node.stop()


def test_forward_mismatch_is_unknown(tmp_path, dns_server):  # noqa: F811
    records = {**RECORDS, "client.test": ["A 192.0.2.99"]}
    node = start(tmp_path, dns_server, records=records)
    try:
        assert b"relay=unknown [127.0.0.9]" in deliver_one(node)
    finally:
        node.stop()


def test_require_ptr(tmp_path, dns_server):  # noqa: F811
    records = {k: v for k, v in RECORDS.items() if "in-addr" not in k}
    node = start(tmp_path, dns_server, '[[session_profile]]\nname = "default"\nrequire_ptr = true\n', records=records)
    try:
        assert mail_from(node, "a@mx.test") == (450, b"4.7.1 Client host rejected: cannot find your hostname, [127.0.0.9]")
        dns_server.add_records(records={"9.0.0.127.in-addr.arpa": ["PTR client.test."]})
        ptr_check = next(c for c in node.node.smtp.pipeline.checks if c.name == "client_ptr")
        node.call(node.node.dns_cache.flush)  # `kanmon dns cache flush`: the checks' typed answers go too
        node.call(ptr_check._known.clear)
        assert mail_from(node, "a@mx.test")[0] == 250
        node.flush()
        (reject,) = [e for e in search_events(node.data_dir) if e.kind == "reject"]
        assert reject.fields["check"] == "client_ptr"
    finally:
        node.stop()


HELO_PROFILE = '[[session_profile]]\nname = "default"\nhelo_strict = true\nhelo_resolvable = true\n'


@pytest.mark.parametrize("helo, code, text", [
    ("localhost", 504, b"5.5.2 <localhost>: Helo command rejected: need fully-qualified hostname"),
    ("bad_name.test", 501, b"5.5.2 <bad_name.test>: Helo command rejected: Invalid name"),
    ("mx1.example.test", 550, b"5.7.1 <mx1.example.test>: Helo command rejected"),
    ("[127.0.0.1]", 550, b"5.7.1 <[127.0.0.1]>: Helo command rejected"),
    ("nowhere.test", 450, b"4.7.1 <nowhere.test>: Helo command rejected: Host not found"),
    ("helo.test", 250, b"2.1.0 Ok"),
    ("[192.0.2.1]", 250, b"2.1.0 Ok"),
])
def test_helo_checks(tmp_path, dns_server, helo, code, text):  # noqa: F811
    node = start(tmp_path, dns_server, HELO_PROFILE)
    try:
        got = mail_from(node, "a@mx.test", helo=helo)
        assert got[0] == code and got[1].startswith(text)
        # From the relay network none of them applies.
        assert mail_from(node, "a@mx.test", source="127.0.0.1", helo=helo)[0] == 250
    finally:
        node.stop()


def test_helo_is_required_before_mail(node):
    with smtplib.SMTP(node.host, node.port, source_address=(OUTSIDE, 0), timeout=10) as s:
        assert s.docmd("MAIL FROM:<a@mx.test>")[0] == 503


def test_helo_checks_off_by_default_except_our_own_name(node):
    assert mail_from(node, "a@mx.test", helo="localhost")[0] == 250
    assert mail_from(node, "a@mx.test", helo="mx1.example.test")[0] == 550
