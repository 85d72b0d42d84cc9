"""IMAP session driven by bytes: no sockets (RFC 3501 and the extensions we offer)."""

from __future__ import annotations

import base64
import os
import re
from pathlib import Path

import pytest
from argon2 import PasswordHasher

from kanmon.config import parse_config
from kanmon.store import maildir
from kanmon.store.connection import Close, Delay, FileWork, PeerInfo, Send, StartTls, Verify
from kanmon.store.imap.message import parse, parse_section, section_bytes
from kanmon.store.imap.parser import CommandReader, ParseError, tokenize
from kanmon.store.imap import session as imap_session
from kanmon.store.imap.session import ImapSession, parse_datetime
from kanmon.store.users import AuthThrottle, Users

FAST = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
ALICE = "alice@example.test"

MULTIPART = (
    b"From: Bob Example <bob@example.test>\n"
    b"To: alice@example.test\n"
    b"Subject: =?utf-8?q?caf=C3=A9?= report\n"
    b"Date: Mon, 02 Mar 2026 10:00:00 +0000\n"
    b"Message-ID: <m1@example.test>\n"
    b"MIME-Version: 1.0\n"
    b'Content-Type: multipart/mixed; boundary="b1"\n'
    b"\n"
    b"preamble\n"
    b"--b1\n"
    b"Content-Type: text/plain; charset=utf-8\n"
    b"\n"
    b"Hello Alice,\nthe numbers are attached.\n"
    b"--b1\n"
    b"Content-Type: application/pdf; name=r.pdf\n"
    b"Content-Disposition: attachment; filename=r.pdf\n"
    b"Content-Transfer-Encoding: base64\n"
    b"\n"
    b"JVBERi0xLjQK\n"
    b"--b1--\n"
)
SIMPLE = b"From: carol@example.test\nTo: alice@example.test\nSubject: lunch\n\nPizza at noon?\n"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def deliver_new(root: Path, data: bytes) -> None:
    name = maildir.unique_name(len(data), len(maildir.to_crlf(data)))
    (root / "tmp" / name).write_bytes(data)
    os.rename(root / "tmp" / name, root / "new" / name)


class Driver:
    def __init__(self, session: ImapSession, users: Users):
        self.session = session
        self.users = users
        self.out = bytearray()
        self.delays: list[float] = []
        self.closed = False
        self.tls_started = False
        self.run(session.start())

    def run(self, events) -> None:
        events = list(events)
        while events:
            ev = events.pop(0)
            if isinstance(ev, Send):
                self.out += ev.data
            elif isinstance(ev, Delay):
                self.delays.append(ev.seconds)
            elif isinstance(ev, Verify):
                events[:0] = self.session.auth_result(self.users.verify(ev.user, ev.password))
            elif isinstance(ev, FileWork):  # the adapter's file executor, run inline
                try:
                    result = ev.call(*ev.args)
                except Exception as e:  # noqa: BLE001 - handed to the session, as the adapter does
                    events[:0] = self.session.file_done(None, e)
                else:
                    events[:0] = self.session.file_done(result)
            elif isinstance(ev, StartTls):
                self.tls_started = True
                events[:0] = self.session.tls_started()
            elif isinstance(ev, Close):
                self.closed = True

    def send(self, data: bytes | str) -> str:
        if isinstance(data, str):
            data = data.encode()
        self.out.clear()
        self.run(self.session.receive(data))
        return self.out.decode("utf-8", "replace")

    def cmd(self, line: str) -> str:
        out = self.send(line + "\r\n")
        tag = line.split(" ", 1)[0]
        assert re.search(rf"^{re.escape(tag)} (OK|NO|BAD)", out, re.M), out
        return out


@pytest.fixture
def env(tmp_path: Path):
    config = parse_config(
        f"""
[server]
data_dir = "{tmp_path}"
[[domain]]
name = "example.test"
mailboxes = ["alice", "bob"]
"""
    )
    users = Users(config, hasher=FAST)
    users.set_password(ALICE, "pw")
    box = users.mailbox(ALICE).ensure()
    clock = Clock()
    throttle = AuthThrottle(clock, free_failures=1, base_delay=1, block_account_after=4, block_ip_after=100)
    events: list[str] = []

    def session(tls: bool = True, tls_available: bool = True, max_literal: int = 100_000) -> Driver:
        s = ImapSession(
            hostname="mx1.example.test", users=users, throttle=throttle, peer=PeerInfo("127.0.0.1", 40000, tls),
            tls_available=tls_available, emit=lambda text, queue_id=None: events.append(text if isinstance(text, str) else text.line()),
            max_literal=max_literal,
        )
        return Driver(s, users)

    class Env:
        pass

    e = Env()
    e.users, e.box, e.clock, e.throttle, e.session, e.events = users, box, clock, throttle, session, events
    return e


