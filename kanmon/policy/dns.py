"""DNS for the checks: an asynchronous resolver with a small TTL-respecting cache.

Role: answer the edge checks' questions (sender domain MX/A/AAAA, client PTR and its
forward confirmation, DNSBL zones, HELO names) with typed answers: OK (records),
NXDOMAIN, NODATA (the name exists without that type) or TEMPFAIL (server failure,
timeout). Positive answers are cached for their TTL, negative ones for the zone's
negative TTL (RFC 2308: the SOA's minimum, capped), so a warm check answers without
an await (cached_nowait). Identical queries in flight share one lookup.

Configured like the delivery resolver (kanmon.deliver.mx): the [dns] servers (tests aim
them at the loopback DNS server) or the system's, and [dns] timeout for each lookup.

Trusts: the configuration. Answers are untrusted data: records are kept as text
(rdata.to_text()), at most MAX_RECORDS per answer; the cache holds at most max_entries.
Never: block the event loop, resolve without a timeout, cache a temporary failure, or
turn a temporary failure into NXDOMAIN.
"""

from __future__ import annotations

import asyncio
import enum
import ipaddress
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver
import dns.reversename

from kanmon.aio import kept

if TYPE_CHECKING:
    from kanmon.config import Config
    from kanmon.dnscache import DnsCache

MAX_RECORDS = 32  # records kept per answer
DEFAULT_NEGATIVE_TTL = 300.0  # an NXDOMAIN/NODATA without an SOA is remembered this long
MAX_NEGATIVE_TTL = 3 * 3600.0  # RFC 2308 5 suggests 1-3 hours at most
MAX_TTL = 86400.0


class DnsStatus(enum.Enum):
    OK = "ok"
    NXDOMAIN = "nxdomain"
    NODATA = "nodata"
    TEMPFAIL = "tempfail"


@dataclass(frozen=True, slots=True)
class DnsAnswer:
    name: str  # as asked, lower case, no final dot
    rdtype: str  # "A", "MX"...
    status: DnsStatus
    records: tuple[str, ...] = ()  # rdata as text: "192.0.2.1", "10 mx.example.", "mx.example."
    ttl: float = 0.0  # seconds this answer is good for (0: not cached)
    error: str = ""  # TEMPFAIL: what happened ("timed out", "server failure"...)

    @property
    def ok(self) -> bool:
        return self.status is DnsStatus.OK

    @property
    def exists(self) -> bool:
        """The name exists (records of this type or not)."""
        return self.status in (DnsStatus.OK, DnsStatus.NODATA)

    @property
    def temporary(self) -> bool:
        return self.status is DnsStatus.TEMPFAIL


def _key(name: str, rdtype: str) -> tuple[str, str]:
    return (name.lower().rstrip("."), rdtype.upper())


def reverse_name(ip: str) -> str:
    """'192.0.2.1' -> '1.2.0.192.in-addr.arpa' (and ip6.arpa for IPv6)."""
    return dns.reversename.from_address(ip).to_text(omit_final_dot=True)


def dnsbl_name(ip: str, zone: str) -> str:
    """The name to ask a DNSBL about ip: its reversed address under zone."""
    addr = ipaddress.ip_address(ip)
    rev = dns.reversename.from_address(str(addr)).to_text(omit_final_dot=True)
    suffix = ".in-addr.arpa" if addr.version == 4 else ".ip6.arpa"
    return f"{rev.removesuffix(suffix)}.{zone.rstrip('.')}"


