"""The balancer service: virtual addresses in front of real servers, health-checked.

Role: what `kanmon serve` runs for a [balancer] section. BalancerService binds one
listener per virtual server, runs the health checks of its real servers, splices each
client connection to the real server its Pool chooses (optionally opening with a PROXY
v2 header that carries the client's address), reports state changes (down, up,
failover, failback, an administrator's mode) to the event log and to the `ha` alert (one
alert per incident, resolved by its recovery), and keeps
<data_dir>/balancer-status.json current for `kanmon balance status`. set_mode() is
`kanmon balance set` and the console's drain button; the modes it sets are kept in
<data_dir>/balancer-modes.json across reloads and restarts. With `[balancer] processes`
above 1 it also starts forwarding processes (kanmon.balancer.workers) on the same
listening sockets and publishes the health state to them (kanmon.balancer.shared); in
such a process the same class runs with a Forwarder: no checks, no files.

Trusts: the validated Config. Nothing from clients or real servers: their bytes are
copied, not read (splice.py); check replies are bounded (health.py).

Never: run a task outside its TaskGroup, await the network without a timeout, keep a
client whose real server is gone, or start when the config cannot work (ping without
the privilege for an ICMP socket is a ConfigError at start, not a check that always fails).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from kanmon.balancer import health
from kanmon.balancer.pool import Pool, PoolEvent, RealServerState, address_text
from kanmon.balancer.shared import SharedTable
from kanmon.balancer.splice import End, Link
from kanmon.balancer.workers import Forwarder, WorkerPool, can_fork_workers
from kanmon.balancer.status import FORMAT_VERSION, read_admin_modes, status_path, write_admin_modes, write_status
from kanmon.smtp.proxy_protocol import build_proxy_v2

if TYPE_CHECKING:  # a forwarding process gets its settings as plain values (kanmon.balancer.forwarder)
    from kanmon.config import BalancerSection, Config, VirtualServer

log = logging.getLogger("kanmon.balancer")

ALERT_CATEGORY = "ha"
# Repeated per-connection problems (connect refused, nothing available) are logged at
# most once per this many seconds per virtual server and kind, with a count.
NOTICE_INTERVAL = 10.0
STOP_GRACE = 2.0  # seconds open connections get to close on stop before they are aborted
COUNTS_INTERVAL = 0.5  # a forwarding process publishes its byte and connection totals this often


def _write_open(table: SharedTable, slot: int, index: int, real: RealServerState) -> None:
    table.write_connections(slot, index, real.connections)


def _time_out(task: asyncio.Task[None] | None, timed_out: list[bool]) -> None:
    if task is not None and not task.done():
        timed_out.append(True)
        task.cancel()


def _client_text(link: Link) -> str:
    client = link.client_address
    return address_text(client) if client is not None else "a client"


class Emit(Protocol):
    def __call__(self, text: str, queue_id: str | None = None) -> None: ...


# alert(category, key, text, resolved): the key names one incident (a real server down,
# a failover, all servers down); resolved=True ends that incident.
Alert = Callable[[str, str, str, bool], None]


def incidents(vs_name: str, event: PoolEvent, real: RealServerState | None, tier: str) -> list[tuple[str, bool]]:
    """The alert keys of a pool event's incidents, each with whether the event resolves it."""
    if event.kind == "admin":  # an administrator's choice is no incident (what follows from it may be)
        return []
    if event.kind in ("down", "up") and real is not None:
        return [(f"{vs_name} real server {real.address}", event.kind == "up")]
    if event.kind in ("failover", "failback"):
        return [(f"{vs_name} failover", event.kind == "failback")]
    if event.kind == "all-down":
        return [(f"{vs_name} no real server up", False)]
    # restored: serving again; straight back on an active server also ends a failover
    # that was outstanding when the standby servers went down too.
    out = [(f"{vs_name} no real server up", True)]
    if tier == "active":
        out.append((f"{vs_name} failover", True))
    return out


