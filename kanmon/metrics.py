"""Prometheus metrics: `[metrics] listen`, text exposition format 0.0.4 at /metrics;
/healthz and /readyz on the same listener.

Role: in the main process, answer a scrape with
- what the records writers counted (kanmon.records.counters): connections, messages
  received, delivered, deferred, bounced and rejected by reason class, TLS inbound —
  read from the `counters` table, so SMTP listeners in other processes are included;
- the queue as the spool has it: messages by state, the oldest message's age;
- what the delivery side measured in this process (DeliveryMetrics, fed by the queue
  manager's on_attempt hook): the attempt duration histogram, TLS outbound.

The endpoint is a tiny asyncio HTTP/1.0 responder: one GET per connection, request
bounded to 8 KiB and 10 s. Trusts: nothing from the scraper (only the path is read).
Never: block the event loop on disk (the queue scan and the database read run in a
worker thread), or expose message content or addresses.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sqlite3
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from kanmon.children import pid_alive
from kanmon.model import RecipientResult, Status
from kanmon.records.counters import parse_name
from kanmon.records.store import open_db

DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
REQUEST_LIMIT = 8192
REQUEST_TIMEOUT = 10.0
QUEUE_STATES = ("new", "deferred", "hold", "corrupt")

_ALPHABET = "0123456789BCDFGHJKLMNPQRSTVWXYZb"  # kanmon.model queue ids
_VALUE = {ch: n for n, ch in enumerate(_ALPHABET)}


def queue_id_time(queue_id: str) -> float | None:
    """Arrival time encoded in a kanmon queue id (11 base-32 digits of microseconds)."""
    if len(queue_id) != 15:
        return None
    n = 0
    for ch in queue_id[:11]:
        v = _VALUE.get(ch)
        if v is None:
            return None
        n = n * 32 + v
    return n / 1_000_000


# ---------------------------------------------------------------------------
# The queue, from the spool


@dataclass(slots=True)
class QueueSnapshot:
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(QUEUE_STATES, 0))
    oldest: float | None = None  # arrival time of the oldest queued message
    oldest_id: str = ""
    # The same, apart for messages the administrator put on hold (the `queue oldest`
    # alert looks only at the waiting ones, and says how many are held).
    oldest_waiting: float | None = None
    oldest_waiting_id: str = ""
    oldest_held: float | None = None

    @property
    def size(self) -> int:
        return sum(v for k, v in self.counts.items() if k != "corrupt")


def _states(spool):
    """(queue id, held, tried: attempts or a deferral recorded) of every queued message."""
    if getattr(spool, "index", None) is not None:
        for e in spool.index_walk():
            yield e.queue_id, e.hold, bool(e.attempts or e.last)
        return
    for qid in spool.queue_ids():
        try:
            state = spool.read_state(qid)
        except OSError:
            continue
        yield qid, state.hold, bool(state.attempts or state.last)


def queue_snapshot(spool, active: frozenset[str] | set[str] = frozenset()) -> QueueSnapshot:
    """Count spool/queue files by journal state (blocking: run it in a thread).

    new: never tried; deferred: tried and waiting; hold: held by the admin; active (only
    when the running queue manager's ids are given): being delivered now, counted there
    and not as new or deferred, so that the states add up to the total.
    Age comes from the queue id (no file is opened for it). A running node's spool keeps
    an index (kanmon.spool.index): the journals are read from memory, not from state/."""
    snap = QueueSnapshot()
    if active:
        snap.counts["active"] = 0
    for qid, hold, tried in _states(spool):
        if hold:
            snap.counts["hold"] += 1
        elif qid in active:
            snap.counts["active"] += 1
        elif tried:
            snap.counts["deferred"] += 1
        else:
            snap.counts["new"] += 1
        at = queue_id_time(qid)
        if at is None:
            try:
                at = (spool.queue / qid).stat().st_mtime
            except OSError:
                continue
        if snap.oldest is None or at < snap.oldest:
            snap.oldest, snap.oldest_id = at, qid
        if hold:
            if snap.oldest_held is None or at < snap.oldest_held:
                snap.oldest_held = at
        elif snap.oldest_waiting is None or at < snap.oldest_waiting:
            snap.oldest_waiting, snap.oldest_waiting_id = at, qid
    try:
        snap.counts["corrupt"] = sum(1 for p in spool.corrupt.iterdir() if not p.name.endswith(".state"))
    except OSError:
        pass
    return snap


# ---------------------------------------------------------------------------
# Delivery, measured in this process


class DeliveryMetrics:
    """Fed by QueueManager.on_attempt(route, results, seconds) for remote attempts."""

    def __init__(self) -> None:
        self.buckets = [0] * len(DURATION_BUCKETS)
        self.count = 0
        self.total = 0.0
        self.tls_out: Counter[str] = Counter()  # "yes" / "no": messages handed over per recipient

    def observe(self, route, results: list[RecipientResult], seconds: float) -> None:
        self.count += 1
        self.total += seconds
        for i, le in enumerate(DURATION_BUCKETS):
            if seconds <= le:
                self.buckets[i] += 1
        for r in results:
            if r.status is Status.SENT:
                self.tls_out["yes" if r.tls else "no"] += 1


# ---------------------------------------------------------------------------
# Counters from the records


def read_counters(db_path: Path) -> tuple[Counter[str], int]:
    """(sum of every counter over all processes, open SMTP connections of live processes)."""
    totals: Counter[str] = Counter()
    open_conns = 0
    if not Path(db_path).exists():
        return totals, 0
    db = open_db(db_path, readonly=True)
    try:
        rows = db.execute("SELECT pid, name, value FROM counters").fetchall()
    except sqlite3.OperationalError:
        rows = []
    finally:
        db.close()
    per_pid: dict[int, Counter[str]] = {}
    for pid, name, value in rows:
        totals[name] += value
        if name in ("connections", "disconnections"):
            per_pid.setdefault(pid, Counter())[name] += value
    for pid, c in per_pid.items():
        if _alive(pid):
            open_conns += max(0, c["connections"] - c["disconnections"])
    return totals, open_conns


def _alive(pid: int) -> bool:
    return pid == os.getpid() or pid_alive(pid)


# ---------------------------------------------------------------------------
# Exposition


def _escape(value: str) -> str:
    """A label value in the text format: backslash, double quote and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(d: dict[str, str]) -> str:
    if not d:
        return ""
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(d.items()))
    return "{" + inner + "}"


