"""One configuration for the cluster: `kanmon cluster push` stores a validated version,
two relays with [cluster] apply it by a graceful reload (each with its [node.NAME]
overlay) and report it; a file that does not validate is not stored; a version that
validates but cannot be loaded is refused by both, the old configuration still serving."""

from __future__ import annotations

import smtplib

from click.testing import CliRunner

from kanmon import clusterconfig
from kanmon.cli import main
from kanmon.config import parse_config
from tests.integration.test_cluster_records import CONFIG
from tests.support.kanmon_node import RunningNode, free_port, wait_for

LOCAL = CONFIG + '\n[cluster]\nnode = "{node}"\n'  # the records config, and the node follows pushes

PUSHED = """
[server]
hostname = "relay.example.test"
[smtp]
relay_networks = ["127.0.0.1/32"]
min_free_disk = "1MB"
[[domain]]
name = "corp.example"
mailboxes = ["tanaka", "suzuki"]
[[session_profile]]
name = "default"
sender_domain_check = false
reject_own_helo = false
[records]
url = "{url}"
[node.mr1.server]
hostname = "mr1-pushed.example.test"
data_dir = "{mr1_dir}"
[node.mr1.smtp]
listen = {mr1_listen}
[node.mr2.server]
data_dir = "{mr2_dir}"
[node.mr2.smtp]
listen = {mr2_listen}
"""


def rcpt(node: RunningNode, address: str) -> tuple[int, str]:
    with smtplib.SMTP(node.host, node.port, timeout=60) as s:
        s.ehlo()
        s.mail("suzuki@corp.example")
        code, text = s.rcpt(address)
        return code, text.decode()


def banner(node: RunningNode) -> str:
    with smtplib.SMTP(timeout=60) as s:
        _code, text = s.connect(node.host, node.port)
        return text.decode()


def test_push_is_applied_by_both_relays_and_a_bad_version_refused_by_both(tmp_path, private_pg):
    url = private_pg.create_database()
    nodes = {}
    for name in ("mr1", "mr2"):
        text = LOCAL.format(node=name, data_dir=tmp_path / name, port=free_port(), url=url)
        nodes[name] = RunningNode(parse_config(text)).start()
    mr1, mr2 = nodes["mr1"], nodes["mr2"]
    section = mr1.config.records

    def fill(listen1: str, listen2: str) -> str:
        return PUSHED.format(url=url, mr1_dir=tmp_path / "mr1", mr2_dir=tmp_path / "mr2",
                             mr1_listen=listen1, mr2_listen=listen2)

    def push(text: str):
        path = tmp_path / "cluster.toml"
        path.write_text(text)
        return CliRunner().invoke(main, ["cluster", "push", "-c", str(path)])

    def outcome(version: int) -> dict:
        return {n: s[1] for n, s in clusterconfig.states(section).items() if s[0] == version}

    try:
        assert rcpt(mr1, "suzuki@corp.example")[0] == 550  # not a mailbox in the local files
        good = fill(f'["127.0.0.1:{mr1.port}"]', f'["127.0.0.1:{mr2.port}"]')
        result = push(good)
        assert result.exit_code == 0 and "version 1" in result.output, result.output
        wait_for(lambda: outcome(1) == {"mr1": "applied", "mr2": "applied"}, 30, "both relays applying version 1")
        assert rcpt(mr1, "suzuki@corp.example")[0] == 250 and rcpt(mr2, "suzuki@corp.example")[0] == 250
        assert "mr1-pushed.example.test" in banner(mr1)  # the node's overlay
        assert "relay.example.test" in banner(mr2)  # the shared value

        bad = push(good.replace("[server]\n", "[server]\nno_such_key = 1\n", 1))
        assert bad.exit_code == 1 and "no_such_key" in bad.output and "nothing pushed" in bad.output
        assert clusterconfig.newest_version(section) == 1

        # Valid, but no node can listen there: refused by both, version 1 still serving.
        unusable = fill('["192.0.2.1:25"]', '["192.0.2.1:25"]')
        assert push(unusable).exit_code == 0
        wait_for(lambda: outcome(2) == {"mr1": "refused", "mr2": "refused"}, 30, "both relays refusing version 2")
        assert rcpt(mr1, "suzuki@corp.example")[0] == 250 and "mr1-pushed.example.test" in banner(mr1)
        assert rcpt(mr2, "suzuki@corp.example")[0] == 250
    finally:
        mr1.stop()
        mr2.stop()
    local = tmp_path / "mr1.toml"
    local.write_text(LOCAL.format(node="mr1", data_dir=tmp_path / "mr1", port=1, url=url))
    status = CliRunner().invoke(main, ["cluster", "status", "--json", "-c", str(local)])
    assert status.exit_code == 0, status.output
    import json

    configs = {n["node"]: n["config"] for n in map(json.loads, status.output.splitlines())}
    assert {n: (c["version"], c["state"]) for n, c in configs.items()} == {"mr1": (2, "refused"), "mr2": (2, "refused")}
    assert "192.0.2.1" in configs["mr1"]["error"]
    text = CliRunner().invoke(main, ["cluster", "status", "-c", str(local)]).output
    assert "newest pushed configuration: version 2" in text and "v2 refused" in text


