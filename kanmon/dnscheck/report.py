"""Rendering DNS health check reports: one line per finding for people, JSON for machines.

Role: text only. A Report in, strings out; the CLI prints them, the monitor puts the
short summary in its event and alert.
Trusts: the Report (built by checks.py).
Never: look anything up or decide severities (checks.py does).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import click

from kanmon.dnscheck.checks import Finding, Report, Severity

MARKS = {Severity.OK: "ok   ", Severity.WARNING: "WARN ", Severity.ERROR: "ERROR"}
_COLOURS = {Severity.OK: "green", Severity.WARNING: "yellow", Severity.ERROR: "red"}


def finding_line(f: Finding, colour: bool = False) -> str:
    mark = click.style(MARKS[f.severity], fg=_COLOURS[f.severity], bold=True) if colour else MARKS[f.severity]
    text = f"{mark} {f.check:<8} {f.subject}: {f.seen}"
    if f.consequence:
        text += f" -- {f.consequence}"
    return text


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def summary_line(report: Report) -> str:
    return (
        f"{report.domain}: {_plural(report.count(Severity.ERROR), 'error')}, "
        f"{_plural(report.count(Severity.WARNING), 'warning')}, {report.count(Severity.OK)} ok "
        f"(exit {report.exit_code})"
    )


def render_text(reports: Sequence[Report], colour: bool = False) -> str:
    lines = []
    for report in reports:
        lines.append(f"DNS check of {report.domain} using {report.source}")
        lines.extend(finding_line(f, colour) for f in report.findings)
        lines.extend(f"note: {n}" for n in report.notes)
        lines.append(summary_line(report))
    return "\n".join(lines) + "\n"


def report_dict(report: Report) -> dict[str, object]:
    return {
        "domain": report.domain,
        "source": report.source,
        "worst": report.worst.label,
        "exit_code": report.exit_code,
        "counts": {s.label: report.count(s) for s in Severity},
        "findings": [f.as_dict() for f in report.findings],
        "notes": list(report.notes),
    }


def render_json(reports: Sequence[Report]) -> str:
    if len(reports) == 1:
        return json.dumps(report_dict(reports[0]), indent=2) + "\n"
    return json.dumps([report_dict(r) for r in reports], indent=2) + "\n"


def problem_summary(report: Report) -> str:
    """One paragraph naming the worst findings, for the event log and alert mail."""
    worst = [f for f in report.findings if f.severity is report.worst and f.severity is not Severity.OK]
    head = summary_line(report)
    if not worst:
        return head
    return head + "\n" + "\n".join(finding_line(f) for f in worst)
