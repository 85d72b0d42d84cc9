"""When the quarantine digest last ran, kept across restarts.

Role: a small file, <data_dir>/quarantine-digest.json (mode 0600), holds the time of the
last scheduled digest that ran ({"version": 1, "last": <Unix seconds>}). The digest
lists what arrived since the one before it (docs/content.md); kept only in memory, that
time was lost at each restart, and the next digest listed the day before the restart
again, entries already mailed among them.

Trusts: nothing in the file: it is decoded strictly; a file it refuses is moved aside
(quarantine-digest.json.bad), the caller logs that and the digest starts afresh (the day
before). Never: write the file other than whole (a temporary file, fsynced, renamed);
the read and write are kanmon.admin.maintenance's run log's.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from kanmon.admin.maintenance import read_or_set_aside
from kanmon.spool.groupcommit import replace_durably

FILE = "quarantine-digest.json"
VERSION = 1


def decode(raw: bytes) -> float:
    """The last digest's time from the file's bytes; ValueError for anything else."""
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"not JSON: {e}") from None
    if not isinstance(data, dict) or set(data) != {"version", "last"} or type(data["version"]) is not int \
            or data["version"] != VERSION:
        raise ValueError(f"not a version {VERSION} digest time")
    last = data["last"]
    if isinstance(last, bool) or not isinstance(last, (int, float)):
        raise ValueError("last must be a time")
    try:
        last = float(last)
    except OverflowError:
        raise ValueError("last must be a time") from None
    if not math.isfinite(last) or last < 0:
        raise ValueError("last must be a time")
    return last


def load(data_dir: Path) -> tuple[float | None, str]:
    """(the last digest's time or None, why a file was refused and moved aside, or "").
    An error reading it is raised (OSError)."""
    return read_or_set_aside(Path(data_dir) / FILE, decode, limit=4096)


def save(data_dir: Path, last: float, *, fsync: bool = True) -> None:
    replace_durably(Path(data_dir) / FILE, json.dumps({"version": VERSION, "last": last}).encode() + b"\n", sync=fsync)
