"""The balancer's decisions (kanmon/balancer/pool.py) without sockets: rise/fall, tiers
and their events, each method's order, max_connections. Pure: no I/O, no clock.
(It lives beside the balancer's integration tests; it needs nothing from them.)"""

from __future__ import annotations

import collections

from hypothesis import given
from hypothesis import strategies as st

from kanmon.balancer.pool import Pool
from kanmon.config import VirtualServer


def pool(method: str = "first-alive", reals: list[dict] | None = None, **health: object) -> Pool:
    reals = reals if reals is not None else [{"address": "127.0.0.31:25"}, {"address": "127.0.0.32:25", "mode": "standby"}]
    vs = VirtualServer.model_validate(
        {"name": "mail", "listen": "127.0.0.30:2500", "method": method, "health": health, "real": reals}
    )
    return Pool.from_config(vs, now=0.0)


def names(p: Pool, client: str = "192.0.2.1") -> list[str]:
    return [s.address for s in p.plan(client)]


def test_fall_rise_and_tier_events():
    p = pool(retries=3, rise=2)
    mr1, mr2 = p.servers
    assert p.tier == "active" and names(p) == ["127.0.0.31:25", "127.0.0.32:25"]
    assert p.record_check(mr1, False, "refused", None, 1) == []
    assert p.record_check(mr1, False, "refused", None, 2) == []
    events = p.record_check(mr1, False, "refused", None, 3)
    assert [e.kind for e in events] == ["down", "failover"]
    assert "is down after 3 failed smtp checks: refused" in events[0].text
    assert p.tier == "standby" and names(p) == ["127.0.0.32:25"]
    assert mr1.state == "down" and mr1.since == 3
    # One success is not enough with rise = 2; a failure resets the streak.
    assert p.record_check(mr1, True, "220 ok", 0.001, 4) == []
    assert p.record_check(mr1, False, "refused", None, 5) == []
    assert p.record_check(mr1, True, "220 ok", 0.001, 6) == []
    events = p.record_check(mr1, True, "220 ok", 0.001, 7)
    assert [e.kind for e in events] == ["up", "failback"]
    assert p.tier == "active" and names(p)[0] == "127.0.0.31:25"
    assert (mr1.checks_passed, mr1.checks_failed) == (3, 4)
    # Standby down as well as active: nothing serves.
    for t in range(3):
        p.record_check(mr2, False, "refused", None, 10 + t)
    assert p.tier == "active"
    events = [e for t in range(3) for e in p.record_check(mr1, False, "x", None, 20 + t)]
    assert [e.kind for e in events] == ["down", "all-down"]
    assert p.plan("192.0.2.1") == []
    assert p.record_check(mr2, True, "ok", None, 30) == []  # rise = 2
    events = p.record_check(mr2, True, "ok", None, 31)
    assert [e.kind for e in events] == ["up", "restored"]
    assert p.tier == "standby"


def test_fall_overrides_retries():
    p = pool(retries=5, fall=1)
    assert [e.kind for e in p.record_check(p.servers[0], False, "x", None, 1)] == ["down", "failover"]


def test_disabled_is_never_planned_nor_checked():
    p = pool("round-robin", [{"address": "127.0.0.31:25", "mode": "disabled"}, {"address": "127.0.0.32:25"}])
    assert [s.address for s in p.checked_servers()] == ["127.0.0.32:25"]
    assert all(names(p) == ["127.0.0.32:25"] for _ in range(5))


def test_round_robin_rotates():
    p = pool("round-robin", [{"address": f"127.0.0.{n}:25"} for n in (31, 32, 33)])
    firsts = [names(p)[0] for _ in range(6)]
    assert firsts == ["127.0.0.31:25", "127.0.0.32:25", "127.0.0.33:25"] * 2


def test_smooth_weighted_round_robin_interleaves():
    p = pool("weighted", [{"address": "127.0.0.31:25", "weight": 5}, {"address": "127.0.0.32:25", "weight": 1},
                          {"address": "127.0.0.33:25", "weight": 1}, {"address": "127.0.0.34:25", "weight": 0}])
    firsts = [names(p)[0][8:10] for _ in range(7)]
    assert firsts == ["31", "31", "32", "31", "33", "31", "31"]  # nginx's smooth WRR sequence
    assert "127.0.0.34:25" not in names(p)


@given(st.lists(st.integers(1, 20), min_size=1, max_size=6), st.integers(1, 4))
def test_property_weighted_gives_each_server_exactly_its_share(weights, rounds):
    p = pool("weighted", [{"address": f"127.0.0.{31 + i}:25", "weight": w} for i, w in enumerate(weights)])
    counts = collections.Counter(names(p)[0] for _ in range(sum(weights) * rounds))
    assert counts == {f"127.0.0.{31 + i}:25": w * rounds for i, w in enumerate(weights)}


@given(st.lists(st.ip_addresses(v=4).map(str), min_size=1, max_size=50), st.integers(0, 3))
def test_property_source_hash_only_moves_the_clients_of_a_server_that_went_down(clients, dead):
    p = pool("source-ip-hash", [{"address": f"127.0.0.{31 + i}:25"} for i in range(4)], retries=1)
    before = {c: names(p, c)[0] for c in clients}
    assert before == {c: names(p, c)[0] for c in clients}  # stable
    p.record_check(p.servers[dead], False, "x", None, 1)
    after = {c: names(p, c)[0] for c in clients}
    for c in clients:
        if before[c] != p.servers[dead].address:
            assert after[c] == before[c]
        else:
            assert after[c] != p.servers[dead].address


def test_least_session_and_least_rtt():
    p = pool("least-session", [{"address": "127.0.0.31:25"}, {"address": "127.0.0.32:25"}])
    p.servers[0].connections = 3
    p.servers[1].connections = 1
    assert names(p)[0] == "127.0.0.32:25"
    p.servers[1].connections = 3
    assert {names(p)[0] for _ in range(4)} == {"127.0.0.31:25", "127.0.0.32:25"}  # ties take turns

    p = pool("least-rtt", [{"address": "127.0.0.31:25"}, {"address": "127.0.0.32:25"}, {"address": "127.0.0.33:25"}])
    p.record_check(p.servers[0], True, "ok", 0.050, 1)
    p.record_check(p.servers[1], True, "ok", 0.002, 1)
    assert names(p) == ["127.0.0.32:25", "127.0.0.31:25", "127.0.0.33:25"]  # unmeasured last
    # Smoothed: one fast answer does not make the slow server the best.
    p.record_check(p.servers[0], True, "ok", 0.001, 2)
    assert names(p)[0] == "127.0.0.32:25"


def test_max_connections_and_standby_only_as_last_resort():
    p = pool("first-alive", [{"address": "127.0.0.31:25", "max_connections": 1}, {"address": "127.0.0.32:25"},
                             {"address": "127.0.0.33:25", "mode": "standby"}])
    assert names(p) == ["127.0.0.31:25", "127.0.0.32:25", "127.0.0.33:25"]
    p.servers[0].connections = 1
    assert names(p) == ["127.0.0.32:25", "127.0.0.33:25"]
    p.servers[1].connections = 10**6
    assert names(p) == ["127.0.0.32:25", "127.0.0.33:25"]  # unlimited
    # Active servers all full: nothing (the standby is for a dead tier, not a busy one).
    p = pool("first-alive", [{"address": "127.0.0.31:25", "max_connections": 1},
                             {"address": "127.0.0.33:25", "mode": "standby"}])
    p.servers[0].connections = 1
    assert names(p) == []
