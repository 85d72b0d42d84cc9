"""Big messages from many concurrent sessions: the server's memory stays bounded.

A real `kanmon serve` (one process, delivery suspended so the queue reads nothing back)
takes N sessions at once, each sending a message of SIZE octets in 64 KiB writes from its
own 127.0.0.x address. The DATA of each session goes to its spill file as it arrives
(kanmon.spool.spill), so the RSS of the process grows by the sessions' buffers and one
message being read back, not by N x SIZE. Every message is answered 250 and is in the
queue with its exact length; nothing is left in spool/incoming/.

The short version (20 x 5 MB) runs in CI; KANMON_LONG=1 runs 200 x 20 MB, which must stay
under 300 MB of RSS in all (docs/performance.md).
"""

from __future__ import annotations

import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from kanmon.spool.store import Spool
from tests.support.kanmon_node import KanmonProcess, free_port, wait_for

CONFIG = """
[server]
hostname = "mx1.example.test"
data_dir = "{data_dir}"
workers = 0
[smtp]
listen = ["127.0.0.1:{port}"]
relay_networks = ["127.0.0.1/32"]
min_free_disk = "1MB"
max_connections = 1000
max_connections_per_ip = 1000
[queue]
suspend_delivery = true
[[domain]]
name = "example.test"
mailboxes = ["alice"]
[[session_profile]]
name = "default"
sender_domain_check = false  # the senders' domains are in no DNS here
reject_own_helo = false
greet_pause = "0s"
"""

WRITE = 64 * 1024


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def read_reply(f) -> bytes:
    """One whole reply (its continuation lines read too)."""
    while True:
        line = f.readline()
        if not line or line[3:4] != b"-":
            return line


def send_big(port: int, source: str, size: int, start: threading.Barrier) -> bytes:
    """One session: a message of `size` octets of 78-octet lines, streamed."""
    line = b"0123456789" * 7 + b"abcdefg\r\n"
    header = b"From: <a@example.org>\r\nTo: <alice@example.test>\r\nSubject: big\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=120, source_address=(source, 0)) as s:
        f = s.makefile("rb")
        assert read_reply(f).startswith(b"220")
        s.sendall(b"EHLO client.example\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n")
        for _ in range(3):
            read_reply(f)
        assert read_reply(f).startswith(b"354")
        start.wait()  # every session in DATA at once
        block = line * (WRITE // len(line))
        s.sendall(header)
        left = size - len(header)
        while left > len(block):
            s.sendall(block)
            left -= len(block)
        s.sendall(line * (left // len(line)) + b"x" * (left % len(line)) + b"\r\n.\r\n")
        reply = read_reply(f)
        s.sendall(b"QUIT\r\n")
        return reply


def run(tmp_path: Path, sessions: int, size: int, limit: int | None = None, growth: int | None = None) -> None:
    """limit: the RSS the process must stay under; growth: what it may add to its idle RSS."""
    port = free_port()
    cfg = tmp_path / "kanmon.toml"
    cfg.write_text(CONFIG.format(data_dir=tmp_path / "data", port=port))
    proc = KanmonProcess(cfg, "127.0.0.1", port).start()
    try:
        pid = proc.proc.pid
        baseline = rss(pid)
        peak = [baseline]
        done = threading.Event()

        def watch() -> None:
            while not done.wait(0.05):
                peak[0] = max(peak[0], rss(pid))

        watcher = threading.Thread(target=watch)
        watcher.start()
        start = threading.Barrier(sessions)
        try:
            with ThreadPoolExecutor(sessions) as pool:
                replies = list(pool.map(lambda i: send_big(port, f"127.0.{1 + i // 200}.{10 + i % 200}", size, start),
                                        range(sessions)))
        finally:
            done.set()
            watcher.join()
        assert all(r.startswith(b"250 ") for r in replies), replies
        print(f"\n{sessions} x {size >> 20} MB: RSS {baseline >> 20} MB at start, {peak[0] >> 20} MB at most")
        if limit is not None:
            assert peak[0] < limit, f"RSS {peak[0] >> 20} MB"
        if growth is not None:
            assert peak[0] - baseline < growth, f"RSS grew by {(peak[0] - baseline) >> 20} MB"
        spool = Spool(tmp_path / "data")
        try:
            sizes = [e.size for e in spool.scan()]
        finally:
            spool.close()
        assert len(sizes) == sessions
        assert all(size + 2 < n < size + 2048 for n in sizes)  # the message, our Received: header
        assert not list((tmp_path / "data" / "spool" / "incoming").iterdir())
    finally:
        proc.terminate()


def test_twenty_sessions_of_5_mb_at_once_stay_within_bounded_memory(tmp_path):
    # Held whole in memory they added 173 MB (measured); spilled, 50 MB: the sessions'
    # buffers and one message read back at a time with its copies (checks, queue file).
    run(tmp_path, 20, 5 << 20, growth=96 << 20)


@pytest.mark.long
def test_two_hundred_sessions_of_20_mb_stay_under_300_mb(tmp_path):
    run(tmp_path, 200, 20 << 20, limit=300 << 20)
