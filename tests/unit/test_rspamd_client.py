"""The Rspamd client reads the whole answer, however the server's writes are split."""

from __future__ import annotations

import asyncio
import json

from kanmon.content import rspamd


def test_an_answer_written_in_pieces_is_read_whole():
    body = json.dumps({"score": 3.5, "required_score": 15.0, "action": "no action", "symbols": {"A": {}}}).encode()

    async def run() -> rspamd.SpamResult:
        async def handle(reader, writer):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n")
            await writer.drain()
            for i in range(0, len(body), 7):  # many small writes, each its own segment
                writer.write(body[i:i + 7])
                await writer.drain()
                await asyncio.sleep(0)
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            return await rspamd.check(f"http://127.0.0.1:{port}", b"Subject: x\r\n\r\nhi\r\n", timeout=10)

    r = asyncio.run(run())
    assert (r.status, r.score, r.action) == ("ok", 3.5, "no action")
