"""The quarantine digest's signed links, end to end on a real node: spam to two
recipients is quarantined, the digest arrives in their mailboxes with a release and a
delete link, the links are followed with httpx as a browser (or a mail scanner) would:
GET shows the message and changes nothing, POST acts for that recipient only, once;
forged, expired and replayed links are refused with a page; guessing tokens is
throttled like guessing passwords; every action is an audit line naming the recipient."""

from __future__ import annotations

import email
import email.policy
import json
import re
import smtplib

import httpx
import pytest
from click.testing import CliRunner

from kanmon.cli import main
from kanmon.clock import ManualClock
from kanmon.config import parse_config
from kanmon.quarantine import links
from kanmon.records.query import search_events
from tests.integration.test_content_rules import SPAM_PROFILE, T0  # 07:00, the digest an hour away
from tests.support.kanmon_node import RunningNode, free_port, maildir_messages, wait_for

OUTSIDE = "127.0.0.9"
GUESSER = "127.0.0.23"

CONFIG = """
[server]
hostname = "mx1.example.test"
data_dir = "{data_dir}"
[smtp]
listen = ["127.0.0.1:{port}"]
relay_networks = ["127.0.0.1/32"]
min_free_disk = "1MB"
[[domain]]
name = "corp.example"
mailboxes = ["tanaka", "suzuki"]
[console]
listen = "127.0.0.1:{console}"
tls = false
public_url = "http://127.0.0.1:{console}/"
"""  # + the spam profile of the content rules' tests: a quarantine, its 08:00 digest, a pills rule
SPAM = (b"From: katou@partner.example\r\nTo: tanaka@corp.example, suzuki@corp.example\r\n"
        b"Subject: cheap pills <b>now</b>\r\nMessage-ID: <pills.1@partner.example>\r\n\r\nbuy\r\n")


@pytest.fixture
def node(tmp_path):
    port, console = free_port(), free_port()
    config_file = tmp_path / "kanmon.toml"
    config_file.write_text(CONFIG.format(data_dir=tmp_path / "data", port=port, console=console) + SPAM_PROFILE)
    n = RunningNode(parse_config(config_file.read_text()), clock=ManualClock(T0))
    n.config_file = config_file
    n.console_url = f"http://127.0.0.1:{console}"
    n.start()
    yield n
    n.stop()


def cli(node, *args):
    return CliRunner().invoke(main, [*args, "-c", str(node.config_file)])


def quarantined(node) -> list[dict]:
    return json.loads(cli(node, "quarantine", "list", "--json").output)["items"]


def digest_links(node, rcpt: str) -> dict[str, str]:
    (raw,) = [m for m in maildir_messages(node.data_dir, rcpt) if b"X-Kanmon-Digest: quarantine" in m]
    text = email.message_from_bytes(raw, policy=email.policy.default).get_body().get_content().replace("\r\n", "\n")
    found = dict(re.findall(r"^(release|delete): +(\S+)$", text, re.MULTILINE))
    assert set(found) == {"release", "delete"}, text
    return found


def released_copies(node, rcpt: str) -> list[bytes]:
    return [m for m in maildir_messages(node.data_dir, rcpt) if b"<pills.1@partner.example>" in m]


