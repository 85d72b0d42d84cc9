"""Shared pytest setup: the `long` marker, no config found by accident, and the tests'
own PostgreSQL (tests/support/postgres.py: the fixtures pg_server, pg_url, private_pg,
registered here once so that the whole run shares one session server).

Tests marked `long` (soak, fuzz and stress runs, declared in pyproject.toml) are skipped
unless KANMON_LONG=1; each has a short version that always runs, so CI and a plain
`python -m pytest` stay fast. Run the long ones with:

    KANMON_LONG=1 python -m pytest -m long

A command run in-process without -c looks at $KANMON_CONFIG and /etc/kanmon/kanmon.toml:
every test runs with neither (the machine's own config never leaks into a test), and
tests of that lookup set them explicitly.

Before the first test, kanmon's modules are compiled to bytecode (`__pycache__`, ignored by
git). The suite starts ~430 kanmon processes (`kanmon serve` and other commands, receiver,
agent and recovery children). Where the environment sets PYTHONDONTWRITEBYTECODE, as this
project's machines do, an editable install never gets bytecode, and each of those processes
compiled every module it imported again: `kanmon --version` took 1.7-1.9 s instead of
0.85 s, and test_queue_ops, test_service_cli and test_reload together 115 s instead of 84 s.

The tests run in two worker processes (pytest-xdist, `-n auto --dist loadfile` in
pyproject.toml: a module's tests stay together, with its module fixtures), each in a network
namespace of its own with only its loopback up. Many tests bind fixed addresses (a next hop
on 127.0.0.7:25, a node on 127.0.0.8:2525, PostgreSQL on 127.0.0.81): in one shared
loopback two workers would take each other's ports, or deliver to each other's servers.
The suite used less than one of the machine's two cores while waiting on its servers, and
took 740-900 s in one process; 355 s with two workers. A namespace needs Linux and root
(CI runs as root); elsewhere, and under `-s` (a worker's output is not shown) or `--pdb`,
the tests run in pytest's own process as before. KANMON_TEST_WORKERS=N sets the number of
workers (0: none).
"""

from __future__ import annotations

import compileall
import ctypes
import fcntl
import os
import socket
import struct
import sys
from pathlib import Path

import pytest

pytest_plugins = ["tests.support.postgres"]

LONG = os.environ.get("KANMON_LONG") == "1"


CLONE_NEWNET = 0x40000000
WORKERS_ENV = "KANMON_TEST_WORKERS"
_LIBC = ctypes.CDLL(None, use_errno=True)


def _own_loopback() -> None:
    """Move this process into a network namespace of its own, with its loopback up.

    Its children (kanmon, the tests' servers and clients) and the threads it starts from now
    on inherit it: a worker's 127.0.0.8:2525 or 127.0.0.81 PostgreSQL is not the other
    worker's, and nothing but loopback exists. (xdist's own thread, already running, stays
    outside: it only talks to the controller over a pipe.)"""
    if _LIBC.unshare(CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET)")
    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        flags = struct.unpack("16sH", fcntl.ioctl(s, siocgifflags, struct.pack("16sH", b"lo", 0))[:18])[1]
        fcntl.ioctl(s, siocsifflags, struct.pack("16sH", b"lo", flags | iff_up))


def _can_isolate() -> bool:
    """Whether a worker can have its own loopback (Linux, root): tried in a throwaway child."""
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        return False
    pid = os.fork()
    if pid == 0:
        try:
            _own_loopback()
        except BaseException:
            os._exit(1)
        os._exit(0)
    return os.waitpid(pid, 0)[1] == 0


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """`-n auto` (pyproject.toml): two workers where each can have its own loopback, else none
    (the tests run in pytest's own process, one after another), and none under `-s`, whose
    output a worker would not show. KANMON_TEST_WORKERS=N sets the number; 0 runs them in one
    process."""
    wanted = os.environ.get(WORKERS_ENV)
    if wanted is not None:
        try:
            return int(wanted)
        except ValueError:
            raise pytest.UsageError(f"{WORKERS_ENV} must be a number of workers, not {wanted!r}") from None
    if config.option.capture == "no":
        return 0
    return min(2, os.cpu_count() or 1) if _can_isolate() else 0


def pytest_configure(config: pytest.Config) -> None:
    # The processes the tests start (a node's receivers and agents run `python -P -m`, the
    # `kanmon` command) import kanmon from this tree, not from wherever it was installed:
    # in a second checkout (a git worktree) they would otherwise run the other tree's code.
    here = str(Path(__file__).resolve().parent.parent)
    if os.environ.get("PYTHONPATH", "").split(os.pathsep)[0] != here:
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, (here, os.environ.get("PYTHONPATH"))))
    if os.environ.get("PYTEST_XDIST_WORKER"):
        try:
            _own_loopback()
        except OSError as e:
            raise pytest.UsageError(
                f"a test worker needs a loopback of its own (a network namespace: Linux, as root): {e};"
                " run the tests in one process with -n0") from None


def pytest_sessionstart(session: pytest.Session) -> None:
    import kanmon

    # Written even under PYTHONDONTWRITEBYTECODE (that only stops the import system writing);
    # a tree that cannot be written to is left as it is: the tests run, only slower.
    compileall.compile_dir(Path(kanmon.__file__).parent, quiet=2)


@pytest.fixture(autouse=True)
def _no_ambient_config(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    from kanmon.commands import options

    monkeypatch.delenv(options.CONFIG_ENV, raising=False)
    monkeypatch.setattr(options, "SYSTEM_CONFIG", tmp_path_factory.getbasetemp() / "no-etc-kanmon" / "kanmon.toml")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if LONG:
        return
    skip = pytest.mark.skip(reason="long mode: set KANMON_LONG=1 (the short version runs in CI)")
    for item in items:
        if "long" in item.keywords:
            item.add_marker(skip)
