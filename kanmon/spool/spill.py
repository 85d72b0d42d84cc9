"""Spill files: a big message's content written to the spool as it arrives.

Role: the SMTP listener keeps at most the session's DATA buffer of a message in memory;
what goes beyond it (checked, dot-unstuffed, CRLF: kanmon.smtp.session SpoolData) is
appended here, to spool/incoming/data-<name>, by one writer per message in the loop's
executor. At the end of DATA the listener reads the file back (it holds one of a few
read-back places, so the memory of whole messages in flight stays bounded), removes it,
and the message goes on as any other: the checks, then Spool.store().

A spill file is never acknowledged and never a queue file: it is not fsynced, recovery
removes everything under incoming/ at start, and every way out of a transaction (refused,
read back, connection lost) removes it.

Trusts: the bytes it is given (the session checked them). Never: write outside
spool/incoming/; leave a file behind once discard() or read_and_remove() returned.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path

WRITE_BACKLOG = 256 * 1024  # octets given but not written yet, above which the listener stops reading


def _write_all(fd: int, pieces: list[bytes]) -> None:
    for piece in pieces:
        view = memoryview(piece)
        while view:
            n = os.write(fd, view)
            view = view[n:]


class SpillWriter:
    """One message's spill file, written in order in the executor (one write at a time)."""

    def __init__(self, path: Path, on_drained: Callable[[], None] | None = None):
        self.path = path
        self.on_drained = on_drained  # told when the backlog fell to nothing
        self.error: OSError | None = None
        self.backlog = 0  # octets given, not written yet
        self.size = 0  # octets written
        self._pending: list[bytes] = []
        self._task: asyncio.Task[None] | None = None
        self._discarded = False
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)

    @property
    def over_backlog(self) -> bool:
        return self.backlog > WRITE_BACKLOG

    def append(self, piece: bytes) -> None:
        if self._discarded or self.error is not None:
            return
        self._pending.append(piece)
        self.backlog += len(piece)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._pending and not self._discarded:
                pieces, self._pending = self._pending, []
                n = sum(len(p) for p in pieces)
                try:
                    await loop.run_in_executor(None, _write_all, self._fd, pieces)
                except OSError as e:
                    self.error = e
                    self._pending.clear()
                    self.backlog = 0
                    break
                self.backlog -= n
                self.size += n
        finally:
            self._task = None
            if self._discarded:
                self._remove()
            elif self.on_drained is not None:
                self.on_drained()

    async def read_and_remove(self) -> bytes:
        """Wait for the writes, read the whole content back, remove the file. OSError
        when a write failed or the file cannot be read (the caller answers 451)."""
        while self._task is not None:
            await asyncio.shield(self._task)
        if self.error is not None:
            self.discard()
            raise self.error
        fd, self._fd = self._fd, -1
        try:
            return await asyncio.get_running_loop().run_in_executor(None, _read_all, fd, self.size)
        finally:
            self._discarded = True
            self._remove()

    def discard(self) -> None:
        """The message is refused or the client left: the file goes (after a write in flight)."""
        self._discarded = True
        self._pending.clear()
        if self._task is None:
            self._remove()

    def _remove(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def _read_all(fd: int, size: int) -> bytes:
    try:
        data = os.pread(fd, size, 0)
        if len(data) != size:
            raise OSError(0, f"spill file is {len(data)} of {size} octets")
        return data
    finally:
        os.close(fd)
