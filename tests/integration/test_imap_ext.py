"""IMAP extensions over real sockets with imaplib (STARTTLS): THREAD (RFC 5256)."""

from __future__ import annotations

from pathlib import Path

import pytest
import trustme

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


def message(mid: str, refs: str, subject: str, day: int) -> bytes:
    head = f"From: bob@example.test\nTo: alice@example.test\nSubject: {subject}\nDate: {day:02d} Dec 2026 09:00:00 +0000\n"
    head += f"Message-ID: <{mid}>\n" + (f"References: {refs}\n" if refs else "")
    return (head + "\nhello\n").encode()


def test_thread_references_and_orderedsubject(server) -> None:
    for m in [
        message("r@x", "", "plan", 1),
        message("s@x", "<r@x>", "Re: plan", 2),
        message("t@x", "<r@x> <s@x>", "Re: plan", 3),
        message("u@x", "<r@x> <s@x> <t@x>", "Re: plan", 4),
        message("v@x", "<r@x> <s@x>", "Re: plan", 5),
        message("w@x", "<s@x> <v@x>", "Re: plan", 6),
        message("x@x", "<v@x> <w@x>", "Re: plan", 7),
        message("y@x", "<missing@x>", "Fwd: plan", 8),  # joins the thread by subject
        message("z@x", "", "lunch", 9),
    ]:
        deliver_new(server.box.root, m)
    c = connect(server)
    try:
        typ, caps = c.capability()
        assert b"THREAD=REFERENCES" in caps[0].split() and b"THREAD=ORDEREDSUBJECT" in caps[0].split()
        c.select("INBOX")
        # RFC 5256 4's "(3 6 (4 23)(44 7 96))" shape; 8 answers the same base subject
        typ, data = c.thread("REFERENCES", "UTF-8", "ALL")
        assert typ == "OK" and data == [b"(1 (2 (3 4)(5 6 7))(8))(9)"]
        typ, data = c.uid("THREAD", "REFERENCES", "US-ASCII", "SENTSINCE", "3-Dec-2026")
        assert typ == "OK" and data == [b"((3 4)(5 6 7)(8))(9)"]
        typ, data = c.thread("ORDEREDSUBJECT", "UTF-8", "ALL")
        assert typ == "OK" and data == [b"(1 (2)(3)(4)(5)(6)(7)(8))(9)"]
        typ, data = c.thread("REFERENCES", "UTF-8", "SUBJECT", "nothing")
        assert typ == "OK" and data == [b""]
    finally:
        c.logout()
