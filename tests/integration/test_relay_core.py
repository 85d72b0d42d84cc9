"""The relay core, over real sockets with real clients (smtplib, swaks, raw sockets)."""

from __future__ import annotations

import json
import shutil
import smtplib
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
import trustme

from kanmon.config import parse_config
from tests.support.kanmon_node import (
    TEST_DEFAULT_PROFILE,
    KanmonProcess,
    RunningNode,
    free_port,
    maildir_messages,
    wait_for,
)

BASE = """
[server]
hostname = "mx1.example.test"
data_dir = "{data_dir}"
[smtp]
listen = ["{host}:{port}"]
relay_networks = ["127.0.0.1/32"]
greet_pause = "0s"  # the pregreet wait has its own tests (test_hostile_input)
min_free_disk = "{min_free_disk}"
max_message_size = "{max_size}"
max_connections_per_ip = {per_ip}
command_timeout = "{command_timeout}"
{tls}
[[domain]]
name = "example.test"
mailboxes = ["alice", "bob", "postmaster"{more_mailboxes}]
aliases = {{ info = ["alice", "bob"] }}
[queue]
suspend_delivery = {suspend}
""" + TEST_DEFAULT_PROFILE  # clients outside relay_networks send from unknown domains


def config_text(data_dir: Path, port: int, **kw) -> str:
    values = dict(
        host="127.0.0.1", min_free_disk="1MB", max_size="1MB", per_ip=50, tls="", more_mailboxes="",
        suspend="false", command_timeout="5m",
    )
    values.update(kw)
    return BASE.format(data_dir=data_dir, port=port, **values)


@pytest.fixture
def node(tmp_path):
    port = free_port()
    n = RunningNode(parse_config(config_text(tmp_path / "data", port))).start()
    yield n
    n.stop()


def msg(subject: str = "hello", body: str = "body line\r\n") -> str:
    return f"From: a@remote.example\r\nTo: alice@example.test\r\nSubject: {subject}\r\nMessage-ID: <m-{subject}@remote.example>\r\n\r\n{body}"


def smtp(node: RunningNode, source: str = "127.0.0.1") -> smtplib.SMTP:
    return smtplib.SMTP(node.host, node.port, source_address=(source, 0), timeout=10)


def test_smtplib_message_lands_in_maildir_with_trace_and_records(node):
    with smtp(node) as s:
        s.sendmail("a@remote.example", ["alice@example.test"], msg("first"))
    node.wait_idle()
    (stored,) = maildir_messages(node.data_dir, "alice@example.test")
    assert stored.startswith(b"Return-Path: <a@remote.example>\nDelivered-To: alice@example.test\nReceived: from ")
    assert b"\r\n" not in stored  # Maildir stores LF line ends
    assert stored.endswith(b"Subject: first\nMessage-ID: <m-first@remote.example>\n\nbody line\n")
    # Standard Maildir names in new/
    (name,) = [p.name for p in (node.data_dir / "mailboxes/example.test/alice/new").iterdir()]
    assert ",S=" in name and ".M" in name
    # Event log and history, through the real CLI
    cfg = node.data_dir.parent / "k.toml"
    cfg.write_text(config_text(node.data_dir, node.port))
    events = subprocess.run([sys.executable, "-m", "kanmon", "log", "events", "-c", str(cfg), "--json"],
                            capture_output=True, text=True, check=True).stdout
    rows = [json.loads(line) for line in events.splitlines()]
    texts = [r["text"] for r in rows]
    # the fields beside each line; the time key is `ts`, as in `log history --json`
    (accepted,) = [r for r in rows if r["kind"] == "accepted"]
    assert accepted["fields"]["mail_from"] == "a@remote.example" and accepted["fields"]["nrcpts"] == 1
    assert isinstance(accepted["ts"], float) and accepted["queue_id"]
    assert any(r["kind"] == "delivery" and r["fields"]["status"] == "Sent" and r["fields"]["rcpt"] == "alice@example.test"
               for r in rows)
    assert any(t.startswith("from=<a@remote.example>, size=") and "nrcpts=1" in t and "msgid=<m-first@remote.example>"
               in t and "proto=ESMTP" in t and "relay=unknown [127.0.0.1]" in t for t in texts)
    assert any(t.startswith("to=<alice@example.test>, delay=") and "mailer=local, dsn=2.0.0, stat=Sent" in t for t in texts)
    assert any(t.startswith("connect from unknown[127.0.0.1]") for t in texts)
    hist = subprocess.run([sys.executable, "-m", "kanmon", "log", "history", "-c", str(cfg), "--json", "--subject", "first"],
                          capture_output=True, text=True, check=True).stdout
    (row,) = [json.loads(line) for line in hist.splitlines()]
    assert isinstance(row["ts"], float)
    assert row["rcpt"] == "alice@example.test" and row["disposition"] == "Accept"
    assert row["status"] == "Delivered" and row["classification"] == "NotSpam" and row["queue_id"]
    table = subprocess.run([sys.executable, "-m", "kanmon", "log", "history", "-c", str(cfg)],
                           capture_output=True, text=True, check=True).stdout
    assert "alice@example.test" in table and "Delivered" in table


