"""Delivery agent processes: the main process schedules, agents deliver (Postfix's qmgr/smtp).

Role: use more than one core for delivery. The main process keeps the schedule (the
queue manager: what is due, routing, per-destination limits, the retry planner, the
journal, notices) and starts `[server] delivery_workers` agent processes (`python -m
kanmon.agent`), each running the same delivery functions the main process runs with
delivery_workers = 0: kanmon.deliver.local (Maildir, Sieve) and kanmon.deliver.smtp
(relay hosts, smarthost, MX; its connection cache lives per agent). The receivers
(kanmon.receiver) are started, supervised and replaced the same way.

The hand-off is one JSON line per delivery over a socket pair, written in batches (one
write per turn of the event loop): the queue id, the recipients and the route, never
the message. The agent opens the queue file itself (CRC-checked). Its answer carries
one typed journal record per recipient (kanmon.spool.journal.Result, its one encoder
and strict decoder) plus the reply's parts, which the main process's planner
(kanmon.queue.plan) turns into the journal, the log lines and the schedule, exactly as
for a delivery made in the main process. Mail an agent writes itself (a Sieve redirect
or vacation reply) is stored through its own injector and announced ("queued") like a
receiver's.

Local recipients always go to the agent their mailbox hashes to, so the in-memory quota
reservations of kanmon.deliver.local stay exact (one process per mailbox). SMTP
deliveries go to the agent with the fewest in flight.

A crashed agent (kill -9 mid-delivery): each delivery it had in flight is answered
451 4.3.0 "delivery agent exited" (deferred: journaled and retried by the planner's
schedule, never lost; a message the agent had already handed on may arrive twice,
the at-least-once promise), and the agent is started again. A reload starts agents of
the new configuration, sends them every new delivery, and lets the old ones finish what
they have (drain) and exit. At stop the agents end their deliveries unfinished: nothing
about them is journaled, and the messages are delivered after the next start.

Trusts: the main process (its config snapshot and the socket it passes). Never:
outlive the main process (PR_SET_PDEATHSIG, and EOF on the socket); change queue state
(the main process journals results); import what delivery does not need (no listener,
check pipeline, console or admin code: its RSS is per agent).
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
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kanmon import gcpolicy
from kanmon.children import die_with_parent, module_command, wait_ready
from kanmon.model import LocalReply, RecipientResult, Reply, Status
from kanmon.routing import Route
from kanmon.spool import journal
from kanmon.spool.journal import JournalError

__all__ = ["AGENT_EXITED", "AgentPool", "agent_count", "main", "result_from_wire", "result_to_wire"]

RESTART_DELAY = 1.0  # seconds before an agent that died is started again
READY_TIMEOUT = 60.0  # seconds a new agent may take to say it is ready
MAX_LINE = 1 << 24  # bytes of one line on the socket (a result list of 1,000 recipients fits)
SMALL_READ = 256 << 10  # bytes of queue file an agent reads on its event loop (larger: in a thread)

AGENT_EXITED = LocalReply(451, "4.3.0", "delivery agent exited during the delivery; will retry")
NO_AGENT = LocalReply(451, "4.3.0", "no delivery agent is running; will retry")


def agent_count(setting: int | None) -> int:
    """[server] delivery_workers: the setting; unset, none (the main process delivers).
    Measured on the 2-core machine class, an agent costs more CPU per message than the
    main process saves (docs/performance.md, "Delivery agents"), so they are opt-in."""
    return 0 if setting is None else setting


# ---------------------------------------------------------------------------
# The wire: JSON lines


def route_to_wire(route: Route) -> list:
    return [route.transport, route.key, route.domain, [list(h) for h in route.hops], route.tls]


def route_from_wire(v: Any) -> Route:
    transport, key, domain, hops, tls = v
    return Route(str(transport), str(key), str(domain), tuple((str(h), int(p)) for h, p in hops), tls)


def result_to_wire(r: RecipientResult, t: float) -> dict:
    """A recipient's result as its journal record (kanmon.spool.journal) plus what the
    planner needs besides: the reply's parts (ours or a server's) and the DSN hand-over."""
    d = journal.to_dict(journal.Result(t, r.rcpt, r.status.value, str(r.reply), r.relay, r.mailer, r.tls))
    d["code"] = r.reply.code
    d["enh"] = r.reply.enhanced
    d["text"] = r.reply.text
    d["ours"] = isinstance(r.reply, LocalReply)
    d["dsn"] = r.dsn_passed
    return d


def result_from_wire(d: Any) -> RecipientResult:
    """The strict inverse of result_to_wire (JournalError for anything else)."""
    rec = journal.from_dict(d)
    if not isinstance(rec, journal.Result):
        raise JournalError("an agent's result is a result record")
    code, enh, text, ours, dsn = d.get("code"), d.get("enh"), d.get("text"), d.get("ours"), d.get("dsn")
    if (type(code) is not int or not 200 <= code <= 599 or type(enh) is not str or type(text) is not str
            or type(ours) is not bool or type(dsn) is not bool):
        raise JournalError("an agent's result has a malformed reply")
    reply = (LocalReply if ours else Reply)(code, enh, text)
    return RecipientResult(rec.rcpt, Status(rec.status), reply, rec.relay, rec.mailer, rec.tls, dsn)


def _line(d: dict) -> bytes:
    return json.dumps(d, separators=(",", ":")).encode() + b"\n"


class _Writer:
    """Lines to one socket, joined into one write per turn of the event loop."""

    def __init__(self, writer: asyncio.StreamWriter):
        self.writer = writer
        self._buf: list[bytes] = []

    def send(self, d: dict) -> None:
        if not self._buf:
            asyncio.get_running_loop().call_soon(self._flush)
        self._buf.append(_line(d))

    def _flush(self) -> None:
        data, self._buf = b"".join(self._buf), []
        if not self.writer.is_closing():
            self.writer.write(data)


# ---------------------------------------------------------------------------
# Main-process side


class _Agent:
    """One agent slot: its current process and what it has in flight."""

    def __init__(self, index: int):
        self.index = index
        self.proc: subprocess.Popen | None = None
        self.out: _Writer | None = None  # set while the process is ready
        self.pending: dict[int, tuple[asyncio.Future, list[str], str]] = {}  # n -> (future, rcpts, mailer)
        self.ready = asyncio.Event()


class AgentPool:
    """Starts, watches, drains and stops the delivery agents of one configuration."""

    def __init__(
        self,
        config_source: str | None,
        count: int,
        on_queued: Callable[[str], None],
        emit: Callable[..., None],
        *,
        on_server_used: Callable[[str, str, list[tuple[str, str]]], Any] | None = None,
        quiet: bool = True,
        fsync: bool = True,
        own_config_file: bool = False,
    ):
        """config_source: the config file the agents load (own_config_file: a private
        snapshot, removed when the pool stops). on_queued(queue_id): an agent stored a
        message of its own (a Sieve redirect). on_server_used: the failover alerts'
        hook (kanmon.deliver.smtp.SmtpDelivery.on_server_used), called in this process."""
        if count < 1:
            raise ValueError("an agent pool has at least one agent")
        self.config_source = config_source
        self.own_config_file = own_config_file
        self.count = count
        self.on_queued = on_queued
        self.on_server_used = on_server_used
        self.emit = emit
        self.quiet = quiet
        self.fsync = fsync
        self._agents = [_Agent(i) for i in range(count)]
        self._tasks: list[asyncio.Task] = []
        self._seq = 0
        self._stopping = False
        self._draining = False
        self._changed = asyncio.Event()  # an agent became ready (deliver() waits for one)

    # -- start, drain, stop

    async def start(self, ready_timeout: float = READY_TIMEOUT) -> None:
        """Start every agent and wait until each is ready; OSError if one is not (the
        pool is stopped then)."""
        self._tasks = [asyncio.ensure_future(self._supervise(a)) for a in self._agents]
        try:
            await wait_ready([a.ready for a in self._agents], self._tasks,
                             asyncio.get_running_loop().time() + ready_timeout, "a delivery agent process")
        except BaseException:
            await self.stop()
            raise

    async def drain(self) -> None:
        """After a reload: no new deliveries here; each agent finishes the deliveries it
        has, reports them, and exits (SIGHUP). Returns when all have exited."""
        self._draining = True
        self._stopping = True
        for a in self._agents:
            if a.proc is not None and a.proc.poll() is None:
                a.proc.send_signal(signal.SIGHUP)
        await self._wait_exited(None)
        if self.own_config_file and self.config_source is not None:
            Path(self.config_source).unlink(missing_ok=True)

    async def stop(self, wait: float = 10) -> None:
        """The agents end now (SIGTERM): deliveries in flight end unfinished and nothing
        is journaled about them (their messages stay in the spool, delivered after the
        next start). Waits for them to exit (SIGKILL after `wait` seconds)."""
        self._stopping = True
        for a in self._agents:
            if a.proc is not None and a.proc.poll() is None:
                a.proc.send_signal(signal.SIGTERM)
        await self._wait_exited(wait)
        if self.own_config_file and self.config_source is not None:
            Path(self.config_source).unlink(missing_ok=True)

    async def _wait_exited(self, wait: float | None) -> None:
        if not self._tasks:
            return
        gathered = asyncio.gather(*self._tasks, return_exceptions=True)
        # asyncio.wait, not asyncio.timeout: this runs while the node stops (kanmon.aio)
        done, _pending = await asyncio.wait({gathered}, timeout=wait)
        if not done:
            for a in self._agents:
                if a.proc is not None and a.proc.poll() is None:
                    a.proc.kill()
            await gathered

    def pids(self) -> list[int]:
        return [a.proc.pid for a in self._agents if a.proc is not None and a.proc.poll() is None]

    def flush_dns_caches(self) -> int:
        """`kanmon dns cache flush`: each agent forgets its MX/A/TLSA answers (SIGUSR1)."""
        told = 0
        for a in self._agents:
            if a.proc is not None and a.out is not None and a.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    a.proc.send_signal(signal.SIGUSR1)
                    told += 1
        return told

    # -- deliveries

    async def deliver(self, queue_id: str, rcpts: list[str], route: Route) -> list[RecipientResult]:
        """Deliver `rcpts` of the queued message by `route` in an agent; one result per
        recipient. FileNotFoundError: the message is gone; CorruptEntry: its queue file
        failed its checks (the caller sets it aside)."""
        if route.transport != "local":
            return await self._deliver_in(None, queue_id, rcpts, route)
        # Each mailbox always in the same agent: its quota reservations are that agent's.
        shards: dict[int, list[str]] = {}
        for rcpt in rcpts:
            shards.setdefault(zlib.crc32(rcpt.lower().encode("utf-8", "replace")) % self.count, []).append(rcpt)
        if len(shards) == 1:
            ((index, part),) = shards.items()
            return await self._deliver_in(index, queue_id, part, route)
        parts = await asyncio.gather(*(self._deliver_in(i, queue_id, part, route) for i, part in shards.items()))
        by_rcpt = {r.rcpt: r for part in parts for r in part}
        return [by_rcpt[r] for r in rcpts if r in by_rcpt]

    async def _deliver_in(self, index: int | None, queue_id: str, rcpts: list[str], route: Route) -> list[RecipientResult]:
        mailer = "local" if route.transport == "local" else "esmtp"
        agent = await self._agent_for(index)
        if agent is None or agent.out is None:
            return [RecipientResult(r, Status.DEFERRED, NO_AGENT, mailer=mailer) for r in rcpts]
        self._seq += 1
        n = self._seq
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        agent.pending[n] = (fut, rcpts, mailer)
        agent.out.send({"k": "deliver", "n": n, "id": queue_id, "rcpts": rcpts, "route": route_to_wire(route)})
        try:
            return await fut
        finally:
            agent.pending.pop(n, None)

    async def _agent_for(self, index: int | None) -> _Agent | None:
        """The agent `index` (the one with the fewest deliveries in flight for None),
        waiting (bounded) while it is being started again; None if none comes."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + READY_TIMEOUT
        while not self._stopping:
            if index is not None:
                candidates = [self._agents[index]] if self._agents[index].out is not None else []
            else:
                candidates = [a for a in self._agents if a.out is not None]
            if candidates:
                return min(candidates, key=lambda a: len(a.pending))
            self._changed.clear()
            try:
                async with asyncio.timeout_at(deadline):
                    await self._changed.wait()
            except TimeoutError:
                return None
        return None

    # -- supervision

    async def _supervise(self, agent: _Agent) -> None:
        loop = asyncio.get_running_loop()
        while not self._stopping:
            parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            cmd = [*module_command("kanmon.agent"), "--index", str(agent.index), "--fd", str(child.fileno())]
            if self.config_source is not None:
                cmd += ["--config", self.config_source]
            if self.quiet:
                cmd.append("--quiet")
            if not self.fsync:
                cmd.append("--no-fsync")
            try:
                proc = subprocess.Popen(cmd, pass_fds=[child.fileno()], stdin=subprocess.DEVNULL)
            finally:
                child.close()
            agent.proc = proc
            reader, writer = await asyncio.open_connection(sock=parent, limit=MAX_LINE)
            try:
                await self._read(agent, reader, writer)
            finally:
                agent.out = None
                writer.close()
            code = await loop.run_in_executor(None, proc.wait)
            lost = list(agent.pending.items())
            agent.pending.clear()
            for _n, (fut, rcpts, mailer) in lost:
                if not fut.done():
                    fut.set_result([RecipientResult(r, Status.DEFERRED, AGENT_EXITED, mailer=mailer) for r in rcpts])
            if self._stopping and (code == 0 or not self._draining):
                return  # drained, or stopped on purpose (deliveries cut short are not journaled)
            self.emit(f"warning: delivery agent {agent.index} (pid {proc.pid}) exited with status {code}"
                      + (f"; {len(lost)} deliveries in flight are deferred and retried" if lost else "")
                      + ("" if self._stopping else "; restarting"), kind="error")
            if self._stopping:
                return
            if not agent.ready.is_set():
                return  # it never became ready: start() reports it (a loop would hide the reason)
            await asyncio.sleep(RESTART_DELAY)

    async def _read(self, agent: _Agent, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                line = await reader.readline()
            except (ValueError, ConnectionError):  # a line over the limit, or the socket failed
                return
            if not line:
                return  # the agent exited (or closed its end)
            try:
                msg = json.loads(line)
                kind = msg["k"]
            except (ValueError, KeyError, TypeError):
                self.emit(f"delivery agent {agent.index}: unreadable line ignored", kind="error")
                continue
            if kind == "ready":
                agent.out = _Writer(writer)
                agent.ready.set()
                self._changed.set()
            elif kind == "queued":
                self.on_queued(str(msg.get("id")))
            elif kind == "used" and self.on_server_used is not None:
                with contextlib.suppress(Exception):
                    self.on_server_used(str(msg["dest"]), str(msg["used"]),
                                        [(str(a), str(b)) for a, b in msg.get("failed", [])])
            else:
                self._answer(agent, kind, msg)

    def _answer(self, agent: _Agent, kind: str, msg: dict) -> None:
        from kanmon.spool.store import CorruptEntry  # noqa: PLC0415 - the main process has it loaded

        item = agent.pending.pop(msg.get("n"), None) if isinstance(msg.get("n"), int) else None
        if item is None:
            return
        fut, rcpts, mailer = item
        if fut.done():
            return
        if kind == "done":
            try:
                results = [result_from_wire(d) for d in msg.get("results", [])]
            except (JournalError, ValueError, TypeError) as e:
                fut.set_exception(RuntimeError(f"delivery agent {agent.index} answered badly: {e}"))
                return
            fut.set_result(results)
        elif kind == "gone":
            fut.set_exception(FileNotFoundError(msg.get("id")))
        elif kind == "corrupt":
            fut.set_exception(CorruptEntry(str(msg.get("why", "corrupt"))[:200]))
        else:  # "error": the agent's exception, as in-process delivery would raise it
            fut.set_exception(RuntimeError(str(msg.get("error", "unknown error"))[:500]))


# ---------------------------------------------------------------------------
# Agent-process side




async def _serve(config_source: str | None, fd: int, index: int, quiet: bool, fsync: bool) -> None:
    # Only what delivery needs (no listener, check pipeline, admin or console code).
    import time

    from kanmon.config import load_config
    from kanmon.deliver.local import LocalDelivery
    from kanmon.deliver.sieving import SieveFilter
    from kanmon.deliver.smtp import SmtpDelivery
    from kanmon.dnscache import DnsCache
    from kanmon.model import checked_body
    from kanmon.records.store import Records
    from kanmon.spool.groupcommit import GroupCommitter
    from kanmon.spool.store import CorruptEntry, Spool
    from kanmon.store import index as mindex
    from kanmon.userdb import quiet_directory

    config = load_config(config_source)
    data_dir = Path(config.server.data_dir)
    directory = config.mailbox_index.directory  # where the IMAP cache entries of deliveries go
    mindex.configure(data_dir / "mailboxes", data_dir / directory if directory is not None else None)
    records = Records(data_dir, config.server.hostname, echo=None if quiet else sys.stdout, log=config.log,
                      rotate=False, shared=config.records)
    committer = GroupCommitter(data_dir, fsync=fsync)
    spool = Spool(data_dir, fsync=fsync, committer=committer)
    reader, writer = await asyncio.open_connection(sock=socket.socket(fileno=fd), limit=MAX_LINE)
    out = _Writer(writer)

    def queued(queue_id: str, envelope, content: bytes) -> None:
        out.send({"k": "queued", "id": queue_id})

    domains = {d.name: d for d in config.domain}

    def quota_of(domain: str) -> int | None:
        d = domains.get(domain)
        return d.quota if d is not None and d.deliver != "relay" else None

    injectors: list = []

    async def inject(env, content: bytes, origin: str) -> str:
        """A Sieve redirect or vacation reply, through this agent's injector (made at the
        first one: the DKIM signer and its cryptography cost an agent nothing until then)."""
        if not injectors:
            from kanmon.auth.dkimsign import load_signer  # noqa: PLC0415
            from kanmon.queue.inject import Injector  # noqa: PLC0415

            injectors.append(Injector(spool, records, queued, hostname=config.server.hostname,
                                      signer=load_signer(config), expand=local_users.expand))
        return await injectors[0].inject(env, content, origin)

    sv = config.sieve
    # The agent's config is the node's of its start (a reload starts new agents).
    local_users = quiet_directory(config)
    local = LocalDelivery(data_dir, committer, quota_of=quota_of, is_mailbox=local_users.wait_deliverable)
    local.sieve = SieveFilter(data_dir, config.server.hostname, inject, records.emit, clock=time.time,
                              settings=lambda: (sv.max_redirects, sv.max_script_size, sv.enabled))
    local.sieve.unknown_local = local_users.is_unknown_local
    dns_cache = DnsCache(config.dns.cache_entries)  # this agent's (SIGUSR1 flushes it)
    remote = SmtpDelivery(config, records.record, data_dir=data_dir, dns_cache=dns_cache)
    remote.on_server_used = lambda dest, used, failed: out.send(
        {"k": "used", "dest": dest, "used": used, "failed": [list(f) for f in failed]})
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task] = set()

    async def deliver(msg: dict) -> None:
        n = msg.get("n")
        qid = str(msg.get("id"))
        try:
            rcpts = [str(r) for r in msg["rcpts"]]
            route = route_from_wire(msg["route"])
            try:
                # A small file (the usual case, in the page cache since the receiver wrote
                # it) is read on the loop: a thread hand-off costs more than the read.
                if os.stat(spool.queue / qid).st_size <= SMALL_READ:
                    env, content = spool.read_message(qid)
                else:
                    env, content = await loop.run_in_executor(None, spool.read_message, qid)
            except FileNotFoundError:
                out.send({"k": "gone", "n": n, "id": qid})
                return
            except CorruptEntry as e:
                out.send({"k": "corrupt", "n": n, "why": str(e)})
                return
            if route.transport == "local":
                results = await local.deliver(env.mail_from, rcpts, content, quota_exempt=env.is_notice,
                                              queue_id=qid)
            else:
                content = checked_body(env, content)  # checked at DATA: the client need not scan it again
                results = await remote.deliver_route(qid, env, rcpts, content, route)
            t = time.time()
            out.send({"k": "done", "n": n, "results": [result_to_wire(r, t) for r in results]})
        except Exception as e:  # noqa: BLE001 - reported like an in-process agent's exception
            out.send({"k": "error", "n": n, "error": f"{type(e).__name__}: {e}"})

    stop = asyncio.Event()
    drain = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, drain.set)  # replaced after a reload: finish, then exit
    loop.add_signal_handler(signal.SIGUSR1, dns_cache.flush)  # `kanmon dns cache flush`

    async def read_requests() -> None:
        while True:
            line = await reader.readline()
            if not line:
                stop.set()  # the main process is gone
                return
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if isinstance(msg, dict) and msg.get("k") == "deliver":
                task = asyncio.ensure_future(deliver(msg))
                tasks.add(task)
                task.add_done_callback(tasks.discard)

    reading = asyncio.ensure_future(read_requests())
    try:
        gcpolicy.settle_after_start()  # what start-up built, out of the collector's sight
        out.send({"k": "ready"})
        waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(drain.wait())]
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for w in waits:
            w.cancel()
        if drain.is_set() and not stop.is_set():
            # The main process sends nothing new; what is in flight finishes and is reported.
            end = asyncio.ensure_future(stop.wait())
            while tasks and not stop.is_set():
                await asyncio.wait([*tasks, end], return_when=asyncio.FIRST_COMPLETED)
            end.cancel()
    finally:
        reading.cancel()
        for task in list(tasks):
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        try:
            await asyncio.sleep(0)  # the last batch of lines
            await writer.drain()
        except (ConnectionError, OSError):
            pass
        with contextlib.suppress(Exception):
            await remote.close()
        writer.close()
        spool.close()
        committer.close()
        try:
            records.close()
        except Exception as e:  # noqa: BLE001 - the last events are in the spill journal
            print(f"kanmon agent: records: {e}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kanmon.agent", description="kanmon delivery agent process")
    ap.add_argument("--config")
    ap.add_argument("--index", type=int, default=0)
    ap.add_argument("--fd", type=int, required=True)
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--no-fsync", action="store_true")
    args = ap.parse_args(argv)
    die_with_parent()
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    try:
        runner(_serve(args.config, args.fd, args.index, args.quiet, not args.no_fsync))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
