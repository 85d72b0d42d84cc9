"""asyncio adapter that drives an I/O-free POP3 or IMAP session over a socket.

Role: the thin layer between a listening socket and a session object from pop3.py or
imap/session.py. It feeds received bytes to the session and carries out what the
session asks for, in order: send bytes, wait (login throttle), verify a password in a
worker thread (argon2 must not stall the event loop), run file work (Maildir reads,
writes, fsyncs) in the service's bounded file executor, upgrade to TLS, close. While
the session waits for a result it gets no input, so pipelined commands run in order,
one at a time. It owns the timeouts: idle time between commands, the login deadline (an
unauthenticated connection ends login_timeout after it opened, however many bytes it
trickles), TLS handshake, and writes to a peer that does not read. ``ListenerSet``
binds the plain and implicit-TLS listeners of a service, counts connections from accept
(in all and per client address; an implicit-TLS connection is counted before its
handshake, kanmon.tlsaccept), keeps every connection task in one TaskGroup and owns
the file executor. A session in IMAP IDLE names the directories to watch
(``watch_paths``): the adapter subscribes them with kanmon.store.watch (inotify) and
polls the session when they change, falling back to the session's poll interval where
inotify is not available.

Trusts: nothing the peer sends; it only buffers it (bounded: reading pauses when
``max_inbox`` bytes wait) and hands it to the session.

Never: pass bytes received before a TLS handshake to the session after it (RFC 2595
3.1 / RFC 3501 6.2.1, CVE-2011-0411: the inbox is cleared before ``start_tls``), wait
on the network without a timeout, touch a file on the event loop (one large FETCH or
one fsync would stall every connection), or let one connection's failure end another's.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections import Counter
from collections.abc import Callable, Generator
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from kanmon.aio import settle
from kanmon.config import MailboxAccessSection, TlsSection
from kanmon.listeners import stop_accepting
from kanmon.store.watch import DirectoryWatcher
from kanmon.tlsaccept import Admission, TlsAcceptor, crowd

# ---------------------------------------------------------------------------
# What a session asks the adapter to do.


@dataclass(frozen=True, slots=True)
class Send:
    data: bytes


@dataclass(frozen=True, slots=True)
class Delay:
    seconds: float


@dataclass(frozen=True, slots=True)
class Verify:
    """Check user/password (in a worker thread), then call ``session.auth_result``."""

    user: str
    password: str


@dataclass(frozen=True, slots=True)
class StartTls:
    """Discard all buffered input, do the server-side TLS handshake, then call
    ``session.tls_started()``."""


@dataclass(frozen=True, slots=True)
class FileWork:
    """Run ``call(*args)`` in the file executor, then call ``session.file_done`` with
    what it returned, or with the exception it raised. ``call`` does file I/O only: it
    must not change the session (the session sits waiting until file_done)."""

    call: Callable[..., Any]
    args: tuple[Any, ...] = ()


@dataclass(frozen=True, slots=True)
class Close:
    pass


Event = Send | Delay | Verify | FileWork | StartTls | Close

# A command handler that needs files: a generator that yields Send (output so far) and
# FileWork (whose result is sent back in, or whose exception is thrown in), and returns
# the command's last events.
Steps = Generator[Send | FileWork, Any, list[Event]]


def advance(steps: Steps, result: Any = None, error: BaseException | None = None) -> tuple[list[Event], bool]:
    """Run ``steps`` on to its next FileWork (the last event; done=False) or to its end
    (done=True). An exception the generator does not handle propagates."""
    out: list[Event] = []
    try:
        item = steps.throw(error) if error is not None else steps.send(result)
        while isinstance(item, Send):
            out.append(item)
            item = steps.send(None)
    except StopIteration as stop:
        return out + list(stop.value or ()), True
    return [*out, item], False


class LineSteps:
    """The step plumbing a line-protocol session without tags shares (POP3, ManageSieve):
    a login waits for Verify, a command for its FileWork, then the session reads on.

    The session keeps ``_pending`` (the address being verified), ``_steps`` (the command
    waiting for a FileWork), ``_closed``, and defines ``_process`` (read the buffered
    commands), ``_login``, ``_failed`` and ``_unavailable`` (the steps after a Verify)."""

    _pending: str | None
    _steps: Steps | None
    _closed: bool

    def _process(self) -> list[Event]:
        raise NotImplementedError

    def _login(self, address: str) -> Steps:
        raise NotImplementedError

    def _failed(self, address: str) -> Steps:
        raise NotImplementedError

    def _unavailable(self, address: str) -> Steps:
        raise NotImplementedError

    def auth_result(self, ok: bool | None) -> list[Event]:
        """ok None: the credentials could not be checked (accounts unreadable): the
        session's temporary refusal, not counted as a failed login."""
        address = self._pending
        self._pending = None
        assert address is not None
        if ok is None:
            out = self._run(self._unavailable(address))
        else:
            out = self._run(self._login(address) if ok else self._failed(address))
        if not self._closed and self._steps is None:
            out += self._process()
        return out

    def file_done(self, result: Any, error: BaseException | None = None) -> list[Event]:
        """The FileWork we asked for is done: finish its command, then read on."""
        steps, self._steps = self._steps, None
        assert steps is not None
        out = self._run(steps, result, error)
        if not self._closed and self._steps is None:
            out += self._process()
        return out

    def _run(self, steps: Steps, result: Any = None, error: BaseException | None = None) -> list[Event]:
        out, done = advance(steps, result, error)
        if not done:
            self._steps = steps
        return out

    def poll(self) -> list[Event]:
        return []


