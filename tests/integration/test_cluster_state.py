"""Two relays sharing their state in one PostgreSQL (the tests' own server): each relay
runs the standard checks over real sockets with its own PostgresState (its own
connections, its own node name); a greylisted triplet retried on the other relay passes,
a sender's rate counts on both, a verification result learned on one is known to the
other, and a node's start forgets only its own connection gauges."""

from __future__ import annotations

import asyncio

from kanmon.state.api import Triplet
from kanmon.state.postgresql import PostgresState
from tests.integration.test_dnsbl_greylist import Clock, Harness
from tests.support.dnsserver import dns_server  # noqa: F401 - fixture


def two_states(url: str) -> tuple[PostgresState, PostgresState]:
    return PostgresState(url, "mr1"), PostgresState(url, "mr2")


def test_a_triplet_greylisted_on_one_relay_passes_on_the_other(tmp_path, dns_server, pg_url):
    mr1_state, mr2_state = two_states(pg_url)

    async def main() -> None:
        clock = Clock()
        async with Harness(tmp_path / "mr1", dns_server, profile="greylist = true", state=mr1_state, clock=clock) as mr1, \
                Harness(tmp_path / "mr2", dns_server, profile="greylist = true", state=mr2_state, clock=clock) as mr2:
            assert [r[:3] for r in await mr1.rcpts("alice@example.test")] == ["451"]
            assert [r[:3] for r in await mr2.rcpts("alice@example.test")] == ["451"]  # too early on either
            clock.now += 301
            assert [r[:3] for r in await mr2.rcpts("alice@example.test")] == ["250"]  # the retry, on the other relay
            assert [r[:3] for r in await mr1.rcpts("alice@example.test")] == ["250"]  # and remembered by both
            (state,) = mr1_state.greylist.list()
            assert state.passed is not None and state.attempts >= 3

    for d in ("mr1", "mr2"):
        (tmp_path / d).mkdir()
    try:
        asyncio.run(main())
    finally:
        mr1_state.close()
        mr2_state.close()


def test_a_sender_cannot_double_its_rate_by_alternating_relays(tmp_path, dns_server, pg_url):
    mr1_state, mr2_state = two_states(pg_url)

    async def send(h: Harness) -> str:
        c = await h.session()
        reply = await c.command(b"RCPT TO:<alice@example.test>\r\n")
        if reply.startswith("250"):
            assert (await c.command(b"DATA\r\n")).startswith("354")
            reply = await c.command(b"Subject: hi\r\n\r\nhello\r\n.\r\n")
        await c.close()
        return reply

    async def mail_reply(h: Harness) -> str:
        from tests.integration.test_smtp_checks import Client

        host, port = h.server.addresses()[0]
        c = Client(*await asyncio.open_connection(host, port))
        assert (await c.reply()).startswith("220")
        assert (await c.command(b"EHLO client.example\r\n")).startswith("250")
        reply = await c.command(b"MAIL FROM:<x@remote.example>\r\n")
        await c.close()
        return reply

    async def main() -> None:
        clock = Clock()
        async with Harness(tmp_path / "mr1", dns_server, profile="messages_per_hour = 2", state=mr1_state,
                           clock=clock) as mr1, \
                Harness(tmp_path / "mr2", dns_server, profile="messages_per_hour = 2", state=mr2_state,
                        clock=clock) as mr2:
            assert (await send(mr1)).startswith("250 2.0.0")
            assert (await send(mr2)).startswith("250 2.0.0")
            refused = await mail_reply(mr1)
            assert refused.startswith("451 4.7.1") and "rate limit" in refused
            assert (await mail_reply(mr2)).startswith("451 4.7.1")

    for d in ("mr1", "mr2"):
        (tmp_path / d).mkdir()
    try:
        asyncio.run(main())
    finally:
        mr1_state.close()
        mr2_state.close()


def test_verification_results_are_shared_and_gauges_are_per_node(pg_url):
    mr1, mr2 = two_states(pg_url)
    try:
        mr1.cache("verify").put("bob@example.test", "550 5.1.1 no such user", 600, 1000.0)
        assert mr2.cache("verify").get("bob@example.test", 1001.0).value == "550 5.1.1 no such user"
        assert mr2.cache("other").get("bob@example.test", 1001.0) is None
        assert mr1.gauges.acquire("ip:192.0.2.1", "1234", 0) == 1
        assert mr2.gauges.acquire("ip:192.0.2.1", "1234", 0) == 2  # the same pid on another node: another owner
        mr2.gauges.clear()  # mr2 restarts: mr1's sessions are still open
        assert mr1.gauges.count("ip:192.0.2.1") == 1
        t = Triplet("192.0.2.0/24", "a@x.example", "b@y.example")
        mr1.greylist.mark_passed(t, 10.0)
        mr2.greylist.mark_passed(t, 11.0)  # already passed: counted once for the cluster
        assert mr2.greylist.client_passes("192.0.2.0/24") == 1
    finally:
        mr1.close()
        mr2.close()


def test_a_node_starts_while_the_database_is_down_and_its_state_works_once_it_is_back(private_pg):
    import psycopg
    import pytest

    url = private_pg.create_database()
    private_pg.stop()
    state = PostgresState(url, "mr1")  # never connects here: the node starts
    try:
        with pytest.raises(psycopg.OperationalError):
            state.counters.hit("ip:192.0.2.1", 3600, 1000.0)
        private_pg.start()
        assert state.counters.hit("ip:192.0.2.1", 3600, 1000.0) == 1
        private_pg.stop()  # lost again: the broken connection is dropped...
        with pytest.raises(psycopg.OperationalError):
            state.counters.hit("ip:192.0.2.1", 3600, 1000.0)
        private_pg.start()  # ...and the next call connects again
        assert state.counters.hit("ip:192.0.2.1", 3600, 1001.0) == 2
    finally:
        state.close()
