"""The console's operations pages against a real node: Maintenance (the [[maintenance]]
jobs with last run, result, next run and a missed run shown; run now and dry run from the
page and the API, with roles and audit lines) and DNS health (the periodic check's last
round and history, a check made now, against a dnslib server on loopback)."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from kanmon.admin.accounts import AdminAccounts
from kanmon.admin.maintenance import FILE, encode
from kanmon.clock import ManualClock
from kanmon.config import parse_config
from kanmon.dnscheck.checks import check_domain
from kanmon.dnscheck.report import report_dict
from kanmon.dnscheck.targets import make_source, make_targets
from kanmon.records.query import search_events
from tests.integration.test_console import NODE, api_client, csrf_of, login, send_deferred
from tests.support.dnsserver import DnsServer
from tests.support.kanmon_node import RunningNode, free_port, wait_for

JOBS = """
[[maintenance]]
name = "down-cleanup"
schedule = "0 5 * * *"
action = "delete"
domain = "down.example"

[[maintenance]]
name = "stale"
schedule = "0 4 * * *"
action = "delete"
older_than = "30d"
"""


@pytest.fixture
def node(tmp_path: Path):
    port, console_port = free_port(), free_port()
    config = parse_config(NODE.format(data_dir=tmp_path / "data", port=port, console=console_port, tls="") + JOBS)
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    now = time.time()
    # "stale" has been on the schedule for two days and never ran: it missed a run.
    (data / FILE).write_bytes(encode({}, {"stale": now - 2 * 86400}))
    accounts = AdminAccounts(data)
    accounts.add("alice", "admin", "alice-pw")
    accounts.add("otto", "operator", "otto-pw")
    accounts.add("audrey", "auditor", "audrey-pw")
    with RunningNode(config, clock=ManualClock(now)) as running:
        running.console_url = f"http://127.0.0.1:{console_port}"
        running.clients = []
        try:
            yield running
        finally:
            for client in running.clients:
                client.close()


def row(page: str, index: int) -> str:
    start = page.index(f'id="job-{index}"')
    return page[start:page.index("</tr>", start)]


def test_maintenance_page_shows_the_jobs_and_a_missed_run_in_red(node) -> None:
    c = login(node, "audrey", "audrey-pw")
    page = c.get("/maintenance").text
    cleanup, stale = row(page, 1), row(page, 2)
    assert "down-cleanup" in cleanup and "0 5 * * *" in cleanup and "never run" in cleanup
    assert 'class=""' in cleanup  # never ran, but it has missed nothing yet
    assert 'class="bad"' in stale and "missed the run of" in stale and "older_than 30d" in stale
    assert 'class="act-' not in page  # an auditor sees no run button
    ja = c.get("/maintenance", headers={"Accept-Language": "ja"}).text
    assert "今すぐ実行" not in ja and "実行されなかった予定" in ja
    listing = c.get("/api/v1/maintenance").json()
    assert [j["name"] for j in listing["jobs"]] == ["down-cleanup", "stale"]
    assert listing["jobs"][0]["missed"] is None and listing["jobs"][1]["missed"] is not None
    assert listing == node.node.admin.ops.maintenance_list() | {"now": listing["now"]}
    token = csrf_of(c, "/maintenance")
    assert c.post("/maintenance/down-cleanup/run", data={"csrf": token}).status_code == 403
    assert c.post("/api/v1/maintenance/down-cleanup/run", headers={"X-CSRF-Token": token}).status_code == 403
    assert node.node.admin.ops.run_log().last("down-cleanup") is None


def test_run_now_and_dry_run_from_the_page_with_the_audit_line(node) -> None:
    qid = send_deferred(node)
    c = login(node, "otto", "otto-pw")
    page = c.get("/maintenance").text
    assert 'class="act-run"' in page and 'class="act-dry-run"' in page
    token = csrf_of(c, "/maintenance")
    assert c.post("/maintenance/down-cleanup/run", data={}).status_code == 403  # no CSRF token
    r = c.post("/maintenance/down-cleanup/run", data={"csrf": token, "dry_run": "yes"})
    assert r.status_code == 303
    assert "Dry run down-cleanup: delete matched 1, acted on 0" in c.get(r.headers["location"]).text
    assert node.node.admin.ops.list({})["count"] == 1 and node.node.admin.ops.run_log().last("down-cleanup") is None
    r = c.post("/maintenance/down-cleanup/run", data={"csrf": token})
    assert r.status_code == 303
    assert node.node.admin.ops.list({})["count"] == 0
    after = row(c.get("/maintenance").text, 1)
    assert "matched 1, acted on 1" in after and "console otto" in after and 'class=""' in after
    assert c.post("/maintenance/nope/run", data={"csrf": token}).status_code == 404
    node.flush()
    lines = [e.text for e in search_events(node.data_dir, grep="audit:")]
    assert any("audit: otto (operator) from 127.0.0.1 via console: maintenance run down-cleanup -> "
               "delete matched 1, acted on 1" in t for t in lines), lines
    assert not any("maintenance run" in t and "acted on 0" in t for t in lines)  # a dry run is no write
    assert any(f"delete 1 message(s)" in t and qid in t for t in
               [e.text for e in search_events(node.data_dir, grep=qid)]), "the queue's own admin line"


def test_run_now_through_the_api_with_a_token(node) -> None:
    send_deferred(node)
    api = api_client(node, headers={"Authorization": f"Bearer {AdminAccounts(node.data_dir).new_token('alice')}"})
    dry = api.post("/api/v1/maintenance/down-cleanup/run", json={"dry_run": True}).json()
    assert dry["matched"] == 1 and dry["acted"] == [] and dry["job"] == "down-cleanup"
    assert api.post("/api/v1/maintenance/down-cleanup/run", json={"dry_run": "yes"}).status_code == 400
    assert api.post("/api/v1/maintenance/nope/run").status_code == 404
    done = api.post("/api/v1/maintenance/down-cleanup/run").json()
    assert done["matched"] == 1 and len(done["acted"]) == 1
    last = api.get("/api/v1/maintenance").json()["jobs"][0]["last_run"]
    assert last["by"] == "console alice" and last["acted"] == 1 and last["error"] == ""


DNS_RECORDS = {
    "example.test": ["MX 10 mx1.example.test.", 'TXT "v=spf1 ip4:192.0.2.1 <script>x</script> -all"'],
    "_dmarc.example.test": ['TXT "v=DMARC1; p=reject"'],
    "mx1.example.test": ["A 192.0.2.1"],
}  # no PTR for 192.0.2.1


def test_dns_health_shows_the_periodic_round_and_checks_now(tmp_path: Path) -> None:
    with DnsServer(records=DNS_RECORDS) as dns:
        port, console_port = free_port(), free_port()
        text = NODE.format(data_dir=tmp_path / "data", port=port, console=console_port, tls="")
        text += f'[dns]\nservers = ["{dns.address}"]\ntimeout = "1s"\n' \
                '[dnscheck]\nevery = "6h"\nips = ["192.0.2.1"]\ndomains = ["example.test"]\n'
        config = parse_config(text)
        (tmp_path / "data").mkdir(mode=0o700)
        AdminAccounts(tmp_path / "data").add("audrey", "auditor", "audrey-pw")
        with RunningNode(config, clock=ManualClock(time.time())) as running:
            running.console_url = f"http://127.0.0.1:{console_port}"
            running.clients = []
            wait_for(lambda: getattr(running.node, "dns_monitor", None) is not None
                     and running.node.dns_monitor.last_run is not None, 30, "the periodic DNS check")
            running.flush()
            c = login(running, "audrey", "audrey-pw")  # an auditor may look and check
            page = c.get("/dns").text
            assert "Last periodic check" in page and 'id="dns-example.test"' in page
            assert '<span class="severity-error">error</span>' in page  # the PTR is missing
            assert "got worse (ok -&gt; error)" in page  # the history line
            assert "<script>x" not in page and "&lt;script&gt;x" in page  # DNS data is escaped
            # The notes `kanmon dns check -c` prints: what our outbound delivery does with DANE and MTA-STS.
            assert "outbound DANE: off (no validating resolver" in page
            assert "outbound MTA-STS: off ([outbound] mta_sts = false)" in page
            last = c.get("/api/v1/dns").json()
            assert [r["domain"] for r in last["reports"]] == ["example.test"] and last["every"] == 6 * 3600
            ptr = [f for f in last["reports"][0]["findings"] if f["check"] == "ptr"]
            assert ptr and ptr[0]["severity"] == "error" and ptr[0]["consequence"]

            dns.add_records(records={"1.2.0.192.in-addr.arpa": ["PTR mx1.example.test."]})
            asked = len(dns.queries)
            now = c.get("/api/v1/dns/check").json()
            assert len(dns.queries) > asked  # asked our loopback server, nobody else
            assert now == [report_dict(check_domain(make_source(config), t)) for t in make_targets(config)]
            assert {f["severity"] for f in now[0]["findings"] if f["check"] in ("ptr", "fcrdns")} == {"ok"}
            page = c.get("/dns", params={"run": "1"}, headers={"Accept-Language": "ja"}).text
            assert "今回の検査" in page and "意味と影響" in page and 'id="dns-example.test"' in page
            assert "outbound DANE: off" in page and "outbound MTA-STS: off" in page
            assert any(n.startswith("outbound DANE: off") for n in now[0]["notes"])
            for client in running.clients:
                client.close()


@pytest.fixture
def config_node(tmp_path: Path):
    port, console_port = free_port(), free_port()
    text = NODE.format(data_dir=tmp_path / "data", port=port, console=console_port, tls="")
    path = tmp_path / "kanmon.toml"
    path.write_text(text)
    (tmp_path / "data").mkdir(mode=0o700)
    accounts = AdminAccounts(tmp_path / "data")
    accounts.add("alice", "admin", "alice-pw")
    accounts.add("otto", "operator", "otto-pw")
    accounts.add("audrey", "auditor", "audrey-pw")
    with RunningNode(parse_config(text), clock=ManualClock(time.time())) as running:
        running.node.config_source, running.node.config_text = str(path), text  # as `kanmon serve -c FILE`
        running.console_url = f"http://127.0.0.1:{console_port}"
        running.clients = []
        running.config_path = path
        try:
            yield running
        finally:
            for client in running.clients:
                client.close()


def form_value(page: str, name: str) -> str:
    import re

    return re.search(rf'name="{name}" value="([^"]*)"', page).group(1)


def test_config_page_is_for_admins_only(config_node) -> None:
    for name in ("otto", "audrey"):
        c = login(config_node, name, f"{name}-pw")
        assert 'href="/config"' not in c.get("/").text
        assert c.get("/config").status_code == 403
        assert c.get("/api/v1/config").status_code == 403
        token = csrf_of(c)
        r = c.post("/config/apply", data={"csrf": token, "text": "x"})
        assert r.status_code == 403
        assert c.post("/api/v1/config/check", json={"text": ""}, headers={"X-CSRF-Token": token}).status_code == 403
    assert config_node.config_path.read_text() == config_node.node.config_text


def test_config_check_diff_apply_and_history(config_node) -> None:
    path = config_node.config_path
    original = path.read_text()
    # A connection per request: the apply reloads, and a kept-alive connection belongs to
    # the console the reload retires, which may close it between two requests.
    c = login(config_node, "alice", "alice-pw", limits=httpx.Limits(max_keepalive_connections=0))
    page = c.get("/config").text
    assert str(path) in page and 'retry = &#34;5m..1h&#34;' in page and 'id="differs"' not in page
    token, base = form_value(page, "csrf"), form_value(page, "base")
    # A bad value: the check says so, no apply button, the file stays.
    bad = original.replace('retry = "5m..1h"', 'retry = "soon"')
    r = c.post("/config/check", data={"csrf": token, "base": base, "text": bad})
    assert r.status_code == 200 and "queue.retry" in r.text and 'class="act-apply"' not in r.text
    r = c.post("/config/apply", data={"csrf": token, "base": base, "text": bad})
    assert r.status_code == 400 and path.read_text() == original
    # A good change: the diff against the running config, then apply = reload.
    good = original.replace('retry = "5m..1h"', 'retry = "10m..2h"')
    r = c.post("/config/check", data={"csrf": token, "base": base, "text": good})
    assert 'class="act-apply"' in r.text
    assert '-retry = &#34;5m..1h&#34;' in r.text and '+retry = &#34;10m..2h&#34;' in r.text
    r = c.post("/config/apply", data={"csrf": token, "base": base, "text": good})
    assert r.status_code == 303, r.text
    assert path.read_text() == good and config_node.node.config_text == good
    assert config_node.node.config.queue.retry != parse_config(original).queue.retry
    after = c.get(r.headers["location"]).text
    assert "Applied and reloaded" in after and 'id="differs"' not in after
    history = c.get("/api/v1/config").json()["history"]
    assert [v["by"] for v in history] == ["alice", "before-console"]
    assert c.get(f"/api/v1/config/history/{history[1]['name']}").json()["text"] == original
    assert "10m..2h" in c.get(f"/config/history/{history[0]['name']}").text
    assert c.get("/config/history/..%2Fsecret").status_code == 404
    versions = config_node.data_dir / "console" / "config-history"
    assert oct(versions.stat().st_mode & 0o777) == "0o700"
    assert all(oct(p.stat().st_mode & 0o777) == "0o600" for p in versions.iterdir())
    # An editor opened before that change cannot overwrite it.
    r = c.post("/config/apply", data={"csrf": token, "base": base, "text": original})
    assert r.status_code == 409 and path.read_text() == good
    config_node.flush()
    lines = [e.text for e in search_events(config_node.data_dir, grep="audit:")]
    assert any(f"alice (admin) from 127.0.0.1 via console: config apply {path} -> reloaded: " in t for t in lines), lines
    assert any("config apply" in t and "refused by config check" in t for t in lines)


def test_a_reload_the_node_refuses_puts_the_file_back(config_node, tmp_path: Path) -> None:
    path = config_node.config_path
    original = path.read_text()
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    moved = original.replace(str(tmp_path / "data"), str(tmp_path / "elsewhere"))
    api = api_client(config_node, headers={"Authorization": f"Bearer {AdminAccounts(config_node.data_dir).new_token('alice')}"})
    assert api.post("/api/v1/config/check", json={"text": moved}).json()["usable"] is True
    r = api.post("/api/v1/config/apply", json={"text": moved})
    assert r.status_code == 400 and "data_dir changed" in r.json()["error"]
    assert path.read_text() == original and config_node.node.config_text == original
    assert api.get("/api/v1/config").json()["history"] == []
    assert api.post("/api/v1/config/apply", json={"text": 5}).status_code == 400


def test_balancer_page_shows_real_servers_health_and_history(tmp_path: Path) -> None:
    port, console_port, vport = free_port(), free_port(), free_port()
    text = NODE.format(data_dir=tmp_path / "data", port=port, console=console_port, tls="") + f"""
