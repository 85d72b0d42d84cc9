"""The SMTP client the accept-path benchmarks share: sessions that pipeline MAIL, RCPT and
DATA and send one message after another, and a wait for the server's port."""

from __future__ import annotations

import asyncio
import re
import socket
import subprocess
import threading
import time


async def session(server: tuple[str, int], client: str, helo: bytes, mail_from: bytes, rcpt: bytes,
                  content: bytes, count: int) -> None:
    reader, writer = await asyncio.open_connection(*server, local_addr=(client, 0))

    async def reply() -> bytes:
        while True:
            line = await reader.readline()
            if not line:
                raise ConnectionError("closed")
            if line[3:4] != b"-":
                return line

    await reply()
    writer.write(b"EHLO " + helo + b"\r\n")
    await reply()
    data = content.replace(b"\r\n.", b"\r\n..") + b".\r\n"
    envelope = b"MAIL FROM:<" + mail_from + b">\r\nRCPT TO:<" + rcpt + b">\r\nDATA\r\n"
    for _ in range(count):
        writer.write(envelope)
        for expect in (b"250", b"250", b"354"):
            r = await reply()
            if not r.startswith(expect):
                raise RuntimeError(f"unexpected reply {r!r}")
        writer.write(data)
        r = await reply()
        if not r.startswith(b"250"):
            raise RuntimeError(f"message refused: {r!r}")
    writer.write(b"QUIT\r\n")
    await reply()
    writer.close()


async def drive(messages: int, sessions: int, **kw) -> float:
    """Seconds to send `messages` over `sessions` concurrent sessions (session()'s keywords)."""
    per = [messages // sessions + (1 if i < messages % sessions else 0) for i in range(sessions)]
    t0 = time.perf_counter()
    await asyncio.gather(*(session(count=n, **kw) for n in per if n))
    return time.perf_counter() - t0


def wait_port(host: str, port: int, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection((host, port), 0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"nothing listens on {host}:{port}")


class SmtpSink:
    """Postfix's smtp-sink on address, with its running message count (-c) read from stdout."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.count = 0
        self.sessions = 0  # sessions ended (its sess= counter)
        self.proc = subprocess.Popen(["smtp-sink", "-u", "nobody", "-c", f"{address[0]}:{address[1]}", "1000"],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        threading.Thread(target=self._read, daemon=True).start()
        wait_port(*address)

    def _read(self) -> None:
        buf = b""
        assert self.proc.stdout is not None
        while chunk := self.proc.stdout.read1(4096):
            buf = (buf + chunk)[-200:]
            found = re.findall(rb"mesg=(\d+)", buf)
            if found:
                self.count = int(found[-1])
            sess = re.findall(rb"sess=(\d+)", buf)
            if sess:
                self.sessions = int(sess[-1])

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
