"""[dnscheck] every: the running node checks its own DNS and logs a change for the worse."""

from __future__ import annotations

from kanmon.clock import ManualClock
from kanmon.config import parse_config
from kanmon.records.query import search_events
from tests.support.dnsserver import DnsServer
from tests.support.kanmon_node import RunningNode, free_port, wait_for


def test_periodic_dns_check_logs_a_missing_ptr(tmp_path):
    records = {
        "example.test": ["MX 10 mx1.example.test.", 'TXT "v=spf1 ip4:192.0.2.1 -all"'],
        "_dmarc.example.test": ['TXT "v=DMARC1; p=reject"'],
        "mx1.example.test": ["A 192.0.2.1"],
    }  # no PTR for 192.0.2.1
    with DnsServer(records=records) as dns:
        cfg = parse_config(f"""
[server]
hostname = "mx1.example.test"
data_dir = "{tmp_path / 'data'}"
[smtp]
listen = ["127.0.0.1:{free_port()}"]
min_free_disk = "1MB"
[[domain]]
name = "example.test"
mailboxes = ["postmaster"]
[dns]
servers = ["{dns.address}"]
timeout = "1s"
[dnscheck]
every = "6h"
ips = ["192.0.2.1"]
""")
        with RunningNode(cfg, clock=ManualClock()) as node:
            def logged() -> bool:
                node.flush()
                return any("dnscheck: example.test got worse" in e.text for e in search_events(node.data_dir))

            wait_for(logged, 15, "the dnscheck event")
            node.flush()
            line = next(e.text for e in search_events(node.data_dir) if "dnscheck:" in e.text)
            assert "ok -> error" in line or "-> error" in line
