"""Session profile limits over real sockets: the per-client rates on a clock the test
advances, the limits across `workers = 2`, and bare LF from inside and outside the relay
networks."""

from __future__ import annotations

import smtplib
import socket
from pathlib import Path

import pytest

from kanmon.clock import ManualClock
from kanmon.config import parse_config
from kanmon.records.query import search_events
from tests.integration.test_receiver_processes import receiver_pids
from tests.integration.test_relay_core import recv_reply, recv_until
from tests.support.smtpsink import SmtpSink
from tests.support.kanmon_node import KanmonProcess, RunningNode, free_port, maildir_messages, wait_for

CONFIG = """
[server]
hostname = "mx1.example.test"
data_dir = "{data_dir}"
workers = {workers}
[smtp]
listen = ["127.0.0.1:{port}"]
relay_networks = ["127.0.0.1/32"]
min_free_disk = "1MB"
greet_pause = "0s"
[[domain]]
name = "example.test"
mailboxes = ["alice", "bob", "carol", "dave"]
[[session_profile]]
name = "default"
sender_domain_check = false  # the senders' domains are in no DNS here
reject_own_helo = false  # smtplib's HELO on this host is [127.0.0.1], the node's own address
{limits}
"""

OUTSIDE = "127.0.0.9"  # another host, outside relay_networks: the "default" profile
T0 = 1_800_000_000.0  # a multiple of 3600: the rate buckets start here


def config_text(data_dir: Path, port: int, limits: str, workers: int = 0) -> str:
    return CONFIG.format(data_dir=data_dir, port=port, limits=limits, workers=workers)


def node_with(tmp_path: Path, limits: str) -> RunningNode:
    return RunningNode(parse_config(config_text(tmp_path / "data", free_port(), limits)), clock=ManualClock(T0))


def client(host: str, port: int, source: str = OUTSIDE) -> smtplib.SMTP:
    return smtplib.SMTP(host, port, source_address=(source, 0), timeout=15)


def gauge_count(data_dir: Path, key: str) -> int:
    from kanmon.state.sqlite import SqliteState

    state = SqliteState(data_dir)
    try:
        return state.gauges.count(key)
    finally:
        state.close()


def wait_refusals(n: RunningNode, check: str, count: int = 1) -> list[dict]:
    """The refusal events naming check, once there are count of them (the event is
    recorded just after the reply is written: the client may read the reply first)."""
    found: list[dict] = []

    def enough() -> bool:
        n.flush()
        found[:] = refusals(n.data_dir, check)
        return len(found) >= count

    wait_for(enough, 10, f"{count} refusal(s) by {check}")
    return found


def refusals(data_dir: Path, check: str) -> list[dict]:
    return [e.fields for e in search_events(data_dir)
            if e.kind in ("reject", "reject-connect") and e.fields and e.fields.get("check") == check]


def test_connections_per_minute_at_its_boundary(tmp_path):
    with node_with(tmp_path, "connections_per_minute = 2") as n:
        for _ in range(2):
            with client(n.host, n.port) as s:
                assert s.noop()[0] == 250
        with pytest.raises(smtplib.SMTPConnectError) as e:
            client(n.host, n.port)
        assert (e.value.smtp_code, e.value.smtp_error[:5]) == (421, b"4.7.0")
        with client(n.host, n.port, "127.0.0.1") as s:  # relay_networks: "trusted", no rate
            assert s.noop()[0] == 250
        n.advance(120)  # two minutes later the window is empty again
        with client(n.host, n.port) as s:
            assert s.noop()[0] == 250
        (r,) = wait_refusals(n, "connections_per_minute")
        assert r["stage"] == "CONNECT" and r["reply"].startswith("421 4.7.0")


def test_messages_per_hour_at_its_boundary(tmp_path):
    with node_with(tmp_path, "messages_per_hour = 2") as n:
        with client(n.host, n.port) as s:
            for i in range(2):
                assert s.sendmail("a@remote.example", ["alice@example.test"], f"Subject: {i}\r\n\r\nx\r\n") == {}
        with client(n.host, n.port) as s:  # another session of the same client counts too
            s.ehlo()
            code, text = s.mail("a@remote.example")
            assert (code, text[:5]) == (451, b"4.7.1") and b"rate limit" in text
        n.advance(2 * 3600)
        with client(n.host, n.port) as s:
            assert s.sendmail("a@remote.example", ["alice@example.test"], "Subject: later\r\n\r\nx\r\n") == {}
        (r,) = wait_refusals(n, "messages_per_hour")
        assert r["stage"] == "MAIL"


def test_recipients_per_hour_at_its_boundary(tmp_path):
    with node_with(tmp_path, "recipients_per_hour = 3") as n:
        with client(n.host, n.port) as s:
            s.ehlo()
            s.mail("a@remote.example")
            assert [s.rcpt(f"{u}@example.test")[0] for u in ("alice", "bob", "carol", "dave")] == [250, 250, 250, 451]
            assert s.data("Subject: three\r\n\r\nx\r\n")[0] == 250
        n.wait_idle()
        assert len(maildir_messages(n.data_dir, "carol@example.test")) == 1
        assert maildir_messages(n.data_dir, "dave@example.test") == []
        assert len(wait_refusals(n, "recipients_per_hour")) == 1


