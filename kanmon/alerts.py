"""Alert mail: the administrator hears about trouble before the users call.

Role: in the main process, one Alerts object takes alerts from every source —
`raise_alert(category, key, text)` — and mails them through kanmon's own queue (stored
with Spool.store and handed to the queue manager, like delay and failure notices), so
they follow routing. Categories (docs/monitoring.md):

- critical: an error event of any stage or process (event kinds "error", "critical",
  "check-failed", "probe-failed", "effect-failed", "effect-unhandled": ERROR_KINDS, read
  back from the records, so receiver processes count too), a corrupt spool entry;
- disk: free space in data_dir under [alerts] disk_free_below;
- queue: more than queue_size_above messages, or the oldest message not on hold older
  than queue_oldest_above (held ones are counted apart);
- delivery: a configured relay server or smarthost failed and its alternate took the
  mail (SmtpDelivery.on_server_used), and when the first server takes mail again;
  the share of deferred results over the last hour above deferred_ratio_above;
- ha: the balancer's incidents (a real server down, failover, all down), each with its
  own key, resolved (with a "resolved" mail) by its recovery (incident());
- archive: the archive quota (check_archive(), for the archive store);
- expiry: our TLS certificate, our DKIM key due for rotation, [[alerts.reminder]] dates;
- dns: raised by the DNS health check (kanmon.dnscheck.monitor);
- records: the records database refuses writes (the node, told by kanmon.records.store:
  key "database", or "shared database" for PostgreSQL).

An alert whose condition has a recovery event is resolved by it (RECOVERIES: a reload
that takes effect ends "reload refused", "takes writes again" a records alert...).

With shared state ([records] url), one incident gets one mail for the cluster: the first
node that sees it mails it (AlertClaims.claim), and the last node that sees it end mails
"resolved" (AlertClaims.resolve), each naming the nodes that saw it. `kanmon alert list`
and the console then read every node's alerts from the shared records (read_alerts).

The same alert (category and key) is mailed at most once per [alerts] min_interval
(expiry: expiry_every) while it lasts; each one says what happened, since when, and the
command to look closer. Every alert, mailed or not, is an event of kind "alert" with
structured detail: `kanmon alert list` reads those. When the queue cannot take an alert
(no recipients configured, spool error) it goes to the event log and stderr.

The alert state (each alert's episode, when it was last mailed, failovers outstanding)
is kept in <data_dir>/alert-state.json (private, replaced atomically), so a restart or a
reload does not mail again what was mailed within the interval. Its decoder is strict: a
file it refuses is moved aside with a critical event, and the node starts without it.

Trusts: its callers (kanmon's own stages); nothing in the state file (decoded strictly).
Never: raise into a caller (an alert that
cannot be sent is logged), send mail about its own mail (alerts are notices: a failed
alert never causes a DSN), or block the event loop on disk (checks run in a thread).
"""

from __future__ import annotations

import asyncio
import datetime
import email.policy
import json
import os
import re
import sqlite3
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from pathlib import Path
from typing import TextIO

from kanmon.auth.dkimsign import load_signer_lenient
from kanmon.config import ALERT_CATEGORIES, Config
from kanmon.escape import for_log
from kanmon.model import Envelope
from kanmon.policy.disk import free_disk_bytes  # the same measure as SMTP's 452 at MAIL
from kanmon.queue.inject import Injector
from kanmon.records.events import (
    BOUNCED,
    DEFERRED,
    ERROR_KINDS,
    Alert,
    AlertMailed,
    AlertNotMailed,
    AlertRequest,
    Critical,
    ScannerFailed,
    ScannerRecovered,
)
from kanmon.units import format_duration, format_size
from kanmon.userdb import quiet_directory

CHECK_INTERVAL = 60.0  # seconds between threshold checks (on the node's clock)
EVENT_POLL = 1.0  # seconds between looks at new error events and alert requests
RATIO_WINDOW = 3600.0
RATIO_MIN_RESULTS = 10
WATCHED_KINDS = (*ERROR_KINDS, AlertRequest.KIND, ScannerFailed.KIND, ScannerRecovered.KIND)  # events the watcher acts on

# Conditions with a recovery event: (the recovery event's kind, the start of its line,
# the category of the alerts it resolves, the start of their key). A critical alert's key
# is its error event's line, digits masked (critical_key). The watcher resolves each
# active alert that matches, with a "resolved" mail as for a balancer's or a relay's
# recovery (docs/monitoring.md lists them).
RECOVERIES = (
    # A reload that took effect: the running configuration is the one asked for.
    ("reload", "", "critical", "reload refused, the running configuration stays: "),
    # A pushed version applied: not any reload (a reload after a refusal runs the version
    # applied last, and would resolve the refusal it has just raised).
    ("info", "cluster: configuration version ", "critical", "cluster: configuration version "),
    ("info", "cluster: configuration version ", "critical", "cluster: cached configuration version "),
    # The records database (SQLite; PostgreSQL with [records] url) takes writes again.
    ("info", "records: the database takes writes again", "records", "database"),
    ("info", "records: the shared records database (PostgreSQL) takes writes again", "records", "shared database"),
    # The shared state answers a receiver again.
    ("info", "connection gauge available again", "critical", "connection gauge unavailable "),
    ("info", "shared state: the connection counts of SMTP receiver pid ", "critical",
     "shared state unavailable: the connection counts of SMTP receiver pid "),
)
UNDELIVERED = "alert-mail-undelivered"  # poll_events: a bounced or expired alert mail (not an event kind)
UNDELIVERED_STATE = "undelivered"  # the alert event of such a mail (kanmon alert list)

RECOVERY_KINDS = tuple(dict.fromkeys(kind for kind, *_ in RECOVERIES))

SUBJECT_SUMMARY_MAX = 100  # characters of the text's first line in the Subject

LOOK_CLOSER = {
    "critical": "kanmon log events --since 1h --grep error",
    "disk": "df -h {data_dir}; kanmon queue summary",
    "queue": "kanmon queue summary",
    "delivery": "kanmon log events --since 1h --grep 'trying next server'",
    "ha": "kanmon balance status",
    "archive": "kanmon alert list",
    "expiry": "kanmon alert list",
    "dns": "kanmon dns check",
    "scanner": "kanmon log events --since 1h --grep scanner",
    "records": "tail {data_dir}/log/kanmon.log; ls -l {data_dir}/records.sqlite* {spill}",
}
CERT_LOOK_CLOSER = "openssl x509 -noout -subject -enddate -in {cert}"

