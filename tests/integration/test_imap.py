"""IMAP over real loopback sockets: imaplib, raw TLS sockets, curl and Dovecot."""

from __future__ import annotations

import asyncio
import imaplib
import os
import re
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest
import trustme
from argon2 import PasswordHasher

from kanmon.config import parse_config
from kanmon.store import maildir
from kanmon.store.imap import ImapService
from kanmon.store.users import AuthThrottle, Users
from tests.support.kanmon_node import free_port

FAST = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
ALICE = "alice@example.test"
PW = "correct horse"
MSG = (b"From: Bob <bob@example.test>\r\nTo: alice@example.test\r\nSubject: quarterly\r\n"
       b"Message-ID: <q1@example.test>\r\n\r\nThe numbers are in.\r\n")

imaplib.Commands.setdefault("MOVE", ("SELECTED",))
imaplib.Commands.setdefault("IDLE", ("AUTH", "SELECTED"))


def deliver_new(root: Path, data: bytes) -> None:
    """Write a Maildir file the way local delivery does (LF, tmp/, then rename into new/)."""
    data = maildir.to_lf(data)
    name = maildir.unique_name(len(data), len(maildir.to_crlf(data)))
    (root / "tmp" / name).write_bytes(data)
    os.rename(root / "tmp" / name, root / "new" / name)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 10):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.run(self.loop.shutdown_default_executor())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def make_server(data_dir: Path, ca: trustme.CA):
    plain, tls = free_port(), free_port()
    config = parse_config(
        f"""
[server]
hostname = "mx1.example.test"
data_dir = "{data_dir}"
[[domain]]
name = "example.test"
mailboxes = ["alice", "bob"]
[imap]
listen = ["127.0.0.1:{plain}"]
listen_tls = ["127.0.0.1:{tls}"]
"""
    )
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(server_ctx)
    users = Users(config, hasher=FAST)
    users.set_password(ALICE, PW)
    clock = Clock()
    throttle = AuthThrottle(clock, free_failures=100, base_delay=0, max_delay=0, block_account_after=3)
    events: list[str] = []
    loop = LoopThread()

    class S:
        pass

    s = S()

    def start() -> None:
        s.svc = ImapService(config, server_ctx, users, throttle, lambda text, queue_id=None: events.append(text if isinstance(text, str) else text.line()),
                            idle_poll=0.05, max_literal=100_000)
        loop.run(s.svc.start())

    s.plain, s.tls, s.users, s.clock, s.events, s.loop, s.ca = plain, tls, users, clock, events, loop, ca
    s.box = users.mailbox(ALICE).ensure()
    s.client_ctx = ssl.create_default_context()
    ca.configure_trust(s.client_ctx)
    s.restart = lambda: (loop.run(s.svc.stop()), start())
    start()
    return s


@pytest.fixture
def server(tmp_path: Path, ca: trustme.CA):
    s = make_server(tmp_path / "data", ca)
    try:
        yield s
    finally:
        s.loop.run(s.svc.stop())
        s.loop.close()


def connect(s, implicit: bool = False) -> imaplib.IMAP4:
    if implicit:
        c = imaplib.IMAP4_SSL("127.0.0.1", s.tls, ssl_context=s.client_ctx, timeout=10)
    else:
        c = imaplib.IMAP4("127.0.0.1", s.plain, timeout=10)
        c.starttls(s.client_ctx)
    c.login(ALICE, PW)
    return c


def test_fetch_over_starttls_and_implicit_tls(server) -> None:
    deliver_new(server.box.root, MSG)
    for implicit in (False, True):
        c = connect(server, implicit)
        try:
            typ, data = c.select("INBOX")
            assert typ == "OK" and data == [b"1"]
            typ, data = c.fetch("1", "(RFC822.SIZE BODY.PEEK[HEADER.FIELDS (SUBJECT)] ENVELOPE)")
            assert typ == "OK"
            assert b"Subject: quarterly" in data[0][1]
            assert f"RFC822.SIZE {len(MSG)}".encode() in data[0][0]
            typ, data = c.uid("FETCH", "1", "(BODY[])")
            assert data[0][1] == MSG
        finally:
            c.logout()
    assert any(e.startswith(f"imap login {ALICE}") for e in server.events)


def test_login_before_tls_is_refused(server) -> None:
    c = imaplib.IMAP4("127.0.0.1", server.plain, timeout=10)
    try:
        assert "LOGINDISABLED" in c.capabilities and "STARTTLS" in c.capabilities
        with pytest.raises(imaplib.IMAP4.error, match="PRIVACYREQUIRED"):
            c.login(ALICE, PW)
    finally:
        c.logout()


