"""A client of clamd's INSTREAM protocol (ClamAV's daemon), on a unix or TCP socket.

Role: send a message to clamd in chunks and read its verdict: clean, infected (with the
signature's name), or an error. The protocol (clamd(8)): "zINSTREAM\\0", then chunks each
prefixed by its length as a 4-byte big-endian integer, then a zero length; the answer is
one NUL-terminated line: "stream: OK", "stream: <name> FOUND", or "<text> ERROR" (for
instance "INSTREAM size limit exceeded. ERROR" past clamd's StreamMaxLength). Written
here because the old Python clamd libraries are unmaintained and the protocol is small.

Trusts: clamd's answer only as far as its form: a name is kept to printable characters.
Never: send more than max_length (clamd would answer an error; the caller decides what an
unscanned message means); wait without a timeout.
"""

from __future__ import annotations

import asyncio
import re
import struct
from dataclasses import dataclass

CHUNK = 64 * 1024
_NAME = re.compile(r"[^\x21-\x7e]")  # a signature name: one printable word
_TEXT = re.compile(r"[^\x20-\x7e]")


@dataclass(frozen=True)
class ScanResult:
    status: str  # clean | infected | too_big | error
    name: str = ""  # infected: the signature; error: what went wrong

    @property
    def failed(self) -> bool:
        return self.status == "error"


def parse_address(address: str) -> tuple[str, str | tuple[str, int]]:
    """"unix:/run/clamav/clamd.ctl" or "127.0.0.1:3310" -> ("unix", path) / ("tcp", (host, port))."""
    if address.startswith("unix:"):
        path = address[5:]
        if not path.startswith("/"):
            raise ValueError(f"{address!r}: a unix socket is written unix:/absolute/path")
        return "unix", path
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{address!r} is neither unix:/path nor host:port")
    return "tcp", (host.strip("[]"), int(port))


async def _open(address: str):
    kind, where = parse_address(address)
    if kind == "unix":
        assert isinstance(where, str)
        return await asyncio.open_unix_connection(where)
    assert isinstance(where, tuple)
    return await asyncio.open_connection(*where)


async def scan(address: str, data: bytes, *, timeout: float = 60.0, max_length: int = 25 * 1024 * 1024) -> ScanResult:
    """clamd's verdict on data; never raises for a network or protocol problem (status error)."""
    if len(data) > max_length:
        return ScanResult("too_big", f"{len(data)} bytes, more than the {max_length} clamd accepts")
    try:
        async with asyncio.timeout(timeout):
            return await _scan(address, data)
    except asyncio.TimeoutError:
        return ScanResult("error", f"clamd at {address} did not answer within {timeout:g} s")
    except (OSError, asyncio.IncompleteReadError, ValueError) as e:
        return ScanResult("error", f"clamd at {address}: {type(e).__name__}: {e}")


async def _scan(address: str, data: bytes) -> ScanResult:
    reader, writer = await _open(address)
    try:
        writer.write(b"zINSTREAM\0")
        view = memoryview(data)
        for start in range(0, len(view), CHUNK):
            piece = view[start:start + CHUNK]
            writer.write(struct.pack("!I", len(piece)))
            writer.write(piece)
            await writer.drain()  # back-pressure: clamd reads at its own pace
        writer.write(struct.pack("!I", 0))
        await writer.drain()
        answer = await reader.readuntil(b"\0")
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass
    return parse_answer(answer)


def parse_answer(answer: bytes) -> ScanResult:
    text = answer.rstrip(b"\0").decode("utf-8", "replace").strip()
    if text.endswith(" ERROR"):
        return ScanResult("error", "clamd: " + _TEXT.sub("?", text[:200]))
    if text.startswith("stream:"):
        verdict = text[len("stream:"):].strip()
        if verdict == "OK":
            return ScanResult("clean")
        if verdict.endswith(" FOUND"):
            return ScanResult("infected", _NAME.sub("?", verdict[:-len(" FOUND")].strip()[:200]))
    return ScanResult("error", "clamd: unexpected answer " + repr(_TEXT.sub("?", text[:100])))


async def ping(address: str, timeout: float = 5.0) -> str:
    """"" when clamd answers PONG, else what went wrong (for the scanner alert)."""
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await _open(address)
    except (OSError, ValueError, asyncio.TimeoutError) as e:
        return f"clamd at {address}: {type(e).__name__}: {e}"
    try:
        writer.write(b"zPING\0")
        async with asyncio.timeout(timeout):
            answer = await reader.readuntil(b"\0")
        return "" if answer.rstrip(b"\0") == b"PONG" else f"clamd at {address}: unexpected answer {answer[:50]!r}"
    except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError) as e:
        return f"clamd at {address}: {type(e).__name__}: {e}"
    finally:
        writer.close()
