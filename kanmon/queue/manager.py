"""The queue manager: what is due, where it goes, how many at once; retries and notices.

Role: takes messages the spool made durable (new ones at once, recovered ones by their
persisted schedule), routes each pending recipient, hands groups to the delivery agents,
and carries out what kanmon.queue.plan decides follows each attempt: the journal records
first, then the delivery lines, the delay or failure notices (RFC 3464, through the
injector), and the next retry or the removal from the spool. The envelope travels whole
to the delivery agents (its SMTPUTF8 flag included). With [server] delivery_workers the
deliveries run in agent processes (kanmon.agent, behind `agents`): this process then
reads only envelopes and journals, and the agents' results are planned and journaled
here exactly like in-process ones.

Memory: the in-memory active set (messages with envelope loaded) is bounded by
[queue] max_active; deferred messages wait as (due time, id) pairs only.

Trusts: the spool's entries. Never: remove a message whose recipients are not all final;
send a notice about a message from <> or about a notice (DESIGN.md promise 5); let an
exception in one delivery stop the others (it becomes 451 4.3.0 and an event).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import random
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

from kanmon.auth.dkimkeys import DkimKeyError
from kanmon.auth.dkimsign import load_signer
from kanmon.clock import SystemClock
from kanmon.config import Config
from kanmon.deliver.local import LocalDelivery
from kanmon.model import Envelope, RecipientResult, Reply, Status, checked_body, describe_reply
from kanmon.queue.inject import Injector
from kanmon.queue.plan import DELAYED, DELIVERED, FAILED, RELAYED, NoticeRequest, Settings, attempt_now, plan_attempt
from kanmon.records.events import BOUNCED, DEFERRED, SENT, Delivery, Error, NoticeQueued, NoticeSkipped, Removed
from kanmon.records.store import Records
from kanmon.routing import Route, Router
from kanmon.spool.journal import QueueState
from kanmon.spool.store import CorruptEntry, NotCached, Spool, SpoolEntry

INTERNAL_ERROR = Reply(451, "4.3.0", "internal error in delivery; will retry")
NO_REMOTE_AGENT = Reply(451, "4.3.0", "no delivery agent for remote destinations")
LIFETIME_EXPIRED = "message expired in the queue"
# The notice kinds of the event log (`sender failure notification: <id>`) by RFC 3464 action.
NOTICE_KIND = {FAILED: "failure", DELAYED: "delay", DELIVERED: "success", RELAYED: "success"}

# remote(queue_id, envelope, rcpts, content, route): the SMTP agent (SmtpDelivery.deliver_route).
RemoteDeliver = Callable[[str, Envelope, list[str], bytes, Route], Awaitable[list[RecipientResult]]]


class DeliveryAgents(Protocol):
    """Delivery agent processes ([server] delivery_workers, kanmon.agent.AgentPool): an
    agent opens the queue file itself and delivers `rcpts` by `route`. deliver() raises
    FileNotFoundError when the message is gone (deleted meanwhile) and CorruptEntry when
    its queue file fails its checks (the queue manager sets it aside)."""

    async def deliver(self, queue_id: str, rcpts: list[str], route: Route) -> list[RecipientResult]: ...


@dataclass(order=True, slots=True)
class _Due:
    at: float
    seq: int
    queue_id: str = field(compare=False)


class _DestinationSlot:
    """`async with`: one of a destination's [outbound] max_per_destination places. The
    destination's entry (semaphore, users) lives only while someone holds or waits for
    a place. A class rather than an asynccontextmanager: entered for every delivery."""

    __slots__ = ("_limits", "_key", "_size", "_sem")

    def __init__(self, limits: dict[str, tuple[asyncio.Semaphore, int]], key: str, size: int):
        self._limits = limits
        self._key = key
        self._size = size
        self._sem: asyncio.Semaphore | None = None

    async def __aenter__(self) -> None:
        sem, users = self._limits.get(self._key) or (asyncio.Semaphore(self._size), 0)
        self._limits[self._key] = (sem, users + 1)
        try:
            await sem.acquire()
        except BaseException:
            self._leave()
            raise
        self._sem = sem

    async def __aexit__(self, *exc: object) -> None:
        assert self._sem is not None
        self._sem.release()
        self._leave()

    def _leave(self) -> None:
        sem, users = self._limits[self._key]
        if users <= 1:
            del self._limits[self._key]
        else:
            self._limits[self._key] = (sem, users - 1)


class QueueManager:
    def __init__(
        self,
        config: Config,
        spool: Spool,
        records: Records,
        local: LocalDelivery,
        remote: RemoteDeliver | None = None,
        *,
        clock=None,
        notices=None,
        workers: int = 32,
    ):
        self.config = config
        self.spool = spool
        self.records = records
        self.local = local
        self.remote = remote
        # Delivery agent processes; None: this process delivers (local and remote above).
        self.agents: DeliveryAgents | None = None
        self.clock = clock or SystemClock()
        self.notices = notices  # kanmon.queue.notices.Notices, or None: no DSNs
        # The way into the queue for mail written in this process (notices, alerts, quota notices).
        self.injector = Injector(spool, records, self.submit_nowait, hostname=config.server.hostname, clock=self.clock,
                                 signer=load_signer(config))
        self.router = Router(config)
        self.workers = workers
        self._rng = random.Random()
        self._settings = Settings.from_config(config.queue)  # retry, warn_after, lifetime
        self._heap: list[_Due] = []
        self._seq = itertools.count()
        self._ready: asyncio.Queue[tuple[str, tuple[SpoolEntry, bytes] | None]] = asyncio.Queue()
        self._in_memory: set[str] = set()  # queued in _ready or being delivered
        self._scheduled: dict[str, float] = {}  # id -> due time in the heap (latest wins)
        self._leaving: dict[str, list[asyncio.Future[None]]] = {}  # admin waits for an active id
        self._wake = asyncio.Event()
        # Per-destination concurrency ([outbound] max_per_destination); an entry lives only
        # while deliveries to that destination are in flight (no growth per MX domain).
        self._dest_limits: dict[str, tuple[asyncio.Semaphore, int]] = {}
        self.idle = asyncio.Event()  # set when nothing is in memory (tests wait on it)
        self.idle.set()
        self.delivered = 0
        # Metrics hook (kanmon.metrics): on_attempt(route, results, seconds) after each remote attempt.
        self.on_attempt: Callable[[Route, list[RecipientResult], float], None] | None = None
        # Spool reads, journal appends and removals block on the disk: a pool of their own.
        self._io = ThreadPoolExecutor(max_workers=32, thread_name_prefix="queue-io")

    def close(self) -> None:
        self._io.shutdown(wait=True)

    def reconfigure(self, config: Config, remote: RemoteDeliver | None, notices=None) -> None:
        """A reload: routes, retry settings, limits and notices of the new config apply to
        the next attempt; the queue in memory and deliveries in flight stay."""
        self.config = config
        self.router = Router(config)
        self._settings = Settings.from_config(config.queue)
        with contextlib.suppress(DkimKeyError):  # the listeners loaded the same keys just before
            self.injector.signer = load_signer(config)
        self.remote = remote
        self.notices = notices
        self._wake.set()

    # -- input ----------------------------------------------------------------------------

    def submit_nowait(self, queue_id: str, envelope: Envelope | None = None, content: bytes | None = None) -> None:
        """A message was just stored: deliver it now (envelope and content kept: no re-read)."""
        if len(self._in_memory) >= self.config.queue.max_active or self.config.queue.suspend_delivery:
            self.schedule(queue_id, self.clock.now())
            return
        if queue_id in self._in_memory:
            return
        self._in_memory.add(queue_id)
        self.idle.clear()
        fresh = None
        if envelope is not None and content is not None:
            fresh = (SpoolEntry(queue_id, envelope, len(content), QueueState()), content)
        self._ready.put_nowait((queue_id, fresh))

    def schedule(self, queue_id: str, at: float) -> None:
        self._scheduled[queue_id] = at
        heapq.heappush(self._heap, _Due(at, next(self._seq), queue_id))
        self._wake.set()

    def load_recovered(self, entries: list[SpoolEntry]) -> None:
        """After a restart: each message at its persisted next attempt (not all at once)."""
        for e in entries:
            self.schedule_recovered(e.queue_id, e.state.hold, e.state.next_attempt)

    def schedule_recovered(self, queue_id: str, hold: bool, next_attempt: float) -> None:
        """load_recovered() for one message, from what the queue index keeps of it."""
        if hold:
            return
        now = self.clock.now()
        self.schedule(queue_id, max(next_attempt, now) if next_attempt else now)

    def flush_nowait(self, queue_ids: list[str] | None = None) -> int:
        """Make scheduled messages due now (all, or the given ids)."""
        now = self.clock.now()
        targets = list(self._scheduled) if queue_ids is None else [q for q in queue_ids if q in self._scheduled]
        for qid in targets:
            self.schedule(qid, now)
        return len(targets)

    # -- admin operations (kanmon.admin.queue_ops through the control socket) ----------------

    def is_active(self, queue_id: str) -> bool:
        """Loaded in memory: waiting for a worker or being delivered right now."""
        return queue_id in self._in_memory

    def active_ids(self) -> set[str]:
        return set(self._in_memory)

    async def wait_inactive(self, queue_id: str) -> None:
        """Until the message's current attempt has settled (its results are journaled)."""
        if queue_id not in self._in_memory:
            return
        fut = asyncio.get_running_loop().create_future()
        self._leaving.setdefault(queue_id, []).append(fut)
        await fut

    def unschedule(self, queue_id: str) -> bool:
        """Forget a scheduled message (held or deleted by the admin); its stale heap entry is skipped."""
        return self._scheduled.pop(queue_id, None) is not None

    def due_now(self, queue_ids: list[str]) -> None:
        """Released, flushed, requeued or restored: deliver these now, scheduled or not."""
        now = self.clock.now()
        for qid in queue_ids:
            if qid not in self._in_memory:
                self.schedule(qid, now)

    # -- running ---------------------------------------------------------------------------

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._scheduler())
            for _ in range(self.workers):
                tg.create_task(self._worker())

    async def _scheduler(self) -> None:
        while True:
            if self.config.queue.suspend_delivery:
                await asyncio.Event().wait()  # [queue] suspend_delivery: nothing leaves
            now = self.clock.now()
            while self._heap and self._heap[0].at <= now and len(self._in_memory) < self.config.queue.max_active:
                due = heapq.heappop(self._heap)
                if self._scheduled.get(due.queue_id) != due.at:
                    continue  # superseded by a later schedule() for the same id
                del self._scheduled[due.queue_id]
                if due.queue_id in self._in_memory:
                    continue
                self._in_memory.add(due.queue_id)
                self.idle.clear()
                self._ready.put_nowait((due.queue_id, None))
            self._wake.clear()
            if self._heap and len(self._in_memory) < self.config.queue.max_active:
                sleeper = asyncio.ensure_future(self.clock.sleep_until(self._heap[0].at))
                waker = asyncio.ensure_future(self._wake.wait())
                try:
                    await asyncio.wait({sleeper, waker}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    sleeper.cancel()
                    waker.cancel()
            else:
                await self._wake.wait()

    async def _worker(self) -> None:
        while True:
            queue_id, fresh = await self._ready.get()
            try:
                await self._process(queue_id, fresh)
            except Exception as e:  # noqa: BLE001 - one message never stops the queue
                self.records.record(Error(f"queue manager error: {type(e).__name__}: {e}; will retry"), queue_id)
                self.schedule(queue_id, self.clock.now() + self.config.queue.retry_bounds[0])
            finally:
                self._in_memory.discard(queue_id)
                for fut in self._leaving.pop(queue_id, ()):
                    if not fut.done():
                        fut.set_result(None)
                if not self._in_memory:
                    self.idle.set()
                self._wake.set()

    # -- one message -------------------------------------------------------------------------

    async def _process(self, queue_id: str, fresh: tuple[SpoolEntry, bytes] | None) -> None:
        loop = asyncio.get_running_loop()
        content: bytes | None
        if fresh is not None:
            entry, content = fresh  # just accepted: nothing on disk to read back
        elif self.agents is not None:
            # The agents read the content themselves: here only the envelope and journal,
            # small reads (page cache) done on the loop: a thread hand-off costs more.
            try:
                entry = self.spool.load(queue_id)
            except FileNotFoundError:
                return  # deleted meanwhile (admin action)
            except CorruptEntry:
                return  # set aside to corrupt/ by the spool, with its event: never retried
            content = None
        else:
            try:
                try:
                    entry, content = self.spool.load_with_content_cached(queue_id)  # no thread hand-off
                except NotCached:
                    entry, content = await loop.run_in_executor(self._io, self.spool.load_with_content, queue_id)
            except FileNotFoundError:
                return  # deleted meanwhile (admin action)
            except CorruptEntry:
                return  # set aside to corrupt/ by the spool, with its event: never retried
        if not attempt_now(entry.state):
            return
        env = entry.envelope
        pending = entry.pending_rcpts()
        start = self.clock.now()
        groups: dict[Route, list[str]] = defaultdict(list)
        for rcpt in pending:
            groups[self.router.route(rcpt)].append(rcpt)
        results: list[RecipientResult] = []
        outcomes: list[list[RecipientResult] | BaseException]
        if len(groups) == 1:
            # One destination (the common case): awaited here, as gather(return_exceptions=True)
            # would report it, without a task of its own.
            ((route, rcpts),) = groups.items()
            try:
                outcomes = [await self._deliver_group(queue_id, env, rcpts, content, route)]
            except asyncio.CancelledError as e:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise  # this worker is being cancelled (the node stops)
                outcomes = [e]
            except Exception as e:  # noqa: BLE001 - reported below, as for several groups
                outcomes = [e]
        else:
            outcomes = await asyncio.gather(
                *(self._deliver_group(queue_id, env, rcpts, content, route) for route, rcpts in groups.items()),
                return_exceptions=True,
            )
        for outcome in outcomes:
            if isinstance(outcome, FileNotFoundError):
                return  # an agent found it deleted meanwhile (admin action): nothing to settle
            if isinstance(outcome, CorruptEntry):
                await loop.run_in_executor(self._io, self.spool.set_aside, queue_id, str(outcome))
                return  # never retried; the spool's on_corrupt writes its event
        for (route, rcpts), outcome in zip(groups.items(), outcomes, strict=True):
            if isinstance(outcome, BaseException):
                self.records.record(Error(f"delivery agent error: {type(outcome).__name__}: {outcome}"), queue_id)
                results.extend(RecipientResult(r, Status.DEFERRED, INTERNAL_ERROR, mailer=route.transport) for r in rcpts)
            else:
                results.extend(outcome)
        now = self.clock.now()
        await self._settle(entry, content, results, start, now)

    async def _deliver_group(
        self, queue_id: str, env: Envelope, rcpts: list[str], content: bytes | None, route: Route
    ) -> list[RecipientResult]:
        agents = self.agents
        if route.transport == "local":
            if agents is not None:
                return await agents.deliver(queue_id, rcpts, route)
            assert content is not None
            return await self.local.deliver(env.mail_from, rcpts, content, quota_exempt=env.is_notice,
                                          queue_id=queue_id)
        if self.remote is None:
            return [RecipientResult(r, Status.DEFERRED, NO_REMOTE_AGENT, mailer="esmtp") for r in rcpts]
        if agents is None and content is not None:
            content = checked_body(env, content)  # checked at DATA: the client need not scan it again
        async with self._destination_slot(route.key):
            started = time.monotonic()
            if agents is not None:
                results = await agents.deliver(queue_id, rcpts, route)
            else:
                assert content is not None
                results = await self.remote(queue_id, env, rcpts, content, route)
            if self.on_attempt is not None:
                self.on_attempt(route, results, time.monotonic() - started)
            return results

    def _destination_slot(self, key: str) -> _DestinationSlot:
        return _DestinationSlot(self._dest_limits, key, self.config.outbound.max_per_destination)

    async def _settle(
        self, entry: SpoolEntry, content: bytes | None, results: list[RecipientResult], start: float, now: float
    ) -> None:
        """Carry out the plan (kanmon.queue.plan): journal, log lines, notices, then retry or removal."""
        loop = asyncio.get_running_loop()
        env = entry.envelope
        qid = entry.queue_id
        plan = plan_attempt(env, entry.state, results, self._settings, now, self._rng,
                            notices=self.notices is not None)
        if plan.journal:
            await loop.run_in_executor(self._io, self.spool.append_state, qid, list(plan.journal))
        for r in plan.results:
            self._log_result(qid, env, r, start, now, plan.expired)
        for action in plan.no_notice:
            self.records.record(NoticeSkipped(action), qid)
        for action in plan.not_requested:
            self.records.record(NoticeSkipped(action, "notify"), qid)
        if plan.notices and content is None:  # delivered by an agent: read only when a notice needs it
            try:
                content = await loop.run_in_executor(self._io, self.spool.read_content, qid)
            except (OSError, CorruptEntry) as e:
                self.records.record(Error(f"cannot read the message for its notices: {e}"), qid)
                content = b""
        for notice in plan.notices:
            assert content is not None
            await self._notify(entry, content, notice, now)
        if plan.retry_at is not None:
            self.schedule(qid, plan.retry_at)
        if not plan.remove:
            return
        await loop.run_in_executor(self._io, self.spool.remove, qid)
        self.delivered += 1
        self.records.record(Removed(), qid)

    def _log_result(
        self, qid: str, env: Envelope, r: RecipientResult, start: float, now: float, expired: bool = False
    ) -> None:
        """The delivery event (line: to=<..>, delay=.., mailer=.., dsn=.., stat=..)."""
        enhanced = r.reply.enhanced or ("2.0.0" if r.reply.code < 400 else "4.0.0" if r.reply.code < 500 else "5.0.0")
        if r.status is Status.BOUNCED and enhanced.startswith("4"):
            enhanced = "5" + enhanced[1:]
        text = describe_reply(r.reply)
        status = SENT if r.status is Status.SENT else DEFERRED if r.status is Status.DEFERRED else BOUNCED
        note = LIFETIME_EXPIRED if status == BOUNCED and expired and self.config.queue.lifetime else ""
        self.records.record(Delivery(
            r.rcpt, status, r.mailer or "local", enhanced, text, r.relay or "", env.original_rcpts.get(r.rcpt) or "",
            now - (env.received_at or now), now - start, note, r.tls or "",
        ), qid)
        if r.status is Status.SENT:
            self.records.history_status(qid, r.rcpt, "Delivered")
        elif r.status is Status.BOUNCED:
            self.records.history_status(qid, r.rcpt, f"Bounced: {text}")
        else:
            self.records.history_status(qid, r.rcpt, f"Deferred: {text}")

    async def _notify(self, entry: SpoolEntry, content: bytes, notice: NoticeRequest, now: float) -> None:
        """A delay, failure or success notice to the sender, through the injector (RFC 3464)."""
        assert self.notices is not None
        kind = NOTICE_KIND[notice.action]
        notice_env, notice_content = self.notices.build(entry, content, list(notice.results), notice.action, now)
        try:
            notice_id = await self.injector.inject(notice_env, notice_content, f"{kind} notice")
        except Exception as e:  # noqa: BLE001 - the original's results are journaled; it goes on
            self.records.record(Error(f"cannot queue {notice.action} notice: {e}"), entry.queue_id)
            return
        self.records.record(NoticeQueued(kind, notice_id), entry.queue_id)
