"""Queue operations: list, show, hold, release, delete, bounce, flush, requeue, summary,
backup, restore, drain and the [[maintenance]] jobs (docs/queue.md).

Role: the one implementation of every queue operation, shared by the CLI, the control
socket (kanmon.control: `kanmon serve` runs these in a worker thread of its own process)
and the web console. It reads and changes queue state only through the Spool API and
tells the running queue manager through a ManagerLink: with the server running that is
NodeLink (kanmon.admin.service), without it OfflineLink (nothing in memory to tell; the
journal is what the next start reads). Each operation returns a JSON-able dict, the
same over the socket and in process.

Postfix equivalents: list = mailq/postqueue -p, hold/release/delete/requeue = postsuper
-h/-H/-d/-r, flush = postqueue -f / -i, bounce = postsuper -e (return to sender),
summary = qshape (same age buckets), drain = what `postqueue -f` to a new relayhost does.

Trusts: filters from the admin only as kanmon.admin.filters validates them (a bad one is
a ValueError), queue ids only after is_queue_id(). Never: read message bodies to list or
summarise (the envelope is at the start of each queue file, the rest is in the journal),
or to filter other than the first BODY_SCAN_BYTES for the subject, header and body
filters, after every cheaper filter matched; act on
a message the queue manager is delivering at that moment (the link waits until its
attempt settles); remove a drained message before the new relay said 250 for all of its
recipients; change the queue without an event-log line saying what, how many, which
ids and from which command.
"""

from __future__ import annotations

import bisect
import contextlib
import heapq
import re
import shlex
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

from kanmon.admin.backup import BackupError, BackupWriter, archive_head, read_archive, verify_archive
from kanmon.admin.filters import BODY_SCAN_BYTES, Filters, domain_of
from kanmon.admin.maintenance import JobRun, RunLog, describe_run, missed
from kanmon.auth.dkimsign import load_signer_lenient
from kanmon.admin.quarantine_ops import QuarantineOps
from kanmon.cron import CronSchedule
from kanmon.config import Config, MaintenanceJob
from kanmon.control import Streamed
from kanmon.escape import for_log
from kanmon.model import LocalReply, RecipientResult, Reply, Status, is_queue_id
from kanmon.quarantine.store import QuarantineError
from kanmon.queue.inject import Injector
from kanmon.queue.notices import Notices
from kanmon.records import events as ev
from kanmon.records.store import Records
from kanmon.spool import journal
from kanmon.spool.index import Entry
from kanmon.spool.store import CORRUPT_EVENT, CorruptEntry, Spool, SpoolEntry, SpoolError
from kanmon.spool.groupcommit import write_durably
from kanmon.userdb import quiet_directory

ACTIONS = ("delete", "hold", "release", "bounce", "flush", "requeue")
# qshape's age buckets, in minutes; the last column is "older than 1280m".
BUCKETS = (5, 10, 20, 40, 80, 160, 320, 640, 1280)
RETURNED = "message returned to sender by the administrator"
THEN = (None, "hold", "delete")  # what `backup --then` does to the archived messages here
RESTORE_LEDGER = "restored"  # <data_dir>/spool/restored: ids restored here, one a line
CONFIG_PLACEHOLDER = "OLD-NODE-CONFIG"  # the finish command's -c when the archive does not say which file
FILE_HINT = "the run log (<data_dir>/maintenance.json)"
EVENT_ID_LIMIT = 100  # ids listed in the summary line (each id also gets a line of its own)

# The actions that are journal records (kanmon.spool.journal.QueueState.apply reads them).
# "next": 0 means "as soon as the queue manager sees it", whatever its clock says (a
# stopped node's admin and the next start need not agree). Routing is decided at each
# attempt from the running config, so requeue ("route again", postsuper -r) is: due
# now, with the retry backoff restarted.
JOURNALED = {
    "hold": lambda t, by: [journal.Hold(t, True, by)],
    "release": lambda t, by: [journal.Hold(t, False, by), journal.Schedule(t, 0.0)],
    "flush": lambda t, by: [journal.Schedule(t, 0.0)],
    "requeue": lambda t, by: [journal.Attempt(t, 0, 0.0), journal.Schedule(t, 0.0)],
}

_REPLY_RE = re.compile(r"^([2-5]\d\d)(?: ([2-5]\.\d{1,3}\.\d{1,3}))? ?(.*)$", re.S)


class _Corrupt:
    """A corrupt entry's row among the matches of list() (sorted as arrival 0)."""

    __slots__ = ("row", "queue_id", "received_at")

    def __init__(self, row: dict):
        self.row, self.queue_id, self.received_at = row, row["id"], 0.0


def _by_id(e) -> str:
    return e.queue_id


def _by_arrival(e) -> float:
    return e.received_at or 0.0


def _arrival_order(e) -> tuple[float, str]:
    return (e.received_at or 0.0, e.queue_id)


class ManagerLink(Protocol):
    """What an operation may ask of the queue manager (kanmon.admin.service.NodeLink)."""

    def now(self) -> float: ...
    def active_ids(self) -> set[str]: ...
    def quiesce(self, queue_ids: list[str]) -> None: ...  # wait out attempts in flight, unschedule
    def due_now(self, queue_ids: list[str]) -> None: ...
    def reschedule(self, queue_id: str, at: float) -> None: ...
    def submit(self, queue_id: str) -> None: ...  # a new message (a notice) is in the spool
    def run_async(self, coro) -> Any: ...  # run a coroutine where delivery agents live


