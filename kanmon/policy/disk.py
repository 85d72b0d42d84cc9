"""Free disk: MAIL is refused with 452 4.3.1 while data_dir is short of space.

Role: a check whose probe (statvfs) the listener refreshes in a thread of its own about
once a second; the MAIL hook only reads the last answer, so it costs nothing on the
event loop.

Trusts: the free-space function it is given (statvfs of data_dir by default).
Never: call statvfs from a hook (that is I/O on the event loop); accept while the probe
failed (an unreadable file system counts as full).
"""

from __future__ import annotations

import os
from collections.abc import Callable

from kanmon.config import Config
from kanmon.policy.pipeline import ACCEPTED, Check, CheckResult, Context, refuse
from kanmon.smtp import replies


def free_disk_bytes(path: str) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


class FreeDiskCheck(Check):
    name = "free_disk"

    def __init__(self, config: Config, free_disk: Callable[[], int] | None = None):
        data_dir = str(config.server.data_dir)
        self._free_disk = free_disk or (lambda: free_disk_bytes(data_dir))
        self._min_free = config.smtp.min_free_disk
        self.low = False  # until the first refresh (the listener refreshes before it listens)

    def refresh(self) -> None:
        """Blocking: measure the free space (the listener runs this in its probe thread)."""
        try:
            self.low = self._free_disk() < self._min_free
        except OSError:
            self.low = True

    def mail(self, ctx: Context) -> CheckResult:
        if self.low:
            return refuse(replies.LOW_DISK)  # RFC 5321 4.5.3.1.10-ish: 452 4.3.1
        return ACCEPTED
