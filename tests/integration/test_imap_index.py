"""IMAP answered from the folder's index, over real sockets with imaplib: consistency
under concurrent delivery, expunge from another session, a Maildir changed behind our
back, a torn index rebuilt, Japanese SEARCH, and IDLE woken by inotify."""

from __future__ import annotations

import os
import re
import socket
import threading
from pathlib import Path

import pytest
import trustme

from kanmon.store import index as mindex
from kanmon.store import maildir
from kanmon.store.imap import cache
from kanmon.store.imap import message as mime
from tests.integration.test_imap import ALICE, MSG, PW, connect, deliver_new, make_server

ca = pytest.fixture(scope="module")(lambda: trustme.CA())


@pytest.fixture
def server(tmp_path: Path, ca: trustme.CA):
    s = make_server(tmp_path / "data", ca)
    try:
        yield s
    finally:
        s.loop.run(s.svc.stop())
        s.loop.close()


def message(n: int, subject: str | None = None) -> bytes:
    subject = subject or f"number {n}"
    return (f"From: Bob <bob@example.test>\r\nTo: alice@example.test\r\nSubject: {subject}\r\n"
            f"Message-ID: <m{n}@example.test>\r\nDate: Tue, 01 Dec 2026 09:00:00 +0000\r\n\r\nbody {n}\r\n").encode()


def deliver(root: Path, data: bytes, hook: bool = False) -> None:
    """Write a message into new/ as local delivery does; hook: also add its cache entry
    as the delivery agent does."""
    if not hook:
        deliver_new(root, data)
        return
    stored = maildir.to_lf(data)
    name = maildir.unique_name(len(stored), len(data))
    (root / "tmp" / name).write_bytes(stored)
    os.rename(root / "tmp" / name, root / "new" / name)
    cache.record_deliveries([(root / "new" / name, stored, None)])


def envelopes(c) -> dict[int, bytes]:
    """UID -> the Message-ID inside its ENVELOPE."""
    typ, data = c.uid("FETCH", "1:*", "(ENVELOPE)")
    assert typ == "OK"
    out = {}
    for item in data:
        if item is None:  # imaplib's answer when no message matched (an empty folder)
            continue
        line = item if isinstance(item, bytes) else item[0]
        m = re.search(rb"UID (\d+)", line)
        mid = re.search(rb'"(<m\d+@example.test>)"', line)
        if m:
            out[int(m.group(1))] = mid.group(1) if mid else b""
    return out


def message_ids(c) -> dict[int, bytes]:
    """UID -> the Message-ID read from the message's header (BODY.PEEK, not the index)."""
    typ, data = c.uid("FETCH", "1:*", "(BODY.PEEK[HEADER.FIELDS.NOT (SUBJECT)])")
    out = {}
    for item in data:
        if isinstance(item, tuple):
            uid = int(re.search(rb"UID (\d+)", item[0]).group(1))
            out[uid] = re.search(rb"Message-ID: (\S+)", item[1]).group(1)
    return out


def test_fetch_from_the_index_matches_the_message(server) -> None:
    deliver_new(server.box.root, MSG)
    c = connect(server)
    c.select("INBOX")
    first = c.fetch("1", "(ENVELOPE BODYSTRUCTURE BODY RFC822.SIZE INTERNALDATE BODY.PEEK[HEADER.FIELDS (SUBJECT FROM)])")
    again = c.fetch("1", "(ENVELOPE BODYSTRUCTURE BODY RFC822.SIZE INTERNALDATE BODY.PEEK[HEADER.FIELDS (SUBJECT FROM)])")
    assert first == again
    idx = server.box.folder("INBOX").index
    assert idx.count() == 1  # the first FETCH made the entry; the second was answered from it
    tree = mime.parse(MSG)
    head, literal = first[1][0]
    assert b"ENVELOPE " + mime.envelope(tree) in head
    assert b"BODYSTRUCTURE " + mime.bodystructure(tree) in head
    assert b"RFC822.SIZE %d" % len(MSG) in head
    assert literal == b"From: Bob <bob@example.test>\r\nSubject: quarterly\r\n\r\n"
    c.logout()


