"""Sender authentication (SPF, DKIM, DMARC, ARC) through the check pipeline, against the
loopback DNS server, with messages signed by dkimpy as an independent signer.

The checks are driven stage by stage (MAIL, then DATA) as the listener drives them;
tests/integration/test_auth_smtp.py does the same over SMTP sockets."""

from __future__ import annotations

import asyncio

import pytest

from kanmon.config import parse_config
from kanmon.model import ClientInfo, Envelope
from kanmon.policy.access import RelayAccess
from kanmon.policy.authcheck import AuthVerified, DkimCheck, DmarcCheck, SpfCheck
from kanmon.policy.dns import CheckResolver
from kanmon.policy.pipeline import Context, Decision, Outcome, Pending, Pipeline, Stage
from kanmon.smtp.address import parse_path
from tests.support.dkimkeys import arc_seal, ed25519_key, rsa_key, sign
from tests.support.dnsserver import DnsServer, txt

CLIENT_IP = "192.0.2.10"
HELO = "client.sender.test"

CONFIG = """
[server]
hostname = "mx.example.test"
data_dir = "{data_dir}"
[smtp]
relay_networks = ["127.0.0.1/32"]
[dns]
servers = ["{dns}"]
timeout = "1s"
[[domain]]
name = "example.test"
mailboxes = ["alice"]
[[session_profile]]
name = "default"
spf = "{spf}"
dkim = "{dkim}"
dmarc = "{dmarc}"
arc_trusted = ["forwarder.test"]
"""


@pytest.fixture(scope="module")
def keys():
    return {"rsa": rsa_key(), "ed": ed25519_key(), "fwd": rsa_key(), "other": rsa_key()}


def records(keys) -> dict[str, list[str]]:
    many = {f"i{n}.many.test": ['TXT "v=spf1 -all"'] for n in range(1, 12)}
    return {
        # SPF
        "sender.test": ['TXT "v=spf1 ip4:192.0.2.10 -all"'],
        "client.sender.test": ['TXT "v=spf1 a -all"', f"A {CLIENT_IP}"],
        "soft.test": ['TXT "v=spf1 ~all"'],
        "fail.test": ['TXT "v=spf1 ip4:198.51.100.1 -all"'],
        "perm.test": ['TXT "v=spf1 bogus:mechanism -all"'],
        "void.test": ['TXT "v=spf1 a:n1.void.test a:n2.void.test a:n3.void.test -all"'],
        "many.test": ["TXT " + txt("v=spf1 " + " ".join(f"include:i{n}.many.test" for n in range(1, 12))
                                   + " ip4:192.0.2.10 -all")],
        "ten.test": ["TXT " + txt("v=spf1 " + " ".join(f"include:i{n}.many.test" for n in range(1, 10))
                                  + " ip4:192.0.2.10 -all")],
        **many,
        # DKIM keys
        "sel._domainkey.sender.test": [keys["rsa"].record()],
        "ed._domainkey.sender.test": [keys["ed"].record()],
        "revoked._domainkey.sender.test": ['TXT "v=DKIM1; k=rsa; p="'],
        "sel._domainkey.fwd.forwarder.test": [keys["fwd"].record()],
        "arc._domainkey.forwarder.test": [keys["fwd"].record()],
        "arc._domainkey.untrusted.test": [keys["other"].record()],
        "sel._domainkey.thirdparty.test": [keys["other"].record()],
        # DMARC
        "_dmarc.sender.test": ['TXT "v=DMARC1; p=reject"'],
        "_dmarc.strict.test": ['TXT "v=DMARC1; p=reject; adkim=s; aspf=s"'],
        "strict.test": ['TXT "v=spf1 ip4:192.0.2.10 -all"'],
        "_dmarc.quar.test": ['TXT "v=DMARC1; p=quarantine"'],
        "_dmarc.none.test": ['TXT "v=DMARC1; p=none"'],
        "_dmarc.parent.test": ['TXT "v=DMARC1; p=none; sp=reject"'],
        "_dmarc.half.test": ['TXT "v=DMARC1; p=reject; pct=50"'],
    }


@pytest.fixture(scope="module")
def dns(keys):
    with DnsServer(records=records(keys)) as srv:
        yield srv


