"""The web console and /api/v1 against a real node: login, sessions, CSRF, roles, every
route refused without a login, the queue actions, the test alert arriving in a mailbox,
the audit lines, Japanese pages, TLS with the node's certificate."""

from __future__ import annotations

import base64

import re
import smtplib
import ssl
import time
from pathlib import Path

import httpx
import pytest
import trustme

from kanmon.admin.accounts import AdminAccounts
from kanmon.clock import ManualClock
from kanmon.config import parse_config
from kanmon.console.app import ConsoleApp
from kanmon.console.openapi import openapi_document
from kanmon.records.query import search_events
from tests.support.kanmon_node import TEST_DEFAULT_PROFILE, RunningNode, free_port, maildir_messages, wait_for

NODE = """
[server]
hostname = "mx1.example.test"
data_dir = "{data_dir}"
[smtp]
listen = ["127.0.0.1:{port}"]
relay_networks = ["127.0.0.0/8"]
min_free_disk = "1MB"
[[domain]]
name = "example.test"
mailboxes = ["alice", "bob"]
[[domain]]
name = "down.example"
deliver = "relay"
servers = ["127.0.0.1:1"]
tls = "none"
[outbound]
connect_timeout = "2s"
[queue]
retry = "5m..1h"
[alerts]
to = ["alice@example.test"]
[console]
listen = "127.0.0.1:{console}"
tls = false
{tls}
""" + TEST_DEFAULT_PROFILE

PUBLIC = {"/login", "/api/v1/openapi.json", "/q/forged.token"}  # /q/: the digest's links, the token is the capability


def node_config(tmp_path: Path, tls: str = ""):
    port, console = free_port(), free_port()
    text = NODE.format(data_dir=tmp_path / "data", port=port, console=console, tls=tls)
    if tls:
        text = text.replace("tls = false\n", "")
    return parse_config(text), port, console


@pytest.fixture
def console(tmp_path: Path):
    config, port, console_port = node_config(tmp_path)
    (tmp_path / "data").mkdir(mode=0o700)
    accounts = AdminAccounts(tmp_path / "data")
    accounts.add("alice", "admin", "alice-pw")
    accounts.add("otto", "operator", "otto-pw")
    accounts.add("audrey", "auditor", "audrey-pw")
    with RunningNode(config, clock=ManualClock(time.time())) as node:
        node.console_url = f"http://127.0.0.1:{console_port}"
        node.clients = []
        try:
            yield node
        finally:
            for client in node.clients:
                client.close()


def login(node, name: str, password: str, **kw) -> httpx.Client:
    client = api_client(node, **kw)
    page = client.get("/login")
    token = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
    r = client.post("/login", data={"username": name, "password": password, "csrf": token})
    assert r.status_code == 303, r.text
    return client


def api_client(node, **kw) -> httpx.Client:
    client = httpx.Client(base_url=node.console_url, timeout=30, **kw)
    node.clients.append(client)
    return client


def csrf_of(client: httpx.Client, path: str = "/") -> str:
    return re.search(r'name="csrf" value="([^"]+)"', client.get(path).text).group(1)


def send_deferred(node) -> str:
    with smtplib.SMTP(node.host, node.port, timeout=30) as s:
        s.sendmail("sender@example.test", ["bob@down.example"], b"Subject: stuck\r\n\r\nhello\r\n")
    node.wait_idle()
    items = node.node.admin.ops.list({"state": "deferred"})["items"]
    assert len(items) == 1
    return items[0]["id"]


