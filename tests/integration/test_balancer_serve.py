"""`kanmon serve` with a [balancer]-only config in front of two kanmon relays, as
docs/balancer.md sets it up; and `kanmon balance status` against that running node."""

from __future__ import annotations

import json
import smtplib
import subprocess
import sys

from kanmon.config import parse_config
from kanmon.records.query import search_history
from tests.support.kanmon_node import TEST_DEFAULT_PROFILE, KanmonProcess, RunningNode, free_port, wait_for

RELAY = """
[server]
hostname = "{name}.corp.example"
data_dir = "{data_dir}"
workers = 0
[smtp]
listen = ["{host}:{port}"]
relay_networks = ["127.0.0.7/32"]
trusted_proxies = ["127.0.0.30/32"]
min_free_disk = "1MB"
[[domain]]
name = "corp.example"
mailboxes = ["alice"]
""" + TEST_DEFAULT_PROFILE  # clients outside relay_networks send from unknown domains

LB = """
[server]
hostname = "lb.corp.example"
data_dir = "{data_dir}"

[[balancer.virtual_server]]
name = "mail"
listen = "127.0.0.30:{vport}"
method = "first-alive"
proxy_protocol = true
health = {{ type = "smtp", interval = "0.2s", timeout = "1s", retries = 2 }}

[[balancer.virtual_server.real]]
address = "127.0.0.31:{port}"
mode = "active"

[[balancer.virtual_server.real]]
address = "127.0.0.32:{port}"
mode = "standby"
"""


def test_balance_only_node_fails_over_and_reports_status(tmp_path):
    port = free_port("127.0.0.31")
    vport = free_port("127.0.0.30")
    mr1 = RunningNode(parse_config(RELAY.format(name="mr1", data_dir=tmp_path / "mr1", host="127.0.0.31", port=port))).start()
    mr2 = RunningNode(parse_config(RELAY.format(name="mr2", data_dir=tmp_path / "mr2", host="127.0.0.32", port=port))).start()
    lb_cfg = tmp_path / "lb.toml"
    lb_cfg.write_text(LB.format(data_dir=tmp_path / "lb", vport=vport, port=port))
    assert subprocess.run([sys.executable, "-m", "kanmon", "config", "check", "-c", str(lb_cfg)]).returncode == 0
    lb = KanmonProcess(lb_cfg, "127.0.0.30", vport).start()
    try:
        with smtplib.SMTP("127.0.0.30", vport, source_address=("127.0.0.66", 0), timeout=10) as s:
            assert "mr1.corp.example" in s.ehlo()[1].decode()
            s.sendmail("friend@elsewhere.example", ["alice@corp.example"], "Subject: via lb\r\n\r\nx\r\n")
        mr1.flush()
        (row,) = search_history(mr1.data_dir)
        assert row.client_ip == "127.0.0.66"  # the real client, from the PROXY header

        status = subprocess.run([sys.executable, "-m", "kanmon", "balance", "status", "-c", str(lb_cfg), "--json"],
                                capture_output=True, text=True)
        assert status.returncode == 0, status.stderr
        doc = json.loads(status.stdout)
        assert "127.0.0.31" in json.dumps(doc)

        mr1.stop()  # MR1 dies: new connections go to MR2 within the health-check window

        def reaches_mr2() -> bool:
            try:
                with smtplib.SMTP("127.0.0.30", vport, timeout=5) as s:
                    return "mr2.corp.example" in s.ehlo()[1].decode()
            except (OSError, smtplib.SMTPException):
                return False

        wait_for(reaches_mr2, 15, "failover to MR2")
        assert not (tmp_path / "lb" / "spool" / "queue").exists() or not any((tmp_path / "lb/spool/queue").iterdir())
    finally:
        lb.terminate()
        mr1.stop()
        mr2.stop()
    log = (tmp_path / "lb/log/kanmon.log").read_text()
    assert "127.0.0.31:" in log and "down" in log
