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
"""

from __future__ import annotations

import os

import pytest

pytest_plugins = ["tests.support.postgres"]

LONG = os.environ.get("KANMON_LONG") == "1"


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