class OfflineLink:
    """No server runs: nothing is in memory; coroutines run on a private event loop."""

    def __init__(self, clock=None):
        self._clock = clock
        self._loop = None

    def now(self) -> float:
        return self._clock.now() if self._clock else time.time()

    def active_ids(self) -> set[str]:
        return set()

    def quiesce(self, queue_ids: list[str]) -> None:
        pass

    def due_now(self, queue_ids: list[str]) -> None:
        pass

    def reschedule(self, queue_id: str, at: float) -> None:
        pass

    def submit(self, queue_id: str) -> None:
        pass

    def run_async(self, coro) -> Any:
        import asyncio  # noqa: PLC0415

        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        return self._loop.run_until_complete(coro)

    def close(self) -> None:
        if self._loop is not None:
            self._loop.close()


@contextlib.contextmanager
def offline_queue_ops(config: Config) -> Iterator[QueueOps]:
    """The queue operations on the spool of a node that is not running.

    The caller holds the data directory's lock (kanmon.control.DataDirLock), so nothing
    else writes the spool meanwhile. On exit the records are flushed and everything opened
    here is closed. This is how the CLI works without a server: it never opens the spool
    or the records database itself.
    """
    data_dir = Path(config.server.data_dir)
    spool = Spool(data_dir)
    records = Records(data_dir, config.server.hostname, echo=None, log=config.log, rotate=False,
                      shared=config.records)
    link = OfflineLink()
    try:
        yield QueueOps(config, spool, records, link)
    finally:
        link.close()
        spool.close()
        records.flush()
        records.close()


def last_reply(entry: SpoolEntry | Entry) -> tuple[str, float]:
    """The most recent reply recorded for a still-pending recipient ("" if none)."""
    return entry.last_reply()


def finish_move(head: dict, archive: Path, count: int, hostname: str, identity: str | None) -> dict:
    """What is left to do on the node an archive came from, once it is restored here.

    Every message of the archive is now queued here (or was restored here before), so
    the copies on the old node must go: the command deletes exactly the archive's ids
    there (`--ids-from` reads and verifies the archive, as written on that node). Nothing
    when the archive was written from this very queue (same hostname and same spool
    identity, Spool.identity): the command would delete what was just restored. An
    archive that records no identity (written before there was one) is taken as from
    another node: a replacement machine often has the old one's name.

    The command names the old node's config file (origin.config, the -c of the backup,
    or the file the node runs with for a console backup). When the archive does not
    record one, it says `-c OLD-NODE-CONFIG` and finish_placeholder names that word for
    the admin to replace: a command without -c would act on whichever config the shell
    finds there ($KANMON_CONFIG, /etc/kanmon/kanmon.toml), maybe another node's queue.
    The same node can finish the move from its console instead (finish_check).
    """
    origin = head.get("origin") if isinstance(head.get("origin"), dict) else {}
    node = str(head.get("hostname") or "the old node")
    then = origin.get("then")
    same = head.get("hostname") == hostname and identity is not None and origin.get("identity") == identity
    if not count or then == "delete" or same:
        return {"origin": node, "then": then, "finish_command": None, "finish_placeholder": None, "same_node": same}
    path = str(origin.get("path") or archive)
    config = str(origin["config"]) if origin.get("config") else CONFIG_PLACEHOLDER
    command = ["kanmon", "queue", "delete", "--ids-from", path, "-c", config]
    return {"origin": node, "then": then, "finish_command": shlex.join(command),
            "finish_placeholder": None if origin.get("config") else CONFIG_PLACEHOLDER, "same_node": same}


def parse_reply_text(text: str) -> Reply:
    m = _REPLY_RE.match(text.strip())
    if not m:
        return Reply(451, "4.0.0", text)
    return Reply(int(m.group(1)), m.group(2) or "", m.group(3))


# ---------------------------------------------------------------------------
# The operations


