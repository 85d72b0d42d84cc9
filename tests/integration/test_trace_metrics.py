"""Trace and metrics: one node moves a delivered, a deferred-then-delivered, a
bounced and a rejected message; `kanmon trace` shows every step of each, and the
metrics endpoint, scraped over HTTP and parsed, counts them."""

from __future__ import annotations

import re
import smtplib
import ssl
import urllib.error
import urllib.request

import pytest
from click.testing import CliRunner

from kanmon.cli import main
from kanmon.clock import ManualClock
from kanmon.config import parse_config
from kanmon.records.query import search_history
from kanmon.records.trace import trace
from tests.support.kanmon_node import RunningNode, free_port, wait_for
from tests.support.smtpsink import SmtpSink

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
name = "corp.example"
deliver = "relay"
servers = ["{corp}"]
tls = "none"
[[domain]]
name = "bounce.example"
deliver = "relay"
servers = ["{bounce}"]
tls = "none"
[outbound]
connect_timeout = "2s"
[queue]
retry = "5m..1h"
[metrics]
listen = "127.0.0.9:{metrics_port}"
"""

SAMPLE_RE = re.compile(r'^([a-z_]+)(\{[a-z_]+="[^"]*"(?:,[a-z_]+="[^"]*")*\})? (-?[0-9.e+]+)$')


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text format -> {'name{a="b"}': value}; every line must be well formed."""
    out: dict[str, float] = {}
    types: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge", "histogram")
            types[name] = kind
            continue
        m = SAMPLE_RE.match(line)
        assert m, f"bad sample line {line!r}"
        name, labels, value = m.groups()
        base = re.sub(r"_(bucket|sum|count)$", "", name) if name not in types else name
        assert base in types, f"{name} has no TYPE line"
        out[name + (labels or "")] = float(value)
    return out


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.9:{port}/metrics", timeout=10) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return parse_metrics(r.read().decode())


def send(node, rcpts, subject, *, tls=False):
    msg = f"From: alice@example.test\r\nSubject: {subject}\r\nMessage-ID: <{subject}@example.test>\r\n\r\nhello\r\n"
    with smtplib.SMTP(node.host, node.port, timeout=60) as s:
        s.ehlo("client.example")
        if tls:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            s.starttls(context=ctx)
            s.ehlo("client.example")
        return s.sendmail("alice@example.test", rcpts, msg)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trace")
    corp_port = free_port("127.0.0.7")
    corp = SmtpSink("127.0.0.7", corp_port)
    corp.stop()
    bounce = SmtpSink("127.0.0.8")
    bounce.rcpt_replies = {"nobody@bounce.example": "550 5.1.1 <nobody@bounce.example>: User unknown"}
    metrics_port = free_port("127.0.0.9")  # its own address: no clash with the SMTP port
    text = NODE.format(data_dir=tmp / "data", port=free_port(), corp=f"127.0.0.7:{corp_port}", bounce=bounce.address,
                       metrics_port=metrics_port)
    (tmp / "kanmon.toml").write_text(text)
    node = RunningNode(parse_config(text), clock=ManualClock()).start()
    try:
        send(node, ["bob@example.test"], "delivered", tls=True)
        send(node, ["user@corp.example"], "later")
        send(node, ["nobody@bounce.example"], "bounced")
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            send(node, ["nobody@example.test"], "refused")
        node.wait_idle()
        corp.start()
        node.advance(400)  # the first retry is due after 5 minutes
        corp.wait_for_messages(1)
        node.wait_idle()
        yield node, tmp, metrics_port
    finally:
        node.stop()
        corp.close()
        bounce.close()


def steps(t):
    return [(s.step, s.text) for s in t.steps]


def test_trace_of_a_delivered_message_by_message_id(world):
    node, _, _ = world
    (t,) = trace(node.data_dir, "<delivered@example.test>")
    kinds = [k for k, _ in steps(t)]
    assert kinds[:3] == ["session", "tls", "accepted"]
    connect = t.steps[0]
    assert connect.text.startswith("connect from ") and connect.detail["helo"] == "client.example"
    assert t.steps[1].text.startswith("STARTTLS=server, relay=") and "version=TLSv1." in t.steps[1].text
    assert t.steps[2].text.startswith("from=<alice@example.test>, size=") and "proto=ESMTPS" in t.steps[2].text
    attempt = next(s for s in t.steps if s.step == "attempt")
    assert attempt.text.startswith("to=<bob@example.test>") and "stat=Sent" in attempt.text
    assert kinds[-1] == "removed"
    assert t.final == "delivered to bob@example.test"
    assert t.helo == "client.example" and t.message_id == "<delivered@example.test>"


