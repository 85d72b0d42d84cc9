"""The systemd notification protocol (sd_notify), spoken directly: one datagram of
``KEY=value`` lines to the unix socket named by $NOTIFY_SOCKET.

Role: tell the service manager that the node is ready (READY=1), reloading
(RELOADING=1 with MONOTONIC_USEC), stopping (STOPPING=1), alive (WATCHDOG=1), and a
one-line STATUS=. Without $NOTIFY_SOCKET every call is a no-op, so the node runs the
same under systemd, another supervisor or a terminal.

Trusts: the environment systemd set. Never: raise (a notification that cannot be sent
is dropped: the service manager's timeouts are the fallback), or block.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping


def notify(*lines: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send `lines` (e.g. "READY=1", "STATUS=serving") as one datagram; False when
    there is no socket to send to or the send failed."""
    env = os.environ if environ is None else environ
    address = env.get("NOTIFY_SOCKET", "")
    if not address or not lines:
        return False
    if address[0] == "@":  # an abstract socket (Linux)
        address = "\0" + address[1:]
    elif address[0] != "/":
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.setblocking(False)
            sock.sendto("\n".join(lines).encode("utf-8", "replace"), address)
        return True
    except OSError:
        return False


def ready(status: str = "") -> bool:
    return notify("READY=1", *([f"STATUS={status}"] if status else []))


def reloading() -> bool:
    # systemd >= 253 wants MONOTONIC_USEC with RELOADING=1 (Type=notify-reload); older
    # versions ignore it.
    return notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")


def stopping() -> bool:
    return notify("STOPPING=1")


def watchdog() -> bool:
    return notify("WATCHDOG=1")


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between two WATCHDOG=1 pings (half of WatchdogSec=), or None when the
    service manager asked for none (or asked another process: WATCHDOG_PID)."""
    env = os.environ if environ is None else environ
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    pid = env.get("WATCHDOG_PID")
    if usec <= 0 or (pid and pid != str(os.getpid())):
        return None
    return usec / 2_000_000


def is_journal_stream(fd: int, environ: Mapping[str, str] | None = None) -> bool:
    """Whether `fd` is the stream systemd connected to the journal: $JOURNAL_STREAM holds
    its device and inode ("dev:ino"), compared with fstat as systemd.exec(5) says."""
    env = os.environ if environ is None else environ
    dev, _, ino = env.get("JOURNAL_STREAM", "").partition(":")
    try:
        st = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (OSError, ValueError):
        return False
