"""Alert mail: the administrator hears about trouble before the users call.

Role: in the main process, one Alerts object takes alerts from every source —
`raise_alert(category, key, text)` — and mails them through kanmon's own queue (stored
with Spool.store and handed to the queue manager, like delay and failure notices), so
they follow routing. Categories (docs/monitoring.md):

- critical: an error event of any stage or process (event kinds "error", "critical",
  "check-failed", "probe-failed", "effect-failed", "effect-unhandled": ERROR_KINDS, read
  back from the records, so receiver processes count too), a corrupt spool entry;
- disk: free space in data_dir under [alerts] disk_free_below;
- queue: more than queue_size_above messages, or the oldest older than queue_oldest_above;
- delivery: a configured relay server or smarthost failed and its alternate took the
  mail (SmtpDelivery.on_server_used), and when the first server takes mail again;
  the share of deferred results over the last hour above deferred_ratio_above;
- certificate: our TLS certificate expires within cert_expires_within;
- dns: raised by the DNS health check (kanmon.dnscheck.monitor).

The same alert (category and key) is mailed at most once per [alerts] min_interval
while it lasts; each one says what happened, since when, and the command to look
closer. Every alert, mailed or not, is an event of kind "alert" with structured detail:
`kanmon alert list` reads those. When the queue cannot take an alert (no recipients
configured, spool error) it goes to the event log and stderr.

Trusts: its callers (kanmon's own stages). Never: raise into a caller (an alert that
cannot be sent is logged), send mail about its own mail (alerts are notices: a failed
alert never causes a DSN), or block the event loop on disk (checks run in a thread).
"""

from __future__ import annotations

import asyncio
import datetime
import email.policy
import json
import re
import sqlite3
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from pathlib import Path
from typing import TextIO

from kanmon.config import ALERT_CATEGORIES, Config
from kanmon.model import Envelope
from kanmon.policy.disk import free_disk_bytes  # the same measure as SMTP's 452 at MAIL
from kanmon.queue.inject import Injector
from kanmon.records.events import DEFERRED, ERROR_KINDS, Alert, AlertMailed, AlertNotMailed, AlertRequest
from kanmon.units import format_duration, format_size

CHECK_INTERVAL = 60.0  # seconds between threshold checks (on the node's clock)
EVENT_POLL = 1.0  # seconds between looks at new error events and alert requests
RATIO_WINDOW = 3600.0
RATIO_MIN_RESULTS = 10
WATCHED_KINDS = (*ERROR_KINDS, AlertRequest.KIND)  # events the watcher acts on

SUBJECT_SUMMARY_MAX = 100  # characters of the text's first line in the Subject

LOOK_CLOSER = {
    "critical": "kanmon log events --since 1h --grep error",
    "disk": "df -h {data_dir}; kanmon queue summary",
    "queue": "kanmon queue summary",
    "delivery": "kanmon log events --since 1h --grep 'trying next server'",
    "certificate": "openssl x509 -noout -subject -enddate -in {cert}",
    "dns": "kanmon dns check",
}


@dataclass(slots=True)
class AlertState:
    category: str
    key: str
    text: str
    since: float
    last_sent: float | None = None
    active: bool = True


def cert_not_after(path: Path) -> datetime.datetime:
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(Path(path).read_bytes())
    return cert.not_valid_after_utc if hasattr(cert, "not_valid_after_utc") else cert.not_valid_after.replace(
        tzinfo=datetime.timezone.utc
    )


def _stamp(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(ts))


