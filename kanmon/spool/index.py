"""The queue index: every queued message's envelope and journal state, in memory, compact.

Role: a running node's Spool keeps one (Spool.keep_index(), filled while recovery reads
every envelope and journal anyway), so that the admin operations that walk the whole
queue (`queue list` with its filters and pages, `queue summary`, filtered hold, release,
delete..., all run inside the server through the control socket) read memory instead of
one queue file and one journal per message. A stopped node has none: its admin commands
scan the files (Spool.scan) as before.

What it keeps of a message is what those walks read and nothing else (one Entry, about
a third of a kilobyte for a deferred message with one recipient; docs/performance.md):
arrival, size, sender, recipients, the final ones, each pending recipient's last reply
with its time, the distinct replies recorded for pending recipients (the `reason`
filter), attempts, next attempt, hold. Not the client, the DSN parameters nor the
journal's history: `queue show`, bounce, drain and backup read the files of the few
messages they act on. Texts that repeat across messages (senders, reply texts) are
shared through a pool, swept when it has grown to twice what was live at the last sweep.

How it stays exact: every change this process makes goes through the Spool, which tells
the index (a message stored or imported, journal records appended, a message removed,
deleted or set aside). Messages other processes stored (the receiver processes) are
found by reconcile_names(): a listing of spool/queue/ before a walk when the directory
changed, whose new names are read from their files and whose missing names are dropped.
A queue file changed in place underneath the node (damage, a hand edit) is not looked
for by a walk (that would be a stat(2) per message): it is found, and set aside, when a
stage next reads the file (the next attempt, `queue show`, bounce, backup).

Beside the entries, a map from each distinct pending reply text to the ids of the entries
that hold it (the `reason` filter's regex is tried on those few texts, and only their
entries are walked): every entry set or removed goes through _put/_remove, which keep it.

Entries are replaced, never changed in place, when records are applied: a walk (in the
admin thread) reads a consistent snapshot while the queue manager appends (in its I/O
threads).

Trusts: the Spool that owns it. Never: read a message body; answer for a message whose
queue file is gone once reconcile() has run.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterable

from kanmon.model import Envelope
from kanmon.spool import journal
from kanmon.spool.journal import QueueState

_POOL_MIN = 4096  # strings kept in the pool before the first sweep


def _domain(address: str) -> str:
    return address.rpartition("@")[2].lower()  # as kanmon.admin.filters.domain_of


class Entry:
    """One queued message as the admin's walks see it (read-only; replaced on change).

    It answers the same questions as a SpoolEntry read from the files (kanmon.spool.store:
    received_at, mail_from, pending_rcpts(), done_count, pending_replies(), last_reply()...),
    so the filters and the rows of `queue list` take either.

    rcpts is a str for the usual single recipient (a tuple costs 64 bytes more); done is
    None until a recipient is final; last is flat (rcpt, t, reply, rcpt, t, reply, ...)
    in the order of QueueState.last; replies is flat (rcpt, reply, ...), each pair once,
    or None when those are exactly last's (rcpt, reply) pairs (the usual deferred message:
    each attempt got the reply the last one got)."""

    __slots__ = ("queue_id", "received_at", "size", "mail_from", "rcpts", "done", "last", "replies",
                 "attempts", "next_attempt", "hold", "pending_domains")

    def __init__(self, queue_id, received_at, size, mail_from, rcpts, done, last, replies, attempts,
                 next_attempt, hold, pending_domains):
        self.queue_id = queue_id
        self.received_at = received_at
        self.size = size
        self.mail_from = mail_from
        self.rcpts = rcpts
        self.done = done
        self.last = last
        self.replies = replies
        self.attempts = attempts
        self.next_attempt = next_attempt
        self.hold = hold
        # what `queue summary` counts: the pending recipients' domains, ready (shared
        # texts: a str for one domain, a tuple for several or none)
        self.pending_domains = pending_domains

    def pending_rcpts(self) -> list[str]:
        r, done = self.rcpts, self.done
        if type(r) is str:
            return [r] if done is None or r not in done else []
        return list(r) if done is None else [x for x in r if x not in done]

    @property
    def done_count(self) -> int:
        return 0 if self.done is None else len(self.done)

    def pending_replies(self) -> list[str]:
        """The replies recorded for recipients still pending (each distinct pair once)."""
        reps, done = self.replies, self.done
        if reps is None:
            last = self.last
            if done is None:  # the usual case, in a walk of the whole queue: slices, no Python loop
                return [r for r in last[2::3] if r]
            return [last[i + 2] for i in range(0, len(last), 3) if last[i + 2] and last[i] not in done]
        if done is None:
            return list(reps[1::2])
        return [reps[i + 1] for i in range(0, len(reps), 2) if reps[i] not in done]

    def last_reply(self) -> tuple[str, float]:
        """As kanmon.spool.store.SpoolEntry.last_reply: the latest reply recorded for a
        pending recipient ("" if none), and when."""
        best, at = "", -1.0
        last, done = self.last, self.done
        for i in range(0, len(last), 3):
            if done is not None and last[i] in done:
                continue
            if last[i + 1] >= at:
                best, at = last[i + 2], last[i + 1]
        return best, max(at, 0.0)

    def domains(self) -> frozenset[str]:
        """The domains of the pending recipients (what `queue summary` counts)."""
        d = self.pending_domains
        return frozenset((d,) if type(d) is str else d)

    def pending_in(self, domain: str) -> bool:
        """A pending recipient is in this domain (lower case)."""
        d = self.pending_domains
        return d == domain if type(d) is str else domain in d

    def sender_domain(self) -> str:
        return _domain(self.mail_from) if self.mail_from else "<>"


class QueueIndex:
    """queue id -> Entry, under one lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, Entry] = {}
        self._pool: dict[str, str] = {}
        self._pool_limit = _POOL_MIN
        # reply text -> the id (str) or ids (set, from the second on) of the entries whose
        # pending_replies() hold it (the reason filter: its regex on the distinct texts, then
        # their ids; not every entry). A text held by one entry (a reply quoting its own
        # recipient or a server's session id: most of them) costs a dict slot, no set.
        self._by_reply: dict[str, str | set[str]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, queue_id: str) -> bool:
        return queue_id in self._entries

    # -- building entries (under the lock: the pool is shared) -----------------------------

    def _shared(self, text: str) -> str:
        return self._pool.setdefault(text, text)

    def _entry(self, queue_id: str, envelope: Envelope, size: int, state: QueueState) -> Entry:
        return self._pooled(entry_fields(queue_id, envelope, size, state))

    def _pooled(self, f: tuple, queue_id: str | None = None) -> Entry:
        """The Entry of entry_fields()' tuple, its repeated texts (sender, replies,
        domains) shared through the pool."""
        sd = self._pool.setdefault  # _shared(), without a call per text (recovery adds a million)
        last, replies, domains, sender = f[6], f[7], f[11], f[3]
        if last:
            n = len(last)
            if n == 3:
                last = (last[0], last[1], sd(last[2], last[2]))
            elif n == 6:
                last = (last[0], last[1], sd(last[2], last[2]), last[3], last[4], sd(last[5], last[5]))
            else:
                last = tuple([sd(x, x) if i % 3 == 2 else x for i, x in enumerate(last)])
        if replies is not None:
            replies = tuple([sd(x, x) for x in replies])
        domains = sd(domains, domains) if type(domains) is str else tuple([sd(d, d) for d in domains])
        return Entry(queue_id or f[0], f[1], f[2], sd(sender, sender), f[4], f[5], last, replies, f[8], f[9], f[10],
                     domains)

    def _domains(self, rcpts, done) -> str | tuple[str, ...]:
        found = _domains_of(rcpts, done)
        return self._shared(found) if type(found) is str else tuple(self._shared(d) for d in found)

    def _applied(self, e: Entry, records: Iterable[journal.Record]) -> Entry:
        """The entry after these journal records, as QueueState.apply adds them up."""
        done = e.done
        last = list(e.last)
        replies = list(e.replies) if e.replies is not None else _pairs_of(e.last)
        attempts, next_attempt, hold = e.attempts, e.next_attempt, e.hold
        for rec in records:
            if isinstance(rec, journal.Result):
                if rec.final:
                    done = (done or frozenset()) | {rec.rcpt}
                    _remove_rcpt(last, 3, rec.rcpt)
                    _remove_rcpt(replies, 2, rec.rcpt)
                else:
                    reply = self._shared(rec.reply)
                    for i in range(0, len(last), 3):
                        if last[i] == rec.rcpt:
                            last[i + 1], last[i + 2] = rec.t, reply
                            break
                    else:
                        last += (rec.rcpt, rec.t, reply)
                if rec.reply and (done is None or rec.rcpt not in done):
                    if not any(replies[i] == rec.rcpt and replies[i + 1] == rec.reply for i in range(0, len(replies), 2)):
                        replies += (rec.rcpt, self._shared(rec.reply))
            elif isinstance(rec, journal.Attempt):
                attempts, next_attempt = rec.n, rec.next
            elif isinstance(rec, journal.Hold):
                hold = rec.on
            elif isinstance(rec, journal.Schedule):
                next_attempt = rec.next
        return Entry(e.queue_id, e.received_at, e.size, e.mail_from, e.rcpts, done, tuple(last),
                     _unless_last(tuple(replies), last), attempts, next_attempt, hold,
                     e.pending_domains if done is e.done else self._domains(e.rcpts, done))

    def _sweep_pool(self) -> None:
        """Forget pooled texts no entry holds any more (only the pool's key and value
        refer to them, and getrefcount's argument), once the pool has doubled."""
        if len(self._pool) <= self._pool_limit:
            return
        pool = self._pool
        for text in [t for t in pool if sys.getrefcount(pool[t]) <= 4]:  # key, value, the list, the argument
            del pool[text]
        self._pool_limit = max(_POOL_MIN, 2 * len(pool))

    def _put(self, queue_id: str, entry: Entry) -> None:
        """Set an entry (new or replacing one), keeping _by_reply in step (under the lock)."""
        old = self._entries.get(queue_id)
        self._entries[queue_id] = entry
        before = set(old.pending_replies()) if old is not None else set()
        after = set(entry.pending_replies())
        if before != after:
            self._unlink(queue_id, before - after)
            by = self._by_reply
            for text in after - before:
                ids = by.get(text)
                if ids is None:
                    by[text] = queue_id
                elif type(ids) is str:
                    if ids != queue_id:
                        by[text] = {ids, queue_id}
                else:
                    ids.add(queue_id)

    def _remove(self, queue_id: str) -> None:
        old = self._entries.pop(queue_id, None)
        if old is not None:
            self._unlink(queue_id, set(old.pending_replies()))

    def _unlink(self, queue_id: str, texts) -> None:
        by = self._by_reply
        for text in texts:
            ids = by.get(text)
            if ids is None:
                continue
            if type(ids) is str:
                if ids == queue_id:
                    del by[text]
                continue
            ids.discard(queue_id)
            if len(ids) == 1:
                (by[text],) = ids
            elif not ids:
                del by[text]

    # -- changes --------------------------------------------------------------------------

    def add(self, queue_id: str, envelope: Envelope, size: int, state: QueueState | None = None) -> None:
        with self._lock:
            self._put(queue_id, self._entry(queue_id, envelope, size, state or QueueState()))
            self._sweep_pool()

    def add_fields(self, fields: list[tuple], ids: list[str] | None = None) -> list[Entry]:
        """Add the entries of entry_fields() tuples (start-up recovery: a chunk of them
        read by a child process), with these id strings if given (equal to the tuples'
        own); the entries added."""
        with self._lock:
            added = [self._pooled(f, q) for f, q in zip(fields, ids, strict=True)] if ids is not None else [
                self._pooled(f) for f in fields]
            for e in added:
                self._put(e.queue_id, e)
            self._sweep_pool()
        return added

    def apply(self, queue_id: str, records: list[journal.Record]) -> None:
        with self._lock:
            entry = self._entries.get(queue_id)
            if entry is not None:
                self._put(queue_id, self._applied(entry, records))
                self._sweep_pool()

    def drop(self, queue_id: str) -> None:
        with self._lock:
            self._remove(queue_id)

    # -- reading ----------------------------------------------------------------------------

    def entries(self) -> list[Entry]:
        """Every entry, as they are now (a list: the walk holds no lock)."""
        with self._lock:
            return list(self._entries.values())

    def with_reply(self, match: Callable[[str], bool]) -> list[Entry]:
        """The entries with a pending reply for which match(text) is true (the reason
        filter): match is called once per distinct reply text, outside the lock (the
        queue manager's changes do not wait for a regex); the texts that matched and
        still have entries then give their entries under it, in queue id order (ids
        sort by time of arrival: an action's list and a backup's order do not depend on how
        a set hashed them)."""
        with self._lock:
            texts = list(self._by_reply)
        found = [t for t in texts if match(t)]
        with self._lock:
            by, ids = self._by_reply, set()
            for text in found:
                qids = by.get(text)
                if qids is None:
                    continue
                if type(qids) is str:
                    ids.add(qids)
                else:
                    ids |= qids
            entries = self._entries
            return [entries[q] for q in sorted(ids)]

    def get(self, queue_id: str) -> Entry | None:
        return self._entries.get(queue_id)

    # -- keeping up with other processes ------------------------------------------------------

    def reconcile_names(self, names: set[str], load: Callable[[str], tuple[Envelope, int, QueueState] | None]) -> None:
        """Make the index hold exactly the names in spool/queue/: the messages other
        processes stored are read (load(queue_id); None: gone, or refused and set aside),
        those gone are dropped (set operations in C)."""
        with self._lock:
            for qid in self._entries.keys() - names:
                self._remove(qid)
            new = names - self._entries.keys()
        for qid in new:
            loaded = load(qid)
            if loaded is not None:
                with self._lock:
                    if qid not in self._entries:
                        self._put(qid, self._entry(qid, *loaded))


