"""Benchmark: the CPU the dot handling costs per relayed message, in one process.

What the relay does to a message's dots, and only that, with the tree on PYTHONPATH (run
it once per tree to compare two): the SMTP session takes DATA in 64 KiB reads (the scan
for the end, the unstuffing) up to its StoreMessage, and the outbound client makes the
bytes after DATA (encode_data of what model.checked_body gives, CrlfChecked in a tree
without it). The tree is the one on PYTHONPATH (it needs its tests/ too), not this
file's. Messages of smtp-source's shape (no line starts with a dot) and one with
dot-leading lines. Prints microseconds per message (best of 7 batches); asserts nothing.

    PYTHONPATH=$PWD python bench/dot_transparency.py
    cd ../other-tree && PYTHONPATH=$PWD python /path/to/this/bench/dot_transparency.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from kanmon import model
from kanmon.smtp.client import encode_data
from kanmon.smtp.session import StoreMessage
from tests.protocol.test_session import CONFIG, make_session

READ = 64 * 1024
LARGE = CONFIG.replace('max_message_size = "10KB"', 'max_message_size = "10MB"')


def message(size: int, dots: bool) -> bytes:
    line = (b".a line that starts with a dot, as a signature's -- does not\r\n" if dots
            else b"La de da de da 1.\r\n")
    head = b"From: a@example.org\r\nTo: alice@example.test\r\nSubject: bench\r\n\r\n"
    return head + line * ((size - len(head)) // len(line))


def receive(wire: bytes) -> StoreMessage:
    s = make_session("127.0.0.1", config=LARGE)
    s.greeting()
    s.feed(b"EHLO client.example\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n")
    out = []
    for i in range(0, len(wire), READ):
        out += s.feed(wire[i : i + READ])
    [store] = [a for a in out if isinstance(a, StoreMessage)]
    return store


def best(fn, n: int) -> float:
    times = []
    for _ in range(7):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        times.append((time.perf_counter() - t0) / n)
    return min(times) * 1e6


def main() -> int:
    checked_body = getattr(model, "checked_body", None)
    print(f"kanmon from {Path(model.__file__).parents[1]}; checked_body: {'yes' if checked_body else 'no'}")
    for size in (102400, 5120):
        for dots in (False, True):
            body = message(size, dots)
            wire = body.replace(b"\r\n.", b"\r\n..") + b".\r\n"
            if wire.startswith(b"."):
                wire = b"." + wire
            store = receive(wire)
            env = store.envelope
            content = store.content
            if checked_body is not None:
                prepared = checked_body(env, content)
            else:
                prepared = model.CrlfChecked(content)
            assert encode_data(prepared) == (b"\r\n" + content).replace(b"\r\n.", b"\r\n..")[2:] + b".\r\n"
            n = 200 if size > 10000 else 2000
            empty = best(lambda: receive(b"Subject: x\r\n\r\n.\r\n"), n)
            rx = best(lambda: receive(wire), n) - empty
            tx = best(lambda: encode_data(checked_body(env, content) if checked_body else model.CrlfChecked(content)),
                      n)
            print(f"{size // 1024:>4} KB, {'dot lines   ' if dots else 'no dot line '}: DATA in the session "
                  f"{rx:7.1f} us (beyond an empty message), encode_data {tx:6.1f} us, "
                  f"nodots={getattr(env, 'no_dot_lines', '-')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
