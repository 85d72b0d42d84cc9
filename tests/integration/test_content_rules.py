"""Content rules over real SMTP: a node with an "inbound" content profile, a client
outside relay_networks (127.0.0.9) sending Japanese mail with smtplib; what lands in the
mailboxes, the queue (quarantine holds), the event log and the history; and
`kanmon rules test` on the same messages, as a new user would try it."""

from __future__ import annotations

import email
import json
import smtplib
import time

import pytest
from click.testing import CliRunner

from kanmon.cli import main
from kanmon.clock import ManualClock
from kanmon.config import parse_config
from kanmon.records.query import search_events, search_history
from kanmon.records.trace import trace
from tests.support.kanmon_node import TEST_DEFAULT_PROFILE, RunningNode, free_port, maildir_messages, wait_for
from tests.support.mailsamples import attachment, encrypted_zip, japanese_message, zip_with_names

OUTSIDE = "127.0.0.9"

CONFIG = """
[server]
hostname = "mx1.example.test"
data_dir = "{data_dir}"
[smtp]
listen = ["127.0.0.1:{port}"]
relay_networks = ["127.0.0.1/32"]
greet_pause = "0s"  # the pregreet wait has its own tests (test_hostile_input)
min_free_disk = "1MB"
[[domain]]
name = "corp.example"
mailboxes = ["tanaka", "suzuki", "review", "audit"]
aliases = {{ reviewers = ["review", "audit"] }}

[[content_profile]]
name = "inbound"
tag = "[要確認]"

[[content_profile.rule]]
name = "invoice-spam"
subject = ["請求書", "invoice"]
from_outside = true
action = "quarantine"

[[content_profile.rule]]
name = "casino"
body = {{ regex = "casino|カジノ" }}
action = "reject"
reply = "Gambling offers are not accepted here"

[[content_profile.rule]]
name = "newsletter"
header = {{ List-Unsubscribe = {{ regex = "." }} }}
action = "tag"
add_header = "X-Kanmon-Newsletter: yes"

[[content_profile.rule]]
name = "junk"
subject = ["unsubscribe-me"]
action = "discard"

[[content_profile.rule]]
name = "to-review"
subject = ["見積"]
action = "redirect"
address = "review@corp.example"

[[content_profile.rule]]
name = "audit-copy"
subject = ["契約"]
action = "bcc"
address = "audit@corp.example"

[[content_profile.rule]]
name = "watch"
body = ["パスワード"]
action = "reject"
log_only = true
""" + TEST_DEFAULT_PROFILE


@pytest.fixture
def node(tmp_path):
    port = free_port()
    config_file = tmp_path / "kanmon.toml"
    config_file.write_text(CONFIG.format(data_dir=tmp_path / "data", port=port))
    n = RunningNode(parse_config(config_file.read_text()))
    n.config_file = config_file
    n.start()
    yield n
    n.stop()


def send(node, msg: bytes, rcpts=("tanaka@corp.example",), sender="katou@partner.example"):
    with smtplib.SMTP(node.host, node.port, source_address=(OUTSIDE, 0), timeout=10) as s:
        s.ehlo("client.partner.example")
        return s.sendmail(sender, list(rcpts), msg)


def queue_id_of(node, subject_word: str) -> str:
    node.flush()
    rows = [r for r in search_history(node.data_dir) if subject_word in r.subject]
    assert rows, f"no history row for {subject_word!r}"
    return rows[-1].queue_id


def events_of(node, queue_id: str) -> list[str]:
    node.flush()
    return [e.text for e in search_events(node.data_dir, queue_id=queue_id)]


def test_iso2022jp_invoice_with_encrypted_zip_is_quarantined_with_the_rule_named(node):
    msg = japanese_message(subject="【至急】請求書のご確認",
                           attachments=[attachment(encrypted_zip({"請求書.xlsx": b"data"}), "請求書.zip")])
    send(node, msg)
    node.wait_idle()
    assert maildir_messages(node.data_dir, "tanaka@corp.example") == []
    qid = queue_id_of(node, "請求書")
    lines = events_of(node, qid)
    assert any("content rule invoice-spam matched: quarantine" in t for t in lines), lines
    assert any("quarantined (admin): content rule invoice-spam" in t for t in lines), lines
    row = next(r for r in search_history(node.data_dir) if r.queue_id == qid)
    assert row.disposition == "Quarantine" and row.classification == "Policy"
    assert (node.data_dir / "quarantine" / f"{qid}.msg").exists()
    assert not list((node.data_dir / "spool").rglob(f"*{qid}*"))  # not in the queue
    # "Where is the mail from katou?": the trace finds it by the sender's address, held.
    assert [t.queue_id for t in trace(node.data_dir, "katou@partner.example")] == [qid]


