"""Outbound session reuse end to end: the SMTP delivery agent and its session cache
(kanmon.deliver.scache) against real SMTP servers on 127.0.0.x (tests/support/smtpsink,
which counts connections), real TLS (trustme), MX answers from a dnslib server, and a
ManualClock for the idle and reuse limits."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
import trustme

from kanmon.clock import ManualClock
from kanmon.config import parse_config
from kanmon.deliver.mx import NextHop
from kanmon.deliver.scache import SessionKey
from kanmon.deliver.smtp import SmtpDelivery
from kanmon.model import Envelope, Status
from tests.support.dnsserver import DnsServer, dns_server  # noqa: F401  (fixture)
from tests.support.smtpsink import SmtpSink, tls_server_context

STORE = "127.0.0.61"
NAME = "store.corp.example"
BODY = b"From: a@corp.example\r\nTo: b@corp.example\r\nSubject: hi\r\n\r\nbody\r\n"
SENDER = "a@corp.example"


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def store():
    with SmtpSink(STORE, hostname="store.test") as s:
        yield s


def make_config(*, mx_port=25, dns: DnsServer | None = None, extra: str = "", data_timeout: str = "5s"):
    lines = [
        "[server]", 'hostname = "relay.kanmon.test"',
        "[smtp]", 'listen = ["127.0.0.8:2525"]',
        "[outbound]", f"mx_port = {mx_port}",
        'connect_timeout = "5s"', 'command_timeout = "5s"', f'data_timeout = "{data_timeout}"', extra,
    ]
    if dns is not None:
        lines += ["[dns]", f'servers = ["{dns.address}"]', 'timeout = "2s"']
    return parse_config("\n".join(lines))


class Log:
    def __init__(self):
        self.lines: list[tuple[str, str | None]] = []

    def __call__(self, event, queue_id: str | None) -> None:
        self.lines.append((str(event), queue_id))

    def text(self) -> str:
        return "\n".join(t for t, _ in self.lines)


def run(config, body, *, clock=None, log=None):
    """Run body(agent) with a fresh agent on `clock`, closing it afterwards."""
    log = log if log is not None else Log()

    async def go():
        agent = SmtpDelivery(config, log, clock=clock or ManualClock(1_000_000.0))
        try:
            return await body(agent)
        finally:
            await agent.close()

    return asyncio.run(go()), log


def to(sink: SmtpSink) -> list[NextHop]:
    return [NextHop.from_endpoint((sink.host, sink.port))]


async def send(agent, sink, n: int, tls="none", rcpt="u{n}@corp.example"):
    [result] = await agent.deliver(f"Q{n}", SENDER, [rcpt.format(n=n)], BODY, to(sink), tls)
    return result


async def settle(cond) -> None:
    """Wait until cond() holds: network I/O with the sink's thread (or a reaper woken by
    the ManualClock) has to happen first. Bounded; asserts nothing about time."""
    deadline = asyncio.get_running_loop().time() + 60  # generous: a loaded machine is slow, never wrong
    while asyncio.get_running_loop().time() < deadline:
        if cond():
            return
        await asyncio.sleep(0.005)
    assert cond()


# ---------------------------------------------------------------------------


def test_messages_to_one_destination_share_one_session(store):
    async def body(agent):
        return [await send(agent, store, n) for n in range(5)]

    results, log = run(make_config(), body)
    assert [r.status for r in results] == [Status.SENT] * 5
    # Each delivery still has its own reply (the server's queue id for it).
    assert [str(r.reply) for r in results] == [f"250 2.0.0 Ok: queued as 1.{n}" for n in range(1, 6)]
    assert all(r.relay == f"[{STORE}]:{store.port}" for r in results)
    assert store.connections == 1
    assert [m.rcpts for m in store.wait_for_messages(5)] == [[f"u{n}@corp.example"] for n in range(5)]
    assert store.commands.count("RSET") == 4 and store.commands.count("EHLO relay.kanmon.test") == 1
    assert "QUIT" in store.commands  # closed at agent.close()


def test_a_reused_session_is_reset_in_the_same_write_as_its_transaction(store):
    """RSET, MAIL, RCPT and DATA go as one pipelined group (RFC 2920): the sink holds its
    replies to RSET, MAIL and RCPT until DATA arrives, so a client that waited for the
    reply to RSET before sending MAIL would time out and open a second session."""
    store.require_pipelining = True

    async def body(agent):
        return [await send(agent, store, n) for n in range(3)], agent.cache

    (results, cache), log = run(make_config(), body)
    assert [r.status for r in results] == [Status.SENT] * 3
    assert store.connections == 1 and cache.reused == 2 and cache.dropped == 0
    assert [m.rcpts for m in store.wait_for_messages(3)] == [[f"u{n}@corp.example"] for n in range(3)]
    after_first = store.commands[store.commands.index("DATA") + 1 :]
    assert [c.split(":")[0] for c in after_first] == ["RSET", "MAIL FROM", "RCPT TO", "DATA"] * 2 + ["QUIT"]


def test_without_pipelining_a_reused_session_is_reset_on_its_own(store):
    store.pipelining = False

    async def body(agent):
        return [await send(agent, store, n) for n in range(3)], agent.cache

    (results, cache), _ = run(make_config(), body)
    assert [r.status for r in results] == [Status.SENT] * 3
    assert store.connections == 1 and cache.reused == 2
    assert store.commands.count("RSET") == 2


def test_relay_route_to_the_mail_store_reuses_its_session(store):
    route = SimpleNamespace(transport="relay", domain="corp.example", hops=((store.host, store.port),), tls="none")

    async def body(agent):
        out = []
        for n in range(3):
            out += await agent.deliver_route(f"Q{n}", Envelope(SENDER), [f"u{n}@corp.example"], BODY, route)
        return out

    results, _ = run(make_config(), body)
    assert [r.status for r in results] == [Status.SENT] * 3
    assert store.connections == 1


def test_mx_delivery_reuses_the_session_to_the_mx_host(dns_server):
    with SmtpSink("127.0.0.62", hostname="mx.dest.example") as mx:
        dns_server.set_records(records={"dest.example": ["MX 10 mx.dest.example."], "mx.dest.example": ["A 127.0.0.62"]})
        config = make_config(mx_port=mx.port, dns=dns_server)
        route = SimpleNamespace(transport="mx", domain="dest.example", hops=(), tls="opportunistic")

        async def body(agent):
            out = []
            for n in range(3):
                out += await agent.deliver_route(f"Q{n}", Envelope(SENDER), [f"u{n}@dest.example"], BODY, route)
            return out

        results, _ = run(config, body)
        assert [r.status for r in results] == [Status.SENT] * 3
        assert mx.connections == 1 and len(mx.wait_for_messages(3)) == 3


def test_the_idle_limit_closes_a_cached_session():
    clock = ManualClock(1_000_000.0)
    with SmtpSink(STORE) as store:
        async def body(agent):
            await send(agent, store, 0)
            assert agent.cache.idle_count() == 1
            clock.advance(1.9)  # connection_cache_time is 2 s
            await asyncio.sleep(0)
            assert agent.cache.idle_count() == 1
            await send(agent, store, 1)  # reused: the idle time starts again
            clock.advance(1.9)
            await asyncio.sleep(0)
            assert agent.cache.idle_count() == 1
            clock.advance(0.2)
            await settle(lambda: agent.cache.idle_count() == 0)
            assert agent.cache.expired == 1
            await send(agent, store, 2)
            return agent.cache

        cache, _ = run(make_config(), body, clock=clock)
        assert store.connections == 2 and cache.opened == 2 and cache.reused == 1
        assert store.wait_for_messages(3)[2].connection == 2
        assert store.commands.count("QUIT") == 2  # the idle one, then the one left at close


def test_the_reuse_time_and_count_limits_end_a_session():
    clock = ManualClock(1_000_000.0)
    with SmtpSink(STORE) as store:
        async def body(agent):
            for n in range(4):  # 1.5 s apart: never idle too long, but 4.5 s > reuse time 3 s
                await send(agent, store, n)
                clock.advance(1.5)
                await asyncio.sleep(0)

        run(make_config(extra='connection_reuse_time = "3s"'), body, clock=clock)
        assert [m.connection for m in store.wait_for_messages(4)] == [1, 1, 2, 2]

    with SmtpSink(STORE) as store:
        async def body(agent):
            for n in range(5):
                await send(agent, store, n)

        run(make_config(extra="connection_reuse_count = 2"), body)
        assert [m.connection for m in store.wait_for_messages(5)] == [1, 1, 2, 2, 3]


def test_a_session_the_server_closed_while_cached_is_replaced_silently(store):
    async def body(agent):
        first = await send(agent, store, 0)
        await asyncio.to_thread(store.drop_connections)  # the server ends the idle session
        second = await send(agent, store, 1)
        return [first, second], agent.cache

    (results, cache), log = run(make_config(), body)
    assert [r.status for r in results] == [Status.SENT, Status.SENT]
    assert store.connections == 2 and cache.dropped == 1
    assert [m.rcpts for m in store.wait_for_messages(2)] == [["u0@corp.example"], ["u1@corp.example"]]  # each once
    assert "relay=" not in log.text()  # no failed try recorded


@pytest.mark.parametrize("refusal", ["421 4.3.2 Service shutting down", "502 5.5.2 RSET not implemented"])
def test_a_refused_rset_means_a_fresh_session(store, refusal):
    async def body(agent):
        first = await send(agent, store, 0)
        store.rset_reply = refusal
        second = await send(agent, store, 1)
        return [first, second], agent.cache

    (results, cache), log = run(make_config(), body)
    assert [r.status for r in results] == [Status.SENT, Status.SENT]
    assert store.connections == 2 and cache.dropped == 1
    assert [m.connection for m in store.wait_for_messages(2)] == [1, 2]  # the refused session took nothing
    assert "relay=" not in log.text()


def test_a_cached_session_lost_before_the_message_is_retried_on_a_fresh_one(store):
    store.drop = "after-rset"  # RSET answered, then the server is gone: MAIL meets a closed connection

    async def body(agent):
        return [await send(agent, store, n) for n in range(3)], agent.cache

    (results, cache), log = run(make_config(), body)
    assert [r.status for r in results] == [Status.SENT] * 3
    assert [m.connection for m in store.wait_for_messages(3)] == [1, 2, 3]
    assert cache.reused == 2 and "relay=" not in log.text()


def test_a_421_to_mail_on_a_cached_session_is_retried_on_a_fresh_one(store):
    store.max_transactions = 1  # the server takes one message per connection, then 421 at MAIL

    async def body(agent):
        return [await send(agent, store, n) for n in range(3)]

    results, log = run(make_config(), body)
    assert [r.status for r in results] == [Status.SENT] * 3
    assert [m.connection for m in store.wait_for_messages(3)] == [1, 2, 3]
    assert "relay=" not in log.text() and "421" not in log.text()


def test_a_session_left_in_doubt_is_not_reused(store):
    async def body(agent):
        store.data_reply = "421 4.3.0 closing"  # the server ends the session after the dot
        first = await send(agent, store, 0)
        store.data_reply = "250 2.0.0 Ok: queued as {n}"
        second = await send(agent, store, 1)
        return [first, second], agent.cache

    (results, cache), _ = run(make_config(), body)
    assert results[0].status is Status.DEFERRED and results[0].reply.code == 421
    assert results[1].status is Status.SENT
    assert store.connections == 2 and cache.reused == 0


def test_a_lost_final_reply_is_not_retried_and_its_session_not_reused(store):
    async def body(agent):
        store.hang = "data-end"
        first = await send(agent, store, 0)
        store.hang = None
        second = await send(agent, store, 1)
        return [first, second]

    config = make_config(data_timeout="0.3s")
    results, _ = run(config, body)
    assert results[0].status is Status.DEFERRED and "after end of data" in results[0].reply.text
    assert results[1].status is Status.SENT
    assert store.connections == 2
    assert len(store.wait_for_messages(2)) == 2  # the first arrived (at-least-once), never sent twice by us


def test_tls_policy_and_helo_name_make_different_sessions(ca):
    with SmtpSink(STORE, ssl_context=tls_server_context(ca, NAME, STORE)) as store:
        async def body(agent):
            out = [await send(agent, store, 0, tls="none"), await send(agent, store, 1, tls="opportunistic"),
                   await send(agent, store, 2, tls="none"), await send(agent, store, 3, tls="opportunistic")]
            return out

        results, _ = run(make_config(), body)
        assert [r.status for r in results] == [Status.SENT] * 4
        assert [bool(r.tls) for r in results] == [False, True, False, True]
        assert store.connections == 2
        assert [m.connection for m in store.wait_for_messages(4)] == [1, 2, 1, 2]
        assert [m.tls for m in store.messages] == [False, True, False, True]

    with SmtpSink(STORE) as store:
        async def two_names():
            clock = ManualClock(1_000_000.0)
            one = SmtpDelivery(make_config(), Log(), clock=clock)
            other_config = parse_config('[server]\nhostname = "other.kanmon.test"\n[smtp]\nlisten = ["127.0.0.8:2525"]')
            other = SmtpDelivery(other_config, Log(), cache=one.cache)  # one cache, two HELO names
            try:
                for n in range(2):
                    await send(one, store, n)
                    await send(other, store, 10 + n)
            finally:
                await one.close()

        asyncio.run(two_names())
        assert store.connections == 2
        assert [(m.helo, m.connection) for m in store.wait_for_messages(4)] == [
            ("relay.kanmon.test", 1), ("other.kanmon.test", 2), ("relay.kanmon.test", 1), ("other.kanmon.test", 2)]


def test_max_per_destination_bounds_sessions_under_concurrency(store):
    async def body(agent):
        return await asyncio.gather(*(send(agent, store, n) for n in range(10)))

    results, _ = run(make_config(extra="max_per_destination = 2"), body)
    assert [r.status for r in results] == [Status.SENT] * 10
    assert store.connections == 2 and store.max_open == 2
    assert len(store.wait_for_messages(10)) == 10


def test_cached_sessions_end_at_a_reload_and_at_stop(store):
    async def body(agent):
        await send(agent, store, 0)
        agent.flush_sessions()  # what the node does at a reload
        await settle(lambda: store.commands.count("QUIT") == 1)
        await send(agent, store, 1)
        assert agent.cache.idle_count() == 1
        return agent

    agent, _ = run(make_config(), body)
    assert store.connections == 2
    assert agent.cache.idle_count() == 0 and store.commands.count("QUIT") == 2  # close() at stop


def test_a_retired_cache_closes_sessions_as_they_come_back(store):
    async def body(agent):
        key = SessionKey(store.host, store.port, NAME, "none", helo="relay.kanmon.test")
        async with agent.cache.session(key) as conn:
            agent.flush_sessions(retire=True)  # the agent is replaced at a reload meanwhile
            await conn.send_message(SENDER, ["u0@corp.example"], BODY)
        assert agent.cache.idle_count() == 0
        await settle(lambda: store.commands[-1:] == ["QUIT"])

    run(make_config(), body)
    assert store.connections == 1 and len(store.wait_for_messages(1)) == 1


def test_connection_cache_off_closes_each_session(store):
    async def body(agent):
        return [await send(agent, store, n) for n in range(3)]

    results, _ = run(make_config(extra="connection_cache = false"), body)
    assert [r.status for r in results] == [Status.SENT] * 3
    assert store.connections == 3 and store.commands.count("QUIT") == 3
