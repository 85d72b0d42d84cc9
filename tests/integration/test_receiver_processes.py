"""`kanmon serve` with [server] workers: SMTP receivers in child processes (kanmon.receiver)."""

from __future__ import annotations

import os
import socket
import signal
import smtplib
import subprocess
import sys
import time
from pathlib import Path

from kanmon.spool.recycle import READY
from tests.support.kanmon_node import BannerHammer, KanmonProcess, free_port, maildir_messages, wait_for, wait_port

CONFIG = """
[server]
hostname = "mx1.example.test"
data_dir = "{data_dir}"
workers = {workers}
[smtp]
listen = ["127.0.0.1:{port}"]
min_free_disk = "1MB"
[[domain]]
name = "example.test"
mailboxes = ["alice"]
"""


def receiver_pids(main_pid: int) -> list[int]:
    """Live children of the main process running kanmon.receiver (from /proc)."""
    try:
        children = Path(f"/proc/{main_pid}/task/{main_pid}/children").read_text().split()
    except OSError:
        return []
    out = []
    for pid in children:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"kanmon.receiver" in cmdline and alive(int(pid)):
            out.append(int(pid))
    return out


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead too
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def start(tmp_path, workers=2) -> tuple[KanmonProcess, int]:
    port = free_port()
    cfg = tmp_path / "kanmon.toml"
    cfg.write_text(CONFIG.format(data_dir=tmp_path / "data", port=port, workers=workers))
    return KanmonProcess(cfg, "127.0.0.1", port).start(), port


def send(port: int, subject: str) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as s:
        s.sendmail("a@remote.example", ["alice@example.test"], f"Subject: {subject}\r\n\r\nx\r\n")


def test_receivers_accept_and_the_main_process_delivers(tmp_path):
    proc, port = start(tmp_path, workers=2)
    try:
        wait_for(lambda: len(receiver_pids(proc.proc.pid)) == 2, 60, "two receivers")
        for i in range(10):
            send(port, f"m{i}")
        wait_for(lambda: len(maildir_messages(tmp_path / "data", "alice@example.test")) == 10, 60, "delivery")
        # The history row is written by the receiver, its final status by the main process:
        # every row ends up "Delivered", whichever writer flushes first.
        from kanmon.records.query import search_history

        wait_for(lambda: [r.status for r in search_history(tmp_path / "data")] == ["Delivered"] * 10, 15,
                 "delivered status in the history")
        # And a message's timeline reads in the order things happened across both writers.
        from kanmon.records.trace import trace

        qid = search_history(tmp_path / "data")[0].queue_id
        (timeline,) = trace(tmp_path / "data", qid)
        kinds = [s.step for s in timeline.steps]
        assert kinds.index("accepted") < kinds.index("attempt") < kinds.index("removed"), kinds
    finally:
        proc.terminate()


def test_a_message_from_a_receiver_has_its_from_line_before_its_delivery_lines_in_the_log(tmp_path):
    """The log read the sendmail way (grep ID kanmon.log): the receiver's from= line comes
    first, then the main process's to=... stat=Sent and removed, for every message."""
    proc, port = start(tmp_path, workers=1)
    try:
        wait_for(lambda: len(receiver_pids(proc.proc.pid)) == 1, 60, "the receiver")
        # Before, each message's order depended on how the two processes' writer passes
        # (0.2 s each) fell: many messages, so that some fall the wrong way.
        for i in range(40):
            send(port, f"m{i}")
        wait_for(lambda: len(maildir_messages(tmp_path / "data", "alice@example.test")) == 40, 60, "delivery")
        log = tmp_path / "data/log/kanmon.log"
        wait_for(lambda: log.read_text().count(": removed\n") == 40, 30, "every removed line")
        lines = log.read_text().splitlines()
        qids = {line.split(": ")[1] for line in lines if "kanmon/smtpd[" in line and ": from=<" in line}
        assert len(qids) == 40
        for qid in qids:
            mine = [line for line in lines if f": {qid}: " in line]
            kinds = [("from" if ": from=<" in m else "to" if ": to=<" in m else "removed" if m.endswith(": removed")
                      else "other") for m in mine]
            assert kinds.index("from") < kinds.index("to") < kinds.index("removed"), mine
    finally:
        proc.terminate()


