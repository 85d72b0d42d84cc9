"""The console in a real browser: Debian's chromium driven by Playwright against a real
node. Log in, see the dashboard chart, hold and release a deferred message, press Test
on the alert page and see the alert delivered to a mailbox, and an auditor who sees no
write button and gets 403 from the API; an error page in Japanese; add a mailbox and an alias on the Users page, see
the Policies page, watch a new line arrive in the event log's live tail, download a queue
backup of a checked message and restore it by upload. No page may break the
Content-Security-Policy.

Skips (with the reason) where the playwright package or /usr/bin/chromium is missing;
.ci/run installs chromium.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import pytest

from kanmon.admin.accounts import AdminAccounts
from kanmon.clock import ManualClock
from tests.integration.test_console import node_config, send_deferred
from tests.support.kanmon_node import RunningNode, maildir_messages, wait_for

sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
CHROMIUM = os.environ.get("KANMON_CHROMIUM", "/usr/bin/chromium")
if not (os.access(CHROMIUM, os.X_OK) or shutil.which(CHROMIUM)):
    pytest.skip(f"no chromium at {CHROMIUM} (apt-get install chromium; .ci/run does)", allow_module_level=True)

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
TIMEOUT = 30_000  # ms: a bound on waits for the page, never a timing assertion
# KANMON_SCREENSHOTS=docs/console: the run also saves the screenshots docs/console.md shows.
SHOTS = os.environ.get("KANMON_SCREENSHOTS")


def shot(page, name: str) -> None:
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SHOTS) / f"{name}.png"), full_page=True)


@pytest.fixture
def node(tmp_path: Path):
    config, _port, console_port = node_config(tmp_path)
    (tmp_path / "data").mkdir(mode=0o700)
    accounts = AdminAccounts(tmp_path / "data")
    accounts.add("alice", "admin", "alice-pw")
    accounts.add("audrey", "auditor", "audrey-pw")
    with RunningNode(config, clock=ManualClock(time.time())) as n:
        n.console_url = f"http://127.0.0.1:{console_port}"
        yield n


@pytest.fixture
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield b
        finally:
            b.close()


def open_page(browser, node, violations: list[str]):
    context = browser.new_context(base_url=node.console_url, locale="en-US")
    page = context.new_page()
    page.set_default_timeout(TIMEOUT)
    page.on("console", lambda m: violations.append(m.text) if "Content Security Policy" in m.text else None)
    return context, page


def log_in(page, name: str, password: str) -> None:
    page.goto("/login")
    page.fill("input[name=username]", name)
    page.fill("input[name=password]", password)
    page.click("button[type=submit]")
    page.wait_for_url(re.compile(r"/$"))


def test_admin_and_auditor_in_chromium(browser, node) -> None:
    violations: list[str] = []
    qid = send_deferred(node)
    context, page = open_page(browser, node, violations)
    log_in(page, "alice", "alice-pw")
    page.wait_for_selector("#chart-hourly svg.chart")
    page.wait_for_selector("#chart-hourly polyline.series-received", state="attached")
    assert page.locator("svg.chart").count() == 2
    assert page.inner_text("#queue-count") == "1"
    shot(page, "dashboard")

    # Hold and release a deferred message from its page.
    page.goto("/queue?state=deferred")
    shot(page, "queue")
    page.click(f"a[href='/queue/{qid}']")
    assert page.inner_text("#message-state") == "deferred"
    page.click("button.act-hold")
    page.wait_for_selector("#message-state:text('hold')")
    assert page.inner_text("#msg") == "hold: 1 of 1"  # the console's own status line, signed for this session
    shot(page, "message")
    assert node.node.admin.ops.list({"state": "hold"})["items"][0]["id"] == qid
    page.click("button.act-release")
    # Released means due now: the page shows it waiting or already in a new attempt.
    page.wait_for_selector("#message-state:text-matches('^(deferred|active)$')")
    assert node.node.admin.ops.list({"state": "hold"})["count"] == 0

    # The Test button: the alert is queued (its id shown), then delivered to the mailbox.
    page.goto("/alerts")
    page.click("#category-queue button.test")
    qid_link = page.wait_for_selector("#result-queue a.qid")
    alert_id = qid_link.inner_text()
    assert re.fullmatch(r"[0-9A-Za-z]{10,20}", alert_id)
    wait_for(lambda: maildir_messages(node.data_dir, "alice@example.test"), 30, "the alert in alice's mailbox")
    assert b"X-Kanmon-Alert: queue" in maildir_messages(node.data_dir, "alice@example.test")[0]
    node.flush()
    page.wait_for_selector(f"#status-{alert_id}")  # htmx polled the delivery status
    shot(page, "alerts")
    # The address field: the next test goes to bob instead (htmx sends the button's form).
    page.fill("#alert-test-to", "bob@example.test")
    page.click("#category-disk button.test")
    page.wait_for_selector("#result-disk a.qid")
    wait_for(lambda: maildir_messages(node.data_dir, "bob@example.test"), 30, "the alert in bob's mailbox")
    assert b"X-Kanmon-Alert: disk" in maildir_messages(node.data_dir, "bob@example.test")[0]
    page.goto(f"/trace?q={alert_id}")
    page.wait_for_selector(".timeline")
    shot(page, "trace")
    page.goto("/settings")
    page.select_option("select[name=lang]", "ja")
    page.click("main button[type=submit]")
    page.wait_for_url(re.compile(r"/settings$"))
    page.goto("/")
    page.wait_for_selector("text=ダッシュボード")
    shot(page, "dashboard-ja")
    # Error pages in the chosen language; a status line from a crafted link is not shown.
    page.goto("/no/such/page")
    assert page.inner_text("#error-title") == "404 見つかりません"
    page.goto("/queue?msg=" + "Your password expired")
    assert page.locator("#msg").count() == 0
    context.close()

    # The auditor reads everything and sees no write button; the API answers 403.
    context, page = open_page(browser, node, violations)
    log_in(page, "audrey", "audrey-pw")
    for path in (f"/queue/{qid}", "/queue", "/alerts"):
        page.goto(path)
        assert page.locator("button[class^='act-'], button.test, input[type=checkbox]").count() == 0, path
    token = page.locator("input[name=csrf]").first.get_attribute("value")
    r = page.request.post(f"/api/v1/queue/{qid}/delete", headers={"X-CSRF-Token": token})
    assert r.status == 403
    assert node.node.admin.ops.list({})["count"] == 1
    context.close()
    assert violations == []


def test_users_policies_live_tail_and_queue_backup_in_chromium(browser, node, tmp_path: Path) -> None:
    import httpx

    from kanmon.store.users import Users

    violations: list[str] = []
    qid = send_deferred(node)
    context, page = open_page(browser, node, violations)
    log_in(page, "alice", "alice-pw")

    # Add a mailbox on the Users page; it is there for `kanmon user` too.
    page.goto("/users")
    page.fill("#add-mailbox input[name=address]", "carol@example.test")
    page.fill("#add-mailbox input[name=password]", "carol-pw")
    page.fill("#add-mailbox input[name=confirm]", "carol-pw")
    page.click("#add-mailbox button.act-add")
    page.wait_for_selector("[id='mailbox-carol@example.test']")
    assert Users(node.node.config).verify("carol@example.test", "carol-pw")
    page.fill("#add-alias input[name=alias]", "sales@example.test")
    page.fill("#add-alias input[name=targets]", "carol@example.test, alice@example.test")
    page.click("#add-alias button.act-alias")
    page.wait_for_selector("[id='alias-sales@example.test']")
    shot(page, "users")

    # The Policies page: the running profiles side by side.
    page.goto("/policies")
    page.wait_for_selector("#session-profiles th#profile-default")
    assert page.locator("#edit-config").get_attribute("href") == "/config"
    shot(page, "policies")

    # The live tail: a line written after the page opened appears at the top.
    page.goto("/events?tail=1")
    page.wait_for_selector("#tail-on")
    with httpx.Client(base_url=node.console_url, timeout=30) as other:
        form = other.get("/login").text
        token = re.search(r'name="csrf" value="([^"]+)"', form).group(1)
        other.post("/login", data={"username": "<b>mallory</b>", "password": "x", "csrf": token})
    node.flush()
    row = page.wait_for_selector("tbody.tail-new tr:has-text('login failed for <b>mallory</b>')")
    assert "<b>mallory</b>" in row.inner_text()  # shown as text, never as markup
    shot(page, "events-tail")

    # Backup of the checked message from the queue page, then its restore by upload.
    page.goto("/queue")
    page.check(f"input[name=id][value='{qid}']")
    with page.expect_download() as download:
        page.click("button.act-backup")
    archive = tmp_path / "backup.tar"
    download.value.save_as(archive)
    assert archive.read_bytes()[:512].find(b"kanmon-backup.json") == 0
    node.node.admin.ops.act("delete", {"ids": [qid], "state": "all"}, source="test")
    page.goto("/queue/backup")
    page.set_input_files("#restore-form input[name=archive]", str(archive))
    page.check("#restore-form input[name=hold]")
    page.click("#restore-form button.act-restore")
    page.wait_for_selector("#restore-restored:text('1')")  # htmx put the result under the form
    assert page.locator("#restore-progress").get_attribute("hidden") is None  # the progress bar was shown
    assert node.node.admin.ops.list({"state": "hold"})["items"][0]["id"] == qid
    shot(page, "restore")
    context.close()
    assert violations == []
