"""ManualClock: sleepers wake when advance() reaches their time, including an advance()
that runs before the sleeping coroutine has started (the queue scheduler's race)."""

from __future__ import annotations

import asyncio

from kanmon.clock import ManualClock


def test_sleep_until_started_after_an_advance_still_wakes_at_its_deadline():
    async def run() -> bool:
        clock = ManualClock(1000.0)
        due = clock.now() + 300  # computed, then the loop runs an advance() first
        sleeper = asyncio.ensure_future(clock.sleep_until(due))
        clock.advance(86400)
        await asyncio.sleep(0)  # the sleeper starts now: its deadline has passed
        await asyncio.sleep(0)
        return sleeper.done()

    assert asyncio.run(run())


def test_sleep_until_waits_for_its_deadline_and_no_longer():
    async def run() -> list[bool]:
        clock = ManualClock(1000.0)
        sleeper = asyncio.ensure_future(clock.sleep_until(1300.0))
        await asyncio.sleep(0)
        seen = []
        clock.advance(299)
        await asyncio.sleep(0)
        seen.append(sleeper.done())
        clock.advance(1)
        await asyncio.sleep(0)
        seen.append(sleeper.done())
        return seen

    assert asyncio.run(run()) == [False, True]
