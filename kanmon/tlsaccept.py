"""Implicit-TLS listeners whose connections count from accept, not from the handshake.

Role: `loop.create_server(ssl=...)` hands a connection to its protocol only once the TLS
handshake is done, so a client that connects and never sends a ClientHello is invisible
to every connection limit until the handshake times out (each one costs a socket, an
SSL object and its buffers). TlsAcceptor accepts on an implicit-TLS listening socket
itself: it asks `admit(ip)` at accept, before any TLS, closes at once what is refused
(there is no plaintext reply on a TLS port), and only then lets the loop do the
handshake (`connect_accepted_socket`, bounded by handshake_timeout). What it admitted is
given back by the Admission's release(): by TlsAcceptor when the handshake fails or
times out, by the protocol (in connection_lost) once it has the connection.

Trusts: the admit callback (the listener's limits). Nothing from the peer: its bytes
are the TLS library's until the handshake ends.

Never: start a handshake for a connection over a limit, hold an admission for a
connection that is gone, or run a task it does not cancel on close().
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import socket
import ssl
import struct
from collections.abc import Callable
from typing import Any

ACCEPT_ERROR_PAUSE = 0.1  # out of descriptors (EMFILE): accept again after this pause
CROWD = 100  # connections open at once that count as a crowd (see Crowd)


class Crowd:
    """How many connections this process holds (all listeners), and the heap given back
    after a crowd of them is gone.

    A flood of connections (thousands in TLS handshakes) grows the C heap; when they end,
    glibc keeps the freed memory in its arenas, and the RSS stays at the flood's peak
    for good. Once the open connections fall to a quarter of a peak of at least CROWD,
    malloc_trim(0) returns the free pages to the system (a few milliseconds, once per
    crowd). Elsewhere than glibc it does nothing.
    """

    def __init__(self) -> None:
        self.open = 0
        self.peak = 0
        self.trims = 0

    def opened(self) -> None:
        self.open += 1
        if self.open > self.peak:
            self.peak = self.open

    def closed(self) -> None:
        self.open -= 1
        if self.peak >= CROWD and self.open <= self.peak // 4:
            self.peak = self.open
            self.trims += 1
            _malloc_trim()


def _malloc_trim() -> None:
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL("libc.so.6")
            _libc.malloc_trim  # noqa: B018 - glibc only
        except (OSError, AttributeError):
            _libc = False
    if _libc:
        _libc.malloc_trim(0)


_libc: Any = None
crowd = Crowd()  # this process's connections, every listener


class Admission:
    """One admitted connection's place in its listener's counts; release() gives it
    back exactly once."""

    __slots__ = ("ip", "_release")

    def __init__(self, ip: str, release: Callable[[str], None]):
        self.ip = ip
        self._release: Callable[[str], None] | None = release

    def release(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release(self.ip)


class TlsAcceptor:
    """Accepts on one listening socket; each admitted connection gets a TLS handshake
    and then a protocol from `make_protocol(admission)`."""

    def __init__(
        self,
        sock: socket.socket,
        ssl_context: ssl.SSLContext,
        handshake_timeout: float,
        admit: Callable[[str], Admission | None],
        make_protocol: Callable[[Admission], asyncio.Protocol],
    ):
        self.sock = sock
        self.sock.setblocking(False)
        self.ssl_context = ssl_context
        self.handshake_timeout = handshake_timeout
        self.admit = admit
        self.make_protocol = make_protocol
        self.sockets = [sock]  # like asyncio.Server.sockets (addresses)
        self._accepting: asyncio.Task[None] | None = None
        self._handshakes: set[asyncio.Task[None]] = set()

    @classmethod
    def bind(cls, host: str, port: int, *args: Any, backlog: int = 1024) -> TlsAcceptor:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.create_server((host, port), family=family, backlog=backlog, reuse_port=False)
        return cls(sock, *args)

    @property
    def pending(self) -> int:
        """Connections admitted and still in their handshake."""
        return len(self._handshakes)

    def start(self) -> None:
        self.sock.listen(1024)
        self._accepting = asyncio.ensure_future(self._accept_loop())

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, addr = await loop.sock_accept(self.sock)
            except (ConnectionAbortedError, InterruptedError):
                continue
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    await asyncio.sleep(ACCEPT_ERROR_PAUSE)  # what is held will be released
                    continue
                raise
            admission = self.admit(str(addr[0]))
            if admission is None:
                _drop(conn)
                continue
            task = asyncio.ensure_future(self._handshake(conn, admission))
            self._handshakes.add(task)
            task.add_done_callback(self._handshakes.discard)

    async def _handshake(self, conn: socket.socket, admission: Admission) -> None:
        loop = asyncio.get_running_loop()
        crowd.opened()  # until the handshake ends (then the protocol counts it)
        try:
            await loop.connect_accepted_socket(
                lambda: self.make_protocol(admission), conn,
                ssl=self.ssl_context, ssl_handshake_timeout=self.handshake_timeout,
            )
        except asyncio.CancelledError:
            _give_back(conn, admission)
            raise
        except Exception:  # noqa: BLE001 - timed out, refused by TLS, or the peer left
            # The protocol never got the connection: its place is given back here.
            _give_back(conn, admission)
        finally:
            crowd.closed()

    def close(self) -> None:
        """Stop accepting (like asyncio.Server.close, the listening socket is closed).
        Handshakes in progress go on, each within handshake_timeout: a retiring
        listener does not drop a connection it took (abandon() does, on a hard stop)."""
        if self._accepting is not None:
            self._accepting.cancel()
        with contextlib.suppress(OSError):
            self.sock.close()

    def abandon(self) -> None:
        """Cancel the handshakes in progress (their sockets close, their places are given back)."""
        for task in list(self._handshakes):
            task.cancel()

    async def wait_closed(self) -> None:
        """The accept loop has ended and every handshake has ended one way or the other."""
        tasks = [t for t in (self._accepting, *self._handshakes) if t is not None]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)


def _give_back(conn: socket.socket, admission: Admission) -> None:
    admission.release()
    with contextlib.suppress(OSError):
        conn.close()


def _drop(conn: socket.socket) -> None:
    """Close a refused connection at once (a reset: nothing is kept for it)."""
    with contextlib.suppress(OSError):
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        conn.close()
