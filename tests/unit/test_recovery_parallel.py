"""Start-up recovery on every core (kanmon.spool.recovery): child processes read and
decode the spool, the node adds what they send to its index.

Whatever the children do (answer, send a damaged file's refusal, die at the start or
half-way, send records for other ids), the index ends up with exactly the entries a
serial recovery builds, in queue id order, each message once, and a damaged queue file
is moved to corrupt/ as before.
"""

from __future__ import annotations

import random
import sys

import pytest

from kanmon.admin.queue_ops import OfflineLink, QueueOps
from kanmon.config import parse_config
from kanmon.records.store import Records
from kanmon.spool.recovery import recover_index
from kanmon.spool.store import Spool

from tests.unit.test_queue_index import CONFIG, Clock, store

CHUNK = 7  # small chunks: many frames from each child for a few dozen messages


def fields(entry) -> tuple:
    return tuple(getattr(entry, s) for s in type(entry).__slots__)


def serial_entries(data_dir) -> dict[str, tuple]:
    """What the serial recovery (Spool.recover_each, the index built from whole entries) has."""
    spool = Spool(data_dir, fsync=False)
    index = spool.keep_index()
    spool.recover_each(lambda e: index.add(e.queue_id, e.envelope, e.size, e.state))
    spool.close()
    return {qid: fields(e) for qid, e in index._entries.items()}


def recover(data_dir, **kw):
    spool = Spool(data_dir, fsync=False)
    spool.keep_index()
    seen: list[str] = []
    warnings: list[str] = []
    count, corrupt, removed = recover_index(spool, lambda e, refused: seen.append(e.queue_id), chunk=CHUNK,
                                            parallel_from=1, on_fallback=warnings.append, **kw)
    return spool, seen, corrupt, warnings, count


@pytest.fixture
def spooled(tmp_path):
    spool = Spool(tmp_path, fsync=False)
    rng = random.Random(3)
    ids = sorted(store(spool, rng, i) for i in range(50))
    spool.close()
    return tmp_path, ids


def damage(data_dir, qid: str) -> None:
    path = data_dir / "spool" / "queue" / qid
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x20  # in the content: the CRC no longer matches
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("workers", [2, 3])
def test_children_build_the_index_a_serial_recovery_builds(spooled, workers):
    data_dir, ids = spooled
    expected = serial_entries(data_dir)
    spool, seen, corrupt, warnings, count = recover(data_dir, workers=workers)
    assert seen == ids and count == len(ids)  # each once, in queue id order
    assert {q: fields(e) for q, e in spool.index._entries.items()} == expected
    assert corrupt == [] and warnings == []


def test_a_damaged_queue_file_read_by_a_child_is_moved_aside(spooled):
    data_dir, ids = spooled
    bad = ids[17]
    damage(data_dir, bad)
    spool, seen, corrupt, warnings, count = recover(data_dir, workers=2)
    assert [q for q, _ in corrupt] == [bad] and "checksum" in corrupt[0][1]
    assert seen == [q for q in ids if q != bad] and count == len(ids) - 1
    assert (data_dir / "spool" / "corrupt" / bad).exists()
    assert not (data_dir / "spool" / "queue" / bad).exists()
    assert bad not in spool.index


# A child that reads its ids and exits without a frame; one that sends its first chunk
# and dies; one that sends well-formed records for the wrong ids; one that sends garbage.
DIES_AT_ONCE = "import sys; sys.stdin.buffer.read(); sys.exit(3)"
DIES_AFTER_ONE = """
import marshal, os, sys
from kanmon.spool import recovery
q, s, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
names = sys.stdin.buffer.read().decode().split("\\n")
data = marshal.dumps([recovery.read_one(q, s, x) for x in names[:n]])
sys.stdout.buffer.write(recovery._LEN.pack(len(data)) + data + recovery._LEN.pack(1000) + b"torn")
sys.stdout.buffer.flush()
os._exit(9)
"""
WRONG_IDS = """
import marshal, sys
from kanmon.spool import recovery
q, s, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
names = sys.stdin.buffer.read().decode().split("\\n")
for i in range(0, len(names), n):
    data = marshal.dumps([recovery.read_one(q, s, x) for x in reversed(names[i:i + n])])
    sys.stdout.buffer.write(recovery._LEN.pack(len(data)) + data)
"""
GARBAGE = "import sys; sys.stdin.buffer.read(); sys.stdout.buffer.write(b'\\0\\0\\0\\4junk')"
SHORT_RECORDS = """
import marshal, sys
from kanmon.spool import recovery
q, s, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
names = sys.stdin.buffer.read().decode().split("\\n")
for i in range(0, len(names), n):
    data = marshal.dumps([(x, 1.0) for x in names[i:i + n]])  # the right ids, records of no known shape
    sys.stdout.buffer.write(recovery._LEN.pack(len(data)) + data)
"""


