"""The balancer's state shared by its processes: health and modes one way, counts the other.

Role: with `[balancer] processes` above 1, the main process (which runs the health
checks and takes `kanmon balance set`) and its forwarding processes (kanmon.balancer.worker)
accept on the same listening sockets. Every process must send a new connection to the
same live real servers, and a failover must be seen by all of them at once. This table
is a small shared memory region (memfd, passed by descriptor) that holds:

- per real server, written by the main process only: its health state, its mode (the
  configured one or an administrator's), its smoothed check round-trip time, and one
  generation counter bumped after every change, so a forwarding process re-reads the
  table only when something changed (one 8-byte read per new connection);
- per process and real server, written by that process only: open connections, total
  connections, failed connects, bytes in and out. The main process adds them up for
  the status; every process adds up the open connections of the others for
  max_connections and least-session.

Each slot has one writer, so there is no lock. A reader may see a value one update
old: a connection can be chosen a moment before a failover is published (as it can
between two health checks with one process), and two processes choosing at the same
instant can together pass a max_connections limit by one connection each.

Trusts: only the main process that made the table (it is not reachable from any other
process: an anonymous memfd inherited by descriptor).
Never: grow (its size is fixed by the configuration at start), or be written by a
process outside its own slot.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kanmon.balancer.pool import Pool

_HEADER = struct.Struct("<Q")  # generation
_SERVER = struct.Struct("<BBxxxxxxd")  # state, mode, rtt seconds (negative: none)
_COUNTS = struct.Struct("<qqqqq")  # connections, total, failed connects, bytes in, bytes out

STATES = ("up", "down", "disabled")
MODES = ("active", "standby", "disabled")


class SharedTable:
    """One table for `servers` real servers (all virtual servers in order) and `processes` slots."""

    def __init__(self, fd: int, servers: int, processes: int, *, create: bool):
        self.fd = fd
        self.servers = servers
        self.processes = processes
        self._counts_at = _HEADER.size + servers * _SERVER.size
        size = self._counts_at + processes * servers * _COUNTS.size
        if create:
            os.ftruncate(fd, size)
        self._map = mmap.mmap(fd, size)
        self._generation = -1
        self.closed = False

    @classmethod
    def create(cls, servers: int, processes: int) -> SharedTable:
        """A new zeroed table in anonymous shared memory (its fd is inheritable by pass_fds)."""
        if hasattr(os, "memfd_create"):
            fd = os.memfd_create("kanmon-balancer", os.MFD_CLOEXEC)
        else:  # no memfd (not Linux): an unlinked temporary file does the same
            import tempfile  # noqa: PLC0415

            fd, name = tempfile.mkstemp(prefix="kanmon-balancer-")
            os.unlink(name)
        return cls(fd, servers, processes, create=True)

    def close(self) -> None:
        self.closed = True
        self._map.close()
        os.close(self.fd)

    # -- main process: health and modes -------------------------------------------------

    def publish(self, pools: Sequence[Pool]) -> None:
        """Write every server's state, mode and rtt, then bump the generation."""
        g = 0
        m = self._map
        for pool in pools:
            for s in pool.servers:
                _SERVER.pack_into(m, _HEADER.size + g * _SERVER.size, STATES.index(s.state), MODES.index(s.mode),
                                  -1.0 if s.rtt is None else s.rtt)
                g += 1
        (generation,) = _HEADER.unpack_from(m, 0)
        _HEADER.pack_into(m, 0, generation + 1)

    # -- forwarding processes: health and modes -----------------------------------------

    def refresh(self, pools: Sequence[Pool]) -> bool:
        """Take the main process's states and modes into these pools if they changed."""
        m = self._map
        (generation,) = _HEADER.unpack_from(m, 0)
        if generation == self._generation:
            return False
        self._generation = generation
        g = 0
        for pool in pools:
            for s in pool.servers:
                state, mode, rtt = _SERVER.unpack_from(m, _HEADER.size + g * _SERVER.size)
                s.state = STATES[state]  # type: ignore[assignment]
                mode_text = MODES[mode]
                s.admin_mode = None if mode_text == s.config.mode else mode_text
                s.rtt = None if rtt < 0 else rtt
                g += 1
            pool.settle_tier()
        return True

    # -- every process: its own counts --------------------------------------------------

    def write_counts(self, slot: int, pools: Sequence[Pool]) -> None:
        base = self._counts_at + slot * self.servers * _COUNTS.size
        g = 0
        for pool in pools:
            for s in pool.servers:
                _COUNTS.pack_into(self._map, base + g * _COUNTS.size, s.connections, s.total_connections,
                                  s.failed_connects, s.bytes_in, s.bytes_out)
                g += 1

    def write_connections(self, slot: int, index: int, connections: int) -> None:
        """One server's open connections (global server index), at once: others decide by it.
        (A connection that ends after the service stopped has no table to tell any more.)"""
        if self.closed:
            return
        struct.pack_into("<q", self._map, self._counts_at + (slot * self.servers + index) * _COUNTS.size, connections)

    def load_counts(self, slot: int, pools: Sequence[Pool]) -> None:
        """Start from the totals a slot holds (a process started again in place of one that exited)."""
        base = self._counts_at + slot * self.servers * _COUNTS.size
        g = 0
        for pool in pools:
            for s in pool.servers:
                _, s.total_connections, s.failed_connects, s.bytes_in, s.bytes_out = _COUNTS.unpack_from(
                    self._map, base + g * _COUNTS.size)
                g += 1

    def others(self, slot: int, pools: Sequence[Pool]) -> None:
        """Set each server's `others` to the open connections of every other process."""
        g = 0
        m = self._map
        for pool in pools:
            for s in pool.servers:
                total = 0
                for p in range(self.processes):
                    if p != slot:
                        total += struct.unpack_from("<q", m, self._counts_at + (p * self.servers + g) * _COUNTS.size)[0]
                s.others = total
                g += 1

    def totals(self, slot: int) -> list[tuple[int, int, int, int, int]]:
        """The counts of every process but `slot`, added up per server (global index)."""
        out = [[0, 0, 0, 0, 0] for _ in range(self.servers)]
        for p in range(self.processes):
            if p == slot:
                continue
            base = self._counts_at + p * self.servers * _COUNTS.size
            for g in range(self.servers):
                for i, v in enumerate(_COUNTS.unpack_from(self._map, base + g * _COUNTS.size)):
                    out[g][i] += v
        return [tuple(x) for x in out]  # type: ignore[misc]

    def clear_slot(self, slot: int) -> None:
        """A process that exited holds no connection any more (its totals stay counted)."""
        base = self._counts_at + slot * self.servers * _COUNTS.size
        for g in range(self.servers):
            struct.pack_into("<q", self._map, base + g * _COUNTS.size, 0)