class QueueOps:
    def __init__(self, config: Config, spool: Spool, records, link: ManagerLink):
        self.config = config
        self.spool = spool
        self.records = records
        self.link = link
        if spool.on_corrupt is None:  # a stopped node: the admin command reports what it sets aside
            spool.on_corrupt = lambda qid, why: records.emit(CORRUPT_EVENT.format(why), qid, "critical")
        if spool.on_refused is None:
            spool.on_refused = lambda text: records.emit(text, kind="error")
        self.notices = Notices(config)
        self._run_log: RunLog | None = None
        # Notices from `queue bounce` enter the queue like every message kanmon writes itself.
        # Mailboxes and aliases (followed in the users file): what the injector expands, and
        # what a quarantine release --to checks.
        self.directory = quiet_directory(config)
        self.injector = Injector(spool, records, lambda qid, env, content: link.submit(qid),
                                 hostname=config.server.hostname, clock=link, signer=load_signer_lenient(config),
                                 expand=self.directory.expand)
        # progress(done, total or None) for long operations (backup, restore, bulk
        # actions); set by dispatch() for one request when the caller asked for it.
        self.progress: Callable[[int, int | None], None] | None = None

    def _report(self, done: int, total: int | None) -> None:
        if self.progress is not None:
            self.progress(done, total)

    # -- selecting -----------------------------------------------------------------------

    def _state_of(self, entry: SpoolEntry | Entry, active: set[str]) -> str:
        if entry.hold:
            return "hold"
        if entry.queue_id in active:
            return "active"
        return "deferred"

    def select(self, filters: Filters) -> Iterator[tuple[SpoolEntry | Entry, str]]:
        """(entry, state) for every message the filters match (corrupt entries excluded).

        A running node's spool keeps an index (kanmon.spool.index): its compact entries
        are walked; a stopped node's files are read (Spool.scan). Both kinds of entry
        answer the same names (received_at, mail_from, pending_rcpts()...), and messages
        given by id are read from their files either way."""
        if filters.state == "corrupt":
            return
        now = self.link.now()
        active = self.link.active_ids()
        if self.spool.index is not None and not filters.ids:
            # The hot loop of a walk of a million: only the checks the filters ask for.
            want, criteria, content = filters.state, filters.has_criteria, filters.needs_content
            # A reason filter: only the entries holding a reply text it matches (the index's
            # reply map: the regex once per distinct text), the rest of the filters on those.
            reply_test = filters.reply_test
            if reply_test is not None and filters.reason_only:
                criteria = False  # those entries are exactly the reason's matches
            for e in self.spool.index_walk(reply_test):
                state = "hold" if e.hold else "active" if e.queue_id in active else "deferred"
                if want != "all" and want != state:
                    continue
                if criteria and not filters.match_indexed(e, state, now):
                    continue
                if content and not self._match_content(filters, e.queue_id):
                    continue
                yield e, state
            return
        if filters.ids:
            entries = (self._load(q) for q in dict.fromkeys(filters.ids))
            source = (e for e in entries if e is not None and filters.match_envelope(e.queue_id, e.envelope, now))
        else:
            source = self.spool.scan(lambda qid, env: filters.match_envelope(qid, env, now))
        for entry in source:
            state = self._state_of(entry, active)
            if filters.match_entry(entry, state) and self._match_content(filters, entry.queue_id):
                yield entry, state

    def _match_content(self, filters: Filters, qid: str) -> bool:
        """subject, header and body: the first BODY_SCAN_BYTES of the message, read only
        for those filters, after every cheaper one has matched."""
        if not filters.needs_content:
            return True
        try:
            head = self.spool.read_content_prefix(qid, BODY_SCAN_BYTES)
        except (OSError, CorruptEntry):
            return False  # gone meanwhile (delivered), or damaged (recovery moves it aside)
        return filters.match_content(head)

    def _load(self, qid: str) -> SpoolEntry | None:
        try:
            return self.spool.load(qid)
        except (FileNotFoundError, CorruptEntry):
            return None

    def row(self, entry: SpoolEntry | Entry, state: str) -> dict:
        reply, _ = entry.last_reply()
        return {
            "id": entry.queue_id, "state": state, "arrival": entry.received_at, "size": entry.size,
            "from": entry.mail_from, "rcpts": entry.pending_rcpts(), "done": entry.done_count,
            "last_reply": reply, "attempts": entry.attempts,
            "next_attempt": None if state == "hold" else (entry.next_attempt or None),
        }

    def list(self, filters: dict | Filters | None = None, offset: int = 0, limit: int | None = None, *,
             stream: bool = False) -> dict:
        """The matching messages, oldest first; with offset/limit one page of them
        (`count` is every match: the console pages without sending them all). Only the
        page's rows are built: the matches are sorted by (arrival, id) and sliced first.
        stream (the control socket): a long page's rows are a kanmon.control.Streamed,
        built and written a batch at a time."""
        f = filters if isinstance(filters, Filters) else Filters.from_json(filters)
        if offset < 0 or (limit is not None and limit < 0):
            raise ValueError("offset and limit are not negative")
        # The matches themselves (no tuple per match: a walk of 100,000 would leave as many
        # objects for the cyclic GC to look at); their state again for the page's rows only.
        active = self.link.active_ids()
        matches: list = [e for e, _s in self.select(f)]
        if f.state == "corrupt" or (f.state == "all" and not f.has_criteria):
            matches.extend(_Corrupt(r) for r in self._corrupt_rows(f))  # no envelope to filter on: only by id
        count = len(matches)
        end = count if limit is None else offset + limit
        if end < count // 8:
            page = heapq.nsmallest(end, matches, key=_arrival_order)[offset:]  # an early page: no full sort
        else:
            matches.sort(key=_by_id)  # by (arrival, id): two stable sorts on keys the GC does not track
            matches.sort(key=_by_arrival)
            page = matches[offset:end]
        def make(e) -> dict:
            return e.row if type(e) is _Corrupt else self.row(e, self._state_of(e, active))

        rows = Streamed(page, make) if stream and len(page) > Streamed.BATCH else [make(e) for e in page]
        return {"items": rows, "count": count, "now": self.link.now()}

    def _corrupt_rows(self, f: Filters) -> list[dict]:
        out = []
        for qid in self.spool.corrupt_ids():
            if f.ids and qid not in f.ids:
                continue
            out.append({"id": qid, "state": "corrupt", "arrival": None, "size": None, "from": "", "rcpts": [],
                        "done": 0, "last_reply": "", "attempts": 0, "next_attempt": None})
        return out

    def show(self, queue_id: str, lines: int = 50) -> dict:
        if not is_queue_id(queue_id):
            raise ValueError(f"not a queue id: {queue_id!r}")
        try:
            entry = self.spool.load(queue_id)
            content = self.spool.read_content(queue_id)
        except FileNotFoundError:
            raise LookupError(f"{queue_id}: not in the queue") from None
        except CorruptEntry as e:
            raise LookupError(f"{queue_id}: damaged queue file: {e}") from None
        state = self._state_of(entry, self.link.active_ids())
        end = content.find(b"\r\n\r\n")
        head, body = (content, b"") if end < 0 else (content[: end + 2], content[end + 4 :])
        body_lines = body.split(b"\r\n")
        env = entry.envelope
        client = asdict(env.client) if env.client else None
        return {
            **self.row(entry, state),
            "rcpts_all": [{"rcpt": r, "original": env.original_rcpts.get(r, ""),
                           "status": entry.state.done[r].status if r in entry.state.done else "pending"}
                          for r in env.rcpts],
            "client": client,
            "history": [journal.to_dict(h) for h in entry.state.history],
            "headers": head.decode("utf-8", "replace"),
            "body": b"\r\n".join(body_lines[:lines]).decode("utf-8", "replace"),
            "body_lines_total": len(body_lines),
        }

    # -- acting ----------------------------------------------------------------------------

    def act(self, action: str, filters: dict | Filters, *, dry_run: bool = False, source: str = "kanmon queue",
            states: tuple[str, ...] | None = None, whole_queue: bool = False) -> dict:
        """delete | hold | release | bounce | flush | requeue the matching messages.

        states: which states the action applies to when selecting by filters (release:
        held ones; flush/requeue: not held ones); given ids are taken as they are.
        """
        if action not in ACTIONS:
            raise ValueError(f"unknown action {action!r}")
        f = filters if isinstance(filters, Filters) else Filters.from_json(filters)
        if f.empty and action in ("delete", "hold", "release", "bounce") and f.state == "all" and not whole_queue:
            raise ValueError(f"{action} needs queue ids or filters (use --state all to mean the whole queue)")
        if states is None:
            states = {"release": ("hold",), "flush": ("deferred", "active"), "requeue": ("deferred", "active"),
                      "hold": ("deferred", "active")}.get(action, ("deferred", "active", "hold"))
        selected = [(e.queue_id, e.pending_rcpts() if action == "delete" else ()) for e, s in self.select(f) if s in states]
        targets = [qid for qid, _ in selected]
        # A deleted message's recipients still waiting: their history rows say "Deleted".
        pending = {qid: rcpts for qid, rcpts in selected if rcpts}
        del selected
        corrupt = []
        if action == "delete" and f.state in ("corrupt", "all") and (f.ids or f.state == "corrupt"):
            corrupt = [r["id"] for r in self._corrupt_rows(f)]
        # Ids given that no message has (a typo, or gone before): said, not silently "0 held".
        missing = [qid for qid in dict.fromkeys(f.ids or ()) if qid not in corrupt and not self.spool.exists(qid)]
        result = {"action": action, "matched": len(targets) + len(corrupt), "dry_run": dry_run,
                  "ids": targets + corrupt, "acted": [], "skipped": [], "missing": missing}
        if dry_run:
            return result
        now = self.link.now()
        acted: list[str] = []
        # Deletes, holds and bounces keep the manager away first (an attempt in flight
        # settles), then the journal or the removal; the others tell it afterwards.
        quiesced = action in ("delete", "hold", "bounce")
        try:
            for chunk_start in range(0, len(targets), 1000):
                chunk = targets[chunk_start : chunk_start + 1000]
                if quiesced:
                    self.link.quiesce(chunk)
                done: list[str] = []
                try:
                    if action in JOURNALED:
                        # One journal record each, made durable together (one syncfs).
                        records = JOURNALED[action](now, source)
                        gone = set(self.spool.append_states([(qid, records) for qid in chunk]))
                        for qid in chunk:
                            (result["skipped"] if qid in gone else done).append(qid)
                    for qid in chunk if action not in JOURNALED else ():
                        try:
                            ok = self._apply(action, qid, now, source)
                        except FileNotFoundError:
                            ok = False
                        (done if ok else result["skipped"]).append(qid)
                except BaseException:
                    # The disk said no: what was taken off the schedule and not acted on
                    # goes back to it (delivered, rather than forgotten until a restart).
                    if quiesced:
                        handled = set(done) | set(result["skipped"])
                        self.link.due_now([q for q in chunk if q not in handled])
                    raise
                finally:
                    acted.extend(done)
                    self._report(chunk_start + len(chunk), len(targets))
                if action in ("release", "flush", "requeue"):
                    self.link.due_now(done)
            for qid in corrupt:
                if self.spool.delete_corrupt(qid):
                    acted.append(qid)
        finally:
            if action in ("delete", "bounce"):
                self.spool.sync_dirs()
            self._log(action, acted, source, f.describe(), pending)
        result["acted"] = acted
        return result

    def _apply(self, action: str, qid: str, now: float, source: str) -> bool:
        if action == "delete":
            return self.spool.delete(qid)
        if action == "bounce":
            return self._bounce(qid, now, source)
        raise ValueError(action)

    def _bounce(self, qid: str, now: float, source: str) -> bool:
        """Return to sender: failure notice first (twice rather than never), then removal."""
        try:
            entry = self.spool.load(qid)
            content = self.spool.read_content(qid)
        except CorruptEntry as e:
            self.records.record(ev.Error(f"bounce: damaged queue file: {e}"), qid)
            return False
        pending = entry.pending_rcpts()
        results = []
        for r in pending:
            last = entry.state.last.get(r)
            # Our own words, not a remote host's: a LocalReply and no relay, so the notice
            # has no "host X said" and no Remote-MTA.
            text = f"{RETURNED} of {self.config.server.hostname}" + (
                f"; last reply: {last.reply}" if last and last.reply else "")
            results.append(RecipientResult(r, Status.BOUNCED, LocalReply(550, "5.0.0", text), "", "admin"))
        env = entry.envelope
        wanted = [r for r in results if env.wants_notice(r.rcpt, "FAILURE")]  # RFC 3461 NOTIFY
        if wanted and env.mail_from and not env.is_notice:
            notice_env, notice_content = self.notices.build(entry, content, wanted, "failed", now)
            notice_id = self.injector.inject_blocking(notice_env, notice_content, "failure notice")
            self.records.record(ev.NoticeQueued("failure", notice_id), qid)
        elif results and not (env.mail_from and not env.is_notice):
            self.records.record(ev.NoticeSkipped("failed"), qid)
        if len(wanted) < len(results) and env.mail_from and not env.is_notice:
            self.records.record(ev.NoticeSkipped("failed", "notify"), qid)
        for r in results:
            self.records.record(ev.Delivery(r.rcpt, ev.BOUNCED, "admin", "5.0.0", RETURNED, note=source), qid)
            self.records.history_status(qid, r.rcpt, f"Bounced: {RETURNED}")
        self.spool.delete(qid)
        return True

    def _log(self, action: str, ids: list[str], source: str, what: str,
             pending: dict[str, Any] | None = None) -> None:
        """Every change to the queue in the event log: what, how many, which ids, from where.
        pending: a deleted message's recipients not yet final, whose history rows get the
        status DELETED (docs/monitoring.md)."""
        shown = " ".join(ids[:EVENT_ID_LIMIT]) + (f" ... and {len(ids) - EVENT_ID_LIMIT} more" if len(ids) > EVENT_ID_LIMIT else "")
        self.records.record(ev.AdminAction(action, len(ids), source, what, shown))
        for qid in ids:
            self.records.record(ev.AdminChanged(action, source), qid)
            for rcpt in (pending or {}).get(qid, ()):
                self.records.history_status(qid, rcpt, f"{ev.DELETED} by administrator ({source})")

    # -- summary (qshape) --------------------------------------------------------------------

    def summary(self, filters: dict | Filters | None = None, by: str = "domain") -> dict:
        f = filters if isinstance(filters, Filters) else Filters.from_json(filters)
        if by not in ("domain", "sender"):
            raise ValueError("--by is domain or sender")
        now = self.link.now()
        rows: dict[str, list[int]] = defaultdict(lambda: [0] * (len(BUCKETS) + 1))
        total = [0] * (len(BUCKETS) + 1)  # messages (a row counts each message once per domain)
        states: Counter[str] = Counter()
        only = {f.domain.lower().rstrip(".")} if f.domain else None
        if self.spool.index is not None and not f.ids and not f.has_criteria and f.state != "corrupt":
            # The whole queue of a running node (a state at most): the index's entries
            # keep their domains ready; one pass, no entry built.
            active = self.link.active_ids()
            want = f.state
            for e in self.spool.index_walk():
                state = "hold" if e.hold else "active" if e.queue_id in active else "deferred"
                if want != "all" and want != state:
                    continue
                states[state] += 1
                col = bisect.bisect_left(BUCKETS, max(0.0, now - (e.received_at or now)) / 60)
                total[col] += 1
                if by == "sender":
                    rows[e.sender_domain()][col] += 1
                elif type(e.pending_domains) is str:
                    rows[e.pending_domains][col] += 1
                else:
                    for k in e.pending_domains:
                        rows[k][col] += 1
            return self._summary_result(by, rows, total, states)
        for entry, state in self.select(f):
            states[state] += 1
            age_min = max(0.0, now - (entry.received_at or now)) / 60
            col = bisect.bisect_left(BUCKETS, age_min)  # the first bucket it fits in; past the last: 1280m+
            total[col] += 1
            if by == "sender":
                rows[domain_of(entry.mail_from) if entry.mail_from else "<>"][col] += 1
                continue
            domains = {r[r.rfind("@") + 1:].lower() for r in entry.pending_rcpts()}  # domain_of, inlined
            for k in (domains & only if only is not None else domains):
                rows[k][col] += 1
        return self._summary_result(by, rows, total, states)

    @staticmethod
    def _summary_result(by: str, rows: dict[str, list[int]], total: list[int], states: Counter[str]) -> dict:
        ordered = sorted(rows.items(), key=lambda kv: (-sum(kv[1]), kv[0]))
        return {
            "by": by, "buckets": [f"{b}m" for b in BUCKETS] + [f"{BUCKETS[-1]}m+"],
            "total": {"count": sum(total), "counts": total},
            "rows": [{"key": k, "count": sum(v), "counts": v} for k, v in ordered],
            "states": dict(states),
        }

    # -- backup and restore -----------------------------------------------------------------

    def backup(self, path: str, filters: dict | Filters | None = None, source: str = "kanmon queue backup",
               then: str | None = None, origin_config: str | None = None) -> dict:
        """Write the matching messages to an archive; then (optionally) hold or delete them here.

        then="hold" | "delete" finishes a move without duplicates: each message is taken
        off the schedule (an attempt in flight settles first) before it is exported, so
        what is in the archive is exactly its state here; once the archive is complete,
        fsynced and renamed, exactly the messages written into it are held or deleted. If
        the archive cannot be written, nothing is held or deleted and every message goes
        back to its schedule. origin_config (the -c of the command) is recorded in the
        archive so that restore can print the command that finishes the move here. A queue
        file that fails its checksum when read is set aside to spool/corrupt/ (with the
        event, as the queue manager does) and left out; the rest is written.
        """
        if then not in THEN:
            raise ValueError(f"--then must be one of {', '.join(t for t in THEN if t)}")
        f = filters if isinstance(filters, Filters) else Filters.from_json(filters)
        target = Path(path)
        origin = {"path": str(target.resolve()), "then": then, "config": origin_config,
                  "identity": self.spool.identity(create=True)}
        writer = BackupWriter(target, self.config.server.hostname, f.describe(), self.link.now(), origin=origin)
        quiesced: list[str] = []
        set_aside: list[str] = []
        try:
            rows = [(e.queue_id, e, s) for e, s in self.select(f)]
            for start in range(0, len(rows), 1000):
                chunk = rows[start : start + 1000]
                if then:
                    ids = [qid for qid, _, _ in chunk]
                    self.link.quiesce(ids)
                    quiesced.extend(ids)
                for n, (qid, entry, state) in enumerate(chunk, start):
                    self._report(n, len(rows))
                    if then:  # reloaded after quiesce: an attempt that just ended changed it
                        entry = self._load(qid)
                        if entry is None:
                            continue
                    try:
                        writer.add(self.spool, qid, {
                            "from": entry.mail_from, "rcpts": entry.pending_rcpts(), "arrival": entry.received_at,
                            "size": entry.size, "state": state,
                        })
                    except CorruptEntry as e:
                        if self.spool.set_aside(qid, str(e)):
                            set_aside.append(qid)
            writer.finish()
        except BaseException:
            writer.abort()
            self.link.due_now(quiesced)  # back to their schedule: nothing was moved
            raise
        self.records.record(ev.Backup(len(writer.ids), str(target), source))
        # Damaged queue files are in none: those set aside now, and all spool/corrupt/ holds.
        result = {"path": str(target), "count": len(writer.ids), "ids": writer.ids, "then": then,
                  "set_aside": set_aside, "corrupt": len(self.spool.corrupt_ids())}
        if then:
            # Only what the archive holds, and only now that it is durable.
            done = set(writer.ids) | set(set_aside)  # the rest left the queue meanwhile
            self.link.due_now([q for q in quiesced if q not in done])
            acted = self.act(then, Filters(ids=list(writer.ids)), source=f"{source} --then {then}",
                             states=("deferred", "active", "hold"))
            result["acted"] = acted["acted"]
            result["skipped"] = acted["skipped"]
        return result

    def _ledger(self) -> Path:
        return self.spool.root / RESTORE_LEDGER

    def _restored_ids(self) -> set[str]:
        try:
            return set(self._ledger().read_text().split())
        except FileNotFoundError:
            return set()

    def restore(self, path: str, hold: bool = False, source: str = "kanmon queue restore", again: bool = False) -> dict:
        """Verify the whole archive, then put each message in the queue once.

        The queue id is the identity: a message already in the queue, or restored here
        before (the ledger spool/restored), is skipped; so restoring twice, or again after
        an interrupted restore, never duplicates. A message held in the archive (the admin
        held it there) stays held here; hold=True holds every one. again=True ignores the
        ledger: the admin brings back on purpose what left the queue since (a message
        still queued is skipped all the same); its ids go "before" in the result otherwise.
        """
        archive = Path(path)
        total = verify_archive(archive)
        done = set() if again else self._restored_ids()
        before: list[str] = []
        now = self.link.now()
        restored, skipped, on_hold = [], [], []
        for n, msg in enumerate(read_archive(archive)):
            self._report(n, total)
            qid = msg.queue_id
            if qid in done:
                skipped.append(qid)
                if not self.spool.exists(qid):
                    before.append(qid)  # restored (or seen queued) here before, and gone since
                continue
            state = msg.state_bytes
            if state and not state.endswith(b"\n"):
                state += b"\n"  # a torn last line in the source journal stays harmless
            held = hold or journal.QueueState.from_bytes(state).hold
            state += journal.encode([journal.Hold(now, held, source), journal.Schedule(now, 0.0)])
            created = self.spool.import_raw(qid, msg.queue_bytes, state)
            self._append_ledger(qid)
            if created:
                restored.append(qid)
                if held:
                    on_hold.append(qid)
                env, size = self.spool.read_envelope(qid)
                self.records.record(ev.Accepted(env.mail_from, size, len(env.rcpts), "restore", held=held), qid)
                if not held:
                    self.link.due_now([qid])
            else:
                skipped.append(qid)
        self._log("restore", restored, source, f"archive {archive} ({total} in it)")
        head = archive_head(archive)
        return {"path": str(archive), "in_archive": total, "restored": restored, "skipped": skipped, "held": hold,
                "on_hold": on_hold, "before": before,
                **finish_move(head, archive, total, self.config.server.hostname, self.spool.identity())}

    def finish_check(self, path: str) -> dict:
        """The finish step of a move, on the node an archive came from: which of its
        messages are still queued here (deleting them finishes the move: what `kanmon
        queue delete --ids-from ARCHIVE` deletes). The archive is verified whole first.

        Refused (ValueError) where the archive was not written: by the spool identity it
        records (or, in an archive without one, its hostname); and on a node that restored
        any of its messages (the node the mail moved to: deleting them would lose it).
        """
        archive = Path(path)
        ids = [m.queue_id for m in read_archive(archive)]
        head = archive_head(archive)
        origin = head.get("origin") if isinstance(head.get("origin"), dict) else {}
        node = for_log(str(head.get("hostname") or "another node")[:255])
        restored = self._restored_ids().intersection(ids)
        if restored:
            raise ValueError(f"{len(restored)} of its messages were restored here: this is the node the queue "
                             f"moved to, not the one it came from ({node}); nothing deleted")
        theirs = origin.get("identity")
        if (theirs != self.spool.identity()) if theirs else (head.get("hostname") != self.config.server.hostname):
            raise ValueError(f"this archive was written by the queue of {node}, not by this node's: "
                             "finish the move on the node it came from")
        rows = list(self.select(Filters(ids=ids, state="all"))) if ids else []
        return {"path": str(archive), "in_archive": len(ids), "origin": node, "then": origin.get("then"),
                "ids": [e.queue_id for e, _ in rows], "held": sum(1 for _, st in rows if st == "hold")}

    def _append_ledger(self, qid: str) -> None:
        write_durably(self._ledger(), qid.encode() + b"\n", append=True, sync=self.spool.fsync)

    # -- drain --------------------------------------------------------------------------------

    def drain(self, host: str, port: int, filters: dict | Filters | None = None, tls: str = "opportunistic",
              source: str = "kanmon queue drain", *, dry_run: bool = False, whole_queue: bool = False) -> dict:
        """Deliver each matching message to host:port; remove it only after 250 for every
        pending recipient. Recipients the new relay refuses stay here, as they were.

        Like delete and bounce, it needs ids or filters; whole_queue (`--all`) means every
        message not on hold. dry_run: the ids that would move, nothing changed.
        """
        from kanmon.deliver.mx import NextHop  # noqa: PLC0415
        from kanmon.deliver.smtp import SmtpDelivery  # noqa: PLC0415

        f = filters if isinstance(filters, Filters) else Filters.from_json(filters)
        if f.empty and f.state == "all" and not whole_queue:
            raise ValueError("drain needs queue ids, filters or --all (the whole queue)")
        hop = NextHop.from_endpoint((host, port))
        targets = [e.queue_id for e, s in self.select(f) if s != "hold" or f.ids]
        if dry_run:
            return {"to": f"{host}:{port}", "dry_run": True, "matched": len(targets), "ids": targets,
                    "drained": [], "kept": []}

        async def make_agent():
            return SmtpDelivery(self.config, self.records.record, idle_timeout=30.0)

        agent = self.link.run_async(make_agent())
        drained, kept = [], []
        try:
            for qid in targets:
                self.link.quiesce([qid])
                entry = self._load(qid)
                if entry is None:
                    continue
                try:
                    content = self.spool.read_content(qid)
                    pending = entry.pending_rcpts()
                    results = self.link.run_async(agent.deliver(
                        qid, entry.envelope.mail_from, pending, content, [hop], tls, smtputf8=entry.envelope.smtputf8))
                except BaseException as e:
                    if not entry.state.hold:  # back to its schedule, not forgotten until a restart
                        self.link.reschedule(qid, max(self.link.now(), entry.state.next_attempt))
                    if isinstance(e, (FileNotFoundError, CorruptEntry)):
                        continue  # gone meanwhile, or damaged (recovery moves it aside)
                    raise
                now = self.link.now()
                sent = [r for r in results if r.status is Status.SENT]
                for r in results:
                    self.records.record(ev.Delivery(
                        r.rcpt, ev.SENT if r.status is Status.SENT else ev.NOT_DRAINED, "drain", reply=str(r.reply),
                        relay=r.relay or f"{host}:{port}"), qid)
                if len(sent) == len(pending):
                    self.spool.delete(qid)
                    drained.append(qid)
                    for r in sent:
                        self.records.history_status(qid, r.rcpt, f"Drained to {host}:{port}")
                    continue
                if sent:
                    self.spool.append_state(qid, [
                        journal.Result(now, r.rcpt, "sent", str(r.reply), r.relay, "drain", r.tls) for r in sent])
                kept.append({"id": qid, "replies": {r.rcpt: str(r.reply) for r in results if r.status is not Status.SENT}})
                if not entry.state.hold:
                    self.link.reschedule(qid, max(now, entry.state.next_attempt))
        finally:
            self.link.run_async(agent.close())
            self.spool.sync_dirs()
        self._log("drain", drained, source, f"{f.describe()} to {host}:{port}")
        return {"to": f"{host}:{port}", "drained": drained, "kept": kept}

    # -- maintenance jobs ----------------------------------------------------------------------

    def maintenance_jobs(self) -> list[tuple[str, MaintenanceJob]]:
        return [(job.name or f"job{i + 1}", job) for i, job in enumerate(self.config.maintenance)]

    def find_job(self, key: str) -> tuple[str, MaintenanceJob]:
        jobs = self.maintenance_jobs()
        for name, job in jobs:
            if name == key:
                return name, job
        if key.isdigit() and 1 <= int(key) <= len(jobs):
            return jobs[int(key) - 1]
        raise LookupError(f"no maintenance job {key!r} (names: {', '.join(n for n, _ in jobs) or 'none configured'})")

    def run_log(self) -> RunLog:
        """<data_dir>/maintenance.json, loaded once (a refused file is moved aside and logged)."""
        if self._run_log is None:
            self._run_log = RunLog(self.spool.root.parent, fsync=self.spool.fsync)
            if self._run_log.refused:
                self.records.record(ev.Error(f"maintenance: {self._run_log.path} refused and moved aside "
                                             f"({self._run_log.refused}); last runs start afresh"))
        return self._run_log

    def maintenance_list(self) -> dict:
        now = self.link.now()
        log = self.run_log()
        out = []
        for i, (name, job) in enumerate(self.maintenance_jobs()):
            last = log.last(name)
            out.append({
                "index": i + 1, "name": name, "schedule": job.schedule, "action": job.action, "state": job.state,
                "filters": job.criteria(), "older_than": job.older_than, "reason": job.reason,
                "catch_up": job.catch_up, "next_run": CronSchedule.parse(job.schedule).next_after(now),
                "last_run": asdict(last) if last else None, "last_run_text": describe_run(last),
                # a scheduled time that passed without a run (the node was down, or is late)
                "missed": missed(job.schedule, last, log.since.get(name), now),
            })
        return {"jobs": out, "now": now}

    def maintenance_status(self) -> list[str]:
        """One line per job for a status display (the console's): name, last run, next run."""
        return [f"{j['name']}: {j['last_run_text']}; next run {time.strftime('%Y-%m-%d %H:%M', time.localtime(j['next_run']))}"
                for j in self.maintenance_list()["jobs"]]

    def maintenance_run(self, key: str, dry_run: bool = False, source: str | None = None, by: str = "") -> dict:
        """Run one job now. A real run (not dry_run) is written to the run log, failed or
        not; a failure is raised again after that."""
        name, job = self.find_job(key)
        # "deferred" includes messages in the middle of an attempt at that moment: act()
        # waits for the attempt to settle, then acts (a job must not miss them by chance).
        f = Filters.from_job(job)
        states = {"deferred": ("deferred", "active"), "hold": ("hold",), "all": ("deferred", "active", "hold")}[job.state]
        src = source or f"maintenance {name}"
        started = self.link.now()
        clock = time.monotonic()
        try:
            result = self.act(job.action, f, dry_run=dry_run, source=src, states=states, whole_queue=True)
        except Exception as e:
            if not dry_run:
                error = f"{type(e).__name__}: {e}" if not isinstance(e, OSError) else (e.strerror or str(e))
                self._record_run(name, JobRun(started, time.monotonic() - clock, job.action, 0, 0, error or "failed",
                                              by or src))
            raise
        result["job"] = name
        if not dry_run:
            self.records.record(ev.MaintenanceRun(name, job.action, result["matched"], len(result["acted"]),
                                                  list(result["acted"][:EVENT_ID_LIMIT])))
            self._record_run(name, JobRun(started, time.monotonic() - clock, job.action, result["matched"],
                                          len(result["acted"]), "", by or src))
        return result

    def _record_run(self, name: str, run: JobRun) -> None:
        try:
            self.run_log().record(name, run, [n for n, _ in self.maintenance_jobs()])
        except OSError as e:  # the run happened; only its record is lost
            self.records.record(ev.Error(f"maintenance {name}: cannot write {FILE_HINT}: {e.strerror or e}"))

    def maintenance_keep_schedules(self, now: float) -> list[tuple[str, float]]:
        """At the server's start: note that it keeps the jobs' schedules from now, and
        return (job, first missed time) for each catch_up job that missed a run."""
        log = self.run_log()
        jobs = self.maintenance_jobs()
        due = []
        for name, job in jobs:
            if job.catch_up:
                t = missed(job.schedule, log.last(name), log.since.get(name), now)
                if t is not None:
                    due.append((name, t))
        try:
            log.keep_since([n for n, _ in jobs], now)
        except OSError as e:
            self.records.record(ev.Error(f"maintenance: cannot write {FILE_HINT}: {e.strerror or e}"))
        return due


