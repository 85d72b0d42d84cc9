"""What the records report about refusals and senders: `kanmon stats` counts refused
recipients (not protocol errors), a recipient refused for its parameters is recorded
with its address, and `kanmon log history` tells the null sender from no sender."""

from __future__ import annotations

import json
import smtplib

import pytest
from click.testing import CliRunner

from kanmon.cli import main
from kanmon.clock import ManualClock
from kanmon.config import parse_config
from kanmon.records.query import search_events, search_history
from kanmon.records.stats import collect
from tests.support.kanmon_node import RunningNode, free_port

NODE = """
[server]
hostname = "mx1.example.test"
data_dir = "{data_dir}"
[smtp]
listen = ["127.0.0.1:{port}"]
min_free_disk = "1MB"
[[domain]]
name = "example.test"
mailboxes = ["alice", "carol"]
"""


@pytest.fixture
def node(tmp_path):
    text = NODE.format(data_dir=tmp_path / "data", port=free_port())
    (tmp_path / "kanmon.toml").write_text(text)
    n = RunningNode(parse_config(text), clock=ManualClock()).start()
    n.config_file = tmp_path / "kanmon.toml"
    yield n
    n.stop()


def cli(node, *args: str) -> str:
    out = CliRunner().invoke(main, [*args, "-c", str(node.config_file)])
    assert out.exit_code == 0, (out.output, out.exception)
    return out.output


def test_stats_rejected_counts_refused_recipients_not_protocol_errors(node):
    with smtplib.SMTP(node.host, node.port, timeout=30) as s:
        s.ehlo("client.example")
        assert s.docmd("RCPT", "TO:<alice@example.test>")[0] == 503  # no MAIL yet
        assert s.docmd("MAIL", "FROM:<a@remote.example>")[0] == 250
        assert s.docmd("DATA")[0] == 503  # no recipient yet
        assert s.docmd("RCPT", "TO:<nobody@example.test>")[0] == 550
        assert s.docmd("RCPT", "TO:<alice@example.test>")[0] == 250
        assert s.docmd("RSET")[0] == 250
    node.flush()
    rows = search_history(node.data_dir)
    assert [(r.rcpt, r.disposition) for r in rows] == [("nobody@example.test", "Reject")]
    s = collect(node.data_dir, 0)
    assert s.totals.rejected == 1
    assert s.rejected_by_check == [("local_recipients", 1)]
    assert sum(c for _, c in s.rejected_by_check) == s.totals.rejected
    # The protocol errors are still in the event log (and the metrics), just not counted as refused recipients.
    assert sum("503 " in e.text for e in search_events(node.data_dir)) == 2
    report = json.loads(cli(node, "stats", "--json"))
    assert report["totals"]["rejected"] == 1 and report["rejected_by_check"] == [{"name": "local_recipients", "count": 1}]


def test_a_recipient_refused_for_a_bad_dsn_parameter_is_recorded_with_its_address(node):
    with smtplib.SMTP(node.host, node.port, timeout=30) as s:
        s.ehlo("client.example")
        assert s.docmd("MAIL", "FROM:<a@remote.example>")[0] == 250
        code, text = s.docmd("RCPT", "TO:<carol@example.test> NOTIFY=BOGUS")
        assert (code, text[:5]) == (501, b"5.5.4")
        assert s.docmd("RCPT", "TO:<alice@example.test> FOO=1")[0] == 555  # an unknown parameter
        assert s.docmd("RCPT", "TO:<c\x1b[2Jx@example.test> NOTIFY=BOGUS")[0] == 501  # no address parsed
    node.flush()
    lines = [e.text for e in search_events(node.data_dir) if "NOQUEUE: reject: RCPT" in e.text]
    assert len(lines) == 3
    assert "501 5.5.4" in lines[0] and "from=<a@remote.example> to=<carol@example.test> proto=ESMTP" in lines[0]
    assert "555 5.5.4" in lines[1] and "to=<alice@example.test>" in lines[1]
    assert " to=<" not in lines[2] and "\x1b" not in lines[2]
    rows = search_history(node.data_dir)
    assert sorted(r.rcpt for r in rows) == ["alice@example.test", "carol@example.test"]
    assert {r.disposition for r in rows} == {"Reject"}
    assert collect(node.data_dir, 0).rejected_by_check == [("(session)", 2)]


def test_history_from_the_null_sender_and_rows_without_a_sender(node):
    with smtplib.SMTP(node.host, node.port, timeout=30) as s:
        s.sendmail("", ["alice@example.test"], "Subject: a bounce\r\n\r\nx\r\n")
        s.sendmail("bob@remote.example", ["alice@example.test"], "Subject: from bob\r\n\r\nx\r\n")
        s.ehlo("client.example")
        # Refused at MAIL by a limit: no transaction, so no sender (not the null sender).
        assert s.docmd("MAIL", f"FROM:<x@remote.example> SIZE={10**12}")[0] == 552
    node.wait_idle()
    node.flush()
    rows = search_history(node.data_dir)
    assert sorted((r.mail_from is None, r.mail_from or "") for r in rows) == [
        (False, ""), (False, "bob@remote.example"), (True, "")]
    (bounce,) = search_history(node.data_dir, mail_from="<>")
    assert bounce.mail_from == "" and bounce.rcpt == "alice@example.test"
    assert [r.mail_from for r in search_history(node.data_dir, mail_from="*@REMOTE.example")] == ["bob@remote.example"]
    assert [r.mail_from for r in search_history(node.data_dir, mail_from="b_b")] == []  # _ is no wildcard
    assert len(search_history(node.data_dir, rcpt="alice@*")) == 2 and search_history(node.data_dir, rcpt="lice@*") == []
    out = cli(node, "log", "history", "--from", "<>")
    assert "<>" in out and "bob@" not in out and "a bounce" in out
    table = cli(node, "log", "history").splitlines()
    (refused,) = [line for line in table if "552" in line]
    assert " - " in refused and "<>" not in refused
    js = [json.loads(line) for line in cli(node, "log", "history", "--json").splitlines()]
    assert sorted(str(r["mail_from"]) for r in js) == ["", "None", "bob@remote.example"]


def test_a_raw_shift_jis_or_iso_2022_jp_subject_is_found_by_log_history(node):
    text = "請求書送付のお知らせ"
    with smtplib.SMTP(node.host, node.port, timeout=30) as s:
        for n, charset in enumerate(("shift_jis", "iso2022_jp")):
            s.sendmail("s@remote.example", ["alice@example.test"], b"From: s@remote.example\r\nSubject: "
                       + text.encode(charset) + f"\r\nMessage-ID: <raw{n}@remote.example>\r\n\r\nbody\r\n".encode())
    node.wait_idle()
    node.flush()
    assert sorted(r.subject for r in search_history(node.data_dir)) == [text, text]
    assert len(search_history(node.data_dir, subject="請求書")) == 2
    js = [json.loads(line) for line in cli(node, "log", "history", "--subject", "請求書", "--json").splitlines()]
    assert [r["subject"] for r in js] == [text, text]
