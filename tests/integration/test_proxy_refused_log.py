"""A client behind a trusted balancer that sends a PROXY header of its own: refused, and
the event names that client (the address from the balancer's header), not the balancer."""

from __future__ import annotations

import socket

from kanmon.config import parse_config
from kanmon.records.query import search_events
from tests.integration.test_hostile_input import config_text
from tests.integration.test_relay_core import recv_reply
from tests.support.kanmon_node import RunningNode, free_port, wait_for


def test_untrusted_proxy_header_names_the_client(tmp_path) -> None:
    text = config_text(tmp_path / "data", free_port(), greet_pause="0s").replace(
        "[smtp]", '[smtp]\ntrusted_proxies = ["127.0.0.5/32"]')
    with RunningNode(parse_config(text)) as n:
        with socket.create_connection((n.host, n.port), timeout=15, source_address=("127.0.0.5", 0)) as raw:
            raw.sendall(b"PROXY TCP4 192.0.2.77 127.0.0.1 40000 25\r\n")
            assert recv_reply(raw).startswith(b"220")
            raw.sendall(b"PROXY TCP4 10.9.9.9 127.0.0.1 1 25\r\n")  # the client's own, forged
            assert recv_reply(raw).startswith(b"550 5.7.0")

        def refused() -> list[str]:
            n.node.records.flush()
            return [e.text for e in search_events(n.data_dir, grep="PROXY header from untrusted")]

        wait_for(lambda: bool(refused()), 10, "the event")
        assert refused() == ["reject: PROXY header from untrusted 192.0.2.77"]
