"""ExitedShares: the main process drops what an exited receiver held in the shared
connection gauge in the background, retrying while the shared state is down (0.5 s
doubled up to 30 s), with one event line for the failure and one for the end."""

from __future__ import annotations

import asyncio

from kanmon.receiver import CLEANUP_RETRY_MAX, ExitedShares
from kanmon.state.api import MemoryState


class DownState(MemoryState):
    """MemoryState whose calls fail while `down`."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.calls = 0

    async def submit(self, fn, *args):
        self.calls += 1
        if self.down:
            raise OSError("connection failed: Connection refused\n\tIs the server running?")
        return fn(*args)


def test_the_cleanup_is_retried_with_a_doubling_delay_until_the_state_answers():
    async def main():
        state = DownState()
        state.gauges.acquire("smtp 192.0.2.1", "4242", 1000.0)
        state.gauges.acquire("smtp 192.0.2.1", "77", 1000.0)
        state.down = True
        events: list[tuple[str, str]] = []
        delays: list[float] = []

        async def sleep(delay: float) -> None:
            delays.append(delay)
            if len(delays) == 9:
                state.down = False  # the database is back
            await asyncio.sleep(0)

        shares = ExitedShares(state, lambda text, kind="info": events.append((text, kind)), sleep=sleep)
        shares.add("4242")
        shares.add("4242")  # said twice: dropped once
        await asyncio.sleep(0)
        assert shares.pending() == ["4242"]
        while shares.pending():
            await asyncio.sleep(0)
        assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, CLEANUP_RETRY_MAX, CLEANUP_RETRY_MAX, CLEANUP_RETRY_MAX]
        assert state.gauges.count("smtp 192.0.2.1") == 1  # pid 77's place stays
        assert len(events) == 2, events
        (failed, kind), (done, _) = events
        assert kind == "error" and "pid 4242 are not dropped yet" in failed
        assert "\n" not in failed and "\\n\\tIs the server running?" in failed  # escaped: one line
        assert done.endswith("pid 4242 dropped")

    asyncio.run(main())


def test_a_cleanup_that_works_says_nothing_and_close_gives_up_a_failing_one():
    async def main():
        state = DownState()
        state.gauges.acquire("smtp 192.0.2.1", "1", 1000.0)
        events: list[str] = []
        never = asyncio.Event()

        async def sleep(delay: float) -> None:
            await never.wait()  # retries wait until close()

        shares = ExitedShares(state, lambda text, kind="info": events.append(text), sleep=sleep)
        shares.add("1")
        while shares.pending():
            await asyncio.sleep(0)
        assert events == [] and state.gauges.count("smtp 192.0.2.1") == 0
        state.down = True
        shares.add("2")
        while not events:
            await asyncio.sleep(0)
        await shares.close()  # waiting to retry: given up (the node's next start clears the gauge)
        assert shares.pending() == ["2"] and len(events) == 1
        shares.add("3")  # after close: nothing more
        assert shares.pending() == ["2"]

    asyncio.run(main())


def test_a_pid_given_again_to_a_new_receiver_is_not_cleaned_up_after_its_start():
    """The kernel may give a new receiver the pid of one whose cleanup waits for the state:
    that cleanup would drop the places the new receiver takes (its own start drops what the
    pid held before)."""
    async def main():
        state = DownState()
        state.down = True
        retry = asyncio.Event()

        async def sleep(delay: float) -> None:
            await retry.wait()

        shares = ExitedShares(state, lambda text, kind="info": None, sleep=sleep)
        shares.add("4242")
        while state.calls == 0:
            await asyncio.sleep(0)
        shares.started("4242")  # a new receiver, same pid
        state.down = False
        state.gauges.acquire("smtp 192.0.2.1", "4242", 1000.0)  # the new one's place
        retry.set()
        for _ in range(10):
            await asyncio.sleep(0)
        assert shares.pending() == [] and state.gauges.count("smtp 192.0.2.1") == 1

    asyncio.run(main())
