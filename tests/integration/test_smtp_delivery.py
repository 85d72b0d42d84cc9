"""The SMTP delivery agent end to end: real SMTP servers on 127.0.0.x (smtpsink), real
TLS (trustme), a real DNS server (dnslib) for MX answers."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
import trustme

from kanmon.config import parse_config
from kanmon.deliver.mx import NextHop
from kanmon.deliver.smtp import SmtpDelivery
from kanmon.model import Envelope, Status
from kanmon.model import LocalReply, describe_reply
from tests.support.dnsserver import DnsServer, dns_server  # noqa: F401  (fixture)
from tests.support.smtpsink import SmtpSink, tls_server_context

PRIMARY, ALTERNATE, NOBODY = "127.0.0.51", "127.0.0.52", "127.0.0.59"
SENDER = Envelope("a@corp.example")
BODY = b"From: a@corp.example\r\nTo: b@dest.example\r\nSubject: hi\r\n\r\nbody\r\n"


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def ca_file(ca, tmp_path):
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture
def primary():
    with SmtpSink(PRIMARY, hostname="primary.test") as s:
        yield s


@pytest.fixture
def alternate(primary):
    with SmtpSink(ALTERNATE, primary.port, hostname="alternate.test") as s:  # same port: like port 25
        yield s


def make_config(*, mx_port=25, dns: DnsServer | None = None, ca_file=None, max_per_destination=20, timeouts="5s"):
    lines = [
        "[server]", 'hostname = "relay.kanmon.test"',
        "[smtp]", 'listen = ["127.0.0.8:2525"]',
        "[outbound]", f"mx_port = {mx_port}", f"max_per_destination = {max_per_destination}",
        f'connect_timeout = "{timeouts}"', f'command_timeout = "{timeouts}"', f'data_timeout = "{timeouts}"',
    ]
    if ca_file:
        lines.append(f'ca_file = "{ca_file}"')
    if dns is not None:
        lines += ["[dns]", f'servers = ["{dns.address}"]', 'timeout = "2s"']
    return parse_config("\n".join(lines))


class Log:
    def __init__(self):
        self.lines: list[tuple[str, str | None]] = []

    def __call__(self, text: str, queue_id: str | None) -> None:
        self.lines.append((str(text), queue_id))  # a typed event: its line

    def text(self) -> str:
        return "\n".join(t for t, _ in self.lines)


def hops(*sinks_or_ips, port):
    return [NextHop.from_endpoint((s if isinstance(s, str) else s.host, port)) for s in sinks_or_ips]


def run_delivery(config, coro_factory, log=None):
    """Run coro_factory(agent) with a fresh agent, closing it afterwards."""
    log = log if log is not None else Log()

    async def go():
        agent = SmtpDelivery(config, log, idle_timeout=30.0)
        try:
            return await coro_factory(agent)
        finally:
            await agent.close()

    return asyncio.run(go()), log


def deliver(config, rcpts, hop_list, tls="none", body=BODY, mail_from="a@corp.example"):
    return run_delivery(config, lambda agent: agent.deliver("QID1", mail_from, rcpts, body, hop_list, tls))


# ---------------------------------------------------------------------------
# Failover between configured servers


def test_primary_takes_the_mail(primary, alternate):
    results, _ = deliver(make_config(), ["b@corp.example"], hops(primary, alternate, port=primary.port))
    [r] = results
    assert (r.rcpt, r.status, r.mailer, r.tls) == ("b@corp.example", Status.SENT, "esmtp", "")
    assert r.relay == f"[{PRIMARY}]:{primary.port}"
    assert str(r.reply).startswith("250 2.0.0 Ok: queued as")
    assert len(primary.wait_for_messages(1)) == 1 and alternate.messages == []


def test_primary_down_alternate_takes_it_then_primary_back(primary, alternate):
    primary.stop()
    results, log = deliver(make_config(), ["b@corp.example"], hops(primary, alternate, port=primary.port))
    assert results[0].status is Status.SENT
    assert results[0].relay == f"[{ALTERNATE}]:{primary.port}"
    assert alternate.wait_for_messages(1)[0].data == BODY
    assert (f"relay=[{PRIMARY}]:{primary.port}, Connection refused by {PRIMARY}; trying next server", "QID1") in log.lines
    primary.start()
    results, _ = deliver(make_config(), ["c@corp.example"], hops(primary, alternate, port=primary.port))
    assert results[0].relay == f"[{PRIMARY}]:{primary.port}"
    assert primary.wait_for_messages(1)[0].rcpts == ["c@corp.example"]
    assert len(alternate.messages) == 1


@pytest.mark.parametrize(
    "setup",
    [
        lambda s: setattr(s, "greeting", "421 4.3.2 Service not available"),
        lambda s: setattr(s, "greeting", "554 5.3.2 No service"),
        lambda s: setattr(s, "ehlo_reply", "451 4.3.0 Try later"),
        lambda s: setattr(s, "mail_reply", "452 4.3.1 Insufficient system storage"),
        lambda s: setattr(s, "hang", "greeting"),
    ],
    ids=["greeting-421", "greeting-554", "ehlo-451", "mail-452", "greeting-timeout"],
)
def test_a_server_that_will_not_talk_means_the_next_one(primary, alternate, setup):
    setup(primary)
    results, _ = deliver(make_config(timeouts="1s"), ["b@corp.example"], hops(primary, alternate, port=primary.port))
    assert results[0].status is Status.SENT
    assert alternate.wait_for_messages(1)[0].rcpts == ["b@corp.example"]
    assert primary.messages == []


def test_all_servers_down_defers_with_the_last_reason(primary, alternate):
    primary.stop()
    alternate.stop()
    results, log = deliver(make_config(), ["b@corp.example", "c@corp.example"], hops(primary, alternate, port=primary.port))
    assert [r.status for r in results] == [Status.DEFERRED, Status.DEFERRED]
    reply = results[0].reply
    assert isinstance(reply, LocalReply) and reply.is_transient
    assert describe_reply(reply) == f"Connection refused by {ALTERNATE}"
    assert results[0].relay == f"[{ALTERNATE}]:{primary.port}"
    assert log.lines[-1] == (f"relay=[{ALTERNATE}]:{primary.port}, Connection refused by {ALTERNATE}", "QID1")


def test_remote_4xx_as_the_last_reason(primary, alternate):
    primary.stop()
    alternate.greeting = "421 4.3.0 Server shutting down"
    results, _ = deliver(make_config(), ["b@corp.example"], hops(primary, alternate, port=primary.port))
    assert results[0].status is Status.DEFERRED
    assert describe_reply(results[0].reply) == "421 4.3.0 Server shutting down"


def test_a_notice_names_a_remote_mta_only_when_a_server_answered(primary, alternate):
    from kanmon.deliver.dsn import NoticeRecipient

    primary.stop()
    alternate.stop()
    refused, _ = deliver(make_config(), ["b@corp.example"], hops(primary, alternate, port=primary.port))
    assert refused[0].relay and NoticeRecipient.from_result(refused[0]).remote_mta == ""  # connection refused
    alternate.start()
    alternate.greeting = "421 4.3.0 Server shutting down"
    answered, _ = deliver(make_config(), ["b@corp.example"], hops(alternate, port=primary.port))
    assert NoticeRecipient.from_result(answered[0]).remote_mta == f"[{ALTERNATE}]"


def test_per_recipient_results(primary, alternate):
    primary.rcpt_replies = {
        "later@corp.example": "451 4.3.0 <later@corp.example>: Temporary lookup failure",
        "gone@corp.example": "550 5.1.1 <gone@corp.example>: User unknown",
    }
    rcpts = ["ok@corp.example", "later@corp.example", "gone@corp.example"]
    results, _ = deliver(make_config(), rcpts, hops(primary, alternate, port=primary.port))
    assert [(r.rcpt, r.status) for r in results] == [
        ("ok@corp.example", Status.SENT),
        ("later@corp.example", Status.DEFERRED),
        ("gone@corp.example", Status.BOUNCED),
    ]
    assert str(results[2].reply) == "550 5.1.1 <gone@corp.example>: User unknown"
    assert all(r.relay == f"[{PRIMARY}]:{primary.port}" for r in results)
    assert alternate.messages == []  # a 4xx/5xx per recipient does not move to the alternate
    assert primary.wait_for_messages(1)[0].rcpts == ["ok@corp.example"]


def test_connection_lost_after_data_defers_without_trying_the_alternate(primary, alternate):
    primary.drop = "after-data"
    results, _ = deliver(make_config(), ["b@corp.example"], hops(primary, alternate, port=primary.port))
    assert results[0].status is Status.DEFERRED
    assert "lost connection" in results[0].reply.text
    assert alternate.messages == [] and alternate.connections == 0


def test_too_many_recipients_are_sent_in_further_transactions(primary):
    primary.max_rcpts = 2
    rcpts = [f"u{i}@corp.example" for i in range(5)]
    results, _ = deliver(make_config(), rcpts, hops(primary, port=primary.port))
    assert all(r.status is Status.SENT for r in results)
    assert [m.rcpts for m in primary.wait_for_messages(3)] == [rcpts[0:2], rcpts[2:4], rcpts[4:5]]
    assert primary.connections == 1


def test_bad_addresses_bounce_without_reaching_the_server(primary):
    results, _ = deliver(make_config(), ["ok@corp.example", "x@y\r\nRCPT TO:<evil@z>"], hops(primary, port=primary.port))
    assert results[0].status is Status.SENT
    assert results[1].status is Status.BOUNCED and results[1].reply.enhanced == "5.1.3"
    assert not any("evil" in c for c in primary.commands)
    results, _ = deliver(make_config(), ["ok@corp.example"], hops(primary, port=primary.port), mail_from="a@b\nDATA")
    assert results[0].status is Status.BOUNCED and results[0].reply.enhanced == "5.1.7"


def test_connections_are_reused_for_the_same_next_hop(primary):
    config = make_config()

    async def two(agent):
        h = hops(primary, port=primary.port)
        first = await agent.deliver("QID1", "a@corp.example", ["b@corp.example"], BODY, h, "none")
        second = await agent.deliver("QID2", "a@corp.example", ["c@corp.example"], BODY, h, "none")
        return first + second

    results, _ = run_delivery(config, two)
    assert [r.status for r in results] == [Status.SENT, Status.SENT]
    assert primary.connections == 1 and len(primary.wait_for_messages(2)) == 2
    assert "RSET" in primary.commands


def test_concurrency_is_bounded_per_destination(primary):
    config = make_config(max_per_destination=2)

    async def many(agent):
        h = hops(primary, port=primary.port)
        batches = await asyncio.gather(
            *(agent.deliver(f"Q{i}", "a@corp.example", [f"u{i}@corp.example"], BODY, h, "none") for i in range(8))
        )
        return [r for batch in batches for r in batch]

    results, _ = run_delivery(config, many)
    assert all(r.status is Status.SENT for r in results)
    assert primary.connections <= 2
    assert len(primary.wait_for_messages(8)) == 8


def test_a_configured_server_by_name_is_resolved(primary, dns_server):
    dns_server.set_records(records={"store.corp.example": [f"A {PRIMARY}"]})
    config = make_config(dns=dns_server)
    results, _ = deliver(config, ["b@corp.example"], [NextHop("store.corp.example", primary.port)])
    assert results[0].status is Status.SENT
    assert results[0].relay == f"store.corp.example. [{PRIMARY}]:{primary.port}"


def test_a_configured_server_name_that_does_not_resolve_is_skipped(primary, dns_server):
    dns_server.set_records(records={"other.example": ["A 127.0.0.1"]})
    config = make_config(dns=dns_server)
    results, log = deliver(config, ["b@corp.example"], [NextHop("gone.corp.example", primary.port), NextHop.from_endpoint((PRIMARY, primary.port))])
    assert results[0].status is Status.SENT
    assert "relay=gone.corp.example: Host or domain name not found" in log.text()


def test_unknown_tls_policy_and_empty_hops_are_errors(primary):
    with pytest.raises(ValueError, match="TLS policy"):
        deliver(make_config(), ["b@corp.example"], hops(primary, port=primary.port), tls="sometimes")
    with pytest.raises(ValueError, match="next hop"):
        deliver(make_config(), ["b@corp.example"], [])


# ---------------------------------------------------------------------------
# TLS


@pytest.fixture
def tls_primary(ca):
    with SmtpSink(PRIMARY, ssl_context=tls_server_context(ca, "store.corp.example", PRIMARY)) as s:
        yield s


def test_starttls_is_logged_and_recorded(tls_primary, ca_file):
    results, log = deliver(make_config(ca_file=ca_file), ["b@corp.example"], hops(tls_primary, port=tls_primary.port), tls="opportunistic")
    [r] = results
    assert r.status is Status.SENT
    assert r.tls.startswith("TLSv1.") and r.tls.endswith("verify=OK")
    [(line, qid)] = [x for x in log.lines if x[0].startswith("STARTTLS=client")]
    assert qid == "QID1"
    assert line.startswith(f"STARTTLS=client, relay=[{PRIMARY}]:{tls_primary.port}, version=TLSv1.")
    assert ", verify=OK, cipher=" in line and ", bits=" in line
    assert tls_primary.wait_for_messages(1)[0].tls


def test_opportunistic_with_untrusted_certificate_logs_verify_fail(tls_primary):
    results, log = deliver(make_config(), ["b@corp.example"], hops(tls_primary, port=tls_primary.port), tls="opportunistic")
    assert results[0].status is Status.SENT and results[0].tls.endswith("verify=FAIL")
    assert "verify=FAIL" in log.text()


def test_opportunistic_tls_with_a_server_without_starttls(primary):
    results, _ = deliver(make_config(), ["b@corp.example"], hops(primary, port=primary.port), tls="opportunistic")
    assert results[0].status is Status.SENT and results[0].tls == ""
    assert not primary.wait_for_messages(1)[0].tls


def test_required_tls_against_a_plaintext_server_is_deferred(primary):
    results, log = deliver(make_config(), ["b@corp.example"], hops(primary, port=primary.port), tls="required")
    assert results[0].status is Status.DEFERRED
    assert results[0].reply.enhanced == "4.7.4"
    assert "TLS is required, but was not offered" in log.text()
    assert primary.messages == []


def test_required_tls_moves_on_to_a_server_that_has_it(primary, ca, ca_file):
    with SmtpSink(ALTERNATE, primary.port, ssl_context=tls_server_context(ca, ALTERNATE)) as alt:
        results, _ = deliver(make_config(ca_file=ca_file), ["b@corp.example"], hops(primary, alt, port=primary.port), tls="verify")
        assert results[0].status is Status.SENT and results[0].tls.endswith("verify=OK")
        assert alt.wait_for_messages(1)[0].tls
    assert primary.messages == []


def test_smtps(ca, ca_file):
    with SmtpSink(PRIMARY, ssl_context=tls_server_context(ca, PRIMARY), implicit_tls=True) as s:
        results, _ = deliver(make_config(ca_file=ca_file), ["b@corp.example"], hops(s, port=s.port), tls="smtps")
        assert results[0].status is Status.SENT and results[0].tls.endswith("verify=OK")


# ---------------------------------------------------------------------------
# By MX


def route(domain):
    return SimpleNamespace(transport="mx", domain=domain, hops=(), tls="opportunistic")


def test_mx_delivery_tries_by_preference(dns_server):
    with SmtpSink("127.0.0.54") as mx2:
        dns_server.set_records(records={
            "dest.example": ["MX 10 mx1.dest.example.", "MX 20 mx2.dest.example."],
            "mx1.dest.example": [f"A {NOBODY}"],  # nothing listens there
            "mx2.dest.example": ["A 127.0.0.54"],
        })
        config = make_config(mx_port=mx2.port, dns=dns_server)
        results, log = run_delivery(config, lambda a: a.deliver_route("QID1", SENDER, ["b@dest.example"], BODY, route("dest.example")))
        assert results[0].status is Status.SENT
        assert results[0].relay == f"mx2.dest.example. [127.0.0.54]:{mx2.port}"
        assert f"Connection refused by {NOBODY}; trying next server" in log.text()
        assert mx2.wait_for_messages(1)[0].rcpts == ["b@dest.example"]


def test_null_mx_bounces(dns_server):
    dns_server.set_records(records={"null.example": ["MX 0 ."]})
    results, _ = run_delivery(make_config(dns=dns_server), lambda a: a.deliver_route("Q", SENDER, ["b@null.example"], BODY, route("null.example")))
    assert results[0].status is Status.BOUNCED and results[0].reply.enhanced == "5.1.10"


def test_mx_loop_to_ourselves_bounces(dns_server):
    dns_server.set_records(records={"loop.example": ["MX 10 mx.loop.example."], "mx.loop.example": ["A 127.0.0.8"]})
    results, _ = run_delivery(make_config(mx_port=2525, dns=dns_server), lambda a: a.deliver_route("Q", SENDER, ["b@loop.example"], BODY, route("loop.example")))
    assert results[0].status is Status.BOUNCED and results[0].reply.enhanced == "5.4.6"


def test_dns_failure_defers(dns_server):
    dns_server.set_records(records={"dest.example": ["MX 10 mx1.dest.example."]})
    dns_server.servfail("dest.example")
    results, _ = run_delivery(make_config(dns=dns_server), lambda a: a.deliver_route("Q", SENDER, ["b@dest.example"], BODY, route("dest.example")))
    assert results[0].status is Status.DEFERRED and results[0].reply.enhanced == "4.4.3"


def test_route_with_configured_servers(primary, alternate):
    primary.stop()
    r = SimpleNamespace(transport="relay", domain="corp.example", hops=((PRIMARY, primary.port), (ALTERNATE, primary.port)), tls="none")
    results, _ = run_delivery(make_config(), lambda a: a.deliver_route("Q", SENDER, ["b@corp.example"], BODY, r))
    assert results[0].status is Status.SENT and ALTERNATE in results[0].relay


def test_opportunistic_handshake_failure_is_logged_and_mail_goes_in_plaintext(tls_primary):
    tls_primary.drop = "starttls"
    results, log = deliver(make_config(), ["b@corp.example"], hops(tls_primary, port=tls_primary.port), tls="opportunistic")
    assert results[0].status is Status.SENT and results[0].tls == ""
    [line] = [t for t, _ in log.lines if t.startswith("STARTTLS=client")]
    assert line.startswith(f"STARTTLS=client, relay=[{PRIMARY}]:{tls_primary.port}, TLS handshake with {PRIMARY} failed")
    assert line.endswith("continued without TLS")
    assert not tls_primary.wait_for_messages(1)[0].tls
