"""Directory change notification for IMAP IDLE: Linux inotify through ctypes.

Role: one inotify descriptor per event loop, read by the loop itself (add_reader); a
connection in IDLE subscribes the Maildir directories of its folder (new/ and cur/) and
is woken when a file is created, renamed in or out, or removed there (a delivery, a
flag change or an expunge by anyone), or when the directory goes away; so a delivered
message reaches an idle client at once, with no timer. ``DirectoryWatcher.of(loop)`` is
None where inotify is missing (another OS, or the per-user limit reached): the caller
falls back to polling.

Trusts: the kernel's event records (read whole, bounded by the read size).
Never: block the loop (the descriptor is non-blocking), keep a watch nobody subscribes
to, or raise into a connection (a watch that cannot be added answers False: poll).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import os
import struct
from collections.abc import Callable

IN_MODIFY = 0x002
IN_ATTRIB = 0x004
IN_MOVED_FROM = 0x040
IN_MOVED_TO = 0x080
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_ONLYDIR = 0x01000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
MASK = IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR
EVENT = struct.Struct("iIII")  # wd, mask, cookie, len (struct inotify_event)

_libc: ctypes.CDLL | None = None
_watchers: dict[int, DirectoryWatcher | None] = {}  # id(loop) -> its watcher (None: unavailable)


def _load_libc() -> ctypes.CDLL | None:
    global _libc
    if _libc is None:
        try:
            lib = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
            lib.inotify_init1.argtypes = [ctypes.c_int]
            lib.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
            lib.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
        except (OSError, AttributeError):
            return None
        _libc = lib
    return _libc


class DirectoryWatcher:
    """inotify watches shared by the connections of one event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, libc: ctypes.CDLL, fd: int):
        self.loop = loop
        self.libc = libc
        self.fd = fd
        self._by_path: dict[str, int] = {}  # path -> wd
        self._subs: dict[int, set[Callable[[], None]]] = {}  # wd -> callbacks
        loop.add_reader(fd, self._read)

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop, *, enabled: bool = True) -> DirectoryWatcher | None:
        """The loop's watcher, made on first use; None where inotify is not available."""
        key = id(loop)
        if key in _watchers:
            w = _watchers[key]
            if w is None or w.loop is loop:
                return w
            os.close(w.fd)  # a closed loop's (the id was reused): its descriptor goes with it
        w = None
        libc = _load_libc() if enabled else None
        if libc is not None:
            fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
            if fd >= 0:
                try:
                    w = cls(loop, libc, fd)
                except (NotImplementedError, RuntimeError, OSError):  # a loop without add_reader
                    os.close(fd)
                    w = None
        _watchers[key] = w
        return w

    def subscribe(self, paths: tuple[str, ...], callback: Callable[[], None]) -> bool:
        """Call callback (on the loop) whenever something changes in one of the paths.
        False (nothing subscribed) when a path cannot be watched: the caller polls."""
        done: list[int] = []
        for path in paths:
            wd = self._by_path.get(path)
            if wd is None:
                wd = self.libc.inotify_add_watch(self.fd, os.fsencode(path), MASK)
                if wd < 0:
                    for d in done:
                        self._drop(d, callback)
                    return False
                self._by_path[path] = wd
            self._subs.setdefault(wd, set()).add(callback)
            done.append(wd)
        return True

    def unsubscribe(self, paths: tuple[str, ...], callback: Callable[[], None]) -> None:
        for path in paths:
            wd = self._by_path.get(path)
            if wd is not None:
                self._drop(wd, callback)

    def _drop(self, wd: int, callback: Callable[[], None]) -> None:
        subs = self._subs.get(wd)
        if subs is None:
            return
        subs.discard(callback)
        if not subs:
            del self._subs[wd]
            for p, w in list(self._by_path.items()):
                if w == wd:
                    del self._by_path[p]
            self.libc.inotify_rm_watch(self.fd, wd)

    def watched(self) -> int:
        """How many directories are watched (for tests)."""
        return len(self._by_path)

    def _read(self) -> None:
        try:
            data = os.read(self.fd, 64 * 1024)
        except BlockingIOError:
            return
        except OSError:
            return
        woken: set[int] = set()
        overflow = False
        pos = 0
        while pos + EVENT.size <= len(data):
            wd, mask, _cookie, length = EVENT.unpack_from(data, pos)
            pos += EVENT.size + length
            if mask & IN_Q_OVERFLOW:
                overflow = True
            elif mask & IN_IGNORED:  # the directory is gone: its watch is gone too
                for p, w in list(self._by_path.items()):
                    if w == wd:
                        del self._by_path[p]
                woken.add(wd)
                for cb in list(self._subs.pop(wd, ())):
                    cb()
                continue
            woken.add(wd)
        targets = set()
        for wd in (self._subs if overflow else woken):
            targets |= self._subs.get(wd, set())
        for cb in targets:
            cb()

    def close(self) -> None:
        self.loop.remove_reader(self.fd)
        os.close(self.fd)
        _watchers.pop(id(self.loop), None)
