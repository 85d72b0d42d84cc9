"""ManageSieve (RFC 5804) over a real loopback socket, with a small client written here:
STARTTLS, AUTHENTICATE PLAIN and LOGIN, PUTSCRIPT/CHECKSCRIPT/SETACTIVE/GETSCRIPT,
LISTSCRIPTS, RENAMESCRIPT, DELETESCRIPT, HAVESPACE, the shared login throttle."""

from __future__ import annotations

import base64
import re
import socket
import ssl
from pathlib import Path

import pytest
import trustme

from kanmon.config import parse_config
from kanmon.store.managesieve import ManageSieveService
from kanmon.store.sievescripts import ActiveScripts
from kanmon.store.users import AuthThrottle, Users
from tests.integration.test_pop3 import FAST, Clock, LoopThread, free_port

ALICE = "alice@example.test"
PW = "correct horse"
SCRIPT = b'require ["fileinto"];\r\nif header :contains "subject" "report" {\r\n  fileinto "Reports";\r\n}\r\n'


class Client:
    """Just enough ManageSieve: send a line (with literals), read a response up to its
    OK/NO/BYE line, literals included, however the bytes are split into segments."""

    def __init__(self, port: int):
        self.sock: socket.socket | ssl.SSLSocket = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buf = b""

    def _more(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise EOFError("connection closed")
        self.buf += data

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            self._more()
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def response(self) -> tuple[list[bytes], bytes]:
        """(data lines, with literals inlined; the final OK/NO/BYE line)."""
        lines = []
        while True:
            line = self.line()
            m = re.search(rb"\{(\d+)\}$", line)
            if m:
                size = int(m.group(1))
                while len(self.buf) < size:
                    self._more()
                head, value, self.buf = line[: m.start()], self.buf[:size], self.buf[size:]
                line = head + value + self.line()  # the rest of the line after the literal
                if head == b"":  # a bare literal is data (GETSCRIPT), not a status line
                    lines.append(line)
                    continue
            if line.startswith((b"OK", b"NO", b"BYE")):
                return lines, line
            lines.append(line)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def command(self, data: bytes) -> tuple[list[bytes], bytes]:
        self.send(data + b"\r\n")
        return self.response()

    def starttls(self, ctx: ssl.SSLContext) -> tuple[list[bytes], bytes]:
        assert self.command(b"STARTTLS")[1].startswith(b"OK")
        self.sock = ctx.wrap_socket(self.sock, server_hostname="127.0.0.1")
        return self.response()  # the capabilities again (RFC 5804 2.2)

    def close(self) -> None:
        self.sock.close()


def literal(data: bytes) -> bytes:
    return b"{%d+}\r\n" % len(data) + data


@pytest.fixture
def server(tmp_path: Path):
    ca = trustme.CA()
    port = free_port()
    config = parse_config(f"""
[server]
hostname = "mx1.example.test"
data_dir = "{tmp_path / 'data'}"
[[domain]]
name = "example.test"
mailboxes = ["alice", "bob"]
[sieve]
max_script_size = 2000
max_scripts = 3
[managesieve]
listen = ["127.0.0.1:{port}"]
""")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(server_ctx)
    users = Users(config, hasher=FAST)
    users.set_password(ALICE, PW)
    throttle = AuthThrottle(Clock(), free_failures=100, base_delay=0, max_delay=0, block_account_after=3,
                            block_ip_after=100)
    events: list[str] = []
    loop = LoopThread()
    svc = ManageSieveService(config, server_ctx, users, throttle,
                             lambda text, queue_id=None: events.append(text if isinstance(text, str) else text.line()))
    loop.run(svc.start())

    class S:
        pass

    s = S()
    s.port, s.events, s.data_dir = port, events, tmp_path / "data"
    s.client_ctx = ssl.create_default_context()
    ca.configure_trust(s.client_ctx)
    try:
        yield s
    finally:
        loop.run(svc.stop())
        loop.close()


def logged_in(server, mech: str = "PLAIN") -> Client:
    c = Client(server.port)
    caps, ok = c.response()
    assert ok.startswith(b"OK") and b'"STARTTLS"' in caps and b'"SASL" ""' in caps
    caps, _ = c.starttls(server.client_ctx)
    assert b'"SASL" "PLAIN LOGIN"' in caps and b'"STARTTLS"' not in caps
    assert any(line.startswith(b'"SIEVE" ') and b"fileinto" in line and b"vacation" in line for line in caps)
    if mech == "PLAIN":
        token = base64.b64encode(f"\0{ALICE}\0{PW}".encode())
        assert c.command(b'AUTHENTICATE "PLAIN" "' + token + b'"')[1].startswith(b"OK")
    else:
        c.send(b'AUTHENTICATE "LOGIN"\r\n')
        assert c.line() == b'"VXNlcm5hbWU6"'
        c.send(b'"' + base64.b64encode(ALICE.encode()) + b'"\r\n')
        assert c.line() == b'"UGFzc3dvcmQ6"'
        c.send(literal(base64.b64encode(PW.encode())) + b"\r\n")
        assert c.response()[1].startswith(b"OK")
    return c


def test_put_check_activate_get_list_rename_delete(server) -> None:
    c = logged_in(server)
    try:
        assert c.command(b'HAVESPACE "main" 500')[1].startswith(b"OK")
        assert c.command(b'HAVESPACE "main" 5000')[1].startswith(b"NO (QUOTA/MAXSIZE)")
        assert c.command(b"CHECKSCRIPT " + literal(SCRIPT))[1].startswith(b"OK")
        _, no = c.command(b"CHECKSCRIPT " + literal(b'keep;\r\nfileinto "x";\r\n'))
        assert no.startswith(b"NO") and b'line 2: fileinto needs require \\"fileinto\\"' in no
        _, no = c.command(b'PUTSCRIPT "broken" ' + literal(b"if true {\r\n"))
        assert no.startswith(b"NO") and b"line 1" in no
        assert c.command(b'PUTSCRIPT "main" ' + literal(SCRIPT))[1].startswith(b"OK")
        assert c.command(b'SETACTIVE "main"')[1].startswith(b"OK")
        lines, ok = c.command(b"LISTSCRIPTS")
        assert ok.startswith(b"OK") and lines == [b'"main" ACTIVE']
        lines, ok = c.command(b'GETSCRIPT "main"')
        assert ok.startswith(b"OK") and lines == [SCRIPT]
        assert c.command(b'GETSCRIPT "nope"')[1].startswith(b"NO (NONEXISTENT)")
        assert c.command(b'DELETESCRIPT "main"')[1].startswith(b"NO (ACTIVE)")
        assert c.command(b'RENAMESCRIPT "main" "Filters"')[1].startswith(b"OK")
        name, script = ActiveScripts(server.data_dir).lookup(ALICE)
        assert name == "Filters" and script.extensions == frozenset({"fileinto"})
        assert c.command(b'SETACTIVE ""')[1].startswith(b"OK")
        assert ActiveScripts(server.data_dir).lookup(ALICE) is None
        assert c.command(b'DELETESCRIPT "Filters"')[1].startswith(b"OK")
        assert c.command(b"LISTSCRIPTS") == ([], b'OK "listscripts completed"')
        assert c.command(b"LOGOUT")[1].startswith(b"OK")
    finally:
        c.close()
    assert any(e.startswith(f"managesieve login {ALICE}") for e in server.events)


def test_login_mechanism_and_pipelined_commands(server) -> None:
    c = logged_in(server, "LOGIN")
    try:
        # Several commands in one write: answered in order.
        c.send(b'PUTSCRIPT "a" ' + literal(b"keep;") + b'\r\nSETACTIVE "a"\r\nLISTSCRIPTS\r\n')
        assert c.response()[1].startswith(b"OK")
        assert c.response()[1].startswith(b"OK")
        assert c.response() == ([b'"a" ACTIVE'], b'OK "listscripts completed"')
    finally:
        c.close()


def test_no_login_before_starttls_and_throttle(server) -> None:
    c = Client(server.port)
    try:
        c.response()
        token = base64.b64encode(f"\0{ALICE}\0{PW}".encode())
        assert c.command(b'AUTHENTICATE "PLAIN" "' + token + b'"')[1].startswith(b"NO (ENCRYPT-NEEDED)")
        assert c.command(b"LISTSCRIPTS")[1].startswith(b"NO")
        # Plaintext pipelined behind STARTTLS is thrown away (CVE-2011-0411).
        c.send(b"STARTTLS\r\nLOGOUT\r\n")
        assert c.response()[1].startswith(b"OK")
        c.sock = server.client_ctx.wrap_socket(c.sock, server_hostname="127.0.0.1")
        assert c.response()[1].startswith(b"OK")
        c.send(b"NOOP\r\n")
        assert c.response()[1].startswith(b'OK "done"')
        bad = base64.b64encode(f"\0{ALICE}\0wrong".encode())
        for _ in range(2):
            assert c.command(b'AUTHENTICATE "PLAIN" "' + bad + b'"')[1].startswith(b"NO")
        _, last = c.command(b'AUTHENTICATE "PLAIN" "' + bad + b'"')
        assert last.startswith(b"BYE")  # the account is blocked (block_account_after=3), as for IMAP/POP3
    finally:
        c.close()
    assert any("managesieve login blocked" in e for e in server.events)


def test_a_session_bug_ends_with_a_managesieve_bye(server, monkeypatch) -> None:
    from kanmon.store.managesieve import ManageSieveSession

    def broken(self, args):
        raise RuntimeError("bug")

    monkeypatch.setattr(ManageSieveSession, "_cmd_noop", broken)
    c = Client(server.port)
    try:
        c.response()
        assert c.command(b"NOOP") == ([], b'BYE "internal error"')
    finally:
        c.close()


def test_an_oversized_upload_gets_no_and_the_connection_goes_on(server) -> None:
    c = logged_in(server)
    try:
        big = b"# " + b"x" * 9000 + b"\r\nkeep;\r\n"
        c.send(b'PUTSCRIPT "big" {%d+}\r\n' % len(big))
        for i in range(0, len(big), 1000):  # in pieces, as a slow link delivers it
            c.send(big[i:i + 1000])
        c.send(b"\r\nNOOP\r\n")
        _, no = c.response()
        assert no.startswith(b"NO (QUOTA/MAXSIZE)")
        assert c.response()[1] == b'OK "done"'
        _, no = c.command(b'PUTSCRIPT "big" ' + literal(b"#" * 2500))  # within the literal bound, over the size
        assert no.startswith(b"NO (QUOTA/MAXSIZE)")
        assert c.command(b"LISTSCRIPTS") == ([], b'OK "listscripts completed"')
    finally:
        c.close()
