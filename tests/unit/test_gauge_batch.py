"""GaugeBatch: the listener's takes and releases of the shared connection gauge, grouped
into one state transaction for what arrives while the previous one runs."""

from __future__ import annotations

import asyncio
import threading

import pytest

from kanmon.smtp.server import GaugeBatch
from kanmon.state.api import MemoryState


class SlowState(MemoryState):
    """MemoryState whose calls run on a thread, each held until the test lets it go,
    recording the calls made."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple] = []
        self.gate = threading.Semaphore(0)
        self.fail = False

    def submit(self, fn, *args):
        self.calls.append(args)

        def run():
            self.gate.acquire()
            if self.fail:
                raise OSError("state down")
            return fn(*args)

        return asyncio.get_running_loop().run_in_executor(None, run)


def batch_for(state: SlowState, tasks: set) -> GaugeBatch:
    def spawn(coro):
        t = asyncio.ensure_future(coro)
        tasks.add(t)
        return t

    return GaugeBatch(state, "pid1", lambda: 1000.0, spawn)


def test_what_arrives_during_a_transaction_goes_into_the_next_one():
    async def main():
        state, tasks = SlowState(), set()
        batch = batch_for(state, tasks)
        first = batch.acquire("smtp 192.0.2.1", "smtp *")
        await asyncio.sleep(0)  # the batch task runs: the first transaction is held at the gate
        more = [batch.acquire("smtp 192.0.2.1", "smtp *"), batch.acquire("smtp 192.0.2.2", "smtp *")]
        batch.release(("smtp 192.0.2.1", "smtp *"))
        state.gate.release()
        assert await first == [1, 1]
        state.gate.release()
        assert await asyncio.gather(*more) == [[1, 1], [1, 2]]  # the release went first
        await asyncio.gather(*tasks)
        assert state.calls == [
            ("pid1", [], ["smtp 192.0.2.1", "smtp *"], 1000.0),
            ("pid1", ["smtp 192.0.2.1", "smtp *"], ["smtp 192.0.2.1", "smtp *", "smtp 192.0.2.2", "smtp *"], 1000.0),
        ]
        assert (state.gauges.count("smtp 192.0.2.1"), state.gauges.count("smtp *")) == (1, 2)

    asyncio.run(main())


def test_a_failing_state_fails_every_take_of_the_batch_and_the_next_batch_runs():
    async def main():
        state, tasks = SlowState(), set()
        batch = batch_for(state, tasks)
        state.fail = True
        takes = [batch.acquire("smtp 192.0.2.1", "smtp *"), batch.acquire("smtp 192.0.2.2", "smtp *")]
        state.gate.release()
        for t in takes:
            with pytest.raises(OSError):
                await t
        state.fail = False
        again = batch.acquire("smtp 192.0.2.1", "smtp *")
        state.gate.release()
        assert await again == [1, 1]
        await asyncio.gather(*tasks)

    asyncio.run(main())


def test_a_take_whose_taker_went_away_is_given_back():
    async def main():
        state, tasks = SlowState(), set()
        batch = batch_for(state, tasks)
        take = batch.acquire("smtp 192.0.2.1", "smtp *")
        await asyncio.sleep(0)  # the batch task runs: its transaction is held at the gate
        take.cancel()  # the connection's task was cancelled while the state answered
        state.gate.release()  # the take
        state.gate.release()  # the give-back
        await asyncio.gather(*tasks)
        assert (state.gauges.count("smtp 192.0.2.1"), state.gauges.count("smtp *")) == (0, 0)
        assert [c[1] for c in state.calls] == [[], ["smtp 192.0.2.1", "smtp *"]]

    asyncio.run(main())
