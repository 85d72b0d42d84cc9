"""Parallel logins against the brute-force throttle, over real sockets: IMAP, POP3 and
submission (AUTH PLAIN), in one node and across receiver processes (`workers = 2`).

The throttle must count an attempt before its password is verified: 100 attempts sent at
once may verify no more guesses than the per-account limit, and afterwards even the
right password is refused while the block lasts.
"""

from __future__ import annotations

import contextlib
import imaplib
import poplib
import smtplib
import socket
import ssl
import threading
from pathlib import Path

import pytest
from argon2 import PasswordHasher

from kanmon.config import parse_config
from kanmon.state.sqlite import SqliteState
from kanmon.store.users import AuthThrottle, Users
from tests.integration.test_receiver_processes import receiver_pids
from tests.support.kanmon_node import KanmonProcess, RunningNode, free_port, wait_for

FAST = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
ATTEMPTS = 100
ACCOUNT_LIMIT = 10

CONFIG = """
[server]
hostname = "mx1.example.test"
data_dir = "{data_dir}"
workers = {workers}
[smtp]
listen = ["127.0.0.1:{smtp}"]
relay_networks = ["127.0.0.1/32"]
min_free_disk = "1MB"
[submission]
listen = ["127.0.0.1:{sub}"]
[pop3]
listen = ["127.0.0.1:{pop}"]
[imap]
listen = ["127.0.0.1:{imap}"]
[[domain]]
name = "example.test"
mailboxes = ["alice", "bob", "carol"]
"""


def unverified() -> ssl.SSLContext:
    return ssl._create_unverified_context()


class _ImapFrom(imaplib.IMAP4):
    """imaplib from a given loopback source address."""

    def __init__(self, host: str, port: int, source: str):
        self._source = source
        super().__init__(host, port, timeout=60)

    def _create_socket(self, timeout):
        return socket.create_connection((self.host, self.port), timeout, source_address=(self._source, 0))


class _Pop3From(poplib.POP3):
    def __init__(self, host: str, port: int, source: str):
        self._source = source
        super().__init__(host, port, timeout=60)

    def _create_socket(self, timeout):
        return socket.create_connection((self.host, self.port), timeout, source_address=(self._source, 0))


def _verdict(text: str) -> str:
    if "AUTHENTICATIONFAILED" in text or "[AUTH]" in text or text.startswith("535"):
        return "failed"  # the password was verified, and wrong
    if "UNAVAILABLE" in text or "SYS/TEMP" in text or "failed logins" in text or text.startswith("421"):
        return "blocked"
    return "error " + text


def attempt(proto: str, port: int, source: str, user: str, password: str, go: threading.Barrier) -> str:
    """One login from source, sent when every thread is ready: "ok", "failed" (the
    password was verified and wrong), "blocked" (refused by the throttle) or "error ..."."""
    client = None
    try:
        if proto == "imap":
            client = _ImapFrom("127.0.0.1", port, source)
            client.starttls(unverified())
            go.wait(60)
            try:
                client.login(user, password)
                return "ok"
            except imaplib.IMAP4.error as e:  # NO, or BYE (abort)
                return _verdict(str(e))
        if proto == "pop3":
            client = _Pop3From("127.0.0.1", port, source)
            client.stls(unverified())
            go.wait(60)
            try:
                client.user(user)
                client.pass_(password)
                return "ok"
            except poplib.error_proto as e:
                return _verdict(e.args[0].decode(errors="replace"))
        client = smtplib.SMTP("127.0.0.1", port, timeout=60, source_address=(source, 0))
        client.ehlo()
        client.starttls(context=unverified())
        client.ehlo()
        go.wait(60)
        try:
            client.user, client.password = user, password
            client.auth("PLAIN", client.auth_plain)  # one mechanism: login() would try the next one after a 535
            return "ok"
        except smtplib.SMTPAuthenticationError as e:
            return _verdict(f"{e.smtp_code} {e.smtp_error!r}")
        except smtplib.SMTPServerDisconnected:
            return "blocked"  # a 421 reply closes the connection: smtplib may see the close first
    except (OSError, EOFError, threading.BrokenBarrierError, smtplib.SMTPException, imaplib.IMAP4.error,
            poplib.error_proto) as e:
        return f"error {type(e).__name__}: {e}"
    finally:
        if client is not None:
            if isinstance(client, imaplib.IMAP4):
                with contextlib.suppress(OSError):
                    client.shutdown()
            else:
                with contextlib.suppress(OSError):
                    client.close()


