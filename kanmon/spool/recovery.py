"""Start-up recovery of a big spool on every core: child processes read and decode the
queue files and journals, the node only adds what they found to its index and schedule.

Role: recover_index() is the running node's recovery (kanmon.node): every queue file
in spool/queue/ is read whole and checked against its CRC, its envelope decoded strictly,
its journal decoded strictly (a refused line skipped and counted, as QueueState does;
the usual message on read_one's fast path, the same checks inline, see read_one),
and the message becomes one entry of the queue index (kanmon.spool.index.Entry) and one
item of the queue manager's schedule. A million deferred messages are two million small
files and ~85 µs of CPU each to read and decode (docs/performance.md): for a big spool (PARALLEL_FROM) the reading is
shared by child processes (`python -m kanmon.spool.recovery`, one per core), each
given every WORKERS-th chunk of CHUNK queue ids in id order. A child answers each
chunk with one frame (4-byte length, then a marshal of one record per queue id in the
order asked): an entry's fields (kanmon.spool.index.entry_fields, plus the journal lines
refused), or (id, reason, move) for a file refused (move: damaged, to corrupt/; not
moved: unreadable). The node takes the frames in chunk order, so the messages come in
queue id order as in a serial recovery, and does the moves to corrupt/ itself.

How nothing is lost or doubled: a chunk is taken whole or not at all. A frame that does
not arrive (the child exited, was killed, or said nothing for HANG_TIMEOUT), does not
decode, or does not name exactly the ids of its chunk in order is thrown away, the child
is stopped, and that chunk and every later chunk of that child are read in this process
(the same read_one()), with a warning through on_fallback. An error that is not a
refused file (an unreadable journal, say) stops a child the same way, and then happens
again here, where it stops the start as a serial recovery would.

Trusts: its children only as far as a frame that decodes and names exactly the ids of its
chunk in order; nothing it reads from the spool (the decoders of kanmon.spool.store
and kanmon.spool.journal are strict). Never: answer for a queue id it was not given,
skip one, or hand one over twice.
"""

from __future__ import annotations

import gc
import marshal
import os
import select
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator

from kanmon.spool.index import Entry, _domains_of, _unless_last, entry_fields
from kanmon.spool.journal import QueueState, fold_fast
from kanmon.spool.store import CorruptEntry, Spool, _checked, _read_whole, envelope_fields_fast, envelope_from_json

CHUNK = 2000  # queue ids per frame
PARALLEL_FROM = 20_000  # messages from which children read (below, starting them costs more than it saves)
HANG_TIMEOUT = 300.0  # seconds without a frame from a child: it is stopped, its share read here
_LEN = struct.Struct(">I")


def read_one(queue_dir: str, state_dir: str, qid: str) -> tuple:
    """The record of one message: entry_fields() + (journal lines refused,), or
    (qid, reason, move to corrupt/) for a queue file the checks refuse or cannot read.

    The usual message takes the fast path (store.envelope_fields_fast, journal.fold_fast:
    the strict decoders' checks written inline, no Envelope, records nor QueueState built);
    whatever either is not sure of is decoded by the strict decoders (read_one_strict),
    which give the same record for what the fast path accepts."""
    try:
        ej, content = _checked(_read_whole(f"{queue_dir}/{qid}"))
    except CorruptEntry as e:
        return (qid, str(e) or type(e).__name__, True)
    except OSError as e:
        return (qid, f"unreadable: {e.strerror}", False)
    env = envelope_fields_fast(ej)
    if env is None:
        return read_one_strict(queue_dir, state_dir, qid)
    try:
        raw = _read_whole(f"{state_dir}/{qid}")
    except FileNotFoundError:
        raw = b""
    folded = fold_fast(raw)
    if folded is None:
        return read_one_strict(queue_dir, state_dir, qid)
    sender, rcpts, at = env
    done_d, last_d, replies, attempts, next_attempt, hold = folded
    done = frozenset(done_d) if done_d else None
    last: list = []
    for rcpt, (t, reply) in last_d.items():
        last += (rcpt, t, reply)
    pairs = dict.fromkeys(p for p in replies if done is None or p[0] not in done)
    flat = tuple(x for pair in pairs for x in pair)
    return (qid, at, len(content), sender, rcpts[0] if len(rcpts) == 1 else tuple(rcpts), done, tuple(last),
            _unless_last(flat, last), attempts, next_attempt, hold, _domains_of(rcpts, done), 0)


