"""The per-folder cache file of a Maildir: what IMAP answers without opening messages.

Role: one append-only file per folder (``kanmon-index`` in the folder's directory, or
under a separate index root, like Dovecot's ``INDEX=``) holding, per message file (keyed
by its Maildir base name, which never changes while the file exists): stored and wire
sizes, internal date, the day of its Date: header, and the rendered ENVELOPE, BODY and
BODYSTRUCTURE, the raw lines of the header fields clients ask for, and the decoded text
SEARCH matches on. The format and its decoding rules are in docs/mailbox-index.md.

UIDs are not kept here: they stay in ``dovecot-uidlist`` (maildir.py), flags stay in the
file names, so Dovecot and kanmon agree on both and this file is only ever a cache.
Entries are added by local delivery (which has the message in hand) and lazily by IMAP
for messages that arrived otherwise; entries of messages that are gone are dropped when
the file is compacted. Writers append one whole record under ``flock(LOCK_EX)``;
readers read under ``LOCK_SH``, so a partial record is only ever one a crash left.

Trusts: nothing in the file. Every record carries its length and a CRC-32; a record
that does not decode exactly (bad magic, length past the end, CRC mismatch, trailing
bytes, a field out of bounds) makes the whole file untrusted: it is removed and the
cache refills from the message files. A missing entry is never an error.

Never: hold a message's content, answer a UID or a flag, or let a reader see an entry
that did not pass its checksum. Files are created 0600 in 0700 directories.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
import threading
import zlib
from pathlib import Path
from typing import NamedTuple

INDEX_FILE = "kanmon-index"
MAGIC = b"KMIDX\x00\x01\n"  # format 1
RECORD_HEAD = struct.Struct("<II")  # payload length, CRC-32 of the payload
ENTRY_FIXED = struct.Struct("<BQQqI")  # kind, size, vsize, internal date (s), sent day (yyyymmdd or 0)
FIELD_LEN = struct.Struct("<I")
KIND_ENTRY = 1
ENTRY_FIELDS = 6  # base, search, envelope, body, bodystructure, headers
MAX_RECORD = 256 * 1024  # larger entries are not cached (the message is read instead)
MAX_BASE = 255
COMPACT_MIN_DEAD = 256  # compact when at least this many entries are dead ...
COMPACT_RATIO = 1.0  # ... and they are more than this share of the live ones

_roots: list[tuple[Path, Path]] = []  # (mailboxes root, index root) set by configure()


def configure(mail_root: Path | str | None, index_root: Path | str | None) -> None:
    """Keep the cache files under index_root (mirroring the tree below mail_root) instead
    of beside the Maildirs; None, None: beside them (the default)."""
    _roots.clear()
    if mail_root is not None and index_root is not None:
        _roots.append((Path(mail_root), Path(index_root)))


def index_path(folder_path: Path) -> Path:
    """Where the cache file of the Maildir folder at folder_path lives."""
    for mail_root, index_root in _roots:
        try:
            rel = folder_path.relative_to(mail_root)
        except ValueError:
            continue
        return index_root / rel / INDEX_FILE
    return folder_path / INDEX_FILE


class IndexCorrupt(Exception):
    """The file does not decode exactly: it is discarded."""


class CacheEntry(NamedTuple):
    """What IMAP needs of one message without reading it (a tuple: made fast)."""

    size: int  # stored bytes (LF)
    vsize: int  # wire bytes (CRLF): RFC822.SIZE
    internal_date: int  # epoch seconds
    sent_day: int  # the Date: header's day as yyyymmdd, 0 when it has none that parses
    envelope: bytes  # rendered ENVELOPE (RFC 3501 7.4.2)
    body: bytes  # rendered BODY (non-extended BODYSTRUCTURE)
    bodystructure: bytes  # rendered BODYSTRUCTURE
    headers: bytes  # raw lines (CRLF) of the CACHED_HEADERS fields, in message order
    search: bytes  # UTF-8: normalized decoded Subject, From, To, Cc, Bcc joined by NUL


def encode_entry(base: str, e: CacheEntry) -> bytes:
    """One record (head and payload) for base; ValueError when it cannot be cached."""
    b = base.encode("utf-8", "surrogateescape")
    if not b or len(b) > MAX_BASE or b"\0" in b or b"/" in b:
        raise ValueError("bad base name")
    parts = [ENTRY_FIXED.pack(KIND_ENTRY, e.size, e.vsize, e.internal_date, e.sent_day)]
    for f in (b, e.search, e.envelope, e.body, e.bodystructure, e.headers):
        parts.append(FIELD_LEN.pack(len(f)))
        parts.append(f)
    payload = b"".join(parts)
    if len(payload) > MAX_RECORD:
        raise ValueError("entry too large to cache")
    return RECORD_HEAD.pack(len(payload), zlib.crc32(payload)) + payload


def decode_payload(payload: bytes | memoryview) -> tuple[str, CacheEntry]:
    """A record's payload -> (base, entry); IndexCorrupt unless it decodes exactly."""
    if len(payload) < ENTRY_FIXED.size:
        raise IndexCorrupt("short record")
    kind, size, vsize, date, day = ENTRY_FIXED.unpack_from(payload, 0)
    if kind != KIND_ENTRY:
        raise IndexCorrupt(f"unknown record kind {kind}")
    if day and not (10000101 <= day <= 99991231):
        raise IndexCorrupt("bad sent day")
    pos = ENTRY_FIXED.size
    fields = []
    for _ in range(ENTRY_FIELDS):
        if pos + FIELD_LEN.size > len(payload):
            raise IndexCorrupt("field past the end of its record")
        (n,) = FIELD_LEN.unpack_from(payload, pos)
        pos += FIELD_LEN.size
        if pos + n > len(payload):
            raise IndexCorrupt("field past the end of its record")
        fields.append(bytes(payload[pos:pos + n]))
        pos += n
    if pos != len(payload):
        raise IndexCorrupt("trailing bytes in a record")
    raw_base = fields[0]
    if not raw_base or len(raw_base) > MAX_BASE or b"\0" in raw_base or b"/" in raw_base:
        raise IndexCorrupt("bad base name")
    base = raw_base.decode("utf-8", "surrogateescape")
    search, envelope, body, bodystructure, headers = fields[1:]
    return base, CacheEntry(size, vsize, date, day, envelope, body, bodystructure, headers, search)