def test_trace_of_a_deferred_then_delivered_message_by_queue_id(world):
    node, _, _ = world
    (row,) = [r for r in search_history(node.data_dir, rcpt="user@corp.example")]
    (t,) = trace(node.data_dir, row.queue_id)
    (hop,) = [s.text for s in t.steps if s.step == "hop"]
    assert hop.startswith("relay=[127.0.0.7]:") and "Connection refused by 127.0.0.7" in hop
    attempts = [s.text for s in t.steps if s.step == "attempt"]
    assert len(attempts) == 2
    assert attempts[0].startswith("to=<user@corp.example>") and "stat=Deferred: Connection refused" in attempts[0]
    assert attempts[1].startswith("to=<user@corp.example>") and "relay=[127.0.0.7]" in attempts[1]
    assert "stat=Sent (250 2.0.0" in attempts[1]
    assert [s.step for s in t.steps].index("hop") < [s.step for s in t.steps].index("attempt")
    assert t.final == "delivered to user@corp.example"
    assert t.steps[0].step == "session" and any(s.step == "accepted" for s in t.steps)


def test_trace_of_a_bounced_message_by_address_shows_the_notice(world):
    node, _, _ = world
    (t,) = trace(node.data_dir, "nobody@bounce.example")
    bounced = [s.text for s in t.steps if s.step == "attempt"]
    assert len(bounced) == 1 and "stat=Bounced" in bounced[0] and "550 5.1.1" in bounced[0]
    (notice,) = [s.text for s in t.steps if s.step == "notice"]
    assert notice.startswith("sender failure notification: ")
    assert t.final.startswith("bounced for nobody@bounce.example (550 5.1.1")
    # The notice is a message of its own, traceable by its queue id.
    (n,) = trace(node.data_dir, notice.rsplit(" ", 1)[1])
    assert n.mail_from == "" and n.rcpts == ["alice@example.test"] and n.final == "delivered to alice@example.test"


def test_trace_of_a_rejected_message(world):
    node, _, _ = world
    (t,) = trace(node.data_dir, "nobody@example.test")
    assert t.queue_id is None
    assert [k for k, _ in steps(t)][0] == "session"
    reject = t.steps[-1]
    assert reject.step == "reject" and reject.text.startswith("NOQUEUE: reject: RCPT from ")
    assert t.final.startswith("rejected: 550 5.1.1") and t.helo == "client.example"
    assert t.mail_from == "alice@example.test" and t.rcpts == ["nobody@example.test"]


def test_trace_command_prints_each_timeline_and_json(world):
    node, tmp, _ = world
    cfg = str(tmp / "kanmon.toml")
    out = CliRunner().invoke(main, ["trace", "-c", cfg, "alice@example.test"])
    assert out.exit_code == 0, out.output
    # alice sent four transactions (one refused) and received the failure notice.
    assert out.output.count("final: ") == 5
    assert "final: rejected: 550 5.1.1" in out.output and "(check local_recipients)" in out.output and "final: delivered to bob@example.test" in out.output
    assert "accepted  from=<alice@example.test>" in out.output and "[EHLO client.example]" in out.output
    assert "removed   the message left the queue" in out.output and "removed   removed" not in out.output
    js = CliRunner().invoke(main, ["trace", "-c", cfg, "--json", "<later@example.test>"])
    assert js.exit_code == 0 and js.output.count("\n") == 1 and '"final": "delivered to user@corp.example"' in js.output
    missing = CliRunner().invoke(main, ["trace", "-c", cfg, "nobody-at-all@example.test"])
    assert missing.exit_code == 1


def test_stats_command_counts_the_day(world):
    _, tmp, _ = world
    out = CliRunner().invoke(main, ["stats", "-c", str(tmp / "kanmon.toml"), "--json", "--since", "1d"])
    assert out.exit_code == 0, out.output
    import json

    d = json.loads(out.output)
    t = d["totals"]
    # 3 messages from clients + 1 failure notice; bob, user@corp and the notice delivered.
    assert (t["received"], t["delivered"], t["deferred"], t["bounced"], t["rejected"]) == (4, 3, 1, 1, 1)
    assert d["top_senders"][0] == {"name": "alice@example.test", "count": 3}
    assert {"name": "corp.example", "count": 1} in d["top_domains"]
    text = CliRunner().invoke(main, ["stats", "-c", str(tmp / "kanmon.toml"), "--by", "hour"])
    assert text.exit_code == 0 and "top destination domains" in text.output and "total" in text.output


