"""`kanmon serve` with [server] delivery_workers: deliveries in agent processes (kanmon.agent).

Real processes (kanmon serve, its agents), a real SMTP sink on 127.0.0.x as the relay
host, real Maildir delivery; the agents are killed with SIGKILL mid-delivery.
"""

from __future__ import annotations

import os
import signal
import smtplib
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.support.kanmon_node import KanmonProcess, _FailingDns, free_port, maildir_messages, wait_for
from tests.support.smtpsink import SmtpSink

CONFIG = """
[server]
hostname = "mx1.example.test"
data_dir = "{data_dir}"
workers = {workers}
delivery_workers = {agents}
[smtp]
listen = ["127.0.0.1:{port}"]
min_free_disk = "1MB"
[dns]
servers = ["{dns}"]
[queue]
retry = "1h..4h"
[[domain]]
name = "example.test"
mailboxes = [{mailboxes}]
[[domain]]
name = "relay.test"
deliver = "relay"
servers = ["{sink}"]
tls = "none"
"""


def children(main_pid: int, marker: bytes) -> list[int]:
    """Live children of the main process whose command line has `marker` (from /proc)."""
    try:
        pids = Path(f"/proc/{main_pid}/task/{main_pid}/children").read_text().split()
    except OSError:
        return []
    out = []
    for pid in pids:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            state = Path(f"/proc/{pid}/stat").read_text().split()[2]
        except OSError:
            continue
        if marker in cmdline and state != "Z":
            out.append(int(pid))
    return out


def agent_pids(proc: KanmonProcess) -> list[int]:
    return children(proc.proc.pid, b"kanmon.agent")


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


class Node:
    def __init__(self, tmp_path: Path, sink: SmtpSink, agents: int = 1, workers: int = 0):
        self.tmp_path = tmp_path
        self.data = tmp_path / "data"
        self.port = free_port()
        self.sink = sink
        self.cfg = tmp_path / "kanmon.toml"
        self.write(agents, workers, '"alice", "bob"')
        self.proc = KanmonProcess(self.cfg, "127.0.0.1", self.port)

    def write(self, agents: int, workers: int, mailboxes: str) -> None:
        self.cfg.write_text(CONFIG.format(data_dir=self.data, port=self.port, workers=workers, agents=agents,
                                          dns=_FailingDns.address(), sink=self.sink.address, mailboxes=mailboxes))

    def send(self, rcpt: str, subject: str) -> None:
        with smtplib.SMTP("127.0.0.1", self.port, timeout=30) as s:
            s.sendmail("a@relay.test", [rcpt], f"Subject: {subject}\r\n\r\nbody of {subject}\r\n")

    def kanmon(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "kanmon", *args, "-c", str(self.cfg)], capture_output=True,
                              text=True, timeout=120)

    def queued(self) -> list[str]:
        return sorted(p.name for p in (self.data / "spool/queue").iterdir())

    def wait_agents_ready(self, count: int) -> list[int]:
        """Until the node hands deliveries to its agents (until then it delivers itself)."""
        wait_for(lambda: f"delivery agents: {count} ready" in self.log(), 60, "the agents to be ready")
        return agent_pids(self.proc)

    def log(self) -> str:
        try:
            return (self.data / "log/kanmon.log").read_text()
        except FileNotFoundError:
            return ""


@pytest.fixture
def sink():
    with SmtpSink("127.0.0.2") as s:
        yield s


def test_agents_deliver_to_maildir_and_by_smtp(tmp_path, sink):
    node = Node(tmp_path, sink, agents=2, workers=1)
    node.proc.start()
    try:
        assert len(node.wait_agents_ready(2)) == 2
        for i in range(6):
            node.send("alice@example.test", f"local {i}")
            node.send(f"user{i}@relay.test", f"relayed {i}")
        with smtplib.SMTP("127.0.0.1", node.port, timeout=30) as s:  # one message, two mailboxes
            s.sendmail("a@relay.test", ["alice@example.test", "bob@example.test"], "Subject: both\r\n\r\nx\r\n")
        wait_for(lambda: len(maildir_messages(node.data, "alice@example.test")) == 7, 60, "local delivery")
        wait_for(lambda: len(maildir_messages(node.data, "bob@example.test")) == 1, 60, "local delivery (bob)")
        sink.wait_for_messages(6, 30)
        wait_for(lambda: node.queued() == [], 60, "an empty queue")
        assert sorted(t.rcpts[0] for t in sink.messages) == [f"user{i}@relay.test" for i in range(6)]
        # The main process journals and logs the results the agents reported.
        wait_for(lambda: node.log().count("stat=Sent") == 14, 60, "the delivery lines")
        assert "mailer=esmtp, relay=[127.0.0.2]" in node.log()
        # `kanmon dns cache flush` reaches the agents' caches too (SIGUSR1; they live on).
        agents = agent_pids(node.proc)
        out = node.kanmon("dns", "cache", "flush")
        assert out.returncode == 0, out.stderr
        assert "and of 2 delivery agent process(es)" in out.stdout
        node.send("user9@relay.test", "after the flush")
        sink.wait_for_messages(7, 30)
        assert "exited with status" not in node.log()
        assert sorted(agent_pids(node.proc)) == sorted(agents)
    finally:
        node.proc.terminate()
    assert agent_pids(node.proc) == []


