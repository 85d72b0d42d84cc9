"""The queue index (kanmon.spool.index): a running node's queue walks read memory, and
answer exactly what the file scan of a stopped node answers.

Two Spool objects on one data_dir: `files` has no index (a stopped node's admin command),
`node` keeps one (the running server, after recovery). The same QueueOps operations on
each give the same results, whatever changed meanwhile: messages stored or journaled by
the node, stored by another process (a receiver), deleted, damaged underneath it.
"""

from __future__ import annotations

import random

import pytest

from kanmon.admin.queue_ops import Filters, OfflineLink, QueueOps
from kanmon.config import parse_config
from kanmon.model import ClientInfo, Envelope, new_queue_id
from kanmon.records.store import Records
from kanmon.spool import journal
from kanmon.spool.store import Spool

NOW = 1_800_000_000.0
CONFIG = """
[server]
hostname = "mx1.example.test"
data_dir = "{data_dir}"
[[domain]]
name = "example.test"
mailboxes = ["postmaster"]
"""

FILTERS = [
    {}, {"state": "hold"}, {"state": "deferred"}, {"domain": "d1.example"}, {"older_than": 2 * 86400},
    {"mail_from": "user3@example.test"}, {"reason": "User unknown"}, {"to": "r1*"}, {"subject": "bench 2"},
    {"body": "xxxx"}, {"size": ">150"}, {"attempts": ">=1"}, {"state": "corrupt"},
    {"state": "deferred", "domain": "d0.example", "older_than": 86400},
]


class Clock:
    def now(self) -> float:
        return NOW


def store(spool: Spool, rng: random.Random, i: int) -> str:
    arrived = NOW - rng.uniform(0, 4 * 86400)
    qid = new_queue_id(arrived)
    env = Envelope(f"user{rng.randrange(5)}@example.test",
                   [f"r{i}@d{rng.randrange(3)}.example"] + ([f"c{i}@d{rng.randrange(3)}.example"] if i % 3 == 0 else []),
                   client=ClientInfo(ip="192.0.2.1"), received_at=arrived)
    spool.store_blocking(qid, env, b"Subject: bench %d\r\n\r\n" % (i % 4) + b"x" * (i * 7 % 300) + b"\r\n")
    reply = rng.choice(["451 4.4.1 Connection refused", "450 4.1.1 <x@y>: User unknown"])
    spool.append_state(qid, [journal.Result(arrived + 60, r, "deferred", reply) for r in env.rcpts]
                       + [journal.Attempt(arrived + 60, 1, NOW + 600)])
    return qid


@pytest.fixture
def pair(tmp_path):
    config = parse_config(CONFIG.format(data_dir=tmp_path))
    files, node = Spool(tmp_path, fsync=False), Spool(tmp_path, fsync=False)
    records = Records(tmp_path, "mx1.example.test")
    rng = random.Random(7)
    for i in range(60):
        store(files, rng, i)
    entries, _, _ = node.recover()
    node.keep_index(entries)
    yield (QueueOps(config, files, records, OfflineLink(Clock())), QueueOps(config, node, records, OfflineLink(Clock())),
           files, node, rng)
    records.close()
    files.close()
    node.close()


def assert_same(scan: QueueOps, index: QueueOps) -> None:
    for f in FILTERS:
        assert index.list(f) == scan.list(f), f
        assert index.summary(f) == scan.summary(f), f
        assert index.summary(f, by="sender") == scan.summary(f, by="sender"), f
        # (ids in the order of the walk: the directory's for a scan, arrival at the node for the index)
        a, b = (ops.act("hold", f, dry_run=True, whole_queue=True) for ops in (index, scan))
        assert {**a, "ids": sorted(a["ids"])} == {**b, "ids": sorted(b["ids"])}, f


def test_the_index_answers_as_the_file_scan(pair):
    scan, index, files, node, rng = pair
    assert len(node.index) == 60
    assert index.list()["count"] == 60
    assert_same(scan, index)


def test_changes_through_the_node_are_seen_at_once(pair, monkeypatch):
    scan, index, files, node, rng = pair
    for i in range(60, 70):
        store(node, rng, i)  # received by the node itself
    some = [r["id"] for r in index.list({"domain": "d2.example"})["items"]]
    held = index.act("hold", {"domain": "d2.example"}, source="test")
    assert sorted(held["acted"]) == sorted(some)
    deleted = index.act("delete", {"mail_from": "user1@example.test"}, source="test")
    assert deleted["acted"]
    qid = index.list()["items"][0]["id"]
    node.append_state(qid, [journal.Result(NOW, r, "sent", "250 ok") for r in index.list({"ids": [qid]})["items"][0]["rcpts"]])
    # The index read no file for any of this: a scan now would only find what it holds.
    for name in ("_load_for_index", "_read_envelope_fast", "read_state", "read_envelope"):
        monkeypatch.setattr(node, name, lambda qid, name=name: pytest.fail(f"{name}({qid})"))
    assert_same(scan, index)
    assert {r["id"] for r in index.list({"state": "hold"})["items"]} == set(some) - set(deleted["acted"])


