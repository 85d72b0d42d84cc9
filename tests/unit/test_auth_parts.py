"""The pure parts of sender authentication: DMARC records and alignment, the From header,
Authentication-Results formatting and the removal of forged ones, header value escaping."""

from __future__ import annotations

import pytest

from kanmon.auth.authres import authentication_results, authserv_id_of, strip_forged
from kanmon.auth.dkim import DkimSignatureResult, key_names
from kanmon.auth.dmarc import aligned, evaluate_dmarc, from_header, organizational_domain, parse_record
from kanmon.auth.spf import SpfOutcome, SpfResult
from kanmon.auth.values import comment, value
from kanmon.content.decode import prefix_subject as _tag_subject


@pytest.mark.parametrize("domain, org", [
    ("mail.example.test", "example.test"), ("a.b.example.co.uk", "example.co.uk"), ("example.com", "example.com"),
])
def test_organizational_domain_from_the_bundled_public_suffix_list(domain, org):
    assert organizational_domain(domain) == org


def test_alignment_relaxed_and_strict():
    assert aligned("news.example.com", "example.com", "r")
    assert not aligned("news.example.com", "example.com", "s")
    assert aligned("Example.COM.", "example.com", "s")
    assert not aligned("example.co.uk", "other.co.uk", "r")


@pytest.mark.parametrize("text, p, sp, pct", [
    (b"v=DMARC1; p=reject", "reject", "reject", 100),
    (b"v=DMARC1;p=none;sp=quarantine;pct=20", "none", "quarantine", 20),
    (b"v=DMARC1; p=bogus; rua=mailto:d@example.com", "none", "none", 100),  # RFC 7489 6.6.3
    (b"v=DMARC1; p=reject; pct=500", "reject", "reject", 100),
])
def test_dmarc_record(text, p, sp, pct):
    r = parse_record(text, "example.com")
    assert (r.p, r.sp, r.pct) == (p, sp, pct)


@pytest.mark.parametrize("text", [b"v=DMARC1; p=bogus", b"p=reject; v=DMARC1", b"v=spf1 -all", b"v=DMARC1; \xff"])
def test_invalid_dmarc_records(text):
    assert parse_record(text, "example.com") is None


def test_from_header_counts_fields_and_addresses():
    assert from_header(b"From: A <a@Example.COM>\r\nTo: b@x.test\r\n").domain == "example.com"
    two = from_header(b"From: a@example.com\r\nFrom: b@example.org\r\n")
    assert two.fields == 2 and two.domain == ""
    assert from_header(b"From: a@example.com, b@example.org\r\n").domains == ("example.com", "example.org")
    assert from_header(b"From:\r\n\t<a@folded.example>\r\n").domain == "folded.example"
    assert from_header(b"Subject: none\r\n").domain == ""


def test_evaluate_dmarc_without_results_fails_with_the_published_policy():
    rec = parse_record(b"v=DMARC1; p=quarantine", "example.com")
    r = evaluate_dmarc("example.com", rec, None, [], 0.0)
    assert (r.result, r.policy) == ("fail", "quarantine")
    ok = DkimSignatureResult("pass", "example.com", "s", "rsa-sha256")
    assert evaluate_dmarc("example.com", rec, None, [ok], 0.0).result == "pass"
    assert evaluate_dmarc("example.com", None, None, [], 0.0).result == "none"


@pytest.mark.parametrize("field, ours", [
    ("mx.example.test; spf=pass", True),
    (" (forged) MX.EXAMPLE.TEST ; dkim=pass", True),
    ('"mx.example.test"; dmarc=pass', True),
    ("mx.example.test.evil; dkim=pass", False),
    ("other.example; dkim=pass header.d=mx.example.test", False),
])
def test_authserv_id_of(field, ours):
    assert (authserv_id_of(field) == "mx.example.test") is ours


def test_strip_forged_keeps_other_fields_and_folding():
    header = (b"Received: from x\r\n"
              b"Authentication-Results: mx.example.test;\r\n\tdkim=pass\r\n"
              b"Authentication-Results: other.example;\r\n dkim=fail\r\n"
              b"Subject: s\r\n")
    out, n = strip_forged(header, "mx.example.test")
    assert n == 1
    assert out == b"Received: from x\r\nAuthentication-Results: other.example;\r\n dkim=fail\r\nSubject: s\r\n"


def test_values_from_the_network_cannot_break_the_header():
    assert value("example.com") == "example.com"
    assert value('a"b\r\nInjected: x') == '"a\\"b Injected: x"'
    assert "\n" not in comment("x)\r\n(y") and ")" not in comment("x)")
    sig = DkimSignatureResult("fail", 'evil.test"\r\nBcc: x', "s;el", "rsa-sha256", "bad (reason)\r\n")
    text = authentication_results("mx.example.test", dkim=[sig])
    assert "\r" not in text and "\n" not in text
    assert text == 'mx.example.test; dkim=fail (bad [reason]) header.d="evil.test\\" Bcc: x" header.s="s;el" header.a=rsa-sha256'


def test_key_names_only_well_formed_names():
    header = (b"DKIM-Signature: v=1; a=rsa-sha256; d=Example.COM; s=sel;\r\n bh=x; b=y; h=from\r\n"
              b"DKIM-Signature: v=1; d=bad domain; s=x; b=y\r\n"
              b"ARC-Seal: i=1; a=rsa-sha256; cv=none; d=fwd.example; s=arc; b=z\r\n")
    assert key_names(header) == ["sel._domainkey.example.com", "arc._domainkey.fwd.example"]


def test_tag_subject():
    assert _tag_subject(b"From: a\r\nSubject: hi\r\n", "[SUSPECT]") == b"From: a\r\nSubject: [SUSPECT] hi\r\n"
    assert _tag_subject(b"Subject: [SUSPECT] hi\r\n", "[SUSPECT]") == b"Subject: [SUSPECT] hi\r\n"
    assert _tag_subject(b"From: a\r\n", "[SUSPECT]") == b"From: a\r\nSubject: [SUSPECT]\r\n"


def test_spf_results_without_an_explanation_say_what_they_mean():
    r = SpfResult(SpfOutcome("pass", "mailfrom", "sender.example", "sender SPF authorized"),
                  SpfOutcome("none", "helo", "mail.sender.example", ""), "a@sender.example", "mail.sender.example", "192.0.2.1")
    text = authentication_results("mx.example.test", spf=r)
    assert text == ("mx.example.test; spf=pass (sender SPF authorized) smtp.mailfrom=a@sender.example; "
                    "spf=none (no SPF record) smtp.helo=mail.sender.example")