EXITS_UNREAD = "import os; os._exit(4)"  # before it reads its ids: the node's write may fail
NOT_STARTED = None  # no such program: Popen fails


@pytest.mark.parametrize("child", [DIES_AT_ONCE, DIES_AFTER_ONE, WRONG_IDS, GARBAGE, SHORT_RECORDS, EXITS_UNREAD, NOT_STARTED])
def test_a_child_that_fails_leaves_its_share_to_the_node_nothing_lost_or_doubled(spooled, child, tmp_path):
    data_dir, ids = spooled
    bad = ids[40]
    damage(data_dir, bad)
    expected = serial_entries(data_dir)  # also moves the damaged one aside...
    (data_dir / "spool" / "corrupt" / bad).rename(data_dir / "spool" / "queue" / bad)  # ...put it back
    (data_dir / "spool" / "corrupt" / (bad + ".state")).rename(data_dir / "spool" / "state" / bad)
    command = [str(tmp_path / "no-such-python")] if child is None else [sys.executable, "-c", child]
    spool, seen, corrupt, warnings, count = recover(data_dir, workers=2, child_command=command)
    assert seen == [q for q in ids if q != bad]  # each once, in order, though every child failed
    assert {q: fields(e) for q, e in spool.index._entries.items()} == expected
    assert [q for q, _ in corrupt] == [bad]
    assert len(warnings) == 2 and all("read by the node itself" in w for w in warnings)


def test_a_small_spool_is_read_without_children(spooled, monkeypatch):
    data_dir, ids = spooled
    import subprocess

    def no_children(*a, **kw):
        raise AssertionError("no child for a small spool")

    monkeypatch.setattr(subprocess, "Popen", no_children)
    spool = Spool(data_dir, fsync=False)
    spool.keep_index()
    count, corrupt, _ = recover_index(spool, lambda e, r: None, workers=2)  # 50 < PARALLEL_FROM
    assert count == len(ids) and set(spool.index._entries) == set(ids)


def test_the_first_walk_after_recovery_does_not_list_the_queue_again(spooled, monkeypatch):
    data_dir, ids = spooled
    import os
    import time

    # queue/ last changed more than 2 s before the recovery's listing: a listing to trust
    old = time.time() - 60
    os.utime(data_dir / "spool" / "queue", (old, old))
    spool, seen, corrupt, warnings, count = recover(data_dir, workers=2)
    listed = []
    real = os.listdir
    monkeypatch.setattr(os, "listdir", lambda p: listed.append(p) or real(p))
    config = parse_config(CONFIG.format(data_dir=data_dir))
    records = Records(data_dir, "mx1.example.test")
    try:
        ops = QueueOps(config, spool, records, OfflineLink(Clock()))
        assert ops.summary()["total"]["count"] == len(ids)
        assert not [p for p in listed if str(p).endswith("queue")]
        store(spool, random.Random(9), 99)  # a new name: the next walk lists queue/ again
        assert ops.summary()["total"]["count"] == len(ids) + 1
        assert [p for p in listed if str(p).endswith("queue")]
    finally:
        records.close()


def test_a_child_that_hangs_before_reading_its_ids_does_not_block_the_start(tmp_path):
    # A big share of ids (more than a pipe holds) for a child that never reads them: the
    # node's start goes on, and the frame that does not come fails after the hang timeout.
    import threading

    from kanmon.spool import recovery

    names = [f"{i:016X}" for i in range(200_000)]  # ~3.4 MB of ids
    made: list = []
    t = threading.Thread(target=lambda: made.append(recovery._Child(
        [sys.executable, "-c", "import time; time.sleep(600)"], names)), daemon=True)
    t.start()
    t.join(120)
    try:
        assert made, "the node blocked giving a child its queue ids"
        child = made[0]
        assert not child.failed
        with pytest.raises(OSError, match="sent nothing"):
            child.frame(0.2)
    finally:
        for child in made:
            child.stop("test over")