def decode_search(payload: bytes | memoryview) -> CacheEntry:
    """Only what SEARCH uses of a payload that decode_payload accepted before: sizes,
    dates and the search text (the rendered fields are left empty)."""
    _, size, vsize, date, day = ENTRY_FIXED.unpack_from(payload, 0)
    pos = ENTRY_FIXED.size
    (n,) = FIELD_LEN.unpack_from(payload, pos)
    pos += FIELD_LEN.size + n
    (n,) = FIELD_LEN.unpack_from(payload, pos)
    pos += FIELD_LEN.size
    return CacheEntry(size, vsize, date, day, b"", b"", b"", b"", bytes(payload[pos:pos + n]))


def search_bytes(data: bytes | bytearray, off: int) -> bytes:
    """The search text of the payload at data[off:] (one decode_payload accepted)."""
    pos = off + ENTRY_FIXED.size
    (n,) = FIELD_LEN.unpack_from(data, pos)
    pos += FIELD_LEN.size + n
    (n,) = FIELD_LEN.unpack_from(data, pos)
    pos += FIELD_LEN.size
    return bytes(data[pos:pos + n])


def decode_records(data: bytes, start: int) -> tuple[dict[str, int], int]:
    """Offsets (of each base's last record's payload) in data[start:], and the end.
    IndexCorrupt when anything there does not decode exactly (a torn tail included)."""
    offsets: dict[str, int] = {}
    pos = start
    end = len(data)
    view = memoryview(data)
    while pos < end:
        if pos + RECORD_HEAD.size > end:
            raise IndexCorrupt("torn record head")
        length, crc = RECORD_HEAD.unpack_from(data, pos)
        body = pos + RECORD_HEAD.size
        if length > MAX_RECORD or body + length > end:
            raise IndexCorrupt("record longer than the file")
        payload = view[body:body + length]
        if zlib.crc32(payload) != crc:
            raise IndexCorrupt("record checksum mismatch")
        base, _ = decode_payload(payload)
        offsets[base] = body
        pos = body + length
    return offsets, pos


