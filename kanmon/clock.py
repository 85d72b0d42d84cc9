"""Clocks: wall time for the queue, and a manual clock tests advance instead of sleeping.

Role: every time-dependent decision (retries, delay notices, expiry, schedules) asks a
Clock for now() and waits with sleep(); tests pass a ManualClock and call advance().
Never: mix time.monotonic() into persisted schedules (they must survive a restart).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time


class SystemClock:
    def now(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))

    async def sleep_until(self, when: float) -> None:
        await asyncio.sleep(max(0.0, when - time.time()))


class ManualClock:
    """Time moves only when advance() is called; sleepers wake when their time comes."""

    def __init__(self, start: float | None = None):
        self._now = time.time() if start is None else start
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def now(self) -> float:
        return self._now

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        fut = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._now + seconds, next(self._seq), fut))
        await fut

    async def sleep_until(self, when: float) -> None:
        """Wake when now() reaches `when`. Unlike sleep(now_then - x), an advance() that runs
        between computing a delay and this coroutine starting cannot push the deadline later."""
        if when <= self._now:
            await asyncio.sleep(0)
            return
        fut = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (when, next(self._seq), fut))
        await fut

    def advance(self, seconds: float) -> None:
        """Move time forward; call from the event loop's thread (or via call_soon_threadsafe)."""
        self._now += seconds
        while self._sleepers and self._sleepers[0][0] <= self._now:
            _, _, fut = heapq.heappop(self._sleepers)
            if not fut.done():
                fut.set_result(None)
