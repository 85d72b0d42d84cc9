"""Local delivery into Maildir: the mailbox path comes from store.maildir's one checked function."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from kanmon.deliver.local import LocalDelivery, stored_and_wire, wire_body
from kanmon.model import CrlfChecked, Status
from kanmon.spool.groupcommit import GroupCommitter
from kanmon.store import index as mindex
from kanmon.store.imap import cache
from kanmon.store.index import MailboxIndex
from kanmon.store.maildir import to_crlf


def test_unsafe_recipients_are_deferred_and_nothing_is_written_outside(tmp_path: Path) -> None:
    committer = GroupCommitter(tmp_path, fsync=False)
    try:
        local = LocalDelivery(tmp_path, committer)
        rcpts = ["..@example.test", ".hidden@example.test", "a@../x", "nul\0@example.test", "Bob@Example.Test"]
        results = asyncio.run(local.deliver("alice@example.test", rcpts, b"Subject: hi\r\n\r\nbody\r\n"))
    finally:
        committer.close()
    assert [r.status for r in results] == [Status.DEFERRED] * 4 + [Status.SENT]
    assert all(r.reply.code == 451 for r in results[:4])
    delivered = list((tmp_path / "mailboxes" / "example.test" / "bob" / "new").iterdir())
    assert len(delivered) == 1
    assert delivered[0].read_bytes().startswith(b"Return-Path: <alice@example.test>\nDelivered-To: Bob@Example.Test\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mailboxes"]
    assert sorted(p.name for p in (tmp_path / "mailboxes").iterdir()) == ["example.test"]


# The IMAP cache entry local delivery records is made from the message's wire form. When
# every CR and LF of the content is in a CRLF pair, that form is the content itself
# behind the head's: it must be exactly what IMAP would make from the file, to_crlf(file).
_line = st.binary(max_size=30).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
_crlf_content = st.lists(_line, max_size=20).map(lambda lines: b"".join(x + b"\r\n" for x in lines))
_any_content = st.lists(st.sampled_from([b"\r\n", b"\r", b"\n", b"x", b"."]), max_size=20).map(b"".join)
_text = st.text(max_size=20)


@settings(max_examples=300)
@given(content=st.one_of(_crlf_content, _any_content), mail_from=_text, rcpt=_text)
def test_the_wire_form_is_what_imap_makes_from_the_file(content, mail_from, rcpt) -> None:
    head = f"Return-Path: <{mail_from}>\nDelivered-To: {rcpt}\n".encode("utf-8", "replace")
    body = content.translate(None, b"\r")
    stored, pieces = stored_and_wire(head, body, wire_body(content))
    assert stored == head + body
    if pieces is None:  # made from the file by the cache hook
        rest = content.replace(b"\r\n", b"")
        assert b"\r" in rest or b"\n" in rest
    else:
        assert b"".join(pieces) == to_crlf(stored)


def _deliver_and_entry(tmp_path: Path, content: bytes):
    committer = GroupCommitter(tmp_path, fsync=False)
    try:
        asyncio.run(LocalDelivery(tmp_path, committer).deliver("alice@example.test", ["bob@example.test"], content))
    finally:
        committer.close()
    box = tmp_path / "mailboxes" / "example.test" / "bob"
    (path,) = (box / "new").iterdir()
    recorded = MailboxIndex(mindex.index_path(box)).get(path.name)
    return path, recorded


MULTIPART = (b"From: Alice <alice@example.test>\r\nSubject: =?UTF-8?B?5pel5pys?=\r\nMIME-Version: 1.0\r\n"
             b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\n"
             b"one\r\ntwo\r\n--b\r\nContent-Type: message/rfc822\r\n\r\nSubject: inner\r\n\r\nthree\r\n--b--\r\n")


@pytest.mark.parametrize("content", [
    MULTIPART,
    CrlfChecked(MULTIPART),
    # a queue file whose "crlf" flag is wrong (from elsewhere): a bare LF, a bare CR
    CrlfChecked(b"Subject: hello\nFrom: ceo@bank.example\r\n\r\nbody\r\n"),
    CrlfChecked(b"Subject: a\rb\r\n\r\nbody\r\n"),
], ids=["crlf", "crlf-checked", "bare-lf-flagged-crlf", "bare-cr-flagged-crlf"])
def test_delivery_records_the_entry_imap_would_make_from_the_file(tmp_path: Path, content: bytes) -> None:
    path, recorded = _deliver_and_entry(tmp_path, content)
    made = cache.entry_for_file(path)
    assert made is not None and recorded is not None
    assert recorded == made[0]
    assert recorded.vsize == len(to_crlf(path.read_bytes()))


def test_a_recipient_that_is_no_mailbox_is_bounced_and_gets_no_maildir(tmp_path: Path) -> None:
    """is_mailbox (the running config's mailboxes): anything else gets 550 5.1.1, as at
    RCPT, instead of a new Maildir nobody can log in to."""
    committer = GroupCommitter(tmp_path, fsync=False)
    try:
        async def is_mailbox(address: str) -> bool:
            return address.lower() == "bob@example.test"

        local = LocalDelivery(tmp_path, committer, is_mailbox=is_mailbox)
        results = asyncio.run(local.deliver("alice@example.test", ["ghost@example.test", "Bob@Example.Test"],
                                            b"Subject: hi\r\n\r\nbody\r\n"))
    finally:
        committer.close()
    assert [r.status for r in results] == [Status.BOUNCED, Status.SENT]
    assert (results[0].reply.code, results[0].reply.enhanced) == (550, "5.1.1")
    assert sorted(p.name for p in (tmp_path / "mailboxes" / "example.test").iterdir()) == ["bob"]


def test_a_recipient_nobody_can_tell_is_deferred_not_bounced(tmp_path: Path) -> None:
    """is_mailbox answering None (the users file unreadable): 451, retried, no Maildir."""
    committer = GroupCommitter(tmp_path, fsync=False)
    try:
        async def cannot_tell(address: str) -> None:
            return None

        local = LocalDelivery(tmp_path, committer, is_mailbox=cannot_tell)
        (result,) = asyncio.run(local.deliver("alice@example.test", ["carol@example.test"], b"Subject: hi\r\n\r\nx\r\n"))
    finally:
        committer.close()
    assert result.status == Status.DEFERRED and result.reply.code == 451
    assert not (tmp_path / "mailboxes").exists()


def test_a_delivery_that_ends_during_the_quota_walk_still_counts(tmp_path: Path, monkeypatch) -> None:
    # A and B are reserved and writing (60 KB each against 100 KB: B is the one message
    # over). C walks the mailbox while their files are not there yet; A and B finish and
    # release their reservations before C's walk returns. C must still count them: the
    # walk saw neither file, so only the reservations as they were when it began can.
    import threading

    from kanmon.deliver import local as local_mod

    gate = threading.Event()  # A's and B's writes wait for it
    ab_done = threading.Event()
    walks: list[int] = []
    real_usage = local_mod.mailbox_usage

    def usage(data_dir, domain, local):
        walks.append(1)
        found = real_usage(data_dir, domain, local)
        if len(walks) == 3:  # C's walk: nothing of A's or B's yet; let them finish now
            gate.set()
            assert ab_done.wait(10)
        return found

    class Gated(GroupCommitter):
        async def commit(self, files, **kw):
            assert await asyncio.to_thread(gate.wait, 10)
            return await super().commit(files, **kw)

    monkeypatch.setattr(local_mod, "mailbox_usage", usage)
    committer = Gated(tmp_path, fsync=False)
    content = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 60

    async def run():
        local = LocalDelivery(tmp_path, committer, quota_of=lambda d: 100_000)
        a, b, c = (asyncio.create_task(local.deliver("s@remote.example", ["alice@example.test"], content))
                   for _ in range(3))
        first = await asyncio.gather(a, b)
        ab_done.set()
        return first + [await c]

    try:
        results = asyncio.run(run())
    finally:
        committer.close()
    assert len(walks) == 3
    assert [r[0].status for r in results] == [Status.SENT, Status.SENT, Status.DEFERRED]
    assert results[2][0].reply.code == 452
    assert len(list((tmp_path / "mailboxes" / "example.test" / "alice" / "new").iterdir())) == 2
