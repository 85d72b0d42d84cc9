#!/usr/bin/env python3
"""Benchmark: the accept path with the edge policy's default profile, against a tree
without it (or any two kanmon trees), interleaved on the same workload.

The setup, all on loopback:
  - a dnslib DNS server (127.0.0.83:5353) answering for the sender domain (MX and A)
    and the client's PTR (forward-confirmed), the relay's only resolver (`[dns]`);
  - smtp-sink (127.0.0.82:2526) as the mail store behind the relay: it answers the
    callout probes (250) and takes the deliveries;
  - kanmon (127.0.0.81:2525) as the relay, one `[[domain]] corp.example`,
    `deliver = "relay"` to the sink, `verify = "callout"` where the tree knows the key;
    relay_networks holds only the store, so smtp-source (connecting from 127.0.0.1) is
    an internet client and gets the `default` session profile: sender domain check,
    own-domain spoof check, HELO checks, client PTR lookup, recipient verification;
  - smtp-source -s SESSIONS -l SIZE -m MESSAGES, one message per connection, from
    sender@bench-sender.example to rcpt@corp.example.

Before each timed run: the relay starts on an empty data directory, answers a sanity
MAIL from a domain that does not exist (501 5.1.8 where the policy runs; 250 in a tree
without it), and one message is sent to warm the DNS and verification caches. Then the
timed smtp-source run: accepted msg/s (until smtp-source finishes), delivered msg/s
(until the sink has every message and the queue is empty), and the CPU time the kanmon
processes used per message meanwhile (user + system, all its processes: the figure the
other work on a shared machine disturbs least; "cpu" below, lower is better).

`[smtp] greet_pause` is 0 in both trees (--greet-pause to change it): it is a fixed wait
per connection before the banner, the same in every tree, and with one message per
connection it would only measure SESSIONS / greet_pause.

Runs alternate A, B, A, B... (ROUNDS each) so that the load of the machine falls on both
alike; prints every run, then the median and spread of each tree and B/A per round.
Prints figures; asserts nothing. Needs smtp-source/smtp-sink (Debian's postfix package)
and dnslib.

    python bench/edge_policy.py --base /path/to/old/tree          # A = --base, B = this tree
    python bench/edge_policy.py --base ../i15-base --tree . --rounds 5 --messages 5000 --size 5120
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import smtplib
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.smtpdrive import SmtpSink, wait_port  # noqa: E402

RELAY = ("127.0.0.81", 2525)
SINK = ("127.0.0.82", 2526)
DNS = ("127.0.0.83", 5353)
SENDER = "sender@bench-sender.example"
RCPT = "rcpt@corp.example"

ZONE = """
bench-sender.example.       300 IN MX 10 mx.bench-sender.example.
mx.bench-sender.example.    300 IN A  192.0.2.25
1.0.0.127.in-addr.arpa.     300 IN PTR client.bench-client.example.
client.bench-client.example. 300 IN A 127.0.0.1
"""


def start_dns() -> object:
    """A dnslib zone server: the records above; NXDOMAIN for every other name."""
    from dnslib.server import DNSLogger, DNSServer
    from dnslib.zoneresolver import ZoneResolver

    server = DNSServer(ZoneResolver(ZONE), address=DNS[0], port=DNS[1],
                       logger=DNSLogger("-request,-reply,-truncated,-error,-recv,-send,-data"))
    server.start_thread()
    return server


class Tree:
    """One kanmon source tree, run with PYTHONPATH pointing at it."""

    def __init__(self, label: str, path: Path, trusted: bool = False) -> None:
        self.label = label
        self.trusted = trusted  # the client in relay_networks: the "trusted" profile, no checks
        self.path = path.resolve()
        self.env = dict(os.environ, PYTHONPATH=str(self.path))
        out = subprocess.run(
            [sys.executable, "-c",
             "import kanmon, kanmon.config as c; print(kanmon.__file__); "
             "print('verify' in c.DomainSection.model_fields); print(hasattr(c, 'LogSection'))"],
            env=self.env, capture_output=True, text=True, check=True, cwd=self.path,
        ).stdout.split()
        if not out[0].startswith(str(self.path)):
            raise SystemExit(f"{path}: python imports kanmon from {out[0]}, not from this tree")
        self.has_policy = out[1] == "True"
        self.has_log_section = out[2] == "True"
        self.log_to: str | None = None  # --log-to: [log] to, where the tree has it

    def config(self, data_dir: Path, greet_pause: str, workers: int) -> str:
        verify = 'verify = "callout"\n' if self.has_policy else ""
        return f"""
