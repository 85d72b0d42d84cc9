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
file, the rest is in the journal).

Then, with --running (the default; --no-running skips it), the same spool under a
running `kanmon serve` (delivery suspended): the time from start until the control socket
answers (recovery reads every envelope and journal once), and the same operations through
the control socket, which a running node answers from its queue index (kanmon.spool.index)
instead of reading one queue file and one journal per message: each request timed as the
server answers it (ControlClient) and as the command an admin types (a process).

Prints figures; asserts nothing. Usage:

    python bench/queue_ops.py                      # 100,000 messages in a temporary data_dir
    python bench/queue_ops.py --messages 20000 --keep /tmp/kq
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import quietfs  # noqa: E402
from kanmon.admin.queue_ops import Filters, OfflineLink, QueueOps  # noqa: E402
from kanmon.config import parse_config  # noqa: E402
from kanmon.model import ClientInfo, Envelope, new_queue_id  # noqa: E402
from kanmon.records.store import Records  # noqa: E402
from kanmon.spool import journal  # noqa: E402
from kanmon.spool.store import Spool, encode_queue_file  # noqa: E402

CONFIG = """
[server]
hostname = "bench.example.test"
data_dir = "{data_dir}"
[[domain]]
name = "example.test"
mailboxes = ["postmaster"]
"""

RUNNING = """
[smtp]
listen = ["127.0.0.1:{port}"]
[queue]
suspend_delivery = true
"""


def build(data_dir: Path, n: int, now: float) -> None:
    """N deferred messages written straight into spool/queue/ and spool/state/ (the queue
    file and journal formats of kanmon.spool.store and kanmon.spool.journal, no fsync: a
    bench, not a node), ~1,000 files a second faster than through the Spool API."""
    rng = random.Random(4)
    spool = Spool(data_dir, fsync=False)
    spool.close()
    queue_dir, state_dir = str(spool.queue), str(spool.state_dir)
    body = (b"Subject: bench\r\nFrom: sender@example.test\r\n\r\n" + b"x" * 76 + b"\r\n") * 20
    replies = ["451 4.4.1 Connection refused by 192.0.2.{}", "450 4.1.1 <u{}@x>: Recipient address rejected: User unknown",
               "421 4.7.0 Try again later ({})"]
    client = ClientInfo(ip="127.0.0.1", helo="pc", proto="ESMTP")
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    t0 = time.monotonic()
    seen: set[str] = set()
    for i in range(n):
        arrived = now - rng.uniform(0, 5 * 86400)
        qid = new_queue_id(arrived)
        while qid in seen:
            qid = new_queue_id(arrived)
        seen.add(qid)
        env = Envelope(
            mail_from=f"user{rng.randrange(500)}@example.test",
            rcpts=[f"r{i}@d{rng.randrange(20)}.example"] + ([f"c{i}@d{rng.randrange(20)}.example"] if i % 5 == 0 else []),
            client=client, received_at=arrived,
        )
        reply = rng.choice(replies).format(rng.randrange(250))
        state = journal.encode([
            *(journal.Result(arrived + 60, r, "deferred", reply, "", "esmtp", "") for r in env.rcpts),
            journal.Attempt(arrived + 60, 1, now + rng.uniform(0, 3600)),
        ])
        for path, data in ((f"{queue_dir}/{qid}", encode_queue_file(env, body)), (f"{state_dir}/{qid}", state)):
            fd = os.open(path, flags, 0o600)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
        if i and i % 100_000 == 0:
            print(f"    {i:,} written ({time.monotonic() - t0:.0f} s)", flush=True)
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
    ap.add_argument("--reuse", action="store_true", help="with --keep: use the spool built there by an earlier run")
    ap.add_argument("--running", action=argparse.BooleanOptionalAction, default=True,
                    help="also time the operations through a running server (its queue index)")
    ap.add_argument("--recovery-only", action="store_true",
                    help="with --running: stop the server once recovery is timed (rounds of the start alone)")
    ap.add_argument("--offline", action=argparse.BooleanOptionalAction, default=True,
                    help="time the operations on the files (a stopped node)")
    args = ap.parse_args()
    base = args.keep or Path(tempfile.mkdtemp(prefix="kanmon-bench-q-"))
    data_dir = base / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    config_file = base / "kanmon.toml"
    config_file.write_text(CONFIG.format(data_dir=data_dir))
    config = parse_config(config_file.read_text())
    now = time.time()
    try:
        if args.reuse:
            print(f"reusing the spool in {data_dir} (--messages must say how many it holds)")
        else:
            build(data_dir, args.messages, now)
        drop_caches_hint()
        if args.offline:
            offline(config, config_file, data_dir)
        if args.running:
            running(config_file, data_dir, args.messages, args.recovery_only)
    finally:
        if args.keep is None:
            quietfs.remove_tree(base)


def offline(config, config_file: Path, data_dir: Path) -> None:
    print("-- a stopped node: the file scan")
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


