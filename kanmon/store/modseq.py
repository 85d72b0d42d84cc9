"""Per-folder mod-sequences (RFC 7162 CONDSTORE/QRESYNC), kept beside the mailbox index.

Role: one append-only file per folder (``kanmon-modseq``, in the directory of the
folder's ``kanmon-index``) recording, per UID, the mod-sequence of the last change seen
to the message (its arrival or a flag change: ours, or another program's rename of the
file's ``:2,`` letters, noticed at the next scan) with the flag letters it had then, and
for expunged UIDs the mod-sequence of the expunge (a bounded list of tombstones, for
VANISHED). ``ModseqLog.update`` hands out one new mod-sequence per change (a STORE, an
expunge, a scan that noticed changes), records it and returns it; the folder's scan
calls ``reconcile`` so every message carries its mod-sequence.

Mod-sequences only grow. A new or rebuilt file starts its HIGHESTMODSEQ at the clock in
microseconds (or above the highest value the file still showed, if that is higher):
each change adds one, so values given out earlier stay below it unless the folder saw
more than a million changes a second on average since the file was made. So a torn,
lost or deleted file is rebuilt (every message gets the new, higher mod-sequence)
without the client ever seeing a mod-sequence go back (RFC 7162 3.1: a client that
asks CHANGEDSINCE an old value gets every message, which is right).

Trusts: nothing in the file. Records carry a length and a CRC-32 (the framing of
kanmon.store.index); a record that does not decode exactly makes the whole file
untrusted: it is replaced by a rebuilt one. A file of another UIDVALIDITY is rebuilt.
Never: reuse or lower a mod-sequence of the folder, or keep more than MAX_TOMBSTONES
expunged UIDs (older ones are dropped; ``vanished_since`` then answers "unknown").
"""

from __future__ import annotations

import fcntl
import os
import struct
import threading
import time
import zlib
from collections.abc import Iterable
from pathlib import Path

from kanmon.store.index import RECORD_HEAD, _make_dirs, index_path

MODSEQ_FILE = "kanmon-modseq"
MAGIC = b"KMMSQ\x00\x01\n"  # format 1
KIND_HEAD = 1  # uidvalidity, highest, floor (tombstones at or below floor were dropped), inode
KIND_SET = 2  # (uid, modseq, flag letters) per message
KIND_GONE = 3  # (uid, modseq) per expunged message
HEAD = struct.Struct("<BQQQQ")
SET_ITEM = struct.Struct("<IQB")
GONE_ITEM = struct.Struct("<IQ")
MAX_RECORD = 1 << 20
MAX_TOMBSTONES = 10_000
COMPACT_MIN = 4096  # rewrite the file when it holds this many superseded items ...
MAX_MODSEQ = (1 << 63) - 1  # RFC 7162 mod-sequence values are 63-bit


class ModseqCorrupt(Exception):
    """The file does not decode exactly."""


def modseq_path(folder_path: Path) -> Path:
    """Where the mod-sequence file of the Maildir folder at folder_path lives."""
    return index_path(folder_path).with_name(MODSEQ_FILE)


def clock_floor() -> int:
    """The first HIGHESTMODSEQ of a new or rebuilt file: microseconds since the epoch."""
    return int(time.time() * 1_000_000)


def _record(payload: bytes) -> bytes:
    return RECORD_HEAD.pack(len(payload), zlib.crc32(payload)) + payload