def logged_in(env, select: str | None = "INBOX") -> Driver:
    d = env.session()
    assert "a OK" in d.cmd(f"a LOGIN {ALICE} pw")
    if select:
        assert "s OK [READ-WRITE]" in d.cmd(f"s SELECT {select}")
    return d


# -- TLS and login ------------------------------------------------------------


def test_greeting_and_logindisabled_before_tls(env) -> None:
    d = env.session(tls=False)
    assert d.out.startswith(b"* OK [CAPABILITY IMAP4rev1 ")
    caps = d.cmd("a CAPABILITY")
    assert "STARTTLS" in caps and "LOGINDISABLED" in caps and "AUTH=PLAIN" not in caps
    assert "b NO [PRIVACYREQUIRED]" in d.cmd(f"b LOGIN {ALICE} pw")
    assert "c NO [PRIVACYREQUIRED]" in d.cmd("c AUTHENTICATE PLAIN " + base64.b64encode(b"\0alice@example.test\0pw").decode())
    assert d.session.state == "NOT_AUTHENTICATED"


def test_starttls_discards_pipelined_commands(env) -> None:
    """CVE-2011-0411: a command pipelined behind STARTTLS is never executed."""
    d = env.session(tls=False)
    out = d.send(f"a STARTTLS\r\nb LOGIN {ALICE} pw\r\n")
    assert out == "a OK Begin TLS negotiation now\r\n"
    assert d.tls_started and d.session.state == "NOT_AUTHENTICATED"
    caps = d.cmd("c CAPABILITY")
    assert "AUTH=PLAIN" in caps and "STARTTLS" not in caps and "LOGINDISABLED" not in caps
    assert "d BAD" in d.cmd("d STARTTLS")


def test_login_forms(env) -> None:
    d = env.session()
    assert "a NO [AUTHENTICATIONFAILED]" in d.cmd(f"a LOGIN {ALICE} wrong")
    assert "b OK [CAPABILITY" in d.cmd(f'b LOGIN "{ALICE}" "pw"')
    d = env.session()
    d.send(f"c LOGIN {{{len(ALICE)}}}\r\n")
    assert d.out == b"+ Ready for literal data\r\n"
    assert "c OK" in d.send(f"{ALICE} {{2+}}\r\npw\r\n")
    d = env.session()
    assert d.send("e AUTHENTICATE PLAIN\r\n") == "+ \r\n"
    assert "e OK" in d.send(base64.b64encode(b"\0alice@example.test\0pw").decode() + "\r\n")
    d = env.session()
    d.send("f AUTHENTICATE PLAIN\r\n")
    assert "f BAD" in d.send("*\r\n")
    assert "g NO" in d.cmd("g AUTHENTICATE CRAM-MD5")
    assert "h BAD" in d.cmd("h AUTHENTICATE PLAIN !!!")


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_authenticate_login(env) -> None:
    # SASL LOGIN, as Outlook and older clients use it: "Username:", then "Password:".
    d = env.session()
    assert "AUTH=LOGIN" in d.cmd("a CAPABILITY")
    assert d.send("b AUTHENTICATE LOGIN\r\n") == "+ VXNlcm5hbWU6\r\n"
    assert d.send(b64(ALICE) + "\r\n") == "+ UGFzc3dvcmQ6\r\n"
    out = d.send(b64("pw") + "\r\n")
    assert "b OK" in out and d.session.state == "AUTHENTICATED" and d.session.user == ALICE
    # With the user name as initial response (RFC 4959 SASL-IR).
    d = env.session()
    assert d.send(f"c AUTHENTICATE LOGIN {b64(ALICE)}\r\n") == "+ UGFzc3dvcmQ6\r\n"
    assert "c OK" in d.send(b64("pw") + "\r\n")
    # A wrong password fails like LOGIN does; cancelling and garbage are BAD.
    d = env.session()
    d.send("e AUTHENTICATE LOGIN\r\n")
    d.send(b64(ALICE) + "\r\n")
    assert "e NO [AUTHENTICATIONFAILED]" in d.send(b64("wrong") + "\r\n")
    assert d.session.state == "NOT_AUTHENTICATED"
    d.send("f AUTHENTICATE LOGIN\r\n")
    assert "f BAD AUTHENTICATE cancelled" in d.send("*\r\n")
    d.send("g AUTHENTICATE LOGIN\r\n")
    assert "g BAD" in d.send("!!!\r\n")
    # After a cancel the next AUTHENTICATE starts from the user name again.
    assert d.send("h AUTHENTICATE LOGIN\r\n") == "+ VXNlcm5hbWU6\r\n"
    # Not before STARTTLS.
    d = env.session(tls=False)
    assert "AUTH=LOGIN" not in d.cmd("i CAPABILITY")
    assert "j NO [PRIVACYREQUIRED]" in d.cmd(f"j AUTHENTICATE LOGIN {b64(ALICE)}")


