"""The admin plane inside `kanmon serve`: data_dir lock, control socket, [[maintenance]].

Role: built by kanmon.node. At construction it takes <data_dir>/kanmon.lock (before
spool recovery, so an offline admin command is never half-way through the spool when the
server starts; it waits up to LOCK_WAIT for one to finish, or for a server stopping for a
restart, and says so on stderr as the wait begins), or keeps the one `kanmon serve` took
before its event loop (kanmon.node.run_node). start() opens the control
socket (kanmon.control); each request runs kanmon.admin.queue_ops in one worker thread
(so a scan of 100,000 messages never stalls the event loop, and operations never
overlap); NodeLink lets that thread reach the queue manager in the event loop.
run_maintenance() fires the configured jobs on the node's clock, makes up a run missed
while the node was down for the jobs with `catch_up` (kanmon.admin.maintenance), and
raises the `queue` alert when a run fails (cleared by the next run that succeeds).

Trusts: the node's objects; requests only as kanmon.admin.queue_ops validates them.
Never: touch queue-manager state from the worker thread directly (always through the
event loop), or run a maintenance job that is not in the validated config.
"""

from __future__ import annotations

import asyncio
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

from kanmon.admin import lastdigest
from kanmon.admin.queue_ops import QueueOps, dispatch
from kanmon.admin.status import config_digest, node_status
from kanmon.control import ControlServer, DataDirLock
from kanmon.cron import CronSchedule
from kanmon.escape import for_log
from kanmon.records.events import Error, MaintenanceRun

LOCK_WAIT = 30.0  # seconds a starting server waits for an offline admin command
CALL_TIMEOUT = 3600.0


