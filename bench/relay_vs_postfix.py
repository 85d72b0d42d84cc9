#!/usr/bin/env python3
"""Benchmark: kanmon as a relay against Postfix, side by side, on loopback.

In one run:
  1. smtp-sink (Postfix's test server) is the next hop, on 127.0.0.72:2526;
  2. kanmon (127.0.0.71:2525) and a private Postfix instance (127.0.0.70:2525) relay
     everything to it (kanmon: smarthost; Postfix: relayhost), both with their queue
     fsynced (Postfix's default; kanmon never answers 250 before its group commit);
  3. smtp-source -s 20 -l SIZE -m N drives each, alternating kanmon and Postfix, for
     100 KB and 5 KB messages, ROUNDS times;
  4. per run: accepted msg/s (until smtp-source finishes), delivered msg/s (until the sink
     has every message and the queue is empty), peak RSS (all processes of the system),
     CPU per message (user + system, all its processes) and connections to the next hop;
     then kanmon/Postfix per round and the median;
  5. separately: 5,000 idle SMTP connections held by kanmon (RSS), and receive-only
     throughput with delivery held (kanmon: [queue] suspend_delivery; Postfix:
     defer_transports = smtp).

It installs Debian's postfix (with "No configuration": the system's own Postfix does not
start) when smtp-source is missing. Run as root. Prints figures; asserts nothing.

    python bench/relay_vs_postfix.py                    # the full run (20,000 messages)
    python bench/relay_vs_postfix.py --messages 3000 --rounds 1
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import signal
import socket
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
from bench.smtpdrive import SmtpSink, wait_port  # noqa: E402

SINK = ("127.0.0.72", 2526)
POSTFIX = ("127.0.0.70", 2525)
KANMON = ("127.0.0.71", 2525)


def sh(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, **kw)


def ensure_postfix() -> None:
    if shutil.which("smtp-source") and Path("/usr/lib/postfix/sbin/master").exists():
        return
    print("installing Debian's postfix (No configuration) ...", flush=True)
    sh(["debconf-set-selections"], input=b"postfix postfix/main_mailer_type select No configuration\n")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    sh(["apt-get", "update", "-qq"], env=env)
    sh(["apt-get", "install", "-y", "-qq", "postfix"], env=env)


def tree_rss_kb(pid: int) -> int:
    """RSS of a process and all its descendants."""
    total = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
            todo.extend(int(c) for c in children)
        except OSError:
            continue
    return total


def tree_cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of a process, its reaped children and its live descendants."""
    total = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rpartition(")")[2].split()
            total += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
            todo.extend(int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split())
        except (OSError, ValueError):
            continue
    return total / os.sysconf("SC_CLK_TCK")


class PeakRss:
    def __init__(self, pids_fn):
        self.pids_fn = pids_fn
        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, sum(tree_rss_kb(p) for p in self.pids_fn()))
            time.sleep(0.2)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


# ---------------------------------------------------------------------------
# the two systems


class Postfix:
    name = "postfix"

    def __init__(self, work: Path, hold: bool = False):
        self.dir = work / "postfix"
        etc = self.dir / "etc"
        etc.mkdir(parents=True)
        (self.dir / "spool").mkdir()
        (self.dir / "data").mkdir()
        shutil.chown(self.dir / "data", "postfix")
        for p in (work, self.dir):
            os.chmod(p, 0o755)
        master = []
        for line in Path("/etc/postfix/master.cf").read_text().splitlines():
            if line and not line.startswith(("#", " ", "\t")):
                f = line.split()
                if len(f) >= 8:
                    if f[0] == "smtp" and f[1] == "inet":
                        f[0] = f"{POSTFIX[0]}:{POSTFIX[1]}"
                    f[4] = "n"  # no chroot
                    line = " ".join(f)
            master.append(line)
        (etc / "master.cf").write_text("\n".join(master) + "\n")
        (etc / "main.cf").write_text(f"""compatibility_level = 3.6
queue_directory = {self.dir}/spool
data_directory = {self.dir}/data
command_directory = /usr/sbin
daemon_directory = /usr/lib/postfix/sbin
meta_directory = /etc/postfix
shlib_directory = /usr/lib/postfix
mail_owner = postfix
setgid_group = postdrop
inet_interfaces = all
inet_protocols = ipv4
myhostname = postfix.bench.test
mydestination =
mynetworks = 127.0.0.0/8
relayhost = [{SINK[0]}]:{SINK[1]}
smtpd_relay_restrictions = permit_mynetworks, reject
alias_maps =
alias_database =
local_recipient_maps =
smtp_tls_security_level = none
smtpd_tls_security_level = none
maillog_file_prefixes = {work}
maillog_file = {self.dir}/maillog
{"defer_transports = smtp" if hold else ""}
""")
        self.etc = etc

    def postfix(self, *args: str) -> None:
        # Postfix reports its errors to syslog unless stderr is a terminal: give it one.
        subprocess.run(["script", "-qc", " ".join(["postfix", "-c", str(self.etc), *args]), "/dev/null"],
                       check=True, stdout=subprocess.DEVNULL)

    def start(self) -> None:
        self.postfix("start")
        wait_port(*POSTFIX)

    def stop(self) -> None:
        self.postfix("stop")
        time.sleep(1)

    def pids(self) -> list[int]:
        try:
            return [int((self.dir / "spool/pid/master.pid").read_text().split()[0])]
        except (OSError, ValueError, IndexError):
            return []

    def queue_empty(self) -> bool:
        spool = self.dir / "spool"
        return not any(any(True for _ in (spool / d).rglob("*") if _.is_file())
                       for d in ("incoming", "active", "deferred", "maildrop") if (spool / d).exists())


