"""The administrator's morning cleanup, end to end: a [[maintenance]] job with the filter
vocabulary of `kanmon queue` (`from = "<>"`, `body = "User unknown"`) on a running node
with a clock the test advances; its last run kept across restarts, a failed run raising
the `queue` alert, and a run missed while the node was down made up at start
(`catch_up`). The queue is written through the Spool API (not 1,000 SMTP sessions)."""

from __future__ import annotations

import base64
import itertools

import pytest

from kanmon.model import Envelope, new_queue_id
from kanmon.spool import journal
from kanmon.spool.store import Spool
from tests.integration.test_queue_ops import T0, Site
from tests.support.kanmon_node import wait_for

# 2026-01-01 04:00 local time (T0): the job below runs at 06:30.
MORNING = """
[[maintenance]]
name = "morning"
schedule = "30 6 * * *"
action = "delete"
from = "<>"
body = "User unknown"
older_than = "1h"
{extra}

[[maintenance]]
name = "stale"
schedule = "0 5 * * *"
action = "delete"
older_than = "30d"
"""

FORGED_451 = "451 4.7.1 <{rcpt}>: Recipient address rejected: greylisted, try again later"


def _dsn(rcpt: str, n: int) -> bytes:
    """A bounce of forged mail, its "User unknown" in one of three places."""
    head = (f"From: MAILER-DAEMON@mx{n}.remote.example\r\nTo: {rcpt}\r\n"
            "Subject: Undelivered Mail Returned to Sender\r\nMIME-Version: 1.0\r\n").encode()
    if n % 3 == 0:  # only in the delivery-status part's Diagnostic-Code
        return head + (
            b'Content-Type: multipart/report; report-type=delivery-status; boundary="b"\r\n\r\n'
            b"--b\r\nContent-Type: text/plain\r\n\r\nThis is the mail system. Your message could not be delivered.\r\n"
            b"--b\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.remote.example\r\n\r\n"
            b"Final-Recipient: rfc822; nobody@remote.example\r\nAction: failed\r\nStatus: 5.1.1\r\n"
            b"Diagnostic-Code: smtp; 550 5.1.1 <nobody@remote.example>: User unknown in virtual mailbox table\r\n\r\n"
            b"--b--\r\n")
    if n % 3 == 1:  # base64 text
        text = base64.encodebytes(b"<nobody@remote.example>: host said: 550 User unknown\n").replace(b"\n", b"\r\n")
        return head + b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n" + text
    return head + (b"Content-Type: text/plain; charset=iso-8859-1\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
                   b"D=E9sol=E9: User=20unknown\r\n")


def _deferred(spool: Spool, sender: str, rcpt: str, content: bytes, arrived: float, next_try: float) -> str:
    """A queued message whose own last reply was a 451 from the recipient's server."""
    qid = new_queue_id()
    spool.store_blocking(qid, Envelope(sender, [rcpt], received_at=arrived), content)
    spool.append_state(qid, [
        journal.Result(arrived + 60, rcpt, "deferred", FORGED_451.format(rcpt=rcpt), "127.0.0.7:25", "smtp"),
        journal.Attempt(arrived + 60, 1, next_try),
    ])
    return qid


def build_morning_queue(site: Site, bounces: int, real: int) -> tuple[set[str], set[str]]:
    """`bounces` bounces to forged senders, and `real` real deferred messages, among them
    notices from <> that are not bounces and mail from people that quotes "User unknown"."""
    spool = Spool(site.data_dir, fsync=False)
    arrived, later = T0 - 6 * 3600, T0 + 12 * 3600  # no attempt is due before the job runs
    try:
        bounce_ids = {_deferred(spool, "", f"forged{n}@corp.example", _dsn(f"forged{n}@corp.example", n), arrived, later)
                      for n in range(bounces)}
        kinds = itertools.cycle([
            ("", b"Subject: Delayed Mail (still being retried)\r\n\r\nYour message is delayed; no action is required.\r\n"),
            ("alice@example.test", b"Subject: fwd: bounce\r\n\r\nWhy did I get this? It says User unknown.\r\n"),
            ("bob@example.test", b"Subject: report\r\n\r\nThe quarterly report.\r\n"),
        ])
        real_ids = {_deferred(spool, sender, f"u{n}@corp.example", content, arrived, later)
                    for n, (sender, content) in zip(range(real), kinds)}
    finally:
        spool.close()
    return bounce_ids, real_ids