class Alerts:
    def __init__(
        self,
        config: Config,
        records,
        spool,
        queue,
        clock,
        *,
        cert_path: Path | None = None,
        free_disk: Callable[[], int] | None = None,
        stderr: TextIO | None = None,
    ):
        self.config = config
        self.cfg = config.alerts
        self.records = records
        self.spool = spool
        self.queue = queue
        # Alert mail enters the queue like every message kanmon writes itself.
        self.injector = Injector(spool, records, queue.submit_nowait, hostname=config.server.hostname, clock=clock)
        self.clock = clock
        self.cert_path = cert_path
        self.data_dir = Path(config.server.data_dir)
        self.free_disk = free_disk or (lambda: free_disk_bytes(str(self.data_dir)))
        self.stderr = stderr if stderr is not None else sys.stderr
        self.sender = self.cfg.from_ or f"kanmon@{config.server.hostname}"
        self.states: dict[tuple[str, str], AlertState] = {}
        self.failover: dict[str, str] = {}  # destination -> server in use instead of the first
        self._resolved_sent: dict[tuple[str, str], float] = {}
        self.sent = 0
        self.checks = 0  # threshold rounds done (tests wait for it before moving the clock)
        self._outbox: asyncio.Queue[tuple[str, str, str, bool]] | None = None
        self._db_path = self.data_dir / "records.sqlite"
        self._last_event_id = self._max_event_id()

    # -- raising ------------------------------------------------------------------------

    def raise_alert(self, category: str, key: str, text: str, *, force: bool = False) -> bool:
        """Note an alert; mail it unless the same one was mailed within min_interval.

        Returns whether a mail is on its way. force: ignore the rate limit and the
        category list (the test button). Safe to call from the event loop's thread only.
        """
        if category not in ALERT_CATEGORIES:
            category = "critical"
        now = self.clock.now()
        st = self.states.get((category, key))
        if st is None or not st.active:  # a new episode; the rate limit spans episodes (flapping)
            st = AlertState(category, key, text, since=now, last_sent=st.last_sent if st else None)
            self.states[(category, key)] = st
        st.text = text
        mailed = category in self.cfg.categories or force
        if not force and st.last_sent is not None and now - st.last_sent < self.cfg.min_interval:
            self._event(st, "suppressed")
            return False
        if not mailed:
            self._event(st, "raised", mailed=False)
            return False
        st.last_sent = now
        self._event(st, "raised")
        self._enqueue(category, key, self._subject(category, text), self._body(st, text), force)
        return True

    def clear(self, category: str, key: str, text: str, *, mail: bool = False) -> None:
        """The condition is over. mail: say so by mail (delivery recovery does)."""
        st = self.states.get((category, key))
        if st is None or not st.active:
            return
        st.active = False
        self._event(st, "cleared", summary=_first(text))
        now = self.clock.now()
        last = self._resolved_sent.get((category, key))
        if mail and last is not None and now - last < self.cfg.min_interval:
            return  # a flapping server: one "resolved" mail per interval too
        if mail and category in self.cfg.categories:
            self._resolved_sent[(category, key)] = now
            body = (f"Resolved: {text}\n\nThe problem began {_stamp(st.since)}; resolved {_stamp(self.clock.now())}.\n"
                    f"\nTo look closer: {self._command(category)}\n")
            self._enqueue(category, key, self._subject(category, "resolved: " + _first(text)), body, True)

    def alert_callable(self, category: str) -> Callable[[str, str], None]:
        """`alert(category, text)` for sources that give no key (the DNS monitor): the
        key is the text's first line up to its first colon."""
        def alert(cat: str, text: str) -> None:
            self.raise_alert(cat or category, _first(text).split(":", 1)[0], text)
        return alert

    # -- sources --------------------------------------------------------------------------

    def on_server_used(self, destination: str, used: str, failed: list[tuple[str, str]]) -> None:
        """SmtpDelivery hook: failover to an alternate, and recovery of the first server."""
        if failed:
            tried = "; ".join(f"{relay}: {why}" for relay, why in failed)
            self.failover[destination] = used
            self.raise_alert(
                "delivery", f"failover {destination}",
                f"relay failover: {failed[0][0]} did not take mail; alternate {used} is in use\n"
                f"Servers of this route, in order: {destination}\nFailed: {tried}",
            )
        elif destination in self.failover:
            was = self.failover.pop(destination)
            self.clear("delivery", f"failover {destination}",
                       f"relay recovered: the first server {used} takes mail again (alternate {was} no longer needed)",
                       mail=True)

    def check_now(self) -> None:
        """Threshold checks: disk, queue, deferred ratio, certificate (blocking: in a thread)."""
        checks = (self._check_disk, self._check_queue, self._check_ratio, self._check_cert)
        for check in checks:
            try:
                check()
            except Exception as e:  # noqa: BLE001 - one broken check must not stop the others
                self.records.emit(f"alerts: {check.__name__[7:]} check failed: {type(e).__name__}: {e}")

    def _check_disk(self) -> None:
        limit = self.cfg.disk_free_below if self.cfg.disk_free_below is not None else self.config.smtp.min_free_disk
        free = self.free_disk()
        text = (f"free disk space {format_size(free)}, below the threshold {format_size(limit)}\n"
                f"Data directory: {self.data_dir}")
        if free < limit:
            self._call_soon(self.raise_alert, "disk", str(self.data_dir), text +
                            ("\nSMTP answers 452 4.3.1 to MAIL while free space is under smtp.min_free_disk "
                             f"({format_size(self.config.smtp.min_free_disk)})."))
        else:
            self._call_soon(self.clear, "disk", str(self.data_dir), f"free disk space {format_size(free)}")

    def _check_queue(self) -> None:
        from kanmon.metrics import queue_snapshot

        snap = queue_snapshot(self.spool)
        limit = self.cfg.queue_size_above
        states = ", ".join(f"{k} {v}" for k, v in snap.counts.items())
        if snap.size > limit:
            self._call_soon(self.raise_alert, "queue", "size",
                            f"{snap.size} messages in the queue, above the threshold {limit} ({states})")
        else:
            self._call_soon(self.clear, "queue", "size", f"{snap.size} messages in the queue")
        age = self.clock.now() - snap.oldest if snap.oldest is not None else 0.0
        if age > self.cfg.queue_oldest_above:
            self._call_soon(self.raise_alert, "queue", "oldest",
                            f"the oldest message ({snap.oldest_id}) has waited {format_duration(age)}, above the threshold "
                            f"{format_duration(self.cfg.queue_oldest_above)}\nTo see its history: kanmon trace {snap.oldest_id}")
        else:
            self._call_soon(self.clear, "queue", "oldest", f"oldest message waited {format_duration(age)}")

    def _check_ratio(self) -> None:
        if not self._db_path.exists():
            return
        since = self.clock.now() - RATIO_WINDOW
        db = sqlite3.connect(f"file:{self._db_path}?mode=ro", uri=True, timeout=10)
        try:
            deferred, total = db.execute(
                "SELECT SUM(json_extract(detail, '$.status') = ?), COUNT(*) FROM events"
                " WHERE ts >= ? AND kind = 'delivery' AND detail IS NOT NULL",
                (DEFERRED, since),
            ).fetchone()
        finally:
            db.close()
        deferred, total = deferred or 0, total or 0
        if total >= RATIO_MIN_RESULTS and deferred / total > self.cfg.deferred_ratio_above:
            self._call_soon(self.raise_alert, "delivery", "deferred ratio",
                            f"{deferred} of {total} delivery results in the last hour were deferred "
                            f"({deferred / total:.0%}, threshold {self.cfg.deferred_ratio_above:.0%})")
        else:
            self._call_soon(self.clear, "delivery", "deferred ratio", f"{deferred} of {total} deferred")

    def _check_cert(self) -> None:
        if self.cert_path is None or not Path(self.cert_path).exists():
            return
        not_after = cert_not_after(self.cert_path).timestamp()
        left = not_after - self.clock.now()
        if left < self.cfg.cert_expires_within:
            what = "expired" if left <= 0 else f"expires in {format_duration(left)}"
            self._call_soon(self.raise_alert, "certificate", str(self.cert_path),
                            f"our TLS certificate {what}\nCertificate: {self.cert_path}\n"
                            f"Not after: {_stamp(not_after)} (threshold {format_duration(self.cfg.cert_expires_within)})")
        else:
            self._call_soon(self.clear, "certificate", str(self.cert_path), "certificate renewed")

    def _max_event_id(self) -> int:
        if not self._db_path.exists():
            return 0
        db = sqlite3.connect(f"file:{self._db_path}?mode=ro", uri=True, timeout=10)
        try:
            return db.execute("SELECT max(id) FROM events").fetchone()[0] or 0
        except sqlite3.OperationalError:
            return 0
        finally:
            db.close()

    def poll_events(self) -> list[tuple[str, str | None, str, str | None]]:
        """New error/critical events and alert requests since the last look (blocking)."""
        if not self._db_path.exists():
            return []
        db = sqlite3.connect(f"file:{self._db_path}?mode=ro", uri=True, timeout=10)
        try:
            top = db.execute("SELECT max(id) FROM events").fetchone()[0] or 0
            rows = db.execute(
                "SELECT kind, queue_id, text, detail FROM events WHERE id > ? AND id <= ?"
                f" AND kind IN ({', '.join('?' * len(WATCHED_KINDS))}) ORDER BY id",
                (self._last_event_id, top, *WATCHED_KINDS),
            ).fetchall()
        finally:
            db.close()
        self._last_event_id = max(self._last_event_id, top)
        return rows

    def _on_event(self, kind: str, qid: str | None, text: str, detail: str | None = None) -> None:
        if kind == AlertRequest.KIND:
            try:
                category = str(json.loads(detail or "{}").get("category") or "critical")
            except (ValueError, AttributeError):
                category = "critical"
            self.raise_alert(category, "test", f"test alert ({category}) requested with `kanmon alert test`: "
                             "if you read this, alert mail reaches you", force=True)
            return
        where = f"{qid}: " if qid else ""
        key = re.sub(r"[0-9A-Z]{15}|\d+", "#", text)[:80]
        look = f"\nTo see the message's history: kanmon trace {qid}" if qid else ""
        self.raise_alert("critical", key, f"{'critical' if kind == 'critical' else 'error'} event: {where}{text}{look}")

    # -- running --------------------------------------------------------------------------

    async def run(self) -> None:
        """The sender, the event watcher and the threshold checks (until cancelled)."""
        self._outbox = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._sender())
            tg.create_task(self._watch_events())
            tg.create_task(self._checks())

    async def _checks(self) -> None:
        while True:
            await asyncio.to_thread(self.check_now)
            self.checks += 1  # no await between this and the sleep below registering
            await self.clock.sleep(CHECK_INTERVAL)

    async def _watch_events(self) -> None:
        while True:
            try:
                for kind, qid, text, detail in await asyncio.to_thread(self.poll_events):
                    self._on_event(kind, qid, text, detail)
            except sqlite3.Error as e:
                print(f"kanmon: alerts cannot read the records: {e}", file=self.stderr)
            await asyncio.sleep(EVENT_POLL)

    async def _sender(self) -> None:
        assert self._outbox is not None
        while True:
            category, key, subject, body = (await self._outbox.get())[:4]
            await self.send(category, key, subject, body)

    def _call_soon(self, fn, *args) -> None:
        """From the check thread into the event loop's thread."""
        loop = getattr(self, "_loop", None)
        if loop is None:
            fn(*args)
        else:
            loop.call_soon_threadsafe(fn, *args)

    def _enqueue(self, category: str, key: str, subject: str, body: str, force: bool) -> None:
        if self._outbox is None:  # not running (tests driving it by hand): log only
            self._fallback(subject, body, "alerts not running")
            return
        self._outbox.put_nowait((category, key, subject, body))

    async def send(self, category: str, key: str, subject: str, body: str) -> str | None:
        """Queue one alert mail; its queue id, or None when it went to log and stderr."""
        if not self.cfg.to:
            self._fallback(subject, body, "no [alerts] to")
            return None
        now = self.clock.now()
        hostname = self.config.server.hostname
        msg = EmailMessage(policy=email.policy.SMTP)  # CRLF, encoded words, folded headers
        msg["From"] = f"kanmon on {hostname} <{self.sender}>"
        msg["To"] = ", ".join(self.cfg.to)
        msg["Subject"] = re.sub(r"[\r\n\t]+", " ", subject)  # event text never makes a header of its own
        msg["Date"] = format_datetime(datetime.datetime.fromtimestamp(now).astimezone())
        msg["Message-ID"] = make_msgid("alert", domain=hostname)
        msg["Auto-Submitted"] = "auto-generated"  # RFC 3834
        msg["X-Kanmon-Alert"] = category
        msg.set_content(body)
        content = msg.as_bytes()
        env = Envelope(mail_from=self.sender, rcpts=list(self.cfg.to), received_at=now, is_notice=True)
        try:
            qid = await self.injector.inject(env, content, "alert")
        except Exception as e:  # noqa: BLE001 - the queue cannot take it: log and stderr
            self._fallback(subject, body, f"queue refused it: {e}")
            return None
        self.records.record(AlertMailed(category, key, subject), qid)
        self.sent += 1
        return qid

    def _fallback(self, subject: str, body: str, why: str) -> None:
        self.records.record(AlertNotMailed(why, subject))
        try:
            print(f"kanmon: ALERT: {subject}\n{body}", file=self.stderr, flush=True)
        except (OSError, ValueError):
            pass

    # -- text -----------------------------------------------------------------------------------

    def _event(self, st: AlertState, state: str, *, summary: str = "", mailed: bool = True) -> None:
        self.records.record(Alert(st.category, st.key, state, st.since, st.text, summary, mailed, st.last_sent))

    def _subject(self, category: str, text: str) -> str:
        """Category, node and a one-line summary: the first line of the text, cut short.

        Details (paths, lists of servers) are on the following lines and in the body."""
        summary = _first(text)
        if len(summary) > SUBJECT_SUMMARY_MAX:
            summary = summary[: SUBJECT_SUMMARY_MAX - 3].rsplit(" ", 1)[0] + "..."
        return f"[kanmon {self.config.server.hostname}] {category}: {summary}"

    def _command(self, category: str) -> str:
        cert = self.cert_path or "<certificate>"
        return LOOK_CLOSER[category].format(data_dir=self.data_dir, cert=cert)

    def _body(self, st: AlertState, text: str) -> str:
        return (
            f"What happened: {text}\n\n"
            f"Since: {_stamp(st.since)}\n"
            f"Category: {st.category}\n"
            f"Server: {self.config.server.hostname}\n\n"
            f"To look closer: {self._command(st.category)}\n\n"
            f"This alert is mailed at most once every {format_duration(self.cfg.min_interval)} while it lasts;\n"
            "`kanmon alert list` shows recent alerts and which are still active.\n"
        )


