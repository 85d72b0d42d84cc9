#!/usr/bin/env python3
"""Benchmark: the file system's cost of a queue file per message, created and unlinked
against written over a kept one (kanmon.spool.recycle), in one process.

Per message: write a 100 KB file to incoming/ (a new file, or a kept one renamed there
and written over), rename it into queue/, syncfs every 20 messages (a group commit), and
finish the message 200 before (unlink it, or rename it into recycle/ to be kept). Prints
the CPU time (user + system) and the wall time per message for each way, alternating.
Run it on the file system the spool lives on. Prints figures; asserts nothing.

    python bench/file_churn.py --dir /var/tmp --messages 15000
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import quietfs  # noqa: E402

MODES = ("create+unlink", "write over a kept file", "truncate a kept file, then write")


def run(root: str, mode: str, messages: int, size: int) -> tuple[float, float]:
    for d in ("incoming", "queue", "recycle"):
        os.makedirs(f"{root}/{d}")
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    data = os.urandom(size)
    live: collections.deque[str] = collections.deque()
    kept: list[str] = []
    cpu, wall = time.process_time(), time.perf_counter()
    for i in range(messages):
        tmp = f"{root}/incoming/t{i}"
        if mode != MODES[0] and kept:
            os.rename(kept.pop(), tmp)
            fd = os.open(tmp, os.O_WRONLY | (os.O_TRUNC if mode == MODES[2] else 0))
        else:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, data)
        os.close(fd)
        final = f"{root}/queue/q{i}"
        os.rename(tmp, final)
        live.append(final)
        if i % 20 == 19:
            dfd = os.open(root, os.O_RDONLY)
            libc.syncfs(dfd)
            os.close(dfd)
        if len(live) > 200:
            old = live.popleft()
            if mode != MODES[0] and len(kept) < 1024:
                to = f"{root}/recycle/{os.path.basename(old)}"
                os.rename(old, to)
                kept.append(to)
            else:
                os.unlink(old)
    return (time.process_time() - cpu) / messages, (time.perf_counter() - wall) / messages


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/var/tmp", help="where to make the files (the spool's file system)")
    ap.add_argument("--messages", type=int, default=15000)
    ap.add_argument("--size", type=int, default=102400)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    for rnd in range(args.rounds):
        for mode in MODES:
            root = tempfile.mkdtemp(prefix="kanmon-churn-", dir=args.dir)
            try:
                cpu, wall = run(root, mode, args.messages, args.size)
            finally:
                quietfs.remove_tree(Path(root))
            print(f"round {rnd + 1} {mode:34} CPU {cpu * 1e6:6.0f} us/msg  wall {wall * 1e6:6.0f} us/msg", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
