"""The balancer's forwarding processes: more than one core for the same virtual addresses.

Role: with `[balancer] processes` N above 1, the balancer's main process (inside
`kanmon serve`: health checks, status, `kanmon balance set`) binds every virtual address
once and starts N-1 forwarding processes (`python -m kanmon.balancer.forwarder`) that
inherit those listening sockets and accept on them too: the kernel hands each new
connection to whichever process is waiting in accept, so a busy process takes fewer.
(One shared socket per address rather than SO_REUSEPORT sockets: nothing queued is lost
when a process exits, and a process started again needs no privilege to bind port 25.)
Every process chooses real servers from the same health state, published by the main
process in a shared table (kanmon.balancer.shared); a failover is seen by all at the
next connection. A forwarding process sends its event lines (connect failures, none
available) to the main process over a pipe, which writes them to the event log.
WorkerPool (main side) starts, watches and restarts them; kanmon.balancer.forwarder is
the process.

Trusts: the main process (its spec, its descriptors).
Never: outlive the main process (PR_SET_PDEATHSIG on Linux, and SIGTERM at stop), run
health checks or write the status and modes files (the main process does), or read
what the pipe carries as anything but event text.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kanmon.children import module_command, pipe_lines

if TYPE_CHECKING:
    from kanmon.balancer.shared import SharedTable

RESTART_DELAY = 1.0  # before a forwarding process that exited is started again
STOP_WAIT = 10.0  # a forwarding process gets this long to close its connections on stop
MAX_LINE = 64 * 1024
RETIRE_SIGNAL = signal.SIGUSR1  # to a forwarding process: stop accepting, exit when the connections end


def can_fork_workers() -> bool:
    """Forwarding processes need inheritable sockets and shared memory (POSIX)."""
    return os.name == "posix"


@dataclass(frozen=True)
class Forwarder:
    """What a BalancerService in a forwarding process is given instead of addresses to bind."""

    table: SharedTable
    slot: int
    sockets: list[socket.socket]  # one listening socket per virtual server, in config order
    # notice(virtual server index, kind, text): a per-connection problem, for the main
    # process to log under its one rate limit (BalancerService._notice)
    notice: Callable[[int, str, str], None] | None = None


class WorkerPool:
    """The forwarding processes of one BalancerService (main side)."""

    def __init__(self, table: SharedTable, sockets: list[Any], spec: dict[str, Any], count: int,
                 say: Callable[[str], None], notice: Callable[[int, str, str, int], None] | None = None):
        self.table = table
        self.notice = notice  # (virtual server index, kind, text, pid of the process)
        self.fds = [s.fileno() for s in sockets]
        self.spec = spec
        self.count = count
        self.say = say
        self._procs: dict[int, subprocess.Popen] = {}
        self._ready = [asyncio.Event() for _ in range(count + 1)]
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False

    def start(self) -> None:
        """Start every forwarding process. The main process does not wait for them: it
        accepts meanwhile, and each joins when it is ready (ready()). The processes
        exist when this returns (pids())."""
        first: dict[int, tuple[subprocess.Popen, int] | OSError] = {}
        for slot in range(1, self.count + 1):
            try:
                first[slot] = self._spawn(slot)
            except OSError as e:
                first[slot] = e
        self._tasks = [asyncio.ensure_future(self._supervise(slot, first[slot])) for slot in range(1, self.count + 1)]

    def ready(self) -> bool:
        """Every forwarding process accepts."""
        return all(self._ready[slot].is_set() for slot in range(1, self.count + 1))

    def pids(self) -> list[int]:
        return [p.pid for _, p in sorted(self._procs.items())]

    def _spawn(self, slot: int) -> tuple[subprocess.Popen, int]:
        """Start forwarding process `slot`: (the process, the read end of its event pipe)."""
        read_fd, write_fd = os.pipe()
        spec = json.dumps(self.spec)
        cmd = [*module_command("kanmon.balancer.forwarder"), "--slot", str(slot),
               "--table", f"{self.table.fd},{self.table.servers},{self.table.processes}",
               "--notify-fd", str(write_fd), "--fds", ",".join(str(fd) for fd in self.fds)]
        try:
            proc = subprocess.Popen(cmd, pass_fds=[*self.fds, self.table.fd, write_fd], stdin=subprocess.PIPE)
        except OSError:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        assert proc.stdin is not None
        with contextlib.suppress(OSError):  # one that died at once is reported by _supervise
            proc.stdin.write(spec.encode())  # on stdin: a long argv would show in every `ps`
            proc.stdin.close()
        self._procs[slot] = proc
        return proc, read_fd

    async def _supervise(self, slot: int, first: tuple[subprocess.Popen, int] | OSError | None = None) -> None:
        loop = asyncio.get_running_loop()
        while not self._stopping or isinstance(first, tuple):  # one started by start() is waited for
            self._ready[slot].clear()
            try:
                if first is None:
                    proc, read_fd = self._spawn(slot)
                elif isinstance(first, OSError):
                    raise first
                else:
                    proc, read_fd = first
            except OSError as e:  # no process now (EAGAIN, ENOMEM, EMFILE): say so, try again
                first = None
                self.say(f"balancer: forwarding process {slot} cannot be started: {e}; trying again")
                await asyncio.sleep(RESTART_DELAY)
                continue
            first = None
            async with contextlib.aclosing(pipe_lines(read_fd, MAX_LINE)) as lines:  # closes the pipe
                async for line in lines:  # until it exits
                    kind, _, text = line.decode("utf-8", "replace").rstrip("\n").partition(" ")
                    if kind == "ready":
                        self._ready[slot].set()
                    elif kind == "say":
                        self.say(text)
                    elif kind == "notice" and self.notice is not None:
                        index, _, rest = text.partition("\t")
                        what, _, line_text = rest.partition("\t")
                        if index.isdigit():
                            self.notice(int(index), what, line_text, proc.pid)
            code = await loop.run_in_executor(None, proc.wait)
            self.table.clear_slot(slot)
            if self._procs.get(slot) is proc:
                del self._procs[slot]
            if self._stopping:
                return
            if not self._ready[slot].is_set():  # a loop would hide the reason; the main process serves on
                self.say(f"balancer: forwarding process {slot} (pid {proc.pid}) exited with status {code} before it "
                         "accepted; not started again (see its stderr)")
                return
            self.say(f"balancer: forwarding process {slot} (pid {proc.pid}) exited with status {code}; restarting")
            await asyncio.sleep(RESTART_DELAY)

    async def retire(self) -> None:
        """A reload: every forwarding process stops accepting and exits once its open
        connections have ended (SIGUSR1); none is started again. stop() meanwhile ends
        them at once."""
        self._stopping = True
        for proc in list(self._procs.values()):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(RETIRE_SIGNAL)
        if self._tasks:
            await asyncio.wait(self._tasks)

    async def stop(self) -> None:
        self._stopping = True
        for proc in list(self._procs.values()):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        if self._tasks:
            done, pending = await asyncio.wait(self._tasks, timeout=STOP_WAIT)
            for proc in list(self._procs.values()):
                if proc.poll() is None:
                    proc.kill()
            if pending:
                await asyncio.wait(pending, timeout=STOP_WAIT)
            for t in pending:
                t.cancel()