STATE_FILE = "alert-state.json"
STATE_FORMAT = 2  # 1: test alerts were kept too, told apart by their key "test" (read still)
STATE_MAX_ALERTS = 1000  # the most recent ones are kept; older, inactive ones do not matter
LOST_AT_START = "this node started without its state (alert-state.json damaged, removed or not written)"
LOST_PRUNED = f"more alerts than the {STATE_MAX_ALERTS} the node keeps: the oldest is no longer followed"


@dataclass(slots=True)
class AlertState:
    category: str
    key: str
    text: str
    since: float
    last_sent: float | None = None
    active: bool = True
    last_seen: float = 0.0  # the last time it was raised (pruning of the saved state)
    resolved_sent: float | None = None  # the last "resolved" mail (one per interval)


class StateFileError(ValueError):
    """The saved alert state cannot be used (damaged, or not ours)."""


_STATE_FIELDS = {
    "category": str, "key": str, "text": str, "since": float, "last_sent": (float, type(None)),
    "active": bool, "last_seen": float, "resolved_sent": (float, type(None)),
}


def decode_state(raw: bytes) -> tuple[dict[tuple[str, str], AlertState], dict[str, str]]:
    """The alert state file -> (states by (category, key), failovers outstanding).

    Strict: any unknown or missing field, wrong type or unknown category is refused
    (StateFileError); nothing of a refused file is used. A format 1 file's alerts keyed
    "test" were the test button's (that format kept them): they are left out."""
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise StateFileError(f"not JSON: {e}") from None
    if not isinstance(doc, dict) or set(doc) != {"format", "alerts", "failover"}:
        raise StateFileError("not an alert state document")
    if doc["format"] not in (1, STATE_FORMAT) or isinstance(doc["format"], bool):
        raise StateFileError(f"unknown format {doc['format']!r}")
    if not isinstance(doc["alerts"], list) or not isinstance(doc["failover"], dict):
        raise StateFileError("alerts must be a list and failover an object")
    states: dict[tuple[str, str], AlertState] = {}
    for n, item in enumerate(doc["alerts"]):
        if not isinstance(item, dict) or set(item) != set(_STATE_FIELDS):
            raise StateFileError(f"alert {n}: fields are not {sorted(_STATE_FIELDS)}")
        for name, kind in _STATE_FIELDS.items():
            value = item[name]
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                item[name] = value = float(value)
            if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
                raise StateFileError(f"alert {n}: {name} has the wrong type")
        if item["category"] not in ALERT_CATEGORIES:
            raise StateFileError(f"alert {n}: unknown category {item['category']!r}")
        if (item["category"], item["key"]) in states:
            raise StateFileError(f"alert {n}: {item['category']}/{item['key']} is listed twice")
        if doc["format"] == 1 and item["key"] == "test":
            continue
        states[(item["category"], item["key"])] = AlertState(**item)
    failover: dict[str, str] = {}
    for dest, used in doc["failover"].items():
        if not isinstance(used, str):
            raise StateFileError(f"failover {dest!r}: not a server name")
        failover[dest] = used
    return states, failover