def test_every_route_but_login_static_openapi_and_digest_links_needs_a_login(console) -> None:
    app = ConsoleApp(console.node, console.node.config)
    paths = []
    for route in app.app.routes:
        path = getattr(route, "path", "")
        if path.startswith("/static"):
            continue
        methods = getattr(route, "methods", None) or {"GET"}
        path = path.replace("{qid}", "0123456789ABCDE").replace("{action}", "hold").replace("{token}", "forged.token")
        paths += [(m, path) for m in methods if m != "HEAD"]
    assert len(paths) > 25
    crawled = {path for _m, path in paths}
    assert {"/users/add", "/users/alias", "/policies", "/events/tail", "/queue/backup", "/queue/restore",
            "/api/v1/policies", "/api/v1/events/tail", "/api/v1/users/mailboxes", "/api/v1/users/aliases",
            "/api/v1/queue/backup", "/api/v1/queue/restore"} <= crawled
    with httpx.Client(base_url=console.console_url, timeout=30) as c:
        for method, path in paths:
            r = c.request(method, path)
            if path in PUBLIC:
                assert r.status_code in (200, 403), (method, path, r.status_code)
                if path.startswith("/q/"):  # a forged link is refused, and its page is no login
                    assert r.status_code == 403 and "This link is not valid" in r.text, (method, path)
            elif path.startswith("/api/"):
                assert r.status_code == 401, (method, path, r.status_code)
            else:
                assert r.status_code == 303 and r.headers["location"].startswith("/login"), (method, path, r.status_code)
            # A forged cookie and a wrong token are no better than none.
            forged = {"Cookie": "kanmon_session=eyJ4IjoxfQ.AAAA"}
            if path.startswith("/api/"):
                forged["Authorization"] = "Bearer kmn_nope"
            r = c.request(method, path, headers=forged)
            if path not in PUBLIC:
                assert r.status_code in (303, 401), (method, path, r.status_code)
        assert c.get("/static/htmx.min.js").status_code == 200
        assert c.get("/static/console.css").status_code == 200
        assert c.get("/api/v1/openapi.json").json()["openapi"].startswith("3.")


def test_openapi_names_exactly_the_api_routes(console) -> None:
    app = ConsoleApp(console.node, console.node.config)
    served = {r.path for r in app.app.routes if getattr(r, "path", "").startswith("/api/v1/")} - {"/api/v1/openapi.json"}
    documented = {p.replace("/hold", "/{action}").replace("/release", "/{action}").replace("/delete", "/{action}")
                  for p in openapi_document()["paths"]}
    assert served == documented


def test_login_sets_a_strict_httponly_cookie_and_a_wrong_password_is_refused(console) -> None:
    with httpx.Client(base_url=console.console_url, timeout=30) as c:
        page = c.get("/login")
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert "unsafe-inline" not in page.headers["content-security-policy"]
        assert "<script>" not in page.text  # no inline script
        token = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
        bad = c.post("/login", data={"username": "alice", "password": "nope", "csrf": token})
        assert bad.status_code == 401 and "kanmon_session" not in bad.headers.get("set-cookie", "")
        nocsrf = c.post("/login", data={"username": "alice", "password": "alice-pw"})
        assert nocsrf.status_code == 403
        ok = c.post("/login", data={"username": "alice", "password": "alice-pw", "csrf": token})
        assert ok.status_code == 303
        cookie = [h for h in ok.headers.get_list("set-cookie") if h.startswith("kanmon_session=")][0]
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
        assert "Secure" not in cookie  # plain HTTP on loopback
        assert c.get("/").status_code == 200
    console.flush()
    texts = [e.text for e in search_events(console.data_dir, grep="console:")]
    assert any("login failed for alice" in t for t in texts) and any("alice (admin) logged in" in t for t in texts)


def test_login_is_throttled_by_the_shared_limiter(console) -> None:
    throttle = console.node.throttle
    throttle.block_ip_after = 3
    throttle.base_delay = throttle.max_delay = 0.0
    with httpx.Client(base_url=console.console_url, timeout=30) as c:
        for _ in range(3):
            token = re.search(r'name="csrf" value="([^"]+)"', c.get("/login").text).group(1)
            c.post("/login", data={"username": "alice", "password": "wrong", "csrf": token})
        token = re.search(r'name="csrf" value="([^"]+)"', c.get("/login").text).group(1)
        r = c.post("/login", data={"username": "alice", "password": "alice-pw", "csrf": token})
        assert r.status_code == 429  # blocked even with the right password
    assert throttle.blocked_for("127.0.0.1") > 0


