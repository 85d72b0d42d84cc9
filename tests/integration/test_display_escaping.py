"""Strings from the network in the administrator's views: `kanmon log history` (a rich
table), `kanmon log events`, `kanmon trace`, `kanmon stats`, `kanmon queue show`.

A Subject may be rich markup (`[/bold]` used to crash every history view that showed it,
`[link=...]` made a terminal hyperlink) or decode from an encoded-word to terminal escapes
(OSC `ESC]0;` sets the window title, `ESC[2K` erases the line). Every view shows such text
literally, with control characters escaped; --json keeps the exact text.
"""

from __future__ import annotations

import base64
import json
import smtplib
import sqlite3
import time

from click.testing import CliRunner

from kanmon.cli import main
from tests.integration.test_hostile_input import config_text
from tests.support.kanmon_node import RunningNode, free_port, wait_for
from kanmon.config import parse_config

CLOSE_TAG = "[/bold]"
LINK = "[link=http://x.example]y[/link]"
OSC = "\x1b]0;owned\x07 and \x1b[2K gone"
ENCODED = "=?utf-8?b?" + base64.b64encode(OSC.encode()).decode() + "?="


def test_hostile_subjects_show_literally_and_json_keeps_them(tmp_path) -> None:
    port = free_port()
    text = config_text(tmp_path / "data", port, greet_pause="0s")
    cfg_file = tmp_path / "kanmon.toml"
    cfg_file.write_text(text)
    node = RunningNode(parse_config(text)).start()
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
            s.ehlo("client\x1b[2K.example")
            for subject in (CLOSE_TAG, LINK, ENCODED):
                s.sendmail("a@remote.example", ["alice@example.test"],
                           f"Subject: {subject}\r\nMessage-ID: <m{len(subject)}@remote.example>\r\n\r\nhi\r\n")
        node.wait_idle()
        node.node.records.flush()
        db = sqlite3.connect(node.data_dir / "records.sqlite")
        with db:  # an event row written raw (before log lines were escaped), and a hostile name
            db.execute("INSERT INTO events(ts, queue_id, kind, text) VALUES (?, NULL, 'info', ?)",
                       (time.time(), "old row [/bold] \x1b]0;owned\x07 to=<alice@example.test>"))
        db.close()
    finally:
        node.stop()

    runner = CliRunner()
    cfg = str(cfg_file)

    out = runner.invoke(main, ["log", "history", "-c", cfg])
    assert out.exit_code == 0, out.output
    assert CLOSE_TAG in out.output and LINK in out.output
    assert "\x1b" not in out.output and "\x07" not in out.output
    assert "\\x1b]0;owned" in out.output

    out = runner.invoke(main, ["log", "history", "-c", cfg, "--json"])
    subjects = {json.loads(line)["subject"] for line in out.output.splitlines()}
    assert subjects == {CLOSE_TAG, LINK, OSC}  # the exact text

    out = runner.invoke(main, ["log", "events", "-c", cfg])
    assert out.exit_code == 0, out.output
    assert "old row [/bold]" in out.output and "\x1b" not in out.output and "\x07" not in out.output

    out = runner.invoke(main, ["trace", "-c", cfg, "alice@example.test"])
    assert out.exit_code == 0, out.output
    assert "\x1b" not in out.output and "client\\x1b[2K.example" in out.output

    out = runner.invoke(main, ["stats", "-c", cfg])
    assert out.exit_code == 0, out.output
    assert "\x1b" not in out.output


def test_queue_show_escapes_the_client_strings(capsys) -> None:
    from kanmon.commands.queue import _print_detail

    _print_detail({
        "id": "1ABC", "state": "deferred", "arrival": time.time(), "size": 10, "from": "a@remote.example",
        "client": {"name": "unknown", "ip": "192.0.2.1", "helo": "evil\x1b]0;owned\x07", "proto": "ESMTP"},
        "rcpts_all": [{"rcpt": "alice@example.test", "status": "deferred"}],
        "attempts": 1, "next_attempt": time.time(), "history": [
            {"k": "result", "t": time.time(), "rcpt": "alice@example.test", "status": "deferred",
             "reply": "451 4.0.0 \x1b[2K try later", "relay": "mx.remote.example"}],
        "headers": "Subject: \x1b[2Kx\r\n", "body": "line \x1b]0;t\x07\r\n", "body_lines_total": 1,
    })
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "evil\\x1b]0;owned" in out
