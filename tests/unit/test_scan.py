"""kanmon.scan: the compiled scans (kanmon/_scan.c) give exactly what the Python
definitions give, on generated, long and hostile input, and CI runs the compiled ones:
the module pip built (SSE2 on x86-64) and the same source built again without SSE2,
whose plain loops run on other machines (e.g. ARM).

The C reads 16 octets a step and finishes one at a time: the inputs cover both, and every
offset of a pattern inside and across a 16-octet block."""

from __future__ import annotations

import importlib.util
import os
import random
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from kanmon import scan

try:
    from kanmon import _scan
except ImportError:  # not built here: these tests say so (CI builds it: the test below)
    _scan = None

REQUIRED = os.environ.get("KANMON_REQUIRE_C") == "1"  # .ci/run: the C is built and tested there


def _scalar_build(directory: Path):
    """kanmon/_scan.c built again with __SSE2__ undefined: the plain loops that run where
    SSE2 is missing (e.g. ARM), which an x86-64 install never builds."""
    source = Path(scan.__file__).with_name("_scan.c")
    compiler = shutil.which(sysconfig.get_config_var("CC").split()[0]) or shutil.which("cc")
    if compiler is None:
        return None
    target = directory / ("_scan" + sysconfig.get_config_var("EXT_SUFFIX"))
    proc = subprocess.run([compiler, "-O2", "-shared", "-fPIC", "-U__SSE2__", f"-I{sysconfig.get_paths()['include']}",
                           str(source), "-o", str(target)], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:  # e.g. no Python headers (pip then skipped the C as well)
        assert not REQUIRED, proc.stderr  # CI builds the C: it must build without SSE2 too
        return None
    spec = importlib.util.spec_from_file_location("_scan", target)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module", params=["sse2", "scalar"])
def c_scan(request, tmp_path_factory):
    """The compiled scans: the module pip built (SSE2 on x86-64), and the scalar build."""
    module = _scan if request.param == "sse2" else _scalar_build(tmp_path_factory.mktemp("scalar"))
    if module is None:
        assert not REQUIRED, f"the {request.param} build of kanmon/_scan.c is missing"
        pytest.skip(f"kanmon._scan ({request.param}) is not built here (no C compiler, or no Python headers)")
    if request.param == "sse2" and not module.VECTOR:
        assert not REQUIRED, "kanmon._scan was built without SSE2"
        pytest.skip("this machine's build has no SSE2 (e.g. ARM): the scalar build covers it")
    assert module.VECTOR == (request.param == "sse2")
    return module


def test_which_definitions_run(c_scan) -> None:
    """With the SSE2 build, all the compiled scans; with the plain loops (ARM), the Python
    line_ends and find_short, but the compiled strip_cr (memchr and memcpy are the C
    library's block-at-a-time loops there too)."""
    import importlib
    import sys

    import kanmon

    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setitem(sys.modules, "kanmon._scan", c_scan)
            mp.setattr(kanmon, "_scan", c_scan, raising=False)
            chosen = importlib.reload(scan)
            assert chosen.strip_cr is c_scan.strip_cr
            assert chosen.COMPILED == bool(c_scan.VECTOR)
            assert (chosen.line_ends is c_scan.line_ends) == (chosen.find_short is c_scan.find_short) == chosen.COMPILED
    finally:
        importlib.reload(scan)  # the module as this install chose it


# Mostly the octets the scans look for, so that pairs and their neighbours are common.
octets = st.lists(st.sampled_from([b"\r", b"\n", b".", b"x", b"\r\n", b"\n.", b"\xff", b"\x00"]),
                  max_size=120).map(b"".join)


def test_ci_runs_the_compiled_scans() -> None:
    """.ci/run sets KANMON_REQUIRE_C: there, an install that did not build the C fails."""
    if not REQUIRED:
        pytest.skip("KANMON_REQUIRE_C is not set (only CI requires the compiled scans)")
    assert _scan is not None and _scan.VECTOR and scan.COMPILED


@settings(max_examples=500)
@given(octets, st.integers(0, 130))
def test_the_python_definitions(data: bytes, start: int) -> None:
    """What runs where the C was not built (and what the C is compared with)."""
    assert scan.py_line_ends(data) == (data.count(b"\r\n"), data.count(b"\r"), data.count(b"\n"))
    assert scan.py_line_ends(memoryview(data)) == scan.py_line_ends(data)
    assert scan.py_find_short(data, b"\n.", start) == data.find(b"\n.", start)
    assert scan.count_crlf(data) == data.count(b"\r\n")
    assert scan.py_strip_cr(data) == scan.py_strip_cr(memoryview(data)) == data.replace(b"\r", b"")


@settings(max_examples=1500)
@given(octets)
def test_line_ends_agree(c_scan, data: bytes) -> None:
    assert c_scan.line_ends(data) == scan.py_line_ends(data) == (
        data.count(b"\r\n"), data.count(b"\r"), data.count(b"\n"))
    assert c_scan.line_ends(bytearray(data)) == c_scan.line_ends(memoryview(data)) == scan.py_line_ends(data)


@settings(max_examples=1500)
@given(octets, st.sampled_from([b"\n.", b"\r\n", b"..", b"\r\r", b"x\x00", b"\r\n.", b"\n.\r", b"x\x00\x00"]),
       st.integers(0, 130))
def test_find_short_agrees(c_scan, data: bytes, pattern: bytes, start: int) -> None:
    expected = data.find(pattern, start)
    assert c_scan.find_short(data, pattern, start) == scan.py_find_short(data, pattern, start) == expected
    assert c_scan.find_short(bytearray(data), pattern, start) == expected


@settings(max_examples=1500)
@given(octets, st.integers(0, 8), st.integers(0, 8))
def test_strip_cr_agrees(c_scan, data: bytes, cut_start: int, cut_end: int) -> None:
    expected = data.replace(b"\r", b"")
    out = c_scan.strip_cr(data)
    assert type(out) is bytes and out == scan.py_strip_cr(data) == expected
    assert c_scan.strip_cr(bytearray(data)) == expected
    view = memoryview(b"\r" * cut_start + data + b"x\r" * cut_end)[cut_start:cut_start + len(data)]
    assert c_scan.strip_cr(view) == expected  # nothing outside the view is read or copied


def test_strip_cr_of_long_and_extreme_input(c_scan) -> None:
    line = b"Lorem ipsum dolor sit amet.\r\n"
    for data in (line * 40_000, b"\r" * 100_001, b"x" * 100_001, b"\r\n" * 50_000, b"", b"\r", b"x"):
        assert c_scan.strip_cr(data) == data.replace(b"\r", b""), data[:10]
    with pytest.raises(TypeError):
        c_scan.strip_cr("text, not octets")


def test_every_offset_inside_and_across_blocks(c_scan) -> None:
    for n in range(0, 70):
        for k in range(n):
            for pattern in (b"\r\n", b"\n.", b"\r\n."):
                data = (b"y" * k + pattern + b"y" * n)[:n]  # whole, or cut by the end
                assert c_scan.line_ends(data) == scan.py_line_ends(data), (n, k)
                for start in (0, k, k + 1, max(0, k - 16)):
                    assert c_scan.find_short(data, pattern, start) == data.find(pattern, start), (n, k, start)


def test_long_messages(c_scan) -> None:
    rng = random.Random(22)
    for size in (1 << 16, 1 << 20, (1 << 20) + 13):
        data = bytes(rng.choice(b"ab\r\n.") if rng.random() < 0.1 else 97 for _ in range(size))
        assert c_scan.line_ends(data) == scan.py_line_ends(data)
        for start in (0, 1, size // 3, size - 17, size - 2, size - 1, size, size + 5):
            assert c_scan.find_short(data, b"\n.", start) == data.find(b"\n.", start)
            assert c_scan.find_short(data, b"\r\n.", start) == data.find(b"\r\n.", start)
    for run in (b"\r", b"\n", b"\r\n", b"\n."):  # every lane's counter full, many rounds over
        data = run * (70_000 // len(run)) + b"x"
        assert c_scan.line_ends(data) == scan.py_line_ends(data), run
    clean = b"La de da de da.\r\n" * 6000
    assert c_scan.line_ends(clean) == (6000, 6000, 6000)
    assert c_scan.find_short(clean, b"\n.", 0) == -1


def test_bad_arguments_are_refused_in_python() -> None:
    _refused_alike(scan.py_line_ends, scan.py_find_short)


def test_bad_arguments_are_refused_alike_in_c(c_scan) -> None:
    _refused_alike(c_scan.line_ends, c_scan.find_short)


def _refused_alike(line_ends, find_short) -> None:
    with pytest.raises(ValueError):
        find_short(b"abc", b"\n.", -1)
    with pytest.raises(ValueError):
        find_short(b"abc", b"\n", 0)
    with pytest.raises(ValueError):
        find_short(b"abc", b"\n.x.", 0)
    with pytest.raises(TypeError):
        line_ends("text, not octets")
    with pytest.raises(TypeError):
        find_short("text", b"\n.", 0)
    assert find_short(b"", b"\n.", 0) == -1 and find_short(b"\n.", b"\n.", 2) == -1
    assert line_ends(b"") == (0, 0, 0)


def test_nothing_past_the_end_is_read(c_scan) -> None:
    """A view that ends before the buffer does: the octet after its end would complete the
    pattern, and must not be looked at (nor a whole 16-octet block past it)."""
    for n in range(2, 70):
        backing = b"y" * (n - 1) + b"x\x00\x00" + b"\r\n" * 20
        view = memoryview(backing)[:n]
        assert c_scan.find_short(view, b"x\x00", 0) == -1, n
        assert c_scan.find_short(view, b"x\x00", n - 1) == -1, n
        assert c_scan.find_short(view, b"x\x00\x00", 0) == -1, n
        assert c_scan.find_short(memoryview(backing)[:n + 1], b"x\x00\x00", 0) == -1, n
        assert c_scan.find_short(memoryview(backing)[:n + 2], b"x\x00\x00", 0) == n - 1, n
        assert c_scan.line_ends(memoryview(backing)[:n]) == (0, 0, 0), n


def test_nothing_before_the_start_is_read(c_scan) -> None:
    """A view that starts after a "\\r": its first "\\n" is a bare LF, not a CRLF."""
    for n in range(1, 40):
        view = memoryview(b"\r" + b"\n" * n)[1:]
        assert c_scan.line_ends(view) == (0, 0, n), n