def encode_state(states: dict[tuple[str, str], AlertState], failover: dict[str, str]) -> bytes:
    alerts = [{name: getattr(st, name) for name in _STATE_FIELDS} for st in states.values()]
    return json.dumps({"format": STATE_FORMAT, "alerts": alerts, "failover": failover}, indent=1).encode()


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
        shared=None,
        previous: Alerts | None = None,
    ):
        """shared: the SharedState the nodes of a cluster share ([records] url): an alert
        another node mailed within the interval is not mailed again (one mail per
        incident for the cluster, naming the nodes that see it). None: this node alone.
        previous: the Alerts a reload replaces, whose state (in memory, newer than the
        file) goes on here; None: the state is read from the file."""
        self.config = config
        self.shared = shared
        self.node = config.records.node or config.server.hostname
        self.cfg = config.alerts
        self.records = records
        self.spool = spool
        self.queue = queue
        # Alert mail enters the queue like every message kanmon writes itself.
        self.injector = Injector(spool, records, queue.submit_nowait, hostname=config.server.hostname, clock=clock,
                                 signer=load_signer_lenient(config), expand=quiet_directory(config).expand)
        self.clock = clock
        self.cert_path = cert_path
        self.data_dir = Path(config.server.data_dir)
        self.free_disk = free_disk or (lambda: free_disk_bytes(str(self.data_dir)))
        self.stderr = stderr if stderr is not None else sys.stderr
        self.sender = self.cfg.from_ or f"kanmon@{config.server.hostname}"
        self.states: dict[tuple[str, str], AlertState] = {}
        self.failover: dict[str, str] = {}  # destination -> server in use instead of the first
        self.sent = 0
        self.checks = 0  # threshold rounds done (tests wait for it before moving the clock)
        # (category, key, subject, body, what to ask the cluster, recipients: None for [alerts] to)
        self._outbox: asyncio.Queue[tuple[str, str, str, str, str | None, list[str] | None]] | None = None
        self._previous: Alerts | None = None
        self._db_path = self.data_dir / "records.sqlite"
        # Before the state is loaded: a damaged state file's event comes after this id,
        # so the watcher mails it as a critical alert.
        self._last_event_id = self._max_event_id()
        self.state_path = self.data_dir / STATE_FILE
        self._state_changed: asyncio.Event | None = None
        self._state_lock = threading.Lock()
        self._state_version = 0  # bumped on each change; a write never replaces a newer one
        self._state_written = 0
        self._save_failed = False
        if previous is not None:
            # Copies: what the old one's last moments change (a check under way in its
            # thread) is not taken as mailed here, where its mail would never be sent.
            self.states = {k: replace(st) for k, st in previous.states.items()}
            self.failover = dict(previous.failover)
            self._last_event_id = previous._last_event_id  # the events it acted on, no more
            self._state_lock = previous._state_lock  # its last save may still be under way
            # Its mail not sent yet (queued, or waiting on the cluster's claim): sent by this
            # one, which starts with it (its state says those alerts were mailed).
            self._previous = previous
        else:
            self.load_state()
            self._forget_lost_states()

    # -- raising ------------------------------------------------------------------------

    def raise_alert(self, category: str, key: str, text: str, *, force: bool = False, look: str | None = None) -> bool:
        """Note an alert; mail it unless the same one was mailed within min_interval.

        Returns whether a mail is on its way. force: ignore the rate limit and the
        category list (the test button). look: the command to look closer (default: the
        category's). Safe to call from the event loop's thread only.
        """
        if category not in ALERT_CATEGORIES:
            category = "critical"
        now = self.clock.now()
        st = self.states.get((category, key))
        if st is None or not st.active:  # a new episode; the rate limit spans episodes (flapping)
            st = AlertState(category, key, text, since=now, last_sent=st.last_sent if st else None,
                            resolved_sent=st.resolved_sent if st else None)
            self.states[(category, key)] = st
            self._state_dirty()
        # A repeat of an active alert changes only these: saved with the next change or at stop.
        st.text = text
        st.last_seen = now
        mailed = category in self.cfg.categories or force
        if not force and st.last_sent is not None and now - st.last_sent < self.interval(category):
            self._event(st, "suppressed")
            return False
        if not mailed:
            self._event(st, "raised", mailed=False)
            return False
        st.last_sent = now
        self._state_dirty()
        self._event(st, "raised")
        self._enqueue(category, key, self._subject(category, text), self._body(st, text, look), force)
        return True

    def test_alert(self, category: str, to: str = "") -> None:
        """The test button (`kanmon alert test`, the console, the API): a mail of `category`
        now, whatever the rate limit and the category list. It is no alert of the node's:
        its event says test (never active), and it keeps no state, so a real alert whose
        key is "test" (a scanner of that name) is neither hidden nor changed by it.
        to: an address to send it to instead of [alerts] to (`alert test --to`)."""
        if category not in ALERT_CATEGORIES:
            category = "critical"
        if to and not is_test_address(to):
            self._fallback(self._subject(category, f"test alert ({category})"), "",
                           f"--to {to!r} is not a mail address", test=True)
            return
        where = "you" if not to else f"<{to}>"
        text = (f"test alert ({category}) requested (`kanmon alert test`, the console or the API): "
                f"if you read this, alert mail reaches {where}")
        st = AlertState(category, "test", text, since=self.clock.now())
        self.records.record(Alert(category, "test", "raised", st.since, text, test=True))
        subject, body = self._subject(category, text), self._body(st, text, test=True)
        if self._outbox is None:  # not running (tests driving it by hand): log only
            self._fallback(subject, body, "alerts not running", test=True)
            return
        self._outbox.put_nowait((category, "test", subject, body, "test", [to] if to else None))

    def clear(self, category: str, key: str, text: str, *, mail: bool = False) -> None:
        """The condition is over. mail: say so by mail (delivery and ha recoveries do)."""
        st = self.states.get((category, key))
        if st is None or not st.active:
            return
        st.active = False
        self._state_dirty()
        self._event(st, "cleared", summary=_first(text))
        now = self.clock.now()
        last = st.resolved_sent
        if mail and last is not None and now - last < self.interval(category):
            return  # a flapping server: one "resolved" mail per interval too
        if mail and category in self.cfg.categories:
            st.resolved_sent = now
            self._state_dirty()
            body = (f"Resolved: {text}\n\nThe problem began {_stamp(st.since)}; resolved {_stamp(self.clock.now())}.\n"
                    f"\nTo look closer: {self._command(category)}\n")
            self._enqueue_resolved(category, key, self._subject(category, "resolved: " + _first(text)), body)

    def incident(self, category: str, key: str, text: str, resolved: bool = False) -> None:
        """An incident of a source that knows its own keys (the balancer): `resolved`
        ends the incident of that key with a "resolved" mail."""
        if resolved:
            self.clear(category, key, text, mail=True)
        else:
            self.raise_alert(category, key, text)

    def current(self) -> list[AlertState]:
        """The alerts active now (`kanmon status`, the cluster heartbeat). A critical
        alert is an error event: unless a recovery event clears it (RECOVERIES), it counts
        while a repeat would still be suppressed ([alerts] min_interval), not forever."""
        now = self.clock.now()
        return [st for st in self.states.values() if st.active and (
            st.category != "critical" or now - st.last_seen < self.interval(st.category))]

    def interval(self, category: str) -> float:
        """The same alert is mailed at most once per this."""
        return self.cfg.expiry_every if category == "expiry" else self.cfg.min_interval

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
            if self.failover.get(destination) != used:
                self.failover[destination] = used
                self._state_dirty()
            self.raise_alert(
                "delivery", f"failover {destination}",
                f"relay failover: {failed[0][0]} did not take mail; alternate {used} is in use\n"
                f"Servers of this route, in order: {destination}\nFailed: {tried}",
            )
        elif destination in self.failover:
            was = self.failover.pop(destination)
            self._state_dirty()
            self.clear("delivery", f"failover {destination}",
                       f"relay recovered: the first server {used} takes mail again (alternate {was} no longer needed)",
                       mail=True)

    def check_now(self) -> None:
        """Threshold checks: disk, queue, deferred ratio, expiry (blocking: in a thread)."""
        checks = (self._check_disk, self._check_queue, self._check_ratio, self._check_expiry, self._check_archive_quota)
        for check in checks:
            try:
                check()
            except Exception as e:  # noqa: BLE001 - one broken check must not stop the others
                self.records.emit(f"alerts: {check.__name__[7:]} check failed: {type(e).__name__}: {e}")

    def _check_archive_quota(self) -> None:
        archive = self.config.archive
        if archive.maildir is None or archive.quota is None:
            return
        from kanmon.archive.store import directory_size  # noqa: PLC0415 - only with an archive

        self._call_soon(self.check_archive, directory_size(archive.maildir), archive.quota, str(archive.maildir))

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
        # Messages the administrator put on hold wait on purpose: they are counted apart.
        now = self.clock.now()
        age = now - snap.oldest_waiting if snap.oldest_waiting is not None else 0.0
        held = snap.counts.get("hold", 0)
        held_text = ""
        if held:
            held_age = format_duration(max(0.0, now - (snap.oldest_held or now)))
            held_text = (f"\n{held} message(s) on hold are not counted (the oldest held for {held_age}): "
                         "kanmon queue list --state hold")
        if age > self.cfg.queue_oldest_above:
            self._call_soon(self.raise_alert, "queue", "oldest",
                            f"the oldest message not on hold ({snap.oldest_waiting_id}) has waited {format_duration(age)}, "
                            f"above the threshold {format_duration(self.cfg.queue_oldest_above)}{held_text}\n"
                            f"To see its history: kanmon trace {snap.oldest_waiting_id}")
        else:
            self._call_soon(self.clear, "queue", "oldest", f"oldest message not on hold waited {format_duration(age)}")

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

    def _check_expiry(self) -> None:
        """Our certificate, our DKIM key, the administrator's reminders."""
        self._check_cert()
        self._check_dkim_key()
        self._check_reminders()

    def _check_cert(self) -> None:
        if self.cert_path is None or not Path(self.cert_path).exists():
            return
        key = f"certificate {self.cert_path}"
        not_after = cert_not_after(self.cert_path).timestamp()
        left = not_after - self.clock.now()
        if left < self.cfg.cert_expires_within:
            what = "expired" if left <= 0 else f"expires in {format_duration(left)}"
            self._call_soon(partial(
                self.raise_alert, "expiry", key,
                f"our TLS certificate {what}\nCertificate: {self.cert_path}\n"
                f"Not after: {_stamp(not_after)} (threshold {format_duration(self.cfg.cert_expires_within)})",
                look=CERT_LOOK_CLOSER.format(cert=self.cert_path)))
        else:
            self._call_soon(self.clear, "expiry", key, "certificate renewed")

    def _check_dkim_key(self) -> None:
        """[dnscheck] dkim_key and the active [[dkim]] signing keys."""
        paths = [self.config.dnscheck.dkim_key] if self.config.dnscheck.dkim_key is not None else []
        paths += [self.config.dkim_key_path(d) for d in self.config.dkim if d.active]
        for path in dict.fromkeys(paths):
            self._check_dkim_key_file(path)

    def _check_dkim_key_file(self, path: Path) -> None:
        limit = self.cfg.dkim_rotate_after
        if limit is None:
            return
        key = f"DKIM key {path}"
        try:
            made = Path(path).stat().st_mtime
        except OSError as e:
            self._call_soon(self.raise_alert, "expiry", key, f"our DKIM key cannot be read: {e.strerror or e}\nKey: {path}")
            return
        age = self.clock.now() - made
        if age > limit:
            self._call_soon(partial(
                self.raise_alert, "expiry", key,
                f"our DKIM key is due for rotation: it is {format_duration(age)} old, rotation every "
                f"{format_duration(limit)}\nKey: {path} (written {_stamp(made)})\n"
                "Make a new key under a new selector, publish it, sign with it, then retire the old one.",
                look=f"ls -l {path}; kanmon dns check"))
        else:
            self._call_soon(self.clear, "expiry", key, "DKIM key rotated")

    def _check_reminders(self) -> None:
        now = self.clock.now()
        keys = set()
        for r in self.cfg.reminder:
            key = f"reminder {r.what}"
            keys.add(key)
            due = time.mktime(r.due.timetuple())  # the day begins, local time
            left = due - now
            if left > r.before:
                self._call_soon(self.clear, "expiry", key, f"reminder {r.what}: due {r.due.isoformat()}, not yet")
                continue
            when = f"in {format_duration(left)}" if left > 0 else f"overdue since {format_duration(-left)}"
            self._call_soon(partial(
                self.raise_alert, "expiry", key,
                f"reminder: {r.what}: due {r.due.isoformat()} ({when})\n"
                f"Set in [[alerts.reminder]] of the configuration (reminding {format_duration(r.before)} before); "
                "remove it there and reload when it is done.",
                look="the [[alerts.reminder]] tables of the configuration file"))
        self._call_soon(self._clear_reminders_not_in, keys)

    def _clear_reminders_not_in(self, keys: set[str]) -> None:
        """A reminder taken out of the configuration is over."""
        for (category, key), st in list(self.states.items()):
            if category == "expiry" and key.startswith("reminder ") and key not in keys and st.active:
                self.clear(category, key, f"{key}: no longer in the configuration")

    def check_archive(self, used: int, quota: int, where: str) -> None:
        """The archive store's hook: `used` of `quota` bytes in use at `where` (event loop's thread)."""
        if quota > 0 and used / quota > self.cfg.archive_used_above:
            self.raise_alert("archive", where,
                             f"the archive uses {format_size(used)} of its quota {format_size(quota)} "
                             f"({used / quota:.0%}, threshold {self.cfg.archive_used_above:.0%})\nArchive: {where}")
        else:
            self.clear("archive", where, f"the archive uses {format_size(used)} of {format_size(quota)}")

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

    def poll_events(self) -> tuple[list[tuple[str, str | None, str, str | None]], int]:
        """(new error/critical events and alert requests since the last look, the id
        they run up to) (blocking). The watcher moves on to that id once it has acted on
        them (a reload's Alerts goes on from there: nothing is skipped or done twice)."""
        if not self._db_path.exists():
            return [], self._last_event_id
        db = sqlite3.connect(f"file:{self._db_path}?mode=ro", uri=True, timeout=10)
        try:
            top = db.execute("SELECT max(id) FROM events").fetchone()[0] or 0
            recoveries = " OR ".join("(kind = ? AND instr(text, ?) = 1)" for _ in RECOVERIES)
            rows = db.execute(
                "SELECT kind, queue_id, text, detail FROM events WHERE id > ? AND id <= ?"
                f" AND (kind IN ({', '.join('?' * len(WATCHED_KINDS))}) OR {recoveries}) ORDER BY id",
                (self._last_event_id, top, *WATCHED_KINDS,
                 *(x for kind, start, _c, _k in RECOVERIES for x in (kind, start))),
            ).fetchall()
            # Alert mail (its alert-mail event has its queue id) that bounced or expired:
            # from <>, nobody else hears of it.
            rows += [(UNDELIVERED, qid, delivery, mailed) for qid, delivery, mailed in db.execute(
                "SELECT d.queue_id, d.detail, m.detail FROM events d JOIN events m"
                " ON m.queue_id = d.queue_id AND m.kind = ? WHERE d.id > ? AND d.id <= ? AND d.kind = 'delivery'"
                " AND json_extract(d.detail, '$.status') = ? ORDER BY d.id",
                (AlertMailed.KIND, self._last_event_id, top, BOUNCED),
            ).fetchall()]
        finally:
            db.close()
        return rows, top

    def _on_event(self, kind: str, qid: str | None, text: str, detail: str | None = None) -> None:
        if kind == UNDELIVERED:
            self.undelivered(qid or "", text, detail)
            return
        if kind == AlertRequest.KIND:
            try:
                request = json.loads(detail or "{}")
                category = str(request.get("category") or "critical")
                to = str(request.get("to") or "")
            except (ValueError, AttributeError):
                category, to = "critical", ""
            self.test_alert(category, to)
            return
        if kind in (ScannerFailed.KIND, ScannerRecovered.KIND):
            scanner = text.split(" ", 2)[1] if text.startswith("scanner ") else "scanner"
            if kind == ScannerFailed.KIND:
                self.raise_alert("scanner", scanner, f"{text}\nMail is answered by each content profile's scanner_failure"
                                 " (451 with tempfail, a header with accept_and_tag) until it answers again.")
            else:
                self.clear("scanner", scanner, text)
            return
        if kind not in WATCHED_KINDS:  # a recovery (RECOVERIES)
            self._recovered(kind, text)
            return
        where = f"{qid}: " if qid else ""
        key = critical_key(text)
        look = f"\nTo see the message's history: kanmon trace {qid}" if qid else ""
        self.raise_alert("critical", key, f"{'critical' if kind == 'critical' else 'error'} event: {where}{text}{look}")

    def undelivered(self, qid: str, delivery: str, mailed: str | None) -> None:
        """An alert mail that bounced or expired (its delivery event's and its
        alert-mail event's fields, as JSON): an alert-not-mailed event and an alert event
        of state "undelivered" (`kanmon alert list`, the console; it does not change
        whether the alert is active), and a line on stderr. Never an error event: its
        alert would be mailed to the same address and bounce again."""
        try:
            d, m = json.loads(delivery or "{}"), json.loads(mailed or "{}")
        except ValueError:
            return
        if not isinstance(d, dict) or not isinstance(m, dict):
            return
        category = str(m.get("category") or "critical")
        key, subject, test = str(m.get("key") or ""), str(m.get("subject") or ""), m.get("test") is True
        note = f" ({d['note']})" if d.get("note") else ""
        why = f"not delivered to <{d.get('rcpt', '')}>: {d.get('reply', '')}{note}"
        self.records.record(AlertNotMailed(why, subject, test), qid or None)
        st = self.states.get((category, key))
        if category in ALERT_CATEGORIES:
            text = st.text if st and not test else subject
            self.records.record(Alert(category, key, UNDELIVERED_STATE, st.since if st and not test else self.clock.now(),
                                      f"alert mail {qid} {why}\n{text}", f"alert mail {qid} {why}",
                                      last_sent=st.last_sent if st else None, test=test), qid or None)
        try:
            print(for_log(f"kanmon: ALERT mail {qid} {why}: {subject}"), file=self.stderr, flush=True)  # a remote's reply
        except (OSError, ValueError):
            pass

    def _recovered(self, kind: str, text: str) -> None:
        """A recovery event: the active alerts it ends are resolved (RECOVERIES)."""
        for rkind, start, category, key_start in RECOVERIES:
            if kind != rkind or not text.startswith(start):
                continue
            if category == "critical":
                key_start = critical_key(key_start)
            for (cat, key), st in list(self.states.items()):
                if cat == category and key.startswith(key_start) and st.active:
                    self.clear(cat, key, f"{text}\nThe alert it resolves: {_first(st.text)}", mail=True)

    # -- running --------------------------------------------------------------------------

    async def run(self) -> None:
        """The sender, the event watcher and the threshold checks (until cancelled)."""
        self._outbox = asyncio.Queue()
        previous, self._previous = self._previous, None
        if previous is not None and previous._outbox is not None:
            while not previous._outbox.empty():
                self._outbox.put_nowait(previous._outbox.get_nowait())
        self._loop = asyncio.get_running_loop()
        self._state_changed = asyncio.Event()
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._sender())
                tg.create_task(self._watch_events())
                tg.create_task(self._checks())
                tg.create_task(self._save_state_loop())
        finally:
            self._state_changed = None
            self.save_state()  # at stop (and reload): what changed since the last write

    async def _checks(self) -> None:
        while True:
            await asyncio.to_thread(self.check_now)
            self.checks += 1  # no await between this and the sleep below registering
            await self.clock.sleep(CHECK_INTERVAL)

    async def _watch_events(self) -> None:
        while True:
            try:
                rows, top = await asyncio.to_thread(self.poll_events)
                for kind, qid, text, detail in rows:
                    self._on_event(kind, qid, text, detail)
                self._last_event_id = max(self._last_event_id, top)
            except sqlite3.Error as e:
                print(f"kanmon: alerts cannot read the records: {e}", file=self.stderr)
            await asyncio.sleep(EVENT_POLL)

    async def _sender(self) -> None:
        assert self._outbox is not None
        while True:
            category, key, subject, body, ask, rcpts = await self._outbox.get()
            shared = self.shared if self.cfg.to else None  # nothing to mail: no claim on the cluster's mail
            if ask == "claim" and shared is not None:
                body = await self._claim(category, key, subject, body)
            elif ask == "resolve" and shared is not None:
                body = await self._resolve(category, key, subject, body)
            if body is None:
                continue
            await self.send(category, key, subject, body, test=ask == "test", to=rcpts)

    async def _claim(self, category: str, key: str, subject: str, body: str) -> str | None:
        """The body to mail (naming the nodes that see the alert), or None when another
        node of the cluster mailed it within the interval. When the shared state does not
        answer, the alert is mailed (twice rather than never)."""
        shared = self.shared
        try:
            claim = await shared.submit(shared.alert_claims.claim, category, key, self.node, self.clock.now(),
                                        self.interval(category))
        except Exception as e:  # noqa: BLE001 - the shared state is down: mail it from here
            return body + f"\nSeen by: {self.node} (the other nodes could not be asked: {_first(str(e))})\n"
        if not claim.mail:
            self.records.record(AlertNotMailed(f"mailed by node {claim.mailed_by} within the interval", subject))
            return None
        return body + f"\nSeen by: {', '.join(claim.nodes)}\n"

    async def _resolve(self, category: str, key: str, subject: str, body: str) -> str | None:
        """The "resolved" body to mail (naming the nodes that saw the incident), or None
        when another node still sees it (the last one to see it end mails) or this
        incident's "resolved" was mailed already. When the shared state does not answer,
        it is mailed from here."""
        shared = self.shared
        try:
            r = await shared.submit(shared.alert_claims.resolve, category, key, self.node, self.clock.now(),
                                    self.interval(category))
        except Exception as e:  # noqa: BLE001 - the shared state is down: mail it from here
            return body + f"\nSeen by: {self.node} (the other nodes could not be asked: {_first(str(e))})\n"
        if not r.mail:
            why = (f"resolved on node {self.node}; still seen by {', '.join(r.still)}" if r.still
                   else "resolved mail of this incident sent already")
            self.records.record(AlertNotMailed(why, subject))
            return None
        return body + f"\nSeen by: {', '.join(r.nodes)}\n"

    # -- the saved state ---------------------------------------------------------------

    def load_state(self) -> None:
        """Read <data_dir>/alert-state.json; a damaged file is moved aside with an event."""
        try:
            raw = self.state_path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as e:
            self.records.record(Critical(f"alerts: cannot read {self.state_path}: {e.strerror or e}; "
                                         "starting without the saved alert state"))
            return
        try:
            self.states, self.failover = decode_state(raw)
        except StateFileError as e:
            aside = self.state_path.with_name(f"{STATE_FILE}.damaged-{time.strftime('%Y%m%d%H%M%S')}")
            try:
                os.replace(self.state_path, aside)
                where = f"moved to {aside.name}"
            except OSError as err:
                where = f"could not be moved aside ({err.strerror or err})"
            self.records.record(Critical(f"alerts: the saved alert state {self.state_path} is damaged ({e}); it "
                                         f"{where}; alerts start afresh and may be mailed again"))

    def _forget_lost_states(self) -> None:
        """Alerts this node's events show active but whose state it no longer has (the
        state file was damaged, removed or not yet written) would stay active in `kanmon
        alert list` until a later event of theirs, which a check that finds all well
        never makes (it clears only what it knows). Each gets an "unknown" event: not
        active; raised again (and mailed) by its source if it still holds."""
        try:
            _recent, active = recent_alerts(self.data_dir, float("inf"))
        except sqlite3.Error as e:
            self.records.emit(f"alerts: cannot read the alert events back: {e}", kind="error")
            return
        for r in active:
            st = self.states.get((r.category, r.key))
            if r.category != "critical" and (st is None or not st.active):
                self._forget(AlertState(r.category, r.key, r.text, r.since), LOST_AT_START)

    def _forget(self, st: AlertState, why: str) -> None:
        self._event(st, "unknown", summary=f"{why}; raised again if it still holds")

    def _state_dirty(self) -> None:
        self._state_version += 1
        if self._state_changed is not None:
            self._state_changed.set()

    def _state_document(self) -> tuple[int, bytes]:
        """The state to write, pruned (event loop's thread): active alerts, and those
        whose rate limit still runs; at most STATE_MAX_ALERTS, the most recent."""
        now = self.clock.now()

        def recent(st: AlertState) -> bool:
            last = max(st.last_seen, st.last_sent or 0.0, st.resolved_sent or 0.0)
            return now - last < self.interval(st.category)

        keep = [st for st in self.states.values() if recent(st) or (st.active and st.category != "critical")]
        keep.sort(key=lambda st: max(st.last_seen, st.last_sent or 0.0), reverse=True)
        for st in keep[STATE_MAX_ALERTS:]:
            if st.active and st.category != "critical":  # a critical one is active for its interval only
                self._forget(st, LOST_PRUNED)
        self.states = {(st.category, st.key): st for st in reversed(keep[:STATE_MAX_ALERTS])}
        return self._state_version, encode_state(self.states, self.failover)

    def save_state(self) -> None:
        """Write the state now (blocking; at stop, and in tests)."""
        self._write_state(*self._state_document())

    def _write_state(self, version: int, data: bytes) -> None:
        with self._state_lock:
            if version < self._state_written:
                return  # a newer state is on disk already
            tmp = self.state_path.with_name(f".{STATE_FILE}.{os.getpid()}.tmp")
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                try:
                    os.write(fd, data)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.replace(tmp, self.state_path)
                self._state_written = version
                self._save_failed = False
            except OSError as e:
                if not self._save_failed:  # once until a save works: its alert would change the state again
                    self._save_failed = True
                    self.records.emit(f"alerts: cannot save the alert state to {self.state_path}: {e.strerror or e}",
                                      kind="error")

    async def _save_state_loop(self) -> None:
        assert self._state_changed is not None
        while True:
            await self._state_changed.wait()
            self._state_changed.clear()
            await asyncio.to_thread(self._write_state, *self._state_document())

    def _call_soon(self, fn, *args) -> None:
        """From the check thread into the event loop's thread."""
        loop = getattr(self, "_loop", None)
        if loop is None:
            fn(*args)
        else:
            loop.call_soon_threadsafe(fn, *args)

    def _enqueue(self, category: str, key: str, subject: str, body: str, force: bool) -> None:
        """force: a mail that is always sent (the test button, a "resolved" mail); the
        others are raised alerts, mailed by one node of a cluster (self.shared)."""
        if self._outbox is None:  # not running (tests driving it by hand): log only
            self._fallback(subject, body, "alerts not running")
            return
        self._outbox.put_nowait((category, key, subject, body, None if force else "claim", None))

    def _enqueue_resolved(self, category: str, key: str, subject: str, body: str) -> None:
        """A "resolved" mail: one for the cluster's incident (self.shared), sent by the
        last node that saw it end; alone, always."""
        if self.shared is None or self._outbox is None:
            self._enqueue(category, key, subject, body, True)
            return
        self._outbox.put_nowait((category, key, subject, body, "resolve", None))

    async def send(self, category: str, key: str, subject: str, body: str, *, test: bool = False,
                   to: list[str] | None = None) -> str | None:
        """Queue one alert mail; its queue id, or None when it went to log and stderr.
        test: the test button's (its events say so). to: instead of [alerts] to (a test's --to)."""
        rcpts = list(to or self.cfg.to)
        if not rcpts:
            self._fallback(subject, body, "no [alerts] to", test=test)
            return None
        now = self.clock.now()
        hostname = self.config.server.hostname
        msg = EmailMessage(policy=email.policy.SMTP)  # CRLF, encoded words, folded headers
        msg["From"] = f"kanmon on {hostname} <{self.sender}>"  # [alerts] from: the header only
        msg["To"] = ", ".join(rcpts)
        msg["Subject"] = re.sub(r"[\r\n\t]+", " ", subject)  # event text never makes a header of its own
        msg["Date"] = format_datetime(datetime.datetime.fromtimestamp(now).astimezone())
        msg["Message-ID"] = make_msgid("alert", domain=hostname)
        msg["Auto-Submitted"] = "auto-generated"  # RFC 3834
        msg["X-Kanmon-Alert"] = category
        msg.set_content(body)
        content = msg.as_bytes()
        # From <>, as DSNs are (and FortiMail's and Postfix's notices to the postmaster):
        # a store that refuses our own domain as sender from a host outside its
        # relay_networks (sender_spoof) takes it, and nothing ever answers an alert with
        # a bounce. Whether it arrived is followed by its delivery events (undelivered()).
        env = Envelope(mail_from="", rcpts=rcpts, received_at=now, is_notice=True)
        try:
            qid = await self.injector.inject(env, content, "alert")
        except Exception as e:  # noqa: BLE001 - the queue cannot take it: log and stderr
            self._fallback(subject, body, f"queue refused it: {e}", test=test)
            return None
        self.records.record(AlertMailed(category, key, subject, test), qid)
        self.sent += 1
        return qid

    def _fallback(self, subject: str, body: str, why: str, *, test: bool = False) -> None:
        self.records.record(AlertNotMailed(why, subject, test))
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
        # The records' journals: the local SQLite's, and with [records] url PostgreSQL's.
        spill = [self.data_dir / "records-spill"]
        if self.config.records.url:
            spill.append(self.data_dir / "records-spill-postgresql")
        return LOOK_CLOSER[category].format(data_dir=self.data_dir, spill=" ".join(map(str, spill)))

    def _body(self, st: AlertState, text: str, look: str | None = None, *, test: bool = False) -> str:
        every = format_duration(self.interval(st.category))
        if not test:
            how = f"This alert is mailed at most once every {every} while it lasts;\n"
        elif st.category in self.cfg.categories:
            how = f"Real {st.category} alerts are mailed at most once every {every} while they last;\n"
        else:  # the test button mails any category; its real alerts would not be
            how = (f"Real {st.category} alerts are NOT mailed: {st.category} is not in [alerts] categories "
                   "(add it there and reload to have them mailed);\nthey are recorded all the same:\n")
        return (
            f"What happened: {text}\n\n"
            f"Since: {_stamp(st.since)}\n"
            f"Category: {st.category}\n"
            f"Server: {self.config.server.hostname}\n\n"
            f"To look closer: {look or self._command(st.category)}\n\n"
            f"{how}"
            "`kanmon alert list` shows recent alerts and which are still active.\n"
        )


