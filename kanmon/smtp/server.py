"""The SMTP listener: sockets, TLS, limits and timeouts around the I/O-free Session.

Role: a thin asyncio.Protocol adapter. It feeds received bytes to kanmon.smtp.session,
carries out the actions it returns (write, STARTTLS, store in the spool, run the checks
that need I/O, carry out the checks' side effects, close), keeps connection limits (in
all and per client IP; on an implicit-TLS port counted from accept, before the
handshake, kanmon.tlsaccept) and the idle/session timeouts, refreshes the checks' probes (free
disk) in a thread of their own (Prober), and writes session events (connect, TLS,
rejects naming the check that refused, disconnect) and history rows to the records.

Trusts: nothing from the client. Reading is paused while a message is being made
durable, while too much pipelined input is waiting and while a big message's pieces wait
for its spill file (kanmon.spool.spill), so one client costs at most the session's DATA
buffer plus MAX_PIPELINE_BUFFER of memory; spilled messages are read back one at a time
(READBACK_PLACES) for the checks and the queue file (DESIGN.md promise 6).
Never: answer 250 to DATA before the spool returned (promise 1); turn an unexpected
exception, or a check that failed or timed out, into anything but its failure reply
(451 4.3.0 by default) and an event naming it (promise 7); do file I/O on the loop for a
check (probes run in the Prober's thread, lookups in the executor); let a probe delay the
timeout sweeper.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import itertools
import os
import socket
import ssl
import time
import weakref
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from kanmon.auth.dkimsign import OFF_LOOP_SIZE, Signer, load_signer
from kanmon.config import Config, SessionProfile
from kanmon.listeners import stop_accepting
from kanmon.model import ClientInfo, Envelope, Reply, has_dot_line
from kanmon.policy.access import RelayAccess
from kanmon.policy.authcheck import AuthVerified
from kanmon.policy.pipeline import Decision, Outcome, Pipeline
from kanmon.policy.profiles import profile_for
from kanmon.policy.standard import relay_access
from kanmon.escape import for_log
from kanmon.records import events as ev
from kanmon.records.store import Records, header_fields
from kanmon.smtp import proxy_protocol, replies
from kanmon.smtp.session import (
    MAX_PIPELINE_BUFFER,
    Authenticate,
    CarryOut,
    Close,
    DropSpooled,
    ReadSpooled,
    Rejected,
    RunChecks,
    Send,
    Session,
    SessionSettings,
    SpoolData,
    StartTls,
    State,
    StoreMessage,
)
from kanmon.archive.store import ArchiveStore
from kanmon.quarantine.store import Meta as QuarantineMeta
from kanmon.quarantine.store import QuarantineStore
from kanmon.spool.spill import SpillWriter
from kanmon.spool.store import Spool, SpoolError
from kanmon.state.api import SharedState
from kanmon.state.backends import open_quarantine
from kanmon.store.users import log_safe
from kanmon.tlsaccept import Admission, TlsAcceptor, crowd

PROXY_HEADER_TIMEOUT = 10.0  # a trusted balancer sends its PROXY header at once
SWEEP_INTERVAL = 1.0  # the timeout sweeper and the probe refresh run this often (each on its own)
TLS_HANDSHAKE_TIMEOUT = 10.0  # default of [tls] handshake_timeout
PROFILE_MEMO_MAX = 4096  # client addresses whose session profile a listener remembers
# Spilled messages read back into memory at once (for the checks and the queue file):
# what bounds the memory of big messages however many sessions send them.
READBACK_PLACES = 1
EARLY_LIMIT = 64 << 10  # bytes kept from a client before its session opens (the pregreet test refuses it anyway)
KEEP_FOR_DELIVERY = 1 << 20  # a message up to this size goes to the queue with its content (no re-read)
_session_ids = itertools.count(1)


def _in_networks(ip: str, networks: list) -> bool:
    if not networks:
        return False  # the common case: none configured, no address to parse
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(addr in net for net in networks)


class GaugeBatch:
    """This process's takes and releases of places in the shared connection gauges,
    grouped: what arrives while one state transaction runs goes into the next
    (SharedState.gauges.apply), as the spool's group commit does for queue files. A
    release waits for nothing and is applied before the takes of its batch, so every take
    sees every release queued before it.

    Kept places: a connection that ends may leave its places held by this process
    (release(keys, limits)) when each key's last total was at most half its limit; the
    next connection for the same keys takes them without a state transaction (one client
    connecting again and again, or any client for the listener's total, is the common
    case; a transaction per connection and per disconnection was most of what the shared
    limits cost on a busy listener). A place is only kept after a connection was admitted
    with it, so every place held in all (admitted or kept, by every process) was counted
    under the limit when it was taken: kept places can make another process refuse a
    little earlier for a moment, never admit more than a limit. A kept place no
    connection took since the previous trim() is given back there (the listener trims
    every SWEEP_INTERVAL: a place is kept at most two intervals unused); a key nearer its
    limit is given back at once, as before."""

    def __init__(self, state: SharedState, owner: str, clock: Callable[[], float],
                 spawn: Callable[[Awaitable[None]], object], said: Callable[[ev.Event], None] | None = None):
        """said: where the gauge's outage and return are told (the records), once each."""
        self.state = state
        self.owner = owner
        self.clock = clock
        self.spawn = spawn
        self.said = said
        self.unavailable = False  # the last transaction failed (the shared state is down)
        self._takes: list[tuple[tuple[str, ...], tuple[str, ...], asyncio.Future[list[int]]]] = []
        self._releases: list[str] = []
        self._running = False
        # Per key: places this batch holds in the shared gauge (applied or on their way),
        # places live connections use, the last total a transaction read, and the fewest
        # kept places (held - used) seen since the last trim().
        self._held: dict[str, int] = {}
        self._used: dict[str, int] = {}
        self._last: dict[str, int] = {}
        self._idle: dict[str, int] = {}

    def kept(self, key: str) -> int:
        """Places of key this process holds that no connection uses."""
        return self._held.get(key, 0) - self._used.get(key, 0)

    def _usable(self, key: str, limit: int) -> bool:
        return self.kept(key) > 0 and 2 * self._last.get(key, 0) <= limit

    def _use(self, key: str) -> int:
        """Take a kept place of key; its last total."""
        self._used[key] = self._used.get(key, 0) + 1
        k = self.kept(key)
        if k < self._idle.get(key, k + 1):
            self._idle[key] = k
        return self._last.get(key, 0)

    def take_kept(self, keys: tuple[str, ...], limits: tuple[int, ...]) -> list[int] | None:
        """At once, without a transaction: a kept place of every key (each key's last
        total, in the order of keys), or None (nothing taken) when a key has none."""
        held, used, last = self._held, self._used, self._last
        for k, lim in zip(keys, limits):  # _usable(), inlined: asked at every connection
            if held.get(k, 0) - used.get(k, 0) <= 0 or 2 * last.get(k, 0) > lim:
                return None
        return [self._use(k) for k in keys]

    def acquire(self, *keys: str, limits: tuple[int, ...] | None = None) -> asyncio.Future[list[int]]:
        """One more place held by this process in each gauge of keys; the totals held
        by every owner afterwards, in the order of keys. With limits (one per key), a
        kept place is taken where there is one (its total is the last one read) and
        the transaction takes the others."""
        fut: asyncio.Future[list[int]] = asyncio.get_running_loop().create_future()
        local: tuple[str, ...] = ()
        if limits is not None:
            local = tuple(k for k, lim in zip(keys, limits) if self._usable(k, lim))
            for k in local:
                self._use(k)
        if len(local) == len(keys):
            fut.set_result([self._last.get(k, 0) for k in keys])
            return fut
        self._takes.append((keys, local, fut))
        self._kick()
        return fut

    def release(self, keys: tuple[str, ...], limits: tuple[int, ...] | None = None) -> None:
        """A connection that held a place in each of keys ended. With limits (its
        connection was admitted under them), a key whose last total was at most half
        its limit keeps the place for the next connection; the others are given back."""
        give: list[str] = []
        for i, k in enumerate(keys):
            used = self._used.get(k, 0) - 1
            if used > 0:
                self._used[k] = used
            else:
                self._used.pop(k, None)
            if limits is not None and 2 * self._last.get(k, 0) <= limits[i]:
                continue  # kept
            self._drop(k, 1)
            give.append(k)
        if give:
            self._releases.extend(give)
            self._kick()

    def _drop(self, key: str, n: int) -> None:
        held = self._held.get(key, 0) - n
        if held > 0:
            self._held[key] = held
        else:
            self._held.pop(key, None)
            self._last.pop(key, None)
            self._idle.pop(key, None)
        if self._idle.get(key, 0) > held - self._used.get(key, 0):
            self._idle[key] = held - self._used.get(key, 0)

    def trim(self, everything: bool = False) -> None:
        """Give back the kept places no connection took since the previous trim
        (everything: all kept places, when the listener stops)."""
        give: list[str] = []
        for key in list(self._held):
            kept = self.kept(key)
            idle = kept if everything else min(kept, self._idle.get(key, kept))
            if idle > 0:
                self._drop(key, idle)
                give += [key] * idle
            if key in self._held:
                self._idle[key] = self.kept(key)
        self._releases.extend(give)
        if self._releases:  # with the releases a failed transaction kept (the shared state was down)
            self._kick()

    def _kick(self) -> None:
        if not self._running:
            self._running = True
            self.spawn(self._run())

    def _undo_local(self, local: tuple[str, ...]) -> None:
        for k in local:  # the kept places a failed take had used are kept again
            used = self._used.get(k, 0) - 1
            if used > 0:
                self._used[k] = used
            else:
                self._used.pop(k, None)

    async def _run(self) -> None:
        try:
            while self._takes or self._releases:
                takes, self._takes = self._takes, []
                releases, self._releases = self._releases, []
                wanted = [[k for k in keys if k not in local] for keys, local, _ in takes]
                try:
                    totals = await self.state.submit(self.state.gauges.apply, self.owner, releases,
                                                     [k for ks in wanted for k in ks], self.clock())
                except Exception as e:  # noqa: BLE001 - each taker decides (the process's own count still limits)
                    for _, local, fut in takes:
                        self._undo_local(local)
                        if not fut.done():
                            fut.set_exception(e)
                    # The releases go with the next transaction (the next take, release or
                    # trim starts it): never a loop of failing transactions with no taker.
                    self._releases[:0] = releases
                    if not self.unavailable:
                        self.unavailable = True
                        if self.said is not None:
                            self.said(ev.Error("connection gauge unavailable (the connection limits count this "
                                               "process's connections only until it answers): "
                                               + for_log(f"{type(e).__name__}: {e}")))
                    if not self._takes:
                        return
                    continue
                if self.unavailable:
                    self.unavailable = False
                    if self.said is not None:
                        self.said(ev.Note("connection gauge available again"))
                i = 0
                for (keys, local, fut), ks in zip(takes, wanted):
                    mine, i = totals[i:i + len(ks)], i + len(ks)
                    got = dict(zip(ks, mine))
                    for k, total in got.items():
                        self._held[k] = self._held.get(k, 0) + 1
                        self._last[k] = total
                    if fut.done():  # the taker went away meanwhile: give its places back
                        self._undo_local(local)
                        for k in ks:
                            self._drop(k, 1)
                        self._releases.extend(ks)
                        continue
                    for k in ks:
                        self._used[k] = self._used.get(k, 0) + 1
                        self._idle.setdefault(k, self.kept(k))
                    fut.set_result([got[k] if k in got else self._last.get(k, 0) for k in keys])
        finally:
            self._running = False
            for _, local, fut in self._takes:  # cancelled meanwhile (the loop is stopping)
                self._undo_local(local)
                if not fut.done():
                    fut.cancel()
            self._takes.clear()


