"""A node that only balances loads only what balancing needs (issue 22: its idle RSS).

`kanmon serve` with a [balancer]-only config runs in a child process with a probe
thread that, once the node accepts on its address (and the balancer has written its
status file), writes
the child's sys.modules and stops it with SIGTERM. The mail and store roles'
listeners, the accept checks and the web console are not among them; a node with
[smtp] and a [[domain]] does load the SMTP server (so the probe sees what it claims).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.support.kanmon_node import free_port

PROBE = r"""
import json, os, signal, socket, sys, threading, time
from pathlib import Path

config, out, host, port, ready = sys.argv[1:6]

def accepts():
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
        return True
    except OSError:
        return False

def probe():
    while not (Path(ready).exists() and accepts()):
        time.sleep(0.05)
    time.sleep(0.5)  # what start does after its first status write
    Path(out).write_text(json.dumps(sorted(sys.modules)))
    os.kill(os.getpid(), signal.SIGTERM)

threading.Thread(target=probe, daemon=True).start()
sys.argv = ["kanmon", "serve", "-c", config, "--quiet"]
import runpy
runpy.run_module("kanmon", run_name="__main__")
"""

LB = """
[server]
hostname = "lb.corp.example"
data_dir = "{data_dir}"

[balancer]
processes = 1

[[balancer.virtual_server]]
name = "mail"
listen = "127.0.0.93:{vport}"
method = "first-alive"
health = {{ type = "smtp", interval = "0.2s", timeout = "1s", retries = 2 }}

[[balancer.virtual_server.real]]
address = "127.0.0.94:{rport}"
mode = "active"
"""

MAIL = """
[server]
hostname = "mx.corp.example"
data_dir = "{data_dir}"
workers = 0

[smtp]
listen = ["127.0.0.93:{vport}"]
min_free_disk = "1MB"

[[domain]]
name = "corp.example"
mailboxes = ["alice"]
"""

# Modules of the mail and store roles and the console: none is needed to balance.
NOT_FOR_BALANCING = (
    "kanmon.smtp.server", "kanmon.smtp.session", "kanmon.policy.standard", "kanmon.receiver",
    "kanmon.store.pop3", "kanmon.store.imap.service", "kanmon.store.managesieve", "kanmon.console",
    "kanmon.dnscheck.monitor", "kanmon.dnscheck.checks", "spf",
)


def modules_after_start(tmp_path: Path, text: str, port: int, ready: Path) -> set[str]:
    config = tmp_path / "node.toml"
    config.write_text(text)
    out = tmp_path / "modules.json"
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    proc = subprocess.run([sys.executable, str(probe), str(config), str(out), "127.0.0.93", str(port), str(ready)],
                          capture_output=True, text=True, timeout=60)
    assert out.exists(), proc.stderr[-4000:]
    return set(json.loads(out.read_text()))


def test_a_balance_only_node_does_not_load_the_mail_roles(tmp_path):
    data_dir = tmp_path / "lb"
    port = free_port("127.0.0.93")
    text = LB.format(data_dir=data_dir, vport=port, rport=free_port("127.0.0.94"))
    modules = modules_after_start(tmp_path, text, port, data_dir / "balancer-status.json")
    assert "kanmon.balancer.service" in modules and "kanmon.admin.service" in modules
    loaded = sorted(m for m in modules if m.startswith(NOT_FOR_BALANCING))
    assert loaded == []


def test_a_mail_node_loads_its_smtp_server(tmp_path):
    data_dir = tmp_path / "mx"
    port = free_port("127.0.0.93")
    text = MAIL.format(data_dir=data_dir, vport=port)
    modules = modules_after_start(tmp_path, text, port, data_dir / "control.sock")
    assert {"kanmon.smtp.server", "kanmon.policy.standard"} <= modules


def test_a_forwarding_process_does_not_load_the_config_models():
    code = ("import sys, kanmon.balancer.forwarder, kanmon.balancer.service, kanmon.balancer.shared, "
            "kanmon.balancer.workers; print(sorted(m for m in sys.modules if m.startswith(('pydantic', 'kanmon.config'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_a_forwarding_process_reads_the_values_the_main_process_validated():
    from kanmon.balancer.forwarder import settings
    from kanmon.balancer.service import forwarder_spec
    from kanmon.config import parse_config

    config = parse_config("""
[balancer]
processes = 3
backlog = 77
splice = false

[[balancer.virtual_server]]
name = "mail"
listen = "127.0.0.93:25"
method = "least-session"
proxy_protocol = true
connect_timeout = "1500ms"
idle_timeout = "2m"
health = { type = "http", interval = "3s", timeout = "1s", fall = 4, rise = 2, path = "/up", host = "lb" }

[[balancer.virtual_server.real]]
address = "127.0.0.94:2525"
weight = 3
max_connections = 9

[[balancer.virtual_server.real]]
address = "[::1]:2526"
mode = "standby"

[[balancer.virtual_server]]
name = "web"
listen = "[::1]:8080"
[[balancer.virtual_server.real]]
address = "127.0.0.95:80"
""")
    balancer = config.balancer
    assert balancer is not None
    plain = settings(json.loads(json.dumps(forwarder_spec(balancer))), 3)  # as it crosses the pipe
    assert (plain.balancer.processes, plain.balancer.backlog, plain.balancer.splice) == (3, 77, False)
    assert len(plain.balancer.virtual_server) == len(balancer.virtual_server) == 2
    for p, vs in zip(plain.balancer.virtual_server, balancer.virtual_server):
        for name in type(vs).model_fields:
            if name not in ("health", "real"):
                assert getattr(p, name) == getattr(vs, name), name
        for name in type(vs.health).model_fields:
            assert getattr(p.health, name) == getattr(vs.health, name), name
        assert len(p.real) == len(vs.real)
        for pr, rs in zip(p.real, vs.real):
            for name in type(rs).model_fields:
                assert getattr(pr, name) == getattr(rs, name), name
    assert plain.balancer.virtual_server[0].real[1].address == ("::1", 2526)
