"""The tests' stand-in relay (tests/integration/test_balancer.py's FakeRelay): killing it
closes every connection it accepted, including one whose handler had not run yet. Closing
the listener while such a connection was on its way to its handler leaked its socket
(Python 3.11's Server.close(): the new transport's Server._attach fails); a health check
that connected just before a test's end did that, and the ResourceWarning failed whichever
test the collector ran in (test_balancer_drain.py on CI, once)."""

from __future__ import annotations

import asyncio
import gc
import socket
import warnings

import pytest

from tests.integration.test_balancer import MR1, FakeRelay


@pytest.mark.parametrize("turns", range(8))
def test_a_kill_closes_a_connection_accepted_a_few_loop_turns_before(turns: int) -> None:
    async def main() -> None:
        relay = await FakeRelay(MR1, "mr1").start()
        client = socket.create_connection((relay.host, relay.port), timeout=5)
        try:
            for _ in range(turns):  # the accept is somewhere in its chain of loop turns
                await asyncio.sleep(0)
            await relay.kill()
        finally:
            client.close()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        asyncio.run(main())
        gc.collect()
    leaked = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert leaked == []
