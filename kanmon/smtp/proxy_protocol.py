"""PROXY protocol headers (HAProxy's spec, "The PROXY protocol", versions 1 and 2).

Role: a pure parser for the header a load balancer puts in front of a proxied TCP
stream (v1 text, section 2.1; v2 binary, section 2.2), and builders for both versions
(the balancer sends v2). No I/O: the caller feeds the bytes it has read so far and gets
back either "need more" (None), a ProxyHeader that says how many bytes the header took,
or a ProxyProtocolError.

Trusts: nothing in the bytes. The SMTP listener calls this only for peers listed in
`smtp.trusted_proxies`; whether to call it at all is the caller's decision, never ours.

Never: read or buffer more than MAX_HEADER_BYTES (v1: 107, spec 2.1; v2: 16 + a length
we cap at V2_MAX_PAYLOAD, spec 2.2 "the receiver must not accept a header larger than
what it can store"), accept a header it cannot fully validate, or guess an address.
"""

from __future__ import annotations

import ipaddress
import re
import struct
from dataclasses import dataclass
from typing import Literal

# Spec 2.1: "PROXY" + ... + CRLF is at most 107 bytes (TCP6 with the longest addresses).
V1_PREFIX = b"PROXY "
V1_MAX_BYTES = 107

# Spec 2.2: the 12-byte signature; it can never appear at the start of a v1 header or
# of any text protocol (it contains a NUL and begins with an empty line).
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_HEADER_BYTES = 16  # signature + ver_cmd + fam + len
# The length field can say up to 65535. Addresses take at most 216 bytes (AF_UNIX);
# the rest are TLVs (ALPN, authority, unique id <= 128, SSL info). 4 KiB holds any header
# a real balancer sends and bounds what a trusted-but-broken peer can make us hold.
V2_MAX_PAYLOAD = 4096

MAX_HEADER_BYTES = V2_HEADER_BYTES + V2_MAX_PAYLOAD

# Spec 2.2, byte 13: the highest four bits are the version (0x2), the lowest the command.
_V2_VERSION = 0x2
_CMD_LOCAL = 0x0
_CMD_PROXY = 0x1
# Byte 14: address family (high nibble) and transport protocol (low nibble).
_AF_UNSPEC, _AF_INET, _AF_INET6, _AF_UNIX = 0x0, 0x1, 0x2, 0x3
_T_UNSPEC, _T_STREAM, _T_DGRAM = 0x0, 0x1, 0x2
_ADDRESS_BYTES = {_AF_INET: 12, _AF_INET6: 36, _AF_UNIX: 216}

# Spec 2.2.1..2.2.7: TLV types that have a meaning; unknown types are skipped.
PP2_TYPE_ALPN = 0x01
PP2_TYPE_AUTHORITY = 0x02
PP2_TYPE_CRC32C = 0x03
PP2_TYPE_NOOP = 0x04
PP2_TYPE_UNIQUE_ID = 0x05
PP2_TYPE_SSL = 0x20
PP2_TYPE_NETNS = 0x30

# Spec 2.1: addresses and ports are separated by exactly one space; ports are decimal
# 0..65535. We also refuse leading zeros (no sender writes them; they hide ambiguity).
_V1_PORT_RE = re.compile(rb"^(0|[1-9][0-9]{0,4})$")

Address = tuple[str, int]


