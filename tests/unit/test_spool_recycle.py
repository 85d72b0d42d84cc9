"""Queue files kept for reuse (kanmon.spool.recycle): a finished message's file is
written over by a new one, never read as a message, never kept long, never written
through a link; the spool's contents stay exactly what they would be without it."""

from __future__ import annotations

import asyncio
import os

import pytest

from kanmon.model import ClientInfo, Envelope, new_queue_id
from kanmon.spool.recycle import READY, Recycler
from kanmon.spool.store import Spool, encode_queue_file


def env() -> Envelope:
    return Envelope("a@remote.example", ["alice@example.test"], {}, ClientInfo("127.0.0.6", helo="c"), received_at=1.5)


READY_MS = int(READY * 1000)


class Clock:
    def __init__(self) -> None:
        self.ms = 1_000_000

    def __call__(self) -> int:
        return self.ms


def spool_with_clock(tmp_path, **kw) -> tuple[Spool, Clock]:
    spool = Spool(tmp_path)
    clock = Clock()
    spool.recycler = Recycler(spool.recycle, sync_dir=spool.queue, clock_ms=clock, **kw)
    return spool, clock


def store(spool: Spool, content: bytes) -> str:
    qid = new_queue_id()
    asyncio.run(spool.store(qid, env(), content))
    return qid


def names(d) -> list[str]:
    return sorted(os.listdir(d))


@pytest.mark.parametrize("first,second", [(30_000, 500), (500, 30_000), (4_000, 4_000)],
                         ids=["longer-file-cut", "shorter-file-grown", "same-length"])
def test_a_finished_queue_file_is_written_over_by_the_next_message(tmp_path, first, second):
    spool, clock = spool_with_clock(tmp_path)
    a = store(spool, b"Subject: a\r\n\r\n" + b"A" * first + b"\r\n")
    inode = os.stat(spool.queue / a).st_ino
    spool.remove(a)
    assert names(spool.queue) == [] and len(names(spool.recycle)) == 1
    clock.ms += READY_MS  # a reader that opened it as a queue file has read it
    content = b"Subject: b\r\n\r\n" + b"B" * second + b"\r\n"
    b = store(spool, content)
    path = spool.queue / b
    assert os.stat(path).st_ino == inode and spool.recycler.reused == 1
    assert path.read_bytes() == encode_queue_file(env(), content)  # its own bytes, nothing of A's
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    assert names(spool.recycle) == [] and names(spool.incoming) == []
    assert Spool(tmp_path).recover()[0][0].envelope.mail_from == "a@remote.example"
    assert spool.read_content(b) == content
    spool.close()


def test_a_kept_file_waits_before_it_is_written_over(tmp_path):
    spool, clock = spool_with_clock(tmp_path)
    a = store(spool, b"Subject: a\r\n\r\nx\r\n")
    inode = os.stat(spool.queue / a).st_ino
    spool.remove(a)
    clock.ms += READY_MS - 1
    b = store(spool, b"Subject: b\r\n\r\nx\r\n")
    assert os.stat(spool.queue / b).st_ino != inode and len(names(spool.recycle)) == 1
    clock.ms += 1  # ready now, but listed again only after a pause while nothing was ready
    c = store(spool, b"Subject: c\r\n\r\nx\r\n")
    assert os.stat(spool.queue / c).st_ino != inode
    clock.ms += 100
    d = store(spool, b"Subject: d\r\n\r\nx\r\n")
    assert os.stat(spool.queue / d).st_ino == inode and names(spool.recycle) == []
    spool.close()


def test_big_files_are_unlinked_and_the_kept_ones_are_bounded(tmp_path):
    spool, clock = spool_with_clock(tmp_path, keep=8, max_size=10_000)
    big = store(spool, b"Subject: big\r\n\r\n" + b"x" * 20_000 + b"\r\n")
    spool.remove(big)
    assert names(spool.recycle) == [] and names(spool.queue) == []
    ids = [store(spool, b"Subject: s\r\n\r\nx\r\n") for _ in range(30)]
    for i, qid in enumerate(ids):
        clock.ms += 1
        spool.remove(qid)
        assert len(names(spool.recycle)) <= 8, i
    assert names(spool.queue) == [] and len(names(spool.recycle)) == 8
    spool.close()


