"""Shared state: the interfaces' behaviour, the same for the in-memory, SQLite and
PostgreSQL backends, and the SQLite one shared by several processes."""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from kanmon.state.api import (
    AlertClaims,
    ConnectionGauge,
    GreylistStore,
    MemoryState,
    RateCounter,
    Triplet,
    TtlCache,
)
from kanmon.state.postgresql import PostgresState
from kanmon.state.sqlite import SqliteState

ROOT = Path(__file__).resolve().parents[2]
T0 = 1_800_000_000.0  # a multiple of 3600 and 60: bucket boundaries are easy to see


@pytest.fixture(params=["memory", "sqlite", "postgresql"])
def state(request, tmp_path):
    if request.param == "postgresql":  # the tests' own server (skips where PostgreSQL is missing)
        s = PostgresState(request.getfixturevalue("pg_url"), "mr1")
    else:
        s = MemoryState() if request.param == "memory" else SqliteState(tmp_path)
    yield s
    s.close()


def test_backends_implement_the_interfaces(state):
    assert isinstance(state.counters, RateCounter)
    assert isinstance(state.gauges, ConnectionGauge)
    assert isinstance(state.cache("verify"), TtlCache)
    assert isinstance(state.greylist, GreylistStore)


def test_rate_counter_sliding_window(state):
    c = state.counters
    assert [c.hit("ip:192.0.2.1", 3600, T0 + i) for i in range(3)] == [1, 2, 3]
    assert c.hit("ip:192.0.2.2", 3600, T0) == 1  # keys are separate
    assert c.hit("ip:192.0.2.1", 60, T0) == 1  # and so are windows
    assert c.peek("ip:192.0.2.1", 3600, T0 + 10) == 3
    # Just after the hour's boundary the previous hour counts whole (rounded up, never
    # one less); half-way through the next hour, half of it still counts (1.5 -> 2).
    assert c.peek("ip:192.0.2.1", 3600, T0 + 3600 + 0.001) == 3
    assert c.peek("ip:192.0.2.1", 3600, T0 + 3600 + 1800) == 2
    assert c.hit("ip:192.0.2.1", 3600, T0 + 3600 + 1800, amount=5) == 7
    # Two windows later nothing is left.
    assert c.peek("ip:192.0.2.1", 3600, T0 + 3 * 3600) == 0
    c.reset("ip:192.0.2.2")
    assert c.peek("ip:192.0.2.2", 3600, T0) == 0


def test_connection_gauge_by_owner(state):
    g = state.gauges
    assert g.acquire("ip:192.0.2.1", "pid1", T0) == 1
    assert g.acquire("ip:192.0.2.1", "pid2", T0) == 2
    assert g.acquire("ip:192.0.2.1", "pid2", T0) == 3
    g.release("ip:192.0.2.1", "pid2")
    assert g.count("ip:192.0.2.1") == 2
    g.drop_owner("pid1")  # a process that ended (or died) holds nothing any more
    assert g.count("ip:192.0.2.1") == 1
    g.release("ip:192.0.2.1", "pid2")
    g.release("ip:192.0.2.1", "pid2")  # one release too many never goes below zero
    assert g.count("ip:192.0.2.1") == 0
    g.acquire("ip:192.0.2.1", "pid3", T0)
    g.acquire("ip:192.0.2.2", "pid4", T0)
    g.clear()  # a node starting: nobody holds anything yet
    assert g.count("ip:192.0.2.1") == 0 and g.count("ip:192.0.2.2") == 0


def test_connection_gauge_apply_releases_then_takes_in_one_call(state):
    g = state.gauges
    assert g.apply("pid1", [], ["ip:a", "ip:a", "ip:b"], T0) == [1, 2, 1]
    assert g.acquire("ip:a", "pid2", T0) == 3
    # the releases first: the takes see them
    assert g.apply("pid1", ["ip:a", "ip:b", "ip:b"], ["ip:a", "ip:c"], T0) == [3, 1]
    assert (g.count("ip:a"), g.count("ip:b"), g.count("ip:c")) == (3, 0, 1)
    assert g.apply("pid2", ["ip:a"], [], T0) == []
    assert g.count("ip:a") == 2