def test_messages_other_processes_stored_or_removed_are_found(pair):
    scan, index, files, node, rng = pair
    new = [store(files, rng, i) for i in range(100, 105)]  # a receiver process's spool
    gone = index.list()["items"][0]["id"]
    assert files.delete(gone)
    assert_same(scan, index)
    ids = {r["id"] for r in index.list()["items"]}
    assert set(new) <= ids and gone not in ids


def test_a_queue_file_damaged_underneath_is_set_aside_when_it_is_next_read(pair):
    scan, index, files, node, rng = pair
    qid = index.list()["items"][0]["id"]
    path = node.queue / qid
    data = path.read_bytes()
    path.write_bytes(data.replace(b'"rcpts":[', b'"rcpts":[1,'))  # decodes no longer, longer by two
    # A walk of the index reads no file (no stat per message): it answers what it knew...
    rows = {r["id"]: r["state"] for r in index.list()["items"]}
    assert rows[qid] == "deferred" and qid in node.index
    # ...until a stage reads the file (here `queue show`; the next attempt does the same).
    with pytest.raises(LookupError, match="damaged"):
        index.show(qid)
    rows = {r["id"]: r["state"] for r in index.list()["items"]}
    assert rows[qid] == "corrupt" and qid not in node.index
    assert_same(scan, index)


def test_a_stopped_node_scans_the_files(tmp_path):
    spool = Spool(tmp_path, fsync=False)
    assert spool.index is None
    store(spool, random.Random(1), 1)
    assert len(list(spool.scan())) == 1
    spool.close()


def test_the_queue_gauges_read_the_index_as_they_read_the_files(pair, monkeypatch):
    from kanmon.metrics import queue_snapshot

    scan, index, files, node, rng = pair
    index.act("hold", {"domain": "d1.example"}, source="test")
    store(files, rng, 200)  # another process's
    expected = queue_snapshot(files)
    assert expected.counts["hold"] > 0
    assert queue_snapshot(node) == expected  # the other process's message read once, into the index
    monkeypatch.setattr(node, "read_state", lambda qid: pytest.fail(f"read_state({qid})"))
    assert queue_snapshot(node) == expected  # and then from memory


def test_summary_lists_queue_only_when_it_changed(pair, monkeypatch):
    import os

    scan, index, files, node, rng = pair
    old = os.stat(node.queue).st_mtime_ns - 10 * 10**9
    os.utime(node.queue, ns=(old, old))  # the last change to queue/ was 10 s ago
    assert index.summary() == scan.summary()
    listed = []
    real = os.listdir
    monkeypatch.setattr(os, "listdir", lambda p: listed.append(p) or real(p))
    assert index.summary() == scan.summary()
    assert listed == []  # queue/ did not change since it was listed: not listed again
    new = store(files, rng, 300)  # another process: queue/ changes
    assert index.summary() == scan.summary()
    assert listed == [node.queue] and new in node.index


