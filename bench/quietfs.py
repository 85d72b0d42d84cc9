"""Deleting a bench's files slows the next bench's file creates on ext4 without a journal.

ext4 with no journal (this machine class's root file system: `/proc/fs/jbd2/` is empty)
will not hand out an inode freed in the last 60 seconds, or the last 360 seconds while
its inode-table block is still dirty (fs/ext4/ialloc.c, recently_deleted()): each create
scans past every such inode of its block group. A run that starts right after another
run's data directory (tens of thousands of files) was deleted pays that scan on every
file it creates. Measured on 2026-12-04 with `bench/accept_local.py --messages 10000`
(each run creates a Maildir file per message): 410-523 msg/s accepted in runs that
followed a deletion by under a minute, 769 msg/s in one that followed none for four
minutes; `perf record -a` put 12 % of the machine in `recently_deleted`,
`find_get_block_common`, `ext4_get_group_desc` and `find_inode_bit` in the former and
none in the latter.

So a bench that creates many files deletes them with `remove_tree` (which notes when),
and waits with `wait_quiet` before it measures, when the file system is such an ext4 and
a deletion is recent. A mail server's own deletions are its own cost and stay in its
figures (Postfix unlinks a queue file per message; kanmon writes its queue files over).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

STAMP = Path("/var/tmp/kanmon-bench-deleted")
QUIET_S = 370  # RECENTCY_MIN + RECENTCY_DIRTY, and a margin


def _mount_of(path: Path) -> tuple[str, str] | None:
    """(file system type, device name) of the mount holding path."""
    best: tuple[int, str, str] | None = None
    target = os.path.realpath(path)
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        mnt = left.split()[4]
        fstype, source = right.split()[:2]
        if (target == mnt or target.startswith(mnt.rstrip("/") + "/")) and (best is None or len(mnt) > best[0]):
            best = (len(mnt), fstype, source)
    return None if best is None else (best[1], os.path.basename(best[2]))


def journal_less_ext4(path: Path) -> bool:
    m = _mount_of(path)
    if m is None or m[0] != "ext4":
        return False
    try:
        journals = os.listdir("/proc/fs/jbd2")
    except FileNotFoundError:
        journals = []
    return not any(j.rpartition("-")[0] == m[1] for j in journals)


def remove_tree(path: Path) -> None:
    """Delete a bench's directory and note the time, for the next run's wait_quiet."""
    shutil.rmtree(path, ignore_errors=True)
    try:
        STAMP.write_text(f"{time.time():.0f}\n")
    except OSError:
        pass


def wait_quiet(path: Path, wait: bool = True) -> None:
    """Before measuring on path's file system: if it is a journal-less ext4 and a bench
    deleted its files less than QUIET_S seconds ago, wait out the rest (or say that the
    figures will be low, with wait=False)."""
    try:
        since = max(0.0, time.time() - float(STAMP.read_text()))  # a stamp from the future counts as now
    except (OSError, ValueError):
        return
    if since >= QUIET_S or not journal_less_ext4(path):
        return
    left = QUIET_S - since
    if not wait:
        print(f"note: a bench deleted its files {since:.0f} s ago on this journal-less ext4: file creates"
              " are slower for the next few minutes (bench/quietfs.py); figures will be low", flush=True)
        return
    print(f"waiting {left:.0f} s: a bench deleted its files {since:.0f} s ago on this journal-less ext4, and"
          " inodes freed that recently slow every file create (bench/quietfs.py; --no-wait skips)", flush=True)
    time.sleep(left)
