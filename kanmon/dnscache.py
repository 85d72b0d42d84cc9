"""The node's DNS cache: answers kept for their TTL, positive and negative (RFC 2308).

Role: one cache per node, shared by the delivery resolver (MX, A, AAAA, TLSA:
kanmon.deliver.mx) and the checks' resolver (MX/A/AAAA of sender domains, PTR, TXT for
SPF/DKIM/DMARC, DNSBL zones: kanmon.policy.dns), so that a destination or a sender domain
seen a moment ago costs no query. It is dnspython's cache interface (get, put, flush),
set as the `cache` of each dnspython resolver: dnspython puts every NOERROR answer (records,
or none: NODATA) under (name, type, class) and every NXDOMAIN under (name, ANY, class), with
the expiry RFC 2308 5 gives a negative answer (the SOA's TTL, at most its MINIMUM field).

Here each answer is kept until that expiry, at most max_ttl (positive) or
max_negative_ttl (negative) after it arrived, and at most max_entries answers (expired
ones go first, then the least recently used). A hit is handed out as a resolver would
answer it: its TTLs lowered to what is left (so a caller that caches on top keeps it no
longer). SERVFAIL and timeouts are never cached (dnspython puts none).

`kanmon dns cache` shows and flushes it through the control socket (kanmon.admin.service).

Trusts: the answers dnspython parsed (their names are escaped before they are shown).
Never: keep an answer past its TTL, grow past max_entries, or block (a dict and a lock).
"""

from __future__ import annotations

import copy
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import dns.rcode
import dns.rdatatype
import dns.resolver

DEFAULT_ENTRIES = 10_000
MAX_TTL = 86400.0
MAX_NEGATIVE_TTL = 3 * 3600.0  # RFC 2308 5: one to three hours at most


@dataclass(frozen=True, slots=True)
class CacheEntry:
    """One cached answer, for `kanmon dns cache show`."""

    name: str
    rdtype: str  # "MX"...; an NXDOMAIN is kept for the name whatever the type ("ANY")
    kind: str  # "positive" | "nodata" | "nxdomain"
    ttl_left: float
    records: tuple[str, ...]

    def to_json(self) -> dict:
        return {"name": self.name, "type": self.rdtype, "kind": self.kind, "ttl_left": round(self.ttl_left, 1),
                "records": list(self.records)}


