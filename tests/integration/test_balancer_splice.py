"""Forwarding with splice(2): past SPLICE_AFTER bytes a connection's bytes go socket ->
pipe -> socket without entering Python, after whatever went through the transports
first (the PROXY header, the first bytes); the same bytes arrive as on the copy path
([balancer] splice = false), in order, with half-close passed on. A short connection
(an SMTP dialogue) stays on the copy path."""

from __future__ import annotations

import asyncio
import contextlib
import os

import pytest

from kanmon.balancer.splice import CAN_SPLICE, SPLICE_AFTER
from kanmon.smtp.proxy_protocol import parse_proxy_header
from tests.integration.test_balancer import DEADLINE, MR1, VIP, balancer, free_port, run, wait_until

PAYLOAD = os.urandom(3 * 1024 * 1024 + 17)  # several pipe-fuls, not a multiple of anything


async def _raw_echo(host: str) -> asyncio.Server:
    """Echoes every byte; on the client's EOF it finishes and closes (a half-close test)."""

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while chunk := await asyncio.wait_for(r.read(65536), DEADLINE):
                w.write(chunk)
                await w.drain()
        except (ConnectionError, TimeoutError, OSError):
            pass
        finally:
            w.close()

    return await asyncio.start_server(handle, host, 0, reuse_address=True)


def _vs(port: int, real_port: int, splice: bool, proxy: bool) -> str:
    return "\n".join([
        f"splice = {'true' if splice else 'false'}",  # lands in [balancer] (config_text puts it first)
        "[[balancer.virtual_server]]", 'name = "raw"', f'listen = "{VIP}:{port}"',
        f"proxy_protocol = {'true' if proxy else 'false'}",
        'health = { type = "tcp", interval = "0.2s", timeout = "1s", retries = 2 }',
        "[[balancer.virtual_server.real]]", f'address = "{MR1}:{real_port}"',
    ]) + "\n"


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize("proxy", [False, True], ids=["plain", "proxy-header"])
@pytest.mark.parametrize("splice", [True, False], ids=["splice", "copy"])
def test_megabytes_both_ways_arrive_whole_and_in_order(tmp_path, splice, proxy, loop):
    if splice and not CAN_SPLICE:
        pytest.skip("no splice(2) on this system")

    async def main() -> None:
        real = await _raw_echo(MR1)
        real_port = real.sockets[0].getsockname()[1]
        port = free_port(VIP)
        try:
            async with balancer(tmp_path, _vs(port, real_port, splice, proxy)) as b:
                r, w = await asyncio.open_connection(VIP, port)
                try:
                    async def send() -> None:
                        for i in range(0, len(PAYLOAD), 100_000):
                            w.write(PAYLOAD[i:i + 100_000])
                            await w.drain()
                        w.write_eof()  # the half-close reaches the real server, its echo still comes back

                    async def receive() -> bytes:
                        got = bytearray()
                        while chunk := await r.read(1 << 20):
                            got += chunk
                        return bytes(got)

                    async with asyncio.timeout(DEADLINE * 3):
                        links = b.service._virtuals[0].links
                        await wait_until(lambda: any(not link._holding for link in links), "connected")
                        (link,) = links
                        assert not link.spliced  # not yet: first SPLICE_AFTER bytes on the transports
                        _, got = await asyncio.gather(send(), receive())
                        assert link.spliced is splice
                finally:
                    w.close()
                    with contextlib.suppress(ConnectionError):
                        await w.wait_closed()
                header = parse_proxy_header(got) if proxy else None
                start = header.consumed if header is not None else 0
                assert (header is not None) == proxy
                assert len(got) - start == len(PAYLOAD) and got[start:] == PAYLOAD
                await wait_until(lambda: b.server(0)["connections"] == 0, "the link to finish")
                assert b.server(0)["bytes_in"] == len(PAYLOAD)
                assert b.server(0)["bytes_out"] == len(got)
        finally:
            real.close()
            await real.wait_closed()

    if loop == "asyncio":
        run(main())
        return
    uvloop = pytest.importorskip("uvloop")  # what kanmon serve runs on
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(asyncio.wait_for(main(), 60))


def test_a_short_connection_stays_on_the_copy_path(tmp_path):
    async def main() -> None:
        real = await _raw_echo(MR1)
        port = free_port(VIP)
        try:
            async with balancer(tmp_path, _vs(port, real.sockets[0].getsockname()[1], True, False)) as b:
                r, w = await asyncio.open_connection(VIP, port)
                data = os.urandom(SPLICE_AFTER // 2)
                w.write(data)
                got = await asyncio.wait_for(r.readexactly(len(data)), DEADLINE)
                (link,) = b.service._virtuals[0].links
                assert got == data and not link.spliced
                w.close()
                with contextlib.suppress(ConnectionError):
                    await w.wait_closed()
        finally:
            real.close()
            await real.wait_closed()

    run(main())
