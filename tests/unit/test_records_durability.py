"""The audit trail survives a locked or deleted records database (DESIGN.md promise 9):
the plain log line is written first, a batch the database refuses is kept in a durable
spill journal and written once the database takes it again (also after a restart), a
deleted database is recreated, the failure is reported (`records` alert), and logging in
does not depend on the database being writable.

"Locked" is another connection holding SQLite's write lock; the writer's busy timeout is
made short for the test instead of waiting the real 30 s."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from argon2 import PasswordHasher

import kanmon.records.store as records_store
import kanmon.store.users as users_store
from kanmon.config import parse_config
from kanmon.records import events as ev
from kanmon.records.query import search_events
from kanmon.records.store import Records
from kanmon.store.users import Users

QID = "0123456789BCDFG"


@pytest.fixture(autouse=True)
def short_busy_timeout(monkeypatch):
    monkeypatch.setattr(records_store, "BUSY_TIMEOUT", 0.2, raising=False)
    monkeypatch.setattr(users_store, "BUSY_TIMEOUT", 0.2, raising=False)


def hold_write_lock(db_path: Path) -> sqlite3.Connection:
    other = sqlite3.connect(db_path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # the write lock, as a long admin transaction would
    return other


def texts(data_dir: Path) -> list[str]:
    return [(e.queue_id or "") + ": " + e.text for e in search_events(data_dir)]


def test_a_batch_refused_while_the_database_is_locked_is_written_once_it_is_free(tmp_path):
    failures: list[str] = []
    records = Records(tmp_path, "mx1.example.test", on_failure=failures.append)
    records.flush()
    other = hold_write_lock(tmp_path / "records.sqlite")
    try:
        records.record(ev.Removed(), QID)
        records.flush()
        assert f"{QID}: removed" in (tmp_path / "log" / "kanmon.log").read_text()  # the last resort first
        assert failures and "locked" in failures[0]
    finally:
        other.rollback()
        other.close()
    records.flush()
    records.flush()
    assert f"{QID}: removed" in texts(tmp_path)
    records.close()


def test_a_batch_refused_until_the_stop_is_written_at_the_next_start(tmp_path):
    records = Records(tmp_path, "mx1.example.test")
    records.flush()
    other = hold_write_lock(tmp_path / "records.sqlite")
    try:
        records.record(ev.Removed(), QID)
        records.history_status(QID, "bob@example.test", "Delivered")
        records.close()  # stops while the database still refuses: nothing may be lost
    finally:
        other.rollback()
        other.close()
    assert f"{QID}: removed" not in texts(tmp_path)
    again = Records(tmp_path, "mx1.example.test")
    again.flush()
    assert texts(tmp_path).count(f"{QID}: removed") == 1
    again.close()


def test_a_deleted_database_is_recreated_and_written(tmp_path):
    failures: list[str] = []
    records = Records(tmp_path, "mx1.example.test", on_failure=failures.append)
    records.emit("before")
    records.flush()
    for suffix in ("", "-wal", "-shm"):
        (tmp_path / f"records.sqlite{suffix}").unlink(missing_ok=True)
    records.record(ev.Removed(), QID)
    records.flush()
    assert f"{QID}: removed" in texts(tmp_path)
    assert any("records.sqlite" in t and "recreated" in t for t in texts(tmp_path))
    assert failures
    records.close()


FAST = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)


def make_users(tmp_path: Path) -> Users:
    config = parse_config(f'[server]\ndata_dir = "{tmp_path}"\n[[domain]]\nname = "example.test"\n'
                          'mailboxes = ["alice", "bob"]\n')
    return Users(config, hasher=FAST)


def test_logging_in_does_not_need_a_writable_records_database(tmp_path):
    users = make_users(tmp_path)
    users.set_password("alice@example.test", "s3cret")
    other = hold_write_lock(tmp_path / "records.sqlite")
    try:
        assert users.verify("alice@example.test", "s3cret")  # reads go on while another writes
        users.record_login("alice@example.test", "127.0.0.1")  # a last-login stamp it cannot write: no error
    finally:
        other.rollback()
        other.close()


def test_an_unreadable_account_database_is_a_temporary_failure_not_a_wrong_password(tmp_path):
    users = make_users(tmp_path)
    users.set_password("alice@example.test", "s3cret")
    other = sqlite3.connect(tmp_path / "records.sqlite", isolation_level=None)
    other.execute("PRAGMA locking_mode=EXCLUSIVE")
    other.execute("BEGIN EXCLUSIVE")  # nobody may even read
    try:
        with pytest.raises(users_store.AuthUnavailable):
            users.verify("alice@example.test", "s3cret")
    finally:
        other.rollback()
        other.close()


def test_a_deleted_database_does_not_break_logins_of_the_users_file(tmp_path):
    from click.testing import CliRunner

    from kanmon.cli import main

    conf = tmp_path / "kanmon.toml"
    conf.write_text(f'[server]\ndata_dir = "{tmp_path}"\n[[domain]]\nname = "example.test"\nmailboxes = ["bob"]\n')
    assert CliRunner().invoke(main, ["user", "add", "carol@example.test", "--stdin", "-c", str(conf)],
                              input="pw\n").exit_code == 0
    users = Users(parse_config(conf.read_text()), hasher=FAST)
    users.record_login("carol@example.test", "127.0.0.1")
    for suffix in ("", "-wal", "-shm"):
        (tmp_path / f"records.sqlite{suffix}").unlink(missing_ok=True)
    assert users.verify("carol@example.test", "pw")
    users.record_login("carol@example.test", "127.0.0.1")
