"""`kanmon dns check` end to end: the real CLI, against the real loopback DNS server
(tests/support/dnsserver.py) and, offline, against the same zones as BIND zone files.

Every broken case of the DNS check is served both ways (``via`` = "server" | "zone") and the
finding's mark, check, text and the exit code are asserted. The system resolver is
never used: building one fails the test, and so does pyspf's own DNS lookup.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import dns.resolver
import pytest
import spf
from click.testing import CliRunner, Result
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from kanmon.cli import main
from kanmon.dnscheck import sources
from tests.support.dnsserver import DnsServer, txt

IP = "203.0.113.3"
HELO = "relay.example.test"

_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
_KEY_PEM = _KEY.private_bytes(
    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
)
_PUB_B64 = base64.b64encode(
    _KEY.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
).decode()

FORWARD = f"""\
$ORIGIN example.test.
$TTL 300
@           IN SOA  ns1 hostmaster 2026112801 3600 600 1209600 300
@           IN NS   ns1
ns1         IN A    192.0.2.53
@           IN MX   10 mx1
@           IN MX   20 mx2
mx1         IN A    192.0.2.1
mx2         IN A    192.0.2.2
mx2         IN AAAA 2001:db8::2
relay       IN A    {IP}
@           IN TXT  "v=spf1 ip4:{IP} mx -all"
@           IN TXT  "google-site-verification=abc"
_dmarc      IN TXT  "v=DMARC1; p=reject; rua=mailto:dmarc@example.test"
_mta-sts    IN TXT  "v=STSv1; id=20261128T1"
_smtp._tls  IN TXT  "v=TLSRPTv1; rua=mailto:tlsrpt@example.test"
sel1._domainkey IN TXT {txt("v=DKIM1; k=rsa; p=" + _PUB_B64)}
"""

REVERSE = f"""\
$ORIGIN 113.0.203.in-addr.arpa.
$TTL 300
@   IN SOA ns1.example.test. hostmaster.example.test. 1 3600 600 1209600 300
@   IN NS  ns1.example.test.
3   IN PTR {HELO}.
"""


def edit(zone: str, drop: tuple[str, ...] = (), add: tuple[str, ...] = ()) -> str:
    """The zone without the lines starting with any of `drop`, plus the lines `add`."""
    lines = [line for line in zone.splitlines() if not any(line.startswith(d) for d in drop)]
    return "\n".join(lines + list(add)) + "\n"


@pytest.fixture(autouse=True)
def no_system_resolver(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the system resolver must not be used in tests")

    monkeypatch.setattr(dns.resolver.Resolver, "read_resolv_conf", refuse)
    monkeypatch.setattr(spf, "DNSLookup", refuse)


@pytest.fixture(scope="module")
def server() -> Iterator[DnsServer]:
    with DnsServer() as srv:
        yield srv


Check = Callable[..., Result]


@pytest.fixture(params=["server", "zone"])
def check(request: pytest.FixtureRequest, server: DnsServer, tmp_path: Path) -> Check:
    """check(forward, reverse, *args) runs `kanmon dns check example.test ...` against the
    zones, served by the loopback DNS server or read from zone files."""

    def run(forward: str = FORWARD, reverse: str = REVERSE, *args: str) -> Result:
        if request.param == "server":
            server.set_records(zone=forward + reverse)
            where = ["--server", server.address]
        else:
            (tmp_path / "fwd.zone").write_text(forward)
            (tmp_path / "rev.zone").write_text(reverse)
            where = ["--zone", str(tmp_path / "fwd.zone"), "--zone", str(tmp_path / "rev.zone")]
        defaults = ["--ip", IP, "--helo", HELO] if not any(a in args for a in ("--ip", "--helo", "-c")) else []
        return CliRunner().invoke(main, ["dns", "check", "example.test", *where, *defaults, *args])

    run.via = request.param  # type: ignore[attr-defined]
    return run


def lines(result: Result, mark: str | None = None, check: str | None = None) -> list[str]:
    out = result.output.splitlines()
    return [
        line for line in out
        if (mark is None or line.startswith(mark)) and (check is None or line[6:].split(" ", 1)[0] == check)
    ]


def only(result: Result, mark: str, check: str) -> str:
    found = lines(result, mark, check)
    assert len(found) == 1, result.output
    return found[0]


# ---------------------------------------------------------------------------


def test_good_zones_are_all_ok(check: Check, tmp_path: Path) -> None:
    key = tmp_path / "dkim.pem"
    key.write_bytes(_KEY_PEM)
    r = check(FORWARD, REVERSE, "--ip", IP, "--helo", HELO, "--dkim-selector", "sel1", "--dkim-key", str(key))
    assert r.exit_code == 0, r.output
    assert not lines(r, "WARN") and not lines(r, "ERROR"), r.output
    out = r.output
    assert "ok    mx       example.test: MX 10 mx1.example.test -> 192.0.2.1" in out
    assert "ok    mx       example.test: MX 20 mx2.example.test -> 192.0.2.2, 2001:db8::2" in out
    assert f"ok    ptr      {IP}: PTR {HELO}" in out
    assert f"ok    fcrdns   {IP}: PTR {HELO} has A {IP} (forward-confirmed)" in out
    assert f"ok    helo     {HELO}: HELO name {HELO} -> {IP} (ours)" in out
    assert f"ok    spf      example.test: SPF record 'v=spf1 ip4:{IP} mx -all', 1 of 10 DNS-querying terms" in out
    assert f"ok    spf      {IP}: SPF of example.test authorizes {IP} (pass)" in out
    assert "ok    dmarc    _dmarc.example.test: DMARC p=reject, reports to mailto:dmarc@example.test" in out
    assert "ok    dkim     sel1._domainkey.example.test: DKIM rsa key published and matches ours" in out
    assert "ok    mta-sts  _mta-sts.example.test: MTA-STS policy id 20261128T1" in out
    assert "ok    tls-rpt  _smtp._tls.example.test: TLS-RPT reports to mailto:tlsrpt@example.test" in out
    assert out.splitlines()[-1] == "example.test: 0 errors, 0 warnings, 11 ok (exit 0)"
    assert r.stdout.splitlines()[0].startswith(
        "DNS check of example.test using " + ("DNS server 127.0.0.1:" if check.via == "server" else "zone files ")
    )


def test_missing_ptr(check: Check) -> None:
    r = check(FORWARD, edit(REVERSE, drop=("3 ",)))
    assert r.exit_code == 2
    line = only(r, "ERROR", "ptr")
    assert line.startswith(f"ERROR ptr      {IP}: no PTR record for {IP} (3.113.0.203.in-addr.arpa: NXDOMAIN) -- ")
    assert f"will answer '450 4.7.1 Access denied. IP name lookup failed [{IP}]'" in line
    assert "our mail to them will queue until a PTR is published" in line
    assert r.output.splitlines()[-1] == "example.test: 1 error, 0 warnings, 8 ok (exit 2)"


def test_ptr_to_a_name_whose_a_differs(check: Check) -> None:
    """The classic after a DNS move: the relay's A points at the old address."""
    r = check(edit(FORWARD, drop=("relay ",), add=("relay IN A 198.51.100.7",)))
    assert r.exit_code == 2
    line = only(r, "ERROR", "fcrdns")
    assert f"PTR names {HELO}, but {HELO} has A 198.51.100.7, not {IP} -- " in line
    assert f"not forward-confirmed: servers that require it answer '450 4.7.1 Client host rejected: cannot find your hostname [{IP}]'" in line
    helo = only(r, "WARN", "helo")
    assert f"HELO name {HELO} resolves to 198.51.100.7, none of our IPs ({IP})" in helo