@dataclass(slots=True)
class SubmissionAuth:
    """What AUTH needs: the accounts (kanmon.store.users.Users) and the brute-force throttle."""

    users: Any
    throttle: Any


class Prober:
    """Runs a pipeline's probes (Pipeline.refresh: blocking I/O such as the free-disk
    statvfs) once per SWEEP_INTERVAL in a thread of its own: apart from the timeout
    sweeper, which never waits for it, and from the default executor, whose threads
    argon2 checks and Maildir walks may keep busy. While a probe still runs (a hung
    statvfs) the next rounds are skipped, and the checks answer from the last probe.
    Listeners sharing a pipeline (SMTP and submission of one node) share its prober, so
    it probes once per interval: acquire() in start(), release() in stop()."""

    def __init__(self, pipeline: Pipeline, records: Records):
        self.pipeline = pipeline
        self.records = records
        self.loop = asyncio.get_running_loop()
        self.users = 0
        self.closed = False
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kanmon-probe")
        self._first: asyncio.Future[None] | None = None
        self._probe: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def acquire(cls, pipeline: Pipeline, records: Records) -> Prober:
        """The pipeline's prober on this loop (made by the first listener to start)."""
        prober = _probers.get(pipeline)
        if prober is None or prober.closed or prober.loop is not asyncio.get_running_loop():
            prober = _probers[pipeline] = cls(pipeline, records)
        prober.users += 1
        return prober

    async def ready(self) -> None:
        """The first probe has answered (a listener waits for it before it listens: the
        checks answer from a probe from the first client on); then the rounds start."""
        if self._first is None:
            self._first = self.loop.run_in_executor(self._executor, self.pipeline.refresh)
            self._first.add_done_callback(self._probed)
        # A first probe that fails (the shared state down for the greylist's prune) is an
        # event, as every later one: the checks answer by their failure modes meanwhile,
        # and the listener listens.
        with contextlib.suppress(Exception):
            await asyncio.shield(self._first)
        if self._task is None and not self.closed:
            self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            self.tick()

    def tick(self) -> bool:
        """One round: start a probe, unless the previous one still runs (False: skipped).
        Never waits for it: its outcome is reported by _probed."""
        if self._probe is not None and not self._probe.done():
            return False
        self._probe = self.loop.run_in_executor(self._executor, self.pipeline.refresh)
        self._probe.add_done_callback(self._probed)
        return True

    def _probed(self, fut: asyncio.Future[None]) -> None:
        if fut.cancelled():
            return
        e = fut.exception()
        # A probe must not stop anything; the admin hears of each one that failed.
        for one in (e.exceptions if isinstance(e, ExceptionGroup) else [e] if e is not None else []):
            self.records.record(ev.ProbeFailed(f"{type(one).__name__}: {one}"))

    def release(self) -> None:
        """A listener stopped; the last one stops the rounds. A probe still running (hung)
        is left to finish in its thread; nothing waits for it."""
        self.users -= 1
        if self.users > 0:
            return
        self.closed = True
        if _probers.get(self.pipeline) is self:
            del _probers[self.pipeline]

        if self._task is not None:
            self._task.cancel()
        for fut in (self._first, self._probe):
            if fut is not None:
                fut.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)


