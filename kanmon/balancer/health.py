"""Health checks of real servers: tcp, smtp, http and ping (ICMP echo).

Role: one check of one real server, bounded by the check's timeout, giving a
CheckResult (passed or not, a short detail for the status and the event log, the
round-trip time that least-rtt uses). The service runs them on schedule and feeds the
results to the Pool.

Trusts: the validated config. Nothing a real server sends: replies are read with a
bounded line length and a bounded number of lines, and only their status codes are used.

Never: wait without a timeout, raise out of run_check (every failure is a failed check
with its reason), or send more than a greeting-sized request. When the virtual server
sends PROXY headers, tcp/smtp/http checks open with a PROXY v2 LOCAL header (spec 2.2:
LOCAL is for connections the proxy makes on its own, such as health checks), so a real
server that requires the header from us still answers them.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import struct
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kanmon.smtp.proxy_protocol import build_proxy_v2

if TYPE_CHECKING:
    from kanmon.config import HealthCheck

MAX_LINE = 4096  # longest reply line we read from a real server
MAX_BANNER_LINES = 32  # RFC 5321 4.2.1 multi-line 220 greeting, bounded
ICMP_PAYLOAD = b"kanmon-balancer-check\0\0\0"


@dataclass(frozen=True, slots=True)
class CheckResult:
    ok: bool
    detail: str
    rtt: float | None = None  # seconds


async def run_check(
    health: HealthCheck,
    address: tuple[str, int],
    *,
    send_proxy_local: bool,
    source: tuple[str, int] | None = None,
) -> CheckResult:
    """One check of address as configured, from source when given; never raises (except cancellation)."""
    start = time.monotonic()
    try:
        async with asyncio.timeout(health.timeout):
            if health.type == "ping":
                return await _check_ping(address[0], start)
            reader, writer = await asyncio.open_connection(address[0], address[1], limit=MAX_LINE, local_addr=source)
            try:
                if send_proxy_local:
                    writer.write(build_proxy_v2(None, None))
                if health.type == "tcp":
                    return CheckResult(True, "connected", time.monotonic() - start)
                if health.type == "smtp":
                    return await _check_smtp(reader, writer, start)
                return await _check_http(reader, writer, health, address, start)
            finally:
                writer.close()
                try:
                    async with asyncio.timeout(1.0):
                        await writer.wait_closed()
                except (OSError, TimeoutError):
                    pass
    except TimeoutError:
        return CheckResult(False, f"no answer within {health.timeout:g}s")
    except ConnectionRefusedError:
        return CheckResult(False, "connection refused")
    except (ConnectionResetError, BrokenPipeError):
        return CheckResult(False, "connection reset")
    except asyncio.IncompleteReadError:
        return CheckResult(False, "connection closed before the reply")
    except (asyncio.LimitOverrunError, ValueError):
        return CheckResult(False, f"reply line longer than {MAX_LINE} bytes")
    except OSError as e:
        return CheckResult(False, e.strerror or str(e))


async def _read_line(reader: asyncio.StreamReader) -> str:
    line = await reader.readuntil(b"\n")
    return line.decode("utf-8", "replace").rstrip("\r\n")


async def _check_smtp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, start: float) -> CheckResult:
    # RFC 5321 4.2: the greeting is "220" (possibly multi-line "220-"), then we QUIT (4.1.1.10).
    for _ in range(MAX_BANNER_LINES):
        line = await _read_line(reader)
        code, sep = line[:3], line[3:4]
        if code != "220":
            return CheckResult(False, f"greeting was {line[:80]!r}, not 220")
        if sep != "-":
            rtt = time.monotonic() - start
            writer.write(b"QUIT\r\n")
            await writer.drain()
            try:
                await _read_line(reader)  # 221; its absence does not fail the check
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            return CheckResult(True, line[:80], rtt)
    return CheckResult(False, f"greeting longer than {MAX_BANNER_LINES} lines")


async def _check_http(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    health: HealthCheck,
    address: tuple[str, int],
    start: float,
) -> CheckResult:
    host = health.host or (f"[{address[0]}]" if ":" in address[0] else address[0])
    request = (
        f"GET {health.path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: kanmon-balancer-check\r\n"
        "Connection: close\r\nAccept: */*\r\n\r\n"
    )
    writer.write(request.encode("ascii", "replace"))
    await writer.drain()
    line = await _read_line(reader)
    # RFC 9112 4: status-line = HTTP-version SP status-code SP [ reason-phrase ]
    parts = line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not (parts[1].isdigit() and len(parts[1]) == 3):
        return CheckResult(False, f"not an HTTP status line: {line[:80]!r}")
    status = int(parts[1])
    ok = 200 <= status < 400
    return CheckResult(ok, f"HTTP {line[len(parts[0]) + 1:][:70]}", time.monotonic() - start if ok else None)


# ---------------------------------------------------------------------------
# ICMP echo (RFC 792; ICMPv6 RFC 4443 4.1/4.2)

# The socket constructor, a seam for tests that simulate a process without privilege.
_new_socket = socket.socket


class IcmpPermissionError(PermissionError):
    """This process may open no kind of ICMP socket."""


def open_icmp_socket(family: int) -> socket.socket:
    """A non-blocking ICMP socket: unprivileged datagram if allowed, else raw.

    Linux allows SOCK_DGRAM/IPPROTO_ICMP when the process's group is in
    net.ipv4.ping_group_range; SOCK_RAW needs CAP_NET_RAW. Raises IcmpPermissionError
    (with both reasons) when neither works.
    """
    proto = socket.IPPROTO_ICMP if family == socket.AF_INET else socket.IPPROTO_ICMPV6
    reasons = []
    for kind, why in (
        (socket.SOCK_DGRAM, "unprivileged ICMP sockets (sysctl net.ipv4.ping_group_range)"),
        (socket.SOCK_RAW, "raw sockets (CAP_NET_RAW)"),
    ):
        try:
            sock = _new_socket(family, kind, proto)
        except OSError as e:
            if e.errno in (errno.EPERM, errno.EACCES) or isinstance(e, PermissionError):
                reasons.append(f"{why}: {e.strerror or e}")
                continue
            raise
        sock.setblocking(False)
        return sock
    raise IcmpPermissionError(errno.EPERM, "; ".join(reasons))


def icmp_privilege_error(family: int = socket.AF_INET) -> str | None:
    """None if this process can send ICMP echo; else why it cannot."""
    try:
        open_icmp_socket(family).close()
    except IcmpPermissionError as e:
        return f"this process may not open an ICMP socket ({e.strerror}); run as root, grant CAP_NET_RAW, or add its group to net.ipv4.ping_group_range"
    except OSError as e:
        return f"cannot open an ICMP socket: {e.strerror or e}"
    return None


def internet_checksum(data: bytes) -> int:
    """RFC 1071: one's complement of the one's complement sum of 16-bit words."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