def read_one_strict(queue_dir: str, state_dir: str, qid: str) -> tuple:
    """read_one() through the strict decoders only (envelope_from_json, QueueState)."""
    try:
        ej, content = _checked(_read_whole(f"{queue_dir}/{qid}"))
        env = envelope_from_json(ej)
    except CorruptEntry as e:
        return (qid, str(e) or type(e).__name__, True)
    except OSError as e:
        return (qid, f"unreadable: {e.strerror}", False)
    try:
        state = QueueState.from_bytes(_read_whole(f"{state_dir}/{qid}"))
    except FileNotFoundError:
        state = QueueState()
    return (*entry_fields(qid, env, len(content), state), state.refused)


def default_workers() -> int:
    """Child processes for a big spool: one per core this process may run on (at most 8)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return min(n, 8)


def recover_index(spool: Spool, each: Callable[[Entry, int], None], *, workers: int | None = None,
                  on_fallback: Callable[[str], None] | None = None, child_command: list[str] | None = None,
                  chunk: int = CHUNK, parallel_from: int | None = None) -> tuple[int, list[tuple[str, str]], int]:
    """Spool.recover_each() for a node that keeps an index (spool.index must be set):
    each(entry, journal lines refused) for every message, in queue id order, its entry
    already in the index. Returns (messages, [(id, reason) refused], incoming removed).

    workers: child processes (default: default_workers(); 0 or 1: none, read here);
    child_command: the child's command line without its arguments (tests)."""
    index = spool.index
    assert index is not None
    removed = spool.clear_at_start()
    mtime, listed_at = os.stat(spool.queue).st_mtime_ns, time.time_ns()
    names = sorted(spool.queue_ids())
    queue_dir, state_dir = os.fspath(spool.queue), os.fspath(spool.state_dir)
    if workers is None:
        workers = default_workers()
    if parallel_from is None:
        parallel_from = PARALLEL_FROM
    corrupt: list[tuple[str, str]] = []
    count = 0
    # Nothing recovery builds is garbage: no collection while it builds a million entries
    # (each would walk all of them; the node freezes them afterwards).
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        if workers >= 2 and len(names) >= parallel_from:
            chunks = _read_parallel(queue_dir, state_dir, names, workers, chunk, child_command, on_fallback)
        else:
            chunks = ((names[i : i + chunk], [read_one(queue_dir, state_dir, q) for q in names[i : i + chunk]])
                      for i in range(0, len(names), chunk))
        unreadable: set[str] = set()
        for ids, records in chunks:
            good, good_ids = [], []
            for qid, r in zip(ids, records, strict=True):
                if len(r) == 3:
                    _, reason, move = r
                    if move:
                        spool.move_to_corrupt(qid)
                    else:
                        unreadable.add(qid)
                    corrupt.append((qid, reason))
                else:
                    good.append(r)
                    good_ids.append(qid)
            # The listing's id strings, not the child's copies: one string per id in memory.
            for entry, r in zip(index.add_fields(good, good_ids), good, strict=True):
                each(entry, r[-1])
            count += len(good)
    finally:
        if was_enabled:
            gc.enable()
    del names
    # Journals without a message (finished just before a crash) are leftovers; a queue
    # file that could not be read keeps its journal.
    with os.scandir(spool.state_dir) as it:
        leftovers = [e.name for e in it if e.name not in index and e.name not in unreadable]
    for name in leftovers:
        (spool.state_dir / name).unlink(missing_ok=True)
    # The index now holds exactly those names: the first walk need not list queue/ again
    # (a million names are ~100 MB of strings for a moment) unless it changed since.
    spool.names_listed(mtime, listed_at)
    return count, corrupt, removed


