"""Submission: the From: header of an authenticated user's message (`[submission]
from_header = "any" | "own" | "own_or_alias"`, default own_or_alias), over real sockets
with smtplib. A refused message gets `553 5.7.1` at the end of DATA and is not queued.
"""

from __future__ import annotations

import smtplib
import ssl

import pytest
from argon2 import PasswordHasher

from kanmon.config import parse_config
from kanmon.store.users import Users
from tests.support.kanmon_node import RunningNode, free_port, maildir_messages, wait_for

FAST = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)

CONFIG = """
[server]
hostname = "mx1.example.test"
data_dir = "{data_dir}"
[smtp]
listen = ["127.0.0.1:{smtp}"]
relay_networks = ["127.0.0.1/32"]
min_free_disk = "1MB"
[submission]
listen = ["127.0.0.1:{sub}"]
{policy}
[[domain]]
name = "example.test"
mailboxes = ["alice", "bob"]
aliases = {{ sales = ["alice"] }}
"""


def node_with(tmp_path, policy: str) -> RunningNode:
    ports = {"smtp": free_port(), "sub": free_port()}
    cfg = parse_config(CONFIG.format(data_dir=tmp_path / "data", policy=policy, **ports))
    Users(cfg, hasher=FAST).set_password("alice@example.test", "correct horse")
    n = RunningNode(cfg)
    n.sub = ports["sub"]
    return n


def send(port: int, header_from: str, sender: str = "alice@example.test") -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.starttls(context=ssl._create_unverified_context())
        s.login("alice@example.test", "correct horse")
        try:
            s.sendmail(sender, ["bob@example.test"], f"From: {header_from}\r\nSubject: t\r\n\r\nhi\r\n")
        except smtplib.SMTPDataError as e:
            return e.smtp_code, e.smtp_error
        return 250, b""


@pytest.mark.parametrize("policy,own,alias,other", [
    ("", 250, 250, 553),  # the default: own_or_alias
    ('from_header = "own_or_alias"', 250, 250, 553),
    ('from_header = "own"', 250, 553, 553),
    ('from_header = "any"', 250, 250, 250),
])
def test_from_header_policy(tmp_path, policy, own, alias, other) -> None:
    with node_with(tmp_path, policy) as n:
        assert send(n.sub, "Alice <alice@example.test>")[0] == own
        assert send(n.sub, '"Sales" <SALES@example.test>', sender="sales@example.test")[0] == alias
        code, text = send(n.sub, "The CEO <ceo@example.test>")
        assert code == other
        if other == 553:
            assert text.startswith(b"5.7.1")
        wait_for(lambda: len(maildir_messages(n.data_dir, "bob@example.test")) == [own, alias, other].count(250),
                 15, "delivery")


def test_several_or_missing_from_addresses(tmp_path) -> None:
    with node_with(tmp_path, "") as n:
        assert send(n.sub, "alice@example.test, ceo@example.test")[0] == 553
        assert send(n.sub, "undisclosed:;")[0] == 553
