"""Files kanmon creates are private (DESIGN.md promise 10): data_dir 0700, every file in it
0600 (but maildrop/, the local sendmail's drop directory, docs/sendmail.md), checked as the owner and, for the files that matter most (the records database with
its WAL files and the password hashes, the log, the users file), as an unprivileged user
(`nobody`, through a subprocess that switches to it) who must not be able to read them.
Files an older version left readable are corrected at start, with an event."""

from __future__ import annotations

import os
import pwd
import shutil
import smtplib
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from kanmon.cli import main
from kanmon.config import parse_config
from kanmon.records.query import search_events
from tests.support.kanmon_node import RunningNode, free_port

CONFIG = """
[server]
hostname = "mx1.example.test"
data_dir = "{data_dir}"
[smtp]
listen = ["127.0.0.1:{port}"]
relay_networks = ["127.0.0.0/8"]
min_free_disk = "1MB"
[[domain]]
name = "example.test"
mailboxes = ["postmaster"]
"""

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="switching to another user needs root")


@pytest.fixture
def open_dir():
    """A directory every user can walk into (pytest's tmp_path is 0700, which would hide
    the data_dir from `nobody` whatever its own mode)."""
    d = Path(tempfile.mkdtemp(prefix="kanmon-modes-"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def readable_by_nobody(paths: list[Path]) -> list[str]:
    """Which of these paths the user nobody can open for reading."""
    nobody = pwd.getpwnam("nobody")
    # /bin/sh and head, not this Python: its interpreter may sit under a directory
    # (root's home) that nobody may not enter.
    script = 'for p in "$@"; do head -c 1 "$p" >/dev/null 2>&1 && echo "$p"; done; exit 0'
    out = subprocess.run(["/bin/sh", "-c", script, "sh", *map(str, paths)], user=nobody.pw_uid, group=nobody.pw_gid,
                         extra_groups=[], capture_output=True, text=True, timeout=60, check=True, cwd="/")
    return out.stdout.split()


def not_private(data_dir: Path) -> list[str]:
    found = []
    for root, dirs, files in os.walk(data_dir):
        for name in dirs + files:
            p = Path(root) / name
            mode = os.lstat(p).st_mode
            if not stat.S_ISSOCK(mode) and mode & 0o077 and not p.is_relative_to(data_dir / "maildrop"):
                found.append(f"{p.relative_to(data_dir)} {stat.filemode(mode)}")
    if os.stat(data_dir).st_mode & 0o077:
        found.append(f". {stat.filemode(os.stat(data_dir).st_mode)}")
    return found


def test_everything_kanmon_creates_is_private_and_nobody_cannot_read_it(open_dir):
    data = open_dir / "data"
    cfg_file = open_dir / "kanmon.toml"
    cfg_file.write_text(CONFIG.format(data_dir=data, port=free_port()))
    os.chmod(cfg_file, 0o644)
    r = CliRunner().invoke(main, ["user", "add", "alice@example.test", "--stdin", "-c", str(cfg_file)], input="pw\n")
    assert r.exit_code == 0, r.output
    config = parse_config(cfg_file.read_text())
    with RunningNode(config) as n:
        with smtplib.SMTP(n.host, n.port, timeout=15) as s:
            assert s.sendmail("a@remote.example", ["alice@example.test"], "Subject: x\r\n\r\nhello\r\n") == {}
        n.wait_idle()
        n.flush()
        secret = [data / "records.sqlite", data / "records.sqlite-wal", data / "records.sqlite-shm",
                  data / "log" / "kanmon.log", data / "users.json"]
        assert all(p.exists() for p in secret), [p for p in secret if not p.exists()]
        assert readable_by_nobody(secret) == []
        assert (found := not_private(data)) == [], found


def test_files_left_readable_are_corrected_at_start_with_an_event(open_dir):
    data = open_dir / "data"
    config = parse_config(CONFIG.format(data_dir=data, port=free_port()))
    with RunningNode(config) as n:
        n.flush()
    # What an older version left: everything readable by all.
    os.chmod(data, 0o755)
    for p in [data / "records.sqlite", data / "log", data / "log" / "kanmon.log", data / "spool"]:
        os.chmod(p, 0o755 if p.is_dir() else 0o644)
    assert readable_by_nobody([data / "records.sqlite", data / "log" / "kanmon.log"]) != []
    with RunningNode(config) as n:
        n.flush()
        assert readable_by_nobody([data / "records.sqlite", data / "log" / "kanmon.log"]) == []
        assert (found := not_private(data)) == [], found
        (event,) = [e for e in search_events(data) if "made private" in e.text]
        assert "records.sqlite" in event.text and "log/kanmon.log" in event.text