def test_starttls_injection_is_ignored(server) -> None:
    """CVE-2011-0411: a command sent in plaintext right behind STARTTLS is not run."""
    with socket.create_connection(("127.0.0.1", server.plain), timeout=10) as raw:
        f = raw.makefile("rb")
        assert f.readline().startswith(b"* OK")
        raw.sendall(b"a STARTTLS\r\nb CAPABILITY\r\n")
        assert f.readline() == b"a OK Begin TLS negotiation now\r\n"
        tls = server.client_ctx.wrap_socket(raw, server_hostname="127.0.0.1")
        tls.sendall(b"c NOOP\r\n")
        assert tls.recv(200) == b"c OK NOOP completed\r\n"
        tls.close()
        f.close()


def test_flags_persist_across_reconnect_and_restart(server) -> None:
    deliver_new(server.box.root, MSG)
    deliver_new(server.box.root, MSG)
    c = connect(server)
    c.select("INBOX")
    c.store("1", "+FLAGS", r"(\Flagged \Seen)")
    c.store("2", "+FLAGS", r"(\Answered)")
    c.logout()
    c = connect(server)
    c.select("INBOX")
    typ, data = c.fetch("1:2", "(UID FLAGS)")
    assert data == [b"1 (UID 1 FLAGS (\\Flagged \\Seen))", b"2 (UID 2 FLAGS (\\Answered))"]
    typ, data = c.status("INBOX", "(UIDVALIDITY)")
    validity = re.search(rb"UIDVALIDITY (\d+)", data[0]).group(1)
    c.logout()
    server.restart()
    c = connect(server)
    c.select("INBOX")
    typ, data = c.fetch("1:2", "(UID FLAGS)")
    assert data == [b"1 (UID 1 FLAGS (\\Flagged \\Seen))", b"2 (UID 2 FLAGS (\\Answered))"]
    assert re.search(rb"UIDVALIDITY (\d+)", c.status("INBOX", "(UIDVALIDITY)")[1][0]).group(1) == validity
    c.logout()


def test_idle_sees_mail_written_into_new(server) -> None:
    raw = socket.create_connection(("127.0.0.1", server.tls), timeout=10)
    tls = server.client_ctx.wrap_socket(raw, server_hostname="127.0.0.1")
    f = tls.makefile("rb")
    try:
        assert f.readline().startswith(b"* OK")
        tls.sendall(f'a LOGIN {ALICE} "{PW}"\r\nb SELECT INBOX\r\n'.encode())
        while not f.readline().startswith(b"b OK"):
            pass
        tls.sendall(b"c IDLE\r\n")
        assert f.readline() == b"+ idling\r\n"
        deliver_new(server.box.root, MSG)
        assert f.readline() == b"* 1 EXISTS\r\n"  # waits for the poll; the socket timeout bounds it
        assert f.readline() == b"* 1 RECENT\r\n"
        tls.sendall(b"DONE\r\n")
        assert f.readline() == b"c OK IDLE terminated\r\n"
    finally:
        f.close()
        tls.close()


def test_move_to_trash(server) -> None:
    deliver_new(server.box.root, MSG)
    deliver_new(server.box.root, MSG)
    c = connect(server)
    try:
        c.select("INBOX")
        typ, data = c._simple_command("MOVE", "1", "Trash")
        assert typ == "OK"
        assert c.untagged_responses.get("EXPUNGE") == [b"1"]
        typ, data = c.uid("MOVE", "2", "Trash")
        assert typ == "OK"
        assert c.select("INBOX")[1] == [b"0"]
        assert c.select("Trash")[1] == [b"2"]
        typ, data = c.list()
        trash = [line for line in data if line.endswith(b"Trash")]
        assert trash and b"\\Trash" in trash[0]
    finally:
        c.logout()


def test_append_and_bounded_literal(server) -> None:
    c = connect(server)
    try:
        typ, data = c.append("Sent", r"(\Seen)", None, MSG)
        assert typ == "OK" and b"APPENDUID" in data[0]
        typ, data = c.append("Sent", None, None, b"Subject: big\r\n\r\n" + b"x" * 200_000)
        assert typ == "NO" and b"[TOOBIG]" in data[0]
        typ, data = c.noop()  # the connection is still usable
        assert typ == "OK"
    finally:
        c.logout()
    (m,) = server.box.folder("Sent").sync()
    assert m.flags == {"\\Seen"} and server.box.folder("Sent").read(m) == maildir.to_lf(MSG)


