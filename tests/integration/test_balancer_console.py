"""The console's balancer page: drain a real server (and give it back) from the page and
from /api/v1/balancer/mode, with roles, CSRF and audit lines, against a real node."""

from __future__ import annotations

from pathlib import Path

import httpx

from kanmon.admin.accounts import AdminAccounts
from kanmon.config import parse_config
from kanmon.console.openapi import openapi_document
from kanmon.records.query import search_events
from tests.integration.test_console import NODE, api_client, csrf_of, login
from tests.support.kanmon_node import RunningNode, free_port, wait_for


def test_drain_from_the_page_and_the_api_with_roles_csrf_and_audit(tmp_path: Path) -> None:
    port, console_port, vport = free_port(), free_port(), free_port()
    active, standby = f"127.0.0.1:{port}", "127.0.0.1:1"
    text = NODE.format(data_dir=tmp_path / "data", port=port, console=console_port, tls="") + f"""
[[balancer.virtual_server]]
name = "mail"
listen = "127.0.0.1:{vport}"
method = "first-alive"
health = {{ type = "tcp", interval = "0.2s", timeout = "1s", retries = 1 }}

[[balancer.virtual_server.real]]
address = "{active}"
mode = "active"

[[balancer.virtual_server.real]]
address = "{standby}"
mode = "standby"
"""
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    accounts = AdminAccounts(data)
    accounts.add("alice", "admin", "alice-pw")
    accounts.add("otto", "operator", "otto-pw")
    accounts.add("audrey", "auditor", "audrey-pw")
    with RunningNode(parse_config(text)) as running:
        running.console_url = f"http://127.0.0.1:{console_port}"
        running.clients = []
        try:
            balancer = running.node.balancer

            def mode_of(address: str) -> str:
                servers = balancer.status()["virtual_servers"][0]["servers"]
                return next(s["mode"] for s in servers if s["address"] == address)

            # An auditor sees the page without buttons and may not post.
            audrey = login(running, "audrey", "audrey-pw")
            page = audrey.get("/balancer").text
            assert f'id="real-{active}"' in page and 'class="set-' not in page
            form = {"csrf": csrf_of(audrey, "/balancer"), "virtual": "mail", "real": active, "mode": "disabled"}
            assert audrey.post("/balancer/mode", data=form).status_code == 403
            assert audrey.post("/api/v1/balancer/mode", json={"virtual": "mail", "real": active, "mode": "disabled"},
                               headers={"X-CSRF-Token": form["csrf"]}).status_code == 403
            assert mode_of(active) == "active"

            # An admin drains from the page: the form needs its CSRF token.
            alice = login(running, "alice", "alice-pw")
            page = alice.get("/balancer").text
            assert 'class="set-disabled"' in page and 'class="set-standby"' in page
            assert 'class="set-enabled"' not in page  # nothing to give back yet
            form = {"virtual": "mail", "real": active, "mode": "disabled"}
            assert alice.post("/balancer/mode", data=form).status_code == 403
            assert alice.post("/balancer/mode", data={**form, "csrf": "forged"}).status_code == 403
            assert mode_of(active) == "active"
            r = alice.post("/balancer/mode", data={**form, "csrf": csrf_of(alice, "/balancer")})
            assert r.status_code == 200, r.text
            assert 'id="mode-result"' in r.text and f"{active}: now disabled" in r.text
            assert mode_of(active) == "disabled"
            assert 'class="set-enabled"' in r.text and "set by an administrator; configured" in r.text

            # An operator gives it back through the API: with the cookie, the header is needed.
            otto = login(running, "otto", "otto-pw")
            body = {"virtual": "mail", "real": active, "mode": "enabled"}
            assert otto.post("/api/v1/balancer/mode", json=body).status_code == 403
            r = otto.post("/api/v1/balancer/mode", json=body, headers={"X-CSRF-Token": csrf_of(otto, "/balancer")})
            assert r.status_code == 200, r.text
            assert (r.json()["mode"], r.json()["admin_mode"], r.json()["changed"]) == ("active", None, True)
            assert mode_of(active) == "active"

            # A Bearer token needs no CSRF token; unknown names are 404, a bad mode 400.
            token = api_client(running, headers={"Authorization": f"Bearer {accounts.new_token('otto')}"})
            r = token.post("/api/v1/balancer/mode", json={**body, "mode": "standby"})
            assert r.status_code == 200 and r.json()["mode"] == "standby"
            assert token.post("/api/v1/balancer/mode", json={**body, "virtual": "web"}).status_code == 404
            assert token.post("/api/v1/balancer/mode", json={**body, "real": "127.0.0.9:9"}).status_code == 404
            assert token.post("/api/v1/balancer/mode", json={**body, "mode": "active"}).status_code == 400
            assert token.post("/api/v1/balancer/mode", json={"virtual": "mail"}).status_code == 400
            assert token.post("/api/v1/balancer/mode", json={**body, "real": standby, "mode": "enabled"}).json()[
                "changed"] is False
            without = httpx.post(f"{running.console_url}/api/v1/balancer/mode", json=body, timeout=30)
            assert without.status_code == 401

            running.flush()

            def audited() -> list[str]:
                return [e.text for e in search_events(data, grep="audit:") if "balancer" in e.text]

            wait_for(lambda: len(audited()) >= 4, 60, "the audit lines")
            lines = audited()
            assert any(f"alice (admin) from 127.0.0.1 via console: balancer disabled mail {active} -> now disabled"
                       in t for t in lines), lines
            assert any(f"otto (operator) from 127.0.0.1 via console: balancer enabled mail {active} -> now active"
                       in t for t in lines), lines
            assert any("via api token: balancer enabled mail 127.0.0.9:9 -> refused: virtual server 'mail' has no "
                       "real server '127.0.0.9:9'" in t for t in lines), lines
            history = alice.get("/api/v1/balancer").json()["history"]
            assert any(f"real server {active} set to disabled" in e["text"] and "by alice (console" in e["text"]
                       for e in history), history
        finally:
            for client in running.clients:
                client.close()


def test_the_openapi_document_describes_the_mode_route() -> None:
    op = openapi_document()["paths"]["/api/v1/balancer/mode"]["post"]
    schema = op["requestBody"]["content"]["application/json"]["schema"]
    assert schema["required"] == ["virtual", "real", "mode"]
    assert schema["properties"]["mode"]["enum"] == ["disabled", "standby", "enabled"]
    assert {"401", "403", "404", "400"} <= set(op["responses"])
