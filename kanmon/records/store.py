"""Records: the event log and the message history, in SQLite (WAL) in data_dir.

Role: every stage writes here; nothing reads it to make delivery decisions (DESIGN.md).
Writes are queued in memory and committed in batches by one writer thread, off the
mail path; event lines also go to stdout (when asked) and to <data_dir>/log/kanmon.log.

When the database refuses a batch (locked past BUSY_TIMEOUT, deleted, damaged, disk
full), the plain log line has already been written (the last resort, DESIGN.md promise
9); the batch's rows go to a durable spill journal, <data_dir>/records-spill/<pid>.jsonl
(one JSON line per batch, fsynced), and are written to the database, in order, as soon
as it takes writes again; the node replays what other processes left there at its start.
A missing or replaced database file is reopened (recreated empty, with an error event).
on_failure(text) is told once per outage (the node raises a `records` alert).
With `[records] url`, each batch is also handed to kanmon.records.pg's Shipper, which
writes it to the shared records in PostgreSQL from a thread of its own (with its own
spill journal): this writer never waits for PostgreSQL.

Trusts: its callers. Text from the network (subjects, addresses) is stored as data,
never interpreted. Decoding of Subjects (raw Japanese bytes, MIME encoded-words) happens
here, in the writer thread, and a malformed header is recorded as readable as it gets,
never a crash.
Never: block the caller on disk I/O or wake a thread per line (emit() only appends to
a queue the writer drains every WRITE_INTERVAL); drop a batch the database refused.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import sqlite3
import sys
import threading
import time
from collections import deque
from pathlib import Path
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from kanmon.config import LogSection, RecordsSection

from kanmon.content.decode import decode_header_value
from kanmon.escape import for_log
from kanmon.model import Envelope, Reply
from kanmon.records.counters import add_counts
from kanmon.records.events import BALANCER_KIND, DNSCHECK_KIND, FREE_TEXT, AuthFailed, Critical, Error, Event, LoginFailed, Note, component
from kanmon.records.logsinks import LogFile, SyslogSender, syslog_stamp

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    ts REAL NOT NULL,
    queue_id TEXT,
    kind TEXT NOT NULL,
    text TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_ts ON events(ts);
CREATE INDEX IF NOT EXISTS events_queue_id ON events(queue_id);
CREATE TABLE IF NOT EXISTS history (
    id INTEGER PRIMARY KEY,
    ts REAL NOT NULL,
    client_ip TEXT,
    mail_from TEXT,
    rcpt TEXT,
    subject TEXT,
    message_id TEXT,
    size INTEGER,
    classification TEXT,
    disposition TEXT,
    queue_id TEXT,
    status TEXT,
    auth_user TEXT,
    updated REAL
);
CREATE INDEX IF NOT EXISTS history_ts ON history(ts);
CREATE INDEX IF NOT EXISTS history_queue_id ON history(queue_id, rcpt);
CREATE TABLE IF NOT EXISTS counters (
    pid INTEGER NOT NULL,
    name TEXT NOT NULL,
    value INTEGER NOT NULL,
    PRIMARY KEY (pid, name)
);
"""

# The history rows of a message accepted for delivery: `Accept`, and `Tag` (accepted with
# a Subject prefix); not `Quarantine`, `Discard` or `Reject`. What the stats count as a
# recipient (deferred, the top lists; SQLite and PostgreSQL alike).
ACCEPTED_DISPOSITIONS = ("Accept", "Tag")


def accepted_sql(column: str = "disposition") -> str:
    """SQL true for a row of ACCEPTED_DISPOSITIONS (column: the disposition's name there)."""
    return f"{column} IN ({', '.join(repr(d) for d in ACCEPTED_DISPOSITIONS)})"


ACCEPTED = accepted_sql()

# Columns added after the first release: (table, column, declaration). open_db adds the
# missing ones to an old database (docs/monitoring.md); old rows get the defaults, and the
# `first` flag is filled in once from the rows already there.
ADDED_COLUMNS = (
    ("events", "session", "TEXT"),
    ("events", "detail", "TEXT"),
    ("history", "helo", "TEXT"),
    ("history", "first", "INTEGER NOT NULL DEFAULT 0"),
    ("history", "deferrals", "INTEGER NOT NULL DEFAULT 0"),
)
ADDED_INDEXES = """
CREATE INDEX IF NOT EXISTS events_session ON events(session);
CREATE INDEX IF NOT EXISTS history_message_id ON history(message_id);
CREATE INDEX IF NOT EXISTS history_rcpt ON history(rcpt COLLATE NOCASE);
CREATE INDEX IF NOT EXISTS history_mail_from ON history(mail_from COLLATE NOCASE);
CREATE INDEX IF NOT EXISTS events_kind_ts ON events(kind, ts);
CREATE INDEX IF NOT EXISTS events_orig_rcpt ON events(lower(json_extract(detail, '$.orig_rcpt')))
    WHERE kind = 'delivery' AND instr(detail, '"orig_rcpt": ""') = 0 AND json_valid(detail)
    AND json_extract(detail, '$.orig_rcpt') != '';
"""


