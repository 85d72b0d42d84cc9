"""Resource exhaustion against a real `kanmon serve`: connection floods, slow clients and
huge input on every listener (SMTP, submission, IMAP, POP3, each implicit-TLS port).

A node runs in a subprocess with every listener on 127.0.0.1; hostile clients come from
other 127.0.0.x addresses. Each test asserts what a limit answers, that a legitimate
client is still served meanwhile, and that the server's memory (the RSS of the process
that holds the listeners, read from /proc) stays bounded and comes back. Nothing asserts
a time: every wait is on a condition with a bounded deadline.

The short versions run in CI; `KANMON_LONG=1` runs the long ones (`-m long`: 10x the
default limits, many more sources).
"""

from __future__ import annotations

import contextlib
import imaplib
import poplib
import select
import smtplib
import socket
import ssl
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from kanmon.config import parse_config
from kanmon.store.users import Users
from tests.support.kanmon_node import KanmonProcess, free_port, wait_for

PASSWORD = "correct horse battery"
ALICE = "alice@example.test"
LEGIT = "127.0.0.1"  # a well-behaved client's address
HOSTILE = "127.0.0.66"  # the flooding client's address

CONFIG = """
[server]
hostname = "mx1.example.test"
data_dir = "{data_dir}"
workers = {workers}
[tls]
cert = "{tls_dir}/cert.pem"
key = "{tls_dir}/key.pem"
{tls_extra}
[smtp]
listen = ["127.0.0.1:{smtp}"]
relay_networks = ["127.0.0.1/32"]
min_free_disk = "1MB"
greet_pause = "0s"
{smtp_extra}
[submission]
listen = ["127.0.0.1:{submission}"]
listen_tls = ["127.0.0.1:{submissions}"]
{submission_extra}
[imap]
listen = ["127.0.0.1:{imap}"]
listen_tls = ["127.0.0.1:{imaps}"]
{imap_extra}
[pop3]
listen = ["127.0.0.1:{pop3}"]
listen_tls = ["127.0.0.1:{pop3s}"]
{pop3_extra}
[[domain]]
name = "example.test"
mailboxes = ["alice", "bob"]
[[session_profile]]
name = "default"
sender_domain_check = false  # the senders' domains are in no DNS here
reject_own_helo = false
"""

PORTS = ("smtp", "submission", "submissions", "imap", "imaps", "pop3", "pop3s")


