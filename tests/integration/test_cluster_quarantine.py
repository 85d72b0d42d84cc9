"""Two relays sharing one quarantine in PostgreSQL (the tests' own server), as two
in-process nodes with configs of their own: a message quarantined on mr1 is listed,
shown, released (through mr2's own queue, delivered once) and deleted from mr2's
`kanmon quarantine` commands and console; two nodes releasing it at once release it
once; the retention purge works on the shared store; the trace in the shared records
shows both nodes."""

from __future__ import annotations

import json
import re
import smtplib
import threading
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

import kanmon.policy.standard
from kanmon.admin.accounts import AdminAccounts
from kanmon.cli import main
from kanmon.config import parse_config
from kanmon.control import ControlClient
from kanmon.policy.pipeline import ACCEPTED, Check, Pipeline, accept
from kanmon.policy.standard import standard_checks
from kanmon.records import pgquery
from tests.support.kanmon_node import TEST_DEFAULT_PROFILE, RunningNode, free_port, maildir_messages, wait_for

pytest.importorskip("psycopg", reason="psycopg is not installed (pip install 'psycopg[binary]')")

CONFIG = """
[server]
hostname = "{node}.example.test"
data_dir = "{data_dir}"
workers = 0
[smtp]
listen = ["127.0.0.1:{port}"]
relay_networks = ["127.0.0.1/32"]
min_free_disk = "1MB"
[[domain]]
name = "corp.example"
mailboxes = ["tanaka", "sato"]
[records]
url = "{url}"
node = "{node}"
[console]
listen = "127.0.0.1:{console}"
tls = false
""" + TEST_DEFAULT_PROFILE


class QuarantineSubject(Check):
    """DATA: a message whose Subject asks for it goes to the spam quarantine."""

    name = "quarantine_subject"

    def data(self, ctx):
        if b"Subject: quarantine me" in ctx.header:
            return accept(quarantine="test: the subject asked", classification="Spam")
        return ACCEPTED


class Relay:
    def __init__(self, tmp_path: Path, name: str, url: str):
        self.name = name
        self.dir = tmp_path / name
        self.dir.mkdir()
        self.console_port = free_port()
        self.config_file = self.dir / "kanmon.toml"
        self.config_file.write_text(CONFIG.format(node=name, data_dir=self.dir / "data", port=free_port(), url=url,
                                                  console=self.console_port))
        (self.dir / "data").mkdir(mode=0o700)
        AdminAccounts(self.dir / "data").add("alice", "admin", "alice-pw")
        self.node = RunningNode(parse_config(self.config_file.read_text())).start()

    def cli(self, *args: str, code: int = 0) -> str:
        result = CliRunner().invoke(main, [*args, "-c", str(self.config_file)])
        assert result.exit_code == code, (result.output, result.exception)
        return result.output

    def quarantine(self, *args: str, code: int = 0) -> dict:
        return json.loads(self.cli("quarantine", *args, "--json", code=code))

    def control(self, op: str, args: dict) -> dict:
        with ControlClient(self.node.data_dir) as client:
            return client.request(op, args)

    def send(self, subject: str, rcpt: str = "tanaka@corp.example") -> None:
        with smtplib.SMTP(self.node.host, self.node.port, timeout=60) as s:
            s.sendmail("suzuki@remote.example", [rcpt], f"Subject: {subject}\r\n\r\nbody of {subject}\r\n")

    def delivered(self, rcpt: str = "tanaka@corp.example") -> list[bytes]:
        return maildir_messages(self.node.data_dir, rcpt)


@pytest.fixture
def relays(tmp_path, pg_url, monkeypatch):
    monkeypatch.setattr(kanmon.policy.standard, "standard_pipeline",
                        lambda config, **io: Pipeline([*standard_checks(config, **io), QuarantineSubject()]))
    started: list[Relay] = []
    try:
        for name in ("mr1", "mr2"):
            started.append(Relay(tmp_path, name, pg_url))
        yield started
    finally:
        for r in started:
            r.node.stop()


