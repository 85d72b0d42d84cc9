"""The maildrop and its pickup: how the local `sendmail` command queues mail (docs/sendmail.md).

Role: Postfix's postdrop/pickup model. `kanmon sendmail` (any local user in the
commands' group) writes one file per message into <data_dir>/maildrop/, atomically
(a dot-file, fsynced, renamed into place), and returns as soon as the file is durable:
a message is never lost because the server is down. The running server's Pickup
scans that directory (a cheap poll, or at once when woken through the control socket),
decodes each file strictly and hands it to THE injector (origin "sendmail"), then
removes the file. A file that does not decode is moved to maildrop/corrupt/ with an
event; the server keeps going.

File format (one decoder, this module):

    KANMON-PICKUP1\\n
    {"from": "..." | null, "rcpts": ["..."], "fullname": "...", "uid": N}\\n
    <the message, LF or CRLF line ends>

Trusts: nothing in a maildrop file (any local user in the group can write one): the
header is bounded, its fields typed and addresses parsed as SMTP paths; the content is
bounded by [smtp] max_message_size. The file's owner (st_uid) is who sent it, whatever
the file says. Never: remove a file before the injector made its message durable
(a crash in between may deliver twice, never zero times), follow a symlink, or read
anything but regular files directly in maildrop/.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import secrets
import stat
import time
from dataclasses import dataclass
from email.utils import formatdate
from pathlib import Path

from kanmon.model import ClientInfo, Envelope, SmtpError, missing_origin_fields
from kanmon.records import events as ev
from kanmon.smtp.address import parse_path

MAILDROP = "maildrop"
CORRUPT = "corrupt"
MAGIC = b"KANMON-PICKUP1\n"
MAX_HEADER = 1 << 20  # the JSON line: a million bytes holds thousands of recipients
MAX_RCPTS = 10_000
POLL_EVERY = 1.0  # seconds between scans when nobody wakes the pickup
# 1730: the owner reads and removes; the group may create files but not list them
# (a user cannot see or take another user's mail); sticky: only a file's owner renames it.
MAILDROP_MODE = 0o1730


class PickupError(ValueError):
    """A maildrop file that cannot be used (damaged, truncated, or not ours)."""


@dataclass(frozen=True, slots=True)
class PickupFile:
    mail_from: str | None  # None: the file owner's login name at our hostname
    rcpts: list[str]
    fullname: str
    content: bytes


def check_address(address: str, *, is_sender: bool) -> str:
    """An address as SMTP would accept it ("" allowed as sender), or a bare login name
    (kept bare: the pickup adds the server's hostname); PickupError if neither."""
    try:
        if address and "@" not in address:
            parse_path(f"<{address}@localhost>", is_sender=is_sender, smtputf8_allowed=True)
            return address
        return parse_path(f"<{address}>", is_sender=is_sender, smtputf8_allowed=True).address
    except SmtpError:
        raise PickupError(f"bad address {address!r}") from None


def encode_pickup(mail_from: str | None, rcpts: list[str], fullname: str, content: bytes) -> bytes:
    head = {"from": mail_from, "rcpts": list(rcpts), "fullname": fullname, "uid": os.getuid()}
    return MAGIC + json.dumps(head, ensure_ascii=False).encode() + b"\n" + content


def decode_pickup(data: bytes, max_size: int) -> PickupFile:
    """The one decoder of maildrop files; PickupError names what is wrong."""
    if not data.startswith(MAGIC):
        raise PickupError("not a kanmon maildrop file (no KANMON-PICKUP1 line)")
    end = data.find(b"\n", len(MAGIC), len(MAGIC) + MAX_HEADER + 1)
    if end < 0:
        raise PickupError("header line missing or too long")
    try:
        head = json.loads(data[len(MAGIC):end])
    except ValueError:
        raise PickupError("header is not JSON") from None
    if not isinstance(head, dict) or set(head) - {"from", "rcpts", "fullname", "uid"}:
        raise PickupError("header is not a pickup header")
    mail_from, rcpts, fullname = head.get("from"), head.get("rcpts"), head.get("fullname", "")
    if mail_from is not None and not isinstance(mail_from, str):
        raise PickupError("from is not a string")
    if not isinstance(rcpts, list) or not rcpts or len(rcpts) > MAX_RCPTS or not all(isinstance(r, str) for r in rcpts):
        raise PickupError("rcpts is not a list of 1 to 10000 addresses")
    if not isinstance(fullname, str) or len(fullname) > 200 or any(ord(c) < 32 for c in fullname):
        raise PickupError("fullname is not a short printable string")
    content = data[end + 1:]
    if len(content) > max_size:
        raise PickupError(f"message of {len(content)} bytes is larger than max_message_size")
    if mail_from is not None:
        mail_from = check_address(mail_from, is_sender=True)
    rcpts = [check_address(r, is_sender=False) for r in rcpts]
    return PickupFile(mail_from, list(dict.fromkeys(rcpts)), fullname, content)


def write_maildrop(data_dir: Path, data: bytes) -> Path:
    """Client side: the file durable in <data_dir>/maildrop/ under its final name.

    Raises OSError when it cannot be (the caller's EX_TEMPFAIL)."""
    drop = Path(data_dir) / MAILDROP
    if not drop.is_dir():
        drop.mkdir(mode=0o700, parents=False, exist_ok=True)  # only the server's user gets here
    name = f"{int(time.time())}.{os.getpid()}.{secrets.token_hex(6)}"
    tmp = drop / f".{name}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        owner = os.stat(drop)
        if owner.st_uid != os.geteuid():
            # Another user than the server's (root's cron jobs, a member of the server's
            # group): the server reads the file through the directory's group. The file
            # stays ours (its owner is who sent it); others cannot list the directory.
            os.fchown(fd, -1, owner.st_gid)
            os.fchmod(fd, 0o640)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    final = drop / name
    os.rename(tmp, final)
    dfd = os.open(drop, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return final


def to_crlf(content: bytes) -> bytes:
    """Local input may have LF line ends: CRLF only, as the spool keeps received mail."""
    return content.replace(b"\r\n", b"\n").replace(b"\r", b"").replace(b"\n", b"\r\n")


def _header_names(content: bytes) -> set[str]:
    end = content.find(b"\r\n\r\n")
    head = content[: end if end >= 0 else len(content)]
    names = set()
    for line in head.split(b"\r\n"):
        if line[:1] not in (b" ", b"\t") and b":" in line:
            names.add(line.split(b":", 1)[0].strip().lower().decode("latin-1"))
    return names


def _login(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid{uid}"


class Pickup:
    """In the node's TaskGroup: run() until cancelled; wake() from the control socket."""

    def __init__(self, data_dir: Path, injector, records, hostname: str, max_size: int):
        self.drop = Path(data_dir) / MAILDROP
        self.injector = injector
        self.records = records
        self.hostname = hostname
        self.max_size = max_size
        self._wake = asyncio.Event()

    def prepare(self) -> None:
        """The maildrop directory, owned by us, mode 1730 (group: create only)."""
        self.drop.mkdir(mode=0o700, exist_ok=True)
        os.chmod(self.drop, MAILDROP_MODE)
        (self.drop / CORRUPT).mkdir(mode=0o700, exist_ok=True)

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        self.prepare()
        while True:
            self._wake.clear()
            await self.scan()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(POLL_EVERY):
                    await self._wake.wait()

    def _names(self) -> list[str]:
        try:
            return sorted(n for n in os.listdir(self.drop) if not n.startswith(".") and n != CORRUPT)
        except FileNotFoundError:
            return []

    async def scan(self) -> int:
        """Inject every complete file now in maildrop; how many were queued."""
        queued = 0
        for name in self._names():
            try:
                if await self.pick(name):
                    queued += 1
            except OSError as e:  # the spool refused: the file stays for the next scan
                self.records.record(ev.Error(f"pickup: {name}: cannot queue: {e}"))
                break
        return queued

    def _read(self, path: Path) -> tuple[bytes, os.stat_result]:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise PickupError("not a regular file")
            if st.st_size > self.max_size + MAX_HEADER + 4096:
                raise PickupError(f"file of {st.st_size} bytes is larger than max_message_size")
            with os.fdopen(os.dup(fd), "rb") as fh:
                return fh.read(), st
        finally:
            os.close(fd)

    async def pick(self, name: str) -> bool:
        path = self.drop / name
        try:
            data, st = await asyncio.to_thread(self._read, path)
            msg = decode_pickup(data, self.max_size)
        except FileNotFoundError:
            return False
        except (PickupError, OSError) as e:
            self._set_aside(name, str(e))
            return False
        login = _login(st.st_uid)
        sender = msg.mail_from if msg.mail_from is not None else login
        if sender and "@" not in sender:
            sender = f"{sender}@{self.hostname}"
        rcpts = [r if "@" in r else f"{r}@{self.hostname}" for r in msg.rcpts]
        now = time.time()
        content = to_crlf(msg.content)
        names = _header_names(content)
        added = [f"Received: by {self.hostname} (kanmon, from userid {st.st_uid});\r\n\t{formatdate(now)}\r\n"]
        if "from" not in names:
            who = f'"{msg.fullname}" <{sender}>' if msg.fullname else f"<{sender}>"
            added.append(f"From: {who}\r\n")
        # Date: and Message-ID: when missing, as for authenticated submission (one definition).
        content = "".join(added).encode("utf-8") + missing_origin_fields(content, now, self.hostname) + content
        env = Envelope(sender, rcpts, client=ClientInfo(ip="127.0.0.1", name="localhost", helo=self.hostname,
                                                        proto="sendmail"),
                       crlf_checked=True, smtputf8=any(ord(c) > 127 for c in sender + "".join(rcpts)))
        await self.injector.inject(env, content, "sendmail")
        os.unlink(path)  # after the message is durable in the spool
        return True

    def _set_aside(self, name: str, why: str) -> None:
        try:
            os.replace(self.drop / name, self.drop / CORRUPT / name)
        except FileNotFoundError:
            return
        except OSError as e:
            why = f"{why}; cannot move it aside: {e}"
        self.records.record(ev.Critical(f"pickup: maildrop file {name} refused and moved to maildrop/corrupt/: {why}"))