[[balancer.virtual_server]]
name = "mail"
listen = "127.0.0.1:{vport}"
method = "first-alive"
health = {{ type = "tcp", interval = "0.2s", timeout = "1s", retries = 1 }}

[[balancer.virtual_server.real]]
address = "127.0.0.1:{port}"
mode = "active"

[[balancer.virtual_server.real]]
address = "127.0.0.1:1"
mode = "standby"
"""
    (tmp_path / "data").mkdir(mode=0o700)
    AdminAccounts(tmp_path / "data").add("audrey", "auditor", "audrey-pw")
    with RunningNode(parse_config(text)) as running:
        running.console_url = f"http://127.0.0.1:{console_port}"
        running.clients = []

        def standby_down() -> bool:
            servers = running.node.balancer.status()["virtual_servers"][0]["servers"]
            return servers[1]["state"] == "down" and servers[0]["checks_passed"] > 0

        wait_for(standby_down, 30, "the standby's health check to fail")
        running.flush()
        c = login(running, "audrey", "audrey-pw")
        page = c.get("/balancer").text
        assert 'id="vs-mail"' in page and f"127.0.0.1:{vport}" in page
        assert 'id="serving-mail">active<' in page
        active = page[page.index(f'id="real-127.0.0.1:{port}"'):]
        assert active.startswith(f'id="real-127.0.0.1:{port}"><td>127.0.0.1:{port}</td><td>active</td><td class="state">up<')
        assert 'class="bad" id="real-127.0.0.1:1"' in page
        assert "real server 127.0.0.1:1 (standby)" in page  # the history line of its going down
        doc = c.get("/api/v1/balancer").json()
        assert doc["problem"] is None and doc["status"]["virtual_servers"][0]["serving"] == "active"
        assert "ロードバランサ" in c.get("/balancer", headers={"Accept-Language": "ja"}).text
        for client in running.clients:
            client.close()


def test_balancer_page_without_a_balancer(node) -> None:
    c = login(node, "audrey", "audrey-pw")
    assert 'id="no-balancer"' in c.get("/balancer").text
    assert c.get("/api/v1/balancer").json() == {"status": None, "problem": "no [balancer] is configured on this node",
                                                "history": []}


def test_users_page_lists_mailboxes_and_an_admin_locks_and_resets_a_password(node) -> None:
    from kanmon.store.users import Users

    c = login(node, "audrey", "audrey-pw")
    page = c.get("/users").text
    assert 'id="mailbox-alice@example.test"' in page and 'id="domain-down.example"' in page
    assert "127.0.0.1:1" in page  # the relay domain's next hop
    assert 'class="act-' not in page  # an auditor: no buttons
    token = csrf_of(c, "/users")
    assert c.post("/users/alice@example.test/lock", data={"csrf": token}).status_code == 403
    o = login(node, "otto", "otto-pw")  # an operator: no accounts
    assert 'class="act-' not in o.get("/users").text
    assert o.post("/api/v1/users/alice@example.test/lock", headers={"X-CSRF-Token": csrf_of(o)}).status_code == 403

    a = login(node, "alice", "alice-pw")
    token = csrf_of(a, "/users")
    users = Users(node.node.config)
    r = a.post("/users/alice@example.test/password", data={"csrf": token, "password": "s3cret-one", "confirm": "other"})
    assert r.status_code == 400 and not users.verify("alice@example.test", "s3cret-one")
    r = a.post("/users/alice@example.test/password", data={"csrf": token, "password": "s3cret-one", "confirm": "s3cret-one"})
    assert r.status_code == 303 and users.verify("alice@example.test", "s3cret-one")
    r = a.post("/users/alice@example.test/lock", data={"csrf": token})
    assert r.status_code == 303 and users.info("alice@example.test").locked
    assert not users.verify("alice@example.test", "s3cret-one")  # locked: logins refused
    row = a.get("/users").text
    row = row[row.index('id="mailbox-alice@example.test"'):]
    assert row.startswith('id="mailbox-alice@example.test" class="bad"') and 'class="act-unlock"' in row
    listing = a.get("/api/v1/users").json()
    assert listing["mailboxes"][0]["mailbox"] == "alice@example.test" and listing["mailboxes"][0]["locked"] is True
    assert [d["name"] for d in listing["domains"]] == ["example.test", "down.example"]
    api = api_client(node, headers={"Authorization": f"Bearer {AdminAccounts(node.data_dir).new_token('alice')}"})
    assert api.post("/api/v1/users/alice@example.test/unlock").json()["done"] is True
    assert not users.info("alice@example.test").locked
    assert api.post("/api/v1/users/nobody@example.test/lock").status_code == 404
    assert api.post("/api/v1/users/alice@example.test/explode").status_code == 404
    assert api.post("/api/v1/users/alice@example.test/password", json={"password": ""}).status_code == 400
    node.flush()
    lines = [e.text for e in search_events(node.data_dir, grep="audit:")]
    assert any("alice (admin) from 127.0.0.1 via console: user password alice@example.test -> ok" in t for t in lines)
    assert any("via console: user lock alice@example.test -> ok" in t for t in lines)
    assert any("via api token: user unlock alice@example.test -> ok" in t for t in lines)
    assert not any("s3cret" in e.text for e in search_events(node.data_dir))
