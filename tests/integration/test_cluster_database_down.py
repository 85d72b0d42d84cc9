"""A cluster node while its shared PostgreSQL (`[records] url`) is down: `kanmon serve`
with receiver processes keeps taking mail, as docs/cluster.md promises.

- A node started while PostgreSQL is stopped starts, its receivers listen and mail is
  accepted and delivered; what the receivers could not do in the shared state at their
  start (forget what an earlier process of their id held; the greylist's prune in the
  listener's first probe) is an event line, not their end.
- PostgreSQL stopped under a running node: the receivers keep serving; the connection
  gauge's outage is said once per receiver, not once per connection; a receiver killed
  during the outage is started again, and the main process's cleanup of what it held in
  the shared gauge is retried in the background instead of stopping the node. When
  PostgreSQL returns, the gauge says it is available again and the dead receiver's
  places are gone from the shared gauge.
"""

from __future__ import annotations

import os
import signal
import smtplib
import time
import uuid
from pathlib import Path

import pytest

from tests.integration.test_receiver_processes import receiver_pids
from tests.support.kanmon_node import KanmonProcess, free_port, maildir_messages, wait_banner, wait_for
from tests.support.postgres import PgServer

psycopg = pytest.importorskip("psycopg", reason="psycopg is not installed (pip install 'psycopg[binary]')")

HOST = "127.0.0.95"

CONFIG = """
[server]
hostname = "mx1.example.test"
data_dir = "{data_dir}"
workers = {workers}
[smtp]
listen = ["{host}:{port}"]
min_free_disk = "1MB"
[[domain]]
name = "example.test"
mailboxes = ["alice"]
[records]
url = "{url}"
node = "mx1"
[[session_profile]]
name = "default"
sender_domain_check = false
reject_own_helo = false
# Greylisting for another client: its check prunes the shared state in the listener's
# first probe, before the receiver listens.
[[ip_policy]]
source = ["192.0.2.1/32"]
profile = "grey"
[[session_profile]]
name = "grey"
sender_domain_check = false
reject_own_helo = false
greylist = true
"""


@pytest.fixture
def pg():
    server = PgServer()
    server.start()
    try:
        yield server
    finally:
        server.destroy()


def node_for(tmp_path: Path, url: str, workers: int) -> KanmonProcess:
    port = free_port(HOST)
    cfg = tmp_path / "kanmon.toml"
    cfg.write_text(CONFIG.format(data_dir=tmp_path / "data", workers=workers, host=HOST, port=port, url=url))
    return KanmonProcess(cfg, HOST, port)


def banner(node: KanmonProcess) -> bool:
    try:
        wait_banner(node.host, node.port, 0.1)
    except AssertionError:
        return False
    return True


def send(node: KanmonProcess, subject: str) -> str:
    mid = f"<{uuid.uuid4().hex}@remote.example>"
    with smtplib.SMTP(node.host, node.port, timeout=30) as s:
        s.sendmail("a@remote.example", ["alice@example.test"], f"Subject: {subject}\r\nMessage-ID: {mid}\r\n\r\nx\r\n")
    return mid


def send_beside(node: KanmonProcess, subject: str) -> str:
    """send() while another connection is open: the receiver's place kept from an earlier
    connection is in use, so this one needs a transaction of the shared gauge."""
    with smtplib.SMTP(node.host, node.port, timeout=30) as held:
        held.ehlo()
        return send(node, subject)


def delivered(node: KanmonProcess, mid: str) -> bool:
    return any(mid.encode() in m for m in maildir_messages(node.config_file.parent / "data", "alice@example.test"))


def log_lines(node: KanmonProcess, text: str) -> list[str]:
    path = node.config_file.parent / "data" / "log" / "kanmon.log"
    try:
        return [line for line in path.read_text(errors="replace").splitlines() if text in line]
    except FileNotFoundError:
        return []


def running(node: KanmonProcess) -> bool:
    return node.proc is not None and node.proc.poll() is None


