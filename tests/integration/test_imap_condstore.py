"""CONDSTORE and QRESYNC (RFC 7162) over real sockets with imaplib (STARTTLS): the
RFC's exchanges, changes by another session and by another program, mod-sequences that
survive a restart and only grow when the file is torn."""

from __future__ import annotations

import imaplib
import os
import re
from pathlib import Path

import pytest
import trustme

from kanmon.store import maildir
from kanmon.store import modseq as mmodseq
from tests.integration.test_imap import connect, deliver_new, make_server

ca = pytest.fixture(scope="module")(lambda: trustme.CA())


@pytest.fixture
def server(tmp_path: Path, ca: trustme.CA):
    s = make_server(tmp_path / "data", ca)
    try:
        yield s
    finally:
        s.loop.run(s.svc.stop())
        s.loop.close()


def message(n: int) -> bytes:
    return f"From: bob@example.test\nTo: alice@example.test\nSubject: note {n}\n\nbody {n}\n".encode()


def fill(server, count: int) -> None:
    """count messages in INBOX, already seen by a session (so none is \\Recent)."""
    for n in range(count):
        deliver_new(server.box.root, message(n))
    c = connect(server)
    c.select("INBOX")
    c.logout()


def select(c: imaplib.IMAP4, *params: str, name: str = "INBOX") -> tuple[str, list]:
    """SELECT with RFC 4466 parameters (imaplib has no way to pass them); the untagged
    responses of earlier commands are forgotten first."""
    c.untagged_responses.clear()
    typ, data = c._simple_command("SELECT", name, *params)
    if typ == "OK":
        c.state = "SELECTED"
    return typ, data


def highest(c: imaplib.IMAP4) -> int:
    return int(c.response("HIGHESTMODSEQ")[1][-1])


def command(c: imaplib.IMAP4, name: str, *args: str) -> tuple[str, list]:
    """FETCH or STORE with modifiers (imaplib's fetch and store take none)."""
    typ, data = c._simple_command(name, *args)
    return c._untagged_response(typ, data, "FETCH")


def status_highest(c: imaplib.IMAP4) -> int:
    typ, data = c.status("INBOX", "(HIGHESTMODSEQ)")
    return int(re.search(rb"HIGHESTMODSEQ (\d+)", data[0]).group(1))


def modseqs(c: imaplib.IMAP4, spec: str = "1:*") -> dict[int, int]:
    """UID -> MODSEQ of the messages FETCH returns."""
    typ, data = c.uid("FETCH", spec, "(MODSEQ)")
    assert typ == "OK"
    out = {}
    for line in data:
        if line:
            m = re.search(rb"UID (\d+) MODSEQ \((\d+)\)", line) or re.search(rb"MODSEQ \((\d+)\) UID (\d+)", line)
            assert m, line
            a, b = int(m.group(1)), int(m.group(2))
            out.update({a: b} if b"UID %d MODSEQ" % a in line else {b: a})
    return out


def restart(server) -> None:
    """A new process: the service restarted and nothing of the folders kept in memory."""
    server.restart()
    with maildir._folders_lock:
        maildir._folders.clear()