_probers: weakref.WeakKeyDictionary[Pipeline, Prober] = weakref.WeakKeyDictionary()


class SmtpServer:
    """The SMTP listeners of one role (port 25, or submission), with shared limits."""

    def __init__(
        self,
        config: Config,
        pipeline: Pipeline,
        spool: Spool,
        records: Records,
        on_stored: Callable[[str, Envelope, bytes | None], None],
        tls_context: ssl.SSLContext | None,
        *,
        clock: Callable[[], float] = time.time,
        listeners: list[tuple[str, int, bool]] | None = None,
        sockets: list[tuple[socket.socket, bool]] | None = None,
        submission: bool = False,
        auth: SubmissionAuth | None = None,
        effects: Mapping[type, Callable[[Any], Awaitable[None]]] | None = None,
        proxy_header_timeout: float = PROXY_HEADER_TIMEOUT,
        state: SharedState | None = None,
        signer: Signer | None = None,
    ):
        """listeners: (host, port, implicit TLS) to bind; default: [smtp] listen, plain.
        sockets: (already listening socket, implicit TLS), e.g. inherited by a receiver process.
        submission: RFC 6409 profile (AUTH after TLS, required for MAIL) with auth.
        effects: how to carry out each type of side effect the checks return
        (e.g. kanmon.policy.quota.quota_effect_handlers).
        state: the state shared with the other receiver processes: given, the per-client
        connection limit counts every process's connections (a gauge per client address
        owned by this process id); None, this process's own (one process serves them all).
        signer: the [[dkim]] keys that sign mail from relay networks and authenticated
        users; None: loaded from config (a key that does not load raises DkimKeyError)."""
        if sockets is not None:
            listeners = []
        self.listeners = listeners if listeners is not None else [(h, p, False) for h, p in config.smtp.listen]
        self.sockets = sockets or []
        self.submission = submission
        self.auth = auth
        self.config = config
        self.pipeline = pipeline
        # The checks' access tables; a pipeline without the standard checks (a custom
        # one) gets tables of its own for the listener's questions.
        self.access = relay_access(pipeline) or RelayAccess(config)
        self.effects = dict(effects or {})
        self.signer = signer if signer is not None else load_signer(config)
        self.proxy_header_timeout = proxy_header_timeout
        self.spool = spool
        self.readback = asyncio.Semaphore(READBACK_PLACES)  # spilled messages in memory at once
        self.records = records
        self.on_stored = on_stored
        self.tls_context = tls_context
        self.clock = clock
        self.connections: set[SmtpProtocol] = set()
        # Accepted by the loop but not yet in `connections` (connection_made comes a loop
        # turn later, after the handshake for implicit TLS): protocol -> when it was made.
        # A retiring server waits for these too, or closing it would drop them unanswered.
        self.opening: weakref.WeakKeyDictionary[SmtpProtocol, float] = weakref.WeakKeyDictionary()
        self.per_ip: Counter[str] = Counter()
        self.state = state
        self.gauge_owner = str(os.getpid())
        self.gauge = (GaugeBatch(state, self.gauge_owner, clock, self.spawn, records.record)
                      if state is not None else None)
        self._servers: list[asyncio.base_events.Server] = []
        self._sweeper: asyncio.Task[None] | None = None
        self._prober: Prober | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._quarantine: QuarantineStore | None = None
        self._archive: ArchiveStore | None = None
        self._trusted_proxies = list(config.smtp.trusted_proxies)
        self._health_check_clients = list(config.smtp.health_check_clients)
        self.handshake_timeout = config.tls.handshake_timeout if config.tls is not None else TLS_HANDSHAKE_TIMEOUT
        self._acceptors: list[TlsAcceptor] = []
        self.accepted = 0
        self._profiles: dict[str, SessionProfile] = {}  # client address -> profile (profile_of)
        self._profiles_config = config
        self.stopping = False

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._prober = Prober.acquire(self.pipeline, self.records)
        try:
            await self._prober.ready()  # probes answer before the first client
            for host, port, implicit_tls in self.listeners:
                if implicit_tls:
                    if self.tls_context is None:
                        raise OSError(f"{host}:{port}: implicit TLS needs a certificate")
                    self._tls_acceptor(TlsAcceptor.bind(host, port, *self._acceptor_args()))
                    continue
                server = await loop.create_server(
                    lambda: SmtpProtocol(self), host, port, reuse_address=True, backlog=1024,
                )
                self._servers.append(server)
            for sock, implicit_tls in self.sockets:
                if implicit_tls:
                    if self.tls_context is None:
                        raise OSError("implicit TLS needs a certificate")
                    self._tls_acceptor(TlsAcceptor(sock, *self._acceptor_args()))
                    continue
                server = await loop.create_server(lambda: SmtpProtocol(self), sock=sock, backlog=1024)
                self._servers.append(server)
        except Exception:
            await self.stop()
            raise
        self._sweeper = asyncio.ensure_future(self._sweep())

    def _acceptor_args(self) -> tuple:
        assert self.tls_context is not None
        return (self.tls_context, self.handshake_timeout, self.admit_tls, lambda admission: SmtpProtocol(self, admission))

    def _tls_acceptor(self, acceptor: TlsAcceptor) -> None:
        acceptor.start()
        self._acceptors.append(acceptor)
        self._servers.append(acceptor)  # type: ignore[arg-type] # sockets, close, wait_closed

    def admit_tls(self, ip: str) -> Admission | None:
        """At accept on an implicit-TLS port, before the handshake: count the connection
        (in all, and against the client's per-IP limit), or refuse it (closed at once:
        there is no plaintext reply on a TLS port; the event says why). A trusted
        balancer's connections are counted by the client address its PROXY header
        names, once the session begins."""
        smtp = self.config.smtp
        pending = sum(a.pending for a in self._acceptors)
        if len(self.connections) + pending >= smtp.max_connections:
            self._refused_at_accept(ip, replies.TOO_MANY_CONNECTIONS, f"connection limit {smtp.max_connections} reached",
                                    "max_connections")
            return None
        if self.is_trusted_proxy(ip):
            return Admission(ip, _count_nothing)
        limit = self.per_ip_limit(ip)
        if self.per_ip[ip] >= limit:
            self._refused_at_accept(ip, replies.TOO_MANY_FROM_IP, f"per-IP connection limit {limit} reached",
                                    "max_connections_per_ip")
            return None
        self.per_ip[ip] += 1
        return Admission(ip, self.release_ip)

    def profile_of(self, ip: str) -> SessionProfile:
        """The session profile of a client that has not authenticated: profile_for,
        remembered per address (the listener asks at each connection; parsing the
        address and walking the networks was most of it). Bounded: cleared when full;
        forgotten when the server's config is replaced."""
        if self._profiles_config is not self.config:
            self._profiles_config = self.config
            self._profiles.clear()
        profile = self._profiles.get(ip)
        if profile is None:
            profile = profile_for(ip, False, self.config)
            if len(self._profiles) >= PROFILE_MEMO_MAX:
                self._profiles.clear()
            self._profiles[ip] = profile
        return profile

    def per_ip_limit(self, ip: str, profile: SessionProfile | None = None) -> int:
        """The client's concurrent connection limit: [submission] max_connections_per_ip
        on the submission listeners when set, else its session profile's (`profile`
        when the caller has it, else the one of its address)."""
        if self.submission and self.config.submission is not None and self.config.submission.max_connections_per_ip:
            return self.config.submission.max_connections_per_ip
        return (profile or self.profile_of(ip)).max_connections_per_ip

    def release_ip(self, ip: str) -> None:
        self.per_ip[ip] -= 1
        if self.per_ip[ip] <= 0:
            del self.per_ip[ip]

    def _refused_at_accept(self, ip: str, reply: Reply, why: str, check: str) -> None:
        self.records.record(ev.ConnectRefused(ip, str(reply), reply.enhanced, f"{why} (before TLS)", check))

    def addresses(self) -> list[tuple[str, int]]:
        out = []
        for s in self._servers:
            for sock in s.sockets:
                out.append(sock.getsockname()[:2])
        return out

    async def retire(self) -> None:
        """After a reload: stop accepting (the listening socket stays with the server that
        replaces this one), let every session in progress finish under this server's
        settings, by QUIT or by its own timeouts, then stop."""
        await stop_accepting(self._servers)
        self.stopping = True  # no new connection here will take a kept gauge place
        # Handshakes become sessions: connections accepted whose session has not started yet
        # (an implicit TLS handshake in progress) are waited for too, not only the sessions.
        while self.connections or any(a.pending for a in self._acceptors) or self._still_opening():
            await asyncio.sleep(SWEEP_INTERVAL if self.connections else 0.05)
        await self.stop()

    def _still_opening(self) -> bool:
        """An accepted connection whose session has not started yet and may still (a
        failed TLS handshake never starts one: it counts only while a handshake could last)."""
        now = time.monotonic()
        return any(now - made < TLS_HANDSHAKE_TIMEOUT + 1 for made in list(self.opening.values()))

    async def stop(self) -> None:
        self.stopping = True  # ended connections give their gauge places back from now on
        for s in self._servers:
            s.close()
        if self._sweeper:
            self._sweeper.cancel()
        if self._prober is not None:
            prober, self._prober = self._prober, None
            prober.release()
            if prober.closed:
                # The last listener of this pipeline: end the lookups its checks run in
                # the background (client names), before the loop goes away.
                for check in self.pipeline.checks:
                    aclose = getattr(check, "aclose", None)
                    if callable(aclose):
                        await aclose()
        for acceptor in self._acceptors:
            acceptor.abandon()
        for conn in list(self.connections):
            conn.shutdown(replies.SHUTTING_DOWN)
        for s in self._servers:
            await s.wait_closed()
        self._servers.clear()
        if self.gauge is not None:
            self.gauge.trim(everything=True)  # the places kept for connections that will not come
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._quarantine is not None:
            quarantine, self._quarantine = self._quarantine, None
            quarantine.close()

    def archive_copy(self, queue_id: str, env: Envelope, content: bytes, sid: str | None) -> None:
        """[archive] maildir: keep a copy of an accepted message, after the reply (a copy
        never delays or fails an acceptance; a failure is an event)."""
        cfg = self.config.archive
        if cfg.maildir is None:
            return
        client = env.client
        from_outside = client is None or self.access.from_outside(client)
        direction = cfg.applies(env.mail_from, env.rcpts, from_outside)
        if not direction:
            return
        if self._archive is None:
            self._archive = ArchiveStore(cfg.maildir, cfg.quota)
        store = self._archive

        async def copy() -> None:
            why = await asyncio.get_running_loop().run_in_executor(None, store.keep, queue_id, env, content, direction)
            if why == "over quota":
                if not store.full_reported:
                    store.full_reported = True
                    self.records.record(ev.ArchiveSkipped(str(cfg.maildir), why), queue_id, session=sid)
            elif why:
                self.records.record(ev.ArchiveSkipped(str(cfg.maildir), why), queue_id, session=sid)
            else:
                store.full_reported = False

        self.spawn(copy())

    def quarantine_store(self) -> QuarantineStore:
        """The quarantine, this node's or shared by every node (made on first use: most
        nodes never quarantine anything)."""
        if self._quarantine is None:
            self._quarantine = open_quarantine(self.config, fsync=self.spool.fsync)
        return self._quarantine

    def spawn(self, coro) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def is_trusted_proxy(self, ip: str) -> bool:
        return _in_networks(ip, self._trusted_proxies)

    def is_health_check_client(self, ip: str) -> bool:
        """[smtp] health_check_clients: a monitor's address."""
        return _in_networks(ip, self._health_check_clients)

    async def _sweep(self) -> None:
        """One timer for all connections (sweep_nowait); it awaits nothing else (the
        probes run in the Prober), so no probe or busy executor delays a timeout."""
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            self.sweep_nowait(time.monotonic())
            if self.gauge is not None:
                self.gauge.trim()  # kept gauge places no connection took since the last sweep

    def sweep_nowait(self, now: float) -> None:
        """Close what has waited too long at `now` (time.monotonic): a trusted proxy's
        missing PROXY header, idle clients, sessions past their total deadline."""
        smtp = self.config.smtp
        for conn in list(self.connections):
            if conn.awaiting_proxy_header:
                if now - conn.started > self.proxy_header_timeout:
                    self.records.record(ev.ProxyTimeout(conn.peer_ip), session=conn.sid)
                    conn.shutdown(None)
                continue
            session = conn.session
            if session is not None and session.in_data:
                limit = smtp.data_timeout
            elif session is not None and session.settings.profile is not None:
                limit = session.settings.profile.idle_timeout
            else:
                limit = smtp.command_timeout
            if conn.waiting_for_us:
                continue
            if now - conn.last_activity > limit:
                conn.shutdown(replies.TIMEOUT, "timeout")
            elif now - conn.started > smtp.session_timeout:
                conn.shutdown(replies.SESSION_TOO_LONG, "session time limit")

    async def carry_out(self, effects: tuple, sid: str | None = None) -> None:
        """Carry out the checks' side effects, in order; one failing never stops the others."""
        for effect in effects:
            if isinstance(effect, AuthVerified):
                self.records.record(ev.AuthChecked(
                    effect.spf, effect.dkim, effect.dmarc, effect.arc, log_safe(effect.from_domain, 255), effect.action,
                    log_safe(effect.detail, 2000),
                ), session=sid)
                continue
            handler = self.effects.get(type(effect))
            if handler is None:
                self.records.record(ev.EffectUnhandled(repr(effect)), session=sid)
                continue
            try:
                await handler(effect)
            except Exception as e:  # noqa: BLE001 - an effect must never break the session
                self.records.record(ev.EffectFailed(type(effect).__name__, f"{type(e).__name__}: {e}"), session=sid)