class Metrics:
    def __init__(self, data_dir: Path, spool, delivery: DeliveryMetrics, now: Callable[[], float] = time.time):
        self.db_path = Path(data_dir) / "records.sqlite"
        self.spool = spool
        self.delivery = delivery
        self.now = now

    def render(self) -> str:
        """The whole exposition (blocking: reads the database and the spool)."""
        counters, open_conns = read_counters(self.db_path)
        snap = queue_snapshot(self.spool)
        out: list[str] = []

        def family(name: str, kind: str, help_text: str, samples: list[tuple[dict[str, str], float]]) -> None:
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")
            for labels, value in samples:
                out.append(f"{name}{_labels(labels)} {_num(value)}")

        def by(base: str, default_labels: list[dict[str, str]] | None = None) -> list[tuple[dict[str, str], float]]:
            samples = []
            for name, value in sorted(counters.items()):
                b, labels = parse_name(name)
                if b == base:
                    samples.append((labels, value))
            return samples or [(labels, 0) for labels in (default_labels or [{}])]

        family("kanmon_messages_received_total", "counter", "Messages accepted into the queue (smtp: from clients; internal: notices and alerts)",
               by("received", [{"source": "smtp"}]))
        family("kanmon_received_bytes_total", "counter", "Bytes of the messages accepted", by("received_bytes", [{"source": "smtp"}]))
        family("kanmon_messages_received_tls_total", "counter", "Messages received from clients over TLS", by("received_tls"))
        family("kanmon_messages_rejected_total", "counter", "Recipients or connections refused, by SMTP stage and RFC 3463 reason class",
               by("rejected", [{"stage": "RCPT", "class": "other"}]))
        family("kanmon_checks_total", "counter",
               "Refusals by check and result (reject: 5xx, tempfail: 4xx; error: the check itself failed"
               " and its failure mode answered, counted under that reply's result too)",
               by("checks", [{"check": "none", "result": "reject"}]))
        family("kanmon_auth_results_total", "counter", "Sender authentication results of mail from outside, by method (spf, dkim, dmarc, arc) and result",
               by("auth", [{"method": "spf", "result": "pass"}]))
        family("kanmon_auth_actions_total", "counter", "Messages the sender authentication checks tagged or held for quarantine",
               by("auth_actions", [{"action": "tag"}]))
        family("kanmon_deliveries_total", "counter", "Recipients delivered, by mailer", by("delivered", [{"mailer": "esmtp"}]))
        family("kanmon_deferrals_total", "counter", "Delivery attempts deferred (per recipient), by reason class",
               by("deferred", [{"class": "other"}]))
        family("kanmon_bounces_total", "counter", "Recipients bounced, by reason class", by("bounced", [{"class": "other"}]))
        family("kanmon_tls_policy_failures_total", "counter",
               "Outbound sessions that failed a destination's TLS policy (MTA-STS, DANE, tls_policy), by RFC 8460 result type",
               by("tls_policy_failures", [{"policy": "mta-sts", "result": "validation-failure"}]))
        family("kanmon_notices_total", "counter", "Delay and failure notices sent", by("notices", [{"type": "failure"}]))
        family("kanmon_smtp_connections_total", "counter", "SMTP sessions opened", by("connections"))
        family("kanmon_smtp_open_connections", "gauge", "SMTP sessions open now (all receiving processes)", [({}, open_conns)])
        smtp_received = counters.get("received|source=smtp", 0)
        family("kanmon_tls_inbound_ratio", "gauge", "Share of messages from clients received over TLS",
               [({}, counters.get("received_tls", 0) / smtp_received if smtp_received else 0.0)])
        family("kanmon_queue_messages", "gauge", "Messages in the queue by state (new, deferred, hold; corrupt: set aside)",
               [({"state": s}, snap.counts[s]) for s in QUEUE_STATES])
        age = max(0.0, self.now() - snap.oldest) if snap.oldest is not None else 0.0
        family("kanmon_queue_oldest_age_seconds", "gauge", "Age of the oldest message in the queue", [({}, age)])
        d = self.delivery
        out.append("# HELP kanmon_delivery_attempt_duration_seconds Time of one delivery attempt to a remote destination")
        out.append("# TYPE kanmon_delivery_attempt_duration_seconds histogram")
        for le, n in zip(DURATION_BUCKETS, d.buckets, strict=True):
            out.append(f'kanmon_delivery_attempt_duration_seconds_bucket{{le="{_num(le)}"}} {n}')
        out.append(f'kanmon_delivery_attempt_duration_seconds_bucket{{le="+Inf"}} {d.count}')
        out.append(f"kanmon_delivery_attempt_duration_seconds_sum {_num(d.total)}")
        out.append(f"kanmon_delivery_attempt_duration_seconds_count {d.count}")
        family("kanmon_deliveries_tls_total", "counter", "Recipients handed to remote servers, with and without TLS",
               [({"tls": k}, d.tls_out[k]) for k in ("yes", "no")])
        sent = d.tls_out["yes"] + d.tls_out["no"]
        family("kanmon_tls_outbound_ratio", "gauge", "Share of remote deliveries made over TLS",
               [({}, d.tls_out["yes"] / sent if sent else 0.0)])
        return "\n".join(out) + "\n"


