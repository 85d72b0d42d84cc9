"""Where the plain event lines go besides the database: the own log file (reopened on
request, rotated by size or age) and the local syslog socket.

Role: the records writer thread hands each batch of formatted lines here. The syslog
sender speaks the local BSD syslog protocol (RFC 3164 framing as /dev/log expects it:
``<PRI>Mmm dd hh:mm:ss tag[pid]: message``, one datagram a line); journald listens on
/dev/log too, so the same lines reach the journal.

Trusts: lines that are already escaped (events escape what came from the network).
Never: raise into the writer (a full or missing syslog socket drops lines for syslog
only, with one note on stderr; the file still gets them), block on a stuck syslog
daemon (non-blocking sends), or create a log file readable by others (0600).
"""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

FACILITIES = {"mail": 2, "daemon": 3, **{f"local{n}": 16 + n for n in range(8)}}
SEVERITIES = {"critical": 2, "error": 3, "warning": 4, "notice": 5, "info": 6}
MAX_DATAGRAM = 8192  # what syslog daemons take from the local socket; longer lines are cut
MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


_last_stamp: tuple[int, str] = (-1, "")  # (second, its stamp): most lines share their second


def syslog_stamp(ts: float) -> str:
    """RFC 3164 4.1.2 TIMESTAMP, local time: "Dec  1 00:11:00" (English month whatever the
    locale, the day padded with a space), as syslog daemons and Postfix's log lines show it."""
    global _last_stamp
    second = int(ts)
    last = _last_stamp  # one read: another thread may replace it meanwhile
    if last[0] == second:
        return last[1]
    t = time.localtime(second)
    stamp = f"{MONTHS[t.tm_mon - 1]} {t.tm_mday:2d} {t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}"
    _last_stamp = (second, stamp)
    return stamp


class SyslogSender:
    """Datagrams to a local syslog socket; reconnects after an error."""

    def __init__(self, path: str = "/dev/log", facility: str = "mail"):
        self.path = path
        self.facility = FACILITIES[facility]
        self._sock: socket.socket | None = None
        self._warned = False

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.setblocking(False)
        try:
            sock.connect(self.path)
        except OSError:
            sock.close()
            raise
        return sock

    def send(self, ts: float, tag: str, severity: str, message: str) -> bool:
        """One line; False when it could not be sent."""
        pri = self.facility * 8 + SEVERITIES.get(severity, 6)
        stamp = syslog_stamp(ts)
        data = f"<{pri}>{stamp} {tag}[{os.getpid()}]: {message}".encode("utf-8", "replace")[:MAX_DATAGRAM]
        for attempt in (1, 2):
            try:
                if self._sock is None:
                    self._sock = self._connect()
                self._sock.send(data)
                return True
            except BlockingIOError:
                return False  # the syslog daemon is behind: drop rather than stall the writer
            except OSError as e:
                if self._sock is not None:
                    self._sock.close()
                    self._sock = None
                if attempt == 2:
                    if not self._warned:
                        print(f"kanmon: syslog socket {self.path}: {e}; lines go to the other destinations only",
                              file=sys.stderr, flush=True)
                        self._warned = True
                    return False
        return False

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class LogFile:
    """The own log file, appended to; `reopen()` after an outside rotation (SIGUSR1),
    `rotate_if_due()` for the built-in rotation by size and age. Several processes
    (the node and its SMTP receivers) append to one file; only the node rotates
    (`rotate_size`/`rotate_age` None elsewhere), and every writer follows a rotation
    by itself: before a write, a path that names another file than the one open is
    reopened (one stat per batch of lines)."""

    def __init__(self, path: Path, *, rotate_size: int | None = None, rotate_age: float | None = None,
                 keep: int = 7, clock: Callable[[], float] = time.time):
        self.path = Path(path)
        self.rotate_size = rotate_size
        self.rotate_age = rotate_age
        self.keep = keep
        self.clock = clock
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._fh = self._open()

    def _open(self):
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        # The age for rotate_age counts from when this process opened the file (a
        # restart starts the count again: no portable birth time to read).
        self._opened = self.clock()
        return os.fdopen(fd, "a", encoding="utf-8")

    def write(self, text: str) -> None:
        try:
            moved = os.stat(self.path).st_ino != os.fstat(self._fh.fileno()).st_ino
        except FileNotFoundError:
            moved = True
        if moved:
            self.reopen()
        self._fh.write(text)
        self._fh.flush()
        self.rotate_if_due()

    def reopen(self) -> None:
        old, self._fh = self._fh, self._open()
        old.close()

    def rotate_if_due(self) -> bool:
        """Rotate when the file (with what other processes appended) is due; the node's
        writer also calls this when it has nothing to write itself."""
        if self.rotate_size is None and self.rotate_age is None:
            return False
        self._fh.flush()
        size = os.fstat(self._fh.fileno()).st_size
        size_due = self.rotate_size is not None and size >= self.rotate_size
        age_due = (self.rotate_age is not None and size > 0
                   and self.clock() - self._opened >= self.rotate_age)
        if not (size_due or age_due):
            return False
        self.rotate()
        return True

    def rotate(self) -> None:
        """kanmon.log -> kanmon.log.1 -> ... -> kanmon.log.<keep> (the oldest dropped)."""
        self._fh.flush()
        base = str(self.path)
        try:
            os.unlink(f"{base}.{self.keep}")
        except FileNotFoundError:
            pass
        for n in range(self.keep - 1, 0, -1):
            try:
                os.replace(f"{base}.{n}", f"{base}.{n + 1}")
            except FileNotFoundError:
                pass
        os.replace(base, f"{base}.1")
        self.reopen()

    def close(self) -> None:
        self._fh.close()
