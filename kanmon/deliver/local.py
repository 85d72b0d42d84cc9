"""Local delivery into Maildir mailboxes.

Role: the `local` delivery agent. Writes each message into
<data_dir>/mailboxes/<domain>/<local-part>/{tmp,new,cur} the standard Maildir way
(write in tmp/, flush, rename into new/, flush new/), so Dovecot can serve it with
`mail_location = maildir:<data_dir>/mailboxes/%d/%n`. Adds Return-Path: and
Delivered-To:, and stores LF line endings as Maildir readers expect.

Quota: the accept checks refuse a recipient whose mailbox is over its quota at RCPT,
but sessions running side by side all pass that check before any of them is delivered.
So delivery reserves each message's size too: a mailbox whose stored bytes plus the
deliveries in flight to it reach its quota gets 452 4.2.2 (deferred: retried, bounced
only when the queue lifetime ends), and a mailbox ends at most one message over its quota.
Notices (the owner's over-quota notice among them) are delivered regardless, as Dovecot
delivers its quota warnings. Every delivery to one mailbox runs in one process (the
node's, or with [server] delivery_workers the agent process its mailbox hashes to), so
the reservations are in memory.

Trusts: recipients were validated by the accept checks and routing, or expanded by the
injector, and is_mailbox is asked again here (local part is a configured mailbox: no "/"
or ".." can reach a path). Never: report Sent before the
file and its directory entry are durable; write outside the mailbox directory; walk a
mailbox (quota usage) on the event loop.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from kanmon.deliver.sieving import Decision, SieveFilter
from kanmon.model import RecipientResult, Reply, Status, crlf_only
from kanmon.scan import strip_cr
from kanmon.smtp.replies import OVER_QUOTA, UNKNOWN_USER
from kanmon.spool.groupcommit import GroupCommitter
from kanmon.store.imap.cache import record_deliveries
from kanmon.store.maildir import MaildirError, mailbox_path, mailbox_usage, make_dirs_private, to_crlf

_counter = itertools.count(1)
DELIVERED = Reply(250, "2.0.0", "delivered to maildir")
SIEVE_SEND_FAILED = Reply(451, "4.3.0", "the redirect of a Sieve script could not be queued")
USERS_UNKNOWN = Reply(451, "4.3.0", "the users file cannot be read: whether this is a mailbox is not known")


def _mailbox_of(data_dir: Path, address: str) -> Path:
    """The Maildir of `local@domain` (store.maildir.mailbox_path checks both parts)."""
    local, _, domain = address.rpartition("@")
    return mailbox_path(data_dir, domain, local)


def ensure_maildir(path: Path) -> None:
    make_dirs_private(path)
    for sub in ("tmp", "new", "cur"):
        (path / sub).mkdir(exist_ok=True, mode=0o700)


def unique_name(size: int) -> str:
    """Maildir unique name: <secs>.M<usec>P<pid>Q<n>.<host>,S=<size> (Dovecot style)."""
    now = time.time()
    host = socket.gethostname().replace("/", "\\057").replace(":", "\\072")
    return f"{int(now)}.M{int((now % 1) * 1e6)}P{os.getpid()}Q{next(_counter)}.{host},S={size}"


def wire_body(content: bytes) -> bytes | None:
    """content itself when every CR and LF of it is in a CRLF pair (then it is the wire
    form of the body stored, content without its CRs), else None. The content is looked
    at, not its envelope's "crlf" flag, which a queue file from elsewhere may state
    wrongly (one pass: kanmon.scan.line_ends, ~10 us a 100 KB message compiled)."""
    return content if crlf_only(content) else None


def stored_and_wire(head: bytes, body: bytes, wire: bytes | None) -> tuple[bytes, tuple[bytes, ...] | None]:
    """The file's bytes (head, LF line ends, then body) and, when the body's wire form is
    known (wire_body), the file's, to_crlf(file), in pieces: no conversion back and no
    copy for each recipient. None otherwise (the IMAP cache hook converts the file)."""
    stored = head + body
    if wire is None:
        return stored, None
    return stored, (to_crlf(head), wire)


class LocalDelivery:
    """Deliver one message to local mailboxes; one RecipientResult per recipient.

    The files of all recipients (and of all messages being delivered at that moment)
    are made durable together by the group committer shared with the spool.
    """

    mailer = "local"

    def __init__(self, data_dir: Path, committer: GroupCommitter,
                 quota_of: Callable[[str], int | None] | None = None, sieve: SieveFilter | None = None,
                 is_mailbox: Callable[[str], Awaitable[bool | None]] | None = None):
        """quota_of(domain): the per-mailbox quota in bytes of a domain, None without one
        (asked at each delivery, so a reload's new quotas apply at once). sieve: users'
        filters (None: every message goes to INBOX). is_mailbox(address), awaited: whether
        it is a mailbox of the running config or users file (asked at each delivery;
        userdb's Directory.wait_deliverable, which reads the file off the loop); a
        recipient that is not gets 550 5.1.1 (bounced) instead of a new Maildir nobody
        reads, and one it cannot tell (None: the users file is unreadable) is deferred. None: every recipient is taken as one (the accept checks
        decided)."""
        self.sieve = sieve
        self.is_mailbox = is_mailbox
        self.data_dir = Path(data_dir)
        self.committer = committer
        self.quota_of = quota_of or (lambda domain: None)
        self._known: set[Path] = set()  # mailboxes whose tmp/new/cur exist
        self._reserved: dict[Path, int] = {}  # bytes being delivered to a mailbox right now
        self._quota_locks: dict[Path, asyncio.Lock] = {}  # one per configured mailbox with a quota

    async def deliver(self, mail_from: str, rcpts: list[str], content: bytes, *,
                      quota_exempt: bool = False, queue_id: str = "") -> list[RecipientResult]:
        """quota_exempt: a notice of ours (delivered even to a full mailbox). A recipient
        with an active Sieve script gets what the script decides (kanmon.deliver.sieving):
        its folders, and its redirects and vacation reply queued once the files are durable."""
        # Accepted content has no bare CR (the session refuses it), so deleting every CR
        # turns CRLF into LF in one pass (kanmon.scan: ~14 us for 100 KB compiled).
        body = strip_cr(content)
        body_wire = wire_body(content)
        files: list[tuple[Path, Path, bytes]] = []
        wires: list[tuple[bytes, ...] | None] = []  # each file's wire form, for the IMAP cache entry
        results: list[RecipientResult | int] = []  # a result, or how many files the recipient has in `files`
        decisions: dict[int, Decision] = {}
        reserved: list[tuple[Path, int]] = []
        try:
            for rcpt in rcpts:
                known = await self.is_mailbox(rcpt) if self.is_mailbox is not None else True
                if known is None:
                    results.append(RecipientResult(rcpt, Status.DEFERRED, USERS_UNKNOWN, relay="local", mailer="local"))
                    continue
                if not known:
                    # Mail kanmon queued itself (sendmail, a release --to, a notice) for a
                    # local part that is no mailbox, or one removed since it was queued.
                    results.append(RecipientResult(rcpt, Status.BOUNCED, UNKNOWN_USER, relay="local", mailer="local"))
                    continue
                try:
                    box = _mailbox_of(self.data_dir, rcpt)
                    if box not in self._known:
                        ensure_maildir(box)
                        self._known.add(box)
                except (OSError, MaildirError) as e:
                    results.append(_deferred(rcpt, e))
                    continue
                targets = [box]
                if self.sieve is not None and not quota_exempt and self.sieve.wanted(rcpt):
                    decision = await asyncio.get_running_loop().run_in_executor(
                        None, self.sieve.decide, mail_from, rcpt, content)
                    decisions[len(results)] = decision
                    targets = decision.boxes
                head = f"Return-Path: <{mail_from}>\nDelivered-To: {rcpt}\n".encode("utf-8", "replace")
                data, wire = stored_and_wire(head, body, body_wire)
                if targets and not quota_exempt and not await self._reserve(rcpt, box, len(data), reserved):
                    decisions.pop(len(results), None)
                    results.append(RecipientResult(rcpt, Status.DEFERRED, OVER_QUOTA, relay="local", mailer="local"))
                    continue
                for target in targets:
                    name = unique_name(len(data))
                    files.append((target / "tmp" / name, target / "new" / name, data))
                    wires.append(wire)
                results.append(len(targets))
            errors = await self.committer.commit(files) if files else []
            if files:  # the IMAP cache entries, off the loop (never the delivery's failure)
                await asyncio.get_running_loop().run_in_executor(
                    None, record_deliveries,
                    [(f[1], f[2], w) for f, w, e in zip(files, wires, errors, strict=True) if e is None])
        finally:
            for box, size in reserved:
                left = self._reserved[box] - size
                if left:
                    self._reserved[box] = left
                else:
                    del self._reserved[box]
        out: list[RecipientResult] = []
        it = iter(errors)
        for i, (rcpt, res) in enumerate(zip(rcpts, results, strict=True)):
            if not isinstance(res, int):
                out.append(res)
                continue
            err = next((e for e in [next(it) for _ in range(res)] if e is not None), None)
            if err is not None:
                self._known.discard(_mailbox_of(self.data_dir, rcpt))
                out.append(_deferred(rcpt, err))
                continue
            decision = decisions.get(i)
            if decision is not None and self.sieve is not None:
                for text, kind in decision.notes:
                    self.sieve.emit(text, queue_id or None, kind)
                if not await self.sieve.send(decision, queue_id, rcpt) and not decision.boxes:
                    out.append(RecipientResult(rcpt, Status.DEFERRED, SIEVE_SEND_FAILED, relay="local", mailer="local"))
                    continue
            out.append(RecipientResult(rcpt, Status.SENT, DELIVERED, relay="local", mailer="local"))
        return out


    async def _reserve(self, rcpt: str, box: Path, size: int, reserved: list[tuple[Path, int]]) -> bool:
        """Room for `size` more bytes in the mailbox (its quota not yet reached by what is
        stored plus what is being delivered): reserve them. True without a quota."""
        local, _, domain = rcpt.rpartition("@")
        quota = self.quota_of(domain)
        if quota is None:
            return True
        lock = self._quota_locks.setdefault(box, asyncio.Lock())
        async with lock:  # one look at the mailbox at a time, so each sees the others' reservations
            # The deliveries in flight are counted as they were when the walk began: one
            # that ends during the walk (its file renamed into new/ after the walk passed,
            # its reservation released before the walk returned) is then counted once or
            # twice, never not at all. Twice defers this message (452, retried) a little early.
            in_flight = self._reserved.get(box, 0)
            try:
                usage = await asyncio.get_running_loop().run_in_executor(
                    None, mailbox_usage, self.data_dir, domain, local)
            except OSError:
                usage = 0  # an unreadable mailbox: the write below reports the problem
            if usage + in_flight >= quota:
                return False
            self._reserved[box] = self._reserved.get(box, 0) + size
            reserved.append((box, size))
        return True


def _deferred(rcpt: str, e: Exception) -> RecipientResult:
    reply = Reply(451, "4.3.0", f"cannot write to mailbox: {getattr(e, 'strerror', None) or e}")
    return RecipientResult(rcpt, Status.DEFERRED, reply, relay="local", mailer="local")
