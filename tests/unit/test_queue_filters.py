"""The one filter vocabulary (kanmon.config.QueueFilter, kanmon.admin.filters) and the
maintenance run log (kanmon.admin.maintenance): parsing, matching, bounded body reads,
strict decoding (pure functions and files in a temporary directory)."""

from __future__ import annotations

import base64
import json
import os
import stat
import time

import pytest

from kanmon.admin import maintenance as mt
from kanmon.admin.filters import BODY_SCAN_BYTES, Filters, body_text, parse_bounded
from kanmon.admin.queue_ops import QueueOps
from kanmon.config import ConfigError, parse_bound, parse_config, parse_size_bound
from kanmon.model import Envelope, new_queue_id
from kanmon.spool import journal
from kanmon.spool.store import Spool

NOW = 1_800_000_000.0

DSN_TEXT_ONLY_IN_DIAGNOSTIC = (
    b"From: MAILER-DAEMON@mx.remote.example\r\nTo: forged@victim.example\r\n"
    b"Subject: =?utf-8?q?Undelivered_Mail_Returned_to_Sender_=E2=9C=89?=\r\n"
    b"MIME-Version: 1.0\r\nContent-Type: multipart/report; report-type=delivery-status; boundary=\"BB\"\r\n\r\n"
    b"--BB\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nThis is the mail system at host mx.remote.example.\r\n"
    b"--BB\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.remote.example\r\n\r\n"
    b"Final-Recipient: rfc822; nobody@remote.example\r\nAction: failed\r\nStatus: 5.1.1\r\n"
    b"Diagnostic-Code: smtp; 550 5.1.1 <nobody@remote.example>: Recipient address rejected: User unknown\r\n\r\n"
    b"--BB--\r\n"
)


def _b64_text(text: str, charset: str = "utf-8") -> bytes:
    body = base64.encodebytes(text.encode(charset)).replace(b"\n", b"\r\n")
    return (b"Subject: delivery failure\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=" + charset.encode()
            + b"\r\nContent-Transfer-Encoding: base64\r\n\r\n" + body)


# -- the vocabulary's parsing ------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    (">1MB", (">", 1_000_000)), ("<=100KB", ("<=", 100_000)), ("2KiB", (">=", 2048)), ("> 5", (">", 5)),
])
def test_size_bounds(text, expected):
    assert parse_size_bound(text) == expected


def test_count_bounds_and_refusals():
    assert parse_bound(">=5") == (">=", 5) and parse_bound(3) == (">=", 3) and parse_bound("<2") == ("<", 2)
    for bad in (True, "many", ">", "1.5", None):
        with pytest.raises(ValueError):
            parse_bound(bad)
    with pytest.raises(ValueError, match="not a size"):
        parse_size_bound(">huge")


