"""The command line as a service's admin meets it: which config a command uses, what
`config check` finds before `serve` does, `kanmon status`, and the small promises of
the queue and log commands (flush with no server, backup overwrite, progress output)."""

from __future__ import annotations

import datetime as dt
import json
import platform
import smtplib
import socket
import os
import subprocess
import sys
from pathlib import Path

import pytest
import trustme
from click.testing import CliRunner

from kanmon import control, scan
from kanmon.admin.status import config_digest
from kanmon.cli import main
from kanmon.commands import options
from kanmon.config import parse_config
from tests.support.kanmon_node import RunningNode, free_port

ROOT = Path(__file__).resolve().parents[2]

BASE = """
[server]
hostname = "mx.example.test"
data_dir = "{data_dir}"
workers = 0
[smtp]
listen = ["127.0.0.1:{port}"]
greet_pause = "0"
[[domain]]
name = "example.test"
mailboxes = ["alice"]
"""


def write(tmp_path: Path, extra: str = "", name: str = "kanmon.toml", port: int | None = None,
          data_dir: Path | None = None) -> Path:
    path = tmp_path / name
    path.write_text(BASE.format(data_dir=data_dir or tmp_path / "data", port=port or free_port()) + extra)
    return path


def run(*args: str, code: int | None = 0, env: dict | None = None):
    result = CliRunner().invoke(main, list(args), env=env)
    if code is not None:
        assert result.exit_code == code, (result.output, result.exception)
    return result


# -- which config ---------------------------------------------------------------------


def test_c_before_or_after_the_subcommand(tmp_path):
    cfg = write(tmp_path)
    for args in (["-c", str(cfg), "config", "check"], ["config", "check", "-c", str(cfg)],
                 ["--config", str(cfg), "config", "check"]):
        r = run(*args)
        assert f"{cfg}: ok" in r.stdout and "using" not in r.stderr


def test_without_c_env_then_system_path_then_embedded_default_said_on_stderr(tmp_path, monkeypatch):
    env_cfg = write(tmp_path, name="env.toml")
    sys_cfg = write(tmp_path, name="system.toml")
    r = run("config", "check", env={options.CONFIG_ENV: str(env_cfg)})
    assert r.stderr.splitlines()[0] == f"kanmon: using {env_cfg} (from $KANMON_CONFIG)"
    assert f"{env_cfg}: ok" in r.stdout
    monkeypatch.setattr(options, "SYSTEM_CONFIG", sys_cfg)
    r = run("config", "check")
    assert f"kanmon: using {sys_cfg} (no -c and no $KANMON_CONFIG)" in r.stderr
    # $KANMON_CONFIG comes before the system path, and -c before both (and then nothing is said).
    assert str(env_cfg) in run("config", "check", env={options.CONFIG_ENV: str(env_cfg)}).stderr
    r = run("-c", str(env_cfg), "config", "check")
    assert "using" not in r.stderr
    monkeypatch.setattr(options, "SYSTEM_CONFIG", tmp_path / "absent.toml")
    monkeypatch.chdir(tmp_path)
    r = run("status", code=3)
    assert "kanmon: using <embedded default> (no -c, no $KANMON_CONFIG, no " in r.stderr


def test_a_missing_env_config_is_an_error_not_a_fallback(tmp_path):
    r = run("config", "check", code=2, env={options.CONFIG_ENV: str(tmp_path / "nope.toml")})
    assert "nope.toml: cannot read" in r.stderr


def test_json_output_stays_clean_and_missing_data_dir_is_refused_not_created(tmp_path):
    cfg = write(tmp_path)
    data_dir = tmp_path / "data"
    for args in (["log", "events"], ["log", "events", "--json"], ["log", "history", "--json"], ["trace", "x@y"],
                 ["stats"], ["alert", "list"], ["user", "list", "--json"]):
        r = run(*args, code=1, env={options.CONFIG_ENV: str(cfg)})
        assert r.stdout == "", args
        assert f"data_dir {data_dir} does not exist (server.data_dir of {cfg})" in r.stderr, args
        assert not data_dir.exists(), args