def test_a_node_restarted_while_the_database_is_down_runs_the_version_it_applied_last(tmp_path, private_pg):
    import os
    import stat

    from kanmon.records.query import search_events

    url = private_pg.create_database()
    port = free_port()
    local = parse_config(LOCAL.format(node="mr1", data_dir=tmp_path / "mr1", port=port, url=url))
    mr1 = RunningNode(local).start()
    try:
        text = PUSHED.format(url=url, mr1_dir=tmp_path / "mr1", mr2_dir=tmp_path / "mr2",
                             mr1_listen=f'["127.0.0.1:{port}"]', mr2_listen='["127.0.0.1:1"]')
        path = tmp_path / "cluster.toml"
        path.write_text(text)
        assert CliRunner().invoke(main, ["cluster", "push", "-c", str(path)]).exit_code == 0
        wait_for(lambda: clusterconfig.states(mr1.config.records).get("mr1", (0,))[:2] == (1, "applied"), 30,
                 "version 1 applied")
    finally:
        mr1.stop()
    cache = tmp_path / "mr1" / clusterconfig.CACHE_FILE
    assert stat.S_IMODE(os.stat(cache).st_mode) == 0o600
    assert clusterconfig.read_cache(tmp_path / "mr1").version == 1

    private_pg.stop()
    again = RunningNode(local).start()  # the local file names no suzuki, and another hostname
    try:
        assert rcpt(again, "suzuki@corp.example")[0] == 250 and "mr1-pushed.example.test" in banner(again)
        again.flush()
        assert any("started with configuration version 1" in e.text for e in search_events(tmp_path / "mr1"))
    finally:
        again.stop()

    cache.write_text(cache.read_text()[:-20])  # damaged: the node starts with its local file
    local_again = RunningNode(local).start()
    try:
        assert rcpt(local_again, "suzuki@corp.example")[0] == 550
        local_again.flush()
        assert any("is damaged" in e.text and e.kind == "error" for e in search_events(tmp_path / "mr1"))
    finally:
        local_again.stop()
    assert not cache.exists() and list(cache.parent.glob(clusterconfig.CACHE_FILE + ".damaged-*"))


def test_a_cached_version_is_read_strictly(tmp_path):
    import json

    import pytest

    clusterconfig.write_cache(tmp_path, 3, "mr1", "[server]\n")
    assert clusterconfig.read_cache(tmp_path).text == "[server]\n"
    good = json.loads((tmp_path / clusterconfig.CACHE_FILE).read_text())
    for bad in ({**good, "text": "[server]\nhostname = 'x'\n"}, {**good, "version": "3"}, {**good, "format": 2}, []):
        (tmp_path / clusterconfig.CACHE_FILE).write_text(json.dumps(bad))
        with pytest.raises(clusterconfig.CacheError):
            clusterconfig.read_cache(tmp_path)


