"""Run a real kanmon node for integration tests.

RunningNode: the Node of kanmon.node in a background thread with its own event loop,
listening on real loopback sockets; the test talks to it with real clients.
KanmonProcess: `kanmon serve -c FILE` as a subprocess, for crash (kill -9) tests.
free_port(host): a port free on that loopback address.

Config text is TOML with {port}, {data_dir} and {host} placeholders filled in.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from kanmon.clock import ManualClock
from kanmon.config import Config, parse_config
from kanmon.node import Node


# The built-in "default" profile checks each sender's domain in DNS (501 5.1.8, 451
# 4.1.8 while DNS fails) and refuses a HELO with our own name or address. Tests whose
# clients are outside relay_networks send from domains that no test DNS serves
# (a@remote.example), with smtplib's default HELO name, which on a host without a
# fully-qualified name is the literal of its own address ([127.0.0.1], the node's). Their
# node configs add this block, which redefines "default" for that test only. The
# built-in default itself is tested in tests/integration/test_sender_checks.py against
# the loopback DNS server.
TEST_DEFAULT_PROFILE = """
[[session_profile]]
name = "default"
sender_domain_check = false
reject_own_helo = false
"""


_HANDED_OUT: set[tuple[str, int]] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on host now, never one this test process handed out before: the
    kernel may give the same ephemeral port to two binds in a row once the first socket
    is closed, and a config taking several ports would list one twice."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if (host, port) not in _HANDED_OUT:
            _HANDED_OUT.add((host, port))
            return port


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll a condition with a bounded deadline (never a timing assertion)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def wait_port(host: str, port: int, timeout: float = 10.0) -> None:
    def ok() -> bool:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            return False

    wait_for(ok, timeout, f"{host}:{port} to listen")


def wait_banner(host: str, port: int, timeout: float = 10.0) -> None:
    """Until a connection to host:port is greeted with 220: with receiver processes the
    main process binds the port before they listen, so a port that accepts does not yet
    say the node serves (a test that stops a dependency then would stop it under the
    receivers' start)."""
    def ok() -> bool:
        try:
            with socket.create_connection((host, port), timeout=5) as s:
                s.settimeout(5)
                return s.recv(512).startswith(b"220")
        except OSError:
            return False

    wait_for(ok, timeout, f"the 220 greeting of {host}:{port}")


def make_config(template: str, data_dir: Path, host: str = "127.0.0.1", port: int | None = None, **extra) -> tuple[Config, str]:
    port = port or free_port(host)
    text = template.format(port=port, data_dir=str(data_dir), host=host, **extra)
    return parse_config(text), text


class _FailingDns:
    """A DNS server on loopback that answers SERVFAIL to every query, at once.

    A test config without [dns] servers would send its lookups (a client's PTR at
    connect, a sender's domain) to the system resolver: traffic off loopback, and on a
    machine whose resolver does not answer, every such lookup waits out its timeout (a
    DATA reply 10 s late). RunningNode points such configs here instead: DNS "fails"
    fast, as it does in a network namespace without a route."""

    _address: str | None = None
    _lock = threading.Lock()

    @classmethod
    def address(cls) -> str:
        with cls._lock:
            if cls._address is None:
                import socketserver  # noqa: PLC0415

                from dnslib import RCODE, DNSRecord  # noqa: PLC0415

                class Handler(socketserver.BaseRequestHandler):
                    def handle(self) -> None:
                        data, sock = self.request
                        try:
                            reply = DNSRecord.parse(data).reply()
                        except Exception:  # noqa: BLE001 - not DNS: no answer
                            return
                        reply.header.rcode = RCODE.SERVFAIL
                        sock.sendto(reply.pack(), self.client_address)

                server = socketserver.ThreadingUDPServer(("127.0.0.1", 0), Handler)
                server.daemon_threads = True
                threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True).start()
                cls._address = f"127.0.0.1:{server.server_address[1]}"
            return cls._address


def without_system_dns(config: Config) -> Config:
    """The config with [dns] servers pointed at _FailingDns when it names none."""
    if config.dns.servers:
        return config
    host, port = _FailingDns.address().rsplit(":", 1)
    return config.model_copy(update={"dns": config.dns.model_copy(update={"servers": [(host, int(port))]})})


def _finish(loop: asyncio.AbstractEventLoop) -> None:
    """What asyncio.run does after its main task: the tasks left are cancelled and given
    time to end, and the callbacks still queued run (a closed transport's connection_lost
    among them). Otherwise a socket closed in the node's last moments is left to the
    garbage collector, whose ResourceWarning is an error in whichever test comes next."""
    left = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for task in left:
        task.cancel()
    if left:
        loop.run_until_complete(asyncio.wait(left, timeout=10))
    for _ in range(3):
        loop.run_until_complete(asyncio.sleep(0))
    loop.run_until_complete(loop.shutdown_asyncgens())