def test_ptr_name_that_does_not_exist(check: Check) -> None:
    r = check(edit(FORWARD, drop=("relay ",)), REVERSE, "--ip", IP, "--helo", "mx1.example.test")
    assert r.exit_code == 2
    assert f"PTR names {HELO}, which does not exist (NXDOMAIN)" in only(r, "ERROR", "fcrdns")


def test_helo_name_not_resolving(check: Check) -> None:
    r = check(FORWARD, REVERSE, "--ip", IP, "--helo", "nowhere.example.test")
    assert r.exit_code == 2
    line = only(r, "ERROR", "helo")
    assert line.startswith("ERROR helo     nowhere.example.test: HELO name nowhere.example.test does not exist (NXDOMAIN) -- ")
    assert "'450 4.7.1 Helo command rejected: Host not found'" in line


def test_helo_not_fully_qualified(check: Check) -> None:
    r = check(FORWARD, REVERSE, "--ip", IP, "--helo", "relay")
    assert r.exit_code == 2
    assert "HELO name relay is not a fully qualified host name" in only(r, "ERROR", "helo")


def test_two_spf_records(check: Check) -> None:
    r = check(edit(FORWARD, add=('@ IN TXT "v=spf1 a -all"',)))
    assert r.exit_code == 2
    line = only(r, "ERROR", "spf")
    assert f"2 SPF records: v=spf1 ip4:{IP} mx -all | v=spf1 a -all" in line or \
        f"2 SPF records: v=spf1 a -all | v=spf1 ip4:{IP} mx -all" in line
    assert "RFC 7208 4.5 allows exactly one; receivers get 'permerror'" in line


