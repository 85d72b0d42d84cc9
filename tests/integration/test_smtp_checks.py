"""The SMTP listener running the check pipeline over real sockets: a check that needs I/O
delays its session's reply without blocking the others; a check that fails or takes too
long answers 451 and an event naming it; effects are carried out; the PROXY header
timeout of a trusted balancer; the probes run apart from the timeout sweeper."""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from kanmon.config import parse_config
from kanmon.policy.pipeline import ACCEPTED, Check, Context, Pipeline, accept
from kanmon.policy.access import RelayAccessCheck
from kanmon.policy.standard import relay_access, standard_checks
from kanmon.quarantine.store import Quarantine
from kanmon.records.events import ERROR_KINDS
from kanmon.smtp import server as server_module
from kanmon.smtp.server import PROXY_HEADER_TIMEOUT, Prober, SmtpServer
from kanmon.smtp.session import Session
from kanmon.spool.store import Spool, SpoolError
from kanmon.tlscert import server_context

CONFIG = """
[server]
hostname = "mx1.example.test"
data_dir = "{data_dir}"
[smtp]
relay_networks = ["127.0.0.1/32"]
min_free_disk = "{min_free_disk}"
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
        self.cancelled = asyncio.Event()

    def rcpt(self, ctx: Context):
        if ctx.rcpt is not None and ctx.rcpt.local == "slow":
            return self._wait()
        return ACCEPTED

    async def _wait(self):
        self.entered.set()
        try:
            await self.open.wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return accept(headers=(("X-Gate", "passed"),), effects=("opened",))


async def until(predicate, what: str = "condition", timeout: float = 10.0) -> None:
    """Wait for a condition, with a deadline (never a timing assertion)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


class Harness:
    def __init__(self, tmp: Path, checks: list[Check], extra: str = "", *, free_disk=lambda: 10**12,
                 min_free_disk: str = "0", tls: bool = False, **kw):
        self.config = parse_config(CONFIG.format(data_dir=tmp, extra=extra, min_free_disk=min_free_disk))
        self.records = FakeRecords()
        self.stored: list[tuple[str, bytes]] = []
        self.effects: list[object] = []
        self.spool = Spool(tmp, fsync=False)
        self.pipeline = Pipeline([*standard_checks(self.config, free_disk=free_disk), *checks])

        async def effect(e) -> None:
            self.effects.append(e)

        self.server = SmtpServer(
            self.config, self.pipeline, self.spool, self.records,  # type: ignore[arg-type]
            lambda qid, env, content: self.stored.append((qid, content)), server_context(self.config) if tls else None,
            listeners=[("127.0.0.1", 0, tls)], effects={str: effect}, **kw,  # tls: implicit TLS (RFC 8314)
        )
        self.tls = tls

    async def __aenter__(self) -> Harness:
        await self.server.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.server.stop()
        self.spool.close()

    async def connect(self) -> Client:
        host, port = self.server.addresses()[0]
        client_tls = None
        if self.tls:
            client_tls = ssl.create_default_context()
            client_tls.check_hostname, client_tls.verify_mode = False, ssl.CERT_NONE  # self-signed
        reader, writer = await asyncio.open_connection(host, port, ssl=client_tls)
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


class AsyncData(Check):
    """DATA answered by an awaitable (a content scanner stands for it): it accepts."""

    name = "async_data"

    def data(self, ctx: Context):
        return self._answer()

    async def _answer(self):
        return ACCEPTED


def test_an_error_continuing_after_a_check_answers_451_and_an_event(tmp_path, monkeypatch):
    def broken(self, queue_id, env):
        raise RuntimeError("no header today")

    monkeypatch.setattr(Session, "_received_header", broken)  # runs in check_result, after the check

    async def main() -> None:
        async with Harness(tmp_path, [AsyncData()]) as h:
            c = await h.connect()
            await c.reply()
            await c.command(b"EHLO a.example\r\n")
            await c.command(b"MAIL FROM:<x@remote.example>\r\n")
            await c.command(b"RCPT TO:<bob@example.test>\r\n")
            assert (await c.command(b"DATA\r\n")).startswith("354")
            assert await c.command(MESSAGE) == "451 4.3.0 Error: local error in processing, try again later"
            assert await asyncio.wait_for(c.reader.read(), 10) == b""  # closed, not left hanging
            await c.close()
        assert [t for t, kind, _ in h.records.events if kind in ERROR_KINDS] == [
            "session error: RuntimeError: no header today"]
        assert not h.stored

    asyncio.run(main())


