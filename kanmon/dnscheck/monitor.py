"""The DNS health check inside `kanmon serve`: run it every `[dnscheck] every`, and say
so when a domain's DNS gets worse.

Role: a loop owned by the server's TaskGroup. Each round runs the same checks as
`kanmon dns check` (targets.py, checks.py) in a worker thread, so slow DNS never blocks
the event loop; compares each domain's worst severity with the previous round; when it
gets worse, writes one event line (emit) and raises the `dns` alert category (alert);
when it gets better, writes an event line only. The first round compares with "ok",
so a server started on broken DNS says so at once.

Trusts: the Config (validated). DNS answers are data, judged by checks.py.
Never: stop the server: a check that fails unexpectedly is an event line and the loop
goes on; never sleep on the wall clock itself (the clock is passed in, tests drive it).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

from kanmon.config import Config
from kanmon.dnscheck.checks import Report, Severity, check_domain
from kanmon.dnscheck.report import problem_summary, summary_line
from kanmon.dnscheck.sources import SourceError
from kanmon.dnscheck.targets import TargetError, make_source, make_targets


class Clock(Protocol):
    def now(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class DnsMonitor:
    def __init__(
        self,
        config: Config,
        emit: Callable[[str], None],
        alert: Callable[[str, str], None] | None,
        clock: Clock,
    ):
        self.config = config
        self.emit = emit
        self.alert = alert
        self.clock = clock
        self.interval = config.dnscheck.every
        self.previous: dict[str, Severity] = {}  # domain -> worst severity of the last round
        self.last_reports: list[Report] = []
        self.last_run: float | None = None

    def check_now(self) -> list[Report]:
        """One round of checks, blocking (DNS lookups); run it in a thread."""
        source = make_source(self.config)
        return [check_domain(source, t) for t in make_targets(self.config)]

    def observe(self, reports: list[Report]) -> None:
        """Compare with the previous round; emit and alert on what got worse."""
        for report in reports:
            before = self.previous.get(report.domain, Severity.OK)
            now = report.worst
            self.previous[report.domain] = now
            if now > before:
                text = problem_summary(report)
                self.emit(f"dnscheck: {report.domain} got worse ({before.label} -> {now.label}): {summary_line(report)}")
                if self.alert is not None:
                    self.alert("dns", f"DNS check of {report.domain}: {before.label} -> {now.label}\n{text}")
            elif now < before:
                self.emit(f"dnscheck: {report.domain} better ({before.label} -> {now.label}): {summary_line(report)}")
        self.last_reports = reports

    async def run_once(self) -> None:
        try:
            reports = await asyncio.to_thread(self.check_now)
        except (SourceError, TargetError) as e:
            self.emit(f"dnscheck: cannot run: {e}")
            return
        except Exception as e:  # noqa: BLE001 - the server goes on; the event says what broke
            self.emit(f"dnscheck: check failed unexpectedly: {type(e).__name__}: {e}")
            return
        self.last_run = self.clock.now()
        self.observe(reports)

    async def run(self) -> None:
        """Loop forever (until cancelled); returns at once when [dnscheck] every is not set."""
        if not self.interval:
            return
        if not domains_to_check(self.config):
            self.emit("dnscheck: no domains to check ([dnscheck] domains or [[domain]]); periodic check off")
            return
        while True:
            await self.run_once()
            await self.clock.sleep(self.interval)


def domains_to_check(config: Config) -> list[str]:
    """The domains the monitor would check, without touching files or DNS."""
    return list(config.dnscheck.domains) or [d.name for d in config.domain]