def test_index_stays_consistent_under_concurrent_delivery(server) -> None:
    root = server.box.root
    n = 150
    done = threading.Event()

    def deliveries() -> None:
        for i in range(n):
            deliver(root, message(i), hook=i % 2 == 0)
        done.set()

    c = connect(server)
    c.select("INBOX")
    t = threading.Thread(target=deliveries)
    t.start()
    while not done.is_set():  # FETCH and SEARCH while files arrive (some with entries, some not)
        c.noop()
        envelopes(c)
        c.uid("SEARCH", "SUBJECT", "number")
    t.join()
    c.noop()
    by_index, by_file = envelopes(c), message_ids(c)
    assert len(by_index) == n
    assert by_index == by_file
    typ, data = c.uid("SEARCH", "SUBJECT", '"number 77"')
    uid77 = [u for u, mid in by_file.items() if mid == b"<m77@example.test>"]
    assert data[0].split() == [str(u).encode() for u in uid77]
    c.logout()


def test_expunge_from_another_session(server) -> None:
    for i in range(3):
        deliver_new(server.box.root, message(i))
    a, b = connect(server), connect(server)
    a.select("INBOX")
    assert len(envelopes(a)) == 3
    b.select("INBOX")
    b.store("2", "+FLAGS", r"(\Deleted)")
    b.expunge()
    typ, data = a.noop()
    assert a.untagged_responses.get("EXPUNGE") == [b"2"]
    assert a.search(None, "SUBJECT", "number")[1][0].split() == [b"1", b"2"]
    assert envelopes(a) == {1: b"<m0@example.test>", 3: b"<m2@example.test>"}
    a.logout()
    b.logout()


def command(c, line: str) -> tuple[list[bytes], bytes]:
    """Send one tagged command on imaplib's socket; (untagged responses with their
    literals inline, the tagged reply line)."""
    c.send(b"t1 " + line.encode() + b"\r\n")
    untagged: list[bytes] = []
    while True:
        got = c.readline()
        m = re.search(rb"\{(\d+)\}\r\n$", got)
        while m:
            got += c.read(int(m.group(1)))
            more = c.readline()
            got += more
            m = re.search(rb"\{(\d+)\}\r\n$", more)
        if got.startswith(b"t1 "):
            return untagged, got
        untagged.append(got)


@pytest.mark.parametrize("item", [
    "BODY.PEEK[]", "BODY[]", "BODY.PEEK[HEADER]", "BODY.PEEK[TEXT]", "RFC822", "RFC822.TEXT",
    "RFC822.HEADER", "BODY.PEEK[]<0.10>", "BODY.PEEK[1]", "BODY.PEEK[HEADER.FIELDS (X-NOT-CACHED)]",
    "ENVELOPE", "INTERNALDATE", "RFC822.SIZE",
])
def test_fetch_of_a_message_expunged_by_another_session(server, item: str) -> None:
    """RFC 2180 4.1.2: a message whose file another session removed gets no FETCH
    response (never an empty body) and the FETCH a tagged NO [EXPUNGEISSUED] (RFC 5530);
    the others are answered; the EXPUNGE comes at the next NOOP."""
    root = server.box.root
    for i in range(3):
        data = maildir.to_lf(message(i))
        name = maildir.unique_name(len(data), len(message(i)))
        name = re.sub(r",W=\d+", "", name)  # a foreign Maildir's name: no size hint
        (root / "cur" / (name + ":2,")).write_bytes(data)
    a, b = connect(server), connect(server)
    try:
        a.select("INBOX")
        assert a.fetch("1:3", "(UID)")[0] == "OK"
        b.select("INBOX")
        b.store("2", "+FLAGS", r"(\Deleted)")
        b.expunge()
        untagged, tagged = command(a, f"UID FETCH 1:* (UID {item})")
        assert tagged == b"t1 NO [EXPUNGEISSUED] Some of the requested messages no longer exist\r\n"
        assert [re.match(rb"\* (\d+) FETCH \(UID (\d+) ", x).groups() for x in untagged] == [
            (b"1", b"1"), (b"3", b"3")]
        assert all(b"{0}" not in x and b'""' not in x and b"RFC822.SIZE 0" not in x for x in untagged)
        untagged, tagged = command(a, f"FETCH 2 ({item})")
        assert untagged == [] and tagged.startswith(b"t1 NO [EXPUNGEISSUED] ")
        assert a.fetch("2", "(FLAGS)")[0] == "OK"  # flags are the session's: answered
        a.noop()
        assert a.untagged_responses.get("EXPUNGE") == [b"2"]
        typ, data = a.fetch("1:*", f"({item})")
        assert typ == "OK" and len([x for x in data if x != b")"]) == 2
    finally:
        a.logout()
        b.logout()


