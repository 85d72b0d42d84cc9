"""The interfaces of the state every receiver process shares, and an in-memory version.

Role: small, synchronous interfaces (typing.Protocol) for what the edge-policy checks
count and remember across sessions and processes:
- RateCounter: events per key in a sliding window (connections per minute, messages and
  recipients per hour, AUTH failures);
- ConnectionGauge: things held at once per key (concurrent connections per client),
  owned by a process so that a dead process's share can be dropped;
- TtlCache: a value per key that expires (recipient verification results), with the
  listing and flushing the admin commands need;
- GreylistStore: (client network, sender, recipient) triplets and the clients that
  passed;
- AlertClaims: which node mails an alert several nodes see (one mail per incident).
A backend is a SharedState bundling the five, with submit() to run a blocking call off
the event loop. MemoryState (here) serves one process and tests; kanmon.state.sqlite
serves every process of a node.

Every method takes `now` (epoch seconds) from the caller's clock, so tests advance time
instead of sleeping. Calls may block (disk): from the event loop, always go through
`await state.submit(fn, *args)`, never call a backend's method directly.

Trusts: keys are opaque strings chosen by our checks (they may hold client data: the
backends store them as bound parameters, never as SQL or paths).
Never: import anything of kanmon, or decide policy (the checks decide; these only count
and remember).
"""

from __future__ import annotations

import asyncio
import math
import threading
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, runtime_checkable

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class CacheEntry:
    key: str
    value: str
    stored: float  # when it was put (epoch seconds)
    expires: float  # when it stops being returned


@dataclass(frozen=True, slots=True)
class Triplet:
    """A greylisting triplet. `client` is the client's network as text (a /24 or /64:
    the check chooses), sender and recipient as lower-case addresses ("" = null sender)."""

    client: str
    sender: str
    recipient: str


@dataclass(frozen=True, slots=True)
class TripletState:
    triplet: Triplet
    first_seen: float
    last_seen: float
    passed: float | None  # when it first passed (None: not yet)
    attempts: int


@runtime_checkable
class RateCounter(Protocol):
    def hit(self, key: str, window: float, now: float, amount: int = 1) -> int:
        """Count `amount` events for key at now; the count within the last `window`
        seconds, this hit included (a sliding window, estimated from two fixed buckets
        of `window` seconds: exact when the rate is even, never below the count of the
        current bucket)."""
        ...

    def peek(self, key: str, window: float, now: float) -> int:
        """The count hit() would return for amount 0."""
        ...

    def reset(self, key: str) -> None: ...


@runtime_checkable
class ConnectionGauge(Protocol):
    def acquire(self, key: str, owner: str, now: float) -> int:
        """One more held for key by owner (a process id); the total held for key by
        every owner afterwards."""
        ...

    def release(self, key: str, owner: str) -> None: ...

    def apply(self, owner: str, releases: Sequence[str], acquires: Sequence[str], now: float) -> list[int]:
        """In one transaction: release each key of releases, then acquire each key of
        acquires (in order); the totals acquire() would have returned for them."""
        ...

    def count(self, key: str) -> int: ...

    def drop_owner(self, owner: str) -> None:
        """Forget everything owner holds (a process at start and at exit, or a dead one)."""
        ...

    def clear(self) -> None:
        """Forget everything held by every owner (a node at start, before its processes
        accept: what a crashed run's processes held is held by nobody)."""
        ...


@runtime_checkable
class TtlCache(Protocol):
    def get(self, key: str, now: float) -> CacheEntry | None:
        """The entry, or None when absent or expired at now."""
        ...

    def put(self, key: str, value: str, ttl: float, now: float) -> None: ...

    def delete(self, key: str) -> bool: ...

    def list(self, now: float, prefix: str = "") -> list[CacheEntry]:
        """The live entries whose key starts with prefix, by key."""
        ...

    def flush(self, prefix: str = "") -> int:
        """Delete the entries whose key starts with prefix; how many."""
        ...

    def prune(self, now: float) -> int:
        """Delete the expired entries; how many."""
        ...


