"""Outbound transport security end to end: MX hosts on 127.0.0.x with trustme
certificates (smtpsink), a loopback DNS server (dnslib, AD bit for DANE), and an HTTPS
MTA-STS policy server on loopback whose certificate comes from the same trustme CA (set
as [outbound] ca_file): nothing leaves loopback."""

from __future__ import annotations

import asyncio
import hashlib
import json
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from kanmon.clock import ManualClock
from kanmon.config import parse_config
from kanmon.deliver.mx import MxResolver
from kanmon.deliver.smtp import SmtpDelivery
from kanmon.deliver.tlspolicy import TransportSecurity
from kanmon.model import Envelope, Status
from kanmon.records.events import TlsPolicyFailed
from kanmon.records.tlsrpt import read_report
from tests.support.dnsserver import DnsServer, dns_server  # noqa: F401  (fixture)
from tests.support.smtpsink import SmtpSink, tls_server_context

MX_GOOD, MX_BAD, STS_HTTPS = "127.0.0.71", "127.0.0.72", "127.0.0.73"
SENDER = Envelope("a@corp.example")
BODY = b"From: a@corp.example\r\nTo: b@dest.example\r\nSubject: hi\r\n\r\nbody\r\n"
DOMAIN = "dest.example"
ENFORCE = "version: STSv1\r\nmode: enforce\r\nmx: mx1.dest.example\r\nmx: *.backup.dest.example\r\nmax_age: 86400\r\n"
TESTING = ENFORCE.replace("enforce", "testing")


class PolicyServer:
    """HTTPS on loopback serving /.well-known/mta-sts.txt (what the test sets)."""

    def __init__(self, host: str, ctx: ssl.SSLContext):
        self.body = ENFORCE
        self.status = 200
        self.content_type = "text/plain"
        self.requests: list[str] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                owner.requests.append(self.headers.get("Host", "") + self.path)
                data = owner.body.encode()
                self.send_response(owner.status)
                self.send_header("Content-Type", owner.content_type)
                self.send_header("Content-Length", str(len(data)))
                if owner.status in (301, 302):
                    self.send_header("Location", "https://elsewhere.example/")
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer((host, 0), Handler)
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def ca_file(ca, tmp_path):
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture
def good_mx(ca):
    with SmtpSink(MX_GOOD, ssl_context=tls_server_context(ca, "mx1.dest.example"), hostname="mx1.test") as s:
        yield s


@pytest.fixture
def bad_mx(ca, good_mx):
    # same port as good_mx (like port 25 everywhere); a certificate for another name
    with SmtpSink(MX_BAD, good_mx.port, ssl_context=tls_server_context(ca, "other.example"), hostname="bad.test") as s:
        yield s


@pytest.fixture
def policy_server(ca):
    srv = PolicyServer(STS_HTTPS, tls_server_context(ca, f"mta-sts.{DOMAIN}"))
    yield srv
    srv.close()


def make_config(port, dns: DnsServer, ca_file, *extra: str, mta_sts=True, dnssec="off"):
    lines = [
        "[server]", 'hostname = "relay.kanmon.test"',
        "[smtp]", 'listen = ["127.0.0.8:2525"]',
        "[outbound]", f"mx_port = {port}", f'ca_file = "{ca_file}"', f"mta_sts = {'true' if mta_sts else 'false'}",
        'connect_timeout = "5s"', 'command_timeout = "5s"', 'data_timeout = "5s"',
        "[dns]", f'servers = ["{dns.address}"]', 'timeout = "2s"', f'dnssec = "{dnssec}"',
        *extra,
    ]
    return parse_config("\n".join(lines))


def zone(mx_ip, *, txt_id="20260101", mx_name="mx1.dest.example"):
    records = {
        DOMAIN: [f"MX 10 {mx_name}."],
        mx_name: [f"A {mx_ip}"],
        f"mta-sts.{DOMAIN}": [f"A {STS_HTTPS}"],
    }
    if txt_id:
        records[f"_mta-sts.{DOMAIN}"] = [f'TXT "v=STSv1; id={txt_id}"']
    return records