def test_brute_force_blocked_then_released_by_clock(server) -> None:
    c = imaplib.IMAP4_SSL("127.0.0.1", server.tls, ssl_context=server.client_ctx, timeout=10)
    for _ in range(2):
        with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
            c.login(ALICE, "guess")
    with pytest.raises((imaplib.IMAP4.abort, imaplib.IMAP4.error)):
        c.login(ALICE, "guess")
    c.shutdown()
    c = imaplib.IMAP4_SSL("127.0.0.1", server.tls, ssl_context=server.client_ctx, timeout=10)
    with pytest.raises((imaplib.IMAP4.abort, imaplib.IMAP4.error)):
        c.login(ALICE, PW)
    c.shutdown()
    server.clock.now += 3600
    c = connect(server, implicit=True)
    c.logout()
    assert any("imap login blocked account alice@example.test" in e for e in server.events)


def test_search_and_expunge(server) -> None:
    deliver_new(server.box.root, MSG)
    deliver_new(server.box.root, MSG.replace(b"quarterly", b"lunch"))
    c = connect(server)
    try:
        c.select("INBOX")
        assert c.search(None, "SUBJECT", "lunch") == ("OK", [b"2"])
        assert c.uid("SEARCH", "UNSEEN") == ("OK", [b"1 2"])
        c.store("1", "+FLAGS", r"(\Deleted)")
        typ, data = c.expunge()
        assert data == [b"1"]
    finally:
        c.logout()
    assert len(server.box.folder("INBOX").sync()) == 1


class Gate:
    """Holds a Maildir call (in the server's file executor) until the test opens it."""

    def __init__(self, monkeypatch, name: str) -> None:
        self.entered = threading.Event()
        self.opened = threading.Event()
        real = getattr(maildir.Folder, name)

        def held(folder, *args, **kwargs):
            self.entered.set()
            if not self.opened.wait(30):
                raise OSError("the test never opened the gate")
            return real(folder, *args, **kwargs)

        monkeypatch.setattr(maildir.Folder, name, held)


@pytest.mark.parametrize("held", ["read", "append"])
def test_a_held_mailbox_call_does_not_stop_other_connections(server, monkeypatch, held: str) -> None:
    """While one client's FETCH (a file read) or APPEND (write and fsync) is held inside
    the Maildir call, another client connects, logs in and gets answers."""
    deliver_new(server.box.root, MSG)
    slow = connect(server)
    slow.select("INBOX")
    gate = Gate(monkeypatch, held)
    result: dict = {}

    def slow_command() -> None:
        if held == "read":
            result["r"] = slow.fetch("1", "(BODY[])")
        else:
            result["r"] = slow.append("INBOX", None, None, MSG)

    t = threading.Thread(target=slow_command)
    t.start()
    try:
        assert gate.entered.wait(10)  # the slow command is inside the Maildir call
        other = connect(server)  # greeting, STARTTLS, LOGIN: all answered meanwhile
        assert other.noop()[0] == "OK"
        assert other.select("Sent")[0] == "OK"
        assert other.status("INBOX", "(MESSAGES)")[0] == "OK"
        other.logout()
        assert "r" not in result  # the slow command is still held
    finally:
        gate.opened.set()
        t.join(10)
    typ, data = result["r"]
    assert typ == "OK"
    if held == "read":
        assert data[0][1] == MSG
    else:
        assert b"APPENDUID" in data[0]
    assert slow.noop()[0] == "OK"
    slow.logout()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_fetches_and_lists(server, tmp_path: Path) -> None:
    deliver_new(server.box.root, MSG)
    cafile = tmp_path / "ca.pem"
    server.ca.cert_pem.write_to_path(str(cafile))
    common = ["curl", "-sS", "--max-time", "20", "--ssl-reqd", "--cacert", str(cafile), "-u", f"{ALICE}:{PW}"]
    msg = subprocess.run([*common, f"imap://127.0.0.1:{server.plain}/INBOX;UID=1"], capture_output=True, timeout=30)
    assert msg.returncode == 0, msg.stderr
    assert msg.stdout == MSG
    listing = subprocess.run([*common, f"imaps://127.0.0.1:{server.tls}/"], capture_output=True, timeout=30)
    assert listing.returncode == 0, listing.stderr
    assert b"\\Sent" in listing.stdout and b"INBOX" in listing.stdout


DOVECOT = "/usr/lib/dovecot/imap"
FROM_DOVECOT = b"Subject: from dovecot\r\n\r\nhi\r\n"


