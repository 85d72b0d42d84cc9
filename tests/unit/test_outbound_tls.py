"""MTA-STS parsing and matching, the policy cache logic, TLS-RPT report files and
`kanmon stats --tls`, the [[tls_policy]] config (no sockets)."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from click.testing import CliRunner

from kanmon.cli import main
from kanmon.clock import ManualClock
from kanmon.config import ConfigError, parse_config
from kanmon.deliver.mtasts import MtaSts, StsError, StsPolicy, load_cache, mx_matches, parse_policy, parse_txt
from kanmon.deliver.mx import Lookup
from kanmon.records.tlsrpt import TlsReports, read_report, read_reports

GOOD = "version: STSv1\nmode: enforce\nmx: mail.example.com\nmx: *.example.net\nmax_age: 604800\n"


# -- parsing


def test_txt_record():
    assert parse_txt(["v=STSv1; id=20160831085700Z;"]) == "20160831085700Z"
    assert parse_txt(["v=STSv1;id=abc"]) == "abc"
    assert parse_txt(["v=spf1 -all", "v=STSv1; id=a1"]) == "a1"
    assert parse_txt([]) is None
    assert parse_txt(["v=STSv1; id=a1", "v=STSv1; id=a2"]) is None  # two records: no policy (RFC 8461 3.1)
    assert parse_txt(["v=STSv1; id=bad-id!"]) is None
    assert parse_txt(["v=STSv1; id=" + "a" * 33]) is None
    assert parse_txt(["v=STSv1"]) is None


def test_policy_parses_strictly():
    p = parse_policy(GOOD.replace("\n", "\r\n"), "x1", 1000.0)
    assert (p.mode, p.mx, p.max_age, p.expires) == ("enforce", ("mail.example.com", "*.example.net"), 604800, 605800.0)
    assert parse_policy("version: STSv1\nmode: none\nmax_age: 0\n", "x", 0).mx == ()
    assert parse_policy(GOOD + "extension: ignored\n", "x", 0).mode == "enforce"


@pytest.mark.parametrize("text", [
    "",
    "mode: enforce\nversion: STSv1\nmx: a.example\nmax_age: 1\n",  # version first
    "version: STSv2\nmode: enforce\nmx: a.example\nmax_age: 1\n",
    "version: STSv1\nmode: strict\nmx: a.example\nmax_age: 1\n",
    "version: STSv1\nmode: enforce\nmax_age: 1\n",  # no mx
    "version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 31557601\n",
    "version: STSv1\nmode: enforce\nmx: a.example\nmax_age: -1\n",
    "version: STSv1\nmode: enforce\nmx: a.example\n",  # no max_age
    "version: STSv1\nmode: enforce\nmx: a.*.example\nmax_age: 1\n",
    "version: STSv1\nmode: enforce\nmx a.example\nmax_age: 1\n",
    "<html>not a policy</html>",
])
def test_malformed_policies(text):
    with pytest.raises(StsError) as e:
        parse_policy(text, "x", 0)
    assert e.value.result_type == "sts-policy-invalid"


def test_mx_patterns():
    assert mx_matches("mail.example.com", "MAIL.example.com.")
    assert mx_matches("*.example.com", "mx1.example.com")
    assert not mx_matches("*.example.com", "example.com")
    assert not mx_matches("*.example.com", "a.b.example.com")
    assert not mx_matches("mail.example.com", "mail.example.com.evil")


# -- the cache logic (no HTTPS: the fetch is replaced, DNS answers are scripted)


class FakeResolver:
    def __init__(self):
        self.txt = {"dest.example": ["v=STSv1; id=one"]}

    async def lookup(self, name, rdtype):
        assert rdtype == "TXT"
        texts = self.txt.get(name.removeprefix("_mta-sts."), [])
        return Lookup(tuple(type("R", (), {"strings": [t.encode()]})() for t in texts))


def run_lookups(sts: MtaSts, *domains):
    async def go():
        return [await sts.lookup(d) for d in domains]

    return asyncio.run(go())


def test_cache_holds_for_max_age_and_txt_changes_refetch(tmp_path):
    clock = ManualClock(start=10_000.0)
    bodies = {"dest.example": "version: STSv1\nmode: testing\nmx: mx.dest.example\nmax_age: 3600\n"}

    async def fetch(domain):
        return bodies[domain]

    resolver = FakeResolver()
    sts = MtaSts(resolver, path=tmp_path / "c.json", now=clock.now, fetch=fetch)  # type: ignore[arg-type]
    [a, b] = run_lookups(sts, "dest.example", "dest.example")
    assert a.policy is not None and a.policy.mode == "testing" and sts.fetches == 1
    clock.advance(301)  # the TXT is asked again, same id: no fetch
    run_lookups(sts, "dest.example")
    assert sts.fetches == 1
    resolver.txt["dest.example"] = ["v=STSv1; id=two"]
    clock.advance(301)
    [c] = run_lookups(sts, "dest.example")
    assert sts.fetches == 2 and c.policy.policy_id == "two"
    # TXT gone: the cached policy stays until max_age, then there is none.
    resolver.txt["dest.example"] = []
    clock.advance(301)
    assert run_lookups(sts, "dest.example")[0].policy is not None
    clock.advance(3600)
    assert run_lookups(sts, "dest.example")[0].policy is None
    assert sts.fetches == 2


def test_cache_file_is_decoded_strictly(tmp_path):
    path = tmp_path / "policies.json"
    good = StsPolicy("one", "enforce", ("mx.a.example",), 60, 1.0).as_dict()
    path.write_text(json.dumps({"a.example": good, "b.example": {**good, "mode": "bogus"}, "c.example": 3}))
    assert list(load_cache(path)) == ["a.example"]
    path.write_text("{not json")
    assert load_cache(path) == {}
    assert (tmp_path / "policies.json.bad").exists() and not path.exists()


# -- TLS-RPT


def test_tls_report_is_rfc8460_json_and_adds_up_across_flushes(tmp_path):
    clock = ManualClock(start=1_780_000_000.0)  # 2026-05-28 UTC
    reports = TlsReports(tmp_path, "relay.kanmon.test", now=clock.now, sending_ip="192.0.2.8")
    strings = ["version: STSv1", "mode: enforce", "mx: mx1.dest.example", "max_age: 86400"]
    reports.success("dest.example", "sts", strings, ["mx1.dest.example"])
    reports.failure("dest.example", "sts", "certificate-expired", mx="mx1.dest.example", ip="192.0.2.25",
                    reason="expired", policy_strings=strings, mx_host=["mx1.dest.example"])
    reports.flush_blocking()
    reports.failure("dest.example", "sts", "certificate-expired", mx="mx1.dest.example", ip="192.0.2.25",
                    reason="expired", policy_strings=strings, mx_host=["mx1.dest.example"])
    reports.success("plain.example", "no-policy-found")
    asyncio.run(reports.flush())
    path = tmp_path / "tlsrpt" / "2026-05-28.json"
    assert path.stat().st_mode & 0o077 == 0
    report = read_report(path)
    assert report["organization-name"] == "relay.kanmon.test"
    assert report["date-range"] == {"start-datetime": "2026-05-28T00:00:00Z", "end-datetime": "2026-05-28T23:59:59Z"}
    assert report["report-id"] == "2026-05-28T00:00:00Z_relay.kanmon.test"
    dest, plain = report["policies"]
    assert dest["policy"] == {"policy-type": "sts", "policy-string": strings, "policy-domain": "dest.example",
                              "mx-host": ["mx1.dest.example"]}
    assert dest["summary"] == {"total-successful-session-count": 1, "total-failure-session-count": 2}
    assert dest["failure-details"] == [{
        "result-type": "certificate-expired", "sending-mta-ip": "192.0.2.8", "receiving-mx-hostname": "mx1.dest.example",
        "receiving-ip": "192.0.2.25", "failed-session-count": 2, "failure-reason-code": "expired",
    }]
    assert plain["policy"]["policy-type"] == "no-policy-found"
    # a new UTC day starts a new file
    clock.advance(86400)
    reports.success("dest.example", "sts", strings)
    reports.flush_blocking()
    assert sorted(p.name for p in (tmp_path / "tlsrpt").iterdir()) == ["2026-05-28.json", "2026-05-29.json"]
    assert len(read_reports(tmp_path, 1_780_000_000.0, 1_780_000_000.0 + 86400)) == 2


def test_a_broken_report_file_is_moved_aside(tmp_path):
    (tmp_path / "tlsrpt").mkdir()
    path = tmp_path / "tlsrpt" / "2026-05-28.json"
    path.write_text(json.dumps({"policies": [{"policy": {"policy-type": "evil"}}], "date-range": {}}))
    assert read_report(path) is None
    assert (tmp_path / "tlsrpt" / "2026-05-28.json.bad").exists()


def test_stats_tls_shows_the_reports(tmp_path):
    data = tmp_path / "data"
    (tmp_path / "kanmon.toml").write_text(f'[server]\ndata_dir = "{data}"\n')
    reports = TlsReports(data, "relay.kanmon.test", now=time.time)
    reports.success("dest.example", "sts", ["version: STSv1"], ["mx1.dest.example"])
    reports.failure("dest.example", "sts", "certificate-host-mismatch", mx="mx1.dest.example", ip="192.0.2.25",
                    reason="x")
    reports.failure("evil\x1b[31m.example", "no-policy-found", "starttls-not-supported", mx="mx", ip="192.0.2.26")
    reports.flush_blocking()
    result = CliRunner().invoke(main, ["stats", "--tls", "-c", str(tmp_path / "kanmon.toml")])
    assert result.exit_code == 0, result.output
    assert "dest.example" in result.output and "certificate-host-mismatch 1" in result.output
    assert "\x1b" not in result.output and "evil\\x1b[31m.example" in result.output
    out = CliRunner().invoke(main, ["stats", "--tls", "--json", "-c", str(tmp_path / "kanmon.toml")])
    [report] = json.loads(out.output)
    assert report["policies"][0]["summary"]["total-failure-session-count"] == 1


def test_stats_tls_with_nothing_counted(tmp_path):
    (tmp_path / "kanmon.toml").write_text(f'[server]\ndata_dir = "{tmp_path / "data"}"\n')
    (tmp_path / "data").mkdir()
    result = CliRunner().invoke(main, ["stats", "--tls", "-c", str(tmp_path / "kanmon.toml")])
    assert result.exit_code == 0 and "no outbound TLS sessions counted" in result.output


# -- config


def test_tls_policy_config():
    cfg = parse_config('[[tls_policy]]\ndomain = "Partner.Example."\nlevel = "verify"\n'
                       'fingerprints = ["SHA256:' + "AB:" * 31 + 'AB"]\n[dns]\ndnssec = "trust-ad"\n')
    [entry] = cfg.tls_policy
    assert entry.domain == "partner.example" and entry.fingerprints == ["sha256:" + "ab" * 32]
    assert cfg.dns.dnssec == "trust-ad" and cfg.outbound.mta_sts is False


@pytest.mark.parametrize("text,message", [
    ('[[tls_policy]]\ndomain = "a.example"\nlevel = "may"\n', "level"),
    ('[[tls_policy]]\ndomain = "a.example"\nlevel = "verify"\nfingerprints = ["md5:00"]\n', "sha256"),
    ('[[tls_policy]]\ndomain = "a.example"\nlevel = "opportunistic"\nfingerprints = ["sha256:' + "00" * 32 + '"]\n',
     "fingerprints need"),
    ('[[tls_policy]]\ndomain = "a.example"\nlevel = "none"\n[[tls_policy]]\ndomain = "a.example"\nlevel = "verify"\n',
     "listed twice"),
    ('[dns]\ndnssec = "yes"\n', "dnssec"),
])
def test_tls_policy_config_errors(text, message):
    with pytest.raises(ConfigError) as e:
        parse_config(text)
    assert message in str(e.value)


# -- kanmon dns check says whether outbound DANE and MTA-STS are on


ZONE = """\
$ORIGIN example.test.
$TTL 300
@ IN SOA ns1 hostmaster 1 7200 3600 1209600 300
@ IN MX 10 mx1
mx1 IN A 203.0.113.3
"""


@pytest.mark.parametrize("dnssec,expected", [
    ("off", "outbound DANE: off (no validating resolver"),
    ("trust-ad", 'outbound DANE: on ([dns] dnssec = "trust-ad": the AD bit of 127.0.0.1:53 is trusted'),
])
def test_dns_check_says_whether_dane_is_on(tmp_path, dnssec, expected):
    (tmp_path / "fwd.zone").write_text(ZONE)
    cfg = tmp_path / "kanmon.toml"
    cfg.write_text(f'[dns]\nservers = ["127.0.0.1:53"]\ndnssec = "{dnssec}"\n[outbound]\nmta_sts = true\n')
    result = CliRunner().invoke(main, ["dns", "check", "example.test", "--zone", str(tmp_path / "fwd.zone"),
                                       "-c", str(cfg), "--json"])
    notes = json.loads(result.output)["notes"]
    assert any(n.startswith(expected) for n in notes), notes
    assert "outbound MTA-STS: on ([outbound] mta_sts = true)" in notes
