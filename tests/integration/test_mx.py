"""MX resolution against a real DNS server on loopback (tests/support/dnsserver, dnslib)."""

from __future__ import annotations

import asyncio
import random

import pytest

from kanmon.config import parse_config
from kanmon.deliver.mx import MxResolver, NextHop
from kanmon.model import SmtpError
from tests.support.dnsserver import DnsServer, dns_server  # noqa: F401  (fixture)


def resolver(dns: DnsServer, **kw) -> MxResolver:
    kw.setdefault("timeout", 2.0)
    kw.setdefault("port", 2525)
    return MxResolver(servers=[(dns.host, dns.port)], **kw)


def resolve(r: MxResolver, domain: str):
    return asyncio.run(r.resolve_domain(domain))


def error(r: MxResolver, domain: str):
    with pytest.raises(SmtpError) as info:
        resolve(r, domain)
    return info.value.reply


def test_mx_hosts_by_preference(dns_server):
    dns_server.set_records(records={
        "dest.example": ["MX 20 mx2.dest.example.", "MX 10 mx1.dest.example."],
        "mx1.dest.example": ["A 127.0.0.41"],
        "mx2.dest.example": ["A 127.0.0.42", "AAAA ::1"],
    })
    hops = resolve(resolver(dns_server), "dest.example")
    assert hops == [
        NextHop("mx1.dest.example", 2525, ("127.0.0.41",), 10),
        NextHop("mx2.dest.example", 2525, ("127.0.0.42", "::1"), 20),
    ]
    assert hops[0].relay_text("127.0.0.41") == "mx1.dest.example. [127.0.0.41]:2525"


def test_equal_preferences_are_shuffled(dns_server):
    dns_server.set_records(records={
        "dest.example": ["MX 10 a.dest.example.", "MX 10 b.dest.example.", "MX 10 c.dest.example.", "MX 5 best.dest.example.", "MX 50 last.dest.example."],
        **{f"{h}.dest.example": ["A 127.0.0.43"] for h in ("a", "b", "c", "best", "last")},
    })
    orders = set()
    for seed in range(12):
        hops = resolve(resolver(dns_server, rng=random.Random(seed)), "dest.example")
        names = [h.host for h in hops]
        assert names[0] == "best.dest.example" and names[-1] == "last.dest.example"
        assert sorted(names[1:4]) == ["a.dest.example", "b.dest.example", "c.dest.example"]
        orders.add(tuple(names[1:4]))
    assert len(orders) > 1


def test_no_mx_falls_back_to_the_domains_address(dns_server):
    dns_server.set_records(records={"plain.example": ["A 127.0.0.44", 'TXT "v=spf1 -all"']})
    assert resolve(resolver(dns_server), "plain.example") == [NextHop("plain.example", 2525, ("127.0.0.44",), 0)]


def test_no_mx_and_only_ipv6(dns_server):
    dns_server.set_records(records={"six.example": ["AAAA ::1"]})
    assert resolve(resolver(dns_server), "six.example")[0].addresses == ("::1",)


def test_no_mx_and_no_address_is_permanent(dns_server):
    dns_server.set_records(records={"nothing.example": ['TXT "hello"']})
    reply = error(resolver(dns_server), "nothing.example")
    assert (reply.code, reply.enhanced) == (550, "5.4.4")


def test_null_mx_is_permanent_5_1_10(dns_server):
    dns_server.set_records(records={"null.example": ["MX 0 ."], "null.example.": ["A 127.0.0.45"]})
    reply = error(resolver(dns_server), "null.example")
    assert reply.is_permanent and reply.enhanced == "5.1.10"
    assert "does not accept mail" in reply.text


def test_nxdomain_is_permanent_5_1_2(dns_server):
    dns_server.set_records(records={"exists.example": ["A 127.0.0.46"]})
    reply = error(resolver(dns_server), "nosuch.example")
    assert (reply.code, reply.enhanced) == (550, "5.1.2")
    assert "name=nosuch.example type=MX" in reply.text


def test_servfail_is_temporary(dns_server):
    dns_server.set_records(records={"dest.example": ["MX 10 mx1.dest.example."]})
    dns_server.servfail("dest.example", "MX")
    reply = error(resolver(dns_server), "dest.example")
    assert reply.is_transient and reply.enhanced == "4.4.3"


def test_timeout_is_temporary(dns_server):
    dns_server.set_records(records={"dest.example": ["MX 10 mx1.dest.example."]})
    dns_server.drop("dest.example", "MX")
    reply = error(resolver(dns_server, timeout=0.3), "dest.example")
    assert reply.is_transient and reply.enhanced == "4.4.3" and "timed out" in reply.text


def test_mx_host_lookup_failure_is_temporary_when_no_other_host_works(dns_server):
    dns_server.set_records(records={"dest.example": ["MX 10 mx1.dest.example."], "mx1.dest.example": ["A 127.0.0.41"]})
    dns_server.servfail("mx1.dest.example")
    assert error(resolver(dns_server), "dest.example").is_transient


