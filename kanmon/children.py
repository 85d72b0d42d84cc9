"""Child processes of a node (SMTP receivers, delivery agents, balancer forwarders):
how they are started and how their parent waits until each is ready.

Role: the command line of a child, the wait for its readiness events, and (in the
child) dying with the parent.
Trusts: the caller's module name and arguments.
Never: let the working directory change what a child imports. `python -m` puts the
current directory first on sys.path, so an admin's stray `dns.py` or `email.py` there
would be run by the child (as root, before it drops privileges); `-P` (Python 3.11's
safe path) leaves it out.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import sys
from collections.abc import AsyncIterator, Iterable


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


async def pipe_lines(fd: int, limit: int) -> AsyncIterator[bytes]:
    """The lines a child writes to the read end `fd` of its pipe (each with its b"\\n",
    the last one perhaps without), until end of file; `fd` is closed at the end, once.
    A line longer than `limit` bytes is dropped (read past, never kept whole).

    Not `loop.connect_read_pipe(..., os.fdopen(fd))`: uvloop closes such a pipe twice
    (libuv closes the descriptor, then the file object closes its number again), and a
    file another thread opened between the two (a queue file, a Maildir file) lost its
    descriptor: "Bad file descriptor" in the queue manager as a receiver exited."""
    loop = asyncio.get_running_loop()
    os.set_blocking(fd, False)
    readable = asyncio.Event()
    loop.add_reader(fd, readable.set)
    pending = b""
    overlong = False  # reading past a line longer than limit
    try:
        while True:
            await readable.wait()
            readable.clear()
            try:
                chunk = os.read(fd, 1 << 16)
            except (BlockingIOError, InterruptedError):
                continue
            if not chunk:
                break
            pending += chunk
            start = 0
            while (end := pending.find(b"\n", start)) >= 0:
                if not overlong and end + 1 - start <= limit:
                    yield pending[start:end + 1]
                overlong = False
                start = end + 1
            pending = pending[start:]
            if len(pending) > limit:
                pending, overlong = b"", True
        if pending and not overlong:
            yield pending
    finally:
        loop.remove_reader(fd)
        os.close(fd)


def die_with_parent() -> None:
    """In a child: Linux's SIGKILL to this process when its parent dies (even by kill -9);
    exit at once if the parent is already gone."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() == 1:
        os._exit(0)  # the parent is already gone


def pid_alive(pid: int) -> bool:
    """Whether a process of that id exists (one of another user's counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
