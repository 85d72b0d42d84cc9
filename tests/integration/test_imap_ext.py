"""IMAP extensions over real sockets with imaplib (STARTTLS): THREAD (RFC 5256),
UTF8=ACCEPT (RFC 6855)."""

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


def test_utf8_accept_names_and_append(server) -> None:
    c = connect(server)
    try:
        assert c.create("Caf&AOk-")[0] == "OK"  # a 7-bit client's name, before ENABLE
        assert c.enable("UTF8=ACCEPT")[0] == "OK" and c.utf8_enabled
        assert c.response("ENABLED") == ("ENABLED", [b"UTF8=ACCEPT"])
        assert c.create('"Entwürfe & Co"')[0] == "OK"
        assert (server.box.root / ".Entw&APw-rfe &- Co").is_dir()  # on disk in modified UTF-7
        typ, data = c.list()
        names = b" ".join(x if isinstance(x, bytes) else b" ".join(x) for x in data)
        assert "Café".encode() in names and "Entwürfe & Co".encode() in names and b"&AOk-" not in names
        # Thunderbird's APPEND (RFC 6855 4): UTF8 (~{n}) with a synchronizing literal
        msg = "From: jörg@example.test\r\nSubject: Grüße aus Köln\r\n\r\nHallo\r\n".encode()
        c.send(b'x1 APPEND "Caf\xc3\xa9" (\\Seen) UTF8 (~{%d}\r\n' % len(msg))
        assert c.readline().startswith(b"+")
        c.send(msg + b")\r\n")
        line = c.readline()
        while not line.startswith(b"x1 "):
            line = c.readline()
        assert line.startswith(b"x1 OK [APPENDUID ")
        typ, data = c.select('"Café"')
        assert typ == "OK" and data == [b"1"]
        typ, data = c.search(None, "SUBJECT", '"grüße"')
        assert typ == "OK" and data == [b"1"]
        typ, data = c.fetch("1", "(BODY.PEEK[])")
        assert data[0][1] == msg
        typ, data = c.status('"Café"', "(MESSAGES)")
        assert typ == "OK" and data == ['"Café" (MESSAGES 1)'.encode()]
    finally:
        c.logout()
