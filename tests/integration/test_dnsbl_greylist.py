"""DNSBL and greylisting over real sockets: the listener runs the standard checks with a
[dns] aimed at the loopback DNS server (which serves the blocklist zones) and the shared
state; greylisting runs on a clock the test advances (no sleeps)."""

from __future__ import annotations

import asyncio
import inspect
import subprocess
import sys
from pathlib import Path

from kanmon.config import parse_config
from kanmon.policy.dns import CheckResolver, dnsbl_name
from kanmon.policy.dnsbl import DnsblCheck, DnsblLookupFailed, dnsbl_effect_handlers
from kanmon.policy.greylist import GreylistCheck, client_network, greylisted_reply
from kanmon.model import ClientInfo
from kanmon.policy.pipeline import ACCEPTED, Context, Pipeline
from kanmon.policy.standard import standard_checks
from kanmon.records.events import DnsblLookupFailed as DnsblLookupFailedEvent
from kanmon.smtp.address import Path as SmtpPath, parse_path
from kanmon.smtp.server import SmtpServer
from kanmon.spool.store import Spool
from kanmon.state.api import MemoryState, Triplet
from kanmon.state.sqlite import SqliteState
from tests.integration.test_smtp_checks import Client, FakeRecords
from tests.support.dnsserver import DnsServer, dns_server  # noqa: F401  (fixture)

CONFIG = """
[server]
hostname = "mx1.example.test"
data_dir = "{data_dir}"
[smtp]
relay_networks = ["192.0.2.0/24"]
min_free_disk = "0"
[dns]
servers = ["{dns}"]
timeout = "{timeout}"
[[domain]]
name = "example.test"
mailboxes = ["alice", "bob", "carol", "dave", "postmaster"]
[[session_profile]]
name = "default"
greet_pause = "0s"
sender_domain_check = false
{profile}
{extra}
"""

ZEN = "zen.example.test"
BL2 = "bl2.example.test"
LISTED = {dnsbl_name("127.0.0.1", ZEN): ["A 127.0.0.2"]}


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


class Harness:
    """An SMTP listener on 127.0.0.1 with the standard checks (the client is 127.0.0.1:
    outside relay_networks, so the "default" profile applies)."""

    def __init__(self, tmp: Path, dns: DnsServer, *, profile: str = "", extra: str = "", timeout: str = "2s",
                 state=None, clock: Clock | None = None):
        self.config = parse_config(CONFIG.format(data_dir=tmp, dns=dns.address, timeout=timeout, profile=profile,
                                                 extra=extra))
        self.records = FakeRecords()
        self.stored: list[tuple[str, bytes]] = []
        self.failures: list[DnsblLookupFailed] = []
        self.spool = Spool(tmp, fsync=False)
        self.state = state if state is not None else MemoryState()
        self.clock = clock or Clock()
        self.resolver = CheckResolver.from_config(self.config)
        self.pipeline = Pipeline(standard_checks(self.config, free_disk=lambda: 10**12, state=self.state,
                                                 resolver=self.resolver, clock=self.clock))
        self.pipeline.refresh()

        def failed(e: DnsblLookupFailed) -> None:
            self.failures.append(e)
            self.records.record(DnsblLookupFailedEvent(e.ip, e.zone, e.error))

        self.server = SmtpServer(
            self.config, self.pipeline, self.spool, self.records,  # type: ignore[arg-type]
            lambda qid, env, content: self.stored.append((qid, content)), None,
            listeners=[("127.0.0.1", 0, False)], effects=dnsbl_effect_handlers(failed),
        )

    async def __aenter__(self) -> Harness:
        await self.server.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.server.stop()
        self.spool.close()

    async def session(self, sender: str = "x@remote.example") -> Client:
        host, port = self.server.addresses()[0]
        c = Client(*await asyncio.open_connection(host, port))
        assert (await c.reply()).startswith("220")
        assert (await c.command(b"EHLO client.example\r\n")).startswith("250")
        assert (await c.command(f"MAIL FROM:<{sender}>\r\n".encode())).startswith("250")
        return c

    async def rcpts(self, *rcpts: str, sender: str = "x@remote.example") -> list[str]:
        """One transaction: the replies to RCPT TO each address, then QUIT."""
        c = await self.session(sender)
        out = [await c.command(f"RCPT TO:<{r}>\r\n".encode()) for r in rcpts]
        await c.command(b"QUIT\r\n")
        await c.close()
        return out

    def refusals(self) -> list[dict]:
        return [d for _t, kind, d in self.records.events if kind == "reject"]


