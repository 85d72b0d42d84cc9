"""Maildir++ store: folders, UIDs stable across restarts, flags in names, usage."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from kanmon.store import maildir
from kanmon.store.maildir import (
    BadFolderName,
    Folder,
    FolderExists,
    FolderNotFound,
    Mailbox,
    check_folder_name,
    mailbox_path,
    mailbox_usage,
    parse_filename,
)


def deliver_new(root: Path, data: bytes) -> Path:
    """Write a message into new/ the way local delivery does (tmp/, then rename)."""
    name = maildir.unique_name(len(data), len(maildir.to_crlf(data)))
    tmp = root / "tmp" / name
    tmp.write_bytes(data)
    os.rename(tmp, root / "new" / name)
    return root / "new" / name


MSG = b"From: a@example.test\nSubject: hi\n\nline one\nline two\n"


@pytest.fixture
def box(tmp_path: Path) -> Mailbox:
    return Mailbox.for_address(tmp_path, "Example.TEST", "Alice").ensure()


def fresh(folder: Folder) -> Folder:
    """The same directory as a new process would see it (no shared memory state)."""
    return Folder(folder.path, folder.name)


def test_layout_and_special_use_folders(box: Mailbox, tmp_path: Path) -> None:
    assert box.root == tmp_path / "mailboxes" / "example.test" / "alice"
    for sub in ("cur", "new", "tmp"):
        assert (box.root / sub).is_dir()
        assert (box.root / ".Sent" / sub).is_dir()
    assert (box.root / ".Trash" / "maildirfolder").exists()
    assert box.folder_names() == ["INBOX", "Drafts", "Junk", "Sent", "Trash"]
    assert set(box.subscriptions()) == {"Sent", "Drafts", "Trash", "Junk"}


def test_scan_moves_new_to_cur_and_assigns_uids(box: Mailbox) -> None:
    deliver_new(box.root, MSG)
    deliver_new(box.root, MSG + b"2\n")
    inbox = box.folder("INBOX")
    msgs = inbox.sync()
    assert [m.uid for m in msgs] == [1, 2]
    assert all(m.recent and m.subdir == "cur" for m in msgs)
    assert os.listdir(box.root / "new") == []
    assert sorted(os.listdir(box.root / "cur")) == sorted(m.filename for m in msgs)
    assert all(name.endswith(":2,") for name in os.listdir(box.root / "cur"))
    again = inbox.sync()
    assert [m.uid for m in again] == [1, 2] and not any(m.recent for m in again)


def test_uids_and_uidvalidity_survive_restart(box: Mailbox) -> None:
    deliver_new(box.root, MSG)
    inbox = box.folder("INBOX")
    first = inbox.sync()
    validity = inbox.uidvalidity
    inbox.remove(first)
    deliver_new(box.root, MSG)
    other = fresh(inbox)
    msgs = other.sync()
    assert other.uidvalidity == validity
    assert [m.uid for m in msgs] == [2]  # a UID is never reused
    assert (box.root / "dovecot-uidlist").read_text().startswith(f"3 V{validity} N3 G")
    assert not (box.root / "dovecot-uidlist.lock").exists()


def test_flags_live_in_the_file_name(box: Mailbox) -> None:
    deliver_new(box.root, MSG)
    inbox = box.folder("INBOX")
    (m,) = inbox.sync()
    m2 = inbox.set_flags(m, {"\\Seen", "\\Flagged", "\\Deleted", "$NotAFlag"})
    assert m2 is not None and m2.filename.endswith(":2,FST")
    (seen,) = fresh(inbox).sync()
    assert seen.flags == {"\\Seen", "\\Flagged", "\\Deleted"} and seen.uid == m.uid


def test_parse_filename_keeps_unknown_letters() -> None:
    assert parse_filename("123.M1P2Q3.h,S=5:2,Sab") == ("123.M1P2Q3.h,S=5", frozenset({"\\Seen"}), "ab")
    assert parse_filename(".hidden") is None
    assert parse_filename("123.x")[1] == frozenset()


def test_append_stores_lf_and_reports_wire_size(box: Mailbox) -> None:
    inbox = box.folder("INBOX")
    when = time.time() - 86400
    m = inbox.append(b"Subject: x\r\n\r\nbody\r\n", {"\\Seen"}, when)
    assert m.uid == 1
    assert inbox.read(m) == b"Subject: x\n\nbody\n"
    assert inbox.wire_size(m) == len(b"Subject: x\r\n\r\nbody\r\n")
    assert abs(inbox.internal_date(m) - when) < 1
    (scanned,) = fresh(inbox).sync()
    assert scanned.flags == {"\\Seen"} and scanned.vsize == 20


def test_copy_and_remove(box: Mailbox) -> None:
    deliver_new(box.root, MSG)
    inbox, trash = box.folder("INBOX"), box.folder("Trash")
    (m,) = inbox.sync()
    c = trash.copy_in(inbox, m)
    assert c is not None and c.uid == 1
    assert trash.read(c) == MSG
    assert inbox.remove([m]) == [m]
    assert inbox.remove([m]) == []  # already gone: not an error
    assert inbox.sync() == [] and len(trash.sync()) == 1


def test_folder_create_rename_delete(box: Mailbox) -> None:
    box.create_folder("Work")
    box.create_folder("Work.2026")
    box.subscribe("Work.2026")
    with pytest.raises(FolderExists):
        box.create_folder("Work")
    box.rename_folder("Work", "Jobs")
    assert "Jobs.2026" in box.folder_names() and "Work" not in box.folder_names()
    assert "Jobs.2026" in box.subscriptions()
    assert (box.root / ".Jobs.2026" / "cur").is_dir()
    box.delete_folder("Jobs")
    assert "Jobs" not in box.folder_names()
    with pytest.raises(FolderNotFound):
        box.folder("Jobs")
    with pytest.raises(maildir.MaildirError):
        box.delete_folder("INBOX")


@pytest.mark.parametrize("name", ["", "a/b", "..", ".x", "x.", "a..b", "a\x00b", "INBOX.sub", "a\\b", "x" * 300])
def test_bad_folder_names_are_refused(name: str) -> None:
    with pytest.raises(BadFolderName):
        check_folder_name(name)


def test_mailbox_path_refuses_traversal(tmp_path: Path) -> None:
    with pytest.raises(maildir.MaildirError):
        mailbox_path(tmp_path, "example.test", "..")
    with pytest.raises(maildir.MaildirError):
        mailbox_path(tmp_path, "a/b", "x")


def test_usage_counts_all_folders(box: Mailbox, tmp_path: Path) -> None:
    assert mailbox_usage(tmp_path, "example.test", "nobody") == 0
    deliver_new(box.root, MSG)
    box.folder("Sent").append(b"x\r\n")
    assert box.usage() == (2, len(MSG) + 2)
    assert mailbox_usage(tmp_path, "example.test", "alice") == len(MSG) + 2


def test_unparseable_files_are_skipped(box: Mailbox) -> None:
    (box.root / "cur" / ".nfs0001").write_bytes(b"junk")
    deliver_new(box.root, MSG)
    assert len(box.folder("INBOX").sync()) == 1


def test_reads_dovecot_written_uidlist_and_keeps_its_fields(box: Mailbox) -> None:
    for name in ("1700000000.M1P1Q1.host,S=10", "1700000001.M1P1Q1.host,S=10"):
        (box.root / "cur" / (name + ":2,S")).write_bytes(b"Subject: x\n")
    (box.root / "dovecot-uidlist").write_text(
        "3 V1234 N1 Gabcdef\n"
        "7 W11 :1700000000.M1P1Q1.host,S=10\n"
        "9 :1700000001.M1P1Q1.host,S=10\n"
    )
    deliver_new(box.root, MSG)
    inbox = box.folder("INBOX")
    msgs = inbox.sync()
    assert [m.uid for m in msgs] == [7, 9, 10] and inbox.uidvalidity == 1234
    text = (box.root / "dovecot-uidlist").read_text()
    assert text.startswith("3 V1234 N11 Gabcdef\n") and "7 W11 :1700000000.M1P1Q1.host,S=10\n" in text


def test_stale_dotlock_is_taken_over_and_a_live_one_is_waited_for(box: Mailbox, monkeypatch) -> None:
    lock = box.root / "dovecot-uidlist.lock"
    lock.write_text("12345")
    old = time.time() - 600
    os.utime(lock, (old, old))
    deliver_new(box.root, MSG)
    assert len(box.folder("INBOX").sync()) == 1  # a crashed process's lock does not block us
    assert not lock.exists()
    lock.write_text("12345")  # fresh: someone is writing right now
    monkeypatch.setattr(maildir, "LOCK_WAIT", 0.0)
    assert len(box.folder("INBOX").sync()) == 1  # a scan that changes nothing needs no lock
    deliver_new(box.root, MSG)
    with pytest.raises(maildir.MaildirError, match="locked by another process"):
        box.folder("INBOX").sync()  # a new message needs a UID: that waits for the lock
    lock.unlink()
    assert [m.uid for m in box.folder("INBOX").sync()] == [1, 2]


def test_parse_filename_shares_one_set_per_flag_combination() -> None:
    a, b = parse_filename("1.x:2,FS"), parse_filename("2.y:2,SF")
    assert a is not None and b is not None
    assert a[1] == {"\\Seen", "\\Flagged"} and a[1] is b[1]


def test_a_large_scan_moves_live_objects_out_of_the_cyclic_gc(box: Mailbox, monkeypatch: pytest.MonkeyPatch) -> None:
    import gc

    for i in range(3):
        deliver_new(box.root, MSG + b"%d\n" % i)
    inbox = box.folder("INBOX")
    monkeypatch.setattr(maildir, "FREEZE_AFTER_SCAN", 4)
    monkeypatch.setattr(maildir, "_last_freeze", float("-inf"))
    before = gc.get_freeze_count()
    try:
        assert len(inbox.sync()) == 3
        assert gc.get_freeze_count() == before  # a small folder: nothing frozen
        deliver_new(box.root, MSG + b"3\n")
        msgs = inbox.sync()
        assert len(msgs) == 4
        assert gc.get_freeze_count() > before
        assert not any(o is msgs[0] for o in gc.get_objects())  # out of the collector's generations
        deliver_new(box.root, MSG + b"4\n")
        msgs = inbox.sync()
        assert len(msgs) == 5
        assert any(o is msgs[-1] for o in gc.get_objects())  # not frozen again within FREEZE_EVERY
    finally:
        gc.unfreeze()
