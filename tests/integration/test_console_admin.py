"""The console's account and operations pages against a real node: a logout that holds
across a restart of the node, mailboxes and aliases added and removed on the Users page
and through the API (the functions `kanmon user` calls), the Policies page, the event
log's live tail, and the queue backup download and restore upload."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from kanmon.admin.accounts import AdminAccounts
from kanmon.clock import ManualClock
from kanmon.config import parse_config
from kanmon.records.query import search_events
from tests.integration.test_console import NODE, api_client, csrf_of, login
from tests.support.kanmon_node import RunningNode, free_port, wait_for


def start_node(tmp_path: Path, extra: str = "") -> RunningNode:
    port, console_port = free_port(), free_port()
    config = parse_config(NODE.format(data_dir=tmp_path / "data", port=port, console=console_port, tls="") + extra)
    node = RunningNode(config, clock=ManualClock(time.time()))
    node.start()
    node.console_url = f"http://127.0.0.1:{console_port}"
    node.clients = []
    return node


def stop_node(node: RunningNode) -> None:
    for client in node.clients:
        client.close()
    node.stop()


@pytest.fixture
def node(tmp_path: Path):
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    accounts = AdminAccounts(data)
    accounts.add("alice", "admin", "alice-pw")
    accounts.add("otto", "operator", "otto-pw")
    accounts.add("audrey", "auditor", "audrey-pw")
    running = start_node(tmp_path)
    try:
        yield running
    finally:
        stop_node(running)


def fresh_users(node):
    """The users store as a new `kanmon user` command sees it (the file read now)."""
    from kanmon.store.users import Users

    return Users(node.node.config)


def audit_lines(node, grep: str) -> list[str]:
    return [e.text for e in search_events(node.data_dir, grep=grep) if e.kind == "audit"]


def test_a_logged_out_cookie_stays_refused_after_the_node_restarts(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    accounts = AdminAccounts(data)
    accounts.add("alice", "admin", "alice-pw")
    accounts.add("bob", "admin", "bob-pw")
    accounts.add("carol", "operator", "carol-pw")
    first = start_node(tmp_path)
    try:
        out = login(first, "alice", "alice-pw")
        kept = login(first, "alice", "alice-pw")  # a second session, never logged out
        stolen = out.cookies["kanmon_session"]
        assert out.post("/logout", data={"csrf": csrf_of(out)}).status_code == 303
        other = kept.cookies["kanmon_session"]
        bob = login(first, "bob", "bob-pw").cookies["kanmon_session"]
        carol = login(first, "carol", "carol-pw").cookies["kanmon_session"]
    finally:
        stop_node(first)
    # While the node is down, bob's password changes and carol is removed.
    accounts.set_password("bob", "bob-new-pw")
    accounts.remove("carol")
    second = start_node(tmp_path)
    try:
        replay = api_client(second)
        r = replay.get("/api/v1/me", headers={"Cookie": f"kanmon_session={stolen}"})
        assert r.status_code == 401 and "logged out" in r.json()["error"]
        for cookie in (bob, carol):
            r = replay.get("/api/v1/me", headers={"Cookie": f"kanmon_session={cookie}"})
            assert r.status_code == 401 and "account removed or password changed" in r.json()["error"]
        r = replay.get("/api/v1/me", headers={"Cookie": f"kanmon_session={other}"})
        assert r.status_code == 200 and r.json()["name"] == "alice"  # only the logged-out one ended
    finally:
        stop_node(second)


def test_an_admin_adds_and_removes_mailboxes_and_aliases_on_the_users_page(node) -> None:
    def users():
        return fresh_users(node)

    a = login(node, "alice", "alice-pw")
    page = a.get("/users").text
    assert 'id="add-mailbox"' in page and 'id="add-alias"' in page
    assert "in the configuration" in page  # alice@example.test is a config mailbox: no Remove button
    token = csrf_of(a, "/users")
    r = a.post("/users/add", data={"csrf": token, "address": "Carol@Example.test", "password": "c-pw-1",
                                   "confirm": "c-pw-2"})
    assert r.status_code == 400 and not users().is_mailbox("carol@example.test")
    r = a.post("/users/add", data={"csrf": token, "address": "Carol@Example.test", "password": "c-pw-1",
                                   "confirm": "c-pw-1"})
    assert r.status_code == 303 and "add%3A+carol%40example.test" in r.headers["location"]
    assert users().is_mailbox("carol@example.test") and users().verify("carol@example.test", "c-pw-1")
    r = a.post("/users/add", data={"csrf": token, "address": "x@down.example"})
    assert r.status_code == 400 and "not a local domain" in r.text
    r = a.post("/users/add", data={"csrf": token, "address": "<b>@example.test"})
    assert r.status_code == 400 and "<b>" not in r.text
    r = a.post("/users/alias", data={"csrf": token, "alias": "sales@example.test",
                                     "targets": "carol@example.test, alice@example.test"})
    assert r.status_code == 303
    assert users().aliases()["sales@example.test"] == ("carol@example.test", "alice@example.test")
    page = a.get("/users").text
    assert 'id="mailbox-carol@example.test"' in page and 'id="alias-sales@example.test"' in page
    # Removing asks first, then removes.
    r = a.post("/users/carol@example.test/delete", data={"csrf": token})
    assert r.status_code == 200 and 'id="confirm-yes"' in r.text and users().is_mailbox("carol@example.test")
    r = a.post("/users/carol@example.test/delete", data={"csrf": token, "confirm": "yes"})
    assert r.status_code == 303 and not users().is_mailbox("carol@example.test")
    r = a.post("/users/alice@example.test/delete", data={"csrf": token, "confirm": "yes"})
    assert r.status_code == 400 and users().is_mailbox("alice@example.test")  # declared in the config
    r = a.post("/users/alias/sales@example.test/delete", data={"csrf": token, "confirm": "yes"})
    assert r.status_code == 303 and "sales@example.test" not in users().aliases()
    assert a.post("/users/alias/sales@example.test/delete", data={"csrf": token, "confirm": "yes"}).status_code == 404

    # Writes are the admin's: an operator and an auditor read, see no form, get 403.
    for name in ("otto", "audrey"):
        c = login(node, name, f"{name}-pw")
        page = c.get("/users").text
        assert 'id="add-mailbox"' not in page and 'class="act-' not in page
        r = c.post("/api/v1/users/mailboxes", json={"address": "eve@example.test"},
                   headers={"X-CSRF-Token": csrf_of(c)})
        assert r.status_code == 403 and not users().is_mailbox("eve@example.test")
    # Without the CSRF token the admin's cookie writes nothing either.
    assert a.post("/api/v1/users/mailboxes", json={"address": "eve@example.test"}).status_code == 403

    node.flush()
    lines = audit_lines(node, "audit:")
    assert any("alice (admin) from 127.0.0.1 via console: user add carol@example.test -> ok" in t for t in lines)
    assert any("via console: alias set sales@example.test -> carol@example.test, alice@example.test -> ok" in t
               for t in lines)
    assert any("via console: user delete carol@example.test -> ok" in t for t in lines)
    assert any("via console: user delete alice@example.test -> failed: " in t for t in lines)
    assert any("via console: alias delete sales@example.test -> ok" in t for t in lines)
    assert not any("c-pw" in e.text for e in search_events(node.data_dir))


def test_mailboxes_and_aliases_through_the_api_with_a_token(node) -> None:
    def users():
        return fresh_users(node)

    api = api_client(node, headers={"Authorization": f"Bearer {AdminAccounts(node.data_dir).new_token('alice')}"})
    r = api.post("/api/v1/users/mailboxes", json={"address": "dave@example.test", "password": "d-pw"})
    assert r.status_code == 200 and r.json() == {"mailbox": "dave@example.test", "action": "add", "done": True}
    assert users().verify("dave@example.test", "d-pw")
    assert api.post("/api/v1/users/mailboxes", json={"address": "dave@example.test"}).status_code == 400  # exists
    assert api.post("/api/v1/users/mailboxes", json={"address": 5}).status_code == 400
    r = api.post("/api/v1/users/mailboxes", json={"address": "nopw@example.test"})
    assert r.status_code == 200
    listing = api.get("/api/v1/users").json()
    nopw = [m for m in listing["mailboxes"] if m["mailbox"] == "nopw@example.test"][0]
    assert nopw["has_password"] is False and nopw["source"] == "file"
    assert [m for m in listing["mailboxes"] if m["mailbox"] == "alice@example.test"][0]["source"] == "config"
    r = api.post("/api/v1/users/aliases", json={"alias": "info@example.test", "targets": ["dave@example.test"]})
    assert r.status_code == 200 and users().aliases()["info@example.test"] == ("dave@example.test",)
    assert api.post("/api/v1/users/aliases", json={"alias": "info@example.test", "targets": []}).status_code == 400
    assert api.get("/api/v1/users").json()["alias_source"] == {"info@example.test": "file"}
    assert api.post("/api/v1/users/aliases/info@example.test/explode").status_code == 404
    assert api.post("/api/v1/users/aliases/info@example.test/delete").json()["done"] is True
    assert api.post("/api/v1/users/aliases/info@example.test/delete").status_code == 404
    assert api.post("/api/v1/users/dave@example.test/delete").json()["done"] is True
    assert not users().is_mailbox("dave@example.test")
    assert api.post("/api/v1/users/dave@example.test/delete").status_code == 404


POLICIES = """
[[session_profile]]
name = "strict"
require_ptr = true
greylist = true
max_message_size = "5MB"

