"""The checks' DNS resolver against a real DNS server on loopback: typed answers,
the TTL cache (positive and negative), temporary failures never cached, timeouts."""

from __future__ import annotations

import asyncio

import pytest

from kanmon.config import parse_config
from kanmon.policy.dns import CheckResolver, DnsStatus, dnsbl_name, reverse_name
from tests.support.dnsserver import DnsServer, dns_server  # noqa: F401  (fixture)

ZONE = """
$ORIGIN example.test.
$TTL 300
@        IN SOA ns.example.test. hostmaster.example.test. 1 3600 600 86400 60
@        IN MX 10 mx.example.test.
mx    120 IN A 192.0.2.10
mx       IN AAAA 2001:db8::10
v6only   IN AAAA 2001:db8::11
"""


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(dns: DnsServer, clock: Clock | None = None, timeout: float = 2.0) -> CheckResolver:
    return CheckResolver(servers=[(dns.host, dns.port)], timeout=timeout, clock=clock or Clock())


def count(dns: DnsServer, name: str, qtype: str) -> int:
    return sum(1 for q in dns.queries if q.name == name and q.qtype == qtype)


def test_answers_are_typed_and_cached_by_ttl(dns_server):
    dns_server.set_records(zone=ZONE)
    clock = Clock()
    r = make(dns_server, clock)

    async def main():
        a = await r.query("MX.Example.Test.", "A")
        assert (a.status, a.records, a.ttl, a.name) == (DnsStatus.OK, ("192.0.2.10",), 120, "mx.example.test")
        assert a.ok and a.exists and not a.temporary
        assert (await r.query("example.test", "MX")).records == ("10 mx.example.test.",)
        assert r.cached_nowait("mx.example.test", "a") == a  # a warm check answers without an await
        await r.query("mx.example.test", "A")
        assert count(dns_server, "mx.example.test.", "A") == 1
        clock.now += 121  # the TTL has passed: asked again
        assert r.cached_nowait("mx.example.test", "A") is None
        await r.query("mx.example.test", "A")
        assert count(dns_server, "mx.example.test.", "A") == 2

    asyncio.run(main())


def test_negative_answers_cached_by_the_soa(dns_server):
    dns_server.set_records(zone=ZONE)
    clock = Clock()
    r = make(dns_server, clock)

    async def main():
        nx = await r.query("nnn.example.test", "MX")
        assert (nx.status, nx.ttl, nx.exists) == (DnsStatus.NXDOMAIN, 60, False)  # min(SOA TTL, MINIMUM)
        nodata = await r.query("mx.example.test", "MX")
        assert (nodata.status, nodata.records, nodata.exists) == (DnsStatus.NODATA, (), True)
        await r.query("nnn.example.test", "MX")
        assert count(dns_server, "nnn.example.test.", "MX") == 1
        clock.now += 61
        await r.query("nnn.example.test", "MX")
        assert count(dns_server, "nnn.example.test.", "MX") == 2
        # A name no zone here covers: NXDOMAIN without an SOA, the default negative TTL.
        assert (await r.query("nowhere.invalid", "A")).status is DnsStatus.NXDOMAIN

    asyncio.run(main())


def test_temporary_failures_are_typed_and_never_cached(dns_server):
    dns_server.set_records(zone=ZONE)
    dns_server.servfail("broken.example.test")
    dns_server.drop("slow.example.test")
    r = make(dns_server, timeout=0.5)

    async def main():
        fail = await r.query("broken.example.test", "MX")
        assert (fail.status, fail.error, fail.temporary) == (DnsStatus.TEMPFAIL, "server failure", True)
        assert r.cached_nowait("broken.example.test", "MX") is None
        slow = await r.query("slow.example.test", "A")
        assert (slow.status, slow.error) == (DnsStatus.TEMPFAIL, "timed out")
        dns_server.clear_faults()
        assert (await r.query("broken.example.test", "MX")).status is DnsStatus.NXDOMAIN

    asyncio.run(main())


def test_addresses_ptr_and_dnsbl_names(dns_server):
    dns_server.set_records(zone=ZONE, records={
        "10.2.0.192.in-addr.arpa": ["PTR MX.example.test."],
        "2.0.0.127.zen.example": ["A 127.0.0.2"],
    })
    r = make(dns_server)

    async def main():
        both = await r.addresses("mx.example.test")
        assert both.ok and set(both.records) == {"192.0.2.10", "2001:db8::10"} and both.ttl == 120
        assert (await r.addresses("v6only.example.test")).records == ("2001:db8::11",)
        assert (await r.addresses("example.test")).status is DnsStatus.NODATA
        assert (await r.addresses("nnn.example.test")).status is DnsStatus.NXDOMAIN
        assert (await r.ptr("192.0.2.10")).records == ("mx.example.test",)
        assert (await r.ptr("192.0.2.11")).status is DnsStatus.NXDOMAIN
        assert (await r.query(dnsbl_name("127.0.0.2", "zen.example"), "A")).records == ("127.0.0.2",)

    asyncio.run(main())
    assert reverse_name("192.0.2.10") == "10.2.0.192.in-addr.arpa"
    assert dnsbl_name("2001:db8::1", "zen.example").endswith(".8.b.d.0.1.0.0.2.zen.example")


def test_identical_queries_in_flight_share_one_lookup(dns_server):
    dns_server.set_records(zone=ZONE)
    r = make(dns_server)

    async def main():
        answers = await asyncio.gather(*(r.query("example.test", "MX") for _ in range(5)))
        assert len(set(answers)) == 1 and r.lookups == 1

    asyncio.run(main())
    assert count(dns_server, "example.test.", "MX") == 1


def test_from_config_uses_the_dns_section(dns_server):
    cfg = parse_config(f'[dns]\nservers = ["{dns_server.address}"]\ntimeout = "3s"\n')
    r = CheckResolver.from_config(cfg)
    assert r.timeout == 3.0
    dns_server.set_records(zone=ZONE)
    assert asyncio.run(r.query("mx.example.test", "A")).ok


def test_bad_timeout_refused():
    with pytest.raises(ValueError):
        CheckResolver(timeout=0)