def test_a_reload_with_the_newest_version_refused_runs_the_version_applied_last(tmp_path, private_pg):
    """`kanmon reload` on a relay whose newest pushed version it refuses: it runs the
    version it applied last (as a restart would), not its local file, and says so."""
    import json

    url = private_pg.create_database()
    port = free_port()
    local_path = tmp_path / "mr1.toml"
    local_path.write_text(LOCAL.format(node="mr1", data_dir=tmp_path / "mr1", port=port, url=url))
    mr1 = RunningNode(parse_config(local_path.read_text()))
    mr1.node.config_source = str(local_path)
    mr1.start()
    section = mr1.config.records

    def push(listen: str) -> None:
        path = tmp_path / "cluster.toml"
        path.write_text(PUSHED.format(url=url, mr1_dir=tmp_path / "mr1", mr2_dir=tmp_path / "mr2",
                                      mr1_listen=listen, mr2_listen='["127.0.0.1:1"]'))
        assert CliRunner().invoke(main, ["cluster", "push", "-c", str(path)]).exit_code == 0

    try:
        push(f'["127.0.0.1:{port}"]')
        wait_for(lambda: clusterconfig.states(section).get("mr1", (0,))[:2] == (1, "applied"), 30, "version 1 applied")
        push('["192.0.2.1:25"]')
        wait_for(lambda: clusterconfig.states(section).get("mr1", (0,))[:2] == (2, "refused"), 30, "version 2 refused")
        assert rcpt(mr1, "suzuki@corp.example")[0] == 250  # version 1 serving

        reload = CliRunner().invoke(main, ["reload", "-c", str(local_path)])
        assert reload.exit_code == 0, reload.output
        assert "configuration version 2 refused" in reload.output
        assert "running configuration version 1" in reload.output
        # Version 1 still runs (the local file names no suzuki, and another hostname).
        assert rcpt(mr1, "suzuki@corp.example")[0] == 250 and "mr1-pushed.example.test" in banner(mr1)
        assert clusterconfig.states(section)["mr1"][:2] == (2, "refused")

        status = CliRunner().invoke(main, ["status", "--json", "-c", str(local_path)])
        assert json.loads(status.output)["config"]["cluster"] == {"node": "mr1", "version": 1}, status.output
        text = CliRunner().invoke(main, ["status", "-c", str(local_path)]).output
        assert "runs pushed configuration version 1" in text, text
    finally:
        mr1.stop()


def test_push_names_the_line_of_the_file_and_check_validates_without_pushing(tmp_path):
    """An error names the key's line in the pushed file (in the shared part, or in the
    node's overlay), as `config check` does; `--check` validates and pushes nothing (the
    database, here one that does not exist, is not asked)."""
    path = tmp_path / "cluster.toml"
    good = ('[server]\nhostname = "relay.example.test"\n\n[records]\n'
            'url = "postgresql://kanmon@127.0.0.1:1/kanmon"\n\n'
            '[node.mr1.smtp]\nlisten = ["127.0.0.1:2525"]\n')

    def run(*args: str):
        return CliRunner().invoke(main, ["cluster", "push", *args, "-c", str(path)])

    path.write_text(good.replace('hostname = "relay.example.test"\n', 'hostname = "relay.example.test"\nno_such_key = 1\n'))
    bad = run()
    assert bad.exit_code == 1 and "server.no_such_key (line 3): unknown key" in bad.output, bad.output
    assert "server.no_such_key (line 3): unknown key" in run("--check").output
    path.write_text(good + "bogus = 3\n")
    overlay = run("--check")
    assert overlay.exit_code == 1 and "for node mr1: smtp.bogus (line 9): unknown key" in overlay.output, overlay.output
    path.write_text(good)
    ok = run("--check")
    assert ok.exit_code == 0 and "ok (as it is, and for node mr1); nothing pushed" in ok.output, ok.output