[server]
hostname = "relay.bench.test"
data_dir = "{data_dir}"
workers = {workers}
[smtp]
listen = ["{RELAY[0]}:{RELAY[1]}"]
relay_networks = ["{SINK[0]}/32"{', "127.0.0.1/32"' if self.trusted else ''}]
max_connections = 2000
min_free_disk = "1GB"
greet_pause = "{greet_pause}"
[[domain]]
name = "corp.example"
deliver = "relay"
servers = ["{SINK[0]}:{SINK[1]}"]
tls = "none"
{verify}{f"[log]{chr(10)}to = {self.log_to}{chr(10)}" if self.log_to is not None and self.has_log_section else ""}[dns]
servers = ["{DNS[0]}:{DNS[1]}"]
timeout = "2s"
[outbound]
tls = "none"
max_per_destination = 20
"""


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) used so far by a process and its live descendants."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
            todo.extend(int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split())
        except (OSError, IndexError, ValueError):
            continue
    return total


def queue_empty(data_dir: Path) -> bool:
    q = data_dir / "spool/queue"
    return not q.exists() or not any(q.iterdir())


def sanity(tree: Tree) -> str:
    """The default profile runs: a sender domain that does not exist is refused."""
    with smtplib.SMTP(*RELAY, timeout=30) as s:
        s.ehlo("client.bench-client.example")
        code, reply = s.mail("katou@nnn.con")
    want = 501 if tree.has_policy and not tree.trusted else 250
    if code != want:
        raise SystemExit(f"{tree.label}: MAIL FROM:<katou@nnn.con> got {code} {reply!r}, expected {want}")
    return f"{code} {reply.decode(errors='replace')}"


def run_one(tree: Tree, sink: SmtpSink, args: argparse.Namespace) -> dict:
    work = Path(tempfile.mkdtemp(prefix=f"bench-edge-{tree.label}-"))
    data_dir = work / "data"
    cfg = work / "kanmon.toml"
    cfg.write_text(tree.config(data_dir, args.greet_pause, args.workers))
    os.sync()
    time.sleep(2)
    proc = subprocess.Popen([sys.executable, "-m", "kanmon", "serve", "-c", str(cfg), "--quiet"],
                            stdout=subprocess.DEVNULL, env=tree.env, cwd=work)
    try:
        wait_port(*RELAY)
        check = sanity(tree)
        # Warm the caches (DNS, PTR, the verification cache) with one message.
        start = sink.count
        subprocess.run(["smtp-source", "-l", "100", "-m", "1", "-f", SENDER, "-t", RCPT,
                        f"{RELAY[0]}:{RELAY[1]}"], check=True)
        deadline = time.time() + 60
        while sink.count < start + 1 or not queue_empty(data_dir):
            if time.time() > deadline:
                raise SystemExit(f"{tree.label}: the warm-up message was not delivered")
            time.sleep(0.05)
        start = sink.count
        cpu0 = tree_cpu(proc.pid)
        t0 = time.perf_counter()
        subprocess.run(["smtp-source", "-s", str(args.sessions), "-l", str(args.size), "-m", str(args.messages),
                        "-f", SENDER, "-t", RCPT, f"{RELAY[0]}:{RELAY[1]}"], check=True)
        t_acc = time.perf_counter() - t0
        cpu_acc = tree_cpu(proc.pid) - cpu0
        deadline = time.time() + 1800
        while sink.count - start < args.messages or not queue_empty(data_dir):
            if time.time() > deadline:
                raise SystemExit(f"{tree.label}: not delivered after 1800 s")
            time.sleep(0.05)
        t_del = time.perf_counter() - t0
        cpu_del = tree_cpu(proc.pid) - cpu0
        return {"accepted": args.messages / t_acc, "delivered": args.messages / t_del,
                "cpu_acc": cpu_acc / args.messages * 1000, "cpu": cpu_del / args.messages * 1000, "sanity": check}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        if args.keep:
            print(f"  kept {work}", flush=True)
        else:
            shutil.rmtree(work, ignore_errors=True)


def describe(xs: list[float]) -> str:
    return (f"median {statistics.median(xs):7.4g}  min {min(xs):7.4g}  max {max(xs):7.4g}  "
            f"spread {(max(xs) - min(xs)) / statistics.median(xs) * 100:4.0f} %")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    here = Path(__file__).resolve().parents[1]
    ap.add_argument("--base", type=Path, required=True, help="tree A (e.g. a worktree of the commit before the policy)")
    ap.add_argument("--tree", type=Path, default=here, help="tree B (default: this checkout)")
    ap.add_argument("--rounds", type=int, default=4, help="runs of each tree, alternating")
    ap.add_argument("--messages", type=int, default=5000)
    ap.add_argument("--size", type=int, default=5120, help="message payload in bytes (smtp-source -l)")
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--workers", type=int, default=1, help="[server] workers")
    ap.add_argument("--greet-pause", default="0s", help="[smtp] greet_pause in both trees")
    ap.add_argument("--trusted", default="", help="A, B or AB: put the client in that tree's relay_networks "
                    "(the trusted profile: no sender, HELO, PTR checks; recipient verification still runs)")
    ap.add_argument("--log-to", default=None, help='[log] to in the trees that have it, e.g. \'[]\' (no log file; '
                    "the default writes every event line to data_dir/log/kanmon.log too)")
    ap.add_argument("--keep", action="store_true", help="keep each run's data directory (to read its logs)")
    args = ap.parse_args()
    if not shutil.which("smtp-source") or not shutil.which("smtp-sink"):
        raise SystemExit("smtp-source/smtp-sink not found: apt-get install postfix (No configuration)")
    trees = [Tree("A", args.base, "A" in args.trusted), Tree("B", args.tree, "B" in args.trusted)]
    for t in trees:
        t.log_to = args.log_to
    for t in trees:
        print(f"{t.label}: {t.path} (edge policy: {'yes' if t.has_policy else 'no'}"
              f"{'; client in relay_networks' if t.trusted else ''})", flush=True)
    print(f"load before: {Path('/proc/loadavg').read_text().strip()}", flush=True)
    dns = start_dns()
    sink = SmtpSink(SINK)
    results: dict[str, list[dict]] = {"A": [], "B": []}
    try:
        for rnd in range(args.rounds):
            for t in trees:
                r = run_one(t, sink, args)
                results[t.label].append(r)
                print(f"round {rnd + 1} {t.label}: accepted {r['accepted']:7.0f} msg/s  delivered "
                      f"{r['delivered']:7.0f} msg/s  kanmon CPU {r['cpu']:5.2f} ms/msg "
                      f"({r['cpu_acc']:5.2f} until accepted)  (load {Path('/proc/loadavg').read_text().split()[0]}; "
                      f"sanity MAIL: {r['sanity']})", flush=True)
    finally:
        sink.stop()
        dns.stop()
    print()
    print(f"smtp-source -s {args.sessions} -m {args.messages} -l {args.size}, one message per connection, "
          f"workers = {args.workers}, greet_pause = {args.greet_pause}, {args.rounds} rounds A/B alternating")
    for key in ("accepted", "delivered", "cpu"):
        for t in trees:
            print(f"  {key:9} {t.label}: {describe([r[key] for r in results[t.label]])}")
        ratios = [b[key] / a[key] for a, b in zip(results["A"], results["B"])]
        print(f"  {key:9} B/A per round: {' '.join(f'{x:.2f}' for x in ratios)}  (median {statistics.median(ratios):.2f}; "
              f"B/A of medians {statistics.median(r[key] for r in results['B']) / statistics.median(r[key] for r in results['A']):.2f})")
    print(f"load after: {Path('/proc/loadavg').read_text().strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