class Kanmon:
    name = "kanmon"

    workers = 1  # --workers
    outbound = ""  # more [outbound] lines (--no-connection-cache)
    delivery_workers: int | None = None  # --delivery-workers (None: kanmon's default)

    def __init__(self, work: Path, hold: bool = False):
        self.dir = work / "kanmon"
        self.dir.mkdir()
        self.cfg = self.dir / "kanmon.toml"
        self.cfg.write_text(f"""
[server]
hostname = "kanmon.bench.test"
data_dir = "{self.dir / 'data'}"
workers = {self.workers}
{"" if self.delivery_workers is None else f"delivery_workers = {self.delivery_workers}"}
[smtp]
listen = ["{KANMON[0]}:{KANMON[1]}"]
relay_networks = ["127.0.0.0/8"]
max_connections = 6000
max_connections_per_ip = 6000
min_free_disk = "1GB"
[outbound]
smarthost = ["{SINK[0]}:{SINK[1]}"]
tls = "none"
max_per_destination = 20
{self.outbound}
[queue]
suspend_delivery = {"true" if hold else "false"}
""")
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "kanmon", "serve", "-c", str(self.cfg), "--quiet"],
                                     stdout=subprocess.DEVNULL)
        wait_port(*KANMON)

    def stop(self) -> None:
        if self.proc:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(60)

    def pids(self) -> list[int]:
        return [self.proc.pid] if self.proc else []

    def queue_empty(self) -> bool:
        q = self.dir / "data/spool/queue"
        return not q.exists() or not any(q.iterdir())


def run_one(system, sink: SmtpSink, size: int, messages: int, sessions: int, hold: bool = False) -> dict:
    host, port = (KANMON if system.name == "kanmon" else POSTFIX)
    # Start every run from a clean disk: the previous run's writeback must not be
    # charged to this one (both systems flush their queue files; kanmon with syncfs).
    os.sync()
    time.sleep(2)
    system.start()
    try:
        start_count, start_sessions = sink.count, sink.sessions
        # The start's own CPU (imports, child processes getting ready) is not the messages':
        # wait until the system is idle (under 2 % of a core over half a second).
        cpu0 = sum(tree_cpu_seconds(p) for p in system.pids())
        for _ in range(120):
            time.sleep(0.5)
            cpu1 = sum(tree_cpu_seconds(p) for p in system.pids())
            cpu0, settled = cpu1, cpu1 - cpu0 < 0.01
            if settled:
                break
        with PeakRss(system.pids) as rss:
            t0 = time.perf_counter()
            sh(["smtp-source", "-s", str(sessions), "-l", str(size), "-m", str(messages),
                "-f", "sender@bench.example", "-t", "rcpt@far.example", f"{host}:{port}"])
            t_acc = time.perf_counter() - t0
            t_del = None
            if not hold:
                deadline = time.time() + 1800
                while time.time() < deadline:
                    if sink.count - start_count >= messages and system.queue_empty():
                        break
                    time.sleep(0.05)
                t_del = time.perf_counter() - t0
        cpu = sum(tree_cpu_seconds(p) for p in system.pids()) - cpu0
    finally:
        system.stop()
    # smtp-sink counts a session when it ends: after the stop, cached ones end too.
    last, deadline = -1, time.time() + 3
    while time.time() < deadline and sink.sessions != last:
        last = sink.sessions
        time.sleep(0.5)
    return {"accepted": messages / t_acc, "delivered": (messages / t_del) if t_del else None,
            "rss_mb": rss.peak / 1024, "cpu_ms": 1000 * cpu / messages,
            "connections": sink.sessions - start_sessions}


