"""A trusted balancer's health check (a PROXY v2 LOCAL connection, PROXY spec 2.2) on a
relay with the default pregreet wait: greeted at once, and no connect/disconnect lines
for it; a client behind the same balancer still waits for greet_pause and is logged."""

from __future__ import annotations

import socket

from kanmon.config import parse_config
from kanmon.records.query import search_events
from kanmon.smtp.proxy_protocol import build_proxy_v2
from tests.integration.test_hostile_input import config_text, recv_all
from tests.integration.test_relay_core import recv_reply
from tests.support.kanmon_node import RunningNode, free_port

BALANCER = "127.0.0.30"


def test_a_balancer_health_check_skips_the_pregreet_wait_and_the_connect_lines(tmp_path) -> None:
    text = config_text(tmp_path / "data", free_port(), greet_pause="500ms").replace(
        "[smtp]", f'[smtp]\ntrusted_proxies = ["{BALANCER}/32"]')
    with RunningNode(parse_config(text)) as n:
        with socket.create_connection((n.host, n.port), timeout=15, source_address=(BALANCER, 0)) as raw:
            # QUIT before the banner: a client doing this fails the pregreet test; a check does not.
            raw.sendall(build_proxy_v2(None, None) + b"QUIT\r\n")
            answer = recv_all(raw)
            assert answer.startswith(b"220 ") and b"\r\n221 " in answer, answer
        with socket.create_connection((n.host, n.port), timeout=15, source_address=(BALANCER, 0)) as raw:
            raw.sendall(build_proxy_v2(("192.0.2.77", 40000), (n.host, n.port)) + b"QUIT\r\n")
            assert recv_reply(raw).startswith(b"554 5.5.1")  # a real client behind it: tested as before
        n.node.records.flush()
        lines = [e.text for e in search_events(n.data_dir)]
        assert "connect from unknown[192.0.2.77]" in lines
        assert not [line for line in lines if BALANCER in line], lines