@dataclass
class Node:
    proc: KanmonProcess
    ports: dict[str, int]
    data_dir: Path
    client_ctx: ssl.SSLContext

    @property
    def pid(self) -> int:
        assert self.proc.proc is not None
        return self.proc.proc.pid

    def rss(self) -> int:
        """Resident memory of the process holding the listeners (workers = 0), in bytes."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def connect(self, port_name: str, source: str = LEGIT) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.ports[port_name]), timeout=15, source_address=(source, 0))

    def tls(self, port_name: str, source: str = LEGIT) -> ssl.SSLSocket:
        return self.client_ctx.wrap_socket(self.connect(port_name, source), server_hostname="mx1.example.test")


def start_node(tmp_path: Path, *, workers: int = 0, **extra: str) -> Node:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "mx1.example.test")
    tls_dir = tmp_path / "tls"
    tls_dir.mkdir(exist_ok=True)
    cert.cert_chain_pems[0].write_to_path(str(tls_dir / "cert.pem"))
    cert.private_key_pem.write_to_path(str(tls_dir / "key.pem"))
    ports = {name: free_port() for name in PORTS}
    keys = {f"{k}_extra": extra.get(k, "") for k in ("tls", "smtp", "submission", "imap", "pop3")}
    text = CONFIG.format(data_dir=tmp_path / "data", tls_dir=tls_dir, workers=workers, **ports, **keys)
    cfg = tmp_path / "kanmon.toml"
    cfg.write_text(text)
    Users(parse_config(text)).set_password(ALICE, PASSWORD)
    proc = KanmonProcess(cfg, "127.0.0.1", ports["smtp"]).start()
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    node = Node(proc, ports, tmp_path / "data", client_ctx)
    try:
        for name in PORTS:  # every listener is up (the SMTP one answered first)
            wait_for(lambda name=name: _listening(node, name), 20, f"{name} listening")
    except BaseException:
        proc.kill()
        raise
    return node


def _listening(node: Node, name: str) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", node.ports[name]), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory):
    """One node for the tests that leave it as they found it (every connection closed)."""
    n = start_node(tmp_path_factory.mktemp("node"))
    try:
        yield n
    finally:
        n.proc.terminate()


# -- what a legitimate client does on each listener --------------------------------------------


def serve_smtp(node: Node) -> None:
    with smtplib.SMTP("127.0.0.1", node.ports["smtp"], timeout=15) as s:
        assert s.ehlo()[0] == 250
        assert s.noop()[0] == 250


def serve_submission(node: Node, implicit: bool = False) -> None:
    if implicit:
        s: smtplib.SMTP = smtplib.SMTP_SSL("127.0.0.1", node.ports["submissions"], timeout=15, context=node.client_ctx)
    else:
        s = smtplib.SMTP("127.0.0.1", node.ports["submission"], timeout=15)
        s.starttls(context=node.client_ctx)
    with s:
        s.ehlo()
        assert s.login(ALICE, PASSWORD)[0] == 235


def serve_imap(node: Node, implicit: bool = False) -> None:
    if implicit:
        c: imaplib.IMAP4 = imaplib.IMAP4_SSL("127.0.0.1", node.ports["imaps"], ssl_context=node.client_ctx, timeout=15)
    else:
        c = imaplib.IMAP4("127.0.0.1", node.ports["imap"], timeout=15)
        c.starttls(node.client_ctx)
    try:
        assert c.login(ALICE, PASSWORD)[0] == "OK"
        assert c.select("INBOX")[0] == "OK"
    finally:
        with contextlib.suppress(Exception):
            c.logout()


def serve_pop3(node: Node, implicit: bool = False) -> None:
    if implicit:
        p: poplib.POP3 = poplib.POP3_SSL("127.0.0.1", node.ports["pop3s"], context=node.client_ctx, timeout=15)
    else:
        p = poplib.POP3("127.0.0.1", node.ports["pop3"], timeout=15)
        p.stls(node.client_ctx)
    try:
        p.user(ALICE)
        assert p.pass_(PASSWORD).startswith(b"+OK")
    finally:
        with contextlib.suppress(Exception):
            p.quit()


SERVE = {
    "smtp": serve_smtp,
    "submission": serve_submission,
    "submissions": lambda n: serve_submission(n, True),
    "imap": serve_imap,
    "imaps": lambda n: serve_imap(n, True),
    "pop3": serve_pop3,
    "pop3s": lambda n: serve_pop3(n, True),
}


def read_line(sock: socket.socket) -> bytes:
    """One line (up to 1000 bytes) or what came before EOF."""
    buf = b""
    while not buf.endswith(b"\n") and len(buf) < 1000:
        try:
            chunk = sock.recv(1)
        except (ConnectionResetError, TimeoutError):
            break
        if not chunk:
            break
        buf += chunk
    return buf


def closed_by_server(sock: socket.socket) -> bool:
    """The server has closed this connection (EOF or reset is waiting), without blocking.
    Anything else it sent (a banner, a refusal line) is read and dropped."""
    while True:
        readable, _, _ = select.select([sock], [], [], 0)
        if not readable:
            return False
        try:
            data = sock.recv(4096)
        except (ConnectionResetError, ssl.SSLError, OSError):
            return True
        if not data:
            return True


def close_all(socks: list[socket.socket]) -> None:
    for s in socks:
        with contextlib.suppress(OSError):
            s.close()


# -- per-IP connection limits on IMAP and POP3 ------------------------------------------------


@pytest.mark.parametrize("port_name, refusal", [
    ("imap", b"* BYE [UNAVAILABLE] too many connections from your address\r\n"),
    ("pop3", b"-ERR [SYS/TEMP] too many connections from your address\r\n"),
])
def test_imap_and_pop3_refuse_more_than_50_connections_from_one_address(node, port_name, refusal):
    """The default max_connections_per_ip (50): the 51st connection from one address is
    refused with a reply; another address is still served."""
    held = []
    try:
        for _ in range(50):
            s = node.connect(port_name, HOSTILE)
            assert read_line(s).startswith((b"* OK", b"+OK"))
            held.append(s)
        extra = node.connect(port_name, HOSTILE)
        held.append(extra)
        assert read_line(extra) == refusal
        assert read_line(extra) == b""
        SERVE[port_name](node)  # another address
    finally:
        close_all(held)
    # Released: the same address is served again.
    wait_for(lambda: _banner(node, port_name, HOSTILE), 10, "the address served again")


def _banner(node: Node, port_name: str, source: str) -> bool:
    with node.connect(port_name, source) as s:
        return read_line(s).startswith((b"* OK", b"+OK"))


# -- pre-authentication IMAP literals -----------------------------------------------------------


@pytest.mark.parametrize("size, plus", [(19_000_000, False), (9000, False), (9000, True), (19_000_000, True)])
def test_imap_refuses_a_large_literal_before_login_without_reading_it(node, size, plus):
    """Before authentication a literal may be a few KB (a LOGIN's user name and
    password); a larger one is refused by its announced size with a tagged NO, before
    any of it is read or kept. A LITERAL+ client sends it anyway: a few KB are dropped
    unread and the next command is served; megabytes end the connection."""
    with node.connect("imap") as s:
        assert read_line(s).startswith(b"* OK")
        s.sendall(f"a1 LOGIN {{{size}{'+' if plus else ''}}}\r\n".encode())
        assert read_line(s).startswith(b"a1 NO [TOOBIG]")
        if plus and size > 1_000_000:
            assert read_line(s).startswith(b"* BYE")
            assert read_line(s) == b""
        else:
            if plus:
                s.sendall(b"x" * size + b" y\r\n")
            s.sendall(b"a2 NOOP\r\n")
            assert read_line(s).startswith(b"a2 OK")
    serve_imap(node)


def test_imap_append_after_login_still_takes_a_large_literal(node):
    c = imaplib.IMAP4("127.0.0.1", node.ports["imap"], timeout=15)
    c.starttls(node.client_ctx)
    try:
        assert c.login(ALICE, PASSWORD)[0] == "OK"
        message = b"Subject: big\r\n\r\n" + b"x" * 200_000 + b"\r\n"
        assert c.append("INBOX", None, None, message)[0] == "OK"
    finally:
        c.logout()


# -- a trickle of bytes does not hold an unauthenticated session ------------------------------


@pytest.mark.parametrize("port_name", ["imap", "pop3"])
def test_a_trickle_of_bytes_before_login_does_not_extend_the_session(tmp_path, port_name):
    """One byte every 0.2 s never completes a command: the login_timeout (here 1 s)
    counts from the connection, so the server closes it whatever arrives."""
    n = start_node(tmp_path, imap='login_timeout = "1s"', pop3='login_timeout = "1s"')
    try:
        with n.connect(port_name, HOSTILE) as s:
            assert read_line(s).startswith((b"* OK", b"+OK"))
            closed = False
            for _ in range(150):  # at most 30 s of trickling: the server must close first
                try:
                    s.sendall(b"a")
                except OSError:
                    closed = True
                    break
                if closed_by_server(s):
                    closed = True
                    break
                time.sleep(0.2)
            assert closed, "the server kept a session that trickled bytes"
        SERVE[port_name](n)
    finally:
        n.proc.terminate()


# -- implicit TLS: connections count from accept, not from the end of the handshake -----------

TIGHT = 5  # the per-address limit of the `tight` node
TIGHT_LIMITS = {
    "tls": 'handshake_timeout = "60s"',  # a flood's held connections stay held during the test
    "smtp": f"max_connections_per_ip = {TIGHT}",  # submission: the session profile's limit
    "imap": f"max_connections_per_ip = {TIGHT}",
    "pop3": f"max_connections_per_ip = {TIGHT}",
}


@pytest.fixture(scope="module")
def tight(tmp_path_factory: pytest.TempPathFactory):
    n = start_node(tmp_path_factory.mktemp("tight"), **TIGHT_LIMITS)
    try:
        yield n
    finally:
        n.proc.terminate()


def refused_tls(node: Node, port_name: str, source: str) -> bool:
    """A TLS client from source gets no session: closed before or during the handshake.

    The client's own leak is ignored: Python's wrap_socket, given a socket the server has
    already reset, raises from getpeername() after it took the socket over, and the
    SSLSocket it dropped warns (unclosed) when the exception is freed, under load only."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        try:
            with node.tls(port_name, source) as s:
                s.settimeout(15)
                return s.recv(100) == b""
        except (ConnectionError, ssl.SSLError, OSError):
            return True