def test_maildir_changed_behind_our_back(server) -> None:
    root = server.box.root
    for i in range(3):
        deliver_new(root, message(i))
    c = connect(server)
    c.select("INBOX")
    envelopes(c)  # the index has all three
    names = {p.name.partition(":")[0]: p for p in (root / "cur").iterdir()}
    uids = {base: uid for base, uid in server.box.folder("INBOX")._state.uids.items()}
    first, second = sorted(names, key=uids.get)[:2]
    os.rename(names[first], root / "cur" / (first + ":2,S"))  # a user's mail program set \Seen
    os.unlink(names[second])  # a user's rm
    restored = maildir.unique_name(len(message(9)), len(message(9)))
    (root / "cur" / (restored + ":2,")).write_bytes(maildir.to_lf(message(9)))  # a backup restore
    c.noop()
    assert c.untagged_responses.get("EXPUNGE") == [b"2"]
    fetched = [x for x in c.untagged_responses.get("FETCH", []) if b"\\Seen" in x]
    assert fetched, c.untagged_responses
    assert envelopes(c) == {1: b"<m0@example.test>", 3: b"<m2@example.test>", 4: b"<m9@example.test>"}
    assert c.uid("SEARCH", "SEEN")[1][0] == b"1"
    c.logout()


def test_a_torn_index_is_rebuilt_from_the_maildir(server) -> None:
    root = server.box.root
    for i in range(5):
        deliver_new(root, message(i))
    c = connect(server)
    c.select("INBOX")
    want = envelopes(c)
    path = mindex.index_path(root)
    data = path.read_bytes()
    path.write_bytes(data[:-9])  # a crash in the middle of an append
    c.logout()
    c = connect(server)
    c.select("INBOX")
    assert envelopes(c) == want  # answered from the files, never from the torn record
    assert server.box.folder("INBOX").index.discarded >= 1
    fresh = mindex.MailboxIndex(path)
    assert fresh.count() == 5 and fresh.discarded == 0  # rebuilt
    c.logout()


def test_japanese_search(server) -> None:
    root = server.box.root
    deliver_new(root, b"From: a@example.test\r\nSubject: =?ISO-2022-JP?B?GyRCQEE1YT1xGyhC?=\r\n\r\nhi\r\n")
    deliver_new(root, b"From: a@example.test\r\nSubject: =?UTF-8?B?" + __import__("base64").b64encode(
        "ご請求書の件".encode()) + b"?=\r\n\r\nhi\r\n")
    deliver_new(root, "From: a@example.test\r\nSubject: other\r\nContent-Type: text/plain; charset=Shift_JIS\r\n"
                "Content-Transfer-Encoding: 8bit\r\n\r\n".encode() + "お支払いのお願い\r\n".encode("shift_jis"))
    deliver_new(root, b"From: a@example.test\r\nSubject: other\r\nContent-Type: text/plain; charset=ISO-2022-JP\r\n\r\n"
                + "お支払いのお願い\r\n".encode("iso2022_jp"))
    deliver_new(root, b"From: a@example.test\r\nSubject: plain\r\n\r\nnothing here\r\n")
    c = connect(server)
    c.select("INBOX")
    c.literal = "請求書".encode()
    typ, data = c.search("UTF-8", "SUBJECT")
    assert typ == "OK" and data[0].split() == [b"1", b"2"]
    c.literal = "お支払い".encode()
    typ, data = c.search("UTF-8", "BODY")
    assert data[0].split() == [b"3", b"4"]
    c.literal = "お支払い".encode()
    typ, data = c.search("UTF-8", "TEXT")
    assert data[0].split() == [b"3", b"4"]
    assert c.search(None, "SUBJECT", "PLAIN")[1][0] == b"5"  # case-insensitive
    # the folder's search texts hold every field: a needle found in From is no Subject hit
    assert c.search(None, "SUBJECT", "a@example")[1][0] == b""
    assert c.search(None, "FROM", "a@example")[1][0].split() == [b"1", b"2", b"3", b"4", b"5"]
    c.literal = "請求書".encode()
    assert c.search("UTF-8", "FROM", "a@example", "NOT", "SEEN", "SUBJECT")[1][0].split() == [b"1", b"2"]
    assert c.search(None, "OR", "SUBJECT", "plain", "SUBJECT", "other")[1][0].split() == [b"3", b"4", b"5"]
    c.logout()


RAW_JIS = (b"From: j@example.org\r\nTo: alice@example.test\r\nSubject: " + "納品書の送付".encode("iso2022_jp")
           + b"\r\nMessage-ID: <rawjis@example.org>\r\n\r\nbody\r\n")


