"""Reading replies in the outbound SMTP client: a reply already received is taken at once,
the rest is waited for under the read timeout (RFC 5321 4.5.3.2), driven without sockets."""

from __future__ import annotations

import asyncio

import pytest

from kanmon.smtp.client import (
    MAX_REPLY_DISCARD,
    MAX_REPLY_LINE,
    MAX_REPLY_LINES,
    ClientSettings,
    ConnectionLost,
    SmtpConnection,
    _Pipe,
)


class _Transport:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.aborted = False

    def write(self, data) -> None:
        self.written.append(bytes(data))

    def is_closing(self) -> bool:
        return self.aborted

    def abort(self) -> None:
        self.aborted = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def _connection() -> tuple[SmtpConnection, _Pipe, _Transport]:
    pipe = _Pipe()
    transport = _Transport()
    pipe.connection_made(transport)  # type: ignore[arg-type]
    conn = SmtpConnection(pipe, address="192.0.2.7", port=25, server_name="mx.example",
                          settings=ClientSettings(hostname="relay.example"))
    return conn, pipe, transport


def test_pipelined_replies_already_received_are_read_in_order():
    async def run() -> list[tuple[int, str]]:
        conn, pipe, _ = _connection()
        pipe.data_received(b"250 2.1.0 Ok\r\n250-2.1.5 first\r\n250 2.1.5 second\r\n354 go ahead\r\n")
        out = []
        for _ in range(3):
            r = await conn._read_reply(5, "reading")
            out.append((r.code, r.text))
        return out

    assert asyncio.run(run()) == [(250, "Ok"), (250, "first\nsecond"), (354, "go ahead")]


def test_a_reply_half_received_is_completed_by_what_arrives_later():
    async def run() -> tuple[int, str]:
        conn, pipe, _ = _connection()
        pipe.data_received(b"250-mx.example\r\n250-PIPEL")
        loop = asyncio.get_running_loop()
        loop.call_later(0.01, pipe.data_received, b"INING\r\n250 SIZE 1000\r\n")
        r = await conn._read_reply(30, "reading")
        return r.code, r.text

    assert asyncio.run(run()) == (250, "mx.example\nPIPELINING\nSIZE 1000")


def test_a_reply_that_never_ends_times_out():
    async def run() -> None:
        conn, pipe, transport = _connection()
        pipe.data_received(b"250-one line of many\r\n")
        with pytest.raises(ConnectionLost) as e:
            await conn._read_reply(0.05, "waiting for the reply to MAIL FROM")
        assert e.value.reply.code == 451 and e.value.reply.enhanced == "4.4.2"
        assert "timed out while waiting for the reply to MAIL FROM" in e.value.reply.text
        assert transport.aborted and not conn.usable

    asyncio.run(run())


@pytest.mark.parametrize("split", [False, True])
def test_a_reply_of_too_many_lines_is_a_protocol_error(split):
    async def run() -> None:
        conn, pipe, transport = _connection()
        lines = b"250-x\r\n" * (MAX_REPLY_LINES + 5) + b"250 end\r\n"
        if split:  # part received, part arriving while the client waits
            pipe.data_received(lines[:70])
            asyncio.get_running_loop().call_later(0.01, pipe.data_received, lines[70:])
        else:
            pipe.data_received(lines)
        with pytest.raises(ConnectionLost) as e:
            await conn._read_reply(30, "reading")
        assert e.value.reply.enhanced == "4.5.0" and transport.aborted

    asyncio.run(run())


@pytest.mark.parametrize("pieces", [1, 7, 300])
def test_a_reply_line_over_512_octets_is_cut_and_the_next_reply_read(pieces):
    # RFC 5321 4.5.3.1.5 says 512; servers send more. Its start is kept (as Postfix does).
    async def run() -> list:
        conn, pipe, transport = _connection()
        data = b"550-5.1.1 " + b"u" * 3000 + b"\r\n550 5.1.1 User unknown\r\n250 2.1.5 Ok\r\n"
        step = -(-len(data) // pieces)
        loop = asyncio.get_running_loop()
        pipe.data_received(data[:step])
        for i, start in enumerate(range(step, len(data), step)):
            loop.call_later(0.001 * (i + 1), pipe.data_received, data[start:start + step])
        first = await conn._read_reply(30, "reading")
        second = await conn._read_reply(30, "reading")
        assert not transport.aborted and conn.usable
        return [first, second]

    first, second = asyncio.run(run())
    assert (first.code, first.enhanced) == (550, "5.1.1")
    head, last = first.text.split("\n")
    assert head == "u" * (MAX_REPLY_LINE - 2 - len("550-5.1.1 ")) and last == "User unknown"
    assert (second.code, second.text) == (250, "Ok")


def test_a_reply_line_without_end_is_still_bounded():
    async def run() -> None:
        conn, pipe, transport = _connection()
        reading = asyncio.ensure_future(conn._read_reply(30, "reading"))
        for _ in range((MAX_REPLY_DISCARD + MAX_REPLY_LINE) // 4096 + 2):
            if reading.done():
                break
            pipe.data_received(b"550 " + b"x" * 4092)
            await asyncio.sleep(0)
            assert len(pipe._buffer) < MAX_REPLY_LINE  # the reader drops what it does not keep
        with pytest.raises(ConnectionLost) as e:
            await reading
        assert e.value.reply.enhanced == "4.5.0" and transport.aborted
        assert f"longer than {MAX_REPLY_LINE + MAX_REPLY_DISCARD} bytes" in e.value.reply.text

    asyncio.run(run())


def test_a_send_the_transport_takes_does_not_wait_and_a_closed_one_is_lost():
    async def run() -> None:
        conn, pipe, transport = _connection()
        await conn._send(b"RSET\r\n", "sending RSET")
        assert transport.written == [b"RSET\r\n"]
        pipe.pause_writing()
        asyncio.get_running_loop().call_later(0.01, pipe.resume_writing)
        await conn._send(b"NOOP\r\n", "sending NOOP")  # waits for the transport to drain
        assert transport.written == [b"RSET\r\n", b"NOOP\r\n"]
        pipe.connection_lost(None)
        with pytest.raises(ConnectionLost):
            await conn._send(b"QUIT\r\n", "sending QUIT")

    asyncio.run(run())