def dnsbl_config(*zones: tuple[str, int, str]) -> str:
    return "\n".join(f'[[dnsbl]]\nzone = "{z}"\nweight = {w}\nmatch = [{m}]' for z, w, m in zones)


def asked(dns: DnsServer, zone: str) -> int:
    return sum(1 for q in dns.queries if q.name.rstrip(".").endswith(zone))


def rcpt_path(address: str) -> SmtpPath:
    return parse_path(f"<{address}>", is_sender=False, smtputf8_allowed=False)


# -- DNSBL ---------------------------------------------------------------------------------


def test_a_listed_client_is_refused_at_rcpt_naming_the_zone(tmp_path, dns_server):
    dns_server.set_records(records=LISTED)

    async def main() -> None:
        async with Harness(tmp_path, dns_server, profile="dnsbl_threshold = 3",
                           extra=dnsbl_config((ZEN, 3, '"127.0.0.2/31"'))) as h:
            replies = await h.rcpts("alice@example.test", "bob@example.test", "postmaster@example.test")
            blocked = f"554 5.7.1 Service unavailable; client [127.0.0.1] blocked using {ZEN}"
            assert replies[:2] == [blocked, blocked]
            assert replies[2].startswith("250")  # RFC 5321 4.5.1: postmaster stays reachable
            assert asked(dns_server, ZEN) == 1  # the second recipient (and session) use the cache
            assert await h.rcpts("carol@example.test") == [blocked]
            assert asked(dns_server, ZEN) == 1
            refused = h.refusals()
            assert [d["check"] for d in refused] == ["dnsbl"] * 3
            assert refused[0]["rcpt"] == "alice@example.test" and refused[0]["mail_from"] == "x@remote.example"

    asyncio.run(main())


def test_a_client_not_listed_or_with_an_answer_that_does_not_count_is_accepted(tmp_path, dns_server):
    dns_server.set_records(records={dnsbl_name("127.0.0.1", BL2): ["A 127.0.0.10"]})  # ZEN: NXDOMAIN

    async def main() -> None:
        async with Harness(tmp_path, dns_server,
                           extra=dnsbl_config((ZEN, 1, '"127.0.0.2"'), (BL2, 1, '"127.0.0.2/31"'))) as h:
            assert [r[:3] for r in await h.rcpts("alice@example.test")] == ["250"]
            assert asked(dns_server, ZEN) == 1 and asked(dns_server, BL2) == 1
            assert not h.failures and not h.refusals()

    asyncio.run(main())


def test_an_allowlisted_client_is_never_looked_up(tmp_path, dns_server):
    dns_server.set_records(records=LISTED)

    async def main() -> None:
        async with Harness(tmp_path, dns_server, extra=dnsbl_config((ZEN, 1, '"127.0.0.2"'))
                           + '\n[dnsbl_allowlist]\nnetworks = ["127.0.0.0/24"]') as h:
            assert [r[:3] for r in await h.rcpts("alice@example.test")] == ["250"]
            assert asked(dns_server, ZEN) == 0

    asyncio.run(main())


def test_weights_below_the_threshold_accept_and_reaching_it_refuse_naming_every_zone(tmp_path, dns_server):
    dns_server.set_records(records=LISTED)

    async def main() -> None:
        zones = dnsbl_config((ZEN, 2, '"127.0.0.2"'), (BL2, 1, '"127.0.0.0/24"'))
        async with Harness(tmp_path, dns_server, profile="dnsbl_threshold = 3", extra=zones) as h:
            assert [r[:3] for r in await h.rcpts("alice@example.test")] == ["250"]  # 2 < 3
        dns_server.add_records(records={dnsbl_name("127.0.0.1", BL2): ["A 127.0.0.4"]})
        async with Harness(tmp_path, dns_server, profile="dnsbl_threshold = 3", extra=zones) as h:
            assert await h.rcpts("alice@example.test") == [
                f"554 5.7.1 Service unavailable; client [127.0.0.1] blocked using {ZEN}, {BL2}"]

    asyncio.run(main())


