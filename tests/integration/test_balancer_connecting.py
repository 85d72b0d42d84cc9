"""A client while its real server is being connected, and a connection's objects after it
ends. The client is not paused while the balancer connects (an SMTP client waits for
the banner; pausing and resuming every client cost two epoll changes per connection):
what it sends meanwhile is held, up to EARLY_LIMIT, beyond which it is paused; its
half-close is passed on once the real server is there, also when it sent nothing. A
connection that ended leaves no reference cycle: its Link and both Ends are freed with
the cyclic GC off (a busy balancer spent a tenth of its CPU in GC collections)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import socket
import struct
import weakref
from collections.abc import Iterator

import pytest

from kanmon.balancer.splice import EARLY_LIMIT
from tests.integration.test_balancer import DEADLINE, MR1, MR2, VIP, balancer, free_port, wait_until

LOOPS = ["asyncio", "uvloop"]


def _run(loop: str, coro) -> None:
    if loop == "asyncio":
        asyncio.run(asyncio.wait_for(coro, 60))
        return
    uvloop = pytest.importorskip("uvloop")  # what kanmon serve runs on
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(asyncio.wait_for(coro, 60))


@contextlib.contextmanager
def _hung_server() -> Iterator[int]:
    """A port on MR1 whose connects hang: a listener that never accepts, its queue full."""
    hung = socket.socket()
    hung.bind((MR1, 0))
    hung.listen(0)
    port = hung.getsockname()[1]
    fillers = []
    try:
        for _ in range(8):
            f = socket.socket()
            f.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                f.connect((MR1, port))
            fillers.append(f)
        yield port
    finally:
        for f in fillers:
            f.close()
        hung.close()


async def _echo(host: str, seen: list[bytes]) -> asyncio.Server:
    """Echoes every byte until the client's EOF, then records what it got and closes."""

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        got = bytearray()
        try:
            while chunk := await asyncio.wait_for(r.read(65536), DEADLINE):
                got += chunk
                w.write(chunk)
                await w.drain()
            seen.append(bytes(got))  # only after an EOF
        except (ConnectionError, TimeoutError, OSError):
            pass
        finally:
            w.close()

    return await asyncio.start_server(handle, host, 0, reuse_address=True)


def _vs(port: int, hung_port: int, echo_port: int, connect_timeout: str) -> str:
    # The first (active) server hangs: every connection waits connect_timeout, then goes
    # to the standby echo. The check is slow enough not to mark the active one down.
    return (
        f'[[balancer.virtual_server]]\nname = "raw"\nlisten = "{VIP}:{port}"\nconnect_timeout = "{connect_timeout}"\n'
        'health = { type = "tcp", interval = "60s", timeout = "0.3s", retries = 5 }\n'
        f'[[balancer.virtual_server.real]]\naddress = "{MR1}:{hung_port}"\n'
        f'[[balancer.virtual_server.real]]\naddress = "{MR2}:{echo_port}"\nmode = "standby"\n'
    )


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("size", [0, 100, 3 * EARLY_LIMIT + 5], ids=["nothing", "a little", "past-the-limit"])
def test_what_a_client_sends_and_its_half_close_while_connecting_reach_the_real_server(tmp_path, loop, size):
    data = os.urandom(size)

    async def main() -> None:
        seen: list[bytes] = []
        echo = await _echo(MR2, seen)
        port = free_port(VIP)
        try:
            with _hung_server() as hung_port:
                async with balancer(tmp_path, _vs(port, hung_port, echo.sockets[0].getsockname()[1], "0.5s")) as b:
                    # The echo's first check (a tcp check: connect, close) ends as an empty
                    # connection: counted first, so the client's is the one after it.
                    await wait_until(lambda: seen == [b""], "the check of the echo server")
                    r, w = await asyncio.open_connection(VIP, port)
                    links = b.service._virtuals[0].links
                    await wait_until(lambda: len(links) == 1, "the connection")
                    (link,) = links
                    w.write(data)
                    w.write_eof()  # sent while the balancer still waits for the hung server
                    if size > EARLY_LIMIT:
                        # Held up to the limit, then the client waits, paused.
                        await wait_until(lambda: "connecting" in link.client._pause_reasons, "the client paused")
                        assert len(link._early) >= EARLY_LIMIT
                    else:
                        await asyncio.sleep(0.1)
                        assert link.client is not None and not link.client._pause_reasons
                    assert link._holding  # still connecting
                    got = await asyncio.wait_for(r.read(), DEADLINE)  # until the echo closes
                    w.close()
                    assert got == data
                    await wait_until(lambda: seen == [b"", data], "the real server to see the bytes and the EOF")
                    assert b.server(0)["failed_connects"] == 1  # it did wait for the hung server
        finally:
            echo.close()
            await echo.wait_closed()

    _run(loop, main())