def cli(node, *args):
    return CliRunner().invoke(main, [*args, "-c", str(node.config_file)])


def test_quarantine_list_show_release_and_trace_the_whole_path(node):
    send(node, japanese_message(subject="【至急】請求書のご確認"))
    node.wait_idle()
    qid = queue_id_of(node, "請求書")
    r = cli(node, "quarantine", "list")
    assert r.exit_code == 0, r.output
    assert qid in r.output and "subject: 【至急】請求書のご確認" in r.output and "why: content rule invoice-spam" in r.output
    listed = json.loads(cli(node, "quarantine", "list", "--json", "--reason", "invoice").output)["items"]
    assert [i["id"] for i in listed] == [qid] and listed[0]["kind"] == "admin" and listed[0]["check"] == "content"
    assert json.loads(cli(node, "quarantine", "list", "--json", "--kind", "spam").output)["items"] == []
    r = cli(node, "quarantine", "show", qid)
    assert f"kanmon quarantine release {qid}" in r.output and "from: katou@partner.example" in r.output
    assert "\tby mx1.example.test (kanmon)" in r.output  # the folded Received: keeps its tab, not "\\t"
    r = cli(node, "trace", qid)
    assert "in the quarantine" in r.output, r.output
    r = cli(node, "quarantine", "release", qid)
    assert r.exit_code == 0 and f"{qid}: released" in r.output, r.output
    node.wait_idle()
    (delivered,) = maildir_messages(node.data_dir, "tanaka@corp.example")
    assert b"Message-ID: <sample@partner.example>" in delivered
    assert json.loads(cli(node, "quarantine", "list", "--json").output)["items"] == []
    node.flush()
    r = cli(node, "trace", qid)
    assert "released from quarantine by kanmon quarantine release" in r.output and "delivered to tanaka@corp.example" in r.output, r.output


def test_quarantine_release_to_another_recipient_and_delete(node):
    send(node, japanese_message(subject="請求書 1"))
    send(node, japanese_message(subject="請求書 2"))
    node.wait_idle()
    ids = [i["id"] for i in json.loads(cli(node, "quarantine", "list", "--json").output)["items"]]
    assert len(ids) == 2
    # A local address that is no mailbox or alias: refused, nothing released (a bounce
    # would go to the quarantined message's outside sender).
    r = cli(node, "quarantine", "release", ids[0], "--to", "reveiw@corp.example")
    assert r.exit_code == 1 and "--to reveiw@corp.example: not a mailbox or alias of a local domain" in r.output, r.output
    assert len(json.loads(cli(node, "quarantine", "list", "--json").output)["items"]) == 2
    r = cli(node, "quarantine", "release", ids[0], "--to", "reviewers@corp.example")  # an alias: its mailboxes
    assert r.exit_code == 0, r.output
    assert any("released from quarantine by kanmon quarantine release to review@corp.example, audit@corp.example" in t
               for t in events_of(node, ids[0])), events_of(node, ids[0])
    r = cli(node, "quarantine", "delete", ids[1])
    assert r.exit_code == 0 and f"{ids[1]}: deleted" in r.output
    r = cli(node, "quarantine", "delete", ids[1])
    assert r.exit_code == 1 and "not in the quarantine" in r.output
    node.wait_idle()
    assert len(maildir_messages(node.data_dir, "review@corp.example")) == 1
    assert len(maildir_messages(node.data_dir, "audit@corp.example")) == 1
    assert maildir_messages(node.data_dir, "tanaka@corp.example") == []
    assert "deleted from the quarantine" in cli(node, "trace", ids[1]).output


def test_quarantine_commands_work_on_a_stopped_node(node):
    send(node, japanese_message(subject="請求書"))
    node.wait_idle()
    node.stop()
    (item,) = json.loads(cli(node, "quarantine", "list", "--json").output)["items"]
    r = cli(node, "quarantine", "release", item["id"])
    assert r.exit_code == 0, r.output
    with RunningNode(parse_config(node.config_file.read_text())) as again:
        again.wait_idle()
        assert len(maildir_messages(again.data_dir, "tanaka@corp.example")) == 1