def test_the_sweep_removes_what_nobody_took_and_anything_else_found_there(tmp_path):
    spool, clock = spool_with_clock(tmp_path)
    old, young = store(spool, b"Subject: o\r\n\r\nx\r\n"), store(spool, b"Subject: y\r\n\r\nx\r\n")
    spool.remove(old)
    clock.ms += 30_000
    spool.remove(young)
    clock.ms += 30_000  # old: 60 s unused
    (spool.recycle / "stray").write_bytes(b"?")
    (spool.recycle / f"{clock.ms + 5_000}.from-before-a-reboot").write_bytes(b"?")  # a time still to come
    assert spool.recycler.sweep() == 3
    assert [n.partition(".")[2] for n in names(spool.recycle)] == [young]
    assert spool.clear_at_start() == 0 and names(spool.recycle) == []  # at start: everything
    spool.close()


def test_start_empties_the_kept_files_and_recovers_only_messages(tmp_path):
    spool, clock = spool_with_clock(tmp_path)
    kept, queued = store(spool, b"Subject: k\r\n\r\nx\r\n"), store(spool, b"Subject: q\r\n\r\nx\r\n")
    spool.remove(kept)
    clock.ms += 5_000
    # A crash after a kept file was taken (renamed to its temporary name), before its rename into queue/:
    taken = spool.recycler.take(f"{spool.incoming}/{new_queue_id()}")
    assert taken is not None
    os.close(taken[0])
    store(spool, b"Subject: r\r\n\r\nx\r\n")  # nothing else is ready: a new file
    kept_again = names(spool.queue)[-1]
    spool.remove(kept_again)
    spool.close()
    entries, corrupt, removed = Spool(tmp_path).recover()
    assert [e.queue_id for e in entries] == [queued] and corrupt == [] and removed == 1
    assert names(tmp_path / "spool/recycle") == [] and names(tmp_path / "spool/incoming") == []


def test_two_takers_one_file(tmp_path):
    d = tmp_path / "recycle"
    d.mkdir()
    (tmp_path / "q").write_bytes(b"x" * 100)
    clock = Clock()
    putter, one, two = (Recycler(d, clock_ms=clock) for _ in range(3))
    assert putter.put(str(tmp_path / "q"), "q1")
    clock.ms += READY_MS
    assert one._list() and two._list()  # both saw it
    fd, size = one.take(str(tmp_path / "t1"))
    os.close(fd)
    assert size == 100 and two.take(str(tmp_path / "t2")) is None  # lost the race: the caller creates a file
    assert not (tmp_path / "t2").exists() and names(d) == []


def test_what_is_not_a_regular_file_is_removed_never_written_through(tmp_path):
    d = tmp_path / "recycle"
    d.mkdir()
    target = tmp_path / "elsewhere"
    target.write_bytes(b"keep me")
    os.symlink(target, d / "1.link")
    os.mkfifo(d / "2.fifo")
    clock = Clock()
    clock.ms = 10_000
    r = Recycler(d, clock_ms=clock)
    assert r.take(str(tmp_path / "t")) is None
    assert target.read_bytes() == b"keep me" and not os.path.lexists(tmp_path / "t") and names(d) == []


def test_without_a_recycler_the_committer_creates_files_as_before(tmp_path):
    spool, clock = spool_with_clock(tmp_path)
    a = store(spool, b"Subject: a\r\n\r\nx\r\n")
    spool.remove(a)
    clock.ms += 5_000
    # The same committer writing a mailbox file (kanmon.deliver.local): never over a kept queue file.
    final = tmp_path / "mailbox-file"
    (err,) = asyncio.run(spool.committer.commit([(str(tmp_path / "tmp-file"), str(final), b"mail")]))
    assert err is None and final.read_bytes() == b"mail" and len(names(spool.recycle)) == 1
    spool.close()