def migrate(db: sqlite3.Connection) -> None:
    """Bring an old records database up to the current schema (idempotent, safe when
    several processes open the database at the same time)."""
    for table, column, decl in ADDED_COLUMNS:
        have = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
        if column in have:
            continue
        try:
            with db:
                db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")
                if (table, column) == ("history", "first"):
                    db.execute(
                        "UPDATE history SET first = 1 WHERE id IN"
                        f" (SELECT min(id) FROM history WHERE {ACCEPTED} GROUP BY queue_id)"
                    )
        except sqlite3.OperationalError as e:
            if "duplicate column" not in str(e):
                raise
    db.executescript(ADDED_INDEXES)
    if db.execute("PRAGMA user_version").fetchone()[0] < NOTE_KINDS_VERSION:
        _relabel_notes(db)
    if db.execute("PRAGMA user_version").fetchone()[0] < TAGGED_VERSION:
        _count_tagged(db)
    if not has_table(db, "history_slots"):
        _create_slots(db)


# The history's counts per quarter hour (docs/records.md): what `kanmon stats`, the API and
# the dashboard chart read instead of a GROUP BY over every history row of the period.
# Every UTC offset in use is a whole number of quarter hours, so a local hour or day is a
# sum of whole slots. The records writer adds the rows it inserts, in their transaction
# (one upsert per slot and batch); a trigger moves a row's counts when its status
# changes; retention subtracts the rows it deletes.
SLOT = 900
SLOT_COLUMNS = ("received", "bytes", "delivered", "deferred", "bounced", "rejected")
SLOTS_TABLE = (
    "CREATE TABLE history_slots (slot INTEGER PRIMARY KEY, "  # CAST(ts / 900 AS INTEGER)
    + ", ".join(f"{c} INTEGER NOT NULL DEFAULT 0" for c in SLOT_COLUMNS) + ")"
)
# What one history row adds to its slot's counts, in SQL (the backfill and the periods a
# slot does not cover) and in Python (slot_counts, the writer): the same rules.
SLOT_SUMS = (f"SUM(first), SUM(first * size), SUM(status = 'Delivered'), SUM(deferrals > 0 AND {ACCEPTED}),"
             " SUM(status LIKE 'Bounced%'), SUM(disposition = 'Reject')")
SLOT_UPSERT = (
    f"INSERT INTO history_slots(slot, {', '.join(SLOT_COLUMNS)}) VALUES (?,?,?,?,?,?,?) ON CONFLICT(slot) DO UPDATE SET "
    + ", ".join(f"{c} = {c} + excluded.{c}" for c in SLOT_COLUMNS)
)


# A status update moves its row's counts (delivered, deferred, bounced) between the
# categories, in the UPDATE's transaction: a trigger has the row's old and new values,
# where the writer would have to read the row first (measured: a trigger whose WHEN
# holds about twice a day per recipient costs less than a SELECT or RETURNING per update).
SLOTS_STATUS_TRIGGER = f"""
CREATE TRIGGER IF NOT EXISTS history_slots_status AFTER UPDATE OF status, deferrals ON history
WHEN (old.status = 'Delivered') IS NOT (new.status = 'Delivered')
  OR (old.status LIKE 'Bounced%') IS NOT (new.status LIKE 'Bounced%')
  OR (old.deferrals > 0 AND {accepted_sql("old.disposition")})
    IS NOT (new.deferrals > 0 AND {accepted_sql("new.disposition")})
BEGIN
  INSERT INTO history_slots(slot, delivered, deferred, bounced) VALUES (CAST(new.ts / {SLOT} AS INTEGER),
    ifnull(new.status = 'Delivered', 0) - ifnull(old.status = 'Delivered', 0),
    ifnull(new.deferrals > 0 AND {accepted_sql("new.disposition")}, 0)
      - ifnull(old.deferrals > 0 AND {accepted_sql("old.disposition")}, 0),
    ifnull(new.status LIKE 'Bounced%', 0) - ifnull(old.status LIKE 'Bounced%', 0))
  ON CONFLICT(slot) DO UPDATE SET delivered = delivered + excluded.delivered, deferred = deferred + excluded.deferred,
    bounced = bounced + excluded.bounced;
END;
"""