def _num(v: float) -> str:
    if isinstance(v, int) or float(v).is_integer():
        return str(int(v))
    return repr(float(v))


class MetricsServer:
    """The /metrics endpoint, and /healthz and /readyz for load balancers and monitoring
    (a node service: async start() / stop()).

    /healthz answers 200 while the node serves; /readyz 200 when ready() is true, 503
    while the node starts or reloads. sock: an already listening socket (the node's).
    """

    def __init__(self, metrics: Metrics, host: str, port: int, emit: Callable[..., None] | None = None,
                 *, sock: socket.socket | None = None, ready: Callable[[], bool] | None = None):
        self.metrics = metrics
        self.host, self.port = host, port
        self.emit = emit
        self.sock = sock
        self.ready = ready or (lambda: True)
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        if self.sock is not None:
            self._server = await asyncio.start_server(self._handle, sock=self.sock, limit=REQUEST_LIMIT)
        else:
            self._server = await asyncio.start_server(self._handle, self.host, self.port, reuse_address=True,
                                                      limit=REQUEST_LIMIT)
        self.port = self._server.sockets[0].getsockname()[1]

    async def retire(self) -> None:
        """After a reload: a scrape in progress is short (REQUEST_TIMEOUT); just stop."""
        await self.stop()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
            parts = head.split(b"\r\n", 1)[0].split(b" ")
            method, path = (parts[0], parts[1]) if len(parts) >= 2 else (b"", b"")
            if method != b"GET":
                status, body, ctype = "405 Method Not Allowed", b"GET only\n", "text/plain"
            elif (route := path.split(b"?", 1)[0]) == b"/healthz":
                status, body, ctype = "200 OK", b"ok\n", "text/plain"
            elif route == b"/readyz":
                ready = self.ready()
                status = "200 OK" if ready else "503 Service Unavailable"
                body, ctype = (b"ready\n" if ready else b"not ready (starting or reloading)\n"), "text/plain"
            elif route != b"/metrics":
                status, body, ctype = "404 Not Found", b"try /metrics, /healthz or /readyz\n", "text/plain"
            else:
                text = await asyncio.to_thread(self.metrics.render)
                status, body, ctype = "200 OK", text.encode(), "text/plain; version=0.0.4; charset=utf-8"
            writer.write(
                f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n".encode() + body
            )
            async with asyncio.timeout(REQUEST_TIMEOUT):
                await writer.drain()
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        except Exception as e:  # noqa: BLE001 - a scrape never takes the server down
            if self.emit is not None:
                self.emit(f"metrics: scrape failed: {type(e).__name__}: {e}", kind="error")
        finally:
            writer.close()