OPERATIONS = {
    # name over the control socket -> how to call QueueOps with the request's args
    "list": lambda ops, a, stream=False: ops.list(a.get("filters"), int(a.get("offset") or 0),
                                                  None if a.get("limit") is None else int(a["limit"]), stream=stream),
    "show": lambda ops, a: ops.show(a["id"], int(a.get("lines", 50))),
    "act": lambda ops, a: ops.act(a["action"], a.get("filters") or {}, dry_run=bool(a.get("dry_run")),
                                  source=str(a.get("source", "kanmon queue")), whole_queue=bool(a.get("whole_queue"))),
    "summary": lambda ops, a: ops.summary(a.get("filters"), a.get("by", "domain")),
    "backup": lambda ops, a: ops.backup(a["path"], a.get("filters"), str(a.get("source", "kanmon queue backup")),
                                        then=a.get("then"), origin_config=a.get("origin_config")),
    "restore": lambda ops, a: ops.restore(a["path"], bool(a.get("hold")), str(a.get("source", "kanmon queue restore")),
                                          again=bool(a.get("again"))),
    "finish_check": lambda ops, a: ops.finish_check(a["path"]),
    "drain": lambda ops, a: ops.drain(a["host"], int(a["port"]), a.get("filters"), a.get("tls", "opportunistic"),
                                      str(a.get("source", "kanmon queue drain")), dry_run=bool(a.get("dry_run")),
                                      whole_queue=bool(a.get("whole_queue"))),
    "maintenance_list": lambda ops, a: ops.maintenance_list(),
    "quarantine_list": lambda ops, a: QuarantineOps(ops).list(a.get("filters")),
    "quarantine_show": lambda ops, a: QuarantineOps(ops).show(str(a["id"]), int(a.get("lines", 50))),
    "quarantine_release": lambda ops, a: QuarantineOps(ops).release(
        [str(i) for i in a["ids"]], [str(t) for t in a["to"]] if a.get("to") else None, str(a.get("by", "kanmon quarantine release"))),
    "quarantine_release_for": lambda ops, a: QuarantineOps(ops).release_for(str(a["id"]), str(a["rcpt"]), str(a["by"])),
    "quarantine_delete_for": lambda ops, a: QuarantineOps(ops).delete_for(str(a["id"]), str(a["rcpt"]), str(a["by"])),
    "quarantine_delete": lambda ops, a: QuarantineOps(ops).delete([str(i) for i in a["ids"]], str(a.get("by", "kanmon quarantine delete"))),
    "quarantine_purge": lambda ops, a: QuarantineOps(ops).purge(float(a["keep"]), str(a.get("by", "retention"))),
    "quarantine_digest": lambda ops, a: QuarantineOps(ops).digest(
        float(a["since"]) if "since" in a else ops.link.now() - float(a.get("since_ago", 86400)), bool(a.get("dry_run")),
        float(a["slot"]) if a.get("slot") is not None else None),
    "maintenance_run": lambda ops, a: ops.maintenance_run(str(a["job"]), bool(a.get("dry_run")), by=str(a.get("by", ""))),
}


