"""Two relays sharing their records in one PostgreSQL (the tests' own server): mail
through both is in the shared records under each node's name; PostgreSQL stopped while
mail flows does not stop the relays (accepted, delivered, a `records` alert), and once it
is back every record is there once."""

from __future__ import annotations

import smtplib

import pytest

from kanmon.config import parse_config
from kanmon.records import pgquery
from kanmon.records.query import search_events
from tests.support.kanmon_node import TEST_DEFAULT_PROFILE, RunningNode, free_port, maildir_messages, wait_for

psycopg = pytest.importorskip("psycopg", reason="psycopg is not installed (pip install 'psycopg[binary]')")

CONFIG = """
[server]
hostname = "{node}.example.test"
data_dir = "{data_dir}"
[smtp]
listen = ["127.0.0.1:{port}"]
relay_networks = ["127.0.0.1/32"]
min_free_disk = "1MB"
[[domain]]
name = "corp.example"
mailboxes = ["tanaka"]
[records]
url = "{url}"
node = "{node}"
""" + TEST_DEFAULT_PROFILE


def start(tmp_path, node: str, url: str) -> RunningNode:
    text = CONFIG.format(data_dir=tmp_path / node, port=free_port(), url=url, node=node)
    return RunningNode(parse_config(text)).start()


def send(node: RunningNode, subject: str) -> None:
    with smtplib.SMTP(node.host, node.port, timeout=10) as s:
        s.sendmail("suzuki@corp.example", ["tanaka@corp.example"], f"Subject: {subject}\r\n\r\nbody\r\n")


def test_two_relays_keep_working_through_a_database_outage_and_lose_no_record(tmp_path, private_pg):
    url = private_pg.create_database()
    mr1, mr2 = start(tmp_path, "mr1", url), start(tmp_path, "mr2", url)
    try:
        send(mr1, "one")
        private_pg.stop()
        for n in range(3):
            send(mr1, f"outage mr1 {n}")
            send(mr2, f"outage mr2 {n}")
        for node, count in ((mr1, 4), (mr2, 3)):
            wait_for(lambda: len(maildir_messages(node.data_dir, "tanaka@corp.example")) == count, 20, "deliveries")
        wait_for(lambda: mr1.node.records.shipper.failing is not None, 20, "the outage noticed")
        wait_for(lambda: any("PostgreSQL" in e.text for e in search_events(mr1.data_dir, grep="alert")), 20,
                 "the records alert")
        private_pg.start()
        for node in (mr1, mr2):
            node.node.records.shipper.retry_now()
            node.flush()
            wait_for(node.node.records.shipper.flush, 30, "the journal replayed")
        # "takes writes again" ends the records alert (not left active until a restart).
        alerts = mr1.node.monitoring.alerts
        assert ("records", "shared database") in alerts.states
        wait_for(lambda: not alerts.states[("records", "shared database")].active, 20, "the records alert resolved")
    finally:
        mr1.stop()
        mr2.stop()
    cfg = parse_config(CONFIG.format(data_dir=tmp_path / "x", port=1, url=url, node="mr1")).records
    hist = pgquery.search_history(cfg)
    subjects = sorted((h.node, h.subject, h.status) for h in hist)
    assert subjects == sorted([("mr1", "one", "Delivered")] + [
        (node, f"outage {node} {n}", "Delivered") for node in ("mr1", "mr2") for n in range(3)])
    with psycopg.connect(url) as conn:
        accepted = conn.execute("SELECT node, queue_id, count(*) FROM events WHERE kind = 'accepted'"
                                " GROUP BY node, queue_id").fetchall()
    assert sorted(n for n, _q, _c in accepted) == ["mr1"] * 4 + ["mr2"] * 3
    assert all(c == 1 for _n, _q, c in accepted)  # nothing twice


