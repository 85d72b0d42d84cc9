"""Queue operations, building blocks: cron schedules, queue filters, the spool's admin API and the
backup archive format (pure functions and files in a temporary directory)."""

from __future__ import annotations

import io
import json
import tarfile
import time

import pytest

from kanmon.admin.backup import BackupError, BackupWriter, read_archive, verify_archive
from kanmon.cron import CronSchedule
from kanmon.admin.queue_ops import Filters, last_reply, parse_reply_text
from kanmon.model import Envelope, new_queue_id
from kanmon.spool import journal
from kanmon.spool.store import CorruptEntry, Spool, encode_queue_file


def local(y, mo, d, h=0, mi=0) -> float:
    return time.mktime((y, mo, d, h, mi, 0, 0, 0, -1))


# -- cron ------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, after, expected", [
    ("0 5 * * *", local(2026, 1, 1, 4, 30), local(2026, 1, 1, 5)),
    ("0 5 * * *", local(2026, 1, 1, 5, 0), local(2026, 1, 2, 5)),  # strictly after
    ("*/15 9-17 * * mon-fri", local(2026, 1, 2, 17, 50), local(2026, 1, 5, 9)),  # Fri evening -> Mon
    ("0 0 29 2 *", local(2026, 3, 1), local(2028, 2, 29)),
    ("30 2 1,15 * 0", local(2026, 1, 2), local(2026, 1, 4, 2, 30)),  # dom OR dow (Sunday the 4th)
    ("0 0 * * 7", local(2026, 1, 1), local(2026, 1, 4)),  # 7 is Sunday
    ("@hourly", local(2026, 1, 1, 4, 1), local(2026, 1, 1, 5)),
    ("@weekly", local(2026, 1, 1), local(2026, 1, 4)),
    ("5/20 * * jan *", local(2026, 1, 1, 0, 26), local(2026, 1, 1, 0, 45)),
    ("0 12 * dec *", local(2026, 1, 1), local(2026, 12, 1, 12)),
])
def test_cron_next_run(text, after, expected):
    assert CronSchedule.parse(text).next_after(after) == expected


@pytest.mark.parametrize("text, message", [
    ("0 5 * *", "has 4 fields"),
    ("60 * * * *", "minute: 60 is out of range 0-59"),
    ("0 24 * * *", "hour: 24 is out of range"),
    ("0 0 0 * *", "day of month: 0 is out of range 1-31"),
    ("0 0 * 13 *", "month: 13 is out of range"),
    ("0 0 * * 8", "day of week: 8 is out of range 0-7"),
    ("0 0 * foo *", "month: 'foo' is not a number or a name"),
    ("*/0 * * * *", "step '0' must be a positive number"),
    ("0 0 5-1 * *", "goes backwards"),
    ("0 0 31 2,4 *", "never fires"),
    ("0 0 ,1 * *", "empty value"),
    ("@sometimes", "unknown nickname"),
])
def test_cron_errors_name_the_field(text, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("*", r"\*")):
        CronSchedule.parse(text)


# -- filters -----------------------------------------------------------------------------------


def test_filters_match_envelope_and_journal(tmp_path):
    spool = Spool(tmp_path, fsync=False)
    now = 1_800_000_000.0
    env = Envelope("Alice@Example.test", ["bob@corp.example", "carol@other.example"], received_at=now - 7200)
    qid = new_queue_id()
    spool.store_blocking(qid, env, b"Subject: x\r\n\r\nbody\r\n")
    spool.append_state(qid, [
        journal.Result(now - 60, "carol@other.example", "sent", "250 ok"),
        journal.Result(now - 50, "bob@corp.example", "deferred", "450 4.1.1 <bob@corp.example>: User unknown"),
    ])
    (entry,) = list(spool.scan())
    assert last_reply(entry)[0].startswith("450 4.1.1")

    def match(**kw) -> bool:
        f = Filters(**kw)
        return f.match_envelope(qid, entry.envelope, now) and f.match_entry(entry, "deferred")

    assert match(older_than=3600, mail_from="alice@*", to="*@corp.example", domain="CORP.example", reason="user unknown")
    assert not match(older_than=3 * 3600)
    assert not match(mail_from="<>")
    assert not match(domain="other.example")  # carol was delivered: not pending any more
    assert not match(to="carol")
    assert not match(reason="refused")
    assert match(mail_from="example")  # no wildcard: a substring
    assert not match(state="hold") and match(state="deferred")
    with pytest.raises(ValueError, match="not a queue id"):
        Filters(ids=["../../x"])
    with pytest.raises(ValueError, match="--reason"):
        Filters(reason="(")
    assert parse_reply_text("451 4.4.1 Connection refused").enhanced == "4.4.1"
    spool.close()


