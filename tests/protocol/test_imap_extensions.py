"""IMAP extensions driven by bytes: QUOTA (RFC 9208) and its STATUS items."""

from __future__ import annotations

from pathlib import Path

from kanmon.config import parse_config
from kanmon.store.connection import PeerInfo
from kanmon.store.imap.session import ImapSession
from kanmon.store.users import AuthThrottle, Users
from tests.protocol.test_imap_session import ALICE, FAST, SIMPLE, Driver, deliver_new


def session(tmp_path: Path, quota: str | None) -> tuple[Driver, Users]:
    text = f'[server]\ndata_dir = "{tmp_path}"\n[[domain]]\nname = "example.test"\nmailboxes = ["alice"]\n'
    if quota:
        text += f'quota = "{quota}"\n'
    users = Users(parse_config(text), hasher=FAST)
    users.set_password(ALICE, "pw")
    box = users.mailbox(ALICE).ensure()
    for _ in range(3):
        deliver_new(box.root, SIMPLE)
    s = ImapSession(hostname="h", users=users, throttle=AuthThrottle(), peer=PeerInfo("127.0.0.1", 1, True),
                    tls_available=True, emit=lambda *a, **k: None)
    d = Driver(s, users)
    assert "QUOTA" not in d.cmd("c CAPABILITY")  # offered once logged in
    d.cmd(f"a LOGIN {ALICE} pw")
    return d, users


def test_quota_root_and_usage(tmp_path: Path) -> None:
    d, users = session(tmp_path, "1MiB")
    assert " QUOTA QUOTA=RES-STORAGE" in d.cmd("c CAPABILITY")
    used = 3 * len(SIMPLE)  # stored bytes (LF), rounded up to KiB
    limit = users.quota(ALICE) // 1024
    # RFC 9208 4.1.2 example
    assert d.cmd("A003 GETQUOTAROOT INBOX") == (
        f'* QUOTAROOT INBOX ""\r\n* QUOTA "" (STORAGE {(used + 1023) // 1024} {limit})\r\nA003 OK GETQUOTAROOT completed\r\n')
    assert d.cmd('A004 GETQUOTA ""') == f'* QUOTA "" (STORAGE 1 {limit})\r\nA004 OK GETQUOTA completed\r\n'
    assert "A005 NO [NONEXISTENT]" in d.cmd('A005 GETQUOTA "other"')
    assert "A006 NO [NONEXISTENT]" in d.cmd("A006 GETQUOTAROOT Nowhere")
    assert "A007 NO [NOPERM]" in d.cmd('A007 SETQUOTA "" (STORAGE 512)')  # no QUOTASET
    assert "BAD" in d.cmd("A008 GETQUOTAROOT")


def test_no_quota_no_root(tmp_path: Path) -> None:
    d, _ = session(tmp_path, None)
    assert d.cmd("A GETQUOTAROOT INBOX") == "* QUOTAROOT INBOX\r\nA OK GETQUOTAROOT completed\r\n"
    assert "B NO [NONEXISTENT]" in d.cmd('B GETQUOTA ""')


def test_status_deleted_and_deleted_storage(tmp_path: Path) -> None:
    d, _ = session(tmp_path, "1MiB")
    d.cmd("s SELECT INBOX")
    d.cmd("t STORE 1:2 +FLAGS.SILENT (\\Deleted)")
    out = d.cmd("u STATUS INBOX (MESSAGES DELETED DELETED-STORAGE)")
    assert "* STATUS INBOX (MESSAGES 3 DELETED 2 DELETED-STORAGE 1)" in out  # 2 x 70 bytes: 1 KiB


def sorted_session(tmp_path: Path) -> Driver:
    d, users = session(tmp_path, None)
    box = users.mailbox(ALICE)
    for name in list((box.root / "new").iterdir()):
        name.unlink()
    msgs = [
        (b"From: Zed <zed@example.test>\nTo: b@example.test\nSubject: Re: [list] Budget\n"
         b"Date: Tue, 01 Dec 2026 10:00:00 +0000\n\nxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\n"),
        (b"From: amy@example.test\nTo: c@example.test\nSubject: agenda\n"
         b"Date: Mon, 30 Nov 2026 10:00:00 +0000\n\nx\n"),
        (b"From: Bob <bob@example.test>\nTo: a@example.test\nSubject: =?UTF-8?Q?budget_(fwd)?=\n"
         b"Date: Wed, 02 Dec 2026 09:00:00 +0900\n\nxxxxxxxxxxxxxxxxxxxxxx\n"),
    ]
    for m in msgs:
        deliver_new(box.root, m)
    d.cmd("s SELECT INBOX")
    return d


