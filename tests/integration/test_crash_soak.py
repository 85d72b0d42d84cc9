"""Hardening: kill -9 of `kanmon serve` at random moments during a relay run.

Two client threads send 2,000 numbered messages through kanmon (main process and one
receiver process) to a relay next hop (an SmtpSink); the test kills the main process with
SIGKILL at random points of the run, restarts it, and the clients resend whatever did not
get its 250. Afterwards every message that got a 250 must reach the sink at least once.
Duplicates are allowed (a crash between the next hop's 250 and our journal write delivers
again: "twice, never zero times", DESIGN.md promise 1); they are counted and reported.

CI runs 3 kills; KANMON_LONG=1 runs 20 (`-m long`). The seed is printed: rerun a failure
with KANMON_SOAK_SEED=<seed>; KANMON_SOAK_RETRY sets [queue] retry (default 1s..2s),
KANMON_SOAK_CLIENTS the number of sending clients (2), KANMON_SOAK_SIZE the body size
(2000 bytes), KANMON_SOAK_KILL=group kills the whole process group (main and receivers
at once) instead of the main process.
The run fails on a stall (nothing acknowledged for STALL seconds, with each sender's
last error and the server's stderr), never on a slow machine.
"""

from __future__ import annotations

import os
import random
import re
import smtplib
import socket
import threading
import time
from pathlib import Path

import pytest

from tests.support.kanmon_node import KanmonProcess, free_port, wait_for
from tests.support.smtpsink import SmtpSink

CONFIG = """
[server]
hostname = "mx1.example.test"
data_dir = "{data_dir}"
workers = 1
[smtp]
listen = ["127.0.0.1:{port}"]
relay_networks = ["127.0.0.0/8"]
min_free_disk = "1MB"
[[domain]]
name = "example.test"
mailboxes = ["alice"]
[[domain]]
name = "corp.example"
deliver = "relay"
servers = ["127.0.0.7:{sink_port}"]
[outbound]
connect_timeout = "2s"
command_timeout = "5s"
data_timeout = "5s"
[queue]
retry = "{retry}"
"""

SUBJECT = re.compile(rb"\r\nSubject: soak-(\d+)\r\n")


class Sender(threading.Thread):
    """Sends its messages in order; on a failure reconnects and resends the same one.

    Every socket operation has smtplib's timeout, so a try always ends; a permanent
    (5xx) reply is recorded and the sender moves on (resending it could never succeed).
    `current`, `tries` and `last_error` say where it is when the test reports a stall.
    """

    def __init__(self, port: int, numbers: list[int], acked: set[int], lock: threading.Lock, size: int = 2000):
        super().__init__(daemon=True)
        self.port, self.numbers, self.acked, self.lock, self.size = port, numbers, acked, lock, size
        self.permanent: list[tuple[int, str]] = []
        self.stop = False
        self.current: int | None = None
        self.tries = 0
        self.last_error = ""

    def run(self) -> None:
        conn: smtplib.SMTP | None = None
        for n in self.numbers:
            self.current, self.tries = n, 0
            while not self.stop:
                self.tries += 1
                try:
                    if conn is None:
                        conn = smtplib.SMTP("127.0.0.1", self.port, timeout=10)
                    body = f"From: alice@example.test\r\nSubject: soak-{n}\r\nMessage-ID: <soak-{n}@example.test>\r\n\r\n{'x' * self.size}\r\n"
                    conn.sendmail("alice@example.test", ["user@corp.example"], body)
                except smtplib.SMTPResponseException as e:
                    self.last_error = f"{e.smtp_code} {e.smtp_error!r}"
                    conn = self._drop(conn)
                    if e.smtp_code >= 500:
                        self.permanent.append((n, self.last_error))
                        break
                except smtplib.SMTPRecipientsRefused as e:
                    self.last_error = f"recipients refused {e.recipients!r}"
                    conn = self._drop(conn)
                    if any(code >= 500 for code, _ in e.recipients.values()):
                        self.permanent.append((n, self.last_error))
                        break
                except (smtplib.SMTPException, OSError) as e:
                    self.last_error = f"{type(e).__name__}: {e}"
                    conn = self._drop(conn)  # the server is down or restarting
                else:
                    with self.lock:
                        self.acked.add(n)
                    break
        self.current = None
        if conn is not None:
            self._drop(conn)

    def describe(self) -> str:
        return f"at message {self.current} (try {self.tries}), last error: {self.last_error or 'none'}"

    def _drop(self, conn: smtplib.SMTP | None) -> None:
        if conn is not None:
            try:
                conn.close()
            except OSError:
                pass
        time.sleep(0.05)  # waiting for a real process to come back (not a clock)


