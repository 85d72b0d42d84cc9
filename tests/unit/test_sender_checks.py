"""Sender, client identity and HELO checks without sockets: a CheckResolver whose
lookups answer from a table (its cache is the real one), sessions driven by bytes."""

from __future__ import annotations

import asyncio

import pytest

from kanmon.config import parse_config
from kanmon.model import ClientInfo, SmtpError
from kanmon.policy.client import TEMPFAIL_TTL, ClientIdentityCheck, Identity
from kanmon.policy.dns import CheckResolver, DnsAnswer, DnsStatus
from kanmon.policy.helo import address_literal, helo_syntax
from kanmon.policy.pipeline import Pipeline
from kanmon.policy.sender import is_null_mx
from kanmon.policy.standard import standard_checks
from kanmon.smtp import replies
from kanmon.smtp.address import parse_path
from kanmon.smtp.session import Rejected, RunChecks, Session, SessionSettings, StoreMessage

CONFIG = """
[server]
hostname = "mx1.example.test"
[smtp]
relay_networks = ["127.0.0.1/32"]
[[domain]]
name = "example.test"
mailboxes = ["alice"]
"""

OK, NX, NODATA, TEMP = DnsStatus.OK, DnsStatus.NXDOMAIN, DnsStatus.NODATA, DnsStatus.TEMPFAIL


class TableResolver(CheckResolver):
    """Answers from {(name, rdtype): (status, records)}; anything else is NXDOMAIN."""

    def __init__(self, table):
        super().__init__(servers=[("127.0.0.1", 53)], timeout=1.0)
        self.table = table
        self.asked: list[tuple[str, str]] = []

    async def _lookup(self, name, rdtype):
        self.lookups += 1
        self.asked.append((name, rdtype))
        status, records = self.table.get((name, rdtype), (NX, ()))
        return DnsAnswer(name, rdtype, status, tuple(records), 0.0 if status is TEMP else 300.0)


TABLE = {
    ("mx.test", "MX"): (OK, ["10 mail.mx.test."]),
    ("nullmx.test", "MX"): (OK, ["0 ."]),
    ("aonly.test", "MX"): (NODATA, []),
    ("aonly.test", "A"): (OK, ["192.0.2.26"]),
    ("aonly.test", "AAAA"): (NODATA, []),
    ("broken.test", "MX"): (TEMP, []),
    ("9.2.0.192.in-addr.arpa", "PTR"): (OK, ["client.test."]),
    ("client.test", "A"): (OK, ["192.0.2.9"]),
    ("client.test", "AAAA"): (NODATA, []),
    ("8.2.0.192.in-addr.arpa", "PTR"): (TEMP, []),
}


def make_session(resolver, ip="192.0.2.9", profile_extra="", pipeline=None):
    cfg = parse_config(CONFIG + profile_extra)
    if pipeline is None:
        pipeline = Pipeline(standard_checks(cfg, free_disk=lambda: 10**12, resolver=resolver))
        pipeline.refresh()
    profile = cfg.session_profiles["trusted" if ip == "127.0.0.1" else "default"]
    settings = SessionSettings("mx1.example.test", 10**6, 100, profile=profile)
    return Session(settings, pipeline, ClientInfo(ip=ip), now=1_700_000_000.0), pipeline


def codes(actions):
    return [a.data[:3].decode() for a in actions if hasattr(a, "data")]


async def feed_all(s: Session, data: bytes):
    """Feed, resolving the checks that need I/O as the listener would; all actions."""
    out = s.feed(data)
    actions = list(out)
    while True:
        runs = [a for a in out if isinstance(a, RunChecks)]
        if not runs:
            return actions
        out = s.check_result(await runs[0].pending.resolve())
        actions += out


@pytest.mark.parametrize("sender, code, check", [
    ("a@nnn.con", "501", "sender_domain"),
    ("a@nullmx.test", "550", "sender_domain"),
    ("a@broken.test", "451", "sender_domain"),
    ("a@mx.test", "250", ""),
    ("a@aonly.test", "250", ""),
    ("", "250", ""),
    ("alice@example.test", "550", "sender_spoof"),
])
def test_sender_checks_cold_then_warm(sender, code, check):
    async def main():
        resolver = TableResolver(TABLE)
        s, pipeline = make_session(resolver)
        s.greeting()
        await feed_all(s, b"EHLO client.test\r\n")
        out = await feed_all(s, f"MAIL FROM:<{sender}>\r\n".encode())
        assert codes(out) == [code]
        assert [r.check for r in out if isinstance(r, Rejected)] == ([check] if check else [])
        # The same sender again, warm: the answer is given at once (no await).
        asked = len(resolver.asked)
        s2, _ = make_session(resolver, pipeline=pipeline)
        s2.greeting()
        s2.feed(b"EHLO client.test\r\n")
        out = s2.feed(f"MAIL FROM:<{sender}>\r\n".encode())
        if code != "451":  # a temporary failure is never cached
            assert not [a for a in out if isinstance(a, RunChecks)] and codes(out) == [code]
            assert len(resolver.asked) == asked
        s2.close()  # a check left pending is released unstarted
    asyncio.run(main())


