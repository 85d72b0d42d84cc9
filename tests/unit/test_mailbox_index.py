"""The per-folder cache file (kanmon.store.index): round trip, strict decoding, torn and
corrupt files discarded, compaction, concurrent writers, private modes."""

from __future__ import annotations

import os
import stat
import threading
import zlib
from pathlib import Path

import pytest

from kanmon.store import index as mindex
from kanmon.store.imap import cache
from kanmon.store.imap import message as mime
from kanmon.store.index import CacheEntry, IndexCorrupt, MailboxIndex

MSG = (b"From: Bob <bob@example.test>\r\nTo: alice@example.test\r\n"
       b"Subject: =?ISO-2022-JP?B?GyRCQEE1YT1xGyhC?=\r\nDate: Tue, 01 Dec 2026 09:00:00 +0900\r\n"
       b"Message-ID: <a@example.test>\r\nX-Other: not cached\r\n\r\nhello\r\n")


def entry(n: int = 0) -> CacheEntry:
    return cache.make_entry(MSG.replace(b"hello", b"hello %d" % n), 1_700_000_000 + n, len(MSG) - 2)


def test_entry_holds_what_fetch_and_search_need() -> None:
    e = entry()
    tree = mime.parse(MSG.replace(b"hello", b"hello 0"))
    assert e.envelope == mime.envelope(tree)
    assert e.bodystructure == mime.bodystructure(tree, extended=True)
    assert e.body == mime.bodystructure(tree, extended=False)
    assert b"Subject:" in e.headers and b"X-Other" not in e.headers
    assert e.sent_day == 20261201  # the day as written in Date:, not converted to UTC
    assert cache.search_fields(e)["subject"] == "請求書"
    assert e.vsize == len(MSG.replace(b"hello", b"hello 0"))


def test_round_trip(tmp_path: Path) -> None:
    idx = MailboxIndex(tmp_path / "kanmon-index")
    idx.add_many([(f"base{n}", entry(n)) for n in range(50)])
    again = MailboxIndex(tmp_path / "kanmon-index")
    got = again.get_many([f"base{n}" for n in range(50)] + ["missing"])
    assert got[:50] == [entry(n) for n in range(50)]
    assert got[50] is None
    assert again.count() == 50
    searched = again.get_many(["base7"], search_only=True)[0]
    assert searched is not None and searched.search == entry(7).search and searched.sent_day == entry(7).sent_day
    assert (tmp_path / "kanmon-index").read_bytes().startswith(mindex.MAGIC)


def test_other_writers_appends_are_seen(tmp_path: Path) -> None:
    reader = MailboxIndex(tmp_path / "kanmon-index")
    writer = MailboxIndex(tmp_path / "kanmon-index")
    writer.add("a", entry(1))
    assert reader.get("a") == entry(1)
    writer.add("b", entry(2))  # appended after the reader's first read: only the tail is read
    assert reader.get("b") == entry(2)