[[ip_policy]]
source = ["192.0.2.0/24"]
profile = "strict"
content_profile = "inbound"

[[recipient_policy]]
direction = "inbound"
recipient = "*@example.test"
session_profile = "strict"

[[content_profile]]
name = "inbound"
reject_score = 15.0

[[content_profile.rule]]
name = "no-exe"
attachment_name = ["*.exe", "<b>.scr"]
action = "reject"

[[dnsbl]]
zone = "zen.example"
weight = 2
"""


def test_the_policies_page_shows_the_running_policies_and_profiles(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    AdminAccounts(data).add("audrey", "auditor", "audrey-pw")
    AdminAccounts(data).add("alice", "admin", "alice-pw")
    node = start_node(tmp_path, POLICIES)
    try:
        c = login(node, "audrey", "audrey-pw")
        page = c.get("/policies").text
        assert 'id="profile-strict"' in page and 'id="profile-default"' in page and 'id="profile-trusted"' in page
        strict = node.node.config.session_profiles["strict"]
        assert strict.require_ptr and strict.greylist
        row = page[page.index('<td class="mono">require_ptr</td>'):]
        row = row[:row.index("</tr>")]
        # default, trusted, strict, in the order of the header
        assert [cell.removeprefix("<td>") for cell in row.split("</td>")[1:4]] == ["no", "no", "yes"]
        row = page[page.index('<td class="mono">max_message_size</td>'):]
        assert row[:row.index("</tr>")].endswith("<td>5.0 MB</td>")  # sizes as the config writes them
        assert "192.0.2.0/24" in page and "*@example.test" in page
        assert 'id="content-inbound"' in page and "no-exe" in page and "reject" in page
        assert "&lt;b&gt;.scr" in page and "<b>.scr" not in page  # escaped like everything else
        assert 'id="verify-down.example"' in page and "zen.example" in page
        assert 'id="edit-config"' not in page  # an auditor: no link to the editor
        ja = c.get("/policies", headers={"Accept-Language": "ja"}).text
        assert "ポリシーとプロファイル" in ja
        doc = c.get("/api/v1/policies").json()
        assert doc["ip_policy"] == [{"source": ["192.0.2.0/24"], "profile": "strict", "content_profile": "inbound"}]
        assert doc["session_profiles"]["strict"]["require_ptr"] is True
        assert doc["content_profiles"][0]["rules"][0]["conditions"] == {"attachment_name": ["*.exe", "<b>.scr"]}
        assert doc["recipient_verification"][0] == {
            "domain": "example.test", "deliver": "local", "verify": "mailboxes", "verify_unreachable": None,
            "recipients_file": None, "verify_positive_ttl": None, "verify_negative_ttl": None}
        assert doc["dnsbl"][0]["zone"] == "zen.example" and doc["dnsbl"][0]["weight"] == 2
        a = login(node, "alice", "alice-pw")
        assert '<a href="/config" id="edit-config">' in a.get("/policies").text
    finally:
        stop_node(node)


def test_the_live_tail_brings_new_event_lines_escaped(node) -> None:
    import re

    c = login(node, "audrey", "audrey-pw")
    node.flush()
    page = c.get("/events?grep=login&tail=1").text
    assert 'id="tail-on"' in page and "<script" not in page.replace('<script src="/static/htmx.min.js" defer></script>', "")
    query = re.search(r'<tbody id="tail" hx-get="/events/tail\?([^"]+)" hx-trigger="every 2s"', page).group(1)
    query = query.replace("&amp;", "&")
    assert "grep=login" in query
    # Nothing new yet: only the element that asks again, with the same cursor.
    quiet = c.get("/events/tail?" + query, headers={"HX-Request": "true"}).text
    assert "tail-new" not in quiet and query.replace("&", "&amp;") in quiet
    # A failed login with markup in its name: a new line that matches "login".
    bad = api_client(node)
    token = re.search(r'name="csrf" value="([^"]+)"', bad.get("/login").text).group(1)
    bad.post("/login", data={"username": "<img src=x onerror=alert(1)>", "password": "no", "csrf": token})
    node.flush()
    fresh = c.get("/events/tail?" + query, headers={"HX-Request": "true"}).text
    assert "tail-new" in fresh and "login failed for &lt;img src=x onerror=alert(1)&gt;" in fresh
    assert "<img" not in fresh
    nxt = re.search(r'hx-get="/events/tail\?([^"]+)"', fresh).group(1).replace("&amp;", "&")
    assert nxt != query  # the cursor moved on: the same line never comes twice
    assert "tail-new" not in c.get("/events/tail?" + nxt).text
    # The API: where a tail starts, then what came after it.
    start = c.get("/api/v1/events/tail").json()
    assert start["events"] == [] and start["next"] > 0
    c.post("/settings", data={"csrf": csrf_of(c), "lang": "en"})  # an audit line
    node.flush()
    after = c.get(f"/api/v1/events/tail?after={start['next']}&grep=audit").json()
    assert [e["kind"] for e in after["events"]] == ["audit"] and after["next"] > start["next"]
    # A poll whose session ended sends the whole page to the login, not a fragment.
    c.post("/logout", data={"csrf": csrf_of(c)})
    r = c.get("/events/tail?" + nxt, headers={"HX-Request": "true", "HX-Current-URL": node.console_url + "/events"})
    assert r.status_code == 401 and r.headers["HX-Redirect"] == "/login?next=%2Fevents"


def from_host(archive: bytes, hostname: str) -> bytes:
    """The archive as if another node had written it (its head names that host)."""
    import io
    import json
    import tarfile

    out = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(archive)) as src, tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as dst:
        for member in src.getmembers():
            data = src.extractfile(member).read()
            if member.name == "kanmon-backup.json":
                data = json.dumps({**json.loads(data), "hostname": hostname}).encode()
                member.size = len(data)
            dst.addfile(member, io.BytesIO(data))
    return out.getvalue()


def test_backup_download_of_a_selection_and_restore_upload(tmp_path: Path) -> None:
    import io
    import tarfile

    from tests.integration.test_console import send_deferred

    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    AdminAccounts(data).add("alice", "admin", "alice-pw")
    AdminAccounts(data).add("otto", "operator", "otto-pw")
    node = start_node(tmp_path)
    try:
        first = send_deferred(node)
        a = login(node, "alice", "alice-pw")
        token = csrf_of(a, "/queue")
        assert 'class="act-backup"' in a.get("/queue").text
        # The checked messages of the queue page, as the archive `kanmon queue backup` writes.
        r = a.post("/queue/backup", data={"csrf": token, "id": first, "filter_query": ""})
        assert r.status_code == 200 and r.headers["content-type"] == "application/x-tar"
        assert r.headers["x-kanmon-count"] == "1"
        assert r.headers["content-disposition"].startswith('attachment; filename="kanmon-queue-mx1.example.test-')
        archive = r.content
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            names = tar.getnames()
        assert names[0] == "kanmon-backup.json" and f"{first}/queue" in names and names[-1] == "kanmon-backup-end.json"
        wait_for(lambda: not list((data / "console" / "transfer").iterdir()), 30,
                 "the archive removed once sent")
        # A filter (the backup page's fields): nothing matches, an empty archive.
        r = a.post("/queue/backup", data={"csrf": token, "state": "hold"})
        assert r.status_code == 200 and r.headers["x-kanmon-count"] == "0"
        r = a.post("/queue/backup", data={"csrf": token, "size": "huge"})
        assert r.status_code == 303 and "error=" in r.headers["location"]
        # Deleted here, it comes back from the archive (on hold when asked).
        page = a.get("/queue/backup").text
        assert 'id="restore-form"' in page and '<script src="/static/console.js" defer></script>' in page
        node.node.admin.ops.act("delete", {"ids": [first], "state": "all"}, source="test")
        assert node.node.admin.ops.list({})["count"] == 0
        r = a.post("/queue/restore", data={"csrf": token, "hold": "yes"},
                   files={"archive": ("<i>q</i>.tar", archive, "application/x-tar")})
        assert r.status_code == 200
        assert '<td id="restore-restored">1 (on hold)</td>' in r.text and "&lt;i&gt;q&lt;/i&gt;.tar" in r.text
        assert node.node.admin.ops.list({"state": "hold"})["items"][0]["id"] == first
        assert 'id="finish-command"' not in r.text  # its own backup: nothing to finish on another node
        # Restored once: a second upload skips it, never doubles it.
        r = a.post("/queue/restore", data={"csrf": token}, files={"archive": ("q.tar", archive, "application/x-tar")})
        assert '<td id="restore-in-archive">1</td>' in r.text and '<td id="restore-skipped">1</td>' in r.text
        assert node.node.admin.ops.list({})["count"] == 1
        # From another node: the command that removes them there names the file as uploaded.
        r = a.post("/queue/restore", data={"csrf": token},
                   files={"archive": ("<i>q</i>.tar", from_host(archive, "mx-old.example.test"), "application/x-tar")})
        assert "(mx-old.example.test)" in r.text
        assert "<pre id=\"finish-command\">kanmon queue delete --ids-from &#39;&lt;i&gt;q&lt;/i&gt;.tar&#39;" in r.text
        # A damaged archive: nothing restored, the reason shown.
        r = a.post("/queue/restore", data={"csrf": token},
                   files={"archive": ("bad.tar", archive[: len(archive) // 2], "application/x-tar")})
        assert r.status_code == 200 and 'id="restore-error"' in r.text and str(data) not in r.text
        assert not list((data / "console" / "transfer").iterdir())
        # The API: a selection by filter, and a restore of the raw archive.
        api = api_client(node, headers={"Authorization": f"Bearer {AdminAccounts(data).new_token('alice')}"})
        r = api.post("/api/v1/queue/backup", json={"filters": {"state": "hold"}})
        assert r.status_code == 200 and r.headers["x-kanmon-count"] == "1"
        r = api.post("/api/v1/queue/restore?name=again.tar", content=r.content,
                     headers={"Content-Type": "application/x-tar"})
        assert r.status_code == 200 and r.json()["skipped"] == [first] and r.json()["restored"] == []
        assert api.post("/api/v1/queue/restore", content=b"not a tar").status_code == 400
        assert api.post("/api/v1/queue/backup", json={"ids": ["../etc"]}).status_code == 400
        # Admin only: an operator can hold and release, not take the mail away or put it back.
        o = login(node, "otto", "otto-pw")
        assert 'class="act-backup"' not in o.get("/queue").text
        assert o.get("/queue/backup").status_code == 403
        assert o.post("/queue/backup", data={"csrf": csrf_of(o), "id": first}).status_code == 403
        assert o.post("/api/v1/queue/restore", content=archive, headers={"X-CSRF-Token": csrf_of(o)}).status_code == 403
        node.flush()
        lines = audit_lines(node, "queue ")
        assert any(f"alice (admin) from 127.0.0.1 via console: queue backup {first} -> 1 message(s) downloaded" in t
                   for t in lines)
        assert any("via console: queue restore q.tar -> 0 restored, 1 already here, 1 in the archive" in t
                   for t in lines)
        assert any("via console: queue restore <i>q</i>.tar -> 1 restored, 0 already here, 1 in the archive (held)"
                   in t for t in lines)
        assert any("via console: queue restore bad.tar -> failed: " in t for t in lines)
        assert any("via api token: queue restore again.tar -> 0 restored, 1 already here" in t for t in lines)
    finally:
        stop_node(node)


def test_a_restore_says_how_many_stayed_held_as_in_the_archive(tmp_path: Path) -> None:
    """`kanmon queue restore` says "N of them held, as they were in the archive"; so does the page."""
    from tests.integration.test_console import send_deferred

    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    AdminAccounts(data).add("alice", "admin", "alice-pw")
    node = start_node(tmp_path)
    try:
        first = send_deferred(node)
        node.node.admin.ops.act("hold", {"ids": [first]}, source="test")
        a = login(node, "alice", "alice-pw")
        token = csrf_of(a, "/queue")
        archive = a.post("/queue/backup", data={"csrf": token, "id": first, "filter_query": ""}).content
        node.node.admin.ops.act("delete", {"ids": [first], "state": "all"}, source="test")
        r = a.post("/queue/restore", data={"csrf": token}, files={"archive": ("q.tar", archive, "application/x-tar")},
                   headers={"Accept-Language": "ja"})
        assert r.status_code == 200
        assert '<td id="restore-restored">1</td>' in r.text and '<td id="restore-on-hold">1</td>' in r.text
        assert "うち保留のまま" in r.text and 'id="restore-held-note"' in r.text
        assert node.node.admin.ops.list({"state": "hold"})["items"][0]["id"] == first
    finally:
        stop_node(node)


def test_a_restore_upload_larger_than_max_upload_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    AdminAccounts(data).add("alice", "admin", "alice-pw")
    node = start_node(tmp_path)
    try:
        bound = 1000
        import asyncio

        old = node.node.config
        small = old.model_copy(update={"console": old.console.model_copy(update={"max_upload": bound})})
        asyncio.run_coroutine_threadsafe(node.node.reload(small), node.loop).result(60)
        a = login(node, "alice", "alice-pw")
        token = csrf_of(a, "/queue/backup")
        r = a.post("/queue/restore", data={"csrf": token}, files={"archive": ("big.tar", b"x" * (bound + 70_000))})
        assert r.status_code == 413
        api = api_client(node, headers={"Authorization": f"Bearer {AdminAccounts(data).new_token('alice')}"})

        def chunked():  # no Content-Length: counted while it is written, cut at the bound
            for _ in range(100):
                yield b"y" * 1000

        r = api.post("/api/v1/queue/restore", content=chunked())
        assert r.status_code == 413 and "max_upload" in r.json()["error"]
        assert not list((data / "console" / "transfer").iterdir())
    finally:
        stop_node(node)


def archive_head(archive: bytes) -> dict:
    import io
    import json
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        return json.loads(tar.extractfile("kanmon-backup.json").read())


def test_a_console_backup_holds_the_messages_here_when_asked(tmp_path: Path) -> None:
    """`kanmon queue backup --then hold` on the page and in the API: once the archive is
    written, exactly its messages are held here, so the old relay no longer delivers what
    the new one will. The default leaves them queued, as the command's does."""
    from tests.integration.test_console import send_deferred

    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    AdminAccounts(data).add("alice", "admin", "alice-pw")
    node = start_node(tmp_path)
    try:
        first = send_deferred(node)
        node.node.config_source = str(tmp_path / "relay.toml")  # as `kanmon serve -c relay.toml` runs it
        a = login(node, "alice", "alice-pw")
        token = csrf_of(a, "/queue")
        assert 'class="act-backup-hold"' in a.get("/queue").text
        page = a.get("/queue/backup").text
        assert 'name="then" value="keep" checked' in page and 'name="then" value="hold"' in page
        assert "both relays hold the same messages" in page
        assert "ここで保留にする" in a.get("/queue/backup", headers={"Accept-Language": "ja"}).text
        # The default: queued here still, as `kanmon queue backup` leaves them.
        r = a.post("/queue/backup", data={"csrf": token, "id": first, "then": "keep"})
        assert r.status_code == 200 and "x-kanmon-held" not in r.headers
        assert archive_head(r.content)["origin"]["then"] is None
        assert node.node.admin.ops.list({"state": "deferred"})["count"] == 1
        # Hold: written, then held here; the archive says so (its restore warns of nothing).
        r = a.post("/queue/backup", data={"csrf": token, "id": first, "then": "hold"})
        assert r.status_code == 200 and r.headers["x-kanmon-count"] == "1" and r.headers["x-kanmon-held"] == "1"
        origin = archive_head(r.content)["origin"]
        assert origin["then"] == "hold" and origin["config"] == str(tmp_path / "relay.toml")
        assert [i["id"] for i in node.node.admin.ops.list({"state": "hold"})["items"]] == [first]
        node.node.admin.ops.act("release", {"ids": [first]}, source="test")
        # The API: "then": "hold"; never "delete" (the archive is only on its way to the client).
        api = api_client(node, headers={"Authorization": f"Bearer {AdminAccounts(data).new_token('alice')}"})
        r = api.post("/api/v1/queue/backup", json={"ids": [first], "then": "delete"})
        assert r.status_code == 400 and "then is keep" in r.json()["error"]
        assert node.node.admin.ops.list({"state": "deferred"})["count"] == 1
        r = api.post("/api/v1/queue/backup", json={"ids": [first], "then": "hold"})
        assert r.status_code == 200 and r.headers["x-kanmon-held"] == "1"
        assert node.node.admin.ops.list({"state": "hold"})["count"] == 1
        node.flush()
        assert any(f"queue backup {first} -> 1 message(s) downloaded, 1 held here" in t
                   for t in audit_lines(node, "queue backup"))
    finally:
        stop_node(node)


