"""The console's account and operations pages against a real node: a logout that holds
across a restart of the node, mailboxes and aliases added and removed on the Users page
and through the API (the functions `kanmon user` calls), the Policies page, the event
log's live tail, and the queue backup download and restore upload."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from kanmon.admin.accounts import AdminAccounts
from kanmon.clock import ManualClock
from kanmon.config import parse_config
from kanmon.records.query import search_events
from tests.integration.test_console import NODE, api_client, csrf_of, login
from tests.support.kanmon_node import RunningNode, free_port


def start_node(tmp_path: Path, extra: str = "") -> RunningNode:
    port, console_port = free_port(), free_port()
    config = parse_config(NODE.format(data_dir=tmp_path / "data", port=port, console=console_port, tls="") + extra)
    node = RunningNode(config, clock=ManualClock(time.time()))
    node.start()
    node.console_url = f"http://127.0.0.1:{console_port}"
    node.clients = []
    return node


def stop_node(node: RunningNode) -> None:
    for client in node.clients:
        client.close()
    node.stop()


@pytest.fixture
def node(tmp_path: Path):
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    accounts = AdminAccounts(data)
    accounts.add("alice", "admin", "alice-pw")
    accounts.add("otto", "operator", "otto-pw")
    accounts.add("audrey", "auditor", "audrey-pw")
    running = start_node(tmp_path)
    try:
        yield running
    finally:
        stop_node(running)


def audit_lines(node, grep: str) -> list[str]:
    return [e.text for e in search_events(node.data_dir, grep=grep) if e.kind == "audit"]


def test_a_logged_out_cookie_stays_refused_after_the_node_restarts(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    AdminAccounts(data).add("alice", "admin", "alice-pw")
    first = start_node(tmp_path)
    try:
        out = login(first, "alice", "alice-pw")
        kept = login(first, "alice", "alice-pw")  # a second session, never logged out
        stolen = out.cookies["kanmon_session"]
        assert out.post("/logout", data={"csrf": csrf_of(out)}).status_code == 303
        other = kept.cookies["kanmon_session"]
    finally:
        stop_node(first)
    second = start_node(tmp_path)
    try:
        replay = api_client(second)
        r = replay.get("/api/v1/me", headers={"Cookie": f"kanmon_session={stolen}"})
        assert r.status_code == 401 and "logged out" in r.json()["error"]
        r = replay.get("/api/v1/me", headers={"Cookie": f"kanmon_session={other}"})
        assert r.status_code == 200 and r.json()["name"] == "alice"  # only the logged-out one ended
    finally:
        stop_node(second)