def test_scan_reads_no_body_and_skips_what_vanished(tmp_path, monkeypatch):
    spool = Spool(tmp_path, fsync=False)
    ids = [new_queue_id() for _ in range(3)]
    for n, qid in enumerate(ids):
        spool.store_blocking(qid, Envelope(f"s{n}@a.example", ["r@b.example"], received_at=float(n)), b"x" * 100_000)
    monkeypatch.setattr(Spool, "read_content", lambda *a: pytest.fail("scan read a body"))
    monkeypatch.setattr(Spool, "_read_checked", lambda *a: pytest.fail("scan read a whole file"))
    seen = [e.queue_id for e in spool.scan(lambda q, env: env.mail_from != "s1@a.example")]
    assert sorted(seen) == sorted([ids[0], ids[2]])
    assert spool.delete(ids[0]) and not spool.delete(ids[0])
    assert sorted(e.queue_id for e in spool.scan()) == sorted(ids[1:])
    spool.close()


def test_hold_and_schedule_journal_records(tmp_path):
    spool = Spool(tmp_path, fsync=False)
    qid = new_queue_id()
    spool.store_blocking(qid, Envelope("a@b.example", ["c@d.example"]), b"x")
    spool.set_hold(qid, True, 10.0, "test")
    assert spool.read_state(qid).hold
    spool.set_hold(qid, False, 11.0, "test")
    spool.set_schedule(qid, 0.0, reset_attempts=True, t=12.0)
    st = spool.read_state(qid)
    assert not st.hold and st.attempts == 0 and st.next_attempt == 0.0
    with pytest.raises(FileNotFoundError):
        spool.set_hold("0000000000000BB", True, 1.0)
    assert spool.append_states([(qid, [journal.Hold(1.0, True)]), ("0000000000000BB", [journal.Hold(1.0, True)])]) == [
        "0000000000000BB"]
    assert spool.read_state(qid).hold and not (spool.state_dir / "0000000000000BB").exists()
    spool.close()


def test_import_raw_is_idempotent_and_checks_the_crc(tmp_path):
    a = Spool(tmp_path / "a", fsync=False)
    qid = new_queue_id()
    a.store_blocking(qid, Envelope("a@b.example", ["c@d.example"]), b"hello")
    a.append_state(qid, [journal.Attempt(1.0, 2, 5.0)])
    queue_bytes, state_bytes = a.export_raw(qid)
    b = Spool(tmp_path / "b", fsync=False)
    (b.incoming / qid).write_bytes(b"left by a killed import")
    assert b.import_raw(qid, queue_bytes, state_bytes) is True
    assert b.import_raw(qid, queue_bytes, state_bytes) is False
    assert b.read_content(qid) == b"hello" and b.read_state(qid).attempts == 2
    damaged = queue_bytes[:-1] + b"!"
    with pytest.raises(CorruptEntry, match="checksum"):
        b.import_raw(new_queue_id(), damaged, b"")
    a.close()
    b.close()