def test_brute_force_slowed_then_blocked(env) -> None:
    d = env.session()
    for tag in "abc":
        assert f"{tag} NO [AUTHENTICATIONFAILED]" in d.cmd(f"{tag} LOGIN {ALICE} nope")
    assert d.delays == [0, 1, 2]
    out = d.send(f"d LOGIN {ALICE} nope\r\n")
    assert "* BYE too many failed logins" in out and d.closed
    d2 = env.session()
    assert "* BYE" in d2.send(f"e LOGIN {ALICE} pw\r\n") and d2.closed
    env.clock.now += 10_000
    assert "f OK" in env.session().cmd(f"f LOGIN {ALICE} pw")
    assert any("imap login blocked account alice@example.test" in e for e in env.events)


def test_commands_in_the_wrong_state(env) -> None:
    d = env.session()
    assert "a BAD" in d.cmd("a SELECT INBOX")
    assert "b BAD" in d.cmd("b FETCH 1 FLAGS")
    d = logged_in(env, select=None)
    assert "c BAD" in d.cmd("c FETCH 1 FLAGS")
    assert "d BAD" in d.cmd(f"d LOGIN {ALICE} pw")
    assert "e BAD unknown command" in d.cmd("e FROBNICATE")
    assert "f BAD" in d.cmd('f SELECT "unterminated')


# -- literals ------------------------------------------------------------------


def test_bounded_literal_is_refused_before_allocation(env) -> None:
    d = logged_in(env, select=None)
    d.session.reader.max_literal = 1000
    out = d.send("a APPEND INBOX {999999999}\r\n")
    assert out == "a NO [TOOBIG] literal of 999999999 octets is too large\r\n"
    assert len(d.session.reader.buf) == 0
    # LITERAL+ too big: the bytes are skipped without being kept, the next command works
    out = d.send("b APPEND INBOX {1500+}\r\n" + "x" * 1500 + "\r\nc NOOP\r\n")
    assert "b NO [TOOBIG]" in out and "c OK NOOP" in out
    out = d.send("d APPEND INBOX {99999999999+}\r\n")
    assert "* BYE literal too large" in out and d.closed


def test_line_too_long_closes(env) -> None:
    d = env.session()
    d.send("a NOOP " + "x" * 70_000)
    assert d.out.startswith(b"* BYE line too long") and d.closed


def test_tokenizer_and_reader() -> None:
    assert tokenize(b'a FETCH 1:* (FLAGS BODY.PEEK[HEADER.FIELDS (FROM TO)]<0.10>)') == [
        "a", "FETCH", "1:*", ["FLAGS", "BODY.PEEK[HEADER.FIELDS (FROM TO)]<0.10>"]]
    for bad in (b'a "x', b"a (x", b"a x)", b'a "\\q"'):
        with pytest.raises(ParseError):
            tokenize(bad)
    r = CommandReader(10)
    r.feed(b"a LOGIN {3}\r\n")
    assert r.next().kind == "continue"
    r.feed(b"bob {2+}\r\npw\r\n")
    assert r.next().data == b"a LOGIN {3}\r\nbob {2+}\r\npw\r\n"


# -- mailbox operations --------------------------------------------------------


