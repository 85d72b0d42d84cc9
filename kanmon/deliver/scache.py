"""Outbound session cache: an SMTP session stays open after a delivery for the next
message to the same next hop (like Postfix's scache with smtp_connection_cache_on_demand).

Role: hand the SMTP delivery agent (kanmon.deliver.smtp) an open, greeted session for a
SessionKey — a cached one, reset with RSET, or a new one — and take it back after
the transaction. A session is cached only when it is in a known state: the last
transaction ended with a reply (no half-sent message, no 421, no timeout), it has been
used fewer than `reuse_count` times and it was opened less than `reuse_time` ago. Cached
sessions are closed with QUIT after `idle` seconds unused (on the clock the cache is
given, so tests advance time), when the cache is flushed (reload) and when it is closed
(stop).

Bounds: at most `per_destination` sessions (busy and idle, of every key) to one next-hop
address and port — `[outbound] max_per_destination`; more callers wait for one, at most
connect_timeout. At most `size` idle sessions in all: caching one more closes the one
idle longest. The cache belongs to one process (one delivery agent); nothing in it is
shared across processes, and it needs nothing but the settings and the clock it is given.

A SessionKey holds everything that makes two sessions different: next-hop address and
port, the name TLS is verified for, the TLS policy the session was opened with, the
transport security decision (MX delivery: policy domain, source and description of the
requirement), the HELO name, the source address, and the AUTH identity. A session is
only ever reused for exactly the same key.

Trusts: the caller's key and settings. Does not trust a cached session: one the server
has closed is dropped when it is taken; every reuse starts with RSET (with PIPELINING in
the same write as the transaction's MAIL, RCPT and DATA, so it costs no round trip of
its own: the client's reset_pending), and the caller retries on a fresh session when a
reused one refuses RSET or turns out dead before the message was sent (kanmon.deliver.smtp).

Never: reuse a session whose last transaction is in doubt, keep a session past its
limits, exceed the per-destination bound, or wait on the network without a timeout.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from kanmon.clock import SystemClock
from kanmon.model import LocalReply
from kanmon.smtp.client import ClientSettings, ConnectFailed, SmtpConnection, open_connection

if TYPE_CHECKING:
    from kanmon.clock import ManualClock
    from kanmon.config import Config

    Clock = SystemClock | ManualClock

# Opens a new session for a key (tests replace it to count or to fail).
Opener = Callable[["SessionKey", ClientSettings], Awaitable[SmtpConnection]]


@dataclass(frozen=True, slots=True)
class SessionKey:
    """What makes a session fit for a delivery; sessions are reused only for an equal key."""

    address: str
    port: int
    server_name: str  # the name TLS is verified for and the relay is logged as
    tls: str  # the client TLS policy the session was opened with (kanmon.smtp.client)
    security: str = ""  # MX delivery: "domain|source|description|enforce" of the requirement
    helo: str = ""  # the EHLO/HELO name
    source_address: str = ""  # the local address the connection leaves from ("": any)
    auth: str = ""  # the AUTH identity ("": none; outbound AUTH is not implemented)


@dataclass(frozen=True, slots=True)
class CacheLimits:
    """The cache's bounds ([outbound] connection_cache_*; Postfix smtp_connection_*)."""

    enabled: bool = True  # False: every session is closed after its delivery
    idle: float = 2.0  # seconds a cached session waits for its next message
    reuse_time: float = 300.0  # seconds after opening a session is no longer reused
    reuse_count: int = 100  # transactions per session
    per_destination: int = 20  # sessions (busy and idle) per next-hop address:port
    size: int = 100  # idle sessions in all

    @classmethod
    def from_config(cls, config: Config) -> CacheLimits:
        out = config.outbound
        return cls(
            enabled=out.connection_cache,
            idle=out.connection_cache_time,
            reuse_time=out.connection_reuse_time,
            reuse_count=out.connection_reuse_count,
            per_destination=out.max_per_destination,
            size=out.connection_cache_size,
        )


@dataclass(slots=True, eq=False)
class _Session:
    conn: SmtpConnection
    key: SessionKey
    opened: float  # clock time
    idle_since: float = 0.0


@dataclass(slots=True)
class _Destination:
    idle: list[_Session] = field(default_factory=list)  # most recently used last
    busy: int = 0


def _settings_for(key: SessionKey, settings: ClientSettings) -> ClientSettings:
    """The key's HELO name and source address win over the cache's settings."""
    helo = key.helo or settings.hostname
    source = key.source_address or None
    if helo == settings.hostname and source == settings.bind_address:
        return settings
    return replace(settings, hostname=helo, bind_address=source)


