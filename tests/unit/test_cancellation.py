"""A stop that arrives together with a wake-up still stops.

The node stops by cancelling its tasks. On Python 3.11, `asyncio.wait_for` returns the
awaited result when the awaited thing finishes in the same turn of the loop as the
cancellation, and the cancellation is lost: a loop that waits for a wake-up that way
goes round again, and the node never stops (seen in CI: a node with [cluster] still held
its data_dir after its stop, and the next start on that data_dir waited for the lock).
kanmon waits with `asyncio.timeout`, which keeps the cancellation; a library's wait_for
(dnspython's) is awaited through kanmon.aio.kept; a stopping task bounds its waits with
kanmon.aio.settle (asyncio.timeout before 3.11.3 raises CancelledError there)."""

from __future__ import annotations

import ast
import asyncio
from pathlib import Path
from types import SimpleNamespace

import kanmon
from kanmon import clusterconfig
from kanmon.aio import kept, settle
from kanmon.clusterconfig import ClusterWatch, node_config
from kanmon.queue import pickup as pickup_module
from kanmon.queue.pickup import Pickup

PUSHED = """
[server]
hostname = "relay.example.test"
data_dir = "{data_dir}"
[[domain]]
name = "corp.example"
mailboxes = ["tanaka"]
[records]
url = "postgresql://kanmon@127.0.0.1:1/kanmon"
"""


async def _cancelled_with_a_wake(run, waiting, wake) -> None:
    """Start run(), let it reach its wait, then wake it and cancel it in one turn: it
    ends, cancelled (asyncio.run would cancel a task left running again: asserted here)."""
    task = asyncio.create_task(run())
    for _ in range(1000):
        await asyncio.sleep(0)
        if waiting():
            break
    for _ in range(10):  # past the check it made: waiting for the wake-up now
        await asyncio.sleep(0)
    assert waiting() and not task.done()
    wake()
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=10)
    assert task in done and task.cancelled(), "it went round again after its stop"


def test_the_cluster_watch_stops_when_the_stop_comes_with_a_notification(tmp_path, monkeypatch):
    monkeypatch.setattr(clusterconfig, "POLL", 3600.0)  # only the wake-up ends its wait, whatever the load
    local = {"records": {"url": "postgresql://kanmon@127.0.0.1:1/kanmon", "node": "mr1"}, "cluster": {"node": "mr1"}}
    config, _text = node_config(PUSHED.format(data_dir=tmp_path), "mr1", local, "v1")
    node = SimpleNamespace(config=config, data_dir=tmp_path, records=SimpleNamespace(emit=lambda *a, **k: None))
    watch = ClusterWatch(node, (RuntimeError,))
    checks: list[int] = []

    async def check() -> None:  # the database's answer: nothing new
        checks.append(1)

    watch.check = check  # type: ignore[method-assign]

    asyncio.run(_cancelled_with_a_wake(watch.run, lambda: bool(checks), lambda: watch._wake.set()))
    assert len(checks) == 1


def test_the_pickup_stops_when_the_stop_comes_with_a_wake(tmp_path, monkeypatch):
    monkeypatch.setattr(pickup_module, "POLL_EVERY", 3600.0)
    pickup = Pickup(tmp_path, injector=None, records=None, hostname="relay.example.test", max_size=1000)
    scans: list[int] = []
    real_scan = pickup.scan

    async def scan() -> int:
        scans.append(1)
        return await real_scan()

    pickup.scan = scan  # type: ignore[method-assign]

    asyncio.run(_cancelled_with_a_wake(pickup.run, lambda: bool(scans), pickup.wake))
    assert len(scans) == 1


def test_a_cancellation_a_library_loses_is_raised_again():
    """dnspython bounds its reads with asyncio.wait_for: kanmon.aio.kept raises the stop
    that landed with the answer (every DNS query of kanmon goes through it)."""
    async def library(event: asyncio.Event) -> str:  # as dnspython's asyncio backend waits
        await asyncio.wait_for(event.wait(), 30)  # here on purpose: kanmon's own code never does
        return "answer"

    async def scenario() -> None:
        event = asyncio.Event()
        rounds = []

        async def resolver_loop() -> None:
            while True:
                rounds.append(await kept(library(event)))
                event.clear()

        task = asyncio.create_task(resolver_loop())
        for _ in range(10):
            await asyncio.sleep(0)
        event.set()
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=10)
        assert task in done and task.cancelled() and rounds == []

    asyncio.run(scenario())


def test_a_stopping_task_waits_a_bounded_time():
    """kanmon.aio.settle in a task whose cancellation is being handled (a node's shutdown
    runs in one): False after the delay, the waited thing cancelled, no exception; True
    when it finishes, its exception not raised."""
    async def stopping() -> tuple[bool, bool, bool]:
        forever = asyncio.get_running_loop().create_future()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            pass  # shutting down, as a node's finally does
        late = await settle(forever, 0.01)

        async def fails() -> None:
            raise OSError("gone")

        return late, forever.cancelled(), await settle(fails(), 10)

    async def scenario() -> tuple[bool, bool, bool]:
        task = asyncio.create_task(stopping())
        await asyncio.sleep(0)
        task.cancel()
        return await task

    assert asyncio.run(scenario()) == (False, True, True)


def test_no_part_of_kanmon_waits_with_asyncio_wait_for():
    """The same loss anywhere else (a session, an agent, the control socket): kanmon's
    code uses asyncio.timeout. (Python 3.12 fixed wait_for; kanmon runs on 3.11.)"""
    found = []
    for path in sorted(Path(kanmon.__file__).parent.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and node.attr == "wait_for" and \
                    isinstance(node.value, ast.Name) and node.value.id == "asyncio":
                found.append(f"{path.name}:{node.lineno}")
    assert not found, f"asyncio.wait_for loses a cancellation on Python 3.11: {found}"


def test_a_dns_query_shared_by_two_checks_survives_the_first_askers_stop():
    """Two sessions ask the same name at once: one lookup. The session whose lookup it was
    is stopped (its client left): the other gets its answer from a lookup of its own,
    not the first one's CancelledError (which its check's failure mode does not catch)."""
    from kanmon.policy.dns import CheckResolver, DnsAnswer, DnsStatus

    resolver = CheckResolver(servers=[("127.0.0.1", 1)], timeout=1.0)
    lookups: list[asyncio.Event] = []

    async def lookup(name: str, rdtype: str) -> DnsAnswer:
        answered = asyncio.Event()
        lookups.append(answered)
        await answered.wait()
        return DnsAnswer(name, rdtype, DnsStatus.NXDOMAIN, ttl=60.0)

    resolver._lookup = lookup  # type: ignore[method-assign]  # the DNS server's side

    async def scenario() -> None:
        first = asyncio.create_task(resolver.query("mail.example.test", "A"))
        second = asyncio.create_task(resolver.query("mail.example.test", "A"))
        for _ in range(5):
            await asyncio.sleep(0)
        assert len(lookups) == 1  # shared
        first.cancel()
        for _ in range(5):
            await asyncio.sleep(0)
        assert first.cancelled() and not second.done() and len(lookups) == 2  # asked again
        lookups[1].set()
        answer = await asyncio.wait_for(second, 10)
        assert answer.status is DnsStatus.NXDOMAIN

    asyncio.run(scenario())