def source_address(vs: VirtualServer, real_host: str) -> tuple[str, int] | None:
    """The address our connections to a real server leave from: the virtual address.

    The real servers see the balancer as the virtual server's IP (what they list in
    smtp.trusted_proxies), not as whatever source the kernel would pick. Only when
    the virtual address is a specific IP of the real server's family; otherwise the
    kernel chooses.
    """
    try:
        listen = ipaddress.ip_address(vs.listen[0])
        real = ipaddress.ip_address(real_host)
    except ValueError:
        return None
    if listen.is_unspecified or listen.version != real.version:
        return None
    return (str(listen), 0)


def balancer_config_problems(config: Config) -> list[str]:
    """What makes the [balancer] section unusable beyond what config.py validates."""
    problems: list[str] = []
    if config.balancer is None or not config.balancer.virtual_server:
        return ["balancer: no [[balancer.virtual_server]] is configured"]
    names: dict[str, int] = {}
    listens: dict[tuple[str, int], int] = {}
    for i, vs in enumerate(config.balancer.virtual_server):
        key = f"balancer.virtual_server[{i}]"
        if vs.name in names:
            problems.append(f"{key}.name: {vs.name!r} is also the name of virtual_server[{names[vs.name]}]")
        names.setdefault(vs.name, i)
        if vs.listen in listens:
            problems.append(f"{key}.listen: {address_text(vs.listen)} is also used by virtual_server[{listens[vs.listen]}]")
        listens.setdefault(vs.listen, i)
        if not any(rs.mode != "disabled" for rs in vs.real):
            problems.append(f"{key}.real: needs at least one real server with mode \"active\" or \"standby\"")
        seen: dict[tuple[str, int], int] = {}
        for j, rs in enumerate(vs.real):
            if rs.address == vs.listen:
                problems.append(f"{key}.real[{j}].address: is the virtual address itself (a loop)")
            if rs.address in seen:
                problems.append(f"{key}.real[{j}].address: {address_text(rs.address)} is also real[{seen[rs.address]}]")
            seen.setdefault(rs.address, j)
    return problems


def balancer_privilege_problems(config: Config) -> list[str]:
    """ping checks need an ICMP socket; say so, naming the key, when we cannot open one."""
    problems: list[str] = []
    if config.balancer is None:
        return problems
    for i, vs in enumerate(config.balancer.virtual_server):
        if vs.health.type != "ping":
            continue
        families = {socket.AF_INET6 if ":" in rs.address[0] else socket.AF_INET for rs in vs.real if rs.mode != "disabled"}
        for family in sorted(families):
            why = health.icmp_privilege_error(family)
            if why:
                problems.append(f'balancer.virtual_server[{i}].health.type: "ping": {why}')
    return problems


def validate_balancer(config: Config, *, privileges: bool = True) -> None:
    """Raise ConfigError naming each key that keeps the balancer from working."""
    problems = balancer_config_problems(config)
    if privileges and not problems:
        problems = balancer_privilege_problems(config)
    if problems:
        from kanmon.config import ConfigError  # noqa: PLC0415 - not loaded by a forwarding process

        raise ConfigError(problems)


def forwarder_spec(balancer: BalancerSection) -> dict[str, Any]:
    """What a forwarding process needs of [balancer]: the validated values (addresses as
    [host, port], durations in seconds), which it uses as they are, without the config
    models (kanmon.balancer.forwarder.settings)."""
    return {"virtual_server": [vs.model_dump(mode="json") for vs in balancer.virtual_server],
            "backlog": balancer.backlog, "splice": balancer.splice}


@dataclass(eq=False)
class _Virtual:
    """One virtual server at run time."""

    index: int
    pool: Pool
    server: asyncio.Server | None = None
    links: set[Link] = field(default_factory=set)
    notices: dict[str, tuple[float, int]] = field(default_factory=dict)  # kind -> (last emitted, suppressed)
    sources: dict[str, tuple[str, int] | None] = field(default_factory=dict)  # real host -> source_address()
    # Set at start: the callbacks of its links, and whether a connection needs the
    # client's address before it is connected (PROXY header, source-ip-hash).
    on_client: Callable[[Link], None] | None = None
    on_finish: Callable[[Link], None] | None = None
    wants_client: bool = False

    def source(self, real_host: str) -> tuple[str, int] | None:
        """source_address() of a real server, worked out once (not per connection)."""
        try:
            return self.sources[real_host]
        except KeyError:
            found = self.sources[real_host] = source_address(self.vs, real_host)
            return found

    @property
    def vs(self) -> VirtualServer:
        return self.pool.vs