def test_the_warm_common_path_has_no_await_and_names_the_client():
    async def main():
        resolver = TableResolver(TABLE)
        s, pipeline = make_session(resolver)
        s.greeting()
        await asyncio.sleep(0)  # the lookup started at connect runs meanwhile
        out = await feed_all(s, b"EHLO client.test\r\nMAIL FROM:<a@mx.test>\r\nRCPT TO:<alice@example.test>\r\n"
                                b"DATA\r\nSubject: x\r\n\r\nhi\r\n.\r\n")
        [store] = [a for a in out if isinstance(a, StoreMessage)]
        assert store.content.startswith(b"Received: from client.test (client.test [192.0.2.9])\r\n")
        s2, _ = make_session(resolver, pipeline=pipeline)
        s2.greeting()
        assert s2.client.name == "client.test"  # remembered: named at connect
        out = s2.feed(b"EHLO client.test\r\nMAIL FROM:<a@mx.test>\r\nRCPT TO:<alice@example.test>\r\n"
                      b"DATA\r\nSubject: x\r\n\r\nhi\r\n.\r\n")
        assert not [a for a in out if isinstance(a, RunChecks)]
        assert [a for a in out if isinstance(a, StoreMessage)]
    asyncio.run(main())


def test_a_ptr_tempfail_is_unknown_for_a_short_while_and_450_with_require_ptr():
    async def main():
        resolver = TableResolver(TABLE)
        s, pipeline = make_session(resolver, ip="192.0.2.8",
                                   profile_extra='[[session_profile]]\nname = "default"\nrequire_ptr = true\n')
        now = [1000.0]
        next(c for c in pipeline.checks if isinstance(c, ClientIdentityCheck))._clock = lambda: now[0]
        s.greeting()
        await feed_all(s, b"EHLO client.test\r\n")
        out = await feed_all(s, b"MAIL FROM:<a@mx.test>\r\n")
        assert codes(out) == ["450"]
        assert s.client.name == "unknown"
        check = next(c for c in pipeline.checks if isinstance(c, ClientIdentityCheck))
        assert check.known("192.0.2.8").status == Identity.TEMPFAIL  # not asked again at once
        now[0] += TEMPFAIL_TTL
        assert check.known("192.0.2.8") is None
        await check.aclose()
    asyncio.run(main())


def test_identify_confirms_the_forward_lookup():
    async def main():
        table = {**TABLE, ("client.test", "A"): (OK, ["192.0.2.99"])}
        check = ClientIdentityCheck(parse_config(CONFIG), TableResolver(table))
        assert (await check.identify("192.0.2.9")).status == Identity.MISMATCH
        assert (await check.identify("192.0.2.7")).status == Identity.NO_PTR
        check2 = ClientIdentityCheck(parse_config(CONFIG), TableResolver(TABLE))
        found = await check2.identify("192.0.2.9")
        assert (found.name, found.status) == ("client.test", Identity.FOUND)
    asyncio.run(main())


def test_relay_clients_are_not_looked_up():
    async def main():
        resolver = TableResolver(TABLE)
        s, _ = make_session(resolver, ip="127.0.0.1")
        s.greeting()
        await feed_all(s, b"EHLO x\r\nMAIL FROM:<a@nnn.con>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\nhi\r\n.\r\n")
        assert resolver.asked == []
        assert s.client.name == "unknown"
    asyncio.run(main())


def test_null_mx():
    def mx(*records):
        return DnsAnswer("d", "MX", OK, records, 300)
    assert is_null_mx(mx("0 ."))
    assert not is_null_mx(mx("0 .", "10 mx.d."))
    assert not is_null_mx(mx("10 mx.d."))


@pytest.mark.parametrize("name, kind", [
    ("mail.example.com", "fqdn"), ("mail.example.com.", "fqdn"), ("localhost", "host"), ("192.0.2.1", "host"),
    ("[192.0.2.1]", "literal"), ("[IPv6:2001:db8::1]", "literal"), ("[999.1.1.1]", "invalid"),
    ("bad_name.test", "invalid"), ("-x.test", "invalid"), ("a..b", "invalid"),
])
def test_helo_syntax(name, kind):
    assert helo_syntax(name) == kind


def test_address_literal():
    assert str(address_literal("[IPv6:2001:DB8::1]")) == "2001:db8::1"
    assert address_literal("192.0.2.1") is None


@pytest.mark.parametrize("arg", ["a@b.test", "<a@b.test>SIZE=1", " a@b.test"])
def test_strict_syntax_wants_angle_brackets(arg):
    with pytest.raises(SmtpError) as e:
        parse_path(arg, is_sender=True, smtputf8_allowed=False, strict=True)
    assert e.value.reply is replies.STRICT_SYNTAX
    assert parse_path(arg.replace("SIZE", " SIZE"), is_sender=True, smtputf8_allowed=False).address == "a@b.test"


def test_strict_syntax_takes_the_proper_forms():
    assert parse_path("<a@b.test> SIZE=10", is_sender=True, smtputf8_allowed=False, strict=True).params == {"SIZE": "10"}
    assert parse_path(" <>", is_sender=True, smtputf8_allowed=False, strict=True).address == ""
