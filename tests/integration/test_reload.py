"""SIGHUP / `kanmon reload` (DESIGN.md promise 8): a bad config is refused and the old one
keeps running; a new config is prepared completely before the old one stops; listeners
whose address did not change keep their sockets; sessions in progress are not cut."""

from __future__ import annotations

import imaplib
import json
import socket
import smtplib
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

from kanmon.tlscert import make_self_signed
from tests.support.kanmon_node import BannerHammer, KanmonProcess, free_port, maildir_messages, wait_for

CONFIG = """
[server]
hostname = "mx1.example.test"
data_dir = "{data_dir}"
[smtp]
listen = ["127.0.0.1:{port}"]
min_free_disk = "1MB"
[[domain]]
name = "example.test"
mailboxes = [{mailboxes}]
"""

PW = "correct horse battery"


def rcpt_code(port: int, rcpt: str) -> int:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.ehlo()
        s.mail("a@remote.example")
        return s.rcpt(rcpt)[0]


def _code_or_none(port: int, rcpt: str) -> int | None:
    try:
        return rcpt_code(port, rcpt)
    except (OSError, smtplib.SMTPException):
        return None


def kanmon(*args: str, input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kanmon", *args], capture_output=True, text=True, input=input,
                          timeout=120)


def reload(cfg: Path) -> subprocess.CompletedProcess:
    return kanmon("reload", "-c", str(cfg))


def log_text(tmp_path: Path) -> str:
    log = tmp_path / "data/log/kanmon.log"
    return log.read_text() if log.exists() else ""


def test_reload_refuses_a_bad_config_and_applies_a_good_one(tmp_path):
    port = free_port()
    cfg = tmp_path / "kanmon.toml"
    cfg.write_text(CONFIG.format(data_dir=tmp_path / "data", port=port, mailboxes='"alice"'))
    proc = KanmonProcess(cfg, "127.0.0.1", port).start()
    try:
        assert rcpt_code(port, "carol@example.test") == 550
        cfg.write_text(CONFIG.format(data_dir=tmp_path / "data", port=port, mailboxes='"alice"') + "bogus = 1\n")
        out = reload(cfg)
        assert out.returncode == 2 and "bogus (line" in out.stderr  # checked before asking the server
        proc.proc.send_signal(1)  # a SIGHUP anyway: the server must refuse it itself
        wait_for(lambda: "reload refused" in log_text(tmp_path), 10, "the refusal")
        assert "bogus" in log_text(tmp_path)
        assert proc.proc.poll() is None
        assert rcpt_code(port, "alice@example.test") == 250  # still serving, old config
        cfg.write_text(CONFIG.format(data_dir=tmp_path / "data", port=port, mailboxes='"alice", "carol"'))
        out = reload(cfg)
        assert out.returncode == 0, out.stderr
        assert "changed: domain" in out.stdout
        assert rcpt_code(port, "carol@example.test") == 250  # in effect when reload returns
        wait_for(lambda: "reload: new configuration in effect (changed: domain)" in log_text(tmp_path), 10, "the event")
        wait_for(lambda: "error event: reload refused" in log_text(tmp_path), 10, "the alert about the refusal")
    finally:
        proc.terminate()


STORE = CONFIG + """
[imap]
listen = ["127.0.0.1:{imap}"]
"""


