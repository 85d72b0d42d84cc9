"""Queue files kept for reuse: <data_dir>/spool/recycle/.

Role: when a message is finished, its queue file (if it is small) is renamed into
recycle/ instead of being unlinked, and the group committer writes the next queue file
over one of them (renamed to its temporary name in incoming/, overwritten, cut to its
new length) instead of creating a new file.

Why: creating a file allocates an inode and unlinking it frees the inode and its blocks.
On this project's machine class (ext4 without a journal, which scans the recently freed
inodes of a group on every create) that was a fifth of the machine's CPU time in a relay
run; reusing the file costs two renames and a write over blocks already allocated
(docs/performance.md, "Queue files reused"). Every file system saves the inode and block
bookkeeping.

Promises:
- A file in recycle/ is never a message: recovery and the queue walks never read it, and
  the node empties the directory at start.
- A file is written over only once its removal from queue/ is durable (the taker
  fsyncs queue/ after each listing, before it takes what it listed): after a crash, a
  queue/ entry never points at another message's bytes.
- A file waits READY seconds in recycle/ before it is written over, and a reader of a
  queue file (`queue show`, an export) checks after reading that the queue's name still
  names the file it read (kanmon.spool.store: else the message was finished meanwhile).
- A file unused for IDLE seconds is removed (sweep(), by the node every SWEEP_EVERY
  seconds: IDLE to IDLE + SWEEP_EVERY): a delivered message's bytes do not stay on disk
  for long. The files are as private as the queue (0600, in the 0700 spool); only a
  regular file of ours with no other name (no hard link) is written over.
- At most KEEP files (of at most MAX_SIZE bytes each: 256 MiB of disk at most) are kept;
  anything else is unlinked.

Names: "<monotonic ms>.<queue id>", the time it came in (CLOCK_MONOTONIC is one clock for
every process of the machine; the names of a run before a restart are removed at start,
and a time still to come is removed by the sweep) and the id (names stay unique).

Trusts: the paths given (inside the spool). Concurrency: several processes take from
the directory at once (one receiver per core); a rename is atomic, so a file is taken
by one of them, and a taker that loses the race tries the next name.
"""

from __future__ import annotations

import os
import stat
import threading
import time
from collections.abc import Callable

from kanmon.spool.groupcommit import fsync_dir

KEEP = 1024  # files kept at most
MAX_SIZE = 256 * 1024  # bigger queue files are unlinked: the inode is a small part of their cost
READY = 0.25  # seconds in recycle/ before a file is written over
IDLE = 60.0  # seconds unused before a file is removed
SWEEP_EVERY = 30.0
_LIST_EVERY = 0.1  # seconds between listings while nothing is ready


def _now_ms() -> int:
    return time.monotonic_ns() // 1_000_000


class Recycler:
    def __init__(self, directory: str | os.PathLike, *, sync_dir: str | os.PathLike | None = None,
                 keep: int = KEEP, max_size: int = MAX_SIZE, ready: float = READY, idle: float = IDLE,
                 clock_ms: Callable[[], int] = _now_ms):
        """sync_dir: the directory the files are put from (the spool's queue/), fsynced
        before what a listing found is written over (None: not fsynced, as with fsync off)."""
        self.dir = os.fspath(directory)
        self.sync_dir = None if sync_dir is None else os.fspath(sync_dir)
        self.keep, self.max_size = keep, max_size
        self.ready_ms, self.idle_ms = int(ready * 1000), int(idle * 1000)
        self._clock = clock_ms
        self._lock = threading.Lock()  # put() runs in the queue manager's I/O threads
        self._until_count = 0  # puts left before the directory is counted again
        self._was_full = False  # what the last count said
        self._ready: list[str] = []  # names ready to be taken, the last one first
        self._next_list = 0  # ms: when to list again while nothing is ready
        self.reused = 0  # files taken (this process)

    # -- the one that finishes messages (the queue manager) ------------------------------------

    def put(self, path: str, queue_id: str) -> bool:
        """Keep the finished queue file at path for reuse. False: not kept (too big, the
        directory full, or it could not be moved): the caller unlinks it. True: it is no
        longer at path (moved, or already gone)."""
        try:
            size = os.lstat(path).st_size
        except FileNotFoundError:
            return True
        except OSError:
            return False
        if size > self.max_size:
            return False
        with self._lock:
            if self._full():
                return False
            try:
                os.rename(path, f"{self.dir}/{self._clock()}.{queue_id}")
            except FileNotFoundError:
                return True
            except OSError:
                return False
        return True

    def _full(self) -> bool:
        """Whether the directory holds KEEP files, counted again only when it could: with
        n files found, after KEEP - n puts (the takers only lower it); when full, after
        KEEP / 4 puts unlinked. So it never holds more than KEEP."""
        if self._until_count > 0:
            self._until_count -= 1
            return self._was_full
        try:
            n = len(os.listdir(self.dir))
        except OSError:
            return True
        self._was_full = n >= self.keep
        self._until_count = self.keep // 4 if self._was_full else self.keep - n - 1
        return self._was_full

    # -- the one that writes new queue files (the group committer) ------------------------------

    def take(self, dest: str) -> tuple[int, int] | None:
        """A kept file renamed to dest and opened for writing: (fd, its size), or None
        (nothing ready: the caller creates a new file). What is not a regular file of
        ours with no other name is removed, never written through."""
        while True:
            if not self._ready and not self._list():
                return None
            name = self._ready.pop()
            try:
                os.rename(f"{self.dir}/{name}", dest)
            except FileNotFoundError:
                continue  # another taker had it, or the sweep
            except OSError:
                return None
            fd = -1
            try:
                fd = os.open(dest, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
                st = os.fstat(fd)
                # Ours alone: a file with another name (a hard link) is never written through.
                if stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and st.st_uid == os.geteuid():
                    self.reused += 1
                    return fd, st.st_size
            except OSError:
                pass
            if fd >= 0:
                os.close(fd)
            try:
                os.unlink(dest)
            except OSError:
                pass

    def _list(self) -> bool:
        now = self._clock()
        if now < self._next_list:
            return False
        ready = []
        try:
            names = os.listdir(self.dir)
        except OSError:
            names = []
        for name in names:
            at = name_time(name)
            if at is not None and now - at >= self.ready_ms:
                ready.append((at, name))
        ready.sort(reverse=True)  # popped from the end: the oldest first, before the sweep takes it
        if ready and self.sync_dir is not None:
            try:  # what was listed left queue/ before: that is durable from here on
                fsync_dir(self.sync_dir)
            except OSError:
                ready = []
        self._ready = [name for _at, name in ready]
        if not self._ready:
            self._next_list = now + int(_LIST_EVERY * 1000)
        return bool(self._ready)

    # -- housekeeping ------------------------------------------------------------------------

    def sweep(self) -> int:
        """Remove the files unused for IDLE seconds, and anything in the directory that is
        not a kept file (at start, Spool.clear_at_start empties it). Returns how many."""
        now = self._clock()
        removed = 0
        try:
            names = os.listdir(self.dir)
        except OSError:
            return 0
        for name in names:
            at = name_time(name)
            if at is None or now - at >= self.idle_ms or at > now:
                try:
                    os.unlink(f"{self.dir}/{name}")
                except OSError:
                    continue  # taken meanwhile (or not a file: left alone)
                removed += 1
        with self._lock:
            self._until_count = 0  # count again at the next put
        return removed


def name_time(name: str) -> int | None:
    """The monotonic ms of a kept file's name; None for any other name."""
    at, sep, qid = name.partition(".")
    if not (sep and qid and at.isascii() and at.isdigit()):
        return None
    return int(at)
