"""The brute-force throttle under a flood of distinct names (unknown users create keys):
its bookkeeping stays amortised O(1) per call and bounded in memory.

The work is counted, not timed: the counters' table is replaced by one that counts every
entry a walk over it touches (the pruning walks it from the front). Pruning in amortised
constant time touches a few entries per call; the quadratic pruning this test was written
against walked every key on every call, and fails here at once, on any machine under any
load. The figures (entries touched, keys kept) are printed: run with -s to see them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Iterator
from typing import Any

from kanmon.store.users import AuthThrottle

NAMES = 200_000
TOUCHED_PER_NAME = 12  # a failed login hits 2-3 keys; each hit checks the front and drops what expired


class CountingTable(OrderedDict):
    """An OrderedDict that counts the entries any walk over it touches, and stops the test
    as soon as they exceed `limit` (a quadratic walk would otherwise run for hours)."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.touched = 0

    def _walk(self, entries: Iterable[Any]) -> Iterator[Any]:
        for entry in entries:
            self.touched += 1
            if self.touched > self.limit:
                raise AssertionError(f"walks over the counters touched more than {self.limit} entries")
            yield entry

    def __iter__(self) -> Iterator[Any]:
        return self._walk(super().__iter__())

    def keys(self) -> Any:
        return self._walk(super().keys())

    def values(self) -> Any:
        return self._walk(super().values())

    def items(self) -> Any:
        return self._walk(super().items())


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def counted_throttle(**kwargs: Any) -> tuple[AuthThrottle, CountingTable]:
    clock = Clock()
    t = AuthThrottle(clock, **kwargs)
    table = CountingTable(limit=TOUCHED_PER_NAME * NAMES)
    t.state.counters._buckets = table
    return t, table


def flood(t: AuthThrottle, address) -> int:
    """What the listeners do for each login: check, then count the failure (the account
    is unknown). address(i) is the client of attempt i. The attempts refused."""
    refused = 0
    for i in range(NAMES):
        t.clock.now += 0.001
        ip = address(i)
        name = f"nobody{i}@example.test"
        if t.blocked_for(ip, name) > 0:
            refused += 1
            continue
        t.failed(ip, name)
    return refused


def test_the_counting_table_counts_a_walk() -> None:
    """The measure itself: a walk over every key is counted, and stopped past the limit."""
    table = CountingTable(limit=5)
    table.update((k, k) for k in range(3))
    assert list(table.items()) == [(0, 0), (1, 1), (2, 2)] and table.touched == 3
    try:
        list(table)
    except AssertionError:
        pass
    else:
        raise AssertionError("a walk past the limit was not stopped")


def test_two_hundred_thousand_names_from_many_networks() -> None:
    """One name per address, every address in a network of its own (the worst case for
    the per-network bound): the keys kept stay under max_keys, each call touching a few."""
    t, table = counted_throttle(max_keys=50_000)
    flood(t, lambda i: f"2001:db8:{i >> 16:x}:{i & 0xffff:x}::1")
    print(f"\n200,000 names from 200,000 networks: {table.touched} entries touched, keys kept {len(table)}")
    assert len(table) <= 50_000
    assert table.touched >= NAMES  # the pruning did walk this table (the measure is live)


def test_two_hundred_thousand_names_from_one_network() -> None:
    """Every attempt from another address of one IPv6 /64: the network's bound blocks it
    long before the names fill the memory."""
    t, table = counted_throttle()
    refused = flood(t, lambda i: f"2001:db8:0:1:{i >> 16:x}:{i & 0xffff:x}:0:1")
    print(f"\n200,000 names from one /64: {table.touched} entries touched, keys kept {len(table)}, "
          f"attempts refused {refused}")
    assert refused >= NAMES - t.block_network_after
    assert len(table) <= 3 * t.block_network_after