def test_a_message_quarantined_on_one_relay_is_released_from_the_other(relays):
    mr1, mr2 = relays
    mr1.send("quarantine me")
    mr1.node.wait_idle()
    assert mr1.delivered() == [] and mr1.quarantine("list")["items"] == mr2.quarantine("list")["items"]
    (item,) = mr2.quarantine("list")["items"]
    qid = item["id"]
    assert (item["kind"], item["reason"], item["rcpts"]) == ("spam", "test: the subject asked", ["tanaka@corp.example"])
    assert (item["node"], item["releasing"]) == ("mr1", "")
    assert "on: mr1" in mr2.cli("quarantine", "list")
    shown = mr2.quarantine("show", qid)
    assert shown["subject"] == "quarantine me" and shown["body"][0] == "body of quarantine me"
    assert f"{qid}: released" in mr2.cli("quarantine", "release", qid)
    wait_for(lambda: len(mr2.delivered()) == 1, 60, "the release delivered by mr2")
    mr2.node.wait_idle()
    assert b"Subject: quarantine me" in mr2.delivered()[0] and mr1.delivered() == []
    assert mr1.quarantine("list")["items"] == []
    r = mr1.quarantine("release", qid, code=1)  # gone for every node
    assert r["released"] == [] and "not in the quarantine" in r["errors"][0]
    # The shared records tell the whole path under one id: quarantined on mr1, released
    # and delivered by mr2.
    for relay in (mr1, mr2):
        relay.node.flush()
        wait_for(relay.node.node.records.shipper.flush, 30, "records shipped")
    events = pgquery.search_events(mr1.node.config.records, queue_id=qid)
    kinds = {(e.node, e.kind) for e in events}
    assert {("mr1", "accepted"), ("mr1", "quarantine"), ("mr2", "quarantine-release"), ("mr2", "delivery")} <= kinds, kinds


def test_two_relays_releasing_one_message_at_once_deliver_it_once(relays):
    mr1, mr2 = relays
    mr1.send("quarantine me")
    mr1.node.wait_idle()
    (item,) = mr1.quarantine("list")["items"]
    start = threading.Barrier(2)
    replies: dict[str, dict] = {}

    def release(relay: Relay) -> None:
        start.wait()
        replies[relay.name] = relay.control("quarantine_release", {"ids": [item["id"]], "by": "test"})

    threads = [threading.Thread(target=release, args=(r,)) for r in relays]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    results = [replies[n]["result"] for n in ("mr1", "mr2")]
    assert sorted(len(r["released"]) for r in results) == [0, 1], results
    (loser,) = [r for r in results if not r["released"]]
    assert "not in the quarantine" in loser["errors"][0]
    wait_for(lambda: len(mr1.delivered()) + len(mr2.delivered()) == 1, 60, "one delivery")
    for relay in relays:
        relay.node.wait_idle()
    assert len(mr1.delivered()) + len(mr2.delivered()) == 1  # and no second one once both are idle


def test_the_console_of_the_other_relay_lists_shows_and_deletes(relays):
    mr1, mr2 = relays
    mr1.send("quarantine me")
    mr1.node.wait_idle()
    (item,) = mr1.quarantine("list")["items"]
    qid = item["id"]
    with httpx.Client(base_url=f"http://127.0.0.1:{mr2.console_port}", timeout=30) as client:
        token = re.search(r'name="csrf" value="([^"]+)"', client.get("/login").text).group(1)
        assert client.post("/login", data={"username": "alice", "password": "alice-pw", "csrf": token}).status_code == 303
        assert qid in client.get("/quarantine").text
        assert "quarantine me" in client.get(f"/quarantine/{qid}").text
        token = re.search(r'name="csrf" value="([^"]+)"', client.get("/quarantine").text).group(1)
        r = client.post(f"/api/v1/quarantine/{qid}/delete", headers={"X-CSRF-Token": token})
        assert r.status_code == 200 and r.json()["deleted"] == [qid], r.text
    assert mr1.quarantine("list")["items"] == []
    mr1.node.wait_idle()
    mr2.node.wait_idle()
    assert mr1.delivered() == [] and mr2.delivered() == []


def test_the_console_of_one_relay_traces_searches_and_counts_the_other_relays_mail(relays):
    """With [records] url the console reads every node's records, as `kanmon trace`,
    `log` and `stats` do: mail taken by mr1 is found on mr2's console, named by node."""
    mr1, mr2 = relays
    mr1.send("for the trace on mr2")
    mr1.node.wait_idle()
    assert len(mr1.delivered()) == 1
    mr1.node.flush()
    wait_for(mr1.node.node.records.shipper.flush, 30, "records shipped")
    with httpx.Client(base_url=f"http://127.0.0.1:{mr2.console_port}", timeout=30) as client:
        token = re.search(r'name="csrf" value="([^"]+)"', client.get("/login").text).group(1)
        assert client.post("/login", data={"username": "alice", "password": "alice-pw", "csrf": token}).status_code == 303
        (timeline,) = client.get("/api/v1/trace", params={"q": "suzuki@remote.example"}).json()
        assert timeline["node"] == "mr1" and timeline["final"].startswith("delivered to tanaka@corp.example"), timeline
        assert "for the trace on mr2" in client.get("/trace", params={"q": "suzuki@remote.example"}).text
        events = client.get("/api/v1/events", params={"grep": "suzuki@remote.example"}).json()
        assert events and {e["node"] for e in events} == {"mr1"}, events
        stats = client.get("/api/v1/stats", params={"by": "day", "since": "1d"}).json()
        assert stats["totals"]["received"] == 1 and stats["totals"]["delivered"] == 1, stats["totals"]


