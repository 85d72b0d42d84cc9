"""Child processes of a node (SMTP receivers, delivery agents, balancer forwarders):
how they are started and how their parent waits until each is ready.

Role: the command line of a child, and the wait for its readiness events.
Trusts: the caller's module name and arguments.
Never: let the working directory change what a child imports. `python -m` puts the
current directory first on sys.path, so an admin's stray `dns.py` or `email.py` there
would be run by the child (as root, before it drops privileges); `-P` (Python 3.11's
safe path) leaves it out.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterable


def module_command(module: str, *args: str) -> list[str]:
    """`python -P -m MODULE ARGS...` with this interpreter."""
    return [sys.executable, "-P", "-m", module, *args]


async def wait_ready(events: Iterable[asyncio.Event], supervisors: Iterable[asyncio.Task], deadline: float,
                     what: str) -> None:
    """Until every event is set; OSError when the loop's time passes `deadline` first, or
    when a supervisor task ends first (its child exited before it was ready). `what`
    names the child in the error ("an SMTP receiver process")."""
    loop = asyncio.get_running_loop()
    waits = {asyncio.ensure_future(e.wait()) for e in events}
    tasks = set(supervisors)
    try:
        while waits:
            done, _ = await asyncio.wait(waits | tasks, timeout=max(0.0, deadline - loop.time()),
                                         return_when=asyncio.FIRST_COMPLETED)
            if not done:
                raise OSError(f"{what} did not start in time")
            if done & tasks:
                raise OSError(f"{what} exited before it was ready (see the log)")
            waits -= done
    finally:
        for w in waits:
            w.cancel()