def test_sort(tmp_path: Path) -> None:
    d = sorted_session(tmp_path)
    assert " SORT" in d.cmd("c CAPABILITY")
    assert "* SORT 2 1 3\r\n" in d.cmd("a SORT (DATE) UTF-8 ALL")  # 3 is 2 Dec 00:00 UTC
    assert "* SORT 3 1 2\r\n" in d.cmd("b SORT (REVERSE DATE) UTF-8 ALL")
    assert "* SORT 2 3 1\r\n" in d.cmd("c SORT (FROM) UTF-8 ALL")  # amy, bob, zed
    assert "* SORT 3 1 2\r\n" in d.cmd("d SORT (TO) UTF-8 ALL")  # a, b, c
    assert "* SORT 2 3 1\r\n" in d.cmd("e SORT (SIZE) UTF-8 ALL")
    # base subjects: "agenda", "budget", "budget": ties in sequence order
    assert "* SORT 2 1 3\r\n" in d.cmd("f SORT (SUBJECT) UTF-8 ALL")
    assert "* SORT 1 3\r\n" in d.cmd("g SORT (SUBJECT REVERSE ARRIVAL) UTF-8 SUBJECT budget")
    out = d.cmd("h UID SORT (SIZE) UTF-8 UNSEEN")
    assert "* SORT 2 3 1\r\n" in out and "h OK SORT completed" in out
    assert "BAD" in d.cmd("i SORT (COLOR) UTF-8 ALL")
    assert "BAD" in d.cmd("j SORT (DATE REVERSE) UTF-8 ALL")
    assert "NO [BADCHARSET" in d.cmd("k SORT (DATE) KOI8-R ALL")


def test_base_subject() -> None:
    from kanmon.store.imap.session import base_subject

    assert base_subject("Re: Fwd: [list] Budget (fwd)") == "Budget"
    assert base_subject("[Fwd: re: plan]") == "plan"
    assert base_subject("  a   b  ") == "a b"
    assert base_subject("re:") == ""


def test_enable_names_what_it_enabled(tmp_path: Path) -> None:
    d, _ = session(tmp_path, None)
    assert " ENABLE" in d.cmd("c CAPABILITY")
    # RFC 5161 3.1 example: the server answers with what it enabled, not what it ignored
    assert d.cmd("t2 ENABLE CONDSTORE X-GOOD-IDEA") == "* ENABLED CONDSTORE\r\nt2 OK ENABLE completed\r\n"
    assert d.cmd("t2 ENABLE CONDSTORE") == "* ENABLED\r\nt2 OK ENABLE completed\r\n"  # already on
    assert "BAD" in d.cmd("t3 ENABLE")
    d.cmd("s SELECT INBOX")
    assert "t4 BAD" in d.cmd("t4 ENABLE CONDSTORE")  # only before SELECT (RFC 5161 3.1)


def test_create_special_use(tmp_path: Path) -> None:
    d, users = session(tmp_path, None)
    assert "CREATE-SPECIAL-USE" in d.cmd("c CAPABILITY")
    # RFC 6154 5.2 example (two uses on one folder: refused; one: made)
    assert "t0 NO [USEATTR]" in d.cmd("t0 CREATE MySpecial (USE (\\Drafts \\Sent))")
    assert "t1 OK" in d.cmd("t1 CREATE MySpecial (USE (\\Archive))")
    out = d.cmd('t2 LIST "" "*"')
    assert '* LIST (\\HasNoChildren \\Archive) "." MySpecial\r\n' in out
    assert '* LIST (\\HasNoChildren \\Sent) "." Sent\r\n' in out
    assert "t3 NO [USEATTR]" in d.cmd("t3 CREATE Other (USE (\\Archive))")  # one folder per use
    assert "Other" not in d.cmd('t4 LIST "" "*"')
    assert "t5 NO [USEATTR]" in d.cmd("t5 CREATE Everything (USE (\\All))")  # no virtual folders
    assert "t6 BAD" in d.cmd("t6 CREATE X (USE \\Archive)")
    assert "t7 OK" in d.cmd("t7 RENAME MySpecial Old")
    assert '* LIST (\\HasNoChildren \\Archive) "." Old\r\n' in d.cmd('t8 LIST "" "*"')
    assert "t9 OK" in d.cmd("t9 DELETE Old")
    assert "t10 OK" in d.cmd("t10 CREATE Again (USE (\\Archive))")  # the use is free again
    again = users.mailbox(ALICE).special_uses()
    assert again["Again"] == "\\Archive" and "MySpecial" not in again