def test_an_agent_killed_mid_delivery_defers_and_the_retry_delivers(tmp_path, sink):
    """kill -9 while the sink holds the reply to the final dot: the delivery is deferred
    (journaled once), the agent is started again, and the retry delivers the message."""
    node = Node(tmp_path, sink, agents=1)
    node.proc.start()
    try:
        (agent,) = node.wait_agents_ready(1)
        sink.hang = "data-end"
        node.send("carol@relay.test", "in flight")
        sink.wait_for_messages(1, 30)  # the agent sent it and waits for the reply
        (qid,) = node.queued()
        os.kill(agent, signal.SIGKILL)
        wait_for(lambda: "stat=Deferred" in node.log(), 60, "the deferral")
        log = node.log()
        assert "delivery agent exited during the delivery; will retry" in log
        assert f"delivery agent 0 (pid {agent}) exited with status -9; 1 deliveries in flight" in log
        assert node.queued() == [qid]  # never lost
        state = (node.data / "spool/state" / qid).read_text()
        assert state.count('"k":"result"') == 1 and '"status":"deferred"' in state
        wait_for(lambda: agent_pids(node.proc) not in ([], [agent]), 60, "a new agent")
        sink.hang = None
        out = node.kanmon("queue", "flush", qid)
        assert out.returncode == 0, out.stderr
        wait_for(lambda: node.queued() == [], 60, "the retry to deliver")
        sink.wait_for_messages(2, 30)  # the first copy never got its 250: at least once
        wait_for(lambda: node.log().count("stat=Sent") == 1, 60, "its delivery line")
    finally:
        node.proc.terminate()


def test_a_reload_lets_the_old_agents_finish_their_deliveries(tmp_path, sink):
    """New agents take every new delivery once they are ready; the old one reports the
    delivery it has in flight (journaled once) and exits."""
    node = Node(tmp_path, sink, agents=1)
    node.proc.start()
    try:
        (old,) = node.wait_agents_ready(1)
        release = threading.Event()
        sink.hold_data_end = release
        node.send("dave@relay.test", "held")
        sink.wait_for_messages(1, 30)
        node.write(2, 0, '"alice", "bob", "carol"')
        out = node.kanmon("reload")
        assert out.returncode == 0, out.stderr
        new = [p for p in agent_pids(node.proc) if p != old]
        assert len(new) == 2  # ready before the reload answered
        assert alive(old)  # still delivering
        sink.hold_data_end = None
        node.send("carol@example.test", "after the reload")  # a new mailbox: the new config's agents
        wait_for(lambda: len(maildir_messages(node.data, "carol@example.test")) == 1, 60, "delivery by a new agent")
        release.set()
        wait_for(lambda: node.queued() == [], 60, "the held delivery to be reported")
        wait_for(lambda: not alive(old), 60, "the old agent to exit")
        wait_for(lambda: node.log().count("stat=Sent") == 2, 60, "both delivery lines")
        assert "exited with status" not in node.log()
        assert len(sink.messages) == 1
    finally:
        node.proc.terminate()


def test_a_stop_hands_in_flight_deliveries_back_to_the_queue(tmp_path, sink):
    """At stop the delivery in flight ends unfinished: nothing is journaled about it, and
    the next start delivers it."""
    node = Node(tmp_path, sink, agents=1)
    node.proc.start()
    release = threading.Event()
    try:
        (agent,) = node.wait_agents_ready(1)
        sink.hold_data_end = release
        node.send("erin@relay.test", "cut short")
        sink.wait_for_messages(1, 30)
        (qid,) = node.queued()
    finally:
        node.proc.terminate()
    assert not alive(agent)
    assert node.queued() == [qid]
    assert not (node.data / "spool/state" / qid).exists()  # no attempt journaled
    sink.hold_data_end = None
    release.set()
    node.proc.start()
    try:
        wait_for(lambda: node.queued() == [], 60, "delivery after the restart")
        wait_for(lambda: node.log().count("stat=Sent") == 1, 60, "its delivery line")
    finally:
        node.proc.terminate()