# -- config check ---------------------------------------------------------------------


def check_json(cfg: Path, code: int) -> list[tuple[str, str, str]]:
    r = run("config", "check", "-c", str(cfg), "--json", code=code)
    doc = json.loads(r.stdout)
    assert doc["config"] == str(cfg)
    return [(f["severity"], f["key"], f["text"]) for f in doc["findings"]]


def errors(findings, severity: str = "error") -> dict[str, str]:
    return {key: text for sev, key, text in findings if sev == severity}


def test_check_a_busy_port_and_duplicate_addresses(tmp_path):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    other = free_port()
    try:
        cfg = write(tmp_path, port=port, extra=f'[imap]\nlisten = ["127.0.0.1:{other}"]\n'
                                                f'[metrics]\nlisten = "127.0.0.1:{other}"\n'
                                                f'[console]\nlisten = "127.0.0.1:{other}"\n')
        found = errors(check_json(cfg, 2))
        assert "is in use by another program" in found["smtp.listen[0]"]
        assert found["metrics.listen"] == f"127.0.0.1:{other} is also imap.listen[0]: one address, one listener"
        assert found["console.listen"] == f"127.0.0.1:{other} is also imap.listen[0]: one address, one listener"
        r = run("config", "check", "-c", str(cfg), code=2)
        assert f"ERROR   smtp.listen[0]: 127.0.0.1:{port} is in use" in r.stderr
        assert r.stdout.strip().endswith(f"{cfg}: 3 errors")
    finally:
        busy.close()
    wild = write(tmp_path, name="wild.toml", port=other, extra=f'[pop3]\nlisten = ["0.0.0.0:{other}"]\n')
    # Every error of the key: a test beside this one may listen on the port on another
    # 127.0.0.x by now, which adds "in use" for the wildcard (the bind check comes after).
    pop3 = [text for sev, key, text in check_json(wild, 2) if (sev, key) == ("error", "pop3.listen[0]")]
    assert any("overlaps smtp.listen[0]" in text for text in pop3), pop3


def test_check_names_and_networks(tmp_path):
    cfg = write(tmp_path, extra='[[domain]]\nname = "corp.test"\nmailboxes = ["Bob", "bob"]\n'
                                '[domain.aliases]\nSales = ["bob"]\nsales = ["bob"]\n')
    found = errors(check_json(cfg, 2))
    assert found["domain[1].mailboxes"] == "corp.test: mailbox 'bob' is listed twice (names are case-insensitive)"
    assert "aliases 'Sales' and 'sales' are one address" in found["domain[1].aliases"]
    nets = write(tmp_path, name="nets.toml").read_text().replace(
        'greet_pause = "0"', 'greet_pause = "0"\nrelay_networks = ["127.0.0.0/8", "192.0.2.5/24"]')
    (tmp_path / "nets.toml").write_text(nets)
    warnings = errors(check_json(tmp_path / "nets.toml", 1), "warning")
    assert warnings == {"smtp.relay_networks[1]": "'192.0.2.5/24' has host bits set: kanmon reads it as 192.0.2.0/24"}


