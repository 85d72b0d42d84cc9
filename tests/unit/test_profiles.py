"""Session profiles: the config models of the edge policy, their resolution and
validation, and profile_for / recipient_policy_for."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kanmon.config import ConfigError, parse_config
from kanmon.policy.profiles import profile_for, recipient_policy_for

POLICY = """
[smtp]
relay_networks = ["10.0.0.0/8"]
max_errors = 7
max_message_size = "20MB"

[[domain]]
name = "corp.example"
deliver = "relay"
servers = ["192.0.2.7:25"]
verify = "list"
mailboxes = ["alice"]

[[ip_policy]]
source = ["192.0.2.0/24", "2001:db8::/32"]
profile = "partners"

[[ip_policy]]
source = ["10.1.0.0/16"]
profile = "printers"

[[ip_policy]]
source = ["192.0.2.0/24"]
profile = "never"

[[session_profile]]
name = "partners"
max_message_size = "5MB"
greylist = true

[[session_profile]]
name = "printers"
max_rset = 2

[[session_profile]]
name = "never"
max_ehlo = 1

[[session_profile]]
name = "default"
max_recipients = 50

[[recipient_policy]]
direction = "inbound"
sender = "*@partner.example"
recipient = "*@corp.example"
session_profile = "partners"

[[recipient_policy]]
direction = "outbound"
recipient = "*@*"
session_profile = "trusted"
"""


@pytest.fixture(scope="module")
def cfg():
    return parse_config(POLICY)


def test_builtin_profiles_without_any_policy():
    c = parse_config("")
    default, trusted = c.session_profiles["default"], c.session_profiles["trusted"]
    assert default.bare_newline == "reject" and trusted.bare_newline == "normalize"
    assert default.sender_domain_check and not trusted.sender_domain_check
    assert default.dnsbl_threshold == 1 and trusted.dnsbl_threshold == 0
    assert not default.greylist and not trusted.greylist and not default.require_ptr
    assert default.greet_pause == c.smtp.greet_pause and trusted.greet_pause == 0
    assert (default.greylist_delay, default.greylist_window, default.greylist_remember) == (300, 2 * 86400, 36 * 86400)
    assert default.max_recipients == c.smtp.max_recipients == trusted.max_recipients


def test_profile_values_override_smtp_ones(cfg):
    p = cfg.session_profiles
    assert p["partners"].max_message_size == 5_000_000 and p["partners"].greylist
    assert p["printers"].max_message_size == 20_000_000  # from [smtp]
    assert p["printers"].max_errors == 7 and p["printers"].max_rset == 2
    assert p["default"].max_recipients == 50  # the built-in default, redefined
    assert p["trusted"].max_recipients == 1000


@pytest.mark.parametrize(("ip", "authenticated", "profile"), [
    ("192.0.2.9", False, "partners"),  # the first matching ip_policy wins
    ("2001:db8::5", False, "partners"),
    ("::ffff:192.0.2.9", False, "partners"),  # IPv4-mapped
    ("10.1.2.3", False, "printers"),  # an ip_policy inside relay_networks is asked first
    ("10.2.0.1", False, "trusted"),  # relay_networks
    ("198.51.100.1", False, "default"),
    ("198.51.100.1", True, "trusted"),  # authenticated submission
    ("192.0.2.9", True, "trusted"),
    ("not an address", False, "default"),
])
def test_profile_for(cfg, ip, authenticated, profile):
    assert profile_for(ip, authenticated, cfg).name == profile


def test_recipient_policy_for(cfg):
    assert recipient_policy_for("bob@partner.example", "alice@corp.example", cfg).session_profile == "partners"
    assert recipient_policy_for("bob@elsewhere.example", "alice@corp.example", cfg) is None
    assert recipient_policy_for("", "x@world.example", cfg).session_profile == "trusted"  # null sender, outbound
    assert recipient_policy_for("a@b.example", "x@world.example", parse_config("")) is None


@pytest.mark.parametrize(("text", "message"), [
    ('[[ip_policy]]\nsource = ["192.0.2.0/24"]\nprofile = "nope"\n',
     "ip_policy[0].profile: no session profile named 'nope'"),
    ('[[ip_policy]]\nsource = ["192.0.2.0/33"]\nprofile = "default"\n', "ip_policy[0].source[0] (line 2): '192.0.2.0/33' is not a CIDR"),
    ('[[ip_policy]]\nsource = []\nprofile = "default"\n', "ip_policy[0].source"),
    ('[[session_profile]]\nname = "a"\n[[session_profile]]\nname = "a"\n', "session_profile[1].name: profile 'a' is defined twice"),
    ('[[session_profile]]\nname = "a"\nbare_newline = "fix"\n', "session_profile[0].bare_newline"),
    ('[[session_profile]]\nname = "a"\nmax_ehlo = 3\nmax_hello = 3\n', "session_profile[0].max_hello (line 4): unknown key"),
    ('[[session_profile]]\nname = "a"\ngreylist_delay = "3d"\n', "greylist_delay must be shorter than greylist_window"),
    ('[[dnsbl]]\nzone = "bad zone"\n', "dnsbl[0].zone"),
    ('[[dnsbl]]\nzone = "zen.example"\nmatch = ["127.0.0.300"]\n', "dnsbl[0].match[0]"),
    ('[[recipient_policy]]\nsession_profile = "x"\n', "recipient_policy[0].session_profile: no session profile named 'x'"),
    ('[[recipient_policy]]\ncontent_profile = "strict"\n', "recipient_policy[0].content_profile: no content profile named 'strict'"),
    ('[[content_profile]]\nname = "a"\n[[content_profile.rule]]\nname = "r"\naction = "reject"\n', "rule 'r' has no condition"),
    ('[[content_profile]]\nname = "a"\n[[content_profile.rule]]\nname = "r"\nsubject = ["x"]\naction = "redirect"\n', "needs address"),
    ('[[content_profile]]\nname = "a"\n[[content_profile.rule]]\nname = "r"\nsubject = { regex = "(" }\naction = "tag"\n', "is not a regular expression"),
    ('[[content_profile]]\nname = "a"\n[[content_profile.rule]]\nname = "r"\nattachment_type = ["exe"]\naction = "tag"\n', "neither a MIME type nor one of"),
    ('[[content_profile]]\nname = "a"\n[[content_profile.rule]]\nname = "r"\nsubject = ["x"]\naction = "drop"\n', "content_profile[0].rule[0].action"),
    ('[[recipient_policy]]\nrecipient = "corp.example"\n', "recipient_policy[0].recipient"),
    ('[[domain]]\nname = "a.example"\nverify = "list"\n', 'verify applies to deliver = \\"relay\\"'),
    ('[[domain]]\nname = "a.example"\ndeliver = "relay"\nservers = ["192.0.2.1:25"]\nrecipients_file = "/x"\n',
     'recipients_file is read by verify = \\"list\\" only'),
    ('[[domain]]\nname = "a.example"\ndeliver = "relay"\nservers = ["192.0.2.1:25"]\nverify = "ask"\n', "domain[0].verify"),
])
def test_bad_policy_names_the_key(text, message):
    with pytest.raises(ConfigError) as e:
        parse_config(text)
    assert message.replace('\\"', '"') in str(e.value)


def test_relay_domain_verify_defaults():
    c = parse_config('[[domain]]\nname = "a.example"\ndeliver = "relay"\nservers = ["192.0.2.1:25"]\n')
    d = c.domain[0]
    assert (d.verify, d.verify_unreachable, d.recipients_file) == ("none", "tempfail", None)
    assert (d.verify_positive_ttl, d.verify_negative_ttl) == (31 * 86400, 3 * 3600)


def test_config_check_warns_about_mailboxes_of_an_unverified_relay_domain(tmp_path):
    path = tmp_path / "k.toml"
    path.write_text('[[domain]]\nname = "corp.example"\ndeliver = "relay"\nservers = ["192.0.2.1:25"]\nmailboxes = ["a"]\n')
    r = subprocess.run([sys.executable, "-m", "kanmon", "config", "check", "-c", str(path)], capture_output=True, text=True)
    assert r.returncode == 1, r.stderr  # warnings only
    assert "WARNING domain[0]: corp.example: mailboxes/aliases" in r.stderr and 'verify = "none"' in r.stderr
    path.write_text(path.read_text() + 'verify = "list"\n')
    r = subprocess.run([sys.executable, "-m", "kanmon", "config", "check", "-c", str(path)], capture_output=True, text=True)
    assert r.returncode == 0 and "WARNING" not in r.stderr


def test_a_listener_remembers_each_clients_profile_and_forgets_it_with_its_config(cfg, monkeypatch):
    """SmtpServer.profile_of: profile_for once per address (the listener asks at each
    connection), the same answers; a config put in place of the old one is asked again."""
    from kanmon.policy.pipeline import Pipeline
    from kanmon.smtp import server as smtp_server
    from kanmon.smtp.server import SmtpServer

    server = SmtpServer(cfg, Pipeline([]), None, None, lambda *a: None, None, listeners=[])  # type: ignore[arg-type]
    asked = []

    def counting(ip, authenticated, config):
        asked.append(ip)
        return profile_for(ip, authenticated, config)

    monkeypatch.setattr(smtp_server, "profile_for", counting)
    for ip, name in [("192.0.2.9", "partners"), ("10.2.0.1", "trusted"), ("198.51.100.1", "default")] * 3:
        assert server.profile_of(ip).name == name
        assert server.per_ip_limit(ip) == cfg.session_profiles[name].max_connections_per_ip
    assert asked == ["192.0.2.9", "10.2.0.1", "198.51.100.1"]
    server.config = parse_config(POLICY.replace('profile = "partners"', 'profile = "printers"', 1))
    assert server.profile_of("192.0.2.9").name == "printers"
    assert asked[-1] == "192.0.2.9"