_POLL = object()
WATCHED_POLL = 60.0  # with inotify watching the folder, the poll is only a safety net
_TIMEOUT = object()


class Session(Protocol):
    """What the adapter needs from a protocol session."""

    poll_interval: float | None  # not None: call poll() this often (IMAP IDLE)
    idle_timeout: float
    authenticated: bool  # logged in: the login deadline no longer applies

    def start(self) -> list[Event]: ...
    def receive(self, data: bytes) -> list[Event]: ...
    def auth_result(self, ok: bool) -> list[Event]: ...
    def file_done(self, result: Any, error: BaseException | None = None) -> list[Event]: ...
    def tls_started(self) -> list[Event]: ...
    def poll(self) -> list[Event]: ...
    def timed_out(self) -> list[Event]: ...
    def connection_lost(self) -> None: ...


@dataclass(frozen=True, slots=True)
class PeerInfo:
    ip: str
    port: int
    tls: bool


SessionFactory = Callable[[PeerInfo], Session]


class SessionConnection(asyncio.Protocol):
    """One client connection: an asyncio.Protocol plus a driver coroutine."""

    def __init__(
        self,
        make_session: SessionFactory,
        tls_context: ssl.SSLContext | None,
        implicit_tls: bool,
        spawn: Callable[[Any], None],
        verify: Callable[[str, str], bool],
        *,
        files: Executor | None = None,
        handshake_timeout: float = 30.0,
        write_timeout: float = 120.0,
        max_inbox: int = 256 * 1024,
        login_timeout: float | None = None,
        admission: Admission | None = None,
        admit: Callable[[str], Admission | bytes] | None = None,
        on_open: Callable[[SessionConnection], None] | None = None,
        on_close: Callable[[SessionConnection], None] | None = None,
    ):
        """admission: the connection's place in the listener's counts, taken at accept
        (implicit TLS); otherwise admit(ip) takes it in connection_made, or answers the
        refusal line to send before closing. login_timeout: seconds from the connection
        to the login; None: no deadline but the idle one."""
        self.make_session = make_session
        self.tls_context = tls_context
        self.implicit_tls = implicit_tls
        self.spawn = spawn
        self.verify = verify
        self.files = files  # None: the loop's default executor
        self.handshake_timeout = handshake_timeout
        self.write_timeout = write_timeout
        self.max_inbox = max_inbox
        self.login_timeout = login_timeout
        self.admission = admission
        self.admit = admit
        self._login_deadline: float | None = None
        self._in_crowd = False  # counted in this process's crowd (kanmon.tlsaccept)
        self.on_open = on_open
        self.on_close = on_close  # called once the socket is gone (connection_lost)
        self.transport: asyncio.Transport | None = None
        self._inbox = bytearray()
        self._wakeup = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        self._paused = False
        self._lost = False
        self._eof = False
        self._deadline: float | None = None
        self._watcher: DirectoryWatcher | None = None
        self._watching: tuple[str, ...] | None = None
        self._changed = False

    # -- asyncio.Protocol callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.transport is not None:  # start_tls hands us the new transport this way
            self.transport = transport  # type: ignore[assignment]
            return
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername") or ("?", 0)
        self.peer = PeerInfo(str(peer[0]), int(peer[1]), self.implicit_tls)
        if self.admission is None and self.admit is not None:
            admitted = self.admit(self.peer.ip)
            if not isinstance(admitted, Admission):
                self._lost = True  # refused: never opened, nothing to release
                self.transport.write(admitted)  # type: ignore[union-attr]
                self.transport.close()  # type: ignore[union-attr]
                return
            self.admission = admitted
        if self.login_timeout is not None:
            self._login_deadline = asyncio.get_running_loop().time() + self.login_timeout
        crowd.opened()
        self._in_crowd = True
        if self.on_open:
            self.on_open(self)
        self.spawn(self._drive())

    def data_received(self, data: bytes) -> None:
        self._inbox += data
        if len(self._inbox) >= self.max_inbox and not self._paused and self.transport:
            self._paused = True
            self.transport.pause_reading()
        self._wakeup.set()

    def eof_received(self) -> bool | None:
        self._eof = True
        self._wakeup.set()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._wakeup.set()
        self._writable.set()
        if self.admission is not None:
            self.admission.release()
        if self._in_crowd:
            self._in_crowd = False
            crowd.closed()
        if self.on_close:
            self.on_close(self)

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    # -- the driver
    async def _drive(self) -> None:
        session: Session | None = None
        try:
            session = self.make_session(self.peer)
            if not await self._run(session, session.start()):
                return
            while not self._lost:
                data = await self._next_input(session)
                if data is _POLL:
                    events = session.poll()
                elif data is _TIMEOUT:
                    await self._run(session, session.timed_out())
                    return
                elif data == b"":
                    return  # the peer closed its side
                else:
                    events = session.receive(data)  # type: ignore[arg-type]
                if not await self._run(session, events):
                    return
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - one connection's bug must not end the server
            with contextlib.suppress(Exception):
                if self.transport and not self._lost:
                    self.transport.write(_internal_error_line(session))
        finally:
            self._unwatch()
            if session is not None:
                with contextlib.suppress(Exception):
                    session.connection_lost()
                    self._settle(getattr(session, "owed", None))
            if self.transport is not None:
                self.transport.close()

    def _settle(self, owed: Callable[[], None] | None) -> None:
        """Run what an ended session still owes (a throttle reservation to give back) in
        the file executor, without waiting: the connection is gone, nobody needs the answer."""
        if owed is None:
            return
        if self.files is not None:
            self.files.submit(owed)
        else:
            asyncio.get_running_loop().run_in_executor(None, owed).add_done_callback(
                lambda f: f.cancelled() or f.exception())  # retrieved: a failure here is nobody's to report

    async def _next_input(self, session: Session) -> bytes | object:
        """Buffered input, b"" at EOF, _POLL when the session's poll is due, _TIMEOUT
        when nothing came for session.idle_timeout seconds or, before the login, when
        the login deadline has passed (bytes arriving do not move it)."""
        loop = asyncio.get_running_loop()
        if self._deadline is None:
            self._deadline = loop.time() + session.idle_timeout
        while True:
            if self._login_deadline is not None and not session.authenticated and loop.time() >= self._login_deadline:
                return _TIMEOUT
            if self._inbox:
                data = bytes(self._inbox)
                self._inbox.clear()
                self._deadline = None
                if self._paused and self.transport and not self._lost:
                    self._paused = False
                    self.transport.resume_reading()
                return data
            if self._eof or self._lost:
                return b""
            self._wakeup.clear()
            deadline = self._deadline
            if self._login_deadline is not None and not session.authenticated:
                deadline = min(deadline, self._login_deadline)
            wait = deadline - loop.time()
            if wait <= 0:
                return _TIMEOUT
            poll = session.poll_interval
            if poll is not None and self._watch(session):
                if self._changed:
                    self._changed = False
                    return _POLL
                poll = max(poll, WATCHED_POLL)
            polling = poll is not None and poll < wait
            try:
                async with asyncio.timeout(poll if polling else wait):
                    await self._wakeup.wait()
            except TimeoutError:
                if polling:
                    return _POLL

    def _watch(self, session: Session) -> bool:
        """Keep an inotify subscription on the directories the session wants watched
        (IMAP IDLE: the folder's new/ and cur/); True while it holds one. A change there
        sets _changed and wakes the driver, which polls the session at once."""
        paths = getattr(session, "watch_paths", None)
        if paths != self._watching:
            self._unwatch()
            if paths:
                watcher = DirectoryWatcher.of(asyncio.get_running_loop())
                if watcher is not None and watcher.subscribe(paths, self._on_change):
                    self._watcher, self._watching = watcher, paths
                    self._changed = True  # what changed before the watch began: look once
        return self._watching is not None

    def _unwatch(self) -> None:
        if self._watcher is not None and self._watching is not None:
            self._watcher.unsubscribe(self._watching, self._on_change)
        self._watcher = self._watching = None
        self._changed = False

    def _on_change(self) -> None:
        self._changed = True
        self._wakeup.set()

    async def _run(self, session: Session, events: list[Event]) -> bool:
        """Carry out events in order; False when the connection is finished."""
        queue = list(events)
        while queue:
            ev = queue.pop(0)
            if self._lost:
                return False
            if isinstance(ev, Send):
                assert self.transport is not None
                self.transport.write(ev.data)
                if not self._writable.is_set():
                    try:
                        async with asyncio.timeout(self.write_timeout):
                            await self._writable.wait()
                    except TimeoutError:
                        return False
            elif isinstance(ev, Delay):
                if ev.seconds > 0:
                    await asyncio.sleep(ev.seconds)
            elif isinstance(ev, Verify):
                loop = asyncio.get_running_loop()
                try:
                    ok = await loop.run_in_executor(None, self.verify, ev.user, ev.password)
                except Exception:  # noqa: BLE001 - accounts unreadable: a temporary answer (None)
                    ok = None
                queue[:0] = session.auth_result(ok)
            elif isinstance(ev, FileWork):
                loop = asyncio.get_running_loop()
                try:
                    result = await loop.run_in_executor(self.files, ev.call, *ev.args)
                except Exception as e:  # noqa: BLE001 - the session decides what a failure means
                    queue[:0] = session.file_done(None, e)
                else:
                    queue[:0] = session.file_done(result)
            elif isinstance(ev, StartTls):
                if not await self._start_tls():
                    return False
                queue[:0] = session.tls_started()
            elif isinstance(ev, Close):
                return False
        return not self._lost

    async def _start_tls(self) -> bool:
        assert self.transport is not None and self.tls_context is not None
        loop = asyncio.get_running_loop()
        # CVE-2011-0411: nothing received before the handshake survives it. start_tls
        # swaps the transport's protocol before its first await, so from here on every
        # byte goes through TLS; only what is already in the inbox is plaintext.
        self._inbox.clear()
        if self._paused:
            self._paused = False
            self.transport.resume_reading()
        try:
            new = await loop.start_tls(
                self.transport,
                self,
                self.tls_context,
                server_side=True,
                ssl_handshake_timeout=self.handshake_timeout,
            )
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError):
            return False
        if new is None:
            return False
        self.transport = new
        return True