def test_a_write_without_the_csrf_token_is_refused(console) -> None:
    qid = send_deferred(console)
    c = login(console, "alice", "alice-pw")
    assert c.post(f"/queue/{qid}/hold").status_code == 403
    assert c.post(f"/api/v1/queue/{qid}/hold").status_code == 403
    assert c.post(f"/api/v1/queue/{qid}/hold", headers={"X-CSRF-Token": "wrong"}).status_code == 403
    assert console.node.admin.ops.list({"state": "hold"})["count"] == 0
    r = c.post(f"/api/v1/queue/{qid}/hold", headers={"X-CSRF-Token": csrf_of(c)})
    assert r.status_code == 200 and r.json()["acted"] == [qid]


def test_hold_and_release_from_the_pages_and_the_audit_lines(console) -> None:
    qid = send_deferred(console)
    c = login(console, "otto", "otto-pw")
    page = c.get("/queue", params={"state": "deferred"})
    assert qid in page.text and 'class="act-hold"' in page.text
    token = csrf_of(c, f"/queue/{qid}")
    r = c.post(f"/queue/{qid}/hold", data={"csrf": token})
    assert r.status_code == 303
    assert console.node.admin.ops.list({"state": "hold"})["items"][0]["id"] == qid
    r = c.post(f"/queue/{qid}/release", data={"csrf": token})
    assert r.status_code == 303 and console.node.admin.ops.list({"state": "hold"})["count"] == 0
    console.flush()
    lines = [e for e in search_events(console.data_dir, grep="audit:")]
    assert any(f"audit: otto (operator) from 127.0.0.1 via console: queue hold {qid}" in e.text for e in lines)
    assert any("queue release" in e.text for e in lines)
    assert all(e.kind == "audit" for e in lines)
    assert any(e.fields and e.fields.get("who") == "otto" for e in lines)


def test_only_the_consoles_own_status_lines_are_shown_never_text_from_a_link(console) -> None:
    """?msg= and ?error= show a status line only when the console wrote it, for this session:
    a crafted link cannot put official-looking text on a page."""
    qid = send_deferred(console)
    c = login(console, "otto", "otto-pw")
    r = c.post(f"/queue/{qid}/hold", data={"csrf": csrf_of(c, f"/queue/{qid}")})
    assert r.status_code == 303
    own = r.headers["location"]
    assert '<p class="msg" id="msg">hold: 1 of 1</p>' in c.get(own).text
    forged = "Your password expired: call +81-3-0000-0000"
    for path in ("/queue", f"/queue/{qid}", "/quarantine", "/maintenance", "/users"):
        page = c.get(path, params={"msg": forged}).text
        assert 'id="msg"' not in page and "password expired" not in page, path
    assert "password expired" not in c.get("/maintenance", params={"error": forged}).text
    page = login(console, "alice", "alice-pw").get("/queue/backup", params={"error": forged})
    assert page.status_code == 200 and "password expired" not in page.text
    # The console's own line with its text changed, or shown to another session: nothing.
    url = httpx.URL(own)
    changed = url.copy_set_param("msg", forged)
    assert "password expired" not in c.get(str(changed)).text and 'id="msg"' not in c.get(str(changed)).text
    other = login(console, "otto", "otto-pw")
    assert 'id="msg"' not in other.get(own).text


