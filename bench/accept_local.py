#!/usr/bin/env python3
"""Benchmark: how fast kanmon accepts mail (each 250 only after the durable spool write)
and how fast that mail reaches a local Maildir.

Drives `kanmon serve` with Postfix's smtp-source (installs Debian's postfix package for
it, with "No configuration" so no Postfix daemon starts). Prints the figures; nothing
asserts them. Usage:

    python bench/accept_local.py                       # 100 KB, 20 sessions, 20,000 messages
    python bench/accept_local.py --size 5120 --messages 5000
    python bench/accept_local.py --messages 10000 --rounds 5

Before it measures, it waits out the few minutes after an earlier bench deleted its
files when the file system is ext4 without a journal (bench/quietfs.py says why);
--no-wait measures at once.

Only loopback addresses are used (127.0.0.60 by default).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import quietfs  # noqa: E402


def ensure_smtp_source() -> str:
    path = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
    if os.path.exists(path):
        return path
    print("installing Debian's postfix for smtp-source (No configuration: no daemon starts)...", flush=True)
    subprocess.run(["debconf-set-selections"], input=b"postfix postfix/main_mailer_type select No configuration\n",
                   check=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "postfix"], check=True, env=env)
    return "/usr/sbin/smtp-source"


def tree(pid: int) -> list[int]:
    """A process and its live descendants (children of every thread: the SMTP receiver
    processes); one that has ended is not listed."""
    pids = [pid]
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                pids += tree(int(child))
    except OSError:
        pass
    return pids


def rss_kb(pid: int) -> int:
    """RSS of a process and its descendants."""
    total = 0
    for p in tree(pid):
        try:
            total += next(int(line.split()[1]) for line in Path(f"/proc/{p}/status").read_text().splitlines()
                          if line.startswith("VmRSS:"))
        except (OSError, StopIteration):
            pass
    return total


def cpu_s(pid: int) -> float:
    """CPU time (user + system, seconds) of a process and its descendants so far (kanmon's
    receivers live as long as the node, so none has ended and taken its time with it)."""
    total = 0.0
    for p in tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def count_files(d: Path) -> int:
    try:
        return sum(1 for _ in os.scandir(d))
    except FileNotFoundError:
        return 0


def run_once(args: argparse.Namespace, smtp_source: str, work: Path) -> dict[str, float]:
    """One run of kanmon in work/ (left for the caller to delete); its figures."""
    cfg = work / "kanmon.toml"
    cfg.write_text(f"""
[server]
hostname = "bench.example.test"
data_dir = "{work / 'data'}"
workers = {args.workers}
[smtp]
listen = ["{args.host}:{args.port}"]
relay_networks = ["127.0.0.0/8"]
max_connections_per_ip = 1000
min_free_disk = "1GB"
[[domain]]
name = "example.test"
mailboxes = ["bench"]
[queue]
suspend_delivery = {"true" if args.hold else "false"}
""")
    proc = subprocess.Popen([sys.executable, "-m", "kanmon", "serve", "-c", str(cfg), "--quiet"],
                            stdout=subprocess.DEVNULL)
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss_kb(proc.pid))
            time.sleep(0.2)

    threading.Thread(target=sample, daemon=True).start()
    try:
        deadline = time.time() + 20
        while time.time() < deadline:
            r = subprocess.run(["bash", "-c", f"exec 3<>/dev/tcp/{args.host}/{args.port}"], capture_output=True)
            if r.returncode == 0:
                break
            time.sleep(0.1)
        new = work / "data/mailboxes/example.test/bench/new"
        cpu0 = cpu_s(proc.pid)
        t0 = time.perf_counter()
        subprocess.run([smtp_source, "-s", str(args.sessions), "-l", str(args.size), "-m", str(args.messages),
                        "-f", "sender@remote.example", "-t", "bench@example.test", f"{args.host}:{args.port}"],
                       check=True)
        t_accept = time.perf_counter() - t0
        while not args.hold and count_files(new) < args.messages:
            if time.perf_counter() - t0 > 600:
                print(f"gave up: {count_files(new)} of {args.messages} delivered after 600 s")
                break
            time.sleep(0.05)
        t_deliver = time.perf_counter() - t0
        delivered = count_files(new)
        cpu = cpu_s(proc.pid) - cpu0
    finally:
        stop.set()
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    return {"accepted": args.messages / t_accept, "t_accept": t_accept, "delivered": delivered / t_deliver,
            "n_delivered": delivered, "t_deliver": t_deliver, "cpu_ms": cpu / args.messages * 1000,
            "rss_mb": peak[0] / 1024}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=20000)
    ap.add_argument("--size", type=int, default=102400, help="message size in bytes (smtp-source -l)")
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--host", default="127.0.0.60")
    ap.add_argument("--port", type=int, default=2526)
    ap.add_argument("--rounds", type=int, default=1,
                    help="runs back to back, each on a new data directory; all are deleted after the last")
    ap.add_argument("--keep", action="store_true", help="keep the data directories")
    ap.add_argument("--no-wait", action="store_true",
                    help="measure at once even if a bench deleted its files minutes ago (bench/quietfs.py)")
    ap.add_argument("--hold", action="store_true", help="receive only: [queue] suspend_delivery = true")
    ap.add_argument("--workers", type=int, default=1, help="[server] workers (SMTP receiver processes)")
    args = ap.parse_args()

    smtp_source = ensure_smtp_source()
    base = Path(tempfile.mkdtemp(prefix="kanmon-bench-"))
    quietfs.wait_quiet(base, wait=not args.no_wait)
    print(f"kanmon serve, [server] workers = {args.workers}", flush=True)
    print(f"kanmon accept-to-Maildir, {args.messages} x {args.size} bytes, {args.sessions} sessions, fsync on",
          flush=True)
    results = []
    try:
        for n in range(1, args.rounds + 1):
            work = base / f"round{n}"
            work.mkdir()
            r = run_once(args, smtp_source, work)
            results.append(r)
            print(f"round {n} ({time.strftime('%H:%M:%S', time.gmtime())} UTC, load {os.getloadavg()[0]:.1f})")
            print(f"  accepted : {r['accepted']:8.0f} msg/s  ({r['t_accept']:.1f} s until smtp-source finished)")
            print(f"  delivered: {r['delivered']:8.0f} msg/s  ({r['n_delivered']} in Maildir after"
                  f" {r['t_deliver']:.1f} s)")
            print(f"  kanmon CPU: {r['cpu_ms']:7.2f} ms per message (all its processes, user + system)")
            print(f"  peak RSS : {r['rss_mb']:8.0f} MB", flush=True)
    finally:
        if args.keep:
            print(f"kept in {base}")
        else:
            quietfs.remove_tree(base)
    if len(results) > 1:
        med = {k: statistics.median(r[k] for r in results) for k in ("accepted", "delivered", "cpu_ms")}
        print(f"medians: accepted {med['accepted']:.0f} msg/s, delivered {med['delivered']:.0f} msg/s,"
              f" {med['cpu_ms']:.2f} ms CPU per message")
    return 0


if __name__ == "__main__":
    sys.exit(main())
