"""POP3 over real loopback sockets: poplib and curl, real TLS (trustme)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import poplib
import shutil
import socket
import ssl
import subprocess
import threading
from pathlib import Path

import pytest
import trustme
from argon2 import PasswordHasher

from kanmon.config import parse_config
from kanmon.store import maildir
from kanmon.store.pop3 import Pop3Service
from kanmon.store.users import AuthThrottle, Users
from tests.support.kanmon_node import free_port

FAST = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
ALICE = "alice@example.test"


def deliver_new(root: Path, data: bytes) -> None:
    """Write a Maildir file the way local delivery does (tmp/, then rename into new/)."""
    name = maildir.unique_name(len(data), len(maildir.to_crlf(data)))
    (root / "tmp" / name).write_bytes(data)
    os.rename(root / "tmp" / name, root / "new" / name)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class LoopThread:
    """An event loop in a thread, so blocking clients (poplib, curl) can talk to it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 10):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        async def shutdown() -> None:
            await self.loop.shutdown_default_executor()

        self.run(shutdown())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def server(tmp_path: Path, ca: trustme.CA):
    plain, tls = free_port(), free_port()
    config = parse_config(
        f"""
[server]
hostname = "mx1.example.test"
data_dir = "{tmp_path / 'data'}"
[[domain]]
name = "example.test"
mailboxes = ["alice", "bob"]
[pop3]
listen = ["127.0.0.1:{plain}"]
listen_tls = ["127.0.0.1:{tls}"]
"""
    )
    cert = ca.issue_cert("127.0.0.1", "localhost", "mx1.example.test")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_ctx)
    users = Users(config, hasher=FAST)
    users.set_password(ALICE, "correct horse")
    box = users.mailbox(ALICE).ensure()
    clock = Clock()
    throttle = AuthThrottle(clock, free_failures=100, base_delay=0, max_delay=0, block_account_after=3, block_ip_after=100)
    events: list[str] = []
    loop = LoopThread()

    def start() -> Pop3Service:
        svc = Pop3Service(config, server_ctx, users, throttle, lambda text, queue_id=None: events.append(text if isinstance(text, str) else text.line()))
        loop.run(svc.start())
        return svc

    class S:
        pass

    s = S()
    s.plain, s.tls, s.box, s.users, s.clock, s.events, s.loop, s.ca = plain, tls, box, users, clock, events, loop, ca
    s.svc = start()
    s.restart = lambda: (loop.run(s.svc.stop()), setattr(s, "svc", start()))
    s.client_ctx = ssl.create_default_context()
    ca.configure_trust(s.client_ctx)
    try:
        yield s
    finally:
        loop.run(s.svc.stop())
        loop.close()


def stls_client(s) -> poplib.POP3:
    c = poplib.POP3("127.0.0.1", s.plain, timeout=10)
    c.stls(s.client_ctx)
    return c


def test_fetch_over_stls_and_implicit_tls(server) -> None:
    deliver_new(server.box.root, b"From: bob@example.test\nSubject: hello\n\nHi Alice,\n.\n..two dots\n")
    c = stls_client(server)
    try:
        c.user(ALICE)
        c.pass_("correct horse")
        count, size = c.stat()
        assert count == 1
        resp, lines, octets = c.retr(1)
        assert lines == [b"From: bob@example.test", b"Subject: hello", b"", b"Hi Alice,", b".", b"..two dots"]
        assert octets >= size
        assert c.uidl(1).split()[-1].startswith(b"00000001")
    finally:
        c.quit()
    t = poplib.POP3_SSL("127.0.0.1", server.tls, context=server.client_ctx, timeout=10)
    try:
        assert t.getwelcome().startswith(b"+OK mx1.example.test")
        assert "USER" in t.capa() and "SASL" in t.capa()
        t.user(ALICE)
        t.pass_("correct horse")
        assert t.stat()[0] == 1
    finally:
        t.quit()
    assert any(e.startswith(f"pop3 login {ALICE}") for e in server.events)


def test_login_before_tls_is_refused(server) -> None:
    c = poplib.POP3("127.0.0.1", server.plain, timeout=10)
    try:
        assert "STLS" in c.capa() and "USER" not in c.capa()
        with pytest.raises(poplib.error_proto, match="TLS is required"):
            c.user(ALICE)
    finally:
        c.quit()


