"""examples/relay.toml and examples/store.toml as two kanmon nodes on one machine
(docs/two-nodes.md): mail passes both ways with STARTTLS between them, the relay queues
while the store is down and delivers when it is back."""

from __future__ import annotations

import smtplib
from pathlib import Path

from kanmon.clock import ManualClock
from kanmon.config import parse_config
from kanmon.records.query import search_events, search_history
from tests.support.dnsserver import DnsServer
from tests.support.kanmon_node import RunningNode, free_port, maildir_messages, wait_for
from tests.support.smtpsink import SmtpSink

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def relay_config(data_dir: Path, dns: str, mx_port: int):
    text = (EXAMPLES / "relay.toml").read_text()
    text = text.replace('data_dir = "./relay-data"', f'data_dir = "{data_dir}"')
    text = text.replace("[outbound]                         # everything else: by MX\n",
                        f"[outbound]\nmx_port = {mx_port}\n")
    return parse_config(text + f'\n[dns]\nservers = ["{dns}"]\ntimeout = "1s"\n')


def store_config(data_dir: Path):
    text = (EXAMPLES / "store.toml").read_text().replace('data_dir = "./store-data"', f'data_dir = "{data_dir}"')
    return parse_config(text)


def texts(node: RunningNode) -> list[str]:
    node.flush()
    return [e.text for e in search_events(node.data_dir)]


def test_relay_and_store_exchange_mail_with_starttls(tmp_path):
    mx_port = free_port("127.0.0.9")
    with SmtpSink("127.0.0.9", mx_port) as internet, DnsServer(
        records={"elsewhere.example": ["MX 10 mx.elsewhere.example."], "mx.elsewhere.example": ["A 127.0.0.9"]}
    ) as dns:
        relay_clock = ManualClock()
        relay = RunningNode(relay_config(tmp_path / "relay", dns.address, mx_port), clock=relay_clock).start()
        store = RunningNode(store_config(tmp_path / "store")).start()
        try:
            # Inbound: the internet -> relay -> store's Maildir.
            with smtplib.SMTP("127.0.0.8", 2525, source_address=("127.0.0.66", 0), timeout=10) as s:
                s.sendmail("friend@elsewhere.example", ["info@corp.example"],
                           "Subject: inbound\r\n\r\nhello corp\r\n")
            wait_for(lambda: maildir_messages(store.data_dir, "alice@corp.example")
                     and maildir_messages(store.data_dir, "bob@corp.example"), 15, "inbound delivery")
            tls_lines = [t for t in texts(relay) if t.startswith("STARTTLS=client")]
            assert tls_lines and "STARTTLS=client, relay=[127.0.0.7]:2525, " in tls_lines[0]  # as the to= line's relay=
            assert "version=TLSv1.3" in tls_lines[0] and "verify=FAIL" in tls_lines[0]
            (m,) = maildir_messages(store.data_dir, "alice@corp.example")
            assert m.count(b"Received: from") == 2  # relay's and store's trace

            # Outbound: a PC -> store -> relay (TLS required) -> MX of elsewhere.example.
            with smtplib.SMTP("127.0.0.7", 2525, timeout=10) as s:
                s.sendmail("alice@corp.example", ["friend@elsewhere.example"], "Subject: outbound\r\n\r\nhi\r\n")
            (out,) = internet.wait_for_messages(1, timeout=15)
            assert out.rcpts == ["friend@elsewhere.example"] and b"Subject: outbound" in out.data
            store_tls = [t for t in texts(store) if t.startswith("STARTTLS=client")]
            assert store_tls and "version=TLSv1.3" in store_tls[0]

            # The store goes down: the relay queues, then delivers when it is back.
            store.stop()
            with smtplib.SMTP("127.0.0.8", 2525, source_address=("127.0.0.66", 0), timeout=10) as s:
                s.sendmail("friend@elsewhere.example", ["bob@corp.example"], "Subject: while-down\r\n\r\nx\r\n")
            wait_for(lambda: any("to=<bob@corp.example>" in t and "stat=Deferred" in t for t in texts(relay)),
                     15, "deferral")
            store = RunningNode(store_config(tmp_path / "store")).start()
            relay.advance(400)  # past the first retry
            wait_for(lambda: any(b"Subject: while-down" in x for x in maildir_messages(store.data_dir, "bob@corp.example")),
                     15, "delivery after the store is back")
        finally:
            relay.stop()
            store.stop()