def test_condstore_fetch_store_search_status(server) -> None:
    fill(server, 3)
    c = connect(server)
    try:
        assert "CONDSTORE" in c.capabilities and "QRESYNC" in c.capabilities
        typ, _ = select(c, "(CONDSTORE)")
        assert typ == "OK"
        h0 = highest(c)
        before = modseqs(c)
        assert set(before) == {1, 2, 3} and all(0 < m <= h0 for m in before.values())
        # A flag change gets a higher mod-sequence, reported with the FLAGS (RFC 7162 3.1.3)
        typ, data = c.store("1", "+FLAGS", r"(\Seen)")
        m1 = int(re.search(rb"MODSEQ \((\d+)\)", data[0]).group(1))
        assert typ == "OK" and b"FLAGS (\\Seen)" in data[0] and m1 > h0
        # CHANGEDSINCE: only what changed, with MODSEQ (3.1.4.1)
        typ, data = command(c, "FETCH", "1:*", "(FLAGS)", "(CHANGEDSINCE %d)" % h0)
        assert typ == "OK" and data == [b"1 (FLAGS (\\Seen) MODSEQ (%d))" % m1]
        # UNCHANGEDSINCE (3.1.3, example 3's shape): UID 1 changed after h0 and fails;
        # .SILENT still reports the new mod-sequences of those that changed
        c.response("MODIFIED")  # forget anything earlier
        typ, data = c.uid("STORE", "1:3", "(UNCHANGEDSINCE %d)" % h0, "+FLAGS.SILENT", r"(\Flagged)")
        assert typ == "OK" and c.response("MODIFIED")[1] == [b"1"]
        assert len(data) == 2 and all(re.fullmatch(rb"[23] \(UID [23] MODSEQ \(\d+\)\)", d) for d in data), data
        m2 = int(re.search(rb"MODSEQ \((\d+)\)", data[0]).group(1))
        assert m2 > m1
        typ, data = c.fetch("1:3", "(FLAGS)")
        assert data == [b"1 (FLAGS (\\Seen))", b"2 (FLAGS (\\Flagged))", b"3 (FLAGS (\\Flagged))"]
        # UNCHANGEDSINCE 0 always fails for an existing message
        typ, data = command(c, "STORE", "2", "(UNCHANGEDSINCE 0)", "-FLAGS", r"(\Flagged)")
        assert typ == "OK" and c.response("MODIFIED")[1] == [b"2"]
        # SEARCH MODSEQ (3.1.5): the highest mod-sequence of what it found
        typ, data = c.search(None, "MODSEQ", str(m1))
        assert typ == "OK" and data == [b"1 2 3 (MODSEQ %d)" % m2]
        typ, data = c.search(None, "MODSEQ", '"/flags/\\\\draft"', "all", str(m2 + 1))
        assert typ == "OK" and data == [b""]
        typ, data = c.status("INBOX", "(HIGHESTMODSEQ MESSAGES)")
        assert data == [b"INBOX (HIGHESTMODSEQ %d MESSAGES 3)" % m2]
    finally:
        c.logout()


def test_other_sessions_and_programs_and_a_restart(server) -> None:
    fill(server, 3)
    a, b = connect(server), connect(server)
    try:
        select(a, "(CONDSTORE)")
        h0 = highest(a)
        b.select("INBOX")
        b.store("2", "+FLAGS", r"(\Answered)")
        a.noop()  # the change by another session, with its MODSEQ (3.1.4 unsolicited FETCH)
        fetches = a.untagged_responses.pop("FETCH", [])
        assert len(fetches) == 1 and re.fullmatch(rb"2 \(UID 2 FLAGS \(\\Answered\) MODSEQ \((\d+)\)\)", fetches[0])
        m_b = int(re.search(rb"MODSEQ \((\d+)\)", fetches[0]).group(1))
        assert m_b > h0
        # Another program renames the file's flag letters (as Dovecot does): a new MODSEQ
        path = server.box.folder("INBOX").locate(server.box.folder("INBOX").snapshot().by_uid[3])
        assert path is not None and path.name.endswith(":2,")
        os.rename(path, path.with_name(path.name + "F"))
        typ, data = a.uid("FETCH", "1:*", "(FLAGS)", "(CHANGEDSINCE %d)" % m_b)
        # the change is noticed (an unsolicited FETCH) and then fetched: the same line twice
        assert typ == "OK" and len(set(data)) == 1 and b"UID 3 FLAGS (\\Flagged)" in data[0]
        m_other = int(re.search(rb"MODSEQ \((\d+)\)", data[0]).group(1))
        assert m_other > m_b
        before = modseqs(a)
    finally:
        a.logout()
        b.logout()
    restart(server)
    c = connect(server)
    try:
        select(c, "(CONDSTORE)")
        assert highest(c) == m_other  # kept on disk: the same values after the restart
        assert modseqs(c) == before
    finally:
        c.logout()
    # A torn file (a crash in the middle of a write) is rebuilt: every message gets a
    # mod-sequence above anything given out before, so a client resyncing sees them all
    path = mmodseq.modseq_path(server.box.root)
    with open(path, "ab") as f:
        f.write(b"\x20\x00\x00\x00torn")
    restart(server)
    c = connect(server)
    try:
        select(c, "(CONDSTORE)")
        assert highest(c) > m_other
        typ, data = command(c, "FETCH", "1:*", "(FLAGS)", "(CHANGEDSINCE %d)" % m_other)
        assert len(data) == 3
        assert all(m > m_other for m in modseqs(c).values())
    finally:
        c.logout()


