"""A reload of a balance-only node (`kanmon reload` against `kanmon serve`) in front of
two kanmon relays: open proxied sessions run to their end (promise 8), new connections
follow the new configuration, and a graceful stop afterwards says so in the status."""

from __future__ import annotations

import json
import smtplib
import subprocess
import sys

import pytest

from kanmon.config import parse_config
from tests.support.kanmon_node import TEST_DEFAULT_PROFILE, KanmonProcess, RunningNode, free_port, wait_for

RELAY = """
[server]
hostname = "{name}.corp.example"
data_dir = "{data_dir}"
workers = 0
[smtp]
listen = ["{host}:{port}"]
trusted_proxies = ["127.0.0.30/32"]
min_free_disk = "1MB"
[[domain]]
name = "corp.example"
mailboxes = ["alice"]
""" + TEST_DEFAULT_PROFILE

LB = """
[server]
hostname = "lb.corp.example"
data_dir = "{data_dir}"

[balancer]
processes = {processes}

[[balancer.virtual_server]]
name = "mail"
listen = "127.0.0.30:{vport}"
method = "first-alive"
proxy_protocol = true
health = {{ type = "smtp", interval = "{interval}", timeout = "1s", retries = 2 }}

[[balancer.virtual_server.real]]
address = "127.0.0.31:{port}"
mode = "{mr1}"

[[balancer.virtual_server.real]]
address = "127.0.0.32:{port}"
mode = "{mr2}"
"""

HELD = 6  # sessions held mid-DATA across the reload (with 2 processes, most likely on both)


def _kanmon(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kanmon", *args], capture_output=True, text=True, timeout=60)


def _banner_host(vport: int) -> str | None:
    try:
        with smtplib.SMTP("127.0.0.30", vport, timeout=5) as s:
            return s.ehlo()[1].decode().split()[0]
    except (OSError, smtplib.SMTPException):
        return None


@pytest.mark.parametrize("processes", [1, 2])
def test_a_balancer_reload_lets_sessions_in_data_finish_and_new_ones_follow_the_new_config(tmp_path, processes):
    port = free_port("127.0.0.31")
    vport = free_port("127.0.0.30")
    mr1 = RunningNode(parse_config(RELAY.format(name="mr1", data_dir=tmp_path / "mr1", host="127.0.0.31", port=port))).start()
    mr2 = RunningNode(parse_config(RELAY.format(name="mr2", data_dir=tmp_path / "mr2", host="127.0.0.32", port=port))).start()
    cfg = tmp_path / "lb.toml"

    def write(interval: str, first: str, second: str) -> None:
        cfg.write_text(LB.format(data_dir=tmp_path / "lb", vport=vport, port=port, processes=processes,
                                 interval=interval, mr1=first, mr2=second))

    write("0.2s", "active", "standby")
    lb = KanmonProcess(cfg, "127.0.0.30", vport).start()
    held: list[smtplib.SMTP] = []
    try:
        for _ in range(HELD):
            s = smtplib.SMTP("127.0.0.30", vport, source_address=("127.0.0.66", 0), timeout=20)
            held.append(s)
            assert s.ehlo()[1].decode().startswith("mr1.corp.example")
            assert s.mail("friend@elsewhere.example")[0] == 250
            assert s.rcpt("alice@corp.example")[0] == 250
            assert s.docmd("DATA")[0] == 354
            s.send(b"Subject: across a reload\r\n\r\nfirst half\r\n")

        # The walkthrough's change: another check interval; and MR2 becomes the active one,
        # which a new connection shows.
        write("0.3s", "standby", "active")
        reload = _kanmon("reload", "-c", str(cfg))
        assert reload.returncode == 0, reload.stderr
        wait_for(lambda: _banner_host(vport) == "mr2.corp.example", 30, "new connections to follow the new config")

        for s in held:  # every session held in DATA across the reload ends with 250
            s.send(b"second half\r\n.\r\n")
            code, text = s.getreply()
            assert code == 250, text
            assert s.quit()[0] == 221
        held.clear()
        def logged(text: str) -> bool:  # the log is written by the records writer, a moment later
            return text in (tmp_path / "lb/log/kanmon.log").read_text()

        wait_for(lambda: logged("the previous configuration takes no new connections"), 30, "the retirement said")
        wait_for(lambda: logged("the previous configuration's connections have all ended"), 30,
                 "the previous balancer to stop once its connections ended")
        mr1.flush()
        assert len(list((tmp_path / "mr1/mailboxes/corp.example/alice/new").iterdir())) == HELD

        # A graceful stop after the reload: the status says the balancer stopped.
        lb.terminate()
        status = _kanmon("balance", "status", "-c", str(cfg), "--json")
        assert status.returncode == 1, status.stdout
        assert json.loads((tmp_path / "lb/balancer-status.json").read_text())["running"] is False
    finally:
        for s in held:
            s.close()
        lb.terminate()
        mr1.stop()
        mr2.stop()


def test_a_graceful_stop_after_a_balancer_reload_leaves_a_status_that_says_stopped(tmp_path):
    vport = free_port("127.0.0.30")
    cfg = tmp_path / "lb.toml"

    def write(interval: str) -> None:
        cfg.write_text(LB.format(data_dir=tmp_path / "lb", vport=vport, port=9, processes=2, interval=interval,
                                 mr1="active", mr2="standby").replace('type = "smtp"', 'type = "tcp"'))

    write("0.2s")
    lb = KanmonProcess(cfg, "127.0.0.30", vport).start()
    try:
        write("0.3s")
        assert _kanmon("reload", "-c", str(cfg)).returncode == 0

        def reloaded() -> bool:
            return "the previous configuration takes no new connections" in (tmp_path / "lb/log/kanmon.log").read_text()

        wait_for(reloaded, 30, "the balancer to be replaced")
    finally:
        lb.terminate()
    status = _kanmon("balance", "status", "-c", str(cfg))
    assert status.returncode == 1, status.stdout
    assert "the balancer is not running (it stopped at" in status.stderr
    assert json.loads((tmp_path / "lb/balancer-status.json").read_text())["running"] is False
