"""Parsing of the records the DNS check reads: SPF (RFC 7208) and the tag=value records
DMARC (RFC 7489), DKIM (RFC 6376), MTA-STS (RFC 8461), TLS-RPT (RFC 8460)."""

from __future__ import annotations

import pytest

from kanmon.dnscheck.spfrecord import SpfSyntaxError, is_spf, parse_spf
from kanmon.dnscheck.tagrecords import (
    TagRecordError,
    parse_dkim_key,
    parse_dmarc,
    parse_mta_sts,
    parse_tags,
    parse_tls_rpt,
)


def test_spf_terms() -> None:
    rec = parse_spf("v=spf1 +a mx:example.test/24//64 -ip4:192.0.2.0/24 ip6:2001:db8::/32 include:_spf.x.test "
                    "exists:%{i}.x.test ~all exp=explain.x.test")
    assert [(t.qualifier, t.name, t.target) for t in rec.terms] == [
        ("+", "a", ""), ("", "mx", "example.test"), ("-", "ip4", "192.0.2.0/24"), ("", "ip6", "2001:db8::/32"),
        ("", "include", "_spf.x.test"), ("", "exists", "%{i}.x.test"), ("~", "all", ""), ("", "exp", "explain.x.test"),
    ]
    assert [t.queries_dns for t in rec.terms] == [True, True, False, False, True, True, False, False]
    assert parse_spf("v=spf1 redirect=_spf.x.test").modifier("redirect").queries_dns  # type: ignore[union-attr]
    assert parse_spf("v=spf1 a/24 mx//64").terms[0].target == ""


@pytest.mark.parametrize(("text", "message"), [
    ("v=spf2 -all", "does not start with v=spf1"),
    ("v=spf1 foo -all", "unknown mechanism 'foo'"),
    ("v=spf1 ip4:192.0.2.300 -all", "'ip4:192.0.2.300': '192.0.2.300' is not an IPv4 network"),
    ("v=spf1 ip4:2001:db8::1 -all", "is not an IPv4 network"),
    ("v=spf1 ip6 -all", "ip6 needs a network"),
    ("v=spf1 include: -all", "include needs a domain"),
    ("v=spf1 redirect=a.test redirect=b.test", "redirect= appears twice"),
    ("v=spf1 a/33", "prefix length out of range"),
    ("v=spf1 all:x", "all takes no argument"),
])
def test_spf_syntax_errors(text: str, message: str) -> None:
    with pytest.raises(SpfSyntaxError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_spf(text)


def test_is_spf() -> None:
    assert is_spf("v=spf1") and is_spf("V=SPF1 -all")
    assert not is_spf("v=spf10 -all") and not is_spf("google-site-verification=x")


def test_tags() -> None:
    assert parse_tags(" v = DMARC1 ;p=reject; ") == [("v", "DMARC1"), ("p", "reject")]
    with pytest.raises(TagRecordError, match="appears twice"):
        parse_tags("v=DMARC1; p=none; p=reject")
    with pytest.raises(TagRecordError, match="is not tag=value"):
        parse_tags("v=DMARC1; reject")


def test_dmarc() -> None:
    rec = parse_dmarc("v=DMARC1; p=quarantine; sp=reject; pct=50; rua=mailto:a@x.test,mailto:b@x.test; aspf=s")
    assert (rec.policy, rec.subdomain_policy, rec.pct, rec.aspf) == ("quarantine", "reject", 50, "s")
    assert rec.summary() == "p=quarantine, sp=reject, pct=50, adkim=r aspf=s, reports to mailto:a@x.test, mailto:b@x.test"
    for text, message in [
        ("p=reject; v=DMARC1", "does not start with v=DMARC1"),
        ("v=DMARC1; rua=mailto:a@x.test", "p= is missing"),
        ("v=DMARC1; p=block", "p=block is not none, quarantine or reject"),
        ("v=DMARC1; p=none; pct=150", "pct=150 is not 0..100"),
        ("v=DMARC1; p=none; rua=a@x.test", "is not a URI"),
    ]:
        with pytest.raises(TagRecordError, match=message):
            parse_dmarc(text)


def test_dkim_key() -> None:
    rec = parse_dkim_key("v=DKIM1; k=rsa; t=y; p=AAEC AwQ=")
    assert (rec.key_type, rec.public_key, rec.testing) == ("rsa", b"\x00\x01\x02\x03\x04", True)
    assert parse_dkim_key("p=").public_key == b""  # revoked
    for text, message in [
        ("k=rsa", "p= .* is missing"),
        ("v=DKIM2; p=AA==", "does not start with v=DKIM1"),
        ("k=dsa; p=AA==", "k=dsa is not a key type"),
        ("p=!!!", "p= is not base64"),
    ]:
        with pytest.raises(TagRecordError, match=message):
            parse_dkim_key(text)


def test_mta_sts_and_tls_rpt() -> None:
    assert parse_mta_sts("v=STSv1; id=20261128T1;").policy_id == "20261128T1"
    with pytest.raises(TagRecordError, match="id= is missing"):
        parse_mta_sts("v=STSv1;")
    with pytest.raises(TagRecordError, match="is not 1-32 letters and digits"):
        parse_mta_sts("v=STSv1; id=" + "a" * 33)
    assert parse_tls_rpt("v=TLSRPTv1; rua=mailto:t@x.test,https://r.x.test/v1").rua == (
        "mailto:t@x.test", "https://r.x.test/v1")
    with pytest.raises(TagRecordError, match="rua= .* is missing"):
        parse_tls_rpt("v=TLSRPTv1")
    with pytest.raises(TagRecordError, match="neither mailto: nor https:"):
        parse_tls_rpt("v=TLSRPTv1; rua=http://r.x.test")