STALL = 120  # seconds without a new acknowledgement before the run is called stalled


def wait_senders(senders: list[Sender], acked: set[int], proc: KanmonProcess) -> None:
    """Until every sender has finished; fail only when nothing is acknowledged for STALL
    seconds (a stall, with what each sender last saw), never for being slow: a run on a
    loaded machine may take long, a run that makes no progress is a defect."""
    seen, last_progress = len(acked), time.monotonic()
    while any(s.is_alive() for s in senders):
        for s in senders:
            s.join(1)
        if len(acked) != seen:
            seen, last_progress = len(acked), time.monotonic()
        elif time.monotonic() - last_progress > STALL:
            status = "running" if proc.proc and proc.proc.poll() is None else f"exited {proc.proc.returncode}"
            raise AssertionError(
                f"no message acknowledged for {STALL} s ({seen} so far); kanmon serve {status}; "
                + "; ".join(f"sender {i} {s.describe()}" for i, s in enumerate(senders))
                + f"\nserver stderr (tail):\n{proc.stderr_tail()}"
            )


def port_closed(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return False
    except OSError:
        return True


def crash_soak(tmp_path: Path, messages: int, kills: int) -> None:
    seed = int(os.environ.get("KANMON_SOAK_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    port, sink_port = free_port(), free_port("127.0.0.7")
    cfg = tmp_path / "kanmon.toml"
    retry = os.environ.get("KANMON_SOAK_RETRY", "1s..2s")
    cfg.write_text(CONFIG.format(data_dir=tmp_path / "data", port=port, sink_port=sink_port, retry=retry))
    acked: set[int] = set()
    lock = threading.Lock()
    clients = int(os.environ.get("KANMON_SOAK_CLIENTS", "2"))
    size = int(os.environ.get("KANMON_SOAK_SIZE", "2000"))
    group = os.environ.get("KANMON_SOAK_KILL", "main") == "group"
    senders = [Sender(port, list(range(k, messages, clients)), acked, lock, size) for k in range(clients)]
    with SmtpSink("127.0.0.7", sink_port) as sink:
        proc = KanmonProcess(cfg, "127.0.0.1", port, new_session=group).start()
        try:
            for s in senders:
                s.start()
            for point in sorted(rng.sample(range(1, messages), kills)):
                wait_for(lambda p=point: len(acked) >= p, 120, f"{point} acknowledged messages")
                time.sleep(rng.uniform(0, 0.05))  # a random moment after that point
                proc.kill_group() if group else proc.kill()
                wait_for(lambda: port_closed(port), 20, "the receiver processes to die with the main one")
                proc = KanmonProcess(cfg, "127.0.0.1", port, new_session=group).start()
            wait_senders(senders, acked, proc)
            assert [p for s in senders for p in s.permanent] == []
            assert acked == set(range(messages))

            def delivered() -> set[int]:
                return {int(m.group(1)) for t in list(sink.messages) if (m := SUBJECT.search(b"\r\n" + t.data))}

            wait_for(lambda: delivered() >= acked, 120, "every acknowledged message at the sink")
        finally:
            for s in senders:
                s.stop = True
            proc.terminate()
        counts: dict[int, int] = {}
        for t in sink.messages:
            m = SUBJECT.search(b"\r\n" + t.data)
            assert m, t.data[:200]
            counts[int(m.group(1))] = counts.get(int(m.group(1)), 0) + 1
    lost = acked - set(counts)
    duplicates = sum(c - 1 for c in counts.values())
    print(f"\ncrash soak seed={seed} retry={retry} clients={clients} size={size} kill={'group' if group else 'main'}: {messages} messages, {kills} kill -9, {len(acked)} acknowledged, "
          f"{len(lost)} lost, {duplicates} duplicate deliveries")
    assert not lost, f"seed {seed}: lost {sorted(lost)[:20]}"


def test_kill_9_at_random_moments_during_a_relay_run(tmp_path):
    crash_soak(tmp_path, 2000, 3)


@pytest.mark.long
def test_kill_9_at_random_moments_during_a_relay_run_long(tmp_path):
    crash_soak(tmp_path, 2000, 20)
