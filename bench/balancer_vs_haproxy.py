#!/usr/bin/env python3
"""Benchmark: kanmon's balancer against HAProxy, side by side, on loopback.

In one run:
  1. smtp-sink (Postfix's test server) is the one real server, on 127.0.0.82:2526;
  2. HAProxy (127.0.0.80:2525, mode tcp, `option smtpchk`) and a kanmon node that only
     balances (127.0.0.81:2525, smtp checks, [balancer] processes = 0: one per core) both
     forward to it, plain TCP, no PROXY header;
  3. smtp-source -s 50 -l SIZE -m N drives each (one connection per message, smtp-source's
     default), alternating HAProxy and kanmon (the order swaps every round), for 5 KB and
     100 KB messages, ROUNDS times;
  4. per run: connections/s (N / the time smtp-source took), CPU seconds per connection
     of the balancer (user + system of its processes: HAProxy's one, kanmon's main and
     forwarding processes), and the sink's count (every message must arrive);
     then kanmon/HAProxy per round and the median of each ratio;
  5. idle RSS of each balancer (every process of it) after start, before any traffic.

Needs haproxy, smtp-source and smtp-sink (Debian: haproxy, postfix). Run as root (the
sink drops to nobody). Prints figures; asserts nothing. The machine's load average is
printed with every round: on a shared machine, read the ratios, not the absolute rates.

    python bench/balancer_vs_haproxy.py                       # 3 rounds of 5,000 messages
    python bench/balancer_vs_haproxy.py --messages 1000 --rounds 1
    python bench/balancer_vs_haproxy.py --sizes 1000000 --messages 300 [--no-splice]
    python bench/balancer_vs_haproxy.py --baseline-tree /tmp/old   # also kanmon from another checkout (A/B)
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.relay_vs_postfix import tree_rss_kb  # noqa: E402
from bench.smtpdrive import SmtpSink, wait_port  # noqa: E402

SINK = ("127.0.0.82", 2526)
HAPROXY = ("127.0.0.80", 2525)
KANMON = ("127.0.0.81", 2525)
BASELINE = ("127.0.0.83", 2525)  # --baseline-tree: kanmon from another checkout, for an A/B in the same rounds
TICKS = os.sysconf("SC_CLK_TCK")

HAPROXY_CFG = """
global
    maxconn 8000
    log stdout format raw local0 err

defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout check 2s

frontend mail
    bind {front[0]}:{front[1]}
    default_backend mail

backend mail
    option smtpchk
    default-server inter 2s fall 3 rise 1
    server sink {sink[0]}:{sink[1]} check
"""

KANMON_CFG = """
[server]
hostname = "lb.bench.test"
data_dir = "{data_dir}"

[balancer]
processes = {processes}
splice = {splice}

[[balancer.virtual_server]]
name = "mail"
listen = "{front[0]}:{front[1]}"
method = "first-alive"
health = {{ type = "smtp", interval = "2s", timeout = "2s", retries = 3 }}

