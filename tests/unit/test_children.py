"""kanmon.children: a child's command line, and the wait for children to be ready."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

from kanmon.children import module_command, wait_ready


def test_a_child_does_not_import_from_the_working_directory(tmp_path):
    """`python -m` would import a stray module of the admin's current directory before
    kanmon's own dependencies (a `dns.py` there hung every receiver at start)."""
    (tmp_path / "json.py").write_text("raise SystemExit('imported the json.py of the working directory')\n")
    cmd = module_command("json.tool", "--help")
    assert cmd[:3] == [sys.executable, "-P", "-m"]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    plain = subprocess.run([sys.executable, "-m", "json.tool", "--help"], cwd=tmp_path, capture_output=True,
                           text=True, timeout=60)
    assert "working directory" in plain.stderr  # what -P prevents


def test_wait_ready_returns_when_every_event_is_set_and_names_the_child_otherwise():
    async def main() -> None:
        loop = asyncio.get_running_loop()
        events = [asyncio.Event(), asyncio.Event()]
        idle = asyncio.ensure_future(asyncio.Event().wait())
        loop.call_soon(events[0].set)
        loop.call_soon(events[1].set)
        await wait_ready(events, [idle], loop.time() + 60, "a test child")
        with pytest.raises(OSError, match="a test child did not start in time"):
            await wait_ready([asyncio.Event()], [idle], loop.time(), "a test child")
        ended = asyncio.ensure_future(asyncio.sleep(0))
        with pytest.raises(OSError, match="a test child exited before it was ready"):
            await wait_ready([asyncio.Event()], [ended], loop.time() + 60, "a test child")
        idle.cancel()

    asyncio.run(main())


def test_pid_alive():
    import os

    from kanmon.children import pid_alive

    assert pid_alive(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait(60)  # reaped: its id names no process now (until the kernel reuses it)
    assert not pid_alive(child.pid) or os.path.exists(f"/proc/{child.pid}")