def test_plaintext_injected_before_stls_handshake_is_ignored(server) -> None:
    """CVE-2011-0411: "STLS\\r\\nCAPA\\r\\n" in one packet; CAPA must not be answered."""
    with socket.create_connection(("127.0.0.1", server.plain), timeout=10) as raw:
        f = raw.makefile("rb")
        assert f.readline().startswith(b"+OK")
        raw.sendall(b"STLS\r\nCAPA\r\n")
        assert f.readline() == b"+OK begin TLS negotiation\r\n"
        tls = server.client_ctx.wrap_socket(raw, server_hostname="127.0.0.1")
        tls.sendall(b"NOOP\r\n")
        # The first answer after the handshake is to NOOP, not the injected CAPA.
        assert tls.recv(100).startswith(b"+OK\r\n")
        tls.close()
        f.close()


def test_dropped_session_deletes_nothing_and_quit_deletes(server) -> None:
    deliver_new(server.box.root, b"Subject: one\n\n1\n")
    deliver_new(server.box.root, b"Subject: two\n\n2\n")
    c = stls_client(server)
    c.user(ALICE)
    c.pass_("correct horse")
    c.dele(1)
    c.close()  # no QUIT
    c = stls_client(server)
    try:
        c.user(ALICE)
        c.pass_("correct horse")  # not IN-USE: the dropped session let go
        assert c.stat()[0] == 2
        c.dele(1)
    finally:
        c.quit()
    assert [m.uid for m in server.box.folder("INBOX").sync()] == [2]


def test_second_session_is_in_use(server) -> None:
    a = stls_client(server)
    b = stls_client(server)
    try:
        a.user(ALICE)
        a.pass_("correct horse")
        b.user(ALICE)
        with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
            b.pass_("correct horse")
    finally:
        a.quit()
        b.quit()


def test_brute_force_blocked_then_released_by_clock(server) -> None:
    c = stls_client(server)
    for _ in range(2):
        c.user(ALICE)
        with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
            c.pass_("guess")
    c.user(ALICE)
    with pytest.raises(poplib.error_proto, match="too many failed logins"):
        c.pass_("guess")
    c.close()
    assert any("blocked account alice@example.test" in e for e in server.events)
    c = stls_client(server)
    c.user(ALICE)
    with pytest.raises(poplib.error_proto, match="too many failed logins"):
        c.pass_("correct horse")
    c.close()
    server.clock.now += 3600
    c = stls_client(server)
    try:
        c.user(ALICE)
        assert c.pass_("correct horse").startswith(b"+OK")
    finally:
        c.quit()


def test_service_restart_keeps_uidl(server) -> None:
    deliver_new(server.box.root, b"Subject: a\n\na\n")
    c = stls_client(server)
    c.user(ALICE)
    c.pass_("correct horse")
    before = c.uidl()[1]
    c.quit()
    server.restart()
    deliver_new(server.box.root, b"Subject: b\n\nb\n")
    c = stls_client(server)
    c.user(ALICE)
    c.pass_("correct horse")
    after = c.uidl()[1]
    c.quit()
    assert after[0] == before[0] and len(after) == 2


def test_start_raises_oserror_when_port_is_taken(server) -> None:
    svc2 = Pop3Service(server.svc.config, server.svc.tls_context, server.users, server.svc.throttle, lambda *a, **k: None)
    with pytest.raises(OSError):
        server.loop.run(svc2.start())


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_lists_and_fetches(server, tmp_path: Path) -> None:
    deliver_new(server.box.root, b"Subject: via curl\n\nhello curl\n")
    cafile = tmp_path / "ca.pem"
    server.ca.cert_pem.write_to_path(str(cafile))
    common = ["curl", "-sS", "--max-time", "20", "--ssl-reqd", "--cacert", str(cafile), "-u", f"{ALICE}:correct horse"]
    listing = subprocess.run([*common, f"pop3://127.0.0.1:{server.plain}/"], capture_output=True, timeout=30)
    assert listing.returncode == 0, listing.stderr
    assert listing.stdout.decode().split() == ["1", str(len(b"Subject: via curl\r\n\r\nhello curl\r\n"))]
    msg = subprocess.run([*common, f"pop3s://127.0.0.1:{server.tls}/1"], capture_output=True, timeout=30)
    assert msg.returncode == 0, msg.stderr
    assert b"hello curl" in msg.stdout


def test_unknown_and_locked_users_fail_the_same_way(server) -> None:
    server.users.set_password("bob@example.test", "pw")
    server.users.lock("bob@example.test")
    answers = []
    for user, pw in (("nobody@example.test", "pw"), ("bob@example.test", "pw"), (ALICE, "bad")):
        c = stls_client(server)
        c.user(user)
        with pytest.raises(poplib.error_proto) as e:
            c.pass_(pw)
        answers.append(str(e.value))
        with contextlib.suppress(Exception):
            c.quit()
    assert len(set(answers)) == 1


