"""The balancer on real loopback sockets: 127.0.0.30 is the virtual address, real
servers listen on 127.0.0.31, .32 and .33, clients come from other 127.0.0.x addresses.

Until kanmon's own SMTP server can stand in for MR1/MR2, FakeRelay below is a
banner-speaking TCP server that records every connection, the PROXY header it got and
the HELO name of each session. Nothing here asserts a time: every wait is on a
condition with a bounded deadline.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from kanmon.balancer import health
from kanmon.balancer.service import BalancerService
from kanmon.balancer.splice import HIGH_WATER
from kanmon.config import ConfigError, HealthCheck, parse_config
from kanmon.smtp.proxy_protocol import MAX_HEADER_BYTES, ProxyHeader, parse_proxy_header
from tests.support.kanmon_node import free_port

VIP = "127.0.0.30"
MR1, MR2, MR3 = "127.0.0.31", "127.0.0.32", "127.0.0.33"
DEADLINE = 8.0  # the most any condition may take before the test fails


def run(coro: Awaitable[Any]) -> Any:
    async def bounded() -> Any:
        async with asyncio.timeout(30):
            return await coro

    return asyncio.run(bounded())


async def wait_until(predicate: Callable[[], bool], what: str, deadline: float = DEADLINE) -> None:
    try:
        async with asyncio.timeout(deadline):
            while not predicate():
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"gave up waiting for: {what}") from None


# ---------------------------------------------------------------------------
# A stand-in relay


SETTLE_TURNS = 10  # loop turns from an accepted connection to its handler's first step (~4)


@dataclass
class Conn:
    peer: tuple[str, int]
    proxy: ProxyHeader | None = None
    helo: str | None = None


@dataclass
class FakeRelay:
    host: str
    name: str
    expect_proxy: bool = False
    banner_delay: float = 0.0
    banner: str | None = None  # default "220 <name> ESMTP"
    port: int = 0
    connections: list[Conn] = field(default_factory=list)
    _server: asyncio.Server | None = None
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def sessions(self) -> list[Conn]:
        """Connections that said HELO: clients, not health checks."""
        return [c for c in self.connections if c.helo is not None]

    async def start(self) -> FakeRelay:
        self._server = await asyncio.start_server(self._handle, self.host, self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def kill(self) -> None:
        """Like a crashed process: the listener goes and every connection is reset."""
        assert self._server is not None
        # A connection accepted just before the kill (a health check's) takes a few loop
        # turns (accept, transport, connection_made, the handler's first step) before its
        # handler holds its writer, and Python 3.11's Server.close() during them leaks its
        # socket (the transport's Server._attach fails): stop accepting, let those turns
        # run, then close; the handler's writer is aborted below.
        loop = asyncio.get_running_loop()
        for sock in self._server.sockets:
            loop.remove_reader(sock.fileno())
        for _ in range(SETTLE_TURNS):
            await asyncio.sleep(0)
        self._server.close()
        await self._server.wait_closed()
        self._server = None
        for w in list(self._writers):
            w.transport.abort()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=DEADLINE)

    async def _handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(w)
        peer = w.get_extra_info("peername")
        conn = Conn((peer[0], peer[1]))
        self.connections.append(conn)
        try:
            if self.expect_proxy:
                buf = b""
                while (h := parse_proxy_header(buf)) is None:
                    chunk = await asyncio.wait_for(r.read(MAX_HEADER_BYTES - len(buf)), DEADLINE)
                    if not chunk:
                        return
                    buf += chunk
                conn.proxy = h
                assert buf[h.consumed :] == b"", "the client spoke before the banner"
            if self.banner_delay:
                await asyncio.sleep(self.banner_delay)
            w.write((self.banner or f"220 {self.name} ESMTP") .encode() + b"\r\n")
            while True:
                line = await asyncio.wait_for(r.readline(), DEADLINE)
                if not line:
                    break
                verb = line[:4].upper()
                if verb in (b"HELO", b"EHLO"):
                    conn.helo = line[5:].strip().decode()
                    w.write(f"250 {self.name}\r\n".encode())
                elif verb == b"QUIT":
                    w.write(b"221 2.0.0 bye\r\n")
                    await w.drain()
                    break
                elif verb == b"DROP":
                    w.transport.abort()
                    return
                else:
                    w.write(b"250 2.0.0 ok\r\n")
        except (ConnectionError, TimeoutError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.discard(w)
            w.close()
            self._tasks.discard(task)


# ---------------------------------------------------------------------------
# A client


class Client:
    """An SMTP-ish client through the virtual address, from a chosen 127.0.0.x address."""

    def __init__(self, port: int, source: str = "127.0.0.1"):
        self.port, self.source = port, source
        self.r: asyncio.StreamReader | None = None
        self.w: asyncio.StreamWriter | None = None
        self.banner = ""

    async def open(self) -> str:
        """Connect and read the banner; returns the relay name it shows ('' if closed)."""
        async with asyncio.timeout(DEADLINE):
            self.r, self.w = await asyncio.open_connection(VIP, self.port, local_addr=(self.source, 0))
            self.banner = (await self.r.readline()).decode()
        return self.banner.split(" ")[1] if self.banner.startswith("220 ") else ""

    async def command(self, text: str) -> str:
        assert self.r is not None and self.w is not None
        async with asyncio.timeout(DEADLINE):
            self.w.write(text.encode() + b"\r\n")
            return (await self.r.readline()).decode()

    async def close(self) -> None:
        if self.w is not None:
            self.w.close()
            with contextlib.suppress(ConnectionError):
                await self.w.wait_closed()

    async def session(self, helo: str = "client.example.test") -> str:
        """A whole session: banner, HELO, QUIT. Returns the relay that served it."""
        try:
            name = await self.open()
            if name:
                assert (await self.command(f"HELO {helo}")).startswith("250")
                assert (await self.command("QUIT")).startswith("221")
            return name
        finally:
            await self.close()


# ---------------------------------------------------------------------------
# The service under test


def config_text(tmp_path: Path, vs: str, extra: str = "", processes: int = 1) -> str:
    """processes = 1: these tests follow each connection's choice in one process (the
    forwarding processes of processes > 1 have tests of their own: test_balancer_processes.py)."""
    return f'[server]\ndata_dir = "{tmp_path / "data"}"\n{extra}\n[balancer]\nprocesses = {processes}\n{vs}'


def one_vs(
    port: int,
    reals: list[tuple[FakeRelay, str]],
    method: str = "first-alive",
    health_check: str = '{ type = "smtp", interval = "0.1s", timeout = "1s", retries = 2 }',
    extra_vs: str = "",
    extra_real: dict[int, str] | None = None,
) -> str:
    lines = [
        "[[balancer.virtual_server]]",
        'name = "mail"',
        f'listen = "{VIP}:{port}"',
        f'method = "{method}"',
        f"health = {health_check}",
        extra_vs,
    ]
    for i, (relay, mode) in enumerate(reals):
        lines += ["[[balancer.virtual_server.real]]", f'address = "{relay.address}"', f'mode = "{mode}"']
        if extra_real and i in extra_real:
            lines.append(extra_real[i])
    return "\n".join(lines) + "\n"


@dataclass
class Running:
    service: BalancerService
    events: list[str]
    alerts: list[tuple[str, str, str, bool]]  # (category, key, text, resolved)

    def server(self, index: int) -> dict[str, Any]:
        return self.service.status()["virtual_servers"][0]["servers"][index]

    def saw(self, word: str) -> bool:
        return any(word in e for e in self.events)


@contextlib.asynccontextmanager
async def balancer(tmp_path: Path, vs_text: str, alert: Callable[[str, str, str, bool], None] | None = None,
                   processes: int = 1) -> AsyncIterator[Running]:
    """alert: also hand every alert to this (e.g. a real Alerts' incident)."""
    config = parse_config(config_text(tmp_path, vs_text, processes=processes))
    events: list[str] = []
    alerts: list[tuple[str, str, str, bool]] = []

    def on_alert(cat: str, key: str, text: str, resolved: bool) -> None:
        alerts.append((cat, key, text, resolved))
        if alert is not None:
            alert(cat, key, text, resolved)

    service = BalancerService(config, lambda text, queue_id=None: events.append(text), on_alert)
    await service.start()
    try:
        yield Running(service, events, alerts)
    finally:
        await service.stop()


async def relays(*specs: tuple[str, str], **kw: Any) -> list[FakeRelay]:
    return [await FakeRelay(host, name, **kw).start() for host, name in specs]


async def kill_all(*rs: FakeRelay) -> None:
    for r in rs:
        if r._server is not None:
            await r.kill()


# ---------------------------------------------------------------------------
# Failover and failback


def test_failover_to_standby_and_failback_to_active(tmp_path):
    async def main() -> None:
        mr1, mr2 = await relays((MR1, "mr1"), (MR2, "mr2"))
        port = free_port(VIP)
        async with balancer(tmp_path, one_vs(port, [(mr1, "active"), (mr2, "standby")])) as b:
            for _ in range(5):
                assert await Client(port).session() == "mr1"
            assert mr2.sessions == []

            await mr1.kill()
            await wait_until(lambda: b.saw("failover"), "the failover event")
            assert b.server(0)["state"] == "down"
            down = [e for e in b.events if "is down" in e]
            assert down and "127.0.0.31" in down[0] and "2 failed smtp checks" in down[0]
            refused_before = b.server(0)["failed_connects"]
            for _ in range(5):
                assert await Client(port).session() == "mr2"
            # After the failover no new connection even tried the dead server.
            assert b.server(0)["failed_connects"] == refused_before

            await mr1.start()  # same address and port
            await wait_until(lambda: b.saw("failback"), "the failback event")
            assert b.server(0)["state"] == "up"
            for _ in range(5):
                assert await Client(port).session() == "mr1"
            assert len(mr2.sessions) == 5

            assert {cat for cat, *_ in b.alerts} == {"ha"}
            kinds = [next(w for w in ("failover", "failback", "is down", "is up") if w in t) for _, _, t, _ in b.alerts]
            assert kinds == ["is down", "failover", "is up", "failback"]
            # Each incident has its own key, and its recovery resolves it.
            mr1_key = f"mail real server {mr1.address}"
            assert [(k, r) for _, k, _, r in b.alerts] == [
                (mr1_key, False), ("mail failover", False), (mr1_key, True), ("mail failover", True)]
            # The same lines went to the event log.
            assert all(t in b.events for _, _, t, _ in b.alerts)
        await kill_all(mr1, mr2)

    run(main())


def test_each_balancer_incident_is_mailed_and_its_recovery_resolves_it(tmp_path):
    """Down, failover, up again, failback: four mails (the recoveries as "resolved"), and
    `kanmon alert list` shows nothing active afterwards."""
    from kanmon.alerts import Alerts, recent_alerts
    from kanmon.clock import ManualClock
    from kanmon.records.store import Records
    from kanmon.spool.store import Spool

    data = tmp_path / "data"
    cfg = parse_config(f'[server]\ndata_dir = "{data}"\n[alerts]\nto = ["admin@admin.example"]\n')
    data.mkdir()
    records = Records(data, "mx1.example.test", log_file=False)
    spool = Spool(data, fsync=False)

    class NoQueue:
        def submit_nowait(self, *a: Any) -> None:
            pass

    alerts = Alerts(cfg, records, spool, NoQueue(), ManualClock())
    mails: list[tuple[str, str]] = []
    alerts._enqueue = lambda category, key, subject, body, force: mails.append((category, subject))

    async def main() -> None:
        mr1, mr2 = await relays((MR1, "mr1"), (MR2, "mr2"))
        port = free_port(VIP)
        async with balancer(tmp_path, one_vs(port, [(mr1, "active"), (mr2, "standby")]), alerts.incident) as b:
            await mr1.kill()
            await wait_until(lambda: b.saw("failover"), "the failover event")
            await mr1.start()
            await wait_until(lambda: b.saw("failback"), "the failback event")
        await kill_all(mr1, mr2)

    try:
        run(main())
        assert [c for c, _ in mails] == ["ha"] * 4
        head = "[kanmon mx1.example.test] ha: balancer mail: "
        assert mails[0][1].startswith(head + f"real server {MR1}") and "is down" in mails[0][1]
        assert mails[1][1].startswith(head + "failover: no active server is up")
        assert mails[2][1].startswith("[kanmon mx1.example.test] ha: resolved: balancer mail: real server")
        assert "is up" in mails[2][1]
        assert mails[3][1].startswith("[kanmon mx1.example.test] ha: resolved: balancer mail: failback")
        records.flush()
        recent, active = recent_alerts(data, 0)
        assert active == []
        assert [(a.key.split(" ", 1)[1].split(" 127")[0], a.state) for a in recent] == [
            ("real server", "raised"), ("failover", "raised"), ("real server", "cleared"), ("failover", "cleared")]
    finally:
        records.close()
        spool.close()


def test_connect_refused_before_the_check_notices_goes_to_the_next_server(tmp_path):
    async def main() -> None:
        mr1, mr2 = await relays((MR1, "mr1"), (MR2, "mr2"))
        await mr1.kill()  # dead, but the balancer starts with it up and checks rarely
        port = free_port(VIP)
        hc = '{ type = "smtp", interval = "60s", timeout = "1s", retries = 3 }'
        async with balancer(tmp_path, one_vs(port, [(mr1, "active"), (mr2, "standby")], health_check=hc)) as b:
            assert await Client(port).session() == "mr2"
            assert b.server(0)["state"] == "up"  # one failed check of 3: still up
            assert b.server(0)["failed_connects"] == 1
            assert b.saw("connect to real server 127.0.0.31")
        await kill_all(mr2)

    run(main())


def test_connect_timeout_moves_on_to_the_next_server(tmp_path):
    async def main() -> None:
        # A listener that never accepts, with its accept queue full: the kernel drops
        # further SYNs, so a connect to it hangs (a host that is gone from the network).
        hung = socket.socket()
        hung.bind((MR1, 0))
        hung.listen(0)
        hport = hung.getsockname()[1]
        fillers = []
        for _ in range(8):
            f = socket.socket()
            f.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                f.connect((MR1, hport))
            fillers.append(f)
        (mr2,) = await relays((MR2, "mr2"))
        port = free_port(VIP)
        vs = (
            f'[[balancer.virtual_server]]\nname = "mail"\nlisten = "{VIP}:{port}"\nconnect_timeout = "0.3s"\n'
            'health = { type = "tcp", interval = "60s", timeout = "0.3s", retries = 5 }\n'
            f'[[balancer.virtual_server.real]]\naddress = "{MR1}:{hport}"\n'
            f'[[balancer.virtual_server.real]]\naddress = "{mr2.address}"\nmode = "standby"\n'
        )
        try:
            async with balancer(tmp_path, vs) as b:
                assert await Client(port).session() == "mr2"
                assert b.server(0)["failed_connects"] == 1
                assert b.saw(f"connect to real server {MR1}:{hport} failed: timed out")
        finally:
            for f in fillers:
                f.close()
            hung.close()
            await kill_all(mr2)

    run(main())


def test_all_real_servers_down_refuses_connections_and_says_so(tmp_path):
    async def main() -> None:
        (mr1,) = await relays((MR1, "mr1"))
        port = free_port(VIP)
        async with balancer(tmp_path, one_vs(port, [(mr1, "active")])) as b:
            await mr1.kill()
            await wait_until(lambda: b.saw("no real server is up"), "the all-down event")
            assert await Client(port).session() == ""  # closed without a banner
            await mr1.start()
            await wait_until(lambda: b.saw("service restored"), "the restored event")
            assert await Client(port).session() == "mr1"
        await kill_all(mr1)

    run(main())


# ---------------------------------------------------------------------------
# A real server dying mid-connection


def test_dead_real_server_mid_connection_closes_only_that_connection(tmp_path):
    async def main() -> None:
        mr1, mr2 = await relays((MR1, "mr1"), (MR2, "mr2"))
        port = free_port(VIP)
        async with balancer(tmp_path, one_vs(port, [(mr1, "active"), (mr2, "active")], method="round-robin")) as b:
            a, c, d = Client(port, "127.0.0.41"), Client(port, "127.0.0.42"), Client(port, "127.0.0.43")
            names = {await a.open(): a, await c.open(): c}
            assert set(names) == {"mr1", "mr2"}
            on_mr1, on_mr2 = names["mr1"], names["mr2"]
            # d shares mr2 with on_mr2; mr2 then drops only d's connection.
            assert await d.open() == "mr1"
            assert (await d.command("HELO d")).startswith("250")
            assert (await on_mr2.command("HELO c")).startswith("250")

            await mr1.kill()
            for victim in (on_mr1, d):
                assert victim.r is not None
                async with asyncio.timeout(DEADLINE):
                    with contextlib.suppress(ConnectionError):
                        assert await victim.r.read() == b""
            assert (await on_mr2.command("NOOP")).startswith("250")
            await wait_until(lambda: b.server(0)["connections"] == 0, "mr1's connections to be gone")
            assert b.server(1)["connections"] == 1

            # One connection dropped by a live server: its neighbour is untouched.
            e = Client(port, "127.0.0.44")
            assert await e.open() == "mr2"
            assert (await e.command("HELO e")).startswith("250")
            assert e.w is not None and e.r is not None
            e.w.write(b"DROP\r\n")
            async with asyncio.timeout(DEADLINE):
                with contextlib.suppress(ConnectionError):
                    assert await e.r.read() == b""
            assert (await on_mr2.command("NOOP")).startswith("250")
            assert (await on_mr2.command("QUIT")).startswith("221")
            for cl in (on_mr1, on_mr2, d, e):
                await cl.close()
        await kill_all(mr1, mr2)

    run(main())


# ---------------------------------------------------------------------------
# Methods, counted over many connections


def _count(names: list[str]) -> dict[str, int]:
    return dict(collections.Counter(names))


def test_round_robin_spreads_evenly(tmp_path):
    async def main() -> None:
        rs = await relays((MR1, "mr1"), (MR2, "mr2"), (MR3, "mr3"))
        port = free_port(VIP)
        async with balancer(tmp_path, one_vs(port, [(r, "active") for r in rs], method="round-robin")):
            names = [await Client(port).session() for _ in range(30)]
        assert _count(names) == {"mr1": 10, "mr2": 10, "mr3": 10}
        # Strict rotation: no server twice in a row.
        assert all(x != y for x, y in zip(names, names[1:]))
        await kill_all(*rs)

    run(main())


def test_weighted_follows_the_weights(tmp_path):
    async def main() -> None:
        rs = await relays((MR1, "mr1"), (MR2, "mr2"), (MR3, "mr3"))
        port = free_port(VIP)
        weights = {0: "weight = 3", 1: "weight = 1", 2: "weight = 0"}
        vs = one_vs(port, [(r, "active") for r in rs], method="weighted", extra_real=weights)
        async with balancer(tmp_path, vs):
            names = [await Client(port).session() for _ in range(40)]
        assert _count(names) == {"mr1": 30, "mr2": 10}
        await kill_all(*rs)

    run(main())


def test_first_alive_uses_the_first_healthy_server_only(tmp_path):
    async def main() -> None:
        rs = await relays((MR1, "mr1"), (MR2, "mr2"))
        port = free_port(VIP)
        async with balancer(tmp_path, one_vs(port, [(r, "active") for r in rs], method="first-alive")) as b:
            names = [await Client(port).session() for _ in range(10)]
            assert _count(names) == {"mr1": 10}
            await rs[0].kill()
            await wait_until(lambda: b.server(0)["state"] == "down", "mr1 down")
            names = [await Client(port).session() for _ in range(5)]
            assert _count(names) == {"mr2": 5}
            assert not b.saw("failover")  # both are active: losing one is not a failover
        await kill_all(*rs)

    run(main())


def test_source_ip_hash_keeps_each_client_on_one_server(tmp_path):
    async def main() -> None:
        rs = await relays((MR1, "mr1"), (MR2, "mr2"))
        port = free_port(VIP)
        sources = [f"127.0.0.{n}" for n in range(100, 140)]
        async with balancer(tmp_path, one_vs(port, [(r, "active") for r in rs], method="source-ip-hash")):
            first = {src: await Client(port, src).session() for src in sources}
            again = {src: await Client(port, src).session() for src in reversed(sources)}
        assert first == again
        counts = _count(list(first.values()))
        assert set(counts) == {"mr1", "mr2"}  # 40 addresses on one server: chance 2**-39
        await kill_all(*rs)

    run(main())


def test_least_session_balances_open_connections(tmp_path):
    async def main() -> None:
        rs = await relays((MR1, "mr1"), (MR2, "mr2"))
        port = free_port(VIP)
        async with balancer(tmp_path, one_vs(port, [(r, "active") for r in rs], method="least-session")) as b:
            held = [Client(port) for _ in range(10)]
            names = [await c.open() for c in held]
            assert _count(names) == {"mr1": 5, "mr2": 5}
            # Close three on mr1: the next three go to mr1, which now has fewer.
            closing = [c for c, n in zip(held, names) if n == "mr1"][:3]
            for c in closing:
                await c.close()
            await wait_until(lambda: b.server(0)["connections"] == 2, "mr1 down to 2 connections")
            more = [Client(port) for _ in range(3)]
            assert [await c.open() for c in more] == ["mr1"] * 3
            for c in held + more:
                await c.close()
        await kill_all(*rs)

    run(main())


def test_least_rtt_prefers_the_quicker_server(tmp_path):
    async def main() -> None:
        slow = await FakeRelay(MR1, "slow", banner_delay=0.3).start()
        fast = await FakeRelay(MR2, "fast").start()
        port = free_port(VIP)
        async with balancer(tmp_path, one_vs(port, [(slow, "active"), (fast, "active")], method="least-rtt")) as b:
            await wait_until(
                lambda: b.server(0)["rtt_ms"] is not None and b.server(1)["rtt_ms"] is not None, "both RTTs measured"
            )
            names = [await Client(port).session() for _ in range(10)]
        assert _count(names) == {"fast": 10}
        await kill_all(slow, fast)

    run(main())


# ---------------------------------------------------------------------------
# max_connections, disabled


def test_max_connections_is_honoured(tmp_path):
    async def main() -> None:
        mr1, mr2 = await relays((MR1, "mr1"), (MR2, "mr2"))
        port = free_port(VIP)
        vs = one_vs(port, [(mr1, "active"), (mr2, "active")], extra_real={0: "max_connections = 2", 1: "max_connections = 1"})
        async with balancer(tmp_path, vs) as b:
            held = [Client(port) for _ in range(3)]
            assert [await c.open() for c in held] == ["mr1", "mr1", "mr2"]
            full = Client(port)
            assert await full.open() == ""  # every server at its limit: closed, no banner
            await full.close()
            await held[0].close()
            await wait_until(lambda: b.server(0)["connections"] == 1, "a free slot on mr1")
            again = Client(port)
            assert await again.open() == "mr1"
            assert b.server(0)["connections"] == 2
            assert b.saw("no real server can take a connection")
            for c in held + [again]:
                await c.close()
        await kill_all(mr1, mr2)

    run(main())


def test_disabled_server_gets_no_traffic_and_no_checks(tmp_path):
    async def main() -> None:
        mr1, mr2, mr3 = await relays((MR1, "mr1"), (MR2, "mr2"), (MR3, "mr3"))
        port = free_port(VIP)
        vs = one_vs(port, [(mr1, "disabled"), (mr2, "active"), (mr3, "standby")], method="round-robin")
        async with balancer(tmp_path, vs) as b:
            await wait_until(lambda: b.server(1)["checks_passed"] >= 3, "a few checks")
            names = [await Client(port).session() for _ in range(6)]
            assert _count(names) == {"mr2": 6}
            await mr2.kill()
            await wait_until(lambda: b.saw("failover"), "failover to the standby")
            names = [await Client(port).session() for _ in range(4)]
            assert _count(names) == {"mr3": 4}
            assert b.server(0)["state"] == "disabled"
            assert b.server(0)["checks_passed"] == b.server(0)["checks_failed"] == 0
        assert mr1.connections == []  # not even a health check
        await kill_all(mr1, mr3)

    run(main())


# ---------------------------------------------------------------------------
# PROXY protocol v2 towards the real server


def test_proxy_v2_header_carries_the_client_address(tmp_path):
    async def main() -> None:
        mr1 = await FakeRelay(MR1, "mr1", expect_proxy=True).start()
        port = free_port(VIP)
        vs = one_vs(port, [(mr1, "active")], extra_vs="proxy_protocol = true")
        async with balancer(tmp_path, vs) as b:
            client = Client(port, "127.0.0.77")
            assert await client.open() == "mr1"
            assert client.w is not None
            client_port = client.w.get_extra_info("sockname")[1]
            assert (await client.command("HELO proxied")).startswith("250")
            await client.close()
            await wait_until(lambda: b.server(0)["checks_passed"] >= 2, "checks through PROXY LOCAL")
        session = mr1.sessions[0]
        assert session.proxy is not None
        assert (session.proxy.version, session.proxy.command, session.proxy.family) == (2, "PROXY", "TCP4")
        assert session.proxy.source == ("127.0.0.77", client_port)
        assert session.proxy.destination == (VIP, port)
        # The real server sees the balancer's virtual address as its peer (what it lists
        # in smtp.trusted_proxies); the header tells the truth about the client.
        assert session.peer[0] == VIP
        checks = [c for c in mr1.connections if c.helo is None]
        assert checks and all(c.proxy is not None and c.proxy.command == "LOCAL" for c in checks)
        assert all(c.peer[0] == VIP for c in checks)
        await kill_all(mr1)

    run(main())


def test_failover_and_proxy_header_under_uvloop(tmp_path):
    """kanmon serve uses uvloop when it is importable: the same splice must work there."""
    uvloop = pytest.importorskip("uvloop")

    async def main() -> None:
        mr1 = await FakeRelay(MR1, "mr1", expect_proxy=True).start()
        mr2 = await FakeRelay(MR2, "mr2", expect_proxy=True).start()
        port = free_port(VIP)
        vs = one_vs(port, [(mr1, "active"), (mr2, "standby")], extra_vs="proxy_protocol = true")
        async with balancer(tmp_path, vs) as b:
            assert "uvloop" in type(asyncio.get_running_loop()).__module__
            assert await Client(port, "127.0.0.79").session() == "mr1"
            await mr1.kill()
            await wait_until(lambda: b.saw("failover"), "failover")
            assert await Client(port, "127.0.0.79").session() == "mr2"
        for relay in (mr1, mr2):
            proxy = relay.sessions[0].proxy
            assert proxy is not None and proxy.source is not None and proxy.source[0] == "127.0.0.79"
        await kill_all(mr2)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(asyncio.wait_for(main(), 30))


# ---------------------------------------------------------------------------
# Flow control, half-close, idle timeout, stop


def test_slow_real_server_backs_up_the_client_with_bounded_buffers(tmp_path):
    async def main() -> None:
        go = asyncio.Event()
        received = 0
        done = asyncio.Event()

        async def sink(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            nonlocal received
            w.write(b"220 sink\r\n")
            try:
                if not (await asyncio.wait_for(r.readline(), DEADLINE)).startswith(b"HELO"):
                    return  # the health check's connection
                await asyncio.wait_for(go.wait(), DEADLINE * 2)
                while chunk := await asyncio.wait_for(r.read(65536), DEADLINE):
                    received += len(chunk)
                done.set()
            except (ConnectionError, TimeoutError):
                pass
            finally:
                w.close()

        server = await asyncio.start_server(sink, MR1, 0)
        sport = server.sockets[0].getsockname()[1]
        port = free_port(VIP)
        vs = (
            f'[[balancer.virtual_server]]\nname = "bulk"\nlisten = "{VIP}:{port}"\n'
            'health = { type = "tcp", interval = "60s" }\n'
            f'[[balancer.virtual_server.real]]\naddress = "{MR1}:{sport}"\n'
        )
        async with balancer(tmp_path, vs) as b:
            r, w = await asyncio.open_connection(VIP, port)
            assert (await asyncio.wait_for(r.readline(), DEADLINE)).startswith(b"220")
            w.write(b"HELO bulk\r\n")
            sent = 0
            chunk = b"x" * 65536
            limit = 64 * 1024 * 1024
            while sent < limit:
                w.write(chunk)
                sent += len(chunk)
                try:
                    await asyncio.wait_for(w.drain(), 0.5)
                except TimeoutError:
                    break  # the whole path is full: the balancer stopped reading from us
            assert sent < limit, "the balancer kept reading from a client whose server does not read"
            (link,) = b.service._virtuals[0].links
            assert link.server is not None and link.server.transport is not None
            assert link.client is not None and link.client.transport is not None
            # At most the high-water mark plus one read (256 KiB) is buffered towards the server.
            assert link.server.transport.get_write_buffer_size() <= HIGH_WATER + 256 * 1024
            go.set()
            await asyncio.wait_for(w.drain(), DEADLINE)
            w.write_eof()  # half-close: the server sees EOF after every byte
            await asyncio.wait_for(done.wait(), DEADLINE)
            assert received == sent
            assert b.server(0)["bytes_in"] == sent + len(b"HELO bulk\r\n")
            assert await asyncio.wait_for(r.read(), DEADLINE) == b""
            w.close()
            await w.wait_closed()
        server.close()
        await server.wait_closed()

    run(main())


def test_idle_connection_is_closed(tmp_path):
    async def main() -> None:
        (mr1,) = await relays((MR1, "mr1"))
        port = free_port(VIP)
        async with balancer(tmp_path, one_vs(port, [(mr1, "active")], extra_vs='idle_timeout = "0.3s"')) as b:
            c = Client(port)
            assert await c.open() == "mr1"
            assert c.r is not None
            async with asyncio.timeout(DEADLINE):
                assert await c.r.read() == b""
            await c.close()
            await wait_until(lambda: b.server(0)["connections"] == 0, "the link to be released")
        await kill_all(mr1)

    run(main())


def test_client_that_never_reads_is_dropped_after_the_server_left(tmp_path):
    """The server sends a lot and closes; the client reads nothing. The balancer holds at
    most its buffer for that client, and drops it an idle_timeout later."""

    async def main() -> None:
        async def flood(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                w.write(b"220 flood\r\n")
                if (await asyncio.wait_for(r.readline(), DEADLINE)).startswith(b"HELO"):
                    for _ in range(80):
                        w.write(b"y" * 65536)
                        await asyncio.wait_for(w.drain(), DEADLINE)
            except (ConnectionError, TimeoutError):
                pass
            finally:
                w.close()

        server = await asyncio.start_server(flood, MR1, 0)
        sport = server.sockets[0].getsockname()[1]
        port = free_port(VIP)
        vs = (
            f'[[balancer.virtual_server]]\nname = "flood"\nlisten = "{VIP}:{port}"\nidle_timeout = "0.3s"\n'
            'health = { type = "tcp", interval = "60s" }\n'
            f'[[balancer.virtual_server.real]]\naddress = "{MR1}:{sport}"\n'
        )
        async with balancer(tmp_path, vs) as b:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, (VIP, port))
            await asyncio.get_running_loop().sock_sendall(sock, b"HELO x\r\n")
            await wait_until(lambda: b.server(0)["total_connections"] == 1, "the splice")
            # The balancer stops reading from the server once the client's buffer is full,
            # so the server's 5 MB cannot all have passed; then the link is dropped.
            await wait_until(lambda: b.server(0)["connections"] == 0, "the stuck link to be dropped")
            assert b.server(0)["bytes_out"] < 80 * 65536
            sock.close()
        server.close()
        await server.wait_closed()

    run(main())


def test_stop_closes_connections_and_frees_the_address(tmp_path):
    async def main() -> None:
        (mr1,) = await relays((MR1, "mr1"))
        port = free_port(VIP)
        async with balancer(tmp_path, one_vs(port, [(mr1, "active")])) as b:
            c = Client(port)
            assert await c.open() == "mr1"
            status_file = b.service.status_file
        assert c.r is not None
        async with asyncio.timeout(DEADLINE):
            with contextlib.suppress(ConnectionError):
                assert await c.r.read() == b""
        await c.close()
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection(VIP, port)  # nobody listens any more
        assert status_file.exists() and '"running": false' in status_file.read_text()
        await kill_all(mr1)

    run(main())


def test_start_fails_with_oserror_when_an_address_is_taken_and_binds_nothing(tmp_path):
    async def main() -> None:
        (mr1,) = await relays((MR1, "mr1"))
        p1, p2 = free_port(VIP), free_port(VIP)
        text = one_vs(p1, [(mr1, "active")]) + one_vs(p2, [(mr1, "active")]).replace('"mail"', '"second"')
        config = parse_config(config_text(tmp_path, text))
        with socket.socket() as taken:
            taken.bind((VIP, p2))
            taken.listen()
            service = BalancerService(config, lambda text, queue_id=None: None)
            with pytest.raises(OSError, match=f"balancer second: cannot listen on {VIP}:{p2}"):
                await service.start()
        with socket.socket() as s:
            s.bind((VIP, p1))  # the first listener was released
        await service.stop()
        await kill_all(mr1)

    run(main())


# ---------------------------------------------------------------------------
# Config


def test_a_node_that_only_balances_is_a_valid_config(tmp_path):
    text = f"""
[server]
hostname = "lb.example.test"
data_dir = "{tmp_path}"

[[balancer.virtual_server]]
name = "mail"
listen = "127.0.0.30:2500"
method = "first-alive"
proxy_protocol = true
health = {{ type = "smtp", interval = "10s", timeout = "2s", retries = 3 }}

[[balancer.virtual_server.real]]
address = "127.0.0.31:2525"
mode = "active"

[[balancer.virtual_server.real]]
address = "127.0.0.32:2525"
mode = "standby"
"""
    config = parse_config(text)
    assert config.balancer is not None and len(config.balancer.virtual_server[0].real) == 2
    BalancerService(config, lambda text, queue_id=None: None)  # and the service accepts it


@pytest.mark.parametrize(
    "vs, message",
    [
        ('listen = "127.0.0.30:2500"\n[[balancer.virtual_server.real]]\naddress = "127.0.0.31:25"\nmode = "disabled"',
         r"virtual_server\[0\].real: needs at least one"),
        ('listen = "127.0.0.30:2500"\n[[balancer.virtual_server.real]]\naddress = "127.0.0.30:2500"',
         r"real\[0\].address: is the virtual address itself"),
        ('listen = "127.0.0.30:2500"\n[[balancer.virtual_server.real]]\naddress = "127.0.0.31:25"\n'
         '[[balancer.virtual_server.real]]\naddress = "127.0.0.31:25"', r"real\[1\].address: 127.0.0.31:25 is also real\[0\]"),
    ],
)
def test_unusable_balancer_config_is_a_config_error_naming_the_key(tmp_path, vs, message):
    config = parse_config(f'[server]\ndata_dir = "{tmp_path}"\n[[balancer.virtual_server]]\nname = "m"\n{vs}\n')
    with pytest.raises(ConfigError, match=message):
        BalancerService(config, lambda text, queue_id=None: None)


# ---------------------------------------------------------------------------
# Health checks, one at a time


async def _serve_once(host: str, reply: bytes | None) -> tuple[asyncio.Server, list[bytes]]:
    """A server that answers every connection with reply (None: says nothing) and records requests."""
    requests: list[bytes] = []

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            if reply is not None and not reply.startswith(b"HTTP"):
                w.write(reply)
            data = await asyncio.wait_for(r.read(4096), DEADLINE)
            requests.append(data)
            if reply is not None and reply.startswith(b"HTTP"):
                w.write(reply)
                await w.drain()
        except (ConnectionError, TimeoutError):
            pass
        finally:
            w.close()

    return await asyncio.start_server(handle, host, 0), requests


@pytest.mark.parametrize(
    "kind, reply, ok, detail",
    [
        ("smtp", b"220 mr1 ESMTP\r\n", True, "220 mr1"),
        ("smtp", b"220-mr1 hello\r\n220-more\r\n220 mr1 ready\r\n", True, "220 mr1 ready"),
        ("smtp", b"554 5.3.2 go away\r\n", False, "not 220"),
        ("smtp", None, False, "no answer within 0.3s"),
        ("http", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", True, "200 OK"),
        ("http", b"HTTP/1.1 302 Found\r\nLocation: /x\r\n\r\n", True, "302"),
        ("http", b"HTTP/1.1 503 Service Unavailable\r\n\r\n", False, "503"),
        ("http", b"SSH-2.0-OpenSSH\r\n", False, "not an HTTP status line"),
        ("tcp", None, True, "connected"),
    ],
)
def test_health_checks(kind, reply, ok, detail):
    async def main() -> None:
        server, requests = await _serve_once(MR1, reply)
        port = server.sockets[0].getsockname()[1]
        hc = HealthCheck(type=kind, timeout="0.3s", path="/health", host="mx.example.test")
        result = await health.run_check(hc, (MR1, port), send_proxy_local=False)
        assert (result.ok, detail in result.detail) == (ok, True), result
        assert (result.rtt is not None) == ok
        if kind == "http":
            await wait_until(lambda: bool(requests), "the request")
            assert requests[0].startswith(b"GET /health HTTP/1.1\r\n")
            assert b"\r\nHost: mx.example.test\r\n" in requests[0]
        if kind == "smtp" and ok:
            await wait_until(lambda: bool(requests), "the QUIT")
            assert requests[0] == b"QUIT\r\n"
        server.close()
        await server.wait_closed()

    run(main())


def test_health_check_of_a_closed_port_fails():
    async def main() -> None:
        port = free_port(MR1)
        for kind in ("tcp", "smtp", "http"):
            result = await health.run_check(HealthCheck(type=kind, timeout="1s"), (MR1, port), send_proxy_local=False)
            assert not result.ok and result.detail == "connection refused"

    run(main())


def test_ping_check_on_loopback():
    if health.icmp_privilege_error() is not None:
        pytest.skip(f"this test process cannot send ICMP echo: {health.icmp_privilege_error()}")

    async def main() -> None:
        hc = HealthCheck(type="ping", timeout="2s")
        for host in ("127.0.0.1", MR2):
            result = await health.run_check(hc, (host, 25), send_proxy_local=False)
            assert result.ok and result.rtt is not None, result
        if socket.has_ipv6 and health.icmp_privilege_error(socket.AF_INET6) is None:
            result = await health.run_check(hc, ("::1", 25), send_proxy_local=False)
            assert result.ok, result

    run(main())


def test_ping_check_in_the_service(tmp_path):
    if health.icmp_privilege_error() is not None:
        pytest.skip(f"this test process cannot send ICMP echo: {health.icmp_privilege_error()}")

    async def main() -> None:
        (mr1,) = await relays((MR1, "mr1"))
        port = free_port(VIP)
        hc = '{ type = "ping", interval = "0.1s", timeout = "1s" }'
        async with balancer(tmp_path, one_vs(port, [(mr1, "active")], health_check=hc)) as b:
            await wait_until(lambda: b.server(0)["checks_passed"] >= 2, "two echo replies")
            assert "echo reply" in b.server(0)["last_check"]
            assert await Client(port).session() == "mr1"
        await kill_all(mr1)

    run(main())


def test_ping_without_icmp_privilege_is_a_config_error_at_start(tmp_path, monkeypatch):
    real_socket = socket.socket

    def no_icmp(family: int = -1, kind: int = -1, proto: int = -1, *args: Any) -> socket.socket:
        if proto in (socket.IPPROTO_ICMP, socket.IPPROTO_ICMPV6):
            raise PermissionError(1, "Operation not permitted")
        return real_socket(family, kind, proto, *args)

    monkeypatch.setattr(health, "_new_socket", no_icmp)

    async def main() -> None:
        port = free_port(VIP)
        relay = FakeRelay(MR1, "mr1", port=2525)
        hc = '{ type = "ping", interval = "1s" }'
        config = parse_config(config_text(tmp_path, one_vs(port, [(relay, "active")], health_check=hc)))
        service = BalancerService(config, lambda text, queue_id=None: None)
        with pytest.raises(ConfigError) as err:
            await service.start()
        message = str(err.value)
        assert message.startswith('balancer.virtual_server[0].health.type: "ping": this process may not open an ICMP socket')
        assert "ping_group_range" in message and "CAP_NET_RAW" in message
        with socket.socket() as s:
            s.bind((VIP, port))  # nothing was bound

    run(main())


# ---------------------------------------------------------------------------
# A client that speaks first: its bytes arrive before the real server is connected


async def _echo_server(host: str, ssl_context: Any = None) -> asyncio.Server:
    """A real server for client-first protocols: it echoes every line back."""

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while line := await asyncio.wait_for(r.readline(), DEADLINE):
                w.write(b"echo " + line)
                await w.drain()
        except (ConnectionError, TimeoutError, OSError):
            pass
        finally:
            w.close()

    return await asyncio.start_server(handle, host, 0, ssl=ssl_context, reuse_address=True)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize("tls", [True, False], ids=["implicit-tls", "plain-client-first"])
def test_bytes_a_client_sends_before_the_real_server_is_connected_are_forwarded_in_order(tmp_path, tls, loop):
    """Implicit TLS through the balancer (the ClientHello is the client's first flight,
    sent at once) and a plain client that writes before reading: 100 connections at
    once, every one answered, nothing lost or reordered."""
    import ssl

    import trustme

    async def main() -> None:
        ca = trustme.CA()
        server_ctx = None
        client_ctx = None
        if tls:
            server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ca.issue_cert("mail.example.test").configure_cert(server_ctx)
            client_ctx = ssl.create_default_context()
            ca.configure_trust(client_ctx)
        real = await _echo_server(MR1, server_ctx)
        real_port = real.sockets[0].getsockname()[1]
        port = free_port(VIP)
        vs = "\n".join([
            "[[balancer.virtual_server]]", 'name = "imaps"', f'listen = "{VIP}:{port}"', 'method = "first-alive"',
            'health = { type = "tcp", interval = "0.1s", timeout = "1s", retries = 2 }',
            "[[balancer.virtual_server.real]]", f'address = "{MR1}:{real_port}"', 'mode = "active"',
        ]) + "\n"

        async def one(i: int) -> bytes:
            async with asyncio.timeout(DEADLINE * 2):
                r, w = await asyncio.open_connection(
                    VIP, port, ssl=client_ctx, server_hostname="mail.example.test" if tls else None,
                    local_addr=(f"127.0.0.{100 + i % 50}", 0))
                try:
                    # First bytes: several lines in one write, before anything is read.
                    w.write(b"".join(f"{i} line {n}\n".encode() for n in range(3)))
                    await w.drain()
                    return b"".join([await r.readline() for _ in range(3)])
                finally:
                    w.close()
                    with contextlib.suppress(ConnectionError, ssl.SSLError):
                        await w.wait_closed()

        try:
            async with balancer(tmp_path, vs) as b:
                await wait_until(lambda: b.server(0)["state"] == "up", "the real server is up")
                answers = await asyncio.gather(*(one(i) for i in range(100)), return_exceptions=True)
        finally:
            real.close()
            await real.wait_closed()
        lost = [(i, a) for i, a in enumerate(answers)
                if a != b"".join(f"echo {i} line {n}\n".encode() for n in range(3))]
        assert lost == [], f"{len(lost)} of 100 connections lost bytes: {lost[:3]}"

    if loop == "asyncio":
        run(main())
        return
    uvloop = pytest.importorskip("uvloop")  # what kanmon serve runs on
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(asyncio.wait_for(main(), 30))