class NodeLink:
    """kanmon.admin.queue_ops.ManagerLink for a running node, called from a worker thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue, clock):
        self.loop = loop
        self.queue = queue
        self.clock = clock

    def _call(self, fn, *args) -> Any:
        async def run():
            return fn(*args)

        return self.run_async(run())

    def run_async(self, coro) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(CALL_TIMEOUT)

    def now(self) -> float:
        return self.clock.now()

    def active_ids(self) -> set[str]:
        return self._call(self.queue.active_ids)

    def quiesce(self, queue_ids: list[str]) -> None:
        async def run():
            for qid in queue_ids:
                while True:
                    self.queue.unschedule(qid)
                    if not self.queue.is_active(qid):
                        break
                    await self.queue.wait_inactive(qid)

        self.run_async(run())

    def due_now(self, queue_ids: list[str]) -> None:
        if queue_ids:
            self._call(self.queue.due_now, list(queue_ids))

    def reschedule(self, queue_id: str, at: float) -> None:
        self._call(self.queue.schedule, queue_id, at)

    def submit(self, queue_id: str) -> None:
        self._call(self.queue.submit_nowait, queue_id)


def balance_set_request(balancer, args: dict) -> dict:
    """The control socket's "balance_set": {"virtual", "real", "mode", "by"} -> the real server's status."""
    if balancer is None:
        return {"ok": False, "error": "this node runs no balancer (no [balancer] section)"}
    fields = [args.get(k) for k in ("virtual", "real", "mode")]
    if not all(isinstance(f, str) and f for f in fields) or not isinstance(args.get("by", ""), str):
        return {"ok": False, "error": "balance_set needs virtual, real and mode (strings)"}
    by = for_log(args.get("by") or "an administrator")[:200]
    try:
        return {"ok": True, "result": balancer.set_mode(*fields, by=by)}
    except (LookupError, ValueError) as e:
        return {"ok": False, "error": str(e.args[0]) if e.args else str(e)}


def say_lock_wait(what: str) -> None:
    """Said on stderr at once, not after the wait: a second `kanmon serve` on the same
    data_dir would otherwise be silent for LOCK_WAIT seconds before it refuses."""
    print(f"kanmon: {what}; waiting up to {LOCK_WAIT:g} s for it to finish"
          " (a server stopping for a restart, or an offline admin command)", file=sys.stderr, flush=True)


class AdminPlane:
    """One per node: `services` entry (start/stop) plus run_maintenance() in the TaskGroup."""

    def __init__(self, node):
        self.node = node
        held = node.data_dir_lock
        if held is not None and held.held:
            self.lock = held  # `kanmon serve` waited for it before its event loop
        else:
            self.lock = DataDirLock(node.data_dir)
            self.lock.acquire(wait=LOCK_WAIT, on_wait=say_lock_wait)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="admin")
        self.ops: QueueOps | None = None
        self.control: ControlServer | None = None
        self.schedules_from: float | None = None  # the node's time the job schedules count from
        self.started_at = time.time()
        self.config_sha256 = config_digest(node.config_source)

    async def start(self) -> None:
        node = self.node
        link = NodeLink(asyncio.get_running_loop(), node.queue, node.clock)
        self.ops = QueueOps(node.config, node.spool, node.records, link)
        self.control = ControlServer(node.data_dir, self.handle_control)
        await self.control.start()

    def reconfigure(self) -> None:
        """After a reload: the next operation uses the node's new config (one running
        now finishes with the old one). (`kanmon status`'s digest: Node.reload_file.)"""
        if self.ops is not None:
            node = self.node
            self.ops = QueueOps(node.config, node.spool, node.records, self.ops.link)

    async def handle_control(self, request: dict, progress=None) -> dict:
        """handle() for the control socket, which writes a long list as it builds it."""
        return await self.handle(request, progress, stream=True)

    async def handle(self, request: dict, progress=None, *, stream: bool = False) -> dict:
        assert self.ops is not None
        if request.get("op") == "pickup":  # `kanmon sendmail` wrote to maildrop: scan it now
            if self.node.pickup is None:
                return {"ok": False, "error": "this node has no mail role"}
            self.node.pickup.wake()
            return {"ok": True, "result": {}}
        if request.get("op") == "status":  # the node describes itself (kanmon status)
            return {"ok": True, "result": await node_status(self)}
        if request.get("op") == "reload":  # `kanmon reload`: the node answers with the outcome
            return await self.node.reload_request()
        if request.get("op") == "dns_cache":  # `kanmon dns cache show|flush`
            return dns_cache_request(self.node.dns_cache, request.get("args") or {}, self.node.receivers,
                                     getattr(self.node, "agents", None))
        if request.get("op") == "balance_set":  # `kanmon balance set VIRTUAL REAL MODE`
            return balance_set_request(self.node.balancer, request.get("args") or {})
        return await asyncio.get_running_loop().run_in_executor(
            self._pool, partial(dispatch, self.ops, request, progress, stream=stream))

    async def stop(self) -> None:
        if self.control is not None:
            await self.control.stop()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        """Release the data_dir lock (last, after the spool is closed)."""
        self.lock.release()

    async def maintenance_status(self) -> list[dict]:
        """Each configured job: schedule, action, last run (from the run log) and next run."""
        assert self.ops is not None
        listing = await asyncio.get_running_loop().run_in_executor(self._pool, self.ops.maintenance_list)
        return [{"name": j["name"], "schedule": j["schedule"], "action": j["action"], "next_run": j["next_run"],
                 "last_run": (j["last_run"] or {}).get("started"), "last_error": (j["last_run"] or {}).get("error") or None,
                 "last_run_text": j["last_run_text"]} for j in listing["jobs"]]

    async def run_maintenance(self) -> None:
        """Each [[maintenance]] job at its next cron time; several times passed in one
        clock jump run once (like cron, not once each). At start, a `catch_up` job that
        missed a run while the node was down runs once (like anacron)."""
        jobs = [(job.name or f"job{i + 1}", CronSchedule.parse(job.schedule))
                for i, job in enumerate(self.node.config.maintenance)]
        if not jobs:
            return
        assert self.ops is not None
        clock = self.node.clock
        start = clock.now()
        due = {name: sched.next_after(start) for name, sched in jobs}
        self.schedules_from = start
        missed = await asyncio.get_running_loop().run_in_executor(self._pool, self.ops.maintenance_keep_schedules, start)
        for name, _at in missed:
            await self.run_job(name, catch_up=True)
        while True:
            await clock.sleep_until(min(due.values()))
            now = clock.now()
            for name, sched in jobs:
                if due[name] > now:
                    continue
                await self.run_job(name)
                due[name] = sched.next_after(now)

    async def run_quarantine(self) -> None:
        """[quarantine]: purge what is older than `keep` (at start, then hourly) and mail
        the spam digest on its cron schedule (each lists what arrived since the last one,
        whose time is kept across restarts in kanmon.admin.lastdigest's file; the first,
        what arrived in the day before it)."""
        cfg = self.node.config.quarantine
        clock = self.node.clock
        schedule = CronSchedule.parse(cfg.digest) if cfg.digest else None
        now = clock.now()
        next_purge = now
        next_digest = schedule.next_after(now) if schedule is not None else float("inf")
        records = self.node.records
        last_digest = now - 86400
        if schedule is not None:
            try:
                saved, refused = await asyncio.to_thread(lastdigest.load, self.node.data_dir)
            except OSError as e:
                saved, refused = None, ""
                records.record(Error(f"quarantine digest: {lastdigest.FILE} unreadable ("
                                     + for_log(f"{type(e).__name__}: {e}") + "): the next digest lists the day before it"))
            if refused:
                records.record(Error(f"quarantine digest: {lastdigest.FILE} refused ({for_log(refused)}), moved "
                                     f"aside to {lastdigest.FILE}.bad: the next digest lists the day before it"))
            if saved is not None and saved <= now:
                last_digest = saved
        while True:
            now = clock.now()
            if now >= next_purge:
                reply = await self.handle({"op": "quarantine_purge", "args": {"keep": cfg.keep}})
                if not reply.get("ok"):
                    records.record(Error(f"quarantine purge failed: {reply.get('error')}"))
                next_purge = now + 3600
            if now >= next_digest:
                reply = await self.handle({"op": "quarantine_digest", "args": {"since": last_digest, "slot": next_digest}})
                if not reply.get("ok"):  # the next one lists these entries again
                    records.record(Error(f"quarantine digest failed: {reply.get('error')}"))
                else:
                    if (reply.get("result") or {}).get("not_kept"):  # mailed; the next node may list these again
                        records.record(Error("quarantine digest: its time not kept in the shared state: "
                                             + for_log(reply["result"]["not_kept"])))
                    last_digest = now
                    try:
                        await asyncio.to_thread(lastdigest.save, self.node.data_dir, now, fsync=self.node.fsync)
                    except OSError as e:  # the digest was mailed; after a restart it may list these again
                        records.record(Error(f"quarantine digest: its time not kept in {lastdigest.FILE}: "
                                             + for_log(f"{type(e).__name__}: {e}")))
                assert schedule is not None
                next_digest = schedule.next_after(now)
            await clock.sleep_until(min(next_purge, next_digest))

    async def run_job(self, name: str, *, catch_up: bool = False) -> bool:
        """One scheduled (or catch-up) run; a failure raises the `queue` alert, a success
        after a failure clears it."""
        records = self.node.records
        records.record(MaintenanceRun(name, catch_up=catch_up))
        reply = await self.handle({"op": "maintenance_run",
                                   "args": {"job": name, "by": "catch-up" if catch_up else "scheduled"}})
        alerts = getattr(getattr(self.node, "monitoring", None), "alerts", None)
        key = f"maintenance {name}"
        if not reply.get("ok"):
            error = str(reply.get("error"))
            records.record(MaintenanceRun(name, error=error))
            if alerts is not None:
                alerts.raise_alert("queue", key, f"maintenance job {name} failed: {error}\n"
                                   f"Its last runs: kanmon maintenance list")
            return False
        if alerts is not None:
            alerts.clear("queue", key, f"maintenance job {name} ran again")
        return True


DNS_CACHE_SHOW_LIMIT = 1000  # entries listed by default (the counts cover them all)


def dns_cache_request(cache, args: dict, receivers=None, agents=None) -> dict:
    """`kanmon dns cache show` (counts and the most recently used answers of the main
    process: delivery, and the checks when there are no receiver processes) or `flush`
    (the receiver processes' caches of the checks' answers too, and the delivery agent
    processes' caches of MX/A/TLSA answers)."""
    if cache is None:
        return {"ok": False, "error": "this node has no mail role (no DNS cache)"}
    action = args.get("action", "show")
    if action == "flush":
        before = cache.stats()["entries"]
        cache.flush()
        told = receivers.flush_dns_caches() if receivers is not None else 0
        result = {"flushed": before, "receivers": told}
        if agents is not None:
            result["agents"] = agents.flush_dns_caches()
        return {"ok": True, "result": result}
    if action != "show":
        return {"ok": False, "error": f"unknown dns cache action {action!r}"}
    try:
        limit = int(args.get("limit", DNS_CACHE_SHOW_LIMIT))
    except (TypeError, ValueError):
        return {"ok": False, "error": "limit must be a number"}
    return {"ok": True, "result": {**cache.stats(), "items": [e.to_json() for e in cache.entries(max(0, limit))]}}
