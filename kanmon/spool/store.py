"""The spool: where a message becomes durable, and the only door to queue state.

Role: the durability boundary and the contract between stages (DESIGN.md). A message
exists once store() returns: its file and the directory entry are fsynced. Every later
stage reads and changes queue state only through this API. Crash recovery is a rescan.

Layout under <data_dir>/spool/:
    incoming/<id>    being written; never acknowledged; removed at start
    queue/<id>       the message: header line, envelope JSON, content (immutable)
    state/<id>       append-only journal of what happened to it (kanmon.spool.journal)
    corrupt/<id>     entries that failed their checks (at start, or when read back while
                     running), kept for the admin: `queue list` shows them, `queue delete` removes them
    recycle/<name>   queue files of finished messages kept to be written over by new ones
                     (kanmon.spool.recycle); never messages; emptied at start
    identity         32 random hex digits naming this queue, made by its first backup:
                     a restore knows an archive written from this very queue by it
                     (one that is not is moved aside to identity.bad, with an event)

Queue file format (docs/spool-format.md):
    b"KANMON-Q1 <envelope length> <content length> <crc32 hex>\\n"
    <envelope JSON> b"\\n" <content>
The CRC covers envelope JSON and content, so a truncated or damaged file is detected.

Group commit (kanmon.spool.groupcommit): the queue files of all sessions waiting at
that moment are written to incoming/, flushed together, renamed into queue/, and the
directory flushed; store() returns only after its own file and its rename are durable.

Admin operations (kanmon.admin.queue_ops) use scan() to walk the queue without
reading bodies (the envelope is at the start of each queue file; in a running node, whose
spool keeps a QueueIndex after recovery, from memory: kanmon.spool.index), read_content_prefix()
for the filters on headers and body text (a bounded read), set_hold() and
set_schedule() to append to a journal, delete() to remove a message on the admin's
word, and export_raw()/import_raw() to move queue files between nodes unchanged.

Trusts: its callers in this process. Never: acknowledge before fsync; delete a queue
file whose recipients are not all final, except on delete() (the admin's decision, which
the caller records in the event log); read or write mailbox files.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from kanmon.model import ClientInfo, Envelope, flags_problem
from kanmon.spool import journal, schema
from kanmon.spool.groupcommit import GroupCommitter, fsync_dir, sync_files, unlink_quietly, write_durably
from kanmon.spool.index import Entry, QueueIndex
from kanmon.spool.journal import QueueState
from kanmon.spool.recycle import Recycler
from kanmon.spool.schema import MAX_ADDRESS, SchemaError, count, flag, text

MAGIC = b"KANMON-Q1 "
MAX_HEADER_LINE = 128
MAX_ENVELOPE = 64 << 20  # bytes of envelope JSON (100,000 recipients fit many times over)
# The critical event of an entry set aside (at start, or when a stage reads it back).
CORRUPT_EVENT = "corrupt queue file moved to spool/corrupt/: {}"
IDENTITY_LIMIT = 33  # 32 hex digits and a newline
IDENTITY_REFUSED = "identity.bad"
IDENTITY_EVENT = (f"spool/identity is not 32 hex digits: moved aside to spool/{IDENTITY_REFUSED}; the queue "
                  "has none until its next backup makes a new one")


class SpoolError(Exception):
    """A storage failure: the caller answers 451 4.3.0."""


class CorruptEntry(ValueError):
    """A stored entry its decoder refuses (damaged, truncated, or of the wrong shape)."""


def envelope_to_json(env: Envelope) -> bytes:
    c = env.client
    data = {
        "from": env.mail_from,
        "rcpts": env.rcpts,
        "orcpts": env.original_rcpts,
        "at": env.received_at,
        "size_hint": env.size_hint,
        "8bit": env.body_8bit,
        "utf8": env.smtputf8,
        "notice": env.is_notice,
    }
    if env.crlf_checked:
        data["crlf"] = True
    if env.no_dot_lines is not None:  # seen at DATA (older files, and mail we write, have none: not known)
        data["nodots"] = env.no_dot_lines
    # RFC 3461 parameters, only when the client gave them (older files have none).
    if env.dsn_ret:
        data["ret"] = env.dsn_ret
    if env.dsn_envid:
        data["envid"] = env.dsn_envid
    if env.dsn_notify:
        data["notify"] = env.dsn_notify
    if env.dsn_orcpt:
        data["orcpt"] = env.dsn_orcpt
    if c is not None:
        data["client"] = {
            "ip": c.ip, "port": c.port, "name": c.name, "helo": c.helo, "proto": c.proto,
            "tls": c.tls_version, "cipher": c.tls_cipher, "bits": c.tls_bits, "auth": c.auth_user,
        }
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def envelope_from_json(raw: bytes) -> Envelope:
    """The envelope of a queue file, decoded strictly (kanmon.spool.schema: types, ranges,
    lengths); CorruptEntry for anything else. Unknown keys are ignored (a newer version's
    additions), missing optional ones take their defaults (older files)."""
    try:
        d = schema.obj(json.loads(raw), "the envelope")
        c = d.get("client")
        client = None
        if c is not None:
            c = schema.obj(c, "client")
            client = ClientInfo(
                ip=text(c, "ip", None, MAX_ADDRESS), port=count(c, "port", 0, 65535),
                name=text(c, "name", "unknown"), helo=text(c, "helo", ""), proto=text(c, "proto", "SMTP", 64),
                tls_version=text(c, "tls", ""), tls_cipher=text(c, "cipher", ""),
                tls_bits=count(c, "bits", 0, 65535), auth_user=text(c, "auth", "", MAX_ADDRESS),
            )
        rcpts = schema.text_list(d, "rcpts")
        if not rcpts:
            raise SchemaError("rcpts is empty")
        ret = text(d, "ret", "", 8)
        if ret not in ("", "FULL", "HDRS"):
            raise SchemaError("ret must be FULL or HDRS")
        return Envelope(
            mail_from=text(d, "from", None, MAX_ADDRESS), rcpts=rcpts, original_rcpts=schema.text_map(d, "orcpts"),
            client=client, size_hint=count(d, "size_hint", 0, schema.MAX_SIZE),
            body_8bit=flag(d, "8bit", False), smtputf8=flag(d, "utf8", False),
            received_at=schema.time_value(d, "at", 0.0), is_notice=flag(d, "notice", False),
            crlf_checked=flag(d, "crlf", False), no_dot_lines=flag(d, "nodots") if "nodots" in d else None,
            dsn_ret=ret, dsn_envid=text(d, "envid", ""),
            dsn_notify=schema.text_map(d, "notify"), dsn_orcpt=schema.text_map(d, "orcpt"),
        )
    except (SchemaError, ValueError, RecursionError) as e:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CorruptEntry(f"bad envelope: {e}") from None


_CLIENT_TEXTS = (("name", "unknown", schema.MAX_TEXT), ("helo", "", schema.MAX_TEXT), ("proto", "SMTP", 64),
                 ("tls", "", schema.MAX_TEXT), ("cipher", "", schema.MAX_TEXT), ("auth", "", MAX_ADDRESS))
_ENV_MAPS = ("orcpts", "notify", "orcpt")
_json_decode = json.JSONDecoder().decode  # json.loads() less its encoding detection
_ENV_FLAGS = ("8bit", "utf8", "notice", "crlf", "nodots")


def envelope_fields_fast(raw: bytes) -> tuple[str, list[str], float] | None:
    """(sender, recipients, arrival) of an envelope that envelope_from_json() accepts, for
    start-up recovery (which keeps nothing else of it): the same checks, written inline,
    without building the Envelope; None for anything it is not sure of (the caller then
    decodes with envelope_from_json(), which refuses or accepts it)."""
    try:
        d = _json_decode(raw.decode("utf-8"))  # UTF-8 only: anything else goes to the strict decoder
    except (ValueError, RecursionError):
        return None
    if type(d) is not dict:
        return None
    c = d.get("client")
    if c is not None:
        if type(c) is not dict:
            return None
        ip, port, bits = c.get("ip"), c.get("port", 0), c.get("bits", 0)
        if (type(ip) is not str or len(ip) > MAX_ADDRESS or type(port) is not int or not 0 <= port <= 65535
                or type(bits) is not int or not 0 <= bits <= 65535):
            return None
        for key, default, limit in _CLIENT_TEXTS:
            v = c.get(key, default)
            if type(v) is not str or len(v) > limit:
                return None
    rcpts, sender, at = d.get("rcpts"), d.get("from"), d.get("at", 0.0)
    if type(rcpts) is not list or not rcpts or len(rcpts) > schema.MAX_ITEMS:
        return None
    for r in rcpts:
        if type(r) is not str or len(r) > MAX_ADDRESS:
            return None
    if type(sender) is not str or len(sender) > MAX_ADDRESS:
        return None
    if type(at) is float:
        if not 0.0 <= at <= schema.MAX_TIME:
            return None
    elif type(at) is int and 0 <= at <= schema.MAX_TIME:
        at = float(at)
    else:
        return None
    ret, envid, size_hint = d.get("ret", ""), d.get("envid", ""), d.get("size_hint", 0)
    if (ret not in ("", "FULL", "HDRS") or type(ret) is not str or type(envid) is not str
            or len(envid) > schema.MAX_TEXT or type(size_hint) is not int or not 0 <= size_hint <= schema.MAX_SIZE):
        return None
    for key in _ENV_FLAGS:
        if type(d.get(key, False)) is not bool:
            return None
    for key in _ENV_MAPS:
        m = d.get(key, _ABSENT)
        if m is _ABSENT:
            continue
        if type(m) is not dict or len(m) > schema.MAX_ITEMS:
            return None
        for k, v in m.items():
            if type(v) is not str or len(k) > MAX_ADDRESS or len(v) > schema.MAX_TEXT:
                return None
    return sender, list(rcpts), at


_ABSENT = object()


def _same_file(fd: int, path: str | os.PathLike) -> None:
    """Raise FileNotFoundError unless path still names the file open as fd: checked after
    a reader read a queue file, which a finished message leaves for spool/recycle/, where
    another message may be written over it (kanmon.spool.recycle). A file in queue/ never
    changes and never comes back once it left, so a name that still matches after the read
    means the bytes read were this message's."""
    try:
        same = os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        same = False
    if not same:
        raise FileNotFoundError(errno.ENOENT, "the message was finished while it was read", os.fspath(path))


