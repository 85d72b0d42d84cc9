"""DnsMonitor: the periodic DNS check inside `kanmon serve`, driven by a fake clock
against the real loopback DNS server. It alerts when a domain gets worse, logs when it
gets better, and survives a check that cannot run."""

from __future__ import annotations

import asyncio
from pathlib import Path

import dns.resolver
import pytest

from kanmon.config import Config, parse_config
from kanmon.dnscheck.monitor import DnsMonitor
from tests.support.dnsserver import DnsServer

IP = "203.0.113.3"
GOOD = {
    "example.test": ["MX 10 relay.example.test.", f'TXT "v=spf1 ip4:{IP} -all"'],
    "_dmarc.example.test": ['TXT "v=DMARC1; p=reject"'],
    "relay.example.test": [f"A {IP}"],
    "3.113.0.203.in-addr.arpa": ["PTR relay.example.test."],
}


class FakeClock:
    """now() is fixed until the test wakes the sleeper; sleep() records its argument."""

    def __init__(self) -> None:
        self.t = 1_000_000.0
        self.sleeps: list[float] = []
        self._asleep = asyncio.Event()
        self._wake: asyncio.Future[None] | None = None

    def now(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self._wake = asyncio.get_running_loop().create_future()
        self._asleep.set()
        await self._wake

    async def wait_asleep(self) -> None:
        await asyncio.wait_for(self._asleep.wait(), 10)
        self._asleep.clear()

    def wake(self) -> None:
        assert self._wake is not None
        self.t += self.sleeps[-1]
        self._wake.set_result(None)


@pytest.fixture(autouse=True)
def no_system_resolver(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the system resolver must not be used in tests")

    monkeypatch.setattr(dns.resolver.Resolver, "read_resolv_conf", refuse)


def config_for(server: DnsServer, extra: str = "") -> Config:
    return parse_config(
        f'[server]\nhostname = "relay.example.test"\n\n'
        f'[dns]\nservers = ["{server.address}"]\ntimeout = "1s"\n\n'
        f'[dnscheck]\nevery = "6h"\nips = ["{IP}"]\n{extra}\n'
        '[[domain]]\nname = "example.test"\n'
    )


def test_alerts_when_worse_logs_when_better() -> None:
    asyncio.run(_alerts_when_worse_logs_when_better())


async def _alerts_when_worse_logs_when_better() -> None:
    events: list[str] = []
    alerts: list[tuple[str, str]] = []
    clock = FakeClock()
    with DnsServer(records=GOOD) as server:
        monitor = DnsMonitor(config_for(server), events.append, lambda c, t: alerts.append((c, t)), clock)
        task = asyncio.create_task(monitor.run())
        try:
            await clock.wait_asleep()  # round 1: all good, nothing said
            assert clock.sleeps == [6 * 3600.0]
            assert events == [] and alerts == []
            assert monitor.last_reports[0].exit_code == 0

            broken = dict(GOOD)
            del broken["3.113.0.203.in-addr.arpa"]
            server.set_records(records=broken)
            clock.wake()
            await clock.wait_asleep()  # round 2: the PTR is gone
            assert events == [
                "dnscheck: example.test got worse (ok -> error): example.test: 1 error, 0 warnings, 7 ok (exit 2)"
            ]
            assert len(alerts) == 1 and alerts[0][0] == "dns"
            assert alerts[0][1].startswith("DNS check of example.test: ok -> error\n")
            assert f"ERROR ptr      {IP}: no PTR record for {IP}" in alerts[0][1]
            assert "IP name lookup failed" in alerts[0][1]

            clock.wake()
            await clock.wait_asleep()  # round 3: still broken: no repeat
            assert len(events) == 1 and len(alerts) == 1

            server.set_records(records=GOOD)
            clock.wake()
            await clock.wait_asleep()  # round 4: fixed: an event, no alert
            assert events[1] == "dnscheck: example.test better (error -> ok): example.test: 0 errors, 0 warnings, 9 ok (exit 0)"
            assert len(alerts) == 1
            assert monitor.last_run == clock.now()
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task


def test_a_check_that_cannot_run_is_an_event_and_the_loop_goes_on(tmp_path: Path) -> None:
    asyncio.run(_cannot_run(tmp_path))


async def _cannot_run(tmp_path: Path) -> None:
    events: list[str] = []
    clock = FakeClock()
    with DnsServer(records=GOOD) as server:
        cfg = config_for(server, f'dkim_selector = "sel1"\ndkim_key = "{tmp_path / "missing.pem"}"\n')
        monitor = DnsMonitor(cfg, events.append, None, clock)
        task = asyncio.create_task(monitor.run())
        try:
            await clock.wait_asleep()
            assert len(events) == 1 and events[0].startswith("dnscheck: cannot run: ")
            assert "missing.pem: cannot read" in events[0]
            (tmp_path / "missing.pem").write_text("not a key")
            clock.wake()
            await clock.wait_asleep()
            assert "missing.pem: not a PEM private or public key" in events[1]
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task


def test_off_without_every_or_domains() -> None:
    asyncio.run(_off())


async def _off() -> None:
    events: list[str] = []
    with DnsServer(records=GOOD) as server:
        cfg = parse_config(f'[dns]\nservers = ["{server.address}"]\n')
        await DnsMonitor(cfg, events.append, None, FakeClock()).run()  # returns at once
        assert events == []
        cfg = parse_config(f'[dns]\nservers = ["{server.address}"]\n[dnscheck]\nevery = "1h"\n')
        await DnsMonitor(cfg, events.append, None, FakeClock()).run()
        assert events == ["dnscheck: no domains to check ([dnscheck] domains or [[domain]]); periodic check off"]
        assert server.queries == []