def test_a_move_is_finished_from_the_old_relays_console(tmp_path: Path) -> None:
    """The restore on the new relay says how to finish the move without a shell on the
    old one: upload the same archive on the old relay's console, which counts what it
    will delete and asks first (and refuses on the node the queue moved to); the command
    it prints names the old node's config file, or a placeholder the admin must replace."""
    from tests.integration.test_console import send_deferred

    nodes = {}
    for name in ("old", "new"):
        (tmp_path / name / "data").mkdir(mode=0o700, parents=True)
        AdminAccounts(tmp_path / name / "data").add("alice", "admin", "alice-pw")
    try:
        for name in ("old", "new"):
            nodes[name] = start_node(tmp_path / name)
        old, new = nodes["old"], nodes["new"]
        first = send_deferred(old)
        old.node.config_source = str(tmp_path / "old.toml")
        a, b = login(old, "alice", "alice-pw"), login(new, "alice", "alice-pw")
        token_a, token_b = csrf_of(a, "/queue"), csrf_of(b, "/queue")
        archive = a.post("/queue/backup", data={"csrf": token_a, "id": first, "then": "hold"}).content
        assert 'id="finish-form"' in a.get("/queue/backup").text
        # Restored on the new relay: the finish is said for the console, and the command has -c.
        r = b.post("/queue/restore", data={"csrf": token_b}, files={"archive": ("q.tar", archive, "application/x-tar")})
        assert '<td id="restore-restored">1</td>' in r.text and 'id="finish-console"' in r.text
        assert "Finish a move" in r.text
        assert (f'<pre id="finish-command">kanmon queue delete --ids-from q.tar -c {tmp_path / "old.toml"}</pre>'
                in r.text)
        assert 'id="finish-placeholder"' not in r.text and "may deliver them too" not in r.text
        # On the new relay the finish step is refused: it would delete the moved mail.
        r = b.post("/queue/finish", data={"csrf": token_b}, files={"archive": ("q.tar", archive, "application/x-tar")})
        assert r.status_code == 200 and "restored here" in r.text, re.sub(r"(?s).*<main>|</main>.*", "", r.text)
        assert 'id="finish-error"' in r.text
        assert 'id="finish-confirm-form"' not in r.text
        assert new.node.admin.ops.list({})["count"] == 1
        # On the old relay: the count, then the delete only once confirmed.
        api = api_client(old, headers={"Authorization": f"Bearer {AdminAccounts(old.data_dir).new_token('alice')}"})
        dry = api.post("/api/v1/queue/finish?dry_run=true&name=q.tar", content=archive).json()
        assert dry["ids"] == [first] and dry["deleted"] == [] and dry["in_archive"] == 1
        r = a.post("/queue/finish", data={"csrf": token_a}, files={"archive": ("q.tar", archive, "application/x-tar")},
                   headers={"Accept-Language": "ja"})
        assert '<td id="finish-here">1</td>' in r.text and '<td id="finish-held">1</td>' in r.text
        assert "移行の完了" in r.text
        assert old.node.admin.ops.list({})["count"] == 1  # asked, not done
        r = a.post("/queue/finish/confirm", data={"csrf": token_a, "archive": "q.tar", "ids": first})
        assert r.status_code == 303 and "finish+move%3A+1+deleted+here" in r.headers["location"]
        assert old.node.admin.ops.list({})["count"] == 0 and new.node.admin.ops.list({})["count"] == 1
        r = api.post("/api/v1/queue/finish?name=q.tar", content=archive).json()
        assert r["ids"] == [] and r["deleted"] == []  # done already: nothing left
        # An archive written by another node's queue is refused here.
        api_b = api_client(new, headers={"Authorization": f"Bearer {AdminAccounts(new.data_dir).new_token('alice')}"})
        theirs = api_b.post("/api/v1/queue/backup", json={"ids": [first]}).content
        r = api.post("/api/v1/queue/finish?name=b.tar", content=theirs)
        assert r.status_code == 400 and "not by this node" in r.json()["error"]
        assert new.node.admin.ops.list({})["count"] == 1
        # An archive that does not say which config file: the command shows a placeholder.
        old.node.config_source = None
        send_deferred(old)
        second = a.post("/queue/backup", data={"csrf": token_a, "state": "deferred"}).content
        r = b.post("/queue/restore", data={"csrf": token_b}, files={"archive": ("r.tar", second, "application/x-tar")})
        assert "-c OLD-NODE-CONFIG</pre>" in r.text and 'id="finish-placeholder"' in r.text
        assert "may deliver them too" in r.text  # left queued there
        old.flush()
        assert any("via console: queue finish move q.tar -> 1 deleted here, 0 gone meanwhile" in t
                   for t in audit_lines(old, "finish move"))
    finally:
        for running in nodes.values():
            stop_node(running)
