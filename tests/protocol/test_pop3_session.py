"""POP3 session driven by bytes: no sockets (RFC 1939, 2449, 2595, 5034)."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest
from argon2 import PasswordHasher

from kanmon.config import parse_config
from kanmon.store import maildir
from kanmon.store.connection import Close, Delay, FileWork, PeerInfo, Send, StartTls, Verify
from kanmon.store.pop3 import (
    ERR_AUTH_FAILED,
    ERR_BLOCKED,
    ERR_IN_USE,
    ERR_NEED_TLS,
    MailboxLocks,
    Pop3Session,
)
from kanmon.store.users import AuthThrottle, Users

FAST = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
ALICE = "alice@example.test"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def deliver_new(root: Path, data: bytes) -> None:
    name = maildir.unique_name(len(data), len(maildir.to_crlf(data)))
    (root / "tmp" / name).write_bytes(data)
    os.rename(root / "tmp" / name, root / "new" / name)


class Driver:
    """Plays the adapter: runs Verify synchronously, records delays, collects output."""

    def __init__(self, session: Pop3Session, users: Users):
        self.session = session
        self.users = users
        self.out = bytearray()
        self.delays: list[float] = []
        self.closed = False
        self.tls_started = False
        self.run(session.start())

    def run(self, events) -> None:
        events = list(events)
        while events:
            ev = events.pop(0)
            if isinstance(ev, Send):
                self.out += ev.data
            elif isinstance(ev, Delay):
                self.delays.append(ev.seconds)
            elif isinstance(ev, Verify):
                events[:0] = self.session.auth_result(self.users.verify(ev.user, ev.password))
            elif isinstance(ev, FileWork):  # the adapter's file executor, run inline
                try:
                    result = ev.call(*ev.args)
                except Exception as e:  # noqa: BLE001 - handed to the session, as the adapter does
                    events[:0] = self.session.file_done(None, e)
                else:
                    events[:0] = self.session.file_done(result)
            elif isinstance(ev, StartTls):
                self.tls_started = True
                events[:0] = self.session.tls_started()
            elif isinstance(ev, Close):
                self.closed = True

    def send(self, data: bytes) -> bytes:
        self.out.clear()
        self.run(self.session.receive(data))
        return bytes(self.out)


@pytest.fixture
def env(tmp_path: Path):
    config = parse_config(
        f"""
