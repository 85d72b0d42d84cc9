"""`kanmon admin add|list|remove|passwd|role|token` against a real data_dir, and the
audit lines they leave in the event log."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pexpect
import pytest
from click.testing import CliRunner

from kanmon.admin.accounts import AccountError, AdminAccounts, decode
from kanmon.cli import main
from kanmon.records.query import search_events
from tests.support.terminal import type_new_password

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    (tmp_path / "data").mkdir(mode=0o700)
    p = tmp_path / "kanmon.toml"
    p.write_text(f'[server]\ndata_dir = "{tmp_path / "data"}"\n')
    return p


def run(config_file: Path, *args: str, input: str | None = None):
    return CliRunner().invoke(main, ["admin", *args, "-c", str(config_file)], input=input)


def test_add_with_password_stdin_stores_an_argon2_hash_privately(config_file: Path, tmp_path: Path) -> None:
    r = run(config_file, "add", "alice", "--role", "admin", "--password-stdin", input="s3cret pass\n")
    assert r.exit_code == 0, r.output
    assert "s3cret" not in r.output
    path = tmp_path / "data" / "admins.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    raw = path.read_bytes()
    assert b"s3cret" not in raw and b"$argon2id$" in raw
    accounts = AdminAccounts(tmp_path / "data")
    assert accounts.verify("alice", "s3cret pass").role == "admin"
    assert accounts.verify("alice", "wrong") is None
    assert accounts.verify("nobody", "s3cret pass") is None


def test_add_refuses_a_bad_role_an_existing_name_and_an_empty_password(config_file: Path) -> None:
    assert run(config_file, "add", "bob", "--role", "root", "--password-stdin", input="x\n").exit_code == 2
    assert run(config_file, "add", "bob", "--role", "auditor", "--password-stdin", input="\n").exit_code == 2
    assert run(config_file, "add", "bob", "--role", "auditor", "--password-stdin", input="pw\n").exit_code == 0
    r = run(config_file, "add", "bob", "--role", "admin", "--password-stdin", input="pw\n")
    assert r.exit_code == 2 and "exists already" in r.output
    r = run(config_file, "add", "Bad Name", "--role", "admin", "--password-stdin", input="pw\n")
    assert r.exit_code == 2 and "not an admin name" in r.output


def test_without_a_terminal_add_and_passwd_refuse_and_name_password_stdin(config_file: Path, tmp_path: Path) -> None:
    said = "kanmon: no terminal to ask the password on: pipe it with --password-stdin"
    r = run(config_file, "add", "alice", "--role", "admin", input="pw\npw\n")  # CliRunner: not a terminal
    assert r.exit_code == 2 and said in r.output
    assert AdminAccounts(tmp_path / "data").get("alice") is None
    run(config_file, "add", "alice", "--role", "admin", "--password-stdin", input="first\n")
    r = run(config_file, "passwd", "alice", input="pw\npw\n")
    assert r.exit_code == 2 and said in r.output
    assert AdminAccounts(tmp_path / "data").verify("alice", "first") is not None


def test_add_asks_the_password_twice_in_a_terminal(config_file: Path, tmp_path: Path) -> None:
    child = pexpect.spawn(sys.executable, ["-m", "kanmon", "admin", "add", "alice", "--role", "auditor",
                                           "-c", str(config_file)],
                          cwd=str(ROOT), timeout=60, encoding="utf-8", env=dict(os.environ, PYTHONPATH=str(ROOT)))
    status, shown = type_new_password(child, "s3cret pass")
    assert status == 0, shown
    assert "s3cret" not in shown and AdminAccounts(tmp_path / "data").verify("alice", "s3cret pass").role == "auditor"


def test_token_is_shown_once_stored_as_a_digest_and_replaced(config_file: Path, tmp_path: Path) -> None:
    run(config_file, "add", "ops", "--role", "operator", "--password-stdin", input="pw\n")
    first = run(config_file, "token", "ops").output.strip()
    assert first.startswith("kmn_") and len(first) > 40
    accounts = AdminAccounts(tmp_path / "data")
    assert accounts.by_token(first).name == "ops"
    assert first.encode() not in (tmp_path / "data" / "admins.json").read_bytes()
    second = run(config_file, "token", "ops").output.strip()
    assert accounts.by_token(first) is None and accounts.by_token(second).name == "ops"
    assert run(config_file, "token", "ops", "--revoke").exit_code == 0
    assert accounts.by_token(second) is None
    assert run(config_file, "token", "nobody").exit_code == 2


def test_list_role_remove_and_the_audit_lines(config_file: Path, tmp_path: Path) -> None:
    run(config_file, "add", "alice", "--role", "admin", "--password-stdin", input="pw\n")
    run(config_file, "add", "carol", "--role", "auditor", "--password-stdin", input="pw\n")
    assert run(config_file, "role", "carol", "operator").exit_code == 0
    rows = json.loads(run(config_file, "list", "--json").output)
    assert [(r["name"], r["role"], r["token"]) for r in rows] == [("alice", "admin", False), ("carol", "operator", False)]
    assert run(config_file, "remove", "carol").exit_code == 0
    assert run(config_file, "remove", "carol").exit_code == 2
    lines = [e.text for e in search_events(tmp_path / "data", grep="audit:")]
    assert any("audit: alice (admin)" in t and "admin add alice" in t for t in lines), lines
    assert any("admin role carol operator" in t for t in lines), lines
    assert any("admin remove carol" in t for t in lines), lines
    assert all(e.kind == "audit" for e in search_events(tmp_path / "data", grep="audit:"))


def test_password_change_changes_the_password_version(config_file: Path, tmp_path: Path) -> None:
    run(config_file, "add", "alice", "--role", "admin", "--password-stdin", input="one\n")
    before = AdminAccounts(tmp_path / "data").get("alice").password_version
    assert run(config_file, "passwd", "alice", "--password-stdin", input="two\n").exit_code == 0
    accounts = AdminAccounts(tmp_path / "data")
    assert accounts.get("alice").password_version != before
    assert accounts.verify("alice", "two") and not accounts.verify("alice", "one")


@pytest.mark.parametrize("raw", [
    b"", b"{}", b'{"format": "kanmon-admins 1", "admins": {"a": {"role": "root", "hash": "$argon2id$x"}}}',
    b'{"format": "kanmon-admins 1", "admins": {"a": {"role": "admin", "hash": "plain"}}}',
    b'{"format": "kanmon-admins 1", "admins": {"A B": {"role": "admin", "hash": "$argon2id$x"}}}',
    b'{"format": "kanmon-admins 1", "admins": {"a": {"role": "admin", "hash": "$argon2id$x", "extra": 1}}}',
])
def test_the_decoder_refuses_a_damaged_file(raw: bytes) -> None:
    with pytest.raises(AccountError):
        decode(raw)