class CheckResolver:
    """Typed, cached DNS lookups for the checks (see the module docstring).

    clock: monotonic seconds for the cache (tests pass one they advance).
    """

    def __init__(
        self, *, servers: Sequence[tuple[str, int]] = (), timeout: float = 5.0,
        clock: Callable[[], float] = time.monotonic, max_entries: int = 10_000, cache: DnsCache | None = None,
    ):
        if timeout <= 0:
            raise ValueError("DNS timeout must be positive")
        if servers:
            self._resolver = dns.asyncresolver.Resolver(configure=False)
            self._resolver.nameservers = [dns.nameserver.Do53Nameserver(ip, p) for ip, p in servers]
        else:
            try:
                self._resolver = dns.asyncresolver.Resolver()
            except dns.resolver.NoResolverConfiguration:
                # No usable /etc/resolv.conf: every query is a temporary failure (the
                # checks tempfail) rather than a node that cannot start.
                self._resolver = dns.asyncresolver.Resolver(configure=False)
        self._resolver.timeout = timeout
        self._resolver.lifetime = timeout
        # Typed answers cached below; the node's DNS cache (kanmon.dnscache), when given,
        # under it: shared with delivery, it hands out TTLs lowered to what is left.
        self._resolver.cache = cache
        if cache is not None:
            cache.on_flush(self.clear)
        self.timeout = timeout
        self._clock = clock
        self._max_entries = max_entries
        self._cache: dict[tuple[str, str], tuple[float, DnsAnswer]] = {}  # key -> (expires, answer)
        self._inflight: dict[tuple[str, str], asyncio.Future[DnsAnswer]] = {}
        self.lookups = 0  # queries sent (not answered from the cache): for tests and stats

    @classmethod
    def from_config(cls, config: Config, **kw) -> CheckResolver:
        return cls(servers=config.dns.servers, timeout=config.dns.timeout, **kw)

    # -- cache

    def cached_nowait(self, name: str, rdtype: str) -> DnsAnswer | None:
        """The cached answer, or None: lets a check answer at once when the cache is warm."""
        key = _key(name, rdtype)
        hit = self._cache.get(key)
        if hit is None:
            return None
        if hit[0] <= self._clock():
            del self._cache[key]
            return None
        return hit[1]

    def _remember(self, answer: DnsAnswer) -> None:
        if answer.ttl <= 0 or answer.status is DnsStatus.TEMPFAIL:
            return
        key = _key(answer.name, answer.rdtype)
        if key not in self._cache and len(self._cache) >= self._max_entries:
            now = self._clock()
            for k in [k for k, (exp, _a) in self._cache.items() if exp <= now]:
                del self._cache[k]
            while len(self._cache) >= self._max_entries:
                del self._cache[next(iter(self._cache))]  # the oldest inserted
        self._cache[key] = (self._clock() + answer.ttl, answer)

    def clear(self) -> None:
        self._cache.clear()

    # -- queries

    async def query(self, name: str, rdtype: str) -> DnsAnswer:
        """name's records of rdtype, from the cache or DNS; never raises for DNS trouble."""
        cached = self.cached_nowait(name, rdtype)
        if cached is not None:
            return cached
        key = _key(name, rdtype)
        while (running := self._inflight.get(key)) is not None:
            try:
                return await asyncio.shield(running)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if not running.cancelled() or (task is not None and task.cancelling()):
                    raise  # this asker is being stopped
                # The asker whose lookup it was was stopped (its client left): ask again.
        fut: asyncio.Future[DnsAnswer] = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        try:
            answer = await self._lookup(*key)
        except BaseException:
            fut.cancel()  # this asker was stopped (or a bug): the others ask again, above
            raise
        finally:
            del self._inflight[key]
        self._remember(answer)
        fut.set_result(answer)
        return answer

    async def _lookup(self, name: str, rdtype: str) -> DnsAnswer:
        self.lookups += 1
        try:
            qname = dns.name.from_text(name)
        except dns.exception.DNSException as e:
            # Not a valid DNS name (an overlong label...): no such domain.
            return DnsAnswer(name, rdtype, DnsStatus.NXDOMAIN, ttl=DEFAULT_NEGATIVE_TTL, error=type(e).__name__)
        try:
            answer = await kept(self._resolver.resolve(qname, rdtype, search=False, raise_on_no_answer=False))
        except dns.resolver.NXDOMAIN as e:
            return DnsAnswer(name, rdtype, DnsStatus.NXDOMAIN, ttl=_negative_ttl(_nx_response(e, qname)))
        except dns.resolver.LifetimeTimeout:
            return DnsAnswer(name, rdtype, DnsStatus.TEMPFAIL, error="timed out")
        except dns.resolver.NoNameservers:
            return DnsAnswer(name, rdtype, DnsStatus.TEMPFAIL, error="server failure")
        except dns.exception.DNSException as e:
            return DnsAnswer(name, rdtype, DnsStatus.TEMPFAIL, error=type(e).__name__)
        if answer.rrset is None:
            return DnsAnswer(name, rdtype, DnsStatus.NODATA, ttl=_negative_ttl(answer.response))
        records = tuple(r.to_text() for r in list(answer.rrset)[:MAX_RECORDS])
        return DnsAnswer(name, rdtype, DnsStatus.OK, records, ttl=min(float(answer.rrset.ttl), MAX_TTL))

    async def addresses(self, name: str) -> DnsAnswer:
        """A and AAAA together (rdtype "A+AAAA"): OK with every address when either has
        one; TEMPFAIL when one failed and the other found none; else NXDOMAIN/NODATA."""
        a, aaaa = await asyncio.gather(self.query(name, "A"), self.query(name, "AAAA"))
        records = a.records + aaaa.records
        norm = name.lower().rstrip(".")
        if records:
            ttls = [x.ttl for x in (a, aaaa) if x.ok]
            return DnsAnswer(norm, "A+AAAA", DnsStatus.OK, records, min(ttls))
        for x in (a, aaaa):
            if x.temporary:
                return DnsAnswer(norm, "A+AAAA", DnsStatus.TEMPFAIL, error=x.error)
        status = DnsStatus.NXDOMAIN if a.status is DnsStatus.NXDOMAIN else DnsStatus.NODATA
        return DnsAnswer(norm, "A+AAAA", status, ttl=min(a.ttl, aaaa.ttl))

    async def ptr(self, ip: str) -> DnsAnswer:
        """The PTR names of an address (records without the final dot)."""
        answer = await self.query(reverse_name(ip), "PTR")
        if not answer.ok:
            return answer
        return DnsAnswer(answer.name, "PTR", DnsStatus.OK, tuple(r.rstrip(".").lower() for r in answer.records), answer.ttl)


def _nx_response(e: dns.resolver.NXDOMAIN, qname: dns.name.Name):
    try:
        return e.response(qname)
    except Exception:  # noqa: BLE001 - no response kept: the default negative TTL
        return None


def _negative_ttl(response) -> float:
    """RFC 2308 5: the negative answer's SOA TTL, capped by its MINIMUM field."""
    if response is not None:
        for rrset in getattr(response, "authority", ()):
            if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
                return float(min(rrset.ttl, rrset[0].minimum, MAX_NEGATIVE_TTL))
    return DEFAULT_NEGATIVE_TTL