def silent_flood(node: Node, port_name: str, count: int, limit: int, sources: list[str]) -> list[socket.socket]:
    """count connections that never send a ClientHello, spread over sources; returns them
    once every connection beyond each source's limit has been closed by the server."""
    flood: list[socket.socket] = []
    closed: set[int] = set()
    for i in range(count):
        s = socket.socket()
        flood.append(s)
        s.settimeout(15)
        s.bind((sources[i % len(sources)], 0))
        try:
            s.connect(("127.0.0.1", node.ports[port_name]))
        except ConnectionResetError:  # refused so fast that the reset came with the connect
            closed.add(i)
    expected_held = min(count, limit * len(sources))

    def refused_enough() -> bool:
        closed.update(i for i, s in enumerate(flood) if i not in closed and closed_by_server(s))
        return len(closed) >= count - expected_held

    try:
        wait_for(refused_enough, 20, f"{count - expected_held} of {count} silent connections refused")
        # Nothing to send, nothing held beyond the limit: the rest are still open (their
        # handshake timeout is a minute away).
        still_open = [s for i, s in enumerate(flood) if i not in closed and not closed_by_server(s)]
        assert len(still_open) == expected_held
    except BaseException:
        close_all(flood)
        raise
    return flood


@pytest.mark.parametrize("port_name", ["submissions", "imaps", "pop3s"])
def test_connections_waiting_for_a_tls_handshake_count_against_the_per_address_limit(tight, port_name):
    """10x the limit from one address, none of them sending a ClientHello: all but the
    limit are refused at accept; another address is served meanwhile; the flooding
    address gets nothing more; memory stays bounded and comes back once they are gone."""
    baseline = tight.rss()
    flood = silent_flood(tight, port_name, 10 * TIGHT, TIGHT, [HOSTILE])
    try:
        assert refused_tls(tight, port_name, HOSTILE)
        SERVE[port_name](tight)
        assert tight.rss() < baseline + 32 * 2**20
    finally:
        close_all(flood)
    wait_for(lambda: not refused_tls(tight, port_name, HOSTILE), 15, "the flooding address served again")
    assert tight.rss() < baseline * 1.2


