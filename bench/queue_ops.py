#!/usr/bin/env python3
"""Benchmark: queue operations on a large deferred queue.

Builds N deferred messages (default 100,000) directly through the Spool API — queue
files of ~2 KB with envelopes spread over 20 destination domains and 5 days of arrival
times, each with a journal saying one attempt failed — then times, on that spool:

    list --older-than 2d      (QueueOps.list, and `kanmon queue list ... --json` as a process)
    summary                   (QueueOps.summary, and `kanmon queue summary` as a process)
    a filtered delete         (`kanmon queue delete --domain d7.example --older-than 3d --yes`)
    hold and release of a fifth of the queue (one syncfs per 1,000 journal records)

Nothing reads message bodies for these (the envelope is at the start of each queue
file, the rest is in the journal). Prints figures; asserts nothing. Usage:

    python bench/queue_ops.py                      # 100,000 messages in a temporary data_dir
    python bench/queue_ops.py --messages 20000 --keep /tmp/kq
"""

from __future__ import annotations

import argparse
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kanmon.admin.queue_ops import Filters, OfflineLink, QueueOps  # noqa: E402
from kanmon.config import parse_config  # noqa: E402
from kanmon.model import ClientInfo, Envelope, new_queue_id  # noqa: E402
from kanmon.records.store import Records  # noqa: E402
from kanmon.spool.store import Spool, encode_queue_file  # noqa: E402

CONFIG = """
[server]
hostname = "bench.example.test"
data_dir = "{data_dir}"
[[domain]]
name = "example.test"
mailboxes = ["postmaster"]
"""


def build(data_dir: Path, n: int, now: float) -> None:
    rng = random.Random(4)
    spool = Spool(data_dir, fsync=False)
    body = (b"Subject: bench\r\nFrom: sender@example.test\r\n\r\n" + b"x" * 76 + b"\r\n") * 20
    replies = ["451 4.4.1 Connection refused by 192.0.2.{}", "450 4.1.1 <u{}@x>: Recipient address rejected: User unknown",
               "421 4.7.0 Try again later ({})"]
    t0 = time.monotonic()
    batch = []
    for i in range(n):
        arrived = now - rng.uniform(0, 5 * 86400)
        qid = new_queue_id(arrived)
        env = Envelope(
            mail_from=f"user{rng.randrange(500)}@example.test",
            rcpts=[f"r{i}@d{rng.randrange(20)}.example"] + ([f"c{i}@d{rng.randrange(20)}.example"] if i % 5 == 0 else []),
            client=ClientInfo(ip="127.0.0.1", helo="pc", proto="ESMTP"), received_at=arrived,
        )
        batch.append((spool.incoming / qid, spool.queue / qid, encode_queue_file(env, body)))
        reply = rng.choice(replies).format(rng.randrange(250))
        spool.append_state(qid, [
            *({"k": "result", "t": arrived + 60, "rcpt": r, "status": "deferred", "reply": reply, "relay": "",
               "mailer": "esmtp", "tls": ""} for r in env.rcpts),
            {"k": "attempt", "t": arrived + 60, "n": 1, "next": now + rng.uniform(0, 3600)},
        ])
        if len(batch) == 1000:
            spool.committer.commit_blocking(batch)
            batch = []
    if batch:
        spool.committer.commit_blocking(batch)
    spool.close()
    print(f"built {n:,} deferred messages in {time.monotonic() - t0:.1f} s ({data_dir})", flush=True)


def timed(label: str, fn):
    t0 = time.monotonic()
    result = fn()
    print(f"{label:<58} {time.monotonic() - t0:7.2f} s", flush=True)
    return result


def drop_caches_hint() -> None:
    print("(figures with a warm page cache; `echo 3 > /proc/sys/vm/drop_caches` as root for cold ones)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--messages", type=int, default=100_000)
    ap.add_argument("--keep", type=Path, help="build in this directory and keep it")
    args = ap.parse_args()
    base = args.keep or Path(tempfile.mkdtemp(prefix="kanmon-bench-q-"))
    data_dir = base / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    config_file = base / "kanmon.toml"
    config_file.write_text(CONFIG.format(data_dir=data_dir))
    config = parse_config(config_file.read_text())
    now = time.time()
    try:
        build(data_dir, args.messages, now)
        drop_caches_hint()
        spool = Spool(data_dir, fsync=True)
        records = Records(data_dir, "bench.example.test")
        ops = QueueOps(config, spool, records, OfflineLink())
        r = timed("QueueOps.list(--older-than 2d)", lambda: ops.list(Filters(older_than=2 * 86400)))
        print(f"    {r['count']:,} listed")
        s = timed("QueueOps.summary()", lambda: ops.summary())
        print(f"    {s['total']['count']:,} messages, {len(s['rows'])} destinations")
        d = timed("QueueOps.act(delete, --domain d3.example --older-than 4d, dry run)",
                  lambda: ops.act("delete", Filters(domain="d3.example", older_than=4 * 86400), dry_run=True))
        print(f"    {d['matched']:,} would be deleted")
        records.close()
        spool.close()

        def cli(*a: str) -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, "-m", "kanmon", *a, "-c", str(config_file)], cwd=ROOT,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=True)

        out = timed("kanmon queue list --older-than 2d --json (process)", lambda: cli("queue", "list", "--older-than", "2d", "--json"))
        print(f"    {len(out.stdout) / 1e6:.1f} MB of JSON")
        timed("kanmon queue list --older-than 2d --domain d5.example", lambda: cli("queue", "list", "--older-than", "2d", "--domain", "d5.example"))
        out = timed("kanmon queue summary (process)", lambda: cli("queue", "summary"))
        print("    " + out.stdout.decode().splitlines()[1])
        out = timed("kanmon queue delete --domain d7.example --older-than 3d --yes", lambda: cli(
            "queue", "delete", "--domain", "d7.example", "--older-than", "3d", "--yes"))
        print("    " + out.stdout.decode().strip())
        timed("kanmon queue hold --reason 'User unknown' --from user1@* --yes", lambda: cli(
            "queue", "hold", "--reason", "User unknown", "--from", "user1@*", "--yes"))
        out = timed("kanmon queue hold --older-than 4d --yes", lambda: cli("queue", "hold", "--older-than", "4d", "--yes"))
        print("    " + out.stdout.decode().strip())
        out = timed("kanmon queue release --state hold --yes", lambda: cli("queue", "release", "--state", "hold", "--yes"))
        print("    " + out.stdout.decode().strip())
    finally:
        if args.keep is None:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