def test_trace_and_stats_show_every_node_and_filter_by_node(tmp_path, private_pg):
    from click.testing import CliRunner

    from kanmon.cli import main

    url = private_pg.create_database()
    mr1, mr2 = start(tmp_path, "mr1", url), start(tmp_path, "mr2", url)
    try:
        send(mr1, "first")
        send(mr2, "second")
        for node, subject in ((mr1, "first"), (mr2, "second")):
            wait_for(lambda: len(maildir_messages(node.data_dir, "tanaka@corp.example")) == 1, 20, "delivery")
            node.flush()
            wait_for(node.node.records.shipper.flush, 30, "the shared records written")
    finally:
        mr1.stop()
        mr2.stop()
    cfg = tmp_path / "mr1.toml"
    cfg.write_text(CONFIG.format(data_dir=tmp_path / "mr1", port=1, url=url, node="mr1"))

    def run(*argv):
        result = CliRunner().invoke(main, [*argv, "-c", str(cfg)])
        assert result.exit_code == 0, result.output
        return result.output

    import json

    timelines = [json.loads(line) for line in run("trace", "tanaka@corp.example", "--json").splitlines()]
    assert sorted((t["node"], t["subject"], t["final"]) for t in timelines) == [
        ("mr1", "first", "delivered to tanaka@corp.example"),
        ("mr2", "second", "delivered to tanaka@corp.example")]
    assert all(any(s["kind"] == "connect" for s in t["steps"]) for t in timelines)  # the session joined per node
    text = run("trace", "tanaka@corp.example", "--node", "mr2")
    assert "on mr2" in text and "on mr1" not in text
    every = json.loads(run("stats", "--json"))
    assert (every["totals"]["received"], every["totals"]["delivered"]) == (2, 2)
    one = json.loads(run("stats", "--json", "--node", "mr1"))
    assert (one["totals"]["received"], one["totals"]["delivered"]) == (1, 1)
    assert one["top_senders"] == [{"name": "suzuki@corp.example", "count": 1}]
    assert "every node" in run("stats")


ALERTS = """
[alerts]
to = ["tanaka@corp.example"]
"""


def test_an_incident_two_relays_see_is_mailed_once_for_the_cluster(tmp_path, private_pg):
    url = private_pg.create_database()
    nodes = []
    for name in ("mr1", "mr2"):
        text = CONFIG.format(data_dir=tmp_path / name, port=free_port(), url=url, node=name) + ALERTS
        nodes.append(RunningNode(parse_config(text)).start())
    mr1, mr2 = nodes

    def alert_mails(node) -> list[bytes]:
        return [m for m in maildir_messages(node.data_dir, "tanaka@corp.example") if b"X-Kanmon-Alert: delivery" in m]

    try:
        text = "relay server store.corp.example:25 failed; mail goes to its alternate"
        assert mr1.call(lambda: mr1.node.monitoring.alerts.raise_alert("delivery", "store", text)) is True
        wait_for(lambda: len(alert_mails(mr1)) == 1, 20, "mr1's alert mail")
        assert mr2.call(lambda: mr2.node.monitoring.alerts.raise_alert("delivery", "store", text)) is True
        mr2.flush()
        wait_for(lambda: any(e.kind == "alert-not-mailed" for e in search_events(mr2.data_dir)), 20,
                 "mr2 leaving the mail to mr1")
        (event,) = [e for e in search_events(mr2.data_dir) if e.kind == "alert-not-mailed"]
        assert "mailed by node mr1" in event.text
        mr1.wait_idle()
        mr2.wait_idle()
        assert len(alert_mails(mr1)) == 1 and alert_mails(mr2) == []  # one mail for the cluster
        assert b"Seen by: mr1" in alert_mails(mr1)[0]
    finally:
        mr1.stop()
        mr2.stop()