# -- several receiver processes share the connection limits -------------------------------------


def test_connection_limits_are_counted_over_every_receiver_process(tmp_path):
    """workers = 3: max_connections_per_ip = 5 allows 5 connections from one address in
    all (not 5 per process), even when 60 arrive at once and every receiver takes some;
    max_connections = 8 allows 8 in all."""
    from concurrent.futures import ThreadPoolExecutor

    from tests.integration.test_receiver_processes import receiver_pids

    n = start_node(tmp_path, workers=3, smtp="max_connections_per_ip = 5\nmax_connections = 8")
    held: list[socket.socket] = []
    try:
        wait_for(lambda: len(receiver_pids(n.pid)) == 3, 20, "three receivers")

        def banner(source: str) -> bytes:
            s = n.connect("smtp", source)
            held.append(s)
            return read_line(s)[:9]

        with ThreadPoolExecutor(60) as pool:
            banners = list(pool.map(banner, [HOSTILE] * 60))
        assert banners.count(b"220 mx1.e") == 5
        assert banners.count(b"421 4.7.0") == 55
        close_all(held)
        held.clear()
        wait_for(lambda: banner(HOSTILE) == b"220 mx1.e", 15, "the connections released")
        close_all(held)
        held.clear()
        wait_for(lambda: _smtp_gauges_idle(n), 15, "every connection released")
        with ThreadPoolExecutor(30) as pool:
            banners = list(pool.map(banner, [f"127.0.0.{70 + i}" for i in range(30)]))
        assert banners.count(b"220 mx1.e") == 8
        assert banners.count(b"421 4.7.0") == 22
    finally:
        close_all(held)
        n.proc.terminate()