def running(config_file: Path, data_dir: Path, n: int, recovery_only: bool = False) -> None:
    """The same spool under `kanmon serve`: recovery, then the operations from its index."""
    import socket  # noqa: PLC0415

    from kanmon.control import ControlClient, NoServer  # noqa: PLC0415

    print("-- a running node: the queue index, through the control socket")
    print(f"    load average before start: {load()}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    served = config_file.with_name("serve.toml")
    served.write_text(config_file.read_text() + RUNNING.format(port=port))
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "kanmon", "serve", "-c", str(served)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            try:
                with ControlClient(data_dir, timeout=600) as c:
                    if c.request("summary", {"filters": {"ids": []}}).get("ok"):
                        break
            except (NoServer, OSError):
                pass
            if proc.poll() is not None:
                raise SystemExit(f"kanmon serve exited with {proc.returncode}")
            time.sleep(0.05)
        print(f"{'start until the control socket answers (recovery)':<58} {time.monotonic() - t0:7.2f} s")
        print(f"    server CPU time so far {cpu(proc.pid):.1f} s (+ {cpu(proc.pid, children=True):.1f} s in its ended "
              f"children: recovery's readers); RSS {rss(proc.pid) / 2**20:.0f} MB, "
              f"peak {rss(proc.pid, 'VmHWM') / 2**20:.0f} MB; load average {load()}")
        if recovery_only:
            return

        def ask(op: str, **a):
            with ControlClient(data_dir, timeout=600) as c:
                r = c.request(op, a)
            assert r.get("ok"), r
            return r["result"]

        for rnd in range(3):
            s = timed(f"summary (control socket), round {rnd + 1}", lambda: ask("summary"))
        print(f"    {s['total']['count']:,} messages, {len(s['rows'])} destinations")
        r = timed("list --older-than 2d (control socket)", lambda: ask("list", filters={"older_than": 2 * 86400}))
        print(f"    {r['count']:,} listed; server RSS {rss(proc.pid) / 2**20:.0f} MB, "
              f"peak {rss(proc.pid, 'VmHWM') / 2**20:.0f} MB")
        for rnd in range(3):
            r = timed(f"list --older-than 2d --domain d5.example (control socket), round {rnd + 1}",
                      lambda: ask("list", filters={"older_than": 2 * 86400, "domain": "d5.example"}))
        print(f"    {r['count']:,} listed")
        for offset in (0, 50_000):
            r = timed(f"list --domain d5.example, 50 from {offset:,} (a console page)",
                      lambda: ask("list", filters={"domain": "d5.example"}, offset=offset, limit=50))
            print(f"    {len(r['items'])} of {r['count']:,}")
        r = timed("list, 50 from 0, whole queue (a console page)", lambda: ask("list", filters={}, offset=0, limit=50))

        def cli(*a: str) -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, "-m", "kanmon", *a, "-c", str(served)], cwd=ROOT,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=True)

        for rnd in range(3):
            out = timed(f"kanmon queue summary (process), round {rnd + 1}", lambda: cli("queue", "summary"))
        print("    " + out.stdout.decode().splitlines()[1])
        timed("kanmon queue list --older-than 2d --domain d5.example (process)",
              lambda: cli("queue", "list", "--older-than", "2d", "--domain", "d5.example"))
        # About 100,000 messages chosen by a filter (arrival is spread evenly over 5 days).
        if n > 100_000:
            days = 5 * (1 - 100_000 / n)
            selection, flags = {"older_than": days * 86400}, ["--older-than", f"{days * 24 * 60:.0f}m"]
        else:
            selection, flags = {"mail_from": "*@example.test"}, ["--from", "*@example.test"]
        r = timed(f"hold {' '.join(flags)} (control socket)",
                  lambda: ask("act", action="hold", filters=selection, source="bench"))
        print(f"    {len(r['acted']):,} held")
        r = timed(f"release {' '.join(flags)} (control socket)",
                  lambda: ask("act", action="release", filters=selection, source="bench"))
        print(f"    {len(r['acted']):,} released")
        out = timed(f"kanmon queue hold {' '.join(flags)} --yes (process)", lambda: cli("queue", "hold", *flags, "--yes"))
        print("    " + out.stdout.decode().strip())
        out = timed("kanmon queue release --state hold --yes (process)", lambda: cli("queue", "release", "--state", "hold", "--yes"))
        print("    " + out.stdout.decode().strip())
        print(f"    RSS of the server: {rss(proc.pid) / 2**20:.0f} MB, peak {rss(proc.pid, 'VmHWM') / 2**20:.0f} MB; "
              f"load average {load()}")
    finally:
        proc.terminate()
        proc.wait(120)


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def cpu(pid: int, children: bool = False) -> float:
    """User + system CPU seconds of a process (children: of its children it waited for)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    at = 13 if children else 11
    return (int(fields[at]) + int(fields[at + 1])) / os.sysconf("SC_CLK_TCK")


def rss(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


if __name__ == "__main__":
    main()