def test_a_digest_link_shows_on_get_acts_on_post_for_its_recipient_only_once(node):
    with smtplib.SMTP(node.host, node.port, source_address=(OUTSIDE, 0), timeout=10) as s:
        s.sendmail("katou@partner.example", ["tanaka@corp.example", "suzuki@corp.example"], SPAM)
    node.wait_idle()
    (item,) = quarantined(node)
    assert item["kind"] == "spam" and sorted(item["rcpts"]) == ["suzuki@corp.example", "tanaka@corp.example"]
    node.advance(3600)  # 08:00: the digest
    for rcpt in ("tanaka@corp.example", "suzuki@corp.example"):
        wait_for(lambda r=rcpt: len(maildir_messages(node.data_dir, r)) == 1, 10, f"{rcpt}'s digest")
    tanaka, suzuki = digest_links(node, "tanaka@corp.example"), digest_links(node, "suzuki@corp.example")
    assert tanaka["release"].startswith(f"{node.console_url}/q/")
    assert "kanmon quarantine release" not in maildir_messages(node.data_dir, "tanaka@corp.example")[0].decode()

    with httpx.Client(timeout=30) as c:
        # GET (a scanner's prefetch, a preview): the page, the escaped subject, and nothing done.
        for _ in range(2):
            page = c.get(tanaka["release"])
            assert page.status_code == 200, page.text
            assert "cheap pills &lt;b&gt;now&lt;/b&gt;" in page.text and "<b>now" not in page.text
            assert "katou@partner.example" in page.text and 'method="post"' in page.text
        assert c.get(suzuki["delete"]).status_code == 200
        node.wait_idle()
        assert [i["id"] for i in quarantined(node)] == [item["id"]]
        assert released_copies(node, "tanaka@corp.example") == []

        token = tanaka["release"].rsplit("/", 1)[1]
        # A POST whose form carries another token than its address: refused, nothing done.
        other = suzuki["delete"].rsplit("/", 1)[1]
        r = c.post(tanaka["release"], data={"token": other})
        assert r.status_code == 403 and "not the one this page sent" in r.text
        # Forged: suzuki's token with tanaka's address in it (the MAC no longer matches).
        body, mac = other.split(".")
        payload = links.unb64(body).replace(b"suzuki@", b"tanaka@").replace(b"delete:", b"release:")
        forged = links.b64(payload) + "." + mac
        for method in ("GET", "POST"):
            r = c.request(method, f"{node.console_url}/q/{forged}", data={"token": forged} if method == "POST" else None)
            assert r.status_code == 403 and "This link is not valid" in r.text and "Traceback" not in r.text
        # Expired: signed with this node's key, but its time is over.
        secret = links.load_secret(node.data_dir)
        expired = links.sign(secret, item["id"], "tanaka@corp.example", "release", node.node.clock.now() - 1)
        r = c.post(f"{node.console_url}/q/{expired}", data={"token": expired})
        assert r.status_code == 410 and "expired" in r.text
        node.wait_idle()
        assert released_copies(node, "tanaka@corp.example") == []

        # POST: released to tanaka only; suzuki's copy stays in the quarantine.
        r = c.post(tanaka["release"], data={"token": token})
        assert r.status_code == 200 and "released" in r.text, r.text
        wait_for(lambda: len(released_copies(node, "tanaka@corp.example")) == 1, 60, "the released message")
        node.wait_idle()
        assert len(released_copies(node, "tanaka@corp.example")) == 1
        assert released_copies(node, "suzuki@corp.example") == []
        (left,) = quarantined(node)
        assert left["id"] == item["id"] and left["rcpts"] == ["suzuki@corp.example"]
        # Again: gone, for POST and GET alike.
        r = c.post(tanaka["release"], data={"token": token})
        assert r.status_code == 404 and "no longer in the quarantine" in r.text
        assert c.get(tanaka["release"]).status_code == 404
        assert c.get(tanaka["delete"]).status_code == 404

        # suzuki deletes: the last recipient's copy, so the entry goes.
        r = c.post(suzuki["delete"], data={"token": suzuki["delete"].rsplit("/", 1)[1]})
        assert r.status_code == 200 and "deleted" in r.text
        assert quarantined(node) == []
        assert c.get(suzuki["release"]).status_code == 404
        node.wait_idle()
        assert len(released_copies(node, "tanaka@corp.example")) == 1 and released_copies(node, "suzuki@corp.example") == []
        # Japanese.
        ja = c.get(suzuki["release"], headers={"Accept-Language": "ja"})
        assert ja.status_code == 404 and "もう隔離されていません" in ja.text

    node.flush()
    lines = [e.text for e in search_events(node.data_dir, grep="audit:")]
    assert any(f"audit: tanaka@corp.example (recipient) from 127.0.0.1 via digest link: quarantine release {item['id']} -> ok"
               in t for t in lines), lines
    assert any(f"audit: suzuki@corp.example (recipient) from 127.0.0.1 via digest link: quarantine delete {item['id']} -> ok"
               in t for t in lines), lines
    trace = cli(node, "trace", item["id"]).output
    assert "released from quarantine by tanaka@corp.example to tanaka@corp.example as" in trace, trace
    assert "deleted from quarantine by suzuki@corp.example" in trace, trace


def test_the_other_way_round_a_deleted_copy_stays_deleted_and_the_last_copy_keeps_its_queue_id(node):
    with smtplib.SMTP(node.host, node.port, source_address=(OUTSIDE, 0), timeout=10) as s:
        s.sendmail("katou@partner.example", ["tanaka@corp.example", "suzuki@corp.example"], SPAM)
    node.wait_idle()
    (item,) = quarantined(node)
    node.advance(3600)
    for rcpt in ("tanaka@corp.example", "suzuki@corp.example"):
        wait_for(lambda r=rcpt: len(maildir_messages(node.data_dir, r)) == 1, 10, f"{rcpt}'s digest")
    tanaka, suzuki = digest_links(node, "tanaka@corp.example"), digest_links(node, "suzuki@corp.example")
    with httpx.Client(timeout=30) as c:
        r = c.post(tanaka["delete"], data={"token": tanaka["delete"].rsplit("/", 1)[1]})
        assert r.status_code == 200 and "deleted" in r.text
        (left,) = quarantined(node)
        assert left["rcpts"] == ["suzuki@corp.example"]  # only tanaka's copy went
        assert c.get(tanaka["release"]).status_code == 404  # and cannot come back
        r = c.post(suzuki["release"], data={"token": suzuki["release"].rsplit("/", 1)[1]})
        assert r.status_code == 200 and "released" in r.text
        wait_for(lambda: len(released_copies(node, "suzuki@corp.example")) == 1, 60, "the released message")
        node.wait_idle()
        assert quarantined(node) == []
        assert len(released_copies(node, "suzuki@corp.example")) == 1 and released_copies(node, "tanaka@corp.example") == []
    node.flush()
    trace = cli(node, "trace", item["id"]).output  # the last copy went out under the id it was accepted with
    assert "deleted from quarantine by tanaka@corp.example (the copy for tanaka@corp.example)" in trace, trace
    assert "released from quarantine by suzuki@corp.example to suzuki@corp.example" in trace, trace
    assert "as " not in trace.split("released from quarantine by suzuki@corp.example to suzuki@corp.example")[1].split("\n")[0]


def test_guessing_tokens_is_throttled_like_guessing_passwords(node):
    secret = links.load_secret(node.data_dir)
    good = links.sign(secret, "0123456789ABCDE", "tanaka@corp.example", "release", node.node.clock.now() + 3600)
    with httpx.Client(timeout=30, transport=httpx.HTTPTransport(local_address=GUESSER)) as guesser, \
            httpx.Client(timeout=30) as other:
        statuses = [guesser.get(f"{node.console_url}/q/guess{i}.AAAA").status_code for i in range(25)]
        assert statuses[0] == 403 and statuses[-1] == 429, statuses
        # Blocked: even a well-signed link answers 429 to that address; another address is not affected.
        r = guesser.get(f"{node.console_url}/q/{good}")
        assert r.status_code == 429 and "Too many" in r.text
        assert other.get(f"{node.console_url}/q/{good}").status_code == 404  # signed, but no such entry
