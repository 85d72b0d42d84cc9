"""Spool file format, journal and recovery (durability promise 1)."""

from __future__ import annotations

import asyncio
import errno
import os

import pytest

from kanmon.model import ClientInfo, Envelope, new_queue_id
from kanmon.spool import journal
from kanmon.spool.store import IDENTITY_EVENT, CorruptEntry, NotCached, Spool, SpoolError, decode_queue_header, encode_queue_file


def env() -> Envelope:
    return Envelope("a@remote.example", ["alice@example.test", "bob@example.test"],
                    {"bob@example.test": "info@example.test"}, ClientInfo("127.0.0.6", helo="c"), received_at=1.5)


def test_round_trip_and_recovery(tmp_path):
    spool = Spool(tmp_path)
    ids = [new_queue_id() for _ in range(20)]

    async def store_all():
        await asyncio.gather(*(spool.store(q, env(), b"Subject: %d\r\n\r\nx\r\n" % i) for i, q in enumerate(ids)))

    asyncio.run(store_all())
    assert sorted(p.name for p in (tmp_path / "spool/queue").iterdir()) == sorted(ids)
    assert list((tmp_path / "spool/incoming").iterdir()) == []
    spool.append_state(ids[0], [journal.Result(1.0, "alice@example.test", "sent", "250")])
    spool.append_state(ids[0], [journal.Attempt(1.0, 1, 99.0)])
    with open(tmp_path / "spool/state" / ids[0], "ab") as f:
        f.write(b'{"k": "result", "rcpt": "bob@ex')  # torn last line after a crash
    entries, corrupt, removed = Spool(tmp_path).recover()
    assert corrupt == [] and removed == 0 and len(entries) == 20
    first = next(e for e in entries if e.queue_id == ids[0])
    assert first.pending_rcpts() == ["bob@example.test"]
    assert first.state.next_attempt == 99.0 and first.state.attempts == 1
    assert first.envelope.original_rcpts == {"bob@example.test": "info@example.test"}
    assert first.envelope.client.helo == "c"
    assert spool.read_content(ids[3]) == b"Subject: 3\r\n\r\nx\r\n"
    spool.close()


@pytest.mark.parametrize(
    "damage", [lambda b: b[:-1], lambda b: b[:30], lambda b: b.replace(b"x\r\n", b"y\r\n"), lambda b: b"junk",
               lambda b: b""],
    ids=["truncated-by-one", "header-only", "bit-flip", "junk", "empty"],
)
def test_damaged_files_move_to_corrupt(tmp_path, damage):
    spool = Spool(tmp_path)
    q = new_queue_id()
    asyncio.run(spool.store(q, env(), b"Subject: s\r\n\r\nx\r\n"))
    path = tmp_path / "spool/queue" / q
    path.write_bytes(damage(path.read_bytes()))
    entries, corrupt, _ = spool.recover()
    assert entries == [] and [c[0] for c in corrupt] == [q]
    assert (tmp_path / "spool/corrupt" / q).exists() and not path.exists()
    spool.close()


def test_header_parsing():
    data = encode_queue_file(env(), b"abc")
    elen, clen, crc, off = decode_queue_header(data)
    assert clen == 3 and data[off + elen : off + elen + 1] == b"\n"
    with pytest.raises(CorruptEntry):
        decode_queue_header(b"KANMON-Q1 x y z\n")


def test_write_failure_raises_spool_error(tmp_path):
    spool = Spool(tmp_path)
    (tmp_path / "spool/incoming").rmdir()
    (tmp_path / "spool/incoming").write_text("")
    with pytest.raises(SpoolError):
        asyncio.run(spool.store(new_queue_id(), env(), b"x"))
    assert list((tmp_path / "spool/queue").iterdir()) == []
    spool.close()


def test_queue_ids_are_unique_and_sortable():
    ids = [new_queue_id(1000.0 + i / 1e3) for i in range(1000)]
    assert len(set(ids)) == 1000 and ids == sorted(ids)


