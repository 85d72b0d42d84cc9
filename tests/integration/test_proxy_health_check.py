"""A trusted balancer's health check (a PROXY v2 LOCAL connection, PROXY spec 2.2) on a
relay with the default pregreet wait: greeted at once, and no connect/disconnect lines
for it; a client behind the same balancer still waits for greet_pause and is logged."""

from __future__ import annotations

import smtplib
import socket

import pytest

from kanmon.config import parse_config
from kanmon.records.query import search_events
from kanmon.smtp.proxy_protocol import build_proxy_v2
from tests.integration.test_hostile_input import CLOSE_WAIT, config_text, recv_all, server_side, shared_state_locked
from tests.integration.test_relay_core import recv_reply
from tests.support.kanmon_node import KanmonProcess, RunningNode, free_port, wait_for

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


MONITOR = "127.0.0.31"  # a FortiGate's TCP health check, say


@pytest.mark.parametrize("workers", [0, 1])  # in the node; in a receiver process (the default), whose
def test_a_monitor_that_connects_and_leaves_writes_no_lines_and_one_that_talks_is_logged(tmp_path, workers) -> None:
    """[smtp] health_check_clients: a TCP monitor's connect-and-close every few seconds
    would fill the log with connect/disconnect pairs; it writes nothing. The same address
    sending a command is logged as any client (and greeted at once, as a check should be).
    In a receiver process a connection that closes while the shared connection gauge
    answers takes another path to its lines (it did connect): the same there (the test
    holds the shared state so that the first probe takes that path)."""
    port = free_port()
    data_dir = tmp_path / "data"
    text = config_text(data_dir, port, greet_pause="500ms", workers=workers).replace(
        "[smtp]", f'[smtp]\nhealth_check_clients = ["{MONITOR}/32"]')
    cfg = tmp_path / "kanmon.toml"
    cfg.write_text(text)
    server = KanmonProcess(cfg, "127.0.0.1", port).start() if workers else RunningNode(parse_config(text)).start()
    try:
        if workers:
            with smtplib.SMTP("127.0.0.1", port, timeout=15) as s:  # the receiver serves (its start takes the state)
                assert s.noop()[0] == 250
            # The first probe closes while the gauge cannot answer: the receiver has seen
            # the close (its end is no longer waiting to close) before the gauge's answer.
            with shared_state_locked(data_dir):
                probe = socket.create_connection(("127.0.0.1", port), timeout=15, source_address=(MONITOR, 0))
                probe_port = probe.getsockname()[1]
                wait_for(lambda: server_side(port, probe_port) is not None, 15, "the probe accepted")
                probe.close()
                wait_for(lambda: (server_side(port, probe_port) or (0, 0))[0] != CLOSE_WAIT, 15, "the close seen")
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", port), timeout=15, source_address=(MONITOR, 0)):
                pass  # connect and close, as a TCP monitor does
        for _ in range(2):
            with socket.create_connection(("127.0.0.1", port), timeout=15, source_address=(MONITOR, 0)) as raw:
                assert recv_reply(raw).startswith(b"220 ")  # at once: no pregreet wait
        with socket.create_connection(("127.0.0.1", port), timeout=15, source_address=(MONITOR, 0)) as raw:
            raw.sendall(b"QUIT\r\n")  # before the banner: no pregreet test for it
            answer = recv_all(raw)
            assert answer.startswith(b"220 ") and b"\r\n221 " in answer, answer
        with socket.create_connection(("127.0.0.1", port), timeout=15, source_address=("127.0.0.9", 0)) as raw:
            assert recv_reply(raw).startswith(b"220 ")  # another client: logged, silent or not

        def lines() -> list[str]:
            if not workers:
                server.node.records.flush()
            return [e.text for e in search_events(data_dir)]
        # The last connection's disconnect line: everything of the earlier ones is written by then.
        wait_for(lambda: "disconnect from unknown[127.0.0.9]" in lines(), 30, "the last disconnect line")
        mine = [line for line in lines() if MONITOR in line]
        assert [line.split(" ", 1)[0] for line in mine] == ["connect", "disconnect"], mine  # the one that talked
        assert "connect from unknown[127.0.0.9]" in lines()
    finally:
        if workers:
            server.kill()
        else:
            server.stop()