def _is_imap(session: object) -> bool:
    return type(session).__module__.startswith("kanmon.store.imap")


def _internal_error_line(session: object) -> bytes:
    """What a connection hears when its session failed: the session's own line
    (``internal_error``), else IMAP's or POP3's."""
    own = getattr(session, "internal_error", None)
    if isinstance(own, bytes):
        return own
    return b"* BYE internal error\r\n" if _is_imap(session) else b"-ERR internal error\r\n"


class ListenerSet:
    """The plain and implicit-TLS listeners of one service, and its connections.

    ``start()`` binds every endpoint or raises OSError (then nothing stays bound);
    ``stop()`` closes listeners, then cancels and awaits every connection task, then
    waits for file work already running (an APPEND finishes its fsync). File work of
    all connections shares ``file_workers`` threads.
    """

    def __init__(
        self,
        name: str,
        plain: list[tuple[str, int]],
        implicit: list[tuple[str, int]],
        tls_context: ssl.SSLContext | None,
        make_session: Callable[[PeerInfo, bool], Session],
        verify: Callable[[str, str], bool],
        *,
        max_connections: int = 1000,
        max_connections_per_ip: int = 50,
        login_timeout: float | None = None,
        handshake_timeout: float = 10.0,
        file_workers: int = 8,
        sockets: list[tuple[socket.socket, bool]] | None = None,
        refusals: tuple[bytes, bytes] = (b"", b""),
    ):
        """sockets: (already listening socket, implicit TLS) to accept on instead of
        binding plain/implicit (a node's reload hands the same sockets on).
        refusals: the lines a plain connection over max_connections, and over
        max_connections_per_ip, gets before it is closed (an implicit-TLS one is closed
        before its handshake, without a word)."""
        self.name = name
        self.sockets = sockets
        self.plain = plain
        self.implicit = implicit
        self.tls_context = tls_context
        self.make_session = make_session
        self.verify = verify
        self.max_connections = max_connections
        self.max_connections_per_ip = max_connections_per_ip
        self.login_timeout = login_timeout
        self.refusals = refusals
        # Connections counted from accept until they are gone (TLS handshakes included):
        # this process is the only one serving the listeners, so its counts are all of them.
        self.admitted = 0
        self.per_ip: Counter[str] = Counter()
        self.handshake_timeout = handshake_timeout
        self.file_workers = file_workers
        self._files: ThreadPoolExecutor | None = None
        self.servers: list[Any] = []  # asyncio.Server (plain) and TlsAcceptor (implicit TLS)
        self._tasks: set[asyncio.Task[None]] = set()
        self._group: asyncio.TaskGroup | None = None
        self._runner: asyncio.Task[None] | None = None
        self._stopping: asyncio.Event | None = None
        self._connections: set[SessionConnection] = set()  # established, not yet lost
        self._none_left = asyncio.Event()

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """Bound (host, port) of every listener, plain first (port 0 resolves here)."""
        out = []
        for s in self.servers:
            for sock in s.sockets:
                out.append(sock.getsockname()[:2])
        return out

    async def _hold(self, ready: asyncio.Future[None]) -> None:
        assert self._stopping is not None
        async with asyncio.TaskGroup() as tg:
            self._group = tg
            ready.set_result(None)
            await self._stopping.wait()
            for t in list(self._tasks):
                t.cancel()

    def _spawn(self, coro: Any) -> None:
        if self._group is None or self._stopping is None or self._stopping.is_set():
            coro.close()
            return
        task = self._group.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self.implicit and self.tls_context is None:
            raise OSError(f"{self.name}: listen_tls needs a TLS certificate")
        self._stopping = asyncio.Event()
        self._files = ThreadPoolExecutor(self.file_workers, thread_name_prefix=f"{self.name.lower()}-files")
        ready: asyncio.Future[None] = loop.create_future()
        self._runner = asyncio.create_task(self._hold(ready))
        await ready
        try:
            if self.sockets is not None:
                if any(implicit for _sock, implicit in self.sockets) and self.tls_context is None:
                    raise OSError(f"{self.name}: listen_tls needs a TLS certificate")
                for sock, implicit in self.sockets:
                    if implicit:
                        self.servers.append(self._acceptor(TlsAcceptor(
                            sock, self.tls_context, self.handshake_timeout, self._admit_tls, self._tls_protocol)))
                        continue
                    server = await loop.create_server(lambda: self._protocol(), sock=sock)
                    self.servers.append(server)
                return
            for host, port in self.plain:
                server = await loop.create_server(lambda: self._protocol(), host, port, reuse_address=True)
                self.servers.append(server)
            for host, port in self.implicit:
                assert self.tls_context is not None
                self.servers.append(self._acceptor(TlsAcceptor.bind(
                    host, port, self.tls_context, self.handshake_timeout, self._admit_tls, self._tls_protocol)))
        except BaseException:
            await self.stop()
            raise

    @staticmethod
    def _acceptor(acceptor: TlsAcceptor) -> TlsAcceptor:
        acceptor.start()
        return acceptor

    def _admit(self, ip: str) -> Admission | bytes:
        """Count a new connection from ip, or the refusal line when a limit is reached."""
        if self.admitted >= self.max_connections:
            return self.refusals[0]
        if self.per_ip[ip] >= self.max_connections_per_ip:
            return self.refusals[1]
        self.admitted += 1
        self.per_ip[ip] += 1
        return Admission(ip, self._release)

    def _release(self, ip: str) -> None:
        self.admitted -= 1
        self.per_ip[ip] -= 1
        if self.per_ip[ip] <= 0:
            del self.per_ip[ip]

    def _admit_tls(self, ip: str) -> Admission | None:
        admitted = self._admit(ip)
        return admitted if isinstance(admitted, Admission) else None

    def _tls_protocol(self, admission: Admission) -> asyncio.Protocol:
        return self._protocol(admission)

    def _protocol(self, admission: Admission | None = None) -> asyncio.Protocol:
        """A connection's protocol: plain (admitted in connection_made) or implicit TLS
        (admitted at accept, handshake done)."""
        implicit = admission is not None
        return SessionConnection(
            lambda peer: self.make_session(peer, implicit),
            self.tls_context,
            implicit,
            self._spawn,
            self.verify,
            files=self._files,
            handshake_timeout=self.handshake_timeout,
            login_timeout=self.login_timeout,
            admission=admission,
            admit=self._admit,
            on_open=self._opened,
            on_close=self._closed,
        )

    def _opened(self, conn: SessionConnection) -> None:
        self._connections.add(conn)
        self._none_left.clear()

    def _closed(self, conn: SessionConnection) -> None:
        self._connections.discard(conn)
        if not self._connections:
            self._none_left.set()

    async def drain(self) -> None:
        """Stop accepting; return when every connection has ended on its own (the
        sessions keep the settings they started with; IDLE ends by DONE or its timeout)."""
        await stop_accepting(self.servers)
        for s in self.servers:
            if isinstance(s, TlsAcceptor):
                await s.wait_closed()  # its handshakes end (within the timeout) or become connections
        if self._connections:
            await self._none_left.wait()

    async def stop(self) -> None:
        for s in self.servers:
            s.close()
            if isinstance(s, TlsAcceptor):
                s.abandon()
        for s in self.servers:
            await settle(s.wait_closed(), 5)  # TlsAcceptor: its handshakes are abandoned
        self.servers = []
        if self._stopping is not None:
            self._stopping.set()
        if self._runner is not None:
            with contextlib.suppress(Exception):
                await self._runner
            self._runner = None
        for conn in list(self._connections):
            if conn.transport is not None:
                conn.transport.abort()
        if self._connections:  # let connection_lost run, so every socket is really closed
            await settle(self._none_left.wait(), 5)
        if self._files is not None:
            files, self._files = self._files, None
            await asyncio.get_running_loop().run_in_executor(None, files.shutdown)


