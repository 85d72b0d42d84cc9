"""TLS-RPT (RFC 8460) collection: outbound TLS sessions counted per policy domain, one
report JSON per UTC day under data_dir/tlsrpt/.

Role: the delivery agent tells `TlsReports.record(...)` about each new outbound session
to an MX host (success, or failure with its RFC 8460 4.3 result type); counts are kept
in memory and added to the day's report file by `flush()` (in a thread, read-add-write,
so a restart or a second process adds to the same file). The file is the aggregate
report format of RFC 8460 4.4; `kanmon stats --tls` reads it back with `read_reports`.
Sending it to the domain's `rua` is not done: the files are what an administrator (or
a cron job) would send.

Trusts: the delivery agent for the values; MX host names and reasons came from the
network and are kept as data (JSON-escaped), never formatted into a terminal here.
A report file is decoded strictly: one that does not parse is moved aside.

Never: write on the event loop (flush runs in a thread), grow without bound (at most
MAX_DOMAINS policy domains a day and MAX_DETAILS failure rows per domain), or let a
failure to write a report affect delivery.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

MAX_DOMAINS = 10_000
MAX_DETAILS = 100
MAX_REASON = 300

# RFC 8460 4.3: result types
RESULT_TYPES = (
    "starttls-not-supported", "certificate-host-mismatch", "certificate-expired", "certificate-not-trusted",
    "validation-failure", "tlsa-invalid", "dnssec-invalid", "dane-required",
    "sts-policy-fetch-error", "sts-policy-invalid", "sts-webpki-invalid",
)
POLICY_TYPES = ("tlsa", "sts", "no-policy-found")
_DAY_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def report_dir(data_dir: Path) -> Path:
    return Path(data_dir) / "tlsrpt"


@dataclass
class _Counts:
    policy_type: str
    policy_strings: list[str]
    mx_host: list[str]
    success: int = 0
    failure: int = 0
    details: dict[tuple[str, str, str, str], int] = field(default_factory=dict)  # (type, mx, ip, reason) -> n


class TlsReports:
    """Counters for the current reports; `flush()` adds them to the files."""

    def __init__(self, data_dir: Path | None, organization: str, *, now: Callable[[], float],
                 sending_ip: str | None = None):
        self.directory = report_dir(data_dir) if data_dir is not None else None
        self.organization = organization
        self.now = now
        self.sending_ip = sending_ip
        self._pending: dict[str, dict[str, _Counts]] = {}  # day -> domain -> counts

    def _counts(self, domain: str, policy_type: str, policy_strings: list[str], mx_host: list[str]) -> _Counts | None:
        day = datetime.datetime.fromtimestamp(self.now(), datetime.UTC).strftime("%Y-%m-%d")
        domains = self._pending.setdefault(day, {})
        c = domains.get(domain)
        if c is None:
            if len(domains) >= MAX_DOMAINS:
                return None
            c = domains[domain] = _Counts(policy_type, list(policy_strings), list(mx_host))
        elif policy_type != "no-policy-found" and c.policy_type == "no-policy-found":
            c.policy_type, c.policy_strings, c.mx_host = policy_type, list(policy_strings), list(mx_host)
        return c

    def success(self, domain: str, policy_type: str, policy_strings: list[str] = (), mx_host: list[str] = ()) -> None:  # type: ignore[assignment]
        c = self._counts(domain, policy_type, list(policy_strings), list(mx_host))
        if c is not None:
            c.success += 1

    def failure(self, domain: str, policy_type: str, result_type: str, *, mx: str = "", ip: str = "", reason: str = "",
                policy_strings: list[str] = (), mx_host: list[str] = (), session: bool = True) -> None:  # type: ignore[assignment]
        """One failed session (session=False: a failure without a session, e.g. a policy
        that could not be fetched: a detail row, counted once per occurrence)."""
        assert result_type in RESULT_TYPES, result_type
        c = self._counts(domain, policy_type, list(policy_strings), list(mx_host))
        if c is None:
            return
        c.failure += 1 if session else 0
        key = (result_type, mx, ip, reason[:MAX_REASON])
        if key in c.details or len(c.details) < MAX_DETAILS:
            c.details[key] = c.details.get(key, 0) + 1

    @property
    def dirty(self) -> bool:
        return bool(self._pending)

    async def flush(self) -> None:
        """Add what was counted to the day files (in a thread)."""
        if not self._pending or self.directory is None:
            self._pending.clear()
            return
        pending, self._pending = self._pending, {}
        await asyncio.to_thread(self._write, pending)

    def flush_blocking(self) -> None:
        if self._pending and self.directory is not None:
            pending, self._pending = self._pending, {}
            self._write(pending)

    def _write(self, pending: dict[str, dict[str, _Counts]]) -> None:
        assert self.directory is not None
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        for day, domains in pending.items():
            path = self.directory / f"{day}.json"
            report = read_report(path) or self._empty(day)
            by_domain = {p["policy"]["policy-domain"]: p for p in report["policies"]}
            for domain, c in domains.items():
                entry = by_domain.get(domain)
                if entry is None:
                    if len(by_domain) >= MAX_DOMAINS:
                        continue
                    entry = by_domain[domain] = {
                        "policy": {"policy-type": c.policy_type, "policy-string": c.policy_strings,
                                   "policy-domain": domain, "mx-host": c.mx_host},
                        "summary": {"total-successful-session-count": 0, "total-failure-session-count": 0},
                        "failure-details": [],
                    }
                    report["policies"].append(entry)
                elif c.policy_type != "no-policy-found":
                    entry["policy"].update({"policy-type": c.policy_type, "policy-string": c.policy_strings,
                                            "mx-host": c.mx_host})
                entry["summary"]["total-successful-session-count"] += c.success
                entry["summary"]["total-failure-session-count"] += c.failure
                rows = entry["failure-details"]
                for (result_type, mx, ip, reason), n in c.details.items():
                    for row in rows:
                        if (row["result-type"], row.get("receiving-mx-hostname", ""), row.get("receiving-ip", ""),
                                row.get("failure-reason-code", "")) == (result_type, mx, ip, reason):
                            row["failed-session-count"] += n
                            break
                    else:
                        if len(rows) >= MAX_DETAILS:
                            continue
                        row = {"result-type": result_type}
                        if self.sending_ip:
                            row["sending-mta-ip"] = self.sending_ip
                        if mx:
                            row["receiving-mx-hostname"] = mx
                        if ip:
                            row["receiving-ip"] = ip
                        row["failed-session-count"] = n
                        if reason:
                            row["failure-reason-code"] = reason
                        rows.append(row)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(report, f, indent=1, sort_keys=False)
            os.replace(tmp, path)

    def _empty(self, day: str) -> dict:
        # RFC 8460 4.4: the report covers one UTC day
        return {
            "organization-name": self.organization,
            "date-range": {"start-datetime": f"{day}T00:00:00Z", "end-datetime": f"{day}T23:59:59Z"},
            "contact-info": f"postmaster@{self.organization}",
            "report-id": f"{day}T00:00:00Z_{self.organization}",
            "policies": [],
        }


def read_report(path: Path) -> dict | None:
    """One day's report, checked; a file that is not a report is moved aside (None)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        _move_aside(path)
        return None
    if not _is_report(data):
        _move_aside(path)
        return None
    return data