def test_reject_answers_550_with_the_configured_text(node):
    with pytest.raises(smtplib.SMTPDataError) as e:
        send(node, japanese_message(subject="ご案内", body="オンラインカジノのご案内"))
    assert e.value.smtp_code == 550 and b"5.7.1 Gambling offers are not accepted here" in e.value.smtp_error
    node.wait_idle()
    assert maildir_messages(node.data_dir, "tanaka@corp.example") == []


def test_tag_prefixes_the_encoded_subject_and_adds_the_header(node):
    msg = japanese_message(subject="今月のお知らせ").replace(b"\r\n\r\n", b"\r\nList-Unsubscribe: <mailto:u@x>\r\n\r\n", 1)
    send(node, msg)
    node.wait_idle()
    (stored,) = maildir_messages(node.data_dir, "tanaka@corp.example")
    parsed = email.message_from_bytes(stored)
    subject = str(email.header.make_header(email.header.decode_header(parsed["Subject"])))
    assert subject.startswith("[要確認]") and "今月のお知らせ" in subject
    assert parsed["X-Kanmon-Newsletter"] == "yes"
    qid = queue_id_of(node, "今月のお知らせ")
    row = next(r for r in search_history(node.data_dir) if r.queue_id == qid)
    assert row.disposition == "Tag"


def test_discard_answers_250_and_keeps_nothing_but_the_trace(node):
    send(node, japanese_message(subject="unsubscribe-me now"))
    node.wait_idle()
    assert maildir_messages(node.data_dir, "tanaka@corp.example") == []
    qid = queue_id_of(node, "unsubscribe-me")
    assert any("discarded: content rule junk" in t for t in events_of(node, qid))
    assert not list((node.data_dir / "spool").rglob(f"*{qid}*"))
    assert [t.queue_id for t in trace(node.data_dir, "katou@partner.example")] == [qid]  # found by its sender


def test_redirect_and_bcc(node):
    send(node, japanese_message(subject="見積のご依頼"))
    send(node, japanese_message(subject="契約書の件"))
    node.wait_idle()
    review = maildir_messages(node.data_dir, "review@corp.example")
    audit = maildir_messages(node.data_dir, "audit@corp.example")
    tanaka = maildir_messages(node.data_dir, "tanaka@corp.example")
    assert len(review) == 1 and len(audit) == 1 and len(tanaka) == 1  # 見積 redirected away; 契約 to both


def test_log_only_rule_is_in_the_trace_and_changes_nothing(node):
    send(node, japanese_message(subject="ご連絡", body="パスワードは別送します"))
    node.wait_idle()
    assert len(maildir_messages(node.data_dir, "tanaka@corp.example")) == 1
    qid = queue_id_of(node, "ご連絡")
    assert any("content rule watch matched (log only: would reject)" in t for t in events_of(node, qid))


def test_mail_from_relay_networks_is_not_inbound(node):
    with smtplib.SMTP(node.host, node.port, timeout=10) as s:  # 127.0.0.1: relay_networks
        s.sendmail("tanaka@corp.example", ["suzuki@corp.example"], japanese_message(subject="請求書の送付"))
    node.wait_idle()
    assert len(maildir_messages(node.data_dir, "suzuki@corp.example")) == 1


def test_rules_test_cli_shows_the_rules_and_the_outcome(node, tmp_path):
    eml = tmp_path / "invoice.eml"
    eml.write_bytes(japanese_message(subject="【至急】請求書のご確認",
                                     attachments=[attachment(encrypted_zip({"請求書.xlsx": b"x"}), "請求書.zip")]))
    r = CliRunner().invoke(main, ["rules", "test", str(eml), "-c", str(node.config_file)])
    assert r.exit_code == 1, r.output
    assert "profile: inbound" in r.output and "subject: 【至急】請求書のご確認" in r.output
    assert "attachment: 請求書.xlsx in 請求書.zip: application/octet-stream [encrypted]" in r.output
    assert "matched: invoice-spam (quarantine): from outside; subject contains '請求書'" in r.output
    assert "outcome: quarantine by invoice-spam" in r.output
    r = CliRunner().invoke(main, ["rules", "test", str(eml), "--inside", "--profile", "inbound", "--json", "-c", str(node.config_file)])
    out = json.loads(r.output)
    assert out["outcome"]["action"] == "quarantine" and out["outcome"]["rule"] == "encrypted_archive"
    clean = tmp_path / "clean.eml"
    clean.write_bytes(japanese_message(subject="こんにちは", body="ごきげんよう"))
    r = CliRunner().invoke(main, ["rules", "test", str(clean), "-c", str(node.config_file)])
    assert r.exit_code == 0 and "no rule matched" in r.output and "outcome: accept" in r.output