def test_bulk_delete_by_filter_asks_first_with_the_count(console) -> None:
    qid = send_deferred(console)
    c = login(console, "alice", "alice-pw")
    token = csrf_of(c, "/queue")
    r = c.post("/queue/act", data={"csrf": token, "action": "delete", "filter_query": "domain=down.example"})
    assert r.status_code == 200 and 'id="confirm-count"' in r.text and "<strong>1</strong>" in r.text
    assert console.node.admin.ops.list({})["count"] == 1  # nothing done yet
    r = c.post("/queue/act", data={"csrf": token, "action": "delete", "filter_query": "domain=down.example",
                                   "confirm": "yes"})
    assert r.status_code == 303 and console.node.admin.ops.list({})["count"] == 0
    # No filter and no selection is not "the whole queue".
    assert c.post("/queue/act", data={"csrf": token, "action": "delete", "filter_query": ""}).status_code == 400
    assert qid


def test_auditor_reads_but_sees_no_write_button_and_gets_403(console) -> None:
    qid = send_deferred(console)
    c = login(console, "audrey", "audrey-pw")
    for path in ("/", "/queue", f"/queue/{qid}", "/alerts", "/trace", "/events", "/quarantine"):
        r = c.get(path)
        assert r.status_code == 200, path
        assert 'class="act-' not in r.text and 'class="test"' not in r.text, path
    token = csrf_of(c)
    assert c.post(f"/queue/{qid}/hold", data={"csrf": token}).status_code == 403
    assert c.post(f"/api/v1/queue/{qid}/delete", headers={"X-CSRF-Token": token}).status_code == 403
    assert c.post("/api/v1/alerts/test", json={"category": "queue"}, headers={"X-CSRF-Token": token}).status_code == 403
    assert console.node.admin.ops.list({})["count"] == 1
    # With a token too.
    secret = AdminAccounts(console.data_dir).new_token("audrey")
    api = api_client(console, headers={"Authorization": f"Bearer {secret}"})
    assert api.get("/api/v1/queue").status_code == 200
    assert api.post(f"/api/v1/queue/{qid}/hold").status_code == 403


def test_api_queue_answers_what_queue_list_json_answers(console) -> None:
    qid = send_deferred(console)
    secret = AdminAccounts(console.data_dir).new_token("otto")
    api = api_client(console, headers={"Authorization": f"Bearer {secret}"})
    listed = api.get("/api/v1/queue", params={"state": "deferred", "domain": "down.example"}).json()
    expected = console.node.admin.ops.list({"state": "deferred", "domain": "down.example"})
    assert listed["items"] == expected["items"] and listed["count"] == 1
    assert api.get("/api/v1/queue", params={"domain": "elsewhere.example"}).json()["count"] == 0
    assert api.get("/api/v1/queue", params={"older_than": "soon"}).status_code == 400
    page = api.get("/api/v1/queue", params={"offset": 1, "limit": 10}).json()
    assert page["count"] == 1 and page["items"] == []
    # A write with a Bearer token needs no CSRF token.
    assert api.post(f"/api/v1/queue/{qid}/hold").json()["acted"] == [qid]
    assert api.post(f"/api/v1/queue/{qid}/release").json()["acted"] == [qid]
    assert api.get(f"/api/v1/queue/{qid}").json()["rcpts"] == ["bob@down.example"]
    assert api.post(f"/api/v1/queue/{qid}/explode").status_code == 404
    assert api.get("/api/v1/queue/not-an-id").status_code == 404
    trace = api.get("/api/v1/trace", params={"q": qid}).json()
    assert trace[0]["queue_id"] == qid
    assert api.post(f"/api/v1/queue/{qid}/delete").json()["acted"] == [qid]
    assert api.get("/api/v1/me").json() == {"name": "otto", "role": "operator", "via": "api token"}


