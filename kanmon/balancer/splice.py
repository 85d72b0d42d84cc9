"""Splicing one client connection to one real server (TCP, both directions).

Role: a pair of asyncio.Protocols joined by a Link. Bytes read on one side are written
to the other; when a side's write buffer passes HIGH_WATER the other side stops reading
(pause_reading) until it drains below LOW_WATER, so a fast sender and a slow receiver
cost at most about HIGH_WATER plus one read per direction. A client's half-close is
passed on (its EOF becomes write_eof towards the real server, whose reply still flows
back); EOF from the real server closes the link, as do either side being lost and
idle_timeout without traffic. What the client sends before its real server is connected
(an implicit-TLS ClientHello, any client-first protocol, an SMTP early talker's bytes)
is held, up to EARLY_LIMIT bytes, and written to the real server first, in order, right
after the PROXY header; past that limit the client is paused until the real server is
there. A half-close meanwhile is passed on after them. (The client is not paused from
the start: that cost two epoll changes per connection, and SMTP clients wait anyway.)
Once both sides are connected, End.data_received writes each chunk straight to the
other side (End.peer); a connection that ended leaves no reference cycle behind.

Zero copy: on Linux, once a connection has carried SPLICE_AFTER bytes one way (a big
message, an IMAP fetch of an attachment: not an SMTP dialogue, whose many small
exchanges cost less through the transports than the pipes would) and nothing is waiting
in either write buffer, the Link moves the bytes itself with splice(2) from one socket
into a pipe and from the pipe into the other socket (a _Pump per direction), without
bringing them into Python: the transports stay paused and are only used to close. A
chunk a transport had already read when it was paused is written first. Flow control is
the pipe's (at most one read, 64 KiB, waits in it); EOF, half-close and the idle timeout
behave as on the transport path. Where splice(2) is missing the transport path stays.

Trusts: nothing in the bytes: they are never parsed, only counted and copied.

Never: buffer without bound, keep a client connection open after its real server is
gone (that closes this client only, nothing else), or outlive its Link (every timer and
transport is released in Link.finish()).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    from kanmon.balancer.pool import RealServerState

HIGH_WATER = 64 * 1024
LOW_WATER = 16 * 1024
EARLY_LIMIT = 64 * 1024  # client bytes held while its real server connects
SPLICE_CHUNK = 256 * 1024  # one splice(2) moves at most this much: the pipe is made this big (F_SETPIPE_SZ)
SPLICE_AFTER = 256 * 1024  # bytes one way on the transport path before a connection is spliced
# splice(2) where the system has it; Link(..., splice=False) or [balancer] splice = false keeps the copy path.
CAN_SPLICE = hasattr(os, "splice") and hasattr(os, "pipe2")
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)
_AGAIN = (errno.EAGAIN, errno.EWOULDBLOCK)


class End(asyncio.Protocol):
    """One side of a spliced connection: the client's or the real server's."""

    def __init__(self, link: Link, side: str, first_bytes: bytes = b""):
        self.link = link
        self.side = side  # "client" | "server"
        self._first_bytes = first_bytes  # server side: the PROXY header, sent before anything else
        self.inbound = side == "client"  # its bytes count as bytes_in of the real server
        self.transport: asyncio.Transport | None = None
        # The other side while bytes go straight across through the transports (both
        # connected, not spliced, not lost): data_received writes to it directly.
        self.peer: End | None = None
        self._pause_reasons: set[str] = set()
        self.eof = False
        self.lost = False

    # -- asyncio.Protocol ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports do not subclass asyncio.Transport; they behave as one.)
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=HIGH_WATER, low=LOW_WATER)
        if self.side == "client":
            # Until the real server is connected, what the client sends is held by the
            # link (Link.forward), up to EARLY_LIMIT; past that the client is paused and
            # the kernel's receive buffer holds the rest. (Not paused from the start: an
            # SMTP client waits for the banner, and pausing and resuming every client
            # costs two epoll changes per connection for nothing.)
            self.link.client_connected(self)
        else:
            # The real server may speak first (an SMTP banner) before the connecting
            # task resumes: from now on its bytes go to the client.
            self.link.server = self
            if self._first_bytes:
                self.transport.write(self._first_bytes)

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is None:
            self.link.forward(self, data)
            return
        # The common case, inline (it runs for every chunk): both sides connected,
        # copying through the transports. As Link.forward does, with fewer calls.
        link = self.link
        link._last_activity = link.loop.time()
        transport = peer.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)
        real = link.real
        if real is not None:
            if self.inbound:
                real.bytes_in += len(data)
            else:
                real.bytes_out += len(data)
        if link._splice_wanted:
            link.copied(self, len(data))

    def eof_received(self) -> bool:
        self.eof = True
        self.link.eof_from(self)
        return True  # keep our write direction open (half-close)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.link.lost(self, exc)
        # No callback follows: drop the transport's reference to us and ours to it, so
        # that this connection's objects go by reference counting, not by the cyclic GC.
        self.transport = None

    def pause_writing(self) -> None:
        # Our write buffer is full: stop reading from the other side.
        other = self.link.other(self)
        if other is not None:
            other.pause_reading("peer-full")

    def resume_writing(self) -> None:
        other = self.link.other(self)
        if other is not None:
            other.resume_reading("peer-full")

    # -- flow control with reasons (connecting, peer-full) -------------------------

    def pause_reading(self, reason: str) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        if not self._pause_reasons:
            self.transport.pause_reading()
        self._pause_reasons.add(reason)

    def resume_reading(self, reason: str) -> None:
        if reason not in self._pause_reasons:
            return
        self._pause_reasons.discard(reason)
        if not self._pause_reasons and self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None and not self.lost:
            self.transport.abort()


class Link:
    """A client connection and, once connected, its real server connection."""

    def __init__(
        self,
        idle_timeout: float,
        on_client: Callable[[Link], None],
        on_finish: Callable[[Link], None],
        splice: bool = False,
        loop: asyncio.AbstractEventLoop | None = None,
    ):
        self.loop = loop or asyncio.get_running_loop()
        self._splice_wanted = splice and CAN_SPLICE
        self._copied = [0, 0]  # bytes forwarded on the transport path from the client, from the server
        self.spliced = False  # from some point on, its bytes went by splice(2), not through Python
        self._pumps: tuple[_Pump, _Pump] | None = None  # (client -> server, server -> client) when splicing
        self.client: End | None = None
        self.server: End | None = None
        self.real: RealServerState | None = None  # the real server it is (being) spliced to
        self._slot: RealServerState | None = None  # whose connection count we hold
        self.connect_task: asyncio.Task[None] | None = None
        self.finished = False
        self._idle_timeout = idle_timeout
        self._last_activity = self.loop.time()
        self._idle_timer: asyncio.TimerHandle | None = None
        self._closing = False
        self._early = bytearray()  # client bytes that arrived before the real server
        self._holding = True  # until server_connected: client bytes go to _early
        self._eof_held = False  # the client's EOF came after held bytes: passed on after them
        self._on_client = on_client
        self._on_finish = on_finish

    @property
    def client_address(self) -> tuple[str, int] | None:
        peer = self.client.transport.get_extra_info("peername") if self.client and self.client.transport else None
        return (peer[0], peer[1]) if peer else None

    @property
    def virtual_address(self) -> tuple[str, int] | None:
        sock = self.client.transport.get_extra_info("sockname") if self.client and self.client.transport else None
        return (sock[0], sock[1]) if sock else None

    def other(self, end: End) -> End | None:
        """The opposite side; None for a server End that is no longer (or not yet) ours,
        e.g. an attempt abandoned after a connect timeout."""
        if end is self.client:
            return self.server
        if end is self.server:
            return self.client
        return None

    def client_connected(self, end: End) -> None:
        self.client = end
        self._idle_timer = self.loop.call_later(self._idle_timeout, self._check_idle)
        self._on_client(self)

    def reserve(self, real: RealServerState) -> None:
        """Count this connection against real (max_connections) while it connects and runs."""
        self.release()
        self.real = self._slot = real
        real.opened()

    def release(self) -> None:
        """Give the connection slot back (idempotent)."""
        if self._slot is not None:
            self._slot.closed()
            self._slot = None

    def server_connected(self, end: End) -> None:
        """The real server is connected: hand it what the client sent meanwhile, then
        start reading from the client."""
        self.server = end
        self.touch()
        self._holding = False
        if self._early:
            early, self._early = bytes(self._early), bytearray()
            self._count(self.client, len(early))
            end.write(early)
        if self.client is not None:
            if not self.client.lost and not end.lost:
                self.client.peer, end.peer = end, self.client
            self.client.resume_reading("connecting")
            if self._eof_held:  # it half-closed after the held bytes
                self._eof_held = False
                self.eof_from(self.client)


    def _start_splice(self) -> bool:
        """Move the bytes with splice(2) from now on; False (nothing changed) when not possible."""
        client, server = self.client, self.server
        if client is None or server is None or client.transport is None or server.transport is None:
            return False
        if client.eof or server.eof or client.lost or server.lost:
            return False
        if client.transport.is_closing() or server.transport.is_closing():
            return False
        if client.transport.get_write_buffer_size() or server.transport.get_write_buffer_size():
            return False  # written but not sent yet: the transport path keeps the order
        csock, ssock = client.transport.get_extra_info("socket"), server.transport.get_extra_info("socket")
        if csock is None or ssock is None:
            return False
        fds: list[int] = []
        try:
            cfd = os.dup(csock.fileno())
            fds.append(cfd)
            sfd = os.dup(ssock.fileno())
            fds.append(sfd)
            up = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            fds.extend(up)
            down = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            fds.extend(down)
            for w in (up[1], down[1]):  # as much per turn of the loop as the copy path reads
                with contextlib.suppress(OSError):  # beyond fs.pipe-max-size: the default 64 KiB
                    fcntl.fcntl(w, getattr(fcntl, "F_SETPIPE_SZ", 1031), SPLICE_CHUNK)
        except OSError:
            for fd in fds:
                os.close(fd)
            return False
        client.pause_reading("splice")
        server.pause_reading("splice")
        client.peer = server.peer = None  # from now on a chunk read late goes through forward()
        self._pumps = (_Pump(self, cfd, sfd, up, client), _Pump(self, sfd, cfd, down, server))
        self.spliced = True
        for pump in self._pumps:
            pump.start()
        return True

    def _stop_splice(self) -> None:
        """Stop the pumps and close their descriptors (the transports close the sockets)."""
        pumps, self._pumps = self._pumps, None
        if pumps is None:
            return
        for pump in pumps:
            pump.stop()
        os.close(pumps[0].src)
        os.close(pumps[1].src)

    def pumped_eof(self, pump: _Pump) -> None:
        """A spliced side has sent everything it will send, and all of it was passed on
        (a pump reads only with its pipe empty)."""
        assert self._pumps is not None
        if pump is self._pumps[1]:
            self.close()  # the real server finished: as eof_from(server)
            return
        try:
            _shutdown_write(pump.dst)  # the client's half-close, passed on to the real server
        except OSError:
            self.close()
            return
        if self._pumps[1].eof:
            self.close()

    def pump_failed(self) -> None:
        self.abort()

    def touch(self) -> None:
        self._last_activity = self.loop.time()

    def forward(self, source: End, data: bytes) -> None:
        self.touch()
        if source is self.client and self._holding:
            # The real server is not connected yet: keep the bytes for it (bounded;
            # beyond the limit the client waits, paused, as flow control would).
            self._early += data
            if len(self._early) >= EARLY_LIMIT:
                source.pause_reading("connecting")
            return
        if self._pumps is not None:
            # Read by a transport in the same turn of the loop as it was paused for the
            # pumps: it goes out first, before anything its pump reads.
            self._count(source, len(data))
            self._pumps[0 if source is self.client else 1].late(data)
            return
        target = self.other(source)
        if target is None:
            return
        target.write(data)
        self._count(source, len(data))
        if self._splice_wanted:
            self.copied(source, len(data))

    def copied(self, source: End, n: int) -> None:
        """n bytes from source went through the transports: splice from SPLICE_AFTER on."""
        way = 0 if source is self.client else 1
        self._copied[way] += n
        if self._copied[way] >= SPLICE_AFTER and self.server is not None and not self._closing:
            self._start_splice()  # while something waits in a write buffer: tried again at the next chunk

    def _count(self, source: End | None, n: int) -> None:
        if self.real is not None:
            if source is self.client:
                self.real.bytes_in += n
            else:
                self.real.bytes_out += n

    def eof_from(self, source: End) -> None:
        target = self.other(source)
        if source is not self.client and source is not self.server:
            return
        if source is self.client and self._holding and (self._early or self.connect_task is not None):
            # Passed on once the real server is connected (after the held bytes), by
            # server_connected, as it was when the client was paused while connecting.
            self._eof_held = True
            return
        if source is self.server:
            # The real server has finished (SMTP servers close after 221, or when they
            # die): close the client too once what we hold for it is sent. Only the
            # client's half-close is passed on, so a client that shuts down writing
            # after QUIT still reads the 221.
            self.close()
            return
        if target is not None and target.transport is not None and not target.transport.is_closing():
            if target.transport.can_write_eof():
                target.transport.write_eof()
            else:
                target.close()
        if self.client is not None and self.server is not None and self.client.eof and self.server.eof:
            self.close()
        elif self.server is None and source is self.client:
            self.close()

    def lost(self, end: End, exc: Exception | None) -> None:
        # Either side gone: close the other (a dead real server closes this client
        # only). close() flushes what is already buffered for the survivor.
        if end is not self.client and end is not self.server:
            return  # an abandoned connect attempt
        end.peer = None
        other = self.other(end)
        if other is not None:
            other.peer = None
        if other is not None:
            other.close()
        if self.connect_task is not None and not self.connect_task.done():
            self.connect_task.cancel()
        if (self.client is None or self.client.lost) and (self.server is None or self.server.lost):
            self.finish()
        elif other is None:
            self.finish()

    def _check_idle(self) -> None:
        self._idle_timer = None
        if self.finished:
            return
        idle = self.loop.time() - self._last_activity
        if idle >= self._idle_timeout:
            if self._closing:
                # Closed an idle_timeout ago and still not gone: a peer that does not
                # read what we hold for it. Drop it (and its buffer).
                self.abort()
                return
            self.close()
            self._idle_timer = self.loop.call_later(self._idle_timeout, self._check_idle)
        else:
            self._idle_timer = self.loop.call_later(self._idle_timeout - idle, self._check_idle)

    def close(self) -> None:
        """Close both sides gracefully (buffered bytes are still sent; a peer that takes
        none of them for idle_timeout is aborted)."""
        self._stop_splice()
        self._closing = True
        for end in (self.client, self.server):
            if end is not None:
                end.close()
        if self.server is None and self.connect_task is not None and not self.connect_task.done():
            self.connect_task.cancel()

    def abort(self) -> None:
        self._stop_splice()
        for end in (self.client, self.server):
            if end is not None:
                end.abort()

    def finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        self._stop_splice()
        self._early = bytearray()
        self.release()
        for end in (self.client, self.server):
            if end is not None:
                end.peer = None
        # Both sides are gone: no callback of theirs reaches this link any more. Without
        # the references both ways, a connection's objects are freed as it ends rather
        # than left to the cyclic GC (whose collections cost a busy balancer CPU).
        self.client = self.server = None
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        self._on_finish(self)


def _shutdown_write(fd: int) -> None:
    """shutdown(fd, SHUT_WR) on a descriptor we do not own as a socket object."""
    s = socket.socket(fileno=os.dup(fd))
    try:
        s.shutdown(socket.SHUT_WR)
    finally:
        s.close()


class _Pump:
    """One direction of a spliced Link: src socket -> pipe -> dst socket, by splice(2).

    It reads only while the pipe is empty, so the pipe never holds more than one read;
    when dst cannot take the bytes it waits for dst to be writable, src unread (the
    sender's TCP window closes: flow control as on the transport path).
    """

    def __init__(self, link: Link, src: int, dst: int, pipe: tuple[int, int], end: End):
        self.link = link
        self.src, self.dst = src, dst
        self.pipe_r, self.pipe_w = pipe
        self.end = end  # the End whose bytes this pump moves (for the counts)
        self.in_pipe = 0
        self.pending = b""  # read by the transport before the pump started: sent first
        self.eof = False
        self._reading = False
        self._writing = False
        self._stopped = False

    def start(self) -> None:
        self._read_on()

    def late(self, data: bytes) -> None:
        self.pending += data
        self._read_off()
        self._flush()

    def _read_on(self) -> None:
        if not self._reading and not self._stopped and not self.pending:
            self.link.loop.add_reader(self.src, self._readable)
            self._reading = True

    def _read_off(self) -> None:
        if self._reading:
            self.link.loop.remove_reader(self.src)
            self._reading = False

    def stop(self) -> None:
        self._stopped = True
        self._read_off()
        if self._writing:
            self.link.loop.remove_writer(self.dst)
            self._writing = False
        os.close(self.pipe_r)
        os.close(self.pipe_w)

    def _readable(self) -> None:
        if self._stopped or self.in_pipe or self.pending:
            return
        try:
            n = os.splice(self.src, self.pipe_w, SPLICE_CHUNK, flags=_SPLICE_FLAGS)
        except BlockingIOError:
            return
        except OSError:
            self.link.pump_failed()
            return
        if n == 0:
            self.eof = True
            self.end.eof = True
            self._read_off()
            self.link.pumped_eof(self)
            return
        self.link.touch()
        self.link._count(self.end, n)
        self.in_pipe = n
        self._flush()

    def _flush(self) -> None:
        while self.pending:
            try:
                n = os.write(self.dst, self.pending)
            except BlockingIOError:
                self._wait_writable()
                return
            except OSError:
                self.link.pump_failed()
                return
            self.pending = self.pending[n:]
        while self.in_pipe:
            try:
                n = os.splice(self.pipe_r, self.dst, self.in_pipe, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                self._wait_writable()
                return
            except OSError:
                self.link.pump_failed()
                return
            self.in_pipe -= n
        if self._writing:
            self.link.loop.remove_writer(self.dst)
            self._writing = False
        self._read_on()

    def _wait_writable(self) -> None:
        self._read_off()
        if not self._writing:
            self.link.loop.add_writer(self.dst, self._writable)
            self._writing = True

    def _writable(self) -> None:
        if not self._stopped:
            self.link.touch()
            self._flush()