class BalancerService:
    """Virtual servers of config.balancer, for `kanmon serve`.

    emit(text, queue_id=None) writes an event-log line; alert(category, key, text,
    resolved), when given, raises (or resolves) an alert of category "ha" for each state change.
    """

    def __init__(
        self,
        config: Config,
        emit: Emit,
        alert: Alert | None = None,
        *,
        status_interval: float = 1.0,
        forwarder: Forwarder | None = None,
    ):
        """forwarder: this service is one of the forwarding processes of a balancer with
        `processes` > 1 (kanmon.balancer.worker): it accepts on the sockets it was given
        and follows the shared table; it runs no checks and writes no files."""
        validate_balancer(config, privileges=False)
        self.config = config
        self._forwarder = forwarder
        self._table: SharedTable | None = forwarder.table if forwarder is not None else None
        self._slot = forwarder.slot if forwarder is not None else 0
        self._workers: WorkerPool | None = None
        self._needs_others = False
        self._splice = bool(config.balancer is not None and config.balancer.splice)
        self._emit = emit
        self._alert = alert
        self._status_interval = status_interval
        self._status_file = status_path(config.server.data_dir)
        self._data_dir = Path(config.server.data_dir)
        self._virtuals: list[_Virtual] = []
        self._pool_list: list[Pool] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._main: asyncio.Task[None] | None = None
        self._tg: asyncio.TaskGroup | None = None
        self._ready: asyncio.Event | None = None
        self._changed: asyncio.Event | None = None
        self._all_finished: asyncio.Event | None = None
        self._started_at = 0.0
        self._state = "new"  # new -> running -> (retiring ->) stopped
        self._background: list[asyncio.Task[None]] = []  # checks, status, counts: what retire() ends first
        self._retired: asyncio.Event | None = None  # set when a retiring service's connections are all done

    # -- public ------------------------------------------------------------------

    @property
    def status_file(self) -> Path:
        return self._status_file

    def listening(self) -> dict[str, list[tuple[str, int]]]:
        """Virtual server name -> the addresses its listener is bound to."""
        out: dict[str, list[tuple[str, int]]] = {}
        for v in self._virtuals:
            socks = v.server.sockets if v.server is not None else ()
            out[v.vs.name] = [tuple(s.getsockname()[:2]) for s in socks]  # type: ignore[misc]
        return out

    def status(self) -> dict[str, Any]:
        """The document the status file holds (also for the web console); with several
        processes, the counts are those of all of them."""
        virtual_servers = [v.pool.snapshot() for v in self._virtuals]
        if self._table is not None and self._forwarder is None:
            others = iter(self._table.totals(self._slot))
            for vs in virtual_servers:
                for server in vs["servers"]:  # type: ignore[union-attr]
                    for key, n in zip(("connections", "total_connections", "failed_connects", "bytes_in", "bytes_out"),
                                      next(others)):
                        server[key] += n
        return {
            "format": FORMAT_VERSION,
            "pid": os.getpid(),
            "processes": 1 + (self._workers.count if self._workers is not None else 0),
            "running": self._state == "running",
            "started_at": self._started_at,
            "updated_at": time.time(),
            "virtual_servers": virtual_servers,
        }

    async def start(self, replacing: BalancerService | None = None) -> None:
        """Bind every virtual address and start the checks.

        replacing: the running service a reload replaces. A virtual address it listens on
        is taken over (a duplicate of its listening socket: nothing queued in the kernel
        is lost, no connection is refused meanwhile); the caller then retire()s it.
        Raises ConfigError (a ping check without ICMP privilege) or OSError (an address
        cannot be bound; nothing stays bound then, and `replacing` is untouched).
        """
        if self._state != "new":
            raise RuntimeError("BalancerService.start() called twice")
        validate_balancer(self.config, privileges=self._forwarder is None)  # checks run in the main process
        assert self.config.balancer is not None
        loop = asyncio.get_running_loop()
        self._started_at = now = time.time()
        self._virtuals = [
            _Virtual(i, Pool.from_config(vs, now)) for i, vs in enumerate(self.config.balancer.virtual_server)
        ]
        self._ready, self._changed, self._all_finished = asyncio.Event(), asyncio.Event(), asyncio.Event()
        self._retired = asyncio.Event()
        self._all_finished.set()
        taken = replacing.listening_sockets() if replacing is not None else {}
        balancer = self.config.balancer
        self._needs_others = any(v.vs.method == "least-session" or any(r.max_connections for r in v.vs.real)
                                 for v in self._virtuals)
        kept = [] if self._forwarder is not None else self._restore_admin_modes(now)
        processes = balancer.processes or (os.cpu_count() or 1)
        if self._forwarder is None and processes > 1 and can_fork_workers():
            servers = sum(len(v.pool.servers) for v in self._virtuals)
            self._table = SharedTable.create(servers, processes)
            self._table.publish(self._pools())
        self._pool_list = self._pools()
        self._loop = loop
        for v in self._virtuals:
            v.on_client, v.on_finish = self._on_client(v), self._on_finish(v)
            v.wants_client = v.vs.proxy_protocol or v.vs.method == "source-ip-hash"
        if self._table is not None:
            self._share_open_counts()
        try:
            for v in self._virtuals:
                host, port = v.vs.listen
                factory = partial(self._client_end, v)
                try:
                    if self._forwarder is not None:
                        v.server = await loop.create_server(factory, sock=self._forwarder.sockets[v.index],
                                                            backlog=balancer.backlog, start_serving=False)
                    elif v.vs.listen in taken:
                        sock = socket.socket(fileno=os.dup(taken[v.vs.listen]))
                        sock.setblocking(False)
                        try:
                            v.server = await loop.create_server(factory, sock=sock, backlog=balancer.backlog,
                                                                start_serving=False)
                        except BaseException:
                            sock.close()
                            raise
                    else:
                        v.server = await loop.create_server(factory, host, port, reuse_address=True,
                                                            backlog=balancer.backlog,
                                                            start_serving=False)  # not before the task group runs
                except OSError as e:
                    raise OSError(
                        e.errno, f"balancer {v.vs.name}: cannot listen on {address_text(v.vs.listen)}: {e.strerror or e}"
                    ) from e
            if self._table is not None and self._forwarder is None:
                sockets = [v.server.sockets[0] for v in self._virtuals]  # type: ignore[union-attr]
                self._workers = WorkerPool(self._table, sockets, self._worker_spec(), processes - 1, self._say,
                                           self._worker_notice)
        except BaseException:
            if self._workers is not None:
                await self._workers.stop()
                self._workers = None
            for v in self._virtuals:
                if v.server is not None:
                    v.server.close()
                    await v.server.wait_closed()
                    v.server = None
            if self._table is not None and self._forwarder is None:
                self._table.close()
                self._table = None
            self._state = "stopped"
            raise
        self._state = "running"
        self._main = asyncio.create_task(self._run(), name="kanmon-balancer")
        await self._ready.wait()
        for v in self._virtuals:
            assert v.server is not None
            await v.server.start_serving()
        if self._forwarder is not None:
            return
        if self._workers is not None:
            self._workers.start()
            self._say(f"balancer: {processes} processes accept and forward (pids {os.getpid()}, "
                      f"{', '.join(str(p) for p in self._workers.pids())}), sharing the health state")
        for v in self._virtuals:
            vs = v.vs
            reals = ", ".join(f"{s.address} ({s.mode})" for s in v.pool.servers)
            self._say(f"balancer {vs.name}: listening on {address_text(vs.listen)}, method {vs.method}, "
                      f"{vs.health.type} checks every {vs.health.interval:g}s; real servers {reals}")
        for text in kept:
            self._say(text)

    def listening_sockets(self) -> dict[tuple[str, int], int]:
        """Configured virtual address -> the descriptor of its listening socket (for the
        service a reload starts in this one's place: start(replacing=))."""
        out: dict[tuple[str, int], int] = {}
        for v in self._virtuals:
            if v.server is not None and v.server.sockets:
                out[v.vs.listen] = v.server.sockets[0].fileno()
        return out

    def open_connections(self) -> int:
        """Connections open now, in every process of this service."""
        return sum(s["connections"] for vs in self.status()["virtual_servers"] for s in vs["servers"])  # type: ignore[index]

    async def retire(self) -> None:
        """A reload replaced this service: stop accepting (the new service has the
        listening sockets) and stop the checks and the status file (the new service's
        now), but let every open connection run to its end, in this process and in the
        forwarding processes (each still bounded by idle_timeout); then stop. stop()
        during this closes what is left, as at a node stop."""
        if self._state != "running":
            return
        self._state = "retiring"
        for v in self._virtuals:
            if v.server is not None:
                v.server.close()  # this service's descriptor only: the new service listens on its own
        for task in self._background:
            task.cancel()
        if self._forwarder is None:
            open_now = self.open_connections()
            self._say(f"balancer: reload: the previous configuration takes no new connections; "
                      f"its {open_now} open connection(s) run to their end")
        assert self._all_finished is not None and self._retired is not None
        workers = asyncio.ensure_future(self._workers.retire()) if self._workers is not None else None
        try:
            await self._all_finished.wait()
            if workers is not None:
                await workers
        finally:
            if workers is not None and not workers.done():
                workers.cancel()
        if self._state != "retiring":
            return  # stop() took over
        self._retired.set()
        if self._main is not None:
            try:
                await self._main
            except Exception:  # a bug in a task; stopping goes on
                log.exception("balancer: its task group failed")
        await self._close_servers()
        self._state = "stopped"
        if self._table is not None and self._forwarder is None:
            self._table.close()
            self._table = None
        if self._forwarder is None:
            self._say("balancer: the previous configuration's connections have all ended; it stopped")

    async def _close_servers(self) -> None:
        for v in self._virtuals:
            if v.server is not None:
                try:
                    async with asyncio.timeout(STOP_GRACE):
                        await v.server.wait_closed()
                except TimeoutError:
                    pass

    async def stop(self) -> None:
        """Stop listening, stop the checks, close open connections (aborted after a grace)."""
        if self._state not in ("running", "retiring"):
            self._state = "stopped"
            return
        retiring = self._state == "retiring"
        self._state = "stopping"
        for v in self._virtuals:
            if v.server is not None:
                v.server.close()
        if self._workers is not None:
            await self._workers.stop()
        if self._main is not None:
            self._main.cancel()
            try:
                await self._main
            except asyncio.CancelledError:
                pass
            except Exception:  # a bug in a check or status task; stopping goes on
                log.exception("balancer: its task group failed")
        links = [link for v in self._virtuals for link in v.links]
        for link in links:
            link.close()
        assert self._all_finished is not None
        try:
            async with asyncio.timeout(STOP_GRACE):
                await self._all_finished.wait()
        except TimeoutError:
            for v in self._virtuals:
                for link in list(v.links):
                    link.abort()
            try:
                async with asyncio.timeout(STOP_GRACE):
                    await self._all_finished.wait()
            except TimeoutError:
                log.error("balancer: %d connections did not close on stop", sum(len(v.links) for v in self._virtuals))
        await self._close_servers()
        self._state = "stopped"
        if self._forwarder is not None:
            return
        if not retiring:  # a retired service's file is its successor's
            self._write_status()
        if self._table is not None:
            self._table.close()
            self._table = None
        self._say("balancer: stopped")

    def set_mode(self, virtual: str, real: str, mode: str, by: str = "an administrator") -> dict[str, Any]:
        """Set real server `real` (ip:port as status shows it) of virtual server `virtual`
        to "disabled" (drain), "standby" or "enabled" (its configured mode) without a
        config change. New connections follow at once; open ones finish where they are.
        The choice is kept in <data_dir>/balancer-modes.json, so a reload or a restart
        keeps it (see docs/balancer.md). Raises LookupError (no such virtual or real
        server) or ValueError (a mode that cannot be set); returns the server's snapshot.
        """
        if self._state != "running":
            raise LookupError("the balancer is not running")
        v = next((v for v in self._virtuals if v.vs.name == virtual), None)
        if v is None:
            raise LookupError(f"no virtual server {virtual!r} (there are: {', '.join(x.vs.name for x in self._virtuals)})")
        server = v.pool.find(real)
        if server is None:
            raise LookupError(f"virtual server {virtual!r} has no real server {real!r} "
                              f"(it has: {', '.join(s.address for s in v.pool.servers)})")
        events = v.pool.set_mode(server, mode, time.time(), by)
        if events:
            self._publish()
            self._save_admin_modes()
            for event in events:
                self._event(event, v, server)
        return {"virtual_server": virtual, "changed": bool(events), **server.snapshot()}

    def real_modes(self) -> dict[str, dict[str, str]]:
        """virtual server name -> {real server address: the mode in effect} (an
        administrator's where one is set, else the configured one)."""
        return {v.vs.name: {s.address: s.mode for s in v.pool.servers} for v in self._virtuals}

    def admin_modes(self) -> dict[str, dict[str, str]]:
        """virtual server name -> {real server address: administrator's mode}."""
        return {v.vs.name: modes for v in self._virtuals if (modes := v.pool.admin_modes())}

    def _save_admin_modes(self) -> None:
        try:
            write_admin_modes(self._data_dir, {
                v.vs.name: {s.address: {"mode": s.admin_mode, "since": s.admin_since}
                            for s in v.pool.servers if s.admin_mode is not None}
                for v in self._virtuals
            })
        except OSError as e:
            self._say(f"balancer: cannot keep the administrator's modes in {self._data_dir}: {e.strerror or e}; "
                      "they hold until the balancer restarts")

    def _restore_admin_modes(self, now: float) -> list[str]:
        """Apply the modes an administrator set before this start (a reload or restart);
        returns the event lines saying so. Entries for servers no longer configured, or
        configured as disabled, are dropped (and said)."""
        saved, problem = read_admin_modes(self._data_dir)
        lines = [f"balancer: {problem}; the configured modes apply"] if problem else []
        dropped = False
        for name, servers in saved.items():
            v = next((v for v in self._virtuals if v.vs.name == name), None)
            for address, entry in servers.items():
                server = v.pool.find(address) if v is not None else None
                mode = entry.get("mode")
                if server is None or server.config.mode == "disabled" or mode not in ("disabled", "standby") \
                        or mode == server.config.mode:
                    dropped = True
                    lines.append(f"balancer {name}: the administrator's mode {mode!r} for real server {address} is "
                                 "dropped: the configuration no longer has it as an active or standby server")
                    continue
                server.admin_mode = mode
                since = entry.get("since")
                server.admin_since = since if isinstance(since, (int, float)) else now
                lines.append(f"balancer {name}: real server {address} stays {mode}, as an administrator set it "
                             f"(configured {server.config.mode}; `kanmon balance set {name} {address} enabled` "
                             "gives it back)")
        for v in self._virtuals:
            v.pool.settle_tier()
        if dropped:
            self._save_admin_modes()
        return lines

    # -- tasks -------------------------------------------------------------------

    async def _run(self) -> None:
        assert self._ready is not None and self._retired is not None
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            if self._forwarder is not None:
                self._background.append(tg.create_task(self._counts_loop(), name="balancer counts"))
            else:
                for v in self._virtuals:
                    for real in v.pool.checked_servers():
                        self._background.append(
                            tg.create_task(self._check_loop(v, real), name=f"check {v.vs.name} {real.address}"))
                self._background.append(tg.create_task(self._status_loop(), name="balancer status"))
            # Holds the group open while a retiring service's connections finish (their
            # connect tasks are its tasks too); stop() cancels it with the rest.
            tg.create_task(self._retired.wait(), name="balancer retiring")
            self._ready.set()
        self._tg = None

    async def _check_loop(self, v: _Virtual, real: RealServerState) -> None:
        hc = v.vs.health
        while True:
            try:
                result = await health.run_check(
                    hc,
                    real.config.address,
                    send_proxy_local=v.vs.proxy_protocol,
                    source=source_address(v.vs, real.config.address[0]),
                )
            except Exception as e:  # run_check should not raise; a bug must not stop checking
                log.exception("balancer: health check of %s crashed", real.address)
                result = health.CheckResult(False, f"check failed: {e!r}")
            events = v.pool.record_check(real, result.ok, result.detail, result.rtt, time.time())
            self._publish()
            for event in events:
                self._event(event, v, real)
            await asyncio.sleep(hc.interval)

    async def _status_loop(self) -> None:
        assert self._changed is not None
        while True:
            self._write_status()
            try:
                async with asyncio.timeout(self._status_interval):
                    await self._changed.wait()
            except TimeoutError:
                pass
            self._changed.clear()

    async def _counts_loop(self) -> None:
        """A forwarding process: its counts into the shared table for the status."""
        assert self._table is not None
        while True:
            self._table.write_counts(self._slot, self._pools())
            await asyncio.sleep(COUNTS_INTERVAL)

    def _pools(self) -> list[Pool]:
        return [v.pool for v in self._virtuals]

    def _publish(self) -> None:
        """The main process of several: health, modes and rtt to the forwarding processes."""
        if self._table is not None and self._forwarder is None:
            self._table.publish(self._pools())

    def _share_open_counts(self) -> None:
        """Each change of a server's open connections goes to the shared table at once
        (max_connections and least-session count every process's connections)."""
        table, slot = self._table, self._slot
        assert table is not None
        index = 0
        for v in self._virtuals:
            for real in v.pool.servers:
                # Only where another process decides by them; else the counts loop (a
                # forwarding process) publishes them with the totals, for the status.
                if self._needs_others:
                    real.on_open_changed = partial(_write_open, table, slot, index)
                index += 1
        if self._forwarder is not None:
            table.load_counts(slot, self._pools())  # a process started again goes on from its predecessor's totals

    def _worker_spec(self) -> dict[str, Any]:
        """What a forwarding process needs of the config (kanmon.balancer.forwarder)."""
        assert self.config.balancer is not None
        return forwarder_spec(self.config.balancer)

    def _write_status(self) -> None:
        try:
            self._status_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            write_status(self._status_file, self.status())
        except OSError as e:
            log.warning("balancer: cannot write %s: %s", self._status_file, e)

    # -- connections -----------------------------------------------------------------

    def _client_end(self, v: _Virtual) -> End:
        return End(Link(v.vs.idle_timeout, v.on_client, v.on_finish, self._splice, self._loop), "client")

    def _on_client(self, v: _Virtual) -> Callable[[Link], None]:
        def on_client(link: Link) -> None:
            # "retiring": accepted just before the listener closed; it runs like the others
            if self._tg is None or self._state not in ("running", "retiring"):
                link.close()
                return
            v.links.add(link)
            assert self._all_finished is not None
            self._all_finished.clear()
            try:
                link.connect_task = self._tg.create_task(self._connect(v, link))
            except RuntimeError:  # the task group is shutting down
                link.close()

        return on_client

    def _on_finish(self, v: _Virtual) -> Callable[[Link], None]:
        def on_finish(link: Link) -> None:
            v.links.discard(link)
            if self._all_finished is not None and not any(x.links for x in self._virtuals):
                self._all_finished.set()

        return on_finish

    async def _connect(self, v: _Virtual, link: Link) -> None:
        try:
            await self._connect_to_real(v, link)
        except asyncio.CancelledError:
            link.close()
            raise
        except Exception:  # a bug here must cost this connection only
            log.exception("balancer %s: connecting a client failed", v.vs.name)
            link.release()
            link.close()

    async def _connect_to_real(self, v: _Virtual, link: Link) -> None:
        # The client's address is read only where it is used (a PROXY header, a
        # source-ip-hash choice, a notice): this runs for every connection.
        client = link.client_address if v.wants_client else None
        if link.finished or (v.wants_client and client is None):
            link.close()
            return
        if self._table is not None:
            if self._forwarder is not None:
                self._table.refresh(self._pool_list)
            if self._needs_others:
                self._table.others(self._slot, self._pool_list)
        plan = v.pool.plan(client[0] if client is not None else "")
        if not plan:
            self._notice(v, "none", f"no real server can take a connection (serving tier: {v.pool.tier}); "
                         f"closed the connection from {_client_text(link)}")
            link.close()
            return
        if v.vs.proxy_protocol:
            virtual = link.virtual_address
            if client is None or virtual is None:
                link.close()
                return
            header = build_proxy_v2(client, virtual)
        else:
            header = b""
        loop = self._loop
        assert loop is not None
        task = link.connect_task
        for n, real in enumerate(plan):
            if link.finished:
                return
            if n > 0 and (real.state != "up" or not real.has_capacity()):
                continue
            link.reserve(real)
            host, port = real.config.address
            # The connect timeout: a timer that cancels this task, told apart from any
            # other cancel by `timed_out` (as asyncio.timeout, with less work per connection).
            timed_out: list[bool] = []
            timer = loop.call_later(v.vs.connect_timeout, _time_out, task, timed_out)
            failure: OSError | TimeoutError | None = None
            try:
                _, end = await loop.create_connection(
                    lambda: End(link, "server", header), host, port, local_addr=v.source(host)
                )
            except asyncio.CancelledError:
                if not timed_out or task is None or task.uncancel() > 0:
                    raise  # cancelled by the link or the service, not by the timer
                failure = TimeoutError()
            except OSError as err:
                failure = err
            finally:
                timer.cancel()
            if failure is not None:
                link.release()
                link.real = None
                link.server = None
                real.failed_connects += 1
                why = "timed out" if isinstance(failure, TimeoutError) else (failure.strerror or str(failure))
                self._notice(v, f"connect {real.address}", f"connect to real server {real.address} failed: {why}")
                continue
            if link.finished:
                end.close()
                return
            real.total_connections += 1
            link.server_connected(end)
            return
        self._notice(v, "all-failed", f"no real server accepted the connection from {_client_text(link)}; closed it")
        link.close()

    # -- events ----------------------------------------------------------------------

    def _worker_notice(self, index: int, kind: str, text: str, pid: int) -> None:
        """A forwarding process's notice (workers.WorkerPool): under this process's limit."""
        if 0 <= index < len(self._virtuals):
            self._notice(self._virtuals[index], kind, text, pid)

    def _say(self, text: str) -> None:
        try:
            self._emit(text)
        except Exception:
            log.exception("balancer: the event log refused %r", text)

    def _event(self, event: PoolEvent, v: _Virtual, real: RealServerState) -> None:
        self._say(event.text)
        if self._alert is not None:
            try:
                for key, resolved in incidents(v.vs.name, event, real, v.pool.tier):
                    self._alert(ALERT_CATEGORY, key, event.text, resolved)
            except Exception:
                log.exception("balancer: the alert refused %r", event.text)
        if self._changed is not None:
            self._changed.set()

    def _notice(self, v: _Virtual, kind: str, text: str, pid: int | None = None) -> None:
        """A rate-limited event-log line for per-connection trouble. A forwarding process
        hands its notices to the main process, so that one limit holds for all of them;
        pid: the forwarding process whose trouble it was (the log line names it)."""
        if self._forwarder is not None and self._forwarder.notice is not None:
            self._forwarder.notice(v.index, kind, text)
            return
        if pid is not None:
            text = f"{text} (forwarding process pid {pid})"
        now = time.monotonic()
        last, suppressed = v.notices.get(kind, (float("-inf"), 0))
        if now - last < NOTICE_INTERVAL:
            v.notices[kind] = (last, suppressed + 1)
            return
        more = f" (and {suppressed} more like it in the last {NOTICE_INTERVAL:g}s)" if suppressed else ""
        v.notices[kind] = (now, 0)
        self._say(f"balancer {v.vs.name}: {text}{more}")