[[balancer.virtual_server.real]]
address = "{sink[0]}:{sink[1]}"
mode = "active"
"""


def tree_pids(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            todo.extend(int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split())
        except OSError:
            continue
    return out


def tree_cpu(pid: int) -> float:
    """User + system CPU seconds of a process and its descendants (the ones alive now)."""
    total = 0
    for p in tree_pids(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / TICKS


class Balancer:
    def __init__(self, name: str, address: tuple[str, int], cmd: list[str], env: dict[str, str] | None = None):
        self.name, self.address = name, address
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        wait_port(*address)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def run_source(address: tuple[str, int], size: int, messages: int, sessions: int) -> float:
    t0 = time.perf_counter()
    subprocess.run(["smtp-source", "-s", str(sessions), "-l", str(size), "-m", str(messages),
                    "-f", "bench@bench.test", "-t", "sink@bench.test", f"{address[0]}:{address[1]}"],
                   check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def measure(b: Balancer, sink: SmtpSink, size: int, messages: int, sessions: int) -> dict:
    before_count = sink.count
    cpu0 = tree_cpu(b.proc.pid)
    elapsed = run_source(b.address, size, messages, sessions)
    cpu = tree_cpu(b.proc.pid) - cpu0
    deadline = time.time() + 30
    while sink.count < before_count + messages and time.time() < deadline:
        time.sleep(0.05)
    return {"cps": messages / elapsed, "cpu_ms": 1000 * cpu / messages, "arrived": sink.count - before_count}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=5000, help="messages (= connections) per run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sessions", type=int, default=50, help="smtp-source -s")
    ap.add_argument("--sizes", default="5000,100000", help="message sizes in bytes, comma-separated")
    ap.add_argument("--processes", type=int, default=0, help="kanmon's [balancer] processes (0: one per core)")
    ap.add_argument("--no-splice", action="store_true", help="kanmon's [balancer] splice = false (copy every byte)")
    ap.add_argument("--baseline-tree", type=Path, help="also run kanmon from this checkout (e.g. a worktree of "
                    "main) as 'baseline', in the same rounds: an A/B of two kanmon trees against one HAProxy")
    args = ap.parse_args()
    for tool in ("haproxy", "smtp-source", "smtp-sink"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is not installed (Debian: apt-get install haproxy postfix)")
    work = Path(tempfile.mkdtemp(prefix="kanmon-bench-lb-"))
    (work / "lb").mkdir(mode=0o700)
    (work / "base").mkdir(mode=0o700)
    (work / "haproxy.cfg").write_text(HAPROXY_CFG.format(front=HAPROXY, sink=SINK))
    (work / "lb.toml").write_text(KANMON_CFG.format(data_dir=work / "lb", front=KANMON, sink=SINK,
                                                   processes=args.processes,
                                                   splice="false" if args.no_splice else "true"))
    env_python = [sys.executable, "-m", "kanmon", "serve", "-c", str(work / "lb.toml"), "--quiet"]
    sink = SmtpSink(SINK)
    balancers: list[Balancer] = []
    try:
        balancers.append(Balancer("haproxy", HAPROXY, ["haproxy", "-db", "-f", str(work / "haproxy.cfg")]))
        balancers.append(Balancer("kanmon", KANMON, env_python, {**os.environ, "PYTHONPATH": str(ROOT)}))
        if args.baseline_tree is not None:
            (work / "base.toml").write_text(KANMON_CFG.format(data_dir=work / "base", front=BASELINE, sink=SINK,
                                                             processes=args.processes,
                                                             splice="false" if args.no_splice else "true"))
            balancers.append(Balancer("baseline", BASELINE,
                                      [sys.executable, "-m", "kanmon", "serve", "-c", str(work / "base.toml"), "--quiet"],
                                      {**os.environ, "PYTHONPATH": str(args.baseline_tree.resolve())}))
        time.sleep(3)  # both settle: first health checks done, forwarding processes started
        idle = {b.name: tree_rss_kb(b.proc.pid) / 1024 for b in balancers}
        procs = {b.name: len(tree_pids(b.proc.pid)) for b in balancers}
        print(f"cores {os.cpu_count()}, load {os.getloadavg()[0]:.1f}; idle RSS: HAProxy {idle['haproxy']:.1f} MB "
              f"({procs['haproxy']} process), kanmon {idle['kanmon']:.1f} MB ({procs['kanmon']} processes); "
              f"ratio {idle['kanmon'] / idle['haproxy']:.2f}"
              + (f"; baseline {idle['baseline']:.1f} MB" if "baseline" in idle else ""), flush=True)
        for size in (int(s) for s in args.sizes.split(",")):
            cps_ratios, cpu_ratios, base_cps, base_cpu = [], [], [], []
            for r in range(args.rounds):
                order = balancers if r % 2 == 0 else list(reversed(balancers))
                got = {}
                for b in order:
                    got[b.name] = measure(b, sink, size, args.messages, args.sessions)
                h, k = got["haproxy"], got["kanmon"]
                cps_ratios.append(k["cps"] / h["cps"])
                cpu_ratios.append(k["cpu_ms"] / h["cpu_ms"] if h["cpu_ms"] else float("nan"))
                lost = {n: args.messages - g["arrived"] for n, g in got.items() if g["arrived"] != args.messages}
                base = ""
                if "baseline" in got:
                    o = got["baseline"]
                    base_cps.append(o["cps"] / h["cps"])
                    base_cpu.append(o["cpu_ms"] / h["cpu_ms"] if h["cpu_ms"] else float("nan"))
                    base = (f" | baseline {o['cps']:7.0f} conn/s {o['cpu_ms']:.3f} ms CPU/conn, /HAProxy conn/s "
                            f"{base_cps[-1]:.2f}, CPU/conn {base_cpu[-1]:.2f}")
                print(f"{size // 1000:>4} KB round {r + 1} (load {os.getloadavg()[0]:.1f}): "
                      f"HAProxy {h['cps']:7.0f} conn/s {h['cpu_ms']:.3f} ms CPU/conn | "
                      f"kanmon {k['cps']:7.0f} conn/s {k['cpu_ms']:.3f} ms CPU/conn | "
                      f"kanmon/HAProxy conn/s {cps_ratios[-1]:.2f}, CPU/conn {cpu_ratios[-1]:.2f}" + base
                      + (f"  (not arrived: {lost})" if lost else ""), flush=True)
            print(f"{size // 1000:>4} KB median of {args.rounds}: kanmon/HAProxy conn/s "
                  f"{statistics.median(cps_ratios):.2f}, CPU per connection {statistics.median(cpu_ratios):.2f}"
                  + (f"; baseline/HAProxy conn/s {statistics.median(base_cps):.2f}, CPU per connection "
                     f"{statistics.median(base_cpu):.2f}" if base_cps else ""), flush=True)
        busy = {b.name: tree_rss_kb(b.proc.pid) / 1024 for b in balancers}
        print(f"RSS after the runs: HAProxy {busy['haproxy']:.1f} MB, kanmon {busy['kanmon']:.1f} MB"
              + (f", baseline {busy['baseline']:.1f} MB" if "baseline" in busy else ""))
    finally:
        for b in balancers:
            b.stop()
        sink.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
