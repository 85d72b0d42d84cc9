"""Local delivery into Maildir mailboxes.

Role: the `local` delivery agent. Writes each message into
<data_dir>/mailboxes/<domain>/<local-part>/{tmp,new,cur} the standard Maildir way
(write in tmp/, fsync, rename into new/, fsync new/), so Dovecot can serve it with
`mail_location = maildir:<data_dir>/mailboxes/%d/%n`. Adds Return-Path: and
Delivered-To:, and stores LF line endings as Maildir readers expect.

Trusts: recipients were validated by the accept checks and routing (local part is a
configured mailbox: no "/" or ".." can reach a path). Never: report Sent before the
file and its directory entry are durable; write outside the mailbox directory.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from kanmon.model import RecipientResult, Reply, Status

_counter = itertools.count(1)
DELIVERED = Reply(250, "2.0.0", "delivered to maildir")


def mailbox_path(data_dir: Path, address: str) -> Path:
    local, _, domain = address.rpartition("@")
    if not local or "/" in local or local.startswith(".") or "/" in domain or domain.startswith("."):
        raise ValueError(f"unsafe mailbox address {address!r}")
    return Path(data_dir) / "mailboxes" / domain.lower() / local.lower()


def ensure_maildir(path: Path) -> None:
    for sub in ("tmp", "new", "cur"):
        (path / sub).mkdir(parents=True, exist_ok=True, mode=0o700)


def unique_name(size: int) -> str:
    """Maildir unique name: <secs>.M<usec>P<pid>Q<n>.<host>,S=<size> (Dovecot style)."""
    now = time.time()
    host = socket.gethostname().replace("/", "\\057").replace(":", "\\072")
    return f"{int(now)}.M{int((now % 1) * 1e6)}P{os.getpid()}Q{next(_counter)}.{host},S={size}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_maildir(mailbox: Path, data: bytes, fsync: bool = True) -> Path:
    ensure_maildir(mailbox)
    name = unique_name(len(data))
    tmp = mailbox / "tmp" / name
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if fsync:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    final = mailbox / "new" / name
    os.rename(tmp, final)
    if fsync:
        _fsync_dir(mailbox / "new")
    return final


class LocalDelivery:
    """Deliver one message to local mailboxes; one RecipientResult per recipient."""

    mailer = "local"

    def __init__(self, data_dir: Path, *, fsync: bool = True, threads: int = 4):
        self.data_dir = Path(data_dir)
        self.fsync = fsync
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="local")

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    async def deliver(self, mail_from: str, rcpts: list[str], content: bytes) -> list[RecipientResult]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self.deliver_blocking, mail_from, rcpts, content)

    def deliver_blocking(self, mail_from: str, rcpts: list[str], content: bytes) -> list[RecipientResult]:
        body = content.replace(b"\r\n", b"\n")
        results = []
        for rcpt in rcpts:
            head = f"Return-Path: <{mail_from}>\nDelivered-To: {rcpt}\n".encode("utf-8", "replace")
            try:
                write_maildir(mailbox_path(self.data_dir, rcpt), head + body, self.fsync)
            except (OSError, ValueError) as e:
                reply = Reply(451, "4.3.0", f"cannot write to mailbox: {getattr(e, 'strerror', None) or e}")
                results.append(RecipientResult(rcpt, Status.DEFERRED, reply, relay="local", mailer="local"))
                continue
            results.append(RecipientResult(rcpt, Status.SENT, DELIVERED, relay="local", mailer="local"))
        return results
