"""The archive (journaling): a copy of every accepted message, for forensics and audits.

Role: [archive] maildir = DIR keeps each message accepted for the configured direction
and domains as one file in a Maildir (DIR/new, readable with any mail tool), the
envelope written into a first header field (X-Kanmon-Archive: id, direction, sender,
every recipient, including bcc recipients no header shows). [archive] to = ADDRESS
sends the copy to a mailbox instead (an added recipient, chosen at the end of DATA).
The quota bounds the directory: past it, copies stop (an event once, and the `archive`
alert from the threshold check) until space is made.

Trusts: the envelope (our own data) and nothing in the message (written as received).
Never: delay or fail the acceptance of a message (a copy that cannot be written is an
event); keep a file readable by others (0600 in a 0700 directory).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

from kanmon.model import Envelope

RECOUNT_INTERVAL = 60.0  # seconds between recounts of a full archive


def directory_size(path: Path) -> int:
    """Bytes in the files under path (the quota check; blocking)."""
    total = 0
    for sub in ("new", "cur"):
        try:
            with os.scandir(path / sub) as it:
                for e in it:
                    if e.is_file(follow_symlinks=False):
                        total += e.stat(follow_symlinks=False).st_size
        except FileNotFoundError:
            continue
    return total


def archive_header(queue_id: str, env: Envelope, direction: str) -> bytes:
    rcpts = ", ".join(f"<{r}>" for r in env.rcpts)
    text = f"X-Kanmon-Archive: id={queue_id}; direction={direction}; from=<{env.mail_from}>; to={rcpts}\r\n"
    return text.replace("\n", "").replace("\r", "").encode("utf-8", "replace") + b"\r\n"


class ArchiveStore:
    """One per listener process; keep() is blocking (the listener calls it in a thread)."""

    def __init__(self, path: Path, quota: int | None):
        self.path = Path(path)
        self.quota = quota
        for sub in ("tmp", "new", "cur"):
            (self.path / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.path, 0o700)
        self._lock = threading.Lock()
        self.used = directory_size(self.path)
        self._counted_at = time.monotonic()
        self.full_reported = False
        self._seq = 0
        self._host = socket.gethostname().replace("/", "_").replace(":", "_") or "kanmon"

    def keep(self, queue_id: str, env: Envelope, content: bytes, direction: str) -> str:
        """Write the copy; "" when written, else why not (over quota, a write error)."""
        data = archive_header(queue_id, env, direction) + content
        with self._lock:
            if self.quota is not None and self.used + len(data) > self.quota:
                # Over quota as counted: count again (at most once a minute), since the
                # administrator may have made room meanwhile.
                now = time.monotonic()
                if now - self._counted_at < RECOUNT_INTERVAL:
                    return "over quota"
                self._counted_at = now
                self.used = directory_size(self.path)
                if self.used + len(data) > self.quota:
                    return "over quota"
            self._seq += 1
            name = f"{time.time():.6f}.{queue_id}.{os.getpid()}_{self._seq}.{self._host}"
        tmp, final = self.path / "tmp" / name, self.path / "new" / name
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fdatasync(fd)  # a journal copy survives a crash like the message itself
            finally:
                os.close(fd)
            os.rename(tmp, final)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            return f"cannot write {final}: {e.strerror or e}"
        with self._lock:
            self.used += len(data)
        return ""
