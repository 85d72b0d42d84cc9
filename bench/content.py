#!/usr/bin/env python3
"""Benchmark: what content inspection costs the SMTP accept path, at 100 KB.

One `kanmon serve` at a time, receive only ([queue] suspend_delivery), mail from a client
outside relay_networks (127.0.0.9): 100 KB messages as Japanese mailers write them (an
ISO-2022-JP Subject, a Shift_JIS body in base64, an HTML part and a zip attachment), none
of which a rule matches (the whole profile is evaluated every time). Three runs,
alternating, ROUNDS times:

  off:    no content profile
  rules:  an "inbound" profile of 20 rules (subject/body keywords and regexes, headers,
          attachment names and types, size)
  clamd:  the same 20 rules and Debian's clamd (a one-signature test database, so the
          figure is the stream and protocol cost, not a signature set's scan time)

Prints msg/s per run and the medians; asserts nothing.

    python bench/content.py                      # 2,000 messages x 3 rounds
    python bench/content.py --messages 300 --rounds 1
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.smtpdrive import drive, wait_port  # noqa: E402
from tests.support.mailsamples import attachment, japanese_message, plain_zip  # noqa: E402

CLIENT = "127.0.0.9"
SERVER = "127.0.0.62"
CLAMD = "127.0.0.82"

RULES = "\n".join(f"""
[[content_profile.rule]]
name = "r{i}"
{cond}
action = {action}
""" for i, (cond, action) in enumerate([
    ('subject = ["請求書", "invoice", "至急"]\nfrom_outside = true', '"quarantine"'),
    ('subject = { regex = "(?:viagra|cialis|casino)" }', '"reject"'),
    ('body = ["パスワード", "password"]', '"tag"'),
    ('body = { regex = "bitcoin|暗号資産|仮想通貨" }', '"quarantine"'),
    ('header = { X-Mailer = { regex = "^(?:bulk|mass)" } }', '"score"\nscore = 3.0'),
    ('header = { List-Unsubscribe = { regex = "unsubscribe\\\\.bad" } }', '"tag"'),
    ('attachment_name = ["*.exe", "*.scr", "*.pif", "*.com"]', '"reject"'),
    ('attachment_name = ["*.js", "*.vbs", "*.wsf", "*.hta"]', '"reject"'),
    ('attachment_type = ["executable"]', '"reject"'),
    ('attachment_type = ["script", "macro"]', '"quarantine"'),
    ('attachment_type = ["disk_image"]', '"quarantine"'),
    ('sender = ["@spam.example", "@bulk.example"]', '"reject"'),
    ('recipient = ["honeypot@"]', '"discard"'),
    ('size_over = "20MB"', '"reject"'),
    ('subject = ["当選", "おめでとう", "無料"]\nbody = ["クリック"]', '"tag"'),
    ('body = { regex = "https?://[a-z0-9.-]*\\\\.(?:top|xyz|click)/" }', '"score"\nscore = 4.0'),
    ('subject = ["ご請求", "お支払い"]\nattachment_type = ["archive"]', '"quarantine"'),
    ('header = { Reply-To = ["@freemail.example"] }', '"score"\nscore = 2.0'),
    ('body = ["口座", "振込先変更"]', '"quarantine"'),
    ('subject = { regex = "^\\\\[(?:SPAM|迷惑)\\\\]" }', '"discard"'),
]))


def make_message(size: int) -> bytes:
    html = "<html><body>" + "<p>ご連絡いたします。会議資料を添付します。</p>" * 40 + "</body></html>"
    body = "いつもお世話になっております。来週の会議の件でご連絡いたします。\n" * 200
    zip_data = plain_zip({"資料/議事録.txt": ("議事録 " * 2000).encode("utf-8")})
    msg = japanese_message(subject="来週の会議について", body=body, html=html, attachments=[attachment(zip_data, "資料.zip")])
    pad = max(0, size - len(msg))
    if pad:
        filler = attachment(bytes(range(256)) * (pad * 3 // 4 // 256 + 1), "data.bin")
        msg = japanese_message(subject="来週の会議について", body=body, html=html,
                               attachments=[attachment(zip_data, "資料.zip"), filler])
    return msg


def start_clamd(work: Path, port: int) -> subprocess.Popen:
    (work / "db").mkdir()
    (work / "db" / "test.ndb").write_text(f"Kanmon.Test.Sig:0:*:{b'KANMON-TEST-VIRUS-7f3a'.hex()}\n")
    (work / "clamd.conf").write_text(f"Foreground yes\nDatabaseDirectory {work / 'db'}\nTCPSocket {port}\n"
                                     f"TCPAddr {CLAMD}\nLogFile {work / 'clamd.log'}\nStreamMaxLength 25M\nUser root\n")
    proc = subprocess.Popen([shutil.which("clamd") or "/usr/sbin/clamd", "-c", str(work / "clamd.conf")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(CLAMD, port)
    return proc


def run(mode: str, args, content: bytes, clamd_port: int) -> float:
    work = Path(tempfile.mkdtemp(prefix="kanmon-bench-content-"))
    extra = ""
    if mode in ("rules", "clamd"):
        extra += '[[content_profile]]\nname = "inbound"\n' + RULES
    if mode == "clamd":
        extra = f'[antivirus]\nclamd = "{CLAMD}:{clamd_port}"\n' + extra
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
[[session_profile]]
name = "default"
sender_domain_check = false
[[domain]]
name = "example.test"
mailboxes = ["bench"]
[queue]
suspend_delivery = true
{extra}
""")
    proc = subprocess.Popen([sys.executable, "-m", "kanmon", "serve", "-c", str(cfg), "--quiet"],
                            stdout=subprocess.DEVNULL, cwd=ROOT)
    try:
        wait_port(SERVER, args.port)
        asyncio.run(drive(min(20, args.messages), 2, server=(SERVER, args.port), client=CLIENT, helo=b"mail.partner.example", mail_from=b"katou@partner.example", rcpt=b"bench@example.test", content=content))
        seconds = asyncio.run(drive(args.messages, args.sessions, server=(SERVER, args.port), client=CLIENT, helo=b"mail.partner.example", mail_from=b"katou@partner.example", rcpt=b"bench@example.test", content=content))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        shutil.rmtree(work, ignore_errors=True)
    return args.messages / seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--size", type=int, default=100 * 1024)
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--port", type=int, default=2528)
    ap.add_argument("--clamd-port", type=int, default=13311)
    args = ap.parse_args()
    content = make_message(args.size)
    modes = ["off", "rules"] + (["clamd"] if shutil.which("clamd") or Path("/usr/sbin/clamd").exists() else [])
    results: dict[str, list[float]] = {m: [] for m in modes}
    clamd_dir = Path(tempfile.mkdtemp(prefix="kanmon-bench-clamd-"))
    clamd = start_clamd(clamd_dir, args.clamd_port) if "clamd" in modes else None
    try:
        for r in range(args.rounds):
            for mode in modes:
                rate = run(mode, args, content, args.clamd_port)
                results[mode].append(rate)
                print(f"round {r + 1} {mode:>5}: {rate:8.0f} msg/s  ({args.messages} x {len(content)} bytes,"
                      f" {args.sessions} sessions)", flush=True)
    finally:
        if clamd is not None:
            clamd.terminate()
            clamd.wait(10)
        shutil.rmtree(clamd_dir, ignore_errors=True)
    medians = {m: statistics.median(v) for m, v in results.items()}
    print("median: " + ", ".join(f"{m} {v:.0f} msg/s" for m, v in medians.items()))
    for m in modes[1:]:
        print(f"  {m}: {100 * (1 - medians[m] / medians['off']):.0f}% below off")
    return 0


if __name__ == "__main__":
    sys.exit(main())