def test_ttl_cache(state):
    cache, other = state.cache("verify"), state.cache("other")
    cache.put("a@corp.example", "250 2.1.5 ok", 100, T0)
    cache.put("b@corp.example", "550 5.1.1 unknown", 10, T0)
    cache.put("x%_@corp.example", "250", 100, T0)
    assert other.get("a@corp.example", T0) is None  # namespaces are separate
    e = cache.get("a@corp.example", T0 + 50)
    assert (e.value, e.stored, e.expires) == ("250 2.1.5 ok", T0, T0 + 100)
    assert cache.get("b@corp.example", T0 + 10) is None  # expired
    assert [e.key for e in cache.list(T0)] == ["a@corp.example", "b@corp.example", "x%_@corp.example"]
    assert [e.key for e in cache.list(T0, prefix="x%_")] == ["x%_@corp.example"]  # LIKE characters are literal
    assert [e.key for e in cache.list(T0 + 20)] == ["a@corp.example", "x%_@corp.example"]
    assert cache.prune(T0 + 20) == 1
    assert cache.delete("a@corp.example") and not cache.delete("a@corp.example")
    other.put("a", "1", 10, T0)
    assert cache.flush() == 1 and other.get("a", T0) is not None


def test_greylist(state):
    gl = state.greylist
    t = Triplet("192.0.2.0/24", "a@sender.example", "b@corp.example")
    first = gl.attempt(t, T0)
    assert (first.first_seen, first.last_seen, first.passed, first.attempts) == (T0, T0, None, 1)
    again = gl.attempt(t, T0 + 400)
    assert (again.first_seen, again.last_seen, again.attempts) == (T0, T0 + 400, 2)
    gl.mark_passed(t, T0 + 400)
    gl.mark_passed(t, T0 + 500)  # passing twice counts once
    assert gl.client_passes("192.0.2.0/24") == 1
    assert gl.attempt(t, T0 + 600).passed == T0 + 400
    stale = Triplet("198.51.100.0/24", "", "b@corp.example")
    gl.attempt(stale, T0)
    assert [s.triplet for s in gl.list()] == [t, stale]
    assert [s.triplet for s in gl.list("198.51.")] == [stale]
    # Unpassed triplets go after the window, passed ones after `remember` unused.
    assert gl.prune(T0 + 3 * 86400, window=2 * 86400, remember=36 * 86400) == 1
    assert gl.prune(T0 + 37 * 86400, window=2 * 86400, remember=36 * 86400) == 1
    assert gl.list() == [] and gl.client_passes("192.0.2.0/24") == 1
    assert not gl.forget(t)


def test_submit_runs_off_the_loop(state):
    async def main():
        assert await state.submit(state.counters.hit, "k", 60, T0) == 1
        with pytest.raises(ZeroDivisionError):
            await state.submit(lambda: 1 / 0)

    asyncio.run(main())


def test_sqlite_file_is_private(tmp_path):
    s = SqliteState(tmp_path)
    s.counters.hit("k", 60, T0)
    s.close()
    for p in tmp_path.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) & 0o077 == 0, p


_HITTER = """
import sys
from pathlib import Path
from kanmon.state.postgresql import PostgresState
from kanmon.state.sqlite import SqliteState
s = SqliteState(Path(sys.argv[1]))
sys.stdin.readline()  # start together
for _ in range(int(sys.argv[2])):
    s.counters.hit("ip:192.0.2.1", 3600, 1800000000.0)
    s.gauges.acquire("ip:192.0.2.1", sys.argv[3], 1800000000.0)
s.close()
"""


def test_two_processes_share_one_counter(tmp_path):
    SqliteState(tmp_path).close()  # schema made once, like the node before it starts its receivers
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, "-c", _HITTER, str(tmp_path), "200", f"p{i}"], stdin=subprocess.PIPE,
                              env=env) for i in range(2)]
    for p in procs:
        p.stdin.write(b"go\n")
        p.stdin.close()
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    s = SqliteState(tmp_path)
    try:
        assert s.counters.peek("ip:192.0.2.1", 3600, T0) == 400  # no hit lost
        assert s.gauges.count("ip:192.0.2.1") == 400
        s.gauges.drop_owner("p0")
        assert s.gauges.count("ip:192.0.2.1") == 200
    finally:
        s.close()


