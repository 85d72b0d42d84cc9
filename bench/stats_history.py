#!/usr/bin/env python3
"""Benchmark: `kanmon stats --by day --since 30d` on 1,000,000 history rows.

Builds a records.sqlite in a temporary data_dir with the current schema (the records
writer's own open_db), fills `history` with N rows spread over the last 30 days
(a few thousand senders, tens of thousands of recipients, 5% rejects, 3% bounces, 10%
deferred at least once), then times the report the way the CLI makes it (migration
check included). Prints the figures; nothing asserts them. Usage:

    python bench/stats_history.py                  # 1,000,000 rows
    python bench/stats_history.py --rows 200000 --keep /tmp/kanmon-bench
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kanmon.records.stats import collect  # noqa: E402
from kanmon.records.store import open_db, rebuild_slots  # noqa: E402


def build(data_dir: Path, rows: int, days: int = 30) -> None:
    db = open_db(data_dir / "records.sqlite")
    rng = random.Random(5)
    now = time.time()
    senders = [f"user{i}@sender{i % 300}.example" for i in range(3000)]
    domains = [f"dest{i}.example" for i in range(200)]
    batch = []
    n = 0
    qn = 0
    while n < rows:
        qn += 1
        ts = now - rng.random() * days * 86400
        sender = rng.choice(senders)
        size = rng.randint(2_000, 200_000)
        nrcpt = 1 if rng.random() < 0.8 else rng.randint(2, 5)
        if rng.random() < 0.05:
            batch.append((ts, "192.0.2.9", sender, f"nobody{rng.randint(0, 999)}@example.test", "", "", size,
                          "NotSpam", "Reject", "", "550 5.1.1 User unknown", "", "x.example", 0, 0))
            n += 1
            continue
        qid = f"Q{qn:014d}"
        for k in range(nrcpt):
            rcpt = f"r{rng.randint(0, 40_000)}@{rng.choice(domains)}"
            roll = rng.random()
            status = "Delivered" if roll > 0.03 else "Bounced: 550 5.1.1 unknown"
            deferrals = 1 if rng.random() < 0.1 else 0
            batch.append((ts, "192.0.2.10", sender, rcpt, "report", f"<{qid}@x>", size, "NotSpam", "Accept", qid,
                          status, "", "client.example", 1 if k == 0 else 0, deferrals))
            n += 1
        if len(batch) >= 50_000:
            _insert(db, batch)
            batch.clear()
    _insert(db, batch)
    rebuild_slots(db)  # the counts per quarter hour the records writer keeps for the rows it writes
    db.close()


def _insert(db, batch) -> None:
    with db:
        db.executemany(
            "INSERT INTO history(ts, client_ip, mail_from, rcpt, subject, message_id, size, classification,"
            " disposition, queue_id, status, auth_user, helo, first, deferrals)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            batch,
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--keep", type=Path, help="build in this directory (reused if it has records.sqlite)")
    args = ap.parse_args()
    tmp = None
    if args.keep:
        data_dir = args.keep
        data_dir.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="kanmon-stats-")
        data_dir = Path(tmp.name)
    if not (data_dir / "records.sqlite").exists():
        t0 = time.perf_counter()
        build(data_dir, args.rows)
        print(f"built {args.rows:,} history rows in {time.perf_counter() - t0:.1f} s")
    for by in ("day", "hour"):
        t0 = time.perf_counter()
        s = collect(data_dir, time.time() - 30 * 86400, by=by)
        took = time.perf_counter() - t0
        print(f"stats --by {by} --since 30d: {len(s.buckets)} buckets, {s.totals.received:,} messages, "
              f"{s.totals.rejected:,} rejected, top sender {s.top_senders[0] if s.top_senders else '-'}: {took:.2f} s")
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