def _smtp_gauges_idle(n: Node) -> bool:
    from kanmon.state.sqlite import SqliteState

    state = SqliteState(n.data_dir)
    try:
        return state.gauges.count(f"smtp {HOSTILE}") == 0
    finally:
        state.close()


# -- the suite: floods, slow clients and huge input on every listener -------------------------

LISTENERS = ["smtp", "submission", "submissions", "imap", "imaps", "pop3", "pop3s"]
MANY = [f"127.0.0.{100 + i}" for i in range(10)]  # the sources of a distributed flood
MEMORY_HEADROOM = 32 * 2**20  # what a bounded flood may add to the server's RSS meanwhile


def assert_memory_returns(node: Node, baseline: int) -> None:
    """The server's RSS comes back to within 20 % of what it was before the attack."""
    wait_for(lambda: node.rss() < baseline * 1.2, 15, f"RSS back under {baseline * 1.2 / 2**20:.0f} MB")


def flood_and_serve(node: Node, port_name: str, limit: int, sources: list[str], per_source: int) -> None:
    baseline = node.rss()
    flood = silent_flood(node, port_name, per_source * len(sources), limit, sources)
    try:
        SERVE[port_name](node)  # a legitimate client from another address
        assert node.rss() < baseline + MEMORY_HEADROOM
    finally:
        close_all(flood)
    assert_memory_returns(node, baseline)
    # Every place is given back: each source is served again.
    for source in sources[:3]:
        wait_for(lambda source=source: _served_from(node, port_name, source), 15, f"{source} served again")


def _served_from(node: Node, port_name: str, source: str) -> bool:
    if port_name in ("submissions", "imaps", "pop3s"):
        return not refused_tls(node, port_name, source)
    with node.connect(port_name, source) as s:
        return read_line(s).startswith((b"220 ", b"* OK", b"+OK"))


@pytest.mark.parametrize("port_name", LISTENERS)
def test_ten_times_the_per_address_limit_from_one_address(tight, port_name):
    flood_and_serve(tight, port_name, TIGHT, [HOSTILE], 10 * TIGHT)


@pytest.mark.parametrize("port_name", LISTENERS)
def test_twice_the_per_address_limit_from_each_of_ten_addresses(tight, port_name):
    flood_and_serve(tight, port_name, TIGHT, MANY, 2 * TIGHT)


@pytest.mark.long
@pytest.mark.parametrize("port_name", LISTENERS)
def test_long_ten_times_the_default_limit_from_one_address_and_from_many(node, port_name):
    """The default limits (50 per address): 500 from one address, then 100 from each of
    ten addresses (500 held: half of max_connections, so others are still served)."""
    flood_and_serve(node, port_name, 50, [HOSTILE], 500)
    flood_and_serve(node, port_name, 50, [f"127.0.0.{150 + i}" for i in range(10)], 100)


# -- slow clients ---------------------------------------------------------------------------------

SLOW_LIMITS = {
    "tls": 'handshake_timeout = "1s"',
    "smtp": 'command_timeout = "1s"',  # submission too: it is an [smtp] setting
    "imap": 'login_timeout = "1s"',
    "pop3": 'login_timeout = "1s"',
}


@pytest.fixture(scope="module")
def slow(tmp_path_factory: pytest.TempPathFactory):
    n = start_node(tmp_path_factory.mktemp("slow"), **SLOW_LIMITS)
    try:
        yield n
    finally:
        n.proc.terminate()


def trickle_until_closed(sock: socket.socket, rounds: int = 150) -> bool:
    """Send one byte (never a whole line) every 0.2 s until the server closes the
    connection; False if it still holds it after `rounds` bytes."""
    for _ in range(rounds):
        try:
            sock.sendall(b"N")
        except OSError:
            return True
        if closed_by_server(sock):
            return True
        time.sleep(0.2)
    return False