def slot_of(ts: float) -> int:
    """A history row's slot: the same float division and truncation as SQLite's CAST(ts / 900 AS INTEGER)."""
    return int(ts / SLOT)


def slot_counts(first, size, status, deferrals: int, disposition) -> tuple[int, int, int, int, int, int]:
    """What a history row adds to its slot (SLOT_SUMS for one row; LIKE is case-blind for ASCII)."""
    first = 1 if first else 0
    status = status or ""
    return (first, first * (size or 0), int(status == "Delivered"), int(deferrals > 0 and disposition in ACCEPTED_DISPOSITIONS),
            int(status[:7].lower() == "bounced"), int(disposition == "Reject"))


def add_slot_counts(db: sqlite3.Connection, sums: dict[int, list[int]]) -> None:
    """Add (or, negative, subtract) counts per slot, inside the caller's transaction."""
    rows = [(slot, *v) for slot, v in sums.items() if any(v)]
    if rows:
        db.executemany(SLOT_UPSERT, rows)


def has_table(db: sqlite3.Connection, name: str) -> bool:
    return db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)).fetchone() is not None


def _count_slots(db: sqlite3.Connection) -> None:
    """Count the history into an empty history_slots (inside the caller's transaction)."""
    db.execute(f"INSERT INTO history_slots SELECT CAST(ts / {SLOT} AS INTEGER), {SLOT_SUMS} FROM history GROUP BY 1")


def _create_slots(db: sqlite3.Connection) -> None:
    """Create history_slots and count the rows already there into it, once (several
    processes may open the database at once: the second finds it made)."""
    with db:
        db.execute("BEGIN IMMEDIATE")
        if has_table(db, "history_slots"):
            return
        db.execute(SLOTS_TABLE)
        db.execute(SLOTS_STATUS_TRIGGER)
        _count_slots(db)


def _count_tagged(db: sqlite3.Connection) -> None:
    """An older version counted only `Accept` rows as accepted where the stats count
    recipients (deferred, the top lists): replace the slots' trigger with one that counts
    `Tag` rows too and count the slots again from the history, once (several processes
    may run it at once: the second finds it done)."""
    with db:
        db.execute("BEGIN IMMEDIATE")
        if db.execute("PRAGMA user_version").fetchone()[0] >= TAGGED_VERSION:
            return
        if has_table(db, "history_slots"):
            db.execute("DROP TRIGGER IF EXISTS history_slots_status")
            db.execute(SLOTS_STATUS_TRIGGER)
            db.execute("DELETE FROM history_slots")
            _count_slots(db)
        db.execute(f"PRAGMA user_version = {TAGGED_VERSION}")


def rebuild_slots(db: sqlite3.Connection) -> None:
    """Count history_slots again from the history (after rows were written with SQL
    around the writer, as the benchmarks fill a database)."""
    with db:
        db.execute("DELETE FROM history_slots")
        _count_slots(db)


# PRAGMA user_version from which the DNS check's and the balancer's lines carry kinds of
# their own (before, they were "info" Notes found by searching every line's text).
NOTE_KINDS_VERSION = 1
# ... from which a `Tag` row (accepted with a Subject prefix) counts as accepted in the
# slots (deferred) as it does in the top lists (ACCEPTED).
TAGGED_VERSION = 2


def _relabel_notes(db: sqlite3.Connection) -> None:
    """Give the lines an older version wrote as "info" Notes the kind they have now, once
    (the "info" rows only, through the events(kind, ts) index), so the console's DNS and
    balancer pages find them by kind. Several processes may run it at once: the second
    finds nothing left to change."""
    with db:
        db.execute("BEGIN IMMEDIATE")
        if db.execute("PRAGMA user_version").fetchone()[0] >= NOTE_KINDS_VERSION:
            return
        db.execute("UPDATE events SET kind = ? WHERE kind = 'info' AND substr(text, 1, 9) = 'dnscheck:'",
                   (DNSCHECK_KIND,))
        db.execute("UPDATE events SET kind = ? WHERE kind = 'info' AND substr(text, 1, 9) IN ('balancer ', 'balancer:')",
                   (BALANCER_KIND,))
        db.execute(f"PRAGMA user_version = {NOTE_KINDS_VERSION}")

WRITE_INTERVAL = 0.2  # seconds between batches of record writes
BUSY_TIMEOUT = 30.0  # seconds a write waits for another connection's lock before the batch is spilled
SPILL_DIR = "records-spill"
STATUS_RETRIES = 150  # batches (30 s) a status update waits for its history row