class ProxyProtocolError(ValueError):
    """A malformed, unsupported or oversized PROXY header. The connection must be closed."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """What a complete PROXY header said.

    command "PROXY": source/destination are the client's and the proxy's addresses for
    TCP over IPv4/IPv6. command "LOCAL" (v2 LOCAL, e.g. a health check, or v1 UNKNOWN):
    source and destination are None and the connection's own endpoints apply (spec 2.1,
    2.2). A v2 PROXY header with family UNSPEC or UNIX also has None addresses.
    consumed: how many bytes of the buffer the header took; the stream proper starts there.
    """

    version: Literal[1, 2]
    command: Literal["PROXY", "LOCAL"]
    family: Literal["TCP4", "TCP6", "UNKNOWN", "UNIX"]
    source: Address | None
    destination: Address | None
    consumed: int
    tlvs: tuple[tuple[int, bytes], ...] = ()


def parse_proxy_header(data: bytes | bytearray | memoryview) -> ProxyHeader | None:
    """Parse a PROXY header at the start of data.

    Returns None when data is a valid beginning of a header but incomplete (read more,
    keeping at most MAX_HEADER_BYTES). Raises ProxyProtocolError as soon as data cannot
    be the start of a valid header, or when it is complete and malformed or too large.
    """
    buf = bytes(data[:MAX_HEADER_BYTES])
    if not buf:
        return None
    if buf[0:1] == V2_SIGNATURE[0:1]:
        return _parse_v2(buf)
    if buf[0:1] == V1_PREFIX[0:1]:
        return _parse_v1(buf)
    raise ProxyProtocolError("not a PROXY protocol header")


def _parse_v1(buf: bytes) -> ProxyHeader | None:
    # Spec 2.1: the line starts with "PROXY" and a single space.
    head = buf[: len(V1_PREFIX)]
    if not V1_PREFIX.startswith(head):
        raise ProxyProtocolError("not a PROXY protocol header")
    end = buf.find(b"\r\n", 0, V1_MAX_BYTES)
    if end < 0:
        window = buf[:V1_MAX_BYTES]
        # A bare LF or CR anywhere but as the last byte can never become CRLF.
        if b"\n" in window or b"\r" in window[:-1]:
            raise ProxyProtocolError("PROXY v1 header: line not ended by CRLF")
        if len(buf) >= V1_MAX_BYTES:
            raise ProxyProtocolError(f"PROXY v1 header longer than {V1_MAX_BYTES} bytes")
        return None
    line = buf[:end]
    consumed = end + 2
    if b"\r" in line or b"\n" in line or b"\x00" in line:
        raise ProxyProtocolError("PROXY v1 header: stray control character")
    parts = line.split(b" ")
    if parts[0] != b"PROXY" or len(parts) < 2:
        raise ProxyProtocolError("PROXY v1 header: expected 'PROXY <protocol> ...'")
    proto = parts[1]
    if proto == b"UNKNOWN":
        # Spec 2.1: with UNKNOWN the receiver must ignore the rest of the line.
        return ProxyHeader(1, "LOCAL", "UNKNOWN", None, None, consumed)
    if proto not in (b"TCP4", b"TCP6"):
        raise ProxyProtocolError(f"PROXY v1 header: unknown protocol {proto[:16]!r}")
    if len(parts) != 6:
        raise ProxyProtocolError("PROXY v1 header: expected protocol, 2 addresses and 2 ports separated by one space")
    version = 4 if proto == b"TCP4" else 6
    src_ip = _v1_address(parts[2], version)
    dst_ip = _v1_address(parts[3], version)
    src_port = _v1_port(parts[4])
    dst_port = _v1_port(parts[5])
    family: Literal["TCP4", "TCP6"] = "TCP4" if version == 4 else "TCP6"
    return ProxyHeader(1, "PROXY", family, (src_ip, src_port), (dst_ip, dst_port), consumed)


def _v1_address(raw: bytes, version: int) -> str:
    try:
        text = raw.decode("ascii")
        addr = ipaddress.ip_address(text)
    except (UnicodeDecodeError, ValueError):
        raise ProxyProtocolError(f"PROXY v1 header: {raw[:45]!r} is not an IP address") from None
    if addr.version != version or "%" in text:
        raise ProxyProtocolError(f"PROXY v1 header: {text!r} is not an IPv{version} address")
    if isinstance(addr, ipaddress.IPv6Address):
        return _v6_text(addr.packed)
    return str(addr)


def _v1_port(raw: bytes) -> int:
    if not _V1_PORT_RE.match(raw) or int(raw) > 65535:
        raise ProxyProtocolError(f"PROXY v1 header: {raw[:8]!r} is not a port (0..65535)")
    return int(raw)


def _parse_v2(buf: bytes) -> ProxyHeader | None:
    sig = buf[: len(V2_SIGNATURE)]
    if not V2_SIGNATURE.startswith(sig):
        raise ProxyProtocolError("not a PROXY protocol header")
    if len(buf) < V2_HEADER_BYTES:
        if len(buf) > len(V2_SIGNATURE):
            _v2_check_ver_cmd(buf[12])
        return None
    ver_cmd, fam, length = struct.unpack_from("!BBH", buf, 12)
    command = _v2_check_ver_cmd(ver_cmd)
    if length > V2_MAX_PAYLOAD:
        raise ProxyProtocolError(f"PROXY v2 header: length {length} is above our limit of {V2_MAX_PAYLOAD}")
    total = V2_HEADER_BYTES + length
    if len(buf) < total:
        return None
    payload = buf[V2_HEADER_BYTES:total]
    if command == _CMD_LOCAL:
        # Spec 2.2: with LOCAL the receiver must ignore the address information and
        # use the connection's real endpoints (health checks send this).
        return ProxyHeader(2, "LOCAL", "UNKNOWN", None, None, total)
    af, transport = fam >> 4, fam & 0x0F
    if af not in (_AF_UNSPEC, _AF_INET, _AF_INET6, _AF_UNIX):
        raise ProxyProtocolError(f"PROXY v2 header: unknown address family 0x{af:x}")
    if transport not in (_T_UNSPEC, _T_STREAM, _T_DGRAM):
        raise ProxyProtocolError(f"PROXY v2 header: unknown transport 0x{transport:x}")
    if af == _AF_UNSPEC:
        # Spec 2.2: UNSPEC with PROXY: the receiver uses the real connection endpoints
        # and ignores the address block, whose layout is then unknown.
        return ProxyHeader(2, "PROXY", "UNKNOWN", None, None, total)
    if transport != _T_STREAM:
        raise ProxyProtocolError("PROXY v2 header: a TCP listener accepts only STREAM transport")
    need = _ADDRESS_BYTES[af]
    if length < need:
        raise ProxyProtocolError(f"PROXY v2 header: length {length} too short for its address family (needs {need})")
    tlvs = _parse_tlvs(payload[need:])
    if af == _AF_UNIX:
        return ProxyHeader(2, "PROXY", "UNIX", None, None, total, tlvs)
    if af == _AF_INET:
        src, dst, sport, dport = struct.unpack_from("!4s4sHH", payload)
        return ProxyHeader(
            2, "PROXY", "TCP4",
            (str(ipaddress.IPv4Address(src)), sport), (str(ipaddress.IPv4Address(dst)), dport), total, tlvs,
        )
    src, dst, sport, dport = struct.unpack_from("!16s16sHH", payload)
    return ProxyHeader(2, "PROXY", "TCP6", (_v6_text(src), sport), (_v6_text(dst), dport), total, tlvs)


def _v6_text(packed: bytes) -> str:
    """An IPv4-mapped address (::ffff:a.b.c.d) is the IPv4 client: relay_networks and
    records see it as a.b.c.d, as they would on a direct IPv4 connection."""
    addr = ipaddress.IPv6Address(packed)
    return str(addr.ipv4_mapped) if addr.ipv4_mapped else str(addr)


def _v2_check_ver_cmd(ver_cmd: int) -> int:
    if ver_cmd >> 4 != _V2_VERSION:
        raise ProxyProtocolError(f"PROXY v2 header: unsupported version {ver_cmd >> 4}")
    command = ver_cmd & 0x0F
    if command not in (_CMD_LOCAL, _CMD_PROXY):
        # Spec 2.2: "other values are unassigned and must not be emitted by senders.
        # Receivers must drop connections presenting unexpected values here."
        raise ProxyProtocolError(f"PROXY v2 header: unknown command 0x{command:x}")
    return command


def _parse_tlvs(data: bytes) -> tuple[tuple[int, bytes], ...]:
    """Spec 2.2.x: type (1 byte), length (2 bytes, network order), value."""
    out = []
    pos = 0
    while pos < len(data):
        if len(data) - pos < 3:
            raise ProxyProtocolError("PROXY v2 header: truncated TLV")
        kind, size = struct.unpack_from("!BH", data, pos)
        pos += 3
        if size > len(data) - pos:
            raise ProxyProtocolError(f"PROXY v2 header: TLV 0x{kind:02x} runs past the header")
        out.append((kind, data[pos : pos + size]))
        pos += size
    return tuple(out)


# ---------------------------------------------------------------------------
# Builders


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(f"{text!r} is not an IP address") from None


def _check_port(port: int) -> int:
    if not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"{port!r} is not a port (0..65535)")
    return port


def build_proxy_v2(
    source: Address | None,
    destination: Address | None,
    tlvs: tuple[tuple[int, bytes], ...] = (),
) -> bytes:
    """A PROXY v2 header (spec 2.2) for a TCP connection from source to destination.

    Both None: a LOCAL header (what a health check sends). Mixed families: the IPv4
    address is written as IPv4-mapped IPv6 (spec 2.2 wants one family for both).
    """
    tlv_bytes = b"".join(struct.pack("!BH", kind, len(value)) + value for kind, value in tlvs)
    if source is None or destination is None:
        if source is not None or destination is not None:
            raise ValueError("give both source and destination, or neither (LOCAL)")
        body = tlv_bytes
        ver_cmd, fam = (_V2_VERSION << 4) | _CMD_LOCAL, (_AF_UNSPEC << 4) | _T_UNSPEC
    else:
        src, dst = _ip(source[0]), _ip(destination[0])
        sport, dport = _check_port(source[1]), _check_port(destination[1])
        if src.version != dst.version:
            src = src if src.version == 6 else ipaddress.IPv6Address(f"::ffff:{src}")
            dst = dst if dst.version == 6 else ipaddress.IPv6Address(f"::ffff:{dst}")
        af = _AF_INET if src.version == 4 else _AF_INET6
        body = src.packed + dst.packed + struct.pack("!HH", sport, dport) + tlv_bytes
        ver_cmd, fam = (_V2_VERSION << 4) | _CMD_PROXY, (af << 4) | _T_STREAM
    if len(body) > V2_MAX_PAYLOAD:
        raise ValueError(f"PROXY v2 header body of {len(body)} bytes is above {V2_MAX_PAYLOAD}")
    return V2_SIGNATURE + struct.pack("!BBH", ver_cmd, fam, len(body)) + body


def build_proxy_v1(source: Address | None, destination: Address | None) -> bytes:
    """A PROXY v1 header line (spec 2.1); both None gives 'PROXY UNKNOWN'."""
    if source is None or destination is None:
        if source is not None or destination is not None:
            raise ValueError("give both source and destination, or neither (UNKNOWN)")
        return b"PROXY UNKNOWN\r\n"
    src, dst = _ip(source[0]), _ip(destination[0])
    if src.version != dst.version:
        raise ValueError("PROXY v1 needs source and destination of the same address family")
    proto = "TCP4" if src.version == 4 else "TCP6"
    line = f"PROXY {proto} {src} {dst} {_check_port(source[1])} {_check_port(destination[1])}\r\n"
    return line.encode("ascii")
