"""The balancer in front of two real kanmon nodes (docs/balancer.md on one machine):
MR1 on 127.0.0.31 (active), MR2 on 127.0.0.32 (standby), the virtual address
127.0.0.30. Mail sent with smtplib through the virtual address lands in MR1's
mailboxes; while MR1 is stopped it lands in MR2's; after MR1 is back, in MR1's again.
The PROXY v2 header puts the real client's address into each node's history, and a
PROXY header from an address the node does not trust is refused."""

from __future__ import annotations

import asyncio
import smtplib
import socket
from pathlib import Path

from kanmon.clock import ManualClock
from kanmon.config import parse_config
from kanmon.records.query import search_events, search_history
from kanmon.smtp.proxy_protocol import build_proxy_v2
from tests.integration.test_balancer import VIP, balancer, run, wait_until
from tests.support.kanmon_node import TEST_DEFAULT_PROFILE, RunningNode, free_port, maildir_messages
from tests.support.smtpsink import SmtpSink

NODE = """
[server]
hostname = "{name}.corp.example"
data_dir = "{data_dir}"

[smtp]
listen = ["{host}:{port}"]
relay_networks = ["{host}/32"]
trusted_proxies = ["127.0.0.30/32"]   # the balancer's (virtual) address
min_free_disk = "1MB"

[[domain]]
name = "corp.example"
deliver = "local"
mailboxes = ["alice"]
""" + TEST_DEFAULT_PROFILE  # clients outside relay_networks send from unknown domains

CLIENT = "127.0.0.66"  # a server on "the internet"


def node(tmp_path: Path, name: str, host: str, port: int) -> RunningNode:
    text = NODE.format(name=name, data_dir=tmp_path / name, host=host, port=port)
    return RunningNode(parse_config(text), fsync=False)


def send(port: int, subject: str) -> None:
    with smtplib.SMTP(VIP, port, source_address=(CLIENT, 0), timeout=10) as s:
        s.sendmail("friend@elsewhere.example", ["alice@corp.example"], f"Subject: {subject}\r\n\r\nhello\r\n")


def subjects(n: RunningNode) -> list[str]:
    out = []
    for m in maildir_messages(n.data_dir, "alice@corp.example"):
        for line in m.split(b"\n"):
            if line.startswith(b"Subject: "):
                out.append(line[9:].strip().decode())
    return out


def test_two_kanmon_relays_behind_the_balancer(tmp_path):
    p1, p2, vport = free_port("127.0.0.31"), free_port("127.0.0.32"), free_port(VIP)
    mr1 = node(tmp_path, "mr1", "127.0.0.31", p1).start()
    mr2 = node(tmp_path, "mr2", "127.0.0.32", p2).start()
    vs = f"""
[[balancer.virtual_server]]
name = "mail"
listen = "{VIP}:{vport}"
method = "first-alive"
proxy_protocol = true
health = {{ type = "smtp", interval = "0.1s", timeout = "2s", retries = 2 }}

[[balancer.virtual_server.real]]
address = "127.0.0.31:{p1}"
mode = "active"

[[balancer.virtual_server.real]]
address = "127.0.0.32:{p2}"
mode = "standby"
"""

    async def main() -> None:
        nonlocal mr1
        async with balancer(tmp_path, vs) as b:
            await asyncio.to_thread(send, vport, "one")
            await wait_until(lambda: subjects(mr1) == ["one"], "mail one in MR1's mailbox")
            # In the mailbox before its queue file is removed: a stop in between delivers
            # it again at the next start (at least once). Stop once it has left the queue.
            await asyncio.to_thread(mr1.wait_idle)

            await asyncio.to_thread(mr1.stop)
            await wait_until(lambda: b.saw("failover"), "failover to MR2")
            await asyncio.to_thread(send, vport, "two")
            await wait_until(lambda: subjects(mr2) == ["two"], "mail two in MR2's mailbox")

            mr1 = await asyncio.to_thread(node(tmp_path, "mr1", "127.0.0.31", p1).start)
            await wait_until(lambda: b.saw("failback"), "failback to MR1")
            await asyncio.to_thread(send, vport, "three")
            await wait_until(lambda: subjects(mr1) == ["one", "three"], "mail three in MR1's mailbox")
            assert subjects(mr2) == ["two"]

    try:
        run(main())
        # The real client, not the balancer, is in each node's history.
        for n in (mr1, mr2):
            n.flush()
            rows = search_history(n.data_dir)
            assert rows and {r.client_ip for r in rows} == {CLIENT}, rows
    finally:
        mr1.stop()
        mr2.stop()


def test_proxy_header_from_an_untrusted_address_is_refused(tmp_path):
    port = free_port("127.0.0.31")
    mr1 = node(tmp_path, "mr1", "127.0.0.31", port).start()
    try:
        with socket.create_connection(("127.0.0.31", port), timeout=10, source_address=(CLIENT, 0)) as s:
            banner = s.recv(512)
            assert banner.startswith(b"220 ")
            s.sendall(build_proxy_v2(("192.0.2.1", 1234), ("127.0.0.31", port)))
            reply = s.recv(512)
        assert reply.startswith(b"550 5.7.0"), reply
    finally:
        mr1.stop()


