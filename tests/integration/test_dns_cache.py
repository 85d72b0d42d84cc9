"""The node's DNS cache (kanmon.dnscache) against a real DNS server on loopback that
counts the queries it gets: positive and negative answers (RFC 2308) kept for their TTL
and no longer, temporary failures never kept, a bounded size, one cache shared by the
delivery resolver and the checks' resolver, and `flush`."""

from __future__ import annotations

import asyncio

import pytest

from kanmon.deliver.mx import MxResolver
from kanmon.dnscache import DnsCache
from kanmon.model import SmtpError
from kanmon.policy.dns import CheckResolver, DnsStatus
from tests.support.dnsserver import DnsServer, dns_server  # noqa: F401  (fixture)

# SOA: TTL 300, MINIMUM 60: a negative answer is good for 60 s (RFC 2308 5).
ZONE = """
$ORIGIN dest.example.
$TTL 300
@        IN SOA ns.dest.example. hostmaster.dest.example. 1 3600 600 86400 60
@        IN MX 10 mx.dest.example.
mx    120 IN A 127.0.0.41
"""


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def count(dns: DnsServer, name: str, qtype: str) -> int:
    return sum(1 for q in dns.queries if q.name == name and q.qtype == qtype)


def mx(dns: DnsServer, cache: DnsCache) -> MxResolver:
    return MxResolver(servers=[(dns.host, dns.port)], timeout=2.0, port=2525, cache=cache)


def checks(dns: DnsServer, cache: DnsCache, clock: Clock) -> CheckResolver:
    return CheckResolver(servers=[(dns.host, dns.port)], timeout=2.0, clock=clock, cache=cache)


def test_a_positive_answer_is_kept_for_its_ttl_and_no_longer(dns_server):
    dns_server.set_records(zone=ZONE)
    clock = Clock()
    cache = DnsCache(clock=clock)
    r = mx(dns_server, cache)

    async def main():
        for _ in range(3):
            hops = await r.resolve_domain("dest.example")
            assert hops[0].addresses == ("127.0.0.41",)
        assert count(dns_server, "dest.example.", "MX") == 1 and count(dns_server, "mx.dest.example.", "A") == 1
        clock.now += 119  # the A record's TTL is 120
        await r.resolve_domain("dest.example")
        assert count(dns_server, "mx.dest.example.", "A") == 1
        clock.now += 2
        await r.resolve_domain("dest.example")
        assert count(dns_server, "mx.dest.example.", "A") == 2 and count(dns_server, "dest.example.", "MX") == 1
        clock.now += 300  # the MX's 300 s too
        await r.resolve_domain("dest.example")
        assert count(dns_server, "dest.example.", "MX") == 2

    asyncio.run(main())
    assert cache.hits >= 4


def test_hits_and_misses_count_lookups(dns_server):
    """`kanmon dns cache show`'s hits and misses: one per lookup, whether the answer was
    kept (positive or NXDOMAIN) or asked for (dnspython looks a name up under its type
    and then under ANY for a kept NXDOMAIN: that is still one lookup)."""
    dns_server.set_records(zone=ZONE)
    cache = DnsCache(clock=Clock())
    r = mx(dns_server, cache)

    async def main():
        for _ in range(3):
            await r.lookup("dest.example", "MX")  # asked once, then kept
            await r.lookup("nowhere.dest.example", "MX")  # NXDOMAIN: asked once, then kept

    asyncio.run(main())
    assert count(dns_server, "dest.example.", "MX") == 1 and count(dns_server, "nowhere.dest.example.", "MX") == 1
    assert (cache.hits, cache.misses) == (4, 2), (cache.hits, cache.misses)


@pytest.mark.parametrize("name, qtype, expect", [
    ("nowhere.dest.example", "MX", "nxdomain"),  # no such name
    ("mx.dest.example", "MX", "nodata"),  # the name exists, without MX
])
def test_a_negative_answer_is_kept_for_the_soa_minimum(dns_server, name, qtype, expect):
    dns_server.set_records(zone=ZONE)
    clock = Clock()
    cache = DnsCache(clock=clock)
    r = mx(dns_server, cache)

    async def main():
        for _ in range(3):
            answer = await r.lookup(name, qtype)
            assert not answer.records and answer.nxdomain == (expect == "nxdomain")
        assert count(dns_server, name + ".", qtype) == 1
        (entry,) = [e for e in cache.entries() if e.name == name]
        assert entry.kind == expect and 0 < entry.ttl_left <= 60
        clock.now += 61  # min(SOA TTL 300, MINIMUM 60)
        await r.lookup(name, qtype)
        assert count(dns_server, name + ".", qtype) == 2

    asyncio.run(main())


def test_a_server_failure_is_never_kept(dns_server):
    dns_server.set_records(zone=ZONE)
    dns_server.servfail("dest.example")
    cache = DnsCache(clock=Clock())
    r = mx(dns_server, cache)

    async def main():
        for n in (1, 2):
            with pytest.raises(SmtpError) as info:
                await r.resolve_domain("dest.example")
            assert info.value.reply.code == 451
        assert len(cache) == 0
        dns_server.clear_faults()
        assert (await r.resolve_domain("dest.example"))[0].addresses == ("127.0.0.41",)

    asyncio.run(main())
    assert count(dns_server, "dest.example.", "MX") >= 3