def threaded_session(tmp_path: Path, messages: list[tuple[str, str, str, str]]) -> Driver:
    """A selected INBOX holding (Message-ID, References, Subject, day of Dec 2026) messages."""
    d, users = session(tmp_path, None)
    box = users.mailbox(ALICE)
    for name in list((box.root / "new").iterdir()):
        name.unlink()
    for mid, refs, subject, day in messages:
        head = f"From: a@example.test\nSubject: {subject}\nDate: {day} Dec 2026 10:00:00 +0000\n"
        if mid:
            head += f"Message-ID: <{mid}>\n"
        if refs:
            head += f"References: {refs}\n"
        deliver_new(box.root, (head + "\nbody\n").encode())
    d.cmd("s SELECT INBOX")
    return d


def test_thread_references_rfc_example_shape(tmp_path: Path) -> None:
    # RFC 5256 4: "* THREAD (3 6 (4 23)(44 7 96))" - here as sequence numbers 1..7:
    # 1 is the root, 2 answers 1, 3 and 5 answer 2, 4 answers 3, 6 answers 5, 7 answers 6.
    d = threaded_session(tmp_path, [
        ("r@x", "", "plan", "01"),
        ("s@x", "<r@x>", "Re: plan", "02"),
        ("t@x", "<r@x> <s@x>", "Re: plan", "03"),
        ("u@x", "<r@x> <s@x> <t@x>", "Re: plan", "04"),
        ("v@x", "<r@x> <s@x>", "Re: plan", "05"),
        ("w@x", "<s@x> <v@x>", "Re: plan", "06"),
        ("x@x", "<v@x> <w@x>", "Re: plan", "07"),
    ])
    assert " THREAD=REFERENCES" in d.cmd("c CAPABILITY") and " THREAD=ORDEREDSUBJECT" in d.cmd("c CAPABILITY")
    assert d.cmd("a THREAD REFERENCES US-ASCII ALL") == "* THREAD (1 2 (3 4)(5 6 7))\r\na OK THREAD completed\r\n"
    # the search narrows the set first: without 2, the dummy it leaves gives way to its
    # children, which become 1's
    assert "* THREAD (1 (3 4)(5 6 7))\r\n" in d.cmd("c THREAD REFERENCES UTF-8 NOT 2")
    assert d.cmd('d THREAD REFERENCES US-ASCII SUBJECT "nothing"') == "* THREAD\r\nd OK THREAD completed\r\n"
    d.cmd("e STORE 1 +FLAGS.SILENT (\\Deleted)")
    d.cmd("f EXPUNGE")  # now sequence numbers are UIDs - 1
    assert "* THREAD (1 (2 3)(4 5 6))\r\n" in d.cmd("g THREAD REFERENCES UTF-8 ALL")
    assert "* THREAD (2 (3 4)(5 6 7))\r\n" in d.cmd("h UID THREAD REFERENCES UTF-8 ALL")


def test_thread_references_dummy_root_subjects_and_loops(tmp_path: Path) -> None:
    d = threaded_session(tmp_path, [
        ("a@x", "<gone@x>", "first", "01"),  # 1 and 2 answer a message not here: "((1)(2))"
        ("b@x", "<gone@x>", "second", "02"),
        ("c@x", "<d@x>", "loop", "03"),  # 3 and 4 refer to each other: 3 is 4's, no loop
        ("d@x", "<c@x>", "loop", "04"),
        ("", "", "Re: news", "06"),  # no Message-ID: joined to 6 by its base subject
        ("e@x", "", "news", "05"),
        ("e@x", "", "dup", "07"),  # a duplicate Message-ID is a message of its own
    ])
    assert d.cmd("a THREAD REFERENCES UTF-8 ALL") == (
        "* THREAD ((1)(2))(4 3)(6 5)(7)\r\na OK THREAD completed\r\n")
    assert d.cmd("b THREAD ORDEREDSUBJECT UTF-8 ALL") == (
        "* THREAD (1)(2)(3 4)(6 5)(7)\r\nb OK THREAD completed\r\n")
    assert "BAD" in d.cmd("c THREAD JWZ UTF-8 ALL")
    assert "NO [BADCHARSET" in d.cmd("d THREAD REFERENCES KOI8-R ALL")
    assert "BAD" in d.cmd("e THREAD REFERENCES UTF-8")


