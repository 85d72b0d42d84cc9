"""Real scanners for the content tests: Debian's clamd with a signature database made for
the test (no signature download), and Debian's Rspamd with a private configuration
(offline: its DNS points at a closed loopback port). Each runs as a child process on a
127.0.0.x address for the test module and is stopped after it. A test that needs one
skips, saying why, where the package is not installed (.ci/run installs both)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from tests.support.kanmon_node import free_port

# The payload the test signature matches: a "virus" only to this clamd.
TEST_VIRUS = b"KANMON-TEST-VIRUS-7f3a"
CLAMD_HOST = "127.0.0.82"
RSPAMD_HOST = "127.0.0.83"
GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


def _wait(ready, timeout: float, what: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited ({proc.returncode}): {log.read_text(errors='replace')[-2000:]}")
        if ready():
            return
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"{what} was not ready within {timeout:g} s: {log.read_text(errors='replace')[-2000:]}")


def clamd_pings(address: tuple[str, int]) -> bool:
    try:
        with socket.create_connection(address, timeout=2) as s:
            s.sendall(b"zPING\0")
            return s.recv(16).rstrip(b"\0") == b"PONG"
    except OSError:
        return False


@pytest.fixture(scope="module")
def clamd_server(tmp_path_factory):
    """"127.0.0.82:PORT" of a clamd whose only signature is TEST_VIRUS (StreamMaxLength 5M)."""
    binary = shutil.which("clamd") or ("/usr/sbin/clamd" if Path("/usr/sbin/clamd").exists() else None)
    if binary is None:
        pytest.skip("clamd is not installed (apt-get install clamav-daemon)")
    d = tmp_path_factory.mktemp("clamd")
    (d / "db").mkdir()
    (d / "db" / "test.ndb").write_text(f"Kanmon.Test.Sig:0:*:{TEST_VIRUS.hex()}\n")
    port = free_port(CLAMD_HOST)
    log = d / "clamd.log"
    (d / "clamd.conf").write_text(
        f"Foreground yes\nDatabaseDirectory {d / 'db'}\nTCPSocket {port}\nTCPAddr {CLAMD_HOST}\n"
        f"LogFile {log}\nStreamMaxLength 5M\nUser root\n")
    log.touch()
    proc = subprocess.Popen([binary, "-c", str(d / "clamd.conf")], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        _wait(lambda: clamd_pings((CLAMD_HOST, port)), 120, "clamd", proc, log)
        yield f"{CLAMD_HOST}:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def _rspamd_ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/ping", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def rspamd_server(tmp_path_factory):
    """"http://127.0.0.83:PORT" of an Rspamd with the package's rules, offline."""
    binary = shutil.which("rspamd")
    if binary is None or not Path("/etc/rspamd/rspamd.conf").exists():
        pytest.skip("rspamd is not installed (apt-get install rspamd)")
    d = tmp_path_factory.mktemp("rspamd")
    for sub in ("local.d", "db", "run"):
        (d / sub).mkdir()
    port = free_port(RSPAMD_HOST)
    local = d / "local.d"
    (local / "worker-normal.inc").write_text(f'bind_socket = "{RSPAMD_HOST}:{port}";\n')
    (local / "worker-controller.inc").write_text(f'bind_socket = "{RSPAMD_HOST}:{free_port(RSPAMD_HOST)}";\n')
    (local / "worker-proxy.inc").write_text(f'bind_socket = "{RSPAMD_HOST}:{free_port(RSPAMD_HOST)}";\n')
    # DNS to a loopback port where nothing answers: lookups fail fast, scoring still works.
    (local / "options.inc").write_text(f'dns {{ nameserver = ["127.0.0.1:{free_port()}"]; timeout = 1s; retransmits = 1; }}\n')
    log = d / "rspamd.out"
    with open(log, "wb") as out:
        proc = subprocess.Popen([binary, "-f", "-u", "root", "-g", "root", "-c", "/etc/rspamd/rspamd.conf",
                                 f"--var=LOCAL_CONFDIR={d}", f"--var=DBDIR={d / 'db'}", f"--var=RUNDIR={d / 'run'}",
                                 f"--var=LOGDIR={d}"], stdout=out, stderr=subprocess.STDOUT)
    url = f"http://{RSPAMD_HOST}:{port}"
    try:
        _wait(lambda: _rspamd_ready(url), 180, "rspamd", proc, log)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