def _first(text: str) -> str:
    return text.split("\n", 1)[0]


TITLE_MAX = 160  # characters of an alert's line in `alert list`, `kanmon status`, `cluster status`


def shorten(text: str, limit: int) -> str:
    """`text` cut to at most `limit` characters, the cut marked with "...": at the last
    space if there is one in the last third, else within the word."""
    if len(text) <= limit:
        return text
    cut = text[: max(limit - 3, 1)]
    space = cut.rfind(" ")
    if space >= len(cut) * 2 // 3:
        cut = cut[:space]
    return cut.rstrip(" ,;:") + "..."


def alert_title(category: str, key: str, text: str, limit: int = TITLE_MAX) -> str:
    """An alert as a list shows it: the first line of its latest text, shortened. A
    critical alert's key is that text masked and cut (critical_key, for matching), never
    shown; another's key is shown before the line unless the line begins with it and a colon.
    Not escaped: the caller shows it through kanmon.escape (the text may hold network data)."""
    line = _first(text)
    if category != "critical" and key and not line.startswith(f"{key}:"):
        line = f"{key}: {line}" if line else key
    return shorten(line or key, limit)


def critical_key(text: str) -> str:
    """The key of a critical alert raised from an error event's line: queue ids and
    numbers masked, so that the same failure again (another message, port or pid) is the
    same alert, and cut to 80 characters. A key, never a text to show (alert_title)."""
    return re.sub(r"[0-9A-Z]{15}|\d+", "#", text)[:80]


