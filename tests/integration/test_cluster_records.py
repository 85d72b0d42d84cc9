"""Two relays sharing their records in one PostgreSQL (the tests' own server): mail
through both is in the shared records under each node's name; PostgreSQL stopped while
mail flows does not stop the relays (accepted, delivered, a `records` alert), and once it
is back every record is there once."""

from __future__ import annotations

import smtplib

import psycopg

from kanmon.config import parse_config
from kanmon.records import pgquery
from kanmon.records.query import search_events
from tests.support.kanmon_node import TEST_DEFAULT_PROFILE, RunningNode, free_port, maildir_messages, wait_for
from tests.support.postgres import private_pg  # noqa: F401 - fixture

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


def test_two_relays_keep_working_through_a_database_outage_and_lose_no_record(tmp_path, private_pg):  # noqa: F811
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