def test_check_certificate_pair_and_expiry(tmp_path):
    ca = trustme.CA()
    good, other = ca.issue_cert("mx.example.test"), ca.issue_cert("other.example.test")
    good.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    good.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    other.private_key_pem.write_to_path(str(tmp_path / "other-key.pem"))
    tls = f'[tls]\ncert = "{tmp_path / "cert.pem"}"\nkey = "{tmp_path / "key.pem"}"\n'
    assert not errors(check_json(write(tmp_path, extra=tls), 0))
    mismatched = write(tmp_path, name="mismatch.toml", extra=tls.replace("key.pem", "other-key.pem"))
    assert "the key does not belong to the certificate" in errors(check_json(mismatched, 2))["tls.key"]
    now = dt.datetime.now(dt.timezone.utc)
    old = ca.issue_cert("mx.example.test", not_before=now - dt.timedelta(days=30), not_after=now - dt.timedelta(days=1))
    old.cert_chain_pems[0].write_to_path(str(tmp_path / "old.pem"))
    old.private_key_pem.write_to_path(str(tmp_path / "old-key.pem"))
    expired = write(tmp_path, name="expired.toml",
                    extra=f'[tls]\ncert = "{tmp_path / "old.pem"}"\nkey = "{tmp_path / "old-key.pem"}"\n')
    assert "expired on" in errors(check_json(expired, 2))["tls.cert"]
    soon = ca.issue_cert("mx.example.test", not_after=now + dt.timedelta(days=3))
    soon.cert_chain_pems[0].write_to_path(str(tmp_path / "soon.pem"))
    soon.private_key_pem.write_to_path(str(tmp_path / "soon-key.pem"))
    expiring = write(tmp_path, name="soon.toml",
                     extra=f'[tls]\ncert = "{tmp_path / "soon.pem"}"\nkey = "{tmp_path / "soon-key.pem"}"\n')
    assert "within alerts.cert_expires_within (2w)" in errors(check_json(expiring, 1), "warning")["tls.cert"]


def test_check_files_and_data_dir(tmp_path):
    cfg = write(tmp_path, extra=f'[dnscheck]\ndkim_key = "{tmp_path / "missing.pem"}"\n')
    assert errors(check_json(cfg, 2))["dnscheck.dkim_key"] == f"{tmp_path / 'missing.pem'} does not exist"
    (tmp_path / "file").write_text("")
    not_dir = write(tmp_path, name="notdir.toml", data_dir=tmp_path / "file")
    assert errors(check_json(not_dir, 2))["server.data_dir"] == f"{tmp_path / 'file'} is not a directory"
    notes = errors(check_json(write(tmp_path, name="new.toml"), 0), "note")
    assert notes["server.data_dir"].endswith("does not exist yet; kanmon serve creates it")


def test_check_warns_of_an_alias_whose_target_is_no_mailbox_of_ours(tmp_path):
    """RCPT accepts mail for the alias; its target would bounce it after acceptance."""
    cfg = write(tmp_path, extra='[[domain]]\nname = "b.test"\nmailboxes = ["bob"]\n'
                                'aliases = { team = ["bob", "ghost@example.test", "x@elsewhere.example"] }\n')
    warnings = errors(check_json(cfg, 1), "warning")
    assert warnings["domain[1].aliases"] == ("b.test: alias 'team' -> ghost@example.test: not a mailbox or alias of "
                                             "a local domain (mail to the alias is accepted, then bounced)")


def test_check_json_gives_a_bad_key_as_a_finding(tmp_path):
    """A config that does not validate: with --json, its errors are findings on stdout
    (exit 2), not text on stderr only."""
    cfg = write(tmp_path, extra="[queue]\nlisen = 3\n")
    (finding,) = check_json(cfg, 2)
    assert finding[0] == "error" and "queue.lisen" in finding[2] and "(line " in finding[2], finding