# ---------------------------------------------------------------------------
# Reading alerts back (kanmon alert list)


INACTIVE = ("cleared", "unknown")  # an alert whose latest event is one of these is not active


@dataclass(slots=True)
class AlertRecord:
    ts: float
    category: str
    key: str
    state: str  # raised | suppressed | cleared | unknown (the node lost its state) | undelivered (its mail bounced)
    since: float
    text: str
    node: str = ""  # the node that saw it (shared records); "" for this node's own records
    test: bool = False  # the test button's (kanmon alert test): never active


def _fold_alerts(rows, since: float = 0.0) -> tuple[list[AlertRecord], list[AlertRecord]]:
    """Alert events (ts, detail as JSON text or a dict, node), oldest first, all of them:
    (those since `since`; the alerts active now, per node, however long ago they began)."""
    out: list[AlertRecord] = []
    latest: dict[tuple[str, str, str], AlertRecord] = {}
    for ts, detail, node in rows:
        try:
            d = detail if isinstance(detail, dict) else json.loads(detail or "{}")
        except ValueError:
            continue
        if not isinstance(d, dict):
            continue
        key = str(d.get("key", ""))
        # The test button's event says so; before it did, its key "test" was all there was.
        test = d["test"] if isinstance(d.get("test"), bool) else key == "test"
        rec = AlertRecord(ts, str(d.get("category", "")), key, str(d.get("state", "")),
                          d.get("since", ts), str(d.get("text", "")), node or "", test)
        if rec.ts >= since:
            out.append(rec)
        # A test's event, nor an undelivered mail's, ends a real alert of the same key.
        if not test and rec.state != UNDELIVERED_STATE:
            latest[(rec.node, rec.category, rec.key)] = rec
    # A critical alert is an error event, which only a recovery event clears (RECOVERIES):
    # otherwise active within the window only (kanmon status likewise counts it for [alerts] min_interval), not for ever.
    active = [r for r in latest.values() if r.state not in INACTIVE
              and (r.category != "critical" or r.ts >= since)]
    return out, active