@pytest.mark.parametrize("kwargs, message", [
    ({"reason": "("}, "--reason '\\('"),
    ({"body": "User (unknown"}, "--body 'User \\(unknown'"),
    ({"size": "big"}, "--size 'big'"),
    ({"attempts": "lots"}, "--attempts 'lots'"),
    ({"older_than": "soon"}, "--older-than 'soon'"),
    ({"state": "gone"}, "state must be one of"),
    ({"ids": ["../../x"]}, "not a queue id"),
])
def test_a_bad_filter_is_a_value_error_naming_its_flag(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Filters(**kwargs)


def test_maintenance_job_takes_the_same_names_as_the_flags():
    cfg = parse_config('[[maintenance]]\nschedule = "30 6 * * *"\naction = "delete"\nfrom = "<>"\n'
                       'body = "User unknown"\nolder_than = "1h"\nsize = "<1MB"\nattempts = 2\ncatch_up = true\n')
    job = cfg.maintenance[0]
    assert job.criteria() == {"from": "<>", "older_than": 3600.0, "body": "User unknown", "size": "<1MB", "attempts": "2"}
    assert job.catch_up
    from_job, from_flags = Filters.from_job(job), Filters(mail_from="<>", body="User unknown", older_than="1h",
                                                          size="<1MB", attempts="2")
    assert from_job.to_json() == from_flags.to_json()
    assert from_job.describe() == "--from '<>' --older-than 1h --body 'User unknown' --size '<1MB' --attempts '2'"
    with pytest.raises(ConfigError, match="maintenance.0..bodyy|bodyy"):
        parse_config('[[maintenance]]\nschedule = "0 6 * * *"\naction = "delete"\nbodyy = "x"\n')
    with pytest.raises(ConfigError, match="needs a filter"):
        parse_config('[[maintenance]]\nschedule = "0 6 * * *"\naction = "delete"\nstate = "all"\n')
    with pytest.raises(ConfigError, match="maintenance.*body.*not a regular expression"):
        parse_config('[[maintenance]]\nschedule = "0 6 * * *"\naction = "delete"\nbody = "("\n')


# -- matching ----------------------------------------------------------------------------------


@pytest.fixture
def spool(tmp_path):
    s = Spool(tmp_path, fsync=False)
    yield s
    s.close()


def _store(spool: Spool, sender: str, content: bytes, records=(), rcpts=("forged@victim.example",), age=7200.0):
    qid = new_queue_id()
    spool.store_blocking(qid, Envelope(sender, list(rcpts), received_at=NOW - age), content)
    if records:
        spool.append_state(qid, list(records))
    return qid


def _matches(spool: Spool, f: Filters, qid: str) -> bool:
    entry = spool.load(qid)
    return (f.match_envelope(qid, entry.envelope, NOW) and f.match_entry(entry, "deferred")
            and f.match_content(spool.read_content_prefix(qid, BODY_SCAN_BYTES)))


def test_envelope_journal_and_content_filters(spool):
    rcpt = "forged@victim.example"
    bounce = _store(spool, "", DSN_TEXT_ONLY_IN_DIAGNOSTIC, [
        journal.Result(NOW - 3000, rcpt, "deferred", "450 4.1.1 <forged@victim.example>: User unknown"),
        journal.Attempt(NOW - 3000, 1, NOW - 2000),
        journal.Result(NOW - 1000, rcpt, "deferred", "451 4.3.0 Temporary lookup failure"),
        journal.Attempt(NOW - 1000, 2, NOW + 600),
    ])
    real = _store(spool, "alice@example.test", b"Subject: quarterly report\r\nX-Mailer: Thunderbird\r\n\r\n"
                  + b"see attached\r\n" * 200, [journal.Attempt(NOW - 100, 1, NOW + 300)])

    def only(**kw) -> list[str]:
        f = Filters(**kw)
        return [q for q in (bounce, real) if _matches(spool, f, q)]

    assert only(mail_from="<>") == [bounce]
    assert only(body="user unknown") == [bounce]  # only in the DSN's Diagnostic-Code
    assert only(mail_from="<>", body="User unknown", older_than="1h") == [bounce]
    assert only(reason="User unknown") == [bounce]  # an earlier attempt's reply, not the last
    assert only(reason="^451") == [bounce]
    assert only(subject="returned to sender ✉") == [bounce]  # the encoded word decoded
    assert only(subject="^quarterly") == [real]
    assert only(header="^x-mailer: thunder") == [real]
    assert only(header="^Content-Type: multipart/report") == [bounce]
    assert only(size=">2KB") == [real] and only(size="<2KB") == [bounce]
    assert only(attempts=">=2") == [bounce] and only(attempts="1") == [bounce, real] and only(attempts="<1") == []
    assert only(to="*@victim.example", domain="victim.example") == [bounce, real]
    assert only(older_than="3h") == []


@pytest.mark.parametrize("content", [
    _b64_text("Die Adresse ist unbekannt: User unknown in virtual mailbox table"),
    _b64_text("Utilisateur inconnu - User unknown", "iso-8859-1"),
    b"Subject: x\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
    b"User=20unk=\r\nnown\r\n",
    DSN_TEXT_ONLY_IN_DIAGNOSTIC,
    b"Subject: plain, no MIME\r\n\r\n550 User unknown\r\n",
    b"Content-Type: text/plain; charset=no-such-charset\r\n\r\nUser unknown\r\n",
])
def test_body_text_is_decoded(content):
    assert "User unknown" in body_text(parse_bounded(content))


def test_body_filter_reads_only_the_first_64kb(spool, monkeypatch):
    late = _store(spool, "", b"Subject: x\r\n\r\n" + b"filler line\r\n" * 6000 + b"User unknown\r\n")
    early = _store(spool, "", b"Subject: x\r\n\r\nUser unknown\r\n" + b"filler line\r\n" * 60000)
    assert len(spool.read_content_prefix(early, BODY_SCAN_BYTES)) == BODY_SCAN_BYTES
    f = Filters(body="User unknown")
    assert _matches(spool, f, early) and not _matches(spool, f, late)
    monkeypatch.setattr(Spool, "read_content", lambda *a: pytest.fail("a filter read a whole message"))
    ops = QueueOps(parse_config(""), spool, _Records(), _Link())
    assert [e.queue_id for e, _ in ops.select(f)] == [early]


def test_content_is_not_read_when_a_cheaper_filter_fails(spool, monkeypatch):
    qid = _store(spool, "alice@example.test", b"Subject: x\r\n\r\nUser unknown\r\n")
    ops = QueueOps(parse_config(""), spool, _Records(), _Link())
    reads = []
    real = Spool.read_content_prefix
    monkeypatch.setattr(Spool, "read_content_prefix", lambda self, q, n: reads.append(q) or real(self, q, n))
    assert list(ops.select(Filters(mail_from="<>", body="User unknown"))) == []
    assert reads == []
    assert [e.queue_id for e, _ in ops.select(Filters(body="User unknown"))] == [qid] and reads == [qid]


class _Link:
    def now(self):
        return NOW

    def active_ids(self):
        return set()


class _Records:
    def __init__(self):
        self.lines = []

    def record(self, event, queue_id=None, **kw):
        self.lines.append(event.line())


# -- the run log -------------------------------------------------------------------------------


def test_run_log_round_trip_private_and_strict(tmp_path):
    log = mt.RunLog(tmp_path, fsync=False)
    assert log.last("morning") is None
    log.keep_since(["morning", "stale"], NOW - 86400)
    run = mt.JobRun(NOW, 2.5, "delete", 1000, 1000, "", "scheduled")
    log.record("morning", run, ["morning", "stale"])
    assert stat.S_IMODE(os.stat(log.path).st_mode) == 0o600
    again = mt.RunLog(tmp_path, fsync=False)
    assert again.last("morning") == run and again.since == {"morning": NOW - 86400, "stale": NOW - 86400}
    again.record("stale", mt.JobRun(NOW, 0.1, "delete", 0, 0, "OSError: disk", "scheduled"), ["stale"])
    assert mt.RunLog(tmp_path, fsync=False).runs.keys() == {"stale"}  # a job no longer configured is dropped

    data = json.loads(log.path.read_bytes())
    for damage in (lambda d: d["jobs"]["stale"]["last"].update(matched="3"),
                   lambda d: d["jobs"]["stale"]["last"].update(extra=1),
                   lambda d: d["jobs"]["stale"].update(since=True),
                   lambda d: d.update(version=2)):
        bad = json.loads(json.dumps(data))
        damage(bad)
        log.path.write_text(json.dumps(bad))
        with pytest.raises(mt.RunLogError):
            mt.decode(log.path.read_bytes())
    log.path.write_bytes(b"\xff not json")
    refused = mt.RunLog(tmp_path, fsync=False)
    assert refused.refused and refused.runs == {} and not log.path.exists()
    assert (tmp_path / "maintenance.json.bad").read_bytes() == b"\xff not json"
    # JSON nested too deep, a number too big for a float: refused and moved aside too, not raised
    huge = json.loads(json.dumps(data))
    huge["jobs"]["stale"]["last"]["started"] = 10**400
    for hostile in (b"[" * 100_000 + b"]" * 100_000, json.dumps(huge).encode()):
        log.path.write_bytes(hostile)
        refused = mt.RunLog(tmp_path, fsync=False)
        assert refused.refused and refused.runs == {} and not log.path.exists()


def local(y, mo, d, h=0, mi=0) -> float:
    return time.mktime((y, mo, d, h, mi, 0, 0, 0, -1))


def test_missed_runs_like_anacron():
    sched = "30 6 * * *"
    ran = mt.JobRun(local(2026, 1, 1, 6, 30), 1.0, "delete", 0, 0)
    assert mt.missed(sched, ran, None, local(2026, 1, 2, 6, 0)) is None  # not due yet
    assert mt.missed(sched, ran, None, local(2026, 1, 5, 9, 0)) == local(2026, 1, 2, 6, 30)  # three missed: one
    assert mt.missed(sched, None, local(2026, 1, 1, 12), local(2026, 1, 2, 7)) == local(2026, 1, 2, 6, 30)
    assert mt.missed(sched, None, None, local(2026, 1, 9)) is None  # never kept: nothing known to be missed


def test_describe_run():
    assert mt.describe_run(None) == "never run"
    ok = mt.describe_run(mt.JobRun(local(2026, 1, 2, 6, 30), 345600, "delete", 1000, 998, "", "scheduled"))
    assert ok == "last run 2026-01-02 06:30 (scheduled), 4d: delete matched 1000, acted on 998"
    failed = mt.describe_run(mt.JobRun(local(2026, 1, 2, 6, 30), 0.2, "delete", 0, 0, "No space left on device"))
    assert failed == "last run 2026-01-02 06:30, 0s: FAILED: No space left on device"
