"""Sieve at local delivery over real SMTP (smtplib) into a store node, with an SmtpSink as
the smarthost that receives what the scripts send: fileinto (existing, missing, :create),
discard, redirect (the envelope checked at the next hop), vacation once per sender and
never to <> or a list, a broken script keeps the message, a redirect loop is cut."""

from __future__ import annotations

import smtplib
from pathlib import Path

import pytest

from kanmon.clock import ManualClock
from kanmon.config import parse_config
from kanmon.store.maildir import Mailbox
from kanmon.store.sievescripts import ScriptStore, sieve_dir
from tests.integration.test_delivery_engine import NODE, events
from tests.support.kanmon_node import TEST_DEFAULT_PROFILE, RunningNode, free_port, maildir_messages
from tests.support.smtpsink import SmtpSink

ALICE = "alice@example.test"
CAROL = "carol@remote.example"


@pytest.fixture
def store(tmp_path: Path):
    port = free_port("127.0.0.7")
    with SmtpSink("127.0.0.7", port) as sink:
        text = NODE.format(
            data_dir=tmp_path / "data", host="127.0.0.1", port=free_port(), servers='"127.0.0.1:1"',
            corp_tls="none", out_tls="none", mx_port=25, smarthost=f'smarthost = ["127.0.0.7:{port}"]',
            dns="127.0.0.1:1", warn_after="4h", lifetime="3d",
        ) + TEST_DEFAULT_PROFILE
        node = RunningNode(parse_config(text), clock=ManualClock()).start()
        node.sink = sink
        try:
            yield node
        finally:
            node.stop()


def script(node: RunningNode, text: str, address: str = ALICE) -> None:
    store = ScriptStore(node.data_dir, address)
    store.put("main", text.encode())
    store.activate("main")


def send(node: RunningNode, mail_from: str, rcpts: list[str], head: str, body: str = "hello\r\n") -> None:
    with smtplib.SMTP(node.host, node.port, timeout=10) as s:
        assert s.sendmail(mail_from, rcpts, (head + "\r\n\r\n" + body).encode()) == {}


def folder_messages(node: RunningNode, address: str, folder: str) -> list[bytes]:
    local, _, domain = address.partition("@")
    base = Path(node.data_dir) / "mailboxes" / domain / local / ("." + folder)
    return [p.read_bytes() for sub in ("new", "cur") if (base / sub).is_dir() for p in sorted((base / sub).iterdir())]


def test_fileinto_existing_missing_and_create(store):
    Mailbox.for_address(store.data_dir, "example.test", "alice").ensure().create_folder("Reports")
    script(store, 'require ["fileinto", "mailbox"];\n'
                  'if header :contains "subject" "report" { fileinto "Reports"; }\n'
                  'elsif header :contains "subject" "lost" { fileinto "Nowhere"; }\n'
                  'elsif header :contains "subject" "new" { fileinto :create "Projects.New"; }\n')
    send(store, CAROL, [ALICE], "From: carol@remote.example\r\nSubject: Weekly report")
    send(store, CAROL, [ALICE], "From: carol@remote.example\r\nSubject: lost folder")
    send(store, CAROL, [ALICE], "From: carol@remote.example\r\nSubject: a new project")
    send(store, CAROL, [ALICE, "bob@example.test"], "From: carol@remote.example\r\nSubject: other")
    store.wait_idle()
    assert [b"Weekly report" in m for m in folder_messages(store, ALICE, "Reports")] == [True]
    inbox = maildir_messages(store.data_dir, ALICE)
    assert sorted(b"lost folder" in m for m in inbox) == [False, True] and len(inbox) == 2
    assert len(folder_messages(store, ALICE, "Projects.New")) == 1
    assert "Projects.New" in Mailbox.for_address(store.data_dir, "example.test", "alice").subscriptions()
    assert len(maildir_messages(store.data_dir, "bob@example.test")) == 1  # bob has no script
    texts = events(store)
    assert any("fileinto Nowhere: no such folder" in t for t in texts)
    assert any("created folder Projects.New" in t for t in texts)


def test_discard_and_a_broken_script_keeps(store):
    script(store, 'if header :contains "subject" "spam" { discard; }')
    send(store, CAROL, [ALICE], "From: carol@remote.example\r\nSubject: spam spam")
    send(store, CAROL, [ALICE], "From: carol@remote.example\r\nSubject: ham")
    store.wait_idle()
    assert [b"ham" in m for m in maildir_messages(store.data_dir, ALICE)] == [True]
    assert any("discarded by script main" in t for t in events(store))
    # A script damaged on disk behind the store's back: the message is kept, with an event.
    path = sieve_dir(store.data_dir, ALICE) / "scripts" / "main.sieve"
    path.write_bytes(b"if true {\n")
    send(store, CAROL, [ALICE], "From: carol@remote.example\r\nSubject: spam again")
    store.wait_idle()
    assert len(maildir_messages(store.data_dir, ALICE)) == 2
    assert any("does not compile" in t and "kept in INBOX" in t for t in events(store))


