"""The Sieve hook of local delivery (kanmon.deliver.sieving with kanmon.deliver.local),
driven directly: a delivery deferred over quota and retried still sends its vacation
reply once; a redirect that cannot be queued defers a message nothing keeps, and only
logs for one that is kept; filtering switched off in [sieve] delivers to INBOX."""

from __future__ import annotations

import asyncio
from pathlib import Path

from kanmon.deliver.local import LocalDelivery
from kanmon.deliver.sieving import SieveFilter
from kanmon.model import Status
from kanmon.spool.groupcommit import GroupCommitter
from kanmon.store.sievescripts import ScriptStore

RCPT = "bob@example.test"
MSG = b"From: carol@remote.example\r\nTo: bob@example.test\r\nSubject: hi\r\n\r\nbody\r\n"


class Harness:
    def __init__(self, tmp_path: Path, *, quota: int | None = None, enabled: bool = True, fail: bool = False):
        self.sent: list[tuple[str, list[str], str]] = []
        self.events: list[tuple[str, str]] = []
        self.quota = quota
        self.fail = fail

        async def inject(env, content, origin):
            if self.fail:
                raise OSError("spool full")
            self.sent.append((env.mail_from, env.rcpts, origin))
            return "Q1"

        self.committer = GroupCommitter(tmp_path, fsync=False)
        sieve = SieveFilter(tmp_path, "mx.example.test", inject, lambda text, qid=None, kind="info": self.events.append((text, kind)),
                            clock=lambda: 1_000_000.0, settings=lambda: (4, 65536, enabled))
        self.local = LocalDelivery(tmp_path, self.committer, quota_of=lambda d: self.quota, sieve=sieve)
        self.box = tmp_path / "mailboxes" / "example.test" / "bob"

    def deliver(self):
        return asyncio.run(self.local.deliver("carol@remote.example", [RCPT], MSG, queue_id="Q0"))

    def inbox(self) -> int:
        return len(list((self.box / "new").iterdir())) if (self.box / "new").is_dir() else 0


def script(tmp_path: Path, text: str) -> None:
    store = ScriptStore(tmp_path, RCPT)
    store.put("s", text.encode())
    store.activate("s")


def test_vacation_after_an_over_quota_deferral_is_still_sent_once(tmp_path):
    script(tmp_path, 'require "vacation"; vacation "away";')
    h = Harness(tmp_path, quota=1)
    h.box.mkdir(parents=True)
    for sub in ("tmp", "new", "cur"):
        (h.box / sub).mkdir()
    (h.box / "cur" / "old").write_bytes(b"x" * 10)  # over the 1-byte quota
    try:
        (r,) = h.deliver()
        assert r.status is Status.DEFERRED and h.sent == []
        h.quota = None
        (r,) = h.deliver()
        assert r.status is Status.SENT and h.sent == [("", ["carol@remote.example"], "vacation reply")]
        (r,) = h.deliver()
        assert r.status is Status.SENT and len(h.sent) == 1
        assert any("answered within 7 days" in t for t, _k in h.events)
    finally:
        h.committer.close()


def test_a_redirect_that_cannot_be_queued(tmp_path):
    script(tmp_path, 'redirect "dave@elsewhere.example";')
    h = Harness(tmp_path, fail=True)
    try:
        (r,) = h.deliver()
        assert r.status is Status.DEFERRED and h.inbox() == 0  # nothing keeps it: retried, not lost
        script(tmp_path, 'require "copy"; redirect :copy "dave@elsewhere.example";')
        (r,) = h.deliver()
        assert r.status is Status.SENT and h.inbox() == 1
        assert any(k == "error" and "could not be queued" in t for t, k in h.events)
    finally:
        h.committer.close()


def test_filtering_switched_off(tmp_path):
    script(tmp_path, "discard;")
    h = Harness(tmp_path, enabled=False)
    try:
        (r,) = h.deliver()
        assert r.status is Status.SENT and h.inbox() == 1
    finally:
        h.committer.close()


def test_a_redirect_to_no_mailbox_of_ours_keeps_the_message(tmp_path):
    """A redirect to a local domain's address that is no mailbox or alias is not queued
    (its bounce would go to the outside sender): the message stays in INBOX, with a
    warning; a redirect elsewhere is queued as before."""
    script(tmp_path, 'redirect "sales-team@example.test"; redirect "dave@elsewhere.example";')
    h = Harness(tmp_path)
    h.local.sieve.unknown_local = lambda address: address == "sales-team@example.test"
    try:
        (r,) = h.deliver()
        assert r.status is Status.SENT and h.inbox() == 1
        assert h.sent == [("carol@remote.example", ["dave@elsewhere.example"], "sieve redirect")]
        assert any(k == "warning" and "not redirected to sales-team@example.test: not a mailbox or alias" in t
                   for t, k in h.events)
    finally:
        h.committer.close()
