"""The one size formatter and the one duration formatter (kanmon/units.py)."""

from __future__ import annotations

import pytest

from kanmon.units import format_duration, format_size


@pytest.mark.parametrize(
    ("n", "text"),
    [(0, "0 B"), (999, "999 B"), (1000, "1.0 KB"), (1_500_000, "1.5 MB"), (2_000_000_000, "2.0 GB"),
     (3 * 10**15, "3000.0 TB")],
)
def test_format_size(n, text):
    assert format_size(n) == text


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (-5, "0s"), (7.9, "7s"), (310, "5m 10s"), (3 * 3600 + 60, "3h 1m"), (2 * 86400 + 3 * 3600 + 59, "2d 3h"),
     (4 * 86400, "4d"), (3600 + 59, "1h"), (86400 + 60, "1d")],
)
def test_format_duration_short(seconds, text):
    assert format_duration(seconds) == text


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(40 * 60, "40 minutes"), (60, "1 minute"), (4 * 3600 + 59 * 60, "4 hours"), (86400, "1 day"),
     (3 * 86400 + 5, "3 days"), (30, "30 seconds"), (1, "1 second"), (0, "0 seconds")],
)
def test_format_duration_words(seconds, text):
    assert format_duration(seconds, "words") == text


def test_format_duration_clock():
    assert format_duration(0, "clock") == "00:00:00"
    assert format_duration(3661, "clock") == "01:01:01"
    assert format_duration(90061, "clock") == "1+01:01:01"


def test_format_duration_refuses_an_unknown_style():
    with pytest.raises(ValueError):
        format_duration(1, "fortnights")