def dispatch(ops: QueueOps, request: dict, progress: Callable[[int, int | None], None] | None = None, *,
             stream: bool = False) -> dict:
    """One control-socket request -> {"ok": true, "result": ..} or {"ok": false, "error": ..}.

    progress, if given, is called as long operations advance (done, total or None).
    stream: the caller writes a kanmon.control.Streamed list (a long `list`) as it builds it.
    """
    name = request.get("op")
    args = request.get("args") or {}
    if name not in OPERATIONS or not isinstance(args, dict):
        return {"ok": False, "error": f"unknown operation {name!r}"}
    ops.progress = progress
    try:
        if stream and name == "list":
            return {"ok": True, "result": OPERATIONS[name](ops, args, stream=True)}
        return {"ok": True, "result": OPERATIONS[name](ops, args)}
    except (ValueError, LookupError, KeyError, TypeError, OSError, BackupError, SpoolError, QuarantineError, CorruptEntry) as e:
        return {"ok": False, "error": str(e) or type(e).__name__}
    except Exception as e:  # noqa: BLE001 - an answer and an event, never a dead connection
        ops.records.record(ev.Error(f"admin: {name} failed: {type(e).__name__}: {e}"))
        return {"ok": False, "error": f"internal error: {type(e).__name__}: {e}"}
    finally:
        ops.progress = None