class RunningNode:
    def __init__(self, config: Config, *, clock: ManualClock | None = None, fsync: bool = True):
        config = without_system_dns(config)
        self.config = config
        self.clock = clock
        self.node = Node(config, clock=clock, fsync=fsync)
        self.loop = asyncio.new_event_loop()
        self._task: asyncio.Task | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._error: BaseException | None = None

    @property
    def host(self) -> str:
        return self.config.smtp.listen[0][0]

    @property
    def port(self) -> int:
        return self.config.smtp.listen[0][1]

    @property
    def data_dir(self) -> Path:
        return Path(self.config.server.data_dir)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self._task = self.loop.create_task(self.node.run())
        try:
            self.loop.run_until_complete(self._task)
        except BaseException as e:  # noqa: BLE001 - reported by start()/stop()
            self._error = e
        finally:
            try:
                _finish(self.loop)
            finally:
                self.loop.close()

    def start(self) -> RunningNode:
        self._thread.start()
        wait_for(lambda: self.node.started.is_set() or self._error is not None or not self._thread.is_alive(),
                 15, "node start")
        if self._error is not None or not self.node.started.is_set():
            error, self._error = self._error, None  # reported here, not again by stop()
            raise RuntimeError(f"node did not start: {error!r}") from error
        return self

    def call(self, fn: Callable, *args):
        """Run fn(*args) in the node's loop thread and return its result."""
        result: list = []
        done = threading.Event()

        def wrapper():
            try:
                result.append(fn(*args))
            finally:
                done.set()

        self.loop.call_soon_threadsafe(wrapper)
        done.wait(10)
        return result[0] if result else None

    def advance(self, seconds: float) -> None:
        assert self.clock is not None
        self.call(self.clock.advance, seconds)

    def wait_idle(self, timeout: float = 15.0) -> None:
        """Until the queue manager holds nothing in memory and has nothing due now (a
        message recovered at start or just made due by advance() counts as work not yet
        taken up), then records are flushed. With delivery suspended nothing is ever
        taken up: only the first condition is waited for."""
        q = self.node.queue
        assert q is not None

        def nothing_due() -> bool:
            if q.config.queue.suspend_delivery:
                return True
            now = q.clock.now()
            return not any(d.at <= now and q._scheduled.get(d.queue_id) == d.at for d in list(q._heap))

        wait_for(lambda: q.idle.is_set() and q._ready.empty() and nothing_due(), timeout, "queue idle")
        self.flush()

    def flush(self) -> None:
        assert self.node.records is not None
        self.node.records.flush()

    def stop(self) -> None:
        if self._task is not None and not self.loop.is_closed():
            try:
                self.loop.call_soon_threadsafe(self._task.cancel)
            except RuntimeError:
                pass
        self._thread.join(90)  # the node's own bounded waits at stop (agents, listeners, records) are shorter
        if self._thread.is_alive():  # a lost stop: said here, not by the next start's wait for the lock
            try:
                left = sorted(repr(t.get_coro()) for t in asyncio.all_tasks(self.loop))
            except RuntimeError:  # the set changed meanwhile: the node's thread runs on
                left = ["?"]
            raise AssertionError(f"the node did not stop within 90 s of its cancellation; tasks left: {left}")
        error, self._error = self._error, None
        if error is not None and not isinstance(error, asyncio.CancelledError):
            # its shutdown failed (an error start() did not already report)
            raise AssertionError(f"the node's stop failed: {error!r}") from error

    def __enter__(self) -> RunningNode:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class KanmonProcess:
    """`kanmon serve -c FILE --quiet` in a subprocess."""

    def __init__(self, config_file: Path, host: str, port: int, *, new_session: bool = False):
        """new_session: the server and its receiver processes in a process group of their
        own, so kill_group() can kill them all at once (as a crash of the host would)."""
        self.config_file = config_file
        self.new_session = new_session
        self.host, self.port = host, port
        self.proc: subprocess.Popen | None = None
        # stderr goes to a file beside the config, appended across restarts: a pipe
        # nobody reads would block the server once 64 KiB of warnings filled it.
        self.stderr_path = Path(config_file).parent / "kanmon-serve.stderr"

    def start(self) -> KanmonProcess:
        with open(self.stderr_path, "ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "kanmon", "serve", "-c", str(self.config_file), "--quiet"],
                stdout=subprocess.DEVNULL, stderr=err, start_new_session=self.new_session,
            )
        try:
            wait_port(self.host, self.port, 20)
        except AssertionError:
            self.kill()
            raise
        return self

    def stderr_tail(self, limit: int = 4000) -> str:
        try:
            return self.stderr_path.read_bytes()[-limit:].decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        if self.proc:
            self.proc.wait(10)

    def kill_group(self) -> None:
        """SIGKILL to the whole process group (new_session=True): main and receivers together."""
        assert self.new_session and self.proc is not None
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)

    def terminate(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(20)


def maildir_messages(data_dir: Path, address: str) -> list[bytes]:
    local, _, domain = address.partition("@")
    base = Path(data_dir) / "mailboxes" / domain / local
    out = []
    for sub in ("new", "cur"):
        d = base / sub
        if d.is_dir():
            out.extend(p.read_bytes() for p in sorted(d.iterdir()))
    return out


class BannerHammer:
    """Connection attempts one after another to host:port, each reading the banner, in a
    thread: `with BannerHammer(host, port) as h: h.started.wait(30); <reload>` then
    h.results (one "ok" per 220 banner, else what went wrong), at least `at_least`."""

    def __init__(self, host: str, port: int, at_least: int = 200, start_after: int = 20):
        self.host, self.port = host, port
        self.at_least, self.start_after = at_least, start_after
        self.results: list[str] = []
        self.started = threading.Event()  # set after start_after attempts
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._done.is_set() or len(self.results) < self.at_least:
            try:
                with socket.create_connection((self.host, self.port), timeout=10) as c:
                    banner = c.makefile("rb").readline()
                    self.results.append("ok" if banner.startswith(b"220") else f"banner {banner!r}")
            except OSError as e:
                self.results.append(f"{type(e).__name__}: {e}")
            if len(self.results) == self.start_after:
                self.started.set()

    def __enter__(self) -> BannerHammer:
        self._thread.start()
        return self

    def finish(self) -> list[str]:
        """Stop after at_least attempts; the attempts that did not get a banner."""
        self._done.set()
        self._thread.join(120)
        return [r for r in self.results if r != "ok"]

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join(120)
