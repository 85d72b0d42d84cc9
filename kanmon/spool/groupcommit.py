"""Group commit: many files made durable with one flush.

Role: the one mechanism by which kanmon makes new files durable — queue files in the
spool and messages in Maildir mailboxes. Callers hand over (temporary path, final path,
bytes); one committer thread takes everything that is waiting, writes each file to its
temporary path, flushes the whole filesystem once (syncfs(2)), renames each file into
place, and fsyncs each final directory once. A caller's await returns only after its own
file and its directory entry are durable (DESIGN.md promise 1); what a crash interrupts
was never acknowledged and sits under its temporary name.

Why: fsync per file costs one journal commit each, and a thread per concurrent fsync
costs GIL hand-offs on the event loop's core; one batch costs one hand-off and two
flushes however many sessions are waiting (docs/performance.md has the figures).
Where syncfs(2) is missing, each file is fdatasync'ed instead (same promise, slower).
A queue file is written over a finished message's kept file when one is ready
(kanmon.spool.recycle: no inode to allocate, no blocks to free), else into a new file.

Trusts: its callers' paths. Never: rename a file into place before its data is flushed;
resolve a caller's future before the rename is flushed.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol


class Recycler(Protocol):
    """What the committer asks of kanmon.spool.recycle.Recycler (which imports from here)."""

    def take(self, dest: str) -> tuple[int, int] | None: ...

_libc = None
try:
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    _syncfs = _libc.syncfs
    _syncfs.argtypes = [ctypes.c_int]
    _syncfs.restype = ctypes.c_int
except (OSError, AttributeError):  # not Linux/glibc: fall back to fdatasync per file
    _syncfs = None


@dataclass(slots=True)
class _Job:
    files: Sequence[tuple[str | Path, str | Path, bytes]]
    loop: asyncio.AbstractEventLoop | None
    future: asyncio.Future | None
    results: list[OSError | None] = field(default_factory=list)
    done: threading.Event | None = None
    recycler: Recycler | None = None  # queue files: written over a kept one when one is ready


def sync_files(fds: Sequence[int]) -> None:
    """Make the data of these open files durable: one syncfs(2) for their filesystem, or
    fdatasync each where syncfs is missing."""
    if not fds:
        return
    if _syncfs is not None:
        if _syncfs(fds[0]) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs: {os.strerror(err)}")
    else:
        for fd in fds:
            os.fdatasync(fd)


def write_durably(path: Path, data: bytes, *, append: bool = False, sync: bool = True) -> None:
    """Write (or append) one small file and fdatasync it: journals and ledgers, whose
    writes are not batched through the committer."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC)
    fd = os.open(path, flags, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if sync:
            os.fdatasync(fd)
    finally:
        os.close(fd)


def replace_durably(path: Path, data: bytes, *, sync: bool = True) -> None:
    """Write a small file whole (mode 0600): a temporary file beside it, fdatasynced,
    renamed over it, the rename synced. A reader sees the old content or the new."""
    tmp = path.with_name(path.name + ".tmp")
    write_durably(tmp, data, sync=sync)
    os.replace(tmp, path)
    if sync:
        fsync_dir(path.parent)


def unlink_quietly(path: str | Path) -> None:
    """Unlink; a file already gone is not an error."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def fsync_dir(path: str | Path) -> None:
    """Make a directory's entries (creates, renames, unlinks) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class GroupCommitter:
    def __init__(self, root: Path, *, fsync: bool = True):
        self.root = Path(root)
        self.fsync = fsync
        self._jobs: list[_Job] = []
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="group-commit", daemon=True)
        self._thread.start()
        self.batches = 0

    async def commit(self, files: Sequence[tuple[str | Path, str | Path, bytes]], *,
                     recycler: Recycler | None = None) -> list[OSError | None]:
        """Write and make durable; one result per file (None = durable, or the error).
        Paths as str or Path (the spool's hot path passes str: no Path objects per message).
        recycler: the spool's kept queue files, written over instead of new files
        (kanmon.spool.recycle; the temporary paths are str then)."""
        loop = asyncio.get_running_loop()
        job = _Job(files, loop, loop.create_future(), recycler=recycler)
        with self._cond:
            if self._stop:
                raise OSError("group committer is closed")
            self._jobs.append(job)
            self._cond.notify()
        return await job.future

    def commit_blocking(self, files: Sequence[tuple[str | Path, str | Path, bytes]]) -> list[OSError | None]:
        job = _Job(files, None, None, done=threading.Event())
        with self._cond:
            self._jobs.append(job)
            self._cond.notify()
        assert job.done is not None
        job.done.wait()
        return job.results

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout=30)

    # -- the committer thread ------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self._stop:
                    self._cond.wait()
                if not self._jobs and self._stop:
                    return
                batch, self._jobs = self._jobs, []
            try:
                self._commit(batch)
            except BaseException as e:  # noqa: BLE001 - never leave a caller waiting
                err = e if isinstance(e, OSError) else OSError(str(e))
                for job in batch:
                    job.results = [err] * len(job.files)
            for job in batch:
                self._resolve(job)

    @staticmethod
    def _resolve(job: _Job) -> None:
        if job.done is not None:
            job.done.set()
            return
        assert job.loop is not None and job.future is not None

        def set_result(fut=job.future, res=job.results) -> None:
            if not fut.done():
                fut.set_result(res)

        try:
            job.loop.call_soon_threadsafe(set_result)
        except RuntimeError:
            pass  # the loop is gone; nobody is waiting any more

    def _commit(self, batch: list[_Job]) -> None:
        self.batches += 1
        per_file_sync = self.fsync and _syncfs is None
        written: list[tuple[_Job, int, str | Path, str | Path]] = []
        for job in batch:
            job.results = [None] * len(job.files)
            for i, (tmp, final, data) in enumerate(job.files):
                try:
                    self._write(tmp, data, per_file_sync, job.recycler)
                except OSError as e:
                    job.results[i] = e
                    continue
                written.append((job, i, tmp, final))
        if not written:
            return
        if self.fsync and _syncfs is not None:
            fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
            try:
                sync_files([fd])
            finally:
                os.close(fd)
        dirs: set[str] = set()
        for job, i, tmp, final in written:
            try:
                os.rename(tmp, final)
            except OSError as e:
                job.results[i] = e
                unlink_quietly(tmp)
                continue
            dirs.add(os.path.dirname(final) or ".")
        if self.fsync:
            for d in dirs:
                fsync_dir(d)

    @staticmethod
    def _write(path: str | Path, data: bytes, sync: bool, recycler: Recycler | None = None) -> None:
        taken = recycler.take(path) if recycler is not None else None  # type: ignore[arg-type]
        if taken is None:
            fd, old_size = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), 0
        else:
            fd, old_size = taken
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if old_size > len(data):
                os.ftruncate(fd, len(data))  # a kept file longer than this one: cut to its length
            if sync:
                os.fdatasync(fd)
        except BaseException:
            os.close(fd)
            unlink_quietly(path)
            raise
        os.close(fd)