def test_retention_purges_the_shared_store_and_resolves_an_unfinished_release(relays):
    mr1, mr2 = relays
    mr1.send("quarantine me")
    mr1.send("quarantine me", rcpt="sato@corp.example")
    mr1.node.wait_idle()
    first, second = (r["id"] for r in mr2.quarantine("list")["items"])
    # mr2 stopped in the middle of releasing `second` (claimed, not yet queued): no other
    # node may take it; mr2's next purge puts it back in the quarantine.
    from kanmon.state.pgquarantine import PgQuarantine

    store = PgQuarantine(mr2.node.config.records.url, "mr2")
    try:
        store.claim(second, "mr2", 0.0)
    finally:
        store.close()
    r = mr1.quarantine("release", second, code=1)
    assert "being released by mr2" in r["errors"][0]
    reply = mr2.control("quarantine_purge", {"keep": 10 * 86400})
    assert reply["ok"] and reply["result"]["deleted"] == []
    assert [r["id"] for r in mr1.quarantine("list")["items"]] == [first, second]
    assert mr1.quarantine("release", second)["released"] == [second]
    # Everything older than `keep` goes, whichever node purges.
    reply = mr1.control("quarantine_purge", {"keep": 0})
    assert reply["ok"] and reply["result"]["deleted"] == [first]
    assert mr2.quarantine("list")["items"] == []
    wait_for(lambda: len(mr1.delivered("sato@corp.example")) == 1, 60, "the release delivered")


def test_a_release_whose_entry_could_not_be_removed_is_never_released_twice(relays, monkeypatch):
    """The message is queued (and delivered) but removing its quarantine entry fails: the
    entry stays claimed; the next purge must remove it, not put it back in the
    quarantine, where any node could release it a second time."""
    from kanmon.quarantine.store import QuarantineError
    from kanmon.state.pgquarantine import PgQuarantine

    mr1, mr2 = relays
    mr1.send("quarantine me")
    mr1.node.wait_idle()
    (item,) = mr2.quarantine("list")["items"]
    qid = item["id"]

    def refuse(self, qid, node):
        raise QuarantineError("the database went away")

    monkeypatch.setattr(PgQuarantine, "delete", refuse)
    r = mr2.quarantine("release", qid, code=1)
    assert r["released"] == [qid] and "released; its quarantine entry stays" in r["errors"][0], r
    wait_for(lambda: len(mr2.delivered()) == 1, 60, "the release delivered by mr2")
    mr2.node.wait_idle()
    monkeypatch.undo()
    reply = mr2.control("quarantine_purge", {"keep": 10 * 86400})
    assert reply["ok"], reply
    assert mr1.quarantine("list")["items"] == []  # removed, not given back
    assert "not in the quarantine" in mr1.quarantine("release", qid, code=1)["errors"][0]
    mr1.node.wait_idle()
    assert len(mr2.delivered()) == 1 and mr1.delivered() == []


def test_one_digest_for_a_scheduled_slot_whichever_relays_run_it(relays):
    mr1, mr2 = relays
    mr1.send("quarantine me")
    mr1.node.wait_idle()
    slot = 1_800_000_000.0  # the time the schedule fired for: the same on every node
    replies = [r.control("quarantine_digest", {"since": 0, "slot": slot})["result"] for r in (mr2, mr1)]
    assert replies == [{"digests": {"tanaka@corp.example": 1}}, {"digests": {}, "mailed_by": "mr2"}]
    wait_for(lambda: len(mr2.delivered()) == 1, 60, "the digest")
    assert b"Quarantine digest" in mr2.delivered()[0]
    # The next slot is mailed by whichever node claims it first, from the last scheduled
    # digest of any node: mr1's own last time (0 here) does not list again what mr2 mailed.
    reply = mr1.control("quarantine_digest", {"since": 0, "slot": slot + 86400})["result"]
    assert reply == {"digests": {}}
    mr2.send("quarantine me")
    mr2.node.wait_idle()
    reply = mr1.control("quarantine_digest", {"since": 0, "slot": slot + 2 * 86400})["result"]
    assert reply == {"digests": {"tanaka@corp.example": 1}}  # the new one only
    # Run by hand (no slot), a digest is always mailed, from the time it is given.
    assert mr2.control("quarantine_digest", {"since": 0})["result"] == {"digests": {"tanaka@corp.example": 2}}
    wait_for(lambda: len(mr1.delivered()) == 1 and len(mr2.delivered()) == 2, 60, "the digests")