def test_rules_test_escapes_control_characters(node, tmp_path):
    eml = tmp_path / "x.eml"
    eml.write_bytes(b"From: a@b.example\r\nTo: tanaka@corp.example\r\nSubject: =?UTF-8?B?G10wO293bmVkBw==?=\r\n\r\nhi\r\n")
    r = CliRunner().invoke(main, ["rules", "test", str(eml), "-c", str(node.config_file)])
    assert "\x1b" not in r.output and "\\x1b]0;owned\\x07" in r.output


def test_rules_test_shows_zip_member_names_as_windows_wrote_them_and_escapes_hostile_ones(node, tmp_path):
    # No UTF-8 flag on any name: CP932 as Windows Explorer writes, nested; then a name
    # whose UTF-8 carries a C1 CSI and a right-to-left override.
    inner = zip_with_names({"請求書.xlsx".encode("utf-8"): b"x"})
    win = zip_with_names({"見積書.zip".encode("cp932"): inner, "\x9b31m\u202efdp.exe".encode("utf-8"): b"MZ"})
    eml = tmp_path / "win.eml"
    eml.write_bytes(japanese_message(subject="ご連絡", attachments=[attachment(win, "win.zip")]))
    r = CliRunner().invoke(main, ["rules", "test", str(eml), "-c", str(node.config_file)])
    assert "attachment: 見積書.zip in win.zip: application/zip [archive]" in r.output, r.output
    assert "attachment: 請求書.xlsx in 見積書.zip: application/octet-stream" in r.output
    assert "attachment: \\x9b31m\\u202efdp.exe in win.zip: application/x-msdownload [executable]" in r.output
    assert "\x9b" not in r.output and "\u202e" not in r.output
    r = CliRunner().invoke(main, ["rules", "test", str(eml), "--json", "-c", str(node.config_file)])
    assert "\x9b" not in r.output and "\u202e" not in r.output
    assert {"\x9b31m\u202efdp.exe", "見積書.zip", "請求書.xlsx"} <= {a["name"] for a in json.loads(r.output)["attachments"]}


SPAM_PROFILE = """
[quarantine]
keep = "7d"
digest = "0 8 * * *"

[[content_profile]]
name = "inbound"
quarantine_score = 5.0

[[content_profile.rule]]
name = "pills"
subject = ["pills"]
action = "score"
score = 6.0
""" + TEST_DEFAULT_PROFILE

# 2026-03-02 07:00 local time: the digest (08:00) is an hour away.
T0 = time.mktime((2026, 3, 2, 7, 0, 0, 0, 0, -1))


@pytest.fixture
def spam_node(tmp_path):
    port = free_port()
    config_file = tmp_path / "kanmon.toml"
    config_file.write_text(CONFIG.split("[[content_profile]]")[0].format(data_dir=tmp_path / "data", port=port) + SPAM_PROFILE)
    n = RunningNode(parse_config(config_file.read_text()), clock=ManualClock(T0))
    n.config_file = config_file
    n.start()
    yield n
    n.stop()


def test_spam_goes_to_the_users_quarantine_and_the_digest_lists_it(spam_node):
    node = spam_node
    send(node, japanese_message(subject="cheap pills"), rcpts=["tanaka@corp.example", "suzuki@corp.example"])
    node.wait_idle()
    (item,) = json.loads(cli(node, "quarantine", "list", "--json", "--kind", "spam").output)["items"]
    assert item["classification"] == "Spam" and item["score"] == 6.0
    node.advance(3600)  # 08:00: the digest
    wait_for(lambda: len(maildir_messages(node.data_dir, "tanaka@corp.example")) == 1, 10, "tanaka's digest")
    node.wait_idle()
    for rcpt in ("tanaka@corp.example", "suzuki@corp.example"):
        (digest,) = maildir_messages(node.data_dir, rcpt)
        assert b"Subject: Quarantine digest: 1 message held for you" in digest
        assert f"kanmon quarantine release {item['id']} --to {rcpt}".encode() in digest
        assert b"subject: cheap pills" in digest and b"Auto-Submitted: auto-generated" in digest
    r = cli(node, "quarantine", "digest", "--dry-run")
    assert "tanaka@corp.example: 1 message (dry run: not sent)" in r.output, r.output


