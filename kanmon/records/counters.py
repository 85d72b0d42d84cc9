"""Counters made from typed events as the records writer writes them.

Role: name the counter increments an event stands for — connections, messages received
(and over TLS, and bytes), rejected / delivered / deferred / bounced by reason class,
notices. Each event type says its own increments (`Event.counts()`, from its fields,
kanmon.records.events); every process's records writer adds them to the `counters`
table of records.sqlite in the same transaction as the lines, keyed by its pid, so the
metrics endpoint in the main process sees what SMTP listeners in other processes did
(docs/monitoring.md, "How metrics are counted").

Counter names are `name` or `name|label=value|label=value`.
Trusts: the events (made by kanmon itself). Never: raise — an event that cannot say its
counts counts nothing; never read the event text.
"""

from __future__ import annotations

from collections import Counter

from kanmon.records.events import REASON_CLASSES, Event, reason_class

__all__ = ["REASON_CLASSES", "add_counts", "counts", "parse_name", "reason_class"]


def counts(event: Event) -> list[tuple[str, int]]:
    """The counter increments one event stands for."""
    try:
        return list(event.counts())
    except Exception:  # noqa: BLE001 - counting must never stop the writer
        return []


def add_counts(total: Counter[str], event: Event) -> None:
    for name, inc in counts(event):
        total[name] += inc


def parse_name(name: str) -> tuple[str, dict[str, str]]:
    """'rejected|stage=RCPT|class=address' -> ('rejected', {'stage': 'RCPT', 'class': 'address'})."""
    base, *labels = name.split("|")
    return base, dict(label.split("=", 1) for label in labels if "=" in label)
