"""Log destinations: syslog datagrams to a real unix socket standing in for /dev/log,
the own file's rotation (size, age, by an outside tool), and fail2ban's stock Postfix
and Dovecot filters matching our authentication failures."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from kanmon.config import parse_config
from kanmon.records import events as ev
from kanmon.records.logsinks import LogFile, SyslogSender
from kanmon.records.store import Records


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def devlog(tmp_path: Path):
    path = tmp_path / "dev-log"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    yield sock, path
    sock.close()


def test_events_go_to_syslog_with_facility_mail_and_component_tags(tmp_path: Path, devlog) -> None:
    sock, path = devlog
    cfg = parse_config(f'[log]\nto = ["syslog"]\nsyslog_socket = "{path}"\n')
    records = Records(tmp_path, "mx1.example.test", log=cfg.log)
    records.record(ev.Connected("unknown", "192.0.2.1"), session="1")
    records.record(ev.AuthFailed("unknown", "192.0.2.1", "PLAIN", "bob"))
    records.emit("disk on fire", kind="error")
    records.record(ev.LoginFailed("imap", "bob", "PLAIN", "192.0.2.2"))
    records.flush()
    records.close()
    got = [sock.recv(9000).decode() for _ in range(4)]
    pattern = r"^<(\d+)>\w{3} [ \d]\d \d\d:\d\d:\d\d (kanmon/\w+)\[\d+\]: (.*)$"
    parsed = [re.match(pattern, g).groups() for g in got]
    # mail = facility 2: <22> info, <20> warning, <19> error
    assert parsed[0] == ("22", "kanmon/smtpd", "connect from unknown[192.0.2.1]")
    assert parsed[1][:2] == ("20", "kanmon/smtpd")
    assert parsed[2] == ("19", "kanmon/master", "disk on fire")
    assert parsed[3][:2] == ("20", "kanmon/imap")
    assert not (tmp_path / "log" / "kanmon.log").exists()  # "file" not in [log] to


def test_a_missing_syslog_socket_loses_nothing_in_the_file(tmp_path: Path, capsys) -> None:
    cfg = parse_config(f'[log]\nto = ["file", "syslog"]\nsyslog_socket = "{tmp_path / "none"}"\n')
    records = Records(tmp_path, "mx1.example.test", log=cfg.log)
    records.emit("one")
    records.emit("two")
    records.flush()
    records.close()
    assert (tmp_path / "log" / "kanmon.log").read_text().count("kanmon/master[") == 2
    assert capsys.readouterr().err.count("syslog socket") == 1  # said once


def test_syslog_sender_reconnects_after_the_daemon_restarts(tmp_path: Path) -> None:
    path = tmp_path / "dev-log"
    sender = SyslogSender(str(path), "mail")
    for _ in range(2):  # a syslog daemon that goes away and comes back on the same path
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(path))
        sock.settimeout(5)
        assert sender.send(0.0, "kanmon/smtpd", "info", "hello")
        assert sock.recv(100).endswith(b": hello")
        sock.close()
        path.unlink()
    sender.close()


def test_the_file_rotates_by_size_keeping_n(tmp_path: Path) -> None:
    log = LogFile(tmp_path / "kanmon.log", rotate_size=100, keep=2)
    for n in range(5):
        log.write(f"{n}" * 60 + "\n")  # every write but none crosses 100 alone
    log.close()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["kanmon.log", "kanmon.log.1", "kanmon.log.2"]
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in tmp_path.iterdir())
    assert (tmp_path / "kanmon.log.1").read_text() == "2" * 60 + "\n" + "3" * 60 + "\n"
    assert (tmp_path / "kanmon.log").read_text() == "4" * 60 + "\n"


def test_the_file_rotates_by_age(tmp_path: Path) -> None:
    clock = Clock()
    log = LogFile(tmp_path / "kanmon.log", rotate_age=86400, clock=clock)
    log.write("first\n")
    clock.t += 86399
    log.write("second\n")
    assert not (tmp_path / "kanmon.log.1").exists()
    clock.t += 1
    log.write("third\n")
    log.write("fourth\n")
    log.close()
    assert (tmp_path / "kanmon.log.1").read_text() == "first\nsecond\nthird\n"
    assert (tmp_path / "kanmon.log").read_text() == "fourth\n"


def test_a_file_moved_away_by_logrotate_is_followed_and_reopen_works(tmp_path: Path) -> None:
    records = Records(tmp_path, "mx1.example.test")
    records.emit("before")
    records.flush()
    log = tmp_path / "log" / "kanmon.log"
    log.rename(tmp_path / "log" / "kanmon.log.old")
    records.reopen_log()  # what SIGUSR1 does
    records.emit("after")
    records.flush()
    records.close()
    assert "before" in (tmp_path / "log" / "kanmon.log.old").read_text()
    assert "after" in log.read_text() and "before" not in log.read_text()


# -- fail2ban ----------------------------------------------------------------------------------
# Literal copies from Debian bookworm's fail2ban 1.0.2 (filter.d/postfix.conf, mode auth,
# and filter.d/dovecot.conf), with <HOST> as fail2ban expands it to a named group.
POSTFIX_MDPR_AUTH = r"warning:"
POSTFIX_MDRE_AUTH = (r"^[^[]*\[<HOST>\]%(_port)s: SASL ((?i)LOGIN|PLAIN|(?:CRAM|DIGEST)-MD5) authentication failed:"
                     r"(?! Connection lost to authentication server| Invalid authentication mechanism)")
DOVECOT_FAILREGEX = (r"^(?:Aborted login|Disconnected|Remote closed connection|Client has quit the connection)"
                     r"%(_bypass_reject_reason)s \((?:auth failed, \d+ attempts(?: in \d+ secs)?|tried to use "
                     r"(?:disabled|disallowed) \S+ auth|proxy dest auth failed)\):(?: user=<<F-USER>[^>]*</F-USER>>,)?"
                     r"(?: method=\S+,)? rip=<HOST>(?:[^>]*(?:, session=<\S+>)?)\s*$")
DOVECOT_PREFIX = r"(?:(?:pop3|imap|managesieve|submission)-login: )?(?:Info: )?"
DOVECOT_BYPASS = r"(?:: (?:\w+\([^\):]*\) \w+|[^\(]+))*"


def _expand(regex: str) -> str:
    return (regex.replace("%(_port)s", r"(?::\d+)?").replace("%(_bypass_reject_reason)s", DOVECOT_BYPASS)
            .replace("<HOST>", r"(?P<host>[\d.:a-fA-F]+)").replace("<F-USER>", "").replace("</F-USER>", "")
            .replace("((?i)LOGIN", "((?i:LOGIN)"))


def _our_lines(tmp_path: Path) -> list[str]:
    records = Records(tmp_path, "mx1.example.test")
    records.record(ev.AuthFailed("unknown", "192.0.2.7", "PLAIN", "bob@example.test"))
    records.record(ev.AuthFailed("pc1.example", "192.0.2.8", "LOGIN", "x", blocked="ip 192.0.2.8"))
    records.record(ev.LoginFailed("imap", "bob", "PLAIN", "192.0.2.9"))
    records.record(ev.LoginFailed("pop3", "ev>il, rip=198.51.100.1", "PLAIN", "192.0.2.10", 3, "ip 192.0.2.10"))
    records.record(ev.AuthSucceeded("pc1", "192.0.2.11", "PLAIN", "alice@example.test"))
    records.flush()
    records.close()
    return (tmp_path / "log" / "kanmon.log").read_text().splitlines()


def test_stock_fail2ban_regexes_match_our_failures_and_find_the_client(tmp_path: Path) -> None:
    postfix = re.compile(_expand(POSTFIX_MDRE_AUTH))
    dovecot = re.compile(_expand(DOVECOT_FAILREGEX))
    hosts = []
    for line in _our_lines(tmp_path):
        # after "Mmm dd hh:mm:ss host " (the day padded with a space: "Dec  1")
        tag, _, message = re.sub(r"^\w{3} [ \d]\d \d\d:\d\d:\d\d \S+ ", "", line).partition(": ")
        if tag.startswith("kanmon/smtpd[") and message.startswith(POSTFIX_MDPR_AUTH + " "):
            m = postfix.match(message[len(POSTFIX_MDPR_AUTH) + 1:])
        else:
            m = dovecot.match(re.sub("^" + DOVECOT_PREFIX, "", message))
        hosts.append(m.group("host") if m else None)
    assert hosts == ["192.0.2.7", "192.0.2.8", "192.0.2.9", "192.0.2.10", None]


@pytest.mark.skipif(shutil.which("fail2ban-regex") is None, reason="fail2ban is not installed (apt-get install fail2ban)")
@pytest.mark.parametrize(("filt", "hosts"), [
    ('postfix[mode=auth, _daemon="kanmon/smtpd"]', {"192.0.2.7", "192.0.2.8"}),
    ('dovecot[_daemon="kanmon/(?:imap|pop3)"]', {"192.0.2.9", "192.0.2.10"}),
])
def test_fail2ban_regex_with_the_stock_filters(tmp_path: Path, filt: str, hosts: set[str]) -> None:
    _our_lines(tmp_path)
    out = subprocess.run(["fail2ban-regex", "--print-all-matched", str(tmp_path / "log" / "kanmon.log"), filt],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    assert re.search(r"Lines: 5 lines, 0 ignored, 2 matched, 3 missed", out), out
    matched = out[out.index("Matched line(s):"):out.index("Missed line(s):")]
    assert {h for h in re.findall(r"\[(192\.0\.2\.\d+)\]|rip=(192\.0\.2\.\d+)", matched) for h in h if h} == hosts


def test_the_timestamp_is_rfc_3164_day_padded_with_a_space(monkeypatch) -> None:
    from kanmon.records.logsinks import syslog_stamp

    monkeypatch.setenv("TZ", "UTC")
    import time

    time.tzset()
    try:
        assert syslog_stamp(1_796_083_860.0) == "Dec  1 00:11:00"  # not "Dec 01"
        assert syslog_stamp(1_796_083_860.0 + 14 * 86400) == "Dec 15 00:11:00"
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


def test_the_timestamp_of_each_second_is_made_once_and_every_second_gets_its_own(monkeypatch) -> None:
    from kanmon.records import logsinks

    monkeypatch.setenv("TZ", "UTC")
    import time

    time.tzset()
    monkeypatch.setattr(logsinks, "_last_stamp", (-1, ""))  # whatever an earlier test left
    made = []
    real = time.localtime
    monkeypatch.setattr(logsinks.time, "localtime", lambda t: made.append(t) or real(t))
    try:
        base = 1_796_083_860.0
        assert [logsinks.syslog_stamp(base + d) for d in (0.1, 0.5, 0.99, 1.0, 1.7, 61.2)] == [
            "Dec  1 00:11:00", "Dec  1 00:11:00", "Dec  1 00:11:00", "Dec  1 00:11:01", "Dec  1 00:11:01",
            "Dec  1 00:12:01"]
        assert made == [base, base + 1, base + 61]
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
