"""Counters made from event-log lines as the records writer writes them.

Role: classify one event line (its formats are fixed: tests and admins read them) into
counter increments — connections, messages received (and over TLS, and bytes),
rejected / delivered / deferred / bounced by reason class. Every process's records
writer adds its increments to the `counters` table of records.sqlite in the same
transaction as the lines, keyed by its pid, so the metrics endpoint in the main process
sees what SMTP listeners in other processes did (docs/monitoring.md, "How metrics are
counted").

Counter names are `name` or `name|label=value|label=value`.
Trusts: the lines (written by kanmon itself). Never: raise — a line it does not know
counts nothing.
"""

from __future__ import annotations

import re
from collections import Counter

# RFC 3463 section 2: the subject of an enhanced status code.
REASON_CLASSES = {
    "0": "other", "1": "address", "2": "mailbox", "3": "system",
    "4": "network", "5": "protocol", "6": "content", "7": "policy",
}

_ENHANCED_RE = re.compile(r"\b([245])\.(\d{1,3})\.\d{1,3}\b")
_REPLY_RE = re.compile(r"\]: ([245]\d\d)(?: ([245]\.\d{1,3}\.\d{1,3}))?")
_DSN_RE = re.compile(r", dsn=([245])\.(\d{1,3})\.\d{1,3}")
_MAILER_RE = re.compile(r", mailer=([a-z]+)")
_SIZE_RE = re.compile(r", size=(\d+)")
_PROTO_RE = re.compile(r", proto=([A-Za-z]+)")


def reason_class(enhanced: str | None) -> str:
    """'5.1.1' -> 'address'; None or garbage -> 'other'."""
    if not enhanced:
        return "other"
    parts = enhanced.split(".")
    return REASON_CLASSES.get(parts[1], "other") if len(parts) == 3 else "other"


def _class_of_reply(text: str) -> str:
    m = _ENHANCED_RE.search(text)
    return REASON_CLASSES.get(m.group(2), "other") if m else "other"


def classify(text: str, queue_id: str | None) -> list[tuple[str, int]]:
    """The counter increments one event line stands for."""
    try:
        return _classify(text, queue_id)
    except Exception:  # noqa: BLE001 - counting must never stop the writer
        return []


def _classify(text: str, queue_id: str | None) -> list[tuple[str, int]]:
    if queue_id is None:
        if text.startswith("connect from "):
            return [("connections", 1)]
        if text.startswith("disconnect from "):
            return [("disconnections", 1)]
        if text.startswith("NOQUEUE: reject: "):
            stage = text[len("NOQUEUE: reject: "):].split(" ", 1)[0]
            m = _REPLY_RE.search(text)
            cls = REASON_CLASSES.get(m.group(2).split(".")[1], "other") if m and m.group(2) else "other"
            return [(f"rejected|stage={stage}|class={cls}", 1)]
        if text.startswith("reject: connect from "):
            return [(f"rejected|stage=CONNECT|class={_class_of_reply(text)}", 1)]
        if text.startswith("STARTTLS=server, ") and ", version=" in text:
            return [("tls_sessions_in", 1)]
        return []
    if text.startswith("from=<") and ", nrcpts=" in text:
        proto_m = _PROTO_RE.search(text)
        proto = proto_m.group(1) if proto_m else ""
        size_m = _SIZE_RE.search(text)
        size = int(size_m.group(1)) if size_m else 0
        source = "internal" if proto == "internal" else "smtp"
        out = [(f"received|source={source}", 1), (f"received_bytes|source={source}", size)]
        if source == "smtp" and proto.startswith("ESMTPS"):
            out.append(("received_tls", 1))
        return out
    if text.startswith("to=<") and ", stat=" in text:
        stat = text.rsplit(", stat=", 1)[1]
        m = _DSN_RE.search(text)
        cls = REASON_CLASSES.get(m.group(2), "other") if m else "other"
        if stat.startswith("Sent"):
            mm = _MAILER_RE.search(text)
            return [(f"delivered|mailer={mm.group(1) if mm else 'local'}", 1)]
        if stat.startswith("Deferred"):
            return [(f"deferred|class={cls}", 1)]
        if stat.startswith("Bounced"):
            return [(f"bounced|class={cls}", 1)]
        return []
    if text.startswith("sender failure notification: "):
        return [("notices|type=failure", 1)]
    if text.startswith("sender delay notification: "):
        return [("notices|type=delay", 1)]
    return []


def add_counts(total: Counter[str], text: str, queue_id: str | None) -> None:
    for name, inc in classify(text, queue_id):
        total[name] += inc


def parse_name(name: str) -> tuple[str, dict[str, str]]:
    """'rejected|stage=RCPT|class=address' -> ('rejected', {'stage': 'RCPT', 'class': 'address'})."""
    base, *labels = name.split("|")
    return base, dict(label.split("=", 1) for label in labels if "=" in label)