def encode_queue_file(env: Envelope, content: bytes) -> bytes:
    ej = envelope_to_json(env)
    crc = zlib.crc32(content, zlib.crc32(ej))
    return b"".join((MAGIC, b"%d %d %08x\n" % (len(ej), len(content), crc), ej, b"\n", content))


def decode_queue_header(head: bytes) -> tuple[int, int, int, int]:
    """(envelope length, content length, crc, offset of envelope) from the first bytes."""
    nl = head.find(b"\n", 0, MAX_HEADER_LINE)
    if not head.startswith(MAGIC) or nl < 0:
        raise CorruptEntry("not a kanmon queue file")
    fields = head[len(MAGIC) : nl].split(b" ")
    if len(fields) != 3 or not fields[0].isdigit() or not fields[1].isdigit() or len(fields[2]) != 8:
        raise CorruptEntry("bad header line")
    elen, clen = int(fields[0]), int(fields[1])
    try:
        crc = int(fields[2], 16)
    except ValueError:
        raise CorruptEntry("bad header line") from None
    if elen > MAX_ENVELOPE:
        raise CorruptEntry("bad header line: envelope too long")
    return elen, clen, crc, nl + 1


def _checked(data: bytes) -> tuple[bytes, bytes]:
    """(envelope JSON, content) of a whole queue file, checked against its header and CRC."""
    elen, clen, crc, off = decode_queue_header(data[:MAX_HEADER_LINE])
    ej = data[off : off + elen]
    if data[off + elen : off + elen + 1] != b"\n":
        raise CorruptEntry("truncated (envelope)")
    content = data[off + elen + 1 :]
    if len(content) != clen:
        raise CorruptEntry(f"truncated: content is {len(content)} of {clen} bytes")
    if zlib.crc32(content, zlib.crc32(ej)) != crc:
        raise CorruptEntry("checksum mismatch")
    return ej, content