def test_qresync_select_vanished_and_uid_fetch(server) -> None:
    fill(server, 5)
    c = connect(server)
    try:
        with pytest.raises(imaplib.IMAP4.error, match="ENABLE QRESYNC"):
            select(c, "(QRESYNC (1 1))")  # QRESYNC parameters only after ENABLE QRESYNC (3.2.5)
        typ, data = c.enable("QRESYNC")
        assert typ == "OK" and c.response("ENABLED")[1][-1] == b"QRESYNC"
        select(c)
        validity = int(c.response("UIDVALIDITY")[1][-1])
        h0 = highest(c)
    finally:
        c.logout()
    other = connect(server)
    try:
        other.select("INBOX")
        other.store("2,4", "+FLAGS", r"(\Deleted)")
        other.expunge()
        other.uid("STORE", "5", "+FLAGS", r"(\Seen)")
    finally:
        other.logout()
    c = connect(server)
    try:
        c.enable("QRESYNC")
        # RFC 7162 3.2.5.2's exchange: VANISHED (EARLIER) then the changed messages
        typ, _ = select(c, "(QRESYNC (%d %d))" % (validity, h0))
        assert typ == "OK"
        assert c.untagged_responses.pop("VANISHED") == [b"(EARLIER) 2,4"]
        fetches = c.untagged_responses.pop("FETCH")
        assert fetches == [b"3 (UID 5 FLAGS (\\Seen) MODSEQ (%d))" % highest(c)]
        # known-uids narrows both
        typ, _ = select(c, "(QRESYNC (%d %d 1:3 (1:2 1:3)))" % (validity, h0))
        assert typ == "OK" and "CLOSED" in c.untagged_responses  # 3.2.11: the previous one closed
        assert c.untagged_responses.pop("VANISHED") == [b"(EARLIER) 2"]
        assert "FETCH" not in c.untagged_responses
        # another UIDVALIDITY: an ordinary SELECT
        select(c, "(QRESYNC (%d %d))" % (validity + 1, h0))
        assert "VANISHED" not in c.untagged_responses and "FETCH" not in c.untagged_responses
        # UID FETCH (CHANGEDSINCE n VANISHED), 3.2.6
        typ, data = c.uid("FETCH", "1:*", "(FLAGS)", "(CHANGEDSINCE %d VANISHED)" % h0)
        assert typ == "OK" and c.untagged_responses.pop("VANISHED") == [b"(EARLIER) 2,4"]
        assert len(data) == 1 and data[0].startswith(b"3 (UID 5 FLAGS (\\Seen) MODSEQ (")
        with pytest.raises(imaplib.IMAP4.error, match="VANISHED needs UID FETCH"):
            command(c, "FETCH", "1:*", "(FLAGS)", "(CHANGEDSINCE %d VANISHED)" % h0)
        # Expunges are VANISHED once QRESYNC is on (3.2.10), never EXPUNGE
        c.uid("STORE", "1", "+FLAGS", r"(\Deleted)")
        typ, _ = c.expunge()
        assert typ == "OK" and c.untagged_responses.pop("VANISHED") == [b"1"]
        assert "EXPUNGE" not in c.untagged_responses
    finally:
        c.logout()


def test_dropped_tombstones_answer_every_missing_uid(server, monkeypatch) -> None:
    monkeypatch.setattr(mmodseq, "MAX_TOMBSTONES", 2)
    fill(server, 8)
    c = connect(server)
    try:
        c.enable("QRESYNC")
        select(c)
        validity, h0 = int(c.response("UIDVALIDITY")[1][-1]), highest(c)
        for uid in ("2", "4", "6"):  # three expunges, one at a time: only two are remembered
            c.uid("STORE", uid, "+FLAGS", r"(\Deleted)")
            c.expunge()
        typ, _ = select(c, "(QRESYNC (%d %d))" % (validity, status_highest(c) - 1))
        assert c.untagged_responses.pop("VANISHED") == [b"(EARLIER) 6"]  # still known
        typ, _ = select(c, "(QRESYNC (%d %d 1:7))" % (validity, h0))
        # since before the oldest dropped tombstone: every UID below UIDNEXT not there
        assert c.untagged_responses.pop("VANISHED") == [b"(EARLIER) 2,4,6"]
    finally:
        c.logout()


def test_a_fetch_that_sets_seen_is_one_change(server) -> None:
    """FETCH BODY[] of unseen messages sets \\Seen on each: one change of the folder (one
    new mod-sequence for all of them, RFC 7162 allows it), not one per message."""
    fill(server, 3)
    c = connect(server)
    try:
        select(c, "(CONDSTORE)")
        before = highest(c)
        typ, _ = c.fetch("1:3", "(BODY[])")
        assert typ == "OK"
        after = modseqs(c)
        assert len(after) == 3 and len(set(after.values())) == 1 and min(after.values()) > before, after
        typ, data = c.fetch("1:3", "(FLAGS)")
        assert all(b"\\Seen" in line for line in data if line), data
    finally:
        c.logout()
