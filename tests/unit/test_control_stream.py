"""A long list in a control-socket reply is written a batch at a time as it is built
(kanmon.control.Streamed): the client reads the same one JSON line as before."""

from __future__ import annotations

import asyncio
import threading

from kanmon.control import ControlClient, ControlServer, Streamed


def serve_one(data_dir, reply: dict, asked: list) -> dict:
    """Start a ControlServer answering `reply`, ask it once from a thread, return the answer."""
    got: dict = {}

    async def handler(request, progress=None):
        asked.append(request)
        return reply

    async def main():
        server = ControlServer(data_dir, handler)
        await server.start()
        try:
            def ask():
                with ControlClient(data_dir, timeout=30) as c:
                    got.update(c.request("list", {}))
            t = threading.Thread(target=ask)
            t.start()
            while t.is_alive():
                await asyncio.sleep(0.01)
            t.join()
        finally:
            await server.stop()

    asyncio.run(main())
    return got


def test_a_streamed_list_arrives_whole_in_one_reply(tmp_path):
    tmp_path.chmod(0o700)
    made: list[int] = []

    def make(x: int) -> dict:
        made.append(x)
        return {"n": x, "text": f"ré\u2028{x}", "nested": [x, {"q": '"'}]}

    items = Streamed(list(range(2 * Streamed.BATCH + 7)), make)
    assert made == []  # nothing built before the reply is written
    asked: list = []
    got = serve_one(tmp_path, {"ok": True, "result": {"items": items, "count": len(items), "now": 5.0}}, asked)
    assert got == {"ok": True, "result": {"items": [make(x) for x in range(len(items))], "count": len(items), "now": 5.0}}


def test_an_empty_streamed_list(tmp_path):
    tmp_path.chmod(0o700)
    got = serve_one(tmp_path, {"ok": True, "result": {"items": Streamed([], str), "count": 0}}, [])
    assert got == {"ok": True, "result": {"items": [], "count": 0}}
