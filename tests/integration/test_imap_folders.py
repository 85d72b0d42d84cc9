"""IMAP folder hierarchy over real sockets with imaplib (STARTTLS): CREATE makes the
superior names (RFC 3501 6.3.3), LIST returns a level that is no folder as \\Noselect
(6.3.8), RENAME INBOX moves its messages (6.3.5)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import trustme

from kanmon.store import maildir
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


def listing(c, ref: str, pattern: str, verb: str = "LIST") -> dict[str, str]:
    """{name: attributes} of a LIST or LSUB."""
    ref, pattern = f'"{ref}"', f'"{pattern}"'
    typ, data = c.list(ref, pattern) if verb == "LIST" else c.lsub(ref, pattern)
    assert typ == "OK"
    out = {}
    for line in data:
        if line is None:
            continue
        m = re.match(rb'\(([^)]*)\) "\." (.+)$', line)
        assert m, line
        out[m.group(2).decode().strip('"')] = m.group(1).decode()
    return out


def test_create_makes_the_superior_names(server) -> None:
    c = connect(server)
    try:
        assert c.create("Projects.2026.Q4")[0] == "OK"
        top = listing(c, "", "%")
        assert top["Projects"] == "\\HasChildren" and "Projects.2026" not in top
        assert listing(c, "", "Projects.%") == {"Projects.2026": "\\HasChildren"}
        assert listing(c, "Projects.", "%") == {"Projects.2026": "\\HasChildren"}
        assert listing(c, "", "Projects*") == {
            "Projects": "\\HasChildren", "Projects.2026": "\\HasChildren", "Projects.2026.Q4": "\\HasNoChildren"}
        for name in ("Projects", "Projects.2026", "Projects.2026.Q4"):
            assert c.select(name)[0] == "OK", name  # real folders, not only names
        assert c.status("Projects.2026", "(MESSAGES)")[0] == "OK"
        assert c.create("Projects")[0] == "NO"  # already made
        assert c.create("Projects.2026.Q1")[0] == "OK"
        # RENAME makes the superior names of the new name too (RFC 3501 6.3.5)
        assert c.rename("Projects.2026.Q1", "Archive.2025.Q1")[0] == "OK"
        assert listing(c, "", "Archive*") == {
            "Archive": "\\HasChildren", "Archive.2025": "\\HasChildren", "Archive.2025.Q1": "\\HasNoChildren"}
        assert c.select("Archive.2025")[0] == "OK"
    finally:
        c.logout()


def test_a_missing_level_is_listed_noselect(server) -> None:
    c = connect(server)
    try:
        assert c.create("Top")[0] == "OK" and c.create("Top.Sub")[0] == "OK"
        assert c.subscribe("Top.Sub")[0] == "OK"
        assert c.delete("Top")[0] == "OK"  # Top.Sub stays (RFC 3501 6.3.4)
        assert listing(c, "", "%")["Top"] == "\\Noselect \\HasChildren"
        assert listing(c, "", "Top*") == {"Top": "\\Noselect \\HasChildren", "Top.Sub": "\\HasNoChildren"}
        assert listing(c, "", "Top.%") == {"Top.Sub": "\\HasNoChildren"}
        assert c.select("Top")[0] == "NO"
        # LSUB: with "%" last, the unsubscribed level is returned \Noselect (RFC 3501 6.3.9)
        assert listing(c, "", "To%", "LSUB") == {"Top": "\\Noselect"}
        assert listing(c, "", "To*", "LSUB") == {"Top.Sub": "\\HasNoChildren"}
        # a level made by another program (Dovecot, a restore) only as a child's prefix
        maildir.Mailbox(server.box.root).create_folder("Other.Deep")
        (server.box.root / ".Other" / "cur").rmdir()
        assert listing(c, "", "O%") == {"Other": "\\Noselect \\HasChildren"}
        # a special-use name that is only a level carries no use
        assert c.create("Trash.Old")[0] == "OK" and c.delete("Trash")[0] == "OK"
        assert listing(c, "", "Trash")["Trash"] == "\\Noselect \\HasChildren"
    finally:
        c.logout()


def test_rename_inbox_moves_its_messages(server) -> None:
    root = server.box.root
    for n in range(3):
        deliver_new(root, f"From: b@example.test\r\nSubject: m{n}\r\nMessage-ID: <m{n}@x>\r\n\r\nbody {n}\r\n".encode())
    c, other = connect(server), connect(server)
    try:
        other.select("INBOX")
        c.select("INBOX")
        assert c.store("2", "+FLAGS", r"(\Flagged $Important)")[0] == "OK"
        c.close()
        deliver_new(root, b"From: b@example.test\r\nSubject: m3\r\n\r\nstill in new/\r\n")
        typ, data = c.rename("INBOX", "Old-Inbox")
        assert typ == "OK", data
        assert c.status("INBOX", "(MESSAGES)")[1] == [b"INBOX (MESSAGES 0)"]
        assert c.status("Old-Inbox", "(MESSAGES)")[1] == [b"Old-Inbox (MESSAGES 4)"]
        c.select("Old-Inbox")
        typ, data = c.fetch("1:*", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        assert sorted(re.search(rb"Subject: (m\d)", x[1]).group(1) for x in data if isinstance(x, tuple)) == [
            b"m0", b"m1", b"m2", b"m3"]
        # flags kept, and keywords mean the same in the new folder
        assert c.search(None, "KEYWORD", "$Important")[1] == c.search(None, "SUBJECT", "m1")[1]
        assert c.search(None, "FLAGGED")[1] == c.search(None, "SUBJECT", "m1")[1]
        assert "Old-Inbox" in listing(c, "", "*", "LSUB")
        # the session that had INBOX open is told they are gone
        other.noop()
        assert other.untagged_responses.get("EXPUNGE") == [b"3", b"2", b"1"]
        # INBOX still takes mail
        deliver_new(root, b"From: b@example.test\r\nSubject: after\r\n\r\nhi\r\n")
        assert c.status("INBOX", "(MESSAGES)")[1] == [b"INBOX (MESSAGES 1)"]
        assert c.rename("INBOX", "Old-Inbox")[0] == "NO"  # the name exists
        assert c.status("INBOX", "(MESSAGES)")[1] == [b"INBOX (MESSAGES 1)"]
    finally:
        c.logout()
        other.logout()