def make_pipeline(tmp_path, dns, *, spf="none", dkim="none", dmarc="honor", sample=0.0):
    cfg = parse_config(CONFIG.format(data_dir=tmp_path / "data", dns=dns.address, spf=spf, dkim=dkim, dmarc=dmarc))
    resolver = CheckResolver.from_config(cfg)
    access = RelayAccess(cfg)
    checks = [SpfCheck(cfg, resolver, access), DkimCheck(cfg, resolver, access),
              DmarcCheck(cfg, resolver, access, rng=lambda: sample)]
    return Pipeline(checks)


async def _answer(d: Decision | Pending) -> Decision:
    return await d.resolve() if isinstance(d, Pending) else d


def deliver(pipeline: Pipeline, sender: str, message: bytes, *, ip=CLIENT_IP, helo=HELO) -> tuple[Decision, Decision | None]:
    """MAIL then DATA; the DATA decision is None when MAIL was refused."""

    async def run():
        client = ClientInfo(ip=ip, helo=helo)
        env = Envelope(mail_from=sender, rcpts=["alice@example.test"], client=client)
        path = parse_path(f"<{sender}>", is_sender=True, smtputf8_allowed=False)
        mail = await _answer(pipeline.run(Stage.MAIL, Context(client, env, sender=path)))
        if not mail.accepted:
            return mail, None
        content = message.replace(b"\n", b"\r\n") if b"\r\n" not in message else message
        data = await _answer(pipeline.run(Stage.DATA, Context(client, env, content=content, header_end=content.find(b"\r\n\r\n"))))
        return mail, data

    return asyncio.run(run())


def msg(frm="a@sender.test", subject="hello", body="Hello.\r\nA second line.\r\n", extra=b"") -> bytes:
    return extra + (f"From: <{frm}>\r\nTo: <alice@example.test>\r\nSubject: {subject}\r\n"
                    f"Message-ID: <1@sender.test>\r\nDate: Mon, 30 Nov 2026 10:00:00 +0000\r\n\r\n{body}").encode()


def ar(d: Decision) -> str:
    values = [v for n, v in d.headers if n == "Authentication-Results"]
    assert len(values) == 1
    return values[0]


def spf_header(d: Decision) -> str:
    return [v for n, v in d.headers if n == "Received-SPF"][0]


# -- SPF ------------------------------------------------------------------------------------


@pytest.mark.parametrize("sender, result", [
    ("a@sender.test", "pass"), ("a@fail.test", "fail"), ("a@soft.test", "softfail"),
    ("a@perm.test", "permerror"), ("a@unknown-domain.test", "none"),
])
def test_spf_results_are_in_received_spf_and_authentication_results(tmp_path, dns, sender, result):
    p = make_pipeline(tmp_path, dns, spf="none", dmarc="off")
    mail, data = deliver(p, sender, msg(frm=sender))
    assert mail.accepted and data.accepted
    assert spf_header(mail).startswith(f"{result} (mx.example.test")
    assert f"client-ip={CLIENT_IP}; envelope-from={sender}; helo={HELO}; receiver=mx.example.test; identity=mailfrom" in spf_header(mail)
    assert ar(data).startswith(f"mx.example.test; spf={result} (")
    assert f"smtp.mailfrom={sender}" in ar(data)
    assert f"spf=pass (" in ar(data).split(f"smtp.mailfrom={sender};")[1]  # the HELO identity passes: a -all
    assert f"smtp.helo={HELO}" in ar(data)


def test_spf_reject_refuses_a_fail_at_mail_with_5_7_23(tmp_path, dns):
    p = make_pipeline(tmp_path, dns, spf="reject", dmarc="off")
    mail, data = deliver(p, "a@fail.test", msg(frm="a@fail.test"))
    assert mail.outcome is Outcome.REJECT and data is None
    assert (mail.reply.code, mail.reply.enhanced) == (550, "5.7.23")
    assert mail.check == "spf" and mail.classification == "Spoofing"
    assert "fail.test does not allow 192.0.2.10" in mail.reply.text


def test_spf_softfail_is_tagged_not_rejected(tmp_path, dns):
    p = make_pipeline(tmp_path, dns, spf="reject", dmarc="off")
    mail, data = deliver(p, "a@soft.test", msg(frm="a@soft.test"))
    assert mail.accepted and data.accepted
    assert data.content is not None and b"\r\nSubject: [SUSPECT] hello\r\n" in data.content
    assert data.classification == "Spoofing"
    effect = [e for e in data.effects if isinstance(e, AuthVerified)][0]
    assert (effect.spf, effect.action) == ("softfail", "tag")


