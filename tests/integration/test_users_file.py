"""`kanmon user add/del/alias` change what a running node accepts, without a reload;
a damaged users file is refused with an event while the previous users keep working."""

from __future__ import annotations

import smtplib
from pathlib import Path

from click.testing import CliRunner

from kanmon.cli import main
from kanmon.config import parse_config
from kanmon.records.query import search_events
from tests.support.kanmon_node import RunningNode, free_port, wait_for

CONFIG = """
[server]
hostname = "mx1.example.test"
data_dir = "{data_dir}"
workers = 0
[smtp]
listen = ["127.0.0.1:{smtp}"]
min_free_disk = "1MB"
[[domain]]
name = "example.test"
mailboxes = ["alice"]
"""


def rcpt_code(port: int, address: str) -> int:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.ehlo("client.example")
        s.mail("someone@remote.example")
        code, _ = s.rcpt(address)
        s.rset()
        return code


def test_users_added_by_the_cli_are_seen_by_the_running_node(tmp_path: Path) -> None:
    port = free_port()
    text = CONFIG.format(data_dir=tmp_path / "data", smtp=port)
    conf = tmp_path / "kanmon.toml"
    conf.write_text(text)
    node = RunningNode(parse_config(text)).start()
    try:
        assert rcpt_code(port, "carol@example.test") == 550
        r = CliRunner().invoke(main, ["user", "add", "carol@example.test", "--stdin", "-c", str(conf)], input="pw\n")
        assert r.exit_code == 0, r.output
        r = CliRunner().invoke(main, ["user", "alias", "team@example.test", "carol@example.test", "-c", str(conf)])
        assert r.exit_code == 0, r.output
        wait_for(lambda: rcpt_code(port, "carol@example.test") == 250, 10, "new mailbox accepted")
        wait_for(lambda: rcpt_code(port, "team@example.test") == 250, 10, "new alias accepted")
        (tmp_path / "data" / "users.json").write_text("{damaged")
        # the file is looked at when a recipient is checked (at most once a second)
        wait_for(lambda: rcpt_code(port, "carol@example.test") == 250 and any(e.kind == "error" and "users file" in e.text for e in search_events(node.data_dir, grep="users file")),
                 10, "the refusal event")
        assert rcpt_code(port, "carol@example.test") == 250  # the previous content keeps serving
    finally:
        node.stop()
