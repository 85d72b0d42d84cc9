"""The brute-force throttle under a flood of distinct names (unknown users create keys):
its bookkeeping stays amortised O(1) per call and bounded in memory, and the event loop
of the process keeps ticking while the calls run (they run off the loop, as in the
listeners, so the loop only shares the interpreter with them).

The figures (wall time, worst loop lag, keys kept) are printed: run with -s to see them.
The bounds asserted are deliberately generous (a loaded CI machine); the defect they catch
is a call that takes minutes.
"""

from __future__ import annotations

import asyncio
import threading
import time

from kanmon.store.users import AuthThrottle

NAMES = 200_000
DEADLINE = 120.0  # seconds for the whole flood; the quadratic pruning took hours
MAX_LAG = 1.0  # seconds between two 10 ms ticks of the loop


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def flood(t: AuthThrottle, clock: Clock, address, done: threading.Event, counts: dict) -> None:
    """What the listeners do for each login: check, then count the failure (the account
    is unknown). address(i) is the client of attempt i."""
    refused = 0
    for i in range(NAMES):
        clock.now += 0.001
        ip = address(i)
        name = f"nobody{i}@example.test"
        if t.blocked_for(ip, name) > 0:
            refused += 1
            continue
        t.failed(ip, name)
    counts["refused"] = refused
    done.set()


async def run_with_ticks(work) -> tuple[float, float, bool]:
    """Run work(done) in a thread; tick the loop every 10 ms meanwhile. (wall, max lag, finished)."""
    done = threading.Event()
    worker = threading.Thread(target=work, args=(done,), daemon=True)  # daemon: a stuck one must not hang pytest
    lag = 0.0
    start = last = time.monotonic()
    worker.start()
    while not done.is_set() and time.monotonic() - start < DEADLINE:
        await asyncio.sleep(0.01)
        now = time.monotonic()
        lag = max(lag, now - last - 0.01)
        last = now
    return time.monotonic() - start, lag, done.is_set()


def test_two_hundred_thousand_names_from_many_networks() -> None:
    """One name per address, every address in a network of its own (the worst case for
    the per-network bound): the keys kept stay under max_keys."""
    clock = Clock()
    t = AuthThrottle(clock, max_keys=50_000)
    counts: dict = {}
    wall, lag, finished = asyncio.run(run_with_ticks(
        lambda done: flood(t, clock, lambda i: f"2001:db8:{i >> 16:x}:{i & 0xffff:x}::1", done, counts)))
    assert finished, f"the flood did not finish in {DEADLINE:.0f} s"
    print(f"\n200,000 names from 200,000 networks: {wall:.1f} s, worst loop lag {lag * 1000:.0f} ms, "
          f"keys kept {len(t.state.counters)}")
    assert lag < MAX_LAG
    assert len(t.state.counters) <= 50_000


def test_two_hundred_thousand_names_from_one_network() -> None:
    """Every attempt from another address of one IPv6 /64: the network's bound blocks it
    long before the names fill the memory."""
    clock = Clock()
    t = AuthThrottle(clock)
    counts: dict = {}
    wall, lag, finished = asyncio.run(run_with_ticks(
        lambda done: flood(t, clock, lambda i: f"2001:db8:0:1:{i >> 16:x}:{i & 0xffff:x}:0:1", done, counts)))
    assert finished, f"the flood did not finish in {DEADLINE:.0f} s"
    print(f"\n200,000 names from one /64: {wall:.1f} s, worst loop lag {lag * 1000:.0f} ms, "
          f"keys kept {len(t.state.counters)}, attempts refused {counts.get('refused')}")
    assert lag < MAX_LAG
    assert counts["refused"] >= NAMES - t.block_network_after
    assert len(t.state.counters) <= 3 * t.block_network_after