def test_list_with_special_use_and_folder_operations(env) -> None:
    d = logged_in(env, select=None)
    out = d.cmd('a LIST "" "*"')
    assert '* LIST (\\HasNoChildren) "." INBOX' in out
    assert '* LIST (\\HasNoChildren \\Sent) "." Sent' in out
    assert "\\Trash" in out and "\\Junk" in out and "\\Drafts" in out
    assert '* LIST (\\Noselect) "." ""' in d.cmd('b LIST "" ""')
    assert "c OK" in d.cmd("c CREATE Projects.2026")
    assert "d NO [ALREADYEXISTS]" in d.cmd("d CREATE Projects")  # made by c (RFC 3501 6.3.3)
    assert "e OK" in d.cmd("e SELECT Projects")
    out = d.cmd('f LIST "" "Projects%"')
    assert '(\\HasChildren) "." Projects' in out and "Projects.2026" not in out
    assert "g OK" in d.cmd("g RENAME Projects Archive")
    out = d.cmd('h LIST "" "*"')
    assert "Archive.2026" in out and "Projects" not in out
    assert "i OK" in d.cmd("i SUBSCRIBE Archive")
    assert '"." Archive' in d.cmd('j LSUB "" "*"')
    assert "k OK" in d.cmd("k DELETE Archive.2026")
    assert "l NO" in d.cmd("l DELETE INBOX")
    assert "m NO [NONEXISTENT]" in d.cmd("m SELECT Nope")
    assert "n NO" in d.cmd('n CREATE "../../etc"')
    assert "o NO" in d.cmd('o CREATE "a/b"')
    out = d.cmd("p STATUS INBOX (MESSAGES UIDNEXT UIDVALIDITY UNSEEN RECENT)")
    assert re.search(r"\* STATUS INBOX \(MESSAGES 0 UIDNEXT 1 UIDVALIDITY \d+ UNSEEN 0 RECENT 0\)", out)


def test_select_reports_and_examine_is_read_only(env) -> None:
    deliver_new(env.box.root, SIMPLE)
    deliver_new(env.box.root, MULTIPART)
    d = logged_in(env, select=None)
    out = d.cmd("a SELECT INBOX")
    for line in ("* 2 EXISTS", "* 2 RECENT", "* OK [UNSEEN 1]", "* OK [UIDNEXT 3]", "a OK [READ-WRITE]"):
        assert line in out
    assert "* OK [PERMANENTFLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft \\*)]" in out
    out = d.cmd("b EXAMINE INBOX")
    assert "b OK [READ-ONLY]" in out and "* 0 RECENT" in out
    assert "c NO [READ-ONLY]" in d.cmd("c STORE 1 +FLAGS (\\Seen)")
    d.cmd("d FETCH 1 BODY[]")
    assert "\\Seen" not in env.box.folder("INBOX").sync()[0].flags


# -- FETCH ---------------------------------------------------------------------


