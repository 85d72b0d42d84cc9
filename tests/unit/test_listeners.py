"""kanmon.listeners: the node's listening sockets across reloads, and the health endpoints
of the metrics listener (kanmon.metrics.MetricsServer)."""

from __future__ import annotations

import asyncio
import socket

import pytest

from kanmon.listeners import ListenSockets, bind_listener
from kanmon.metrics import MetricsServer


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        return True
    except OSError:
        return False


def test_an_unchanged_address_keeps_its_socket_and_a_removed_one_closes():
    a, b = ("127.0.0.1", _port()), ("127.0.0.1", _port())
    ls = ListenSockets()
    try:
        first = ls.prepare([a, b])
        assert sorted(first.fresh) == sorted([a, b])
        ls.commit(first)
        kept = ls.held[a]
        second = ls.prepare([a])
        assert second.fresh == [] and second.sockets[a] is kept
        ls.commit(second)
        assert ls.held == {a: kept}
        assert _accepts(a[1]) and not _accepts(b[1])
    finally:
        ls.close()


def test_a_failed_prepare_closes_what_it_bound_and_keeps_what_is_held():
    a, new, busy_port = ("127.0.0.1", _port()), ("127.0.0.1", _port()), _port()
    ls = ListenSockets()
    busy = bind_listener("127.0.0.1", busy_port)
    try:
        ls.commit(ls.prepare([a]))
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{busy_port}"):
            ls.prepare([a, new, ("127.0.0.1", busy_port)])
        assert not _accepts(new[1])  # bound by the failed prepare, closed again
        assert _accepts(a[1])  # still held
        prepared = ls.prepare([a, new])
        ls.abort(prepared)
        assert not _accepts(new[1]) and _accepts(a[1])
        with pytest.raises(OSError, match="listed twice"):
            ls.prepare([a, a])
    finally:
        busy.close()
        ls.close()


def test_closing_a_duplicate_leaves_the_listening_socket_open():
    a = ("127.0.0.1", _port())
    ls = ListenSockets()
    try:
        prepared = ls.prepare([a])
        ls.commit(prepared)
        prepared.dup(a).close()
        assert _accepts(a[1])
    finally:
        ls.close()


class _Metrics:
    def render(self) -> str:
        return "kanmon_up 1\n"


async def _get(port: int, path: str) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.0\r\n\r\n".encode())
    data = await reader.read()
    writer.close()
    await writer.wait_closed()
    return data


def test_healthz_answers_while_serving_and_readyz_follows_readiness():
    ready = [False]

    async def main() -> None:
        sock = bind_listener("127.0.0.1", 0)
        server = MetricsServer(_Metrics(), "127.0.0.1", 0, sock=sock, ready=lambda: ready[0])
        await server.start()
        try:
            port = server.port
            assert (await _get(port, "/healthz")).startswith(b"HTTP/1.0 200 OK")
            assert (await _get(port, "/readyz")).startswith(b"HTTP/1.0 503 Service Unavailable")
            ready[0] = True
            assert (await _get(port, "/readyz")).startswith(b"HTTP/1.0 200 OK")
            assert b"kanmon_up 1" in await _get(port, "/metrics")
            assert (await _get(port, "/nope")).startswith(b"HTTP/1.0 404")
        finally:
            await server.stop()

    asyncio.run(main())


def test_accepted_connections_get_tcp_nodelay():
    """asyncio turns Nagle off for an accepted socket only if the listener says IPPROTO_TCP."""
    async def main() -> None:
        sock = bind_listener("127.0.0.1", 0)
        port = sock.getsockname()[1]
        seen: list[int] = []

        class P(asyncio.Protocol):
            def connection_made(self, transport) -> None:
                s = transport.get_extra_info("socket")
                seen.append(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                transport.close()

        server = await asyncio.get_running_loop().create_server(P, sock=sock)
        try:
            _reader, writer = await asyncio.open_connection("127.0.0.1", port)
            while not seen:
                await asyncio.sleep(0.01)
            writer.close()
        finally:
            server.close()
        assert seen == [1]

    asyncio.run(main())