class QuarantineSubject(Check):
    """DATA: a message whose Subject asks for it is to be quarantined (a content filter
    stands for this check)."""

    name = "quarantine_subject"

    def data(self, ctx: Context):
        if b"Subject: quarantine me" in ctx.header:
            return accept(quarantine="test: the subject asked", classification="Spam")
        return ACCEPTED


def test_a_quarantine_request_puts_the_message_in_the_quarantine_store(tmp_path):
    async def main() -> None:
        async with Harness(tmp_path, [QuarantineSubject()]) as h:
            c = await h.connect()
            await c.reply()
            await c.command(b"EHLO a.example\r\n")
            ids = []
            for message in (b"Subject: quarantine me\r\n\r\nhello\r\n.\r\n", MESSAGE):
                await c.command(b"MAIL FROM:<x@remote.example>\r\n")
                await c.command(b"RCPT TO:<bob@example.test>\r\n")
                await c.command(b"DATA\r\n")
                reply = await c.command(message)
                assert reply.startswith("250 2.0.0 Ok: queued as ")
                ids.append(reply.rsplit(" ", 1)[1])
            await c.command(b"QUIT\r\n")
            await c.close()
        held, other = ids
        entry, content = Quarantine(tmp_path).load(held)
        assert (entry.meta.kind, entry.meta.reason, entry.meta.check) == ("spam", "test: the subject asked", "quarantine_subject")
        assert content.endswith(b"Subject: quarantine me\r\n\r\nhello\r\n") and entry.envelope.rcpts == ["bob@example.test"]
        assert not h.spool.exists(held) and h.spool.exists(other)
        assert [qid for qid, _ in h.stored] == [other]  # the quarantined one is not handed to the queue
        lines = [t for t, _, _ in h.records.events]
        assert "quarantined (spam): test: the subject asked" in lines
        assert sum(t.startswith("from=<x@remote.example>") and t.endswith(", held") for t in lines) == 1
        assert [kw for _, kw in h.records.history] == [
            {"classification": "Spam", "disposition": "Quarantine", "status": "Quarantined"},
            {"classification": "NotSpam", "disposition": "Accept"}]

    asyncio.run(main())


def test_a_message_to_quarantine_that_cannot_be_stored_answers_451_and_leaves_nothing(tmp_path):
    async def main() -> None:
        async with Harness(tmp_path, [QuarantineSubject()]) as h:

            def full(*args):
                raise OSError(28, "No space left on device")

            h.server.quarantine_store().put = full  # type: ignore[method-assign]
            c = await h.connect()
            await c.reply()
            await c.command(b"EHLO a.example\r\n")
            await c.command(b"MAIL FROM:<x@remote.example>\r\n")
            await c.command(b"RCPT TO:<bob@example.test>\r\n")
            await c.command(b"DATA\r\n")
            assert (await c.command(b"Subject: quarantine me\r\n\r\nhello\r\n.\r\n")).startswith("451 4.3.0")
            await c.command(b"QUIT\r\n")
            await c.close()
        assert not any((tmp_path / "quarantine").iterdir())
        assert not h.stored and not h.records.history

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


def test_a_client_that_leaves_while_a_check_runs_stops_the_check_and_the_session(tmp_path):
    # Over TLS: while a check runs, the listener reads nothing more from the client, but
    # the TLS layer under it still reads the socket and sees the connection reset.
    async def main() -> None:
        gate = Gate()
        async with Harness(tmp_path, [gate], tls=True) as h:
            c = await h.connect()
            await c.reply()
            await c.command(b"EHLO a.example\r\n")
            await c.command(b"MAIL FROM:<x@remote.example>\r\n")
            await c.send(b"RCPT TO:<slow@example.test>\r\nRCPT TO:<bob@example.test>\r\n")
            await asyncio.wait_for(gate.entered.wait(), 10)
            (conn,) = h.server.connections
            sock = c.writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            c.writer.transport.abort()  # the peer is gone: a reset (linger 0), not a half-close
            await until(lambda: not h.server.connections, "the listener to see the client leave")
            await asyncio.wait_for(gate.cancelled.wait(), 10)  # the check no longer runs
            assert conn.session is not None
            assert conn.session.state.value == "closed" and conn.session.buffered() == 0
        assert h.effects == []

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
            await until(lambda: len(server.connections) == 2, "both connections to register")
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
        config = parse_config(CONFIG.format(data_dir=tmp_path, extra="", min_free_disk="1MB"))
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