def test_crlf_checked_flag_survives_the_spool_and_skips_the_outbound_scan(tmp_path):
    from kanmon.model import CrlfChecked
    from kanmon.smtp.client import encode_data

    spool = Spool(tmp_path)
    q = new_queue_id()
    e = env()
    e.crlf_checked = True
    asyncio.run(spool.store(q, e, b"a\r\n"))
    assert spool.load(q).envelope.crlf_checked is True
    assert env().crlf_checked is False
    spool.close()
    # A checked body is sent as it is (stuffed); an unchecked one is normalised.
    assert encode_data(CrlfChecked(b"a\r\n.b\r\n")) == b"a\r\n..b\r\n.\r\n"
    assert encode_data(b"a\n.b\r") == b"a\r\n..b\r\n.\r\n"


def test_dsn_parameters_survive_the_spool_and_old_envelopes_decode_without_them():
    from kanmon.spool.store import envelope_from_json, envelope_to_json

    e = env()
    e.dsn_ret, e.dsn_envid = "HDRS", "id 42"
    e.dsn_notify = {e.rcpts[0]: "SUCCESS,FAILURE"}
    e.dsn_orcpt = {e.rcpts[0]: "rfc822;Orig@example.test"}
    back = envelope_from_json(envelope_to_json(e))
    assert (back.dsn_ret, back.dsn_envid, back.dsn_notify, back.dsn_orcpt) == (
        "HDRS", "id 42", e.dsn_notify, e.dsn_orcpt)
    # Without parameters nothing is written: a file from before them reads the same.
    plain = envelope_to_json(env())
    assert b"notify" not in plain and b"ret" not in plain
    old = b'{"from":"a@b.example","rcpts":["c@d.example"],"orcpts":{},"at":1.0,"size_hint":0,"8bit":false,"utf8":false,"notice":false}'
    back = envelope_from_json(old)
    assert (back.dsn_ret, back.dsn_envid, back.dsn_notify, back.dsn_orcpt) == ("", "", {}, {})
    for bad in (b'"ret":"ALL"', b'"notify":{"c@d.example":1}', b'"orcpt":[]', b'"envid":7'):
        with pytest.raises(ValueError):
            envelope_from_json(old[:-1] + b"," + bad + b"}")


def test_no_dot_lines_flag_survives_the_spool_and_an_old_file_means_unknown(tmp_path):
    from kanmon.spool.store import envelope_fields_fast, envelope_from_json, envelope_to_json

    spool = Spool(tmp_path)
    for flag in (True, False, None):
        q = new_queue_id()
        e = env()
        e.crlf_checked, e.no_dot_lines = True, flag
        asyncio.run(spool.store(q, e, b"a\r\n"))
        assert spool.load(q).envelope.no_dot_lines is flag
        assert (b'"nodots"' in envelope_to_json(e)) is (flag is not None)  # an unknown is not written
    spool.close()
    assert env().no_dot_lines is None
    # Decoded strictly, by the full decoder and the fast one of start-up recovery alike.
    plain = envelope_to_json(env())
    for bad in (b"null", b"1", b'"true"', b"[]"):
        raw = plain[:-1] + b',"nodots":' + bad + b"}"
        with pytest.raises(CorruptEntry, match="nodots"):
            envelope_from_json(raw)
        assert envelope_fields_fast(raw) is None
    assert envelope_from_json(plain[:-1] + b',"nodots":true}').no_dot_lines is True
    assert envelope_fields_fast(plain[:-1] + b',"nodots":false}') is not None