def test_a_receiver_whose_log_writer_is_stuck_does_not_hold_its_messages_back(tmp_path):
    """Delivery waits for a receiver's log lines about the message (the test above), but
    not for ever: with `kanmon serve`'s stdout a pipe nobody reads (a stalled journald, a
    paused terminal), the receiver's records writer blocks once the pipe is full, and its
    messages are delivered all the same."""
    port = free_port()
    cfg = tmp_path / "kanmon.toml"
    cfg.write_text(CONFIG.format(data_dir=tmp_path / "data", port=port, workers=1))
    proc = subprocess.Popen([sys.executable, "-m", "kanmon", "serve", "-c", str(cfg)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)  # stdout never read
    try:
        wait_for(lambda: len(receiver_pids(proc.pid)) == 1, 60, "the receiver")
        wait_port("127.0.0.1", port, 30)
        body = "Subject: s\r\n\r\n" + "x" * 200 + "\r\n"
        with smtplib.SMTP("127.0.0.1", port, timeout=60) as s:
            for _ in range(400):  # several lines each: far more than a pipe holds (64 KiB)
                s.sendmail("a@remote.example", ["alice@example.test"], body)
        wait_for(lambda: len(maildir_messages(tmp_path / "data", "alice@example.test")) == 400, 90, "delivery")
    finally:
        proc.kill()
        proc.wait(10)
        proc.stdout.close()


def test_the_receivers_write_new_messages_over_the_queue_files_of_delivered_ones(tmp_path):
    """kanmon.spool.recycle across processes: the main process keeps each delivered
    message's queue file in spool/recycle/, the two receivers write the next messages over
    them (each file once), and every message arrives as it was sent."""
    proc, port = start(tmp_path, workers=2)
    recycle = tmp_path / "data/spool/recycle"
    try:
        wait_for(lambda: len(receiver_pids(proc.proc.pid)) == 2, 60, "two receivers")
        for i in range(10):
            send(port, f"first {i}")
        wait_for(lambda: len(maildir_messages(tmp_path / "data", "alice@example.test")) == 10, 60, "delivery")
        wait_for(lambda: not list((tmp_path / "data/spool/queue").iterdir()), 60, "the queue files finished")
        # Kept: the last message's file at least (a file kept for READY while the first
        # ten arrived one after another was written over by a later one of them).
        kept = set(os.listdir(recycle))
        assert 1 <= len(kept) <= 10, kept
        time.sleep(READY + 0.1)  # only a file kept that long is written over
        for i in range(10):
            send(port, f"second {i}")
        wait_for(lambda: len(maildir_messages(tmp_path / "data", "alice@example.test")) == 20, 60, "delivery")
        assert kept.isdisjoint(os.listdir(recycle))  # every kept file was taken, by one receiver each
        subjects = sorted(m.split(b"Subject: ", 1)[1].split(b"\n", 1)[0].decode()
                          for m in maildir_messages(tmp_path / "data", "alice@example.test"))
        assert subjects == sorted([f"first {i}" for i in range(10)] + [f"second {i}" for i in range(10)])
        # A queue file goes once its delivery is recorded, just after the Maildir file
        # appears: waited for, as after the first ten (an assertion here raced it).
        wait_for(lambda: not list((tmp_path / "data/spool/queue").iterdir()), 60, "the queue files finished")
    finally:
        proc.terminate()


def test_a_killed_receiver_is_restarted_and_nothing_is_lost(tmp_path):
    proc, port = start(tmp_path, workers=1)
    try:
        wait_for(lambda: len(receiver_pids(proc.proc.pid)) == 1, 60, "the receiver")
        (first,) = receiver_pids(proc.proc.pid)
        send(port, "before")
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: receiver_pids(proc.proc.pid) not in ([], [first]), 60, "a new receiver")
        wait_for(lambda: _sent_ok(port, "after"), 60, "mail accepted again")
        wait_for(lambda: len(maildir_messages(tmp_path / "data", "alice@example.test")) == 2, 60, "delivery")
        log = (tmp_path / "data/log/kanmon.log").read_text()
        assert f"SMTP receiver 0 (pid {first}) exited with status -9; restarting" in log
    finally:
        proc.terminate()



def test_the_data_a_killed_receiver_was_spilling_is_removed(tmp_path):
    """A receiver killed while it spilled a big DATA (never answered 250): its spill
    files go when it is replaced, not at the next start of the node."""
    proc, port = start(tmp_path, workers=1)
    try:
        wait_for(lambda: len(receiver_pids(proc.proc.pid)) == 1, 60, "the receiver")
        (first,) = receiver_pids(proc.proc.pid)
        incoming = tmp_path / "data/spool/incoming"
        spill = incoming / f"data-{first:x}.1.1"
        spill.write_bytes(b"Subject: half of a big message\r\n")
        other = incoming / f"data-{first + 1:x}.1.1"  # another process's: left alone
        other.write_bytes(b"x")
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: not spill.exists(), 60, "the killed receiver's spill file to go")
        assert other.exists()
    finally:
        proc.terminate()

def _sent_ok(port: int, subject: str) -> bool:
    try:
        send(port, subject)
        return True
    except (OSError, smtplib.SMTPException):
        return False


