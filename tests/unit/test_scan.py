"""kanmon.scan: the compiled scans (kanmon/_scan.c) give exactly what the Python
definitions give, on generated, long and hostile input, and CI runs the compiled ones.

The C reads 16 octets a step and finishes one at a time: the inputs cover both, and every
offset of a pattern inside and across a 16-octet block."""

from __future__ import annotations

import os
import random

import pytest
from hypothesis import given, settings, strategies as st

from kanmon import scan

try:
    from kanmon import _scan
except ImportError:  # not built here: these tests say so (CI builds it: the test below)
    _scan = None

needs_c = pytest.mark.skipif(_scan is None, reason="kanmon._scan is not built (no C compiler at install?)")

# Mostly the octets the scans look for, so that pairs and their neighbours are common.
octets = st.lists(st.sampled_from([b"\r", b"\n", b".", b"x", b"\r\n", b"\n.", b"\xff", b"\x00"]),
                  max_size=120).map(b"".join)


def test_ci_runs_the_compiled_scans() -> None:
    """.ci/run sets KANMON_REQUIRE_C: there, an install that did not build the C fails."""
    if os.environ.get("KANMON_REQUIRE_C") != "1":
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


@needs_c
@settings(max_examples=1500)
@given(octets)
def test_line_ends_agree(data: bytes) -> None:
    assert _scan.line_ends(data) == scan.py_line_ends(data) == (
        data.count(b"\r\n"), data.count(b"\r"), data.count(b"\n"))
    assert _scan.line_ends(bytearray(data)) == _scan.line_ends(memoryview(data)) == scan.py_line_ends(data)


@needs_c
@settings(max_examples=1500)
@given(octets, st.sampled_from([b"\n.", b"\r\n", b"..", b"\r\r", b"x\x00", b"\r\n.", b"\n.\r", b"x\x00\x00"]),
       st.integers(0, 130))
def test_find_short_agrees(data: bytes, pattern: bytes, start: int) -> None:
    expected = data.find(pattern, start)
    assert _scan.find_short(data, pattern, start) == scan.py_find_short(data, pattern, start) == expected
    assert _scan.find_short(bytearray(data), pattern, start) == expected


@needs_c
def test_every_offset_inside_and_across_blocks() -> None:
    for n in range(0, 70):
        for k in range(n):
            for pattern in (b"\r\n", b"\n.", b"\r\n."):
                data = (b"y" * k + pattern + b"y" * n)[:n]  # whole, or cut by the end
                assert _scan.line_ends(data) == scan.py_line_ends(data), (n, k)
                for start in (0, k, k + 1, max(0, k - 16)):
                    assert _scan.find_short(data, pattern, start) == data.find(pattern, start), (n, k, start)


@needs_c
def test_long_messages() -> None:
    rng = random.Random(22)
    for size in (1 << 16, 1 << 20, (1 << 20) + 13):
        data = bytes(rng.choice(b"ab\r\n.") if rng.random() < 0.1 else 97 for _ in range(size))
        assert _scan.line_ends(data) == scan.py_line_ends(data)
        for start in (0, 1, size // 3, size - 17, size - 2, size - 1, size, size + 5):
            assert _scan.find_short(data, b"\n.", start) == data.find(b"\n.", start)
            assert _scan.find_short(data, b"\r\n.", start) == data.find(b"\r\n.", start)
    for run in (b"\r", b"\n", b"\r\n", b"\n."):  # every lane's counter full, many rounds over
        data = run * (70_000 // len(run)) + b"x"
        assert _scan.line_ends(data) == scan.py_line_ends(data), run
    clean = b"La de da de da.\r\n" * 6000
    assert _scan.line_ends(clean) == (6000, 6000, 6000)
    assert _scan.find_short(clean, b"\n.", 0) == -1


@pytest.mark.parametrize("impl", [pytest.param("c", marks=needs_c), "py"])
def test_bad_arguments_are_refused_alike(impl: str) -> None:
    line_ends = _scan.line_ends if impl == "c" else scan.py_line_ends
    find_short = _scan.find_short if impl == "c" else scan.py_find_short
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


@needs_c
def test_nothing_past_the_end_is_read() -> None:
    """A view that ends before the buffer does: the octet after its end would complete the
    pattern, and must not be looked at (nor a whole 16-octet block past it)."""
    for n in range(2, 70):
        backing = b"y" * (n - 1) + b"x\x00\x00" + b"\r\n" * 20
        view = memoryview(backing)[:n]
        assert _scan.find_short(view, b"x\x00", 0) == -1, n
        assert _scan.find_short(view, b"x\x00", n - 1) == -1, n
        assert _scan.find_short(view, b"x\x00\x00", 0) == -1, n
        assert _scan.find_short(memoryview(backing)[:n + 1], b"x\x00\x00", 0) == -1, n
        assert _scan.find_short(memoryview(backing)[:n + 2], b"x\x00\x00", 0) == n - 1, n
        assert _scan.line_ends(memoryview(backing)[:n]) == (0, 0, 0), n


@needs_c
def test_nothing_before_the_start_is_read() -> None:
    """A view that starts after a "\\r": its first "\\n" is a bare LF, not a CRLF."""
    for n in range(1, 40):
        view = memoryview(b"\r" + b"\n" * n)[1:]
        assert _scan.line_ends(view) == (0, 0, n), n
