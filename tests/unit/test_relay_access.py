"""RelayAccess.is_relay_client: the relay_networks answer, remembered per address
(several checks ask about each session's client) within a bound."""

from __future__ import annotations

from kanmon.config import parse_config
from kanmon.policy import access
from kanmon.policy.access import RelayAccess

CONFIG = """
[server]
hostname = "mx.example.test"
data_dir = "/nonexistent"
[smtp]
relay_networks = ["192.0.2.0/24", "2001:db8::/32"]
"""


def test_answers_are_right_and_stay_right_when_asked_again():
    ra = RelayAccess(parse_config(CONFIG))
    cases = {"192.0.2.9": True, "198.51.100.1": False, "::ffff:192.0.2.7": True, "2001:db8::1": True,
             "2001:db9::1": False, "not-an-ip": False, "": False}
    for _ in range(2):
        assert {ip: ra.is_relay_client(ip) for ip in cases} == cases


def test_the_remembered_answers_are_bounded(monkeypatch):
    monkeypatch.setattr(access, "RELAY_ANSWERS_MAX", 10)
    ra = RelayAccess(parse_config(CONFIG))
    for i in range(25):
        assert ra.is_relay_client(f"192.0.2.{i}") is True
        assert ra.is_relay_client(f"198.51.100.{i}") is False
        assert len(ra._relay_answers) <= 10
