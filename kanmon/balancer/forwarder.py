"""A balancer forwarding process: `python -m kanmon.balancer.forwarder` (see kanmon.balancer.workers).

Role: run a BalancerService in forwarding mode on the listening sockets and the shared
table the main process passed down; tell the main process "ready" once it accepts, and
hand it every event line; stop (closing its connections) on SIGTERM.

Trusts: the main process (its spec on stdin, its descriptors).
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
from typing import Any

from kanmon.balancer.workers import MAX_LINE, Forwarder
from kanmon.children import die_with_parent




async def _forward(spec: dict[str, Any], slot: int, table_arg: str, fds: list[int], notify_fd: int) -> None:
    from kanmon.balancer.service import BalancerService  # noqa: PLC0415 - after PR_SET_PDEATHSIG
    from kanmon.balancer.shared import SharedTable  # noqa: PLC0415
    from kanmon.config import Config  # noqa: PLC0415

    fd, servers, processes = (int(x) for x in table_arg.split(","))
    table = SharedTable(fd, servers, processes, create=False)
    sockets = [socket.socket(fileno=f) for f in fds]
    for s in sockets:
        s.setblocking(False)
    config = Config.model_validate({
        "server": {"data_dir": spec.get("data_dir", ".")},
        "balancer": {"virtual_server": spec["virtual_server"], "processes": processes, "backlog": spec["backlog"],
                     "splice": spec["splice"]},
    })

    def say(text: str, queue_id: str | None = None) -> None:
        line = ("say " + text.replace("\n", " ")[: MAX_LINE - 100] + "\n").encode("utf-8", "replace")
        try:
            os.write(notify_fd, line)
        except OSError:
            pass

    service = BalancerService(config, say, forwarder=Forwarder(table, slot, sockets))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    await service.start()
    # What start built lives as long as the process: out of the cyclic GC's sight, so
    # that the collections the connections' allocations set off do not walk it again.
    gc.freeze()
    try:
        os.write(notify_fd, b"ready\n")
        await stop.wait()
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