class Log:
    def __init__(self):
        self.events = []

    def __call__(self, event, queue_id):
        self.events.append(event)

    def text(self) -> str:
        return "\n".join(str(e) for e in self.events)

    def policy_failures(self) -> list[TlsPolicyFailed]:
        return [e for e in self.events if isinstance(e, TlsPolicyFailed)]


class Harness:
    """One delivery agent with its TransportSecurity, on one event loop per call."""

    def __init__(self, config, data_dir, https_port=443):
        self.config = config
        self.data_dir = data_dir
        self.https_port = https_port
        self.clock = ManualClock(start=1_780_000_000.0)  # 2026-05-28, a fixed UTC day
        self.log = Log()

    def run(self, *domains: str):
        """Deliver one message per domain (in turn) with a fresh agent; results per domain."""

        async def go():
            resolver = MxResolver.from_config(self.config)
            security = TransportSecurity(self.config, resolver, self.log, data_dir=self.data_dir,
                                         now=self.clock.now, https_port=self.https_port)
            agent = SmtpDelivery(self.config, self.log, resolver=resolver, security=security, idle_timeout=0)
            self.security = security
            out = []
            try:
                for d in domains:
                    route = SimpleNamespace(transport="mx", domain=d, hops=(), tls=self.config.outbound.tls)
                    out.append(await agent.deliver_route("QID1", SENDER, [f"b@{d}"], BODY, route))
            finally:
                await agent.close()
            return out

        return asyncio.run(go())

    def report(self):
        return read_report(self.data_dir / "tlsrpt" / "2026-05-28.json")


# ---------------------------------------------------------------------------
# MTA-STS


def test_enforce_with_a_matching_certificate_delivers(dns_server, good_mx, policy_server, ca_file, tmp_path):
    dns_server.set_records(records=zone(MX_GOOD))
    h = Harness(make_config(good_mx.port, dns_server, ca_file), tmp_path, policy_server.port)
    [[r]] = h.run(DOMAIN)
    assert r.status is Status.SENT, r.reply
    assert r.tls.endswith("verify=OK")
    assert good_mx.wait_for_messages(1)[0].tls
    assert policy_server.requests == [f"mta-sts.{DOMAIN}/.well-known/mta-sts.txt"]
    assert h.log.policy_failures() == []
    [policy] = h.report()["policies"]
    assert policy["policy"]["policy-type"] == "sts" and policy["policy"]["policy-domain"] == DOMAIN
    assert policy["policy"]["mx-host"] == ["mx1.dest.example", "*.backup.dest.example"]
    assert policy["summary"] == {"total-successful-session-count": 1, "total-failure-session-count": 0}


def test_enforce_with_a_bad_certificate_defers(dns_server, bad_mx, policy_server, ca_file, tmp_path):
    dns_server.set_records(records=zone(MX_BAD))
    h = Harness(make_config(bad_mx.port, dns_server, ca_file), tmp_path, policy_server.port)
    [[r]] = h.run(DOMAIN)
    assert r.status is Status.DEFERRED
    assert r.reply.code == 451 and r.reply.enhanced == "4.7.5"
    assert "MTA-STS policy of dest.example (enforce)" in r.reply.text
    assert "certificate-host-mismatch" in r.reply.text
    assert bad_mx.messages == []  # nothing was sent over the unverified session
    [failure] = h.log.policy_failures()
    assert (failure.policy, failure.result, failure.enforced) == ("mta-sts", "certificate-host-mismatch", True)
    [policy] = h.report()["policies"]
    assert policy["summary"] == {"total-successful-session-count": 0, "total-failure-session-count": 1}
    [row] = policy["failure-details"]
    assert row["result-type"] == "certificate-host-mismatch"
    assert row["receiving-mx-hostname"] == "mx1.dest.example" and row["receiving-ip"] == MX_BAD
    assert row["failed-session-count"] == 1


