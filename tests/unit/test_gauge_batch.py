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


# -- kept places ------------------------------------------------------------------------------

KEYS = ("smtp 192.0.2.1", "smtp *")


def test_a_place_kept_far_below_the_limits_is_taken_again_without_a_transaction():
    async def main():
        state, tasks = SlowState(), set()
        batch = batch_for(state, tasks)
        state.gate.release()
        assert await batch.acquire(*KEYS, limits=(50, 100)) == [1, 1]
        batch.release(KEYS, (50, 100))  # admitted far below its limits: kept
        assert batch.take_kept(KEYS, (50, 100)) == [1, 1]  # at once: no transaction
        await asyncio.gather(*tasks)
        assert len(state.calls) == 1
        # Still counted in the shared gauge while kept or used: never more than a limit.
        assert (state.gauges.count(KEYS[0]), state.gauges.count(KEYS[1])) == (1, 1)

    asyncio.run(main())


def test_a_place_near_its_limit_is_given_back_at_once():
    async def main():
        state, tasks = SlowState(), set()
        batch = batch_for(state, tasks)
        state.gate.release()
        assert await batch.acquire(*KEYS, limits=(1, 100)) == [1, 1]
        batch.release(KEYS, (1, 100))  # 2 x 1 > 1: the client's place goes back; the total's is kept
        assert batch.kept(KEYS[0]) == 0 and batch.kept(KEYS[1]) == 1
        assert batch.take_kept(KEYS, (1, 100)) is None  # not every key has a kept place
        state.gate.release()
        await asyncio.gather(*tasks)
        assert state.calls[-1][1] == [KEYS[0]]
        assert (state.gauges.count(KEYS[0]), state.gauges.count(KEYS[1])) == (0, 1)

    asyncio.run(main())


def test_a_refused_connection_gives_its_places_back():
    async def main():
        state, tasks = SlowState(), set()
        batch = batch_for(state, tasks)
        state.gate.release()
        assert await batch.acquire(*KEYS, limits=(50, 100)) == [1, 1]
        batch.release(KEYS)  # no limits: the connection was refused (or the listener stops)
        state.gate.release()
        await asyncio.gather(*tasks)
        assert batch.kept(KEYS[0]) == batch.kept(KEYS[1]) == 0
        assert (state.gauges.count(KEYS[0]), state.gauges.count(KEYS[1])) == (0, 0)

    asyncio.run(main())


def test_a_take_uses_the_kept_places_it_can_and_the_transaction_for_the_others():
    async def main():
        state, tasks = SlowState(), set()
        batch = batch_for(state, tasks)
        state.gate.release()
        await batch.acquire(*KEYS, limits=(50, 100))
        batch.release(KEYS, (50, 100))
        other = ("smtp 192.0.2.2", "smtp *")  # another client: the listener's total is kept
        state.gate.release()
        assert await batch.acquire(*other, limits=(50, 100)) == [1, 1]
        assert state.calls[-1][2] == ["smtp 192.0.2.2"]
        assert batch.kept("smtp *") == 0 and batch.kept(KEYS[0]) == 1
        await asyncio.gather(*tasks)
        assert state.gauges.count("smtp *") == 1  # one place: kept by one connection, used by the next

    asyncio.run(main())


def test_kept_places_no_connection_took_go_back_at_the_second_trim():
    async def main():
        state, tasks = SlowState(), set()
        batch = batch_for(state, tasks)
        state.gate.release()
        await batch.acquire(*KEYS, limits=(50, 100))
        batch.release(KEYS, (50, 100))
        batch.trim()  # kept since the transaction: not idle for a whole interval yet
        assert batch.kept(KEYS[0]) == 1
        batch.trim()  # idle since the previous trim: given back
        assert batch.kept(KEYS[0]) == batch.kept(KEYS[1]) == 0
        state.gate.release()
        await asyncio.gather(*tasks)
        assert (state.gauges.count(KEYS[0]), state.gauges.count(KEYS[1])) == (0, 0)

    asyncio.run(main())