def test_an_entry_committed_after_the_last_digest_listed_is_mailed_by_the_next(relays):
    """An entry's time is its receiving node's clock, taken before its row commits: one
    stored just before the last digest listed, but not yet seen by it (a slow insert, a
    clock behind), is in the next digest, not skipped for good."""
    import time

    from kanmon.state.backends import open_state

    mr1, mr2 = relays
    mr1.send("quarantine me")
    mr1.node.wait_idle()
    # The last scheduled digest listed just now and mailed nothing: it did not see the entry.
    state = open_state(mr2.node.config)
    try:
        now = time.time()
        state.cache("quarantine-digest").put("last", json.dumps({"t": now, "ids": []}), 3600, now)
    finally:
        state.close()
    reply = mr2.control("quarantine_digest", {"since": 0, "slot": 1_800_000_000.0})["result"]
    assert reply == {"digests": {"tanaka@corp.example": 1}}


def test_a_digest_whose_time_the_shared_state_cannot_keep_is_still_mailed(relays, monkeypatch):
    """The digests are mailed before the time is kept: a failure to keep it is said (the
    node logs it), not reported as a failed digest (which would mail them again)."""
    import psycopg

    import kanmon.state.postgresql

    mr1, _mr2 = relays
    mr1.send("quarantine me")
    mr1.node.wait_idle()

    def refuse(*_args, **_kwargs):
        raise psycopg.OperationalError("the database went away")

    monkeypatch.setattr(kanmon.state.postgresql.PgCache, "put", refuse)
    reply = mr1.control("quarantine_digest", {"since": 0, "slot": 1_800_000_000.0})
    assert reply["ok"], reply
    assert reply["result"] == {"digests": {"tanaka@corp.example": 1},
                               "not_kept": "OperationalError: the database went away"}
    wait_for(lambda: len(mr1.delivered()) == 1, 60, "the digest")


def test_a_message_the_shared_quarantine_cannot_take_is_refused_451_not_lost(tmp_path, private_pg, monkeypatch):
    monkeypatch.setattr(kanmon.policy.standard, "standard_pipeline",
                        lambda config, **io: Pipeline([*standard_checks(config, **io), QuarantineSubject()]))
    mr1 = Relay(tmp_path, "mr1", private_pg.create_database())
    try:
        private_pg.stop()
        with pytest.raises(smtplib.SMTPDataError) as refused:
            mr1.send("quarantine me")
        assert refused.value.smtp_code == 451
        mr1.send("not for the quarantine")  # mail no check sets aside flows as usual
        wait_for(lambda: len(mr1.delivered()) == 1, 60, "the other message delivered")
        private_pg.start()
        mr1.send("quarantine me")  # the client's retry, once the database is back
        mr1.node.wait_idle()
        assert [r["subject"] for r in mr1.quarantine("list")["items"]] == ["quarantine me"]
    finally:
        mr1.node.stop()


def test_the_trace_and_the_history_of_a_message_released_on_the_other_relay_name_each_node(relays):
    """Quarantined on mr1, released and delivered by mr2: each line of `kanmon trace`
    (and each step of --json) names its node, the head names both; the history row mr1
    wrote ("Quarantined") takes mr2's delivery."""
    mr1, mr2 = relays
    mr1.send("quarantine me")
    mr1.node.wait_idle()
    (item,) = mr2.quarantine("list")["items"]
    qid = item["id"]
    assert f"{qid}: released" in mr2.cli("quarantine", "release", qid)
    wait_for(lambda: len(mr2.delivered()) == 1, 60, "the release delivered by mr2")
    mr2.node.wait_idle()
    for relay in (mr1, mr2):
        relay.node.flush()
        wait_for(relay.node.node.records.shipper.flush, 30, "records shipped")

    (timeline,) = map(json.loads, mr1.cli("trace", qid, "--json").splitlines())
    steps = {(s["node"], s["kind"]) for s in timeline["steps"]}
    assert {("mr1", "accepted"), ("mr1", "quarantine"), ("mr2", "quarantine-release"), ("mr2", "delivery")} <= steps
    text = mr1.cli("trace", qid)
    assert f"{qid}  " in text and "on mr1, mr2" in text.splitlines()[0], text
    lines = [line for line in text.splitlines() if line.startswith("  20")]
    assert lines and all(" mr1 " in line or " mr2 " in line for line in lines), text
    assert any(" mr2 " in line and "attempt" in line and "stat=Sent" in line for line in lines), text

    def rows() -> list:
        return pgquery.search_history(mr1.node.config.records, queue_id=qid)

    wait_for(lambda: [(r.node, r.status) for r in rows()] == [("mr1", "Delivered")], 30, "mr1's row delivered")