def test_a_missing_recipients_file_is_an_error_of_check_and_a_clean_refusal_of_serve(tmp_path):
    """`config check` names every file serve reads; serve refuses one it cannot read with
    one line, not a traceback."""
    missing = tmp_path / "missing.recipients"
    cfg = write(tmp_path, extra=f'[[domain]]\nname = "list.example"\ndeliver = "relay"\nservers = ["127.0.0.1:9"]\n'
                                f'verify = "list"\nrecipients_file = "{missing}"\n')
    assert errors(check_json(cfg, 2))["domain[1].recipients_file"] == f"{missing} does not exist"
    out = subprocess.run([sys.executable, "-m", "kanmon", "serve", "-c", str(cfg)], capture_output=True, text=True,
                         timeout=120, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 1, out
    assert out.stderr.strip().splitlines()[-1].startswith("kanmon: cannot start: domain list.example: recipients_file")
    assert "Traceback" not in out.stderr, out.stderr


# -- a running node: check, status, flush, backup ------------------------------------------


@pytest.fixture
def node(tmp_path):
    cfg = write(tmp_path, extra='[queue]\nsuspend_delivery = true\n[alerts]\nto = []\n[[maintenance]]\nname = "nightly"\nschedule = "0 3 * * *"\n'
                                'action = "hold"\nolder_than = "30d"\n')
    running = RunningNode(parse_config(cfg.read_text())).start()
    running.node.config_source = str(cfg)  # as `kanmon serve -c` sets it
    running.node.admin.config_sha256 = config_digest(str(cfg))
    try:
        yield running, cfg
    finally:
        running.stop()


def send(running: RunningNode, subject: str) -> None:
    with smtplib.SMTP(running.host, running.port, timeout=10) as s:
        s.sendmail("bob@example.org", ["alice@example.test"], f"Subject: {subject}\r\n\r\nhi\r\n")


def test_check_accepts_the_running_nodes_own_addresses(node):
    running, cfg = node
    findings = check_json(cfg, 0)
    assert ("note", "smtp.listen[0]", f"127.0.0.1:{running.port} is held by the running kanmon") in findings


def test_status_running_healthy_degraded_and_not_running(node, tmp_path):
    running, cfg = node
    r = run("status", "-c", str(cfg))
    assert f"running, healthy (pid " in r.stdout
    assert f"listening:   127.0.0.1:{running.port}" in r.stdout and "smtp.listen[0]" in r.stdout
    assert "maintenance: nightly (hold): last not yet, next " in r.stdout
    compiled = "compiled" if scan.COMPILED else "in Python (the C part was not built"
    assert f"runtime:     Python {platform.python_version()}, DATA scans {compiled}" in r.stdout
    doc = json.loads(run("status", "-c", str(cfg), "--json").stdout)
    assert doc["runtime"] == {"python": platform.python_version(), "compiled_scans": scan.COMPILED}
    assert doc["running"] and doc["health"] == "healthy" and doc["config"]["file"] == str(cfg)
    assert doc["config"]["changed_on_disk"] is False and len(doc["config"]["sha256"]) == 64
    assert doc["queue"]["total"] == 0 and doc["balancer"] is None
    # A test alert (`kanmon alert test`) checks the mail; it does not make the node degraded.
    running.call(running.node.monitoring.alerts.test_alert, "queue")
    assert "running, healthy" in run("status", "-c", str(cfg)).stdout
    running.call(running.node.monitoring.alerts.raise_alert, "disk", "/data", "disk nearly full")
    r = run("status", "-c", str(cfg), code=1)
    assert "running, degraded" in r.stdout and "degraded:    alert disk: /data: disk nearly full" in r.stdout
    cfg.write_text(cfg.read_text() + "\n# edited\n")
    assert json.loads(run("status", "-c", str(cfg), "--json", code=1).stdout)["config"]["changed_on_disk"]
    run("reload", "-c", str(cfg))  # the edited file is the running one now
    doc = json.loads(run("status", "-c", str(cfg), "--json", code=1).stdout)
    assert doc["config"]["changed_on_disk"] is False and doc["config"]["sha256"] == config_digest(str(cfg))
    running.stop()
    r = run("status", "-c", str(cfg), code=3)
    assert r.stdout.startswith("kanmon: not running (no kanmon serve for ")
    assert json.loads(run("status", "-c", str(cfg), "--json", code=3).stdout)["running"] is False


def test_flush_needs_a_running_server(node):
    running, cfg = node
    run("queue", "flush", "-c", str(cfg))
    running.stop()
    r = run("queue", "flush", "-c", str(cfg), code=1)
    assert "kanmon is not running" in r.stderr


def test_backup_refuses_to_overwrite_and_no_progress_without_a_terminal(node, tmp_path):
    running, cfg = node
    archive = tmp_path / "q.tar"
    archive.write_bytes(b"precious")
    r = run("queue", "backup", str(archive), "-c", str(cfg), code=1)
    assert "exists; nothing written (--force overwrites it)" in r.stderr and archive.read_bytes() == b"precious"
    # A subprocess with pipes: not a terminal, so no progress bar on either stream.
    out = subprocess.run([sys.executable, "-m", "kanmon", "queue", "backup", str(archive), "--force", "-c", str(cfg)],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"0 message(s) written to {archive}\n" and out.stderr == ""
    out = subprocess.run([sys.executable, "-m", "kanmon", "queue", "restore", str(archive), "-c", str(cfg), "--json"],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0 and out.stderr == "" and json.loads(out.stdout)["restored"] == []


def test_control_socket_progress_lines(node, monkeypatch):
    running, _cfg = node
    monkeypatch.setattr(control, "PROGRESS_EVERY", 0.0)
    for n in range(3):
        send(running, f"m{n}")
    seen: list[tuple[int, int | None]] = []
    with control.ControlClient(running.data_dir) as client:
        reply = client.request("act", {"action": "hold", "filters": {"state": "all"}, "whole_queue": True,
                                       "source": "test"}, progress=lambda done, total: seen.append((done, total)))
    assert reply["ok"] and len(reply["result"]["acted"]) == 3
    assert seen[-1] == (3, 3)
    with control.ControlClient(running.data_dir) as client:  # no progress asked: none sent
        assert client.request("list", {})["ok"]


def test_log_events_unknown_id_exits_1(node):
    running, cfg = node
    r = run("log", "events", "--id", "NOPE", "-c", str(cfg), code=1)
    assert "no event for queue id 'NOPE'" in r.stderr


class FakeTerminal:
    def __init__(self) -> None:
        self.text = ""

    def write(self, s: str) -> int:
        self.text += s
        return len(s)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return True


def test_progress_bar_only_on_a_terminal_and_never_with_json(monkeypatch):
    fake = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", fake)
    monkeypatch.setattr(sys, "stdout", FakeTerminal())
    monkeypatch.setenv("TERM", "xterm")
    with options.progress_bar("backing up", enabled=False) as progress:
        assert progress is None  # --json
    with options.progress_bar("backing up") as progress:
        assert progress is not None
        progress(5, 10)
    assert "backing up" in fake.text
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False)  # output redirected: no bar either
    with options.progress_bar("backing up") as progress:
        assert progress is None
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    monkeypatch.setattr(fake, "isatty", lambda: False)
    with options.progress_bar("backing up") as progress:
        assert progress is None


def test_dns_check_and_sendmail_find_the_config_like_every_command(tmp_path, monkeypatch):
    """`kanmon dns check` without -c uses $KANMON_CONFIG (then the system path) and says
    so on stderr; `kanmon sendmail` finds it the same way, silently (cron mails output)."""
    zone = tmp_path / "fwd.zone"
    zone.write_text("$ORIGIN example.test.\n$TTL 300\n@ IN SOA ns hostmaster 1 3600 600 86400 300\n"
                    "@ IN MX 10 mx\nmx IN A 192.0.2.1\n")
    cfg = write(tmp_path, extra='[dnscheck]\nhelo = "helo-from-the-config.example.test"\n')
    r = run("dns", "check", "example.test", "--zone", str(zone), code=None, env={options.CONFIG_ENV: str(cfg)})
    assert r.stderr.splitlines()[0] == f"kanmon: using {cfg} (from $KANMON_CONFIG)"
    assert "helo-from-the-config.example.test" in r.stdout  # the config's [dnscheck] helo is checked
    monkeypatch.setattr(options, "SYSTEM_CONFIG", cfg)
    r = run("dns", "check", "example.test", "--zone", str(zone), code=None)
    assert f"kanmon: using {cfg} (no -c and no $KANMON_CONFIG)" in r.stderr
    assert "helo-from-the-config.example.test" in r.stdout
    r = run("dns", "check", "example.test", "--zone", str(zone), "--json", code=None)
    assert json.loads(r.stdout)["domain"] == "example.test"  # the note is on stderr only
    monkeypatch.setattr(options, "SYSTEM_CONFIG", tmp_path / "absent.toml")
    r = run("dns", "check", "example.test", "--zone", str(zone), code=None)
    assert "kanmon: using <embedded default>" in r.stderr
    assert "mx1.example.test" not in r.stdout  # the embedded default's example names are not checked

    # sendmail: the maildrop of the config $KANMON_CONFIG names, nothing said.
    (tmp_path / "data/maildrop").mkdir(parents=True)  # made by `kanmon serve`
    r = run("sendmail", "-f", "root@example.test", "alice@example.test", env={options.CONFIG_ENV: str(cfg)})
    assert r.stderr == ""
    assert len(list((tmp_path / "data/maildrop").iterdir())) == 1
    monkeypatch.setattr(options, "SYSTEM_CONFIG", cfg)
    run("sendmail", "-f", "root@example.test", "alice@example.test")
    assert len(list((tmp_path / "data/maildrop").iterdir())) == 2


def _on_a_terminal(*args: str) -> str:
    """What `kanmon ARGS` writes on a pseudo-terminal (stdout and stderr both a tty)."""
    import os

    import pexpect

    child = pexpect.spawn(sys.executable, ["-m", "kanmon", *args], cwd=str(ROOT), timeout=60, encoding="utf-8",
                          env=dict(os.environ, PYTHONPATH=str(ROOT), COLUMNS="100", TERM="xterm"))
    try:
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0, child.before
    return child.before


def _piped(*args: str) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "kanmon", *args], capture_output=True, text=True, timeout=60,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return out


BAR = "\u2501"  # the bar's line character: what only a rich progress bar draws here


def test_long_operations_show_a_progress_bar_on_a_terminal_only(node, tmp_path):
    """queue backup and restore, bulk hold/release/delete and stats over the history draw
    a progress bar on a terminal (a pty); with --json, or piped, none."""
    running, cfg = node
    c = str(cfg)
    for n in range(3):
        send(running, f"m{n}")
    archive = tmp_path / "q.tar"
    steps = [
        (("queue", "backup", str(archive), "--force", "-c", c), "backing up"),
        (("queue", "hold", "--state", "all", "--yes", "-c", c), "hold"),
        (("queue", "release", "--state", "all", "--yes", "-c", c), "release"),
        (("stats", "--since", "30d", "-c", c), "counting"),
        (("queue", "restore", str(archive), "-c", c), "restoring"),
        (("queue", "delete", "--state", "all", "--yes", "-c", c), "delete"),
    ]
    for args, label in steps:
        shown = _on_a_terminal(*args)
        assert BAR in shown and label in shown, (args, shown[:300])
    for n in range(3):
        send(running, f"again{n}")
    for args, _label in steps:
        assert BAR not in _on_a_terminal(*args, "--json"), args
        out = _piped(*args)
        assert BAR not in out.stderr and BAR not in out.stdout and "\x1b[" not in out.stderr, args


def test_under_systemd_with_syslog_the_lines_reach_the_journal_once(tmp_path):
    """stdout is the journal ($JOURNAL_STREAM names it) and [log] to has syslog: the event
    lines go to /dev/log only; stdout keeps the start-up description."""
    import os
    import signal

    from tests.support.kanmon_node import wait_for

    devlog = tmp_path / "dev-log"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(devlog))
    sock.settimeout(20)
    port = free_port()
    cfg = write(tmp_path, extra=f'[log]\nto = ["syslog"]\nsyslog_socket = "{devlog}"\n', port=port)
    try:
        for journal in (False, True):
            out_path = tmp_path / f"stdout-{journal}"
            with open(out_path, "w") as out:
                env = dict(os.environ, PYTHONPATH=str(ROOT))
                if journal:
                    st = os.fstat(out.fileno())
                    env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
                proc = subprocess.Popen([sys.executable, "-m", "kanmon", "serve", "-c", str(cfg)], stdout=out,
                                        stderr=subprocess.DEVNULL, env=env, cwd=ROOT)
                try:
                    lines: list[str] = []  # recovery: on syslog either way (after the last run's lines)
                    while not any("kanmon/qmgr[" in ln and "recovery" in ln for ln in lines):
                        lines.append(sock.recv(9000).decode())
                    wait_for(lambda: "kanmon: SMTP on" in out_path.read_text(), 20, "the description")
                finally:
                    proc.send_signal(signal.SIGTERM)
                    proc.wait(30)
            text = out_path.read_text()
            assert ("kanmon/qmgr[" in text) is (not journal), text
    finally:
        sock.close()