def test_spf_quarantine_holds_the_message(tmp_path, dns):
    p = make_pipeline(tmp_path, dns, spf="quarantine", dmarc="off")
    mail, data = deliver(p, "a@fail.test", msg(frm="a@fail.test"))
    assert mail.accepted and mail.quarantine == "SPF fail for fail.test"


def test_spf_temperror_is_451_never_a_pass(tmp_path, dns):
    dns.servfail("tempfail.test")
    try:
        p = make_pipeline(tmp_path, dns, spf="tag", dmarc="off")
        mail, _ = deliver(p, "a@tempfail.test", msg(frm="a@tempfail.test"))
        assert mail.outcome is Outcome.TEMPFAIL and (mail.reply.code, mail.reply.enhanced) == (451, "4.7.24")
        # with the header-only action the result is written down, not acted on
        p = make_pipeline(tmp_path, dns, spf="none", dmarc="off")
        mail, data = deliver(p, "a@tempfail.test", msg(frm="a@tempfail.test"))
        assert spf_header(mail).startswith("temperror") and "spf=temperror" in ar(data)
    finally:
        dns.clear_faults()


def test_spf_ten_lookup_limit(tmp_path, dns):
    p = make_pipeline(tmp_path, dns, spf="none", dmarc="off")
    mail, _ = deliver(p, "a@many.test", msg(frm="a@many.test"))  # 11 includes
    assert spf_header(mail).startswith("permerror")
    assert "Too many DNS lookups" in spf_header(mail)
    mail, _ = deliver(p, "a@ten.test", msg(frm="a@ten.test"))  # 9 includes: within the limit
    assert spf_header(mail).startswith("pass")


def test_spf_void_lookup_limit(tmp_path, dns):
    p = make_pipeline(tmp_path, dns, spf="none", dmarc="off")
    mail, _ = deliver(p, "a@void.test", msg(frm="a@void.test"))
    assert spf_header(mail).startswith("permerror") and "Void lookup limit" in spf_header(mail)


def test_relay_clients_and_authenticated_users_are_not_checked(tmp_path, dns):
    p = make_pipeline(tmp_path, dns, spf="reject", dkim="reject", dmarc="honor")
    mail, data = deliver(p, "a@fail.test", msg(frm="a@sender.test"), ip="127.0.0.1")
    assert mail.accepted and data.accepted and not mail.headers and not data.headers


# -- DKIM -----------------------------------------------------------------------------------


def dkim_parts(d: Decision) -> list[str]:
    return [p.strip() for p in ar(d).split(";") if p.strip().startswith("dkim=")]


def test_dkim_pass_rsa_and_ed25519(tmp_path, dns, keys):
    p = make_pipeline(tmp_path, dns, dkim="reject", dmarc="off")
    m = sign(msg(), keys["rsa"], "sender.test", "sel")
    m = sign(m, keys["ed"], "sender.test", "ed")
    _, data = deliver(p, "a@sender.test", m)
    assert data.accepted
    parts = dkim_parts(data)
    assert parts[0].startswith("dkim=pass header.d=sender.test header.s=ed header.a=ed25519-sha256 header.b=")
    assert parts[1].startswith("dkim=pass header.d=sender.test header.s=sel header.a=rsa-sha256 header.b=")


@pytest.mark.parametrize("change, reason", [
    (lambda m: m.replace(b"A second line.", b"A changed line."), "dkim=fail (body hash did not verify)"),
    (lambda m: m.replace(b"Subject: hello", b"Subject: HELLO, changed"), "dkim=fail (signature did not verify)"),
])
def test_dkim_altered_body_or_header_fails(tmp_path, dns, keys, change, reason):
    p = make_pipeline(tmp_path, dns, dkim="none", dmarc="off")
    _, data = deliver(p, "a@sender.test", change(sign(msg(), keys["rsa"], "sender.test", "sel")))
    assert dkim_parts(data)[0].startswith(reason + " header.d=sender.test header.s=sel")


