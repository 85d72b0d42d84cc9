"""A real `kanmon serve` started as root with `[server] user = "nobody"`: it binds a
port below 1024, runs as nobody, every file it creates is nobody's, it accepts and
delivers mail, tells a (stand-in) systemd READY/STOPPING over $NOTIFY_SOCKET, sends
its lines to a (stand-in) /dev/log, SIGUSR1 reopens its log file, and root's
`sendmail -t` (a cron job) reaches it through the maildrop.

The interpreter of this container lives under /root (0700), which nobody cannot
enter: the test runs the node in a private mount namespace where the interpreter's
prefix is bind-mounted at a path nobody can reach. Skipped where that cannot be done.
"""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.support.kanmon_node import maildir_messages, wait_for

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare(1)")


def low_port() -> int:
    for port in range(925, 1000):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    pytest.skip("no free port below 1024")


def uid_of(pid: int) -> list[int]:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return [int(x) for x in line.split()[1:]]
    raise AssertionError("no Uid line")


@pytest.fixture
def world(tmp_path: Path):
    # a directory nobody can traverse (pytest's tmp_path is root's 0700)
    base = Path(tempfile.mkdtemp(prefix="kanmon-drop-", dir="/tmp"))
    base.chmod(0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)


def test_root_start_drops_to_nobody_and_still_serves(world: Path) -> None:
    nobody = pwd.getpwnam("nobody")
    port = low_port()
    data = world / "data"
    devlog = world / "dev-log"
    notify = world / "notify"
    socks = []
    for path in (devlog, notify):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        s.bind(str(path))
        s.settimeout(20)
        path.chmod(0o666)  # nobody sends here after the switch
        socks.append(s)
    syslog_sock, notify_sock = socks
    conf = world / "kanmon.toml"
    conf.write_text(f"""
[server]
hostname = "mx1.example.test"
data_dir = "{data}"
user = "nobody"
workers = 1
[smtp]
listen = ["127.0.0.1:{port}"]
min_free_disk = "1MB"
[log]
to = ["file", "syslog"]
syslog_socket = "{devlog}"
[[domain]]
name = "example.test"
mailboxes = ["alice"]
""")
    conf.chmod(0o644)
    prefix = Path(sys.base_prefix)
    mnt = world / "python"
    mnt.mkdir()
    exe = mnt / Path(sys.executable).resolve().relative_to(prefix.resolve())
    script = f'mount --bind "{prefix}" "{mnt}" && exec "{exe}" -m kanmon serve -c "{conf}"'
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LD_LIBRARY_PATH": str(mnt / "lib"), "NOTIFY_SOCKET": str(notify)}
    proc = subprocess.Popen(["unshare", "-m", "sh", "-c", script], env=env, cwd="/",
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        try:
            ready = notify_sock.recv(4096)
        except TimeoutError:
            proc.kill()
            pytest.fail("no READY=1: " + proc.communicate(timeout=10)[0])
        assert ready.startswith(b"READY=1")
        assert uid_of(proc.pid) == [nobody.pw_uid] * 4  # real, effective, saved, filesystem
        caps = {ln.split(":")[0]: ln.split()[1] for ln in Path(f"/proc/{proc.pid}/status").read_text().splitlines()
                if ln.startswith("Cap")}
        assert int(caps["CapEff"], 16) == int(caps["CapPrm"], 16) == 1 << 10  # CAP_NET_BIND_SERVICE only

        with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
            assert s.sendmail("someone@remote.example", ["alice@example.test"], "Subject: hi\r\n\r\nhello\r\n") == {}
        wait_for(lambda: maildir_messages(data, "alice@example.test"), 20, "delivery")

        owners = {(p, p.lstat().st_uid) for p in [data, *data.rglob("*")] if not p.name.endswith(".sock")}
        assert {uid for _, uid in owners} == {nobody.pw_uid}, [p for p, uid in owners if uid != nobody.pw_uid]
        assert data.stat().st_mode & 0o777 == 0o700
        assert (data / "log" / "kanmon.log").stat().st_mode & 0o777 == 0o600

        lines = []
        wait_for(lambda: lines.append(syslog_sock.recv(9000).decode()) or any(
            "kanmon/smtpd[" in ln and "from=<someone@remote.example>" in ln for ln in lines), 20, "syslog line")

        log = data / "log" / "kanmon.log"
        log.rename(data / "log" / "kanmon.log.old")
        os.kill(proc.pid, signal.SIGUSR1)
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
            s.noop()
        wait_for(lambda: log.exists() and "connect from" in log.read_text(), 20, "reopened log file")
        assert log.stat().st_uid == nobody.pw_uid and proc.poll() is None

        # root's cron job: `echo test | sendmail -t` for a server that runs as nobody.
        sent = subprocess.run([sys.executable, "-m", "kanmon", "sendmail", "-t", "-C", str(conf)],
                              input=b"To: alice@example.test\nSubject: from root's cron\n\ntest\n",
                              env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, timeout=60)
        assert sent.returncode == 0, sent.stderr
        wait_for(lambda: len(maildir_messages(data, "alice@example.test")) == 2, 20, "root's message delivered")
        corrupt = data / "maildrop" / "corrupt"
        assert not corrupt.exists() or not list(corrupt.iterdir())
        assert any(b"from userid 0" in m for m in maildir_messages(data, "alice@example.test"))
        # root asks the server that runs as nobody (the control socket takes root too).
        status = subprocess.run([sys.executable, "-m", "kanmon", "status", "-c", str(conf)],
                                env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=60)
        assert status.returncode in (0, 1) and "running" in status.stdout, status.stdout + status.stderr
        # root backs the node up into a directory only root may enter; the server (nobody)
        # writes the queue part into its own data_dir.
        private = world / "root-only"
        private.mkdir(mode=0o700)
        backup = subprocess.run([sys.executable, "-m", "kanmon", "backup", str(private / "node.tar"), "-c", str(conf),
                                 "--json"], env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                                text=True, timeout=120)
        assert backup.returncode == 0, backup.stderr
        assert json.loads(backup.stdout)["queue"] == 0 and not list(data.glob(".node-backup-queue-*"))
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=60)[0]
        notify_sock.setblocking(False)
        later = []
        try:
            while True:
                later.append(notify_sock.recv(4096))
        except BlockingIOError:
            pass
        for s in socks:
            s.close()
    assert proc.returncode == 0, out
    assert "running as nobody" in out
    assert b"STOPPING=1" in later