def test_a_hung_disk_probe_does_not_stop_the_timeouts(tmp_path):
    calls: list[int] = []
    hung, release = threading.Event(), threading.Event()

    def free_disk() -> int:
        calls.append(1)
        if len(calls) > 1:  # the first probe (at start) answers; the next one hangs
            hung.set()
            release.wait(30)
        return 10**12

    async def main() -> None:
        extra = 'trusted_proxies = ["127.0.0.1/32"]'
        try:
            async with Harness(tmp_path, [], extra=extra, free_disk=free_disk, proxy_header_timeout=0.0) as h:
                assert await asyncio.get_running_loop().run_in_executor(None, hung.wait, 10)
                # The statvfs hangs; the sweeper still closes a balancer that sends no header.
                silent = await h.connect()
                assert await asyncio.wait_for(silent.reader.read(), 10) == b""
                await silent.close()
        finally:
            release.set()
        assert len(calls) == 2  # no probe queued behind the hung one

    asyncio.run(main())


def test_a_busy_default_executor_does_not_delay_the_probes(tmp_path):
    free = [10**12]

    async def main() -> None:
        async with Harness(tmp_path, [], free_disk=lambda: free[0], min_free_disk="1MB") as h:
            loop = asyncio.get_running_loop()
            # Argon2 checks or Maildir walks take every thread of the default executor.
            busy, blocker = ThreadPoolExecutor(max_workers=1), threading.Event()
            loop.set_default_executor(busy)
            loop.run_in_executor(None, blocker.wait, 30)
            try:
                free[0] = 10
                disk = next(c for c in h.pipeline.checks if c.name == "free_disk")
                await until(lambda: disk.low, "a probe to see the disk full")
                c = await h.connect()
                await c.reply()
                await c.command(b"EHLO a.example\r\n")
                assert (await c.command(b"MAIL FROM:<x@remote.example>\r\n")).startswith("452 4.3.1")
                await c.close()
            finally:
                blocker.set()

    asyncio.run(main())


class Probe(Check):
    """A check with a probe the test can hang and count."""

    name = "probe"

    def __init__(self) -> None:
        self.calls = 0
        self.hang_at = 0  # this call waits for release
        self.hung, self.release = threading.Event(), threading.Event()

    def refresh(self) -> None:
        self.calls += 1
        if self.calls == self.hang_at:
            self.hung.set()
            self.release.wait(30)


def test_a_probe_still_running_makes_the_next_rounds_skip(monkeypatch):
    monkeypatch.setattr(server_module, "SWEEP_INTERVAL", 3600.0)  # rounds only when the test says

    async def main() -> None:
        probe = Probe()
        probe.hang_at = 1
        prober = Prober.acquire(Pipeline([probe]), FakeRecords())  # type: ignore[arg-type]
        try:
            assert prober.tick()
            await until(probe.hung.is_set, "the probe to hang")
            assert not prober.tick() and not prober.tick()  # skipped, not queued
            probe.release.set()
            await until(lambda: prober.tick(), "the hung probe to end")
            await until(lambda: probe.calls == 2, "the next probe")
        finally:
            probe.release.set()
            prober.release()

    asyncio.run(main())


def test_listeners_sharing_a_pipeline_share_one_prober(tmp_path, monkeypatch):
    monkeypatch.setattr(server_module, "SWEEP_INTERVAL", 3600.0)
    config = parse_config(CONFIG.format(data_dir=tmp_path, extra="", min_free_disk="0"))

    async def main() -> None:
        probe = Probe()
        pipeline = Pipeline([probe])
        spool = Spool(tmp_path, fsync=False)
        servers = [SmtpServer(config, pipeline, spool, FakeRecords(), lambda *a: None, None,  # type: ignore[arg-type]
                              listeners=[("127.0.0.1", 0, False)], submission=sub) for sub in (False, True)]
        try:
            for s in servers:
                await s.start()
            assert probe.calls == 1  # one probe before listening, for both
            a, b = servers
            assert a._prober is b._prober
            await a.stop()
            assert b._prober is not None and not b._prober.closed  # b still listens: its probes go on
            assert b._prober.tick()
            await until(lambda: probe.calls == 2, "a round")
        finally:
            for s in servers:
                await s.stop()
            spool.close()
        assert pipeline not in server_module._probers  # the last listener stopped it

    asyncio.run(main())