@pytest.mark.parametrize("selector, reason", [("missing", "no key"), ("revoked", "key revoked")])
def test_dkim_missing_or_revoked_key(tmp_path, dns, keys, selector, reason):
    p = make_pipeline(tmp_path, dns, dkim="reject", dmarc="off")
    _, data = deliver(p, "a@sender.test", sign(msg(), keys["rsa"], "sender.test", selector))
    assert data.outcome is Outcome.REJECT and (data.reply.code, data.reply.enhanced) == (550, "5.7.20")
    assert data.check == "dkim"
    p = make_pipeline(tmp_path, dns, dkim="none", dmarc="off")
    _, data = deliver(p, "a@sender.test", sign(msg(), keys["rsa"], "sender.test", selector))
    assert dkim_parts(data)[0].startswith(f"dkim=permerror ({reason}) header.d=sender.test header.s={selector}")


def test_dkim_body_length_limit_is_reported(tmp_path, dns, keys):
    p = make_pipeline(tmp_path, dns, dkim="none", dmarc="off")
    signed = sign(msg(), keys["rsa"], "sender.test", "sel", length=True)
    _, data = deliver(p, "a@sender.test", signed + b"Appended by a list.\r\n")
    assert dkim_parts(data)[0].startswith("dkim=pass (body length limit l=")
    assert ", 21 octets not signed)" in dkim_parts(data)[0]


def test_dkim_quarantine_and_tag(tmp_path, dns, keys):
    broken = sign(msg(), keys["rsa"], "sender.test", "sel").replace(b"A second", b"A third")
    _, data = deliver(make_pipeline(tmp_path, dns, dkim="quarantine", dmarc="off"), "a@sender.test", broken)
    assert data.accepted and data.quarantine == "DKIM fail for sender.test"
    _, data = deliver(make_pipeline(tmp_path, dns, dkim="tag", dmarc="off"), "a@sender.test", broken)
    assert data.accepted and b"Subject: [SUSPECT] hello" in data.content


def test_dkim_key_temperror_is_451(tmp_path, dns, keys):
    dns.servfail("sel._domainkey.sender.test")
    try:
        p = make_pipeline(tmp_path, dns, dkim="tag", dmarc="off")
        _, data = deliver(p, "a@sender.test", sign(msg(), keys["rsa"], "sender.test", "sel"))
        assert data.outcome is Outcome.TEMPFAIL and (data.reply.code, data.reply.enhanced) == (451, "4.7.5")
    finally:
        dns.clear_faults()


def test_unsigned_mail_says_dkim_none(tmp_path, dns):
    _, data = deliver(make_pipeline(tmp_path, dns, dkim="reject", dmarc="off"), "a@sender.test", msg())
    assert data.accepted and "dkim=none (no signatures)" in ar(data)


# -- DMARC ----------------------------------------------------------------------------------


def test_dmarc_pass_by_dkim_and_spf(tmp_path, dns, keys):
    p = make_pipeline(tmp_path, dns, spf="tag", dkim="none", dmarc="honor")
    _, data = deliver(p, "a@sender.test", sign(msg(), keys["rsa"], "sender.test", "sel"))
    value = ar(data)
    assert value.startswith("mx.example.test; spf=pass (")
    assert "; dkim=pass header.d=sender.test" in value
    assert "; dmarc=pass (p=reject sp=reject dis=NONE; aligned dkim sender.test) header.from=sender.test" in value


def test_dmarc_reject_names_the_policy(tmp_path, dns):
    p = make_pipeline(tmp_path, dns, dmarc="honor")
    _, data = deliver(p, "someone@elsewhere.test", msg(frm="ceo@sender.test"))
    assert data.outcome is Outcome.REJECT and (data.reply.code, data.reply.enhanced) == (550, "5.7.1")
    assert data.reply.text == "Message rejected: the DMARC policy of sender.test is reject (no aligned SPF or DKIM pass)"
    assert data.check == "dmarc" and data.classification == "Spoofing"


def test_dmarc_quarantine_holds_and_none_only_reports(tmp_path, dns):
    p = make_pipeline(tmp_path, dns, dmarc="honor")
    _, data = deliver(p, "x@elsewhere.test", msg(frm="a@quar.test"))
    assert data.accepted and data.quarantine == "DMARC policy of quar.test is quarantine"
    assert "dmarc=fail (p=quarantine sp=quarantine dis=QUARANTINE;" in ar(data)
    _, data = deliver(p, "x@elsewhere.test", msg(frm="a@none.test"))
    assert data.accepted and not data.quarantine and "dmarc=fail (p=none sp=none dis=NONE;" in ar(data)


