"""Waits that keep a stop: a node stops by cancelling its tasks, and no wait may lose that.

Role: two helpers for what asyncio on Python 3.11 gets wrong.
- kept(aw): awaits a library's coroutine that may lose a cancellation inside (dnspython's
  asyncio backend bounds every read with asyncio.wait_for, which on 3.11 returns the
  result and drops a cancellation that lands in the same turn; fixed in 3.12) and raises
  the lost cancellation when it returns.
- settle(aw, delay): a bounded wait in a stopping task. asyncio.timeout before 3.11.3
  (Debian 12 has 3.11.2) raises CancelledError instead of TimeoutError in a task that is
  being cancelled, which a node's shutdown is; asyncio.wait bounds the wait instead.
kanmon's own bounded waits use asyncio.timeout, never asyncio.wait_for
(tests/unit/test_cancellation.py).

Trusts: nothing. Never: swallow a cancellation of the calling task.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def kept(aw: Awaitable[T]) -> T:
    """await aw; a cancellation of this task requested meanwhile, which aw returned
    through instead of raising, is raised here."""
    task = asyncio.current_task()
    before = task.cancelling() if task is not None else 0
    result = await aw
    if task is not None and task.cancelling() > before:
        raise asyncio.CancelledError
    return result


async def settle(aw: Awaitable[object], delay: float) -> bool:
    """Wait up to delay seconds for aw (whose result or exception does not matter: the
    caller is stopping); cancel it if it has not finished. True when it finished."""
    future = asyncio.ensure_future(aw)
    done, _pending = await asyncio.wait({future}, timeout=delay)
    if not done:
        future.cancel()
        return False
    if not future.cancelled():
        future.exception()  # retrieved: not reported as never retrieved
    return True
