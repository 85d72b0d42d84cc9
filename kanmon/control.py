"""The control socket and the data_dir lock: how admin commands reach a running server.

Role: `kanmon serve` listens on <data_dir>/control.sock (a Unix socket, mode 0600, in a
data_dir that must belong to us and be writable by nobody else); the CLI connects, sends
one request per line and reads one reply per line:

    -> {"op": "act", "args": {"action": "hold", "filters": {...}, "source": "..."}}\\n
    <- {"ok": true, "result": {...}}\\n          or  {"ok": false, "error": "..."}\\n

A request with "progress": true may get progress lines before its reply, at most one
each PROGRESS_EVERY seconds: {"progress": [done, total or null]}\\n.

The server also holds an exclusive flock(2) on <data_dir>/kanmon.lock for its whole
life, taken before spool recovery. An admin command that finds no server answering
takes the same lock before it touches the spool, so two offline admins, or an offline
admin and a server that is starting, never work on the spool at once (docs/queue.md).

Trusts: only connections from our own user id and root (SO_PEERCRED; root may do all
this and more anyway, and here the server does the work, so what it writes stays the
server's user's), and even those only as
far as kanmon.admin.queue_ops validates their arguments. A request line is bounded
(MAX_REQUEST); an idle connection is closed after IDLE_TIMEOUT.
Never: listen on a network address, accept a request from another user (it is told
why, nothing more), or run two
admin operations at once (they are serialised by the caller's lock).
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import socket
import stat
import struct
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

SOCKET_NAME = "control.sock"
LOCK_NAME = "kanmon.lock"
MAX_REQUEST = 32 << 20  # 32 MiB: filters, or the ids a confirmed filter matched (100,000 are ~2 MB)
IDLE_TIMEOUT = 600.0
CONNECT_TIMEOUT = 5.0
PROGRESS_EVERY = 0.2


class NoServer(Exception):
    """Nothing answers on the control socket: no `kanmon serve` for this data_dir."""


class LockBusy(OSError):
    """Another kanmon process holds <data_dir>/kanmon.lock."""


def check_data_dir(data_dir: Path) -> None:
    """The socket and lock live here: it must be ours and not writable by anyone else."""
    st = os.stat(data_dir)
    if st.st_uid != os.geteuid():
        raise PermissionError(f"{data_dir} belongs to uid {st.st_uid}, not to us ({os.geteuid()})")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise PermissionError(f"{data_dir} is writable by group or others (chmod go-w {data_dir})")


class DataDirLock:
    """flock(2) on <data_dir>/kanmon.lock; the holder's pid is written in it for messages."""

    def __init__(self, data_dir: Path):
        self.path = Path(data_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self, wait: float = 0.0, poll: float = 0.1, on_wait: Callable[[str], None] | None = None) -> None:
        """Take the lock, waiting up to `wait` seconds for its holder; LockBusy after.
        on_wait(what): called once, as soon as a wait begins, with what holds the lock
        (`<path> is held by another kanmon process (pid N)`), so the caller can say it
        waits rather than stay silent."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            self._take(fd, wait, poll, on_wait)
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def _take(self, fd: int, wait: float, poll: float, on_wait: Callable[[str], None] | None) -> None:
        """flock fd exclusively, waiting up to `wait` seconds (on_wait said once); LockBusy
        naming the holder's pid after. (Never a probe that takes the lock and lets it go:
        at that moment another process's acquire(wait=0) would be refused.)"""
        deadline = time.monotonic() + wait
        waiting = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
                what = f"{self.path} is held by another kanmon process (pid {holder})"
                if time.monotonic() >= deadline:
                    raise LockBusy(what) from None
                if not waiting and on_wait is not None:
                    on_wait(what)
                waiting = True
                time.sleep(poll)

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.ftruncate(fd, 0)
            finally:
                os.close(fd)  # closing drops the flock

    @property
    def held(self) -> bool:
        return self._fd is not None


def _peer_uid(sock: socket.socket) -> int | None:
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except (AttributeError, OSError):
        return None
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid


