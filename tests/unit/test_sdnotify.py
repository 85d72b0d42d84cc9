"""sd_notify spoken to a real unix datagram socket standing in for systemd's."""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

import pytest

from kanmon import sdnotify


@pytest.fixture
def listener(tmp_path: Path):
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    yield sock, {"NOTIFY_SOCKET": str(path)}
    sock.close()


def test_each_state_is_one_datagram(listener) -> None:
    sock, env = listener
    assert sdnotify.notify("READY=1", "STATUS=serving", environ=env)
    assert sock.recv(4096) == b"READY=1\nSTATUS=serving"
    os.environ["NOTIFY_SOCKET"] = env["NOTIFY_SOCKET"]
    try:
        assert sdnotify.reloading() and sdnotify.watchdog() and sdnotify.stopping() and sdnotify.ready("up")
    finally:
        del os.environ["NOTIFY_SOCKET"]
    reload_msg = sock.recv(4096).decode()
    assert reload_msg.startswith("RELOADING=1\nMONOTONIC_USEC=") and reload_msg.split("=")[-1].isdigit()
    assert [sock.recv(4096) for _ in range(3)] == [b"WATCHDOG=1", b"STOPPING=1", b"READY=1\nSTATUS=up"]


def test_an_abstract_socket_address() -> None:
    name = f"kanmon-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(5)
    try:
        assert sdnotify.notify("READY=1", environ={"NOTIFY_SOCKET": "@" + name})
        assert sock.recv(100) == b"READY=1"
    finally:
        sock.close()


def test_without_a_socket_nothing_happens(tmp_path: Path) -> None:
    assert not sdnotify.notify("READY=1", environ={})
    assert not sdnotify.notify("READY=1", environ={"NOTIFY_SOCKET": "relative"})
    assert not sdnotify.notify("READY=1", environ={"NOTIFY_SOCKET": str(tmp_path / "gone")})


def test_watchdog_interval_is_half_of_watchdog_sec() -> None:
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "60000000"}) == 30.0
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": str(os.getpid())}) == 30.0
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "1"}) is None
    assert sdnotify.watchdog_interval({}) is None
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "x"}) is None


def test_is_journal_stream_compares_device_and_inode(tmp_path) -> None:
    with open(tmp_path / "out", "w") as f, open(tmp_path / "other", "w") as g:
        st = os.fstat(f.fileno())
        env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        assert sdnotify.is_journal_stream(f.fileno(), env)
        assert not sdnotify.is_journal_stream(g.fileno(), env)
        assert not sdnotify.is_journal_stream(f.fileno(), {})
        assert not sdnotify.is_journal_stream(f.fileno(), {"JOURNAL_STREAM": "garbage"})