def client_tls() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def test_an_smtp_transaction_and_an_imap_idle_held_across_a_reload_both_complete(tmp_path):
    """The SMTP session is past RCPT and the IMAP client is in IDLE when the reload
    happens; both finish under the settings they started with (here: carol is not a
    mailbox for the old session), new sessions get the new ones."""
    port, imap = free_port(), free_port()
    cfg = tmp_path / "kanmon.toml"
    data = tmp_path / "data"
    cfg.write_text(STORE.format(data_dir=data, port=port, imap=imap, mailboxes='"alice"'))
    out = kanmon("user", "passwd", "--stdin", "-c", str(cfg), "alice@example.test", input=f"{PW}\n")
    assert out.returncode == 0, out.stderr
    proc = KanmonProcess(cfg, "127.0.0.1", port).start()
    try:
        wait_for(lambda: _connects(imap), 10, "IMAP listener")
        m = imaplib.IMAP4("127.0.0.1", imap, timeout=30)
        m.starttls(client_tls())
        m.login("alice@example.test", PW)
        m.select("INBOX")
        tag = m._new_tag().decode()
        m.send(f"{tag} IDLE\r\n".encode())
        assert m.readline().startswith(b"+")

        s = smtplib.SMTP("127.0.0.1", port, timeout=30)
        s.ehlo()
        s.mail("bob@remote.example")
        assert s.rcpt("alice@example.test")[0] == 250

        cfg.write_text(STORE.format(data_dir=data, port=port, imap=imap, mailboxes='"alice", "carol"'))
        out = reload(cfg)
        assert out.returncode == 0, out.stderr
        assert rcpt_code(port, "carol@example.test") == 250  # a new session: new settings

        assert s.rcpt("carol@example.test")[0] == 550  # the held session: the settings it started with
        assert s.data(b"Subject: across a reload\r\n\r\nstill here\r\n")[0] == 250
        s.quit()
        wait_for(lambda: len(maildir_messages(data, "alice@example.test")) == 1, 15, "delivery")

        # IDLE announces the message delivered after the reload, then ends normally.
        lines = []
        while not any(b"EXISTS" in line for line in lines):
            lines.append(m.readline())
        m.send(b"DONE\r\n")
        line = m.readline()
        while line.startswith(b"* "):  # RECENT and the like
            line = m.readline()
        assert line == f"{tag} OK IDLE terminated\r\n".encode()
        assert m.noop()[0] == "OK"
        assert m.logout()[0] == "BYE"
    finally:
        proc.terminate()