class ControlServer:
    """The server side; handler(request dict) -> reply dict, awaited one at a time.

    For a request that asks for progress the handler is called as handler(request,
    progress=fn), fn(done, total) being callable from any thread.
    """

    def __init__(self, data_dir: Path, handler: Callable[[dict], Awaitable[dict]]):
        self.data_dir = Path(data_dir)
        self.path = self.data_dir / SOCKET_NAME
        self.handler = handler
        self._server: asyncio.AbstractServer | None = None
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        check_data_dir(self.data_dir)
        # Bind in a private directory, restrict, then rename into place: the socket is
        # never reachable with looser permissions. Long paths go through /proc/self/fd.
        tmpdir = Path(tempfile.mkdtemp(prefix=".control-", dir=self.data_dir))
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                with _short(tmpdir / "s") as short:
                    sock.bind(short)
                os.chmod(tmpdir / "s", 0o600)
                os.replace(tmpdir / "s", self.path)  # we hold the lock: an old socket is stale
                sock.listen(16)
                sock.setblocking(False)
                self._server = await asyncio.start_unix_server(self._serve, sock=sock, limit=MAX_REQUEST)
            except BaseException:
                sock.close()
                raise
        finally:
            for p in tmpdir.iterdir():
                p.unlink(missing_ok=True)
            tmpdir.rmdir()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        self.path.unlink(missing_ok=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            sock = writer.get_extra_info("socket")
            peer = _peer_uid(sock) if sock is not None else None
            refused = peer not in (None, os.geteuid(), 0)
            while True:
                try:
                    async with asyncio.timeout(IDLE_TIMEOUT):
                        line = await reader.readline()
                except (asyncio.LimitOverrunError, ValueError):
                    await self._reply(writer, {"ok": False, "error": "request too long"})
                    return
                if not line:
                    return
                if refused:  # said, not just closed: the admin learns whom to run the command as
                    await self._reply(writer, {"ok": False, "error": f"{REFUSED_USER}: uid {peer}; the control "
                                               f"socket takes requests from uid {os.geteuid()} (the server's "
                                               "user) and root"})
                    return
                try:
                    request = json.loads(line)
                    if not isinstance(request, dict):
                        raise ValueError
                except ValueError:
                    await self._reply(writer, {"ok": False, "error": "a request is one JSON object per line"})
                    return
                async with self._lock:
                    if request.get("progress") is True:
                        reply = await self.handler(request, progress=_progress_writer(writer))
                    else:
                        reply = await self.handler(request)
                await self._reply(writer, reply)
        except (TimeoutError, ConnectionError, OSError):
            pass
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, OSError):
                pass

    @staticmethod
    async def _reply(writer: asyncio.StreamWriter, reply: dict) -> None:
        result = reply.get("result")
        streamed = [k for k, v in result.items() if type(v) is Streamed] if type(result) is dict else []
        if not streamed:
            writer.write(json.dumps(reply, ensure_ascii=False, separators=(",", ":")).encode() + b"\n")
            await writer.drain()
            return
        # The same line, its long list written a batch at a time as it is built (an
        # unpaged `queue list` of a million: never all its rows, nor all their JSON, at once).
        key = streamed[0]
        items: Streamed = result[key]
        mark = f"\0stream-{os.urandom(8).hex()}"
        head, tail = json.dumps({**reply, "result": {**result, key: mark}}, ensure_ascii=False,
                                separators=(",", ":")).split(json.dumps(mark), 1)
        writer.write(head.encode() + b"[")
        first, rows = True, 0
        try:
            for batch in items.batches():
                if batch:
                    text = json.dumps(batch, ensure_ascii=False, separators=(",", ":"))[1:-1]
                    writer.write((text if first else "," + text).encode())
                    first = False
                    rows += len(batch)
                    await writer.drain()
        except (ConnectionError, OSError):
            raise
        except Exception as e:  # noqa: BLE001 - a row that cannot be built: the line is cut, then said
            # The line already written cannot be taken back: it ends here, unfinished, and
            # the next line is the error (ControlClient.request returns it as the reply).
            writer.write(b"\n" + json.dumps({"ok": False, "error": f"the reply was cut after {rows} rows: "
                                              f"{type(e).__name__}: {e}", CUT: True}).encode() + b"\n")
            await writer.drain()
            return
        writer.write(b"]" + tail.encode() + b"\n")
        await writer.drain()


