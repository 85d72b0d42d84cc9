"""The balancer's status file: written by the running service, read by `kanmon balance status`;
and its modes file: the real-server modes an administrator set at run time.

Role: one JSON document at <data_dir>/balancer-status.json describing every virtual
server and real server (state, checks, connections, bytes). The service rewrites it
atomically (temporary file + rename) every second and on every state change; readers
therefore see either the old or the new document, never a torn one.

Trusts: on reading, nothing: the file may be missing, stale (the service died), or not
ours; read_status says which, it never raises on content.

<data_dir>/balancer-modes.json keeps what `kanmon balance set` (or the console) chose,
so a reload or a restart does not send new connections to a server drained for
maintenance. It is written atomically and fsynced (it is a decision, not a view).

Never: hold the files open, fsync the status file (it is a view, not data to keep), or
write anywhere but data_dir.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STATUS_FILE = "balancer-status.json"
MODES_FILE = "balancer-modes.json"
MAX_MODES_BYTES = 1_000_000
FORMAT_VERSION = 1
# The service writes every second; older than this, the writer is presumed gone.
STALE_AFTER = 5.0
MAX_STATUS_BYTES = 4_000_000  # a reader never loads more than this


def status_path(data_dir: Path) -> Path:
    return Path(data_dir) / STATUS_FILE


def write_status(path: Path, document: dict[str, Any]) -> None:
    """Atomically replace path with document (JSON)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    data = json.dumps(document, indent=1, sort_keys=True).encode()
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def write_admin_modes(data_dir: Path, modes: dict[str, dict[str, dict[str, Any]]]) -> None:
    """Keep {virtual server: {real server address: {"mode", "since"}}} (empty entries dropped)."""
    path = Path(data_dir) / MODES_FILE
    kept = {name: servers for name, servers in modes.items() if servers}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    data = json.dumps({"format": FORMAT_VERSION, "modes": kept}, indent=1, sort_keys=True).encode()
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_admin_modes(data_dir: Path) -> tuple[dict[str, dict[str, dict[str, Any]]], str | None]:
    """(modes, problem): what write_admin_modes kept; ({}, None) when there is nothing;
    ({}, why) when the file is not usable (it is then ignored, never fatal)."""
    path = Path(data_dir) / MODES_FILE
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_MODES_BYTES + 1)
    except FileNotFoundError:
        return {}, None
    except OSError as e:
        return {}, f"cannot read {path}: {e.strerror}"
    try:
        doc = json.loads(raw) if len(raw) <= MAX_MODES_BYTES else None
    except ValueError:
        doc = None
    modes = doc.get("modes") if isinstance(doc, dict) and doc.get("format") == FORMAT_VERSION else None
    if not isinstance(modes, dict) or not all(
        isinstance(servers, dict) and all(isinstance(e, dict) for e in servers.values()) for servers in modes.values()
    ):
        return {}, f"{path} is not a balancer modes file of this kanmon version"
    return modes, None


@dataclass(frozen=True, slots=True)
class StatusRead:
    """What a reader found: document is None when there is nothing usable."""

    document: dict[str, Any] | None
    problem: str | None  # why the document is missing, stale or from a stopped service
    age: float | None = None


def read_status(path: Path, now: float | None = None) -> StatusRead:
    now = time.time() if now is None else now
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_STATUS_BYTES + 1)
    except FileNotFoundError:
        return StatusRead(None, f"the balancer is not running (no status file {path})")
    except OSError as e:
        return StatusRead(None, f"cannot read {path}: {e.strerror}")
    if len(raw) > MAX_STATUS_BYTES:
        return StatusRead(None, f"{path} is larger than {MAX_STATUS_BYTES} bytes; not a balancer status file")
    try:
        doc = json.loads(raw)
    except ValueError:
        return StatusRead(None, f"{path} is not valid JSON")
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_VERSION or not isinstance(doc.get("virtual_servers"), list):
        return StatusRead(None, f"{path} is not a balancer status file of this kanmon version")
    updated = doc.get("updated_at")
    age = now - updated if isinstance(updated, (int, float)) else None
    if not doc.get("running"):
        return StatusRead(doc, f"the balancer is not running (it stopped at {_stamp(updated)})", age)
    if age is None or age > STALE_AFTER:
        return StatusRead(
            doc,
            f"the status is stale: last written {_stamp(updated)} ({age or 0:.0f}s ago) by pid {doc.get('pid')};"
            " the balancer is probably not running",
            age,
        )
    return StatusRead(doc, None, age)


def _stamp(t: Any) -> str:
    if not isinstance(t, (int, float)):
        return "an unknown time"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))
