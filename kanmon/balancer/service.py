"""The balancer service: virtual addresses in front of real servers, health-checked.

Role: what `kanmon serve` runs for a [balancer] section. BalancerService binds one
listener per virtual server, runs the health checks of its real servers, splices each
client connection to the real server its Pool chooses (optionally opening with a PROXY
v2 header that carries the client's address), reports state changes (down, up,
failover, failback) to the event log and to the `ha` alert (one alert per incident,
resolved by its recovery), and keeps
<data_dir>/balancer-status.json current for `kanmon balance status`.

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
from pathlib import Path
from typing import Any, Protocol

from kanmon.balancer import health
from kanmon.balancer.pool import Pool, PoolEvent, RealServerState, address_text
from kanmon.balancer.splice import End, Link
from kanmon.balancer.status import FORMAT_VERSION, status_path, write_status
from kanmon.config import Config, ConfigError, VirtualServer
from kanmon.smtp.proxy_protocol import build_proxy_v2

log = logging.getLogger("kanmon.balancer")

ALERT_CATEGORY = "ha"
# Repeated per-connection problems (connect refused, nothing available) are logged at
# most once per this many seconds per virtual server and kind, with a count.
NOTICE_INTERVAL = 10.0
STOP_GRACE = 2.0  # seconds open connections get to close on stop before they are aborted


class Emit(Protocol):
    def __call__(self, text: str, queue_id: str | None = None) -> None: ...


# alert(category, key, text, resolved): the key names one incident (a real server down,
# a failover, all servers down); resolved=True ends that incident.
Alert = Callable[[str, str, str, bool], None]


def incidents(vs_name: str, event: PoolEvent, real: RealServerState | None, tier: str) -> list[tuple[str, bool]]:
    """The alert keys of a pool event's incidents, each with whether the event resolves it."""
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
        raise ConfigError(problems)


