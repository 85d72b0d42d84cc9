"""Shared pytest setup: the `long` marker.

Tests marked `long` (soak, fuzz and stress runs, declared in pyproject.toml) are skipped
unless KANMON_LONG=1; each has a short version that always runs, so CI and a plain
`python -m pytest` stay fast. Run the long ones with:

    KANMON_LONG=1 python -m pytest -m long
"""

from __future__ import annotations

import os

import pytest

LONG = os.environ.get("KANMON_LONG") == "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if LONG:
        return
    skip = pytest.mark.skip(reason="long mode: set KANMON_LONG=1 (the short version runs in CI)")
    for item in items:
        if "long" in item.keywords:
            item.add_marker(skip)
