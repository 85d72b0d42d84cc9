"""Over-quota notices: the mailbox owner is told once that mail is being refused.

Role: when the accept checks refuse a recipient with 452 4.2.2 (mailbox over its
quota), the owner gets one notice in the mailbox (delivered regardless of the quota,
as Dovecot's quota warnings are), so they know to clean up; senders' servers retry
meanwhile. A marker file in the mailbox remembers that the notice went out; it is
removed when the mailbox is under its quota again, so the next overflow notifies anew.

The accept check (kanmon.policy.quota) returns the over/under facts as effects; the SMTP
listener carries them out by awaiting over() and under(), whose file I/O (the marker)
runs in the default executor, never on the event loop.

Trusts: addresses that are configured mailboxes (the accept checks resolved them).
Never: block the SMTP session (the notice is stored in a task); send more than one
notice per overflow. The notice enters the queue through the injector, so it has its
accept line and history row like any other message.
"""

from __future__ import annotations

import asyncio
import os
from email.utils import formatdate, make_msgid
from pathlib import Path

from kanmon.store.maildir import mailbox_path
from kanmon.model import Envelope
from kanmon.records.events import Error, QuotaNotice

MARKER = ".kanmon-quota-notified"


class QuotaNotices:
    def __init__(self, data_dir: Path, injector):
        """injector: this process's kanmon.queue.inject.Injector (the way into the queue)."""
        self.data_dir = Path(data_dir)
        self.injector = injector
        self.hostname = injector.hostname
        self.records = injector.records
        self._tasks: set[asyncio.Task] = set()
        self._marking: set[str] = set()  # addresses whose marker is being written right now

    def _marker(self, address: str) -> Path:
        local, _, domain = address.rpartition("@")
        return mailbox_path(self.data_dir, domain, local) / MARKER

    async def over(self, address: str, usage: int, quota: int) -> None:
        """A recipient was refused for being over quota: write the marker (in the
        executor) and, when it was not there yet, store the notice in a task."""
        if address in self._marking:
            return  # a concurrent refusal is already writing it
        self._marking.add(address)
        loop = asyncio.get_running_loop()
        try:
            first = await loop.run_in_executor(None, self._mark, address, usage, quota)
        finally:
            self._marking.discard(address)
        if not first:
            return
        task = loop.create_task(self._send(address, usage, quota))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _mark(self, address: str, usage: int, quota: int) -> bool:
        """Blocking: create the marker; True when this overflow was not notified yet."""
        marker = self._marker(address)
        if marker.exists():
            return False
        try:
            marker.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(f"{usage} {quota}\n")
        except OSError:
            return False
        return True

    async def under(self, address: str) -> None:
        """The mailbox is under its quota: the next overflow gets a new notice."""
        await asyncio.get_running_loop().run_in_executor(None, self._unmark, address)

    def _unmark(self, address: str) -> None:
        self._marker(address).unlink(missing_ok=True)

    async def _send(self, address: str, usage: int, quota: int) -> None:
        text = (
            f"From: Mail Delivery System <MAILER-DAEMON@{self.hostname}>\r\n"
            f"To: <{address}>\r\n"
            f"Subject: Your mailbox is full\r\n"
            f"Date: {formatdate(localtime=True)}\r\n"
            f"Message-ID: {make_msgid(domain=self.hostname)}\r\n"
            "Auto-Submitted: auto-generated\r\n"
            "MIME-Version: 1.0\r\n"
            "Content-Type: text/plain; charset=utf-8\r\n"
            "\r\n"
            f"Your mailbox {address} holds {usage:,} bytes; its quota is {quota:,} bytes.\r\n"
            "\r\n"
            "New mail for you is being refused for now (452 4.2.2 Mailbox full). The\r\n"
            "senders' servers keep trying for a few days, so nothing is lost yet: delete\r\n"
            "or move old messages (empty the Trash too) and it will arrive.\r\n"
        ).encode("utf-8")
        env = Envelope(mail_from="", rcpts=[address], is_notice=True)
        try:
            qid = await self.injector.inject(env, text, "quota notice")
        except Exception as e:  # noqa: BLE001 - a notice must never break the session
            self.records.record(Error(f"cannot queue the over-quota notice for <{address}>: {e}"))
            return
        self.records.record(QuotaNotice(address, usage, quota, qid))