def test_receivers_die_with_the_main_process(tmp_path):
    proc, port = start(tmp_path, workers=2)
    wait_for(lambda: len(receiver_pids(proc.proc.pid)) == 2, 60, "two receivers")
    children = receiver_pids(proc.proc.pid)
    proc.kill()  # SIGKILL: no chance to clean up
    wait_for(lambda: not any(alive(p) for p in children), 60, "receivers to die")
    left = list((tmp_path / "data").glob(f".receivers-{proc.proc.pid}-*.toml"))
    assert left  # the killed node had no chance to remove its receivers' config snapshot
    # and the port is free for the next start, which removes the dead node's snapshot
    proc2, _ = start_same(tmp_path, port)
    try:
        # (the listening socket is open a moment before the receivers are started)
        wait_for(lambda: not any(p.exists() for p in left), 30, "the dead node's snapshot to go")
        wait_for(lambda: list((tmp_path / "data").glob(f".receivers-{proc2.proc.pid}-1.toml")), 30, "the new one")
    finally:
        proc2.terminate()


def start_same(tmp_path, port) -> tuple[KanmonProcess, int]:
    return KanmonProcess(tmp_path / "kanmon.toml", "127.0.0.1", port).start(), port


def test_port_in_use_is_a_clear_start_error(tmp_path):
    import socket
    import sys

    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    port = blocker.getsockname()[1]
    cfg = tmp_path / "kanmon.toml"
    cfg.write_text(CONFIG.format(data_dir=tmp_path / "data", port=port, workers=1))
    try:
        out = subprocess.run([sys.executable, "-m", "kanmon", "serve", "-c", str(cfg), "--quiet"],
                             capture_output=True, text=True, timeout=30)
    finally:
        blocker.close()
    assert out.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in out.stderr



