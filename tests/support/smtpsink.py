"""A configurable SMTP server on loopback, for tests (real sockets, asyncio in a thread).

Role: play the other side of kanmon's outbound SMTP — a mail store, a relay, an MX host,
a broken or hostile server — and record what it received, so integration tests check
real bytes on real sockets. It is deliberately simple (line by line); it is not kanmon's
server and must not be used as one.

Trusts: the test that configures it. Clients are code under test; lines are bounded by
the StreamReader limit (64 KiB).

Never: bind anything but the loopback address it is given, relay, or store to disk.

API
---

    from tests.support.smtpsink import SmtpSink, tls_server_context

    ca = trustme.CA()
    ctx = tls_server_context(ca, "store.corp.example", "127.0.0.7")
    with SmtpSink("127.0.0.7", ssl_context=ctx) as sink:    # started; free port
        sink.host, sink.port, sink.address         # '127.0.0.7', 40123, '127.0.0.7:40123'
        ... deliver something ...
        sink.wait_for_messages(1)                  # blocks (5 s max) until 1 transaction
        msg = sink.messages[0]                     # Transaction
        msg.mail_from, msg.rcpts, msg.data         # data: un-dot-stuffed, without the final dot
        msg.raw_data                               # bytes exactly as on the wire after 354
        msg.tls, msg.helo, msg.params              # TLS active at MAIL? EHLO name, MAIL params
        msg.rcpt_params                            # {rcpt: "NOTIFY=... ORCPT=..."} (accepted RCPTs)
        sink.connections                           # connections accepted in all
        sink.open_connections, sink.max_open       # open now; most open at once
        sink.commands                              # every command line received, in order

Behaviour, set as attributes at any time (read at each connection / command):

    greeting = "220 {hostname} ESMTP sink"   # e.g. "421 4.3.2 try later", "554 no service"
    ehlo_reply = None            # a reply line to EHLO instead of the normal answer
    esmtp = True                 # False: EHLO gets "502 5.5.1", the client must use HELO
    helo_reply = None            # a reply line to HELO
    pipelining = True            # announce PIPELINING
    require_pipelining = False   # hold the replies to RSET/MAIL/RCPT until DATA arrives
                                 # (a client that waits for each reply then times out)
    smtputf8 = True, eightbitmime = True
    dsn = False                  # announce DSN (RFC 3461; parameters are recorded, not acted on)
    size_limit = 0               # announce "SIZE n" (0: plain "SIZE")
    starttls = True              # announce STARTTLS (only when ssl_context is given)
    starttls_reply = "220 2.0.0 Ready to start TLS"
    starttls_junk = b""          # bytes sent right after the 220, before the handshake
                                 # (CVE-2011-0411 injection)
    mail_reply = "250 2.1.0 Ok"
    rcpt_replies = {}            # {"b@x.test": "550 5.1.1 <b@x.test>: User unknown"}
    default_rcpt_reply = "250 2.1.5 Ok"
    max_rcpts = 0                # >0: RCPTs beyond this many per transaction get
                                 # "452 4.5.3 Too many recipients"
    data_reply = "250 2.0.0 Ok: queued as {n}"    # {n}: transaction number
    rset_reply = "250 2.0.0 Ok"  # a 421 reply is sent, then the connection closed
    max_transactions = 0         # >0: MAIL after this many messages on one connection gets
                                 # "421 4.7.0 too many messages" and the connection closes
    drop = None                  # "greeting" | "starttls" (right after its 220) | "mid-data" |
                                 # "after-data" | "after-rset" (its 250): close the connection there
    hang = None                  # "greeting" | "data-end": never answer (client times out)
    hold_data_end = None         # a threading.Event: the reply to the final dot waits until it is set

    SmtpSink(host, port=0, *, hostname="sink.test", ssl_context=None, implicit_tls=False)
        ssl_context + implicit_tls=False: STARTTLS offered; implicit_tls=True: TLS from the
        first byte (smtps).
    sink.stop()    # close the listener and every connection: connections are refused
    sink.drop_connections()  # close every open connection, keep listening
    sink.start()   # listen again on the same address and port
    sink.close()   # stop and end the thread (the context manager does this)

    tls_server_context(ca, *identities) -> ssl.SSLContext with a cert from the trustme CA.

The pytest fixture ``smtp_sink`` yields a started sink on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

__all__ = ["SmtpSink", "Transaction", "smtp_sink", "tls_server_context"]

# <path> and its parameters; a quoted local part may hold spaces and angle brackets.
_PATH = re.compile(r'<((?:"(?:[^"\\]|\\.)*"|[^<>"])*)>\s*(.*)$')


def _split_path(text: str) -> tuple[str, str]:
    """'<"a b"@x> SIZE=1' -> ('"a b"@x', 'SIZE=1'); without <>, up to the first space."""
    text = text.strip()
    m = _PATH.match(text)
    if m:
        return m.group(1), m.group(2)
    address, _, params = text.partition(" ")
    return address.strip("<>"), params


def tls_server_context(ca, *identities: str) -> ssl.SSLContext:  # ca: trustme.CA
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*identities).configure_cert(ctx)
    return ctx


@dataclass
class Transaction:
    mail_from: str
    rcpts: list[str] = field(default_factory=list)
    data: bytes = b""
    raw_data: bytes = b""
    tls: bool = False
    helo: str = ""
    params: str = ""
    connection: int = 0  # which connection (1, 2, ...) it came on
    rcpt_params: dict[str, str] = field(default_factory=dict)


class SmtpSink:
    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        hostname: str = "sink.test",
        ssl_context: ssl.SSLContext | None = None,
        implicit_tls: bool = False,
        start: bool = True,
    ):
        if not host.startswith("127."):
            raise ValueError("the test sink listens on loopback (127.0.0.0/8) only")
        self.host = host
        self.port = port
        self.hostname = hostname
        self.ssl_context = ssl_context
        self.implicit_tls = implicit_tls
        # behaviour
        self.greeting = "220 {hostname} ESMTP sink"
        self.ehlo_reply: str | None = None
        self.esmtp = True
        self.helo_reply: str | None = None
        self.pipelining = True
        self.require_pipelining = False
        self.smtputf8 = True
        self.eightbitmime = True
        self.dsn = False
        self.size_limit = 0
        self.starttls = True
        self.starttls_reply = "220 2.0.0 Ready to start TLS"
        self.starttls_junk = b""
        self.mail_reply = "250 2.1.0 Ok"
        self.rcpt_replies: dict[str, str] = {}
        self.default_rcpt_reply = "250 2.1.5 Ok"
        self.max_rcpts = 0
        self.data_reply = "250 2.0.0 Ok: queued as {n}"
        self.rset_reply = "250 2.0.0 Ok"
        self.max_transactions = 0
        self.drop: str | None = None
        self.hang: str | None = None
        self.hold_data_end: threading.Event | None = None
        # records
        self.messages: list[Transaction] = []
        self.commands: list[str] = []
        self.connections = 0
        self.open_connections = 0
        self.max_open = 0
        self._cond = threading.Condition()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name=f"smtpsink-{host}")
        self._thread.start()
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._closed = False
        if start:
            self.start()

    # -- lifecycle

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def _run(self, coro, timeout: float = 10.0):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def start(self) -> SmtpSink:
        if self._server is None:
            self._run(self._start())
        return self

    async def _start(self) -> None:
        self._server = await asyncio.start_server(
            self._handle,
            self.host,
            self.port,
            ssl=self.ssl_context if self.implicit_tls else None,
            reuse_address=True,
        )
        self.port = self._server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        if self._server is not None:
            self._run(self._stop())

    async def _stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for w in list(self._writers):
            w.transport.abort()
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if server is not None:
            await server.wait_closed()

    def drop_connections(self) -> None:
        """Close every open connection from the server side (a server ending idle sessions)."""
        async def drop() -> None:
            for w in list(self._writers):
                w.transport.abort()
            for t in list(self._tasks):
                t.cancel()
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)

        self._run(drop())

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.stop()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> SmtpSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wait_for_messages(self, count: int, timeout: float = 5.0) -> list[Transaction]:
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.messages) >= count, timeout):
                raise AssertionError(f"sink got {len(self.messages)} messages, expected {count}")
            return list(self.messages)

    # -- one connection

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        self.connections += 1
        self.open_connections += 1
        self.max_open = max(self.max_open, self.open_connections)
        try:
            await self._session(reader, writer, self.connections)
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError, OSError):
            pass
        except asyncio.CancelledError:
            pass
        finally:
            self.open_connections -= 1
            self._writers.discard(writer)
            writer.transport.abort()
            self._tasks.discard(task)

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int) -> None:
        async def send(line: str | bytes) -> None:
            writer.write(line if isinstance(line, bytes) else line.encode() + b"\r\n")
            await writer.drain()

        async def wait_for_eof() -> None:
            while await reader.read(4096):
                pass

        if self.drop == "greeting":
            return
        if self.hang == "greeting":
            await wait_for_eof()
            return
        greeting = self.greeting.format(hostname=self.hostname)
        await send(greeting)
        if greeting.startswith("421"):
            return  # RFC 5321 3.8: 421, then close
        if not greeting.startswith("220"):
            # RFC 5321 3.1: after a 554 greeting the server waits for QUIT.
            while line := await reader.readline():
                self.commands.append(line.rstrip(b"\r\n").decode("utf-8", "replace"))
                if line.strip().upper() == b"QUIT":
                    await send("221 2.0.0 Bye")
                    return
                await send("503 5.5.1 Bad sequence of commands")
            return

        tls = self.implicit_tls
        helo = ""
        tx: Transaction | None = None
        held: list[str] = []  # replies held back for require_pipelining
        n_tx = 0
        while True:
            raw = await reader.readline()
            if not raw:
                return
            line = raw.rstrip(b"\r\n").decode("utf-8", "replace")
            self.commands.append(line)
            verb = line.split(" ", 1)[0].upper()
            arg = line[len(verb):].strip()

            async def reply(text: str) -> None:
                if self.require_pipelining and verb in ("RSET", "MAIL", "RCPT"):
                    held.append(text)
                    return
                if held:
                    await send("\r\n".join([*held, text]).encode() + b"\r\n")
                    held.clear()
                else:
                    await send(text)

            if verb == "EHLO":
                helo = arg
                if self.ehlo_reply is not None:
                    await send(self.ehlo_reply)
                    continue
                if not self.esmtp:
                    await send("502 5.5.1 Command not implemented")
                    continue
                ext = [self.hostname]
                if self.pipelining:
                    ext.append("PIPELINING")
                ext.append(f"SIZE {self.size_limit}" if self.size_limit else "SIZE")
                if self.eightbitmime:
                    ext.append("8BITMIME")
                if self.smtputf8:
                    ext.append("SMTPUTF8")
                if self.dsn:
                    ext.append("DSN")
                if self.ssl_context is not None and self.starttls and not tls:
                    ext.append("STARTTLS")
                ext.append("ENHANCEDSTATUSCODES")
                await send("\r\n".join(f"250-{e}" for e in ext[:-1]).encode() + f"\r\n250 {ext[-1]}\r\n".encode())
            elif verb == "HELO":
                helo = arg
                await send(self.helo_reply or f"250 {self.hostname}")
            elif verb == "STARTTLS" and self.ssl_context is not None and self.starttls and not tls:
                # The 220 and any junk go out in one write, so they arrive together.
                await send(self.starttls_reply.encode() + b"\r\n" + self.starttls_junk)
                if not self.starttls_reply.startswith("220"):
                    continue
                if self.drop == "starttls":
                    return
                await writer.start_tls(self.ssl_context)
                tls = True
                helo = ""
                tx = None
            elif verb == "MAIL":
                if tx is not None:
                    await send("503 5.5.1 Error: nested MAIL command")
                    continue
                if self.max_transactions and n_tx >= self.max_transactions:
                    await send("421 4.7.0 too many messages on this connection, closing")
                    return
                text = self.mail_reply
                if text.startswith("250"):
                    address, params = _split_path(arg[5:]) if arg.upper().startswith("FROM:") else ("", "")
                    tx = Transaction(address, tls=tls, helo=helo, params=params, connection=number)
                await reply(text)
            elif verb == "RCPT":
                if tx is None:
                    await reply("503 5.5.1 Error: need MAIL command")
                    continue
                address, rcpt_params = _split_path(arg[3:] if arg.upper().startswith("TO:") else arg)
                text = self.rcpt_replies.get(address.lower(), self.default_rcpt_reply)
                if self.max_rcpts and len(tx.rcpts) >= self.max_rcpts:
                    text = "452 4.5.3 Too many recipients"
                if text.startswith("25"):
                    tx.rcpts.append(address)
                    if rcpt_params:
                        tx.rcpt_params[address] = rcpt_params
                await reply(text)
            elif verb == "DATA":
                if tx is None or not tx.rcpts:
                    await reply("554 5.5.1 Error: no valid recipients")
                    continue
                await reply("354 End data with <CR><LF>.<CR><LF>")
                raw_data = bytearray()
                while True:
                    chunk = await reader.readline()
                    if not chunk:
                        return
                    if chunk == b".\r\n":
                        break
                    raw_data += chunk
                    if self.drop == "mid-data":
                        return
                tx.raw_data = bytes(raw_data)
                # RFC 5321 4.5.2: remove the transparency dots.
                body = b"\r\n" + tx.raw_data
                tx.data = body.replace(b"\r\n..", b"\r\n.")[2:]
                if self.drop == "after-data":
                    self._record(tx)
                    return
                if self.hang == "data-end":
                    self._record(tx)
                    await wait_for_eof()
                    return
                n_tx += 1
                self._record(tx)
                hold = self.hold_data_end
                while hold is not None and not hold.is_set():
                    await asyncio.sleep(0.01)
                await send(self.data_reply.format(n=f"{number}.{n_tx}"))
                tx = None
            elif verb == "RSET":
                tx = None
                held.clear()
                await reply(self.rset_reply)
                if self.rset_reply.startswith("421") or self.drop == "after-rset":
                    return
            elif verb == "NOOP":
                await send("250 2.0.0 Ok")
            elif verb == "QUIT":
                await send("221 2.0.0 Bye")
                return
            else:
                await send("502 5.5.2 Error: command not recognized")

    def _record(self, tx: Transaction) -> None:
        with self._cond:
            self.messages.append(tx)
            self._cond.notify_all()


@pytest.fixture
def smtp_sink() -> Iterator[SmtpSink]:
    """A started SmtpSink on 127.0.0.1 (plaintext, STARTTLS not offered)."""
    with SmtpSink("127.0.0.1") as sink:
        yield sink