def test_memory_counters_forget_idle_keys_and_stay_bounded() -> None:
    from kanmon.state.api import MemoryCounters

    c = MemoryCounters(max_keys=3)
    c.hit("once", 10, 0)
    c.hit("later", 10, 25)  # "once" has been idle for two windows: it counts nothing, and is gone
    assert len(c) == 1 and c.peek("once", 10, 25) == 0
    for k in "abcd":
        c.hit(k, 1000, 30)
    assert len(c) == 3 and c.peek("a", 1000, 30) == 0 and c.peek("d", 1000, 30) == 1  # least recently hit first
    c.reset("d")
    assert len(c) == 2


def test_sqlite_counters_prune_idle_keys(tmp_path) -> None:
    s = SqliteState(tmp_path)
    try:
        s.counters.hit("once", 10, 0)
        s.counters.hit("busy", 10, 25)
        assert s.counters.prune(25) == 1
        assert s.counters.peek("busy", 10, 25) == 1
    finally:
        s.close()


def test_alert_claims_one_mail_per_interval_naming_the_nodes(state):
    claims = state.alert_claims
    assert isinstance(claims, AlertClaims)
    first = claims.claim("delivery", "store", "mr1", T0, 3600)
    assert (first.mail, first.nodes, first.mailed_by) == (True, ("mr1",), "mr1")
    second = claims.claim("delivery", "store", "mr2", T0 + 5, 3600)
    assert (second.mail, second.nodes, second.mailed_by) == (False, ("mr1", "mr2"), "mr1")
    assert claims.claim("delivery", "other", "mr2", T0 + 5, 3600).mail  # another alert
    again = claims.claim("delivery", "store", "mr2", T0 + 3601, 3600)  # the interval is over
    assert (again.mail, again.nodes, again.mailed_by) == (True, ("mr2",), "mr2")


def test_the_last_node_to_see_an_incident_end_mails_its_one_resolved_mail(state):
    claims = state.alert_claims
    assert claims.claim("delivery", "store", "mr1", T0, 3600).mail
    assert not claims.claim("delivery", "store", "mr2", T0 + 5, 3600).mail
    first = claims.resolve("delivery", "store", "mr1", T0 + 60, 3600)
    assert (first.mail, first.nodes, first.still) == (False, ("mr1", "mr2"), ("mr2",))  # mr2 still sees it
    last = claims.resolve("delivery", "store", "mr2", T0 + 70, 3600)
    assert (last.mail, last.nodes, last.still) == (True, ("mr1", "mr2"), ())
    assert not claims.resolve("delivery", "store", "mr1", T0 + 80, 3600).mail  # one per incident
    # The next incident (its alert mailed again after the interval) gets its own, naming its nodes.
    assert claims.claim("delivery", "store", "mr2", T0 + 4000, 3600).mail
    again = claims.resolve("delivery", "store", "mr2", T0 + 4100, 3600)
    assert (again.mail, again.nodes) == (True, ("mr2",))


def test_a_node_that_stopped_while_seeing_an_incident_blocks_its_resolution_one_interval_at_most(state):
    claims = state.alert_claims
    assert claims.claim("delivery", "store", "mr1", T0, 3600).mail
    claims.claim("delivery", "store", "mr2", T0 + 5, 3600)  # mr2 then stops, never to see it end
    assert claims.resolve("delivery", "store", "mr1", T0 + 60, 3600).still == ("mr2",)
    late = claims.resolve("delivery", "store", "mr1", T0 + 3700, 3600)
    assert (late.mail, late.nodes) == (True, ("mr1", "mr2"))


def test_an_alert_no_node_mailed_resolves_as_on_one_node(state):
    r = state.alert_claims.resolve("delivery", "never-mailed", "mr1", T0, 3600)
    assert (r.mail, r.nodes) == (True, ("mr1",))