@pytest.mark.parametrize("port_name", LISTENERS)
def test_slow_loris_is_cut_off_on_every_listener(slow, port_name):
    """Ten clients each trickle a command one byte at a time (after the TLS handshake on
    the implicit-TLS ports), and ten more connect and send nothing at all: the server
    closes every one (per-command deadline for SMTP, login deadline for IMAP/POP3,
    handshake timeout for silent TLS), while a legitimate client is served."""
    baseline = slow.rss()
    implicit = port_name in ("submissions", "imaps", "pop3s")
    trickling = []
    silent = []
    try:
        for i in range(10):
            s = slow.tls(port_name, MANY[i]) if implicit else slow.connect(port_name, MANY[i])
            assert read_line(s).startswith((b"220 ", b"* OK", b"+OK"))
            trickling.append(s)
            silent.append(slow.connect(port_name, MANY[i]))
        SERVE[port_name](slow)
        assert all(trickle_until_closed(s) for s in trickling)
        wait_for(lambda: all(closed_by_server(s) for s in silent), 20, "the silent connections closed")
        assert slow.rss() < baseline + MEMORY_HEADROOM
    finally:
        close_all(trickling + silent)
    assert_memory_returns(slow, baseline)


# -- huge input -----------------------------------------------------------------------------------

HUGE = 8 * 2**20  # bytes of one line / header, sent as fast as the server takes them


def send_huge(sock: socket.socket, data: bytes) -> None:
    """Send what the server reads of data; it may close before the end (that is a refusal)."""
    with contextlib.suppress(OSError):
        sock.sendall(data)


def reply_after_huge(sock: socket.socket) -> bytes:
    """The first line the server answers (after its banner was read)."""
    return read_line(sock)


@pytest.mark.parametrize("port_name, expected", [
    ("smtp", b"500 5.5.2"),
    ("submission", b"500 5.5.2"),
    ("imap", b"* BYE line too long"),
    ("pop3", b"-ERR line too long"),
])
def test_a_huge_line_is_refused_and_costs_no_memory(node, port_name, expected):
    baseline = node.rss()
    with node.connect(port_name, HOSTILE) as s:
        assert read_line(s).startswith((b"220 ", b"* OK", b"+OK"))
        s.settimeout(30)
        send_huge(s, b"A" * HUGE)
        assert reply_after_huge(s).startswith(expected)
        assert node.rss() < baseline + MEMORY_HEADROOM
    SERVE[port_name](node)
    assert_memory_returns(node, baseline)


def test_a_huge_header_is_refused_at_the_end_of_data(node):
    """A message whose header block is 8 MB (the default max_header_size is 1 MB): 552
    5.3.4, and the session goes on."""
    baseline = node.rss()
    with smtplib.SMTP("127.0.0.1", node.ports["smtp"], timeout=30, source_address=(HOSTILE, 0)) as c:
        c.ehlo("client.example.test")
        assert c.mail("sender@remote.example")[0] == 250
        assert c.rcpt(ALICE)[0] == 250
        header = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"x" * 900) for i in range(HUGE // 920))
        code, _ = c.data(header + b"Subject: huge\r\n\r\nbody\r\n")
        assert code == 552
        assert c.noop()[0] == 250
        assert node.rss() < baseline + MEMORY_HEADROOM
    serve_smtp(node)
    assert_memory_returns(node, baseline)


def test_huge_literals_before_login_are_refused_unread_on_many_connections(node):
    """Twelve unauthenticated connections each announce a 19 MB LOGIN literal (the
    attack that held 18.5 MB each): every one is refused by its size; nothing is kept."""
    baseline = node.rss()
    socks = [node.connect("imap", MANY[i % len(MANY)]) for i in range(12)]
    try:
        for s in socks:
            assert read_line(s).startswith(b"* OK")
            s.sendall(b"a1 LOGIN {19000000+}\r\n" + b"x" * 65536)
        for s in socks:
            assert read_line(s).startswith(b"a1 NO [TOOBIG]")
        assert node.rss() < baseline + MEMORY_HEADROOM
    finally:
        close_all(socks)
    serve_imap(node)
    assert_memory_returns(node, baseline)
