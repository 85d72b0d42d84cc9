"""PROXY protocol v1/v2 parser and builders (HAProxy spec sections 2.1 and 2.2)."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kanmon.smtp.proxy_protocol import (
    MAX_HEADER_BYTES,
    PP2_TYPE_AUTHORITY,
    PP2_TYPE_UNIQUE_ID,
    V1_MAX_BYTES,
    V2_MAX_PAYLOAD,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyProtocolError,
    build_proxy_v1,
    build_proxy_v2,
    parse_proxy_header,
)

# ---------------------------------------------------------------------------
# v1 (spec 2.1)


def test_v1_tcp4_and_consumed():
    data = b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 25\r\nEHLO client\r\n"
    h = parse_proxy_header(data)
    assert h == ProxyHeader(1, "PROXY", "TCP4", ("192.0.2.7", 56324), ("198.51.100.1", 25), 44)
    assert data[h.consumed :] == b"EHLO client\r\n"


def test_v1_tcp6():
    h = parse_proxy_header(b"PROXY TCP6 2001:db8::1 2001:db8::2 65535 0\r\n")
    assert h is not None
    assert (h.family, h.source, h.destination) == ("TCP6", ("2001:db8::1", 65535), ("2001:db8::2", 0))


def test_v1_longest_lines_are_accepted():
    # Spec 2.1: TCP/IPv6 lines are at most 104 bytes, UNKNOWN lines at most 107.
    addr = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    data = f"PROXY TCP6 {addr} {addr} 65535 65535\r\n".encode()
    assert len(data) == 104
    h = parse_proxy_header(data)
    assert h is not None and h.consumed == 104
    data = b"PROXY UNKNOWN " + b"x" * (V1_MAX_BYTES - 16) + b"\r\n"
    assert len(data) == V1_MAX_BYTES
    h = parse_proxy_header(data)
    assert h is not None and h.consumed == V1_MAX_BYTES


def test_v1_unknown_ignores_rest_of_line():
    h = parse_proxy_header(b"PROXY UNKNOWN whatever 1 2 3\r\nrest")
    assert h == ProxyHeader(1, "LOCAL", "UNKNOWN", None, None, 30)
    assert parse_proxy_header(b"PROXY UNKNOWN\r\n") == ProxyHeader(1, "LOCAL", "UNKNOWN", None, None, 15)


def test_v1_ipv4_mapped_source_is_reported_as_ipv4():
    h = parse_proxy_header(b"PROXY TCP6 ::ffff:192.0.2.9 2001:db8::2 1 2\r\n")
    assert h is not None and h.source == ("192.0.2.9", 1)


@pytest.mark.parametrize(
    "prefix",
    [b"P", b"PROXY", b"PROXY ", b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 25", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r"],
)
def test_v1_incomplete_needs_more(prefix):
    assert parse_proxy_header(prefix) is None


@pytest.mark.parametrize(
    "data, message",
    [
        (b"EHLO x\r\n", "not a PROXY"),
        (b"PROXZ TCP4", "not a PROXY"),
        (b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", "unknown protocol"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "2 addresses"),
        (b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n", "2 addresses"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", "2 addresses"),
        (b"PROXY TCP4 1.2.3.4 2001:db8::1 1 2\r\n", "not an IPv4"),
        (b"PROXY TCP6 1.2.3.4 2001:db8::1 1 2\r\n", "not an IPv6"),
        (b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n", "not an IP address"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", "not a port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", "not a port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n", "not a port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "CRLF"),
        (b"PROXY TCP4 1.2.3.4\r5.6.7.8 1 2\r\n", "control character"),
        (b"PROXY TCP6 fe80::1%eth0 2001:db8::1 1 2\r\n", "IP"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\x00\r\n", "control character"),
    ],
)
def test_v1_malformed(data, message):
    with pytest.raises(ProxyProtocolError, match=message):
        parse_proxy_header(data)


def test_v1_without_crlf_in_107_bytes_is_oversize():
    data = b"PROXY UNKNOWN " + b"x" * 200
    assert parse_proxy_header(data[:V1_MAX_BYTES - 1]) is None
    with pytest.raises(ProxyProtocolError, match="longer than 107"):
        parse_proxy_header(data[:V1_MAX_BYTES])
    with pytest.raises(ProxyProtocolError, match="longer than 107"):
        parse_proxy_header(data)


def test_v1_builder_round_trip():
    assert build_proxy_v1(("192.0.2.1", 5), ("192.0.2.2", 25)) == b"PROXY TCP4 192.0.2.1 192.0.2.2 5 25\r\n"
    assert build_proxy_v1(None, None) == b"PROXY UNKNOWN\r\n"
    with pytest.raises(ValueError, match="same address family"):
        build_proxy_v1(("192.0.2.1", 5), ("::1", 25))


# ---------------------------------------------------------------------------
# v2 (spec 2.2)


def _v2(ver_cmd: int, fam: int, body: bytes, length: int | None = None) -> bytes:
    return V2_SIGNATURE + struct.pack("!BBH", ver_cmd, fam, len(body) if length is None else length) + body


def test_v2_tcp4_exact_bytes():
    header = build_proxy_v2(("192.0.2.7", 56324), ("198.51.100.1", 25))
    assert header == (
        b"\r\n\r\n\x00\r\nQUIT\n"  # signature
        + b"\x21"  # version 2, command PROXY
        + b"\x11"  # AF_INET, STREAM
        + b"\x00\x0c"  # 12 bytes of addresses
        + bytes([192, 0, 2, 7, 198, 51, 100, 1])
        + struct.pack("!HH", 56324, 25)
    )
    h = parse_proxy_header(header + b"220 banner")
    assert h == ProxyHeader(2, "PROXY", "TCP4", ("192.0.2.7", 56324), ("198.51.100.1", 25), 28)


def test_v2_tcp6():
    header = build_proxy_v2(("2001:db8::7", 1025), ("2001:db8::1", 2525))
    assert header[13] == 0x21 and len(header) == 16 + 36
    h = parse_proxy_header(header)
    assert h is not None
    assert (h.family, h.source, h.destination) == ("TCP6", ("2001:db8::7", 1025), ("2001:db8::1", 2525))


def test_v2_mixed_families_use_ipv4_mapped_and_parse_back_as_ipv4():
    header = build_proxy_v2(("192.0.2.7", 1), ("2001:db8::1", 2))
    assert header[13] == 0x21
    h = parse_proxy_header(header)
    assert h is not None and h.family == "TCP6" and h.source == ("192.0.2.7", 1)


def test_v2_local_is_what_health_checks_send():
    header = build_proxy_v2(None, None)
    assert header == V2_SIGNATURE + b"\x20\x00\x00\x00"
    assert parse_proxy_header(header + b"QUIT") == ProxyHeader(2, "LOCAL", "UNKNOWN", None, None, 16)


def test_v2_local_ignores_address_block():
    # Spec 2.2: LOCAL: "the receiver must ... ignore the address information".
    data = _v2(0x20, 0x11, b"\x01" * 12)
    assert parse_proxy_header(data) == ProxyHeader(2, "LOCAL", "UNKNOWN", None, None, 28)


def test_v2_unspec_and_unix_give_no_address():
    h = parse_proxy_header(_v2(0x21, 0x00, b""))
    assert h is not None and (h.command, h.source) == ("PROXY", None)
    h = parse_proxy_header(_v2(0x21, 0x31, b"/a".ljust(108, b"\0") + b"/b".ljust(108, b"\0")))
    assert h is not None and (h.family, h.source, h.consumed) == ("UNIX", None, 16 + 216)


def test_v2_tlvs_round_trip():
    tlvs = ((PP2_TYPE_AUTHORITY, b"mx.example.test"), (PP2_TYPE_UNIQUE_ID, b"\x01\x02"), (0xE0, b""))
    header = build_proxy_v2(("192.0.2.7", 1), ("192.0.2.8", 2), tlvs)
    h = parse_proxy_header(header)
    assert h is not None and h.tlvs == tlvs and h.consumed == len(header)


def test_v2_incomplete_at_every_length():
    header = build_proxy_v2(("2001:db8::7", 1025), ("2001:db8::1", 2525), ((PP2_TYPE_AUTHORITY, b"x" * 40),))
    for n in range(len(header)):
        assert parse_proxy_header(header[:n]) is None, n
    assert parse_proxy_header(header) is not None


@pytest.mark.parametrize(
    "data, message",
    [
        (V2_SIGNATURE[:5] + b"X", "not a PROXY"),
        (_v2(0x11, 0x11, b"\0" * 12), "version 1"),
        (_v2(0x31, 0x11, b"\0" * 12), "version 3"),
        (_v2(0x22, 0x11, b"\0" * 12), "unknown command"),
        (V2_SIGNATURE + b"\x2f", "unknown command"),  # detected before the rest arrives
        (_v2(0x21, 0x41, b"\0" * 12), "address family"),
        (_v2(0x21, 0x13, b"\0" * 12), "transport"),
        (_v2(0x21, 0x12, b"\0" * 12), "STREAM"),
        (_v2(0x21, 0x11, b"\0" * 11), "too short"),
        (_v2(0x21, 0x21, b"\0" * 12), "too short"),
        (_v2(0x21, 0x11, b"\0" * 12 + b"\x02\x00"), "truncated TLV"),
        (_v2(0x21, 0x11, b"\0" * 12 + b"\x02\x00\x05abc"), "runs past"),
    ],
)
def test_v2_malformed(data, message):
    with pytest.raises(ProxyProtocolError, match=message):
        parse_proxy_header(data)


def test_v2_oversize_length_refused_before_the_body_arrives():
    # Only 16 bytes are here, but the length field asks for more than we hold.
    with pytest.raises(ProxyProtocolError, match="above our limit"):
        parse_proxy_header(_v2(0x21, 0x11, b"", length=V2_MAX_PAYLOAD + 1))
    # The largest allowed header parses.
    big = build_proxy_v2(("192.0.2.1", 1), ("192.0.2.2", 2), ((0xEE, b"z" * (V2_MAX_PAYLOAD - 12 - 3)),))
    assert len(big) == MAX_HEADER_BYTES
    assert parse_proxy_header(big + b"more") is not None
    with pytest.raises(ValueError, match="above"):
        build_proxy_v2(("192.0.2.1", 1), ("192.0.2.2", 2), ((0xEE, b"z" * V2_MAX_PAYLOAD),))


def test_builder_rejects_bad_input():
    with pytest.raises(ValueError, match="not an IP"):
        build_proxy_v2(("mx.example.test", 1), ("192.0.2.2", 2))
    with pytest.raises(ValueError, match="port"):
        build_proxy_v2(("192.0.2.1", 70000), ("192.0.2.2", 2))
    with pytest.raises(ValueError, match="neither"):
        build_proxy_v2(("192.0.2.1", 1), None)


def test_empty_input_needs_more():
    assert parse_proxy_header(b"") is None


# ---------------------------------------------------------------------------
# Properties

ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).filter(lambda a: a.ipv4_mapped is None).map(str)
ports = st.integers(0, 65535)


@given(st.one_of(st.tuples(ipv4, ipv4), st.tuples(ipv6, ipv6)), ports, ports, st.binary(max_size=40))
def test_property_v2_round_trip_and_stream_untouched(addrs, sport, dport, rest):
    src, dst = addrs
    header = build_proxy_v2((src, sport), (dst, dport))
    h = parse_proxy_header(header + rest)
    assert h is not None
    assert h.source == (str(ipaddress.ip_address(src)), sport)
    assert h.destination == (str(ipaddress.ip_address(dst)), dport)
    assert (header + rest)[h.consumed :] == rest


@given(st.one_of(st.tuples(ipv4, ipv4), st.tuples(ipv6, ipv6)), ports, ports, st.binary(max_size=40))
def test_property_v1_round_trip(addrs, sport, dport, rest):
    src, dst = addrs
    header = build_proxy_v1((src, sport), (dst, dport))
    assert len(header) <= V1_MAX_BYTES
    h = parse_proxy_header(header + rest)
    assert h is not None and h.source == (src, sport) and h.destination == (dst, dport)
    assert (header + rest)[h.consumed :] == rest


@given(st.binary(max_size=300))
def test_property_arbitrary_bytes_never_crash_and_never_overrun(data):
    try:
        h = parse_proxy_header(data)
    except ProxyProtocolError:
        return
    if h is not None:
        assert 0 < h.consumed <= min(len(data), MAX_HEADER_BYTES)


@given(st.binary(min_size=1, max_size=60))
def test_property_garbage_after_signature_prefix_is_decided_by_16_plus_length(tail):
    data = V2_SIGNATURE + tail
    try:
        h = parse_proxy_header(data)
    except ProxyProtocolError:
        return
    if h is None:
        # Incomplete means: fewer than 16 bytes, or fewer than 16 + the announced length.
        assert len(data) < 16 or len(data) < 16 + struct.unpack_from("!H", data, 14)[0]
    else:
        assert h.consumed == 16 + struct.unpack_from("!H", data, 14)[0]