class MailboxIndex:
    """The cache file of one folder, shared by the sessions of a process (thread-safe).

    ``get`` answers from memory (the file's bytes read once, then only what others
    appended); ``add`` appends; ``compact`` rewrites the file with the live entries.
    """

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()
        self._data = bytearray()  # the file's bytes as far as read and checked (no view outlives a call)
        self._offsets: dict[str, int] = {}  # base -> payload offset in _data
        self._added: dict[str, CacheEntry] = {}  # entries added by us since _data was read
        self._stamp: tuple[int, int] | None = None  # (dev, ino) of the file read
        self._texts: dict[str, str] = {}  # base -> decoded search text (see search_texts)
        self.discarded = 0  # times a corrupt file was thrown away (for tests and logs)

    # -- reading
    def _refresh(self) -> None:
        """Read what changed in the file since we looked (caller holds _lock)."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            self._reset()
            return
        try:
            st = os.fstat(fd)
            stamp = (st.st_dev, st.st_ino)
            if stamp == self._stamp and st.st_size == len(self._data):
                return
            fcntl.flock(fd, fcntl.LOCK_SH)
            try:
                st = os.fstat(fd)
                start = 0 if stamp != self._stamp or st.st_size < len(self._data) else len(self._data)
                with open(fd, "rb", closefd=False) as f:
                    f.seek(start)
                    tail = f.read()
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
        try:
            if start == 0:
                if tail[:len(MAGIC)] != MAGIC:
                    raise IndexCorrupt("not a kanmon index file (bad magic)")
                offsets, _ = decode_records(tail, len(MAGIC))
            else:
                offsets, _ = decode_records(tail, 0)
        except IndexCorrupt:
            self._discard(stamp)
            return
        if start == 0:
            self._data = bytearray(tail)
            self._offsets = offsets
            self._texts = {}
        else:  # appended in place: the bytes read before are not copied again
            self._data += tail
            self._offsets.update({base: off + start for base, off in offsets.items()})
        self._stamp = stamp
        for base in offsets:
            self._added.pop(base, None)

    def _reset(self) -> None:
        self._data, self._offsets, self._added, self._stamp = bytearray(), {}, {}, None
        self._texts = {}

    def _discard(self, stamp: tuple[int, int]) -> None:
        """Remove the untrusted file (if it is still the one we read) and forget all."""
        self.discarded += 1
        with contextlib.suppress(FileNotFoundError):
            st = self.path.stat()
            if (st.st_dev, st.st_ino) == stamp:
                self.path.unlink()
        self._reset()

    def get_many(self, bases: list[str], search_only: bool = False) -> list[CacheEntry | None]:
        """The entries of these messages (None where there is none); search_only: only
        the parts SEARCH uses (decode_search), which is faster."""
        decode = decode_search if search_only else (lambda v: decode_payload(v)[1])
        with self._lock:
            self._refresh()
            out: list[CacheEntry | None] = []
            data = self._data
            with memoryview(data) as view:  # released before an append resizes _data
                for base in bases:
                    e = self._added.get(base)
                    if e is None:
                        off = self._offsets.get(base)
                        if off is not None:
                            (length,) = FIELD_LEN.unpack_from(data, off - RECORD_HEAD.size)
                            e = decode(view[off:off + length])
                    out.append(e)
            return out

    def search_texts(self, bases: list[str]) -> list[str | None]:
        """The decoded search text (CacheEntry.search: the normalized Subject, From, To,
        Cc, Bcc joined by NUL) of each message, None where there is no entry (or only an
        outdated one). Kept decoded in memory once asked for (an entry changes only when
        one is added again for its base, which drops the kept text), so a SEARCH of a
        large folder is a pass over strings, not over records."""
        with self._lock:
            self._refresh()
            memo = self._texts
            data = self._data
            out: list[str | None] = []
            for base in bases:
                t = memo.get(base)
                if t is None:
                    e = self._added.get(base)
                    if e is not None:
                        raw = e.search
                    else:
                        off = self._offsets.get(base)
                        if off is None:
                            out.append(None)
                            continue
                        raw = search_bytes(data, off)
                    if b"\x1b" in raw:
                        # made before raw ISO-2022-JP header fields were decoded (it kept
                        # their ESC; cache.outdated_text): as no text, so it is made again
                        out.append(None)
                        continue
                    t = memo[base] = raw.decode("utf-8", "surrogatepass")
                out.append(t)
            return out

    def get(self, base: str) -> CacheEntry | None:
        return self.get_many([base])[0]

    def count(self) -> int:
        with self._lock:
            self._refresh()
            return len(self._offsets.keys() | self._added.keys())

    # -- writing
    def add_many(self, entries: list[tuple[str, CacheEntry]]) -> None:
        """Append entries (one write under the lock); entries too large are skipped."""
        records = []
        for base, e in entries:
            try:
                records.append(encode_entry(base, e))
            except ValueError:
                continue
        if not records:
            return
        with self._lock:
            append_records(self.path, b"".join(records))
            for base, e in entries:
                self._added[base] = e
                self._texts.pop(base, None)  # a new entry for a base replaces the old one

    def add(self, base: str, entry: CacheEntry) -> None:
        self.add_many([(base, entry)])

    def compact(self, live: set[str]) -> bool:
        """Rewrite the file with only the entries of live messages when enough are dead."""
        with self._lock:
            self._refresh()
            known = self._offsets.keys() | self._added.keys()
            dead = len(known - live)
            if dead < COMPACT_MIN_DEAD or dead <= COMPACT_RATIO * len(known & live):
                return False
            chunks = [MAGIC]
            data = self._data
            for base in known & live:
                e = self._added.get(base)
                if e is not None:
                    with contextlib.suppress(ValueError):
                        chunks.append(encode_entry(base, e))
                else:
                    off = self._offsets[base]
                    (length,) = FIELD_LEN.unpack_from(data, off - RECORD_HEAD.size)
                    chunks.append(bytes(data[off - RECORD_HEAD.size:off + length]))
            replace_file(self.path, b"".join(chunks))
            self._reset()
            return True


def _make_dirs(path: Path) -> None:
    missing = []
    while not path.is_dir():
        missing.append(path)
        if path.parent == path:
            break
        path = path.parent
    for p in reversed(missing):
        p.mkdir(mode=0o700, exist_ok=True)


def append_records(path: Path, records: bytes) -> None:
    """Append whole records under LOCK_EX, writing the magic into a new file first.
    A file replaced (compacted) while we waited for the lock is reopened."""
    for _ in range(5):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        except FileNotFoundError:
            _make_dirs(path.parent)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            st = os.fstat(fd)
            try:
                now = path.stat()
            except FileNotFoundError:
                continue
            if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
                continue  # compacted meanwhile: append to the new file
            data = records if st.st_size else MAGIC + records
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            return
        finally:
            os.close(fd)  # also releases the flock


def replace_file(path: Path, data: bytes) -> None:
    """Write a new index file beside path and rename it over path (holding the old
    file's LOCK_EX, so no append is lost into the replaced file meanwhile)."""
    _make_dirs(path.parent)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        old = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        os.rename(tmp, path)
        return
    try:
        fcntl.flock(old, fcntl.LOCK_EX)
        os.rename(tmp, path)
    finally:
        os.close(old)
