"""kanmon.store.modseq: the per-folder mod-sequence file (RFC 7162)."""

from __future__ import annotations

from pathlib import Path

from kanmon.store import modseq as mmodseq
from kanmon.store.modseq import ModseqLog, changed_messages


def scan(log: ModseqLog, validity: int, present: list[tuple[int, str]]) -> int:
    return log.update(validity, lambda lg: changed_messages(lg, present))


def test_changes_get_growing_modseqs_and_survive_a_reopen(tmp_path: Path) -> None:
    p = tmp_path / "kanmon-modseq"
    log = ModseqLog(p)
    first = scan(log, 7, [(1, ""), (2, "S")])
    assert first > 0 and log.msgs == {1: (first, ""), 2: (first, "S")}
    assert scan(log, 7, [(1, ""), (2, "S")]) == 0  # nothing changed: nothing recorded
    second = scan(log, 7, [(1, "F"), (2, "S")])
    third = scan(log, 7, [(1, "F")])  # 2 expunged
    assert first < second < third
    assert log.vanished_since(second) == {2} and log.vanished_since(third) == set()
    again = ModseqLog(p)  # another process, or after a restart
    assert scan(again, 7, [(1, "F")]) == 0
    assert again.msgs == {1: (second, "F")} and again.gone == {2: third} and again.highest == third
    # a change by the other one is seen by the first before it gives out a number
    fourth = scan(again, 7, [(1, "FS")])
    assert scan(log, 7, [(1, "FS")]) == 0 and log.highest == fourth


def test_a_torn_file_or_another_uidvalidity_is_rebuilt_above_the_old_highest(tmp_path: Path, monkeypatch) -> None:
    p = tmp_path / "kanmon-modseq"
    monkeypatch.setattr(mmodseq, "clock_floor", lambda: 1000)
    log = ModseqLog(p)
    for n in range(5):
        scan(log, 7, [(1, "S" * (n % 2))])
    old = log.highest
    with open(p, "ab") as f:
        f.write(b"\x05\x00\x00\x00\x00\x00\x00\x00x")  # a record head whose payload never came
    monkeypatch.setattr(mmodseq, "clock_floor", lambda: 10)  # a clock gone back: the file's values still count
    fresh = ModseqLog(p)
    assert scan(fresh, 7, [(1, "S")]) > old and fresh.discarded == 1
    assert fresh.vanished_since(old) is None  # what vanished before the rebuild is not known
    reread = ModseqLog(p)
    assert scan(reread, 7, [(1, "S")]) == 0 and reread.msgs == fresh.msgs  # the rebuilt file decodes
    top = fresh.highest
    assert scan(fresh, 8, [(1, "S")]) > top  # a new UIDVALIDITY starts over, still upwards
    assert list(fresh.msgs) == [1] and fresh.gone == {}


def test_compaction_keeps_state_and_bounds_tombstones(tmp_path: Path, monkeypatch) -> None:
    p = tmp_path / "kanmon-modseq"
    monkeypatch.setattr(mmodseq, "COMPACT_MIN", 10)
    monkeypatch.setattr(mmodseq, "MAX_TOMBSTONES", 3)
    log = ModseqLog(p)
    uids = list(range(1, 11))
    scan(log, 1, [(u, "") for u in uids])
    for flip in range(20):
        scan(log, 1, [(u, "S" if flip % 2 else "") for u in uids])
    assert p.stat().st_size < 2000  # rewritten, not 20 full copies
    marks = []
    for u in (1, 2, 3, 4, 5):
        uids.remove(u)
        marks.append(scan(log, 1, [(x, "S") for x in uids]))
    assert set(log.gone) == {3, 4, 5}
    assert log.vanished_since(marks[1]) == {3, 4, 5}
    assert log.vanished_since(marks[0]) is None  # 2's tombstone was dropped
    reread = ModseqLog(p)
    scan(reread, 1, [(x, "S") for x in uids])
    assert reread.msgs == log.msgs and reread.gone == log.gone and reread.floor == log.floor


def test_a_deleted_folder_is_not_made_again(tmp_path: Path) -> None:
    from kanmon.store.maildir import Mailbox

    box = Mailbox(tmp_path / "box").ensure()
    box.create_folder("Old")
    folder = box.folder("Old")
    info = folder.append(b"Subject: x\r\n\r\nhi\r\n")
    folder.snapshot()
    box.delete_folder("Old")
    assert folder.store_flags([(info, {"\\Seen"}, None)]) == ([None], set())
    assert folder.modseq_error and not (tmp_path / "box" / ".Old").exists()
    box.create_folder("Old")  # the name is free


def test_a_copied_file_is_not_trusted(tmp_path: Path, monkeypatch) -> None:
    """A backup restored (or a mailbox moved) brings back values older than ones the
    clients were given since: the copy is rebuilt above everything it holds."""
    monkeypatch.setattr(mmodseq, "clock_floor", lambda: 1000)
    p = tmp_path / "kanmon-modseq"
    log = ModseqLog(p)
    scan(log, 7, [(1, "")])
    saved = p.read_bytes()
    for n in range(3):
        scan(log, 7, [(1, "S" * (n % 2))])
    assert scan(ModseqLog(p), 7, [(1, "")]) == 0  # the file itself is trusted
    (tmp_path / "restored").write_bytes(saved)  # restored as rsync does: another inode
    (tmp_path / "restored").replace(p)  # (some time later, see clock_floor below)
    monkeypatch.setattr(mmodseq, "clock_floor", lambda: 5000)
    restored = ModseqLog(p)
    assert scan(restored, 7, [(1, "")]) > 5000 and restored.discarded == 1
    assert scan(ModseqLog(p), 7, [(1, "")]) == 0  # and the rebuilt file is trusted again