def test_the_listener_asks_the_access_tables_the_checks_use(tmp_path):
    h = Harness(tmp_path, [])
    try:
        (check,) = [c for c in h.pipeline.checks if isinstance(c, RelayAccessCheck)]
        assert h.server.access is check.access  # one copy of the config's tables
        assert relay_access(Pipeline([])) is None
        bare = SmtpServer(h.config, Pipeline([]), h.spool, h.records, lambda *a: None, None)  # type: ignore[arg-type]
        assert bare.access.is_relay_client("127.0.0.1")  # a pipeline without them: tables of its own
    finally:
        h.spool.close()


class BrokenProbe(Check):
    name = "broken_probe"

    def refresh(self) -> None:
        raise OSError("stale file handle")


def test_a_failing_probe_and_failing_effects_are_error_events(tmp_path):
    config = parse_config(CONFIG.format(data_dir=tmp_path, extra="", min_free_disk="0"))

    async def main() -> None:
        records = FakeRecords()
        prober = Prober.acquire(Pipeline([BrokenProbe()]), records)  # type: ignore[arg-type]
        try:
            assert prober.tick()
            await until(lambda: records.events, "the probe's event")
        finally:
            prober.release()

        async def failing(effect) -> None:
            raise RuntimeError("no mail today")

        spool = Spool(tmp_path, fsync=False)
        server = SmtpServer(config, Pipeline([]), spool, records, lambda *a: None, None,  # type: ignore[arg-type]
                            effects={str: failing})
        await server.carry_out(("opened", 5), "s1")
        spool.close()
        assert records.events == [
            ("check probe failed: OSError: stale file handle", "probe-failed", {"error": "OSError: stale file handle"}),
            ("check effect str failed: RuntimeError: no mail today", "effect-failed",
             {"effect": "str", "error": "RuntimeError: no mail today"}),
            ("no handler for the check effect 5", "effect-unhandled", {"effect": "5"}),
        ]
        assert all(kind in ERROR_KINDS for _, kind, _ in records.events)

    asyncio.run(main())


class DownProbe(Check):
    name = "down_probe"

    def refresh(self) -> None:
        raise ConnectionError("shared state down")


def test_each_failing_probe_of_one_round_is_its_own_event():
    """Two probes failing in one round (the greylist's prune with the shared state down, the
    free disk's statvfs) are two events: neither hides the other."""
    async def main() -> None:
        records = FakeRecords()
        prober = Prober.acquire(Pipeline([BrokenProbe(), DownProbe()]), records)  # type: ignore[arg-type]
        try:
            assert prober.tick()
            await until(lambda: len(records.events) >= 2, "the probes' events")
        finally:
            prober.release()
        assert [text for text, _, _ in records.events] == [
            "check probe failed: OSError: stale file handle",
            "check probe failed: ConnectionError: shared state down",
        ]

    asyncio.run(main())


def test_a_listener_whose_first_probe_fails_listens_and_every_probe_runs(tmp_path, monkeypatch):
    """The first probe runs before the listener listens; one that raises (the shared state
    down for the greylist's prune) is an event, not the listener's end, and does not keep
    the other checks' probes (the free disk) from running."""
    monkeypatch.setattr(server_module, "SWEEP_INTERVAL", 3600.0)
    config = parse_config(CONFIG.format(data_dir=tmp_path, extra="", min_free_disk="0"))

    async def main() -> None:
        probe = Probe()
        records = FakeRecords()
        spool = Spool(tmp_path, fsync=False)
        server = SmtpServer(config, Pipeline([BrokenProbe(), probe]), spool, records,  # type: ignore[arg-type]
                            lambda *a: None, None, listeners=[("127.0.0.1", 0, False)])
        try:
            await server.start()
            assert probe.calls == 1
            host, port = server._servers[0].sockets[0].getsockname()[:2]
            reader, writer = await asyncio.open_connection(host, port)
            assert (await reader.readline()).startswith(b"220")
            writer.close()
            await until(lambda: any(kind == "probe-failed" for _, kind, _ in records.events), "the probe's event")
        finally:
            await server.stop()
            spool.close()

    asyncio.run(main())
