"""Rendering DNS health check reports: one line per finding for people, JSON for machines.

Role: text only. A Report in, strings out; the CLI prints them, the monitor puts the
short summary in its event and alert.
Trusts: the Report (built by checks.py), but not the DNS text inside it: names, TXT
strings and replies come from other people's servers and zone files, so every string
that reaches the terminal goes through terminal_safe() (control characters, escape
sequences, bidi overrides shown as \\xNN / \\uNNNN). Text is printed with click, never
through a markup renderer, so `[bold]` in a TXT record is shown as written.
Never: look anything up or decide severities (checks.py does).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import click

from kanmon.dnscheck.checks import Finding, Report, Severity
from kanmon.dnscheck.sources import Answer, Status

MARKS = {Severity.OK: "ok   ", Severity.WARNING: "WARN ", Severity.ERROR: "ERROR"}
_COLOURS = {Severity.OK: "green", Severity.WARNING: "yellow", Severity.ERROR: "red"}


def terminal_safe(text: str) -> str:
    """text with every non-printable character (C0/C1 controls, ESC, DEL, bidi and other
    format characters, line separators) written as a visible escape."""
    if text.isprintable():
        return text
    return "".join(
        ch if ch.isprintable() else (f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}")
        for ch in text
    )


def finding_line(f: Finding, colour: bool = False) -> str:
    mark = click.style(MARKS[f.severity], fg=_COLOURS[f.severity], bold=True) if colour else MARKS[f.severity]
    text = f"{mark} {f.check:<8} {terminal_safe(f.subject)}: {terminal_safe(f.seen)}"
    if f.consequence:
        text += f" -- {terminal_safe(f.consequence)}"
    return text


def _negative(ans: Answer) -> str:
    if ans.status is Status.NXDOMAIN:
        return "NXDOMAIN (no such name)"
    if ans.status is Status.NODATA:
        return "no record of this type (NODATA)"
    if ans.status is Status.DELEGATED:
        return f"delegated to {', '.join(ans.delegated_to)}: not checked ({ans.error})"
    if ans.status is Status.OUTSIDE:
        return f"not checked ({ans.error})"
    return f"lookup failed: {ans.error}"


def record_rows(ans: Answer) -> list[tuple[str, str, str]]:
    """One (owner, type, data) row per record an answer showed; a comment row for a
    negative answer. Owners are absolute (trailing dot), as in a zone listing."""
    owner = (ans.canonical or ans.name) + "."
    rows = []
    if ans.via_cname:
        rows.append((ans.name + ".", "CNAME", owner))
    if ans.records:
        via = f"  ; from {ans.server}" if ans.server else ""
        rows.extend((owner, ans.rdtype, rd.to_text() + via) for rd in ans.records)
    else:
        rows.append((owner, ans.rdtype, "; " + _negative(ans)))
    return rows


def record_lines(answers: Sequence[Answer]) -> list[str]:
    """`--show`: every record looked at, like a zone listing (nslookup's ls -d)."""
    rows = [r for ans in answers for r in record_rows(ans)]
    if not rows:
        return []
    width = min(max(len(terminal_safe(o)) for o, _, _ in rows), 40)
    lines = [f"records looked at ({len(answers)} questions):"]
    for owner, rdtype, data in rows:
        lines.append(f"  {terminal_safe(owner):<{width}} IN {rdtype:<6} {terminal_safe(data)}")
    return lines


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
        lines.append(f"DNS check of {report.domain} using {terminal_safe(report.source)}")
        lines.extend(finding_line(f, colour) for f in report.findings)
        lines.extend(f"note: {terminal_safe(n)}" for n in report.notes)
        lines.extend(record_lines(report.looked_at))
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
        **({"records": [_answer_dict(a) for a in report.looked_at]} if report.looked_at else {}),
    }


def _answer_dict(ans: Answer) -> dict[str, object]:
    return {
        "name": ans.name, "type": ans.rdtype, "status": ans.status.value, "canonical": ans.canonical or ans.name,
        "records": [rd.to_text() for rd in ans.records], "server": ans.server, "error": ans.error,
        "delegated_to": list(ans.delegated_to),
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