def test_a_kept_file_is_written_over_only_after_its_removal_from_the_queue_is_durable(tmp_path, monkeypatch):
    """The order of the real calls (os.fsync and os.rename wrapped, not replaced): after a
    crash, queue/<old id> never names the bytes of another message."""
    spool, clock = spool_with_clock(tmp_path)
    a = store(spool, b"Subject: a\r\n\r\nx\r\n")
    calls: list[str] = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd):
        calls.append("fsync " + os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    def rename(src, dst):
        calls.append(f"rename {src} -> {dst}")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    spool.remove(a)
    clock.ms += READY_MS
    store(spool, b"Subject: b\r\n\r\nx\r\n")
    monkeypatch.undo()
    put = next(i for i, c in enumerate(calls) if c.startswith(f"rename {spool.queue}/{a} -> {spool.recycle}/"))
    taken = next(i for i, c in enumerate(calls) if c.startswith(f"rename {spool.recycle}/"))
    synced = [i for i, c in enumerate(calls) if c == f"fsync {spool.queue}"]
    assert any(put < i < taken for i in synced), calls
    spool.close()


def test_the_bound_holds_after_a_sweep_and_with_puts_from_many_threads(tmp_path):
    d = tmp_path / "recycle"
    d.mkdir()
    clock = Clock()
    r = Recycler(d, keep=8, clock_ms=clock)
    for i in range(3):
        (tmp_path / f"q{i}").write_bytes(b"x")
        assert r.put(str(tmp_path / f"q{i}"), f"q{i}")
    assert r.sweep() == 0  # nothing idle: a sweep that removed nothing
    results = []

    def put(i: int) -> None:
        (tmp_path / f"p{i}").write_bytes(b"x")
        results.append(r.put(str(tmp_path / f"p{i}"), f"p{i}"))

    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(put, range(40)))
    assert len(names(d)) == 8 and results.count(True) == 5


def test_a_kept_file_with_another_name_is_never_written_through(tmp_path):
    d = tmp_path / "recycle"
    d.mkdir()
    other = tmp_path / "a-snapshot-of-it"
    other.write_bytes(b"a delivered message")
    os.link(other, d / "1.q1")  # e.g. a `cp -al` copy of the data directory
    clock = Clock()
    clock.ms = 10_000
    assert Recycler(d, clock_ms=clock).take(str(tmp_path / "t")) is None
    assert other.read_bytes() == b"a delivered message" and not os.path.lexists(tmp_path / "t") and names(d) == []


def test_a_reader_that_finds_the_message_finished_meanwhile_says_so_and_not_another_message(tmp_path):
    """A command's read (`queue show`, an export) of a message finished while it read:
    the file it opened was kept and written over by another message; the reader checks
    that the queue's name still names what it read."""
    from kanmon.spool.store import _same_file

    spool, clock = spool_with_clock(tmp_path)
    a = store(spool, b"Subject: a\r\n\r\nx\r\n")
    path = spool.queue / a
    fd = os.open(path, os.O_RDONLY)  # the reader opened it ...
    try:
        _same_file(fd, path)  # (still queued: fine)
        spool.remove(a)
        clock.ms += READY_MS
        b = store(spool, b"Subject: b\r\n\r\nx\r\n")
        assert os.fstat(fd).st_ino == os.stat(spool.queue / b).st_ino  # ... and now holds B's bytes
        with pytest.raises(FileNotFoundError):
            _same_file(fd, path)
    finally:
        os.close(fd)
    with pytest.raises(FileNotFoundError):
        spool.read_content(a)
    with pytest.raises(FileNotFoundError):
        spool.export_raw(a)
    assert spool.read_content(b) == b"Subject: b\r\n\r\nx\r\n" and spool.export_raw(b)[0]
    spool.close()


def test_start_leaves_alone_a_name_that_shares_a_queued_file(tmp_path):
    """After a crash of a file system without a journal, a name in incoming/ or recycle/
    may share the file of a queued message: the queued message is kept."""
    spool = Spool(tmp_path)
    q = store(spool, b"Subject: q\r\n\r\nx\r\n")
    os.link(spool.queue / q, spool.incoming / "stale")
    os.link(spool.queue / q, spool.recycle / f"1.{q}")
    (spool.recycle / "2.other").write_bytes(b"x")
    spool.close()
    entries, corrupt, removed = Spool(tmp_path).recover()
    assert [e.queue_id for e in entries] == [q] and corrupt == [] and removed == 0
    assert names(tmp_path / "spool/recycle") == [f"1.{q}"]