def test_journal_records_applied_to_entries_answer_as_the_journal_read_back(tmp_path):
    """Every kind of record, in any order, on messages with several recipients: the
    index's compact entries (updated record by record) list, filter and summarise as
    the journals read back from the files do (final recipients, a deferral after a final
    result, replies repeated or tied in time, holds, schedules, requeues)."""
    config = parse_config(CONFIG.format(data_dir=tmp_path))
    files, node = Spool(tmp_path, fsync=False), Spool(tmp_path, fsync=False)
    node.keep_index()
    records = Records(tmp_path, "mx1.example.test")
    scan = QueueOps(config, files, records, OfflineLink(Clock()))
    index = QueueOps(config, node, records, OfflineLink(Clock()))
    rng = random.Random(11)
    ids = []
    for i in range(40):
        rcpts = [f"u{i}-{k}@d{rng.randrange(3)}.example" for k in range(rng.randrange(1, 4))]
        qid = new_queue_id(NOW - i)
        node.store_blocking(qid, Envelope("" if i % 7 == 0 else f"s{i % 4}@example.test", rcpts, received_at=NOW - i * 3600),
                            b"Subject: x\r\n\r\nbody\r\n")
        ids.append((qid, rcpts))
    replies = ["451 4.4.1 Connection refused", "450 4.1.1 User unknown", "421 4.7.0 Try again later", ""]
    for _ in range(400):
        qid, rcpts = rng.choice(ids)
        t = NOW + rng.choice([0, 0, 1, 2])  # ties in time are common: one attempt, several recipients
        kind = rng.randrange(6)
        if kind <= 1:
            recs = [journal.Result(t, r, rng.choice(["deferred", "deferred", "deferred", "sent", "bounced"]),
                                   rng.choice(replies)) for r in rng.sample(rcpts, rng.randrange(1, len(rcpts) + 1))]
        elif kind == 2:
            recs = [journal.Attempt(t, rng.randrange(10), t + 600)]
        elif kind == 3:
            recs = [journal.Hold(t, rng.random() < 0.5, "test")]
        elif kind == 4:
            recs = [journal.Schedule(t, rng.choice([0.0, t + 60]))]
        else:
            recs = [journal.Warned(t)]
        node.append_state(qid, recs)
    extra = FILTERS + [{"reason": "Try again"}, {"reason": "refused", "to": "*-2@*"}, {"attempts": ">3"},
                       {"mail_from": "<>"}, {"state": "hold", "reason": "User"}]
    for f in extra:
        assert index.list(f) == scan.list(f), f
        assert index.summary(f) == scan.summary(f), f
    # and a node started on these files answers the same as the one that wrote them
    restarted = Spool(tmp_path, fsync=False)
    restarted.keep_index()
    restarted.recover_each(lambda e: restarted.index.add(e.queue_id, e.envelope, e.size, e.state))
    again = QueueOps(config, restarted, records, OfflineLink(Clock()))
    for f in extra:
        assert again.list(f) == scan.list(f), f
    records.close()
    for s in (files, node, restarted):
        s.close()


def test_pages_of_the_list_are_slices_of_the_whole_list(pair):
    scan, index, files, node, rng = pair
    for ops in (scan, index):
        whole = ops.list({"state": "all"})
        assert whole["count"] == 60
        for offset, limit in ((0, 5), (5, 5), (55, 10), (60, 5), (0, 60), (3, 0)):
            page = ops.list({"state": "all"}, offset, limit)
            assert page["count"] == 60
            assert page["items"] == whole["items"][offset:offset + limit], (offset, limit)
    with pytest.raises(ValueError):
        index.list({}, -1, 5)


def test_texts_shared_between_entries_are_swept_once_no_entry_holds_them(tmp_path, monkeypatch):
    from kanmon.spool import index as index_module

    monkeypatch.setattr(index_module, "_POOL_MIN", 10)
    spool = Spool(tmp_path, fsync=False)
    idx = spool.keep_index()
    idx._pool_limit = 10
    for i in range(50):
        qid = new_queue_id(NOW + i)
        spool.store_blocking(qid, Envelope(f"sender{i}@example.test", ["r@example.org"]), b"x\r\n")
        spool.append_state(qid, [journal.Result(NOW, "r@example.org", "deferred", f"451 busy {i % 3}")])
        if i < 45:
            spool.remove(qid)
    # five messages left: their five senders and three reply texts stay shared, the rest went
    assert len(idx._pool) <= 2 * 10
    kept = idx.entries()
    assert len(kept) == 5
    for e in kept:
        assert idx._pool[e.mail_from] is e.mail_from
    assert all(e.last_reply()[0].startswith("451 busy") for e in kept)
    spool.close()


def test_a_long_list_for_the_control_socket_is_streamed_with_the_same_rows(pair, monkeypatch):
    from kanmon.control import Streamed

    scan, index, files, node, rng = pair
    monkeypatch.setattr(Streamed, "BATCH", 7)
    for f in ({}, {"domain": "d1.example"}, {"state": "hold"}):
        whole = index.list(f)
        streamed = index.list(f, stream=True)
        if len(whole["items"]) > Streamed.BATCH:
            assert type(streamed["items"]) is Streamed
            streamed["items"] = [row for batch in streamed["items"].batches() for row in batch]
        assert streamed == whole, f
    assert type(index.list({}, 0, 5, stream=True)["items"]) is list  # a short page: built at once


def by_reply_of(idx) -> dict[str, set[str]]:
    """The reply map as it should be: every entry's pending replies, from scratch."""
    out: dict[str, set[str]] = {}
    for e in idx.entries():
        for text in e.pending_replies():
            out.setdefault(text, set()).add(e.queue_id)
    # a text of one entry is kept as its id alone, a set only from the second id on
    return {text: next(iter(ids)) if len(ids) == 1 else ids for text, ids in out.items()}