def open_db(path: Path, readonly: bool = False) -> sqlite3.Connection:
    if readonly:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    else:
        # Created 0600 before SQLite opens it (SQLite gives its -wal and -shm files the
        # database's mode): it holds the password hashes and every message's history.
        create_private(path)
        db = sqlite3.connect(path, timeout=BUSY_TIMEOUT, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(SCHEMA)
            migrate(db)
        except BaseException:
            db.close()
            raise
    return db


def create_private(path: Path) -> None:
    """Create the file 0600 if it does not exist. Only then: closing a descriptor of a
    file drops every POSIX lock this process holds on it, SQLite's included, and another
    process would then take our open database for unused and delete its -shm."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass


def _file_id(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def decode_subject(raw: str) -> str:
    """A Subject as header_fields read it, as text: raw header bytes (kept as surrogate
    escapes) in the charset Japanese mail uses, ISO-2022-JP by its escapes, then UTF-8,
    CP932, EUC-JP, each strictly (kanmon.content.decode.decode_bytes, the one guesser);
    RFC 2047 encoded-words decoded; a broken encoded-word is kept as written. Never raises."""
    if "=?" not in raw and "\x1b" not in raw and raw.isascii():
        return raw
    try:
        return decode_header_value(raw)
    except Exception:  # noqa: BLE001 - any malformed header: record it as readable as it gets
        return raw.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def header_fields(content: bytes, names: tuple[bytes, ...] = (b"subject", b"message-id")) -> dict[str, str]:
    """Unfolded values of a few header fields, looking only at the header block (its first
    64 KB). The Subject keeps its raw bytes as surrogate escapes, for decode_subject (the
    records writer) or decode_header_value to decode in their charset; the others read
    as UTF-8 (U+FFFD for what is not)."""
    end = content.find(b"\r\n\r\n")
    block = content[: end if end >= 0 else min(len(content), 65536)][:65536]
    out: dict[str, str] = {}
    errors: dict[str, str] = {}
    current: str | None = None
    for line in block.split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):
            if current is not None:
                out[current] += " " + line.strip().decode("utf-8", errors[current])
            continue
        current = None
        name, colon, value = line.partition(b":")
        if not colon:
            continue
        key = name.strip().lower()
        if key in names and key.decode() not in out:
            current = key.decode("ascii", "replace")
            errors[current] = "surrogateescape" if current == "subject" else "replace"
            out[current] = value.strip().decode("utf-8", errors[current])
    return out


def _count_inserts(sums: dict[int, list[int]], hist: list) -> None:
    """New history rows' counts added to `sums` by slot (slot_counts, unrolled: it runs for every row)."""
    for ts, _ip, _from, _rcpt, _subj, _mid, size, _cls, disposition, _qid, status, _auth, _helo, first in hist:
        key = int(ts / SLOT)
        s = sums.get(key)
        if s is None:
            s = sums[key] = [0, 0, 0, 0, 0, 0]
        if first:
            s[0] += 1
            s[1] += size or 0
        if disposition == "Reject":
            s[5] += 1
        if status == "Delivered":
            s[2] += 1
        elif status and status[:7].lower() == "bounced":
            s[4] += 1


def _rows(events=(), hist=(), status=(), counts=()) -> dict:
    """One batch's rows, as written to the database and, when it refuses them, spilled."""
    return {"events": list(events), "hist": list(hist), "status": list(status), "counts": list(counts)}


def _severity(event: Event) -> str:
    if isinstance(event, Critical):
        return "critical"
    if isinstance(event, Error):
        return "error"
    if isinstance(event, (AuthFailed, LoginFailed)):
        return "warning"
    return "info"


class Records:
    def __init__(self, data_dir: Path, hostname: str, *, echo: TextIO | None = None, log_file: bool = True,
                 log: LogSection | None = None, rotate: bool = True,
                 on_failure: Callable[[str], None] | None = None, replay_others: bool = False,
                 shared: RecordsSection | None = None, on_shared_failure: Callable[[str], None] | None = None):
        """log: the [log] section (destinations, syslog socket, rotation); None: the
        file only, never rotated. log_file=False: no file whatever `log` says.
        rotate=False: follow the node's rotation of the file but never rotate it (SMTP
        receivers and commands that write events). on_failure(text): called from the
        writer thread when the database starts refusing writes (once per outage).
        replay_others: also write what other (ended) processes left in the spill
        journal (the node, at its start).
        shared: the [records] section; with a `url`, every batch is also written to the
        shared records in PostgreSQL (kanmon.records.pg), tagged with the node's name;
        on_shared_failure(text): as on_failure, for those (default: on_failure)."""
        self.data_dir = Path(data_dir)
        self.hostname = hostname
        self.db_path = self.data_dir / "records.sqlite"
        self._echo = echo
        self._log_file = log_file
        self._rotate = rotate
        self._log_path: Path | None = None
        self._syslog: SyslogSender | None = None
        self._configure_log(log)
        self._reopen = False
        self._pending: deque[tuple] = deque()
        self._cond = threading.Condition()
        self._flushed = threading.Condition()
        self._queued = itertools.count(1)
        self._seq = 0  # items queued
        self._done = 0  # items written
        self._stop = False
        self._on_failure = on_failure
        self._spill_dir = self.data_dir / SPILL_DIR
        self._spill_path = self._spill_dir / f"{os.getpid()}.jsonl"
        self._replay_others = replay_others
        self._failing: str | None = None  # the error of the outage in progress
        self._cycles = 0  # writer passes (flush() waits for one)
        self._db: sqlite3.Connection | None = None
        self._db_id: tuple[int, int] | None = None
        try:
            self._open_db()
        except sqlite3.Error as e:  # damaged or locked at start: the writer keeps trying, nothing is lost
            self._fail(f"cannot open {self.db_path}: {e}")
        self.shipper = None
        if shared is not None and shared.url:
            from kanmon.records.pg import Shipper

            self.shipper = Shipper(shared, shared.node or hostname, self.data_dir, on_failure=on_shared_failure or on_failure,
                                   replay_others=replay_others, notify=self.emit)
        self._thread = threading.Thread(target=self._writer, name="records", daemon=True)
        self._thread.start()

    # -- producers (any thread) -------------------------------------------------------

    def _put(self, item: tuple) -> None:
        # deque.append is atomic; the writer wakes by itself every WRITE_INTERVAL, so the
        # mail path never pays for a thread wake-up per line.
        self._pending.append(item)
        self._seq = next(self._queued)  # itertools.count is atomic under the GIL

    def record(self, event: Event, queue_id: str | None = None, *, session: str | None = None) -> None:
        """One typed event (kanmon.records.events): its line `<queue id>: line` (or just
        the line for session events) and its fields, stored together.

        session: the SMTP session the event belongs to (kanmon trace joins on it).
        The line is formatted and the fields encoded in the writer thread, not here.
        """
        self._put(("event", time.time(), queue_id, event, session, None))

    def emit(
        self, text: str | Event, queue_id: str | None = None, kind: str = "info", *,
        session: str | None = None, detail: dict[str, Any] | None = None,
    ) -> None:
        """A free-text line (a Note, or an Error/Critical by kind) for sources that have
        no event type of their own; `detail`: fields stored beside it, never printed.
        A typed event passed here is recorded as by record() (for callers handed
        `emit` as their event-log callable)."""
        if isinstance(text, Event):
            event: Event = text
        elif kind == "error":
            event = Error(text)
        elif kind == "critical":
            event = Critical(text)
        else:
            event = Note(text, kind)
        self._put(("event", time.time(), queue_id, event, session, detail))

    def history_accept(
        self, queue_id: str, env: Envelope, size: int, content: bytes, fields: dict[str, str] | None = None, *,
        classification: str = "NotSpam", disposition: str = "Accept", status: str = "Queued",
    ) -> None:
        """History rows for an accepted message; `fields` when the caller already parsed
        Subject and Message-ID from the header block (header_fields); classification and
        disposition as the checks decided; status "Queued", or "Discarded" for a message
        a check dropped."""
        fields = header_fields(content) if fields is None else fields
        client = env.client
        for n, rcpt in enumerate(env.rcpts):
            self._put((
                "hist", time.time(), client.ip if client else "", env.mail_from, rcpt,
                fields.get("subject", ""), fields.get("message-id", ""), size, classification, disposition,
                queue_id, status, client.auth_user if client else "", client.helo if client else "",
                1 if n == 0 else 0,
            ))

    def history_reject(
        self, env: Envelope | None, rcpt: str, reply: Reply, client_ip: str, auth_user: str = "", helo: str = "", *,
        classification: str = "NotSpam", disposition: str = "Reject",
    ) -> None:
        rcpts = [rcpt] if rcpt else (env.rcpts if env and env.rcpts else [""])
        for r in rcpts:
            self._put((
                # No envelope: refused before MAIL; its sender is NULL (shown "-"), not the null sender <>.
                "hist", time.time(), client_ip, env.mail_from if env else None, r, "", "", env.size_hint if env else 0,
                classification, disposition, "", str(reply), auth_user, helo, 0,
            ))

    def history_status(self, queue_id: str, rcpt: str, status: str) -> None:
        self._put(("status", time.time(), queue_id, rcpt, status))

    def after_lines(self, callback: Callable[[], None]) -> None:
        """Call callback (in the writer thread) once the log lines of everything recorded
        before it are written (file, syslog, stdout), before its batch goes to the
        database. An SMTP receiver process tells the main process of a message this way,
        so that the message's lines (from=..., its session) are in the log before the
        queue manager can write its delivery lines (docs/monitoring.md). No thread is
        woken for it: it waits for the writer's next pass (WRITE_INTERVAL at most).
        An exception from callback is printed on stderr, never raised."""
        self._put(("after", callback))

    def _configure_log(self, log: LogSection | None) -> None:
        to = log.to if log is not None else ["file"]
        self._log_path = self.data_dir / "log" / "kanmon.log" if self._log_file and "file" in to else None
        self._log_options = log
        if self._log_path:
            self._log_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._syslog = SyslogSender(log.syslog_socket, log.facility) if log is not None and "syslog" in to else None

    def reconfigure_log(self, log: LogSection | None) -> None:
        """A reload's [log]: the writer switches destinations, syslog socket, facility and
        rotation at this point of the stream (lines queued before go where they were going,
        lines queued after go the new way)."""
        self._put(("log", log))
        with self._cond:
            self._cond.notify()

    def reopen_log(self) -> None:
        """Reopen the log file (SIGUSR1, after an outside tool such as logrotate moved it)."""
        with self._cond:
            self._reopen = True
            self._cond.notify()

    # -- writer thread ----------------------------------------------------------------------

    def _open_log(self) -> LogFile | None:
        if self._log_path is None:
            return None
        o = self._log_options
        if o is None or not self._rotate:
            return LogFile(self._log_path)
        return LogFile(self._log_path, rotate_size=o.rotate_size, rotate_age=o.rotate_age, keep=o.rotate_keep)

    def _writer(self) -> None:
        try:
            log_fh = self._open_log()
        except OSError as e:
            print(f"kanmon: log file {self._log_path}: {e}", file=sys.stderr)
            log_fh = None
        try:
            while True:
                with self._cond:
                    if not self._stop and not self._reopen:
                        self._cond.wait(WRITE_INTERVAL)  # flush() and close() wake it early
                    stopping = self._stop
                    reopen, self._reopen = self._reopen, False
                if reopen and log_fh is not None:
                    try:
                        log_fh.reopen()
                    except OSError as e:
                        print(f"kanmon: log file {self._log_path}: reopen failed: {e}", file=sys.stderr)
                if not self._pending:
                    if log_fh is not None:  # SMTP receivers append to the file too
                        try:
                            log_fh.rotate_if_due()
                        except OSError as e:
                            print(f"kanmon: log file {self._log_path}: rotation failed: {e}", file=sys.stderr)
                    try:
                        self._store(None, retry=not stopping)  # spilled batches, when the database takes them
                    except Exception as e:  # noqa: BLE001 - records must never stop mail
                        print(f"kanmon: records write failed: {e}", file=sys.stderr)
                    with self._flushed:
                        self._cycles += 1
                        self._flushed.notify_all()
                    if stopping and not self._pending:
                        return
                    continue
                batch = []
                pop = self._pending.popleft
                try:
                    while True:
                        batch.append(pop())
                except IndexError:
                    pass
                while batch:
                    # A reconfigure_log() item splits the batch: before it the old way.
                    cut = next((i for i, item in enumerate(batch) if item[0] == "log"), len(batch))
                    part, switch, batch = batch[:cut], batch[cut:cut + 1], batch[cut + 1:]
                    if part:
                        try:
                            self._write(part, log_fh, retry=not stopping)
                        except Exception as e:  # noqa: BLE001 - records must never stop mail
                            print(f"kanmon: records write failed: {e}", file=sys.stderr)
                    if switch:
                        log_fh = self._switch_log(switch[0][1], log_fh)
                    with self._flushed:
                        self._done += len(part) + len(switch)
                        self._flushed.notify_all()
                with self._flushed:
                    self._cycles += 1
                    self._flushed.notify_all()
                if stopping and not self._pending:
                    return
        finally:
            if log_fh:
                log_fh.close()
            if self._syslog is not None:
                self._syslog.close()

    def _switch_log(self, log: LogSection | None, log_fh: LogFile | None) -> LogFile | None:
        """In the writer: the new [log] applies (the file closed or opened, the syslog
        sender replaced)."""
        if log_fh is not None:
            log_fh.close()
        if self._syslog is not None:
            self._syslog.close()
        self._configure_log(log)
        try:
            return self._open_log()
        except OSError as e:
            print(f"kanmon: log file {self._log_path}: {e}", file=sys.stderr)
            return None

    # -- the database and the spill journal (writer thread) ----------------------------------

    def _open_db(self) -> None:
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
            self._db = None
        self._db = open_db(self.db_path)
        self._db_id = _file_id(self.db_path)

    def _ensure_db(self) -> list[tuple]:
        """The database connection, reopened when the file was deleted or replaced;
        the event rows saying so (written with the batch)."""
        if self._db is not None and _file_id(self.db_path) == self._db_id:
            return []
        gone = self._db is not None
        self._open_db()
        if not gone:
            return []
        text = f"records: {self.db_path} was deleted or replaced while in use: recreated (its old rows are not in it)"
        print(f"kanmon: {text}", file=sys.stderr)
        self._fail(text)
        return [(time.time(), None, "error", text, None, None)]

    def _fail(self, text: str) -> None:
        """The database refuses writes: say so once per outage."""
        if self._failing is not None:
            return
        self._failing = text
        if self._on_failure is not None:
            try:
                self._on_failure(text)
            except Exception as e:  # noqa: BLE001 - reporting must not stop the writer
                print(f"kanmon: records: cannot report the failure: {e}", file=sys.stderr)

    def _spill(self, rows: dict) -> None:
        """Rows the database refused, appended to this process's spill journal (fsynced)."""
        line = json.dumps(rows, separators=(",", ":"), default=str).encode() + b"\n"
        self._spill_dir.mkdir(exist_ok=True, mode=0o700)
        fd = os.open(self._spill_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)

    def _spill_files(self) -> list[Path]:
        """This process's spill journal, and at the node's start those of ended processes."""
        if not self._replay_others:
            return [self._spill_path] if self._spill_path.exists() else []
        try:
            return sorted(self._spill_dir.iterdir(), key=lambda p: (p != self._spill_path, p.name))
        except FileNotFoundError:
            return []

    def _replay(self, retry: bool) -> int:
        """Write the spilled batches to the database, oldest first; the number written.
        Raises what the database raises (then the journal stays for the next pass)."""
        written = 0
        for path in self._spill_files():
            batches = []
            for line in path.read_bytes().split(b"\n"):
                try:
                    batches.append(json.loads(line))
                except ValueError:
                    continue  # a torn last line (a crash during the append): never acknowledged
            for rows in batches:
                self._commit(rows, retry)
                written += 1
            path.unlink()
        self._replay_others = False  # others' files: once, at the start
        return written

    def _store(self, rows: dict | None, retry: bool) -> None:
        """Spilled batches first, then this one; on failure this one is spilled."""
        try:
            extra = self._ensure_db()
            if extra and rows is not None:
                rows["events"] = extra + rows["events"]
            elif extra:
                rows = _rows(events=extra)
            replayed = self._replay(retry)
            if rows is not None:
                self._commit(rows, retry)
        except (sqlite3.Error, OSError) as e:
            if rows is not None:
                try:
                    self._spill(rows)
                except OSError as e2:  # the disk refuses too: the log line is all that is left
                    print(f"kanmon: records: cannot spill a batch: {e2}", file=sys.stderr)
            print(f"kanmon: records write failed: {e}", file=sys.stderr)
            self._fail(f"records database {self.db_path}: writes fail ({e}); kept in {self._spill_dir}")
            return
        if self._failing is not None:
            self._failing = None
            self._pending.append(("event", time.time(), None, Note(
                f"records: the database takes writes again ({replayed} spilled batch(es) written)"), None, None))
        elif replayed:
            self._pending.append(("event", time.time(), None, Note(
                f"records: {replayed} spilled batch(es) written"), None, None))

    def _write(self, batch: list[tuple], log_fh: LogFile | None, retry: bool = True) -> None:
        events, hist, status, lines, syslog_lines = [], [], [], [], []
        after: list[Callable[[], None]] = []
        counts: Counter[str] = Counter()
        pid = os.getpid()
        for item in batch:
            if item[0] == "event":
                _, ts, qid, event, session, detail = item
                try:
                    text = for_log(event.line())  # control characters from the network, escaped
                    if detail is None and not isinstance(event, FREE_TEXT):
                        detail = event.fields()
                    detail_json = json.dumps(detail) if detail is not None else None
                    add_counts(counts, event)
                except Exception as e:  # noqa: BLE001 - one bad event must not lose the batch
                    text, detail_json = for_log(f"unprintable {type(event).__name__} event: {type(e).__name__}: {e}"), None
                events.append((ts, qid, event.KIND, text, session, detail_json))
                stamp = syslog_stamp(ts)
                prefix = f"{qid}: " if qid else ""
                tag = f"kanmon/{component(event)}"
                lines.append(f"{stamp} {self.hostname} {tag}[{pid}]: {prefix}{text}\n")
                if self._syslog is not None:
                    syslog_lines.append((ts, tag, _severity(event), prefix + text))
            elif item[0] == "hist":
                row = list(item[1:])
                row[4] = decode_subject(row[4])
                hist.append(row)
            elif item[0] == "status":
                status.append(item)
            elif item[0] == "after":
                after.append(item[1])
        if lines:
            # The plain log line first (DESIGN.md promise 9): a database failure below
            # must not take it along.
            text = "".join(lines)
            if log_fh:
                try:
                    log_fh.write(text)
                except OSError as e:
                    print(f"kanmon: log file {self._log_path}: {e}", file=sys.stderr)
            for ts, tag, severity, message in syslog_lines:
                self._syslog.send(ts, tag, severity, message)
            if self._echo is not None:
                try:
                    self._echo.write(text)
                    self._echo.flush()
                except (OSError, ValueError):
                    pass
        for callback in after:  # the lines recorded before each are written
            try:
                callback()
            except Exception as e:  # noqa: BLE001 - one callback must not lose the batch
                print(f"kanmon: records: after-lines callback failed: {type(e).__name__}: {e}", file=sys.stderr)
        if events or hist or status or counts:
            rows = _rows(events=events, hist=hist, status=[list(x[1:]) for x in status],
                         counts=[[pid, name, value] for name, value in counts.items()])
        else:
            rows = None
        if rows is not None and self.shipper is not None:
            # The shared records take each status once: the ones re-queued here because
            # their history row was not in SQLite yet (a 6th field, the tries) were sent.
            self.shipper.put(_rows(events=events, hist=hist, status=[list(x[1:5]) for x in status if len(x) == 5],
                                   counts=rows["counts"]))
        self._store(rows, retry)

    def _commit(self, rows: dict, retry: bool) -> None:
        """One batch's rows in one transaction."""
        db = self._db
        if db is None:
            raise sqlite3.OperationalError("no database connection")
        with db:
            if rows["events"]:
                db.executemany(
                    "INSERT INTO events(ts, queue_id, kind, text, session, detail) VALUES (?,?,?,?,?,?)",
                    [tuple(r) for r in rows["events"]])
            sums: dict[int, list[int]] = {}
            if rows["hist"]:
                db.executemany(
                    "INSERT INTO history(ts, client_ip, mail_from, rcpt, subject, message_id, size, classification,"
                    " disposition, queue_id, status, auth_user, helo, first) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    [tuple(r) for r in rows["hist"]])
                _count_inserts(sums, rows["hist"])
            for ts, qid, rcpt, st, *tries in rows["status"]:
                # history_slots_status (a trigger) moves the row's counts when they change.
                cur = db.execute(
                    "UPDATE history SET status = ?, updated = ?, deferrals = deferrals + ?"
                    " WHERE queue_id = ? AND rcpt = ?", (st, ts, 1 if st.startswith("Deferred") else 0, qid, rcpt)
                )
                if cur.rowcount == 0:
                    # The row is written by another process (an SMTP receiver) whose writer
                    # has not flushed yet: try again with the next batches.
                    n = (tries[0] if tries else 0) + 1
                    if retry and n <= STATUS_RETRIES:
                        self._pending.append(("status", ts, qid, rcpt, st, n))
                    elif retry:
                        print(f"kanmon: records: no history row for {qid} {rcpt}; status {st!r} dropped",
                              file=sys.stderr)
            add_slot_counts(db, sums)
            if rows["counts"]:
                db.executemany(
                    "INSERT INTO counters(pid, name, value) VALUES (?,?,?)"
                    " ON CONFLICT(pid, name) DO UPDATE SET value = value + excluded.value",
                    [tuple(r) for r in rows["counts"]])

    # -- control ---------------------------------------------------------------------------

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until everything emitted so far is written."""
        with self._cond:
            target = self._seq
            self._cond.notify()
        deadline = time.monotonic() + timeout
        with self._flushed:
            cycle = self._cycles
            while self._done < target or self._cycles <= cycle:  # also one pass (spilled batches)
                if not self._thread.is_alive():
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._flushed.wait(left)

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout=30)
        if self.shipper is not None:
            self.shipper.close()
        if self._db is not None:
            self._db.close()