def test_spf_not_covering_the_ip(check: Check) -> None:
    r = check(edit(FORWARD, drop=("@           IN TXT  \"v=spf1",), add=('@ IN TXT "v=spf1 mx -all"',)))
    assert r.exit_code == 2
    line = only(r, "ERROR", "spf")
    assert line.startswith(f"ERROR spf      {IP}: SPF of example.test does not authorize {IP} (result: fail) -- ")
    assert "rejected (550 5.7.23) or junked" in line and f"Add ip4:{IP} to the record" in line


def test_spf_with_11_lookups(check: Check) -> None:
    includes = [f"s{i}" for i in range(1, 5)]
    spf_text = "v=spf1 a mx " + " ".join(f"include:{s}.example.test" for s in includes) + f" ip4:{IP} -all"
    subs = [  # 2 + 2 + 1 + 0 terms; with the 6 above: 11
        's1 IN TXT "v=spf1 a:mx1.example.test mx:example.test -all"',
        's2 IN TXT "v=spf1 a:mx2.example.test mx:example.test -all"',
        's3 IN TXT "v=spf1 a:mx1.example.test -all"',
        's4 IN TXT "v=spf1 ip4:192.0.2.0/24 -all"',
    ]
    r = check(edit(FORWARD, drop=('@           IN TXT  "v=spf1',), add=(f'@ IN TXT "{spf_text}"', *subs)))
    assert r.exit_code == 2
    errors = lines(r, "ERROR", "spf")
    assert any(f"example.test: 11 DNS-querying terms (include, a, mx, ptr, exists, redirect; limit 10, RFC 7208 4.6.4)" in e for e in errors), r.output
    # pyspf, evaluating the same DNS, stops at the limit before reaching ip4:
    assert any(f"{IP}: SPF of example.test gives permerror for {IP}: Too many DNS lookups -- receivers get 'permerror'" in e for e in errors), r.output


def test_spf_plus_all_and_no_all(check: Check) -> None:
    r = check(edit(FORWARD, drop=('@           IN TXT  "v=spf1',), add=(f'@ IN TXT "v=spf1 ip4:{IP} +all"',)))
    assert r.exit_code == 2
    assert "SPF ends in +all: every host on the internet is authorized -- anyone can send mail as this domain" in \
        only(r, "ERROR", "spf")
    r = check(edit(FORWARD, drop=('@           IN TXT  "v=spf1',), add=(f'@ IN TXT "v=spf1 ip4:{IP}"',)))
    assert r.exit_code == 1
    assert "SPF has no 'all' term (and no redirect=) -- mail from hosts not listed gets 'neutral'" in only(r, "WARN", "spf")


def test_spf_syntax_error_and_missing_record(check: Check) -> None:
    r = check(edit(FORWARD, drop=('@           IN TXT  "v=spf1',), add=(f'@ IN TXT "v=spf1 ip4:{IP} mx:bad:x foo -all"',)))
    assert r.exit_code == 2
    assert "SPF record does not parse: unknown mechanism 'foo'" in only(r, "ERROR", "spf")
    r = check(edit(FORWARD, drop=('@           IN TXT  "v=spf1',)))
    assert r.exit_code == 2
    assert "no SPF record (no TXT starting with v=spf1 at example.test)" in only(r, "ERROR", "spf")


def test_mx_to_a_cname(check: Check) -> None:
    r = check(edit(FORWARD, drop=("@           IN MX   10",), add=("@ IN MX 10 mail", "mail IN CNAME mx1")))
    assert r.exit_code == 2
    line = only(r, "ERROR", "mx")
    assert "MX 10 mail.example.test is a CNAME (to mx1.example.test) -- an MX must name the host itself (RFC 2181 10.3)" in line


