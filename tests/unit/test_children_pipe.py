"""kanmon.children.pipe_lines: how the node reads its children's pipes (receivers'
"queued"/"ready" lines, the balancer's forwarding processes' "ready"/"say" lines)."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import uvloop

from kanmon.children import pipe_lines

RUNNERS = {"asyncio": asyncio.run, "uvloop": uvloop.run}
TURNS = 5  # loop turns from a write to the pipe to the reader's line (~3: poll, wake, read)


def _collect(runner, writes: list[bytes], limit: int = 64) -> tuple[list[bytes], int]:
    async def main() -> tuple[list[bytes], int]:
        r, w = os.pipe()

        async def writer() -> None:
            for chunk in writes:
                os.write(w, chunk)
                for _ in range(TURNS):  # the reader takes it before the next: lines cut across reads
                    await asyncio.sleep(0)
            os.close(w)

        task = asyncio.ensure_future(writer())
        lines = [line async for line in pipe_lines(r, limit)]
        await task
        return lines, r

    return runner(main())


@pytest.mark.parametrize("loop", sorted(RUNNERS))
def test_lines_cut_across_reads_come_whole_and_the_pipe_is_closed(loop: str) -> None:
    lines, fd = _collect(RUNNERS[loop], [b"ready\nque", b"ued 1M1", b"ABC\n", b"\n", b"say half"])
    assert lines == [b"ready\n", b"queued 1M1ABC\n", b"\n", b"say half"]
    assert fd not in _open_fds()


def _open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


@pytest.mark.parametrize("loop", sorted(RUNNERS))
def test_a_line_longer_than_the_limit_is_dropped_whole_and_reading_goes_on(loop: str) -> None:
    long_line = b"say " + b"x" * 200 + b"\n"
    lines, _ = _collect(RUNNERS[loop], [b"ready\n", long_line[:100], long_line[100:] + b"say ok\n", b"y" * 300])
    assert lines == [b"ready\n", b"say ok\n"]


@pytest.mark.parametrize("loop", sorted(RUNNERS))
def test_a_cancelled_reader_closes_the_pipe(loop: str) -> None:
    async def main() -> int:
        r, w = os.pipe()

        first = asyncio.Event()

        async def read() -> None:
            async for _ in pipe_lines(r, 64):
                first.set()

        task = asyncio.ensure_future(read())
        os.write(w, b"ready\n")
        await first.wait()  # reading, and waiting for more
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        os.close(w)
        return r

    fd = RUNNERS[loop](main())
    assert fd not in _open_fds()


SCRIPT = textwrap.dedent("""
    import asyncio, os, sys, uvloop
    from kanmon.children import pipe_lines

    async def main():
        r, w = os.pipe()
        print("PIPE", r, flush=True)
        os.write(w, b"ready\\n")
        os.close(w)
        assert [line async for line in pipe_lines(r, 64)] == [b"ready\\n"]
        for _ in range(10):  # a close left to a later callback would show here
            await asyncio.sleep(0)

    (uvloop.run if sys.argv[1] == "uvloop" else asyncio.run)(main())
""")


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed (.ci/run installs it)")
@pytest.mark.parametrize("loop", sorted(RUNNERS))
def test_the_pipe_is_closed_exactly_once(loop: str) -> None:
    """Seen by the kernel (strace): uvloop's connect_read_pipe with a file object closed
    the descriptor twice, and in the node a file another thread had opened between the
    two closes lost its descriptor."""
    probe = subprocess.run(["strace", "-qq", "-e", "trace=none", "true"], capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        pytest.skip(f"strace cannot trace here (ptrace not permitted?): {probe.stderr.strip()[:200]}")
    out = subprocess.run(["strace", "-f", "-qq", "-e", "trace=close", sys.executable, "-c", SCRIPT, loop],
                         capture_output=True, text=True, timeout=60, check=True)
    fd = int(re.search(r"^PIPE (\d+)$", out.stdout, re.M).group(1))
    closes = [line for line in out.stderr.splitlines() if re.search(rf"\bclose\({fd}\)", line)]
    # Python's own exit may close that number again after it was reused; count up to the first success.
    first_ok = next(i for i, line in enumerate(closes) if "= 0" in line)
    assert closes[: first_ok + 1] == [closes[first_ok]], closes
    assert len([c for c in closes if "EBADF" in c]) == 0, closes
