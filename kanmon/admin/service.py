"""The admin plane inside `kanmon serve`: data_dir lock, control socket, [[maintenance]].

Role: built by kanmon.node. At construction it takes <data_dir>/kanmon.lock (before
spool recovery, so an offline admin command is never half-way through the spool when the
server starts; it waits up to LOCK_WAIT for one to finish). start() opens the control
socket (kanmon.control); each request runs kanmon.admin.queue_ops in one worker thread
(so a scan of 100,000 messages never stalls the event loop, and operations never
overlap); NodeLink lets that thread reach the queue manager in the event loop.
run_maintenance() fires the configured jobs on the node's clock.

Trusts: the node's objects; requests only as kanmon.admin.queue_ops validates them.
Never: touch queue-manager state from the worker thread directly (always through the
event loop), or run a maintenance job that is not in the validated config.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from kanmon.cron import CronSchedule
from kanmon.admin.queue_ops import QueueOps, dispatch
from kanmon.control import ControlServer, DataDirLock
from kanmon.records.events import MaintenanceRun

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


class AdminPlane:
    """One per node: `services` entry (start/stop) plus run_maintenance() in the TaskGroup."""

    def __init__(self, node):
        self.node = node
        self.lock = DataDirLock(node.data_dir)
        self.lock.acquire(wait=LOCK_WAIT)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="admin")
        self.ops: QueueOps | None = None
        self.control: ControlServer | None = None

    async def start(self) -> None:
        node = self.node
        link = NodeLink(asyncio.get_running_loop(), node.queue, node.clock)
        self.ops = QueueOps(node.config, node.spool, node.records, link)
        self.control = ControlServer(node.data_dir, self.handle)
        await self.control.start()

    async def handle(self, request: dict) -> dict:
        assert self.ops is not None
        return await asyncio.get_running_loop().run_in_executor(self._pool, dispatch, self.ops, request)

    async def stop(self) -> None:
        if self.control is not None:
            await self.control.stop()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        """Release the data_dir lock (last, after the spool is closed)."""
        self.lock.release()

    async def run_maintenance(self) -> None:
        """Each [[maintenance]] job at its next cron time; a run missed while the node was
        down, or several passed in one clock jump, run once (like cron, not once each)."""
        jobs = [(job.name or f"job{i + 1}", CronSchedule.parse(job.schedule))
                for i, job in enumerate(self.node.config.maintenance)]
        if not jobs:
            return
        clock = self.node.clock
        records = self.node.records
        emit = records.emit
        due = {name: sched.next_after(clock.now()) for name, sched in jobs}
        while True:
            await clock.sleep(min(due.values()) - clock.now())
            now = clock.now()
            for name, sched in jobs:
                if due[name] > now:
                    continue
                records.record(MaintenanceRun(name))
                reply = await self.handle({"op": "maintenance_run", "args": {"job": name}})
                if not reply.get("ok"):
                    emit(f"maintenance {name}: failed: {reply.get('error')}", None, "error")
                due[name] = sched.next_after(now)