def test_metrics_scraped_over_http(world):
    node, _, port = world
    node.flush()
    m = scrape(port)
    assert m['kanmon_messages_received_total{source="smtp"}'] == 3
    assert m['kanmon_messages_received_total{source="internal"}'] == 1
    assert m["kanmon_messages_received_tls_total"] == 1
    assert m["kanmon_tls_inbound_ratio"] == pytest.approx(1 / 3)
    assert m['kanmon_messages_rejected_total{class="address",stage="RCPT"}'] == 1
    assert m['kanmon_deliveries_total{mailer="local"}'] == 2
    assert m['kanmon_deliveries_total{mailer="esmtp"}'] == 1
    assert m['kanmon_deferrals_total{class="network"}'] == 1
    assert m['kanmon_bounces_total{class="address"}'] == 1
    assert m['kanmon_notices_total{type="failure"}'] == 1
    assert m["kanmon_smtp_connections_total"] == 4
    assert m["kanmon_smtp_open_connections"] == 0
    assert m['kanmon_queue_messages{state="deferred"}'] == 0 and m["kanmon_queue_oldest_age_seconds"] == 0
    # Remote attempts: the deferred one, its retry, the bounce.
    assert m["kanmon_delivery_attempt_duration_seconds_count"] == 3
    assert m['kanmon_delivery_attempt_duration_seconds_bucket{le="+Inf"}'] == 3
    assert m['kanmon_deliveries_tls_total{tls="no"}'] == 1 and m["kanmon_tls_outbound_ratio"] == 0


def test_metrics_open_connections_and_queue_gauges(world):
    node, _, port = world
    with smtplib.SMTP(node.host, node.port, timeout=60) as s:
        s.ehlo("idle.example")

        def one_open() -> bool:
            node.flush()
            return scrape(port)["kanmon_smtp_open_connections"] == 1

        wait_for(one_open, 60, "one open connection in the metrics")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"http://127.0.0.9:{port}/other", timeout=10)
    e.value.close()
    assert e.value.code == 404


MULTI = """
[server]
hostname = "mx1.example.test"
data_dir = "{data_dir}"
workers = 2
[smtp]
listen = ["127.0.0.1:{port}"]
min_free_disk = "1MB"
[[domain]]
name = "example.test"
mailboxes = ["alice"]
[metrics]
listen = "127.0.0.9:{metrics_port}"
"""


def test_metrics_count_what_receiver_processes_did(tmp_path):
    """SMTP is received in child processes; the main process's endpoint still counts it
    (from the counters the receivers' records writers keep in records.sqlite)."""
    from tests.support.kanmon_node import KanmonProcess, wait_port

    port, metrics_port = free_port(), free_port("127.0.0.9")
    cfg = tmp_path / "kanmon.toml"
    cfg.write_text(MULTI.format(data_dir=tmp_path / "data", port=port, metrics_port=metrics_port))
    proc = KanmonProcess(cfg, "127.0.0.1", port).start()
    try:
        wait_port("127.0.0.9", metrics_port)
        for n in range(3):
            with smtplib.SMTP("127.0.0.1", port, timeout=60) as s:
                s.sendmail("a@remote.example", ["alice@example.test"], f"Subject: {n}\r\n\r\nx\r\n")
        with smtplib.SMTP("127.0.0.1", port, timeout=60) as s:
            with pytest.raises(smtplib.SMTPRecipientsRefused):
                s.sendmail("a@remote.example", ["nobody@example.test"], "Subject: no\r\n\r\nx\r\n")
            wait_for(lambda: scrape(metrics_port)["kanmon_smtp_open_connections"] == 1, 60, "one open connection")

        def counted() -> bool:
            m = scrape(metrics_port)
            # a labelled series appears with its first count
            return (m.get('kanmon_messages_received_total{source="smtp"}') == 3
                    and m.get('kanmon_deliveries_total{mailer="local"}') == 3
                    and m.get('kanmon_messages_rejected_total{class="address",stage="RCPT"}') == 1
                    and m["kanmon_smtp_open_connections"] == 0)

        wait_for(counted, 60, "the receivers' mail in the metrics")
        # the four sessions and KanmonProcess's readiness probe (a connect and close)
        assert scrape(metrics_port)["kanmon_smtp_connections_total"] == 5
    finally:
        proc.terminate()


def test_trace_finds_mail_by_the_alias_address_the_sender_used(tmp_path):
    """The history holds the addresses delivered to (bob); the admin asks about the
    address the sender wrote (sales@, an alias): its deliveries' orig_to finds it."""
    text = NODE.format(data_dir=tmp_path / "data", port=free_port(), corp="127.0.0.7:1", bounce="127.0.0.8:1",
                       metrics_port=free_port("127.0.0.9"))
    text = text.replace('mailboxes = ["alice", "bob"]', 'mailboxes = ["alice", "bob"]\naliases = { sales = ["bob"] }', 1)
    node = RunningNode(parse_config(text), clock=ManualClock()).start()
    try:
        send(node, ["sales@example.test"], "to-sales")
        node.wait_idle()
        node.flush()
        (t,) = trace(node.data_dir, "sales@example.test")
        assert t.message_id == "<to-sales@example.test>" and t.final == "delivered to bob@example.test", t.final
        assert [t.queue_id for t in trace(node.data_dir, "bob@example.test")] == [t.queue_id]
    finally:
        node.stop()
