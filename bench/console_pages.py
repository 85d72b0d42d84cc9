#!/usr/bin/env python3
"""Benchmark: the web console's pages and main API calls on a node with a full queue and history.

Builds a node's data_dir with N deferred messages (default 100,000: the queue files and
journals written directly, as bench/queue_ops.py builds them) and H history rows
(default 1,000,000, spread over the last 30 days, with one event per row: the records
database filled directly with SQL, in kanmon.records.store's schema), creates an admin
account, starts `kanmon serve` (delivery suspended) with the console on loopback, logs in
and asks each page and each main API call R times (default 5). Prints the median and
the slowest answer time of each, and the server's CPU seconds spent on it.

The issue's figure is every page under 200 ms. Prints figures; asserts nothing. Usage:

    python bench/console_pages.py                         # 100,000 queued, 1,000,000 history rows
    python bench/console_pages.py --messages 20000 --history 200000 --keep /tmp/kc
    python bench/console_pages.py --keep /tmp/kc --reuse  # the same data_dir again
    python bench/console_pages.py --in-time-order         # records written in time order, as a node writes them
"""

from __future__ import annotations

import argparse
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import httpx  # noqa: E402

from bench import quietfs  # noqa: E402
from kanmon.admin.accounts import AdminAccounts  # noqa: E402
from kanmon.records.store import open_db, rebuild_slots  # noqa: E402
from queue_ops import build, cpu, load, rss  # noqa: E402

CONFIG = """
[server]
hostname = "bench.example.test"
data_dir = "{data_dir}"
[smtp]
listen = ["127.0.0.1:{smtp}"]
[queue]
suspend_delivery = true
[console]
listen = "127.0.0.1:{console}"
tls = false
[[domain]]
name = "example.test"
mailboxes = ["postmaster", "alice"]
"""

PASSWORD = "bench-password-1"
SUBJECTS = ["Invoice {}", "=?UTF-8?B?6KuL5rGC5pu4?= {}", "Meeting notes {}", "【重要】お知らせ {}", "Re: order {}"]