def test_testing_mode_delivers_and_records_the_failure(dns_server, bad_mx, policy_server, ca_file, tmp_path):
    policy_server.body = TESTING
    dns_server.set_records(records=zone(MX_BAD))
    h = Harness(make_config(bad_mx.port, dns_server, ca_file), tmp_path, policy_server.port)
    [[r]] = h.run(DOMAIN)
    assert r.status is Status.SENT
    assert bad_mx.wait_for_messages(1)
    [failure] = h.log.policy_failures()
    assert (failure.result, failure.enforced) == ("certificate-host-mismatch", False)
    assert "delivered anyway" in str(failure)
    [policy] = h.report()["policies"]
    assert policy["summary"]["total-failure-session-count"] == 1
    assert "mode: testing" in policy["policy"]["policy-string"]


def test_enforce_skips_an_mx_the_policy_does_not_list(dns_server, good_mx, policy_server, ca_file, tmp_path):
    dns_server.set_records(records=zone(MX_GOOD, mx_name="mx9.elsewhere.example"))
    h = Harness(make_config(good_mx.port, dns_server, ca_file), tmp_path, policy_server.port)
    [[r]] = h.run(DOMAIN)
    assert r.status is Status.DEFERRED and r.reply.enhanced == "4.7.5"
    assert "mx9.elsewhere.example is not listed in the MTA-STS policy of dest.example" in r.reply.text
    assert good_mx.connections == 0


def test_policy_is_cached_for_max_age_and_refetched_when_the_id_changes(dns_server, good_mx, policy_server, ca_file,
                                                                        tmp_path):
    dns_server.set_records(records=zone(MX_GOOD))
    config = make_config(good_mx.port, dns_server, ca_file)
    h = Harness(config, tmp_path, policy_server.port)
    h.run(DOMAIN, DOMAIN)
    assert len(policy_server.requests) == 1  # the second delivery used the cached policy
    # A new agent (a restart): the cache file keeps the policy.
    h.run(DOMAIN)
    assert len(policy_server.requests) == 1
    cache = json.loads((tmp_path / "mta-sts" / "policies.json").read_text())
    assert cache[DOMAIN]["id"] == "20260101" and cache[DOMAIN]["mode"] == "enforce"
    assert (tmp_path / "mta-sts" / "policies.json").stat().st_mode & 0o077 == 0
    # The domain publishes a new id: fetched again at once.
    dns_server.set_records(records=zone(MX_GOOD, txt_id="20260102"))
    h.run(DOMAIN)
    assert len(policy_server.requests) == 2
    # max_age passes: fetched again even with the same id.
    h.clock.advance(86400 + 1)
    h.run(DOMAIN)
    assert len(policy_server.requests) == 3
    assert good_mx.wait_for_messages(5)


def test_malformed_policy_means_no_policy_and_is_reported(dns_server, bad_mx, policy_server, ca_file, tmp_path):
    policy_server.body = "version: STSv1\nmode: enforce\nmax_age: 86400\n"  # enforce without mx
    dns_server.set_records(records=zone(MX_BAD))
    h = Harness(make_config(bad_mx.port, dns_server, ca_file), tmp_path, policy_server.port)
    [[r]] = h.run(DOMAIN)
    assert r.status is Status.SENT  # as though the domain had no MTA-STS (RFC 8461 5.1)
    [failure] = h.log.policy_failures()
    assert failure.result == "sts-policy-invalid" and not failure.enforced
    [policy] = h.report()["policies"]
    assert [d["result-type"] for d in policy["failure-details"]] == ["sts-policy-invalid"]


@pytest.mark.parametrize("status,content_type,result", [
    (404, "text/plain", "sts-policy-fetch-error"),
    (302, "text/plain", "sts-policy-fetch-error"),  # redirects are not followed
    (200, "text/html", "sts-policy-invalid"),
])
def test_policy_fetch_failures(dns_server, good_mx, policy_server, ca_file, tmp_path, status, content_type, result):
    policy_server.status, policy_server.content_type = status, content_type
    dns_server.set_records(records=zone(MX_GOOD))
    h = Harness(make_config(good_mx.port, dns_server, ca_file), tmp_path, policy_server.port)
    [[r]] = h.run(DOMAIN)
    assert r.status is Status.SENT
    assert [f.result for f in h.log.policy_failures()] == [result]