def test_checked_body_lets_the_outbound_client_skip_the_dots_only_when_told():
    from kanmon.model import CrlfChecked, DotFree, checked_body
    from kanmon.smtp.client import encode_data

    e = env()
    body = b"Subject: x\r\n\r\n.a\r\nb\r\n"
    assert type(checked_body(e, body)) is bytes  # not checked at DATA: scanned and normalised
    e.crlf_checked = True
    assert type(checked_body(e, body)) is CrlfChecked  # an old file: no "nodots", dots doubled
    assert encode_data(checked_body(e, body)) == b"Subject: x\r\n\r\n..a\r\nb\r\n.\r\n"
    e.no_dot_lines = False
    assert type(checked_body(e, body)) is CrlfChecked
    assert type(checked_body(e, DotFree(body))) is CrlfChecked  # the envelope has the last word
    e.no_dot_lines = True
    assert type(checked_body(e, body)) is DotFree and checked_body(e, body) == body
    e.crlf_checked = False
    assert type(checked_body(e, body)) is bytes  # dot-free means nothing for unchecked line ends
    # A DotFree body goes out as it is: trusted like CrlfChecked, nothing doubled or scanned.
    assert encode_data(DotFree(b"a\r\nb\r\n")) == b"a\r\nb\r\n.\r\n"
    assert encode_data(DotFree(b".a\r\n.b")) == b".a\r\n.b\r\n.\r\n"  # (what it would do with a lie)
    assert encode_data(DotFree(b"")) == b".\r\n"


# ---------------------------------------------------------------------------
# The queue manager's read on the event loop: only from the page cache


def _stored(tmp_path, content=b"Subject: s\r\n\r\nx\r\n" * 500):
    spool = Spool(tmp_path)
    q = new_queue_id()
    asyncio.run(spool.store(q, env(), content))
    return spool, q, content


def test_a_cached_read_gives_what_the_thread_read_gives(tmp_path):
    spool, q, content = _stored(tmp_path)
    spool.append_state(q, [journal.Result(1.0, "alice@example.test", "sent", "250")])
    entry, got = spool.load_with_content_cached(q)
    slow_entry, slow = spool.load_with_content(q)
    assert got == slow == content
    assert entry.envelope == slow_entry.envelope and entry.size == slow_entry.size == len(content)
    assert entry.pending_rcpts() == slow_entry.pending_rcpts() == ["bob@example.test"]
    with pytest.raises(FileNotFoundError):
        spool.load_with_content_cached(new_queue_id())
    spool.close()


@pytest.mark.parametrize("kernel", ["EAGAIN", "short read", "EOPNOTSUPP"])
def test_a_file_not_in_the_page_cache_is_left_to_the_thread(tmp_path, monkeypatch, kernel):
    """What preadv(2) with RWF_NOWAIT answers for a file not (all) in the page cache.
    Simulated: evicting a file (posix_fadvise DONTNEED) does not make the kernel refuse
    reliably, as the read-ahead it starts may finish before it looks again."""
    spool, q, content = _stored(tmp_path)
    real = os.preadv

    def preadv(fd, buffers, offset, flags=0):
        assert flags == os.RWF_NOWAIT
        if kernel == "short read":
            return real(fd, [memoryview(buffers[0])[:100]], offset, flags)
        raise OSError(errno.EAGAIN if kernel == "EAGAIN" else errno.EOPNOTSUPP, kernel)

    monkeypatch.setattr(os, "preadv", preadv)
    with pytest.raises(NotCached):
        spool.load_with_content_cached(q)
    monkeypatch.undo()
    assert spool.load_with_content(q)[1] == content  # the thread's read waits for the disk
    spool.close()


def test_a_damaged_file_read_from_the_cache_is_left_to_the_thread_to_set_aside(tmp_path):
    spool, q, _ = _stored(tmp_path)
    path = tmp_path / "spool/queue" / q
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(NotCached):
        spool.load_with_content_cached(q)
    assert path.exists()  # untouched: load_with_content sets it aside, with its event
    with pytest.raises(CorruptEntry):
        spool.load_with_content(q)
    assert not path.exists() and (tmp_path / "spool/corrupt" / q).exists()
    spool.close()


def test_the_spool_identity_is_made_once_kept_and_private(tmp_path):
    spool = Spool(tmp_path)
    assert spool.identity() is None  # never backed up: none made
    made = spool.identity(create=True)
    assert made is not None and len(made) == 32 and int(made, 16) >= 0
    assert spool.identity() == made and Spool(tmp_path).identity(create=True) == made
    path = tmp_path / "spool" / "identity"
    assert path.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in (tmp_path / "spool").iterdir() if p.name.startswith(".identity")] == []
    spool.close()