def recent_alerts(data_dir: Path, since: float) -> tuple[list[AlertRecord], list[AlertRecord]]:
    """This node's own records: (every alert event since `since`, oldest first; the
    alerts active now)."""
    path = Path(data_dir) / "records.sqlite"
    if not path.exists():
        return [], []
    from kanmon.records.stats import connect_records

    db = connect_records(Path(data_dir))
    assert db is not None
    try:
        # INDEXED BY: the plan must not depend on ANALYZE, whose statistics see one kind
        # in a million rows as unselective and scan the table (docs/monitoring.md).
        # Every alert event, not only those since `since`: an alert still active began
        # before any window (alert events are few; the records' retention bounds them).
        try:
            rows = db.execute("SELECT ts, detail, '' FROM events INDEXED BY events_kind_ts"
                              " WHERE kind = 'alert' ORDER BY id").fetchall()
        except sqlite3.OperationalError:  # a read-only database of a version without the index
            rows = db.execute("SELECT ts, detail, '' FROM events WHERE kind = 'alert' ORDER BY id").fetchall()
    finally:
        db.close()
    return _fold_alerts(rows, since)


def cluster_alerts(section, since: float, node: str | None = None) -> tuple[list[AlertRecord], list[AlertRecord]]:
    """recent_alerts over the shared records ([records] url): every node's, each with its
    node (node: only that one's); active per node. psycopg.Error when the database
    cannot be read."""
    from kanmon.records import pgquery

    return _fold_alerts(pgquery.alert_events(section, 0.0, node), since)  # as recent_alerts: active from all