def test_a_zone_that_times_out_counts_as_not_listed_and_is_logged(tmp_path, dns_server):
    dns_server.set_records(records={dnsbl_name("127.0.0.1", BL2): ["A 127.0.0.2"]})
    dns_server.drop(dnsbl_name("127.0.0.1", ZEN))

    async def main() -> None:
        zones = dnsbl_config((ZEN, 1, '"127.0.0.2"'), (BL2, 1, '"127.0.0.2"'))
        async with Harness(tmp_path, dns_server, profile="dnsbl_threshold = 2", extra=zones, timeout="0.3s") as h:
            # BL2 lists the client (weight 1 < 2); ZEN times out: not listed, not a tempfail.
            assert [r[:3] for r in await h.rcpts("alice@example.test", "bob@example.test")] == ["250", "250"]
            assert h.failures == [DnsblLookupFailed("127.0.0.1", ZEN, "timed out")]  # once: remembered
            assert asked(dns_server, ZEN) >= 1
            lines = [t for t, kind, _d in h.records.events if kind == "dnsbl-failed"]
            assert lines == [f"warning: dnsbl {ZEN}: lookup of [127.0.0.1] failed (timed out); counted as not listed"]
            assert not h.refusals()

    asyncio.run(main())


def test_trusted_clients_and_profiles_with_threshold_0_skip_the_dnsbl(dns_server):
    dns_server.set_records(records=LISTED)
    cfg = parse_config(f'[dns]\nservers = ["{dns_server.address}"]\n[smtp]\nrelay_networks = ["127.0.0.0/8"]\n'
                       + dnsbl_config((ZEN, 1, '"127.0.0.2"')))
    check = DnsblCheck(cfg, CheckResolver.from_config(cfg))
    rcpt = rcpt_path("alice@example.test")
    assert check.rcpt(Context(ClientInfo(ip="127.0.0.1"), rcpt=rcpt)) is ACCEPTED  # relay_networks: trusted
    assert check.rcpt(Context(ClientInfo(ip="192.0.2.1", auth_user="u"), rcpt=rcpt)) is ACCEPTED  # authenticated
    assert asked(dns_server, ZEN) == 0
    # No [[dnsbl]] zone, or no profile with a threshold: the check is not in the pipeline.
    assert "dnsbl" not in [c.name for c in standard_checks(parse_config(""), free_disk=lambda: 1)]


# -- greylisting -------------------------------------------------------------------------------

GREY = "greylist = true\ngreylist_pass_count = 2"


def test_greylisting_first_try_early_retry_retry_in_window_and_remembered(tmp_path, dns_server):
    async def main() -> None:
        clock = Clock()
        async with Harness(tmp_path, dns_server, profile=GREY, clock=clock) as h:
            assert await h.rcpts("alice@example.test") == ["451 4.7.1 Greylisted, try again in 300 seconds"]
            clock.now += 100
            assert await h.rcpts("alice@example.test") == ["451 4.7.1 Greylisted, try again in 200 seconds"]
            clock.now += 201  # 301 s after the first try: in the window
            c = await h.session()
            assert (await c.command(b"RCPT TO:<alice@example.test>\r\n")).startswith("250")
            assert (await c.command(b"DATA\r\n")).startswith("354")
            assert (await c.command(b"Subject: hi\r\n\r\nhello\r\n.\r\n")).startswith("250 2.0.0")
            await c.close()
            assert len(h.stored) == 1
            clock.now += 30 * 86400  # a passed triplet is remembered
            assert [r[:3] for r in await h.rcpts("alice@example.test")] == ["250"]
            refused = h.refusals()
            assert [d["check"] for d in refused] == ["greylist", "greylist"]
            assert refused[0]["reply"] == str(greylisted_reply(300))

    asyncio.run(main())


def test_each_recipient_and_sender_is_its_own_triplet_and_the_client_network_is_the_24(tmp_path, dns_server):
    async def main() -> None:
        clock = Clock()
        async with Harness(tmp_path, dns_server, profile=GREY, clock=clock) as h:
            assert [r[:3] for r in await h.rcpts("alice@example.test", "bob@example.test")] == ["451", "451"]
            clock.now += 400
            assert [r[:3] for r in await h.rcpts("alice@example.test", "carol@example.test")] == ["250", "451"]
            assert [r[:3] for r in await h.rcpts("alice@example.test", sender="y@remote.example")] == ["451"]
            states = {s.triplet.recipient: s for s in h.state.greylist.list("127.0.0.0/24")}
            assert set(states) == {"alice@example.test", "bob@example.test", "carol@example.test"}

    asyncio.run(main())