def test_trusted_balancer_health_check_local_header_gets_a_banner(tmp_path):
    """Our smtp check opens with PROXY v2 LOCAL (spec 2.2); kanmon must answer it with 220."""
    from kanmon.balancer import health
    from kanmon.config import HealthCheck

    port = free_port("127.0.0.31")
    mr1 = node(tmp_path, "mr1", "127.0.0.31", port).start()
    try:
        result = asyncio.run(
            health.run_check(HealthCheck(type="smtp", timeout="5s"), ("127.0.0.31", port),
                             send_proxy_local=True, source=(VIP, 0))
        )
        assert result.ok and result.detail.startswith("220 mr1.corp.example"), result
    finally:
        mr1.stop()


RELAY = """
[server]
hostname = "{name}.corp.example"
data_dir = "{data_dir}"

[smtp]
listen = ["{host}:{port}"]
relay_networks = ["127.0.0.7/32"]
trusted_proxies = ["127.0.0.30/32"]
min_free_disk = "1MB"

[[domain]]
name = "corp.example"
deliver = "relay"
servers = ["{store}"]
tls = "none"
""" + TEST_DEFAULT_PROFILE  # clients outside relay_networks send from unknown domains


def relay(tmp_path: Path, name: str, host: str, port: int, store: str) -> RunningNode:
    text = RELAY.format(name=name, data_dir=tmp_path / name, host=host, port=port, store=store)
    return RunningNode(parse_config(text), clock=ManualClock(), fsync=False)


def test_no_mail_is_lost_across_failover_and_failback(tmp_path):
    """Mail MR1 queued before it went down is delivered once MR1 is back; mail sent
    meanwhile went through MR2. The store gets every message exactly once."""
    store = SmtpSink("127.0.0.7", free_port("127.0.0.7"), start=False)
    store.starttls = False
    p1, p2, vport = free_port("127.0.0.31"), free_port("127.0.0.32"), free_port(VIP)
    mr1 = relay(tmp_path, "mr1", "127.0.0.31", p1, store.address).start()
    mr2 = relay(tmp_path, "mr2", "127.0.0.32", p2, store.address).start()
    vs = f"""
[[balancer.virtual_server]]
name = "mail"
listen = "{VIP}:{vport}"
proxy_protocol = true
health = {{ type = "smtp", interval = "0.1s", timeout = "2s", retries = 2 }}
[[balancer.virtual_server.real]]
address = "127.0.0.31:{p1}"
[[balancer.virtual_server.real]]
address = "127.0.0.32:{p2}"
mode = "standby"
"""

    def deferred(n: RunningNode, subject_rcpt: str) -> bool:
        n.flush()
        return any(subject_rcpt in e.text and "stat=Deferred" in e.text for e in search_events(n.data_dir))

    async def main() -> None:
        nonlocal mr1
        async with balancer(tmp_path, vs) as b:
            # The store is down: MR1 accepts (250 = on disk) and keeps the message queued.
            await asyncio.to_thread(send_to, vport, "alice@corp.example", "before-crash")
            await wait_until(lambda: deferred(mr1, "to=<alice@corp.example>"), "MR1 to defer the message")

            await asyncio.to_thread(mr1.stop)
            await wait_until(lambda: b.saw("failover"), "failover to MR2")
            await asyncio.to_thread(store.start)
            await asyncio.to_thread(send_to, vport, "bob@corp.example", "during")
            await asyncio.to_thread(store.wait_for_messages, 1, 15)

            mr1 = await asyncio.to_thread(relay(tmp_path, "mr1", "127.0.0.31", p1, store.address).start)
            await wait_until(lambda: b.saw("failback"), "failback to MR1")
            await asyncio.to_thread(mr1.advance, 400)  # past the first retry (5m)
            await asyncio.to_thread(store.wait_for_messages, 2, 15)
            await asyncio.to_thread(send_to, vport, "carol@corp.example", "after")
            await asyncio.to_thread(store.wait_for_messages, 3, 15)

    try:
        run(main())
        got = sorted((m.rcpts[0], m.data.split(b"Subject: ")[1].split(b"\r\n")[0].decode()) for m in store.messages)
        assert got == [("alice@corp.example", "before-crash"), ("bob@corp.example", "during"),
                       ("carol@corp.example", "after")]
        # Which relay carried what: MR1 the first and the last, MR2 the one in between.
        by_helo = {m.rcpts[0]: m.helo for m in store.messages}
        assert by_helo == {"alice@corp.example": "mr1.corp.example", "bob@corp.example": "mr2.corp.example",
                           "carol@corp.example": "mr1.corp.example"}
    finally:
        mr1.stop()
        mr2.stop()
        store.close()


def send_to(port: int, rcpt: str, subject: str) -> None:
    with smtplib.SMTP(VIP, port, source_address=(CLIENT, 0), timeout=10) as s:
        s.sendmail("friend@elsewhere.example", [rcpt], f"Subject: {subject}\r\n\r\nhello\r\n")
