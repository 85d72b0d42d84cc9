"""Pipelined IMAP FETCH of a large mailbox: responses go out as the client reads them.

20 pipelined `FETCH 1:* BODY.PEEK[]` on a mailbox of about 24 MB (a real ImapService over
TLS on loopback, asyncio and uvloop, a raw client socket; messages of 100 KB and of 1 MB,
with and without their sizes in the Maildir file names): the server process's resident memory
(sampled every 10 ms while the client first does not read, then reads everything) grows by
a bounded amount, not by the size of what is pipelined. The bound is generous (a sanity
bound, not a speed figure); the figures are printed (run with -s).
"""

from __future__ import annotations

import os
import re
import socket
import ssl
import threading
import time
from pathlib import Path

import pytest
import trustme
from argon2 import PasswordHasher

from kanmon.config import parse_config
from kanmon.store import maildir
from kanmon.store.imap import ImapService
from kanmon.store.users import AuthThrottle, Users
from tests.integration.test_imap import LoopThread, free_port

FAST = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
PIPELINED = 20
MAX_GROWTH = 64 * 2**20  # one whole response held would be 24 MB and more; all 20, ~500 MB


def rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class Sampler:
    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss())
            time.sleep(0.01)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)


def fill(root: Path, messages: int, size: int, named_sizes: bool) -> None:
    """messages of size bytes each; named_sizes: file names carry S= and W= (ours do;
    a Maildir filled by another delivery agent or a migration may not)."""
    line = b"x" * 76 + b"\n"
    body = line * (size // len(line))
    for i in range(messages):
        data = b"From: a@example.test\nSubject: m%d\n\n" % i + body
        name = maildir.unique_name(len(data), len(maildir.to_crlf(data))) if named_sizes else f"17000000{i:02d}.M1P1Q{i}.old"
        (root / "cur" / f"{name}:2,S").write_bytes(data)


def read_until(sock: ssl.SSLSocket, pattern: bytes, buf: bytearray) -> int:
    """Read (and drop) until pattern appears; the bytes read."""
    total = 0
    tail = b""
    while True:
        chunk = sock.recv(1 << 16)
        if not chunk:
            raise AssertionError(f"connection closed before {pattern!r}")
        total += len(chunk)
        window = tail + chunk
        if pattern in window:
            buf += window[window.index(pattern):]
            return total
        tail = window[-len(pattern):]


class UvLoopThread(LoopThread):
    """The loop `kanmon serve` runs (uvloop, when importable)."""

    def __init__(self) -> None:  # noqa: D107
        import asyncio

        try:
            import uvloop
        except ImportError:
            pytest.skip("uvloop is not installed")
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        del asyncio


CASES = [  # loop, TLS, messages, size, sizes in the file names
    ("asyncio", "implicit", 240, 100_000, True),
    ("uvloop", "starttls", 240, 100_000, True),
    ("uvloop", "implicit", 24, 1_000_000, False),
    ("asyncio", "implicit", 240, 100_000, False),
]


@pytest.mark.parametrize("loop_kind,tls,messages,size,named_sizes", CASES)
def test_pipelined_large_fetches_are_streamed(tmp_path, loop_kind, tls, messages, size, named_sizes) -> None:
    data_dir = tmp_path / "data"
    port = free_port()
    config = parse_config(f"""
[server]
hostname = "mx1.example.test"
data_dir = "{data_dir}"
[[domain]]
name = "example.test"
mailboxes = ["alice"]
[imap]
{"listen_tls" if tls == "implicit" else "listen"} = ["127.0.0.1:{port}"]
""")
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    users = Users(config, hasher=FAST)
    users.set_password("alice@example.test", "pw")
    box = users.mailbox("alice@example.test").ensure()
    fill(box.root, messages, size, named_sizes)
    loop = UvLoopThread() if loop_kind == "uvloop" else LoopThread()
    svc = ImapService(config, server_ctx, users, AuthThrottle(), lambda *a, **k: None)
    loop.run(svc.start())
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    try:
        raw = socket.create_connection(("127.0.0.1", port), timeout=60)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        if tls == "starttls":
            buf = bytearray()
            read_until(raw, b"\r\n", buf)
            raw.sendall(b"t STARTTLS\r\n")
            line = b""
            while not (line.startswith(b"t ") and line.endswith(b"\r\n")):
                line = line + raw.recv(1) if not line.endswith(b"\r\n") else raw.recv(1)
            assert line.startswith(b"t OK")
        with client_ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
            buf = bytearray()
            if tls == "implicit":
                read_until(s, b"\r\n", buf)
            s.sendall(b"a LOGIN alice@example.test pw\r\nb SELECT INBOX\r\n")
            read_until(s, b"b OK", buf)
            time.sleep(0.5)
            base = rss()
            with Sampler() as sampler:
                s.sendall(b"".join(b"f%d FETCH 1:* BODY.PEEK[]\r\n" % i for i in range(PIPELINED)))
                time.sleep(3)  # the client does not read: what does the server keep meanwhile?
                stalled = sampler.peak - base
                total = 0
                for i in range(PIPELINED):
                    total += read_until(s, b"f%d OK" % i, buf)
            growth = sampler.peak - base
            print(f"\nRSS before {base / 2**20:.0f} MiB; growth while the client did not read "
                  f"{stalled / 2**20:.0f} MiB, peak growth {growth / 2**20:.0f} MiB; read {total / 2**20:.0f} MiB")
            assert total > PIPELINED * messages * size
            assert growth < MAX_GROWTH
            s.sendall(b"z LOGOUT\r\n")
    finally:
        loop.run(svc.stop())
        loop.close()