def test_idle_timeout_of_the_profile(tmp_path):
    with node_with(tmp_path, 'idle_timeout = "5s"') as n:
        server = n.node.smtp
        with client(n.host, n.port) as s:
            assert s.noop()[0] == 250
            (conn,) = list(server.connections)
            assert conn.session.settings.profile.idle_timeout == 5.0
            n.call(server.sweep_nowait, conn.last_activity + 6)  # the sweeper's clock, moved on
            assert s.getreply()[0] == 421


# -- bare LF ---------------------------------------------------------------------------------

def lf_conversation(host: str, port: int, source: str, rcpt: bytes = b"alice@example.test") -> bytes:
    """A script that ends every line with LF only, waiting for each reply (HELO: no pipelining)."""
    replies = b""
    with socket.create_connection((host, port), timeout=15, source_address=(source, 0)) as raw:
        replies += recv_reply(raw)
        for cmd in (b"HELO script\n", b"MAIL FROM:<cron@example.test>\n", b"RCPT TO:<" + rcpt + b">\n"):
            raw.sendall(cmd)
            reply = recv_reply(raw)
            replies += reply
            if not reply.startswith(b"250"):
                return replies
        raw.sendall(b"DATA\n")
        replies += recv_until(raw, b"354 ")
        raw.sendall(b"Subject: from a script\n\nline one\n..dotted\nlast\n.\n")
        replies += recv_reply(raw)
        raw.sendall(b"QUIT\n")
        replies += recv_reply(raw)
    return replies


def test_bare_lf_from_relay_networks_is_delivered_with_crlf(tmp_path):
    with SmtpSink("127.0.0.7") as sink:
        relay = f'[[domain]]\nname = "corp.example"\ndeliver = "relay"\nservers = ["{sink.address}"]\n'
        text = config_text(tmp_path / "data", free_port(), "").replace("[[session_profile]]", relay + "[[session_profile]]")
        with RunningNode(parse_config(text), clock=ManualClock(T0)) as n:
            replies = lf_conversation(n.host, n.port, "127.0.0.1", b"bob@corp.example")
            assert b"250 2.0.0 Ok: queued" in replies and replies.endswith(b"221 2.0.0 Bye\r\n")
            sink.wait_for_messages(1)
        raw = sink.messages[0].raw_data
        assert raw.endswith(b"Subject: from a script\r\n\r\nline one\r\n..dotted\r\nlast\r\n")  # re-stuffed on the wire
        assert raw.count(b"\n") == raw.count(b"\r\n")  # CRLF only


def test_bare_lf_from_outside_is_refused(tmp_path):
    with node_with(tmp_path, "") as n:
        replies = lf_conversation(n.host, n.port, OUTSIDE)
        assert replies.split(b"\r\n")[1].startswith(b"550 5.5.2")
        n.wait_idle()
        assert maildir_messages(n.data_dir, "alice@example.test") == []
        assert wait_refusals(n, "bare_newline")


# -- across receiver processes ---------------------------------------------------------------------


def test_limits_are_shared_by_two_receiver_processes(tmp_path):
    port = free_port()
    cfg = tmp_path / "kanmon.toml"
    cfg.write_text(config_text(tmp_path / "data", port, "max_connections_per_ip = 2\nmessages_per_hour = 3", workers=2))
    proc = KanmonProcess(cfg, "127.0.0.1", port).start()
    try:
        assert proc.proc is not None
        wait_for(lambda: len(receiver_pids(proc.proc.pid)) == 2, 15, "two receivers")
        # Four connections at once from one client: counted per process, each receiver
        # would take two; counted together, two get the banner and two 421.
        socks = [socket.create_connection(("127.0.0.1", port), timeout=15, source_address=(OUTSIDE, 0))
                 for _ in range(4)]
        try:
            banners = sorted(recv_reply(s)[:9] for s in socks)
            assert banners == [b"220 mx1.e", b"220 mx1.e", b"421 4.7.0", b"421 4.7.0"]
        finally:
            for s in socks:
                s.close()

        # Messages per hour, one session each: whichever receiver takes it, the fourth is refused.
        def one_message(i: int) -> int:
            with client("127.0.0.1", port) as s:
                s.ehlo()
                code, _ = s.mail("a@remote.example")
                if code == 250:
                    s.rcpt("alice@example.test")
                    code = s.data(f"Subject: {i}\r\n\r\nx\r\n")[0]
                return code

        # The four connections above are released as their receivers notice them closed.
        wait_for(lambda: gauge_count(tmp_path / "data", f"smtp {OUTSIDE}") == 0, 10, "connections released")
        assert [one_message(i) for i in range(5)] == [250, 250, 250, 451, 451]
        wait_for(lambda: len(maildir_messages(tmp_path / "data", "alice@example.test")) == 3, 15, "delivery")
    finally:
        proc.terminate()
