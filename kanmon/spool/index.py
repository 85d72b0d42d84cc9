"""The queue index: every queued message's envelope and journal state, in memory.

Role: a running node's Spool keeps one (Spool.keep_index(), after recovery, which has
read every envelope and journal anyway), so that the admin operations that walk the
whole queue (`queue list` with its filters, `queue summary`, filtered hold, release,
delete..., all run inside the server through the control socket) read memory instead of
one queue file and one journal per message. A stopped node has none: its admin commands
scan the files (Spool.scan) as before.

How it stays exact: every change this process makes goes through the Spool, which tells
the index (a message stored or imported, journal records appended, a message removed,
deleted or set aside). Messages other processes stored (the receiver processes) are
found by reconcile(): one listing of spool/queue/ per walk, whose new names are read from
their files and whose missing names are dropped.

Each entry's QueueState is replaced, never changed in place, when records are applied:
a walk (in the admin thread) reads a consistent snapshot while the queue manager appends
(in its I/O threads).

Trusts: the Spool that owns it. Never: read a message body; answer for a message whose
queue file is gone once reconcile() has run.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from kanmon.model import Envelope
from kanmon.spool import journal
from kanmon.spool.journal import QueueState


def _applied(state: QueueState, records: Iterable[journal.Record]) -> QueueState:
    new = QueueState(done=dict(state.done), last=dict(state.last), attempts=state.attempts,
                     next_attempt=state.next_attempt, hold=state.hold, warned=state.warned,
                     warned_at=state.warned_at, history=list(state.history), refused=state.refused)
    for rec in records:
        new.apply(rec)
    return new


def _domain(address: str) -> str:
    return address.rpartition("@")[2].lower()  # as kanmon.admin.filters.domain_of


@dataclass(frozen=True, slots=True)
class Shape:
    """What `queue summary` counts of a message, kept ready (qshape's view of it)."""

    queue_id: str
    received_at: float
    hold: bool
    domains: frozenset[str]  # of the recipients still pending
    sender_domain: str  # "<>" for the null sender

    @classmethod
    def of(cls, queue_id: str, env: Envelope, state: QueueState) -> Shape:
        return cls(queue_id, env.received_at, state.hold,
                   frozenset(_domain(r) for r in env.rcpts if r not in state.done),
                   _domain(env.mail_from) if env.mail_from else "<>")


@dataclass(frozen=True, slots=True)
class _Item:
    envelope: Envelope
    size: int
    state: QueueState
    stamp: tuple[int, int] | None
    shape: Shape


class QueueIndex:
    """queue id -> envelope, content size, state, file stamp and summary shape, under one lock.

    The stamp is what a listing of spool/queue/ said of the file when it was last seen
    (modification time and size; None: stored by this process, not listed yet): a queue
    file is never rewritten, so a changed stamp means it was changed underneath us and is
    read again (and set aside if it no longer decodes), as a file scan would."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, _Item] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, queue_id: str) -> bool:
        return queue_id in self._entries

    def add(self, queue_id: str, envelope: Envelope, size: int, state: QueueState | None = None,
            stamp: tuple[int, int] | None = None) -> None:
        state = state or QueueState()
        item = _Item(envelope, size, state, stamp, Shape.of(queue_id, envelope, state))
        with self._lock:
            self._entries[queue_id] = item

    def apply(self, queue_id: str, records: list[journal.Record]) -> None:
        with self._lock:
            item = self._entries.get(queue_id)
            if item is not None:
                state = _applied(item.state, records)
                self._entries[queue_id] = _Item(item.envelope, item.size, state, item.stamp,
                                                Shape.of(queue_id, item.envelope, state))

    def drop(self, queue_id: str) -> None:
        with self._lock:
            self._entries.pop(queue_id, None)

    def snapshot(self) -> list[tuple[str, Envelope, int, QueueState]]:
        with self._lock:
            return [(qid, i.envelope, i.size, i.state) for qid, i in self._entries.items()]

    def shapes(self) -> list[Shape]:
        with self._lock:
            return [i.shape for i in self._entries.values()]

    def reconcile_names(self, names: set[str], load: Callable[[str], tuple[Envelope, int, QueueState] | None]) -> None:
        """reconcile() with the names in spool/queue/ only: the messages other processes
        stored are read, those gone are dropped (set operations in C, no stamp compared)."""
        with self._lock:
            for qid in self._entries.keys() - names:
                del self._entries[qid]
            new = names - self._entries.keys()
        for qid in new:
            loaded = load(qid)
            if loaded is not None:
                with self._lock:
                    if qid not in self._entries:
                        env, size, state = loaded
                        self._entries[qid] = _Item(env, size, state, None, Shape.of(qid, env, state))

    def reconcile(self, on_disk: dict[str, tuple[int, int] | None],
                  load: Callable[[str], tuple[Envelope, int, QueueState] | None]) -> None:
        """Make the index hold exactly the ids on_disk (a listing of spool/queue/: id ->
        stamp): load(queue_id) reads a message another process stored, or one changed
        underneath us (None: gone, or refused and set aside)."""
        with self._lock:
            stamps = {qid: i.stamp for qid, i in self._entries.items()}
            for qid in stamps.keys() - on_disk.keys():
                self._entries.pop(qid, None)
            for qid, stamp in on_disk.items():
                if stamps.get(qid, 0) is None:  # ours, or found by names only: its first stamp
                    i = self._entries[qid]
                    self._entries[qid] = _Item(i.envelope, i.size, i.state, stamp, i.shape)
        for qid, stamp in on_disk.items():
            known = stamps.get(qid, 0)
            if known is None or known == stamp:
                continue
            loaded = load(qid)  # new (another process's), or changed underneath us
            if loaded is None:
                self.drop(qid)
            else:
                self.add(qid, *loaded, stamp=stamp)