def test_dmarc_tag_instead_of_reject(tmp_path, dns):
    p = make_pipeline(tmp_path, dns, dmarc="tag")
    _, data = deliver(p, "x@elsewhere.test", msg(frm="a@sender.test"))
    assert data.accepted and b"Subject: [SUSPECT] hello" in data.content


def test_dmarc_subdomain_policy(tmp_path, dns):
    p = make_pipeline(tmp_path, dns, dmarc="honor")
    _, data = deliver(p, "x@elsewhere.test", msg(frm="a@mail.parent.test"))  # sp=reject
    assert data.outcome is Outcome.REJECT and "policy of mail.parent.test is reject" in data.reply.text
    _, data = deliver(p, "x@elsewhere.test", msg(frm="a@parent.test"))  # p=none
    assert data.accepted


def test_dmarc_relaxed_and_strict_alignment(tmp_path, dns, keys):
    p = make_pipeline(tmp_path, dns, dmarc="honor")
    # a signature of the organizational domain aligns with a subdomain From when relaxed...
    _, data = deliver(p, "x@elsewhere.test", sign(msg(frm="a@news.sender.test"), keys["rsa"], "sender.test", "sel"))
    assert data.accepted and "dmarc=pass" in ar(data)
    # ...and not when strict (adkim=s: strict.test publishes p=reject)
    dns.add_records(records={"sel._domainkey.strict.test": [keys["rsa"].record()]})
    _, data = deliver(p, "x@elsewhere.test", sign(msg(frm="a@news.strict.test"), keys["rsa"], "strict.test", "sel"))
    assert data.outcome is Outcome.REJECT
    _, data = deliver(p, "x@elsewhere.test", sign(msg(frm="a@strict.test"), keys["rsa"], "strict.test", "sel"))
    assert data.accepted
    # SPF: the envelope domain aligns relaxed; strict needs the same name
    _, data = deliver(p, "bounce@sender.test", msg(frm="a@news.sender.test"))
    assert data.accepted and "aligned spf sender.test" in ar(data)


def test_dmarc_unaligned_third_party_signature_fails(tmp_path, dns, keys):
    p = make_pipeline(tmp_path, dns, dmarc="honor")
    _, data = deliver(p, "x@elsewhere.test", sign(msg(frm="a@sender.test"), keys["other"], "thirdparty.test", "sel"))
    assert data.outcome is Outcome.REJECT


@pytest.mark.parametrize("sample, accepted, quarantine", [(0.0, False, ""), (0.6, True, "DMARC policy of half.test is reject")])
def test_dmarc_pct_samples_the_policy(tmp_path, dns, sample, accepted, quarantine):
    # pct=50: a message drawn inside the sample gets p=reject, one outside the next milder policy
    p = make_pipeline(tmp_path, dns, dmarc="honor", sample=sample)
    _, data = deliver(p, "x@elsewhere.test", msg(frm="a@half.test"))
    assert data.accepted is accepted
    if accepted:
        assert data.quarantine == quarantine and "pct=50: sampled out" in ar(data)


def test_multiple_from_is_rejected(tmp_path, dns):
    p = make_pipeline(tmp_path, dns, dmarc="honor")
    _, data = deliver(p, "a@sender.test", msg(extra=b"From: <other@elsewhere.test>\r\n"))
    assert data.outcome is Outcome.REJECT and data.reply.text.startswith("Message rejected: several From addresses")
    _, data = deliver(p, "a@sender.test", msg(frm="a@sender.test>, <b@elsewhere.test"))
    assert data.outcome is Outcome.REJECT


def test_dmarc_policy_lookup_temperror_is_451(tmp_path, dns):
    dns.servfail("_dmarc.sender.test")
    try:
        _, data = deliver(make_pipeline(tmp_path, dns, dmarc="honor"), "x@elsewhere.test", msg(frm="a@sender.test"))
        assert data.outcome is Outcome.TEMPFAIL and (data.reply.code, data.reply.enhanced) == (451, "4.7.1")
    finally:
        dns.clear_faults()


# -- ARC ------------------------------------------------------------------------------------


def forwarded(keys, sealer: str) -> bytes:
    """A p=reject domain's signed mail, changed by a list at sealer and ARC-sealed there."""
    original = sign(msg(), keys["rsa"], "sender.test", "sel")
    changed = original.replace(b"Subject: hello", b"Subject: [list] hello")
    sealer_ar = f"Authentication-Results: {sealer}; dkim=pass header.d=sender.test; spf=pass smtp.mailfrom=sender.test\r\n".encode()
    key = keys["fwd"] if sealer == "forwarder.test" else keys["other"]
    return arc_seal(sealer_ar + changed, key, sealer, "arc", sealer)