def test_redirect_keeps_the_envelope_right(store):
    script(store, 'redirect "dave@elsewhere.example";')
    send(store, CAROL, [ALICE], "From: carol@remote.example\r\nSubject: forward me")
    (m,) = store.sink.wait_for_messages(1)
    assert m.mail_from == CAROL and m.rcpts == ["dave@elsewhere.example"]
    assert m.data.startswith(b"Delivered-To: alice@example.test\r\n") and b"Subject: forward me" in m.data
    store.wait_idle()
    assert maildir_messages(store.data_dir, ALICE) == []  # redirect cancels the implicit keep


def test_redirect_copy_and_loop_is_cut(store):
    script(store, 'require "copy"; redirect :copy "bob@example.test";')
    script(store, 'redirect "alice@example.test";', "bob@example.test")
    send(store, CAROL, [ALICE], "From: carol@remote.example\r\nSubject: round and round")
    store.wait_idle()
    # alice keeps a copy and redirects to bob; bob redirects back to alice, whose second
    # delivery sees her own Delivered-To and keeps it instead of redirecting again.
    assert len(maildir_messages(store.data_dir, "bob@example.test")) == 0
    alice = maildir_messages(store.data_dir, ALICE)
    assert len(alice) == 2
    assert any("already went through this mailbox" in t for t in events(store))


def test_vacation_once_per_sender_never_to_null_sender_or_lists(store):
    script(store, 'require "vacation";\n'
                  'vacation :days 7 :subject "Out of office" "I am away until Monday.";\n')
    to = "To: Alice <alice@example.test>\r\n"
    send(store, "", [ALICE], to + "From: MAILER-DAEMON@remote.example\r\nSubject: bounce")
    send(store, "list-bounces@lists.example", [ALICE], to + "From: x@lists.example\r\nList-Id: <l.lists.example>\r\nSubject: l")
    send(store, "news@bulk.example", [ALICE], to + "From: news@bulk.example\r\nPrecedence: bulk\r\nSubject: b")
    send(store, CAROL, [ALICE], to + "From: carol@remote.example\r\nSubject: lunch?\r\nMessage-ID: <q1@remote.example>")
    send(store, CAROL, [ALICE], to + "From: carol@remote.example\r\nSubject: lunch again?")
    store.wait_idle()
    (reply,) = store.sink.wait_for_messages(1)
    store.wait_idle()
    assert len(store.sink.messages) == 1
    assert reply.mail_from == "" and reply.rcpts == [CAROL]
    head = reply.data.split(b"\r\n\r\n")[0]
    assert b"Auto-Submitted: auto-replied" in head and b"In-Reply-To: <q1@remote.example>" in head
    assert b"Subject: Out of office" in head and b"I am away until Monday." in reply.data
    assert len(maildir_messages(store.data_dir, ALICE)) == 5  # vacation keeps every message
    texts = events(store)
    assert any("no vacation reply to <>" in t for t in texts)
    assert any("list-id" in t for t in texts) and any("Precedence: bulk" in t for t in texts)
    assert any("answered within 7 days" in t for t in texts)


def test_managesieve_of_the_node_sets_the_script_delivery_runs(tmp_path):
    """The walkthrough: `kanmon serve`'s node with [managesieve]; a client uploads and
    activates a script over STARTTLS (the node's own certificate); the next message is filed."""
    import base64
    import ssl

    from kanmon.store.users import Users
    from tests.integration.test_managesieve import Client, literal

    sieve_port = free_port()
    text = NODE.format(
        data_dir=tmp_path / "data", host="127.0.0.1", port=free_port(), servers='"127.0.0.1:1"',
        corp_tls="none", out_tls="none", mx_port=25, smarthost="", dns="127.0.0.1:1", warn_after="4h",
        lifetime="3d",
    ) + TEST_DEFAULT_PROFILE + f'\n[managesieve]\nlisten = ["127.0.0.1:{sieve_port}"]\n'
    config = parse_config(text)
    Users(config).set_password(ALICE, "pw-alice")
    node = RunningNode(config, clock=ManualClock()).start()
    try:
        c = Client(sieve_port)
        caps, _ = c.response()
        assert b'"STARTTLS"' in caps
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE  # the node's self-signed certificate
        c.starttls(ctx)
        token = base64.b64encode(f"\0{ALICE}\0pw-alice".encode())
        assert c.command(b'AUTHENTICATE "PLAIN" "' + token + b'"')[1].startswith(b"OK")
        script_text = b'require ["fileinto", "mailbox"];\r\nfileinto :create "Filtered";\r\n'
        assert c.command(b'PUTSCRIPT "main" ' + literal(script_text))[1].startswith(b"OK")
        assert c.command(b'SETACTIVE "main"')[1].startswith(b"OK")
        c.command(b"LOGOUT")
        c.close()
        send(node, CAROL, [ALICE], "From: carol@remote.example\r\nSubject: filtered")
        node.wait_idle()
        assert len(folder_messages(node, ALICE, "Filtered")) == 1 and maildir_messages(node.data_dir, ALICE) == []
    finally:
        node.stop()