class _Child:
    """One reading process and the frames it sends (proc None: it could not be started)."""

    def __init__(self, command: list[str], names: list[str]):
        self.buf = bytearray()
        self.failed = ""
        self.proc: subprocess.Popen | None = None
        # The ids go in a private, already unlinked file, not a pipe: writing megabytes
        # of them into a pipe would block the node's start on a child that does not read
        # (hung as it starts); from a file it reads them when it can, and a child that
        # sends nothing is stopped after HANG_TIMEOUT like any other.
        try:
            with tempfile.TemporaryFile() as ids:
                ids.write("\n".join(names).encode("utf-8", "surrogateescape"))
                ids.flush()
                ids.seek(0)
                self.proc = subprocess.Popen(command, stdin=ids, stdout=subprocess.PIPE)
        except OSError as e:  # no interpreter to start, no processes left, no room...: its share is read here
            self.failed = f"could not be started: {e}"

    def frame(self, timeout: float) -> bytes:
        """The next frame; OSError if it does not come whole."""
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        need = _LEN.size
        size = None
        while True:
            if len(self.buf) >= need:
                if size is None:
                    size = _LEN.unpack_from(self.buf)[0]
                    need += size
                    continue
                data = bytes(self.buf[_LEN.size : need])
                del self.buf[:need]
                return data
            ready, _, _ = select.select([fd], [], [], timeout)
            if not ready:
                raise OSError(f"sent nothing for {timeout:.0f} s")
            data = os.read(fd, 1 << 20)
            if not data:
                raise OSError("exited before it sent every chunk")
            self.buf += data

    def exit_status(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def stop(self, why: str) -> None:
        self.failed = why
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        self.close()

    def close(self) -> None:
        if self.proc is None:
            return
        if self.proc.stdout is not None:
            try:
                self.proc.stdout.close()
            except OSError:
                pass
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# A child's record of one message: (id, reason, move) for a refused or unreadable file, or
# entry_fields()'s 12 values and the message's schedule (read_one).
_RECORD_LENGTHS = (3, 13)


def _read_parallel(queue_dir: str, state_dir: str, names: list[str], workers: int, chunk: int,
                   child_command: list[str] | None,
                   on_fallback: Callable[[str], None] | None) -> Iterator[tuple[list[str], list[tuple]]]:
    from kanmon.children import module_command  # noqa: PLC0415 - only a big recovery starts children

    chunks = [names[i : i + chunk] for i in range(0, len(names), chunk)]
    base = child_command or module_command("kanmon.spool.recovery")
    children: list[_Child] = []
    told: list[_Child] = []  # the children whose failure was reported
    try:
        for w in range(workers):
            share = [q for c in chunks[w::workers] for q in c]
            children.append(_Child([*base, queue_dir, state_dir, str(chunk)], share))
        for i, ids in enumerate(chunks):
            child = children[i % workers]
            records = None
            if not child.failed:
                try:
                    records = marshal.loads(child.frame(HANG_TIMEOUT))
                    if (type(records) is not list or len(records) != len(ids)
                            or any(type(r) is not tuple or len(r) not in _RECORD_LENGTHS or r[0] != q
                                   for r, q in zip(records, ids))):
                        raise ValueError("sent records for other queue ids than asked, or of no known shape")
                except (OSError, ValueError, EOFError, TypeError, IndexError) as e:
                    code = child.exit_status()
                    child.stop(f"{e}" + (f" (exit status {code})" if code is not None else ""))
                    records = None
            if child.failed:
                if child not in told:
                    told.append(child)
                    if on_fallback is not None:
                        on_fallback(f"recovery: a reading process {child.failed}; "
                                    f"its share of the queue is read by the node itself")
                records = [read_one(queue_dir, state_dir, q) for q in ids]
            assert records is not None
            yield ids, records
    finally:
        for child in children:
            if not child.failed:
                child.close()  # it has sent everything and exits (or, stopped early, finds its pipe closed)
            if child.proc is not None and child.proc.poll() is None:
                child.proc.kill()
                child.proc.wait()


def _child_main(argv: list[str]) -> None:
    """`python -m kanmon.spool.recovery QUEUE_DIR STATE_DIR CHUNK`: the queue ids on stdin
    (one a line), one frame per CHUNK of them on stdout."""
    from kanmon.children import die_with_parent  # noqa: PLC0415

    die_with_parent()
    gc.disable()  # nothing here is cyclic garbage; the process lives for one recovery
    queue_dir, state_dir, chunk = argv[0], argv[1], int(argv[2])
    raw = sys.stdin.buffer.read()
    names = raw.decode("utf-8", "surrogateescape").split("\n") if raw else []
    out = sys.stdout.buffer
    for i in range(0, len(names), chunk):
        data = marshal.dumps([read_one(queue_dir, state_dir, q) for q in names[i : i + chunk]])
        out.write(_LEN.pack(len(data)) + data)
        out.flush()


if __name__ == "__main__":
    _child_main(sys.argv[1:])