def test_mx_host_without_address_and_ip_literal(check: Check) -> None:
    r = check(edit(FORWARD, drop=("mx2 ",)))
    assert r.exit_code == 2
    assert "MX 20 mx2.example.test does not exist (NXDOMAIN) -- senders cannot connect to mx2.example.test" in \
        only(r, "ERROR", "mx")
    r = check(edit(FORWARD, drop=("@           IN MX",), add=("@ IN MX 10 192.0.2.1.",)))
    assert r.exit_code == 2
    errors = lines(r, "ERROR", "mx")
    assert "MX 10 192.0.2.1 is an IP address, not a host name" in errors[0]
    assert "no MX host of the domain is usable -- no sender can deliver to example.test" in errors[1]


def test_null_mx(check: Check, tmp_path: Path) -> None:
    null = edit(FORWARD, drop=("@           IN MX",), add=("@ IN MX 0 .",))
    r = check(null)
    assert r.exit_code == 0, r.output
    assert "ok    mx       example.test: deliberate null MX (MX 0 .): the domain accepts no mail (RFC 7505)" in r.output
    # ... but a mistake for a domain kanmon receives mail for
    cfg = tmp_path / "kanmon.toml"
    cfg.write_text(f'[dnscheck]\nips = ["{IP}"]\nhelo = "{HELO}"\n\n[[domain]]\nname = "example.test"\n')
    r = check(null, REVERSE, "-c", str(cfg))
    assert r.exit_code == 2
    assert "but kanmon is configured to receive mail for it" in only(r, "ERROR", "mx")
    r = check(edit(null, add=("@ IN MX 10 mx1",)))
    assert "null MX (MX 0 .) mixed with other MX records" in only(r, "ERROR", "mx")


def test_no_mx_but_an_a(check: Check) -> None:
    r = check(edit(FORWARD, drop=("@           IN MX",), add=("@ IN A 192.0.2.80",)))
    assert r.exit_code == 1
    line = only(r, "WARN", "mx")
    assert "no MX record; senders use the domain's own address 192.0.2.80 (implicit MX) -- mail goes to whatever host" in line
    r = check(edit(FORWARD, drop=("@           IN MX",)))
    assert r.exit_code == 2
    assert "no MX record and no A/AAAA record -- no one can send mail to example.test" in only(r, "ERROR", "mx")


def test_dmarc_missing_and_broken(check: Check) -> None:
    r = check(edit(FORWARD, drop=("_dmarc",)))
    assert r.exit_code == 1
    assert "no DMARC record at _dmarc.example.test -- receivers apply their own policy" in only(r, "WARN", "dmarc")
    r = check(edit(FORWARD, drop=("_dmarc",), add=('_dmarc IN TXT "v=DMARC1; rua=mailto:d@example.test"',)))
    assert r.exit_code == 2
    assert "DMARC record does not parse: p= is missing" in only(r, "ERROR", "dmarc")
    r = check(edit(FORWARD, drop=("_dmarc",), add=('_dmarc IN TXT "v=DMARC1; p=none"',)))
    assert r.exit_code == 0
    assert "DMARC p=none, no aggregate reports (rua) -- monitoring only" in only(r, "ok", "dmarc")