def test_the_cache_is_bounded(dns_server):
    dns_server.set_records(records={f"h{i}.dest.example": [f"A 127.0.1.{i}"] for i in range(20)})
    cache = DnsCache(5, clock=Clock())
    r = mx(dns_server, cache)

    async def main():
        for i in range(20):
            assert await r.resolve_host(f"h{i}.dest.example")
            assert len(cache) <= 5
        await r.resolve_host("h19.dest.example")  # the most recent are kept
        assert count(dns_server, "h19.dest.example.", "A") == 1
        await r.resolve_host("h0.dest.example")  # the oldest went
        assert count(dns_server, "h0.dest.example.", "A") == 2

    asyncio.run(main())


def test_delivery_and_the_checks_share_one_cache_and_one_flush(dns_server):
    dns_server.set_records(zone=ZONE)
    clock = Clock()
    cache = DnsCache(clock=clock)
    delivery, edge = mx(dns_server, cache), checks(dns_server, cache, clock)

    async def main():
        await delivery.resolve_domain("dest.example")  # MX and A, asked once
        clock.now += 100
        answer = await edge.query("dest.example", "MX")  # a sender-domain check: from the cache
        assert answer.ok and answer.records == ("10 mx.dest.example.",)
        assert count(dns_server, "dest.example.", "MX") == 1
        # Handed out with what is left of its TTL, so the checks' own cache on top keeps it
        # no longer than the answer is good for.
        assert 199 <= answer.ttl <= 200
        clock.now += 201
        assert edge.cached_nowait("dest.example", "MX") is None
        await edge.query("dest.example", "MX")
        assert count(dns_server, "dest.example.", "MX") == 2
        assert (await edge.query("nowhere.dest.example", "A")).status is DnsStatus.NXDOMAIN
        cache.flush()  # `kanmon dns cache flush`: both forget
        assert len(cache) == 0 and edge.cached_nowait("dest.example", "MX") is None
        await delivery.resolve_domain("dest.example")
        await edge.query("nowhere.dest.example", "A")
        assert count(dns_server, "dest.example.", "MX") == 3
        assert count(dns_server, "nowhere.dest.example.", "A") == 2

    asyncio.run(main())


def test_no_cache_asks_every_time(dns_server):
    dns_server.set_records(zone=ZONE)
    r = mx(dns_server, DnsCache(0))

    async def main():
        for _ in range(2):
            await r.resolve_domain("dest.example")

    asyncio.run(main())
    assert count(dns_server, "dest.example.", "MX") == 2


# -- `kanmon dns cache` against a running node -------------------------------------------------

NODE = """
[server]
hostname = "mx1.example.test"
data_dir = "{data_dir}"
workers = {workers}
[smtp]
listen = ["127.0.0.1:{port}"]
relay_networks = ["127.0.0.1/32"]
min_free_disk = "1MB"
[dns]
servers = ["{dns}"]
[queue]
suspend_delivery = true
[[domain]]
name = "example.test"
mailboxes = ["alice"]
[[session_profile]]
name = "default"
greet_pause = "0s"
reject_own_helo = false
"""


@pytest.mark.parametrize("workers", [0, 1])
def test_kanmon_dns_cache_show_and_flush(dns_server, tmp_path, workers):
    """workers = 0: the checks use the node's cache (shown); 1: the receiver process's
    own, which `flush` reaches too (SIGUSR1)."""
    import json
    import smtplib
    import subprocess
    import sys

    from tests.support.kanmon_node import KanmonProcess, free_port

    dns_server.set_records(zone=ZONE)
    port = free_port()
    cfg = tmp_path / "kanmon.toml"
    cfg.write_text(NODE.format(data_dir=tmp_path / "data", port=port, dns=dns_server.address, workers=workers))
    proc = KanmonProcess(cfg, "127.0.0.1", port).start()

    def kanmon(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "kanmon", "dns", "cache", *args, "-c", str(cfg)],
                              capture_output=True, text=True, timeout=60)

    try:
        for _ in range(2):  # a client from outside: the sender domain check asks MX of dest.example, once
            with smtplib.SMTP("127.0.0.1", port, timeout=30, source_address=("127.0.0.9", 0)) as s:
                s.sendmail("someone@dest.example", ["alice@example.test"], b"Subject: hi\r\n\r\nhello\r\n")
        assert count(dns_server, "dest.example.", "MX") == 1
        r = kanmon("show", "--json")
        assert r.returncode == 0, r.stderr
        doc = json.loads(r.stdout)
        if workers == 0:
            assert doc["positive"] >= 1
            (entry,) = [e for e in doc["items"] if e["name"] == "dest.example" and e["type"] == "MX"]
            assert entry["records"] == ["10 mx.dest.example."] and 0 < entry["ttl_left"] <= 300
            text = kanmon("show").stdout
            assert "dest.example MX" in text and "10 mx.dest.example." in text
        r = kanmon("flush")
        assert r.returncode == 0 and "answer(s) flushed" in r.stdout
        assert ("receiver process" in r.stdout) == (workers == 1)
        assert json.loads(kanmon("show", "--json").stdout)["entries"] == 0
        with smtplib.SMTP("127.0.0.1", port, timeout=30, source_address=("127.0.0.9", 0)) as s:
            s.sendmail("someone@dest.example", ["alice@example.test"], b"Subject: hi\r\n\r\nhello\r\n")
        assert count(dns_server, "dest.example.", "MX") == 2  # flushed: asked again
    finally:
        proc.terminate()
    r = kanmon("show")
    assert r.returncode == 1 and "not running" in r.stderr