@runtime_checkable
class GreylistStore(Protocol):
    def attempt(self, triplet: Triplet, now: float) -> TripletState:
        """Record a delivery attempt of triplet (first_seen set on the first one); its state."""
        ...

    def mark_passed(self, triplet: Triplet, now: float) -> None:
        """The triplet passed (its retry came in the window): remember it, and count one
        more pass for its client network."""
        ...

    def client_passes(self, client: str) -> int:
        """Triplets of this client network that passed (for greylist_pass_count)."""
        ...

    def forget(self, triplet: Triplet) -> bool: ...

    def list(self, prefix: str = "") -> list[TripletState]:
        """Triplets whose client starts with prefix."""
        ...

    def prune(self, now: float, window: float, remember: float) -> int:
        """Delete triplets that never passed, first seen more than `window` ago, and
        passed ones unused for more than `remember`; how many."""
        ...


@dataclass(frozen=True, slots=True)
class AlertClaim:
    mail: bool  # this node mails the alert (no node mailed it within the interval)
    nodes: tuple[str, ...]  # the nodes that saw it within the interval, this one included, by name
    mailed_by: str  # the node that mailed it last ("" when none did)


@dataclass(frozen=True, slots=True)
class AlertResolution:
    mail: bool  # this node mails "resolved": no other node still sees the alert, none mailed it yet
    nodes: tuple[str, ...]  # the nodes that saw this incident, by name
    still: tuple[str, ...]  # the other nodes that still see it (then mail is False)


def decide_resolution(node: str, now: float, interval: float, last_sent: float | None, resolved: float | None,
                      seen: dict[str, float], cleared: dict[str, float]) -> tuple[AlertResolution, bool]:
    """Whether `node`, whose alert just ended, mails the incident's "resolved" mail:
    (the resolution, whether the incident is over for the cluster). last_sent: when the
    alert was last mailed by any node (None: never, then this node decides alone, as
    one node does); resolved: when a "resolved" mail was last sent; seen: node -> when it
    last claimed the alert; cleared: node -> when its alert last ended (this one's
    included). A node still sees it when it claimed it within `interval` and after its
    last end (a node that stopped while seeing it blocks the resolution for `interval`
    at most)."""
    if last_sent is None:
        return AlertResolution(True, (node,), ()), False
    since = resolved if resolved is not None else float("-inf")
    nodes = tuple(sorted({n for n, t in seen.items() if t > since} | {node}))
    still = tuple(sorted(n for n, t in seen.items()
                         if n != node and t > now - interval and t > since and cleared.get(n, float("-inf")) < t))
    if still:
        return AlertResolution(False, nodes, still), False
    if resolved is not None and resolved >= last_sent:
        return AlertResolution(False, nodes, ()), False  # this incident's "resolved" went already
    return AlertResolution(True, nodes, ()), True


@runtime_checkable
class AlertClaims(Protocol):
    def claim(self, category: str, key: str, node: str, now: float, interval: float) -> AlertClaim:
        """Node sees alert (category, key) at now and would mail it: it may, when no node
        mailed that alert within `interval` seconds (then it is the one that did, at
        now); in one step, so that two nodes seeing one incident mail it once."""
        ...

    def resolve(self, category: str, key: str, node: str, now: float, interval: float) -> AlertResolution:
        """Node's alert (category, key) ended at now and it would mail "resolved": it
        may when no other node still sees it and no node mailed this incident's
        "resolved" yet (decide_resolution); in one step, so that the incident gets one
        "resolved" mail for the cluster, naming the nodes that saw it."""
        ...


class SharedState(Protocol):
    counters: RateCounter
    gauges: ConnectionGauge
    greylist: GreylistStore
    alert_claims: AlertClaims

    def cache(self, namespace: str) -> TtlCache:
        """The TTL cache of one use ("verify", ...); namespaces never see each other."""
        ...

    def submit(self, fn: Callable[..., T], *args: Any) -> Awaitable[T]:
        """Run a blocking call of this state off the event loop; await its result."""
        ...

    def close(self) -> None: ...


def bucket_estimate(current: int, previous: int, window: float, now: float) -> int:
    """Sliding-window count from the current and previous fixed buckets of `window`:
    the previous bucket weighted by the part of it still inside the window, rounded up
    (a limit is never loosened by rounding: just after a bucket boundary the estimate is
    the previous bucket's whole count, not one less)."""
    elapsed = (now % window) / window
    return current + math.ceil(previous * (1.0 - elapsed))


# ---------------------------------------------------------------------------
# In memory: one process (workers = 0, tests).


