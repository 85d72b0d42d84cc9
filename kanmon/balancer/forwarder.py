"""A balancer forwarding process: `python -m kanmon.balancer.forwarder` (see kanmon.balancer.workers).

Role: run a BalancerService in forwarding mode on the listening sockets and the shared
table the main process passed down; tell the main process "ready" once it accepts, and
hand it every event line; stop (closing its connections) on SIGTERM.

Trusts: the main process (its spec on stdin: values it validated; its descriptors).
Never: outlive the main process (PR_SET_PDEATHSIG on Linux), bind an address, run
health checks or write files.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import signal
import socket
import sys
from types import SimpleNamespace
from typing import Any

from kanmon.balancer.workers import MAX_LINE, RETIRE_SIGNAL, Forwarder
from kanmon.children import die_with_parent


def settings(spec: dict[str, Any], processes: int) -> SimpleNamespace:
    """The config a BalancerService reads, from the spec: the main process's validated
    values (its model_dump), used as they are. Not the config models: pydantic and
    kanmon.config would be most of this process's memory (docs/performance.md)."""
    def real(r: dict[str, Any]) -> SimpleNamespace:
        return SimpleNamespace(**{**r, "address": (r["address"][0], int(r["address"][1]))})

    def virtual(vs: dict[str, Any]) -> SimpleNamespace:
        return SimpleNamespace(**{**vs, "listen": (vs["listen"][0], int(vs["listen"][1])),
                                  "health": SimpleNamespace(**vs["health"]), "real": [real(r) for r in vs["real"]]})

    return SimpleNamespace(
        server=SimpleNamespace(data_dir=spec.get("data_dir", ".")),
        balancer=SimpleNamespace(virtual_server=[virtual(vs) for vs in spec["virtual_server"]], processes=processes,
                                 backlog=int(spec["backlog"]), splice=bool(spec["splice"])),
    )


async def _forward(spec: dict[str, Any], slot: int, table_arg: str, fds: list[int], notify_fd: int) -> None:
    from kanmon.balancer.service import BalancerService  # noqa: PLC0415 - after PR_SET_PDEATHSIG
    from kanmon.balancer.shared import SharedTable  # noqa: PLC0415

    fd, servers, processes = (int(x) for x in table_arg.split(","))
    table = SharedTable(fd, servers, processes, create=False)
    sockets = [socket.socket(fileno=f) for f in fds]
    for s in sockets:
        s.setblocking(False)
    config = settings(spec, processes)

    def say(text: str, queue_id: str | None = None) -> None:
        line = ("say " + text.replace("\n", " ")[: MAX_LINE - 100] + "\n").encode("utf-8", "replace")
        try:
            os.write(notify_fd, line)
        except OSError:
            pass

    def notice(index: int, kind: str, text: str) -> None:
        line = f"notice {index}\t{kind.replace(chr(9), ' ')}\t{text}".replace("\n", " ")[: MAX_LINE - 100] + "\n"
        try:
            os.write(notify_fd, line.encode("utf-8", "replace"))
        except OSError:
            pass

    # config: the same attributes as a Config's, plain values
    service = BalancerService(config, say, forwarder=Forwarder(table, slot, sockets, notice))  # type: ignore[arg-type]
    stop, retire = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(RETIRE_SIGNAL, retire.set)  # a reload: finish the open connections, then exit
    await service.start()
    # What start built lives as long as the process: out of the cyclic GC's sight, so
    # that the collections the connections' allocations set off do not walk it again.
    gc.freeze()
    try:
        os.write(notify_fd, b"ready\n")
        stopping = asyncio.ensure_future(stop.wait())
        retiring = asyncio.ensure_future(retire.wait())
        await asyncio.wait({stopping, retiring}, return_when=asyncio.FIRST_COMPLETED)
        if not stop.is_set():
            retiring = asyncio.ensure_future(service.retire())
            await asyncio.wait({stopping, retiring}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if not retiring.done():
            retiring.cancel()
    finally:
        await service.stop()
        os.close(notify_fd)


def main(argv: list[str] | None = None) -> int:
    import argparse  # noqa: PLC0415

    ap = argparse.ArgumentParser(prog="python -m kanmon.balancer.forwarder",
                                 description="kanmon balancer forwarding process")
    ap.add_argument("--slot", type=int, required=True)
    ap.add_argument("--table", required=True)
    ap.add_argument("--notify-fd", type=int, required=True)
    ap.add_argument("--fds", required=True)
    args = ap.parse_args(argv)
    die_with_parent()
    spec = json.loads(sys.stdin.buffer.read(16 << 20))
    try:
        import uvloop  # noqa: PLC0415

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    try:
        runner(_forward(spec, args.slot, args.table, [int(x) for x in args.fds.split(",")], args.notify_fd))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
