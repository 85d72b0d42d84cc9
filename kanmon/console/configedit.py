"""The console's configuration editor: check a submitted text as `kanmon config check`
does, diff it against the running config, write the file whole, and keep the applied
versions privately under <data_dir>/console/config-history/.

Role: pure helpers for kanmon.console.app, which applies a text by writing the file and
asking the node for the reload `kanmon reload` asks for (one code path). Trusts: the
submitted text only after parse_config and preflight accept it (a text with an error is
never written); version names only when they match VERSION_RE (no path from a request
reaches the file system). Never: write the config file other than whole (a temporary
file in its directory, fsynced, renamed, with the old file's mode); keep history copies
readable by anyone but the service user (they may hold secrets); keep more than KEEP.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import re
import stat
import time
from pathlib import Path

from kanmon.admin.preflight import exit_code, preflight
from kanmon.config import ConfigError, parse_config

HISTORY_DIR = "console/config-history"
KEEP = 50
MAX_TEXT = 1024 * 1024
VERSION_RE = re.compile(r"^[0-9]{8}-[0-9]{6}-[0-9]{6}-[a-z0-9._-]{1,64}\.toml$")


def digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def check_text(text: str, ours: set[tuple[str, int]], source: str = "<console>") -> dict:
    """`kanmon config check` of a text: {"usable", "exit_code", "findings": [{severity,
    key, text}]}; a text that does not parse is one error finding per message."""
    if len(text.encode("utf-8")) > MAX_TEXT:
        return {"usable": False, "exit_code": 2,
                "findings": [{"severity": "error", "key": "(file)", "text": f"larger than {MAX_TEXT} bytes"}]}
    try:
        config = parse_config(text, source)
        if config.balancer is not None:
            from kanmon.balancer.service import validate_balancer  # noqa: PLC0415 - only with a balancer

            validate_balancer(config)
    except ConfigError as e:
        return {"usable": False, "exit_code": 2,
                "findings": [{"severity": "error", "key": "(config)", "text": m} for m in e.messages]}
    import tomllib  # noqa: PLC0415

    findings = preflight(config, tomllib.loads(text), ours)
    code = exit_code(findings)
    return {"usable": code < 2, "exit_code": code, "findings": [f.as_dict() for f in findings]}


def diff(running: str, new: str, running_name: str = "running", new_name: str = "edited") -> str:
    return "".join(difflib.unified_diff(running.splitlines(keepends=True), new.splitlines(keepends=True),
                                        running_name, new_name, n=3))


def write_whole(path: Path, text: str) -> None:
    """Replace the file by a complete new one with the same mode (0640 if it is new)."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        mode = 0o640
    tmp = path.with_name(f".{path.name}.console-{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def history_dir(data_dir: Path) -> Path:
    d = Path(data_dir) / HISTORY_DIR
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    return d


def save_version(data_dir: Path, text: str, who: str, now: float | None = None) -> str:
    """Keep a copy of an applied text (0600); the oldest beyond KEEP go."""
    now = time.time() if now is None else now
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now)) + f"-{int(now * 1e6) % 1_000_000:06d}"
    name = f"{stamp}-{re.sub(r'[^a-z0-9._-]', '_', who.lower())[:64] or '_'}.toml"
    d = history_dir(data_dir)
    fd = os.open(d / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    for old in sorted(p for p in d.iterdir() if VERSION_RE.match(p.name))[:-KEEP]:
        old.unlink(missing_ok=True)
    return name


def history(data_dir: Path) -> list[dict]:
    """The kept versions, newest first: {"name", "applied", "by", "size"}."""
    d = Path(data_dir) / HISTORY_DIR
    if not d.is_dir():
        return []
    out = []
    for p in sorted((p for p in d.iterdir() if VERSION_RE.match(p.name)), reverse=True):
        date, clock, _micro, by = p.name[:-5].split("-", 3)
        applied = time.mktime(time.strptime(date + clock, "%Y%m%d%H%M%S"))
        out.append({"name": p.name, "applied": applied, "by": by, "size": p.stat().st_size})
    return out


def read_version(data_dir: Path, name: str) -> str:
    """A kept version's text; LookupError for a name that is not one."""
    if not VERSION_RE.match(name):
        raise LookupError(f"no such version {name!r}")
    try:
        return (Path(data_dir) / HISTORY_DIR / name).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LookupError(f"no such version {name!r}") from None