CUT = "cut"  # in the error line that follows a streamed reply cut short


class Streamed:
    """A list in a reply that the control socket writes in pieces as it builds them:
    make(source) for each of sources, BATCH at a time (ControlServer._reply). Other
    callers of the handler never get one (they ask without stream=True)."""

    BATCH = 1000

    def __init__(self, sources: list, make: Callable[[Any], Any]):
        self.sources = sources
        self.make = make

    def __len__(self) -> int:
        return len(self.sources)

    def batches(self) -> Iterator[list]:
        make, sources = self.make, self.sources
        for i in range(0, len(sources), self.BATCH):
            yield [make(x) for x in sources[i : i + self.BATCH]]


def _progress_writer(writer: asyncio.StreamWriter) -> Callable[[int, int | None], None]:
    """fn(done, total): a progress line to the client, throttled; safe from worker threads."""
    loop = asyncio.get_running_loop()
    last = [0.0]

    def progress(done: int, total: int | None) -> None:
        now = time.monotonic()
        if now - last[0] < PROGRESS_EVERY:
            return
        last[0] = now
        line = json.dumps({"progress": [done, total]}).encode() + b"\n"
        loop.call_soon_threadsafe(writer.write, line)

    return progress


class _short:
    """A path usable by bind/connect (sun_path is 108 bytes): via /proc/self/fd if long."""

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None

    def __enter__(self) -> str:
        text = str(self.path)
        if len(text.encode()) < 100:
            return text
        self._fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
        return f"/proc/self/fd/{self._fd}/{self.path.name}"

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)


REFUSED_USER = "permission denied for this user"


class ControlClient:
    """The CLI side: connect() raises NoServer when no server listens."""

    def __init__(self, data_dir: Path, timeout: float | None = 3600.0):
        self.path = Path(data_dir) / SOCKET_NAME
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._file = None

    def connect(self) -> ControlClient:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(CONNECT_TIMEOUT)
        try:
            with _short(self.path) as short:
                sock.connect(short)
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError) as e:
            sock.close()
            raise NoServer(str(e)) from None
        except OSError:
            sock.close()
            raise
        sock.settimeout(self.timeout)
        self._sock = sock
        self._file = sock.makefile("rb")
        return self

    def request(self, op: str, args: dict | None = None,
                progress: Callable[[int, int | None], None] | None = None) -> dict:
        """The reply to one request; progress(done, total) is called for each progress
        line the server sends first (asked for only when progress is given)."""
        assert self._sock is not None and self._file is not None
        request: dict = {"op": op, "args": args or {}}
        if progress is not None:
            request["progress"] = True
        self._sock.sendall(json.dumps(request).encode() + b"\n")
        while True:
            line = self._file.readline()
            if not line:
                raise ConnectionError("the server closed the control connection")
            try:
                reply = json.loads(line)
            except ValueError:
                reply = self._after_cut(line)
            if isinstance(reply, dict) and "progress" in reply and "ok" not in reply:
                if progress is not None:
                    done, total = reply["progress"]
                    progress(int(done), None if total is None else int(total))
                continue
            return reply

    def _after_cut(self, line: bytes) -> dict:
        """A reply line that is not JSON: the server cut it (a row it could not build) and
        said why on the next line, which is the reply; anything else is a broken answer."""
        assert self._file is not None
        why = self._file.readline() if line.endswith(b"\n") else b""
        try:
            reply = json.loads(why)
        except ValueError:
            reply = None
        if isinstance(reply, dict) and reply.get(CUT) is True and reply.get("ok") is False:
            return reply
        raise ConnectionError("the server's reply was not one JSON line")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._sock is not None:
            self._sock.close()
        self._sock = self._file = None

    def __enter__(self) -> ControlClient:
        return self.connect()

    def __exit__(self, *exc) -> None:
        self.close()
