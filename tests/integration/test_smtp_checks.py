"""The SMTP listener running the check pipeline over real sockets: a check that needs I/O
delays its session's reply without blocking the others; a check that fails or takes too
long answers 451 and an event naming it; effects are carried out; the PROXY header
timeout of a trusted balancer."""

from __future__ import annotations

import asyncio
from pathlib import Path

from kanmon.config import parse_config
from kanmon.policy.pipeline import ACCEPTED, Check, Context, Pipeline, accept
from kanmon.policy.standard import standard_checks
from kanmon.records.events import ERROR_KINDS
from kanmon.smtp.server import PROXY_HEADER_TIMEOUT, SmtpServer
from kanmon.spool.store import Spool

CONFIG = """
[server]
hostname = "mx1.example.test"
data_dir = "{data_dir}"
[smtp]
relay_networks = ["127.0.0.1/32"]
min_free_disk = "0"
{extra}
[[domain]]
name = "example.test"
mailboxes = ["alice", "bob", "slow"]
"""


class FakeRecords:
    """What the listener writes to the records, kept in memory for the assertions."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict | None]] = []
        self.history: list[tuple[str, dict]] = []

    def emit(self, text, queue_id=None, kind="info", *, session=None, detail=None):
        self.events.append((text, kind, detail))

    def record(self, event, queue_id=None, *, session=None):
        self.events.append((event.line(), event.KIND, event.fields()))

    def history_accept(self, queue_id, env, size, content, fields=None, **kw):
        self.history.append(("accept", kw))

    def history_reject(self, env, rcpt, reply, client_ip, auth_user="", helo="", **kw):
        self.history.append(("reject", kw))


class Gate(Check):
    """RCPT to slow@ waits until the test opens the gate (a DNS lookup stands for it)."""

    name = "gate"

    def __init__(self, timeout: float = 30.0):
        self.timeout = timeout
        self.entered = asyncio.Event()
        self.open = asyncio.Event()

    def rcpt(self, ctx: Context):
        if ctx.rcpt is not None and ctx.rcpt.local == "slow":
            return self._wait()
        return ACCEPTED

    async def _wait(self):
        self.entered.set()
        await self.open.wait()
        return accept(headers=(("X-Gate", "passed"),), effects=("opened",))


class Harness:
    def __init__(self, tmp: Path, checks: list[Check], extra: str = "", **kw):
        self.config = parse_config(CONFIG.format(data_dir=tmp, extra=extra))
        self.records = FakeRecords()
        self.stored: list[tuple[str, bytes]] = []
        self.effects: list[object] = []
        self.spool = Spool(tmp, fsync=False)
        pipeline = Pipeline([*standard_checks(self.config, free_disk=lambda: 10**12), *checks])

        async def effect(e) -> None:
            self.effects.append(e)

        self.server = SmtpServer(
            self.config, pipeline, self.spool, self.records,  # type: ignore[arg-type]
            lambda qid, env, content: self.stored.append((qid, content)), None,
            listeners=[("127.0.0.1", 0, False)], effects={str: effect}, **kw,
        )

    async def __aenter__(self) -> Harness:
        await self.server.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.server.stop()
        self.spool.close()

    async def connect(self) -> Client:
        host, port = self.server.addresses()[0]
        reader, writer = await asyncio.open_connection(host, port)
        c = Client(reader, writer)
        return c


class Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    async def reply(self) -> str:
        """One whole reply (its last line)."""
        while True:
            line = (await asyncio.wait_for(self.reader.readline(), 10)).decode()
            assert line, "connection closed"
            if line[3:4] != "-":
                return line.rstrip("\r\n")

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def command(self, data: bytes) -> str:
        await self.send(data)
        return await self.reply()

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except ConnectionError:
            pass


MESSAGE = b"Subject: hi\r\n\r\nhello\r\n.\r\n"


def test_a_slow_check_delays_its_reply_and_not_the_other_sessions(tmp_path):
    async def main() -> None:
        gate = Gate()
        async with Harness(tmp_path, [gate]) as h:
            a, b = await h.connect(), await h.connect()
            assert (await a.reply()).startswith("220") and (await b.reply()).startswith("220")
            assert (await a.command(b"EHLO a.example\r\n")).startswith("250")
            # Session a pipelines its whole transaction; its RCPT waits for the gate.
            await a.send(b"MAIL FROM:<x@remote.example>\r\nRCPT TO:<slow@example.test>\r\nDATA\r\n" + MESSAGE)
            assert (await a.reply()).startswith("250 2.1.0")
            await asyncio.wait_for(gate.entered.wait(), 10)
            # Meanwhile session b is served from start to end.
            assert (await b.command(b"EHLO b.example\r\n")).startswith("250")
            assert (await b.command(b"MAIL FROM:<y@remote.example>\r\n")).startswith("250")
            assert (await b.command(b"RCPT TO:<bob@example.test>\r\n")).startswith("250")
            assert (await b.command(b"DATA\r\n")).startswith("354")
            assert (await b.command(MESSAGE)).startswith("250 2.0.0")
            assert len(h.stored) == 1 and not gate.open.is_set()
            gate.open.set()
            assert (await a.reply()).startswith("250 2.1.5")
            assert (await a.reply()).startswith("354")
            assert (await a.reply()).startswith("250 2.0.0")
            assert len(h.stored) == 2 and b"\r\nX-Gate: passed\r\nSubject: hi" in h.stored[1][1]
            assert h.effects == ["opened"]  # carried out by the listener
            assert [kw for what, kw in h.records.history] == [
                {"classification": "NotSpam", "disposition": "Accept"}] * 2
            await a.close()
            await b.close()

    asyncio.run(main())


def test_a_check_that_takes_too_long_answers_451_and_an_event_naming_it(tmp_path):
    async def main() -> None:
        gate = Gate(timeout=0.05)  # never opened
        async with Harness(tmp_path, [gate]) as h:
            c = await h.connect()
            await c.reply()
            await c.command(b"EHLO a.example\r\n")
            await c.command(b"MAIL FROM:<x@remote.example>\r\n")
            assert await c.command(b"RCPT TO:<slow@example.test>\r\n") == "451 4.3.0 Error: local error in processing, try again later"
            assert (await c.command(b"RCPT TO:<bob@example.test>\r\n")).startswith("250")  # the session goes on
            await c.command(b"QUIT\r\n")
            await c.close()
        warning = [(t, d) for t, kind, d in h.records.events if kind in ERROR_KINDS]
        assert len(warning) == 1 and warning[0][0].startswith("warning: check gate failed at RCPT: no answer within")
        reject = [(t, d) for t, _, d in h.records.events if t.startswith("NOQUEUE: reject: RCPT")]
        assert len(reject) == 1
        assert reject[0][0].startswith("NOQUEUE: reject: RCPT from unknown[127.0.0.1]: 451 4.3.0")
        assert reject[0][1]["check"] == "gate" and reject[0][1]["stage"] == "RCPT"
        assert h.records.history == [("reject", {"classification": "Policy", "disposition": "Reject"})]

    asyncio.run(main())


def test_closing_while_a_check_waits_ends_cleanly(tmp_path):
    async def main() -> None:
        gate = Gate()
        async with Harness(tmp_path, [gate]) as h:
            c = await h.connect()
            await c.reply()
            await c.command(b"EHLO a.example\r\n")
            await c.command(b"MAIL FROM:<x@remote.example>\r\n")
            await c.send(b"RCPT TO:<slow@example.test>\r\nQUIT\r\n")
            await asyncio.wait_for(gate.entered.wait(), 10)
        # The server stopped with the check pending: 421, and the check's task was cancelled.
        assert (await c.reply()).startswith("421")
        await c.close()

    asyncio.run(main())


def test_a_trusted_proxy_that_sends_no_proxy_header_is_closed_after_the_header_timeout(tmp_path):
    async def main() -> None:
        extra = 'trusted_proxies = ["127.0.0.1/32"]'
        async with Harness(tmp_path, [], extra=extra) as h:
            server = h.server
            silent = await h.connect()
            talker = await h.connect()
            await talker.send(b"PROXY TCP4 192.0.2.5 192.0.2.1 40000 25\r\n")
            assert (await talker.reply()).startswith("220")
            for _ in range(1000):
                if len(server.connections) == 2:
                    break
                await asyncio.sleep(0)
            # Drive the sweeper's clock instead of waiting: just under the timeout, nothing.
            start = max(conn.started for conn in server.connections)
            server.sweep_nowait(start + PROXY_HEADER_TIMEOUT - 1)
            assert len(server.connections) == 2
            server.sweep_nowait(start + PROXY_HEADER_TIMEOUT + 1)
            assert await asyncio.wait_for(silent.reader.read(), 10) == b""  # closed, nothing said
            # The client behind the PROXY header has command_timeout (5 minutes), not 10 s.
            assert (await talker.command(b"NOOP\r\n")).startswith("250")
            await talker.command(b"QUIT\r\n")
            await silent.close()
            await talker.close()
        assert any(t == "timeout waiting for the PROXY header from 127.0.0.1" for t, _, _ in h.records.events)

    asyncio.run(main())


def test_the_proxy_header_timeout_is_applied_by_the_running_sweeper(tmp_path):
    async def main() -> None:
        extra = 'trusted_proxies = ["127.0.0.1/32"]'
        async with Harness(tmp_path, [], extra=extra, proxy_header_timeout=0.0) as h:
            silent = await h.connect()
            # The sweeper runs each second on its own; nothing here waits on a clock.
            assert await asyncio.wait_for(silent.reader.read(), 10) == b""
            await silent.close()

    asyncio.run(main())


def test_free_disk_probe_is_refreshed_by_the_listener(tmp_path):
    async def main() -> None:
        free = [10**12]
        config = parse_config(CONFIG.format(data_dir=tmp_path, extra="").replace('min_free_disk = "0"', 'min_free_disk = "1MB"'))
        pipeline = Pipeline(standard_checks(config, free_disk=lambda: free[0]))
        records = FakeRecords()
        spool = Spool(tmp_path, fsync=False)
        server = SmtpServer(config, pipeline, spool, records, lambda *a: None, None,  # type: ignore[arg-type]
                            listeners=[("127.0.0.1", 0, False)])
        free[0] = 10  # before start: the first probe runs in start()
        await server.start()
        try:
            host, port = server.addresses()[0]
            c = Client(*await asyncio.open_connection(host, port))
            await c.reply()
            await c.command(b"EHLO a.example\r\n")
            assert (await c.command(b"MAIL FROM:<x@remote.example>\r\n")).startswith("452 4.3.1")
            free[0] = 10**12
            await asyncio.get_running_loop().run_in_executor(None, pipeline.refresh)  # as the sweeper does
            assert (await c.command(b"MAIL FROM:<x@remote.example>\r\n")).startswith("250")
            await c.close()
        finally:
            await server.stop()
            spool.close()
        [(text, _, detail)] = [e for e in records.events if e[0].startswith("NOQUEUE")]
        assert "452 4.3.1" in text and (detail["check"], detail["stage"]) == ("free_disk", "MAIL")

    asyncio.run(main())