def test_idle_connection_is_logged_out_and_connection_limit_holds(server) -> None:
    svc = Pop3Service(server.svc.config, server.svc.tls_context, server.users, server.svc.throttle,
                      lambda *a, **k: None, idle_timeout=0.2, max_connections=1)
    svc.listeners.plain = [("127.0.0.1", free_port())]
    svc.listeners.implicit = []
    server.loop.run(svc.start())
    try:
        (host, port), = svc.addresses
        with socket.create_connection((host, port), timeout=10) as first:
            f = first.makefile("rb")
            assert f.readline().startswith(b"+OK")
            with socket.create_connection((host, port), timeout=10) as second:
                assert second.makefile("rb").readline() == b"-ERR [SYS/TEMP] too many connections\r\n"
            # Nothing sent: the autologout timer ends the session (the socket timeout bounds the wait).
            assert f.readline() == b"-ERR autologout: idle for too long\r\n"
            assert f.readline() == b""
            f.close()
    finally:
        server.loop.run(svc.stop())


def test_failed_tls_handshakes_do_not_use_up_connection_slots(server) -> None:
    svc = Pop3Service(server.svc.config, server.svc.tls_context, server.users, server.svc.throttle,
                      lambda *a, **k: None, max_connections=1)
    svc.listeners.plain = []
    svc.listeners.implicit = [("127.0.0.1", free_port())]
    server.loop.run(svc.start())
    try:
        (host, port), = svc.addresses
        for _ in range(3):
            with socket.create_connection((host, port), timeout=10) as bad:
                bad.sendall(b"USER not-tls\r\n\r\n")  # not a TLS ClientHello: the handshake fails
                assert bad.recv(100) == b""  # the server hangs up
        t = poplib.POP3_SSL(host, port, context=server.client_ctx, timeout=10)
        try:
            t.user(ALICE)
            assert t.pass_("correct horse").startswith(b"+OK")
        finally:
            t.quit()
    finally:
        server.loop.run(svc.stop())


def test_a_held_message_read_does_not_stop_other_connections(server, monkeypatch) -> None:
    """While one client's RETR is held inside the Maildir read (in the server's file
    executor), another client connects, logs in and gets answers."""
    deliver_new(server.box.root, b"Subject: slow\n\nbody\n")
    server.users.set_password("bob@example.test", "pw")
    slow = stls_client(server)
    slow.user(ALICE)
    slow.pass_("correct horse")
    entered, opened = threading.Event(), threading.Event()
    real = maildir.Folder.read

    def held(folder, msg):
        entered.set()
        if not opened.wait(30):
            raise OSError("the test never opened the gate")
        return real(folder, msg)

    monkeypatch.setattr(maildir.Folder, "read", held)
    result: dict = {}
    t = threading.Thread(target=lambda: result.setdefault("r", slow.retr(1)))
    t.start()
    try:
        assert entered.wait(10)
        other = stls_client(server)
        other.user("bob@example.test")
        other.pass_("pw")
        assert other.noop().startswith(b"+OK")
        assert other.stat() == (0, 0)
        other.quit()
        assert "r" not in result
    finally:
        opened.set()
        t.join(10)
    assert result["r"][1] == [b"Subject: slow", b"", b"body"]
    slow.quit()


def _b64(text: str) -> str:
    import base64
    return base64.b64encode(text.encode()).decode()


def test_auth_plain_and_login_beside_user_pass(server) -> None:
    """RFC 5034 AUTH with poplib: PLAIN with an initial response and after "+ ", LOGIN
    in two steps ("Username:", "Password:"); a wrong LOGIN password fails like USER/PASS."""
    deliver_new(server.box.root, b"Subject: one\n\n1\n")
    c = stls_client(server)
    try:
        assert "LOGIN" in c.capa()["SASL"] and "PLAIN" in c.capa()["SASL"]
        assert c._shortcmd("AUTH PLAIN " + _b64(f"\0{ALICE}\0correct horse")).startswith(b"+OK")
        assert c.stat()[0] == 1
    finally:
        c.quit()
    c = stls_client(server)
    try:
        assert c._shortcmd("AUTH PLAIN") == b"+ "
        assert c._shortcmd(_b64(f"\0{ALICE}\0correct horse")).startswith(b"+OK")
    finally:
        c.quit()
    c = stls_client(server)
    try:
        assert c._shortcmd("AUTH LOGIN") == b"+ " + _b64("Username:").encode()
        assert c._shortcmd(_b64(ALICE)) == b"+ " + _b64("Password:").encode()
        assert c._shortcmd(_b64("correct horse")).startswith(b"+OK")
        assert c.stat()[0] == 1
    finally:
        c.quit()
    c = stls_client(server)
    try:
        assert c._shortcmd("AUTH LOGIN " + _b64(ALICE)) == b"+ " + _b64("Password:").encode()
        with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
            c._shortcmd(_b64("wrong"))
    finally:
        c.quit()