def test_an_mx_host_that_does_not_exist_is_skipped(dns_server):
    dns_server.set_records(records={
        "dest.example": ["MX 10 gone.dest.example.", "MX 20 mx2.dest.example."],
        "mx2.dest.example": ["A 127.0.0.42"],
    })
    assert [h.host for h in resolve(resolver(dns_server), "dest.example")] == ["mx2.dest.example"]


def test_mx_hosts_that_all_do_not_exist_is_permanent(dns_server):
    dns_server.set_records(records={"dest.example": ["MX 10 gone.dest.example."], "other.example": ["A 127.0.0.1"]})
    reply = error(resolver(dns_server), "dest.example")
    assert (reply.code, reply.enhanced) == (550, "5.4.4")


def test_mx_pointing_at_our_own_address_is_a_loop(dns_server):
    dns_server.set_records(records={"loop.example": ["MX 10 mx.loop.example."], "mx.loop.example": ["A 127.0.0.8"]})
    reply = error(resolver(dns_server, own_endpoints=[("127.0.0.8", 2525)]), "loop.example")
    assert (reply.code, reply.enhanced) == (554, "5.4.6")
    assert reply.text == "mail for loop.example loops back to myself"


def test_mx_pointing_at_our_own_name_is_a_loop(dns_server):
    dns_server.set_records(records={"loop.example": ["MX 10 relay.corp.example."], "relay.corp.example": ["A 127.0.0.9"]})
    reply = error(resolver(dns_server, own_names=["relay.corp.example"]), "loop.example")
    assert reply.enhanced == "5.4.6"


def test_implicit_mx_to_ourselves_is_a_loop(dns_server):
    dns_server.set_records(records={"self.example": ["A 127.0.0.8"]})
    assert error(resolver(dns_server, own_endpoints=[("127.0.0.8", 2525)]), "self.example").enhanced == "5.4.6"


def test_same_address_on_another_port_is_not_us(dns_server):
    dns_server.set_records(records={"dest.example": ["A 127.0.0.8"]})
    hops = resolve(resolver(dns_server, own_endpoints=[("127.0.0.8", 25)]), "dest.example")
    assert hops[0].addresses == ("127.0.0.8",)


def test_as_backup_mx_only_more_preferred_hosts_are_used(dns_server):
    dns_server.set_records(records={
        "dest.example": ["MX 10 primary.dest.example.", "MX 20 relay.corp.example.", "MX 30 third.dest.example."],
        "primary.dest.example": ["A 127.0.0.41"],
        "relay.corp.example": ["A 127.0.0.8"],
        "third.dest.example": ["A 127.0.0.42"],
    })
    hops = resolve(resolver(dns_server, own_endpoints=[("127.0.0.8", 2525)]), "dest.example")
    assert [h.host for h in hops] == ["primary.dest.example"]


def test_address_literal_domain(dns_server):
    assert resolve(resolver(dns_server), "[127.0.0.47]") == [NextHop("127.0.0.47", 2525, ("127.0.0.47",))]
    assert dns_server.queries == []


def test_resolve_hop_fills_in_addresses(dns_server):
    dns_server.set_records(records={"store.corp.example": ["A 127.0.0.7"]})
    r = resolver(dns_server)
    hop = asyncio.run(r.resolve_hop(NextHop.from_endpoint(("store.corp.example", 2525))))
    assert hop.addresses == ("127.0.0.7",)
    ip_hop = NextHop.from_endpoint(("127.0.0.7", 25))
    assert asyncio.run(r.resolve_hop(ip_hop)) is ip_hop
    assert ip_hop.relay_text("127.0.0.7") == "[127.0.0.7]"


def test_from_config_uses_dns_servers_timeout_mx_port_and_our_identity(dns_server):
    config = parse_config(f"""
[server]
hostname = "relay.corp.example"
[smtp]
listen = ["127.0.0.8:2526"]
[outbound]
mx_port = 2526
[dns]
servers = ["{dns_server.address}"]
timeout = "1s"
""")
    r = MxResolver.from_config(config)
    assert r.port == 2526 and r.timeout == 1.0
    dns_server.set_records(records={"loop.example": ["MX 10 mx.loop.example."], "mx.loop.example": ["A 127.0.0.8"],
                                    "dest.example": ["MX 10 mx.dest.example."], "mx.dest.example": ["A 127.0.0.41"]})
    assert error(r, "loop.example").enhanced == "5.4.6"
    assert resolve(r, "dest.example") == [NextHop("mx.dest.example", 2526, ("127.0.0.41",), 10)]
    assert any(q.name == "dest.example." and q.qtype == "MX" for q in dns_server.queries)


def test_bad_domain_is_a_clear_error(dns_server):
    r = resolver(dns_server)
    with pytest.raises(ValueError):
        resolve(r, "")
    assert error(r, "a" * 70 + ".example").enhanced == "5.1.2"
