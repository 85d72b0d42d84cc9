#!/usr/bin/env python3
"""Benchmark: the SMTP delivery agent alone, with and without the session cache.

kanmon's SmtpDelivery (kanmon/deliver/smtp.py) sends N messages of SIZE bytes to
Postfix's smtp-sink on 127.0.0.73:2527, CONCURRENCY at a time, once with `[outbound]
connection_cache = true` (sessions reused, RSET between messages) and once with it off
(a new connection, greeting, EHLO and QUIT per message), alternating, ROUNDS times.
Prints per run: msg/s, CPU of this process per message (user + system: the agent's own
work, without the queue, the spool or the receiver), and the connections the sink saw.

    python bench/outbound_reuse.py                       # 5,000 x 5 KB and 100 KB, 20 at a time
    python bench/outbound_reuse.py --messages 2000 --rounds 1

Needs smtp-sink (Debian's postfix package; bench/relay_vs_postfix.py installs it). Run
as root (smtp-sink -u nobody). Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.smtpdrive import SmtpSink  # noqa: E402
from kanmon.config import parse_config  # noqa: E402
from kanmon.deliver.mx import NextHop  # noqa: E402
from kanmon.deliver.smtp import SmtpDelivery  # noqa: E402
from kanmon.model import CrlfChecked, Status  # noqa: E402

SINK = ("127.0.0.73", 2527)


def body(size: int) -> bytes:
    head = b"From: a@bench.example\r\nTo: r@far.example\r\nSubject: bench\r\n\r\n"
    line = b"x" * 76 + b"\r\n"
    return CrlfChecked(head + line * max(1, (size - len(head)) // len(line)))


async def run(cache: bool, messages: int, concurrency: int, data: bytes) -> tuple[float, float]:
    config = parse_config(
        "[server]\nhostname = \"kanmon.bench.test\"\n[smtp]\nlisten = [\"127.0.0.74:2525\"]\n"
        f"[outbound]\ntls = \"none\"\nmax_per_destination = {concurrency}\nconnection_cache = {str(cache).lower()}\n"
    )
    agent = SmtpDelivery(config, lambda event, qid: None)
    hops = [NextHop.from_endpoint(SINK)]
    todo = iter(range(messages))
    failed = 0

    async def worker() -> None:
        nonlocal failed
        for n in todo:
            [r] = await agent.deliver(f"Q{n}", "a@bench.example", ["r@far.example"], data, hops, "none")
            failed += r.status is not Status.SENT

    cpu0, t0 = time.process_time(), time.perf_counter()
    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        await agent.close()
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    if failed:
        print(f"  ({failed} not sent)")
    return messages / wall, 1000 * cpu / messages


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=5000)
    ap.add_argument("--concurrency", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sizes", default="5120,102400")
    args = ap.parse_args()
    try:
        import uvloop  # the node uses it when importable
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    sink = SmtpSink(SINK)
    try:
        for size in (int(s) for s in args.sizes.split(",")):
            data = body(size)
            ratios = []
            for rnd in range(args.rounds):
                got = {}
                for cache in (True, False):
                    before = sink.sessions
                    rate, cpu = asyncio.run(run(cache, args.messages, args.concurrency, data))
                    time.sleep(1)  # smtp-sink counts a session when it ends
                    got[cache] = (rate, cpu)
                    print(f"size {size:>6} round {rnd + 1} cache {'on ' if cache else 'off'}: {rate:7.0f} msg/s  "
                          f"CPU {cpu:.3f} ms/msg  connections {sink.sessions - before}", flush=True)
                ratios.append((got[True][0] / got[False][0], got[False][1] / got[True][1]))
            print(f"  {size // 1024} KB: on/off msg/s {' '.join(f'{a:.2f}' for a, _ in ratios)} "
                  f"(median {statistics.median(a for a, _ in ratios):.2f}); CPU per message off/on "
                  f"{' '.join(f'{b:.2f}' for _, b in ratios)} (median {statistics.median(b for _, b in ratios):.2f})")
    finally:
        sink.stop()
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
