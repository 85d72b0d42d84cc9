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

Before the first test, kanmon's modules are compiled to bytecode (`__pycache__`, ignored by
git). The suite starts ~430 kanmon processes (`kanmon serve` and other commands, receiver,
agent and recovery children). Where the environment sets PYTHONDONTWRITEBYTECODE, as this
project's machines do, an editable install never gets bytecode, and each of those processes
compiled every module it imported again: `kanmon --version` took 1.7-1.9 s instead of
0.85 s, and test_queue_ops, test_service_cli and test_reload together 115 s instead of 84 s.
"""

from __future__ import annotations

import compileall
import os
from pathlib import Path

import pytest

pytest_plugins = ["tests.support.postgres"]

LONG = os.environ.get("KANMON_LONG") == "1"


def pytest_sessionstart(session: pytest.Session) -> None:
    import kanmon

    # Written even under PYTHONDONTWRITEBYTECODE (that only stops the import system writing);
    # a tree that cannot be written to is left as it is: the tests run, only slower.
    compileall.compile_dir(Path(kanmon.__file__).parent, quiet=2)


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
