"""Quarantine operations: list, show, release, delete, purge (and the digest's listing).

Role: what `kanmon quarantine ...` and the control socket ask of the quarantine store
(kanmon.quarantine.store: this node's directory, or with `[records] url` the quarantine
every node shares, kanmon.state.pgquarantine). A release goes through this node's
injector (kanmon.queue.inject: the one way into the queue), under the queue id the
message got at acceptance, so `kanmon trace ID` shows acceptance, quarantine, release
and delivery as one path, whichever node quarantined it and whichever releases it. The
releasing node first claims the entry (in the shared store, of two nodes releasing it
at once one wins, the other is told it is gone); the entry is removed only after the
message is durable in the spool (a crash in between leaves both, claimed by this node:
releasing again, or the next purge, finds it already queued and only removes the entry).
Every release and delete is an event naming who did it. The digest's signed links
(kanmon.quarantine.links, followed on the console's /q/ endpoint) act for one recipient:
release_for / delete_for take that recipient's copy only, and leave the entry to the
others when it has several.

Trusts: ids and filters from the caller (checked here); nothing in the stored messages.
Never: delete an entry before its release is durable; show a network string unescaped
(the caller's renderer escapes; JSON keeps the text exact).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path

from kanmon.config import parse_duration
from kanmon.content.decode import decode_header_value
from kanmon.model import Envelope, new_queue_id
from kanmon.quarantine import links
from kanmon.quarantine.digest import digest_message
from kanmon.quarantine.store import KINDS, QuarantineError, QuarantineStore
from kanmon.records import events as ev
from kanmon.records.store import header_fields
from kanmon.spool.groupcommit import write_durably
from kanmon.spool.store import CorruptEntry
from kanmon.state.backends import is_shared, node_name, open_quarantine, open_state

DIGEST_CLAIM = "quarantine-digest"  # the alert-claim category of the digest's scheduled runs
DIGEST_CLAIM_KEEP = 86400.0  # a slot claimed is not mailed again by another node within a day
DIGEST_LAST = "last"  # key, in the shared state's cache DIGEST_CLAIM, of the last scheduled digest
# A shared digest lists from this long before the last one, less the entries that one
# mailed: an entry's time is its receiving node's clock, taken before its row commits, so
# one a node commits late (its clock behind, a slow insert) is mailed later, never skipped.
DIGEST_OVERLAP = 120.0
DIGEST_MAX_IDS = 10_000  # ids kept of the last digest's overlap (beyond: mailed twice, not lost)


def shared_last(last, now: float) -> tuple[float, frozenset[str]] | None:
    """The last shared scheduled digest as the shared state holds it (a CacheEntry, or
    None): (when it listed, the ids it mailed that were stored within DIGEST_OVERLAP
    before that), decoded strictly; None where there is none or it is not that."""
    if last is None or not isinstance(last.value, str) or len(last.value) > 64 * DIGEST_MAX_IDS:
        return None
    try:
        doc = json.loads(last.value)
    except (ValueError, RecursionError):
        return None
    if not isinstance(doc, dict) or set(doc) != {"t", "ids"}:
        return None
    when, ids = doc["t"], doc["ids"]
    if type(when) not in (int, float) or not 0 < when <= now or not isinstance(ids, list) \
            or len(ids) > DIGEST_MAX_IDS or not all(isinstance(i, str) and 0 < len(i) <= 64 for i in ids):
        return None
    return float(when), frozenset(ids)


RELEASED_LEDGER = "quarantine-released"  # under spool/: one released queue id a line


@dataclass
class QuarantineFilters:
    kind: str = ""  # admin | spam | "" (both)
    mail_from: str = ""  # pattern (* ?) or substring, case-insensitive
    to: str = ""  # any recipient: pattern or substring
    reason: str = ""  # regex on the reason
    older_than: str = ""  # duration
    ids: tuple[str, ...] = ()

    @classmethod
    def from_args(cls, a: dict | None) -> QuarantineFilters:
        a = a or {}
        f = cls(str(a.get("kind") or ""), str(a.get("from") or ""), str(a.get("to") or ""), str(a.get("reason") or ""),
                str(a.get("older_than") or ""), tuple(str(i) for i in a.get("ids") or ()))
        if f.kind and f.kind not in KINDS:
            raise ValueError(f"--kind must be one of {', '.join(KINDS)}")
        if f.reason:
            try:
                re.compile(f.reason)
            except re.error as e:
                raise ValueError(f"--reason {f.reason!r} is not a regular expression: {e}") from None
        if f.older_than:
            parse_duration(f.older_than)
        return f


def _matches(pattern: str, value: str) -> bool:
    pattern, value = pattern.lower(), value.lower()
    if "*" in pattern or "?" in pattern:
        return fnmatch.fnmatchcase(value, pattern)
    return pattern in value


def _with_store(method):
    """The store is open for one operation (a shared one holds database connections)."""

    @functools.wraps(method)
    def run(self, *args, **kwargs):
        if self.store is not None:  # an operation inside another (purge -> delete)
            return method(self, *args, **kwargs)
        self.store = open_quarantine(self.ops.config, fsync=getattr(self.ops.spool, "fsync", True))
        try:
            return method(self, *args, **kwargs)
        finally:
            store, self.store = self.store, None
            store.close()

    return run


class QuarantineOps:
    """ops: the node's QueueOps (config, records, injector, the clock through its link)."""

    def __init__(self, ops):
        self.ops = ops
        self.node = node_name(ops.config)
        self.store: QuarantineStore | None = None

    def _now(self) -> float:
        return self.ops.link.now()

    def _rows(self, f: QuarantineFilters) -> list[dict]:
        now = self._now()
        limit = parse_duration(f.older_than) if f.older_than else None
        reason = re.compile(f.reason, re.IGNORECASE) if f.reason else None
        out = []
        where = self.store.locations()  # shared: which node quarantined it, which releases it
        for qid in (f.ids or self.store.ids()):
            try:
                entry, content = self.store.load(qid)
            except QuarantineError:
                if f.ids:
                    raise
                continue
            except CorruptEntry as e:
                out.append({"id": qid, "corrupt": str(e)})
                continue
            m, env = entry.meta, entry.envelope
            if f.kind and m.kind != f.kind:
                continue
            if f.mail_from and not _matches(f.mail_from, env.mail_from):
                continue
            if f.to and not any(_matches(f.to, r) for r in env.rcpts):
                continue
            if reason is not None and not reason.search(m.reason):
                continue
            if limit is not None and now - m.stored < limit:
                continue
            fields = header_fields(content)
            node, releasing = where.get(qid, ("", ""))
            out.append({"id": qid, "kind": m.kind, "from": env.mail_from, "rcpts": list(env.rcpts),
                        "subject": decode_header_value(fields.get("subject", "")), "size": entry.size,
                        "reason": m.reason, "check": m.check, "classification": m.classification, "score": m.score,
                        "stored": m.stored, "node": node, "releasing": releasing})
        out.sort(key=lambda r: r.get("stored", 0.0))
        return out

    @_with_store
    def list(self, args: dict | None) -> dict:
        return {"items": self._rows(QuarantineFilters.from_args(args))}

    @_with_store
    def show(self, qid: str, lines: int = 50) -> dict:
        entry, content = self.store.load(qid)
        header_end = content.find(b"\r\n\r\n")
        header = content[:header_end if header_end >= 0 else len(content)].decode("utf-8", "replace")
        body = content[header_end + 4:].decode("utf-8", "replace").split("\r\n")[:lines] if header_end >= 0 else []
        (row,) = self._rows(QuarantineFilters(ids=(qid,)))
        return {**row, "header": header, "body": body, "client": entry.envelope.client.ip if entry.envelope.client else ""}

    @_with_store
    def release(self, ids: list[str], to: list[str] | None, by: str) -> dict:
        released, errors = [], []
        unknown = self._unknown_local(to or [])
        if unknown:  # a typo must not bounce the message to its (outside) sender
            return {"released": [], "errors": [f"--to {a}: not a mailbox or alias of a local domain: nothing released"
                                               for a in unknown]}
        for qid in ids:
            try:
                self.store.claim(qid, self.node, self._now())
            except QuarantineError as e:
                errors.append(str(e) if str(e).startswith(f"{qid}:") else f"{qid}: {e}")
                continue
            try:
                entry, content = self.store.load(qid)
            except (QuarantineError, CorruptEntry) as e:
                self.store.unclaim(qid, self.node)
                errors.append(f"{qid}: {e}")
                continue
            env = entry.envelope
            if to:
                env.rcpts = list(to)
                env.original_rcpts, env.dsn_notify, env.dsn_orcpt = {}, {}, {}
                env = self.ops.injector.expanded(env)  # the event names whom it goes to
            if not self._released_here(qid):
                try:
                    self.ops.injector.release_blocking(qid, env, content)
                except BaseException:
                    self.store.unclaim(qid, self.node)
                    raise
                # Before the entry goes: a crash or a store failure in between must not
                # put a message already queued (perhaps delivered since) back in the
                # quarantine, where it could be released a second time.
                write_durably(self._ledger(), qid.encode() + b"\n", append=True, sync=self.ops.spool.fsync)
            self.ops.records.record(ev.QuarantineReleased(by, ", ".join(env.rcpts)), qid)
            try:
                self.store.delete(qid, self.node)
            except QuarantineError as e:  # released all the same; the entry goes at the next purge
                errors.append(f"{qid}: released; its quarantine entry stays until the next purge ({e})")
            released.append(qid)
        return {"released": released, "errors": errors}

    def _unknown_local(self, addresses: list[str]) -> list[str]:
        """The addresses of a local domain that are neither a mailbox nor an alias."""
        return [a for a in addresses if self.ops.directory.is_unknown_local(a)]

    def _ledger(self) -> Path:
        """spool/quarantine-released: the ids this node queued from the quarantine."""
        return self.ops.spool.root / RELEASED_LEDGER

    def _released_here(self, qid: str) -> bool:
        if self.ops.spool.exists(qid):
            return True
        try:
            return qid in self._ledger().read_text().split()
        except FileNotFoundError:
            return False

    @_with_store
    def delete(self, ids: list[str], by: str) -> dict:
        deleted, errors = [], []
        for qid in ids:
            try:
                self.store.delete(qid, self.node)
            except QuarantineError as e:
                errors.append(str(e))
                continue
            self.ops.records.record(ev.QuarantineDeleted(by), qid)
            deleted.append(qid)
        return {"deleted": deleted, "errors": errors}

    def _mine(self, qid: str, rcpt: str) -> tuple[list[str], list[str]]:
        """(this recipient's addresses in the entry, the others'); QuarantineError when
        the entry or this recipient's copy is gone."""
        entry, _ = self.store.load(qid)
        rcpts = entry.envelope.rcpts
        mine = [r for r in rcpts if r.lower() == rcpt.lower()]
        if not mine:
            raise QuarantineError(f"{qid}: not in the quarantine for {rcpt}")
        return mine, [r for r in rcpts if r.lower() != rcpt.lower()]

    @_with_store
    def release_for(self, qid: str, rcpt: str, by: str) -> dict:
        """Release one recipient's copy (the digest's link). The entry's only recipient:
        release() to them. One of several: their copy enters the queue under a new queue
        id (the event on the entry names it) and the entry keeps the others."""
        try:
            mine, others = self._mine(qid, rcpt)
        except (QuarantineError, CorruptEntry) as e:
            return {"released": [], "errors": [str(e)]}
        if not others:
            return self.release([qid], mine, by)
        try:
            self.store.claim(qid, self.node, self._now())
        except QuarantineError as e:
            return {"released": [], "errors": [str(e)]}
        try:
            entry, content = self.store.load(qid)
            env = dataclasses.replace(entry.envelope, rcpts=list(mine), original_rcpts={}, dsn_notify={}, dsn_orcpt={})
            copy_id = new_queue_id(self._now())
            self.ops.injector.release_blocking(copy_id, env, content)
            self.ops.records.record(ev.QuarantineReleased(by, f"{', '.join(mine)} as {copy_id}"), qid)
            self.store.remove_rcpts(qid, mine, self.node)
        finally:
            self.store.unclaim(qid, self.node)
        return {"released": [qid], "errors": [], "queue_id": copy_id}

    @_with_store
    def delete_for(self, qid: str, rcpt: str, by: str) -> dict:
        """Delete one recipient's copy (the digest's link): the entry when they are its
        only recipient, else only their address from it."""
        try:
            mine, others = self._mine(qid, rcpt)
        except (QuarantineError, CorruptEntry) as e:
            return {"deleted": [], "errors": [str(e)]}
        if not others:
            return self.delete([qid], by)
        try:
            self.store.remove_rcpts(qid, mine, self.node)
        except QuarantineError as e:
            return {"deleted": [], "errors": [str(e)]}
        self.ops.records.record(ev.QuarantineDeleted(f"{by} (the copy for {', '.join(mine)})"), qid)
        return {"deleted": [qid], "errors": []}

    def link_secret(self) -> bytes:
        return links.load_secret(self.ops.config.server.data_dir)

    def _links(self, rcpt: str, rows: list[dict], secret: bytes | None) -> dict[str, tuple[str, str]] | None:
        """id -> (release URL, delete URL) for one recipient's digest; None without
        [console] public_url (secret: the link secret, None then). A link lasts as long
        as its message is kept."""
        console = self.ops.config.console
        if console is None or not console.public_url or secret is None:
            return None
        keep = self.ops.config.quarantine.keep
        return {r["id"]: tuple(links.url(console.public_url, links.sign(secret, r["id"], rcpt, action, r["stored"] + keep))
                               for action in links.ACTIONS) for r in rows}

    @_with_store
    def digest(self, since: float, dry_run: bool = False, slot: float | None = None) -> dict:
        """Mail each recipient the spam-quarantine entries stored since `since` (through
        the injector, like any mail kanmon writes); the recipients and counts.

        slot: the time the [quarantine] digest schedule fired for. Every node runs the
        schedule; with the quarantine shared, only the first node to claim the slot
        mails (the others answer whom it was), so a recipient gets one digest. That node
        lists what arrived since the last scheduled digest of any node (kept in the shared
        state when one is mailed), not since its own: the nodes take turns."""
        cfg = self.ops.config
        listed_at = self._now()  # before the listing: what arrives meanwhile is in the next one too
        mailed: frozenset[str] = frozenset()  # ids the last shared digest mailed within its overlap
        shared_slot = slot is not None and is_shared(cfg) and not dry_run
        if shared_slot:
            state = open_state(cfg)
            try:
                claim = state.alert_claims.claim(DIGEST_CLAIM, f"{slot:.0f}", self.node, listed_at, DIGEST_CLAIM_KEEP)
                last = state.cache(DIGEST_CLAIM).get(DIGEST_LAST, listed_at) if claim.mail else None
            finally:
                state.close()
            if not claim.mail:
                return {"digests": {}, "mailed_by": claim.mailed_by}
            previous = shared_last(last, listed_at)
            if previous is not None:
                since, mailed = previous[0] - DIGEST_OVERLAP, previous[1]
        hostname = cfg.server.hostname
        sender = cfg.quarantine.digest_from or f"postmaster@{hostname}"
        per_rcpt: dict[str, list[dict]] = {}
        overlap: dict[str, float] = {}  # id -> stored: what the next shared digest must not list again
        for row in self._rows(QuarantineFilters(kind="spam")):
            if "corrupt" in row or row["stored"] < since:
                continue
            if row["stored"] >= listed_at - DIGEST_OVERLAP:
                overlap[row["id"]] = row["stored"]  # mailed by the last digest or by this one
            if row["id"] in mailed:
                continue
            for rcpt in {r.lower() for r in row["rcpts"]}:
                per_rcpt.setdefault(rcpt, []).append(row)
        sent = {}
        now = self._now()
        linked = per_rcpt and not dry_run and cfg.console is not None and cfg.console.public_url
        secret = self.link_secret() if linked else None  # read once for every digest
        for rcpt, rows in sorted(per_rcpt.items()):
            sent[rcpt] = len(rows)
            if dry_run:
                continue
            content = digest_message(rcpt, rows, sender=sender, hostname=hostname, now=now,
                                     keep_days=int(cfg.quarantine.keep // 86400), links=self._links(rcpt, rows, secret))
            env = Envelope(mail_from="", rcpts=[rcpt], received_at=now, is_notice=True)
            self.ops.injector.inject_blocking(env, content, "quarantine digest")
        if shared_slot:  # mailed: the next slot's node lists from here (for as long as entries are kept)
            state = None
            try:
                state = open_state(cfg)
                recent_ids = sorted(overlap, key=overlap.__getitem__)[-DIGEST_MAX_IDS:]  # the latest, if ever more
                state.cache(DIGEST_CLAIM).put(DIGEST_LAST, json.dumps({"t": listed_at, "ids": recent_ids}),
                                              max(cfg.quarantine.keep, DIGEST_CLAIM_KEEP), listed_at)
            except Exception as e:  # noqa: BLE001 - the digests are mailed all the same: not a failed digest
                return {"digests": sent, "not_kept": f"{type(e).__name__}: {e}"}
            finally:
                if state is not None:
                    state.close()
        return {"digests": sent}

    @_with_store
    def purge(self, keep: float, by: str = "retention") -> dict:
        """Delete entries stored longer ago than `keep` seconds ([quarantine] keep), and
        the files of puts a crash interrupted (never acknowledged: a .msg without its .meta).
        First, releases this node began and did not finish (it stopped between its claim
        and the entry's removal): a message already in this node's spool was released,
        its entry goes; any other is back in the quarantine."""
        self.store.remove_orphans()
        for qid in self.store.claimed(self.node):
            if self._released_here(qid):
                with contextlib.suppress(QuarantineError):
                    self.store.delete(qid, self.node)
            else:
                self.store.unclaim(qid, self.node)
        now = self._now()
        old = []
        for qid in self.store.ids():
            try:
                if now - self.store.meta(qid).stored >= keep:
                    old.append(qid)
            except (QuarantineError, CorruptEntry):
                continue
        return self.delete(old, by)