def test_a_restart_between_digests_does_not_list_what_the_last_digest_mailed(spam_node):
    """The digest lists what arrived since the last one, across a restart of the node: its
    time is kept in <data_dir>/quarantine-digest.json (before, a restarted node listed the
    day before the restart again). A file that is not one is moved aside and said."""
    node = spam_node
    send(node, japanese_message(subject="cheap pills"))
    node.wait_idle()
    node.advance(3600)  # day 1, 08:00: the first digest
    wait_for(lambda: len(maildir_messages(node.data_dir, "tanaka@corp.example")) == 1, 10, "the first digest")
    node.wait_idle()
    kept = node.data_dir / "quarantine-digest.json"
    wait_for(lambda: kept.exists() and json.loads(kept.read_text()) == {"version": 1, "last": T0 + 3600}, 10,
             "the digest's time kept")  # written after the digest, in a thread
    assert kept.stat().st_mode & 0o777 == 0o600
    node.advance(4 * 3600)  # 12:00
    node.stop()

    restarted = RunningNode(parse_config(node.config_file.read_text()), clock=ManualClock(T0 + 5 * 3600))
    with restarted:
        send(restarted, japanese_message(subject="more pills"))
        restarted.wait_idle()
        restarted.advance(20 * 3600)  # day 2, 08:00: the second digest
        wait_for(lambda: len(maildir_messages(node.data_dir, "tanaka@corp.example")) == 2, 10, "the second digest")
        restarted.wait_idle()
    second = [m for m in maildir_messages(node.data_dir, "tanaka@corp.example") if b"subject: more pills" in m]
    assert len(second) == 1 and b"Quarantine digest: 1 message held for you" in second[0]
    assert b"subject: cheap pills" not in second[0]

    (node.data_dir / "quarantine-digest.json").write_text('{"version": 1, "last": "yesterday"}')
    again = RunningNode(parse_config(node.config_file.read_text()), clock=ManualClock(T0 + 30 * 3600))
    with again:
        wait_for(lambda: (node.data_dir / "quarantine-digest.json.bad").exists(), 10, "the file moved aside")

        def said() -> bool:
            again.flush()
            return any("quarantine-digest.json refused (last must be a time" in e.text
                       for e in search_events(node.data_dir, grep="quarantine digest"))

        wait_for(said, 10, "the error event")


def test_quarantined_messages_are_purged_after_keep(spam_node):
    node = spam_node
    send(node, japanese_message(subject="cheap pills"))
    node.wait_idle()
    (item,) = json.loads(cli(node, "quarantine", "list", "--json").output)["items"]
    node.advance(6 * 86400)
    node.wait_idle()
    assert [i["id"] for i in json.loads(cli(node, "quarantine", "list", "--json").output)["items"]] == [item["id"]]
    node.advance(86400 + 3600)  # past 7 days and the next hourly purge
    wait_for(lambda: not (node.data_dir / "quarantine" / f"{item['id']}.meta").exists(), 10, "the purge")

    def traced() -> bool:
        node.flush()  # the purge records its event just after the files go
        return "deleted from quarantine by retention" in cli(node, "trace", item["id"]).output

    wait_for(traced, 10, "the purge's event")


def test_a_put_interrupted_by_a_crash_is_removed_by_the_purge(spam_node):
    node = spam_node
    qdir = node.data_dir / "quarantine"
    qdir.mkdir(exist_ok=True)
    (qdir / "1M1JWJ19H4C562M.msg").write_bytes(b"half written")  # its .meta never came: never acknowledged
    (qdir / ".1M1JWJ19H4C563M.meta.tmp").write_bytes(b"{")
    node.advance(3600)
    wait_for(lambda: not (qdir / "1M1JWJ19H4C562M.msg").exists() and not (qdir / ".1M1JWJ19H4C563M.meta.tmp").exists(),
             10, "the orphans removed")