def test_fetch_items(env) -> None:
    deliver_new(env.box.root, MULTIPART)
    d = logged_in(env)
    out = d.cmd("a FETCH 1 (UID FLAGS RFC822.SIZE INTERNALDATE ENVELOPE)")
    size = len(maildir.to_crlf(MULTIPART))
    assert f"RFC822.SIZE {size}" in out and "UID 1" in out and "FLAGS (\\Recent)" in out
    assert re.search(r'INTERNALDATE "\d\d-[A-Z][a-z]{2}-\d{4} \d\d:\d\d:\d\d \+0000"', out)
    assert ('ENVELOPE ("Mon, 02 Mar 2026 10:00:00 +0000" "=?utf-8?q?caf=C3=A9?= report" '
            '(("Bob Example" NIL "bob" "example.test"))') in out
    assert '"<m1@example.test>")' in out
    out = d.cmd("b FETCH 1 BODYSTRUCTURE")
    assert '("TEXT" "PLAIN" ("CHARSET" "utf-8") NIL NIL "7BIT" 39 2' in out
    assert '("APPLICATION" "PDF" ("NAME" "r.pdf") NIL NIL "BASE64" 12 NIL ("ATTACHMENT" ("FILENAME" "r.pdf"))' in out
    assert '"MIXED" ("BOUNDARY" "b1")' in out
    out = d.cmd("c FETCH 1 (BODY.PEEK[1] BODY.PEEK[2.MIME] BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    assert "BODY[1] {39}\r\nHello Alice,\r\nthe numbers are attached. BODY[2.MIME]" in out
    assert "BODY[2.MIME] {" in out and "Content-Transfer-Encoding: base64\r\n\r\n" in out
    assert "BODY[HEADER.FIELDS (SUBJECT)] {" in out and "Subject: =?utf-8?q?caf=C3=A9?= report\r\n\r\n" in out
    assert "\\Seen" not in out
    out = d.cmd("d FETCH 1 BODY.PEEK[]<0.4>")
    assert "BODY[]<0> {4}\r\nFrom" in out
    out = d.cmd("e FETCH 1 (BODY[TEXT])")
    assert "BODY[TEXT] {" in out and "FLAGS (\\Seen \\Recent)" in out
    assert "\\Seen" in env.box.folder("INBOX").sync()[0].flags
    out = d.cmd("f FETCH 1 (RFC822.HEADER BODY)")
    assert "RFC822.HEADER {" in out and 'BODY (("TEXT" "PLAIN"' in out
    out = d.cmd("g FETCH 1 FAST")
    assert "FLAGS" in out and "RFC822.SIZE" in out
    assert "h BAD" in d.cmd("h FETCH 1 BODY[NOPE]")
    assert "i BAD" in d.cmd("i FETCH 5 FLAGS")
    assert "j BAD" in d.cmd("j FETCH x FLAGS")


def test_uid_fetch_includes_uid_and_uses_uids(env) -> None:
    deliver_new(env.box.root, SIMPLE)
    deliver_new(env.box.root, SIMPLE)
    d = logged_in(env)
    d.cmd("a STORE 1 +FLAGS (\\Deleted)")
    d.cmd("b EXPUNGE")
    out = d.cmd("c UID FETCH 2 FLAGS")
    assert "* 1 FETCH (UID 2 FLAGS" in out
    assert "* " not in d.cmd("d UID FETCH 1 FLAGS").replace("d OK", "")
    assert "* 1 FETCH (UID 2" in d.cmd("e UID FETCH 1:* FLAGS")


# -- STORE / SEARCH / EXPUNGE / COPY / MOVE -------------------------------------


def test_store_flags_persist(env) -> None:
    deliver_new(env.box.root, SIMPLE)
    d = logged_in(env)
    assert "FLAGS (\\Flagged \\Seen \\Recent)" in d.cmd("a STORE 1 +FLAGS (\\Seen \\Flagged)")
    assert "FETCH" not in d.cmd("b STORE 1 -FLAGS.SILENT (\\Flagged)")
    out = d.cmd("c STORE 1 FLAGS (\\Answered $Label1)")
    # A new keyword: the client is told the new FLAGS (RFC 3501 7.2.6), then the FETCH.
    assert out.index("* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft $Label1)") < out.index("FETCH")
    assert "* 1 FETCH (FLAGS (\\Answered \\Recent $Label1))" in out
    assert "d BAD" in d.cmd("d STORE 1 +FLAGS (\\Bogus)")
    assert "e BAD" in d.cmd("e STORE 1 +SOMETHING (\\Seen)")
    assert "f BAD" in d.cmd('f STORE 1 +FLAGS ("quoted")')
    (m,) = env.box.folder("INBOX").sync()
    assert m.flags == {"\\Answered"} and m.filename.endswith(":2,Ra")
    assert (env.box.root / "dovecot-keywords").read_text() == "0 $Label1\n"
    d2 = logged_in(env)
    assert "FLAGS (\\Answered $Label1)" in d2.cmd("g FETCH 1 FLAGS")
    assert "* SEARCH 1" in d2.cmd("h SEARCH KEYWORD $label1")
    assert "* SEARCH\r\n" in d2.cmd("i SEARCH UNKEYWORD $Label1")
    assert "FLAGS (\\Answered)" in d2.cmd("j STORE 1 -FLAGS ($Label1)")


def test_keywords_follow_copies_into_another_folder(env) -> None:
    deliver_new(env.box.root, SIMPLE)
    d = logged_in(env)
    d.cmd("a STORE 1 +FLAGS ($Other $Junk)")
    d.cmd("b COPY 1 Junk")
    d.cmd("c SELECT Junk")
    assert "FLAGS ($Junk $Other)" in d.cmd("d FETCH 1 FLAGS")


def test_other_sessions_see_flag_changes_and_expunges(env) -> None:
    deliver_new(env.box.root, SIMPLE)
    deliver_new(env.box.root, SIMPLE)
    a = logged_in(env)
    b = logged_in(env)
    a.cmd("a1 STORE 2 +FLAGS (\\Deleted)")
    out = b.cmd("b1 NOOP")
    assert "* 2 FETCH (UID 2 FLAGS (\\Deleted))" in out
    a.cmd("a2 EXPUNGE")
    out = b.cmd("b2 FETCH 1:* FLAGS")
    assert "EXPUNGE" not in out  # RFC 3501 7.4.1: not during FETCH
    assert "* 2 EXPUNGE" in b.cmd("b3 NOOP")


def test_search(env) -> None:
    env.box.folder("INBOX").append(maildir.to_crlf(SIMPLE), {"\\Seen"}, parse_datetime("01-Feb-2026 12:00:00 +0000"))
    env.box.folder("INBOX").append(maildir.to_crlf(MULTIPART), set(), parse_datetime("05-Mar-2026 12:00:00 +0000"))
    d = logged_in(env)

    def search(q: str) -> list[int]:
        out = d.cmd(f"s SEARCH {q}")
        line = next(li for li in out.split("\r\n") if li.startswith("* SEARCH"))
        return [int(x) for x in line.split()[2:]]

    assert search("ALL") == [1, 2]
    assert search("UNSEEN") == [2]
    assert search("SEEN") == [1]
    assert search("FROM bob") == [2]
    assert search('SUBJECT "café"') == [2]  # encoded-word decoded
    assert search("TO alice") == [1, 2]
    assert search("BODY pizza") == [1]
    assert search("TEXT numbers") == [2]
    assert search("TEXT carol") == [1]
    assert search("SINCE 1-Mar-2026") == [2]
    assert search("BEFORE 1-Mar-2026") == [1]
    assert search("ON 5-Mar-2026") == [2]
    assert search("SENTON 2-Mar-2026") == [2]
    assert search("LARGER 200") == [2]
    assert search("SMALLER 200") == [1]
    assert search("NOT SEEN") == [2]
    assert search("OR FROM carol FROM bob") == [1, 2]
    assert search("(FROM bob SEEN)") == []
    assert search("2:*") == [2]
    assert search("UID 1") == [1]
    assert search("FLAGGED") == [] and search("DELETED") == []
    assert search("CHARSET UTF-8 FROM carol") == [1]
    assert "u OK" in d.cmd("u UID SEARCH UID 2") and "* SEARCH 2" in d.cmd("v UID SEARCH FROM bob")
    assert "w BAD" in d.cmd("w SEARCH FROB")
    assert "x BAD" in d.cmd("x SEARCH SINCE yesterday")
    assert "y NO [BADCHARSET" in d.cmd("y SEARCH CHARSET KOI8-R ALL")


def test_expunge_close_and_uid_expunge(env) -> None:
    for _ in range(4):
        deliver_new(env.box.root, SIMPLE)
    d = logged_in(env)
    d.cmd("a STORE 1:3 +FLAGS.SILENT (\\Deleted)")
    out = d.cmd("b UID EXPUNGE 2")
    assert out.startswith("* 2 EXPUNGE\r\nb OK")
    out = d.cmd("c EXPUNGE")
    assert "* 2 EXPUNGE\r\n* 1 EXPUNGE" in out
    assert [m.uid for m in env.box.folder("INBOX").sync()] == [4]
    d.cmd("d STORE 1 +FLAGS (\\Deleted)")
    assert "e OK" in d.cmd("e CLOSE")
    assert env.box.folder("INBOX").sync() == []
    assert d.session.state == "AUTHENTICATED"


def test_copy_and_move_to_trash(env) -> None:
    deliver_new(env.box.root, SIMPLE)
    deliver_new(env.box.root, MULTIPART)
    d = logged_in(env)
    trash_validity = env.box.folder("Trash").sync() or env.box.folder("Trash").uidvalidity
    out = d.cmd("a COPY 1 Sent")
    assert re.search(r"a OK \[COPYUID \d+ 1 1\] COPY completed", out)
    assert "b NO [TRYCREATE]" in d.cmd("b COPY 1 Nowhere")
    out = d.cmd("c MOVE 1:2 Trash")
    assert re.search(r"\* OK \[COPYUID \d+ 1:2 1:2\]", out)
    assert "* 2 EXPUNGE\r\n* 1 EXPUNGE" in out
    assert env.box.folder("INBOX").sync() == []
    assert len(env.box.folder("Trash").sync()) == 2
    assert trash_validity is not None
    d.cmd("d SELECT Trash")
    out = d.cmd("e UID MOVE 2 INBOX")
    assert "* 2 EXPUNGE" in out and "e OK" in out


def test_append(env) -> None:
    d = logged_in(env)
    msg = maildir.to_crlf(SIMPLE)
    d.send(f'a APPEND Drafts (\\Draft \\Seen) " 7-Mar-2026 09:30:00 +0100" {{{len(msg)}}}\r\n')
    assert d.out == b"+ Ready for literal data\r\n"
    out = d.send(msg + b"\r\n")
    assert re.search(r"a OK \[APPENDUID \d+ 1\] APPEND completed", out)
    (m,) = env.box.folder("Drafts").sync()
    assert m.flags == {"\\Draft", "\\Seen"}
    assert env.box.folder("Drafts").read(m) == SIMPLE
    assert env.box.folder("Drafts").internal_date(m) == parse_datetime("07-Mar-2026 08:30:00 +0000")
    out = d.send(f"b APPEND INBOX {{{len(msg)}+}}\r\n".encode() + msg + b"\r\n")
    assert "* 1 EXISTS" in out and "b OK [APPENDUID" in out
    assert "c NO [TRYCREATE]" in d.send(b"c APPEND Nowhere {1+}\r\nx\r\n")


def test_idle_sees_new_mail(env) -> None:
    d = logged_in(env)
    assert d.send("i IDLE\r\n") == "+ idling\r\n"
    assert d.session.poll_interval is not None
    d.run(d.session.poll())
    assert d.out == b"+ idling\r\n"  # nothing new yet
    deliver_new(env.box.root, SIMPLE)
    d.out.clear()
    d.run(d.session.poll())
    assert d.out == b"* 1 EXISTS\r\n* 1 RECENT\r\n"
    assert d.send("DONE\r\n") == "i OK IDLE terminated\r\n"
    assert d.session.poll_interval is None


def test_logout(env) -> None:
    d = logged_in(env)
    out = d.cmd("z LOGOUT")
    assert out.startswith("* BYE") and "z OK LOGOUT" in out and d.closed


def test_sections_of_nested_message() -> None:
    inner = b"Subject: inner\r\n\r\ninner body\r\n"
    outer = (b'Content-Type: multipart/mixed; boundary="x"\r\n\r\n--x\r\nContent-Type: text/plain\r\n\r\nA\r\n'
             b"--x\r\nContent-Type: message/rfc822\r\n\r\n" + inner + b"--x--\r\n")
    tree = parse(outer)
    assert section_bytes(tree, outer, parse_section("2")) == inner[:-2]  # the CRLF belongs to the boundary
    assert section_bytes(tree, outer, parse_section("2.HEADER")) == b"Subject: inner\r\n\r\n"
    assert section_bytes(tree, outer, parse_section("2.1")) == b"inner body"
    assert section_bytes(tree, outer, parse_section("1")) == b"A"
    assert section_bytes(tree, outer, parse_section("3")) is None
    assert parse_section("0") is None and parse_section("HEADER.FIELDS") is None


# -- hostile input never crashes the session ------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_WORDS = st.sampled_from([
    "a", "UID", "FETCH", "STORE", "SEARCH", "COPY", "MOVE", "SELECT", "LIST", "APPEND", "IDLE", "DONE",
    "1", "1:*", "*", "0", "2,4:5", "(", ")", "[", "]", "BODY[", "BODY.PEEK[1.2.MIME]<0.5>", "{3}", "{2+}",
    '"x"', "\\Seen", "+FLAGS", "FLAGS.SILENT", "INBOX", "Trash", "OR", "NOT", "SINCE", "1-Jan-2026", "\r\n", " ",
    "BODYSTRUCTURE", "ENVELOPE", "HEADER.FIELDS", "(FROM)", "NIL", "\x00", "\xff", "CHARSET", "EXPUNGE",
])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chunks=st.lists(st.one_of(st.binary(max_size=40), _WORDS.map(str.encode)), max_size=30))
def test_random_input_never_raises(env, chunks: list[bytes]) -> None:
    if not env.box.folder("INBOX").sync():
        deliver_new(env.box.root, MULTIPART)
        deliver_new(env.box.root, SIMPLE)
    d = logged_in(env)
    for chunk in chunks:
        d.send(chunk)
    d.send(b"\r\nz NOOP\r\n")
    d.session.connection_lost()