def test_the_queue_page_pages_through_the_node_and_keeps_its_filters(console) -> None:
    """120 queued messages (stored as a receiver process stores them): the page shows 50
    rows, the total and the page links; each page is the slice of the whole list the node
    answers, asked of it by offset and limit; the filters stay in every link."""
    from kanmon.model import Envelope, new_queue_id
    from kanmon.spool.store import Spool

    spool = Spool(console.data_dir, fsync=False)
    now = time.time()
    for i in range(120):
        at = now - 10_000 + i
        rcpt = f"u{i}@down.example" if i % 2 else f"u{i}@other.example"
        spool.store_blocking(new_queue_id(at), Envelope("sender@example.test", [rcpt], received_at=at),
                             b"Subject: paged\r\n\r\nx\r\n")
    spool.close()
    asked = []
    real = console.node.admin.handle

    async def handle(request, *a, **kw):
        asked.append(request)
        return await real(request, *a, **kw)

    console.node.admin.handle = handle
    c = login(console, "audrey", "audrey-pw")
    whole = console.node.admin.ops.list({})["items"]
    assert len(whole) == 120
    first = c.get("/queue")
    assert first.status_code == 200
    rows = re.findall(r'<tr id="row-([0-9A-Za-z]+)"', first.text)
    assert rows == [r["id"] for r in whole[:50]]
    assert re.search(r'id="queue-total">[^<]*: 120 \(1-50\)', first.text)
    assert re.search(r'id="page-of">[^<]*1 / 3<', first.text)
    links = re.findall(r'<a href="([^"]+)" class="page-link">(\d)</a>', first.text)
    assert [n for _, n in links] == ["2", "3"]
    third = c.get(links[1][0].replace("&amp;", "&"))
    assert re.findall(r'<tr id="row-([0-9A-Za-z]+)"', third.text) == [r["id"] for r in whole[100:]]
    assert re.search(r'id="queue-total">[^<]*: 120 \(101-120\)', third.text)
    assert 'id="next-page"' not in third.text and 'rel="prev"' in third.text
    # Only one page's rows were asked of the node, never the whole queue.
    lists = [r for r in asked if r.get("op") == "list"]
    assert lists and all(r["args"].get("limit") == 50 for r in lists), lists
    # A filter: its matches are paged, and every page link keeps it.
    down = c.get("/queue", params={"domain": "down.example", "limit": 25})
    assert re.search(r'id="queue-total">[^<]*: 60 \(1-25\)', down.text)
    links = re.findall(r'<a href="([^"]+)" class="page-link">', down.text)
    assert len(links) == 2 and all("domain=down.example" in u and "limit=25" in u for u in links)
    second = c.get(links[0].replace("&amp;", "&"))
    expected = [r["id"] for r in console.node.admin.ops.list({"domain": "down.example"})["items"][25:50]]
    assert re.findall(r'<tr id="row-([0-9A-Za-z]+)"', second.text) == expected
    # The API pages the same way, and answers the count with each page.
    secret = AdminAccounts(console.data_dir).new_token("audrey")
    api = api_client(console, headers={"Authorization": f"Bearer {secret}"})
    page = api.get("/api/v1/queue", params={"domain": "down.example", "offset": 25, "limit": 25}).json()
    assert page["count"] == 60 and [r["id"] for r in page["items"]] == expected


def test_the_dashboard_charts_are_counted_on_each_visit_without_top_lists(console) -> None:
    """The charts read the history's counts per quarter hour (milliseconds): each visit
    counts them again, the last 24 hours by hour and 30 days by day, buckets only."""
    import asyncio

    app = ConsoleApp(console.node, console.node.config)
    asked = []

    async def stats(by, since, top=5):
        asked.append((by, since, top))
        return {"by": by, "since": since}

    app._stats = stats
    now = 1_800_000_000.0
    hour, day = 24 * 3600, 30 * 86400

    async def visits() -> None:
        for at in (now, now + 1):
            await app._chart_stats("hour", at)
            await app._chart_stats("day", at)

    asyncio.run(visits())
    assert asked == [("hour", now - hour, 0), ("day", now - day, 0), ("hour", now + 1 - hour, 0), ("day", now + 1 - day, 0)]