@pytest.mark.parametrize("damaged", [b"not an identity\n", b"", b"0" * 31 + b"\n", b"0" * 32 + b"\njunk",
                                     b"0" * 32 + b" " * 40, b"\xff" * 32])
def test_a_damaged_identity_is_moved_aside_with_an_event_and_counts_as_none(tmp_path, damaged):
    """Promise 10: what the strict decoder refuses is moved aside (spool/identity.bad),
    told once (on_refused: the owner of the records writes the event), and none; a
    backup (create=True) then makes a new one."""
    spool = Spool(tmp_path)
    told: list[str] = []
    spool.on_refused = told.append
    path = tmp_path / "spool" / "identity"
    path.write_bytes(damaged)
    assert spool.identity() is None
    assert (tmp_path / "spool" / "identity.bad").read_bytes() == damaged and not path.exists()
    assert told == [IDENTITY_EVENT] and "moved aside to spool/identity.bad" in told[0]
    assert spool.identity() is None and len(told) == 1  # nothing left to refuse
    path.write_bytes(damaged)
    again = spool.identity(create=True)
    assert again is not None and spool.identity() == again and len(told) == 2
    assert path.stat().st_mode & 0o777 == 0o600
    spool.close()


def test_an_identity_made_by_root_belongs_to_the_spools_owner(tmp_path):
    """An offline backup run as root makes the identity in a spool of the service's user:
    the file is that user's, or the running server could not read it and every later
    backup and restore through it failed (an unreadable one is none, never an error)."""
    import os
    import pwd

    import pytest

    if os.geteuid() != 0:
        pytest.skip("needs root to make a file for another user")
    nobody = pwd.getpwnam("nobody")
    spool = Spool(tmp_path)
    os.chown(tmp_path / "spool", nobody.pw_uid, nobody.pw_gid)
    spool.identity(create=True)
    st = (tmp_path / "spool" / "identity").stat()
    assert (st.st_uid, st.st_gid) == (nobody.pw_uid, nobody.pw_gid)
    os.chown(tmp_path / "spool" / "identity", 0, 0)
    os.chmod(tmp_path / "spool" / "identity", 0o000)
    pid = os.fork()
    if pid == 0:  # as nobody: unreadable, so none
        os.setgid(nobody.pw_gid)
        os.setuid(nobody.pw_uid)
        os._exit(0 if Spool.identity(spool) is None else 1)
    assert os.waitpid(pid, 0)[1] == 0
    spool.close()


def test_an_archive_without_an_identity_is_taken_as_from_another_node():
    """finish_move: same hostname and same spool identity only; an older archive (no
    identity) may come from the replacement's predecessor of the same name."""
    from pathlib import Path

    from kanmon.admin.queue_ops import finish_move

    mine = "a" * 32
    head = {"hostname": "mx1.example.test", "origin": {"then": None, "path": "/b/q.kbk", "identity": mine}}
    assert finish_move(head, Path("q.kbk"), 2, "mx1.example.test", mine)["same_node"] is True
    older = {"hostname": "mx1.example.test", "origin": {"then": None, "path": "/b/q.kbk"}}
    moved = finish_move(older, Path("q.kbk"), 2, "mx1.example.test", mine)
    assert moved["same_node"] is False
    # Nor its config file: a placeholder the admin must replace (no -c would take whichever config is found there).
    assert moved["finish_command"] == "kanmon queue delete --ids-from /b/q.kbk -c OLD-NODE-CONFIG"
    assert moved["finish_placeholder"] == "OLD-NODE-CONFIG"
    told = finish_move({**older, "origin": {**older["origin"], "config": "/etc/kanmon/mx1.toml"}}, Path("q.kbk"), 2,
                       "mx1.example.test", mine)
    assert told["finish_command"] == "kanmon queue delete --ids-from /b/q.kbk -c /etc/kanmon/mx1.toml"
    assert told["finish_placeholder"] is None
    assert finish_move(head, Path("q.kbk"), 2, "mx1.example.test", None)["same_node"] is False