def test_policy_host_with_an_untrusted_certificate(dns_server, good_mx, policy_server, tmp_path):
    other = trustme.CA()
    path = tmp_path / "other-ca.pem"
    other.cert_pem.write_to_path(str(path))
    dns_server.set_records(records=zone(MX_GOOD))
    h = Harness(make_config(good_mx.port, dns_server, path), tmp_path, policy_server.port)
    [[r]] = h.run(DOMAIN)
    assert r.status is Status.SENT  # no policy could be had: delivered as before
    assert [f.result for f in h.log.policy_failures()] == ["sts-webpki-invalid"]


def test_a_cached_policy_outlives_a_failed_refetch(dns_server, bad_mx, policy_server, ca_file, tmp_path):
    dns_server.set_records(records=zone(MX_BAD))
    h = Harness(make_config(bad_mx.port, dns_server, ca_file), tmp_path, policy_server.port)
    [[r]] = h.run(DOMAIN)
    assert r.status is Status.DEFERRED
    dns_server.set_records(records=zone(MX_BAD, txt_id="20260102"))
    policy_server.status = 500
    [[r]] = h.run(DOMAIN)
    assert r.status is Status.DEFERRED  # the cached enforce policy is still valid
    assert "sts-policy-fetch-error" in [f.result for f in h.log.policy_failures()]


def test_mta_sts_off_does_not_look(dns_server, bad_mx, policy_server, ca_file, tmp_path):
    dns_server.set_records(records=zone(MX_BAD))
    h = Harness(make_config(bad_mx.port, dns_server, ca_file, mta_sts=False), tmp_path, policy_server.port)
    [[r]] = h.run(DOMAIN)
    assert r.status is Status.SENT and policy_server.requests == []
    assert all(q.name != f"_mta-sts.{DOMAIN}." for q in dns_server.queries)


# ---------------------------------------------------------------------------
# The [[tls_policy]] table




def _der_and_spki(pem: bytes) -> tuple[str, str]:
    cert = x509.load_pem_x509_certificate(pem)
    der = cert.public_bytes(Encoding.DER)
    spki = cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return "sha256:" + hashlib.sha256(der).hexdigest(), "sha256:" + hashlib.sha256(spki).hexdigest()


@pytest.fixture
def pinned_mx(ca):
    leaf = ca.issue_cert("mx1.dest.example")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    leaf.configure_cert(ctx)
    with SmtpSink(MX_GOOD, ssl_context=ctx, hostname="mx1.test") as s:
        s.fingerprints = _der_and_spki(leaf.cert_chain_pems[0].bytes())
        yield s


def table(level, *fingerprints):
    fps = ", ".join(f'"{f}"' for f in fingerprints)
    return ("[[tls_policy]]", f'domain = "{DOMAIN}"', f'level = "{level}"', f"fingerprints = [{fps}]")


def test_table_verify_passes_with_a_valid_certificate(dns_server, good_mx, ca_file, tmp_path):
    dns_server.set_records(records=zone(MX_GOOD, txt_id=""))
    h = Harness(make_config(good_mx.port, dns_server, ca_file, *table("verify")), tmp_path)
    [[r]] = h.run(DOMAIN)
    assert r.status is Status.SENT and r.tls.endswith("verify=OK")


def test_table_verify_fails_with_a_certificate_for_another_name(dns_server, bad_mx, ca_file, tmp_path):
    dns_server.set_records(records=zone(MX_BAD, txt_id=""))
    h = Harness(make_config(bad_mx.port, dns_server, ca_file, *table("verify")), tmp_path)
    [[r]] = h.run(DOMAIN)
    assert r.status is Status.DEFERRED and r.reply.enhanced == "4.7.5"
    assert "tls_policy for dest.example (level verify)" in r.reply.text
    assert bad_mx.messages == []


