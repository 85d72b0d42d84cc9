"""Configuration: value types, complete validation, errors that name the key and line."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from kanmon.config import (
    ALERT_CATEGORIES,
    Config,
    ConfigError,
    default_config_text,
    example_config_text,
    parse_config,
    parse_duration,
    parse_hostport,
    parse_size,
    reference_markdown,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "text,seconds", [("30s", 30), ("5m", 300), ("4h", 14400), ("3d", 259200), ("0", 0), ("1.5h", 5400), (45, 45)]
)
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["5", "5 minutes", "-1s", "h", "", True])
def test_bad_durations(text):
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize(
    "text,size", [("512KB", 512000), ("50MB", 50_000_000), ("1GB", 10**9), ("1GiB", 2**30), ("100", 100), (7, 7)]
)
def test_sizes(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["1XB", "lots", "-5", ""])
def test_bad_sizes(text):
    with pytest.raises(ValueError):
        parse_size(text)


def test_hostports():
    assert parse_hostport("127.0.0.1:2525") == ("127.0.0.1", 2525)
    assert parse_hostport("[::1]:25") == ("::1", 25)
    assert parse_hostport("store.corp.example:25") == ("store.corp.example", 25)
    for bad in ("127.0.0.1", "127.0.0.1:0", "1.2.3.4:70000", "::1:25", "bad host:25"):
        with pytest.raises(ValueError):
            parse_hostport(bad)


def errors_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as e:
        parse_config(text, "k.toml")
    return e.value.messages


def test_unknown_key_is_named_with_its_line():
    assert errors_of('[server]\nhostname = "a.example"\n\n[smtp]\nlisten = ["127.0.0.1:25"]\nlisen = 1\n') == [
        "k.toml: smtp.lisen (line 6): unknown key"
    ]


def test_bad_values_are_each_named():
    msgs = errors_of(
        '[smtp]\nlisten = ["127.0.0.1"]\nrelay_networks = ["10.0.0.0/33"]\nmax_message_size = "huge"\n'
        '[queue]\nretry = "1h..5m"\nwarn_after = "soon"\n'
    )
    joined = "\n".join(msgs)
    assert "smtp.listen[0] (line 2): '127.0.0.1' is not ip:port" in joined
    assert "smtp.relay_networks[0] (line 3): '10.0.0.0/33' is not a CIDR network" in joined
    assert "smtp.max_message_size (line 4): 'huge' is not a size" in joined
    assert "queue.retry (line 6):" in joined
    assert "queue.warn_after (line 7): 'soon' is not a duration" in joined


def test_nested_array_of_tables_errors_name_their_own_line():
    # [[content_profile.rule]] is counted under each [[content_profile]]: the error is on
    # the third rule's line, not the first rule's key of that name.
    msgs = errors_of(
        '[[content_profile]]\nname = "inbound"\n\n'
        '[[content_profile.rule]]\nname = "exe"\nattachment_name = ["*.exe"]\naction = "quarantine"\n\n'
        '[[content_profile.rule]]\nname = "big"\nsize_over = "20MB"\naction = "reject"\n\n'
        '[[content_profile.rule]]\nname = "lottery"\nsubject = ["lottery"]\naction = "discrad"\n\n'  # line 17
        '[[content_profile]]\nname = "outbound"\n\n'
        '[[content_profile.rule]]\nname = "secret"\nbody = ["confidential"]\naction = "bcc"\naddress = "audit@corp.example"\n\n'
        '[[content_profile.rule]]\nname = "zip"\nattachment_nam = ["*.zip"]\naction = "tag"\n'  # line 30
    )
    joined = "\n".join(msgs)
    assert "k.toml: content_profile[0].rule[2].action (line 17): Input should be" in joined
    assert "k.toml: content_profile[1].rule[1].attachment_nam (line 30): unknown key" in joined
    assert len(msgs) == 2


def test_error_in_a_rule_as_a_whole_names_its_header():
    msgs = errors_of(
        '[[content_profile]]\nname = "a"\n[[content_profile.rule]]\nname = "r1"\nsubject = ["x"]\naction = "tag"\n'
        '[[content_profile]]\nname = "b"\n[[content_profile.rule]]\nname = "r1"\nsubject = ["x"]\naction = "tag"\n'
        '[[content_profile.rule]]\nname = "r2"\naction = "tag"\n'  # line 13: no condition
    )
    assert msgs == ["k.toml: content_profile[1].rule[1] (line 13): rule 'r2' has no condition (it would match every message)"]


BALANCER = (
    '[balancer]\n'
    '[[balancer.virtual_server]]\nname = "a"\nlisten = "127.0.0.1:2500"\n'  # lines 2-4
    '[balancer.virtual_server.health]\ntype = "tcp"\ninterval = "5s"\n'  # lines 5-7
    '[[balancer.virtual_server.real]]\naddress = "127.0.0.31:2525"\nweight = 2\n'  # lines 8-10
    '[[balancer.virtual_server.real]]\naddress = "127.0.0.32:2525"\n'  # lines 11-12
    '[[balancer.virtual_server]]\nname = "b"\nlisten = "127.0.0.1:2501"\n'  # lines 13-15
)


def test_sub_table_of_an_array_element_names_its_own_line():
    (msg,) = errors_of(BALANCER + '[balancer.virtual_server.health]\ntype = "udp"\n')  # line 17
    assert msg.startswith("k.toml: balancer.virtual_server[1].health.type (line 17): Input should be")


def test_array_of_tables_under_the_second_element_is_counted_from_zero():
    (msg,) = errors_of(
        BALANCER + '[[balancer.virtual_server.real]]\naddress = "127.0.0.41:2525"\n'  # lines 16-17
        '[[balancer.virtual_server.real]]\naddress = "127.0.0.42:2525"\nweight = -1\n'  # lines 18-20
    )
    assert msg.startswith("k.toml: balancer.virtual_server[1].real[1].weight (line 20): Input should be")


def test_dotted_keys_name_their_line():
    msgs = errors_of(
        'server.hostname = "a.example"\nqueue.warn_after = "soon"\n'
        + BALANCER + 'health.type = "tcp"\nhealth.interval = "never"\n'  # line 19
    )
    assert msgs == [
        "k.toml: queue.warn_after (line 2): 'soon' is not a duration (write 30s, 5m, 4h or 3d)",
        "k.toml: balancer.virtual_server[1].health.interval (line 19): 'never' is not a duration (write 30s, 5m, 4h or 3d)",
    ]


def test_inline_table_keys_name_their_line():
    (msg,) = errors_of(BALANCER + 'health = { type = "smtp", interval = "never" }\n')  # line 16
    assert msg == "k.toml: balancer.virtual_server[1].health.interval (line 16): 'never' is not a duration (write 30s, 5m, 4h or 3d)"


def test_elements_of_a_multi_line_array_name_their_line():
    (msg,) = errors_of('[smtp]\nlisten = [\n  "127.0.0.1:25",  # a comment, with [brackets]\n  "nowhere",\n]\n')
    assert msg == "k.toml: smtp.listen[1] (line 4): 'nowhere' is not ip:port (e.g. 127.0.0.1:2525 or [::1]:2525)"


def test_missing_key_names_the_table_it_is_missing_from():
    msgs = errors_of('[[domain]]\nname = "a.example"\n\n[[domain]]\ndeliver = "local"\n')
    assert msgs == ["k.toml: domain[1].name (line 4): required key is missing"]


def test_missing_certificate_file_is_an_error(tmp_path):
    msgs = errors_of(f'[tls]\ncert = "{tmp_path}/nope.pem"\nkey = "{tmp_path}/nope.key"\n')
    assert any("tls.cert (line 2): file" in m and "does not exist" in m for m in msgs)


def test_domain_errors():
    assert any("domain[0]" in m and "needs servers" in m for m in errors_of('[[domain]]\nname = "a.example"\ndeliver = "relay"\n'))
    assert any("is listed twice" in m for m in errors_of('[[domain]]\nname = "a.example"\n[[domain]]\nname = "A.example"\n'))
    assert any("not a mailbox" in m for m in errors_of('[[domain]]\nname = "a.example"\naliases = { x = ["nobody"] }\n'))
    assert any("not a usable mailbox name" in m for m in errors_of('[[domain]]\nname = "a.example"\nmailboxes = ["../etc"]\n'))


def test_max_recipients_at_least_100():
    assert any("smtp.max_recipients" in m for m in errors_of("[smtp]\nmax_recipients = 50\n"))


def test_toml_syntax_error_has_a_line():
    (msg,) = errors_of("[smtp\n")
    assert "not valid TOML" in msg and "line 1" in msg


def test_embedded_default_and_example_are_valid():
    default = parse_config(default_config_text())
    assert default.smtp.listen == [("127.0.0.1", 2525)]
    assert str(default.server.data_dir) == "kanmon-data"
    assert default.domain[0].name == "example.test" and default.domain[0].mailboxes == ["postmaster"]
    assert [str(n) for n in default.smtp.relay_networks] == ["127.0.0.0/8"]
    example = parse_config(example_config_text())
    # Its alert categories are the default: every one (a reader copies the list).
    assert example.alerts.categories == list(ALERT_CATEGORIES)


def test_example_mentions_every_key():
    text = example_config_text()

    def keys(model, prefix=""):
        for name, field in model.model_fields.items():
            yield field.alias or name  # the key as written in the file (`from`, not `from_`)
            ann = repr(field.annotation)
            for sub in ("ServerSection", "SmtpSection", "TlsSection", "DomainSection", "OutboundSection", "DnsSection",
                        "QueueSection", "DnsCheckSection", "SubmissionSection", "Pop3Section", "ImapSection", "SieveSection", "ManageSieveSection", "MailboxIndexSection",
                        "BalancerSection", "VirtualServer", "RealServer", "HealthCheck", "MaintenanceJob",
                        "IpPolicySection", "SessionProfileSection", "DnsblSection", "DnsblAllowlistSection",
                        "RecipientPolicySection", "DkimSection", "ContentProfileSection", "ContentRuleSection", "TextMatch", "QuarantineSection", "AntivirusSection", "SpamSection", "ArchiveSection"):
                if f"kanmon.config.{sub}" in ann or ann.endswith(f".{sub}'>"):
                    import kanmon.config as c

                    yield from keys(getattr(c, sub))

    missing = [k for k in set(keys(Config)) if not re.search(rf"(^|[\s{{,#\[]){k}\s*=|\[\[?([a-z_.]*\.)?{k}[\].]", text, re.M)]
    assert missing == []


def test_docs_configuration_matches_the_models():
    assert (ROOT / "docs/configuration.md").read_text() == reference_markdown()


def test_config_check_cli_exit_codes(tmp_path):
    good = tmp_path / "good.toml"
    # data_dir in the test's directory: checking /var/lib/kanmon depends on who runs the test.
    good.write_text(example_config_text().replace('data_dir = "/var/lib/kanmon"', f'data_dir = "{tmp_path / "data"}"'))
    bad = tmp_path / "bad.toml"
    bad.write_text('[smtp]\nlisten = ["nowhere"]\n')
    ok = subprocess.run([sys.executable, "-m", "kanmon", "config", "check", "-c", str(good)], capture_output=True, text=True)
    assert ok.returncode == 0 and "ok" in ok.stdout
    err = subprocess.run([sys.executable, "-m", "kanmon", "config", "check", "-c", str(bad)], capture_output=True, text=True)
    assert err.returncode == 2
    assert "smtp.listen[0] (line 2): 'nowhere' is not ip:port" in err.stderr
    serve = subprocess.run([sys.executable, "-m", "kanmon", "serve", "-c", str(bad)], capture_output=True, text=True, timeout=30)
    assert serve.returncode == 2 and "config error" in serve.stderr


def test_docs_cli_matches_the_commands():
    # In a fresh interpreter, exactly as the docs are made (other tests' CliRunner calls
    # leave state in the shared click command objects).
    out = subprocess.run([sys.executable, "-m", "kanmon.clidoc"], capture_output=True, text=True, check=True)
    assert (ROOT / "docs/cli.md").read_text() == out.stdout, "run: python -m kanmon.clidoc > docs/cli.md"


def test_reference_shows_values_as_the_config_writes_them():
    text = reference_markdown()
    for python_type in ("Literal[", "typing.", "float", "NoneType", "PosixPath", "IPv4Network", "<class"):
        assert python_type not in text, python_type
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert rows
    for row in rows:  # four cells: a `|` inside a cell is escaped
        assert len(re.split(r"(?<!\\)\|", row)) == 6, row
    assert "| `command_timeout` | duration | `\"5m\"` |" in text
    assert "| `max_message_size` | size | `\"50MB\"` |" in text
    assert "| `deliver` | local \\| relay | `\"local\"` |" in text
    assert "| `greet_pause` | duration | `\"500ms\"` |" in text
    assert "| `listen` | list of ip:port | `[\"127.0.0.1:2525\"]` |" in text


def test_setting_formatters():
    from kanmon.config import format_duration_setting, format_size_setting, parse_duration, parse_size

    for seconds, text in ((0, "0"), (30, "30s"), (300, "5m"), (14400, "4h"), (259200, "3d"), (1209600, "2w"), (0.5, "500ms")):
        assert format_duration_setting(seconds) == text and parse_duration(text) == seconds
    for n, text in ((50_000_000, "50MB"), (1_000_000_000, "1GB"), (1048576, "1MiB"), (100, "100B"), (1500, "1500B")):
        assert format_size_setting(n) == text and parse_size(text) == n


def test_example_config_deletes_no_mail_by_default():
    text = example_config_text()
    assert parse_config(text).maintenance == []
    assert '# action = "delete"' in text and "commented out" in text


def test_the_fortimail_size_example_of_the_policy_doc_is_binary() -> None:
    """docs/policy.md gives FortiMail users KiB/MiB (its KB are 1024 bytes, kanmon's 1000):
    the example parses, to FortiMail's byte counts."""
    text = (ROOT / "docs/policy.md").read_text()
    block = next(b for b in re.findall(r"```toml\n(.*?)```", text, re.S) if "32KiB" in b)
    profile = next(p for p in parse_config(block).session_profile if p.name == "default")
    assert (profile.max_header_size, profile.max_message_size) == (32 * 1024, 10240 * 1024)