def idle_connections(count: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="kanmon-idle-"))
    k = Kanmon(work)
    k.start()
    socks = []
    try:
        before = sum(tree_rss_kb(p) for p in k.pids())
        for i in range(count):
            s = socket.create_connection(KANMON, timeout=10, source_address=(f"127.0.1.{1 + i % 250}", 0))
            socks.append(s)
        for s in socks:
            s.recv(100)  # the banner: the server holds this connection
        time.sleep(1)
        after = sum(tree_rss_kb(p) for p in k.pids())
        print(f"idle connections: {count} held; kanmon RSS {before / 1024:.0f} MB before, {after / 1024:.0f} MB with them "
              f"({(after - before) / count:.1f} KB each)")
    finally:
        for s in socks:
            s.close()
        k.stop()
        quietfs.remove_tree(work)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=20000)
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sizes", default="102400,5120")
    ap.add_argument("--idle", type=int, default=5000, help="idle connections to hold (0: skip)")
    ap.add_argument("--workers", type=int, default=1, help="kanmon's [server] workers")
    ap.add_argument("--no-wait", action="store_true",
                    help="measure at once even if a bench deleted its files minutes ago (bench/quietfs.py)")
    ap.add_argument("--no-connection-cache", action="store_true",
                    help="kanmon opens a new connection to the next hop for each message")
    ap.add_argument("--delivery-workers", type=int, default=None,
                    help="kanmon's [server] delivery_workers (default: kanmon's default, 0: the main process delivers)")
    args = ap.parse_args()
    Kanmon.workers = args.workers
    Kanmon.delivery_workers = args.delivery_workers
    if args.no_connection_cache:
        Kanmon.outbound = "connection_cache = false"
    if os.geteuid() != 0:
        raise SystemExit("run as root (Postfix and smtp-sink need it)")
    ensure_postfix()
    quietfs.wait_quiet(Path(tempfile.gettempdir()), wait=not args.no_wait)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # kanmon inherits it; 5,000 sockets need it
    if hard < 2 * args.idle + 100:
        print(f"note: open-files limit {hard}: idle connections reduced", flush=True)
        args.idle = max(0, (hard - 100) // 2)
    sink = SmtpSink(SINK)
    results: dict[int, list[tuple[dict, dict]]] = {}
    try:
        for size in (int(s) for s in args.sizes.split(",")):
            results[size] = []
            for rnd in range(args.rounds):
                pair = {}
                for cls in (Kanmon, Postfix):
                    work = Path(tempfile.mkdtemp(prefix=f"bench-{cls.name}-"))
                    try:
                        pair[cls.name] = run_one(cls(work), sink, size, args.messages, args.sessions)
                    finally:
                        quietfs.remove_tree(work)
                    r = pair[cls.name]
                    print(f"size {size:>6} round {rnd + 1} {cls.name:8} accepted {r['accepted']:7.0f} msg/s  "
                          f"delivered {r['delivered']:7.0f} msg/s  peak RSS {r['rss_mb']:5.0f} MB  "
                          f"CPU {r['cpu_ms']:.2f} ms/msg  next-hop connections {r['connections']}", flush=True)
                results[size].append((pair["kanmon"], pair["postfix"]))
        print()
        print(f"smtp-source -s {args.sessions} -m {args.messages}, {args.rounds} rounds, fsync on, loopback")
        for size, rounds in results.items():
            acc = [k["accepted"] / p["accepted"] for k, p in rounds]
            dlv = [k["delivered"] / p["delivered"] for k, p in rounds]
            print(f"  {size // 1024:>4} KB: kanmon/postfix accepted {' '.join(f'{x:.2f}' for x in acc)} "
                  f"(median {statistics.median(acc):.2f}); delivered {' '.join(f'{x:.2f}' for x in dlv)} "
                  f"(median {statistics.median(dlv):.2f}); kanmon peak RSS {max(k['rss_mb'] for k, _ in rounds):.0f} MB")
        print()
        for cls in (Kanmon, Postfix):
            work = Path(tempfile.mkdtemp(prefix=f"bench-hold-{cls.name}-"))
            try:
                r = run_one(cls(work, hold=True), sink, 102400, args.messages, args.sessions, hold=True)
            finally:
                quietfs.remove_tree(work)
            print(f"receive only (delivery held), 100 KB: {cls.name:8} {r['accepted']:7.0f} msg/s accepted")
    finally:
        sink.stop()
    if args.idle:
        idle_connections(args.idle)
    return 0


if __name__ == "__main__":
    sys.exit(main())
