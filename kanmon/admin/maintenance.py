"""The [[maintenance]] jobs' last runs, kept across restarts, and the catch-up rule.

Role: a small file, <data_dir>/maintenance.json (mode 0600), holds for each job its last
run (when, how long, what it matched and acted on, the error if it failed, who started
it) and since when the server has been keeping its schedule. kanmon.admin.queue_ops
writes a run after each one (scheduled or `kanmon maintenance run`); `kanmon maintenance
list`, the console's status line (status_line()) and the catch-up at start read it.

The catch-up (`catch_up = true`, like anacron): at start, a job whose schedule had a
time between its last run (or, if it never ran, the time the server began keeping its
schedule) and now runs once; several missed times still mean one run.

Trusts: nothing in the file: it is decoded strictly; a file it refuses is moved aside
(maintenance.json.bad) and the caller logs that; the server always starts. Never: write
the file other than whole (a temporary file, fsynced, renamed), or keep runs of a job
no longer configured beyond the next write.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

from kanmon.cron import CronSchedule
from kanmon.spool.groupcommit import replace_durably
from kanmon.units import format_duration

FILE = "maintenance.json"
VERSION = 1
T = TypeVar("T")


class RunLogError(ValueError):
    """The file is not a run log this module wrote."""


@dataclass(frozen=True, slots=True)
class JobRun:
    """One run of a job."""

    started: float  # the node's clock, Unix seconds
    duration: float  # seconds
    action: str
    matched: int
    acted: int
    error: str = ""  # empty: it succeeded
    by: str = ""  # "schedule", "catch-up" or the command

    @property
    def failed(self) -> bool:
        return bool(self.error)


_FIELDS = {"started": float, "duration": float, "action": str, "matched": int, "acted": int, "error": str, "by": str}


def _run_from(d: object) -> JobRun:
    if not isinstance(d, dict) or set(d) != set(_FIELDS):
        raise RunLogError("a run has exactly the fields " + ", ".join(_FIELDS))
    values = {}
    for key, kind in _FIELDS.items():
        v = d[key]
        if isinstance(v, bool) or not isinstance(v, (int, float) if kind is float else kind):
            raise RunLogError(f"run: {key} must be {kind.__name__}")
        if kind is not str and v < 0:
            raise RunLogError(f"run: {key} cannot be negative")
        values[key] = float(v) if kind is float else v
    return JobRun(**values)


def decode(raw: bytes) -> tuple[dict[str, JobRun], dict[str, float]]:
    """(last run by job, schedule kept since by job) from the file's bytes; RunLogError
    for anything else."""
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise RunLogError(f"not JSON: {e}") from None
    if not isinstance(data, dict) or set(data) != {"version", "jobs"} or data["version"] != VERSION:
        raise RunLogError(f"not a version {VERSION} maintenance run log")
    jobs = data["jobs"]
    if not isinstance(jobs, dict):
        raise RunLogError("jobs must be an object")
    runs: dict[str, JobRun] = {}
    since: dict[str, float] = {}
    for name, entry in jobs.items():
        if not isinstance(entry, dict) or set(entry) != {"last", "since"}:
            raise RunLogError(f"job {name!r}: needs last and since")
        s = entry["since"]
        if isinstance(s, bool) or not isinstance(s, (int, float)) or s < 0:
            raise RunLogError(f"job {name!r}: since must be a time")
        since[name] = float(s)
        if entry["last"] is not None:
            runs[name] = _run_from(entry["last"])
    return runs, since


def encode(runs: dict[str, JobRun], since: dict[str, float]) -> bytes:
    jobs = {}
    for name in sorted(set(runs) | set(since)):
        run = runs.get(name)
        jobs[name] = {"last": asdict(run) if run else None, "since": since.get(name, run.started if run else 0.0)}
    return json.dumps({"version": VERSION, "jobs": jobs}, indent=1, sort_keys=True).encode() + b"\n"


class RunLog:
    """The file, loaded once; each change written whole. Used from one thread at a time
    (the admin worker thread of a running node, or an offline command under the lock)."""

    def __init__(self, data_dir: Path, *, fsync: bool = True):
        self.path = Path(data_dir) / FILE
        self.fsync = fsync
        self.runs: dict[str, JobRun] = {}
        self.since: dict[str, float] = {}
        self.refused = ""  # why a file was moved aside at load ("" if none)
        self._load()

    def _load(self) -> None:
        loaded, self.refused = read_or_set_aside(self.path, decode)
        if loaded is not None:
            self.runs, self.since = loaded

    def last(self, job: str) -> JobRun | None:
        return self.runs.get(job)

    def record(self, job: str, run: JobRun, jobs: list[str]) -> None:
        self.runs[job] = run
        self.since.setdefault(job, run.started)
        self._save(jobs)

    def keep_since(self, jobs: list[str], now: float) -> None:
        """The server keeps these jobs' schedules from now on (if it did not already)."""
        changed = False
        for name in jobs:
            if name not in self.since:
                self.since[name] = now
                changed = True
        if changed or set(self.since) - set(jobs):
            self._save(jobs)

    def _save(self, jobs: list[str]) -> None:
        keep = set(jobs)
        self.runs = {k: v for k, v in self.runs.items() if k in keep}
        self.since = {k: v for k, v in self.since.items() if k in keep}
        replace_durably(self.path, encode(self.runs, self.since), sync=self.fsync)


def read_or_set_aside(path: Path, decode: Callable[[bytes], T], *, limit: int = 1 << 20) -> tuple[T | None, str]:
    """(decode(the file's bytes), "") for a small state file of the data_dir; (None, "") when
    there is none. One that is bigger than limit or that decode refuses (ValueError; or
    RecursionError, OverflowError: JSON nested too deep, a number too big for a float)
    is moved aside to <name>.bad: (None, why). An error reading it is raised (OSError)."""
    try:
        with path.open("rb") as f:
            raw = f.read(limit + 1)
    except FileNotFoundError:
        return None, ""
    try:
        if len(raw) > limit:
            raise ValueError(f"bigger than {limit} octets")
        return decode(raw), ""
    except (ValueError, RecursionError, OverflowError) as e:
        os.replace(path, path.with_name(path.name + ".bad"))
        return None, str(e) or type(e).__name__


def missed(schedule: str, last_run: JobRun | None, since: float | None, now: float) -> float | None:
    """The first scheduled time a job missed before `now` (None if none): after its last
    run, or after the server began keeping its schedule if it never ran."""
    ref = last_run.started if last_run is not None else since
    if ref is None:
        return None
    t = CronSchedule.parse(schedule).next_after(ref)
    return t if t <= now else None


def _stamp(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))


def describe_run(run: JobRun | None) -> str:
    """The last run in a few words: `last run 2026-01-02 06:00 (scheduled), 2s: delete
    matched 1000, acted on 1000` or `... FAILED: No space left on device`."""
    if run is None:
        return "never run"
    head = f"last run {_stamp(run.started)}" + (f" ({run.by})" if run.by else "") + f", {format_duration(run.duration)}"
    if run.failed:
        return f"{head}: FAILED: {run.error}"
    return f"{head}: {run.action} matched {run.matched}, acted on {run.acted}"