@pytest.mark.parametrize("damage", ["truncate", "flip", "magic", "garbage_tail"])
def test_a_damaged_file_is_discarded_never_trusted(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "kanmon-index"
    MailboxIndex(path).add_many([(f"m{n}", entry(n)) for n in range(10)])
    data = bytearray(path.read_bytes())
    if damage == "truncate":  # a crash in the middle of an append
        data = data[:-7]
    elif damage == "flip":
        data[len(data) // 2] ^= 0x40
    elif damage == "magic":
        data[0:5] = b"XXXXX"
    else:
        data += b"\x10\x00\x00\x00garbage"
    path.write_bytes(bytes(data))
    fresh = MailboxIndex(path)
    assert fresh.get_many([f"m{n}" for n in range(10)]) == [None] * 10
    assert fresh.discarded == 1
    assert not path.exists()  # removed: the cache refills from the message files
    fresh.add("m1", entry(1))
    assert MailboxIndex(path).get("m1") == entry(1)


def test_a_record_with_trailing_bytes_is_refused() -> None:
    rec = mindex.encode_entry("m", entry())
    payload = rec[mindex.RECORD_HEAD.size:] + b"x"
    with pytest.raises(IndexCorrupt):
        mindex.decode_payload(payload)
    head = mindex.RECORD_HEAD.pack(len(payload), zlib.crc32(payload))
    with pytest.raises(IndexCorrupt):
        mindex.decode_records(mindex.MAGIC + head + payload, len(mindex.MAGIC))


def test_a_bad_base_name_is_refused() -> None:
    with pytest.raises(ValueError):
        mindex.encode_entry("a/b", entry())
    with pytest.raises(ValueError):
        mindex.encode_entry("", entry())


def test_an_entry_too_large_is_not_cached(tmp_path: Path) -> None:
    big = CacheEntry(1, 1, 0, 0, b"x" * (mindex.MAX_RECORD + 1), b"", b"", b"", b"")
    idx = MailboxIndex(tmp_path / "kanmon-index")
    idx.add("big", big)
    assert idx.get("big") is None


def test_compaction_keeps_live_entries_only(tmp_path: Path) -> None:
    path = tmp_path / "kanmon-index"
    idx = MailboxIndex(path)
    n = mindex.COMPACT_MIN_DEAD * 2
    idx.add_many([(f"m{i}", entry(i)) for i in range(n)])
    before = path.stat().st_size
    live = {f"m{i}" for i in range(10)}
    assert not idx.compact({f"m{i}" for i in range(n - 5)})  # a few dead: left alone
    assert idx.compact(live)
    assert path.stat().st_size < before // 10
    again = MailboxIndex(path)
    assert again.count() == 10
    assert again.get("m3") == entry(3) and again.get(f"m{n - 1}") is None
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_concurrent_writers_never_tear_records(tmp_path: Path) -> None:
    """Writers with their own descriptors (as separate processes have) append whole
    records under flock; a reader sees every entry and nothing corrupt."""
    path = tmp_path / "kanmon-index"

    def write(k: int) -> None:
        w = MailboxIndex(path)
        for i in range(40):
            w.add(f"w{k}-{i}", entry(i))

    threads = [threading.Thread(target=write, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    reader = MailboxIndex(path)
    got = reader.get_many([f"w{k}-{i}" for k in range(4) for i in range(40)])
    assert all(e is not None for e in got)
    assert reader.discarded == 0


def test_index_root_is_configurable_and_private(tmp_path: Path) -> None:
    mail, idxroot = tmp_path / "mailboxes", tmp_path / "index"
    folder = mail / "example.test" / "alice" / ".Sent"
    try:
        mindex.configure(mail, idxroot)
        p = mindex.index_path(folder)
        assert p == idxroot / "example.test" / "alice" / ".Sent" / mindex.INDEX_FILE
        MailboxIndex(p).add("m", entry())
        assert stat.S_IMODE(p.stat().st_mode) == 0o600
        for d in (idxroot / "example.test", idxroot / "example.test" / "alice", p.parent):
            assert stat.S_IMODE(d.stat().st_mode) == 0o700
        assert mindex.index_path(tmp_path / "elsewhere") == tmp_path / "elsewhere" / mindex.INDEX_FILE
    finally:
        mindex.configure(None, None)
    assert mindex.index_path(folder) == folder / mindex.INDEX_FILE


def test_delivery_hook_records_the_entry(tmp_path: Path) -> None:
    box = tmp_path / "box"
    for sub in ("new", "cur", "tmp"):
        (box / sub).mkdir(parents=True)
    stored = MSG.replace(b"\r\n", b"\n")
    p = box / "new" / "1700000000.M1P1Q1.host"
    p.write_bytes(stored)
    cache.record_deliveries([(p, stored, None)])
    e = MailboxIndex(box / mindex.INDEX_FILE).get(p.name)
    assert e is not None and e.size == len(stored) and e.vsize == len(MSG)
    assert e.internal_date == int(os.stat(p).st_mtime)


def test_config_names_the_index_directory(tmp_path: Path) -> None:
    from kanmon.config import parse_config
    from kanmon.node import configure_index

    config = parse_config(f'[server]\ndata_dir = "{tmp_path}"\n[mailbox_index]\ndirectory = "index"\n')
    box = tmp_path / "mailboxes" / "example.test" / "alice"
    try:
        configure_index(config)
        assert mindex.index_path(box) == tmp_path / "index" / "example.test" / "alice" / mindex.INDEX_FILE
        configure_index(parse_config(f'[server]\ndata_dir = "{tmp_path}"\n'))
        assert mindex.index_path(box) == box / mindex.INDEX_FILE
    finally:
        mindex.configure(None, None)