class MemoryCounters:
    """Counts in a dict ordered by last hit: keys idle for two windows (whose count is
    zero) are dropped from the front as hits come, in amortised constant time; beyond
    `max_keys` the least recently hit go first."""

    def __init__(self, max_keys: int = 1_000_000) -> None:
        self._lock = threading.Lock()
        self.max_keys = max_keys
        # (key, window) -> (bucket, count, previous count), least recently hit first
        self._buckets: OrderedDict[tuple[str, float], tuple[int, int, int]] = OrderedDict()
        self._windows: dict[str, set[float]] = {}  # key -> its windows (for reset)

    def _counts(self, key: str, window: float, now: float) -> tuple[int, int, int]:
        idx = int(now // window)
        cur_idx, cur, prev = self._buckets.get((key, window), (idx, 0, 0))
        if cur_idx == idx - 1:
            cur_idx, cur, prev = idx, 0, cur
        elif cur_idx != idx:
            cur_idx, cur, prev = idx, 0, 0
        return cur_idx, cur, prev

    def _drop_front(self, now: float) -> None:
        buckets = self._buckets
        while buckets:
            (key, window), (idx, _cur, _prev) = next(iter(buckets.items()))
            if idx >= int(now // window) - 1 and len(buckets) <= self.max_keys:
                break
            buckets.popitem(last=False)
            windows = self._windows.get(key)
            if windows is not None:
                windows.discard(window)
                if not windows:
                    del self._windows[key]

    def hit(self, key: str, window: float, now: float, amount: int = 1) -> int:
        with self._lock:
            idx, cur, prev = self._counts(key, window, now)
            cur += amount
            self._buckets[(key, window)] = (idx, cur, prev)
            self._buckets.move_to_end((key, window))
            self._windows.setdefault(key, set()).add(window)
            self._drop_front(now)
            return bucket_estimate(cur, prev, window, now)

    def peek(self, key: str, window: float, now: float) -> int:
        with self._lock:
            _idx, cur, prev = self._counts(key, window, now)
            return bucket_estimate(cur, prev, window, now)

    def reset(self, key: str) -> None:
        with self._lock:
            for window in self._windows.pop(key, ()):
                self._buckets.pop((key, window), None)

    def __len__(self) -> int:
        return len(self._buckets)


class MemoryGauges:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[tuple[str, str], int] = {}

    def acquire(self, key: str, owner: str, now: float) -> int:
        with self._lock:
            self._held[(key, owner)] = self._held.get((key, owner), 0) + 1
            return self._count(key)

    def release(self, key: str, owner: str) -> None:
        with self._lock:
            n = self._held.get((key, owner), 0) - 1
            if n > 0:
                self._held[(key, owner)] = n
            else:
                self._held.pop((key, owner), None)

    def apply(self, owner: str, releases: Sequence[str], acquires: Sequence[str], now: float) -> list[int]:
        with self._lock:
            for key in releases:
                n = self._held.get((key, owner), 0) - 1
                if n > 0:
                    self._held[(key, owner)] = n
                else:
                    self._held.pop((key, owner), None)
            out = []
            for key in acquires:
                self._held[(key, owner)] = self._held.get((key, owner), 0) + 1
                out.append(self._count(key))
            return out

    def _count(self, key: str) -> int:
        return sum(n for (k, _o), n in self._held.items() if k == key)

    def count(self, key: str) -> int:
        with self._lock:
            return self._count(key)

    def drop_owner(self, owner: str) -> None:
        with self._lock:
            for k in [k for k in self._held if k[1] == owner]:
                del self._held[k]

    def clear(self) -> None:
        with self._lock:
            self._held.clear()


class MemoryCache:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, CacheEntry] = {}

    def get(self, key: str, now: float) -> CacheEntry | None:
        e = self._entries.get(key)
        return e if e is not None and e.expires > now else None

    def put(self, key: str, value: str, ttl: float, now: float) -> None:
        with self._lock:
            self._entries[key] = CacheEntry(key, value, now, now + ttl)

    def delete(self, key: str) -> bool:
        with self._lock:
            return self._entries.pop(key, None) is not None

    def list(self, now: float, prefix: str = "") -> list[CacheEntry]:
        with self._lock:
            return sorted((e for k, e in self._entries.items() if k.startswith(prefix) and e.expires > now),
                          key=lambda e: e.key)

    def flush(self, prefix: str = "") -> int:
        with self._lock:
            keys = [k for k in self._entries if k.startswith(prefix)]
            for k in keys:
                del self._entries[k]
            return len(keys)

    def prune(self, now: float) -> int:
        with self._lock:
            keys = [k for k, e in self._entries.items() if e.expires <= now]
            for k in keys:
                del self._entries[k]
            return len(keys)


class MemoryGreylist:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._triplets: dict[Triplet, TripletState] = {}
        self._passes: dict[str, int] = {}

    def attempt(self, triplet: Triplet, now: float) -> TripletState:
        with self._lock:
            old = self._triplets.get(triplet)
            if old is None:
                st = TripletState(triplet, now, now, None, 1)
            else:
                st = TripletState(triplet, old.first_seen, now, old.passed, old.attempts + 1)
            self._triplets[triplet] = st
            return st

    def mark_passed(self, triplet: Triplet, now: float) -> None:
        with self._lock:
            old = self._triplets.get(triplet)
            if old is not None and old.passed is not None:
                return
            first = old.first_seen if old else now
            self._triplets[triplet] = TripletState(triplet, first, now, now, old.attempts if old else 1)
            self._passes[triplet.client] = self._passes.get(triplet.client, 0) + 1

    def client_passes(self, client: str) -> int:
        return self._passes.get(client, 0)

    def forget(self, triplet: Triplet) -> bool:
        with self._lock:
            return self._triplets.pop(triplet, None) is not None

    def list(self, prefix: str = "") -> list[TripletState]:
        with self._lock:
            return sorted((s for t, s in self._triplets.items() if t.client.startswith(prefix)),
                          key=lambda s: (s.triplet.client, s.triplet.sender, s.triplet.recipient))

    def prune(self, now: float, window: float, remember: float) -> int:
        with self._lock:
            gone = [t for t, s in self._triplets.items()
                    if (s.passed is None and now - s.first_seen > window) or (s.passed is not None and now - s.last_seen > remember)]
            for t in gone:
                del self._triplets[t]
            return len(gone)


class MemoryAlertClaims:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sent: dict[tuple[str, str], tuple[float, str]] = {}  # -> (last mailed, by node)
        self._seen: dict[tuple[str, str], dict[str, float]] = {}  # -> node -> last seen
        self._cleared: dict[tuple[str, str], dict[str, float]] = {}  # -> node -> last ended
        self._resolved: dict[tuple[str, str], float] = {}  # -> last "resolved" mail

    def resolve(self, category: str, key: str, node: str, now: float, interval: float) -> AlertResolution:
        with self._lock:
            k = (category, key)
            cleared = self._cleared.setdefault(k, {})
            cleared[node] = now
            sent = self._sent.get(k)
            out, over = decide_resolution(node, now, interval, sent[0] if sent else None, self._resolved.get(k),
                                          self._seen.get(k, {}), cleared)
            if over:
                self._resolved[k] = now
            return out

    def claim(self, category: str, key: str, node: str, now: float, interval: float) -> AlertClaim:
        with self._lock:
            seen = self._seen.setdefault((category, key), {})
            seen[node] = now
            nodes = tuple(sorted(n for n, t in seen.items() if t > now - interval or n == node))
            last, by = self._sent.get((category, key), (None, ""))
            if last is not None and last > now - interval:
                return AlertClaim(False, nodes, by)
            self._sent[(category, key)] = (now, node)
            return AlertClaim(True, nodes, node)


class MemoryState:
    """SharedState for one process: submit() runs the call at once (nothing blocks)."""

    def __init__(self, *, max_keys: int = 1_000_000) -> None:
        self.counters = MemoryCounters(max_keys)
        self.gauges = MemoryGauges()
        self.greylist = MemoryGreylist()
        self.alert_claims = MemoryAlertClaims()
        self._caches: dict[str, MemoryCache] = {}

    def cache(self, namespace: str) -> MemoryCache:
        return self._caches.setdefault(namespace, MemoryCache())

    def submit(self, fn: Callable[..., T], *args: Any) -> Awaitable[T]:
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        try:
            fut.set_result(fn(*args))
        except Exception as e:  # noqa: BLE001 - delivered to the awaiting caller
            fut.set_exception(e)
        return fut

    def close(self) -> None:
        pass
