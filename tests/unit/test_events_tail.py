"""kanmon.records.query.tail_events: the event log's live tail (the console's Event log
page and GET /api/v1/events/tail) reads the lines after a line number, with a text
filter, in bounded pieces, and never gives the same line twice."""

from __future__ import annotations

from kanmon.records.query import tail_events
from kanmon.records.store import Records


def write(tmp_path, *lines: str) -> None:
    records = Records(tmp_path, "mx1.example.test", log_file=False)
    for line in lines:
        records.emit(line)
    records.flush()
    records.close()


def test_a_tail_starts_at_the_newest_line_and_brings_only_later_ones(tmp_path) -> None:
    assert tail_events(tmp_path, None) == (0, [])  # no database yet
    write(tmp_path, "one", "two")
    start, rows = tail_events(tmp_path, None)
    assert rows == [] and start > 0
    assert tail_events(tmp_path, start) == (start, [])
    write(tmp_path, "three", "four")
    cursor, rows = tail_events(tmp_path, start)
    assert [r.text for r in rows] == ["three", "four"] and cursor > start
    assert tail_events(tmp_path, cursor) == (cursor, [])


def test_the_filter_skips_lines_but_the_cursor_moves_past_them(tmp_path) -> None:
    write(tmp_path, "start")
    start, _ = tail_events(tmp_path, None)
    write(tmp_path, "audit: a", "noise", "AUDIT: b", "noise")
    cursor, rows = tail_events(tmp_path, start, grep="audit:")
    assert [r.text for r in rows] == ["audit: a", "AUDIT: b"]
    assert tail_events(tmp_path, cursor, grep="audit:") == (cursor, [])
    assert tail_events(tmp_path, cursor) == (cursor, [])  # the noise after b is behind the cursor too


def test_a_long_tail_comes_in_pieces_without_a_gap_or_a_repeat(tmp_path) -> None:
    write(tmp_path, "start")
    cursor, _ = tail_events(tmp_path, None)
    write(tmp_path, *(f"line {i}" for i in range(7)))
    seen = []
    for _ in range(5):
        cursor, rows = tail_events(tmp_path, cursor, limit=3)
        seen += [r.text for r in rows]
    assert seen == [f"line {i}" for i in range(7)]
