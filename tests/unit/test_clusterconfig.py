"""The pushed configuration: per-node overlays merged into the shared file, the node's
own [records] and [cluster] kept, every value surviving the TOML written for the
receivers, and a file to push validated as it is and with each overlay."""

from __future__ import annotations

import pytest

from kanmon.clusterconfig import node_config, to_toml, validate_push
from kanmon.config import ConfigError

PUSHED = """
[server]
hostname = "relay.example.test"
data_dir = "/var/lib/kanmon"
[smtp]
listen = ["127.0.0.1:2525"]
max_message_size = "20MB"
[[domain]]
name = "corp.example"
mailboxes = ["tanaka", "suzuki"]
[records]
url = "postgresql://kanmon@db.example.test/kanmon"
node = "pushed"
[node.mr1.server]
hostname = "mr1.example.test"
[node.mr1.smtp]
listen = ["192.0.2.11:25", "192.0.2.11:587"]
"""
LOCAL = {"records": {"url": "postgresql://kanmon@db.example.test/kanmon", "node": "mr1"}, "cluster": {"node": "mr1"}}


def test_a_nodes_overlay_replaces_its_keys_and_the_rest_is_shared():
    mr1, text = node_config(PUSHED, "mr1", LOCAL, "v1")
    assert mr1.server.hostname == "mr1.example.test"
    assert str(mr1.server.data_dir) == "/var/lib/kanmon"  # not in the overlay: shared
    assert mr1.smtp.listen == [("192.0.2.11", 25), ("192.0.2.11", 587)]  # a list is replaced whole
    assert mr1.smtp.max_message_size == 20 * 1000 * 1000 or mr1.smtp.max_message_size == 20 * 1024 * 1024
    assert mr1.domain[0].mailboxes == ["tanaka", "suzuki"]
    assert (mr1.records.node, mr1.cluster.node) == ("mr1", "mr1")  # the local file's, not the pushed ones
    mr2, _ = node_config(PUSHED, "mr2", {**LOCAL, "cluster": {"node": "mr2"}}, "v1")  # no overlay
    assert mr2.server.hostname == "relay.example.test" and mr2.smtp.listen == [("127.0.0.1", 2525)]
    assert not ("\n" + text).count("\n\"node\" = ")  # the overlays are not in a node's configuration


def test_the_written_toml_reads_back_as_the_same_values():
    import datetime
    import tomllib

    data = {"s": {"text": '田中\t"x"\\ \x01 \U0001F600', "n": 3, "f": 2.5, "b": False,
                  "when": datetime.date(2026, 12, 1)},
            "list": [{"name": "a", "v": [1, 2]}, {"name": "b", "v": []}], "with space": "k"}
    assert tomllib.loads(to_toml(data)) == data


def test_a_bad_file_is_refused_naming_the_key_once():
    assert validate_push(PUSHED) == []
    errors = validate_push(PUSHED.replace('hostname = "relay.example.test"', 'hostnme = "x"'))
    assert errors == [e for e in errors if "server.hostnme" in e] and len(errors) == 1
    overlay = validate_push(PUSHED + '[node.mr2.smtp]\nlisten = ["not an address"]\n')
    assert len(overlay) == 1 and "for node mr2" in overlay[0] and "smtp.listen" in overlay[0]
    assert validate_push("[server\n")[0].startswith("not valid TOML")
    with pytest.raises(ConfigError):
        node_config(PUSHED.replace("[node.mr1.server]", "[node.mr1.nonsense]"), "mr1", LOCAL, "v1")
