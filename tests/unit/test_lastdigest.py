"""<data_dir>/quarantine-digest.json: decoded strictly, written whole and private."""

from __future__ import annotations

import pytest

from kanmon.admin import lastdigest


def test_the_time_is_kept_and_read_back(tmp_path):
    assert lastdigest.load(tmp_path) == (None, "")
    lastdigest.save(tmp_path, 1772402400.5)
    assert lastdigest.load(tmp_path) == (1772402400.5, "")
    assert (tmp_path / lastdigest.FILE).stat().st_mode & 0o777 == 0o600
    assert not (tmp_path / (lastdigest.FILE + ".tmp")).exists()


@pytest.mark.parametrize("raw", [
    b"", b"\xff", b"[]", b'{"version": 1}', b'{"version": 2, "last": 1}', b'{"version": 1, "last": 1, "x": 0}',
    b'{"version": 1, "last": true}', b'{"version": 1, "last": -1}', b'{"version": 1, "last": NaN}',
    b'{"version": 1, "last": Infinity}', b'{"version": 1, "last": "1"}', b'{"version": true, "last": 1}',
    b'{"version": 1, "last": 1' + b"0" * 400 + b"}", b"[" * 100_000 + b"]" * 100_000,
    b'{"version": 1, "last": 1}' + b" " * 5000,
], ids=lambda raw: repr(raw[:40]))
def test_anything_else_is_refused_and_moved_aside(tmp_path, raw):
    """Including JSON nested too deep, a number too big for a float and a file of more
    than 4 KiB: refused, not raised (the node's quarantine task would end)."""
    (tmp_path / lastdigest.FILE).write_bytes(raw)
    last, why = lastdigest.load(tmp_path)
    assert last is None and why
    assert (tmp_path / (lastdigest.FILE + ".bad")).read_bytes() == raw
    assert not (tmp_path / lastdigest.FILE).exists()


def test_a_shared_digest_time_is_decoded_strictly() -> None:
    """The last scheduled digest's time in the shared state: used only when it is a time
    up to now; otherwise the node's own (the fallback)."""
    from kanmon.admin.quarantine_ops import shared_since
    from kanmon.state.api import CacheEntry

    def entry(value: str) -> CacheEntry:
        return CacheEntry("last", value, 0.0, 1e12)

    assert shared_since(entry("1000.5"), 2000.0, 7.0) == 1000.5
    assert shared_since(None, 2000.0, 7.0) == 7.0
    for bad in ("", "soon", "nan", "inf", "-1", "0", "2000.1", "1e400", "1_000"):
        assert shared_since(entry(bad), 2000.0, 7.0) == 7.0, bad