def test_table_wins_over_mta_sts(dns_server, bad_mx, policy_server, ca_file, tmp_path):
    dns_server.set_records(records=zone(MX_BAD))  # an enforce policy is published...
    h = Harness(make_config(bad_mx.port, dns_server, ca_file, *table("opportunistic")), tmp_path, policy_server.port)
    [[r]] = h.run(DOMAIN)
    assert r.status is Status.SENT  # ...but the administrator's table says opportunistic
    assert policy_server.requests == []


def test_table_required_against_a_plaintext_server_defers(dns_server, ca_file, tmp_path):
    with SmtpSink(MX_GOOD) as plain:
        dns_server.set_records(records=zone(MX_GOOD, txt_id=""))
        h = Harness(make_config(plain.port, dns_server, ca_file, *table("required")), tmp_path)
        [[r]] = h.run(DOMAIN)
        assert r.status is Status.DEFERRED and r.reply.enhanced == "4.7.4"
        assert [f.result for f in h.log.policy_failures()] == ["starttls-not-supported"]


@pytest.mark.parametrize("which", [0, 1], ids=["certificate", "spki"])
def test_table_pin_matches(dns_server, pinned_mx, ca_file, tmp_path, which):
    dns_server.set_records(records=zone(MX_GOOD, txt_id=""))
    h = Harness(make_config(pinned_mx.port, dns_server, ca_file, *table("required", pinned_mx.fingerprints[which])),
                tmp_path)
    [[r]] = h.run(DOMAIN)
    assert r.status is Status.SENT


def test_table_pin_mismatch_defers(dns_server, pinned_mx, ca_file, tmp_path):
    dns_server.set_records(records=zone(MX_GOOD, txt_id=""))
    h = Harness(make_config(pinned_mx.port, dns_server, ca_file, *table("verify", "sha256:" + "ab" * 32)), tmp_path)
    [[r]] = h.run(DOMAIN)
    assert r.status is Status.DEFERRED and "matches no pinned fingerprint" in r.reply.text
    assert pinned_mx.messages == []


# ---------------------------------------------------------------------------
# DANE


def tlsa_zone(mx_ip, tlsa: list[str], port: int):
    records = zone(mx_ip, txt_id="")
    records[f"_{port}._tcp.mx1.dest.example"] = [f"TLSA {t}" for t in tlsa]
    return records


@pytest.fixture
def dane_mx():
    """An MX whose certificate (from a CA nobody trusts) is issued by an intermediate,
    for DANE-EE (3 1 1, the leaf's key) and DANE-TA (2 1 1, the intermediate's key)."""
    root = trustme.CA()
    inter = root.create_child_ca()
    leaf = inter.issue_cert("mx1.dest.example")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    leaf.configure_cert(ctx)
    with SmtpSink(MX_GOOD, ssl_context=ctx, hostname="mx1.test") as s:
        pems = [p.bytes() for p in leaf.cert_chain_pems]
        s.ee = _der_and_spki(pems[0])[1].removeprefix("sha256:")
        s.ta = _der_and_spki(inter.cert_pem.bytes())[1].removeprefix("sha256:")
        yield s


def test_dane_ee_match_delivers_without_a_trusted_ca(dns_server, dane_mx, ca_file, tmp_path):
    dns_server.set_records(records=tlsa_zone(MX_GOOD, [f"3 1 1 {dane_mx.ee}"], dane_mx.port))
    dns_server.authenticated = True
    h = Harness(make_config(dane_mx.port, dns_server, ca_file, dnssec="trust-ad"), tmp_path)
    [[r]] = h.run(DOMAIN)
    assert r.status is Status.SENT, r.reply
    assert r.tls.endswith("verify=FAIL")  # not WebPKI-valid: DANE authenticated it
    [policy] = h.report()["policies"]
    assert policy["policy"]["policy-type"] == "tlsa"
    assert policy["policy"]["policy-string"] == [f"3 1 1 {dane_mx.ee}"]