def test_arc_from_a_trusted_sealer_overrides_a_dmarc_fail(tmp_path, dns, keys):
    p = make_pipeline(tmp_path, dns, dmarc="honor")
    _, data = deliver(p, "list-bounce@forwarder.test", forwarded(keys, "forwarder.test"))
    assert data.accepted and not data.quarantine
    value = ar(data)
    assert "dkim=fail" in value and "arc=pass (i=1; sealer forwarder.test)" in value
    assert "dmarc=fail (p=reject sp=reject dis=NONE; no aligned SPF or DKIM pass) (policy overridden: ARC chain sealed by trusted forwarder.test) header.from=sender.test" in value


def test_arc_from_an_untrusted_sealer_does_not_override(tmp_path, dns, keys):
    p = make_pipeline(tmp_path, dns, dmarc="honor")
    _, data = deliver(p, "list-bounce@untrusted.test", forwarded(keys, "untrusted.test"))
    assert data.outcome is Outcome.REJECT and data.check == "dmarc"


# -- Authentication-Results -----------------------------------------------------------------


def test_forged_authentication_results_with_our_id_are_removed(tmp_path, dns, keys):
    forged = (b"Authentication-Results: mx.example.test; spf=pass smtp.mailfrom=ceo@sender.test;\r\n"
              b"\tdkim=pass header.d=sender.test; dmarc=pass\r\n"
              b"Authentication-Results: (comment) MX.Example.Test; dmarc=pass\r\n"
              b"Authentication-Results: other.example; dkim=pass\r\n")
    p = make_pipeline(tmp_path, dns, dmarc="none")
    _, data = deliver(p, "x@elsewhere.test", msg(frm="a@none.test", extra=forged))
    assert data.accepted and data.content is not None
    assert data.content.count(b"Authentication-Results") == 1
    assert b"Authentication-Results: other.example; dkim=pass\r\n" in data.content
    assert ar(data).startswith("mx.example.test; spf=")


def test_authserv_id_setting(tmp_path, dns):
    text = CONFIG.format(data_dir=tmp_path / "d", dns=dns.address, spf="none", dkim="none", dmarc="none")
    cfg = parse_config(text.replace('hostname = "mx.example.test"', 'hostname = "mx.example.test"\nauthserv_id = "auth.example.test"'))
    resolver = CheckResolver.from_config(cfg)
    access = RelayAccess(cfg)
    p = Pipeline([SpfCheck(cfg, resolver, access), DkimCheck(cfg, resolver, access), DmarcCheck(cfg, resolver, access)])
    _, data = deliver(p, "a@sender.test", msg())
    assert ar(data).startswith("auth.example.test; spf=pass")


def test_a_warm_cache_answers_at_once(tmp_path, dns, keys):
    p = make_pipeline(tmp_path, dns, spf="tag", dkim="tag", dmarc="honor")
    m = sign(msg(), keys["rsa"], "sender.test", "sel")

    async def twice():
        out = []
        for _ in range(2):
            client = ClientInfo(ip=CLIENT_IP, helo=HELO)
            env = Envelope(mail_from="a@sender.test", client=client)
            path = parse_path("<a@sender.test>", is_sender=True, smtputf8_allowed=False)
            mail = p.run(Stage.MAIL, Context(client, env, sender=path))
            out.append(isinstance(mail, Pending))
            await _answer(mail)
            content = m
            data = p.run(Stage.DATA, Context(client, env, content=content, header_end=content.find(b"\r\n\r\n")))
            out.append(isinstance(data, Pending))
            await _answer(data)
        return out

    assert asyncio.run(twice()) == [True, True, False, False]


def test_a_header_dkimpy_cannot_parse_is_a_permerror_not_a_crash(tmp_path, dns, keys):
    p = make_pipeline(tmp_path, dns, dkim="none", dmarc="off")
    signed = sign(msg(), keys["rsa"], "sender.test", "sel")
    broken = signed.replace(b"To: <alice", b"\x01bad header line\r\nTo: <alice", 1)
    _, data = deliver(p, "a@sender.test", broken)
    assert data.accepted and "dkim=permerror (message header does not parse)" in ar(data)