def test_append_and_copy_over_quota_are_refused(tmp_path: Path) -> None:
    config = parse_config(
        f'[server]\ndata_dir = "{tmp_path}"\n[[domain]]\nname = "example.test"\nmailboxes = ["alice"]\nquota = "150B"\n'
    )
    users = Users(config, hasher=FAST)
    users.set_password(ALICE, "pw")
    box = users.mailbox(ALICE).ensure()
    deliver_new(box.root, SIMPLE)  # 78 bytes stored
    s = ImapSession(hostname="h", users=users, throttle=AuthThrottle(), peer=PeerInfo("127.0.0.1", 1, True),
                    tls_available=True, emit=lambda *a, **k: None)
    d = Driver(s, users)
    d.cmd(f"a LOGIN {ALICE} pw")
    d.cmd("b SELECT INBOX")
    assert "c NO [OVERQUOTA]" in d.cmd("c COPY 1 Sent")
    assert "d NO [OVERQUOTA]" in d.send(b"d APPEND INBOX {100+}\r\n" + b"x" * 100 + b"\r\n")
    assert "e OK [APPENDUID" in d.send(b"e APPEND INBOX {10+}\r\n" + b"y" * 10 + b"\r\n")


def test_idle_on_a_folder_deleted_elsewhere_says_bye_and_closes(env) -> None:
    env.box.create_folder("Work")
    d = logged_in(env, select="Work")
    d.send("i IDLE\r\n")
    env.box.delete_folder("Work")
    d.out.clear()
    d.run(d.session.poll())
    assert d.out == b"* BYE the selected mailbox was deleted\r\n" and d.closed