def _connects(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        return True
    except OSError:
        return False


def test_connection_attempts_during_a_reload_are_never_refused(tmp_path):
    port = free_port()
    cfg = tmp_path / "kanmon.toml"
    cfg.write_text(CONFIG.format(data_dir=tmp_path / "data", port=port, mailboxes='"alice"'))
    proc = KanmonProcess(cfg, "127.0.0.1", port).start()
    try:
        with BannerHammer("127.0.0.1", port) as hammer:
            assert hammer.started.wait(30)
            cfg.write_text(CONFIG.format(data_dir=tmp_path / "data", port=port, mailboxes='"alice", "carol"'))
            out = reload(cfg)
            failed = hammer.finish()
        assert out.returncode == 0, out.stderr
        assert len(hammer.results) >= 200
        assert failed == []
    finally:
        proc.terminate()


def test_a_reload_that_cannot_be_prepared_leaves_the_old_config_serving(tmp_path):
    port, busy_port = free_port(), free_port()
    data = tmp_path / "data"
    cfg = tmp_path / "kanmon.toml"
    good = CONFIG.format(data_dir=data, port=port, mailboxes='"alice"')
    cfg.write_text(good)
    proc = KanmonProcess(cfg, "127.0.0.1", port).start()
    busy = socket.socket()
    try:
        # A [metrics] listen port that something else holds: config check cannot know it.
        busy.bind(("127.0.0.1", busy_port))
        busy.listen(1)
        cfg.write_text(good.replace('mailboxes = ["alice"]', 'mailboxes = ["alice", "carol"]')
                       + f'[metrics]\nlisten = "127.0.0.1:{busy_port}"\n')
        out = reload(cfg)
        assert out.returncode == 1
        assert f"stays: cannot listen on 127.0.0.1:{busy_port}" in out.stderr and "running configuration stays" in out.stderr
        assert rcpt_code(port, "carol@example.test") == 550  # the old config, still serving

        # A certificate that does not match its key.
        c1, k1 = tmp_path / "a.crt", tmp_path / "a.key"
        c2, k2 = tmp_path / "b.crt", tmp_path / "b.key"
        make_self_signed("mx1.example.test", c1, k1)
        make_self_signed("mx1.example.test", c2, k2)
        cfg.write_text(good.replace('mailboxes = ["alice"]', 'mailboxes = ["alice", "carol"]')
                       + f'[tls]\ncert = "{c1}"\nkey = "{k2}"\n')
        out = reload(cfg)
        assert out.returncode == 1
        assert "TLS certificate and key" in out.stderr
        assert rcpt_code(port, "carol@example.test") == 550

        # A missing file: `kanmon reload` names it before asking; a SIGHUP is refused too.
        k1.unlink()
        cfg.write_text(good.replace('mailboxes = ["alice"]', 'mailboxes = ["alice", "carol"]')
                       + f'[tls]\ncert = "{c1}"\nkey = "{k1}"\n')
        out = reload(cfg)
        assert out.returncode == 2 and str(k1) in out.stderr
        proc.proc.send_signal(1)
        wait_for(lambda: f"reload refused, the running configuration stays: {cfg}" in log_text(tmp_path)
                 and str(k1) in log_text(tmp_path), 10, "the third refusal")
        assert rcpt_code(port, "carol@example.test") == 550
        assert proc.proc.poll() is None

        # Each refusal is an error event, so alerts mail it.
        readable = tmp_path / "readable.toml"  # the current file is refused: read the records with the good one
        readable.write_text(good)

        def refusals() -> int:
            out = kanmon("log", "events", "-c", str(readable), "--grep", "reload refused", "--json")
            return sum(json.loads(line).get("kind") == "reload-failed" for line in out.stdout.splitlines())

        wait_for(lambda: refusals() >= 3, 15, "three reload-failed events in the records")
    finally:
        busy.close()
        proc.terminate()


def test_a_reload_moves_a_listener_and_health_endpoints_answer(tmp_path):
    port, moved, metrics = free_port(), free_port(), free_port()
    data = tmp_path / "data"
    cfg = tmp_path / "kanmon.toml"
    extra = f'[metrics]\nlisten = "127.0.0.1:{metrics}"\n'
    cfg.write_text(CONFIG.format(data_dir=data, port=port, mailboxes='"alice"') + extra)
    proc = KanmonProcess(cfg, "127.0.0.1", port).start()
    try:
        wait_for(lambda: _connects(metrics), 10, "metrics listener")
        assert _get(metrics, "/healthz") == (200, "ok\n")
        assert _get(metrics, "/readyz") == (200, "ready\n")
        cfg.write_text(CONFIG.format(data_dir=data, port=moved, mailboxes='"alice"') + extra)
        out = reload(cfg)
        assert out.returncode == 0, out.stderr
        assert rcpt_code(moved, "alice@example.test") == 250
        wait_for(lambda: not _connects(port), 10, "the old address to close")
        assert _get(metrics, "/healthz")[0] == 200  # the metrics listener kept its socket
    finally:
        proc.terminate()


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, e.read().decode()


def _syslog_lines(sock: socket.socket) -> list[str]:
    out = []
    sock.setblocking(False)
    try:
        while True:
            out.append(sock.recv(9000).decode())
    except BlockingIOError:
        pass
    return out


def test_a_changed_log_section_applies_on_reload(tmp_path):
    """[log] to, syslog socket, facility and rotation take effect at a reload, no restart:
    from the file to syslog (facility local3), then back to the file rotating by size."""
    port = free_port()
    data = tmp_path / "data"
    cfg = tmp_path / "kanmon.toml"
    devlog = tmp_path / "dev-log"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(devlog))
    for workers in (0, 1):  # SMTP lines written by the main process, then by a receiver process
        data = tmp_path / f"data{workers}"
        port = free_port()
        base = CONFIG.format(data_dir=data, port=port, mailboxes='"alice"').replace(
            "[smtp]", f"workers = {workers}\n[smtp]")
        cfg.write_text(base)
        proc = KanmonProcess(cfg, "127.0.0.1", port).start()
        try:
            assert rcpt_code(port, "nobody1@example.test") == 550
            wait_for(lambda: "nobody1@example.test" in log_text_of(data), 10, "the refusal in the file")
            assert _syslog_lines(sock) == []

            cfg.write_text(base + f'[log]\nto = ["syslog"]\nsyslog_socket = "{devlog}"\nfacility = "local3"\n')
            out = reload(cfg)
            assert out.returncode == 0, out.stderr
            assert "log" in out.stdout
            assert rcpt_code(port, "nobody2@example.test") == 550
            lines: list[str] = []
            wait_for(lambda: lines.extend(_syslog_lines(sock)) or any("nobody2@example.test" in ln for ln in lines),
                     10, "the refusal on syslog")
            (line,) = [ln for ln in lines if "nobody2@example.test" in ln]
            assert line.startswith("<158>") and "kanmon/smtpd[" in line  # local3 (19) * 8 + info (6)
            size = (data / "log/kanmon.log").stat().st_size
            assert "nobody2" not in log_text_of(data)

            cfg.write_text(base + '[log]\nto = ["file"]\nrotate_size = "1KB"\nrotate_keep = 2\n')
            out = reload(cfg)
            assert out.returncode == 0, out.stderr
            for n in range(3, 12):
                assert rcpt_code(port, f"nobody{n}@example.test") == 550
            wait_for(lambda: (data / "log/kanmon.log.1").exists(), 10, "a rotation by size")
            assert size > 0 and not (data / "log/kanmon.log.3").exists()
            # syslog is no destination any more (lines about the reload itself, written
            # before the switch, went the old way)
            assert not [ln for ln in _syslog_lines(sock) if "nobody" in ln]
        finally:
            proc.terminate()
        _syslog_lines(sock)
    sock.close()