def fill_records(data_dir: Path, rows: int, now: float, in_time_order: bool = False) -> None:
    """rows history rows and as many events over the last 30 days, in one transaction.
    By default in random time order (each row's time drawn on its own: a period's rows lie
    on pages all over the table, the worst case for a query by time); in_time_order: in the
    order of their times, as a node's records writer appends them."""
    rng = random.Random(9)
    t0 = time.monotonic()
    span = 30 * 86400

    def stamp(i: int) -> float:
        if in_time_order:
            return now - span + (i + rng.random()) * span / rows
        return now - rng.uniform(0, span)

    db = open_db(data_dir / "records.sqlite")
    statuses = ["Sent (250 2.0.0 ok)"] * 8 + ["Deferred (451 4.4.1 Connection refused)", "Bounced (550 5.1.1 User unknown)"]

    def history():
        for i in range(rows):
            ts = stamp(i)
            qid = f"H{i:014d}"
            reject = i % 25 == 0
            yield (ts, f"198.51.100.{rng.randrange(250)}", f"user{rng.randrange(2000)}@sender{rng.randrange(300)}.example",
                   f"rcpt{rng.randrange(20000)}@example.test", rng.choice(SUBJECTS).format(i), f"<{i}@bench.example>",
                   rng.randrange(1000, 200_000), "NotSpam", "Reject" if reject else "Accept", "" if reject else qid,
                   "Rejected" if reject else rng.choice(statuses), "", "mail.example", 1)

    def events():
        for i in range(rows):
            ts = stamp(i)
            yield (ts, f"H{i:014d}", "delivery", f"H{i:014d}: to=<rcpt{i % 20000}@example.test>, relay=local, "
                   "status=sent (delivered to maildir)", None, '{"status": "sent"}')

    with db:
        db.executemany("INSERT INTO history(ts, client_ip, mail_from, rcpt, subject, message_id, size, classification,"
                       " disposition, queue_id, status, auth_user, helo, first) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                       history())
        db.executemany("INSERT INTO events(ts, queue_id, kind, text, session, detail) VALUES (?,?,?,?,?,?)", events())
    rebuild_slots(db)  # the counts per quarter hour the records writer keeps for the rows it writes
    db.execute("ANALYZE")
    db.close()
    print(f"filled {rows:,} history rows and {rows:,} events in {time.monotonic() - t0:.1f} s", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--messages", type=int, default=100_000)
    ap.add_argument("--history", type=int, default=1_000_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--keep", type=Path, help="build in this directory and keep it")
    ap.add_argument("--reuse", action="store_true", help="with --keep: use what an earlier run built there")
    ap.add_argument("--in-time-order", action="store_true",
                    help="write the history rows and events in the order of their times, as a node does")
    args = ap.parse_args()
    base = args.keep or Path(tempfile.mkdtemp(prefix="kanmon-bench-console-"))
    data_dir = base / "data"
    now = time.time()
    try:
        if not args.reuse:
            data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            build(data_dir, args.messages, now)
            fill_records(data_dir, args.history, now, args.in_time_order)
            AdminAccounts(data_dir).add("bench", "admin", PASSWORD)
        smtp, console = free_port(), free_port()
        config_file = base / "kanmon.toml"
        config_file.write_text(CONFIG.format(data_dir=data_dir, smtp=smtp, console=console))
        measure(config_file, data_dir, console, args.rounds)
    finally:
        if args.keep is None:
            quietfs.remove_tree(base)


def measure(config_file: Path, data_dir: Path, port: int, rounds: int) -> None:
    print(f"load average before start: {load()}")
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "kanmon", "serve", "-c", str(config_file)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base, timeout=600) as c:
            while True:
                if proc.poll() is not None:
                    raise SystemExit(f"kanmon serve exited with {proc.returncode}")
                try:
                    if c.get("/login").status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.1)
            print(f"start until the console answers: {time.monotonic() - t0:.1f} s; RSS {rss(proc.pid) / 2**20:.0f} MB")
            page = c.get("/login").text
            token = page.split('name="csrf" value="', 1)[1].split('"', 1)[0]
            r = c.post("/login", data={"username": "bench", "password": PASSWORD, "csrf": token})
            assert r.status_code == 303, r.text
            queue = c.get("/api/v1/queue", params={"limit": 1, "offset": 50_000}).json()
            qid = queue["items"][0]["id"] if queue["items"] else ""
            print(f"{queue['count']:,} queued; load average {load()}")
            targets = [
                ("page", "/"),
                ("page", "/queue"),
                ("page", "/queue?domain=d5.example"),
                ("page", "/queue?older_than=2d&domain=d5.example&offset=1000"),
                ("page", "/queue?offset=50000"),
                ("page", "/queue?reason=User+unknown"),
                ("page", f"/queue/{qid}"),
                ("page", "/trace?q=rcpt123%40example.test"),
                ("page", "/trace?q=H00000000004242"),
                ("page", "/events"),
                ("page", "/events?grep=rcpt77%40"),
                ("page", "/alerts"),
                ("page", "/maintenance"),
                ("page", "/users"),
                ("page", "/balancer"),
                ("page", "/dns"),
                ("page", "/config"),
                ("page", "/settings"),
                ("api", "/api/v1/queue?limit=50"),
                ("api", "/api/v1/queue?domain=d5.example&limit=50&offset=2000"),
                ("api", f"/api/v1/queue/{qid}"),
                ("api", "/api/v1/trace?q=rcpt123%40example.test"),
                ("api", "/api/v1/events?since=1d&limit=100"),
                ("api", "/api/v1/stats?by=hour"),
                ("api", "/api/v1/alerts"),
                ("api", "/api/v1/maintenance"),
                ("api", "/api/v1/queue"),
            ]
            print(f"{'':4} {'path':<58} {'median':>8} {'slowest':>8} {'server CPU':>10}  status")
            for kind, path in targets:
                times, cpus, status = [], [], 0
                for _ in range(rounds):
                    c0 = cpu(proc.pid)
                    t = time.perf_counter()
                    r = c.get(path)
                    times.append(time.perf_counter() - t)
                    cpus.append(cpu(proc.pid) - c0)
                    status = r.status_code
                med = statistics.median(times)
                mark = " <- over 200 ms" if med > 0.2 else ""
                print(f"{kind:4} {path[:58]:<58} {med * 1000:6.0f} ms {max(times) * 1000:6.0f} ms "
                      f"{statistics.median(cpus) * 1000:7.0f} ms  {status}{mark}", flush=True)
            print(f"RSS of the server: {rss(proc.pid) / 2**20:.0f} MB; load average {load()}")
    finally:
        proc.terminate()
        proc.wait(120)


if __name__ == "__main__":
    main()