def _first(text: str) -> str:
    return text.split("\n", 1)[0]


# ---------------------------------------------------------------------------
# Reading alerts back (kanmon alert list)


@dataclass(slots=True)
class AlertRecord:
    ts: float
    category: str
    key: str
    state: str  # raised | suppressed | cleared
    since: float
    text: str


def recent_alerts(data_dir: Path, since: float) -> tuple[list[AlertRecord], list[AlertRecord]]:
    """(every alert event since `since`, oldest first; the alerts active now)."""
    path = Path(data_dir) / "records.sqlite"
    if not path.exists():
        return [], []
    from kanmon.records.stats import connect_records

    db = connect_records(Path(data_dir))
    assert db is not None
    try:
        rows = db.execute(
            "SELECT ts, detail FROM events WHERE kind = 'alert' AND ts >= ? ORDER BY id", (since,)
        ).fetchall()
    finally:
        db.close()
    out: list[AlertRecord] = []
    latest: dict[tuple[str, str], AlertRecord] = {}
    for ts, detail in rows:
        try:
            d = json.loads(detail or "{}")
        except ValueError:
            continue
        rec = AlertRecord(ts, d.get("category", ""), d.get("key", ""), d.get("state", ""), d.get("since", ts),
                          d.get("text", ""))
        out.append(rec)
        latest[(rec.category, rec.key)] = rec
    active = [r for r in latest.values() if r.state != "cleared" and r.key != "test"]
    return out, active


