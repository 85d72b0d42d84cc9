"""`kanmon user passwd|list|lock|unlock` against a real config and records database."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest
from click.testing import CliRunner

from kanmon.cli import main
from kanmon.config import load_config
from kanmon.store.users import Users
from tests.support.terminal import type_new_password

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    p = tmp_path / "kanmon.toml"
    p.write_text(
        f"""
[server]
data_dir = "{tmp_path / 'data'}"
[[domain]]
name = "example.test"
mailboxes = ["alice", "bob"]
"""
    )
    return p


def run(config_file: Path, *args: str, input: str | None = None):
    return CliRunner().invoke(main, ["user", *args, "-c", str(config_file)], input=input)


def users_of(config_file: Path) -> Users:
    return Users(load_config(config_file))


def in_a_terminal(config_file: Path, *args: str) -> pexpect.spawn:
    """`kanmon user ARGS -c FILE` with a terminal (a pty) to ask the password on."""
    return pexpect.spawn(sys.executable, ["-m", "kanmon", "user", *args, "-c", str(config_file)], cwd=str(ROOT),
                         timeout=60, encoding="utf-8", env=dict(os.environ, PYTHONPATH=str(ROOT)))


def test_passwd_prompts_twice_and_sets_a_working_password(config_file: Path) -> None:
    child = in_a_terminal(config_file, "passwd", "alice@example.test")
    status, shown = type_new_password(child, "hunter22")
    assert status == 0, shown
    assert "password set for alice@example.test" in shown and "hunter22" not in shown
    assert users_of(config_file).verify("alice@example.test", "hunter22")


def test_passwd_mismatch_asks_again(config_file: Path) -> None:
    child = in_a_terminal(config_file, "passwd", "alice@example.test")
    try:
        for password in ("one", "two"):
            child.expect("password: ")
            child.sendline(password)
        child.expect("do not match")
        for password in ("three", "three"):
            child.expect("password: ")
            child.sendline(password)
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
    assert users_of(config_file).verify("alice@example.test", "three")


def test_add_without_a_terminal_refuses_and_names_stdin(config_file: Path) -> None:
    """Piped, with no terminal anywhere (a new session: no /dev/tty either), and no
    --stdin: a clear refusal, exit 2, nothing added; not getpass's GetPassWarning and
    `Password input may be echoed` with the first line taken as the password."""
    r = subprocess.run([sys.executable, "-m", "kanmon", "user", "add", "carol@example.test", "-c", str(config_file)],
                       input="pw\npw\n", capture_output=True, text=True, cwd=ROOT, timeout=60,
                       start_new_session=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 2, r.stderr
    assert r.stderr == "kanmon: no terminal to ask the password on: pipe it with --stdin\n"
    assert not users_of(config_file).is_mailbox("carol@example.test")


def test_passwd_without_a_terminal_refuses_and_names_stdin(config_file: Path) -> None:
    r = run(config_file, "passwd", "alice@example.test", input="pw\npw\n")  # CliRunner: not a terminal
    assert r.exit_code == 2 and "no terminal to ask the password on: pipe it with --stdin" in r.output
    assert not users_of(config_file).verify("alice@example.test", "pw")


def test_passwd_stdin(config_file: Path) -> None:
    r = run(config_file, "passwd", "bob@example.test", "--stdin", input="from-a-script\n")
    assert r.exit_code == 0, r.output
    assert users_of(config_file).verify("bob@example.test", "from-a-script")


def test_passwd_stdin_empty_is_refused(config_file: Path) -> None:
    r = run(config_file, "passwd", "bob@example.test", "--stdin", input="\n")
    assert r.exit_code == 2 and "empty" in r.output


@pytest.mark.parametrize("args", [("passwd", "carol@example.test", "--stdin"), ("lock", "carol@example.test"),
                                  ("unlock", "x@elsewhere.test")])
def test_unknown_mailbox_exits_2(config_file: Path, args: tuple[str, ...]) -> None:
    r = run(config_file, *args, input="pw\n")
    assert r.exit_code == 2
    assert "is not a mailbox" in r.output


def test_lock_and_unlock(config_file: Path) -> None:
    run(config_file, "passwd", "alice@example.test", "--stdin", input="pw\n")
    assert run(config_file, "lock", "alice@example.test").exit_code == 0
    assert not users_of(config_file).verify("alice@example.test", "pw")
    listing = json.loads(run(config_file, "list", "--json").output)
    assert listing[0]["locked"] is True
    assert run(config_file, "unlock", "alice@example.test").exit_code == 0
    assert users_of(config_file).verify("alice@example.test", "pw")


def test_list_table_and_json(config_file: Path) -> None:
    run(config_file, "passwd", "bob@example.test", "--stdin", input="pw\n")
    users = users_of(config_file)
    users.mailbox("bob@example.test").ensure().folder("INBOX").append(b"Subject: s\r\n\r\n" + b"x" * 2000 + b"\r\n")
    users.record_login("bob@example.test", "127.0.0.1")
    r = run(config_file, "list")
    assert r.exit_code == 0, r.output
    lines = [line for line in r.output.splitlines() if "@example.test" in line]
    assert "alice@example.test" in lines[0] and "no" in lines[0] and "never" in lines[0]
    assert "bob@example.test" in lines[1] and "yes" in lines[1] and "2.0 KB" in lines[1] and "127.0.0.1" in lines[1]
    data = json.loads(run(config_file, "list", "--json").output)
    assert [d["mailbox"] for d in data] == ["alice@example.test", "bob@example.test"]
    assert data[1]["has_password"] and data[1]["messages"] == 1 and data[1]["size"] == 2013


def test_bad_config_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[server]\nnope = 1\n")
    r = CliRunner().invoke(main, ["user", "list", "-c", str(bad)])
    assert r.exit_code == 2 and "unknown key" in r.output