def test_the_alert_test_button_mails_a_test_alert_to_the_mailbox(console) -> None:
    c = login(console, "alice", "alice-pw")
    token = csrf_of(c, "/alerts")
    r = c.post("/alerts/test", data={"csrf": token, "category": "queue"}, headers={"HX-Request": "true"})
    assert r.status_code == 200, r.text
    qid = re.search(r'class="qid">([0-9A-Za-z]+)<', r.text).group(1)
    wait_for(lambda: maildir_messages(console.data_dir, "alice@example.test"), 30, "the alert in the mailbox")
    mail = maildir_messages(console.data_dir, "alice@example.test")[0]
    assert b"X-Kanmon-Alert: queue" in mail
    console.flush()
    status = c.get(f"/alerts/status/{qid}")
    console.flush()
    assert "delivery-status" in status.text, [e.text for e in search_events(console.data_dir, grep="console:")]
    assert c.post("/api/v1/alerts/test", json={"category": "nope"}, headers={"X-CSRF-Token": token}).status_code == 400


def test_the_alert_test_button_sends_to_the_address_given_instead(console) -> None:
    """As `kanmon alert test --to`: the page's address field, and the API's "to"."""
    c = login(console, "alice", "alice-pw")
    token = csrf_of(c, "/alerts")
    page = c.post("/alerts/test", data={"csrf": token, "category": "disk", "to": "bob@example.test"})  # no script
    assert page.status_code == 200, page.text
    assert 'id="alert-test-to" value="bob@example.test"' in page.text  # kept for the next test
    wait_for(lambda: maildir_messages(console.data_dir, "bob@example.test"), 30, "the alert in bob's mailbox")
    assert b"X-Kanmon-Alert: disk" in maildir_messages(console.data_dir, "bob@example.test")[0]
    r = c.post("/api/v1/alerts/test", json={"category": "queue", "to": "bob@example.test"}, headers={"X-CSRF-Token": token})
    assert r.status_code == 200 and r.json()["to"] == "bob@example.test", r.text
    wait_for(lambda: len(maildir_messages(console.data_dir, "bob@example.test")) == 2, 30, "the second in bob's mailbox")
    assert maildir_messages(console.data_dir, "alice@example.test") == []  # [alerts] to had neither
    for bad in ("bob", "<bob@example.test>", "a@b.example, c@d.example", "bob@example.test\r\nRCPT TO:<x@y>"):
        r = c.post("/api/v1/alerts/test", json={"category": "queue", "to": bad}, headers={"X-CSRF-Token": token})
        assert r.status_code == 400 and "one mailbox" in r.text, (bad, r.text)


def test_pages_in_japanese_by_browser_and_by_the_admin_choice(console) -> None:
    c = login(console, "alice", "alice-pw")
    assert "ダッシュボード" in c.get("/", headers={"Accept-Language": "ja,en;q=0.5"}).text
    assert "Dashboard" in c.get("/", headers={"Accept-Language": "en"}).text
    c.post("/settings", data={"csrf": csrf_of(c, "/settings"), "lang": "ja"})
    assert "ダッシュボード" in c.get("/", headers={"Accept-Language": "en"}).text