def test_mime_encoded_subject_is_decoded_in_history(node):
    with smtp(node) as s:
        s.sendmail("a@remote.example", ["bob@example.test"], msg("=?utf-8?q?h=C3=A9llo_w=C3=B6rld?="))
        s.sendmail("a@remote.example", ["bob@example.test"], msg("=?bogus?x?broken?="))
    node.wait_idle()
    from kanmon.records.query import search_history

    subjects = {r.subject for r in search_history(node.data_dir)}
    assert "héllo wörld" in subjects
    assert "=?bogus?x?broken?=" in subjects  # recorded as written, never a crash


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks is not installed (apt-get install swaks)")
def test_swaks_with_starttls_alias_expansion(node):
    out = subprocess.run(
        ["swaks", "--server", f"{node.host}:{node.port}", "--from", "a@remote.example", "--to", "info@example.test",
         "--tls", "--header", "Subject: via swaks"],
        capture_output=True, text=True, timeout=30,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "250 2.0.0 Ok: queued as" in out.stdout
    node.wait_idle()
    for rcpt in ("alice@example.test", "bob@example.test"):
        (m,) = maildir_messages(node.data_dir, rcpt)
        assert b"Subject: via swaks" in m and f"Delivered-To: {rcpt}".encode() in m
        assert b"with ESMTPS id" in m and b"(using TLSv1." in m


def test_starttls_with_configured_certificate_verifies(tmp_path):
    ca = trustme.CA()
    cert = ca.issue_cert("mx1.example.test")
    cert.private_key_and_cert_chain_pem.write_to_path(tmp_path / "chain.pem")
    cert.private_key_pem.write_to_path(tmp_path / "key.pem")
    tls = f'[tls]\ncert = "{tmp_path / "chain.pem"}"\nkey = "{tmp_path / "key.pem"}"'
    port = free_port()
    with RunningNode(parse_config(config_text(tmp_path / "data", port, tls=tls))) as n:
        ctx = ssl.create_default_context()
        ca.configure_trust(ctx)
        with smtplib.SMTP(n.host, n.port, timeout=10) as s:
            s._host = "mx1.example.test"  # verify the name in the certificate
            s.starttls(context=ctx)
            s.sendmail("a@remote.example", ["alice@example.test"], msg("tls"))
        n.wait_idle()
        assert len(maildir_messages(n.data_dir, "alice@example.test")) == 1
        from kanmon.records.query import search_events

        assert any("STARTTLS=server" in e.text and "version=TLSv1.3" in e.text for e in search_events(n.data_dir))


def recv_reply(sock: socket.socket) -> bytes:
    data = b""
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            return data
        data += chunk
        lines = data.split(b"\r\n")
        if len(lines) >= 2 and len(lines[-2]) >= 4 and lines[-2][3:4] == b" ":
            return data


def recv_until(sock: socket.socket, marker: bytes) -> bytes:
    data = b""
    while marker not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def test_starttls_injection_is_discarded(node):
    with socket.create_connection((node.host, node.port), timeout=10) as raw:
        recv_reply(raw)
        raw.sendall(b"EHLO c\r\n")
        recv_reply(raw)
        raw.sendall(b"STARTTLS\r\nMAIL FROM:<evil@remote.example>\r\n")
        assert recv_reply(raw) == b"220 2.0.0 Ready to start TLS\r\n"
        ctx = ssl._create_unverified_context()
        with ctx.wrap_socket(raw, server_hostname="mx1.example.test") as tls:
            tls.sendall(b"EHLO c\r\n")
            assert b"250 " in recv_reply(tls)
            tls.sendall(b"RCPT TO:<alice@example.test>\r\n")
            # The MAIL sent before the handshake never happened.
            assert recv_reply(tls).startswith(b"503 5.5.1")


@pytest.fixture
def untrusted_node(tmp_path):
    """A node for which the test client (127.0.0.1) is not in relay_networks."""
    port = free_port()
    text = config_text(tmp_path / "data", port).replace('relay_networks = ["127.0.0.1/32"]', 'relay_networks = []')
    n = RunningNode(parse_config(text)).start()
    yield n
    n.stop()


@pytest.mark.parametrize("ending", [b"\n.\n", b"\n.\r\n", b"\r.\r", b"\r\n.\r"])
def test_smuggling_over_the_wire_queues_nothing(untrusted_node, ending):
    # From relay_networks a bare LF is normalised (the "trusted" profile): see test_bare_lf.
    node = untrusted_node
    with socket.create_connection((node.host, node.port), timeout=10) as raw:
        recv_reply(raw)
        raw.sendall(b"EHLO c\r\nMAIL FROM:<a@remote.example>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n")
        assert b"354 " in recv_until(raw, b"354 ")
        raw.sendall(b"Subject: s\r\n\r\nhello" + ending +
                    b"MAIL FROM:<evil@remote.example>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\nsmuggled\r\n.\r\n")
        data = b""
        while b"550 5.5.2" not in data and b"250 2.0.0 Ok: queued" not in data:
            chunk = raw.recv(4096)
            if not chunk:
                break
            data += chunk
        assert b"550 5.5.2" in data and b"queued" not in data
        raw.sendall(b"QUIT\r\n")
    node.wait_idle()
    assert maildir_messages(node.data_dir, "alice@example.test") == []
    assert maildir_messages(node.data_dir, "bob@example.test") == []
    assert list((node.data_dir / "spool/queue").iterdir()) == []


def test_nul_dot_ending_makes_one_message_not_two(node):
    with socket.create_connection((node.host, node.port), timeout=10) as raw:
        recv_reply(raw)
        raw.sendall(b"EHLO c\r\nMAIL FROM:<a@remote.example>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n")
        assert b"354 " in recv_until(raw, b"354 ")
        raw.sendall(b"Subject: s\r\n\r\nhello\r\n\x00.\r\nMAIL FROM:<evil@remote.example>\r\n"
                    b"RCPT TO:<bob@example.test>\r\nDATA\r\nsmuggled\r\n.\r\n")
        assert b"250 2.0.0 Ok: queued" in recv_until(raw, b"queued")
    node.wait_idle()
    assert len(maildir_messages(node.data_dir, "alice@example.test")) == 1
    assert maildir_messages(node.data_dir, "bob@example.test") == []


def test_101_recipients_accepted_in_one_message(tmp_path):
    names = "".join(f', "u{i}"' for i in range(101))
    port = free_port()
    with RunningNode(parse_config(config_text(tmp_path / "data", port, more_mailboxes=names))) as n:
        with smtp(n) as s:
            refused = s.sendmail("a@remote.example", [f"u{i}@example.test" for i in range(101)], msg("many"))
        assert refused == {}
        n.wait_idle()
        assert all(len(maildir_messages(n.data_dir, f"u{i}@example.test")) == 1 for i in range(101))


def test_oversize_by_size_and_by_data(node):
    with smtp(node) as s:
        s.ehlo()
        code, text = s.mail("a@remote.example", ["SIZE=2000000"])
        assert (code, text[:5]) == (552, b"5.3.4")
        s.rset()
        # By data: no SIZE declared, the message grows past the limit.
        assert s.mail("a@remote.example")[0] == 250
        assert s.rcpt("alice@example.test")[0] == 250
        code, text = s.data(msg("big", ("x" * 998 + "\r\n") * 1100))
        assert (code, text[:5]) == (552, b"5.3.4")
        assert s.noop()[0] == 250  # the session goes on
    node.wait_idle()
    assert maildir_messages(node.data_dir, "alice@example.test") == []


def test_unknown_user_is_refused_at_rcpt(node):
    with smtp(node) as s:
        with pytest.raises(smtplib.SMTPRecipientsRefused) as e:
            s.sendmail("a@remote.example", ["nobody@example.test"], msg())
    code, text = e.value.recipients["nobody@example.test"]
    assert code == 550 and text.startswith(b"5.1.1")
    node.flush()
    from kanmon.records.query import search_history

    (row,) = search_history(node.data_dir)
    assert row.disposition == "Reject" and row.rcpt == "nobody@example.test" and "550 5.1.1" in row.status


def test_relay_denied_from_a_client_outside_relay_networks(node):
    # relay_networks is 127.0.0.1/32; this client is "another host" at 127.0.0.9.
    with smtp(node, source="127.0.0.9") as s:
        with pytest.raises(smtplib.SMTPRecipientsRefused) as e:
            s.sendmail("a@remote.example", ["victim@elsewhere.example"], msg())
        assert e.value.recipients["victim@elsewhere.example"][0] == 554
        # ... while mail to our own domain from there is fine
        assert s.sendmail("a@remote.example", ["alice@example.test"], msg("inbound")) == {}
    with smtp(node, source="127.0.0.1") as s:  # a relay client may send anywhere
        s.ehlo()
        s.mail("a@remote.example")
        assert s.rcpt("victim@elsewhere.example")[0] == 250


@pytest.mark.parametrize(
    "rcpt",
    ["u%victim.example@example.test", "victim.example!u@example.test", '"u@victim.example"@example.test',
     "@example.test:u@victim.example", "u@victim.example@example.test"],
)
def test_routed_addresses_refused(node, rcpt):
    with smtp(node, source="127.0.0.9") as s:
        s.ehlo()
        s.mail("a@remote.example")
        code, text = s.docmd(f"RCPT TO:<{rcpt}>")
        assert code == 550 and text.startswith(b"5.7.1")


def test_per_ip_connection_limit(tmp_path):
    port = free_port()
    with RunningNode(parse_config(config_text(tmp_path / "data", port, per_ip=2))) as n:
        a, b = smtp(n), smtp(n)
        try:
            with pytest.raises(smtplib.SMTPConnectError) as e:
                smtp(n)
            assert e.value.smtp_code == 421
            # Another client address is not affected.
            with smtp(n, source="127.0.0.9") as c:
                assert c.noop()[0] == 250
        finally:
            a.close()
            b.close()


def test_low_disk_answers_452_at_mail(tmp_path):
    port = free_port()
    with RunningNode(parse_config(config_text(tmp_path / "data", port, min_free_disk="1000TB"))) as n:
        with smtp(n) as s:
            s.ehlo()
            code, text = s.mail("a@remote.example")
            assert (code, text[:5]) == (452, b"4.3.1")


def test_storage_error_answers_451_and_nothing_is_lost(node):
    incoming = node.data_dir / "spool/incoming"
    incoming.rmdir()
    incoming.write_text("not a directory")  # every write into the spool now fails
    with smtp(node) as s:
        with pytest.raises(smtplib.SMTPDataError) as e:
            s.sendmail("a@remote.example", ["alice@example.test"], msg("fail"))
        assert (e.value.smtp_code, e.value.smtp_error[:5]) == (451, b"4.3.0")
        incoming.unlink()
        incoming.mkdir()
        assert s.sendmail("a@remote.example", ["alice@example.test"], msg("ok")) == {}
    node.wait_idle()
    (m,) = maildir_messages(node.data_dir, "alice@example.test")
    assert b"Subject: ok" in m


def test_idle_client_gets_421_timeout(tmp_path):
    port = free_port()
    with RunningNode(parse_config(config_text(tmp_path / "data", port, command_timeout="1s"))) as n:
        with socket.create_connection((n.host, n.port), timeout=10) as raw:
            assert recv_reply(raw).startswith(b"220 ")
            assert recv_reply(raw).startswith(b"421 4.4.2")  # then the server closes
            assert raw.recv(100) == b""


def test_truncated_spool_file_at_start_is_moved_aside(tmp_path):
    port = free_port()
    data = tmp_path / "data"
    cfg = parse_config(config_text(data, port, suspend="true"))
    with RunningNode(cfg) as n:
        with smtp(n) as s:
            s.sendmail("a@remote.example", ["alice@example.test"], msg("one"))
            s.sendmail("a@remote.example", ["bob@example.test"], msg("two"))
    queue = sorted((data / "spool/queue").iterdir())
    assert len(queue) == 2
    damaged = queue[0]
    damaged.write_bytes(damaged.read_bytes()[:-7])  # a torn write
    (data / "spool/incoming/ZZZZ").write_bytes(b"half a message, never acknowledged")
    with RunningNode(parse_config(config_text(data, port))) as n:
        # Recovery schedules the intact message; wait for its delivery (the queue can look
        # idle before the scheduler has taken it up).
        wait_for(lambda: maildir_messages(data, "alice@example.test") + maildir_messages(data, "bob@example.test"),
                 15, "the intact message delivered")
        n.wait_idle()
        assert (data / "spool/corrupt" / damaged.name).exists()
        assert not (data / "spool/incoming/ZZZZ").exists()
        from kanmon.records.query import search_events

        events = [e.text for e in search_events(data)]
        assert any("corrupt queue file moved to spool/corrupt/" in t and "truncated" in t for t in events)
        delivered = maildir_messages(data, "alice@example.test") + maildir_messages(data, "bob@example.test")
        assert len(delivered) == 1  # the intact one; the damaged one is kept aside, not half-delivered
        with smtp(n) as s:  # and the server keeps working
            assert s.noop()[0] == 250


def _write_config(tmp_path: Path, **kw) -> tuple[Path, int]:
    port = free_port()
    path = tmp_path / "kanmon.toml"
    path.write_text(config_text(tmp_path / "data", port, **kw))
    return path, port


def test_kill_9_right_after_250_then_restart_delivers(tmp_path):
    # Delivery is suspended in the first run, so the message is certainly still queued
    # when the process is killed: the test can only pass through recovery.
    cfg, port = _write_config(tmp_path, suspend="true")
    proc = KanmonProcess(cfg, "127.0.0.1", port).start()
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
            s.sendmail("a@remote.example", ["alice@example.test"], msg("crash"))
            proc.kill()  # SIGKILL right after the 250
    finally:
        proc.kill()
    cfg.write_text(cfg.read_text().replace("suspend_delivery = true", "suspend_delivery = false"))
    proc = KanmonProcess(cfg, "127.0.0.1", port).start()
    try:
        wait_for(lambda: len(maildir_messages(tmp_path / "data", "alice@example.test")) >= 1, 20, "redelivery")
    finally:
        proc.terminate()
    (m,) = maildir_messages(tmp_path / "data", "alice@example.test")
    assert b"Subject: crash" in m


def test_kill_9_during_a_stream_loses_nothing(tmp_path):
    cfg, port = _write_config(tmp_path)
    proc = KanmonProcess(cfg, "127.0.0.1", port).start()
    acked = []
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
            for i in range(40):
                s.sendmail("a@remote.example", ["alice@example.test"], msg(f"n{i}"))
                acked.append(f"n{i}")
            proc.kill()
    finally:
        proc.kill()
    proc = KanmonProcess(cfg, "127.0.0.1", port).start()
    try:
        def all_there() -> bool:
            got = b"".join(maildir_messages(tmp_path / "data", "alice@example.test"))
            return all(f"Subject: {s}\n".encode() in got for s in acked)

        wait_for(all_there, 20, "every acknowledged message")
    finally:
        proc.terminate()


def test_over_quota_mailbox_defers_at_rcpt(tmp_path):
    port = free_port()
    text = config_text(tmp_path / "data", port).replace(
        'aliases = { info = ["alice", "bob"] }', 'aliases = { info = ["alice", "bob"] }\nquota = "2KB"'
    )
    with RunningNode(parse_config(text)) as n:
        with smtp(n) as s:
            assert s.sendmail("a@remote.example", ["alice@example.test"], msg("big", "x" * 3000 + "\r\n")) == {}
        n.wait_idle()
        with smtp(n) as s:
            s.ehlo()
            s.mail("a@remote.example")
            code, text_ = s.rcpt("alice@example.test")
            assert (code, text_[:5]) == (452, b"4.2.2")  # the sender's server retries later
            assert s.rcpt("bob@example.test")[0] == 250  # other mailboxes are not affected
            assert s.rcpt("alice@example.test")[0] == 452  # refused again: still only one notice
        n.wait_idle()
        wait_for(lambda: len(maildir_messages(n.data_dir, "alice@example.test")) == 2, 10, "the notice")
        n.wait_idle()
        notices = [m for m in maildir_messages(n.data_dir, "alice@example.test") if b"Subject: Your mailbox is full" in m]
        assert len(notices) == 1 and b"452 4.2.2" in notices[0]
        # The owner cleans up: the mailbox is under its quota again, and a later overflow
        # is notified anew.
        for p in (n.data_dir / "mailboxes/example.test/alice/new").iterdir():
            p.unlink()
        with smtp(n) as s:
            assert s.sendmail("a@remote.example", ["alice@example.test"], msg("small")) == {}
        assert not (n.data_dir / "mailboxes/example.test/alice/.kanmon-quota-notified").exists()


def test_parallel_deliveries_overshoot_the_quota_by_at_most_one_message(tmp_path):
    # Eight sessions at once, all accepted at RCPT while the mailbox was empty; delivery
    # reserves each message's size against the quota, so the mailbox ends at most one
    # message over it and the rest wait in the queue (452 4.2.2, retried), not lost.
    import threading

    from kanmon.store.maildir import mailbox_usage

    port = free_port()
    text = config_text(tmp_path / "data", port, suspend="true").replace(
        'aliases = { info = ["alice", "bob"] }', 'aliases = { info = ["alice", "bob"] }\nquota = "100KB"'
    )
    body = "x" * 998 + "\r\n"
    message = msg("parallel", body * 60)  # ~60 KB
    answers: list[dict] = []

    def send() -> None:
        with smtp(n) as s:
            answers.append(s.sendmail("a@remote.example", ["alice@example.test"], message))

    with RunningNode(parse_config(text)) as n:
        senders = [threading.Thread(target=send) for _ in range(8)]
        for t in senders:
            t.start()
        for t in senders:
            t.join(60)
        assert answers == [{}] * 8
    cfg = parse_config(text.replace("suspend_delivery = true", "suspend_delivery = false"))
    quota = cfg.domain[0].quota
    with RunningNode(cfg) as n:
        n.wait_idle()
        stored = maildir_messages(n.data_dir, "alice@example.test")
        usage = mailbox_usage(n.data_dir, "example.test", "alice")
        assert 1 <= len(stored) and usage <= quota + max(len(m) for m in stored)
        queued = list((n.data_dir / "spool/queue").iterdir())
        assert len(stored) + len(queued) == 8  # the others wait for room, nothing is lost
        n.flush()
        from kanmon.records.query import search_events

        assert any("452 4.2.2" in e.text for e in search_events(n.data_dir) if "stat=Deferred" in e.text)