def test_a_system_config_this_user_may_not_read_is_a_clear_error_not_a_traceback(tmp_path, monkeypatch):
    """/etc/kanmon/kanmon.toml is 0640 root:kanmon: another user running a command (or
    sendmail from a cron job) gets the reason, not a traceback."""
    sealed = tmp_path / "sealed"
    sealed.mkdir()
    cfg = write(sealed)
    monkeypatch.setattr(options, "SYSTEM_CONFIG", cfg)
    real_is_file = Path.is_file

    def is_file(self):
        if self == cfg:
            raise PermissionError(13, "Permission denied", str(self))
        return real_is_file(self)

    monkeypatch.setattr(Path, "is_file", is_file)
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: (_ for _ in ()).throw(
        PermissionError(13, "Permission denied", str(self))))
    r = run("status", code=2)
    assert f"kanmon: using {cfg}" in r.stderr and "cannot read" in r.stderr and r.exception is not None
    assert isinstance(r.exception, SystemExit)
    r = run("sendmail", "-t", code=78)
    assert "sendmail: config error:" in r.stderr and "cannot read" in r.stderr


def test_another_user_is_told_why_the_control_socket_refuses_and_status_is_unknown(node, monkeypatch):
    running, cfg = node
    monkeypatch.setattr(control, "_peer_uid", lambda sock: 4242)  # as if another user connected
    with control.ControlClient(running.data_dir) as client:
        reply = client.request("status")
    assert not reply["ok"] and control.REFUSED_USER in reply["error"] and "uid 4242" in reply["error"]
    r = run("status", "-c", str(cfg), code=4)
    assert "running, status unknown" in r.stdout
    monkeypatch.setattr(control, "_peer_uid", lambda sock: 0)  # root: answered
    run("status", "-c", str(cfg), code=0)


def test_an_error_event_degrades_status_for_the_alert_interval_not_forever(tmp_path):
    """A critical alert (an error event without a recovery event) has no condition that clears it: status counts it
    while a repeat would be suppressed ([alerts] min_interval), then is healthy again."""
    from kanmon.clock import ManualClock

    cfg = write(tmp_path, extra='[alerts]\nto = []\nmin_interval = "1h"\n')
    running = RunningNode(parse_config(cfg.read_text()), clock=ManualClock()).start()
    try:
        running.call(running.node.monitoring.alerts.raise_alert, "critical", "pickup", "error event: pickup: boom")
        r = run("status", "-c", str(cfg), code=1)
        assert "degraded:    alert critical: error event: pickup: boom" in r.stdout
        running.advance(3599)
        run("status", "-c", str(cfg), code=1)
        running.advance(2)
        r = run("status", "-c", str(cfg), code=0)
        assert "running, healthy" in r.stdout
        running.call(running.node.monitoring.alerts.raise_alert, "disk", "/data", "disk nearly full")
        running.advance(7200)
        run("status", "-c", str(cfg), code=1)  # an alert with a condition stays until cleared
    finally:
        running.stop()