def test_hostile_tags_are_not_echoed(env) -> None:
    d = env.session()
    d.session.reader.max_literal = 10
    assert d.send("x\x01y{99}\r\n").startswith("* ")
    assert d.send('"quoted" NOOP\r\n') == "* BAD invalid tag\r\n"
    assert d.send("a+b NOOP\r\n") == "* BAD invalid tag\r\n"
    assert d.send("abc\r\n") == "abc BAD missing command\r\n"


# -- file work goes to the adapter ---------------------------------------------


def split(events) -> tuple[bytes, list[FileWork]]:
    """Output bytes and the FileWork events (what the adapter would run) of one step."""
    out = b"".join(e.data for e in events if isinstance(e, Send))
    return out, [e for e in events if isinstance(e, FileWork)]


def test_file_work_is_handed_out_one_command_at_a_time_in_order(env) -> None:
    """Every Maildir call leaves the session as FileWork; pipelined commands wait their turn."""
    deliver_new(env.box.root, SIMPLE)
    d = logged_in(env, select=None)
    s = d.session
    out, work = split(s.receive(b"a SELECT INBOX\r\nb FETCH 1 (BODY[])\r\nc NOOP\r\nd CAPABILITY\r\n"))
    seen = b""
    steps = 0
    while work:
        assert len(work) == 1  # the session waits for one result before anything else
        seen += out
        assert s.receive(b"") == [] and s.poll() == []  # waiting: input is only buffered
        out, work = split(s.file_done(work[0].call(*work[0].args)))
        steps += 1
    seen += out
    assert steps >= 4  # folder, sync, keywords, message read, ...
    tags = [line.split(b" ", 1)[0] for line in seen.split(b"\r\n") if line[:1] in (b"a", b"b", b"c", b"d")]
    assert tags == [b"a", b"b", b"c", b"d"]
    assert b"Pizza at noon?" in seen
    assert b"\\Seen" in seen  # the FETCH set \Seen, in the executor