# ---------------------------------------------------------------------------
# The test button (kanmon alert test)


def request_test_alert(data_dir: Path, category: str, wait: float) -> str | None:
    """Ask the running server to mail a test alert, and wait up to `wait` seconds for it.

    The request is an AlertRequest event in records.sqlite; the server's
    watcher (poll_events) picks it up. Returns the server's event line about the mail
    ("alert mail (...) queued: ..." or "alert not mailed (...): ..."), or None when no
    server answered in time. FileNotFoundError: there are no records in data_dir.
    """
    from kanmon.records.store import open_db

    path = Path(data_dir) / "records.sqlite"
    if not path.exists():
        raise FileNotFoundError(path)
    db = open_db(path)
    try:
        with db:
            request = AlertRequest(category)
            cur = db.execute(
                "INSERT INTO events(ts, queue_id, kind, text, detail) VALUES (?, NULL, ?, ?, ?)",
                (time.time(), request.KIND, request.line(), json.dumps(request.fields())),
            )
            request_id = cur.lastrowid
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            row = db.execute(
                "SELECT text FROM events WHERE id > ? AND kind = ? AND json_extract(detail, '$.category') = ?"
                " AND json_extract(detail, '$.key') = 'test' ORDER BY id LIMIT 1",
                (request_id, AlertMailed.KIND, category),
            ).fetchone() or db.execute(
                "SELECT text FROM events WHERE id > ? AND kind = ? ORDER BY id LIMIT 1",
                (request_id, AlertNotMailed.KIND),
            ).fetchone()
            if row:
                return row[0]
            time.sleep(0.2)  # a command waiting for another process: there is no clock to advance
    finally:
        db.close()
    return None