class AccessService:
    """The shell shared by the POP3 and IMAP services of ``kanmon serve``: the accounts,
    the throttle, the event log and the listeners of one ``[pop3]``/``[imap]`` section.
    A subclass names the protocol and makes one I/O-free session per connection.

    ``tls_context``: server-side SSLContext (the same certificate as SMTP), needed for
    STLS/STARTTLS and ``listen_tls``. ``emit(text, queue_id=None)``: an event-log line
    (logins, failures, blocks).
    """

    protocol = ""  # "POP3" | "IMAP"

    refusals = (b"", b"")  # over max_connections, over max_connections_per_ip (ListenerSet)

    def __init__(self, config, section, tls_context, users, throttle, emit, *, max_connections: int | None = None,
                 sockets: list[tuple[socket.socket, bool]] | None = None):
        """max_connections: default [section] max_connections."""
        limits = section if section is not None else MailboxAccessSection()
        self.config = config
        self.tls_context = tls_context
        self.users = users
        self.throttle = throttle
        self.emit = emit
        self.listeners = ListenerSet(
            self.protocol,
            list(section.listen) if section else [],
            list(section.listen_tls) if section else [],
            tls_context,
            self._session,
            users.verify,
            max_connections=max_connections if max_connections is not None else limits.max_connections,
            max_connections_per_ip=limits.max_connections_per_ip,
            login_timeout=limits.login_timeout,
            handshake_timeout=config.tls.handshake_timeout if config.tls is not None else TlsSection.model_fields["handshake_timeout"].default,
            sockets=sockets,
            refusals=self.refusals,
        )

    def _session(self, peer: PeerInfo, implicit: bool):
        raise NotImplementedError

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return self.listeners.addresses

    async def start(self) -> None:
        """Bind every listener of the section; OSError if one cannot be bound."""
        await self.listeners.start()
        for host, port in self.addresses:
            self.emit(f"{self.protocol.lower()} listening on {host}:{port}")

    async def retire(self) -> None:
        """After a reload: sessions in progress finish under this service, then it stops."""
        await self.listeners.drain()
        await self.stop()

    async def stop(self) -> None:
        await self.listeners.stop()