def test_cluster_status_shows_each_nodes_queue_and_alerts(tmp_path, private_pg):
    import asyncio
    import json

    from click.testing import CliRunner

    from kanmon.cli import main

    url = private_pg.create_database()
    mr1 = start(tmp_path, "mr1", url)
    text = CONFIG.format(data_dir=tmp_path / "mr2", port=free_port(), url=url, node="mr2")
    mr2 = RunningNode(parse_config(text + "[queue]\nsuspend_delivery = true\n")).start()  # its mail waits
    try:
        send(mr2, "waiting on mr2")
        mr1.call(lambda: mr1.node.monitoring.alerts.raise_alert("delivery", "store", "store \x1b[31mdown"))
        # A critical alert (an error event) last seen beyond [alerts] min_interval: no
        # longer active, as in `kanmon status` (not listed until its state is pruned).
        alerts = mr1.node.monitoring.alerts
        mr1.call(lambda: alerts.raise_alert("critical", "old error", "error event: old error"))
        mr1.call(lambda: setattr(alerts.states[("critical", "old error")], "last_seen",
                                 alerts.clock.now() - alerts.interval("critical") - 1))
        for node in (mr1, mr2):
            asyncio.run_coroutine_threadsafe(node.node.monitoring.beat(), node.loop).result(30)
    finally:
        mr1.stop()
        mr2.stop()
    cfg = tmp_path / "any.toml"
    cfg.write_text(CONFIG.format(data_dir=tmp_path / "mr1", port=1, url=url, node="mr1"))
    out = CliRunner().invoke(main, ["cluster", "status", "--json", "-c", str(cfg)])
    assert out.exit_code == 0, out.output
    nodes = {n["node"]: n for n in map(json.loads, out.output.splitlines())}
    assert set(nodes) == {"mr1", "mr2"}, out.output
    assert nodes["mr2"]["queue"]["size"] == 1 and nodes["mr1"]["queue"]["size"] == 0, out.output
    assert [(a["category"], a["key"]) for a in nodes["mr1"]["alerts"]] == [("delivery", "store")], out.output
    assert nodes["mr2"]["alerts"] == [] and not nodes["mr1"]["silent"]
    table = CliRunner().invoke(main, ["cluster", "status", "-c", str(cfg)]).output
    assert "mr2.example.test" in table and "1 (new 1" in table and "delivery: store: store" in table
    assert "\x1b" not in table  # alert text from the network, escaped


def test_cluster_status_shows_a_stopped_nodes_queue_at_its_stop_and_a_dead_ones_as_of_its_last_beat(
        tmp_path, private_pg):
    import json
    import time

    from click.testing import CliRunner

    from kanmon.cli import main
    from kanmon.records.pg import connect, heartbeat

    url = private_pg.create_database()
    text = CONFIG.format(data_dir=tmp_path / "mr2", port=free_port(), url=url, node="mr2")
    mr2 = RunningNode(parse_config(text + "[queue]\nsuspend_delivery = true\n")).start()  # its mail waits
    try:
        wait_for(lambda: mr2.node.monitoring.heartbeats >= 1, 30, "the first heartbeat")
        send(mr2, "taken after the last periodic heartbeat")  # the next periodic beat is 30 s away
    finally:
        mr2.stop()  # graceful: a last heartbeat
    with connect(url, None, autocommit=True) as conn:  # a node that died: its beat of long ago stays
        heartbeat(conn, "dead", "dead.example.test", "0.1.0", time.time() - 7200, time.time() - 3600,
                  {"size": 2, "new": 0, "deferred": 2, "hold": 0, "oldest_waiting": None, "stopped": False}, [])
    cfg = tmp_path / "any.toml"
    cfg.write_text(CONFIG.format(data_dir=tmp_path / "mr1", port=1, url=url, node="mr1"))
    out = CliRunner().invoke(main, ["cluster", "status", "--json", "-c", str(cfg)])
    assert out.exit_code == 0, out.output
    nodes = {n["node"]: n for n in map(json.loads, out.output.splitlines())}
    assert nodes["mr2"]["queue"]["size"] == 1 and nodes["mr2"]["stopped"] and not nodes["mr2"]["silent"], out.output
    assert nodes["dead"]["silent"] and not nodes["dead"]["stopped"]
    assert nodes["dead"]["queue_as_of"] == nodes["dead"]["last_seen"]
    table = CliRunner().invoke(main, ["cluster", "status", "-c", str(cfg)]).output
    lines = {line.split()[0]: line for line in table.splitlines() if line.split() and line.split()[0] in nodes}
    assert "1 (new 1, deferred 0, hold 0) at its stop" in lines["mr2"] and "(stopped)" in lines["mr2"], table
    assert "(SILENT)" in lines["dead"] and "2 (new 0, deferred 2, hold 0) as of its last heartbeat" in lines["dead"], table
