"""ZoneSource answers from BIND zone files as the zones' authoritative server would,
and never for a name outside them; the SPF lookup count follows includes through it."""

from __future__ import annotations

from pathlib import Path

import pytest

from kanmon.dnscheck.sources import Status, ZoneFileError, ZoneSource
from kanmon.dnscheck.spfrecord import count_dns_terms, evaluate, parse_spf

ZONE = """\
$ORIGIN example.test.
$TTL 300
@        IN SOA ns1 hostmaster 1 3600 600 86400 300
@        IN MX  10 mx1
@        IN TXT "v=spf1 include:_spf.example.test " "a:mx1.example.test -all"
_spf     IN TXT "v=spf1 ip4:198.51.100.0/24 include:_spf.example.test -all"
mx1      IN A   192.0.2.1
alias    IN CNAME mx1
a.b.c    IN A   192.0.2.9
"""


@pytest.fixture
def source(tmp_path: Path) -> ZoneSource:
    (tmp_path / "example.test.zone").write_text(ZONE)
    return ZoneSource([tmp_path / "example.test.zone"])


def test_answers(source: ZoneSource) -> None:
    mx = source.lookup("example.test", "MX")
    assert mx.status is Status.OK and [r.to_text() for r in mx.records] == ["10 mx1.example.test."]
    alias = source.lookup("ALIAS.example.test.", "A")
    assert alias.addresses() == ["192.0.2.1"] and alias.via_cname and alias.canonical == "mx1.example.test"
    assert source.lookup("example.test", "TXT").texts()[0] == "v=spf1 include:_spf.example.test a:mx1.example.test -all"
    assert source.lookup("mx1.example.test", "AAAA").status is Status.NODATA
    assert source.lookup("b.c.example.test", "A").status is Status.NODATA  # empty non-terminal
    assert source.lookup("nope.example.test", "A").status is Status.NXDOMAIN
    outside = source.lookup("example.org", "A")
    assert outside.status is Status.OUTSIDE and outside.error == "example.org is in none of the given zone files"


def test_spf_count_and_loop(source: ZoneSource) -> None:
    record = parse_spf(source.lookup("example.test", "TXT").texts()[0])
    count = count_dns_terms(source, record, "example.test")
    assert count.total == 3
    assert count.problems == ["include:_spf.example.test loops back to _spf.example.test"]
    # pyspf, asking the same zone files, agrees: the loop is a permerror
    verdict = evaluate(source, "198.51.100.5", "example.test", "mx1.example.test")
    assert verdict.result == "permerror" and "recursion: include:_spf.example.test" in verdict.explanation


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ZoneFileError, match="cannot read"):
        ZoneSource([tmp_path / "missing.zone"])
    (tmp_path / "x.zone").write_text("$ORIGIN x.test.\n@ IN A 192.0.2.300\n")
    with pytest.raises(ZoneFileError, match=r"x\.zone:\d+: Text input is malformed"):
        ZoneSource([tmp_path / "x.zone"])


DELEGATING = """\
$ORIGIN nix.co.jj.
$TTL 300
@        IN SOA ns1 hostmaster 1 3600 600 86400 300
@        IN NS  ns1
ns1      IN A   192.0.2.53
@        IN MX  10 mail
mail     IN NS  linkp1
mail     IN NS  linkp2
linkp1   IN A   192.0.2.1
linkp2   IN A   198.51.100.1
vendor   IN NS  ns.vendor.example.
"""


def test_a_name_below_a_zone_cut_is_delegated_not_missing(tmp_path: Path) -> None:
    (tmp_path / "nix.zone").write_text(DELEGATING)
    source = ZoneSource([tmp_path / "nix.zone"])
    for name in ("mail.nix.co.jj", "www.mail.nix.co.jj"):
        for rdtype in ("A", "AAAA", "MX"):
            ans = source.lookup(name, rdtype)
            assert ans.status is Status.DELEGATED and ans.delegated_to == ("linkp1", "linkp2"), ans
            assert ans.error == "mail.nix.co.jj has its own name servers; zone files are checked without asking them"
    # The delegation itself and the glue are the parent's data.
    assert [r.to_text() for r in source.lookup("mail.nix.co.jj", "NS").records] == [
        "linkp1.nix.co.jj.", "linkp2.nix.co.jj."]
    assert source.lookup("linkp1.nix.co.jj", "A").addresses() == ["192.0.2.1"]
    assert source.lookup("vendor.nix.co.jj", "A").delegated_to == ("ns.vendor.example",)
    # Given the child zone too, it answers from that file.
    (tmp_path / "mail.zone").write_text("$ORIGIN mail.nix.co.jj.\n@ 300 IN SOA linkp1.nix.co.jj. h 1 1 1 1 1\n"
                                        "@ 300 IN A 203.0.113.25\n")
    both = ZoneSource([tmp_path / "nix.zone", tmp_path / "mail.zone"])
    assert both.lookup("mail.nix.co.jj", "A").addresses() == ["203.0.113.25"]