def _move_aside(path: Path) -> None:
    try:
        path.replace(path.with_name(path.name + ".bad"))
    except OSError:
        pass


def _is_report(data: object) -> bool:
    if not isinstance(data, dict) or not isinstance(data.get("policies"), list):
        return False
    if not isinstance(data.get("date-range"), dict):
        return False
    for p in data["policies"]:
        try:
            if p["policy"]["policy-type"] not in POLICY_TYPES or not isinstance(p["policy"]["policy-domain"], str):
                return False
            summary = p["summary"]
            if not all(isinstance(summary[k], int) for k in ("total-successful-session-count", "total-failure-session-count")):
                return False
            for row in p["failure-details"]:
                if row["result-type"] not in RESULT_TYPES or not isinstance(row["failed-session-count"], int):
                    return False
        except (KeyError, TypeError):
            return False
    return True


def read_reports(data_dir: Path, since: float, now: float) -> list[dict]:
    """The day reports that overlap [since, now], oldest first."""
    directory = report_dir(data_dir)
    first = datetime.datetime.fromtimestamp(since, datetime.UTC).strftime("%Y-%m-%d")
    last = datetime.datetime.fromtimestamp(now, datetime.UTC).strftime("%Y-%m-%d")
    try:
        names = sorted(p.name for p in directory.iterdir())
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        day = name.removesuffix(".json")
        if not name.endswith(".json") or not _DAY_RE.match(day) or not first <= day <= last:
            continue
        report = read_report(directory / name)
        if report is not None:
            out.append(report)
    return out


__all__ = ["POLICY_TYPES", "RESULT_TYPES", "TlsReports", "read_report", "read_reports", "report_dir"]
