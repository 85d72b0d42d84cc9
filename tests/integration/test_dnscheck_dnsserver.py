"""The loopback DNS server used by the tests (tests/support/dnsserver.py) answers as a
real authoritative server would: records, CNAME chasing, NXDOMAIN/NODATA, TC + TCP
retry for long answers, SERVFAIL and silence on request, records replaced live."""

from __future__ import annotations

import dns.exception
import dns.resolver
import pytest

from tests.support.dnsserver import DnsServer, dns_server, txt  # noqa: F401 (fixture)

ZONE = """\
$ORIGIN example.test.
$TTL 60
@       SOA   ns hostmaster 1 3600 600 86400 60
@       MX    10 mx1
mx1     A     192.0.2.1
mx1     AAAA  2001:db8::1
alias   CNAME mx1
"""


def test_records_from_zone_text_and_dict(dns_server: DnsServer) -> None:
    dns_server.set_records(
        zone=ZONE,
        records={"null.test": ["MX 0 ."], "1.2.0.192.in-addr.arpa": ["PTR mx1.example.test."]},
    )
    r = dns_server.resolver()
    assert [(m.preference, str(m.exchange)) for m in r.resolve("example.test", "MX")] == [(10, "mx1.example.test.")]
    assert [a.address for a in r.resolve("mx1.example.test", "AAAA")] == ["2001:db8::1"]
    assert [(m.preference, str(m.exchange)) for m in r.resolve("null.test", "MX")] == [(0, ".")]
    assert [str(p.target) for p in r.resolve_address("192.0.2.1")] == ["mx1.example.test."]
    answer = r.resolve("alias.example.test", "A")
    assert str(answer.canonical_name) == "mx1.example.test."
    assert [a.address for a in answer] == ["192.0.2.1"]


def test_nxdomain_and_nodata(dns_server: DnsServer) -> None:
    dns_server.set_records(zone=ZONE)
    r = dns_server.resolver()
    with pytest.raises(dns.resolver.NXDOMAIN):
        r.resolve("nothing.example.test", "A")
    with pytest.raises(dns.resolver.NoAnswer):
        r.resolve("mx1.example.test", "MX")
    with pytest.raises(dns.resolver.NoAnswer):  # an empty non-terminal exists
        r.resolve("test", "A")


def test_long_txt_is_split_and_retried_over_tcp(dns_server: DnsServer) -> None:
    long = "v=spf1 " + " ".join(f"ip4:192.0.2.{i}" for i in range(60)) + " -all"
    dns_server.set_records(records={"example.test": ["TXT " + txt(long)]})
    answer = dns_server.resolver().resolve("example.test", "TXT")
    strings = answer[0].strings
    assert len(strings) > 1 and all(len(s) <= 255 for s in strings)
    assert b"".join(strings).decode() == long
    assert [q.proto for q in dns_server.queries] == ["udp", "tcp"]


def test_servfail_drop_and_live_replacement(dns_server: DnsServer) -> None:
    dns_server.set_records(zone=ZONE)
    r = dns_server.resolver(timeout=0.3)
    dns_server.servfail("mx1.example.test", "A")
    with pytest.raises(dns.resolver.NoNameservers, match="SERVFAIL"):
        r.resolve("mx1.example.test", "A")
    assert [a.address for a in r.resolve("mx1.example.test", "AAAA")] == ["2001:db8::1"]
    dns_server.clear_faults()
    dns_server.drop("mx1.example.test")
    with pytest.raises(dns.exception.Timeout):
        r.resolve("mx1.example.test", "A")
    with pytest.raises(dns.exception.Timeout):
        r.resolve("mx1.example.test", "A", tcp=True)
    dns_server.clear_faults()
    dns_server.set_records(records={"mx1.example.test": ["A 192.0.2.99"]})
    assert [a.address for a in r.resolve("mx1.example.test", "A")] == ["192.0.2.99"]
    dns_server.add_records(records={"mx1.example.test": ["A 192.0.2.98"]})
    assert sorted(a.address for a in r.resolve("mx1.example.test", "A")) == ["192.0.2.98", "192.0.2.99"]


def test_given_port_and_address() -> None:
    with DnsServer(records={"a.test": ["A 192.0.2.7"]}) as first:
        port = first.port
    with DnsServer(records={"a.test": ["A 192.0.2.8"]}, host="127.0.0.2", port=port) as srv:
        assert srv.address == f"127.0.0.2:{port}"
        assert [a.address for a in srv.resolver().resolve("a.test", "A")] == ["192.0.2.8"]
