"""The injector (kanmon.queue.inject): durable first, then the accept line, history and hand-over."""

from __future__ import annotations

import asyncio

import pytest

from kanmon.clock import ManualClock
from kanmon.model import ClientInfo, Envelope, is_queue_id
from kanmon.queue.inject import Injector
from kanmon.spool.store import Spool, SpoolError

CONTENT = b"From: x@example.test\r\nSubject: Hello\r\nMessage-ID: <m1@example.test>\r\n\r\nbody\r\n"


class Recorder:
    """Records and submit in one list, in call order; each checks the spool at that moment."""

    def __init__(self, spool: Spool):
        self.spool = spool
        self.calls: list[tuple] = []

    def record(self, event, queue_id=None, **kw):
        self.calls.append(("emit", event.line(), queue_id, event.fields(), self.spool.exists(queue_id)))

    def history_accept(self, queue_id, env, size, content, fields=None):
        self.calls.append(("history", queue_id, env, size, fields, self.spool.exists(queue_id)))

    def submit(self, queue_id, env, content):
        self.calls.append(("submit", queue_id, env, content, self.spool.exists(queue_id)))


@pytest.fixture
def spool(tmp_path):
    s = Spool(tmp_path, fsync=False)
    yield s
    s.close()


def test_inject_stores_then_records_then_submits(spool):
    rec = Recorder(spool)
    injector = Injector(spool, rec, rec.submit, hostname="mx1.example.test", clock=ManualClock(1_800_000_000.0))
    env = Envelope("", ["alice@example.test"], is_notice=True)
    qid = asyncio.run(injector.inject(env, CONTENT, "quota notice"))
    assert is_queue_id(qid)
    assert [c[0] for c in rec.calls] == ["emit", "history", "submit"]
    assert all(c[-1] for c in rec.calls)  # each only once the message was durable
    _, text, line_qid, detail, _ = rec.calls[0]
    assert line_qid == qid and detail["origin"] == "quota notice" and detail["proto"] == "internal"
    assert text == (f"from=<>, size={len(CONTENT)}, nrcpts=1, msgid=<m1@example.test>, proto=internal, relay=local")
    _, _, queued_env, size, fields, _ = rec.calls[1]
    assert size == len(CONTENT) and fields == {"subject": "Hello", "message-id": "<m1@example.test>"}
    # The envelope as queued: arrival from the clock, the internal client; the caller's is untouched.
    assert queued_env.received_at == 1_800_000_000.0 and env.received_at == 0.0 and env.client is None
    assert queued_env.client == ClientInfo("127.0.0.1", name="localhost", helo="mx1.example.test", proto="internal")
    stored, size = spool.read_envelope(qid)
    assert stored == queued_env and spool.read_content(qid) == CONTENT
    assert rec.calls[2][2] == queued_env and rec.calls[2][3] == CONTENT


def test_inject_keeps_what_the_caller_set(spool):
    rec = Recorder(spool)
    client = ClientInfo("127.0.0.1", name="localhost", helo="h", proto="internal", auth_user="admin")
    env = Envelope("kanmon@example.test", ["a@example.test", "b@example.test"], client=client, received_at=5.0)
    qid = Injector(spool, rec, rec.submit).inject_blocking(env, b"Subject: x\r\n\r\ny\r\n", "alert")
    assert spool.read_envelope(qid)[0] == env
    assert rec.calls[0][1].startswith("from=<kanmon@example.test>, size=17, nrcpts=2, proto=internal")


def test_a_storage_error_reaches_the_caller_and_nothing_is_recorded(spool):
    class Broken:
        hostname = "h"

        async def store(self, *a):
            raise SpoolError("cannot write queue file: No space left on device")

    rec = Recorder(spool)
    with pytest.raises(SpoolError):
        asyncio.run(Injector(Broken(), rec, rec.submit).inject(Envelope("", ["a@example.test"]), CONTENT, "x"))
    assert rec.calls == []


def test_the_recipients_are_expanded_each_target_keeping_where_it_came_from(spool):
    """With expand (a local domain's aliases), each target is queued once, with the address
    it came from as its original recipient and that address's DSN parameters."""
    rec = Recorder(spool)
    aliases = {"team@example.test": ("alice@example.test", "bob@example.test"), "Alice@example.test": ("alice@example.test",)}
    injector = Injector(spool, rec, rec.submit, clock=ManualClock(1_800_000_000.0),
                        expand=lambda address: aliases.get(address, (address,)))
    env = Envelope("ops@example.test", ["team@example.test", "Alice@example.test", "carol@example.org"],
                   dsn_notify={"team@example.test": "NEVER"}, dsn_orcpt={"team@example.test": "rfc822;team@example.test"})
    injector.inject_blocking(env, CONTENT, "sendmail")
    submitted = [c for c in rec.calls if c[0] == "submit"][0][2]
    assert submitted.rcpts == ["alice@example.test", "bob@example.test", "carol@example.org"]
    assert submitted.original_rcpts == {"alice@example.test": "team@example.test", "bob@example.test": "team@example.test"}
    assert submitted.dsn_notify == {"team@example.test": "NEVER", "alice@example.test": "NEVER", "bob@example.test": "NEVER"}
    assert submitted.dsn_orcpt["bob@example.test"] == "rfc822;team@example.test"
    # Without expand, the recipients are queued as given.
    plain = Injector(spool, rec, rec.submit, clock=ManualClock(1_800_000_000.0))
    plain.inject_blocking(Envelope("", ["team@example.test"]), CONTENT, "alert")
    assert [c for c in rec.calls if c[0] == "submit"][-1][2].rcpts == ["team@example.test"]


def test_a_release_queues_the_recipients_it_is_given(spool):
    """release_blocking does not expand again: a release --to is expanded once, by the
    release (as RCPT TO expands once), so an alias whose target is an alias is not
    followed a second level."""
    rec = Recorder(spool)
    aliases = {"team@example.test": ("ops@example.test", "bob@example.test"), "ops@example.test": ("carol@example.test",)}
    injector = Injector(spool, rec, rec.submit, clock=ManualClock(1_800_000_000.0),
                        expand=lambda address: aliases.get(address, (address,)))
    env = injector.expanded(Envelope("a@remote.example", ["team@example.test"], received_at=1_800_000_000.0))
    assert env.rcpts == ["ops@example.test", "bob@example.test"]
    injector.release_blocking("1M1Q3Z0Kd4B71R2", env, CONTENT)
    assert [c for c in rec.calls if c[0] == "submit"][-1][2].rcpts == ["ops@example.test", "bob@example.test"]
