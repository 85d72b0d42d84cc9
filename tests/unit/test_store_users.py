"""Accounts (argon2id hashes in records.sqlite) and the brute-force throttle."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from argon2 import PasswordHasher

from kanmon.config import parse_config
from kanmon.state.api import MemoryState
from kanmon.state.sqlite import SqliteState
from kanmon.store.users import AuthThrottle, UnknownMailbox, Users

FAST = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)


def make_users(tmp_path: Path) -> Users:
    config = parse_config(
        f"""
[server]
data_dir = "{tmp_path}"
[[domain]]
name = "example.test"
mailboxes = ["alice", "bob"]
[[domain]]
name = "relay.test"
deliver = "relay"
servers = ["127.0.0.1:25"]
"""
    )
    return Users(config, hasher=FAST)


def test_set_and_verify(tmp_path: Path) -> None:
    users = make_users(tmp_path)
    assert not users.verify("alice@example.test", "s3cret")  # no password yet
    users.set_password("Alice@Example.test", "s3cret")
    assert users.verify("alice@example.test", "s3cret")
    assert users.verify("ALICE@example.test", "s3cret")
    assert not users.verify("alice@example.test", "S3cret")
    assert not users.verify("carol@example.test", "s3cret")
    assert not users.verify("x@relay.test", "s3cret")
    assert not users.verify("alice@example.test", "s3cret" * 1000)


def test_hash_is_argon2id_and_table_is_ours(tmp_path: Path) -> None:
    users = make_users(tmp_path)
    users.set_password("alice@example.test", "plain-text secret")
    with sqlite3.connect(tmp_path / "records.sqlite") as db:
        (h,) = db.execute("SELECT hash FROM accounts").fetchone()
        (mode,) = db.execute("PRAGMA journal_mode").fetchone()
    db.close()
    # (a short password could turn up by chance in the base64 salt; this one cannot)
    assert h.startswith("$argon2id$") and "plain-text secret" not in h
    assert mode == "wal"


def test_other_tables_in_the_database_are_left_alone(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "records.sqlite")
    db.execute("CREATE TABLE events(x)")
    db.execute("INSERT INTO events VALUES (1)")
    db.commit()
    db.close()
    users = make_users(tmp_path)
    users.set_password("bob@example.test", "pw")
    db = sqlite3.connect(tmp_path / "records.sqlite")
    assert db.execute("SELECT x FROM events").fetchall() == [(1,)]
    db.close()


def test_lock_refuses_the_right_password(tmp_path: Path) -> None:
    users = make_users(tmp_path)
    users.set_password("alice@example.test", "pw")
    users.lock("alice@example.test")
    assert not users.verify("alice@example.test", "pw")
    users.unlock("alice@example.test")
    assert users.verify("alice@example.test", "pw")


def test_unknown_mailbox_is_an_error_for_admin_operations(tmp_path: Path) -> None:
    users = make_users(tmp_path)
    for op in (lambda: users.set_password("carol@example.test", "x"), lambda: users.lock("x@relay.test")):
        with pytest.raises(UnknownMailbox):
            op()
    with pytest.raises(ValueError):
        users.set_password("alice@example.test", "")


def test_list_reports_password_usage_and_last_login(tmp_path: Path) -> None:
    clock = [1_800_000_000.0]
    users = make_users(tmp_path)
    users.clock = lambda: clock[0]
    users.set_password("bob@example.test", "pw")
    users.mailbox("bob@example.test").ensure().folder("INBOX").append(b"Subject: x\r\n\r\nhello\r\n")
    users.record_login("bob@example.test", "127.0.0.1")
    alice, bob = users.list()
    assert (alice.address, alice.has_password, alice.messages, alice.last_login) == ("alice@example.test", False, 0, None)
    assert (bob.has_password, bob.messages, bob.size, bob.last_login, bob.last_ip) == (
        True, 1, len(b"Subject: x\n\nhello\n"), 1_800_000_000.0, "127.0.0.1",
    )


def test_rehash_on_login_when_parameters_change(tmp_path: Path) -> None:
    users = make_users(tmp_path)
    users.set_password("alice@example.test", "pw")
    users.hasher = PasswordHasher(time_cost=2, memory_cost=1024, parallelism=1)
    assert users.verify("alice@example.test", "pw")
    with sqlite3.connect(tmp_path / "records.sqlite") as db:
        (h,) = db.execute("SELECT hash FROM accounts").fetchone()
    db.close()
    assert "t=2" in h


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["process", "memory-state", "sqlite-state"])
def shared(request, tmp_path):
    """None: the throttle counts in its own memory; else the SharedState it counts in."""
    if request.param == "process":
        yield None
    elif request.param == "memory-state":
        yield MemoryState()
    else:
        state = SqliteState(tmp_path)
        yield state
        state.close()


def test_throttle_grows_delay_then_blocks_the_account(shared) -> None:
    clock = Clock()
    t = AuthThrottle(clock, state=shared, free_failures=2, base_delay=1, max_delay=8, block_account_after=6, block_ip_after=100)
    delays = [t.failed("192.0.2.1", "alice@example.test").delay for _ in range(5)]
    assert delays == [0, 0, 1, 2, 4]
    assert t.blocked_for("192.0.2.1", "alice@example.test") == 0
    sixth = t.failed("192.0.2.1", "alice@example.test")
    assert sixth.blocked and sixth.key == "account alice@example.test"
    # Blocked for every IP, even with the right password (the caller checks first).
    assert t.blocked_for("198.51.100.7", "Alice@example.test") == 900
    assert t.blocked_for("198.51.100.7", "bob@example.test") == 0
    clock.now += 901
    assert t.blocked_for("198.51.100.7", "alice@example.test") == 0


def test_throttle_blocks_an_ip_spraying_accounts(shared) -> None:
    clock = Clock()
    t = AuthThrottle(clock, state=shared, block_ip_after=5, block_account_after=100, block_for=60)
    results = [t.failed("192.0.2.9", f"user{i}@example.test") for i in range(5)]
    assert [r.blocked for r in results] == [False] * 4 + [True]
    assert t.blocked_for("192.0.2.9") == 60
    assert t.blocked_for("192.0.2.10") == 0
    clock.now += 30
    assert t.blocked_for("192.0.2.9", "anyone@example.test") == 30


def test_throttle_window_forgets_old_failures_and_success_clears_account() -> None:
    clock = Clock()
    t = AuthThrottle(clock, window=100, free_failures=1, block_account_after=3, block_ip_after=100)
    t.failed("192.0.2.1", "a@example.test")
    t.failed("192.0.2.1", "a@example.test")
    clock.now += 201  # the window is estimated from two fixed buckets: gone after two windows
    assert t.failed("192.0.2.1", "a@example.test").delay == 0  # the first two expired
    t.succeeded("192.0.2.1", "a@example.test")
    assert not t.failed("192.0.2.1", "a@example.test").blocked
    assert not t.failed("192.0.2.1", "a@example.test").blocked


def test_throttle_is_shared_by_processes_through_the_state_file(tmp_path) -> None:
    """Two receiver processes (two SqliteState on one file): their failures add up, and a
    block one of them starts holds in the other; a success clears the account for both."""
    clock = Clock()
    a_state, b_state = SqliteState(tmp_path), SqliteState(tmp_path)
    try:
        a = AuthThrottle(clock, state=a_state, block_account_after=4, block_ip_after=100, block_for=60)
        b = AuthThrottle(clock, state=b_state, block_account_after=4, block_ip_after=100, block_for=60)
        assert not a.failed("192.0.2.1", "alice@example.test").blocked
        assert not b.failed("192.0.2.2", "alice@example.test").blocked
        b.succeeded("192.0.2.2", "alice@example.test")
        results = [t.failed("192.0.2.3", "alice@example.test") for t in (a, b, a, b)]
        assert [r.blocked for r in results] == [False, False, False, True]  # 4 in all, not 2 each
        assert a.blocked_for("198.51.100.7", "alice@example.test") == 60
        clock.now += 61
        assert a.blocked_for("198.51.100.7", "alice@example.test") == 0
    finally:
        a_state.close()
        b_state.close()


def test_throttle_memory_is_bounded() -> None:
    clock = Clock()
    t = AuthThrottle(clock, max_keys=100)
    for i in range(1000):
        t.failed(f"10.0.{i // 256}.{i % 256}", None)
    assert len(t.state.counters) <= 100


def test_log_safe_escapes_control_characters() -> None:
    from kanmon.store.users import log_safe

    assert log_safe("evil\r\nFAKE LINE") == "evil\\r\\nFAKE LINE"
    assert log_safe("x" * 500) == "x" * 100
    assert log_safe("álice@example.test") == "álice@example.test"


def test_throttle_counts_attempts_in_flight(shared) -> None:
    """Attempts reserved before their passwords are verified count like failures: no more
    than the limit are let through at once, and a block that starts meanwhile refuses
    even the right password."""
    clock = Clock()
    t = AuthThrottle(clock, state=shared, block_account_after=3, block_ip_after=100, block_for=60)
    assert [t.reserve(f"192.0.2.{i}", "alice@example.test") for i in range(5)] == [0.0, 0.0, 0.0, 1.0, 1.0]
    t.release("192.0.2.0", "alice@example.test")  # the check itself failed: not a failure
    assert t.reserve("192.0.2.9", "alice@example.test") == 0.0
    assert t.failed("192.0.2.1", "alice@example.test").blocked is False
    assert t.failed("192.0.2.2", "alice@example.test").blocked is False
    assert t.failed("192.0.2.9", "alice@example.test").blocked is True
    assert t.succeeded("192.0.2.3", "alice@example.test") is False  # right, but blocked meanwhile
    assert t.reserve("198.51.100.1", "alice@example.test") == 60
    clock.now += 61
    assert t.reserve("198.51.100.1", "alice@example.test") == 0.0
    assert t.succeeded("198.51.100.1", "alice@example.test") is True


def test_throttle_in_flight_is_shared_by_processes(tmp_path) -> None:
    clock = Clock()
    a_state, b_state = SqliteState(tmp_path), SqliteState(tmp_path)
    try:
        a = AuthThrottle(clock, state=a_state, block_account_after=2, block_ip_after=100)
        b = AuthThrottle(clock, state=b_state, block_account_after=2, block_ip_after=100)
        b.owner = "auth 999999"  # another process
        assert a.reserve("192.0.2.1", "alice@example.test") == 0.0
        assert b.reserve("192.0.2.2", "alice@example.test") == 0.0
        assert a.reserve("192.0.2.3", "alice@example.test") > 0
        b_state.gauges.drop_owner(b.owner)  # that process died: its attempts are gone
        assert a.reserve("192.0.2.3", "alice@example.test") == 0.0
    finally:
        a_state.close()
        b_state.close()


def test_the_dummy_hash_is_made_on_the_first_login_only(tmp_path: Path) -> None:
    """A node that never authenticates (balance only, relay only) never runs argon2."""

    class Counting(PasswordHasher):
        hashed = 0

        def hash(self, password, *, salt=None):  # type: ignore[override]
            Counting.hashed += 1
            return super().hash(password, salt=salt)

    config = parse_config(f'[server]\ndata_dir = "{tmp_path}"\n[[domain]]\nname = "example.test"\nmailboxes = ["alice"]\n')
    users = Users(config, hasher=Counting(time_cost=1, memory_cost=1024, parallelism=1))
    assert Counting.hashed == 0
    assert not users.verify("nobody@example.test", "x")  # an unknown account: the dummy hash
    assert not users.verify("nobody@example.test", "y")
    assert Counting.hashed == 1
