"""SIGHUP / `kanmon reload`: a bad config is refused and the old one keeps running
(DESIGN.md promise 8); a good one takes effect."""

from __future__ import annotations

import smtplib
import subprocess
import sys

from tests.support.kanmon_node import KanmonProcess, free_port, wait_for

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


def rcpt_code(port: int, rcpt: str) -> int:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.ehlo()
        s.mail("a@remote.example")
        return s.rcpt(rcpt)[0]


def test_reload_refuses_a_bad_config_and_applies_a_good_one(tmp_path):
    port = free_port()
    cfg = tmp_path / "kanmon.toml"
    cfg.write_text(CONFIG.format(data_dir=tmp_path / "data", port=port, mailboxes='"alice"'))
    proc = KanmonProcess(cfg, "127.0.0.1", port).start()
    try:
        assert rcpt_code(port, "carol@example.test") == 550
        cfg.write_text(CONFIG.format(data_dir=tmp_path / "data", port=port, mailboxes='"alice"') + "bogus = 1\n")
        out = subprocess.run([sys.executable, "-m", "kanmon", "reload", "-c", str(cfg)], capture_output=True, text=True)
        assert out.returncode == 2 and "bogus (line" in out.stderr  # checked before signalling
        proc.proc.send_signal(1)  # a SIGHUP anyway: the server must refuse it itself
        log = tmp_path / "data/log/kanmon.log"
        wait_for(lambda: log.exists() and "reload refused" in log.read_text(), 10, "the refusal")
        assert proc.proc.poll() is None
        assert rcpt_code(port, "alice@example.test") == 250  # still serving, old config
        cfg.write_text(CONFIG.format(data_dir=tmp_path / "data", port=port, mailboxes='"alice", "carol"'))
        out = subprocess.run([sys.executable, "-m", "kanmon", "reload", "-c", str(cfg)], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        wait_for(lambda: _code_or_none(port, "carol@example.test") == 250, 15, "the new mailbox")
    finally:
        proc.terminate()


def _code_or_none(port: int, rcpt: str) -> int | None:
    try:
        return rcpt_code(port, rcpt)
    except (OSError, smtplib.SMTPException):
        return None