def read_alerts(config: Config, since: float, node: str | None = None) -> tuple[list[AlertRecord], list[AlertRecord]]:
    """The alerts `kanmon alert list` and the console show: every node's from the shared
    records when [records] url is set, else this node's own."""
    if config.records.url:
        return cluster_alerts(config.records, since, node)
    return recent_alerts(config.server.data_dir, since)


# ---------------------------------------------------------------------------
# The test button (kanmon alert test)


def is_test_address(address: str) -> bool:
    """An address `kanmon alert test --to` may send to: one mailbox, local@domain, as
    RCPT TO takes it (no source route, no control characters), ASCII."""
    from kanmon.model import SmtpError
    from kanmon.smtp.address import parse_path

    if not address or "<" in address or ">" in address or not address.isascii():
        return False
    try:
        path = parse_path(f"<{address}>", is_sender=False, smtputf8_allowed=False, strict=True)
    except SmtpError:
        return False
    return bool(path.address) and "@" in path.address and not path.domain.startswith("[")


def request_test_alert(data_dir: Path, category: str, wait: float, to: str = "") -> str | None:
    """Ask the running server to mail a test alert, and wait up to `wait` seconds for it.

    The request is an AlertRequest event in records.sqlite; the server's
    watcher (poll_events) picks it up. Returns the server's event line about the mail
    ("alert mail (...) queued: ... (queue id Q)" or "alert not mailed (...): ..."), or None
    when no server answered in time. FileNotFoundError: there are no records in data_dir.
    """
    from kanmon.records.store import open_db

    path = Path(data_dir) / "records.sqlite"
    if not path.exists():
        raise FileNotFoundError(path)
    db = open_db(path)
    try:
        with db:
            request = AlertRequest(category, to)
            cur = db.execute(
                "INSERT INTO events(ts, queue_id, kind, text, detail) VALUES (?, NULL, ?, ?, ?)",
                (time.time(), request.KIND, request.line(), json.dumps(request.fields())),
            )
            request_id = cur.lastrowid
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            row = db.execute(
                "SELECT text, queue_id FROM events WHERE id > ? AND kind = ? AND json_extract(detail, '$.category') = ?"
                " AND json_extract(detail, '$.test') ORDER BY id LIMIT 1",
                (request_id, AlertMailed.KIND, category),
            ).fetchone() or db.execute(
                "SELECT text, queue_id FROM events WHERE id > ? AND kind = ? AND json_extract(detail, '$.test')"
                " ORDER BY id LIMIT 1",
                (request_id, AlertNotMailed.KIND),
            ).fetchone()
            if row:
                return row[0] + (f" (queue id {row[1]})" if row[1] else "")
            time.sleep(0.2)  # a command waiting for another process: there is no clock to advance
    finally:
        db.close()
    return None


def wait_alert_delivery(data_dir: Path, queue_id: str, wait: float) -> tuple[str, bool]:
    """The delivery of a test alert's mail, as `kanmon trace` says it ("delivered to ...",
    "bounced for ... (reply)", "in the queue, deferred for ..."), waiting up to `wait`
    seconds for it to leave the queue: (that text, whether it left the queue)."""
    from kanmon.records.trace import trace

    deadline = time.monotonic() + wait
    while True:
        timelines = trace(Path(data_dir), queue_id)
        t = timelines[0] if timelines else None
        if t is not None and any(s.kind == "removed" for s in t.steps):
            return t.final, True
        if time.monotonic() >= deadline:
            return (t.final if t is not None else "not in the records yet"), False
        time.sleep(0.2)  # a command waiting for another process: there is no clock to advance