[server]
data_dir = "{tmp_path}"
[[domain]]
name = "example.test"
mailboxes = ["alice", "bob"]
"""
    )
    users = Users(config, hasher=FAST)
    users.set_password(ALICE, "pw")
    box = users.mailbox(ALICE).ensure()
    clock = Clock()
    throttle = AuthThrottle(clock, free_failures=1, base_delay=1, block_account_after=4, block_ip_after=100)
    locks = MailboxLocks()
    events: list[str] = []

    def session(tls: bool = True, tls_available: bool = True, ip: str = "127.0.0.1") -> Driver:
        s = Pop3Session(
            hostname="mx1.example.test", users=users, throttle=throttle, locks=locks,
            peer=PeerInfo(ip, 40000, tls), tls_available=tls_available,
            emit=lambda text, queue_id=None: events.append(text if isinstance(text, str) else text.line()),
        )
        return Driver(s, users)

    class Env:
        pass

    e = Env()
    e.users, e.box, e.clock, e.throttle, e.session, e.events = users, box, clock, throttle, session, events
    return e


def login(d: Driver, user: str = ALICE, pw: str = "pw") -> bytes:
    d.send(f"USER {user}\r\n".encode())
    return d.send(f"PASS {pw}\r\n".encode())


def test_greeting_and_capa_before_tls_offers_stls_only(env) -> None:
    d = env.session(tls=False)
    assert d.out.startswith(b"+OK mx1.example.test POP3 ready\r\n")
    capa = d.send(b"CAPA\r\n")
    assert capa.endswith(b"\r\n.\r\n")
    assert b"STLS\r\n" in capa and b"USER" not in capa and b"SASL" not in capa


@pytest.mark.parametrize("cmd", [b"USER alice@example.test\r\n", b"AUTH PLAIN AGFsaWNlAHB3\r\n", b"PASS pw\r\n"])
def test_login_before_tls_is_refused(env, cmd: bytes) -> None:
    d = env.session(tls=False)
    assert d.send(cmd) == ERR_NEED_TLS.encode() + b"\r\n"


def test_stls_discards_pipelined_commands(env) -> None:
    """CVE-2011-0411: a command injected after STLS in the same packet is not run."""
    d = env.session(tls=False)
    out = d.send(b"STLS\r\nUSER alice@example.test\r\nPASS pw\r\n")
    assert out == b"+OK begin TLS negotiation\r\n"
    assert d.tls_started
    assert d.session.state == "AUTHORIZATION" and d.session._user is None
    capa = d.send(b"CAPA\r\n")
    assert b"USER\r\n" in capa and b"SASL PLAIN LOGIN\r\n" in capa and b"STLS" not in capa
    assert d.send(b"STLS\r\n").startswith(b"-ERR")


def test_full_transaction(env) -> None:
    deliver_new(env.box.root, b"Subject: one\n\nfirst\n.dot line\n")
    deliver_new(env.box.root, b"Subject: two\n\nsecond\n")
    d = env.session()
    assert login(d).startswith(b"+OK 2 messages")
    size1 = len(b"Subject: one\r\n\r\nfirst\r\n.dot line\r\n")
    size2 = len(b"Subject: two\r\n\r\nsecond\r\n")
    assert d.send(b"STAT\r\n") == f"+OK 2 {size1 + size2}\r\n".encode()
    assert d.send(b"LIST\r\n") == f"+OK\r\n1 {size1}\r\n2 {size2}\r\n.\r\n".encode()
    assert d.send(b"LIST 2\r\n") == f"+OK 2 {size2}\r\n".encode()
    uidl = d.send(b"UIDL\r\n").split(b"\r\n")
    assert uidl[1].startswith(b"1 00000001") and len(uidl[1]) == 2 + 16
    retr = d.send(b"RETR 1\r\n")
    assert retr == f"+OK {size1} octets\r\n".encode() + b"Subject: one\r\n\r\nfirst\r\n..dot line\r\n.\r\n"
    top = d.send(b"TOP 1 1\r\n")
    assert top == b"+OK\r\nSubject: one\r\n\r\nfirst\r\n.\r\n"
    assert d.send(b"TOP 2 0\r\n") == b"+OK\r\nSubject: two\r\n\r\n.\r\n"
    assert d.send(b"DELE 1\r\n").startswith(b"+OK")
    assert d.send(b"RETR 1\r\n").startswith(b"-ERR")
    assert d.send(b"LIST\r\n") == f"+OK\r\n2 {size2}\r\n.\r\n".encode()
    assert d.send(b"RSET\r\n").startswith(b"+OK")
    assert d.send(b"STAT\r\n").startswith(b"+OK 2 ")
    d.send(b"DELE 2\r\n")
    assert d.send(b"QUIT\r\n").startswith(b"+OK")
    assert d.closed
    msgs = env.box.folder("INBOX").sync()
    assert len(msgs) == 1 and msgs[0].uid == 1 and "\\Seen" in msgs[0].flags  # RETR'd message: \Seen


def test_dropped_connection_deletes_nothing(env) -> None:
    deliver_new(env.box.root, b"Subject: keep\n\nx\n")
    d = env.session()
    login(d)
    assert d.send(b"DELE 1\r\n").startswith(b"+OK")
    d.session.connection_lost()
    assert len(env.box.folder("INBOX").sync()) == 1
    again = env.session()
    assert login(again).startswith(b"+OK 1 messages")  # the lock was released too


def test_second_session_is_in_use(env) -> None:
    first = env.session()
    login(first)
    second = env.session()
    assert login(second) == ERR_IN_USE.encode() + b"\r\n"
    assert second.session.state == "AUTHORIZATION"
    first.send(b"QUIT\r\n")
    assert login(second).startswith(b"+OK")


def test_auth_plain_initial_response_and_continuation(env) -> None:
    token = base64.b64encode(b"\0alice@example.test\0pw").decode()
    d = env.session()
    assert d.send(f"AUTH PLAIN {token}\r\n".encode()).startswith(b"+OK 0 messages")
    d.session.connection_lost()
    d = env.session()
    assert d.send(b"AUTH PLAIN\r\n") == b"+ \r\n"
    assert d.send(f"{token}\r\n".encode()).startswith(b"+OK")
    d.session.connection_lost()
    d = env.session()
    d.send(b"AUTH PLAIN\r\n")
    assert d.send(b"*\r\n").startswith(b"-ERR")
    assert d.send(b"AUTH PLAIN !!!notbase64\r\n").startswith(b"-ERR [AUTH] malformed")
    assert d.send(b"AUTH CRAM-MD5\r\n").startswith(b"-ERR")
    other = base64.b64encode(b"bob@example.test\0alice@example.test\0pw").decode()
    assert d.send(f"AUTH PLAIN {other}\r\n".encode()) == ERR_AUTH_FAILED.encode() + b"\r\n"


def test_brute_force_is_slowed_then_blocked(env) -> None:
    d = env.session(ip="127.0.0.9")
    for _ in range(3):
        assert login(d, pw="wrong") == ERR_AUTH_FAILED.encode() + b"\r\n"
    assert d.delays == [0, 1, 2]
    assert login(d, pw="wrong") == ERR_BLOCKED.encode() + b"\r\n"
    assert d.closed
    assert any("blocked account alice@example.test" in e for e in env.events)
    # Blocked: even the right password is refused, from any IP, until the block ends.
    d2 = env.session(ip="127.0.0.10")
    assert login(d2) == ERR_BLOCKED.encode() + b"\r\n"
    env.clock.now += env.throttle.block_for + 1
    d3 = env.session(ip="127.0.0.10")
    assert login(d3).startswith(b"+OK")


def test_wrong_state_bad_numbers_and_unknown_commands(env) -> None:
    d = env.session()
    assert d.send(b"STAT\r\n").startswith(b"-ERR")
    assert d.send(b"PASS pw\r\n").startswith(b"-ERR USER first")
    assert d.send(b"FROB\r\n").startswith(b"-ERR unknown")
    login(d)
    for cmd in (b"RETR 0\r\n", b"RETR 1\r\n", b"RETR x\r\n", b"DELE 99999999999999\r\n", b"TOP 1\r\n", b"USER a\r\n"):
        assert d.send(cmd).startswith(b"-ERR"), cmd
    assert d.send(b"\xff\xfe\r\n").startswith(b"-ERR")


def test_line_too_long_closes(env) -> None:
    d = env.session()
    d.send(b"NOOP " + b"x" * 5000)
    assert d.out.startswith(b"-ERR line too long") and d.closed


def test_too_many_errors_closes(env) -> None:
    d = env.session()
    d.send(b"BAD\r\n" * 10)
    assert d.closed and d.out.endswith(b"-ERR too many errors, closing\r\n")


def test_pipelined_commands_after_pass_run_after_verification(env) -> None:
    deliver_new(env.box.root, b"Subject: p\n\nx\n")
    d = env.session()
    out = d.send(b"USER alice@example.test\r\nPASS pw\r\nSTAT\r\nQUIT\r\n")
    lines = out.split(b"\r\n")
    assert lines[0] == b"+OK send PASS" and lines[1].startswith(b"+OK 1 messages")
    assert lines[2].startswith(b"+OK 1 ") and lines[3].startswith(b"+OK")


def test_timeout_says_why_and_closes(env) -> None:
    d = env.session()
    d.run(d.session.timed_out())
    assert d.out.endswith(b"-ERR autologout: idle for too long\r\n") and d.closed


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_WORDS = st.sampled_from(["USER", "PASS", "AUTH PLAIN", "STAT", "LIST", "RETR", "TOP", "DELE", "UIDL", "RSET",
                          "CAPA", "STLS", "QUIT", " 1", " 0", " 99", " -1", " x", "\r\n", "\n", "*", "\x00"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chunks=st.lists(st.one_of(st.binary(max_size=40), _WORDS.map(str.encode)), max_size=30))
def test_random_input_never_raises(env, chunks: list[bytes]) -> None:
    if not env.box.folder("INBOX").sync():
        deliver_new(env.box.root, b"Subject: f\n\nfuzz\n")
    d = env.session()
    login(d)
    for chunk in chunks:
        d.send(chunk)
    d.session.connection_lost()


def test_password_with_spaces_is_kept_whole(env) -> None:
    env.users.set_password(ALICE, " two words ")
    d = env.session()
    d.send(f"USER {ALICE}\r\n".encode())
    assert d.send(b"PASS  two words \r\n").startswith(b"+OK")
