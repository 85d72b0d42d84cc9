"""[archive]: a copy of every accepted message, to a Maildir (with the envelope in a first
header field) or to an address; by direction and domain; the quota stops copies with an
event and the `archive` alert warns past its threshold."""

from __future__ import annotations

import smtplib

from kanmon.config import parse_config
from kanmon.records.query import search_events
from tests.support.kanmon_node import TEST_DEFAULT_PROFILE, RunningNode, free_port, maildir_messages, wait_for

OUTSIDE = "127.0.0.9"

CONFIG = """
[server]
hostname = "mx1.example.test"
data_dir = "{data_dir}"
[smtp]
listen = ["127.0.0.1:{port}"]
relay_networks = ["127.0.0.1/32"]
greet_pause = "0s"  # the pregreet wait has its own tests (test_hostile_input)
min_free_disk = "1MB"
[[domain]]
name = "corp.example"
mailboxes = ["tanaka", "suzuki", "journal"]
[queue]
suspend_delivery = {suspend}
{extra}
""" + TEST_DEFAULT_PROFILE


def start(tmp_path, extra: str, suspend: str = "false") -> RunningNode:
    text = CONFIG.format(data_dir=tmp_path / "data", port=free_port(), extra=extra, suspend=suspend)
    return RunningNode(parse_config(text)).start()


def send(node, rcpts, source=OUTSIDE, subject="hello", body="x"):
    with smtplib.SMTP(node.host, node.port, source_address=(source, 0), timeout=10) as s:
        s.sendmail("katou@partner.example" if source == OUTSIDE else "tanaka@corp.example", rcpts,
                   f"Subject: {subject}\r\nTo: tanaka@corp.example\r\n\r\n{body}\r\n")


def archived(path) -> list[bytes]:
    new = path / "new"
    return [p.read_bytes() for p in sorted(new.iterdir())] if new.exists() else []


def test_maildir_copy_keeps_the_envelope_and_is_private(tmp_path):
    arch = tmp_path / "archive"
    node = start(tmp_path, f'[archive]\nmaildir = "{arch}"\n', suspend="true")  # copies even before delivery
    try:
        send(node, ["tanaka@corp.example", "suzuki@corp.example"])  # suzuki: a bcc no header shows
        wait_for(lambda: len(list((arch / "new").iterdir())) == 1, 10, "the archive copy")
        (copy,) = archived(arch)
        first = copy.split(b"\r\n", 1)[0]
        assert first.startswith(b"X-Kanmon-Archive: id=") and b"direction=inbound" in first
        assert b"from=<katou@partner.example>; to=<tanaka@corp.example>, <suzuki@corp.example>" in first
        assert b"\r\nSubject: hello\r\n" in copy and b"Received: from" in copy
        assert (arch.stat().st_mode & 0o777) == 0o700
        assert all((p.stat().st_mode & 0o777) == 0o600 for p in (arch / "new").iterdir())
    finally:
        node.stop()


def test_direction_and_domains_choose_what_is_archived(tmp_path):
    arch = tmp_path / "archive"
    node = start(tmp_path, f'[archive]\nmaildir = "{arch}"\ndirection = "outbound"\n')
    try:
        send(node, ["tanaka@corp.example"])  # inbound: not archived
        send(node, ["suzuki@corp.example"], source="127.0.0.1")  # from relay_networks: outbound
        node.wait_idle()
        wait_for(lambda: len(list((arch / "new").iterdir())) == 1, 10, "the archive copy")
        node.wait_idle()
        (copy,) = archived(arch)
        assert b"direction=outbound" in copy.split(b"\r\n", 1)[0]
    finally:
        node.stop()
    arch2 = tmp_path / "archive2"
    node = start(tmp_path / "b", f'[archive]\nmaildir = "{arch2}"\ndomains = ["other.example"]\n')
    try:
        send(node, ["tanaka@corp.example"])
        node.wait_idle()
        assert archived(arch2) == []
    finally:
        node.stop()


def test_copy_to_an_address_is_an_added_recipient(tmp_path):
    node = start(tmp_path, '[archive]\nto = "journal@corp.example"\n')
    try:
        send(node, ["tanaka@corp.example"])
        node.wait_idle()
        (copy,) = maildir_messages(node.data_dir, "journal@corp.example")
        assert b"Subject: hello" in copy
        assert len(maildir_messages(node.data_dir, "tanaka@corp.example")) == 1
    finally:
        node.stop()


def test_quota_stops_copies_with_one_event_and_the_alert_warns(tmp_path):
    arch = tmp_path / "archive"
    node = start(tmp_path, f'[archive]\nmaildir = "{arch}"\nquota = "3KB"\n[alerts]\narchive_used_above = 0.5\n')
    try:
        for i in range(6):
            send(node, ["tanaka@corp.example"], subject=f"m{i}", body="y" * 700)
        node.wait_idle()
        wait_for(lambda: any("archive copy not kept" in e.text for e in search_events(node.data_dir)), 10, "the event")
        kept = archived(arch)
        assert 2 <= len(kept) <= 3 and sum(len(k) for k in kept) <= 3000
        node.flush()
        skipped = [e.text for e in search_events(node.data_dir) if "archive copy not kept" in e.text]
        assert len(skipped) == 1 and "over quota" in skipped[0]  # said once, not once a message
        alerts = node.node.monitoring.alerts
        node.call(alerts.check_now)
        wait_for(lambda: any(st.active and cat == "archive" for (cat, _), st in alerts.states.items()), 10, "archive alert")
    finally:
        node.stop()