_sequence = 0


async def _check_ping(host: str, start: float) -> CheckResult:
    global _sequence
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, None, type=socket.SOCK_DGRAM)
    if not infos:
        return CheckResult(False, f"{host}: no address")
    family, _, _, _, sockaddr = infos[0]
    sock = open_icmp_socket(family)
    try:
        raw = sock.type == socket.SOCK_RAW
        v6 = family == socket.AF_INET6
        ident = os.getpid() & 0xFFFF
        _sequence = (_sequence + 1) & 0xFFFF
        seq = _sequence
        echo_request, echo_reply = (128, 129) if v6 else (8, 0)
        header = struct.pack("!BBHHH", echo_request, 0, 0, ident, seq)
        # ICMPv6 checksums cover a pseudo-header; the kernel computes them (RFC 3542 3.1).
        checksum = 0 if v6 else internet_checksum(header + ICMP_PAYLOAD)
        packet = struct.pack("!BBHHH", echo_request, 0, checksum, ident, seq) + ICMP_PAYLOAD
        sock.sendto(packet, sockaddr)
        while True:
            data, peer = await _recv_datagram(loop, sock)
            if raw and not v6:
                data = data[(data[0] & 0x0F) * 4 :] if data else b""  # strip the IPv4 header
            if len(data) < 8 or peer[0] != sockaddr[0]:
                continue
            kind, _, _, rid, rseq = struct.unpack_from("!BBHHH", data)
            # Datagram ICMP sockets rewrite the id (they own it), so match on seq there.
            if kind == echo_reply and rseq == seq and (not raw or rid == ident):
                rtt = time.monotonic() - start
                return CheckResult(True, f"echo reply in {rtt * 1000:.1f} ms", rtt)
    finally:
        sock.close()


async def _recv_datagram(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> tuple[bytes, tuple]:
    """One datagram from a non-blocking socket (the caller bounds the wait)."""
    while True:
        try:
            return sock.recvfrom(2048)
        except BlockingIOError:
            pass
        ready: asyncio.Future[None] = loop.create_future()
        loop.add_reader(sock.fileno(), lambda: ready.done() or ready.set_result(None))
        try:
            await ready
        finally:
            loop.remove_reader(sock.fileno())
