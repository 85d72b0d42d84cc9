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
    """The last scheduled digest in the shared state: used only when it is what the
    digest writes (a time up to now, the ids it mailed within its overlap); otherwise
    None, and the node lists from its own time."""
    import json

    from kanmon.admin.quarantine_ops import shared_last
    from kanmon.state.api import CacheEntry

    def entry(value: str) -> CacheEntry:
        return CacheEntry("last", value, 0.0, 1e12)

    assert shared_last(entry('{"t": 1000.5, "ids": ["1M1A", "1M1B"]}'), 2000.0) == (1000.5, frozenset({"1M1A", "1M1B"}))
    assert shared_last(entry('{"t": 1000, "ids": []}'), 2000.0) == (1000.0, frozenset())
    assert shared_last(None, 2000.0) is None
    for bad in ("", "soon", "1000.5", "[]", '{"t": 1000}', '{"t": "1000", "ids": []}', '{"t": true, "ids": []}',
                '{"t": NaN, "ids": []}', '{"t": Infinity, "ids": []}', '{"t": 0, "ids": []}', '{"t": 2000.1, "ids": []}',
                '{"t": 1e400, "ids": []}', '{"t": 1000, "ids": [1]}', '{"t": 1000, "ids": [""]}',
                '{"t": 1000, "ids": ["x"], "more": 1}', json.dumps({"t": 1000, "ids": ["x" * 65]}),
                "[" * 100000 + "]" * 100000):
        assert shared_last(entry(bad), 2000.0) is None, bad[:40]
