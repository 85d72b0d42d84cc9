"""Mail kanmon writes itself enters like received mail (kanmon.queue.inject), and the
envelope travels whole to delivery.

An over-quota notice, in one process and with SMTP receiver processes: it is in
`kanmon trace` (its accept and delivery lines), in `kanmon log history` (a row that ends
Delivered) and in the metrics (received, source internal). A message received with
SMTPUTF8 leaves with `MAIL FROM:<..> SMTPUTF8` even when its addresses are ASCII.
"""

from __future__ import annotations

import json
import re
import smtplib
import urllib.request

from click.testing import CliRunner

from kanmon.cli import main
from kanmon.config import parse_config
from kanmon.records.query import search_events
from tests.support.kanmon_node import KanmonProcess, RunningNode, free_port, maildir_messages, wait_for
from tests.support.smtpsink import SmtpSink

NODE = """
[server]
hostname = "mx1.example.test"
data_dir = "{data_dir}"
workers = {workers}
[smtp]
listen = ["127.0.0.1:{port}"]
relay_networks = ["127.0.0.0/8"]
min_free_disk = "1MB"
[[domain]]
name = "example.test"
mailboxes = ["alice", "bob"]
quota = "2KB"
[[domain]]
name = "dest.example"
deliver = "relay"
servers = ["{dest}"]
tls = "none"
[metrics]
listen = "127.0.0.9:{metrics_port}"
"""

NOTICE_RE = re.compile(r"^over-quota notice for <alice@example\.test> \(\d+ of 2000 bytes\): (\S+)$")


def write_config(tmp_path, workers: int = 0, dest: str = "127.0.0.1:9") -> tuple[str, str, int, int]:
    port, metrics_port = free_port(), free_port("127.0.0.9")
    text = NODE.format(data_dir=tmp_path / "data", port=port, workers=workers, dest=dest, metrics_port=metrics_port)
    path = tmp_path / "kanmon.toml"
    path.write_text(text)
    return text, str(path), port, metrics_port


def scrape(metrics_port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.9:{metrics_port}/metrics", timeout=10) as r:
        return r.read().decode()


def overflow_alice(port: int) -> None:
    """A big message fills alice's mailbox; the next RCPT to her is refused with 452 4.2.2."""
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        big = "Subject: big\r\nMessage-ID: <big@remote.example>\r\n\r\n" + "x" * 3000 + "\r\n"
        assert s.sendmail("a@remote.example", ["alice@example.test"], big) == {}


def refuse_alice(port: int) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.ehlo()
        s.mail("a@remote.example")
        code, text = s.rcpt("alice@example.test")
        assert (code, text[:5]) == (452, b"4.2.2")


def notice_id(data_dir) -> str | None:
    for e in search_events(data_dir, grep="over-quota notice for"):
        m = NOTICE_RE.match(e.text)
        if m:
            return m.group(1)
    return None


def check_notice_is_recorded(config_path: str, data_dir, metrics_port: int) -> None:
    wait_for(lambda: notice_id(data_dir) is not None, 15, "the notice's event line")
    qid = notice_id(data_dir)
    assert qid is not None
    runner = CliRunner()

    def history() -> list[dict]:
        out = runner.invoke(main, ["log", "history", "-c", config_path, "--json", "--id", qid])
        assert out.exit_code == 0, out.output
        return [json.loads(line) for line in out.output.splitlines()]

    # The history row: from <>, to alice, and it ends Delivered (its status update found it).
    wait_for(lambda: [r["status"] for r in history()] == ["Delivered"], 15, "the notice's history row, delivered")
    (row,) = history()
    assert row["mail_from"] == "" and row["rcpt"] == "alice@example.test"
    assert row["subject"] == "Your mailbox is full" and row["message_id"].startswith("<")
    # The trace: accepted (proto=internal) and delivered to the mailbox. Its "removed"
    # line may come a records batch after the history row's status.
    def trace() -> dict:
        out = runner.invoke(main, ["trace", "-c", config_path, "--json", qid])
        assert out.exit_code == 0, out.output
        (timeline,) = [json.loads(line) for line in out.output.splitlines()]
        return timeline

    wait_for(lambda: "still in the queue" not in trace()["final"], 15, "the notice's removed line")
    timeline = trace()
    steps = [(s["step"], s["text"]) for s in timeline["steps"]]
    accepted = [t for st, t in steps if st == "accepted"]
    assert len(accepted) == 1 and accepted[0].startswith("from=<>, size=") and "proto=internal, relay=local" in accepted[0]
    attempts = [t for st, t in steps if st == "attempt"]
    assert len(attempts) == 1 and attempts[0].startswith("to=<alice@example.test>") and "stat=Sent" in attempts[0]
    assert timeline["final"] == "delivered to alice@example.test"
    printed = runner.invoke(main, ["trace", "-c", config_path, qid]).output
    assert "accepted  from=<>, size=" in printed and "attempt   to=<alice@example.test>" in printed
    # The metrics: the notice counts as received from an internal source.
    wait_for(lambda: 'kanmon_messages_received_total{source="internal"} 1' in scrape(metrics_port).splitlines(),
             15, "the notice in the metrics")


def test_quota_notice_is_traced_recorded_and_counted_in_one_process(tmp_path, capfd):
    text, path, port, metrics_port = write_config(tmp_path)
    with RunningNode(parse_config(text)) as node:
        overflow_alice(port)
        node.wait_idle()
        refuse_alice(port)
        wait_for(lambda: len(maildir_messages(node.data_dir, "alice@example.test")) == 2, 10, "the notice")
        node.wait_idle()
        check_notice_is_recorded(path, node.data_dir, metrics_port)
    assert "no history row" not in capfd.readouterr().err


def test_quota_notice_is_traced_recorded_and_counted_with_receiver_processes(tmp_path):
    _text, path, port, metrics_port = write_config(tmp_path, workers=1)
    proc = KanmonProcess(tmp_path / "kanmon.toml", "127.0.0.1", port).start()
    try:
        overflow_alice(port)
        data_dir = tmp_path / "data"
        wait_for(lambda: len(maildir_messages(data_dir, "alice@example.test")) == 1, 15, "the big message")
        refuse_alice(port)
        wait_for(lambda: len(maildir_messages(data_dir, "alice@example.test")) == 2, 15, "the notice")
        check_notice_is_recorded(path, data_dir, metrics_port)
    finally:
        proc.terminate()


def test_smtputf8_flag_travels_to_the_next_hop(tmp_path):
    with SmtpSink("127.0.0.7") as sink:
        text, _path, port, _m = write_config(tmp_path, dest=sink.address)
        with RunningNode(parse_config(text)) as node:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
                s.ehlo()
                body = "Subject: =?utf-8?q?gr=C3=BC=C3=9Fe?=\r\nFrom: Jürgen <a@remote.example>\r\n\r\nhallo\r\n"
                assert s.sendmail("a@remote.example", ["b@dest.example"], body.encode("utf-8"),
                                  mail_options=["SMTPUTF8", "BODY=8BITMIME"]) == {}
            (msg,) = sink.wait_for_messages(1)
            node.wait_idle()
        assert msg.mail_from == "a@remote.example" and "SMTPUTF8" in msg.params.upper().split()
        assert any(c.startswith("MAIL FROM:<a@remote.example>") and "SMTPUTF8" in c for c in sink.commands)