class ModseqLog:
    """The mod-sequences of one folder, shared by the sessions of a process (its calls
    are made under the folder's lock; this class also locks itself). Writers append
    under ``flock(LOCK_EX)`` after reading what other processes appended."""

    def __init__(self, path: Path, anchor: Path | None = None):
        self.path = path
        self.anchor = anchor  # a directory that must exist for the file to be made (the folder)
        self._lock = threading.Lock()
        self._reset()
        self.discarded = 0  # times a corrupt file was rebuilt (for tests and logs)

    def _reset(self) -> None:
        self.uidvalidity = 0
        self.highest = 0
        self.floor = 0
        self.msgs: dict[int, tuple[int, str]] = {}  # uid -> (modseq, flag letters)
        self.gone: dict[int, int] = {}  # expunged uid -> modseq of the expunge
        self._read = 0  # bytes of the file applied
        self._stamp: tuple[int, int] | None = None
        self._items = 0  # items in the file (to know when to compact)
        self._head_ino = 0  # the inode the file had when it was written (its head says)

    # -- reading
    def _apply(self, data: bytes, start: int) -> int:
        """Apply the records of data[start:]; return where they end. ModseqCorrupt
        (after applying the good prefix) when something does not decode exactly."""
        pos, end = start, len(data)
        while pos < end:
            if pos + RECORD_HEAD.size > end:
                raise ModseqCorrupt("torn record head")
            length, crc = RECORD_HEAD.unpack_from(data, pos)
            body = pos + RECORD_HEAD.size
            if length > MAX_RECORD or body + length > end or length < 1:
                raise ModseqCorrupt("record longer than the file")
            if zlib.crc32(data[body:body + length]) != crc:
                raise ModseqCorrupt("record checksum mismatch")
            kind = data[body]
            p, stop = body + 1, body + length
            if kind == KIND_HEAD:
                if length != HEAD.size:
                    raise ModseqCorrupt("bad head record")
                _, self.uidvalidity, highest, self.floor, self._head_ino = HEAD.unpack_from(data, body)
                self.highest = max(self.highest, highest)
            elif kind == KIND_SET:
                while p < stop:
                    if p + SET_ITEM.size > stop:
                        raise ModseqCorrupt("item past its record")
                    uid, ms, n = SET_ITEM.unpack_from(data, p)
                    p += SET_ITEM.size
                    if p + n > stop:
                        raise ModseqCorrupt("item past its record")
                    self.msgs[uid] = (ms, data[p:p + n].decode("ascii", "replace"))
                    self.gone.pop(uid, None)
                    self.highest = max(self.highest, ms)
                    self._items += 1
                    p += n
            elif kind == KIND_GONE:
                if (length - 1) % GONE_ITEM.size:
                    raise ModseqCorrupt("bad expunge record")
                while p < stop:
                    uid, ms = GONE_ITEM.unpack_from(data, p)
                    p += GONE_ITEM.size
                    self.msgs.pop(uid, None)
                    self.gone[uid] = ms
                    self.highest = max(self.highest, ms)
                    self._items += 1
            else:
                raise ModseqCorrupt(f"unknown record kind {kind}")
            pos = stop
        return pos

    def _catch_up(self, fd: int) -> bool:
        """Under the file lock: apply what was appended since we read (all of it when the
        file is another one). False when the file must be rebuilt (empty or corrupt)."""
        st = os.fstat(fd)
        stamp = (st.st_dev, st.st_ino)
        if stamp != self._stamp or st.st_size < self._read:
            self._reset()
            self._stamp = stamp
        if st.st_size == self._read:
            return self._read > 0
        with open(fd, "rb", closefd=False) as f:
            f.seek(self._read)
            data = f.read()
        try:
            if self._read == 0:
                if data[:len(MAGIC)] != MAGIC:
                    raise ModseqCorrupt("not a kanmon modseq file")
                end = self._apply(data, len(MAGIC))
                if self._head_ino != st.st_ino:
                    # a copy (a backup restored, a mailbox moved): its values may be
                    # older than ones clients were given here, so it is not trusted
                    raise ModseqCorrupt("not the file that was written here")
                self._read = end
            else:
                self._read += self._apply(data, 0)
        except ModseqCorrupt:
            self.discarded += 1
            return False
        return True

    # -- writing
    def update(self, uidvalidity: int, decide) -> int:
        """Under the file lock, with what other processes wrote applied: decide(self) ->
        (set: [(uid, letters)], gone: [uid]); give them one new mod-sequence, record it
        and return it (0 when decide found nothing to record). A file of another
        UIDVALIDITY, or one that does not decode, is rebuilt first (its messages are
        then all new to decide)."""
        with self._lock:
            for _ in range(5):
                try:
                    fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
                except FileNotFoundError:
                    if self.anchor is not None and not self.anchor.is_dir():
                        raise  # the folder was deleted: never make its directory again
                    _make_dirs(self.path.parent)
                    fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                    st = os.fstat(fd)
                    try:
                        now = self.path.stat()
                    except FileNotFoundError:
                        continue
                    if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
                        continue  # replaced meanwhile: lock the new file
                    return self._update_locked(fd, uidvalidity, decide)
                finally:
                    os.close(fd)
            raise OSError(f"{self.path}: replaced too often while waiting for its lock")

    def _update_locked(self, fd: int, uidvalidity: int, decide) -> int:
        good = self._catch_up(fd)
        rebuild = not good or self.uidvalidity != uidvalidity
        if rebuild:
            start = max(self.highest + 1, clock_floor())
            self.msgs, self.gone = {}, {}
            self.uidvalidity, self.highest, self.floor = uidvalidity, start, start
        changed, gone = decide(self)
        modseq = 0
        if changed or gone:
            modseq = self.highest + 1
            if modseq > MAX_MODSEQ:
                raise OSError("mod-sequences exhausted")
            self.highest = modseq
            for uid, letters in changed:
                self.msgs[uid] = (modseq, letters)
                self.gone.pop(uid, None)
            for uid in gone:
                if self.msgs.pop(uid, None) is not None:
                    self.gone[uid] = modseq
        live = len(self.msgs) + len(self.gone)
        if rebuild or len(self.gone) > MAX_TOMBSTONES or self._items > live + COMPACT_MIN:
            self._rewrite(fd)
        elif modseq:
            recs = []
            if changed:
                recs.append(self._set_record([(u, modseq, letters) for u, letters in changed]))
            if gone:
                recs.append(_record(bytes([KIND_GONE]) + b"".join(GONE_ITEM.pack(u, modseq) for u in gone)))
            data = b"".join(recs)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            self._read += len(data)
            self._items += len(changed) + len(gone)
        return modseq

    @staticmethod
    def _set_record(items: list[tuple[int, int, str]]) -> bytes:
        """SET records (as many as MAX_RECORD needs) for (uid, modseq, letters) items."""
        out, chunk, size = [], [bytes([KIND_SET])], 1
        for uid, ms, letters in items:
            b = letters.encode("ascii", "replace")[:255]
            item = SET_ITEM.pack(uid, ms, len(b)) + b
            if size + len(item) > MAX_RECORD:
                out.append(_record(b"".join(chunk)))
                chunk, size = [bytes([KIND_SET])], 1
            chunk.append(item)
            size += len(item)
        if len(chunk) > 1:
            out.append(_record(b"".join(chunk)))
        return b"".join(out)

    def _rewrite(self, old_fd: int) -> None:
        """Replace the file (whose LOCK_EX old_fd holds) with the current state, the
        oldest tombstones beyond MAX_TOMBSTONES dropped (floor raised over them)."""
        if len(self.gone) > MAX_TOMBSTONES:
            by_age = sorted(self.gone.items(), key=lambda kv: kv[1])
            dropped = by_age[:len(self.gone) - MAX_TOMBSTONES]
            self.floor = max(self.floor, max(ms for _, ms in dropped))
            for uid, _ in dropped:
                del self.gone[uid]
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            st = os.fstat(fd)
            data = self._state_bytes(st.st_ino)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, self.path)  # we hold the old file's lock: no append is lost
        self._stamp = (st.st_dev, st.st_ino)
        self._read = len(data)
        self._items = len(self.msgs) + len(self.gone)

    def _state_bytes(self, ino: int) -> bytes:
        """The whole file for the current state, its head naming the inode it goes to."""
        parts = [MAGIC, _record(HEAD.pack(KIND_HEAD, self.uidvalidity, self.highest, self.floor, ino))]
        parts.append(self._set_record([(u, ms, letters) for u, (ms, letters) in self.msgs.items()]))
        gone = list(self.gone.items())
        for i in range(0, len(gone), MAX_RECORD // GONE_ITEM.size - 1):
            parts.append(_record(bytes([KIND_GONE]) + b"".join(GONE_ITEM.pack(u, ms) for u, ms in
                                                                gone[i:i + MAX_RECORD // GONE_ITEM.size - 1])))
        return b"".join(parts)

    # -- questions
    def vanished_since(self, modseq: int) -> set[int] | None:
        """UIDs expunged after modseq, or None when tombstones that old were dropped
        (or the file was rebuilt since): the caller must then assume any UID it does
        not see may be gone."""
        with self._lock:
            if modseq < self.floor:
                return None
            return {u for u, ms in self.gone.items() if ms > modseq}


def changed_messages(log: ModseqLog, present: Iterable[tuple[int, str]]) -> tuple[list[tuple[int, str]], list[int]]:
    """decide() of a folder scan: the messages that are new or whose letters differ from
    the recorded ones, and the recorded UIDs that are no longer there."""
    msgs = log.msgs
    changed = []
    seen = set()
    for uid, letters in present:
        seen.add(uid)
        rec = msgs.get(uid)
        if rec is None or rec[1] != letters:
            changed.append((uid, letters))
    gone = [u for u in msgs if u not in seen] if len(seen) != len(msgs) or changed else []
    return changed, gone


__all__ = ["MODSEQ_FILE", "ModseqLog", "changed_messages", "clock_floor", "modseq_path"]
