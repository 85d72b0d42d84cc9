#!/usr/bin/env python3
"""Benchmark: kanmon's IMAP server against Dovecot, side by side, on one Maildir.

In one run:
  1. a Maildir of N messages (~5 KB each, a few with "needle" in the Subject, some with
     ISO-2022-JP subjects) is written once, then copied: one copy for kanmon
     (data_dir/mailboxes/example.test/alice), one for Dovecot (owned by nobody);
  2. kanmon's ImapService runs in its own process (``--serve`` below) with STARTTLS and a
     trustme certificate; a private Dovecot (Debian's dovecot-imapd, its own base_dir,
     INDEX= outside the Maildir, STARTTLS with the same certificate) listens beside it;
  3. imaplib logs in over STARTTLS; one unmeasured pass warms both (Dovecot builds its
     index and cache; kanmon its own); then ROUNDS alternating measured passes, each on a
     new connection: SELECT INBOX (warm), FETCH 1:* (FLAGS) (with the server process's
     CPU time), UID FETCH 1:* (RFC822.SIZE ENVELOPE), SEARCH SUBJECT "needle", FETCH of
     200 full bodies;
  4. peak RSS: kanmon's server process (VmHWM), Dovecot's imap process of each measured
     connection (VmHWM, read before LOGOUT), the largest seen;
  5. prints medians and kanmon/Dovecot ratios as a Markdown table;
  6. holds --idle connections to kanmon (logged in, INBOX selected) and prints the
     server's RSS growth per connection. Asserts nothing.

Run as root (Dovecot drops to nobody). Loopback only (127.0.0.80/81).

    python bench/imap_vs_dovecot.py                       # 20,000 messages, 3 rounds
    python bench/imap_vs_dovecot.py --messages 2000 --rounds 1
"""

from __future__ import annotations

import argparse
import imaplib
import os
import random
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import quietfs  # noqa: E402

KANMON = ("127.0.0.80", 1143)
DOVECOT = ("127.0.0.81", 1143)
USER = "alice@example.test"
PASSWORD = "bench-password"
WORDS = ("report invoice meeting lunch plan budget review draft notes status team project "
         "quarter update travel order shipping contract figures agenda").split()


def make_maildir(root: Path, count: int, seed: int = 23) -> None:
    """count messages of ~5 KB in cur/ (half of them \\Seen), names as delivery makes them."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from kanmon.store import maildir

    rnd = random.Random(seed)
    for sub in ("cur", "new", "tmp"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    start = time.time() - count * 60
    for i in range(count):
        if i % 1000 == 500:
            subject = f"needle in the haystack {i}"
        elif i % 97 == 0:
            subject = "=?ISO-2022-JP?B?GyRCQEE1YT1xGyhC?= " + str(i)  # 請求書
        else:
            subject = " ".join(rnd.choice(WORDS) for _ in range(5))
        body_lines = []
        while sum(len(x) + 1 for x in body_lines) < 4600:
            body_lines.append(" ".join(rnd.choice(WORDS) for _ in range(10)))
        msg = (
            f"Return-Path: <sender{i % 50}@example.net>\n"
            f"Delivered-To: {USER}\n"
            f"From: Sender {i % 50} <sender{i % 50}@example.net>\n"
            f"To: Alice <{USER}>\n"
            f"Subject: {subject}\n"
            f"Date: {time.strftime('%a, %d %b %Y %H:%M:%S +0000', time.gmtime(start + i * 60))}\n"
            f"Message-ID: <bench{i}@example.net>\n"
            "MIME-Version: 1.0\n"
            "Content-Type: text/plain; charset=utf-8\n\n" + "\n".join(body_lines) + "\n"
        ).encode()
        when = start + i * 60
        name = maildir.unique_name(len(msg), len(maildir.to_crlf(msg)), now=when)
        flags = ":2,S" if i % 2 else ":2,"
        p = root / "cur" / (name + flags)
        p.write_bytes(msg)
        os.utime(p, (when, when))


def wait_port(host: str, port: int, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"nothing listens on {host}:{port}")


def hwm_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def serve_kanmon(data_dir: str, cert: str, key: str) -> None:
    """The kanmon side, in this process: ImapService on KANMON until killed."""
    import asyncio

    from argon2 import PasswordHasher

    from kanmon.config import parse_config
    from kanmon.store.imap import ImapService
    from kanmon.store.users import AuthThrottle, Users

    config = parse_config(f"""