def test_a_node_starts_with_postgresql_stopped_and_accepts_mail(tmp_path, pg):
    url = pg.create_database()
    pg.stop()
    node = node_for(tmp_path, url, workers=2)
    node.start()
    try:
        wait_for(lambda: banner(node) or not running(node), 60, "a receiver's 220")
        assert running(node), node.stderr_tail()
        mids = [send(node, f"while PostgreSQL is down {i}") for i in range(4)]
        wait_for(lambda: all(delivered(node, m) for m in mids), 60, "delivery while PostgreSQL is down")
        assert running(node) and len(receiver_pids(node.proc.pid)) == 2, node.stderr_tail()
        # Each receiver said once that it could not forget its id's places; no traceback.
        def skipped() -> list[str]:  # the receivers' own lines (not the alerts that repeat them)
            return [line for line in log_lines(node, "connection counts of an earlier process")
                    if "]: SMTP receiver " in line]

        wait_for(lambda: len(skipped()) >= 2, 30, "each receiver's line")
        assert len(skipped()) == 2, skipped()
        assert "Traceback" not in node.stderr_tail()
    finally:
        node.terminate()
    assert node.proc.returncode == 0, node.stderr_tail()


def test_postgresql_stopped_under_a_running_node_receivers_serve_and_recover(tmp_path, pg):
    url = pg.create_database()
    node = node_for(tmp_path, url, workers=1)
    node.start()
    try:
        wait_for(lambda: banner(node), 60, "a receiver's 220")
        first = send(node, "before the outage")
        wait_for(lambda: delivered(node, first), 60, "delivery before the outage")
        pg.stop()
        during = [send_beside(node, f"during the outage {i}") for i in range(5)]
        wait_for(lambda: all(delivered(node, m) for m in during), 60, "delivery during the outage")
        wait_for(lambda: log_lines(node, "connection gauge unavailable"), 30, "the gauge's outage said")

        # A receiver killed while PostgreSQL is down: started again; the node stays up.
        (old,) = receiver_pids(node.proc.pid)
        os.kill(old, signal.SIGKILL)
        wait_for(lambda: log_lines(node, f"pid {old}") and receiver_pids(node.proc.pid) not in ([], [old]), 30,
                 "the receiver started again")
        wait_for(lambda: banner(node), 60, "the new receiver's 220")
        again = send(node, "after the receiver was restarted")
        wait_for(lambda: delivered(node, again), 60, "delivery by the new receiver")
        assert running(node), node.stderr_tail()
        assert log_lines(node, f"connection counts of SMTP receiver pid {old}"), log_lines(node, "cleanup")
        assert not [line for line in log_lines(node, "stopped") if line.endswith("]: stopped")]

        # PostgreSQL returns: the gauge answers again and says so; the dead receiver's
        # places are dropped by the retried cleanup.
        pg.start()
        for i in range(60):
            send_beside(node, f"after the outage {i}")
            if log_lines(node, "connection gauge available again"):
                break
            time.sleep(1)
        wait_for(lambda: log_lines(node, "connection gauge available again"), 30, "the gauge's return said")
        # One line for the outage per receiver process, not one per connection; one for its end.
        said = log_lines(node, "connection gauge")
        assert len([line for line in said if f"[{old}]:" in line]) == 1, said
        # (the event itself; the alert it resolves quotes it too)
        assert len([line for line in said if line.endswith("]: connection gauge available again")]) == 1, said

        def owners() -> set[str]:
            with psycopg.connect(url) as conn:
                return {o for (o,) in conn.execute("SELECT DISTINCT owner FROM state_gauge")}

        wait_for(lambda: f"mx1:{old}" not in owners(), 60, "the dead receiver's places dropped")
        wait_for(lambda: log_lines(node, f"connection counts of SMTP receiver pid {old} dropped"), 60,
                 "the cleanup's end said")
        assert running(node), node.stderr_tail()
    finally:
        node.terminate()
    assert node.proc.returncode == 0, node.stderr_tail()
