"""When the quarantine digest last ran, kept across restarts.

Role: a small file, <data_dir>/quarantine-digest.json (mode 0600), holds the time of the
last scheduled digest that ran ({"version": 1, "last": <Unix seconds>}). The digest
lists what arrived since the one before it (docs/content.md); kept only in memory, that
time was lost at each restart, and the next digest listed the day before the restart
again, entries already mailed among them.

Trusts: nothing in the file: it is decoded strictly; a file it refuses is moved aside
(quarantine-digest.json.bad), the caller logs that and the digest starts afresh (the day
before). Never: write the file other than whole (a temporary file, fsynced, renamed).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from kanmon.spool.groupcommit import fsync_dir, write_durably

FILE = "quarantine-digest.json"
VERSION = 1


def decode(raw: bytes) -> float:
    """The last digest's time from the file's bytes; ValueError for anything else."""
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"not JSON: {e}") from None
    if not isinstance(data, dict) or set(data) != {"version", "last"} or data["version"] != VERSION:
        raise ValueError(f"not a version {VERSION} digest time")
    last = data["last"]
    if isinstance(last, bool) or not isinstance(last, (int, float)) or not math.isfinite(last) or last < 0:
        raise ValueError("last must be a time")
    return float(last)


def load(data_dir: Path) -> tuple[float | None, str]:
    """(the last digest's time or None, why a file was refused or could not be read, or "")."""
    path = Path(data_dir) / FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None, ""
    except OSError as e:
        return None, f"unreadable: {e}"
    try:
        return decode(raw), ""
    except ValueError as e:
        try:
            os.replace(path, path.with_name(FILE + ".bad"))
        except OSError as moved:
            return None, f"{e}; not moved aside: {moved}"
        return None, str(e)


def save(data_dir: Path, last: float, *, fsync: bool = True) -> None:
    path = Path(data_dir) / FILE
    tmp = path.with_name(FILE + ".tmp")
    write_durably(tmp, json.dumps({"version": VERSION, "last": last}).encode() + b"\n", sync=fsync)
    os.replace(tmp, path)
    if fsync:
        fsync_dir(path.parent)