@pytest.mark.parametrize("hook", [False, True])
def test_search_finds_a_raw_iso2022jp_subject(server, hook: bool) -> None:
    """A Subject in raw ISO-2022-JP (7-bit, not MIME-encoded) is found by a UTF-8 SEARCH,
    whether its index entry was made by delivery or by IMAP; SORT and THREAD read it too."""
    deliver(server.box.root, RAW_JIS, hook)
    deliver(server.box.root, message(1, "別件"), hook)
    c = connect(server)
    try:
        c.select("INBOX")
        c.literal = "納品書".encode()
        typ, data = c.search("UTF-8", "SUBJECT")
        assert typ == "OK" and data[0] == b"1"
        c.literal = "納品書".encode()
        assert c.search("UTF-8", "HEADER", "SUBJECT")[1][0] == b"1"  # read from the file
        typ, data = c.sort("(SUBJECT)", "UTF-8", "ALL")
        assert data[0] == b"2 1"  # 別 (U+5225) before 納 (U+7D0D)
    finally:
        c.logout()


def test_an_entry_indexed_before_raw_iso2022jp_was_decoded_is_made_again(server) -> None:
    """An index entry written by an older kanmon holds the raw subject's ESC sequences
    in its search text: SEARCH makes it again from the file instead of missing it."""
    root = server.box.root
    deliver_new(root, RAW_JIS)
    folder = server.box.folder("INBOX")
    info = folder.sync()[0]
    entry = cache.make_entry(RAW_JIS, 0, len(RAW_JIS))
    stale = "\0".join(["納品書の送付".encode("iso2022_jp").decode().casefold(), "j@example.org",
                       "alice@example.test", "", ""]).encode()
    folder.index.add(info.base, entry._replace(search=stale))
    assert b"\x1b$b" in folder.index.get(info.base).search  # as an older kanmon wrote it
    c = connect(server)
    try:
        c.select("INBOX")
        c.literal = "納品書".encode()
        assert c.search("UTF-8", "SUBJECT")[1][0] == b"1"
        assert b"\x1b" not in folder.index.get(info.base).search  # made again, kept
        fresh = mindex.MailboxIndex(mindex.index_path(root))
        assert "納品書の送付" in cache.search_fields(fresh.get(info.base))["subject"]
    finally:
        c.logout()


def test_search_finds_messages_the_index_cannot_hold(server, monkeypatch) -> None:
    monkeypatch.setattr(mindex, "MAX_RECORD", 64)  # every entry too large to cache
    deliver_new(server.box.root, b"From: a@example.test\r\nSubject: needle one\r\n\r\nhi\r\n")
    deliver_new(server.box.root, b"From: a@example.test\r\nSubject: hay\r\n\r\nhi\r\n")
    c = connect(server)
    try:
        c.select("INBOX")
        assert c.search(None, "SUBJECT", "needle")[1][0] == b"1"
        assert c.search(None, "HEADER", "SUBJECT", "hay")[1][0] == b"2"
    finally:
        c.logout()


def _idle_until_exists(server) -> None:
    raw = socket.create_connection(("127.0.0.1", server.tls), timeout=10)
    tls = server.client_ctx.wrap_socket(raw, server_hostname="127.0.0.1")
    f = tls.makefile("rb")
    try:
        assert f.readline().startswith(b"* OK")
        tls.sendall(f'a LOGIN {ALICE} "{PW}"\r\nb SELECT INBOX\r\n'.encode())
        while not f.readline().startswith(b"b OK"):
            pass
        tls.sendall(b"c IDLE\r\n")
        assert f.readline() == b"+ idling\r\n"
        deliver_new(server.box.root, MSG)
        assert f.readline() == b"* 1 EXISTS\r\n"  # the socket timeout bounds the wait
        assert f.readline() == b"* 1 RECENT\r\n"
        tls.sendall(b"DONE\r\n")
        assert f.readline() == b"c OK IDLE terminated\r\n"
    finally:
        f.close()
        tls.close()


def inotify_available() -> bool:
    from kanmon.store import watch

    libc = watch._load_libc()
    if libc is None:
        return False
    fd = libc.inotify_init1(watch.IN_CLOEXEC)
    if fd < 0:
        return False  # e.g. the per-user limit of instances reached on a shared machine
    os.close(fd)
    return True


def test_idle_is_woken_by_inotify_not_a_poll(server) -> None:
    if not inotify_available():
        pytest.skip("inotify is not available here (the poll fallback is tested below)")
    server.svc.idle_poll = 3600.0  # no poll would come within the socket timeout
    _idle_until_exists(server)


def test_idle_polls_where_inotify_is_missing(server, monkeypatch) -> None:
    from kanmon.store import connection

    monkeypatch.setattr(connection.DirectoryWatcher, "of", classmethod(lambda cls, loop, **kw: None))
    server.svc.idle_poll = 0.05
    _idle_until_exists(server)