def entry_fields(queue_id: str, envelope: Envelope, size: int, state: QueueState) -> tuple:
    """What an Entry keeps of a message, as a tuple of plain values in Entry's order (texts
    not yet shared: a recovery child process sends these to the node, whose index pools
    them, QueueIndex.add_fields)."""
    rcpts = envelope.rcpts
    done = frozenset(state.done) if state.done else None
    last: list = []
    for rcpt, rec in state.last.items():
        last += (rcpt, rec.t, rec.reply)
    pairs = dict.fromkeys((r.rcpt, r.reply) for r in state.history
                          if isinstance(r, journal.Result) and r.reply and (done is None or r.rcpt not in done))
    replies = tuple(x for pair in pairs for x in pair)
    return (queue_id, envelope.received_at, size, envelope.mail_from, rcpts[0] if len(rcpts) == 1 else tuple(rcpts),
            done, tuple(last), _unless_last(replies, last), state.attempts, state.next_attempt, state.hold,
            _domains_of(rcpts, done))


def _domains_of(rcpts, done) -> str | tuple[str, ...]:
    """The pending recipients' domains: a str for one, a sorted tuple for several or none."""
    if type(rcpts) is str:
        rcpts = (rcpts,)
    found = {_domain(r) for r in rcpts if done is None or r not in done}
    if len(found) == 1:
        return found.pop()
    return tuple(sorted(found))


def _remove_rcpt(flat: list, width: int, rcpt: str) -> None:
    """Remove every group of `width` items whose first is rcpt from a flat list."""
    i = 0
    while i < len(flat):
        if flat[i] == rcpt:
            del flat[i : i + width]
        else:
            i += width


def _pairs_of(last) -> list:
    """The (rcpt, reply) pairs of a flat last (rcpt, t, reply, ...), empty replies left out."""
    out: list = []
    for i in range(0, len(last), 3):
        if last[i + 2]:
            out += (last[i], last[i + 2])
    return out


def _unless_last(replies: tuple, last) -> tuple | None:
    """None when replies are exactly last's pairs (nothing more to keep)."""
    return None if list(replies) == _pairs_of(last) else replies