def test_dkim_missing_and_not_our_key(check: Check, tmp_path: Path) -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    key = tmp_path / "other.pem"
    key.write_bytes(other.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    r = check(FORWARD, REVERSE, "--ip", IP, "--helo", HELO, "--dkim-selector", "sel1", "--dkim-key", str(key))
    assert r.exit_code == 2
    assert "the rsa key in DNS is not our DKIM key (dkim_key) -- every message signed with our key fails DKIM" in \
        only(r, "ERROR", "dkim")
    r = check(FORWARD, REVERSE, "--ip", IP, "--helo", HELO, "--dkim-selector", "sel2")
    assert r.exit_code == 2
    assert "no DKIM key record at sel2._domainkey.example.test" in only(r, "ERROR", "dkim")


def test_mta_sts_and_tls_rpt_broken_or_absent(check: Check) -> None:
    r = check(edit(FORWARD, drop=("_mta-sts", "_smtp._tls"), add=('_mta-sts IN TXT "v=STSv1; id=bad-id!"',)))
    assert r.exit_code == 1
    assert "MTA-STS record does not parse: id=bad-id! is not 1-32 letters and digits" in only(r, "WARN", "mta-sts")
    assert "no TLS-RPT record (optional)" in only(r, "ok", "tls-rpt")


def test_json_output(check: Check) -> None:
    r = check(FORWARD, edit(REVERSE, drop=("3 ",)), "--ip", IP, "--helo", HELO, "--json")
    assert r.exit_code == 2
    data = json.loads(r.stdout)
    assert data["domain"] == "example.test" and data["worst"] == "error" and data["exit_code"] == 2
    assert data["counts"] == {"ok": 8, "warning": 0, "error": 1}
    ptr = [f for f in data["findings"] if f["check"] == "ptr"]
    assert ptr == [{
        "severity": "error", "check": "ptr", "subject": IP,
        "seen": f"no PTR record for {IP} (3.113.0.203.in-addr.arpa: NXDOMAIN)",
        "consequence": ptr[0]["consequence"],
    }]
    assert "IP name lookup failed" in ptr[0]["consequence"]
    assert data["notes"] == ["DKIM not checked: no selector configured ([dnscheck] dkim_selector or --dkim-selector)"]


# ---------------------------------------------------------------------------
# Server-only and zone-only behaviour


def run_cli(*args: str) -> Result:
    return CliRunner().invoke(main, ["dns", "check", *args])


def test_config_supplies_server_ips_and_helo(server: DnsServer, tmp_path: Path) -> None:
    server.set_records(zone=FORWARD + edit(REVERSE, drop=("3 ",)))
    cfg = tmp_path / "kanmon.toml"
    cfg.write_text(
        f'[server]\nhostname = "{HELO}"\n\n[outbound]\nsource_ips = ["{IP}"]\n\n'
        f'[dns]\nservers = ["{server.address}"]\ntimeout = "1s"\n'
    )
    r = run_cli("example.test", "-c", str(cfg))
    assert r.exit_code == 2, r.output
    assert f"no PTR record for {IP}" in only(r, "ERROR", "ptr")
    assert f"HELO name {HELO} -> {IP} (ours)" in only(r, "ok", "helo")
    assert f"using DNS server {server.address}" in r.stdout.splitlines()[0]


def test_servfail_and_timeout_are_errors(server: DnsServer, tmp_path: Path) -> None:
    server.set_records(zone=FORWARD + REVERSE)
    cfg = tmp_path / "kanmon.toml"
    cfg.write_text(f'[dns]\nservers = ["{server.address}"]\ntimeout = "200ms"\n')
    server.servfail("example.test", "MX")
    server.drop("3.113.0.203.in-addr.arpa")
    try:
        r = run_cli("example.test", "-c", str(cfg), "--ip", IP, "--helo", HELO)
    finally:
        server.clear_faults()
    assert r.exit_code == 2
    assert "MX lookup of example.test failed: SERVFAIL -- senders cannot find where to deliver" in only(r, "ERROR", "mx")
    ptr = only(r, "ERROR", "ptr")
    assert "PTR lookup of 3.113.0.203.in-addr.arpa failed: no answer within 0.2s" in ptr
    assert "IP name lookup failed" in ptr


def test_zone_files_name_outside_the_given_zones(tmp_path: Path) -> None:
    (tmp_path / "fwd.zone").write_text(FORWARD)
    r = run_cli("example.test", "--zone", str(tmp_path / "fwd.zone"), "--ip", IP, "--helo", HELO)
    assert r.exit_code == 1, r.output
    assert f"{IP}: 3.113.0.203.in-addr.arpa is in none of the given zone files -- reverse DNS not checked" in \
        only(r, "WARN", "ptr")


def test_zone_file_without_origin_takes_it_from_the_file_name(tmp_path: Path) -> None:
    body = FORWARD.replace("$ORIGIN example.test.\n", "")
    (tmp_path / "example.test.zone").write_text(body)
    (tmp_path / "db.113.0.203.in-addr.arpa").write_text(REVERSE.replace("$ORIGIN 113.0.203.in-addr.arpa.\n", ""))
    r = run_cli("example.test", "--zone", str(tmp_path / "example.test.zone"),
                "--zone", str(tmp_path / "db.113.0.203.in-addr.arpa"), "--ip", IP, "--helo", HELO)
    assert r.exit_code == 0, r.output


def test_usage_errors_exit_2(tmp_path: Path, server: DnsServer) -> None:
    bad = tmp_path / "bad.zone"
    bad.write_text("$ORIGIN example.test.\n@ IN MX ten mx1\n")
    r = run_cli("example.test", "--zone", str(bad))
    assert r.exit_code == 2
    assert f"kanmon: {bad}:2:" in r.output
    r = run_cli("example.test", "--zone", str(bad), "--server", server.address)
    assert r.exit_code == 2 and "--zone and --server exclude each other" in r.output
    r = run_cli("example.test", "--server", server.address, "--ip", "300.1.1.1")
    assert r.exit_code == 2 and "'300.1.1.1' is not an IP address" in r.output
    cfg = tmp_path / "k.toml"
    cfg.write_text('[dnscheck]\nips = ["nonsense"]\n')
    r = run_cli("example.test", "--server", server.address, "-c", str(cfg))
    assert r.exit_code == 2 and "kanmon: dnscheck.ips: 'nonsense' is not an IP address" in r.output


def test_without_a_domain_every_domain_of_the_config_is_checked(server: DnsServer, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """`kanmon dns check -c relay.toml`: DOMAIN defaults to every [[domain]] (docs/dnscheck.md),
    one report each; the exit code is the worst of them."""
    server.set_records(zone=FORWARD + REVERSE)  # other.test has no records at all
    cfg = tmp_path / "relay.toml"
    head = f'[dns]\nservers = ["{server.address}"]\ntimeout = "1s"\n[dnscheck]\nips = ["{IP}"]\nhelo = "{HELO}"\n'
    cfg.write_text(head + '[[domain]]\nname = "example.test"\n')
    r = run_cli("-c", str(cfg))
    assert r.exit_code == 0, r.output
    assert r.output.startswith("DNS check of example.test using")
    cfg.write_text(head + '[[domain]]\nname = "example.test"\n[[domain]]\nname = "other.test"\n')
    r = run_cli("-c", str(cfg))
    assert r.exit_code == 2, r.output
    reports = [line for line in r.output.splitlines() if line.startswith("DNS check of ")]
    assert [line.split()[3] for line in reports] == ["example.test", "other.test"]
    r = run_cli("-c", str(cfg), "--json")
    assert [(d["domain"], d["exit_code"]) for d in json.loads(r.output)][0] == ("example.test", 0)
    # A DOMAIN given is checked alone; nothing to default to is a usage error, not a traceback.
    assert run_cli("example.test", "-c", str(cfg)).exit_code == 0
    cfg.write_text(head)
    r = run_cli("-c", str(cfg))
    assert r.exit_code == 2 and "give DOMAIN" in r.output and "has no [[domain]]" in r.output
    monkeypatch.delenv("KANMON_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    r = run_cli("--server", server.address)
    assert r.exit_code == 2 and "give DOMAIN: without a config file" in r.output


# ---------------------------------------------------------------------------
# A mail host delegated to other name servers (`mail IN NS linkp1`: a link-balancing
# device answers for it), and --show


DELEGATED = edit(FORWARD, drop=("@           IN MX", "mx1", "mx2"), add=(
    "@           IN MX   10 mail",
    "mail        IN NS   linkp1",
    "mail        IN NS   linkp2",
    "linkp1      IN A    127.0.0.2",
    "linkp2      IN A    127.0.0.3",
))


def test_delegated_mail_host_in_zone_files_is_a_warning(tmp_path: Path) -> None:
    (tmp_path / "fwd.zone").write_text(DELEGATED)
    (tmp_path / "rev.zone").write_text(REVERSE)
    r = run_cli("example.test", "--zone", str(tmp_path / "fwd.zone"), "--zone", str(tmp_path / "rev.zone"),
                "--ip", IP, "--helo", HELO)
    assert r.exit_code == 1, r.output
    assert "ERROR" not in r.output
    assert "example.test: MX 10 mail.example.test delegated to linkp1, linkp2: not checked -- " in \
        only(r, "WARN", "mx")


def _delegating_config(tmp_path: Path, server: DnsServer) -> Path:
    server.set_records(zone=DELEGATED + REVERSE)
    cfg = tmp_path / "kanmon.toml"
    cfg.write_text(f'[dns]\nservers = ["{server.address}"]\ntimeout = "300ms"\n')
    return cfg


def test_delegated_mail_host_live_asks_its_servers(server: DnsServer, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _delegating_config(tmp_path, server)
    with DnsServer(host="127.0.0.2") as linkp1:
        linkp1.set_records(records={"mail.example.test": ["A 192.0.2.25"]})
        monkeypatch.setattr(sources, "NAMESERVER_PORT", linkp1.port)
        r = run_cli("example.test", "-c", str(cfg), "--ip", IP, "--helo", HELO)
        assert r.exit_code == 0, r.output
        assert "MX 10 mail.example.test -> 192.0.2.25 (from its own name server linkp1.example.test [127.0.0.2])" \
            in only(r, "ok", "mx")
        # Unreachable (linkp1 holds every query, nothing listens at linkp2): not checked, a warning.
        linkp1.drop("mail.example.test")
        r = run_cli("example.test", "-c", str(cfg), "--ip", IP, "--helo", HELO)
    assert r.exit_code == 1, r.output
    mx = only(r, "WARN", "mx")
    assert "MX 10 mail.example.test delegated to linkp1, linkp2: not checked -- " in mx
    assert "linkp1.example.test [127.0.0.2]: no answer" in mx and "ERROR" not in r.output


def test_show_prints_every_record_looked_at(check: Check) -> None:
    r = check(FORWARD, REVERSE, "--show")
    assert r.exit_code == 0, r.output
    out = r.stdout.splitlines()
    at = next(i for i, line in enumerate(out) if line.startswith("records looked at ("))
    shown = [" ".join(line.split()) for line in out[at + 1 : -1]]
    assert "example.test. IN MX 10 mx1.example.test." in shown
    assert "example.test. IN MX 20 mx2.example.test." in shown
    assert "mx2.example.test. IN AAAA 2001:db8::2" in shown
    assert "mx1.example.test. IN AAAA ; no record of this type (NODATA)" in shown
    assert f"3.113.0.203.in-addr.arpa. IN PTR {HELO}." in shown
    assert 'example.test. IN TXT "google-site-verification=abc"' in shown
    assert out[-1].startswith("example.test: ")
    data = json.loads(check(FORWARD, REVERSE, "--show", "--json").stdout)
    mx = next(a for a in data["records"] if a["type"] == "MX")
    assert mx["records"] == ["10 mx1.example.test.", "20 mx2.example.test."] and mx["status"] == "ok"
    assert "records" not in json.loads(check(FORWARD, REVERSE, "--json").stdout)


def test_dns_text_reaches_the_terminal_escaped(check: Check) -> None:
    hostile = edit(FORWARD, drop=("@           IN TXT",), add=(
        '@ IN TXT "v=spf1 -all \x1b[2J\u202e"',  # ESC [2J (clear screen), U+202E (bidi override), raw
        '@ IN TXT "v=spf1 [bold red]x[/] -all"',
    ))
    r = check(hostile, REVERSE, "--show")
    assert "\x1b" not in r.output and "\u202e" not in r.output
    assert "v=spf1 -all \\x1b[2J\\u202e | v=spf1 [bold red]x[/] -all" in only(r, "ERROR", "spf")


# ---------------------------------------------------------------------------
# Is the MX of a domain we receive mail for this node (or a host in front of it)?


def _node_config(tmp_path: Path, extra: str = "", listen: str = "127.0.0.5:2525") -> str:
    cfg = tmp_path / "node.toml"
    cfg.write_text(
        f'[server]\nhostname = "{HELO}"\n\n[smtp]\nlisten = ["{listen}"]\n{extra}\n'
        f'[dnscheck]\nips = ["{IP}"]\n\n[[domain]]\nname = "example.test"\n'
    )
    return str(cfg)


def test_mx_of_our_domain_naming_someone_elses_hosts_is_a_warning(check: Check, tmp_path: Path) -> None:
    # This node: relay.example.test, listening on 127.0.0.5, sending from 203.0.113.3; the MX
    # names mx1 and mx2 (192.0.2.1, 192.0.2.2), another server.
    r = check(FORWARD, REVERSE, "-c", _node_config(tmp_path))
    assert r.exit_code == 1, r.output
    assert ("WARN  mx       example.test: no MX host of example.test is this node: mx1.example.test (192.0.2.1); "
            f"mx2.example.test (192.0.2.2, 2001:db8::2); this node is {HELO}, 127.0.0.5, {IP} -- senders deliver "
            "mail for example.test to those hosts, not to this node") in only(r, "WARN", "mx")
    # A domain kanmon does not receive mail for is not compared (no -c: nothing known).
    assert check(FORWARD, REVERSE).exit_code == 0


@pytest.mark.parametrize("listen, extra", [
    ("192.0.2.2:25", ""),                                                # listens on an MX address
    ("0.0.0.0:25", '\n[outbound]\nsource_ips = ["192.0.2.1"]\n'),        # its public address is an MX address
    ("127.0.0.31:2525", 'trusted_proxies = ["192.0.2.1/32"]\n'),        # behind the balancer at the MX address
    ("127.0.0.7:2525", '\n[outbound]\nsmarthost = ["192.0.2.2:25"]\n'),  # a store: the MX is its relay
    ("127.0.0.7:2525", '\n[outbound]\nsmarthost = ["mx1.example.test:25"]\n'),  # ... named by its host name
    ("127.0.0.5:2525", '\n[balancer]\n[[balancer.virtual_server]]\nname = "mail"\nlisten = "192.0.2.1:25"\n'),
])
def test_mx_reaching_this_node_or_the_host_in_front_of_it_is_ok(check: Check, tmp_path: Path,
                                                                 listen: str, extra: str) -> None:
    r = check(FORWARD, REVERSE, "-c", _node_config(tmp_path, extra, listen))
    assert r.exit_code == 0, r.output
    assert "this node" not in r.output


def test_mx_named_by_the_nodes_hostname_is_ok(check: Check, tmp_path: Path) -> None:
    cfg = tmp_path / "node.toml"
    cfg.write_text(f'[server]\nhostname = "MX2.example.test"\n[dnscheck]\nips = ["{IP}"]\nhelo = "{HELO}"\n'
                   '[[domain]]\nname = "example.test"\n')
    r = check(FORWARD, REVERSE, "-c", str(cfg))
    assert r.exit_code == 0, r.output


def test_mx_not_compared_when_the_config_cannot_tell_says_so(check: Check, tmp_path: Path) -> None:
    # Listening on every address, no address of this node named (no --ip either): a note, no warning.
    cfg = tmp_path / "node.toml"
    cfg.write_text(f'[server]\nhostname = "{HELO}"\n[smtp]\nlisten = ["0.0.0.0:25"]\n[[domain]]\nname = "example.test"\n')
    r = check(FORWARD, REVERSE, "-c", str(cfg))
    assert not lines(r, "WARN", "mx"), r.output
    assert ("note: MX of example.test (mx1.example.test (192.0.2.1); mx2.example.test (192.0.2.2, 2001:db8::2)) not "
            "compared with this node: the config names none of its addresses") in r.output
    # Only private addresses known, a public MX address: it may be a NAT address forwarding to
    # this node (1.2.3.4: a public address to Python's is_global, unlike the documentation ranges).
    public = edit(FORWARD, drop=("mx1 ", "mx2 "), add=("mx1 IN A 1.2.3.4", "mx2 IN A 1.2.3.5"))
    cfg.write_text(f'[server]\nhostname = "{HELO}"\n[smtp]\nlisten = ["10.0.0.5:25"]\n[[domain]]\nname = "example.test"\n')
    r = check(public, REVERSE, "-c", str(cfg), "--ip", IP)
    assert not lines(r, "WARN", "mx"), r.output
    assert ("note: MX of example.test (mx1.example.test (1.2.3.4); mx2.example.test (1.2.3.5)) not compared with this "
            f"node: the config knows only its private addresses (10.0.0.5, {IP}), and a NAT address") in r.output
    # ... once the public address is named (the config, or --ip), compared: someone else's server.
    r = check(public, REVERSE, "-c", str(cfg), "--ip", "1.2.3.9")
    assert "no MX host of example.test is this node" in only(r, "WARN", "mx")
    cfg.write_text(cfg.read_text() + '[dnscheck]\nips = ["1.2.3.4"]\n')
    assert not lines(check(public, REVERSE, "-c", str(cfg)), "WARN", "mx")


def test_mx_host_delegated_and_not_asked_is_not_compared(tmp_path: Path) -> None:
    (tmp_path / "fwd.zone").write_text(DELEGATED)
    (tmp_path / "rev.zone").write_text(REVERSE)
    r = run_cli("example.test", "--zone", str(tmp_path / "fwd.zone"), "--zone", str(tmp_path / "rev.zone"),
                "-c", _node_config(tmp_path))
    assert "no MX host" not in r.output and "ERROR" not in r.output, r.output
    assert ("note: MX of example.test not compared with this node: the addresses of mail.example.test could not "
            "be looked up") in r.output