def log_text_of(data: Path) -> str:
    log = data / "log/kanmon.log"
    return log.read_text() if log.exists() else ""


def test_both_reload_paths_tell_the_service_manager_and_a_refusal_says_so(tmp_path, monkeypatch):
    """SIGHUP and `kanmon reload` (the control socket) each send RELOADING=1 (with
    MONOTONIC_USEC) and then READY=1; after a refused reload STATUS= says so."""
    import signal

    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(30)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))  # the server inherits it

    def next_message() -> str:
        while True:
            msg = notify.recv(4096).decode()
            if msg != "WATCHDOG=1":
                return msg

    port = free_port()
    cfg = tmp_path / "kanmon.toml"
    cfg.write_text(CONFIG.format(data_dir=tmp_path / "data", port=port, mailboxes='"alice"'))
    proc = KanmonProcess(cfg, "127.0.0.1", port).start()
    try:
        assert next_message() == "READY=1\nSTATUS=serving as mx1.example.test"
        proc.proc.send_signal(signal.SIGHUP)
        reloading = next_message()
        assert reloading.startswith("RELOADING=1\nMONOTONIC_USEC=") and reloading.split("=")[-1].isdigit()
        assert next_message() == "READY=1\nSTATUS=serving as mx1.example.test"
        # A file that validates but cannot be applied: the address is not on this host.
        cfg.write_text(CONFIG.format(data_dir=tmp_path / "data", port=port, mailboxes='"alice"').replace(
            f'listen = ["127.0.0.1:{port}"]', f'listen = ["127.0.0.1:{port}", "192.0.2.1:{port}"]'))
        monkeypatch.delenv("NOTIFY_SOCKET")
        out = reload(cfg)
        assert out.returncode != 0 and "192.0.2.1" in out.stderr, (out.stdout, out.stderr)
        assert next_message().startswith("RELOADING=1\nMONOTONIC_USEC=")
        refused = next_message()
        assert refused.startswith("READY=1\nSTATUS=reload refused: ") and "192.0.2.1" in refused, refused
        assert refused.endswith("; serving the previous configuration") and refused.count("\n") == 1
        proc.proc.send_signal(signal.SIGHUP)  # the same refusal by SIGHUP
        assert next_message().startswith("RELOADING=1\nMONOTONIC_USEC=")
        assert next_message() == refused
        assert rcpt_code(port, "alice@example.test") == 250  # the previous configuration serves
    finally:
        proc.terminate()
        notify.close()


def test_reloads_asked_while_one_runs_end_with_one_ready_after_the_last(tmp_path, monkeypatch):
    """A SIGHUP and `kanmon reload` at once: each says RELOADING=1, and READY=1 comes once,
    when the last has ended (an earlier one's READY=1 would tell the service manager the
    reload was over while the other still waited), with the status of the one asked last."""
    import asyncio

    from kanmon.config import parse_config
    from tests.support.kanmon_node import RunningNode

    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(30)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))

    def messages(n: int) -> list[str]:
        out: list[str] = []
        while len(out) < n:
            msg = notify.recv(4096).decode()
            if msg != "WATCHDOG=1":
                out.append("RELOADING=1" if msg.startswith("RELOADING=1\nMONOTONIC_USEC=") else msg)
        return out

    port = free_port()
    cfg = tmp_path / "kanmon.toml"
    text = CONFIG.format(data_dir=tmp_path / "data", port=port, mailboxes='"alice"')
    cfg.write_text(text)
    rn = RunningNode(parse_config(text))
    rn.node.config_source = str(cfg)
    rn.start()
    try:
        node = rn.node

        async def two_at_once() -> None:
            async with node._reload_lock:  # a reload running: both asked now wait their turn
                first = asyncio.ensure_future(node.reload_file())
                second = asyncio.ensure_future(node.reload_file())
                await asyncio.sleep(0)  # both have said RELOADING=1 and wait for the lock
            await asyncio.gather(first, second)

        asyncio.run_coroutine_threadsafe(two_at_once(), rn.loop).result(30)
        asyncio.run_coroutine_threadsafe(node.reload_file(), rn.loop).result(30)  # one more, alone: a marker
        ready = "READY=1\nSTATUS=serving as mx1.example.test"
        assert messages(5) == ["RELOADING=1", "RELOADING=1", ready, "RELOADING=1", ready]
    finally:
        rn.stop()
        notify.close()