[server]
hostname = "bench.example.test"
data_dir = "{data_dir}"
[[domain]]
name = "example.test"
mailboxes = ["alice"]
[imap]
listen = ["{KANMON[0]}:{KANMON[1]}"]
max_connections_per_ip = 1000
""")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    users = Users(config, hasher=PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1))
    users.set_password(USER, PASSWORD)
    throttle = AuthThrottle(time.time, free_failures=1000, base_delay=0, max_delay=0)

    async def main() -> None:
        svc = ImapService(config, ctx, users, throttle, lambda *a, **k: None, max_literal=50_000_000)
        await svc.start()
        await asyncio.Event().wait()

    try:
        import uvloop  # type: ignore[import-not-found]
        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main())


def start_dovecot(base: Path, mail: Path, cert: str, key: str) -> subprocess.Popen:
    conf = base / "dovecot.conf"
    (base / "run").mkdir()
    (base / "index").mkdir()
    for p in [base / "index", mail, *mail.rglob("*")]:
        os.chown(p, 65534, 65534)
    conf.write_text(f"""
base_dir = {base}/run
state_dir = {base}/state
log_path = {base}/dovecot.log
protocols = imap
listen = {DOVECOT[0]}
ssl = yes
ssl_cert = <{cert}
ssl_key = <{key}
disable_plaintext_auth = yes
auth_mechanisms = plain
mail_location = maildir:{mail}:INDEX={base}/index
first_valid_uid = 1
passdb {{
  driver = static
  args = password={PASSWORD}
}}
userdb {{
  driver = static
  args = uid=65534 gid=65534 home={base}/home
}}
service imap-login {{
  inet_listener imap {{
    address = {DOVECOT[0]}
    port = {DOVECOT[1]}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service imap {{
  process_limit = 10
}}
""")
    proc = subprocess.Popen(["/usr/sbin/dovecot", "-F", "-c", str(conf)])
    wait_port(*DOVECOT)
    return proc


def dovecot_imap_pid(master: int) -> int | None:
    """The newest imap process below the Dovecot master (the bench's connection)."""
    out = subprocess.run(["pgrep", "-P", str(master), "-x", "imap"], capture_output=True, text=True).stdout.split()
    return max((int(p) for p in out), default=None)


def connect(addr: tuple[str, int], ctx: ssl.SSLContext) -> imaplib.IMAP4:
    c = imaplib.IMAP4(*addr)
    c.starttls(ctx)
    c.login(USER, PASSWORD)
    return c


def one_pass(addr, ctx, cpu_pid) -> dict[str, float]:
    """One measured pass on a new connection; times in ms."""
    c = connect(addr, ctx)
    out: dict[str, float] = {}
    typ, data = c.select("INBOX")
    n = int(data[0])
    t = time.perf_counter()
    c.select("INBOX")
    out["select"] = (time.perf_counter() - t) * 1000
    pid = cpu_pid()
    cpu0 = cpu_s(pid) if pid else 0.0
    t = time.perf_counter()
    typ, data = c.fetch("1:*", "(FLAGS)")
    out["flags"] = (time.perf_counter() - t) * 1000
    out["flags_cpu"] = ((cpu_s(pid) - cpu0) * 1000) if pid else float("nan")
    assert len(data) == n, (len(data), n)
    t = time.perf_counter()
    typ, data = c.uid("FETCH", "1:*", "(RFC822.SIZE ENVELOPE)")
    out["envelope"] = (time.perf_counter() - t) * 1000
    t = time.perf_counter()
    typ, data = c.search(None, "SUBJECT", '"needle"')
    out["search"] = (time.perf_counter() - t) * 1000
    out["search_hits"] = len(data[0].split())
    t = time.perf_counter()
    typ, data = c.fetch(f"{max(1, n - 199)}:{n}", "(BODY.PEEK[])")
    out["bodies"] = (time.perf_counter() - t) * 1000
    out["hwm_kb"] = hwm_kb(pid) if pid else 0
    c.logout()
    return out


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def idle_connections(addr, ctx, pid: int, count: int) -> float:
    """KB of the server's RSS per connection logged in, INBOX selected, then idle."""
    first = connect(addr, ctx)
    first.select("INBOX")  # the folder's scan and index are loaded before the baseline
    time.sleep(1)
    before = rss_kb(pid)
    conns = []
    try:
        for _ in range(count):
            c = connect(addr, ctx)
            c.select("INBOX")
            conns.append(c)
        time.sleep(1)
        after = rss_kb(pid)
    finally:
        for c in [first, *conns]:
            try:
                c.logout()
            except (OSError, imaplib.IMAP4.error):
                pass
    return (after - before) / count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=20_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--idle", type=int, default=200, help="idle connections held by kanmon for the memory figure")
    ap.add_argument("--serve", nargs=3, metavar=("DATA_DIR", "CERT", "KEY"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve_kanmon(*args.serve)
        return
    import trustme

    base = Path(tempfile.mkdtemp(prefix="kanmon-imapbench-"))
    os.chmod(base, 0o755)
    procs: list[subprocess.Popen] = []
    try:
        ca = trustme.CA()
        leaf = ca.issue_cert("127.0.0.80", "127.0.0.81", "localhost")
        cert, key = base / "cert.pem", base / "key.pem"
        leaf.private_key_and_cert_chain_pem.write_to_path(str(cert))
        leaf.private_key_pem.write_to_path(str(key))
        os.chmod(key, 0o644)  # Dovecot's config process reads it as root; it is a throwaway key
        client_ctx = ssl.create_default_context()
        ca.configure_trust(client_ctx)
        print(f"writing {args.messages} messages ...", flush=True)
        source = base / "source"
        make_maildir(source, args.messages)
        kanmon_box = base / "kanmon" / "mailboxes" / "example.test" / "alice"
        kanmon_box.parent.mkdir(parents=True)
        shutil.copytree(source, kanmon_box)
        dovecot_box = base / "dovecot-mail"
        shutil.copytree(source, dovecot_box)
        quietfs.remove_tree(source)
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
        kanmon = subprocess.Popen([sys.executable, __file__, "--serve", str(base / "kanmon"), str(cert), str(key)], env=env)
        procs.append(kanmon)
        dovecot = start_dovecot(base, dovecot_box, str(cert), str(key))
        procs.append(dovecot)
        wait_port(*KANMON)
        sides = {
            "kanmon": (KANMON, lambda: kanmon.pid),
            "Dovecot": (DOVECOT, lambda: dovecot_imap_pid(dovecot.pid)),
        }
        for name, (addr, pid) in sides.items():
            t = time.perf_counter()
            one_pass(addr, client_ctx, pid)
            print(f"warm-up pass {name}: {time.perf_counter() - t:.1f} s", flush=True)
        results: dict[str, list[dict[str, float]]] = {k: [] for k in sides}
        for r in range(args.rounds):
            for name, (addr, pid) in sides.items():
                res = one_pass(addr, client_ctx, pid)
                results[name].append(res)
                print(f"round {r + 1} {name}: " + ", ".join(f"{k} {v:.1f}" for k, v in res.items()), flush=True)
        per_conn = idle_connections(KANMON, client_ctx, kanmon.pid, args.idle) if args.idle else float("nan")
        kanmon_hwm = max(x["hwm_kb"] for x in results["kanmon"])
        dovecot_hwm = max(x["hwm_kb"] for x in results["Dovecot"])

        def med(side: str, key: str) -> float:
            return statistics.median(x[key] for x in results[side])

        rows = [
            ("SELECT INBOX (warm)", "select"),
            ("`FETCH 1:* (FLAGS)`", "flags"),
            ("`UID FETCH 1:* (RFC822.SIZE ENVELOPE)`", "envelope"),
            ('`SEARCH SUBJECT "needle"`', "search"),
            ("FETCH 200 full bodies", "bodies"),
        ]
        print()
        print(f"{args.messages} messages, median of {args.rounds} alternating rounds, imaplib over STARTTLS")
        print()
        print("| operation | kanmon | Dovecot | kanmon / Dovecot |")
        print("|---|---|---|---|")
        for label, key in rows:
            k, d = med("kanmon", key), med("Dovecot", key)
            extra_k = extra_d = ""
            if key == "flags":
                extra_k = f", {med('kanmon', 'flags_cpu'):.0f} ms server CPU"
                extra_d = f", {med('Dovecot', 'flags_cpu'):.0f} ms CPU"
            print(f"| {label} | {k:.1f} ms{extra_k} | {d:.1f} ms{extra_d} | {k / d:.2f}x |")
        print(f"| peak RSS | {kanmon_hwm / 1024:.1f} MB (server process) | {dovecot_hwm / 1024:.1f} MB (imap process) "
              f"| {kanmon_hwm / max(dovecot_hwm, 1):.2f}x |")
        print(f"\nkanmon: {args.idle} idle connections (STARTTLS, logged in, INBOX selected): "
              f"{per_conn:.0f} KB each (server RSS growth / count); peak RSS of the server afterwards "
              f"{hwm_kb(kanmon.pid) / 1024:.1f} MB")
        print(f"SEARCH hits: kanmon {med('kanmon', 'search_hits'):.0f}, Dovecot {med('Dovecot', 'search_hits'):.0f}")
    finally:
        for p in procs:
            p.terminate()
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
        quietfs.remove_tree(base)


if __name__ == "__main__":
    main()