def test_a_client_that_passed_n_times_skips_greylisting(tmp_path, dns_server):
    async def main() -> None:
        clock = Clock()
        async with Harness(tmp_path, dns_server, profile=GREY, clock=clock) as h:
            assert [r[:3] for r in await h.rcpts("alice@example.test", "bob@example.test")] == ["451", "451"]
            clock.now += 300
            assert [r[:3] for r in await h.rcpts("alice@example.test", "bob@example.test")] == ["250", "250"]
            assert h.state.greylist.client_passes("127.0.0.0/24") == 2
            # pass_count 2 reached: a new triplet is accepted at once.
            assert [r[:3] for r in await h.rcpts("dave@example.test", sender="new@remote.example")] == ["250"]

    asyncio.run(main())


def test_a_triplet_not_retried_within_the_window_starts_over_and_old_ones_are_pruned(tmp_path, dns_server):
    async def main() -> None:
        clock = Clock()
        async with Harness(tmp_path, dns_server, profile=GREY, clock=clock) as h:
            assert [r[:3] for r in await h.rcpts("alice@example.test")] == ["451"]
            clock.now += 2 * 86400 + 1  # past the window: the retry is a first try again
            assert await h.rcpts("alice@example.test") == ["451 4.7.1 Greylisted, try again in 300 seconds"]
            clock.now += 300
            assert [r[:3] for r in await h.rcpts("alice@example.test")] == ["250"]  # passed
            assert [r[:3] for r in await h.rcpts("bob@example.test")] == ["451"]  # never retried
            clock.now += 37 * 86400
            h.pipeline.refresh()  # the hourly prune: bob's (window) and alice's (36 days unused)
            assert h.state.greylist.list() == []
            assert [r[:3] for r in await h.rcpts("alice@example.test")] == ["451"]
            h.pipeline.refresh()  # at most once an hour: nothing pruned yet
            assert len(h.state.greylist.list()) == 1

    asyncio.run(main())


def test_profiles_without_greylisting_and_trusted_clients_skip_it(tmp_path, dns_server):
    async def main() -> None:
        async with Harness(tmp_path, dns_server) as h:  # greylist off by default
            assert "greylist" not in [c.name for c in h.pipeline.checks]
            assert [r[:3] for r in await h.rcpts("alice@example.test")] == ["250"]

    asyncio.run(main())
    cfg = parse_config('[smtp]\nrelay_networks = ["127.0.0.0/8"]\n[[session_profile]]\nname = "default"\ngreylist = true')
    check = GreylistCheck(cfg, MemoryState())
    assert check.rcpt(Context(ClientInfo(ip="127.0.0.1"), rcpt=rcpt_path("a@example.test"))) is ACCEPTED
    assert client_network("2001:db8:1:2:3::1") == "2001:db8:1:2::/64"
    assert client_network("::ffff:192.0.2.77") == "192.0.2.0/24"


SECOND_PROCESS = """
import sys
from kanmon.config import parse_config
from kanmon.policy.greylist import GreylistCheck
from kanmon.state.api import Triplet
from kanmon.state.sqlite import SqliteState

state = SqliteState(sys.argv[1])
cfg = parse_config('[[session_profile]]\\nname = "default"\\ngreylist = true')
check = GreylistCheck(cfg, state)
print(check.decide(Triplet("192.0.2.0/24", "x@remote.example", "alice@example.test"),
                   cfg.session_profiles["default"], float(sys.argv[2])))
state.close()
"""


def test_the_greylist_is_shared_by_processes(tmp_path):
    """A first try seen by one receiver process is the first try for another one too."""
    cfg = parse_config('[[session_profile]]\nname = "default"\ngreylist = true')
    state = SqliteState(tmp_path)
    try:
        check = GreylistCheck(cfg, state)
        t = Triplet("192.0.2.0/24", "x@remote.example", "alice@example.test")
        now = 1_800_000_000.0
        assert check.decide(t, cfg.session_profiles["default"], now) == 300.0

        def other(at: float) -> float:
            out = subprocess.run([sys.executable, "-c", SECOND_PROCESS, str(tmp_path), str(at)], check=True,
                                 capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2])
            return float(out.stdout)

        assert other(now + 60) == 240.0  # the other process knows the first try
        assert other(now + 301) == 0.0  # and passes the retry
        assert state.greylist.client_passes("192.0.2.0/24") == 1
        assert check.decide(t, cfg.session_profiles["default"], now + 400) == 0.0
    finally:
        state.close()


