"""DNS blocklists: refuse a client that the [[dnsbl]] zones list, postscreen style.

Role: at RCPT, look the client address up in every [[dnsbl]] zone at once (through the
checks' CheckResolver: cached by TTL, identical lookups shared), add up the weights of
the zones whose answer is one of the zone's `match` values, and refuse the recipient
with 554 5.7.1 naming the zone(s) when the sum reaches the profile's dnsbl_threshold.

Why RCPT and not connect: the profile is only known there for a client that
authenticates (submission after AUTH gets "trusted", no DNSBL); postmaster@ stays
reachable for a listed client asking to be let through (RFC 5321 4.5.1); each refusal is
logged with its sender and recipient, so an administrator can judge a false positive
(Postfix smtpd_delay_reject, postscreen's "enforce" action). The lookups of a session's
first RCPT are cached for its other recipients and the client's next sessions.

A zone that does not answer (timeout, SERVFAIL) counts as not listed for that zone,
like postscreen: one dead blocklist must not tempfail every client. The failure is a
DnsblLookupFailed effect (logged by the listener) and is remembered for FAILED_TTL
seconds, so the session's next recipients do not wait for it again.

Trusts: the configuration; DNS answers are data compared with the configured networks.
Never: block the event loop (lookups are awaited, in parallel), query for an
allowlisted client or a profile whose threshold is 0, turn a DNS failure into a listing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from kanmon.config import Config, DnsblSection, SessionProfile
from kanmon.model import Reply
from kanmon.policy.dns import CheckResolver, DnsAnswer, DnsStatus, dnsbl_name
from kanmon.policy.pipeline import ACCEPTED, Check, CheckResult, Context, Stage, reject
from kanmon.policy.profiles import client_profile

FAILED_TTL = 60.0  # seconds a failed lookup counts as "not listed" without asking again
MAX_FAILED = 10_000


def blocked_reply(ip: str, zones: Sequence[str]) -> Reply:
    """554 5.7.1 Service unavailable; client [ip] blocked using zone[, zone...]."""
    return Reply(554, "5.7.1", f"Service unavailable; client [{ip}] blocked using {', '.join(zones)}")


@dataclass(frozen=True, slots=True)
class DnsblLookupFailed:
    """Effect: a zone did not answer about a client (counted as not listed); the listener logs it."""

    ip: str
    zone: str
    error: str


def dnsbl_effect_handlers(on_failure: Callable[[DnsblLookupFailed], Any]) -> dict[type, Callable[[Any], Awaitable[None]]]:
    """The listener's handler for DnsblLookupFailed: on_failure(effect) (records an event)."""

    async def handle(effect: DnsblLookupFailed) -> None:
        on_failure(effect)

    return {DnsblLookupFailed: handle}


def lookup_address(ip: str) -> str | None:
    """The address a blocklist is asked about (an IPv4-mapped IPv6 as IPv4), or None."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return None
    if addr.version == 6 and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return str(addr)


class DnsblCheck(Check):
    """RCPT: refuse a client listed by [[dnsbl]] zones whose weights reach the threshold."""

    name = "dnsbl"

    def __init__(self, config: Config, resolver: CheckResolver, *, clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.resolver = resolver
        self.zones: tuple[DnsblSection, ...] = tuple(config.dnsbl)
        self.allowlist = tuple(config.dnsbl_allowlist.networks)
        # The lookups of all zones run in parallel: one DNS timeout, and a margin.
        self.timeout = resolver.timeout + 2.0
        self._clock = clock
        self._failed: dict[str, tuple[float, str]] = {}  # query name -> (until, error)

    def active(self, stage: Stage, profile: SessionProfile) -> bool:
        return profile.dnsbl_threshold > 0  # off: the hook accepts every client of the profile

    def rcpt(self, ctx: Context) -> CheckResult | Awaitable[CheckResult]:
        client = ctx.client
        threshold = client_profile(ctx, self.config).dnsbl_threshold
        if threshold <= 0:
            return ACCEPTED
        if ctx.rcpt is not None and ctx.rcpt.local.lower() == "postmaster":
            return ACCEPTED  # RFC 5321 4.5.1: a listed client may still write to postmaster
        ip = lookup_address(client.ip)
        if ip is None or self.allowlisted(ip):
            return ACCEPTED
        names = [dnsbl_name(ip, z.zone) for z in self.zones]
        answers: list[DnsAnswer | None] = [self._known(n) for n in names]
        if all(a is not None for a in answers):
            return self._decide(ip, threshold, answers)  # type: ignore[arg-type]
        return self._lookup(ip, threshold, names, answers)

    def allowlisted(self, ip: str) -> bool:
        addr = ipaddress.ip_address(ip)
        return any(addr in net for net in self.allowlist)

    def _known(self, name: str) -> DnsAnswer | None:
        """The answer without asking: the resolver's cache, or a recent failure."""
        answer = self.resolver.cached_nowait(name, "A")
        if answer is not None:
            return answer
        failed = self._failed.get(name)
        if failed is not None:
            if failed[0] > self._clock():
                return DnsAnswer(name, "A", DnsStatus.TEMPFAIL, error=failed[1])
            del self._failed[name]
        return None

    async def _lookup(self, ip: str, threshold: int, names: list[str], answers: list[DnsAnswer | None]) -> CheckResult:
        missing = [i for i, a in enumerate(answers) if a is None]
        found = await asyncio.gather(*(self.resolver.query(names[i], "A") for i in missing))
        effects = []
        for i, answer in zip(missing, found):
            answers[i] = answer
            if answer.temporary:
                self._remember_failure(names[i], answer.error)
                effects.append(DnsblLookupFailed(ip, self.zones[i].zone, answer.error or "temporary failure"))
        result = self._decide(ip, threshold, answers)  # type: ignore[arg-type]
        return dataclasses.replace(result, effects=tuple(effects)) if effects else result

    def _remember_failure(self, name: str, error: str) -> None:
        if len(self._failed) >= MAX_FAILED:
            now = self._clock()
            for k in [k for k, (until, _e) in self._failed.items() if until <= now]:
                del self._failed[k]
            while len(self._failed) >= MAX_FAILED:
                del self._failed[next(iter(self._failed))]
        self._failed[name] = (self._clock() + FAILED_TTL, error)

    def listing(self, answers: Sequence[DnsAnswer]) -> tuple[int, list[str]]:
        """(the sum of the weights, the zones) of the zones whose answer counts as listed."""
        score, zones = 0, []
        for zone, answer in zip(self.zones, answers):
            if answer.ok and _matches(answer.records, zone.match):
                score += zone.weight
                zones.append(zone.zone)
        return score, zones

    def _decide(self, ip: str, threshold: int, answers: Sequence[DnsAnswer]) -> CheckResult:
        score, zones = self.listing(answers)
        if zones and score >= threshold:
            return reject(blocked_reply(ip, zones))
        return ACCEPTED


def _matches(records: Sequence[str], networks: Sequence[Any]) -> bool:
    for r in records:
        try:
            addr = ipaddress.ip_address(r)
        except ValueError:
            continue
        if any(addr.version == net.version and addr in net for net in networks):
            return True
    return False
