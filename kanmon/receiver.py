"""SMTP receiver processes: the listeners run beside the main process, sharing the spool.

Role: use the second core the way Postfix does (smtpd apart from qmgr). The main process
binds every SMTP and submission socket, runs recovery, then starts `[server] workers`
receiver processes (`python -m kanmon.receiver`) that inherit the listening sockets and
accept on them. A receiver makes each message durable in the spool itself (the same
group commit and promise 1), then tells the main process "queued <id>" over a pipe, and
"logged <id>" once its records writer has written the message's log lines; the main
process's queue manager then reads the message from the spool and delivers it (at once
if the receiver exits before "logged"). A
receiver that dies is started again; one that is not told about cannot lose anything:
its messages are in the spool and recovery schedules them at the next start.

Trusts: the main process (its config file and the socket descriptors it passes).
Never: outlive the main process (PR_SET_PDEATHSIG on Linux, and EOF on the control
pipe); deliver mail (only the main process's queue manager does).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path

from kanmon import gcpolicy
from kanmon.auth.dkimsign import load_signer
from kanmon.children import die_with_parent, module_command, pipe_lines, wait_ready
from kanmon.config import Config, load_config
from kanmon.dnscache import DnsCache
from kanmon.escape import for_log
from kanmon.listeners import bind_listener

__all__ = ["ExitedShares", "ReceiverPool", "bind_listener", "main"]

RESTART_DELAY = 1.0  # seconds before a receiver that died is started again
RESTART_DELAY_MAX = 60.0  # ... doubled after each one that died before it listened, up to this
CLEANUP_RETRY = 0.5  # seconds before the cleanup of an exited receiver's gauge places is tried again
CLEANUP_RETRY_MAX = 30.0  # ... doubled after each failure, up to this
WHAT = "an SMTP receiver process"  # in the errors of a start
READY_TIMEOUT = 60.0  # seconds a new receiver may take to listen (at start and reload)
# A message a receiver took waits for its log lines ("logged") at most this long: a records
# writer that is stuck (a blocked stdout, a locked database) costs the log's order, never
# the delivery.
LOGGED_WAIT = 3.0


# ---------------------------------------------------------------------------
# Main-process side


class ExitedShares:
    """The main process's cleanup of the places exited receivers held in the shared
    connection gauge (`drop_owner` of each one's pid), in the background: with the shared
    state down (PostgreSQL), it is tried again after CLEANUP_RETRY seconds, doubled after
    each failure up to CLEANUP_RETRY_MAX, until it is done; the node serves meanwhile
    (the places held by a dead process only make the shared limits count a little high).
    One event line when a receiver's cleanup first fails, one when it is done at last.
    What is still to drop when the node stops is dropped by its next start
    (gauges.clear)."""

    def __init__(self, state, emit: Callable[..., None], *,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep):
        self.state = state
        self.emit = emit
        self._sleep = sleep
        self._pending: dict[str, None] = {}  # owners (pids) to drop, in order
        self._failed: set[str] = set()  # owners whose failure was said
        self._task: asyncio.Future[None] | None = None
        self._closing = False

    def add(self, owner: str) -> None:
        """The receiver of pid `owner` exited: drop its places (now, or when the state answers)."""
        if self._closing:
            return
        self._pending[owner] = None
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._run())

    def pending(self) -> list[str]:
        return list(self._pending)

    def started(self, owner: str) -> None:
        """A new receiver has pid `owner` (the kernel gave an exited one's pid again): what
        that pid held is dropped by the new process's own start, and a cleanup still to come
        here would drop the places the new one takes."""
        self._pending.pop(owner, None)
        self._failed.discard(owner)

    async def _run(self) -> None:
        delay = CLEANUP_RETRY
        while self._pending:
            owner = next(iter(self._pending))
            try:
                await self.state.submit(self.state.gauges.drop_owner, owner)
            except Exception as e:  # noqa: BLE001 - shared state down: try again later
                if owner not in self._failed:
                    self._failed.add(owner)
                    self.emit(f"shared state unavailable: the connection counts of SMTP receiver pid {owner} are "
                              "not dropped yet, trying again in the background: " + for_log(f"{type(e).__name__}: {e}"),
                              kind="error")
                if self._closing:
                    return
                await self._sleep(delay)
                delay = min(delay * 2, CLEANUP_RETRY_MAX)
                continue
            self._pending.pop(owner, None)  # (started() may have taken it meanwhile)
            delay = CLEANUP_RETRY
            if owner in self._failed:
                self._failed.discard(owner)
                self.emit(f"shared state: the connection counts of SMTP receiver pid {owner} dropped")

    async def close(self) -> None:
        """The node stops: a cleanup under way finishes (one that fails is not tried again);
        one waiting to try again is given up (the node's next start drops it)."""
        self._closing = True
        task = self._task
        if task is None or task.done():
            return
        if self._failed:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


class ReceiverPool:
    """Starts, watches and stops the receiver processes of one node."""

    def __init__(
        self,
        config_source: str | None,
        listeners: list[dict],
        sockets: list[socket.socket],
        count: int,
        on_queued: Callable[[str], None],
        emit: Callable[..., None],
        *,
        quiet: bool = True,
        own_config_file: bool = False,
        on_exit: Callable[[int], Awaitable[None]] | None = None,
        on_start: Callable[[int], None] | None = None,
    ):
        """own_config_file: config_source is this pool's private snapshot of the config the
        main process validated (removed when the pool stops)."""
        self.config_source = config_source
        self.own_config_file = own_config_file
        self.listeners = listeners  # [{"fd": n, "role": "smtp"|"submission", "tls": bool}]
        self.sockets = sockets
        self.count = count
        self.on_queued = on_queued
        self.emit = emit
        self.quiet = quiet
        self.on_exit = on_exit  # awaited with the pid of a receiver that exited
        self.on_start = on_start  # called with the pid of each receiver started
        self._procs: list[subprocess.Popen | None] = [None] * count  # the current receiver of each index
        self._live: set[subprocess.Popen] = set()  # not reaped yet: current ones and retiring ones
        self._listening: set[subprocess.Popen] = set()  # said "ready"
        self._tasks: list[asyncio.Task] = []
        self._stopping = False
        self._stopped = asyncio.Event()  # set with _stopping: ends a wait before a restart
        self._ready: list[asyncio.Event] = [asyncio.Event() for _ in range(count)]
        # A supervisor restarts its receiver only while its generation is the index's
        # current one: retire_one() moves the index on, restore() starts a new supervisor.
        self._generation: list[int] = [0] * count
        self._retired: set[int] = set()
        self._failure: str | None = None  # why the last receiver that could not start could not

    async def start(self, ready_timeout: float = READY_TIMEOUT, replacing: ReceiverPool | None = None) -> None:
        """Start every receiver and wait until each listens; OSError if one does not.

        replacing: the pool of the configuration a reload replaces. Its receivers are
        replaced one at a time: receiver i of this pool starts, and once it listens
        receiver i of the old pool stops accepting and finishes its sessions (old
        receivers beyond this pool's count go last). So as many receivers accept as
        before at every moment, and the node runs at most one more than its count
        besides those finishing sessions. If a new receiver fails, the caller undoes
        the reload (restore() the old pool, retire() this one); a first start (no
        `replacing`) stops the pool itself."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + ready_timeout
        try:
            if replacing is None:
                for i in range(self.count):
                    self._tasks.append(asyncio.ensure_future(self._supervise(i, 0)))
                await self._wait_ready(self._ready, self._tasks, deadline)
                return
            for i in range(self.count):
                task = asyncio.ensure_future(self._supervise(i, 0))
                self._tasks.append(task)
                await self._wait_ready([self._ready[i]], [task], deadline)
                new = self._procs[i]
                old = replacing.retire_one(i)
                if old is not None and new is not None:
                    self.emit(f"reload: SMTP receiver {i}: pid {new.pid} listens, "
                              f"pid {old} finishes its sessions and exits")
            for i in range(self.count, replacing.count):
                old = replacing.retire_one(i)
                if old is not None:
                    self.emit(f"reload: SMTP receiver {i}: pid {old} finishes its sessions and exits "
                              "(fewer receivers)")
        except BaseException:
            if replacing is None:
                await self.stop()
            raise


    async def _wait_ready(self, events, tasks, deadline: float) -> None:
        """wait_ready(), its error with the reason a receiver gave before it exited."""
        try:
            await wait_ready(events, tasks, deadline, WHAT)
        except OSError as e:
            if self._failure is None:
                raise
            raise OSError(f"{e}: {self._failure}") from None

    def retire_one(self, index: int) -> int | None:
        """Receiver `index` stops accepting, finishes its sessions and exits, and is not
        started again (until restore()). Returns its pid, None if it was not running."""
        if index >= self.count or index in self._retired:
            return None
        self._retired.add(index)
        self._generation[index] += 1
        proc = self._procs[index]
        if proc is None or proc.poll() is not None:
            return None
        # One that never listened has no session to finish.
        proc.send_signal(signal.SIGHUP if proc in self._listening else signal.SIGTERM)
        return proc.pid

    async def restore(self, ready_timeout: float = READY_TIMEOUT) -> None:
        """Undo retire_one() after a reload that failed: a receiver of this (the running)
        configuration starts again for each retired index; the retired processes go on
        finishing their sessions. A receiver that does not start is an error event."""
        if self._stopping or not self._retired:
            return
        indexes = sorted(self._retired)
        self._retired.clear()
        tasks = []
        for i in indexes:
            self._ready[i] = asyncio.Event()
            tasks.append(asyncio.ensure_future(self._supervise(i, self._generation[i])))
        self._tasks += tasks
        try:
            deadline = asyncio.get_running_loop().time() + ready_timeout
            await wait_ready([self._ready[i] for i in indexes], tasks, deadline, WHAT)
        except OSError as e:
            self.emit(f"reload: the previous SMTP receivers could not all be started again: {e}", kind="error")

    async def _supervise(self, index: int, generation: int) -> None:
        loop = asyncio.get_running_loop()
        ready = self._ready[index]
        backoff = RESTART_DELAY  # before the next start after one that never listened
        while not self._stopping and self._generation[index] == generation:
            listened = False
            read_fd, write_fd = os.pipe()
            fds = [s.fileno() for s in self.sockets] + [write_fd]
            cmd = [*module_command("kanmon.receiver"), "--index", str(index), "--notify-fd", str(write_fd),
                   "--listeners", json.dumps(self.listeners)]
            if self.config_source is not None:
                cmd += ["--config", self.config_source]
            if self.quiet:
                cmd.append("--quiet")
            proc = subprocess.Popen(cmd, pass_fds=fds, stdin=subprocess.DEVNULL)
            os.close(write_fd)
            if self.on_start is not None:
                self.on_start(proc.pid)
            self._procs[index] = proc
            self._live.add(proc)
            # Until the receiver exits (or closes its end); the pipe is closed after, at once
            # (aclosing) even when a line's handling raises.
            # "queued ID": the message is durable (said before its 250); it is held back
            # from delivery until "logged ID" (the receiver's log lines about it are
            # written: its from= line comes before our delivery lines in the log), or
            # until the receiver exits, or LOGGED_WAIT, whichever comes first (a receiver
            # killed in between loses no message, none waits for the next start, nor for
            # a stuck records writer).
            held: dict[str, asyncio.TimerHandle] = {}

            def release(qid: str) -> None:
                timer = held.pop(qid, None)
                if timer is not None:
                    timer.cancel()
                    self.on_queued(qid)

            try:
                async with contextlib.aclosing(pipe_lines(read_fd, 1 << 16)) as lines:
                    async for line in lines:
                        kind, _, arg = line.decode("ascii", "replace").strip().partition(" ")
                        if kind == "queued" and arg:
                            if arg not in held:
                                held[arg] = loop.call_later(LOGGED_WAIT, release, arg)
                        elif kind == "logged" and arg:
                            release(arg)
                        elif kind == "failed":  # why it cannot start, said before it exits
                            self._failure = arg[:500]
                        elif kind == "ready":
                            self._listening.add(proc)
                            listened = True
                            ready.set()
            finally:
                for qid in list(held):
                    release(qid)
            code = await loop.run_in_executor(None, proc.wait)
            self._live.discard(proc)
            self._listening.discard(proc)
            if self._procs[index] is proc:
                self._procs[index] = None
            if self.on_exit is not None:
                try:
                    await self.on_exit(proc.pid)
                except Exception as e:  # noqa: BLE001 - a cleanup failing must not stop the restarts
                    self.emit(f"warning: cleanup after SMTP receiver {index} (pid {proc.pid}): {e}", kind="error")
            if self._stopping or self._generation[index] != generation:
                return  # stopped, or retired after a reload
            if not ready.is_set():
                return  # the first one never listened: start() reports it (a loop would hide the reason)
            # One that listened is started again after RESTART_DELAY; one that died before
            # it listened (what kills it at its start may last: a loop of starts would
            # cost the node its CPU and the log its lines) after twice the previous delay,
            # up to RESTART_DELAY_MAX.
            if listened:
                delay = backoff = RESTART_DELAY
            else:
                delay, backoff = backoff, min(backoff * 2, RESTART_DELAY_MAX)
            when = "" if listened else " before it listened"
            self.emit(f"warning: SMTP receiver {index} (pid {proc.pid}) exited with status {code}{when}; "
                      f"restarting in {delay:g}s", kind="error")
            await self._pause(delay)

    async def _pause(self, delay: float) -> None:
        """Wait `delay` seconds before a restart; stop() ends the wait."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await self._stopped.wait()

    async def retire(self) -> None:
        """After a reload: each receiver stops accepting, finishes its sessions under the
        settings it started with, and exits (SIGHUP); "queued" lines are read to the end."""
        await self.stop(signal.SIGHUP, wait=None)

    def flush_dns_caches(self) -> int:
        """`kanmon dns cache flush`: each receiver forgets its checks' DNS answers (SIGUSR1)."""
        told = 0
        for proc in list(self._listening):  # their handler is in place (a new one's is not yet)
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGUSR1)
                    told += 1
        return told

    async def stop(self, sig: int = signal.SIGTERM, wait: float | None = 10) -> None:
        self._stopping = True
        self._stopped.set()
        for proc in list(self._live):
            if proc.poll() is None:
                # SIGHUP asks a receiver to finish its sessions; one that never listened has none.
                proc.send_signal(sig if sig != signal.SIGHUP or proc in self._listening else signal.SIGTERM)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for proc in list(self._live):
            try:
                proc.wait(wait)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        for s in self.sockets:
            s.close()
        if self.own_config_file and self.config_source is not None:
            Path(self.config_source).unlink(missing_ok=True)

    def pids(self) -> list[int]:
        return [p.pid for p in self._procs if p is not None]


# ---------------------------------------------------------------------------
# Receiver-process side


async def _serve(config: Config, listeners: list[dict], notify_fd: int, index: int, quiet: bool) -> None:
    from kanmon.policy.dns import CheckResolver
    from kanmon.policy.dnsbl import dnsbl_effect_handlers
    from kanmon.policy.scanners import scanner_effect_handlers
    from kanmon.policy.quota import quota_effect_handlers
    from kanmon.policy.standard import standard_pipeline
    from kanmon.queue.inject import Injector
    from kanmon.records.events import DnsblLookupFailed, Error, ScannerFailed, ScannerRecovered
    from kanmon.records.store import Records
    from kanmon.smtp.server import SmtpServer, SubmissionAuth
    from kanmon.spool.store import Spool
    from kanmon.state.backends import open_state
    from kanmon.store.maildir import mailbox_usage
    from kanmon.store.quota import QuotaNotices
    from kanmon.store.users import AuthThrottle, Users
    from kanmon.tlscert import server_context

    data_dir = Path(config.server.data_dir)
    records = Records(data_dir, config.server.hostname, echo=None if quiet else sys.stdout, log=config.log,
                      rotate=False, shared=config.records)
    spool = Spool(data_dir)
    notify = os.fdopen(notify_fd, "wb", buffering=0)

    def tell(what: str, queue_id: str) -> None:
        try:
            notify.write(f"{what} {queue_id}\n".encode())  # one write under PIPE_BUF: atomic
        except (BrokenPipeError, OSError, ValueError):
            pass  # the main process is gone (or we stop); recovery will find the message

    def queued(queue_id: str, envelope, content: bytes) -> None:
        # Before the 250: the main process knows the message is durable ("queued"). It
        # delivers it once this process's lines about it (the session, from=...) are in
        # the log ("logged", from the records writer: no extra fsync), so its delivery
        # lines come after them, as in sendmail's and Postfix's logs.
        tell("queued", queue_id)
        records.after_lines(partial(tell, "logged", queue_id))

    def build():
        state = open_state(config, data_dir)  # shared with the main process and the other receivers
        dns_cache = DnsCache(config.dns.cache_entries)  # this process's checks' (SIGUSR1 flushes it)
        pipeline = standard_pipeline(config, quota_usage=partial(mailbox_usage, data_dir), state=state,
                                     resolver=CheckResolver.from_config(config, cache=dns_cache))
        tls = server_context(config)

        # Over-quota notices are written here, where the check runs: stored, recorded and
        # announced to the main process like received mail.
        effects = quota_effect_handlers(
            QuotaNotices(data_dir, Injector(spool, records, queued, hostname=config.server.hostname,
                                            signer=load_signer(config)))
        )
        effects.update(dnsbl_effect_handlers(lambda e: records.record(DnsblLookupFailed(e.ip, e.zone, e.error))))
        effects.update(scanner_effect_handlers(
            lambda e: records.record(ScannerFailed(e.scanner, e.error) if e.error else ScannerRecovered(e.scanner))))
        servers = []
        for role in ("smtp", "submission"):
            socks = [(socket.socket(fileno=item["fd"]), item["tls"]) for item in listeners if item["role"] == role]
            if not socks:
                continue
            # The AUTH throttle counts in the shared state: the failures of every process add up.
            auth = SubmissionAuth(Users(config), AuthThrottle(state=state)) if role == "submission" else None
            servers.append(SmtpServer(config, pipeline, spool, records, queued, tls, sockets=socks,
                                      submission=role == "submission", auth=auth, effects=effects, state=state))
        return state, dns_cache, servers

    try:
        state, dns_cache, servers = build()
    except Exception as e:
        # Said before the process exits, on the pipe (the main process's one-line error at
        # its start gives it) and in the log: a traceback on stderr alone is easily missed.
        why = for_log(f"{type(e).__name__}: {e}")
        records.record(Error(f"SMTP receiver {index} (pid {os.getpid()}) cannot start: {why}"))
        with contextlib.suppress(OSError):
            notify.write(f"failed {why}\n".encode("utf-8", "replace"))
        records.close()
        raise
    stop = asyncio.Event()
    retire = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, retire.set)  # replaced after a reload
    loop.add_signal_handler(signal.SIGUSR1, dns_cache.flush)  # `kanmon dns cache flush`
    owner = str(os.getpid())
    try:
        # Connections this process id held in an earlier life are not held any more.
        await _forget_places(state, owner, records, index, "the connection counts of an earlier process "
                             "with its id are not dropped")
        for s in servers:
            await s.start()
        gcpolicy.settle_after_start()  # what start-up built, out of the collector's sight
        notify.write(b"ready\n")
        waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(retire.wait())]
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for w in waits:
            w.cancel()
        if retire.is_set() and not stop.is_set():
            # Sessions in progress finish here; a SIGTERM meanwhile ends them (stop below).
            drain = asyncio.gather(*(s.retire() for s in servers))
            end = asyncio.ensure_future(stop.wait())
            await asyncio.wait([drain, end], return_when=asyncio.FIRST_COMPLETED)
            end.cancel()
            if not drain.done():
                drain.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await drain
    finally:
        for s in servers:
            await s.stop()
        await _forget_places(state, owner, records, index, "its connection counts are left to the main process")
        spool.close()
        state.close()
        records.close()
        notify.close()


async def _forget_places(state, owner: str, records, index: int, left: str) -> None:
    """Drop what this process id holds in the shared connection gauge (at start: an
    earlier process of the same id; at exit: its own). The shared state down
    (PostgreSQL) is one event line, never the receiver's end: the places stay until the
    main process drops them after this receiver's exit, or the node's next start."""
    from kanmon.records.events import Error

    try:
        await state.submit(state.gauges.drop_owner, owner)
    except Exception as e:  # noqa: BLE001 - shared state down: serve without it
        records.record(Error(f"SMTP receiver {index} (pid {owner}): shared state unavailable, {left}: "
                             + for_log(f"{type(e).__name__}: {e}")))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kanmon.receiver", description="kanmon SMTP receiver process")
    ap.add_argument("--config")
    ap.add_argument("--index", type=int, default=0)
    ap.add_argument("--notify-fd", type=int, required=True)
    ap.add_argument("--listeners", required=True)
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    die_with_parent()
    config = load_config(args.config)
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    try:
        runner(_serve(config, json.loads(args.listeners), args.notify_fd, args.index, args.quiet))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
