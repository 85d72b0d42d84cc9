"""Local delivery into Maildir: the mailbox path comes from store.maildir's one checked function."""

from __future__ import annotations

import asyncio
from pathlib import Path

from kanmon.deliver.local import LocalDelivery
from kanmon.model import Status
from kanmon.spool.groupcommit import GroupCommitter


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