def burst(proto: str, port: int, sources: list[str], user: str) -> list[str]:
    """ATTEMPTS wrong passwords for user at once, spread over the source addresses."""
    go = threading.Barrier(ATTEMPTS)
    results: list[str] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        r = attempt(proto, port, sources[i % len(sources)], user, f"guess {i}", go)
        with lock:
            results.append(r)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(ATTEMPTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


def right_password(proto: str, port: int, source: str, user: str) -> str:
    return attempt(proto, port, source, user, "correct horse", threading.Barrier(1))


CASES = [
    ("imap", "alice@example.test", [f"127.0.0.{i}" for i in range(11, 16)]),
    ("pop3", "bob@example.test", [f"127.0.0.{i}" for i in range(21, 26)]),
    ("submission", "carol@example.test", [f"127.0.0.{i}" for i in range(31, 36)]),
]


@pytest.fixture
def node(tmp_path):
    ports = {k: free_port() for k in ("smtp", "sub", "pop", "imap")}
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    cfg = parse_config(CONFIG.format(data_dir=data_dir, workers=0, **ports))
    users = Users(cfg, hasher=FAST)
    for who in ("alice", "bob", "carol"):
        users.set_password(f"{who}@example.test", "correct horse")
    state = SqliteState(data_dir)  # the same file as the node's state
    n = RunningNode(cfg)
    n.node.auth_throttle = AuthThrottle(state=state, base_delay=0, max_delay=0, block_account_after=ACCOUNT_LIMIT,
                                        block_ip_after=20)
    n.start()
    n.ports = ports
    yield n
    n.stop()
    state.close()


@pytest.mark.parametrize("proto,user,sources", CASES, ids=[c[0] for c in CASES])
def test_parallel_guesses_verify_no_more_than_the_limit(node, proto, user, sources) -> None:
    port = node.ports[{"imap": "imap", "pop3": "pop", "submission": "sub"}[proto]]
    results = burst(proto, port, sources, user)
    print(f"\n{proto}: {results.count('failed')} guesses verified, {results.count('blocked')} refused at once")
    assert len(results) == ATTEMPTS
    assert [r for r in results if r.startswith("error")] == []
    assert results.count("ok") == 0
    # Only as many guesses as the account allows were checked; the others were refused.
    assert results.count("failed") <= ACCOUNT_LIMIT, results
    assert results.count("blocked") >= ATTEMPTS - ACCOUNT_LIMIT
    # The block holds even for the right password, from any address.
    assert right_password(proto, port, "127.0.0.40", user) == "blocked"


def test_parallel_guesses_across_receiver_processes(tmp_path: Path) -> None:
    """workers = 2: the two receiver processes share the count and the attempts in flight
    (the default throttle: 10 per account)."""
    ports = {k: free_port() for k in ("smtp", "sub", "pop", "imap")}
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    text = CONFIG.format(data_dir=data_dir, workers=2, **ports)
    cfg_file = tmp_path / "kanmon.toml"
    cfg_file.write_text(text)
    users = Users(parse_config(text), hasher=FAST)
    users.set_password("carol@example.test", "correct horse")
    proc = KanmonProcess(cfg_file, "127.0.0.1", ports["smtp"]).start()
    try:
        assert proc.proc is not None
        wait_for(lambda: len(receiver_pids(proc.proc.pid)) == 2, 15, "two receivers")
        results = burst("submission", ports["sub"], [f"127.0.0.{i}" for i in range(51, 56)], "carol@example.test")
        print(f"\ntwo receivers: {results.count('failed')} guesses verified, {results.count('blocked')} refused at once")
        assert [r for r in results if r.startswith("error")] == []
        assert results.count("ok") == 0
        assert results.count("failed") <= ACCOUNT_LIMIT, results
        assert right_password("submission", ports["sub"], "127.0.0.60", "carol@example.test") == "blocked"
    finally:
        proc.terminate()
