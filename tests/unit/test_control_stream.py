"""A long list in a control-socket reply is written a batch at a time as it is built
(kanmon.control.Streamed): the client reads the same one JSON line as before."""

from __future__ import annotations

import asyncio

from kanmon.control import ControlClient, ControlServer, Streamed


def serve_one(data_dir, reply: dict, asked: list) -> dict:
    """Start a ControlServer answering `reply`, ask it once from a thread, return the answer."""
    got: dict = {}

    async def handler(request, progress=None):
        asked.append(request)
        return reply

    def ask():
        with ControlClient(data_dir, timeout=30) as c:
            got.update(c.request("list", {}))

    async def main():
        server = ControlServer(data_dir, handler)
        await server.start()
        try:
            await asyncio.to_thread(ask)  # the blocking client, while this loop serves it
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


def test_a_row_that_cannot_be_built_cuts_the_reply_and_the_client_gets_the_error(tmp_path):
    """The line already written cannot be taken back: the client reads the next line, the
    error, as the reply (before, a cut line it could not parse: the command said only
    "control socket: Unterminated string ...")."""
    tmp_path.chmod(0o700)

    def make(x: int) -> dict:
        if x == Streamed.BATCH + 3:
            raise KeyError("1M1ABCDEF gone\nforged line")
        return {"n": x}

    items = Streamed(list(range(2 * Streamed.BATCH)), make)
    got = serve_one(tmp_path, {"ok": True, "result": {"items": items, "count": len(items)}}, [])
    assert got["ok"] is False and got["cut"] is True
    assert got["error"].startswith(f"the reply was cut after {Streamed.BATCH} rows: KeyError: ")
    assert "\n" not in got["error"]  # one line, escaped by JSON


def test_a_reply_line_that_is_not_json_is_a_connection_error(tmp_path):
    """A cut line followed by anything but the server's error line is a broken answer."""
    from kanmon.control import SOCKET_NAME

    tmp_path.chmod(0o700)
    raised: list[BaseException] = []

    async def main():
        async def garbage(reader, writer):
            await reader.readline()
            writer.write(b'{"ok": tr\n{"ok": false, "error": "not the cut line"}\n')
            await writer.drain()
            writer.close()

        server = await asyncio.start_unix_server(garbage, path=str(tmp_path / SOCKET_NAME))
        def ask():
            try:
                with ControlClient(tmp_path, timeout=30) as c:
                    c.request("list", {})
            except Exception as e:  # noqa: BLE001 - looked at below
                raised.append(e)

        try:
            await asyncio.to_thread(ask)  # the blocking client, while this loop serves it
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(main())
    assert len(raised) == 1 and isinstance(raised[0], ConnectionError), raised
    assert "not one JSON line" in str(raised[0])