def test_commands_without_files_need_no_file_work(env) -> None:
    d = env.session()
    out, work = split(d.session.receive(b"a CAPABILITY\r\nb NOOP\r\nc ID NIL\r\n"))
    assert work == [] and out.count(b" OK ") == 3


def test_failed_file_work_answers_the_command_and_the_next_one_runs(env) -> None:
    deliver_new(env.box.root, SIMPLE)
    d = logged_in(env)
    s = d.session
    out, work = split(s.receive(b"a FETCH 1 (BODY[])\r\nb NOOP\r\n"))
    while work:
        fails = work[0].call.__name__ == "_message_files"
        if fails:
            events = s.file_done(None, OSError("disk on fire"))
        else:
            events = s.file_done(work[0].call(*work[0].args))
        step_out, work = split(events)
        out += step_out
    assert b"a NO [SERVERBUG]" in out and b"b OK NOOP completed" in out
    assert any("store error: disk on fire" in e for e in env.events)


def test_connection_lost_while_file_work_runs(env) -> None:
    d = logged_in(env)
    s = d.session
    _, work = split(s.receive(b"a NOOP\r\n"))
    assert len(work) == 1
    s.connection_lost()  # the adapter was cancelled: nobody resumes the command
    assert s.receive(b"b NOOP\r\n") == []


def test_idle_poll_is_file_work(env) -> None:
    d = logged_in(env)
    d.send("i IDLE\r\n")
    deliver_new(env.box.root, SIMPLE)
    out, work = split(d.session.poll())
    assert out == b"" and len(work) == 1
    out, work = split(d.session.file_done(work[0].call(*work[0].args)))
    assert out == b"* 1 EXISTS\r\n* 1 RECENT\r\n" and work == []


def test_large_fetch_is_sent_in_batches(env, monkeypatch) -> None:
    for _ in range(5):
        deliver_new(env.box.root, SIMPLE)
    d = logged_in(env)
    monkeypatch.setattr(imap_session, "FETCH_BATCH", 2)
    events: list = []
    pending = d.session.receive(b"a FETCH 1:* (BODY.PEEK[])\r\n")
    while pending:
        events += pending
        work = [e for e in pending if isinstance(e, FileWork)]
        pending = d.session.file_done(work[0].call(*work[0].args)) if work else []
    sends = [e.data for e in events if isinstance(e, Send)]
    assert len([e for e in events if isinstance(e, FileWork)]) == 4  # sync, then batches of 2, 2, 1
    assert len(sends) == 4 and sends[-1] == b"a OK FETCH completed\r\n"
    assert b"".join(sends).count(b"Pizza at noon?") == 5
