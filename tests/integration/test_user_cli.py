"""`kanmon user passwd|list|lock|unlock` against a real config and records database."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from kanmon.cli import main
from kanmon.config import load_config
from kanmon.store.users import Users


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


def test_passwd_prompts_twice_and_sets_a_working_password(config_file: Path) -> None:
    r = run(config_file, "passwd", "alice@example.test", input="hunter22\nhunter22\n")
    assert r.exit_code == 0, r.output
    assert "hunter22" not in r.output
    assert users_of(config_file).verify("alice@example.test", "hunter22")


def test_passwd_mismatch_asks_again(config_file: Path) -> None:
    r = run(config_file, "passwd", "alice@example.test", input="one\ntwo\nthree\nthree\n")
    assert r.exit_code == 0, r.output
    assert "do not match" in r.output.lower() or "match" in r.output.lower()
    assert users_of(config_file).verify("alice@example.test", "three")


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