def test_thread_long_chain_is_iterative() -> None:
    from kanmon.store.imap import thread as t

    rows = [t.Row(i, i, f"<m{i}>", f"<m{i - 1}>" if i > 1 else "", "", "s", False, float(i)) for i in range(1, 20001)]
    assert t.render(t.references(rows), False) == "(" + " ".join(str(i) for i in range(1, 20001)) + ")"
    wide = [t.Row(1, 1, "<r>", "", "", "s", False, 1.0)]
    wide += [t.Row(i, i, f"<m{i}>", f"<m{i - 1}>" if i > 2 else "<r>", "", "s", False, float(i)) for i in range(2, 3000)]
    wide += [t.Row(3000 + i, 3000 + i, f"<b{i}>", f"<m{i}>", "", "s", False, 5000.0 + i) for i in range(3, 3000)]
    out = t.render(t.references(wide), False)
    numbers = [int(n) for n in out.replace("(", " ").replace(")", " ").split()]
    assert sorted(numbers) == [r.seq for r in wide]  # each message once
    assert out.startswith("(1 2 3 (4 ") and out.count("(") == 1 + 2 * 2996


def test_mutf7_round_trip_and_rfc_example() -> None:
    from kanmon.store.imap import mutf7

    # RFC 3501 5.1.3's example name
    assert mutf7.encode("~peter/mail/台北/日本語") == "~peter/mail/&U,BTFw-/&ZeVnLIqe-"
    assert mutf7.decode("~peter/mail/&U,BTFw-/&ZeVnLIqe-") == "~peter/mail/台北/日本語"
    for name in ["Café", "A&B", "Entwürfe & Co", "😀 emoji", ""]:
        assert mutf7.decode(mutf7.encode(name)) == name
    for bad in ["&Jjo!", "&AGE-", "Caf\u00e9", "&U,BTFw"]:  # unterminated, shifted ASCII, 8-bit
        try:
            mutf7.decode(bad)
        except ValueError:
            continue
        raise AssertionError(bad)


def test_utf8_accept(tmp_path: Path) -> None:
    d, users = session(tmp_path, None)
    assert " UTF8=ACCEPT" in d.cmd("c CAPABILITY")
    d.cmd('a CREATE "Caf&AOk-"')  # made by a 7-bit client
    # before ENABLE: 8-bit names are refused, names are listed in modified UTF-7
    assert "BAD" in d.send('b CREATE "Entwürfe"\r\n')
    assert d.cmd('c LIST "" "Caf*"').endswith(" Caf&AOk-\r\nc OK LIST completed\r\n")
    assert d.cmd("d ENABLE UTF8=ACCEPT") == "* ENABLED UTF8=ACCEPT\r\nd OK ENABLE completed\r\n"
    assert d.cmd("e ENABLE UTF8=ACCEPT") == "* ENABLED\r\ne OK ENABLE completed\r\n"  # already on
    out = d.send('f CREATE "Entwürfe & Co"\r\n')
    assert "f OK" in out
    assert (users.mailbox(ALICE).root / ".Entw&APw-rfe &- Co").is_dir()  # on disk as Dovecot keeps it
    out = d.send('g LIST "" "*"\r\n')
    assert ' "Café"\r\n' in out  # UTF-8 in a quoted string (RFC 6855 3)
    assert "Entwürfe & Co" in out and "&APw-" not in out
    out = d.send('h STATUS "Café" (MESSAGES)\r\n')
    assert '* STATUS "Café" (MESSAGES 0)\r\n' in out
    # APPEND with the UTF8 data item (RFC 6855 4): a message with UTF-8 header fields
    msg = "From: jörg@example.test\r\nSubject: Grüße\r\n\r\nhi\r\n".encode()
    out = d.send(b'i APPEND "Caf\xc3\xa9" UTF8 (~{%d+}\r\n' % len(msg) + msg + b")\r\n")
    assert "i OK [APPENDUID" in out
    d.send('j SELECT "Café"\r\n')
    assert "BAD" in d.cmd("k SEARCH CHARSET UTF-8 SUBJECT grüße")  # RFC 6855 3: no CHARSET now
    assert "* SEARCH 1\r\n" in d.send("l SEARCH SUBJECT grüße\r\n")
    assert "BAD" in d.send(b'm CREATE "bad\xff"\r\n')  # not UTF-8
