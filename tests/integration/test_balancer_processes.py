"""The balancer with more than one process ([balancer] processes = 2): a forwarding
process accepts on the same virtual address, follows the health state and the
administrator's modes of the main process, sends its event lines to it, counts into the
shared status, is started again when it dies, and ends with the service.

To know that a connection went through the forwarding process and not the main one,
the test blocks the main process's event loop (a blocking client in its thread): only
the forwarding process can accept then. The relays run in a thread of their own."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from tests.integration.test_balancer import (
    DEADLINE,
    MR1,
    MR2,
    VIP,
    Client,
    FakeRelay,
    balancer,
    free_port,
    one_vs,
    run,
    wait_until,
)


@contextmanager
def relay_thread(*specs: tuple[str, str]) -> Iterator[tuple[asyncio.AbstractEventLoop, list[FakeRelay]]]:
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    out: list[FakeRelay] = []

    def serve() -> None:
        asyncio.set_event_loop(loop)
        for host, name in specs:
            out.append(loop.run_until_complete(FakeRelay(host, name).start()))
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert ready.wait(DEADLINE)
    try:
        yield loop, out
    finally:
        for r in out:
            if r._server is not None:
                asyncio.run_coroutine_threadsafe(r.kill(), loop).result(DEADLINE)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(DEADLINE)
        loop.close()


def blocking_session(port: int) -> str:
    """A whole session while this thread's event loop (the main balancer process) is
    blocked: returns the relay name, '' if the connection was closed without a banner."""
    with socket.create_connection((VIP, port), timeout=DEADLINE) as s:
        f = s.makefile("rwb")
        banner = f.readline().decode()
        if not banner.startswith("220 "):
            return ""
        f.write(b"HELO blocked.example.test\r\n")
        f.flush()
        assert f.readline().startswith(b"250")
        f.write(b"QUIT\r\n")
        f.flush()
        assert f.readline().startswith(b"221")
        return banner.split(" ")[1]


def test_a_forwarding_process_follows_failover_and_drain_and_counts_into_the_status(tmp_path):
    with relay_thread((MR1, "mr1"), (MR2, "mr2")) as (rloop, (mr1, mr2)):
        async def main() -> None:
            port = free_port(VIP)
            vs = one_vs(port, [(mr1, "active"), (mr2, "standby")])
            async with balancer(tmp_path, vs, processes=2) as b:
                status = b.service.status()
                assert status["processes"] == 2
                assert b.saw("2 processes accept and forward")
                await wait_until(b.service._workers.ready, "the forwarding process to accept")
                # Only the forwarding process can take these: this loop is blocked.
                assert [blocking_session(port) for _ in range(3)] == ["mr1"] * 3
                await wait_until(lambda: b.server(0)["total_connections"] == 3,
                                 "the forwarding process's counts in the status")
                assert b.server(0)["bytes_in"] == 3 * len(b"HELO blocked.example.test\r\nQUIT\r\n")

                asyncio.run_coroutine_threadsafe(mr1.kill(), rloop).result(DEADLINE)
                await wait_until(lambda: b.saw("failover"), "the main process to see mr1 down")
                assert blocking_session(port) == "mr2"  # ... and the forwarding process follows

                b.service.set_mode("mail", mr2.address, "disabled")
                assert blocking_session(port) == ""  # nothing to serve: closed at once
                await wait_until(lambda: b.saw("no real server can take a connection"),
                                 "the forwarding process's event line")
                b.service.set_mode("mail", mr2.address, "enabled")
                assert blocking_session(port) == "mr2"
                await wait_until(lambda: b.server(1)["total_connections"] == 2, "mr2's two sessions")

        run(main())


def test_a_forwarding_process_that_dies_is_started_again_and_ends_with_the_service(tmp_path):
    with relay_thread((MR1, "mr1")) as (_, (mr1,)):
        async def main() -> None:
            port = free_port(VIP)
            async with balancer(tmp_path, one_vs(port, [(mr1, "active")]), processes=2) as b:
                assert b.service._workers is not None
                await wait_until(b.service._workers.ready, "the forwarding process to accept")
                (first,) = b.service._workers.pids()
                os.kill(first, signal.SIGKILL)
                await wait_until(lambda: b.saw(f"(pid {first}) exited with status -9; restarting"),
                                 "the restart")
                await wait_until(lambda: bool(b.service._workers.pids()) and b.service._workers.pids() != [first],
                                 "a new forwarding process")
                (second,) = b.service._workers.pids()
                await wait_until(b.service._workers.ready, "it to accept")
                assert blocking_session(port) == "mr1"
            for pid in (first, second):
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    continue
                raise AssertionError(f"forwarding process {pid} outlived the service")
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past TIME_WAIT, not past a listener
                s.bind((VIP, port))
                s.listen()  # no process listens there any more

        run(main())


def test_a_forwarding_process_that_cannot_be_started_is_tried_again(tmp_path, monkeypatch):
    """fork/exec failing (EAGAIN, ENOMEM, EMFILE) is said in the log and tried again; the
    slot is not left without a process, and no descriptor is left open."""
    import subprocess
    import types

    from kanmon.balancer import workers

    failures = []

    def popen(*args, **kwargs):
        if not failures:
            failures.append(1)
            raise OSError(11, "Resource temporarily unavailable")
        return subprocess.Popen(*args, **kwargs)

    monkeypatch.setattr(workers, "subprocess", types.SimpleNamespace(Popen=popen, PIPE=subprocess.PIPE))
    fds_before = len(os.listdir("/proc/self/fd"))
    with relay_thread((MR1, "mr1")) as (_, (mr1,)):
        async def main() -> None:
            port = free_port(VIP)
            async with balancer(tmp_path, one_vs(port, [(mr1, "active")]), processes=2) as b:
                assert b.service._workers is not None
                await wait_until(lambda: b.saw("forwarding process 1 cannot be started"), "the failure said")
                await wait_until(b.service._workers.ready, "the forwarding process to accept after all")
                assert failures == [1] and blocking_session(port) == "mr1"

        run(main())
    # the pipe of the failed start was closed (the service's own descriptors are gone too)
    assert len(os.listdir("/proc/self/fd")) <= fds_before + 2


def test_the_start_line_names_every_process(tmp_path):
    with relay_thread((MR1, "mr1")) as (_, (mr1,)):
        async def main() -> None:
            port = free_port(VIP)
            async with balancer(tmp_path, one_vs(port, [(mr1, "active")]), processes=2) as b:
                assert b.service._workers is not None
                (forwarder,) = b.service._workers.pids()
                line = next(e for e in b.events if "processes accept and forward" in e)
                assert f"(pids {os.getpid()}, {forwarder})" in line

        run(main())


def test_a_failed_connect_is_logged_once_across_the_processes_with_the_pid_that_saw_it(tmp_path, monkeypatch):
    """The rate limit of the per-connection notices holds for the balancer, not per
    process: a forwarding process hands its notices to the main process."""
    from kanmon.balancer import service

    monkeypatch.setattr(service, "NOTICE_INTERVAL", 1e6)  # one line for the whole test, whatever its speed
    with relay_thread((MR1, "mr1"), (MR2, "mr2")) as (rloop, (mr1, mr2)):
        asyncio.run_coroutine_threadsafe(mr1.kill(), rloop).result(DEADLINE)  # its port refuses now

        async def main() -> None:
            port = free_port(VIP)
            # Checks far apart: mr1 stays "up" (one failed check of 3) while connects to it fail.
            vs = one_vs(port, [(mr1, "active"), (mr2, "standby")],
                        health_check='{ type = "tcp", interval = "1h", timeout = "1s", retries = 3 }')
            async with balancer(tmp_path, vs, processes=2) as b:
                assert b.service._workers is not None
                await wait_until(b.service._workers.ready, "the forwarding process to accept")
                (forwarder,) = b.service._workers.pids()
                blocking_session(port)  # only the forwarding process accepts: this loop is blocked
                await wait_until(lambda: b.saw(f"failed: Connection refused (forwarding process pid {forwarder})"),
                                 "the forwarding process's notice, with its pid")
                for _ in range(4):  # whichever process takes them: no second line
                    with contextlib.suppress(AssertionError):
                        await Client(port).session()
                    blocking_session(port)
                # Nine connections, each tried mr1 first (it stays "up"): nine notices reach
                # the main process's limit, one written and eight counted as suppressed.
                (v,) = b.service._virtuals

                def notices() -> int:
                    seen = v.notices.get(f"connect {mr1.address}")
                    return 0 if seen is None else 1 + seen[1]
                await wait_until(lambda: notices() >= 9, "every connection's notice in the main process")
                assert sum(f"connect to real server {mr1.address} failed" in e for e in b.events) == 1

        run(main())