def test_the_reply_map_follows_every_change_and_answers_as_the_naive_filter(tmp_path):
    """The reason filter reads the index's reply text -> ids map: after random results
    (deferred, final, empty replies), holds, schedules, removals, messages stored or
    removed by another process (reconcile), it is exactly what the entries hold, and a
    reason filter through it lists what the file scan lists."""
    import re

    config = parse_config(CONFIG.format(data_dir=tmp_path))
    files, node = Spool(tmp_path, fsync=False), Spool(tmp_path, fsync=False)
    idx = node.keep_index()
    records = Records(tmp_path, "mx1.example.test")
    scan = QueueOps(config, files, records, OfflineLink(Clock()))
    index = QueueOps(config, node, records, OfflineLink(Clock()))
    rng = random.Random(19)
    replies = ["451 4.4.1 Connection refused", "450 4.1.1 User unknown", "421 4.7.0 Try again later", "",
               "550 5.1.1 user unknown here"]
    live: dict[str, list[str]] = {}
    for step in range(500):
        op = rng.randrange(10)
        if op <= 1 or not live:
            rcpts = [f"u{step}-{k}@d{rng.randrange(3)}.example" for k in range(rng.randrange(1, 4))]
            qid = new_queue_id(NOW - step)
            (files if op == 1 else node).store_blocking(qid, Envelope(f"s{step % 4}@example.test", rcpts,
                                                                      received_at=NOW - step), b"Subject: x\r\n\r\nb\r\n")
            live[qid] = rcpts
        elif op == 2:
            qid = rng.choice(list(live))
            (files if rng.random() < 0.3 else node).remove(qid)
            del live[qid]
        else:
            qid = rng.choice(list(live))
            rcpts = live[qid]
            recs = [journal.Result(NOW + step, r, rng.choice(["deferred", "deferred", "sent", "bounced"]),
                                   rng.choice(replies)) for r in rng.sample(rcpts, rng.randrange(1, len(rcpts) + 1))]
            recs += rng.choice([[], [journal.Hold(NOW, rng.random() < 0.5, "t")], [journal.Schedule(NOW, 0.0)]])
            node.append_state(qid, recs)
        if step % 25 == 0:
            node.index_walk()  # the other process's stores and removals
            assert idx._by_reply == by_reply_of(idx), step
            for pattern in ("unknown", "^4", "refused|later", "nothing matches"):
                rx = re.compile(pattern, re.I)
                naive = {e.queue_id for e in idx.entries() if any(rx.search(t) for t in e.pending_replies())}
                assert {e.queue_id for e in idx.with_reply(lambda t: rx.search(t) is not None)} == naive, pattern
                for f in ({"reason": pattern}, {"reason": pattern, "state": "hold"}, {"reason": pattern, "to": "*-1@*"}):
                    assert index.list(f) == scan.list(f), f
    # a node started on these files (the recovery's entries, added in chunks) has the same map
    from kanmon.spool.recovery import recover_index

    restarted = Spool(tmp_path, fsync=False)
    again = restarted.keep_index()
    recover_index(restarted, lambda e, refused: None, workers=0)
    node.index_walk()
    assert again._by_reply == by_reply_of(again) == by_reply_of(idx) and again._by_reply
    records.close()
    for s in (files, node, restarted):
        s.close()


def test_messages_being_delivered_are_counted_apart_so_the_states_add_up(tmp_path):
    """`kanmon status` said "10 active, 0 new, 30 deferred" of 30 messages: the ten being
    retried were counted as active and as deferred."""
    from kanmon.metrics import queue_snapshot

    spool = Spool(tmp_path, fsync=False)
    ids = []
    for i in range(6):
        qid = new_queue_id()
        spool.store_blocking(qid, Envelope("a@b.example", [f"r{i}@d.example"]), b"m")
        ids.append(qid)
    for qid in ids[2:]:
        spool.append_state(qid, [journal.Attempt(1.0, 1, 1.0)])  # tried: deferred
    snap = queue_snapshot(spool, {ids[0], ids[2], ids[3]})  # one new and two deferred in flight
    assert (snap.counts["active"], snap.counts["new"], snap.counts["deferred"]) == (3, 1, 2)
    assert sum(snap.counts[k] for k in ("active", "new", "deferred", "hold")) == 6 == snap.size
    assert "active" not in queue_snapshot(spool).counts  # without the manager's ids: as before
    spool.close()