def test_import_raw_refuses_nodots_said_of_a_content_with_a_dot_line(tmp_path):
    # Such a file would go out undoubled: a "." line would end DATA at the next hop.
    b = Spool(tmp_path / "b", fsync=False)
    env = Envelope("a@b.example", ["c@d.example"], crlf_checked=True, no_dot_lines=True)
    for content in (b"Subject: x\r\n\r\na\r\n.\r\nMAIL FROM:<evil@x>\r\n", b".first\r\n"):
        with pytest.raises(CorruptEntry, match="nodots"):
            b.import_raw(new_queue_id(), encode_queue_file(env, content), b"")
    qid = new_queue_id()
    assert b.import_raw(qid, encode_queue_file(env, b"Subject: x\r\n\r\nno dot. here\r\n"), b"") is True
    assert b.load(qid).envelope.no_dot_lines is True
    b.close()


def test_import_raw_refuses_crlf_said_of_a_content_with_a_bare_lf(tmp_path):
    # "crlf" is trusted as "nodots" is: a bare LF before a dot line went out unnormalised,
    # and <LF>.<CRLF> ends DATA at a next hop that takes a bare LF as a line end.
    b = Spool(tmp_path / "b", fsync=False)
    for flags in ({"crlf_checked": True}, {"crlf_checked": True, "no_dot_lines": True}):
        env = Envelope("a@b.example", ["c@d.example"], **flags)
        for content in (b"Subject: x\r\n\r\na\n.\r\nMAIL FROM:<evil@x>\r\n", b"Subject: x\r\n\r\na\rb\r\n"):
            with pytest.raises(CorruptEntry, match="crlf is true"):
                b.import_raw(new_queue_id(), encode_queue_file(env, content), b"")
    plain = Envelope("a@b.example", ["c@d.example"])  # no flag: normalised when it goes out, as before
    assert b.import_raw(new_queue_id(), encode_queue_file(plain, b"a\n.\r\n"), b"") is True
    b.close()


# -- the archive -------------------------------------------------------------------------------


def _archive(tmp_path, n=3):
    spool = Spool(tmp_path / "src", fsync=False)
    ids = []
    for i in range(n):
        qid = new_queue_id()
        spool.store_blocking(qid, Envelope("a@b.example", [f"r{i}@d.example"]), f"m{i}".encode())
        spool.append_state(qid, [journal.Attempt(1.0, 1, 1.0)])
        ids.append(qid)
    path = tmp_path / "q.kbk"
    w = BackupWriter(path, "h.example", "(whole queue)", 0.0)
    for qid in ids:
        assert w.add(spool, qid, {})
    assert not w.add(spool, "0000000000000BB", {})  # vanished meanwhile
    w.finish()
    spool.close()
    return path, ids


def test_archive_round_trip_and_a_plain_tar(tmp_path):
    path, ids = _archive(tmp_path)
    assert verify_archive(path) == 3
    assert [m.queue_id for m in read_archive(path)] == ids
    with tarfile.open(path) as tar:
        names = tar.getnames()
    assert names[0] == "kanmon-backup.json" and names[-1] == "kanmon-backup-end.json"
    assert names[1:4] == [f"{ids[0]}/meta.json", f"{ids[0]}/queue", f"{ids[0]}/state"]
    assert not (tmp_path / "q.kbk.partial").exists()