def test_a_reload_replaces_the_receivers_without_cutting_a_session(tmp_path):
    """The new receivers listen before the old ones stop accepting; an old receiver
    finishes its session in progress (under the old settings), then exits."""
    import sys

    proc, port = start(tmp_path, workers=1)
    try:
        wait_for(lambda: len(receiver_pids(proc.proc.pid)) == 1, 60, "the receiver")
        (old,) = receiver_pids(proc.proc.pid)
        s = smtplib.SMTP("127.0.0.1", port, timeout=30)
        s.ehlo()
        s.mail("a@remote.example")
        assert s.rcpt("alice@example.test")[0] == 250
        cfg = tmp_path / "kanmon.toml"
        cfg.write_text(CONFIG.format(data_dir=tmp_path / "data", port=port, workers=2)
                       .replace('mailboxes = ["alice"]', 'mailboxes = ["alice", "carol"]'))
        out = subprocess.run([sys.executable, "-m", "kanmon", "reload", "-c", str(cfg)], capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        new = [p for p in receiver_pids(proc.proc.pid) if p != old]
        assert len(new) == 2  # ready before the reload answered
        with smtplib.SMTP("127.0.0.1", port, timeout=60) as c:  # a new session: a new receiver
            c.ehlo()
            c.mail("a@remote.example")
            assert c.rcpt("carol@example.test")[0] == 250
        assert alive(old)  # still finishing the held session
        assert s.rcpt("carol@example.test")[0] == 550  # the settings the session started with
        assert s.data(b"Subject: held\r\n\r\nx\r\n")[0] == 250
        s.quit()
        wait_for(lambda: not alive(old), 60, "the old receiver to exit")
        wait_for(lambda: len(maildir_messages(tmp_path / "data", "alice@example.test")) == 1, 60, "delivery")
        assert "exited with status" not in (tmp_path / "data/log/kanmon.log").read_text()
        # the old snapshot goes once the old pool has reaped its receiver
        wait_for(lambda: not list((tmp_path / "data").glob(".receivers-*-1.toml")), 60, "the old snapshot to go")
    finally:
        proc.terminate()


def test_a_reload_with_two_workers_refuses_no_connection_and_keeps_a_held_transaction(tmp_path):
    """workers = 2: while the receivers are replaced (one at a time), 200 connection
    attempts all get a banner, and a transaction held past RCPT completes."""
    import sys

    proc, port = start(tmp_path, workers=2)
    try:
        wait_for(lambda: len(receiver_pids(proc.proc.pid)) == 2, 60, "two receivers")
        old = set(receiver_pids(proc.proc.pid))
        s = smtplib.SMTP("127.0.0.1", port, timeout=60)
        s.ehlo()
        s.mail("a@remote.example")
        assert s.rcpt("alice@example.test")[0] == 250
        with BannerHammer("127.0.0.1", port) as hammer:
            assert hammer.started.wait(30)
            cfg = tmp_path / "kanmon.toml"
            cfg.write_text(CONFIG.format(data_dir=tmp_path / "data", port=port, workers=2)
                           .replace('mailboxes = ["alice"]', 'mailboxes = ["alice", "carol"]'))
            out = subprocess.run([sys.executable, "-m", "kanmon", "reload", "-c", str(cfg)], capture_output=True,
                                 text=True, timeout=120)
            failed = hammer.finish()
        assert out.returncode == 0, out.stderr
        assert len(hammer.results) >= 200
        assert failed == []
        assert len(set(receiver_pids(proc.proc.pid)) - old) == 2
        assert s.rcpt("carol@example.test")[0] == 550  # the settings the session started with
        assert s.data(b"Subject: held\r\n\r\nx\r\n")[0] == 250
        s.quit()
        wait_for(lambda: not any(alive(p) for p in old), 60, "the old receivers to exit")
        wait_for(lambda: len(maildir_messages(tmp_path / "data", "alice@example.test")) == 1, 60, "delivery")
        log = (tmp_path / "data/log/kanmon.log").read_text()
        assert "reload: SMTP receiver 0: pid" in log and "reload: SMTP receiver 1: pid" in log
        assert "exited with status" not in log
    finally:
        proc.terminate()


def test_receivers_are_replaced_one_at_a_time_and_given_back_when_a_reload_fails(tmp_path, monkeypatch):
    """ReceiverPool.start(replacing=old): new receiver i listens before old receiver i is
    retired, and new receiver i+1 is started only after that; when a new receiver does
    not start, restore() gives the old pool its receivers back."""
    import asyncio

    from kanmon import receiver as receiver_module
    from kanmon.listeners import bind_listener

    port = free_port()
    cfg = tmp_path / "kanmon.toml"
    cfg.write_text(CONFIG.format(data_dir=tmp_path / "data", port=port, workers=2))
    (tmp_path / "data").mkdir()
    from kanmon.config import load_config
    from kanmon.tlscert import server_context

    server_context(load_config(str(cfg)))  # the self-signed certificate, made once (as the node does)
    steps: list[str] = []
    real_popen = subprocess.Popen

    broken = tmp_path / "broken.toml"
    broken.write_text("[server]\nbogus = 1\n")
    breaking: list[bool] = []

    def popen(cmd, **kw):
        if breaking and cmd[cmd.index("--index") + 1] == "1":  # receiver 1 cannot load its config
            cmd = [*cmd[:cmd.index("--config") + 1], str(broken), *cmd[cmd.index("--config") + 2:]]
        p = real_popen(cmd, **kw)
        steps.append(f"spawn {cmd[cmd.index('--index') + 1]}")
        return p

    monkeypatch.setattr(receiver_module.subprocess, "Popen", popen)

    def pool(count: int) -> receiver_module.ReceiverPool:
        sock = listener.dup()  # each pool closes its own duplicate
        sock.set_inheritable(True)
        return receiver_module.ReceiverPool(str(cfg), [{"fd": sock.fileno(), "role": "smtp", "tls": False}],
                                            [sock], count, lambda qid: None, lambda *a, **k: None)

    listener = bind_listener("127.0.0.1", port)

    async def scenario() -> None:
        old = pool(2)
        await old.start()
        real_retire = old.retire_one

        def retire_one(i):
            steps.append(f"retire {i}")
            return real_retire(i)

        old.retire_one = retire_one
        steps.clear()
        new = pool(2)
        await new.start(replacing=old)
        assert steps == ["spawn 0", "retire 0", "spawn 1", "retire 1"]
        await asyncio.to_thread(send, port, "via the new receivers")
        await old.retire()

        # A replacement whose second receiver cannot start: the pool that was serving
        # gets its first receiver back and serves on.
        steps.clear()
        new.retire_one = lambda i, real=new.retire_one: steps.append(f"retire {i}") or real(i)
        breaking.append(True)
        bad = pool(2)
        try:
            await bad.start(replacing=new)
        except OSError:
            pass
        else:
            raise AssertionError("a receiver that cannot load its config started")
        assert steps == ["spawn 0", "retire 0", "spawn 1"]
        await new.restore()
        assert steps == ["spawn 0", "retire 0", "spawn 1", "spawn 0"]  # the running pool's receiver 0, again
        await bad.retire()
        await asyncio.to_thread(send, port, "via the restored receiver")
        await new.stop()

    try:
        asyncio.run(scenario())
    finally:
        listener.close()
    assert len(maildir_messages(tmp_path / "data", "alice@example.test")) == 0  # nothing delivers here
    from kanmon.spool.store import Spool

    assert len(Spool(tmp_path / "data").recover()[0]) == 2  # both messages are in the spool