def test_error_pages_are_in_the_readers_language(console, monkeypatch: pytest.MonkeyPatch) -> None:
    ja = {"Accept-Language": "ja,en;q=0.5"}
    c = login(console, "otto", "otto-pw")
    r = c.get("/config", headers=ja)  # an operator may not see the configuration
    assert r.status_code == 403 and '<html lang="ja">' in r.text
    assert "403 権限がありません" in r.text and "ロール operator にはこの操作の権限がありません" in r.text
    assert "ダッシュボード" in r.text  # the page has the console's navigation
    r = c.get("/config", headers={"Accept-Language": "en"})
    assert r.status_code == 403 and "403 Forbidden" in r.text and "the role operator may not do this" in r.text
    r = c.get("/queue", params={"offset": "x<b>"}, headers=ja)
    assert r.status_code == 400 and "400 不正な要求" in r.text and "&#39;x&lt;b&gt;&#39; は数値ではありません" in r.text
    r = c.get("/queue/not-an-id", headers=ja)
    assert r.status_code == 404 and "404 見つかりません" in r.text and "キューIDではありません" in r.text
    # Starlette's own refusals: no such route, a method the route does not take; with no login too.
    for client in (c, api_client(console)):
        r = client.get("/no/such/page", headers=ja)
        assert r.status_code == 404 and "404 見つかりません" in r.text and "このページはありません" in r.text
    r = api_client(console).post("/", headers=ja)
    assert r.status_code == 405 and "405 このメソッドは使えません" in r.text and r.headers["allow"]
    assert api_client(console).get("/api/v1/no/such").json() == {"error": "no such page"}
    # A crash: the admin's own language choice holds for it too.
    c.post("/settings", data={"csrf": csrf_of(c, "/settings"), "lang": "ja"})

    async def broken(request):
        raise RuntimeError("boom")

    monkeypatch.setattr(console.node.admin, "handle", broken)
    r = c.get("/queue", headers={"Accept-Language": "en"})
    assert r.status_code == 500 and "500 内部エラー" in r.text and "詳細はイベントログ" in r.text
    assert "boom" not in r.text


def test_dashboard_draws_the_volume_chart(console) -> None:
    send_deferred(console)
    c = login(console, "alice", "alice-pw")
    page = c.get("/").text
    assert page.count("<svg") == 2 and "series-received" in page
    assert 'id="queue-count"><a href="/queue">1</a>' in page
    assert re.search(r'id="disk-free">[0-9.]+ ?[KMGT]?i?B<', page), page


def test_a_session_ends_on_logout_on_removal_and_when_the_password_changes(console) -> None:
    c = login(console, "otto", "otto-pw")
    assert c.get("/").status_code == 200
    AdminAccounts(console.data_dir).set_password("otto", "new-pw")
    assert c.get("/").status_code == 303
    c = login(console, "otto", "new-pw")
    AdminAccounts(console.data_dir).remove("otto")
    assert c.get("/api/v1/me").status_code == 401
    c = login(console, "alice", "alice-pw")
    stolen = dict(c.cookies)
    r = c.post("/logout", data={"csrf": csrf_of(c)})
    assert r.status_code == 303
    assert c.get("/").status_code == 303
    replay = api_client(console)
    replay.cookies.update(stolen)
    assert replay.get("/api/v1/me").status_code == 401  # a copy of the cookie ended with the logout


