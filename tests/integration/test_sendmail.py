"""`kanmon sendmail` queues through the maildrop and the server's pickup (kanmon.queue.pickup).

With a running node the message is delivered to a local mailbox and shows in trace and
the accept line (proto=sendmail, origin sendmail); with the node stopped the file waits
in maildrop and is delivered at the next start; -f/-F/-i; sysexits codes; -bp lists the
queue; a damaged maildrop file is moved aside with an event.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from kanmon.cli import main
from kanmon.commands.sendmail import EX_NOUSER, EX_TEMPFAIL, EX_USAGE, run
from kanmon.config import load_config
from kanmon.queue.pickup import MAILDROP
from kanmon.records.query import search_events
from tests.support.kanmon_node import RunningNode, free_port, maildir_messages, wait_for

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
aliases = {{ team = ["alice", "bob"] }}
[[domain]]
name = "dest.example"
deliver = "relay"
servers = ["127.0.0.1:9"]
tls = "none"
"""


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "kanmon.toml"
    path.write_text(NODE.format(data_dir=tmp_path / "data", port=free_port()))
    return path


def sendmail(config_file: Path, *args: str, message: bytes) -> int:
    return run(["-C", str(config_file), *args], stdin=io.BytesIO(message))


def delivered(config_file: Path, address: str, count: int = 1) -> list[bytes]:
    data_dir = Path(load_config(config_file).server.data_dir)
    wait_for(lambda: len(maildir_messages(data_dir, address)) >= count, 15, f"delivery to {address}")
    return maildir_messages(data_dir, address)


def test_echo_pipe_to_sendmail_t_delivers_with_a_running_node(config_file: Path) -> None:
    cfg = load_config(config_file)
    with RunningNode(cfg):
        proc = subprocess.run(
            [sys.executable, "-m", "kanmon", "sendmail", "-t", "-C", str(config_file)],
            input=b"To: alice@example.test\nSubject: cron\n\ntest\n", capture_output=True, timeout=60,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])},
        )
        assert proc.returncode == 0, proc.stderr
        (msg,) = delivered(config_file, "alice@example.test")
        assert msg.endswith(b"\n\ntest\n") and b"Subject: cron" in msg
        assert b"Message-ID: <" in msg and b"Date: " in msg and b"From: <" in msg
        assert not any(Path(cfg.server.data_dir, MAILDROP).glob("[!.c]*"))
    accepted = [e for e in search_events(cfg.server.data_dir) if e.kind == "accepted"]
    assert accepted and "proto=sendmail" in accepted[-1].text and (accepted[-1].fields or {}).get("origin") == "sendmail"


def test_a_message_waits_in_maildrop_while_the_node_is_down(config_file: Path) -> None:
    cfg = load_config(config_file)
    with RunningNode(cfg):
        pass  # the data_dir exists: the node ran here once
    assert sendmail(config_file, "bob@example.test", message=b"Subject: later\n\nwhile down\n") == 0
    data_dir = Path(cfg.server.data_dir)
    assert len([p for p in (data_dir / MAILDROP).iterdir() if p.is_file()]) == 1
    r = CliRunner().invoke(main, ["sendmail", "-bp", "-C", str(config_file)])
    assert r.exit_code == 0 and "1 message(s) in maildrop" in r.output
    with RunningNode(cfg):
        (msg,) = delivered(config_file, "bob@example.test")
        assert b"while down" in msg


def test_f_F_i_and_bcc(config_file: Path) -> None:
    cfg = load_config(config_file)
    with RunningNode(cfg):
        message = b"To: alice@example.test\nBcc: bob@example.test,\n  alice@example.test\nSubject: x\n\nline\n.\nafter\n"
        assert sendmail(config_file, "-t", "-i", "-f", "ops@example.test", "-F", "Cron Daemon", message=message) == 0
        (a,) = delivered(config_file, "alice@example.test")
        (b,) = delivered(config_file, "bob@example.test")
        assert a.split(b"\n", 2)[2] == b.split(b"\n", 2)[2]  # one message; only Delivered-To differs
        assert b"Bcc" not in a and b"after" in a
        assert b'From: "Cron Daemon" <ops@example.test>' in a
        # Without -i a lone dot ends the message.
        assert sendmail(config_file, "alice@example.test", message=b"Subject: y\n\nbefore\n.\nlost\n") == 0
        msgs = delivered(config_file, "alice@example.test", 2)
        second = [m for m in msgs if b"before" in m][0]
        assert b"lost" not in second
    history = [e for e in search_events(cfg.server.data_dir) if e.kind == "accepted"]
    assert any("from=<ops@example.test>" in e.text for e in history)