@pytest.mark.skipif(not os.path.exists(DOVECOT), reason="Dovecot (dovecot-imapd) is not installed")
@pytest.mark.skipif(os.geteuid() != 0, reason="the Dovecot test runs Dovecot as nobody, which needs root")
def test_dovecot_reads_what_kanmon_stored(ca: trustme.CA) -> None:
    """Dovecot, pointed at the same Maildir++ tree, sees kanmon's messages, flags and folders."""
    base = Path(tempfile.mkdtemp(prefix="kanmon-dovecot-"))
    os.chmod(base, 0o755)  # Dovecot drops to nobody and must reach the tree
    s = make_server(base / "data", ca)
    try:
        deliver_new(s.box.root, MSG)
        c = connect(s)
        c.select("INBOX")
        c.store("1", "+FLAGS", r"(\Flagged $Important)")
        c.create("Projects")
        c.append("Projects", r"(\Seen)", None, MSG.replace(b"quarterly", b"from kanmon"))
        validity = s.box.folder("INBOX").uidvalidity
        c.logout()
        # A session that stays selected while Dovecot changes the folder behind its back,
        # with the folder's index filled (ENVELOPE is answered from it).
        watcher = connect(s)
        watcher.select("INBOX")
        assert b"quarterly" in watcher.fetch("1", "(ENVELOPE)")[1][0]
        # A CONDSTORE session on Projects: Dovecot's flag change gets a new MODSEQ here
        syncer = connect(s)
        syncer._simple_command("SELECT", "Projects", "(CONDSTORE)")
        syncer.state = "SELECTED"
        before = int(syncer.response("HIGHESTMODSEQ")[1][-1])
        for p in [base, *base.rglob("*")]:
            os.chown(p, 65534, 65534)
        conf = base / "dovecot.conf"
        conf.write_text(
            f"base_dir = {base}/run\nstate_dir = {base}/state\nlog_path = /dev/stderr\n"
            f"mail_location = maildir:{base}/data/mailboxes/%d/%n:INDEX=MEMORY\nmail_home = {base}/home\n"
            "ssl = no\nprotocols = imap\nmail_uid = 65534\nmail_gid = 65534\nfirst_valid_uid = 1\n"
        )
        script = (b'a SELECT INBOX\r\nb FETCH 1 (UID FLAGS BODY.PEEK[])\r\nc LIST "" "*"\r\n'
                  b"d SELECT Projects\r\ne FETCH 1 (FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])\r\ne2 STORE 1 +FLAGS (\\Answered)\r\n"
                  b"g APPEND INBOX {%d+}\r\n%s\r\nh SELECT INBOX\r\ni STORE 1 +FLAGS (\\Deleted)\r\n"
                  b"j EXPUNGE\r\nf LOGOUT\r\n" % (len(FROM_DOVECOT), FROM_DOVECOT))
        r = subprocess.run([DOVECOT, "-c", str(conf)], input=script, capture_output=True, timeout=30,
                           env={"USER": ALICE, "PATH": os.environ.get("PATH", "")})
        out = r.stdout
        assert b"* PREAUTH" in out, r.stderr
        # Same UIDVALIDITY and UID: Dovecot read kanmon's dovecot-uidlist (and the keyword
        # from dovecot-keywords).
        assert f"* OK [UIDVALIDITY {validity}]".encode() in out
        assert re.search(rb"\* 1 FETCH \(UID 1 FLAGS \(\\Flagged \$Important\) BODY\[\] \{%d\}" % len(MSG), out), out
        assert b"The numbers are in." in out
        assert b'"." Projects' in out and b'"." Sent' in out
        assert b"FLAGS (\\Seen) BODY[HEADER.FIELDS (SUBJECT)]" in out and b"Subject: from kanmon" in out
        assert re.search(rb"g OK \[APPENDUID %d 2\]" % validity, out), out
        assert b"j OK" in out, out
        # The kanmon session sees Dovecot's expunge and append; its index answers for
        # what is left and learns the new message.
        watcher.noop()
        assert watcher.untagged_responses.get("EXPUNGE") == [b"1"]
        assert watcher.uid("SEARCH", "ALL")[1][0] == b"2"
        assert watcher.uid("SEARCH", "SUBJECT", '"from dovecot"')[1][0] == b"2"
        assert watcher.uid("SEARCH", "SUBJECT", "quarterly")[1][0] == b""
        assert b'"from dovecot"' in watcher.uid("FETCH", "2", "(ENVELOPE)")[1][0]
        watcher.logout()
        typ, data = syncer.uid("FETCH", "1:*", "(FLAGS)", "(CHANGEDSINCE %d)" % before)
        assert typ == "OK" and re.search(rb"UID 1 FLAGS \(\\Answered \\Seen\) MODSEQ \((\d+)\)", data[-1]), data
        assert int(re.search(rb"MODSEQ \((\d+)\)", data[-1]).group(1)) > before
        syncer.logout()
        # And back: kanmon sees the message Dovecot stored, under Dovecot's UID.
        c = connect(s)
        c.select("INBOX")
        typ, data = c.uid("FETCH", "2", "(BODY.PEEK[])")
        assert data[0][1] == FROM_DOVECOT
        c.logout()
    finally:
        s.loop.run(s.svc.stop())
        s.loop.close()
        shutil.rmtree(base, ignore_errors=True)