def test_dane_ta_match_delivers(dns_server, dane_mx, ca_file, tmp_path):
    dns_server.set_records(records=tlsa_zone(MX_GOOD, [f"2 1 1 {dane_mx.ta}"], dane_mx.port))
    dns_server.authenticated = True
    h = Harness(make_config(dane_mx.port, dns_server, ca_file, dnssec="trust-ad"), tmp_path)
    [[r]] = h.run(DOMAIN)
    assert r.status is Status.SENT, r.reply


@pytest.mark.parametrize("usage", ["3", "2"])
def test_dane_mismatch_defers(dns_server, dane_mx, ca_file, tmp_path, usage):
    dns_server.set_records(records=tlsa_zone(MX_GOOD, [f"{usage} 1 1 {'00' * 32}"], dane_mx.port))
    dns_server.authenticated = True
    h = Harness(make_config(dane_mx.port, dns_server, ca_file, dnssec="trust-ad"), tmp_path)
    [[r]] = h.run(DOMAIN)
    assert r.status is Status.DEFERRED and r.reply.enhanced == "4.7.5"
    assert "no TLSA record of mx1.dest.example matches" in r.reply.text
    assert dane_mx.messages == []
    [failure] = h.log.policy_failures()
    assert (failure.policy, failure.result) == ("dane", "validation-failure")


def test_dane_without_the_ad_bit_is_not_dane(dns_server, dane_mx, ca_file, tmp_path):
    # The same mismatching TLSA, but the answer is not authenticated: opportunistic TLS.
    dns_server.set_records(records=tlsa_zone(MX_GOOD, ["3 1 1 " + "00" * 32], dane_mx.port))
    dns_server.authenticated = False
    h = Harness(make_config(dane_mx.port, dns_server, ca_file, dnssec="trust-ad"), tmp_path)
    [[r]] = h.run(DOMAIN)
    assert r.status is Status.SENT and h.log.policy_failures() == []


def test_dane_off_when_the_resolver_is_not_trusted(dns_server, dane_mx, ca_file, tmp_path):
    # AD set, but [dns] dnssec = "off": the AD bit is not believed and TLSA is never asked.
    dns_server.set_records(records=tlsa_zone(MX_GOOD, ["3 1 1 " + "00" * 32], dane_mx.port))
    dns_server.authenticated = True
    h = Harness(make_config(dane_mx.port, dns_server, ca_file), tmp_path)
    [[r]] = h.run(DOMAIN)
    assert r.status is Status.SENT
    assert all(q.qtype != "TLSA" for q in dns_server.queries)


# ---------------------------------------------------------------------------
# TLS-RPT for destinations without a policy


def test_sessions_without_a_policy_are_counted(dns_server, good_mx, ca_file, tmp_path):
    with SmtpSink(MX_BAD, good_mx.port) as plain:
        records = zone(MX_GOOD, txt_id="")
        records.update({"plain.example": ["MX 10 mx.plain.example."], "mx.plain.example": [f"A {MX_BAD}"]})
        dns_server.set_records(records=records)
        h = Harness(make_config(good_mx.port, dns_server, ca_file, mta_sts=False), tmp_path)
        [[tls], [clear]] = h.run(DOMAIN, "plain.example")
        assert tls.status is Status.SENT and clear.status is Status.SENT
        assert plain.wait_for_messages(1)
    assert h.log.policy_failures() == []  # no policy was broken: no event
    by_domain = {p["policy"]["policy-domain"]: p for p in h.report()["policies"]}
    assert by_domain[DOMAIN]["policy"]["policy-type"] == "no-policy-found"
    assert by_domain[DOMAIN]["summary"] == {"total-successful-session-count": 1, "total-failure-session-count": 0}
    assert by_domain["plain.example"]["summary"] == {"total-successful-session-count": 0,
                                                     "total-failure-session-count": 1}
    assert by_domain["plain.example"]["failure-details"][0]["result-type"] == "starttls-not-supported"
