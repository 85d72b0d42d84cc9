"""The loopback DNS server used by the tests (tests/support/dnsserver.py) answers as a
real authoritative server would: records, CNAME chasing, NXDOMAIN/NODATA, TC + TCP
retry for long answers, SERVFAIL and silence on request, records replaced live."""

from __future__ import annotations

import dns.exception
import dns.resolver
import pytest

from kanmon.dnscheck.checks import Severity, Target, check_domain
from kanmon.dnscheck.sources import ResolverSource, Status
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


# -- delegations (a link-balancing device answering for `mail`) -----------------------------

PARENT = """
$ORIGIN nix.co.jj.
$TTL 300
@       IN SOA ns1 hostmaster 1 3600 600 1209600 300
@       IN NS  ns1
ns1     IN A   127.0.0.1
@       IN MX  10 mail
mail    IN NS  linkp1
mail    IN NS  linkp2
linkp1  IN A   127.0.0.2
linkp2  IN A   127.0.0.3
"""


def test_a_referral_is_followed_to_the_delegated_servers() -> None:
    with DnsServer(PARENT) as parent, DnsServer(host="127.0.0.2") as child:
        child.set_records(records={"mail.nix.co.jj": ["A 198.51.100.25"], "www.mail.nix.co.jj": ["CNAME mail.nix.co.jj."]})
        # The parent's own answer is a referral: not authoritative, NS and glue.
        reply = parent.resolver().resolve("mail.nix.co.jj.", "A", raise_on_no_answer=False).response
        assert not reply.answer and {r.to_text() for r in reply.authority[0]} == {"linkp1.nix.co.jj.", "linkp2.nix.co.jj."}
        src = ResolverSource([(parent.host, parent.port)], timeout=0.5, nameserver_port=child.port)
        ans = src.lookup("mail.nix.co.jj", "A")
        assert ans.status is Status.OK and ans.addresses() == ["198.51.100.25"]
        assert ans.server == "linkp1.nix.co.jj [127.0.0.2]"
        assert src.lookup("www.mail.nix.co.jj", "A").addresses() == ["198.51.100.25"]
        assert src.lookup("nope.mail.nix.co.jj", "A").status is Status.NXDOMAIN
        assert src.lookup("mail.nix.co.jj", "AAAA").status is Status.NODATA
        report = check_domain(src, Target("nix.co.jj"))
        assert report.findings[0].seen == "MX 10 mail.nix.co.jj -> 198.51.100.25 (from its own name server " \
            "linkp1.nix.co.jj [127.0.0.2])"


def test_delegated_servers_that_do_not_answer_are_not_checked_never_an_error() -> None:
    with DnsServer(PARENT) as parent, DnsServer(host="127.0.0.2") as dead:
        dead.drop("mail.nix.co.jj")  # linkp1 holds the query; linkp2 (127.0.0.3) has nothing listening
        src = ResolverSource([(parent.host, parent.port)], timeout=0.3, nameserver_port=dead.port)
        ans = src.lookup("mail.nix.co.jj", "A")
        assert ans.status is Status.DELEGATED and ans.delegated_to == ("linkp1", "linkp2")
        assert "linkp1.nix.co.jj [127.0.0.2]: no answer" in ans.error
        assert "linkp2.nix.co.jj [127.0.0.3]: no answer" in ans.error
        report = check_domain(src, Target("nix.co.jj", helo="mail.nix.co.jj"))
        mx = [f for f in report.findings if f.check == "mx"]
        assert [(f.severity, f.seen) for f in mx] == [
            (Severity.WARNING, "MX 10 mail.nix.co.jj delegated to linkp1, linkp2: not checked")]
        helo = [f for f in report.findings if f.check == "helo"]
        assert helo[0].severity is Severity.WARNING and "delegated to linkp1, linkp2: not checked" in helo[0].seen