def test_a_kept_place_taken_between_trims_stays():
    async def main():
        state, tasks = SlowState(), set()
        batch = batch_for(state, tasks)
        state.gate.release()
        await batch.acquire(*KEYS, limits=(50, 100))
        batch.release(KEYS, (50, 100))
        batch.trim()
        assert batch.take_kept(KEYS, (50, 100)) == [1, 1]  # a connection used it meanwhile
        batch.release(KEYS, (50, 100))
        batch.trim()
        assert batch.kept(KEYS[0]) == 1  # in use at some point since the previous trim: kept
        batch.trim(everything=True)  # the listener stops
        assert batch.kept(KEYS[0]) == 0
        state.gate.release()
        await asyncio.gather(*tasks)
        assert state.gauges.count(KEYS[0]) == 0

    asyncio.run(main())


def test_a_failed_transaction_leaves_the_kept_places_it_used_kept():
    async def main():
        state, tasks = SlowState(), set()
        batch = batch_for(state, tasks)
        state.gate.release()
        await batch.acquire(*KEYS, limits=(50, 100))
        batch.release(KEYS, (50, 100))
        state.fail = True
        take = batch.acquire("smtp 192.0.2.2", "smtp *", limits=(50, 100))  # the total from the kept place
        state.gate.release()
        with pytest.raises(OSError):
            await take
        assert batch.kept("smtp *") == 1
        await asyncio.gather(*tasks)

    asyncio.run(main())


# -- the shared state down --------------------------------------------------------------------


def test_an_outage_is_said_once_and_its_end_once_and_its_releases_go_with_the_next_transaction():
    async def main():
        state, tasks, said = SlowState(), set(), []

        def spawn(coro):
            t = asyncio.ensure_future(coro)
            tasks.add(t)
            return t

        batch = GaugeBatch(state, "pid1", lambda: 1000.0, spawn, said.append)
        for _ in range(10):
            state.gate.release()  # every transaction goes through; the test counts them
        assert await batch.acquire(*KEYS) == [1, 1]
        state.fail = True
        batch.release(KEYS)  # a connection ends during the outage
        await asyncio.gather(*tasks)
        assert len(state.calls) == 2  # its transaction failed, and was not tried again in a loop
        other = ("smtp 192.0.2.2", "smtp *")
        for _ in range(2):
            with pytest.raises(OSError):
                await batch.acquire(*other)
        await asyncio.gather(*tasks)
        assert [c[1] for c in state.calls[1:]] == [list(KEYS)] * 3  # the release went with each try
        assert [type(e).__name__ for e in said] == ["Error"]  # said once for the outage
        assert said[0].line().startswith("connection gauge unavailable") and "state down" in said[0].line()
        state.fail = False
        assert await batch.acquire(*other) == [1, 1]  # the release applied before the take
        await asyncio.gather(*tasks)
        assert state.calls[-1][1] == list(KEYS)
        assert (state.gauges.count(KEYS[0]), state.gauges.count("smtp *")) == (0, 1)
        assert [e.line() for e in said[1:]] == ["connection gauge available again"]
        assert await batch.acquire(*other) == [2, 2]
        assert len(said) == 2  # nothing more while it answers

    asyncio.run(main())


def test_releases_kept_through_an_outage_go_back_at_the_next_trim_of_an_idle_process():
    """A process that takes no new connection after the outage still gives its places
    back: the listener's periodic trim starts the transaction (once per trim, no loop)."""
    async def main():
        state, tasks = SlowState(), set()
        batch = batch_for(state, tasks)
        for _ in range(10):
            state.gate.release()
        assert await batch.acquire(*KEYS) == [1, 1]
        state.fail = True
        batch.release(KEYS)
        await asyncio.gather(*tasks)
        state.fail = False  # the state is back; no connection comes
        batch.trim()
        await asyncio.gather(*tasks)
        assert (state.gauges.count(KEYS[0]), state.gauges.count("smtp *")) == (0, 0)
        calls = len(state.calls)
        batch.trim()  # nothing left to give back: no transaction
        await asyncio.gather(*tasks)
        assert len(state.calls) == calls

    asyncio.run(main())