def test_the_walkthroughs_internet_client_needs_no_dns_for_its_made_up_sender_domain(tmp_path):
    """docs/two-nodes.md step 2 sends from friend@elsewhere.example, a domain no DNS knows
    (NXDOMAIN here, as from a real resolver): the example gives that client (127.0.0.66)
    a profile without the sender domain check; any other outside client keeps the check."""
    mx_port = free_port("127.0.0.9")
    with DnsServer(records={}) as dns:
        relay = RunningNode(relay_config(tmp_path / "relay", dns.address, mx_port)).start()
        store = RunningNode(store_config(tmp_path / "store")).start()
        try:
            with smtplib.SMTP("127.0.0.8", 2525, source_address=("127.0.0.66", 0), timeout=10) as s:
                s.sendmail("friend@elsewhere.example", ["alice@corp.example"], "Subject: step 2\r\n\r\nhi\r\n")
            wait_for(lambda: maildir_messages(store.data_dir, "alice@corp.example"), 15, "inbound delivery")
            with smtplib.SMTP("127.0.0.8", 2525, source_address=("127.0.0.67", 0), timeout=10) as s:
                s.ehlo("client.example.net")
                code, reply = s.mail("friend@elsewhere.example")
            assert (code, reply) == (501, b"5.1.8 <friend@elsewhere.example>: Sender address rejected: Domain not found")
        finally:
            relay.stop()
            store.stop()


def test_the_walkthrough_with_verify_callout_refuses_a_wrong_address_at_rcpt_and_queues_nothing(tmp_path):
    """docs/two-nodes.md step 6: the example relay with `verify = "callout"` added to its
    corp.example domain asks the store: a wrong address gets 550 at RCPT (nothing queued,
    nothing bounced), the right one is delivered and the queue is empty again."""
    text = (EXAMPLES / "relay.toml").read_text()
    assert text.count('deliver = "relay"\n') == 1
    text = text.replace('deliver = "relay"\n', 'deliver = "relay"\nverify = "callout"\n')
    text = text.replace('data_dir = "./relay-data"', f'data_dir = "{tmp_path / "relay"}"')
    with DnsServer(records={}) as dns:
        cfg = parse_config(text + f'\n[dns]\nservers = ["{dns.address}"]\ntimeout = "1s"\n')
        assert [d.verify for d in cfg.domain] == ["callout"]
        relay = RunningNode(cfg).start()
        store = RunningNode(store_config(tmp_path / "store")).start()
        try:
            with smtplib.SMTP("127.0.0.8", 2525, source_address=("127.0.0.66", 0), timeout=20) as s:
                s.ehlo("mx.elsewhere.example")
                assert s.mail("friend@elsewhere.example")[0] == 250
                assert s.rcpt("nobody@corp.example") == (
                    550, b"5.1.1 <nobody@corp.example>: Recipient address rejected: User unknown")
                s.rset()
                s.sendmail("friend@elsewhere.example", ["alice@corp.example"], "Subject: step 6\r\n\r\nhi\r\n")
            wait_for(lambda: maildir_messages(store.data_dir, "alice@corp.example"), 15, "delivery of the right one")
            relay.wait_idle()
            assert [p for p in (relay.data_dir / "spool").rglob("*") if p.is_file() and "queue" in p.parts] == []
            assert [r.rcpt for r in search_history(relay.data_dir) if r.disposition == "Accept"] == [
                "alice@corp.example"]  # one message accepted; no bounce was ever queued
        finally:
            relay.stop()
            store.stop()