@dataclass(eq=False)
class _Virtual:
    """One virtual server at run time."""

    index: int
    pool: Pool
    server: asyncio.Server | None = None
    links: set[Link] = field(default_factory=set)
    notices: dict[str, tuple[float, int]] = field(default_factory=dict)  # kind -> (last emitted, suppressed)

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
    ):
        validate_balancer(config, privileges=False)
        self.config = config
        self._emit = emit
        self._alert = alert
        self._status_interval = status_interval
        self._status_file = status_path(config.server.data_dir)
        self._virtuals: list[_Virtual] = []
        self._main: asyncio.Task[None] | None = None
        self._tg: asyncio.TaskGroup | None = None
        self._ready: asyncio.Event | None = None
        self._changed: asyncio.Event | None = None
        self._all_finished: asyncio.Event | None = None
        self._started_at = 0.0
        self._state = "new"  # new -> running -> stopped

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
        """The document the status file holds (also for the web console)."""
        return {
            "format": FORMAT_VERSION,
            "pid": os.getpid(),
            "running": self._state == "running",
            "started_at": self._started_at,
            "updated_at": time.time(),
            "virtual_servers": [v.pool.snapshot() for v in self._virtuals],
        }

    async def start(self) -> None:
        """Bind every virtual address and start the checks.

        Raises ConfigError (a ping check without ICMP privilege) or OSError (an address
        cannot be bound; nothing stays bound then).
        """
        if self._state != "new":
            raise RuntimeError("BalancerService.start() called twice")
        validate_balancer(self.config)
        assert self.config.balancer is not None
        loop = asyncio.get_running_loop()
        self._started_at = now = time.time()
        self._virtuals = [
            _Virtual(i, Pool.from_config(vs, now)) for i, vs in enumerate(self.config.balancer.virtual_server)
        ]
        self._ready, self._changed, self._all_finished = asyncio.Event(), asyncio.Event(), asyncio.Event()
        self._all_finished.set()
        try:
            for v in self._virtuals:
                host, port = v.vs.listen
                try:
                    v.server = await loop.create_server(
                        lambda v=v: End(Link(v.vs.idle_timeout, self._on_client(v), self._on_finish(v)), "client"),
                        host,
                        port,
                        reuse_address=True,
                        start_serving=False,  # not before the task group can take connections
                    )
                except OSError as e:
                    raise OSError(
                        e.errno, f"balancer {v.vs.name}: cannot listen on {address_text(v.vs.listen)}: {e.strerror or e}"
                    ) from e
        except BaseException:
            for v in self._virtuals:
                if v.server is not None:
                    v.server.close()
                    await v.server.wait_closed()
                    v.server = None
            self._state = "stopped"
            raise
        self._state = "running"
        self._main = asyncio.create_task(self._run(), name="kanmon-balancer")
        await self._ready.wait()
        for v in self._virtuals:
            assert v.server is not None
            await v.server.start_serving()
        for v in self._virtuals:
            vs = v.vs
            reals = ", ".join(f"{s.address} ({s.mode})" for s in v.pool.servers)
            self._say(f"balancer {vs.name}: listening on {address_text(vs.listen)}, method {vs.method}, "
                      f"{vs.health.type} checks every {vs.health.interval:g}s; real servers {reals}")

    async def stop(self) -> None:
        """Stop listening, stop the checks, close open connections (aborted after a grace)."""
        if self._state != "running":
            self._state = "stopped"
            return
        self._state = "stopping"
        for v in self._virtuals:
            if v.server is not None:
                v.server.close()
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
        for v in self._virtuals:
            if v.server is not None:
                try:
                    async with asyncio.timeout(STOP_GRACE):
                        await v.server.wait_closed()
                except TimeoutError:
                    pass
        self._state = "stopped"
        self._write_status()
        self._say("balancer: stopped")

    # -- tasks -------------------------------------------------------------------

    async def _run(self) -> None:
        assert self._ready is not None
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            for v in self._virtuals:
                for real in v.pool.checked_servers():
                    tg.create_task(self._check_loop(v, real), name=f"check {v.vs.name} {real.address}")
            tg.create_task(self._status_loop(), name="balancer status")
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

    def _write_status(self) -> None:
        try:
            self._status_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            write_status(self._status_file, self.status())
        except OSError as e:
            log.warning("balancer: cannot write %s: %s", self._status_file, e)

    # -- connections -----------------------------------------------------------------

    def _on_client(self, v: _Virtual) -> Callable[[Link], None]:
        def on_client(link: Link) -> None:
            if self._tg is None or self._state != "running":
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
        client, virtual = link.client_address, link.virtual_address
        if client is None or virtual is None or link.finished:
            link.close()
            return
        plan = v.pool.plan(client[0])
        if not plan:
            self._notice(v, "none", f"no real server can take a connection (serving tier: {v.pool.tier}); "
                         f"closed the connection from {address_text(client)}")
            link.close()
            return
        header = build_proxy_v2(client, virtual) if v.vs.proxy_protocol else b""
        loop = asyncio.get_running_loop()
        for n, real in enumerate(plan):
            if link.finished:
                return
            if n > 0 and (real.state != "up" or not real.has_capacity()):
                continue
            link.reserve(real)
            host, port = real.config.address
            try:
                async with asyncio.timeout(v.vs.connect_timeout):
                    _, end = await loop.create_connection(
                        lambda: End(link, "server", header), host, port, local_addr=source_address(v.vs, host)
                    )
            except (OSError, TimeoutError) as e:
                link.release()
                link.real = None
                link.server = None
                real.failed_connects += 1
                why = "timed out" if isinstance(e, TimeoutError) else (e.strerror or str(e))
                self._notice(v, f"connect {real.address}", f"connect to real server {real.address} failed: {why}")
                continue
            if link.finished:
                end.close()
                return
            real.total_connections += 1
            link.server_connected(end)
            return
        self._notice(v, "all-failed", f"no real server accepted the connection from {address_text(client)}; closed it")
        link.close()

    # -- events ----------------------------------------------------------------------

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

    def _notice(self, v: _Virtual, kind: str, text: str) -> None:
        """A rate-limited event-log line for per-connection trouble."""
        now = time.monotonic()
        last, suppressed = v.notices.get(kind, (float("-inf"), 0))
        if now - last < NOTICE_INTERVAL:
            v.notices[kind] = (last, suppressed + 1)
            return
        more = f" (and {suppressed} more like it in the last {NOTICE_INTERVAL:g}s)" if suppressed else ""
        v.notices[kind] = (now, 0)
        self._say(f"balancer {v.vs.name}: {text}{more}")
