#!/usr/bin/env python3
"""Benchmark: relay throughput with the records in PostgreSQL (`[records] url`) against
the node's SQLite only, on loopback.

The same run as bench/relay_vs_postfix.py (its kanmon relay, smtp-sink as the next hop,
smtp-source -s 20 -l 100 KB driving it, the queue fsynced), once with the records in the
node's SQLite only and once with `[records] url` pointing at a PostgreSQL of its own
(Debian's package, initdb in a temporary directory as tests/support/postgres.py does,
on 127.0.0.81, fsync on unless --pg-fsync off), alternating SQLite and PostgreSQL
ROUNDS times. Per run: accepted and delivered msg/s, kanmon's CPU per message (every
process of the node) and PostgreSQL's (its server processes), and whether every
record reached PostgreSQL; then PostgreSQL/SQLite per round and the median. The issue's
figure: records in PostgreSQL must not cost more than 10 % of throughput.

Run as root (smtp-sink, PostgreSQL's user), best inside a private network namespace so
that the fixed loopback ports are free:

    unshare -n sh -c 'ip link set lo up && python bench/records_pg.py --messages 2000 --rounds 3'

Prints figures; asserts nothing.
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

from bench.relay_vs_postfix import KANMON, SINK, Kanmon, PeakRss  # noqa: E402
from bench.smtpdrive import SmtpSink  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def tree_cpu(pid: int) -> float:
    """CPU seconds of a process and its descendants (those still running, and what the
    ones that ended left in their parents' counts)."""
    total = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
            todo.extend(int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split())
        except (OSError, ValueError):
            continue
    return total / TICK


class Postgres:
    """A PostgreSQL cluster of the bench's own (tests.support.postgres.PgServer)."""

    def __init__(self, fsync: bool):
        from tests.support.postgres import PgServer

        self.server = PgServer()
        with open(self.server.data / "postgresql.conf", "a") as f:
            f.write(f"fsync = {'on' if fsync else 'off'}\nshared_buffers = 128MB\n")
        self.server.start()

    def pid(self) -> int:
        return int((self.server.data / "postmaster.pid").read_text().split()[0])

    def rows(self, url: str, table: str) -> int:
        import psycopg

        with psycopg.connect(url) as conn:
            return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]

    def stop(self) -> None:
        self.server.destroy()


class KanmonPg(Kanmon):
    """bench/relay_vs_postfix.py's relay, its records also in PostgreSQL."""

    name = "kanmon+pg"

    def __init__(self, work: Path, url: str):
        super().__init__(work)
        self.url = url
        with open(self.cfg, "a") as f:
            f.write(f'[records]\nurl = "{url}"\nnode = "bench"\n')


def run(system: Kanmon, sink: SmtpSink, size: int, messages: int, sessions: int, pg: Postgres | None,
        profile: Path | None = None) -> dict:
    os.sync()
    time.sleep(2)
    system.start()
    spy = None
    if profile is not None:  # py-spy samples every process of the node (collapsed stacks)
        assert system.proc is not None
        spy = subprocess.Popen(["py-spy", "record", "--subprocesses", "--nonblocking", "--format", "raw",
                                "-o", str(profile), "--pid", str(system.proc.pid)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        start_count = sink.count
        assert system.proc is not None
        cpu0 = tree_cpu(system.proc.pid)
        pg0 = tree_cpu(pg.pid()) if pg else 0.0
        with PeakRss(system.pids) as rss:
            t0 = time.perf_counter()
            subprocess.run(["smtp-source", "-s", str(sessions), "-l", str(size), "-m", str(messages),
                            "-f", "sender@bench.example", "-t", "rcpt@far.example", f"{KANMON[0]}:{KANMON[1]}"],
                           check=True)
            t_acc = time.perf_counter() - t0
            deadline = time.time() + 1800
            while time.time() < deadline:
                if sink.count - start_count >= messages and system.queue_empty():
                    break
                time.sleep(0.05)
            t_del = time.perf_counter() - t0
        cpu = tree_cpu(system.proc.pid) - cpu0
        pg_cpu = (tree_cpu(pg.pid()) - pg0) if pg else 0.0
    finally:
        if spy is not None:
            spy.send_signal(2)  # py-spy writes its output on SIGINT
            spy.wait(60)
        system.stop()  # the records are flushed (and shipped) before the node ends
    shipped = None
    if pg is not None:
        assert isinstance(system, KanmonPg)
        shipped = pg.rows(system.url, "history")
    return {"accepted": messages / t_acc, "delivered": messages / t_del, "cpu_ms": 1000 * cpu / messages,
            "pg_cpu_ms": 1000 * pg_cpu / messages, "rss_mb": rss.peak / 1024, "history_rows": shipped}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=5000)
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size", type=int, default=102400)
    ap.add_argument("--workers", type=int, default=1, help="kanmon's [server] workers")
    ap.add_argument("--pg-fsync", choices=("on", "off"), default="on")
    ap.add_argument("--py-spy", type=Path, metavar="DIR",
                    help="profile each run with py-spy: DIR/<backend>-<round>.txt (collapsed stacks)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root (smtp-sink and PostgreSQL's user need it)")
    Kanmon.workers = args.workers
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())} ({os.cpu_count()} CPUs)", flush=True)
    pg = Postgres(args.pg_fsync == "on")
    sink = SmtpSink(SINK)
    rounds: list[tuple[dict, dict]] = []
    try:
        for rnd in range(args.rounds):
            pair = {}
            for name in ("sqlite", "postgresql"):
                work = Path(tempfile.mkdtemp(prefix=f"bench-records-{name}-"))
                try:
                    system = Kanmon(work) if name == "sqlite" else KanmonPg(work, pg.server.create_database())
                    profile = args.py_spy / f"{name}-{rnd + 1}.txt" if args.py_spy else None
                    r = pair[name] = run(system, sink, args.size, args.messages, args.sessions,
                                         pg if name == "postgresql" else None, profile)
                finally:
                    shutil.rmtree(work, ignore_errors=True)
                extra = (f"  postgres CPU {r['pg_cpu_ms']:5.2f} ms/msg  history rows {r['history_rows']}"
                         if name == "postgresql" else "")
                print(f"round {rnd + 1} {name:10} accepted {r['accepted']:6.0f} msg/s  delivered {r['delivered']:6.0f} msg/s"
                      f"  kanmon CPU {r['cpu_ms']:5.2f} ms/msg  peak RSS {r['rss_mb']:4.0f} MB{extra}", flush=True)
            rounds.append((pair["sqlite"], pair["postgresql"]))
    finally:
        sink.stop()
        pg.stop()
    print()
    print(f"smtp-source -s {args.sessions} -l {args.size} -m {args.messages}, {args.rounds} rounds, "
          f"workers = {args.workers}, queue fsync on, PostgreSQL fsync {args.pg_fsync}, loopback")
    for key, label in (("accepted", "accepted msg/s"), ("delivered", "delivered msg/s")):
        ratios = [p[key] / s[key] for s, p in rounds]
        print(f"  {label:16} postgresql/sqlite {' '.join(f'{x:.2f}' for x in ratios)} (median {statistics.median(ratios):.2f})")
    ratios = [p["cpu_ms"] / s["cpu_ms"] for s, p in rounds]
    print(f"  {'kanmon CPU/msg':16} postgresql/sqlite {' '.join(f'{x:.2f}' for x in ratios)} (median {statistics.median(ratios):.2f});"
          f" postgres itself {statistics.median(p['pg_cpu_ms'] for _s, p in rounds):.2f} ms/msg")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