async def _open(key: SessionKey, settings: ClientSettings) -> SmtpConnection:
    return await open_connection(key.address, key.port, server_name=key.server_name,
                                 policy=key.tls, settings=settings)  # type: ignore[arg-type]


class SessionCache:
    """Sessions by SessionKey, bounded per destination and in all.

    `async with cache.session(key) as conn:` gives a session; `lease.reused` says whether it
    came from the cache. Leaving the block normally returns it (cached when fit); leaving it
    with an exception closes it. `fresh=True` never takes a cached session (the retry after
    a reused one turned out dead).
    """

    def __init__(
        self,
        settings: ClientSettings,
        limits: CacheLimits | None = None,
        *,
        clock: Clock | None = None,
        opener: Opener = _open,
    ):
        self.limits = limits or CacheLimits()
        if self.limits.per_destination < 1 or self.limits.size < 0 or self.limits.reuse_count < 1:
            raise ValueError("cache limits must be positive")
        self.settings = settings
        self.clock = clock or SystemClock()
        self._opener = opener
        self._destinations: dict[tuple[str, int], _Destination] = {}
        self._idle: dict[int, _Session] = {}  # every idle session, longest idle first
        self._busy: dict[int, _Session] = {}  # by id(conn)
        self._changed: asyncio.Condition | None = None
        self._reaper: asyncio.Task[None] | None = None
        self._closed = False
        # counters (tests, stats)
        self.opened = 0  # sessions opened
        self.reused = 0  # deliveries that took a cached session
        self.dropped = 0  # cached sessions found dead at reuse (closed, RSET refused, lost before the message)
        self.expired = 0  # cached sessions closed at their idle, time or count limit

    # -- the caller's side

    def session(self, key: SessionKey, *, fresh: bool = False) -> Lease:
        return Lease(self, key, fresh)

    def idle_count(self) -> int:
        return len(self._idle)

    def flush_nowait(self, *, retire: bool = False) -> None:
        """Close every idle session now (QUIT without waiting). For a reload: new settings,
        new sessions. retire: sessions in use are closed when they come back, none is
        cached any more (the cache's owner is being replaced)."""
        if retire:
            self._closed = True
        for s in list(self._idle.values()):
            self._remove_idle(s)
            s.conn.close_nowait()

    async def close(self) -> None:
        """QUIT every idle session; sessions in use are closed when they come back."""
        self._closed = True
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None
        idle = list(self._idle.values())
        for s in idle:
            self._remove_idle(s)
        await asyncio.gather(*(s.conn.quit() for s in idle))

    # -- acquiring

    def _dest(self, key: SessionKey) -> _Destination:
        d = self._destinations.get((key.address, key.port))
        if d is None:
            d = self._destinations[(key.address, key.port)] = _Destination()
        return d

    def _condition(self) -> asyncio.Condition:
        if self._changed is None:
            self._changed = asyncio.Condition()
        return self._changed

    def _fit(self, s: _Session, now: float) -> bool:
        return (
            now - s.idle_since < self.limits.idle
            and now - s.opened < self.limits.reuse_time
            and s.conn.transactions < self.limits.reuse_count
        )

    async def _acquire(self, key: SessionKey, fresh: bool) -> tuple[SmtpConnection, bool]:
        """(session, reused)."""
        while True:
            dest = self._dest(key)  # looked up again after every await: it may have been tidied away
            cached = None if fresh else self._take_idle(dest, key)
            if cached is not None:
                dest = self._dest(key)  # taking the last idle session may have tidied it away
                dest.busy += 1
                self._busy[id(cached.conn)] = cached
                conn = cached.conn
                if conn.usable and conn.supports("PIPELINING"):
                    conn.reset_pending = True  # RFC 5321 4.1.1.5, sent with the next MAIL
                    self.reused += 1
                    return conn, True
                if await conn.reset():  # RFC 5321 4.1.1.5: a clean slate, and alive
                    self.reused += 1
                    return conn, True
                # Closed while idle (EOF, 421, broken pipe): drop it, look again.
                self.dropped += 1
                self._busy.pop(id(cached.conn), None)
                dest.busy -= 1
                self._tidy(key)
                cached.conn.abort()
                await self._notify()
                continue
            if dest.busy + len(dest.idle) < self.limits.per_destination:
                break
            if dest.idle:
                # Full of idle sessions of other keys (or fresh asked for): make room.
                s = dest.idle[0]
                self._remove_idle(s)
                s.conn.close_nowait()
                continue
            await self._wait_for_room(key)
        dest.busy += 1
        try:
            conn = await self._opener(key, _settings_for(key, self.settings))
        except BaseException:
            dest.busy -= 1
            self._tidy(key)
            await self._notify()
            raise
        self.opened += 1
        self._busy[id(conn)] = _Session(conn, key, self.clock.now())
        return conn, False

    def _take_idle(self, dest: _Destination, key: SessionKey) -> _Session | None:
        now = self.clock.now()
        for i in range(len(dest.idle) - 1, -1, -1):  # most recently used first
            s = dest.idle[i]
            if s.key != key:
                continue
            self._remove_idle(s)
            if self._fit(s, now):
                return s
            self.expired += 1  # past a limit the reaper has not reached yet
            s.conn.close_nowait()
        return None

    async def _wait_for_room(self, key: SessionKey) -> None:
        cond = self._condition()
        try:
            async with asyncio.timeout(self.settings.connect_timeout):
                async with cond:
                    await cond.wait()
        except TimeoutError:
            raise ConnectFailed(
                LocalReply(451, "4.4.5", f"too many connections to {key.address}:{key.port} already")
            ) from None

    async def _notify(self) -> None:
        cond = self._condition()
        async with cond:
            cond.notify_all()

    # -- giving back

    async def _release(self, conn: SmtpConnection) -> None:
        s = self._busy.pop(id(conn), None)
        if s is None:
            return
        dest = self._dest(s.key)
        dest.busy -= 1
        now = self.clock.now()
        s.idle_since = now
        keep = (
            self.limits.enabled and not self._closed and self.limits.size > 0
            and conn.usable and self._fit(s, now)
        )
        if keep:
            while len(self._idle) >= self.limits.size:
                oldest = next(iter(self._idle.values()))
                self._remove_idle(oldest)
                oldest.conn.close_nowait()
            dest.idle.append(s)
            self._idle[id(conn)] = s
            self._start_reaper()
        else:
            self._tidy(s.key)
            await conn.quit()
        await self._notify()

    def _discard(self, conn: SmtpConnection) -> None:
        """A session whose last exchange is in doubt: cut at once (no QUIT: it could land
        in the middle of a message), never cached."""
        s = self._busy.pop(id(conn), None)
        conn.abort()
        if s is not None:
            self._dest(s.key).busy -= 1
            self._tidy(s.key)

    def _remove_idle(self, s: _Session) -> None:
        self._idle.pop(id(s.conn), None)
        dest = self._destinations.get((s.key.address, s.key.port))
        if dest is not None and s in dest.idle:
            dest.idle.remove(s)
            self._tidy(s.key)

    def _tidy(self, key: SessionKey) -> None:
        """Forget a destination with no session (no growth per next hop ever used)."""
        dest = self._destinations.get((key.address, key.port))
        if dest is not None and not dest.idle and dest.busy <= 0:
            del self._destinations[(key.address, key.port)]

    # -- the idle limit

    def _start_reaper(self) -> None:
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.get_running_loop().create_task(self._reap())

    async def _reap(self) -> None:
        """Close idle sessions as their idle time runs out (or reuse time, whichever first)."""
        while self._idle:
            first = next(iter(self._idle.values()))
            due = min(first.idle_since + self.limits.idle, first.opened + self.limits.reuse_time)
            for s in self._idle.values():  # an older session may reach reuse_time sooner
                due = min(due, s.opened + self.limits.reuse_time)
            await self.clock.sleep_until(due)
            now = self.clock.now()
            for s in list(self._idle.values()):
                if not self._fit(s, now):
                    self.expired += 1
                    self._remove_idle(s)
                    s.conn.close_nowait()
        self._reaper = None


class Lease:
    """`async with cache.session(key) as conn` — given back on a normal exit, closed on an
    exception. `reused`: the session came from the cache."""

    def __init__(self, cache: SessionCache, key: SessionKey, fresh: bool):
        self._cache = cache
        self.key = key
        self._fresh = fresh
        self._conn: SmtpConnection | None = None
        self.reused = False

    async def __aenter__(self) -> SmtpConnection:
        self._conn, self.reused = await self._cache._acquire(self.key, self._fresh)
        return self._conn

    async def __aexit__(self, exc_type, exc, tb) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if exc_type is None:
            await self._cache._release(conn)
        else:
            self._cache._discard(conn)
            await self._cache._notify()


__all__ = ["CacheLimits", "Lease", "SessionCache", "SessionKey"]
