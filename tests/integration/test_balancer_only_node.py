"""A node that only balances ([server] and [balancer], docs/balancer.md step 2) as its
start banner, `kanmon status` and `kanmon config check` show it: no SMTP listener, no
mail routing, no self-signed TLS note; and a real server an administrator drained
before a restart is shown as drained, as the event log says."""

from __future__ import annotations

import json
import subprocess
import sys

from kanmon.balancer.status import write_admin_modes
from kanmon.config import parse_config
from tests.support.kanmon_node import RunningNode, free_port

LB = """
[server]
hostname = "lb.corp.example"
data_dir = "{data_dir}"

[balancer]
processes = 1

[[balancer.virtual_server]]
name = "mail"
listen = "127.0.0.30:{vport}"
health = {{ type = "tcp", interval = "1h", timeout = "1s", retries = 3 }}

[[balancer.virtual_server.real]]
address = "127.0.0.31:{port}"
mode = "active"

[[balancer.virtual_server.real]]
address = "127.0.0.32:{port}"
mode = "standby"

[outbound]
smarthost = ["127.0.0.7:2525"]
"""


def _kanmon(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kanmon", *args], capture_output=True, text=True, timeout=60)


def test_a_balance_only_node_shows_no_mail_roles_and_the_drained_server(tmp_path):
    port, vport = free_port("127.0.0.31"), free_port("127.0.0.30")
    cfg = tmp_path / "lb.toml"
    text = LB.format(data_dir=tmp_path / "lb", vport=vport, port=port)
    cfg.write_text(text)

    check = _kanmon("config", "check", "-c", str(cfg))
    assert check.returncode == 0, check.stdout + check.stderr
    assert "self-signed" not in check.stdout + check.stderr
    assert "smtp.listen" not in check.stdout + check.stderr

    (tmp_path / "lb").mkdir(mode=0o700)
    write_admin_modes(tmp_path / "lb", {"mail": {f"127.0.0.31:{port}": {"mode": "disabled", "since": 1.0}}})
    with RunningNode(parse_config(text, str(cfg))) as lb:
        banner = lb.node.describe()
        assert f"127.0.0.31:{port} (disabled, as an administrator set it; configured active)" in banner, banner
        assert f"127.0.0.32:{port} (standby)" in banner
        assert "other domains" not in banner and "SMTP on" not in banner, banner

        status = _kanmon("status", "-c", str(cfg), "--json")
        listeners = json.loads(status.stdout)["listeners"]
        assert [entry["key"] for entry in listeners] == ["balancer.virtual_server[0].listen"], listeners