def start(site: Site) -> None:
    """Start the node and wait until its job schedules count from the clock's time."""
    site.start()
    wait_for(lambda: site.node.node.admin.schedules_from is not None, 60, "maintenance schedules")


@pytest.fixture
def morning(tmp_path):
    s = Site(tmp_path, "a", extra=MORNING.format(extra=""), start=T0)
    yield s
    s.stop()


def test_the_morning_cleanup_deletes_exactly_the_bounces(morning):
    s = morning
    bounces, real = build_morning_queue(s, 1000, 50)
    start(s)
    # The same filter on the command line counts the same messages.
    assert s.cli("queue", "delete", "--from", "<>", "--body", "User unknown", "--dry-run").output.startswith(
        "1000 message(s) match")
    s.node.advance(2.5 * 3600)  # 06:30
    line = s.wait_event("maintenance morning: delete matched 1000, acted on 1000", timeout=60)
    assert set(s.ids()) == real
    assert "stale" not in line
    listing = s.cli("maintenance", "list").output
    assert "1. morning: \"30 6 * * *\" delete deferred messages from '<>', older than 1h, body 'User unknown'" in listing
    assert "(scheduled)" in listing and "delete matched 1000, acted on 1000" in listing
    status = s.node.node.admin.ops.maintenance_status()
    assert status[0].startswith("morning: last run ") and "acted on 1000" in status[0]
    assert status[1].startswith("stale: last run ")  # 05:00 ran too: 0 of them 30 days old


def test_a_failed_run_alerts_is_kept_and_a_missed_run_is_made_up_at_start(tmp_path, monkeypatch):
    s = Site(tmp_path, "a", extra=MORNING.format(extra="catch_up = true"), start=T0)
    try:
        bounces, real = build_morning_queue(s, 3, 3)
        start(s)

        def disk_full(self, qid):
            raise OSError(28, "No space left on device")

        with monkeypatch.context() as m:
            m.setattr(Spool, "delete", disk_full)
            s.node.advance(2.5 * 3600)  # 06:30: the job fails
            assert "No space left on device" in s.wait_event("maintenance morning: failed: ")
            s.wait_event("alert queue/maintenance morning")
            listing = s.cli("maintenance", "list").output
        assert "FAILED: No space left on device" in listing
        assert set(bounces) <= set(s.ids())
        s.node.advance(86400)  # the next morning it works, and the alert is over
        s.wait_event("maintenance morning: delete matched 3, acted on 3")
        s.wait_event("alert queue/maintenance morning cleared")
        assert set(s.ids()) == real
        s.stop()

        # Stopped over two 06:30s, with new bounces queued meanwhile.
        listing = s.cli("maintenance", "list").output
        assert "(scheduled), 0s: delete matched 3, acted on 3" in listing  # the last run survived the stop
        more, _ = build_morning_queue(s, 3, 0)
        s.clock.advance(2 * 86400)
        start(s)
        s.wait_event("maintenance morning: catch-up run")
        wait_for(lambda: any(e.startswith(": maintenance morning: delete matched 3, acted on 3: ")
                             and all(q in e for q in more) for e in s.events()), 60, "the catch-up run's result")
        assert set(s.ids()) == real
        listing = s.cli("maintenance", "list").output
        assert "(catch-up)" in listing
        assert not any("maintenance stale: catch-up" in e for e in s.events())  # catch_up is per job, off by default
        # ...so stale's 05:00 runs passed while the node was down: the listing says so.
        stale_line = listing[listing.index("stale:"):]
        assert "MISSED the run of" in stale_line and "MISSED" not in listing[:listing.index("stale:")]
        s.stop()
        s.clock.advance(3600)  # 09:30: nothing was missed since the catch-up run
        start(s)
        s.node.flush()
        s.stop()
        assert sum("maintenance morning: catch-up run" in e for e in s.events()) == 1
    finally:
        s.stop()
