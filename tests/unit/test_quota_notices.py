"""QuotaNotices.over/under as the SMTP listener carries them out (effects of the quota check)."""

from __future__ import annotations

import asyncio

from kanmon.queue.inject import Injector
from kanmon.store.quota import MARKER, QuotaNotices


class FakeSpool:
    def __init__(self) -> None:
        self.stored: list[tuple[str, bytes]] = []

    async def store(self, qid, env, content) -> None:
        self.stored.append((qid, content))


class FakeRecords:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def emit(self, text, queue_id=None, kind="info", **kw) -> None:
        self.lines.append(text)

    def history_accept(self, *a) -> None:
        pass

    def record(self, event, queue_id=None, **kw) -> None:
        self.lines.append(event.line())


def test_one_notice_per_overflow_even_when_refusals_race(tmp_path):
    async def main() -> tuple[FakeSpool, list[str]]:
        spool, queued = FakeSpool(), []
        injector = Injector(spool, FakeRecords(), lambda qid, env, c: queued.append(qid), hostname="mx1.example.test")
        notices = QuotaNotices(tmp_path, injector)
        # Two sessions refuse the same mailbox at once: one marker, one notice.
        await asyncio.gather(notices.over("alice@example.test", 3000, 2000),
                             notices.over("alice@example.test", 3000, 2000))
        await asyncio.gather(*notices._tasks)
        assert (tmp_path / "mailboxes/example.test/alice" / MARKER).exists()
        await notices.over("alice@example.test", 3100, 2000)  # still over: no new notice
        await notices.under("alice@example.test")
        assert not (tmp_path / "mailboxes/example.test/alice" / MARKER).exists()
        await notices.over("alice@example.test", 2500, 2000)  # a new overflow: a new notice
        await asyncio.gather(*notices._tasks)
        return spool, queued

    spool, queued = asyncio.run(main())
    assert len(spool.stored) == 2 and len(queued) == 2
    assert b"Subject: Your mailbox is full" in spool.stored[0][1]


def test_under_without_a_marker_is_harmless(tmp_path):
    async def main() -> None:
        notices = QuotaNotices(tmp_path, Injector(FakeSpool(), FakeRecords(), lambda *a: None))
        await notices.under("bob@example.test")

    asyncio.run(main())
