#!/usr/bin/env python3
"""Benchmark: what sender authentication (SPF + DKIM + DMARC) costs the SMTP accept path.

One `kanmon serve` at a time, receive only ([queue] suspend_delivery), mail from a client
outside relay_networks (127.0.0.9) with 5 KB messages DKIM-signed by dkimpy (rsa-sha256,
2048 bits), its DNS (SPF, the key, DMARC p=reject) from a loopback DNS server (dnslib,
tests/support/dnsserver.py). Two runs, alternating, ROUNDS times:

  off: the default profile (spf = dkim = dmarc = "off")
  on:  spf = "tag", dkim = "none", dmarc = "honor" (every message: SPF for HELO and MAIL
       FROM, DKIM verification, DMARC pass, Authentication-Results)

The client is an asyncio SMTP client in this process (SESSIONS sessions, PIPELINING for
MAIL/RCPT/DATA). The resolver's cache is warm after the first messages, so the figure is
the steady state: parsing, hashing, the RSA verification and the header work. Prints
msg/s per run, the server's CPU time per message (user + system, from /proc: on a shared
machine the figure that does not depend on what else runs) and the median cost; asserts
nothing.

    python bench/auth_verify.py                       # 5,000 messages x 3 rounds
    python bench/auth_verify.py --messages 500 --rounds 1
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.dkimkeys import rsa_key, sign  # noqa: E402
from bench.smtpdrive import drive, wait_port  # noqa: E402
from tests.support.dnsserver import DnsServer  # noqa: E402

CLIENT = "127.0.0.9"
SERVER = "127.0.0.61"

PROFILES = {
    "off": "",
    "on": '[[session_profile]]\nname = "default"\nspf = "tag"\ndkim = "none"\ndmarc = "honor"\n',
}


def message(size: int, key) -> bytes:
    header = ("From: Sender <news@sender.test>\r\nTo: <bench@example.test>\r\nSubject: benchmark\r\n"
              "Message-ID: <bench@sender.test>\r\nDate: Mon, 30 Nov 2026 10:00:00 +0000\r\n\r\n")
    line = "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod.\r\n"
    body = line * max(1, (size - len(header) - 450) // len(line))  # the DKIM-Signature adds about 450 bytes
    return sign((header + body).encode(), key, "sender.test", "k1")


def cpu_seconds(pid: int) -> float | None:
    """The process's user + system CPU time so far (Linux /proc), None elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(mode: str, args, dns: DnsServer, content: bytes) -> tuple[float, float | None]:
    work = Path(tempfile.mkdtemp(prefix="kanmon-bench-auth-"))
    cfg = work / "kanmon.toml"
    cfg.write_text(f"""
[server]
hostname = "mx.example.test"
data_dir = "{work / 'data'}"
workers = 0
[smtp]
listen = ["{SERVER}:{args.port}"]
relay_networks = ["127.0.0.1/32"]
max_connections_per_ip = 1000
min_free_disk = "100MB"
greet_pause = "0s"
[dns]
servers = ["{dns.address}"]
[[domain]]
name = "example.test"
mailboxes = ["bench"]
[queue]
suspend_delivery = true
{PROFILES[mode]}
""")
    proc = subprocess.Popen([sys.executable, "-m", "kanmon", "serve", "-c", str(cfg), "--quiet"],
                            stdout=subprocess.DEVNULL, cwd=ROOT)
    try:
        wait_port(SERVER, args.port)
        asyncio.run(drive(min(50, args.messages), 2, server=(SERVER, args.port), client=CLIENT, helo=b"mail.sender.test", mail_from=b"news@sender.test", rcpt=b"bench@example.test", content=content))  # warm the caches
        cpu0 = cpu_seconds(proc.pid)
        seconds = asyncio.run(drive(args.messages, args.sessions, server=(SERVER, args.port), client=CLIENT, helo=b"mail.sender.test", mail_from=b"news@sender.test", rcpt=b"bench@example.test", content=content))
        cpu1 = cpu_seconds(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        shutil.rmtree(work, ignore_errors=True)
    cpu = None if cpu0 is None or cpu1 is None else 1000 * (cpu1 - cpu0) / args.messages
    return args.messages / seconds, cpu


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=5000)
    ap.add_argument("--size", type=int, default=5120)
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--port", type=int, default=2527)
    args = ap.parse_args()

    key = rsa_key(2048)
    content = message(args.size, key)
    records = {
        "sender.test": ["MX 10 mail.sender.test.", f'TXT "v=spf1 ip4:{CLIENT} -all"'],
        "mail.sender.test": [f"A {CLIENT}"],
        "k1._domainkey.sender.test": [key.record()],
        "_dmarc.sender.test": ['TXT "v=DMARC1; p=reject"'],
    }
    results: dict[str, list[float]] = {"off": [], "on": []}
    cpu: dict[str, list[float]] = {"off": [], "on": []}
    with DnsServer(records=records) as dns:
        for r in range(args.rounds):
            for mode in ("off", "on"):
                rate, ms = run(mode, args, dns, content)
                results[mode].append(rate)
                if ms is not None:
                    cpu[mode].append(ms)
                print(f"round {r + 1} {mode:>3}: {rate:8.0f} msg/s  ({args.messages} x {len(content)} bytes,"
                      f" {args.sessions} sessions)" + (f"  server CPU {ms:.2f} ms/msg" if ms is not None else ""),
                      flush=True)
    off, on = statistics.median(results["off"]), statistics.median(results["on"])
    print(f"median: off {off:.0f} msg/s, on {on:.0f} msg/s: verification costs {100 * (1 - on / off):.0f}%"
          f" ({1000 / on - 1000 / off:.2f} ms per message)")
    if cpu["off"] and cpu["on"]:
        # CPU time is what the checks cost whatever else the machine does; msg/s is not
        c_off, c_on = statistics.median(cpu["off"]), statistics.median(cpu["on"])
        print(f"median server CPU: off {c_off:.2f} ms/msg, on {c_on:.2f} ms/msg: verification costs"
              f" {c_on - c_off:.2f} ms of CPU per message")
    return 0


if __name__ == "__main__":
    sys.exit(main())
