"""The rarer findings, checked function by function against zone files (ZoneSource):
SPF ?all and ptr, duplicate MX hosts, DMARC duplicates, DKIM revoked / testing /
ed25519 / bare RSAPublicKey, IPv6 reverse DNS, several PTRs."""

from __future__ import annotations

import base64
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from kanmon.dnscheck.checks import (
    Severity,
    check_dkim,
    check_dmarc,
    check_mx,
    check_reverse,
    check_spf,
    dkim_public_key_from_pem,
)
from kanmon.dnscheck.sources import ZoneSource

HEAD = "$ORIGIN example.test.\n$TTL 300\n@ IN SOA ns1 hostmaster 1 3600 600 86400 300\nmx1 IN A 192.0.2.1\n"


def source(tmp_path: Path, body: str, *more: tuple[str, str]) -> ZoneSource:
    (tmp_path / "fwd.zone").write_text(HEAD + body)
    paths = [tmp_path / "fwd.zone"]
    for name, text in more:
        (tmp_path / name).write_text(text)
        paths.append(tmp_path / name)
    return ZoneSource(paths)


def seen(findings: list) -> list[tuple[str, str]]:  # type: ignore[type-arg]
    return [(f.severity.label, f.seen) for f in findings]


def test_spf_neutral_all_and_ptr(tmp_path: Path) -> None:
    src = source(tmp_path, '@ IN TXT "v=spf1 ip4:192.0.2.1 ptr ?all"\n')
    out = seen(check_spf(src, "example.test", ["192.0.2.1"], "mx1.example.test"))
    assert ("warning", "SPF ends in ?all (neutral)") in out
    assert ("warning", "SPF uses the ptr mechanism") in out
    assert ("ok", "SPF of example.test authorizes 192.0.2.1 (pass)") in out


def test_spf_include_outside_zone_files_is_not_followed(tmp_path: Path) -> None:
    src = source(tmp_path, '@ IN TXT "v=spf1 include:_spf.example.org -all"\n')
    findings = check_spf(src, "example.test", ["192.0.2.1"], None)
    assert seen(findings)[0] == ("ok", "SPF record 'v=spf1 include:_spf.example.org -all', 1 of 10 DNS-querying terms "
                                       "(not followed: include:_spf.example.org (_spf.example.org is in none of the "
                                       "given zone files))")
    assert findings[1].severity is Severity.WARNING
    assert findings[1].seen.startswith("SPF of example.test for 192.0.2.1 could not be evaluated")


def test_duplicate_mx_host(tmp_path: Path) -> None:
    src = source(tmp_path, "@ IN MX 10 mx1\n@ IN MX 20 mx1\n")
    assert seen(check_mx(src, "example.test")) == [
        ("ok", "MX 10 mx1.example.test -> 192.0.2.1"),
        ("warning", "mx1.example.test is listed twice (preferences 10 and 20)"),
    ]


def test_two_dmarc_records(tmp_path: Path) -> None:
    src = source(tmp_path, '_dmarc IN TXT "v=DMARC1; p=none"\n_dmarc IN TXT "v=DMARC1; p=reject"\n')
    assert seen(check_dmarc(src, "example.test")) == [("error", "2 DMARC records")]


def _p(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_dkim_variants(tmp_path: Path) -> None:
    ed = ed25519.Ed25519PrivateKey.generate()
    ed_pem = ed.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    ours = dkim_public_key_from_pem(ed_pem)
    assert ours[0] == "ed25519" and len(ours[1]) == 32
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    pkcs1 = rsa_key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)
    rsa_pem = rsa_key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    src = source(tmp_path, (
        f'ed._domainkey IN TXT "v=DKIM1; k=ed25519; p={_p(ours[1])}"\n'
        f'bare._domainkey IN TXT "k=rsa; p={_p(pkcs1)}"\n'
        'gone._domainkey IN TXT "v=DKIM1; p="\n'
        f'test._domainkey IN TXT "v=DKIM1; t=y; p={_p(ours[1])}"\n'
    ))
    assert seen(check_dkim(src, "example.test", "ed", ours)) == [("ok", "DKIM ed25519 key published and matches ours")]
    # RFC 6376 wants SubjectPublicKeyInfo, but a bare RSAPublicKey is the same key
    assert seen(check_dkim(src, "example.test", "bare", dkim_public_key_from_pem(rsa_pem))) == [
        ("ok", "DKIM rsa key published and matches ours")]
    assert seen(check_dkim(src, "example.test", "bare", ours)) == [
        ("error", "the rsa key in DNS is not our DKIM key (dkim_key)")]
    assert seen(check_dkim(src, "example.test", "gone", None)) == [("error", "DKIM key is revoked (empty p=)")]
    assert seen(check_dkim(src, "example.test", "test", None)) == [
        ("warning", "DKIM rsa key published (no key of ours given to compare); t=y (testing)")]


def test_ipv6_reverse_and_several_ptrs(tmp_path: Path) -> None:
    rev6 = (
        "$ORIGIN 8.b.d.0.1.0.0.2.ip6.arpa.\n$TTL 300\n@ IN SOA ns1.example.test. h.example.test. 1 3600 600 86400 300\n"
        "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0 IN PTR mx1.example.test.\n"
    )
    rev4 = (
        "$ORIGIN 2.0.192.in-addr.arpa.\n$TTL 300\n@ IN SOA ns1.example.test. h.example.test. 1 3600 600 86400 300\n"
        "1 IN PTR mx1.example.test.\n1 IN PTR www.example.test.\n"
    )
    src = source(tmp_path, "mx1 IN AAAA 2001:db8::1\nwww IN A 192.0.2.80\n", ("rev6.zone", rev6), ("rev4.zone", rev4))
    assert seen(check_reverse(src, ["2001:db8::1"])) == [
        ("ok", "PTR mx1.example.test"),
        ("ok", "PTR mx1.example.test has AAAA 2001:db8::1 (forward-confirmed)"),
    ]
    assert seen(check_reverse(src, ["192.0.2.1"])) == [
        ("warning", "2 PTR records: mx1.example.test, www.example.test"),
        ("ok", "PTR mx1.example.test has A 192.0.2.1 (forward-confirmed)"),
        ("error", "PTR names www.example.test, but www.example.test has A 192.0.2.80, not 192.0.2.1"),
    ]


def test_null_mx_with_nonzero_preference(tmp_path: Path) -> None:
    src = source(tmp_path, "@ IN MX 10 .\n")
    assert seen(check_mx(src, "example.test")) == [("warning", "null MX written as MX 10 . (RFC 7505 says MX 0 .)")]
