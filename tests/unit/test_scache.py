"""The outbound session cache's bookkeeping (kanmon.deliver.scache) with stand-in
sessions: which key reuses what, the bounds per destination and in all, the limits on
a ManualClock. The real sessions are in tests/integration/test_scache.py."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from kanmon.clock import ManualClock
from kanmon.deliver.scache import CacheLimits, SessionCache, SessionKey
from kanmon.smtp.client import ClientSettings

SETTINGS = ClientSettings(hostname="relay.kanmon.test", connect_timeout=0.5)
KEY = SessionKey("192.0.2.7", 25, "store.corp.example", "opportunistic", "", "relay.kanmon.test", "", "")


class FakeSession:
    """What the cache uses of an SmtpConnection."""

    def __init__(self, key: SessionKey, settings: ClientSettings):
        self.key = key
        self.settings = settings
        self.usable = True
        self.transactions = 0
        self.rset_ok = True
        self.closed = ""  # "quit" | "close" | "abort"
        self.pipelining = False  # True: RSET is left to the next transaction (reset_pending)
        self.reset_pending = False

    def supports(self, keyword: str) -> bool:
        return keyword == "PIPELINING" and self.pipelining

    async def reset(self) -> bool:
        return self.rset_ok and not self.closed

    async def quit(self) -> None:
        self.closed = self.closed or "quit"

    def close_nowait(self) -> None:
        self.closed = self.closed or "close"

    def abort(self) -> None:
        self.closed = self.closed or "abort"


def make_cache(clock=None, **limits):
    opened: list[FakeSession] = []

    async def opener(key, settings):
        s = FakeSession(key, settings)
        opened.append(s)
        return s

    return SessionCache(SETTINGS, CacheLimits(**limits), clock=clock or ManualClock(1000.0), opener=opener), opened


async def use(cache, key=KEY, **kw):
    lease = cache.session(key, **kw)
    async with lease as conn:
        conn.transactions += 1
    return conn, lease.reused


def test_each_field_of_the_key_makes_a_different_session():
    variants = [
        dataclasses.replace(KEY, address="192.0.2.8"), dataclasses.replace(KEY, port=587),
        dataclasses.replace(KEY, server_name="other.corp.example"), dataclasses.replace(KEY, tls="verify"),
        dataclasses.replace(KEY, security="dest.example|mta-sts|MTA-STS policy of dest.example|enforce"),
        dataclasses.replace(KEY, helo="other.kanmon.test"), dataclasses.replace(KEY, source_address="192.0.2.1"),
        dataclasses.replace(KEY, auth="relay-user"),
    ]

    async def go():
        cache, opened = make_cache()
        first, _ = await use(cache)
        for key in variants:
            conn, reused = await use(cache, key)
            assert not reused and conn is not first
        conn, reused = await use(cache)
        assert reused and conn is first
        return cache, opened

    cache, opened = asyncio.run(go())
    assert len(opened) == 1 + len(variants)
    # The session is opened as its key says (HELO name and source address).
    helo = next(s for s in opened if s.key.helo == "other.kanmon.test")
    assert helo.settings.hostname == "other.kanmon.test"
    src = next(s for s in opened if s.key.source_address == "192.0.2.1")
    assert src.settings.bind_address == "192.0.2.1" and src.settings.hostname == "relay.kanmon.test"


def test_the_idle_sessions_in_all_are_bounded_longest_idle_first():
    clock = ManualClock(1000.0)

    async def go():
        cache, opened = make_cache(clock, size=2)
        for n in range(3):
            await use(cache, dataclasses.replace(KEY, address=f"192.0.2.{n + 1}"))
            clock.advance(0.1)
        return cache, opened

    cache, opened = asyncio.run(go())
    assert cache.idle_count() == 2
    assert [s.closed for s in opened] == ["close", "", ""]


def test_a_full_destination_closes_an_idle_session_of_another_kind_to_make_room():
    async def go():
        cache, opened = make_cache(per_destination=1)
        await use(cache)
        conn, reused = await use(cache, dataclasses.replace(KEY, tls="none"))  # same address and port
        return opened, reused

    opened, reused = asyncio.run(go())
    assert not reused and [s.closed for s in opened] == ["close", ""]


def test_a_full_destination_makes_the_next_delivery_wait_then_reuse():
    async def go():
        cache, opened = make_cache(per_destination=1)
        lease = cache.session(KEY)
        async with lease:
            waiting = asyncio.ensure_future(use(cache))
            await asyncio.sleep(0)
            assert not waiting.done() and len(opened) == 1
        conn, reused = await waiting
        return opened, reused

    opened, reused = asyncio.run(go())
    assert reused and len(opened) == 1


def test_a_full_destination_gives_up_after_the_connect_timeout():
    async def go():
        cache, _ = make_cache(per_destination=1)
        async with cache.session(KEY):
            with pytest.raises(Exception) as info:
                await use(cache)
        return info.value

    error = asyncio.run(go())
    assert error.reply.enhanced == "4.4.5" and "too many connections" in error.reply.text


def test_an_exception_in_use_aborts_the_session_and_frees_its_place():
    async def go():
        cache, opened = make_cache(per_destination=1)
        with pytest.raises(RuntimeError):
            async with cache.session(KEY):
                raise RuntimeError("in doubt")
        conn, reused = await use(cache)
        return cache, opened, reused

    cache, opened, reused = asyncio.run(go())
    assert opened[0].closed == "abort" and not reused and cache.idle_count() == 1
    assert cache._destinations[(KEY.address, KEY.port)].busy == 0


def test_a_dead_cached_session_is_dropped_and_a_fresh_one_opened():
    async def go():
        cache, opened = make_cache()
        first, _ = await use(cache)
        first.rset_ok = False
        second, reused = await use(cache)
        return cache, opened, reused

    cache, opened, reused = asyncio.run(go())
    assert not reused and len(opened) == 2 and cache.dropped == 1 and opened[0].closed == "abort"


def test_fresh_never_takes_a_cached_session():
    async def go():
        cache, opened = make_cache()
        await use(cache)
        _, reused = await use(cache, fresh=True)
        return cache, opened, reused

    cache, opened, reused = asyncio.run(go())
    assert not reused and len(opened) == 2 and cache.idle_count() == 2


def test_an_unusable_session_is_not_cached():
    async def go():
        cache, opened = make_cache()
        async with cache.session(KEY) as conn:
            conn.usable = False  # a 421, say
        return cache, opened

    cache, opened = asyncio.run(go())
    assert cache.idle_count() == 0 and opened[0].closed == "quit" and cache._destinations == {}


def test_the_reaper_closes_at_the_idle_limit_and_close_ends_the_rest():
    clock = ManualClock(1000.0)

    async def go():
        cache, opened = make_cache(clock, idle=2.0)
        await use(cache)
        clock.advance(1.0)
        await use(cache, dataclasses.replace(KEY, port=26))
        clock.advance(1.0)  # the first is 2 s idle, the second 1 s
        for _ in range(5):
            await asyncio.sleep(0)
        states = [s.closed for s in opened]
        await cache.close()
        return states, [s.closed for s in opened], cache

    states, after, cache = asyncio.run(go())
    assert states == ["close", ""] and after == ["close", "quit"] and cache.expired == 1


def test_limits_must_be_positive():
    with pytest.raises(ValueError):
        SessionCache(SETTINGS, CacheLimits(per_destination=0))