class _FailedSpill:
    """A spill file that could not be created: takes nothing, fails the read-back."""

    over_backlog = False

    def __init__(self, error: OSError):
        self.error = error

    def append(self, piece: bytes) -> None:
        pass

    def discard(self) -> None:
        pass

    async def read_and_remove(self) -> bytes:
        raise self.error


def _count_nothing(ip: str) -> None:
    """The release of an admission that counted nothing (a trusted balancer's)."""


class SmtpProtocol(asyncio.Protocol):
    def __init__(self, server: SmtpServer, admission: Admission | None = None):
        self.server = server
        # Implicit TLS: the connection was counted at accept (its per-IP place is this).
        self.admission = admission
        self._in_crowd = False  # counted in this process's crowd (kanmon.tlsaccept)
        self.transport: asyncio.Transport | None = None
        self.session: Session | None = None
        self.client: ClientInfo | None = None
        self.peer_ip = ""
        self.started = time.monotonic()
        self.last_activity = self.started
        self.waiting_for_us = False  # storing a message or in a TLS handshake
        self._paused = False
        self._closed = False
        self._counted = False
        self._gauged: tuple[str, ...] = ()  # the shared connection gauges' keys, once acquired
        self._gauge_limits: tuple[int, ...] | None = None  # the limits the connection was admitted under
        self._proxy_buf: bytearray | None = None  # collecting a PROXY header from a trusted balancer
        # A trusted balancer's PROXY LOCAL connection: its health check (PROXY spec 2.2,
        # connections the proxy makes for itself). Greeted at once, no connect/disconnect
        # lines (every few seconds per balancer, they would bury the clients' lines).
        self._health_check = False
        # A monitor's connection ([smtp] health_check_clients): its connect line waits
        # for its first bytes, and is never written if it ends without any.
        self._monitor = False
        self._greet_timer: asyncio.TimerHandle | None = None  # greet_pause running (pregreet test)
        # What the client sent before its session opened (read while the shared connection
        # gauge answers: uvloop starts reading after connection_made, where a pause does
        # nothing), fed to the session once it opens: through the pregreet test.
        self._early: bytes = b""
        self._lines_seen = 0  # session.lines_read at the last progress (per-command deadline)
        self._check_task: asyncio.Task[None] | None = None  # running the session's pending checks
        self._spill: SpillWriter | _FailedSpill | None = None  # this message's content beyond the DATA buffer
        self._spill_seq = 0
        self._readback_held = False  # one of the server's read-back places (a spilled message in memory)
        self.sid = f"{os.getpid():x}.{next(_session_ids)}"  # joins this session's event lines (kanmon trace)
        server.opening[self] = self.started

    # -- connection ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.opening.pop(self, None)
        try:
            self._connection_made(transport)
        except Exception as e:  # noqa: BLE001 - promise 7: 451 and an event, never a hang
            self.server.records.record(ev.Error(f"session error at connect: {type(e).__name__}: {e}"), session=self.sid)
            transport.write(replies.LOCAL_ERROR.wire())  # type: ignore[attr-defined]
            transport.close()
            self._closed = True

    @property
    def _unlogged(self) -> bool:
        """No connect/disconnect lines (and no pregreet wait): a trusted balancer's health
        check, or a monitor that has not talked (yet)."""
        return self._health_check or self._monitor

    @property
    def awaiting_proxy_header(self) -> bool:
        return self._proxy_buf is not None and not self._closed

    def _connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername") or ("0.0.0.0", 0)
        self.peer_ip = peer[0]
        server = self.server
        server.connections.add(self)
        crowd.opened()
        self._in_crowd = True
        if self.peer_ip and server.is_trusted_proxy(self.peer_ip):
            # The balancer speaks first (PROXY protocol); the greeting waits for it.
            self._proxy_buf = bytearray()
            self.waiting_for_us = False
            return
        client = ClientInfo(ip=self.peer_ip, port=peer[1])
        ssl_obj = transport.get_extra_info("ssl_object")
        if ssl_obj is not None:  # implicit TLS listener (RFC 8314)
            cipher, _proto, bits = ssl_obj.cipher()
            client.tls_version, client.tls_cipher, client.tls_bits = ssl_obj.version(), cipher, bits
        self._begin(client)

    def _begin(self, client: ClientInfo) -> None:
        server = self.server
        smtp = server.config.smtp
        self.client = client
        ip = client.ip
        # (On an implicit-TLS port the handshake has been made: logged as any client.)
        self._monitor = not self._health_check and not client.tls_version and server.is_health_check_client(ip)
        if len(server.connections) > smtp.max_connections:
            self._refuse(replies.TOO_MANY_CONNECTIONS, f"connection limit {smtp.max_connections} reached", "max_connections")
            return
        profile = server.profile_of(ip)
        limit = server.per_ip_limit(ip, profile)
        if self.admission is not None and self.admission.ip == ip:
            pass  # counted at accept, before the TLS handshake
        elif server.per_ip[ip] >= limit:
            self._refuse(replies.TOO_MANY_FROM_IP, f"per-IP connection limit {limit} reached", "max_connections_per_ip")
            return
        else:
            server.per_ip[ip] += 1
            self._counted = True
        if server.gauge is not None:
            # Other receiver processes hold connections of this client too: count them
            # all. A place this process kept from an ended connection is taken at once;
            # otherwise reading waits, the greeting too, until the gauge answers.
            role = "submission" if server.submission else "smtp"
            keys = (f"{role} {ip}", f"{role} *")
            limits = (limit, smtp.max_connections)
            totals = server.gauge.take_kept(keys, limits)
            if totals is not None:
                self._gauged = keys
                self._admitted(client, profile, keys, limits, totals)
                return
            self._pause()
            self.waiting_for_us = True
            server.spawn(self._admit(client, profile, keys, limits))
            return
        self._open(client, profile)

    async def _admit(self, client: ClientInfo, profile: SessionProfile, keys: tuple[str, str],
                     limits: tuple[int, int]) -> None:
        """Take a place in the shared connection gauges (the client's and the listener
        role's in all), then open the session; over max_connections or
        max_connections_per_ip, counting every process's connections, 421."""
        server = self.server
        assert server.gauge is not None
        try:
            totals = await server.gauge.acquire(*keys, limits=limits)
        except Exception:  # noqa: BLE001 - the process's own count still limits; the batch says it once
            totals = [0, 0]
        else:
            self._gauged = keys
        self.waiting_for_us = False
        if self._closed:  # the client left while the gauge answered: it did connect
            self._release_gauge()
            if not self._unlogged:
                server.records.record(ev.Connected(client.name, client.ip), session=self.sid)
                server.records.record(ev.Disconnected(client.name, client.ip), session=self.sid)
            return
        self._resume()
        self._admitted(client, profile, keys, limits, totals)

    def _admitted(self, client: ClientInfo, profile: SessionProfile, keys: tuple[str, str],
                  limits: tuple[int, int], totals: list[int]) -> None:
        """The gauges answered (held by this client, total): 421 over a limit, else the
        session opens, and its places may be kept for the next connection when it ends."""
        held, total = totals
        limit, max_connections = limits
        if total > max_connections:
            self._refuse(replies.TOO_MANY_CONNECTIONS, f"connection limit {max_connections} reached", "max_connections")
            return
        if held > limit:
            self._refuse(replies.TOO_MANY_FROM_IP, f"per-IP connection limit {limit} reached", "max_connections_per_ip")
            return
        if self._gauged:
            self._gauge_limits = limits
        self._open(client, profile)

    def _release_gauge(self) -> None:
        if self._gauged and self.server.gauge is not None:
            # An admitted connection's places may be kept; a refused one's are given back.
            self.server.gauge.release(self._gauged, None if self.server.stopping else self._gauge_limits)
        self._gauged = ()
        self._gauge_limits = None

    def _open(self, client: ClientInfo, profile: SessionProfile) -> None:
        server = self.server
        settings = SessionSettings(
            hostname=server.config.server.hostname,
            max_message_size=profile.max_message_size,
            max_recipients=profile.max_recipients,
            tls_available=server.tls_context is not None,
            tls_active=bool(client.tls_version),
            submission=server.submission,
            sender_addresses=server.access.sender_addresses if server.submission else None,
        )
        settings.apply_profile(profile)
        ip = client.ip
        self.session = Session(settings, server.pipeline, client, server.clock())
        server.pipeline.name_client(client)
        if not self._unlogged:
            server.records.record(ev.Connected(client.name, ip), session=self.sid)
        if client.tls_version:  # implicit TLS (RFC 8314): logged as a STARTTLS is, as sendmail does
            server.records.record(ev.TlsStarted(client.name, ip, client.tls_version, client.tls_cipher, client.tls_bits),
                                  session=self.sid)
        if profile.greet_pause > 0 and not server.submission and not self._unlogged:
            # Pregreet test (Postfix postscreen_greet_wait): an SMTP client waits for the
            # banner (RFC 5321 3.1); spambots often do not. Submission skips it, and so do
            # relay clients (the built-in "trusted" profile has greet_pause 0), a
            # trusted balancer's health checks and [smtp] health_check_clients.
            self._greet_timer = asyncio.get_running_loop().call_later(profile.greet_pause, self._greet)
        else:
            self._do(self.session.greeting())
        if self._early and not self._closed:
            early, self._early = self._early, b""
            self.data_received(early)

    def _greet(self) -> None:
        self._greet_timer = None
        if self.session is not None and not self._closed:
            self._do(self.session.greeting())

    def _refuse(self, reply: Reply, why: str, check: str = "") -> None:
        ip = self.client.ip if self.client else self.peer_ip
        self.server.records.record(ev.ConnectRefused(ip, str(reply), reply.enhanced, why, check), session=self.sid)
        assert self.transport is not None
        self.transport.write(reply.wire())
        self.transport.close()
        self._closed = True

    def connection_lost(self, exc: Exception | None) -> None:
        server = self.server
        server.opening.pop(self, None)
        if self._greet_timer is not None:
            self._greet_timer.cancel()
            self._greet_timer = None
        server.connections.discard(self)
        if self._in_crowd:
            self._in_crowd = False
            crowd.closed()
        if self.admission is not None:
            self.admission.release()
        if self._counted and self.client:
            server.per_ip[self.client.ip] -= 1
            if server.per_ip[self.client.ip] <= 0:
                del server.per_ip[self.client.ip]
        self._release_gauge()
        if self.session is not None and self.client is not None and not self._unlogged:
            server.records.record(ev.Disconnected(self.client.name, self.client.ip), session=self.sid)
        self._closed = True
        # The peer is gone: a check still running is stopped (its effects are not carried
        # out) and the session closed (the pending check discarded, buffered input unread).
        if self._check_task is not None:
            self._check_task.cancel()
        if self.session is not None:
            self.session.close()
        self._drop_spill()
        self._release_readback()

    def shutdown(self, reply: Reply | None, why: str = "") -> None:
        if self._closed or self.transport is None:
            return
        if self.session is None:
            self.transport.close()
            self._closed = True
            return
        if why and self.client:
            c = self.client
            self.server.records.record(ev.SessionCut(why, self.session.state.value, c.name, c.ip), session=self.sid)
        self._do(self.session.close(reply))
        if self._check_task is not None:
            self._check_task.cancel()  # closed: nobody waits for the answer

    # -- input ---------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        if self._proxy_buf is not None:
            self.last_activity = now
            self._proxy_header(data)
            return
        if self.session is None:
            if not self._closed and self.client is not None:  # admitted once the gauge answers
                self._early += data
                if len(self._early) > EARLY_LIMIT:  # a flood before the banner: not kept
                    self._refuse(replies.EARLY_TALKER, f"{len(self._early)} bytes before the greeting", "greet_pause")
            return
        if self._monitor:  # a monitor that talks: logged from here on as any client
            self._monitor = False
            self.server.records.record(ev.Connected(self.session.client.name, self.session.client.ip), session=self.sid)
        if self.session.state is State.GREETING and self.session.messages == 0:
            if data.startswith((b"PROXY ", proxy_protocol.V2_SIGNATURE[:6])) and not self.session.client.helo:
                # A PROXY header from an address that is not a trusted balancer: the
                # client's (behind a trusted balancer, the one its header named).
                self.server.records.record(ev.ProxyRefused(self.session.client.ip), session=self.sid)
                self._do(self.session.close(replies.PROXY_REFUSED))
                return
        if self._greet_timer is not None:
            self._greet_timer.cancel()
            self._greet_timer = None
            c = self.session.client
            self.server.records.record(ev.EarlyTalker(c.name, c.ip, len(data), str(replies.EARLY_TALKER)), session=self.sid)
            self._do(self.session.close(replies.EARLY_TALKER))
            return
        was_in_data = self.session.in_data
        try:
            actions = self.session.feed(data)
        except Exception as e:  # noqa: BLE001 - promise 7
            self._session_error(e)
            return
        if was_in_data or self.session.in_data or self.session.lines_read != self._lines_seen:
            # Progress: DATA bytes, or a complete command line. Bytes of one command line
            # trickled in do not count, so command_timeout is a deadline per command, not per
            # read (Postfix smtpd_per_record_deadline): one byte a second cannot hold a session.
            self._lines_seen = self.session.lines_read
            self.last_activity = now
        self._do(actions)

    def _session_error(self, e: Exception) -> None:
        """The session raised (a bug): an event, 451 and close, never a hung client."""
        assert self.session is not None
        self.server.records.record(ev.Error(f"session error: {type(e).__name__}: {e}"), session=self.sid)
        self._do(self.session.close(replies.LOCAL_ERROR) or [Close("session error")])

    def _proxy_header(self, data: bytes) -> None:
        assert self._proxy_buf is not None
        self._proxy_buf += data
        try:
            result = proxy_protocol.parse_proxy_header(self._proxy_buf)
        except proxy_protocol.ProxyProtocolError as e:
            self.server.records.record(ev.ProxyRefused(self.peer_ip, str(e)), session=self.sid)
            assert self.transport is not None
            self.transport.write(replies.SYNTAX_PARAMS.wire())
            self.transport.close()
            self._closed = True
            return
        if result is None:
            return  # need more bytes
        rest = bytes(self._proxy_buf[result.consumed :])
        self._proxy_buf = None
        src = result.source
        self._health_check = result.command == "LOCAL"
        client = ClientInfo(ip=src[0], port=src[1]) if src else ClientInfo(ip=self.peer_ip)
        self._begin(client)
        if rest and not self._closed:
            self.data_received(rest)  # through the pregreet test and the deadlines (kept until the session opens)

    # -- actions -------------------------------------------------------------------------------

    def _do(self, actions) -> None:
        transport = self.transport
        if transport is None:
            return
        for a in actions:
            if a.__class__ is Send:  # most actions: one class test, not the chain below
                if not self._closed:
                    transport.write(a.data)
            elif isinstance(a, SpoolData):
                self._spool_data(a.data)
            elif isinstance(a, Rejected):
                self._log_reject(a)
            elif isinstance(a, DropSpooled):
                self._drop_spill()
            elif isinstance(a, ReadSpooled):
                self._pause()
                self.waiting_for_us = True
                self.server.spawn(self._read_spooled())
            elif isinstance(a, StoreMessage):
                self._pause()
                self.waiting_for_us = True
                self.server.spawn(self._store(a))
            elif isinstance(a, RunChecks):
                self._pause()
                self.waiting_for_us = True
                self._check_task = self.server.spawn(self._run_checks(a))
            elif isinstance(a, CarryOut):
                self.server.spawn(self.server.carry_out(a.effects, self.sid))
            elif isinstance(a, Authenticate):
                self._pause()
                self.waiting_for_us = True
                self.server.spawn(self._authenticate(a))
            elif isinstance(a, StartTls):
                # Pause now, before the client's ClientHello can be read as plaintext.
                self._pause()
                self.waiting_for_us = True
                self.server.spawn(self._start_tls())
            elif isinstance(a, Close):
                if not self._closed:
                    self._closed = True
                    transport.close()
        if self.session is not None and not self.waiting_for_us and not self._closed:
            if self.session.buffered() > MAX_PIPELINE_BUFFER or (self._spill is not None and self._spill.over_backlog):
                self._pause()
            else:
                self._resume()
        if self._readback_held and self.session is not None and self.session.state not in (
                State.WAIT_CONTENT, State.WAIT_CHECK, State.WAIT_STORE):
            self._release_readback()

    # -- a message bigger than the DATA buffer (kanmon.spool.spill) ----------------------

    def _spool_data(self, data: bytes) -> None:
        if self._spill is None:
            self._spill_seq += 1
            path = self.server.spool.incoming / f"data-{self.sid}.{self._spill_seq}"
            try:
                self._spill = SpillWriter(path, self._spill_drained)
            except OSError as e:
                # Refused at the end of DATA (451), like a failed write.
                self._spill = _FailedSpill(e)
                return
        self._spill.append(data)

    def _spill_drained(self) -> None:
        if self.session is not None and not self.waiting_for_us and not self._closed and self.session.buffered() <= MAX_PIPELINE_BUFFER:
            self._resume()

    def _drop_spill(self) -> None:
        spill, self._spill = self._spill, None
        if spill is not None:
            spill.discard()

    def _release_readback(self) -> None:
        if self._readback_held:
            self._readback_held = False
            self.server.readback.release()

    async def _read_spooled(self) -> None:
        """The spilled message is complete: take a read-back place, read it back (the file
        goes), and let the session ask the checks as for a message held in memory."""
        server = self.server
        assert self.session is not None
        spill, self._spill = self._spill, None
        try:
            if spill is None:
                raise OSError(0, "no spill file")
            await server.readback.acquire()
            self._readback_held = True
            if self._closed:
                spill.discard()
                self._release_readback()
                return
            content = await spill.read_and_remove()
        except OSError as e:
            self._release_readback()
            server.records.record(ev.Error(f"warning: cannot spool message content: {e.strerror or e}; "
                                           f"answered {replies.STORAGE_ERROR}"), session=self.sid)
            if self._closed or self.session.state is State.CLOSED:
                return
            self.waiting_for_us = False
            self._do(self.session.spool_failed(replies.STORAGE_ERROR))
            return
        if self._closed or self.session.state is State.CLOSED:
            self._release_readback()
            return
        self.waiting_for_us = False
        self.last_activity = time.monotonic()
        try:
            actions = self.session.spooled_content(content)
        except Exception as e:  # noqa: BLE001 - promise 7
            self._session_error(e)
            return
        self._do(actions)

    def _pause(self) -> None:
        if not self._paused and self.transport is not None and not self._closed:
            self._paused = True
            self.transport.pause_reading()

    def _resume(self) -> None:
        if self._paused and self.transport is not None and not self._closed:
            self._paused = False
            self.transport.resume_reading()

    def _log_reject(self, a: Rejected) -> None:
        c = self.client
        assert c is not None
        records = self.server.records
        if a.error:
            records.record(ev.CheckFailed(a.check or "", a.command, a.error, str(a.reply)), session=self.sid)
        env = a.envelope
        # History rows (what `kanmon stats` counts as rejected): a recipient refused at RCPT,
        # the recipients of a message refused at DATA, a sender refused at MAIL by a check
        # (sender, client, HELO checks). A command refused before there is a recipient to
        # refuse (503 need MAIL/RCPT, a RCPT whose address does not parse) is a protocol
        # error: its line only. A 421 closes the session: no verdict on a recipient.
        rows = 0
        if a.reply.code != 421:
            if a.command == "RCPT":
                rows = 1 if a.rcpt else 0
            elif a.command == "DATA":
                rows = len(env.rcpts) if env and env.rcpts else 0
            elif a.command == "MAIL" and a.check:
                rows = 1
        records.record(ev.Refused(
            a.command, c.name, c.ip, str(a.reply), a.reply.enhanced, env.mail_from if env else None, a.rcpt or "",
            c.proto, c.helo, a.check or "", rows,
        ), session=self.sid)
        if rows:
            records.history_reject(env, a.rcpt, a.reply, c.ip, c.auth_user, c.helo,
                                   classification=a.classification, disposition="Reject")

    async def _run_checks(self, a: RunChecks) -> None:
        """Await the checks that need I/O (each bounded by its timeout inside resolve()),
        carry out the decision's effects before the reply (a quota marker is written
        before the client can ask again), then let the session continue."""
        assert self.session is not None
        try:
            decision = await a.pending.resolve()
        except Exception as e:  # noqa: BLE001 - promise 7: the runner itself failed
            check = a.pending.check
            decision = Decision(Outcome.TEMPFAIL, replies.LOCAL_ERROR, check.name, check.classification,
                                error=f"{type(e).__name__}: {e}")
        finally:
            self._check_task = None
        if self._closed or self.session.state is State.CLOSED:
            return  # closed meanwhile (the peer left, a timeout): nobody waits for the answer
        if decision.effects:
            await self.server.carry_out(decision.effects, self.sid)
            decision = dataclasses.replace(decision, effects=())
        self.waiting_for_us = False
        self.last_activity = time.monotonic()
        try:
            # Runs the continuation (the Received: header at DATA) and pipelined commands.
            actions = self.session.check_result(decision)
        except Exception as e:  # noqa: BLE001 - promise 7: 451 and an event, never a hang
            self._session_error(e)
            return
        self._do(actions)

    async def _store(self, a: StoreMessage) -> None:
        server = self.server
        assert self.session is not None and self.client is not None
        if a.discard:
            self._discard(a)
            return
        c = self.client
        if server.signer and (c.auth_user or server.access.is_relay_client(c.ip)):
            # DKIM: signed once, here, so the spool (or the quarantine) holds what goes out
            # (docs/authentication.md, "Signing outgoing mail").
            try:
                unsigned = len(a.content)
                if unsigned > OFF_LOOP_SIZE:
                    a.content = await asyncio.get_running_loop().run_in_executor(
                        None, server.signer.signed, a.content, server.clock(), True)
                else:
                    a.content = server.signer.signed(a.content, server.clock(), True)
                if a.envelope.no_dot_lines and has_dot_line(a.content[: len(a.content) - unsigned]):
                    a.envelope.no_dot_lines = False  # said of what is stored (the fields on top too)
            except Exception as e:  # noqa: BLE001 - promise 7: 451 and an event, never an unsigned surprise
                server.records.record(ev.Error(f"error signing message: {type(e).__name__}: {e}"), a.queue_id, session=self.sid)
                self.waiting_for_us = False
                self._do(self.session.message_failed(replies.LOCAL_ERROR))
                return
        if a.quarantine:
            await self._quarantine(a)
            return
        try:
            await server.spool.store(a.queue_id, a.envelope, a.content)
        except SpoolError as e:
            server.records.record(ev.Error(f"warning: {e}; answered {replies.STORAGE_ERROR}"), a.queue_id, session=self.sid)
            actions = self.session.message_failed(replies.STORAGE_ERROR)
        except Exception as e:  # noqa: BLE001 - promise 7
            server.records.record(ev.Error(f"error storing message: {type(e).__name__}: {e}"), a.queue_id, session=self.sid)
            actions = self.session.message_failed(replies.LOCAL_ERROR)
        else:
            server.accepted += 1
            fields = self._record_accepted(a)
            server.records.history_accept(a.queue_id, a.envelope, len(a.content), a.content, fields,
                                          classification=a.classification, disposition="Tag" if a.tagged else "Accept")
            # A big message is not kept in memory for its delivery: the queue reads it back.
            server.on_stored(a.queue_id, a.envelope, a.content if len(a.content) <= KEEP_FOR_DELIVERY else None)
            server.archive_copy(a.queue_id, a.envelope, a.content, self.sid)
            actions = self.session.message_stored(a.queue_id)
        self.waiting_for_us = False
        self.last_activity = time.monotonic()
        self._do(actions)

    def _record_accepted(self, a: StoreMessage, held: bool = False) -> dict[str, str]:
        """The accept line (and what the checks found); the header fields, parsed once."""
        env, c = a.envelope, self.client
        assert c is not None
        fields = header_fields(a.content)  # once, for the event line and the history
        self.server.records.record(ev.Accepted(
            env.mail_from, len(a.content), len(env.rcpts), c.proto, f"{c.name} [{c.ip}]", fields.get("message-id", ""),
            c.auth_user or "", held=held,
        ), a.queue_id, session=self.sid)
        self._record_findings(a)
        return fields

    async def _quarantine(self, a: StoreMessage) -> None:
        """A check asked for quarantine: the message goes to the quarantine store (durable
        before the 250, like the spool), not to the queue; `kanmon quarantine release`
        sends it on under the same queue id. Spam goes to the recipients' spam quarantine
        (digests), everything else to the administrator's."""
        server = self.server
        assert self.session is not None
        reason = log_safe(a.quarantine, 200)
        kind = "spam" if a.classification == "Spam" else "admin"
        meta = QuarantineMeta(kind, reason, a.quarantine_check or "", a.classification, a.score, server.clock())
        try:
            store = server.quarantine_store()
            await asyncio.get_running_loop().run_in_executor(None, store.put, a.queue_id, a.envelope, a.content, meta)
        except Exception as e:  # noqa: BLE001 - promise 7: 451, never an accept that was not kept
            server.records.record(ev.Error(f"warning: cannot quarantine: {type(e).__name__}: {e}; "
                                           f"answered {replies.STORAGE_ERROR}"), a.queue_id, session=self.sid)
            actions = self.session.message_failed(replies.STORAGE_ERROR)
        else:
            server.accepted += 1
            fields = self._record_accepted(a, held=True)
            server.records.record(ev.Quarantined(reason, kind), a.queue_id, session=self.sid)
            server.records.history_accept(a.queue_id, a.envelope, len(a.content), a.content, fields,
                                          classification=a.classification, disposition="Quarantine",
                                          status="Quarantined")
            server.archive_copy(a.queue_id, a.envelope, a.content, self.sid)
            actions = self.session.message_stored(a.queue_id)
        self.waiting_for_us = False
        self.last_activity = time.monotonic()
        self._do(actions)

    def _record_findings(self, a: StoreMessage) -> None:
        for f in a.findings:
            self.server.records.record(ev.RuleMatched(f.check, log_safe(f.rule, 100), f.action, log_safe(f.detail, 300),
                                                      f.log_only), a.queue_id, session=self.sid)

    def _discard(self, a: StoreMessage) -> None:
        """A check asked to discard the message: the client gets 250 (it must not retry,
        nor learn that the message went nowhere); the trace says where it went."""
        server = self.server
        assert self.session is not None
        fields = header_fields(a.content)
        server.records.record(ev.Discarded(log_safe(a.discard, 200)), a.queue_id, session=self.sid)
        self._record_findings(a)
        server.records.history_accept(a.queue_id, a.envelope, len(a.content), a.content, fields,
                                      classification=a.classification, disposition="Discard", status="Discarded")
        self.waiting_for_us = False
        self.last_activity = time.monotonic()
        self._do(self.session.message_stored(a.queue_id))

    async def _start_tls(self) -> None:
        server = self.server
        loop = asyncio.get_running_loop()
        assert self.session is not None and self.client is not None and server.tls_context is not None
        try:
            async with asyncio.timeout(server.handshake_timeout):
                transport = await loop.start_tls(self.transport, self, server.tls_context, server_side=True)
        except (OSError, ssl.SSLError, asyncio.TimeoutError, ConnectionError) as e:
            server.records.record(ev.TlsStarted(self.client.name, self.client.ip, error=str(e) or type(e).__name__),
                                  session=self.sid)
            if self.transport is not None:
                self.transport.close()
            self._closed = True
            return
        if transport is None:
            self._closed = True
            return
        self.transport = transport
        self._paused = False
        ssl_obj = transport.get_extra_info("ssl_object")
        version = ssl_obj.version() if ssl_obj else ""
        cipher, _proto, bits = ssl_obj.cipher() if ssl_obj else ("", "", 0)
        server.records.record(ev.TlsStarted(self.client.name, self.client.ip, version, cipher, bits), session=self.sid)
        self.waiting_for_us = False
        self._do(self.session.tls_started(version, cipher, bits))

    async def _authenticate(self, a: Authenticate) -> None:
        """Check credentials off the event loop (argon2 is slow on purpose), throttled."""
        server = self.server
        assert self.session is not None and self.client is not None
        c = self.client
        auth = server.auth
        user = log_safe(a.username)
        loop = asyncio.get_running_loop()
        # The throttle may count in the shared state (blocking on its disk): off the loop.
        if auth is None:
            actions = self.session.auth_result(None, replies.LOCAL_ERROR)
        # The attempt is reserved before the password is verified, so parallel logins count.
        elif await loop.run_in_executor(None, auth.throttle.reserve, c.ip, a.username) > 0:
            server.records.record(ev.AuthFailed(c.name, c.ip, a.mechanism, user, refused=True), session=self.sid)
            actions = self.session.auth_result(None, replies.AUTH_BLOCKED)
        else:
            try:
                ok = await loop.run_in_executor(None, auth.users.verify, a.username, a.password)
            except Exception as e:  # noqa: BLE001 - promise 7
                server.records.record(ev.Error(f"error checking credentials: {type(e).__name__}: {e}"), session=self.sid)
                ok = None
            if ok and not await loop.run_in_executor(None, auth.throttle.succeeded, c.ip, a.username):
                # Blocked while it was verified: even the right password waits.
                server.records.record(ev.AuthFailed(c.name, c.ip, a.mechanism, user, refused=True), session=self.sid)
                actions = self.session.auth_result(None, replies.AUTH_BLOCKED)
            elif ok:
                address = a.username.strip().lower()
                await loop.run_in_executor(None, auth.users.record_login, address, c.ip)
                server.records.record(ev.AuthSucceeded(c.name, c.ip, a.mechanism, address), session=self.sid)
                # From now on the client's profile is that of an authenticated client.
                actions = self.session.auth_result(address, profile=profile_for(c.ip, True, server.config))
            elif ok is None:  # the accounts cannot be read now: temporary, not a wrong password
                await loop.run_in_executor(None, auth.throttle.release, c.ip, a.username)
                actions = self.session.auth_result(None, replies.AUTH_TEMPORARY)
            else:
                failure = await loop.run_in_executor(None, auth.throttle.failed, c.ip, a.username)
                server.records.record(ev.AuthFailed(c.name, c.ip, a.mechanism, user, failure.key if failure.blocked else ""),
                                      session=self.sid)
                if failure.delay > 0 and not self._closed:
                    await asyncio.sleep(failure.delay)  # slow the guessing down
                actions = self.session.auth_result(None, replies.AUTH_BLOCKED if failure.blocked else None)
        self.waiting_for_us = False
        self.last_activity = time.monotonic()
        self._do(actions)