def test_console_over_tls_with_the_node_certificate_marks_the_cookie_secure(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("mx1.example.test", "127.0.0.1")
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(cert_file)
    cert.private_key_pem.write_to_path(key_file)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(ca_file)
    config, _port, console_port = node_config(tmp_path, tls=f'[tls]\ncert = "{cert_file}"\nkey = "{key_file}"\n')
    assert config.console.tls
    (tmp_path / "data").mkdir(mode=0o700)
    AdminAccounts(tmp_path / "data").add("alice", "admin", "alice-pw")
    with RunningNode(config, clock=ManualClock(time.time())) as node:
        node.console_url = f"https://127.0.0.1:{console_port}"
        node.clients = []
        c = api_client(node, verify=ssl.create_default_context(cafile=str(ca_file)))
        token = re.search(r'name="csrf" value="([^"]+)"', c.get("/login").text).group(1)
        r = c.post("/login", data={"username": "alice", "password": "alice-pw", "csrf": token})
        cookie = [h for h in r.headers.get_list("set-cookie") if h.startswith("kanmon_session=")][0]
        assert "Secure" in cookie
        assert "max-age" in r.headers["strict-transport-security"]
        with pytest.raises(httpx.HTTPError), httpx.Client(timeout=10) as plain:
            plain.get(f"http://127.0.0.1:{console_port}/login")
        c.close()


def test_a_reload_keeps_the_console_and_its_sessions_and_can_turn_it_off(console) -> None:
    import asyncio

    # A connection per request: a kept-alive one belongs to the console the reload retires,
    # which may close it between two requests (a browser retries then; httpx does not).
    c = login(console, "alice", "alice-pw", limits=httpx.Limits(max_keepalive_connections=0))
    assert c.get("/api/v1/me").status_code == 200
    old = console.node.config
    longer = old.model_copy(update={"console": old.console.model_copy(update={"session_timeout": 3600.0})})
    asyncio.run_coroutine_threadsafe(console.node.reload(longer), console.loop).result(60)
    assert c.get("/api/v1/me").json()["name"] == "alice"  # same secret: the session goes on
    assert c.get("/queue").status_code == 200
    off = old.model_copy(update={"console": None})
    asyncio.run_coroutine_threadsafe(console.node.reload(off), console.loop).result(60)

    def closed() -> bool:  # the old console retires in the background after the switch
        try:
            with httpx.Client(timeout=10) as fresh:
                fresh.get(console.console_url + "/login")
        except httpx.HTTPError:
            return True
        return False

    wait_for(closed, 30, "the console to close after the reload")


def test_text_from_the_network_is_escaped_on_every_page(console) -> None:
    evil = "<script>alert(1)</script>"
    with smtplib.SMTP(console.host, console.port, timeout=30) as s:
        s.sendmail("sender@example.test", ["bob@down.example"],
                   f"Subject: {evil}\r\nX-Evil: <img src=x onerror=alert(2)>\r\n\r\n{evil}\r\n".encode())
    console.wait_idle()
    qid = console.node.admin.ops.list({})["items"][0]["id"]
    c = login(console, "alice", "alice-pw")
    for path in (f"/queue/{qid}", f"/trace?q={qid}", "/trace?subject=script", "/queue?subject=script",
                 "/events?grep=script"):
        page = c.get(path)
        assert page.status_code == 200, path
        assert "<script>alert" not in page.text and "<img src=x" not in page.text, path
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in c.get(f"/queue/{qid}").text


def test_control_characters_and_bidi_overrides_are_shown_escaped_on_pages(console) -> None:
    """Autoescaping stops markup, not an ESC, or a U+202E that shows "exe.png" as
    "gnp.exe": pages show them as the CLI does (\\x1b, \\u202e)."""
    subject = "=?utf-8?b?" + base64.b64encode("evil \x1b[31mRED \u202egnp.exe".encode()).decode() + "?="
    with smtplib.SMTP(console.host, console.port, timeout=30) as s:
        s.sendmail("sender@example.test", ["bob@down.example"],
                   f"Subject: {subject}\r\n\r\nbody \x1b[2J \u202e gnp.exe\r\n".encode())
    console.wait_idle()
    qid = console.node.admin.ops.list({})["items"][0]["id"]
    c = login(console, "alice", "alice-pw")
    pages = {path: c.get(path) for path in (f"/queue/{qid}", f"/trace?q={qid}", "/queue?subject=evil")}
    for path, page in pages.items():
        assert page.status_code == 200, path
        assert "\x1b" not in page.text and "\u202e" not in page.text, path
    assert "evil \\x1b[31mRED \\u202egnp.exe" in pages[f"/trace?q={qid}"].text  # the decoded Subject
    body = pages[f"/queue/{qid}"].text
    assert "body \\x1b[2J \\u202e gnp.exe\n" in body and "\\r" not in body  # line ends kept, not shown


def test_a_message_not_in_the_quarantine_is_404_as_documented(console) -> None:
    c = login(console, "alice", "alice-pw")
    for path in ("/api/v1/quarantine/1M1RW48JZJY4N57", "/quarantine/1M1RW48JZJY4N57"):
        r = c.get(path)
        assert r.status_code == 404, (path, r.status_code, r.text[:200])


def test_the_start_up_lines_say_where_the_console_is(console) -> None:
    """`kanmon serve` prints what it listens on: the console too."""
    assert f"kanmon: console on {console.console_url}/" in console.node.describe().splitlines()