class DnsCache:
    """dnspython's cache interface, bounded and clocked (see the module docstring).

    clock: monotonic seconds (tests pass one they advance); wall: the wall clock dnspython
    writes an answer's expiration with (so an expiry becomes a number of seconds left).
    """

    def __init__(self, max_entries: int = DEFAULT_ENTRIES, *, max_ttl: float = MAX_TTL,
                 max_negative_ttl: float = MAX_NEGATIVE_TTL, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time):
        if max_entries < 0:
            raise ValueError("max_entries must not be negative")
        self.max_entries = max_entries
        self.max_ttl = max_ttl
        self.max_negative_ttl = max_negative_ttl
        self._clock = clock
        self._wall = wall
        self._lock = threading.Lock()
        self._data: OrderedDict[tuple, tuple[float, dns.resolver.Answer]] = OrderedDict()  # key -> (expires, answer)
        self.hits = 0
        self.misses = 0
        self._on_flush: list[weakref.WeakMethod] = []  # caches on top (a resolver replaced at a reload goes)

    def __bool__(self) -> bool:  # dnspython asks `if resolver.cache:`; an empty cache is a cache
        return True

    # -- dnspython's interface -----------------------------------------------------------

    def get(self, key: tuple) -> dns.resolver.Answer | None:
        """One lookup of dnspython's is two gets: its (name, type) and, when that misses,
        the name's NXDOMAIN (name, ANY). A hit counts on either; a miss only on the
        second, so that hits + misses is the number of lookups."""
        now = self._clock()
        counts_miss = key[1] == dns.rdatatype.ANY
        with self._lock:
            hit = self._data.get(key)
            if hit is None:
                self.misses += counts_miss
                return None
            expires, answer = hit
            if expires <= now:
                del self._data[key]
                self.misses += counts_miss
                return None
            self._data.move_to_end(key)
            self.hits += 1
        return _aged(answer, expires - now, self._wall())

    def put(self, key: tuple, answer: dns.resolver.Answer) -> None:
        if self.max_entries == 0:
            return
        negative = answer.rrset is None
        left = min(answer.expiration - self._wall(), self.max_negative_ttl if negative else self.max_ttl)
        if left <= 0:
            return
        now = self._clock()
        with self._lock:
            if key not in self._data and len(self._data) >= self.max_entries:
                for k in [k for k, (exp, _a) in self._data.items() if exp <= now]:
                    del self._data[k]
                while len(self._data) >= self.max_entries:
                    self._data.popitem(last=False)  # the least recently used
            self._data[key] = (now + left, answer)
            self._data.move_to_end(key)

    def flush(self, key: tuple | None = None) -> None:
        with self._lock:
            if key is None:
                self._data.clear()
            else:
                self._data.pop(key, None)
        if key is None:
            for ref in list(self._on_flush):
                fn = ref()
                if fn is None:
                    self._on_flush.remove(ref)
                else:
                    fn()

    # -- for the admin -------------------------------------------------------------------

    def on_flush(self, method: Callable[[], None]) -> None:
        """method() after a whole flush (a cache kept on top of this one clears itself);
        held weakly: a bound method of an object that may go."""
        self._on_flush.append(weakref.WeakMethod(method))  # type: ignore[arg-type]

    def remaining(self, name: str, rdtype: str) -> float | None:
        """Seconds the answer for name/rdtype (or the name's NXDOMAIN) is still good for."""
        import dns.name  # noqa: PLC0415 - dnspython's own, cheap

        try:
            qname = dns.name.from_text(name)
            qtype = dns.rdatatype.from_text(rdtype)
        except Exception:  # noqa: BLE001 - not a DNS name or type: nothing cached for it
            return None
        now = self._clock()
        with self._lock:
            for key in ((qname, qtype, 1), (qname, dns.rdatatype.ANY, 1)):
                hit = self._data.get(key)
                if hit is not None and hit[0] > now:
                    return hit[0] - now
        return None

    def __len__(self) -> int:
        return len(self._data)

    def entries(self, limit: int | None = None) -> list[CacheEntry]:
        """The answers still good, most recently used first."""
        now = self._clock()
        with self._lock:
            items = [(k, exp, a) for k, (exp, a) in reversed(self._data.items()) if exp > now]
        out = []
        for (qname, qtype, _cls), exp, answer in items[:limit]:
            if answer.rrset is not None:
                kind, records = "positive", tuple(r.to_text() for r in answer.rrset)
            elif answer.response.rcode() == dns.rcode.NXDOMAIN:
                kind, records = "nxdomain", ()
            else:
                kind, records = "nodata", ()
            out.append(CacheEntry(qname.to_text(omit_final_dot=True), dns.rdatatype.to_text(qtype), kind, exp - now, records))
        return out

    def stats(self) -> dict:
        now = self._clock()
        with self._lock:
            live = [a for exp, a in self._data.values() if exp > now]
        negative = sum(1 for a in live if a.rrset is None)
        return {"entries": len(live), "positive": len(live) - negative, "negative": negative,
                "max_entries": self.max_entries, "hits": self.hits, "misses": self.misses}


def _aged(answer: dns.resolver.Answer, left: float, wall_now: float) -> dns.resolver.Answer:
    """The answer as a resolver would give it now: TTLs no longer than what is left."""
    aged = copy.copy(answer)
    aged.expiration = wall_now + left
    ttl = max(0, int(left))
    if answer.rrset is not None and answer.rrset.ttl > ttl:
        rrset = answer.rrset.copy()
        rrset.ttl = ttl
        aged.rrset = rrset
    response = answer.response
    if response is not None and any(r.ttl > ttl for r in response.authority):
        # A negative answer's TTL is its SOA's (RFC 2308 5): lower it in a copy.
        resp = copy.copy(response)
        resp.sections = [list(s) for s in response.sections]  # not the original's lists
        lowered = []
        for r in response.authority:
            r2 = r.copy()
            r2.ttl = min(r2.ttl, ttl)
            lowered.append(r2)
        resp.sections[2] = lowered
        aged.response = resp
    return aged