def test_an_alias_reaches_its_mailboxes_and_an_unknown_local_part_bounces(config_file: Path) -> None:
    """Mail kanmon queues itself goes where RCPT TO would send it: an alias to its
    mailboxes, a mailbox in any case to its one Maildir, and a local part that is no
    mailbox or alias back to the sender (550 5.1.1), never into a new Maildir."""
    cfg = load_config(config_file)
    data_dir = Path(cfg.server.data_dir)
    with RunningNode(cfg):
        assert sendmail(config_file, "-f", "bob@example.test", "team@example.test", "Alice@EXAMPLE.test",
                        "ghost@example.test", message=b"Subject: to three\n\nhi\n") == 0
        bounce = [m for m in delivered(config_file, "bob@example.test", 2) if b"Subject: to three" not in m[:400]]
        assert len(bounce) == 1 and b"ghost@example.test" in bounce[0] and b"5.1.1" in bounce[0]
        (a,) = delivered(config_file, "alice@example.test")
        assert b"Subject: to three" in a and b"Delivered-To: alice@example.test" in a
    assert sorted(p.name for p in (data_dir / "mailboxes" / "example.test").iterdir()) == ["alice", "bob"]
    rows = [e.text for e in search_events(cfg.server.data_dir) if "ghost@example.test" in e.text]
    assert any("stat=Bounced" in t or "dsn=5.1.1" in t for t in rows), rows


def test_a_mailbox_added_while_running_is_delivered_to_at_once(config_file: Path) -> None:
    """Local delivery reads the users file again before it calls a recipient unknown: mail
    for a mailbox `kanmon user add` made a moment ago is delivered, not bounced."""
    from kanmon.store.users import Users

    cfg = load_config(config_file)
    with RunningNode(cfg):
        assert sendmail(config_file, "alice@example.test", message=b"Subject: first\n\nx\n") == 0
        delivered(config_file, "alice@example.test")
        Users(cfg).add("carol@example.test", "pw-carol")
        assert sendmail(config_file, "-f", "bob@example.test", "carol@example.test", message=b"Subject: new\n\nx\n") == 0
        (m,) = delivered(config_file, "carol@example.test")
        assert b"Subject: new" in m
    assert maildir_messages(Path(cfg.server.data_dir), "bob@example.test") == []  # no bounce


def test_exit_codes(config_file: Path, tmp_path: Path) -> None:
    assert sendmail(config_file, "-t", message=b"Subject: nobody\n\n") == EX_USAGE
    assert sendmail(config_file, "-Z", "alice@example.test", message=b"\n") == EX_USAGE
    assert sendmail(config_file, "bad address@@x", message=b"\n") == EX_NOUSER
    assert sendmail(config_file, "-f", "a@@b", "alice@example.test", message=b"\n") == EX_NOUSER
    # The data_dir does not exist: nothing can be made durable -> EX_TEMPFAIL, nothing created.
    assert sendmail(config_file, "-oem", "-odi", "-v", "alice@example.test", message=b"\n") == EX_TEMPFAIL
    assert not (tmp_path / "data").exists()


def test_bp_lists_the_queue(config_file: Path) -> None:
    cfg = load_config(config_file)
    with RunningNode(cfg):
        assert sendmail(config_file, "someone@dest.example", message=b"Subject: q\n\nqueued\n") == 0
        wait_for(lambda: "someone@dest.example" in CliRunner().invoke(
            main, ["sendmail", "-bp", "-C", str(config_file)]).output, 15, "the message in the queue")
        r = CliRunner().invoke(main, ["sendmail", "-bp", "-C", str(config_file)])
        assert r.exit_code == 0, r.output
        assert "someone@dest.example" in r.output and "Request" in r.output
        r = CliRunner().invoke(main, ["sendmail", "-q", "-C", str(config_file)])
        assert r.exit_code == 0, r.output


def test_a_damaged_maildrop_file_is_moved_aside_with_an_event(config_file: Path) -> None:
    cfg = load_config(config_file)
    with RunningNode(cfg):
        pass
    drop = Path(cfg.server.data_dir) / MAILDROP
    (drop / "1.1.bad").write_bytes(b"KANMON-PICKUP1\n{\"rcpts\": 3}\nbody\n")
    with RunningNode(cfg) as node:
        wait_for(lambda: (drop / "corrupt" / "1.1.bad").exists(), 15, "the file moved aside")
        node.flush()
    assert not (drop / "1.1.bad").exists()
    events = [e for e in search_events(cfg.server.data_dir) if e.kind == "critical"]
    assert any("1.1.bad" in e.text and "maildrop/corrupt" in e.text for e in events)