@pytest.mark.parametrize("loop", LOOPS)
def test_a_connection_that_ended_is_freed_without_the_cyclic_gc(tmp_path, loop):
    async def main() -> None:
        seen: list[bytes] = []
        echo = await _echo(MR2, seen)
        port = free_port(VIP)
        vs = (
            f'[[balancer.virtual_server]]\nname = "raw"\nlisten = "{VIP}:{port}"\n'
            'health = { type = "tcp", interval = "60s", timeout = "1s", retries = 5 }\n'
            f'[[balancer.virtual_server.real]]\naddress = "{MR2}:{echo.sockets[0].getsockname()[1]}"\n'
        )
        try:
            async with balancer(tmp_path, vs) as b:
                gc.collect()
                gc.disable()
                try:
                    r, w = await asyncio.open_connection(VIP, port)
                    links = b.service._virtuals[0].links
                    await wait_until(lambda: any(not link._holding for link in links), "connected")
                    (link,) = links
                    refs = [weakref.ref(x) for x in (link, link.client, link.server)]
                    del link
                    w.write(b"hello")
                    w.write_eof()
                    assert await asyncio.wait_for(r.read(), DEADLINE) == b"hello"
                    w.close()
                    with contextlib.suppress(ConnectionError):
                        await w.wait_closed()
                    await wait_until(lambda: not links, "the link to finish")
                    await wait_until(lambda: all(ref() is None for ref in refs), "the link and its ends to be freed")
                finally:
                    gc.enable()
        finally:
            echo.close()
            await echo.wait_closed()

    _run(loop, main())


@pytest.mark.parametrize("limit", [True, False], ids=["max_connections", "no-limit"])
def test_open_connections_reach_the_shared_table_at_once_only_where_another_process_decides_by_them(
        tmp_path, monkeypatch, limit):
    """With several processes, a server's open connections go to the shared table as they
    change only when max_connections or least-session makes the other processes count them;
    otherwise the counts loop publishes them with the totals (here: only at its start)."""
    from kanmon.balancer import service as service_module
    from kanmon.balancer.service import BalancerService
    from kanmon.balancer.shared import SharedTable
    from kanmon.balancer.workers import Forwarder
    from kanmon.config import parse_config
    from tests.integration.test_balancer import Client, config_text, kill_all, one_vs, relays

    monkeypatch.setattr(service_module, "COUNTS_INTERVAL", 3600.0)

    async def main() -> None:
        (mr1,) = await relays((MR1, "mr1"))
        sock = socket.socket()
        sock.bind((VIP, 0))
        sock.listen()
        sock.setblocking(False)
        port = sock.getsockname()[1]
        vs = one_vs(port, [(mr1, "active")], extra_real={0: "max_connections = 5"} if limit else None)
        config = parse_config(config_text(tmp_path, vs, processes=2))
        table = SharedTable.create(1, 2)  # zeroed: the server up and active, as the main process publishes
        # This process is forwarding process 1 of 2 (no checks, the table as the main process's).
        service = BalancerService(config, lambda text, queue_id=None: None, forwarder=Forwarder(table, 1, [sock]))
        await service.start()
        client = Client(port)
        try:
            assert await client.open() == "mr1"  # connected: the banner came through
            # Slot 1's row for server 0 (the table has one server): its open connections.
            (opened,) = struct.unpack_from("<q", table._map, table._counts_at + 1 * struct.calcsize("<qqqqq"))
            assert opened == (1 if limit else 0)
        finally:
            await client.close()
            await service.stop()
            table.close()
            await kill_all(mr1)

    _run("asyncio", main())
