"""The start-up banner names the mailboxes of the users file too, not only the config's."""

from __future__ import annotations

from kanmon.clock import ManualClock
from kanmon.config import parse_config
from kanmon.userdb import UserData, users_path, write
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
mailboxes = ["postmaster"]
[[domain]]
name = "empty.test"
"""


def test_the_banner_counts_the_mailboxes_of_the_users_file(tmp_path):
    config = parse_config(NODE.format(data_dir=tmp_path / "data", port=free_port()))
    (tmp_path / "data").mkdir(mode=0o700)
    write(users_path(config), UserData(mailboxes={"alice@example.test": None}))
    node = RunningNode(config, clock=ManualClock()).start()
    try:
        text = node.node.describe()
    finally:
        node.stop()
    assert "kanmon: mail for @example.test (alice, postmaster: 2 mailboxes, 1 from users.json) -> " in text, text
    assert "kanmon: mail for @empty.test (no mailboxes) -> " in text