def test_truncated_or_tampered_archives_are_refused(tmp_path):
    path, ids = _archive(tmp_path)
    data = path.read_bytes()
    cut = tmp_path / "cut.kbk"
    for end in (len(data) // 2, data.rindex(b"kanmon-backup-end.json") - 100):
        cut.write_bytes(data[:end])
        with pytest.raises(BackupError):
            verify_archive(cut)

    # A consistent-looking archive that lost its last message: the end record says so.
    out = io.BytesIO()
    with tarfile.open(path) as src, tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as dst:
        for m in src.getmembers():
            if not m.name.startswith(ids[-1]):
                dst.addfile(m, src.extractfile(m))
    short = tmp_path / "short.kbk"
    short.write_bytes(out.getvalue())
    with pytest.raises(BackupError, match="end record does not match"):
        verify_archive(short)

    # A path in a member name is never used.
    evil = tmp_path / "evil.kbk"
    out = io.BytesIO()
    dst = tarfile.open(fileobj=out, mode="w")
    for name, body in (("kanmon-backup.json", {"format": "kanmon-queue-backup", "version": 1}),
                       ("../../etc/meta.json", {})):
        blob = json.dumps(body).encode()
        info = tarfile.TarInfo(name)
        info.size = len(blob)
        dst.addfile(info, io.BytesIO(blob))
    dst.close()
    evil.write_bytes(out.getvalue())
    with pytest.raises(BackupError, match="unexpected member"):
        verify_archive(evil)
    with pytest.raises(BackupError, match="not a readable tar"):
        verify_archive(tmp_path / "missing.kbk")


def test_encode_is_the_spool_format(tmp_path):
    env = Envelope("a@b.example", ["c@d.example"])
    assert encode_queue_file(env, b"x").startswith(b"KANMON-Q1 ")


class RecordingLink:
    def __init__(self):
        self.calls = []

    def now(self):
        return 1000.0

    def active_ids(self):
        return set()

    def quiesce(self, ids):
        self.calls.append(("quiesce", list(ids)))

    def due_now(self, ids):
        self.calls.append(("due_now", list(ids)))

    def reschedule(self, qid, at):
        self.calls.append(("reschedule", qid))

    def submit(self, qid):
        self.calls.append(("submit", qid))


class Events:
    def __init__(self):
        self.lines = []

    def emit(self, text, queue_id=None, kind="info"):
        self.lines.append((queue_id, text))

    def record(self, event, queue_id=None, **kw):
        self.lines.append((queue_id, event.line()))

    def history_status(self, queue_id, rcpt, status):
        self.lines.append((queue_id, f"status {rcpt}: {status}"))


def test_a_failed_hold_or_delete_puts_the_rest_back_on_the_schedule_and_logs_what_was_done(tmp_path, monkeypatch):
    from kanmon.admin.queue_ops import QueueOps
    from kanmon.config import parse_config

    spool = Spool(tmp_path, fsync=True)
    ids = sorted(new_queue_id() for _ in range(4))
    for qid in ids:
        spool.store_blocking(qid, Envelope("a@b.example", ["c@d.example"]), b"x")
    link, events = RecordingLink(), Events()
    ops = QueueOps(parse_config(""), spool, events, link)
    assert ops.act("hold", Filters(ids=ids[:2]), source="test")["acted"] == ids[:2]
    assert spool.read_state(ids[0]).hold and spool.read_state(ids[1]).hold and not spool.read_state(ids[2]).hold

    real = Spool.delete

    def disk_error_on_the_fourth(self, qid):
        if qid == ids[3]:
            raise OSError(5, "Input/output error")
        return real(self, qid)

    monkeypatch.setattr(Spool, "delete", disk_error_on_the_fourth)
    link.calls.clear()
    with pytest.raises(OSError, match="Input/output"):
        ops.act("delete", Filters(ids=ids[2:]), source="test")
    assert link.calls == [("quiesce", ids[2:]), ("due_now", ids[3:])]  # not deleted: back to delivery
    assert not spool.exists(ids[2]) and spool.exists(ids[3])
    assert any(t.startswith("admin: delete 1 message(s) by `test`") and ids[2] in t for _, t in events.lines)
    # Only the deleted one's recipient is said deleted in the history; the other stays queued.
    assert [(q, t) for q, t in events.lines if t.startswith("status ")] == [
        (ids[2], "status c@d.example: Deleted by administrator (test)")]

    def full(self, batch):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Spool, "append_states", full)
    link.calls.clear()
    with pytest.raises(OSError, match="No space"):
        ops.act("hold", Filters(ids=[ids[3]]), source="test")
    assert link.calls == [("quiesce", [ids[3]]), ("due_now", [ids[3]])]
    spool.close()