def test_a_warm_cache_answers_at_once_and_a_remembered_timeout_is_not_asked_again(dns_server):
    dns_server.set_records(records=LISTED)
    dns_server.drop(dnsbl_name("127.0.0.1", BL2))
    cfg = parse_config(f'[dns]\nservers = ["{dns_server.address}"]\ntimeout = "0.3s"\n[smtp]\nrelay_networks = []\n'
                       + dnsbl_config((ZEN, 1, '"127.0.0.2"'), (BL2, 1, '"127.0.0.2"')))
    now = [0.0]
    check = DnsblCheck(cfg, CheckResolver.from_config(cfg), clock=lambda: now[0])
    ctx = Context(ClientInfo(ip="127.0.0.1"), rcpt=rcpt_path("alice@example.test"))

    async def main() -> None:
        first = await check.rcpt(ctx)  # type: ignore[misc]
        assert first.outcome.value == "reject" and first.effects == (DnsblLookupFailed("127.0.0.1", BL2, "timed out"),)
        again = check.rcpt(ctx)  # ZEN cached by TTL, BL2's failure remembered: no await, no effect
        assert again.reply == first.reply and again.effects == ()
        now[0] += 61  # the failure is forgotten: BL2 is asked again
        third = check.rcpt(ctx)
        assert inspect.isawaitable(third)
        assert (await third).effects == first.effects

    asyncio.run(main())
    assert asked(dns_server, ZEN) == 1


# -- a whole node -------------------------------------------------------------------------------

NODE = """
[server]
hostname = "mx1.example.test"
data_dir = "{data_dir}"
[smtp]
listen = ["{host}:{port}"]
relay_networks = []
min_free_disk = "1MB"
[dns]
servers = ["{dns}"]
timeout = "0.5s"
[[domain]]
name = "example.test"
mailboxes = ["alice"]
[[session_profile]]
name = "default"
greet_pause = "0s"
sender_domain_check = false
greylist = true
[[dnsbl]]
zone = "zen.example.test"
match = ["127.0.0.2"]
"""


def test_a_node_runs_the_dnsbl_and_greylisting_with_its_clock_and_logs_a_zone_timeout(tmp_path, dns_server):
    """Clients from 127.0.0.1 (not listed), 127.0.0.2 (listed) and 127.0.0.3 (the zone
    times out) talk to a real node whose [dns] is the loopback server."""
    import smtplib

    from kanmon.clock import ManualClock
    from kanmon.records.query import search_events
    from tests.support.kanmon_node import RunningNode, free_port

    dns_server.set_records(records={dnsbl_name("127.0.0.2", ZEN): ["A 127.0.0.2"]})
    dns_server.drop(dnsbl_name("127.0.0.3", ZEN))
    cfg = parse_config(NODE.format(data_dir=tmp_path / "data", host="127.0.0.1", port=free_port(), dns=dns_server.address))

    def rcpt(node: RunningNode, source: str) -> tuple[int, bytes]:
        with smtplib.SMTP(node.host, node.port, timeout=10, source_address=(source, 0)) as s:
            s.ehlo("client.example")
            assert s.mail("x@remote.example")[0] == 250
            return s.rcpt("alice@example.test")

    with RunningNode(cfg, clock=ManualClock(), fsync=False) as node:
        assert rcpt(node, "127.0.0.1") == (451, b"4.7.1 Greylisted, try again in 300 seconds")
        assert rcpt(node, "127.0.0.2") == (554, b"5.7.1 Service unavailable; client [127.0.0.2] blocked using " + ZEN.encode())
        assert rcpt(node, "127.0.0.3")[0] == 451  # the zone timed out: not listed, greylisted
        node.advance(301)
        assert rcpt(node, "127.0.0.1")[0] == 250
        node.flush()
        rows = search_events(node.data_dir)
        assert [r.text for r in rows if r.kind == "dnsbl-failed"] == [
            f"warning: dnsbl {ZEN}: lookup of [127.0.0.3] failed (timed out); counted as not listed"]
        assert sorted(r.fields["check"] for r in rows if r.kind == "reject") == ["dnsbl", "greylist", "greylist"]
