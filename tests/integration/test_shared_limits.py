"""Connection limits shared by the receiver processes (`[server] workers`), over sockets.

Two SmtpServers in this process stand for two receivers: each has its listening socket
and its gauge owner, and they share one SqliteState, as receivers share data_dir's. So
which receiver takes which connection is the test's choice, not the kernel's.
"""

from __future__ import annotations

import asyncio

from kanmon.config import parse_config
from kanmon.policy.pipeline import Pipeline
from kanmon.smtp.server import SmtpServer
from kanmon.spool.store import Spool
from kanmon.state.sqlite import SqliteState
from tests.integration.test_smtp_checks import CONFIG, FakeRecords


async def _banner(host: str, port: int, source: str) -> tuple[str, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(host, port, local_addr=(source, 0))
    line = await asyncio.wait_for(reader.readline(), 10)
    return line.decode()[:9], writer


def test_max_connections_counts_the_connections_of_every_receiver(tmp_path):
    """max_connections = 8 "in all": 4 connections on one receiver and 4 on another fill
    it; the ninth is refused whichever receiver takes it, and a place freed on one
    receiver can be taken on the other."""
    config = parse_config(CONFIG.format(data_dir=tmp_path, min_free_disk="0", extra="max_connections = 8\ngreet_pause = 0"))

    async def main() -> None:
        state = SqliteState(tmp_path)
        spool = Spool(tmp_path, fsync=False)
        receivers = [SmtpServer(config, Pipeline([]), spool, FakeRecords(), lambda *a: None, None,  # type: ignore[arg-type]
                                listeners=[("127.0.0.1", 0, False)], state=state) for _ in range(2)]
        for i, r in enumerate(receivers):
            r.gauge_owner = f"receiver-{i}"
        writers: list[asyncio.StreamWriter] = []
        try:
            for r in receivers:
                await r.start()
            a, b = (r.addresses()[0] for r in receivers)
            answers = []
            for i in range(8):
                host, port = a if i % 2 else b
                answer, w = await _banner(host, port, f"127.0.0.{80 + i}")
                answers.append(answer)
                writers.append(w)
            assert answers == ["220 mx1.e"] * 8
            for host, port in (a, b):
                answer, w = await _banner(host, port, "127.0.0.90")
                writers.append(w)
                assert answer == "421 4.7.0"
            writers.pop(0).close()  # a connection of receiver b ends: a may take one more
            for _ in range(100):
                answer, w = await _banner(*a, "127.0.0.91")
                writers.append(w)
                if answer.startswith("220"):
                    break
                await asyncio.sleep(0.05)  # the place is given back as b sees the close
            assert answer == "220 mx1.e"
        finally:
            for w in writers:
                w.close()
            for r in receivers:
                await r.stop()
            spool.close()
            state.close()

    asyncio.run(main())


def test_places_kept_by_one_receiver_count_against_the_limit_on_the_other(tmp_path):
    """max_connections_per_ip = 4 over two receivers: a receiver keeps the places of
    connections that ended (far below the limit) for the client's next connections; they
    are counted while kept, so the client never has more than 4 connections let in, on
    whichever receiver, and the other receiver refuses the fifth."""
    config = parse_config(CONFIG.format(data_dir=tmp_path, min_free_disk="0",
                                        extra="max_connections_per_ip = 4\ngreet_pause = 0"))

    async def main() -> None:
        state = SqliteState(tmp_path)
        spool = Spool(tmp_path, fsync=False)
        receivers = [SmtpServer(config, Pipeline([]), spool, FakeRecords(), lambda *a: None, None,  # type: ignore[arg-type]
                                listeners=[("127.0.0.1", 0, False)], state=state) for _ in range(2)]
        writers: list[asyncio.StreamWriter] = []
        try:
            for r in receivers:
                await r.start()
            a, b = (r.addresses()[0] for r in receivers)
            first = []
            for _ in range(2):
                answer, w = await _banner(*a, "127.0.0.95")
                assert answer == "220 mx1.e"
                first.append(w)
            for w in first:
                w.close()
            gauge = receivers[0].gauge
            assert gauge is not None
            for _ in range(200):  # the receiver sees both ends
                if not receivers[0].connections:
                    break
                await asyncio.sleep(0.01)
            assert gauge.kept("smtp 127.0.0.95") <= 2  # kept (or given back by a sweep meanwhile)
            answers = []
            for _ in range(4):
                answer, w = await _banner(*a, "127.0.0.95")
                answers.append(answer)
                writers.append(w)
            assert answers == ["220 mx1.e"] * 4
            answer, w = await _banner(*b, "127.0.0.95")
            writers.append(w)
            assert answer == "421 4.7.0"  # four are let in on a: b sees them, kept or not
            assert state.gauges.count("smtp 127.0.0.95") >= 4  # a's four (b's refused one until it is given back)
        finally:
            for w in writers:
                w.close()
            for r in receivers:
                await r.stop()
            spool.close()
            state.close()

    asyncio.run(main())