def test_a_restore_run_as_root_leaves_the_data_dir_to_its_user(world: Path) -> None:
    """`kanmon restore` as root onto a data_dir of the service's user (nobody here): what
    it writes is that user's, or the server could not read its own mailboxes."""
    from click.testing import CliRunner

    from kanmon.cli import main

    nobody = pwd.getpwnam("nobody")
    data = world / "data"
    conf = world / "kanmon.toml"
    conf.write_text(f'[server]\ndata_dir = "{data}"\n[[domain]]\nname = "example.test"\nmailboxes = ["alice"]\n')
    new = data / "mailboxes" / "example.test" / "alice" / "new"
    new.mkdir(parents=True)
    (new / "1.m1.host").write_bytes(b"Subject: kept\r\n\r\nx\r\n")
    assert CliRunner().invoke(main, ["user", "passwd", "alice@example.test", "--stdin", "-c", str(conf)],
                              input="secret one\n").exit_code == 0
    archive = world / "node.tar"
    r = CliRunner().invoke(main, ["backup", str(archive), "-c", str(conf)])
    assert r.exit_code == 0, r.output
    shutil.rmtree(data)
    data.mkdir(mode=0o700)
    os.chown(data, nobody.pw_uid, nobody.pw_gid)
    r = CliRunner().invoke(main, ["restore", str(archive), "-c", str(conf)])
    assert r.exit_code == 0, r.output
    assert (data / "mailboxes" / "example.test" / "alice" / "new" / "1.m1.host").exists()
    wrong = [p for p in [data, *data.rglob("*")] if p.lstat().st_uid != nobody.pw_uid]
    assert wrong == []


def test_a_queue_restore_run_as_root_makes_the_spool_its_users(world: Path) -> None:
    """`kanmon queue restore` as root onto the service user's data_dir that was never
    served (what `kanmon service install` leaves): the spool it makes, the restored
    messages and the records are that user's, or the server could not start on them."""
    from click.testing import CliRunner

    from kanmon.cli import main
    from kanmon.model import new_queue_id
    from kanmon.spool.store import Spool
    from tests.unit.test_spool import env

    nobody = pwd.getpwnam("nobody")
    conf = world / "kanmon.toml"
    old, data = world / "old", world / "data"
    conf.write_text(f'[server]\ndata_dir = "{old}"\n')
    spool = Spool(old)
    asyncio.run(spool.store(new_queue_id(), env(), b"Subject: queued\r\n\r\nx\r\n"))
    spool.close()
    archive = world / "queue.kbk"
    r = CliRunner().invoke(main, ["queue", "backup", str(archive), "-c", str(conf)])
    assert r.exit_code == 0, r.output
    conf.write_text(f'[server]\ndata_dir = "{data}"\n')
    data.mkdir(mode=0o700)
    os.chown(data, nobody.pw_uid, nobody.pw_gid)
    r = CliRunner().invoke(main, ["queue", "restore", str(archive), "-c", str(conf)])
    assert r.exit_code == 0, r.output
    assert "making one" in r.stderr and "1 message(s) restored" in r.stdout, r.output
    wrong = [p for p in [data, *data.rglob("*")] if p.lstat().st_uid != nobody.pw_uid]
    assert wrong == []