def _read_whole(path: str | os.PathLike, *, still_named: bool = False) -> bytes:
    """A file's bytes; one read(2) for a file under 64 KiB (a short read of a regular file is its end).
    still_named: a queue file read by a reader other than the queue manager (a command, an
    export), checked after the read to be still this message's (_same_file)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        data = os.read(fd, 65536)
        if len(data) == 65536:
            chunks = [data]
            while data:
                data = os.read(fd, 1 << 20)
                chunks.append(data)
            data = b"".join(chunks)
        if still_named:
            _same_file(fd, path)
        return data
    finally:
        os.close(fd)


_NOWAIT = getattr(os, "RWF_NOWAIT", 0)


class NotCached(Exception):
    """A read that would have waited for the disk (the file is not all in the page cache)."""


def _read_cached(path: str) -> bytes:
    """A whole file, only if every byte is in the page cache: preadv(2) with RWF_NOWAIT
    never waits for the disk (NotCached instead; also where the kernel or file system
    cannot say). For the event loop, which must not block: its caller reads again in a
    thread. FileNotFoundError when there is no such file."""
    if not _NOWAIT:
        raise NotCached(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise NotCached(path) from e  # the thread's read meets it again and reports it
    try:
        size = os.fstat(fd).st_size
        buf = bytearray(size + 1)  # one more: a file that grew reads longer than its size
        try:
            n = os.preadv(fd, [buf], 0, _NOWAIT)
        except OSError as e:  # EAGAIN: not cached; EOPNOTSUPP: no such read here
            raise NotCached(path) from e
        if n != size:
            raise NotCached(path)  # partly cached (a short read), or changed under us
        del buf[size:]
        return bytes(buf)
    finally:
        os.close(fd)


@dataclass(slots=True)
class SpoolEntry:
    """A queued message as read from its files. The queue walks (filters, the rows of
    `queue list`, the summary) read it through the same names as the index's compact
    entries (kanmon.spool.index.Entry): received_at, mail_from, pending_rcpts(),
    done_count, attempts, next_attempt, hold, pending_replies(), last_reply()."""

    queue_id: str
    envelope: Envelope
    size: int  # content length
    state: QueueState

    def pending_rcpts(self) -> list[str]:
        return [r for r in self.envelope.rcpts if r not in self.state.done]

    @property
    def received_at(self) -> float:
        return self.envelope.received_at

    @property
    def mail_from(self) -> str:
        return self.envelope.mail_from

    @property
    def done_count(self) -> int:
        return len(self.state.done)

    @property
    def attempts(self) -> int:
        return self.state.attempts

    @property
    def next_attempt(self) -> float:
        return self.state.next_attempt

    @property
    def hold(self) -> bool:
        return self.state.hold

    def pending_in(self, domain: str) -> bool:
        """A pending recipient is in this domain (lower case)."""
        return any(r.rpartition("@")[2].lower() == domain for r in self.pending_rcpts())

    def pending_replies(self) -> list[str]:
        """Every reply the journal recorded for a recipient still pending, oldest first."""
        pending = set(self.pending_rcpts())
        return [r.reply for r in self.state.history if isinstance(r, journal.Result) and r.rcpt in pending and r.reply]

    def last_reply(self) -> tuple[str, float]:
        """The most recent reply recorded for a still-pending recipient ("" if none), and when."""
        best, at = "", -1.0
        for rcpt, rec in self.state.last.items():
            if rcpt in self.state.done:
                continue
            if rec.t >= at:
                best, at = rec.reply, rec.t
        return best, max(at, 0.0)




class Spool:
    def __init__(self, data_dir: Path, *, fsync: bool = True, committer: GroupCommitter | None = None):
        self.root = Path(data_dir) / "spool"
        self.incoming = self.root / "incoming"
        self.queue = self.root / "queue"
        self.state_dir = self.root / "state"
        self.corrupt = self.root / "corrupt"
        self.recycle = self.root / "recycle"
        self._incoming, self._queue = str(self.incoming), str(self.queue)  # for the hot path's joins
        self.fsync = fsync
        self.root.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        for d in (self.root, self.incoming, self.queue, self.state_dir, self.corrupt, self.recycle):
            d.mkdir(exist_ok=True, mode=0o700)
        # on_corrupt(queue_id, reason): told of each entry set aside (the owner of the
        # records turns it into a critical event; the spool never writes records).
        self.on_corrupt: Callable[[str, str], None] | None = None
        # on_refused(event text): told of another spool file (the identity) that its
        # strict decoder refused and that was moved aside (an error event).
        self.on_refused: Callable[[str], None] | None = None
        self._own_committer = committer is None
        self.committer = committer or GroupCommitter(self.root, fsync=fsync)
        # Finished queue files, written over by new ones (once their removal from queue/ is durable).
        self.recycler = Recycler(self.recycle, sync_dir=self.queue if fsync else None)
        self.index: QueueIndex | None = None  # a running node's (keep_index); None: scan() reads the files
        self._names_seen: int | None = None  # queue/'s mtime when its names were last listed (not racy)

    def keep_index(self, entries: Iterable[SpoolEntry] = ()) -> QueueIndex:
        """From now on keep every queued message's envelope and state in memory (the
        running node: before recover_each(), whose entries it adds one by one, or after
        recover(), with the entries it returned)."""
        index = QueueIndex()
        for e in entries:
            index.add(e.queue_id, e.envelope, e.size, e.state)
        self.index = index
        return index

    def close(self) -> None:
        if self._own_committer:
            self.committer.close()

    # -- acceptance (hot path) -------------------------------------------------------

    async def store(self, queue_id: str, env: Envelope, content: bytes) -> None:
        """Make the message durable (group commit); raise SpoolError if it could not be."""
        data = encode_queue_file(env, content)
        try:
            (err,) = await self.committer.commit([(f"{self._incoming}/{queue_id}", f"{self._queue}/{queue_id}", data)],
                                                 recycler=self.recycler)
        except OSError as e:
            err = e
        if err is not None:
            raise SpoolError(f"cannot write queue file: {err.strerror or err}")
        if self.index is not None:
            self.index.add(queue_id, env, len(content))

    # -- state journal ---------------------------------------------------------------

    def append_state(self, queue_id: str, records: list[journal.Record]) -> None:
        """Append journal records durably (blocking: call from a worker thread)."""
        data = journal.encode(records)
        write_durably(self.state_dir / queue_id, data, append=True, sync=self.fsync)
        if self.index is not None:
            self.index.apply(queue_id, records)

    def read_state(self, queue_id: str) -> QueueState:
        """The message's journal, decoded strictly; a refused line (a torn last line after a
        crash) is skipped and counted in QueueState.refused: at worst a retry."""
        try:
            raw = (self.state_dir / queue_id).read_bytes()
        except FileNotFoundError:
            return QueueState()
        return QueueState.from_bytes(raw)

    def remove(self, queue_id: str) -> None:
        """The message is finished (every recipient final): forget it."""
        if self.index is not None:
            self.index.drop(queue_id)
        path = f"{self._queue}/{queue_id}"
        if not self.recycler.put(path, queue_id):  # kept to be written over, or unlinked
            unlink_quietly(path)
        unlink_quietly(f"{self.state_dir}/{queue_id}")

    # -- reading -------------------------------------------------------------------------

    def read_envelope(self, queue_id: str) -> tuple[Envelope, int]:
        """Envelope and content size, without reading the content."""
        path = self.queue / queue_id
        with open(path, "rb") as f:
            head = f.read(MAX_HEADER_LINE)
            elen, clen, _crc, off = decode_queue_header(head)
            f.seek(off)
            ej = f.read(elen)
            _same_file(f.fileno(), path)
        return envelope_from_json(ej), clen

    def read_content(self, queue_id: str) -> bytes:
        env_json, content = _checked(_read_whole(self.queue / queue_id, still_named=True))
        return content

    def _read_checked(self, path: Path) -> tuple[bytes, bytes]:
        return _checked(path.read_bytes())

    def load(self, queue_id: str) -> SpoolEntry:
        """Envelope and journal; an entry the decoder refuses is set aside (CorruptEntry)."""
        try:
            env, size = self.read_envelope(queue_id)
        except CorruptEntry as e:
            self.set_aside(queue_id, str(e))
            raise
        return SpoolEntry(queue_id, env, size, self.read_state(queue_id))

    def load_with_content(self, queue_id: str) -> tuple[SpoolEntry, bytes]:
        """Entry and content in one read of the queue file (checked against its CRC); an
        entry that fails its checks is set aside (CorruptEntry)."""
        try:
            ej, content = self._read_checked(self.queue / queue_id)
            env = envelope_from_json(ej)
        except CorruptEntry as e:
            self.set_aside(queue_id, str(e))
            raise
        return SpoolEntry(queue_id, env, len(content), self.read_state(queue_id)), content

    def load_with_content_cached(self, queue_id: str) -> tuple[SpoolEntry, bytes]:
        """load_with_content for the event loop: NotCached instead of waiting for the disk
        (and for an entry that fails its checks, which load_with_content then sets aside).
        A message just received is in the page cache: no thread hand-off for it."""
        try:
            ej, content = _checked(_read_cached(f"{self._queue}/{queue_id}"))
            env = envelope_from_json(ej)
        except CorruptEntry as e:
            raise NotCached(queue_id) from e
        try:
            state = QueueState.from_bytes(_read_cached(f"{self.state_dir}/{queue_id}"))
        except FileNotFoundError:
            state = QueueState()
        return SpoolEntry(queue_id, env, len(content), state), content

    def read_message(self, queue_id: str) -> tuple[Envelope, bytes]:
        """Envelope and content, checked against the CRC, without the journal and without
        setting a damaged entry aside (CorruptEntry: a delivery agent process reports it
        and the main process, which keeps the index, sets it aside)."""
        ej, content = self._read_checked(self.queue / queue_id)
        return envelope_from_json(ej), content

    def queue_ids(self) -> Iterator[str]:
        with os.scandir(self.queue) as it:
            for e in it:
                if e.is_file() and not e.name.startswith("."):
                    yield e.name

    # -- recovery ----------------------------------------------------------------------------

    def recover(self) -> tuple[list[SpoolEntry], list[tuple[str, str]], int]:
        """Rescan after a start or a crash.

        Returns (entries to schedule, [(id, reason) moved to corrupt/], incoming removed).
        incoming/ files were never acknowledged, so removing them loses nothing.
        """
        entries: list[SpoolEntry] = []
        _count, corrupt, removed = self.recover_each(entries.append)
        return entries, corrupt, removed

    def clear_at_start(self) -> int:
        """Before recovery: remove incoming/ (never acknowledged) and the kept files of
        recycle/ (never messages). Returns how many incoming/ files were removed."""
        leftovers = [e for d in (self.incoming, self.recycle) for e in os.scandir(d)]
        if not leftovers:
            return 0
        # After a crash of a file system without a journal (fsck aside), a queue file and
        # a name here may share one file: the queue's name is the one that counts.
        queued = {e.inode() for e in os.scandir(self.queue)}
        removed = 0
        for e in leftovers:
            if e.inode() in queued:
                continue
            try:
                os.unlink(e.path)
            except FileNotFoundError:
                continue
            removed += os.path.dirname(e.path) == self._incoming
        return removed

    def recover_each(self, each: Callable[[SpoolEntry], None]) -> tuple[int, list[tuple[str, str]], int]:
        """recover() handing each entry to each() as it is read, in queue id order, instead
        of keeping them all (a million deferred messages' envelopes and journals would
        take gigabytes at once; their index entries take a fraction of that: the node
        adds each to the index and the schedule and lets it go).

        Returns (entries read, [(id, reason) moved to corrupt/], incoming removed)."""
        removed = self.clear_at_start()
        corrupt: list[tuple[str, str]] = []
        names = sorted(self.queue_ids())
        count = 0
        # Plain string paths and one read(2) per small file: a million messages are two
        # million files, and pathlib's parsing and buffered file objects cost more than the reads.
        queue_dir, state_dir = os.fspath(self.queue), os.fspath(self.state_dir)
        for qid in names:
            try:
                ej, content = _checked(_read_whole(f"{queue_dir}/{qid}"))
                env = envelope_from_json(ej)
            except CorruptEntry as e:
                self.move_to_corrupt(qid)
                corrupt.append((qid, str(e) or type(e).__name__))
                continue
            except OSError as e:
                corrupt.append((qid, f"unreadable: {e.strerror}"))
                continue
            try:
                state = QueueState.from_bytes(_read_whole(f"{state_dir}/{qid}"))
            except FileNotFoundError:
                state = QueueState()
            each(SpoolEntry(qid, env, len(content), state))
            count += 1
        # Journals without a message (finished just before a crash) are leftovers.
        known = set(names)
        for name in os.listdir(self.state_dir):
            if name not in known:
                (self.state_dir / name).unlink(missing_ok=True)
        return count, corrupt, removed

    # -- admin operations --------------------------------------------------------------------

    def scan(self, envelope_filter=None) -> Iterator[SpoolEntry]:
        """Every queue entry, envelope and journal, read from the files without reading
        message bodies (a stopped node; a running one walks its index: index_walk()).

        envelope_filter(queue_id, envelope) -> bool, when given, is asked before the
        journal is read, so a filter on sender, recipients or age costs one small read per
        message. Entries that vanish meanwhile (delivered) are skipped; entries the decoder
        refuses are set aside to corrupt/ (where the admin lists and deletes them).
        """
        for qid in self.queue_ids():
            try:
                env, size = self._read_envelope_fast(qid)
            except CorruptEntry as e:
                self.set_aside(qid, str(e))
                continue
            except OSError:
                continue
            if envelope_filter is not None and not envelope_filter(qid, env):
                continue
            yield SpoolEntry(qid, env, size, self.read_state(qid))

    def index_walk(self, reply: Callable[[str], bool] | None = None) -> list[Entry]:
        """Every message's index entry (kanmon.spool.index), the index first brought up to
        date with the names in queue/ (the messages other processes stored, those gone);
        with reply, only those with a pending reply text it is true for (QueueIndex.with_reply).
        Only for a spool that keeps one."""
        self._reconcile_names()
        assert self.index is not None
        return self.index.entries() if reply is None else self.index.with_reply(reply)

    def names_listed(self, mtime_ns: int, listed_at_ns: int) -> None:
        """The index holds exactly the names listed at listed_at_ns from queue/, whose
        mtime was then mtime_ns (recovery): the next walk lists them again only if
        queue/ changed since (or the listing was racy, see _reconcile_names)."""
        self._names_seen = mtime_ns if listed_at_ns - mtime_ns > 2_000_000_000 else None

    def _reconcile_names(self) -> None:
        """Bring the index up to date with the names in queue/, unless queue/ did not change
        since they were last listed: a name added, renamed in or removed changes the
        directory's mtime. A listing taken less than 2 s after that mtime is "racy" (a
        change in the same clock tick would leave it equal) and not trusted next time."""
        index = self.index
        assert index is not None
        before = os.stat(self.queue).st_mtime_ns
        if before == self._names_seen:
            return
        listed_at = time.time_ns()
        index.reconcile_names({n for n in os.listdir(self.queue) if not n.startswith(".")}, self._load_for_index)
        self.names_listed(before, listed_at)

    def _load_for_index(self, queue_id: str) -> tuple[Envelope, int, QueueState] | None:
        try:
            env, size = self._read_envelope_fast(queue_id)
        except CorruptEntry as e:
            self.set_aside(queue_id, str(e))
            return None
        except OSError:
            return None
        return env, size, self.read_state(queue_id)

    def _read_envelope_fast(self, queue_id: str) -> tuple[Envelope, int]:
        """read_envelope() with one read(2) for the usual envelope (< 4 KiB)."""
        fd = os.open(self.queue / queue_id, os.O_RDONLY)
        try:
            head = os.read(fd, 4096)
            elen, clen, _crc, off = decode_queue_header(head)
            ej = head[off : off + elen]
            if len(ej) < elen:
                ej = os.pread(fd, elen, off)
            _same_file(fd, self.queue / queue_id)
        finally:
            os.close(fd)
        return envelope_from_json(ej), clen

    def read_content_prefix(self, queue_id: str, limit: int) -> bytes:
        """The first `limit` bytes of the content (a part of the file, so not checked
        against the CRC): what the admin filters on headers and body text read."""
        fd = os.open(self.queue / queue_id, os.O_RDONLY)
        try:
            elen, clen, _crc, off = decode_queue_header(os.pread(fd, MAX_HEADER_LINE, 0))
            prefix = os.pread(fd, min(clen, max(0, limit)), off + elen + 1)
            _same_file(fd, self.queue / queue_id)
            return prefix
        finally:
            os.close(fd)

    def corrupt_ids(self) -> list[str]:
        """Queue ids in corrupt/ (moved there by recovery; kept for the admin)."""
        return sorted(p.name for p in self.corrupt.iterdir() if not p.name.endswith(".state"))

    def identity(self, *, create: bool = False) -> str | None:
        """This queue's identity (the file spool/identity), made with create=True when
        there is none. A file that is not 32 hex digits is none: moved aside to
        identity.bad, on_refused told (create then makes a new one).
        A copy of the whole data_dir carries it along; a restored node makes its own."""
        path = self.root / "identity"
        try:
            with path.open("rb") as f:
                raw = f.read(IDENTITY_LIMIT + 1)
        except FileNotFoundError:
            raw = None
        except OSError:  # unreadable (another owner): none; never the failure of a backup or restore
            return None
        if raw is not None:
            if re.fullmatch(rb"[0-9a-f]{32}\n?", raw):
                return raw[:32].decode("ascii")
            # Refused by the strict decoder: moved aside with an event (promise 10), and none.
            try:
                os.replace(path, self.root / IDENTITY_REFUSED)
            except FileNotFoundError:
                pass  # another reader moved it meanwhile (and told)
            except OSError:
                return None  # cannot be moved: left, and none
            else:
                if self.on_refused is not None:
                    self.on_refused(IDENTITY_EVENT)
        if not create:
            return None
        value = secrets.token_hex(16)
        tmp = self.root / f".identity.{os.getpid()}.{secrets.token_hex(4)}"
        write_durably(tmp, value.encode() + b"\n", sync=self.fsync)
        try:
            # Made by root for a spool of the service's user (an offline backup as root):
            # the file is the spool's owner's, or the server could not read it.
            st = os.stat(self.root)
            if os.geteuid() == 0 and (st.st_uid, st.st_gid) != (0, 0):
                os.chown(tmp, st.st_uid, st.st_gid)
        except OSError:
            pass
        try:
            os.link(tmp, path)  # two made at once: the first one stays
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
        if self.fsync:
            fsync_dir(self.root)
        return self.identity()

    def exists(self, queue_id: str) -> bool:
        return (self.queue / queue_id).is_file()

    def set_hold(self, queue_id: str, on: bool, t: float, by: str = "") -> None:
        """Journal: held (the queue manager leaves it alone) or released."""
        if not self.exists(queue_id):
            raise FileNotFoundError(queue_id)
        self.append_state(queue_id, [journal.Hold(t, on, by)])

    def set_schedule(self, queue_id: str, next_attempt: float, *, reset_attempts: bool = False, t: float = 0.0) -> None:
        """Journal: the next attempt is at next_attempt (requeue: also restart the backoff)."""
        if not self.exists(queue_id):
            raise FileNotFoundError(queue_id)
        records: list[journal.Record] = []
        if reset_attempts:
            records.append(journal.Attempt(t, 0, next_attempt))
        records.append(journal.Schedule(t, next_attempt))
        self.append_state(queue_id, records)

    def append_states(self, batch: list[tuple[str, list[journal.Record]]]) -> list[str]:
        """append_state() for many messages, made durable by one syncfs(2) for the batch
        (fdatasync per file where syncfs is missing). Messages no longer queued are left
        alone; returns their ids."""
        gone: list[str] = []
        fds: list[int] = []
        # String paths, and the lines of a records list encoded once for every message it
        # goes to (a bulk hold of 100,000 gives each the same list).
        queue_dir, state_dir = os.fspath(self.queue), os.fspath(self.state_dir)
        encoded: dict[int, bytes] = {}
        try:
            for queue_id, records in batch:
                if not os.path.isfile(f"{queue_dir}/{queue_id}"):
                    gone.append(queue_id)
                    continue
                data = encoded.get(id(records))
                if data is None:
                    data = encoded[id(records)] = journal.encode(records)
                fd = os.open(f"{state_dir}/{queue_id}", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
                fds.append(fd)
                os.write(fd, data)
            if self.fsync:
                sync_files(fds)
        finally:
            for fd in fds:
                os.close(fd)
        if self.index is not None:
            left = set(gone)
            for queue_id, records in batch:
                if queue_id not in left:
                    self.index.apply(queue_id, records)
        return gone

    def delete(self, queue_id: str) -> bool:
        """Remove a message on the admin's word (queue file first: then it no longer exists)."""
        if self.index is not None:
            self.index.drop(queue_id)
        try:
            (self.queue / queue_id).unlink()
        except FileNotFoundError:
            return False
        (self.state_dir / queue_id).unlink(missing_ok=True)
        return True

    def delete_corrupt(self, queue_id: str) -> bool:
        found = False
        for p in (self.corrupt / queue_id, self.corrupt / (queue_id + ".state")):
            try:
                p.unlink()
                found = True
            except FileNotFoundError:
                pass
        return found

    def sync_dirs(self) -> None:
        """Make removals and renames in queue/ and state/ durable (once per batch)."""
        if self.fsync:
            fsync_dir(self.queue)
            fsync_dir(self.state_dir)

    def export_raw(self, queue_id: str) -> tuple[bytes, bytes]:
        """(queue file bytes, journal bytes), the queue file's checksum verified."""
        path = self.queue / queue_id
        data = _read_whole(path, still_named=True)
        self._check_bytes(data, str(path))
        try:
            state = (self.state_dir / queue_id).read_bytes()
        except FileNotFoundError:
            state = b""
        return data, state

    @staticmethod
    def _check_bytes(data: bytes, what: str = "") -> Envelope:
        elen, clen, crc, off = decode_queue_header(data[:MAX_HEADER_LINE])
        ej = data[off : off + elen]
        content = data[off + elen + 1 :]
        if data[off + elen : off + elen + 1] != b"\n" or len(content) != clen:
            raise CorruptEntry(f"{what}: truncated")
        if zlib.crc32(content, zlib.crc32(ej)) != crc:
            raise CorruptEntry(f"{what}: checksum mismatch")
        try:
            env = envelope_from_json(ej)
        except CorruptEntry as e:
            raise CorruptEntry(f"{what}: {e}") from None
        if (problem := flags_problem(env, content)) is not None:  # a file from elsewhere (a backup, another node)
            raise CorruptEntry(f"{what}: {problem}")
        return env

    def import_raw(self, queue_id: str, queue_bytes: bytes, state_bytes: bytes) -> bool:
        """Put a message exported by export_raw() into this queue; False if it is already here.

        The journal is written first (temporary name, then renamed), then the queue file
        through incoming/ and the group committer, so the message exists only once both
        are durable. Interrupted at any point, a second import_raw() completes it.
        """
        self._check_bytes(queue_bytes, queue_id)
        if self.exists(queue_id):
            return False
        tmp = self.state_dir / f".{queue_id}.restore"
        write_durably(tmp, state_bytes, sync=self.fsync)
        os.replace(tmp, self.state_dir / queue_id)
        # A copy in incoming/ is what an import killed before its rename left behind.
        (self.incoming / queue_id).unlink(missing_ok=True)
        (err,) = self.committer.commit_blocking([(self.incoming / queue_id, self.queue / queue_id, queue_bytes)])
        if err is not None:
            raise SpoolError(f"cannot write queue file: {err.strerror or err}")
        if self.index is not None:
            elen, clen, _crc, off = decode_queue_header(queue_bytes[:MAX_HEADER_LINE])
            self.index.add(queue_id, envelope_from_json(queue_bytes[off : off + elen]), clen,
                           QueueState.from_bytes(state_bytes))
        return True

    def store_blocking(self, queue_id: str, env: Envelope, content: bytes) -> None:
        """store() for a caller outside the event loop (admin: notices from `queue bounce`)."""
        (err,) = self.committer.commit_blocking(
            [(self.incoming / queue_id, self.queue / queue_id, encode_queue_file(env, content))]
        )
        if err is not None:
            raise SpoolError(f"cannot write queue file: {err.strerror or err}")
        if self.index is not None:
            self.index.add(queue_id, env, len(content))

    def set_aside(self, queue_id: str, reason: str) -> bool:
        """An entry refused while running: to corrupt/, and on_corrupt told (once: a
        second reader finding it gone does nothing). True if this call moved it."""
        try:
            moved = self.move_to_corrupt(queue_id)
        except OSError:
            return False  # left in place: the next reader tries again
        if moved and self.on_corrupt is not None:
            self.on_corrupt(queue_id, reason)
        return moved

    def move_to_corrupt(self, queue_id: str) -> bool:
        """Queue file and journal to corrupt/; False if the queue file was not there."""
        if self.index is not None:
            self.index.drop(queue_id)
        moved = False
        for src, suffix in ((self.queue / queue_id, ""), (self.state_dir / queue_id, ".state")):
            try:
                os.replace(src, self.corrupt / (queue_id + suffix))
            except FileNotFoundError:
                continue
            moved = moved or suffix == ""
        if self.fsync:
            fsync_dir(self.corrupt)
        return moved
