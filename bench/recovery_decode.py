"""CPU per message of a start-up recovery child's decoding (kanmon.spool.recovery.read_one):
the fast path against the strict decoders alone (read_one_strict, what every message took
before the fast path), in alternating rounds over an existing spool, page cache warmed first.

    python bench/recovery_decode.py /var/tmp/kq100k [--rounds 3] [--limit N]
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time

from kanmon.spool.recovery import read_one, read_one_strict


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("base", help="a bench base directory (its data/spool) or a data directory")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--limit", type=int, default=0)
    a = ap.parse_args()
    spool = next(p for p in (f"{a.base}/data/spool", f"{a.base}/spool") if os.path.isdir(p))
    q, s = f"{spool}/queue", f"{spool}/state"
    names = sorted(os.listdir(q))
    if a.limit:
        names = names[: a.limit]
    gc.disable()  # as in a recovery child
    for _ in range(2):  # warm the page cache
        for n in names:
            read_one_strict(q, s, n)
    fast_ok = sum(1 for n in names if read_one(q, s, n) == read_one_strict(q, s, n))
    print(f"{len(names)} messages, {fast_ok} with the same record from both; load {os.getloadavg()[0]:.2f}, "
          f"{time.strftime('%H:%M:%S', time.gmtime())} UTC")
    res: dict[str, list[float]] = {"strict": [], "fast": []}
    for r in range(a.rounds):
        for label, f in (("strict", read_one_strict), ("fast", read_one)):
            t = time.process_time()
            for n in names:
                f(q, s, n)
            us = (time.process_time() - t) / len(names) * 1e6
            res[label].append(us)
            print(f"round {r + 1} {label:6} {us:6.1f} us/msg CPU  load {os.getloadavg()[0]:.2f}")
    m = {k: statistics.median(v) for k, v in res.items()}
    print(f"median: strict {m['strict']:.1f}, fast {m['fast']:.1f} us/msg CPU ({m['fast'] / m['strict']:.2f}x)")


if __name__ == "__main__":
    main()
