"""Antivirus and spam scoring at the end of DATA, with real scanners: Debian's clamd with a
test signature and Debian's Rspamd (tests/support/scanners.py); a node on loopback, a
client outside relay_networks sending with smtplib. Where a real scanner cannot show a
case (a scanner that accepts the connection and never answers; each Rspamd action), a
local stand-in speaking the same protocol does."""

from __future__ import annotations

import json
import smtplib
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from kanmon.config import parse_config
from kanmon.records.query import search_events
from tests.support.kanmon_node import TEST_DEFAULT_PROFILE, RunningNode, free_port, maildir_messages, wait_for
from tests.support.mailsamples import attachment, japanese_message, plain_zip
from tests.support.scanners import GTUBE, TEST_VIRUS, clamd_server, rspamd_server  # noqa: F401 - fixtures

OUTSIDE = "127.0.0.9"

CONFIG = """
[server]
hostname = "mx1.example.test"
data_dir = "{data_dir}"
[smtp]
listen = ["127.0.0.1:{port}"]
relay_networks = ["127.0.0.1/32"]
greet_pause = "0s"  # the pregreet wait has its own tests (test_hostile_input)
min_free_disk = "1MB"
[[domain]]
name = "corp.example"
mailboxes = ["tanaka"]
{extra}
""" + TEST_DEFAULT_PROFILE


def start(tmp_path, extra: str) -> RunningNode:
    text = CONFIG.format(data_dir=tmp_path / "data", port=free_port(), extra=extra)
    return RunningNode(parse_config(text)).start()


def send(node, msg: bytes):
    with smtplib.SMTP(node.host, node.port, source_address=(OUTSIDE, 0), timeout=30) as s:
        s.ehlo("client.partner.example")
        return s.sendmail("katou@partner.example", ["tanaka@corp.example"], msg)


def delivered(node) -> list[bytes]:
    node.wait_idle()
    return maildir_messages(node.data_dir, "tanaka@corp.example")


def events(node, kind_text: str) -> list[str]:
    node.flush()
    return [e.text for e in search_events(node.data_dir) if kind_text in e.text]


def infected_message() -> bytes:
    payload = b"MZ" + bytes(100) + TEST_VIRUS + bytes(100)
    return japanese_message(subject="ご確認ください", attachments=[attachment(plain_zip({"doc.exe": payload}), "doc.zip")])


# -- clamd --------------------------------------------------------------------------------


def test_virus_inside_a_zip_is_quarantined_and_clean_mail_is_marked(tmp_path, clamd_server):  # noqa: F811
    node = start(tmp_path, f'[antivirus]\nclamd = "{clamd_server}"\n')
    try:
        send(node, infected_message())
        send(node, japanese_message(subject="こんにちは"))
        (clean,) = delivered(node)
        assert b"X-Kanmon-Antivirus: clean" in clean
        (line,) = events(node, "quarantined (admin)")
        assert "virus Kanmon.Test.Sig.UNOFFICIAL" in line
    finally:
        node.stop()


def test_virus_reject_by_profile(tmp_path, clamd_server):  # noqa: F811
    node = start(tmp_path, f'[antivirus]\nclamd = "{clamd_server}"\n[[content_profile]]\nname = "inbound"\nvirus = "reject"\n')
    try:
        with pytest.raises(smtplib.SMTPDataError) as e:
            send(node, infected_message())
        assert e.value.smtp_code == 554 and b"virus found (Kanmon.Test.Sig.UNOFFICIAL)" in e.value.smtp_error
        assert delivered(node) == []
    finally:
        node.stop()


def test_message_over_the_stream_limit_is_not_scanned_and_says_so(tmp_path, clamd_server):  # noqa: F811
    node = start(tmp_path, f'[antivirus]\nclamd = "{clamd_server}"\nmax_size = "10KB"\n')
    try:
        send(node, japanese_message(body="あ" * 20000))
        (msg,) = delivered(node)
        assert b"X-Kanmon-Antivirus: not scanned:" in msg and b"more than the 10000 clamd accepts" in msg
    finally:
        node.stop()


def test_clamd_down_tempfails_raises_the_alert_event_and_accept_and_tag_delivers(tmp_path):
    dead = f"127.0.0.82:{free_port('127.0.0.82')}"
    node = start(tmp_path, f'[antivirus]\nclamd = "{dead}"\n')
    try:
        with pytest.raises(smtplib.SMTPDataError) as e:
            send(node, japanese_message())
        assert e.value.smtp_code == 451 and b"4.7.1" in e.value.smtp_error
        (line,) = events(node, "scanner clamd failed")
        assert dead in line
    finally:
        node.stop()
    node = start(tmp_path / "b", f'[antivirus]\nclamd = "{dead}"\n'
                                  '[[content_profile]]\nname = "inbound"\nscanner_failure = "accept_and_tag"\n')
    try:
        send(node, japanese_message())
        (msg,) = delivered(node)
        assert b"X-Kanmon-Scan: not scanned: clamd at" in msg
    finally:
        node.stop()


def test_clamd_that_never_answers_is_a_failure_after_the_timeout(tmp_path):
    silent = socket.socket()
    silent.bind(("127.0.0.82", 0))
    silent.listen(8)  # accepts (the kernel does), never answers
    host, port = silent.getsockname()
    node = start(tmp_path, f'[antivirus]\nclamd = "{host}:{port}"\ntimeout = "1s"\n')
    try:
        with pytest.raises(smtplib.SMTPDataError) as e:
            send(node, japanese_message())
        assert e.value.smtp_code == 451
        (line,) = events(node, "scanner clamd failed")
        assert "did not answer within 1 s" in line
    finally:
        node.stop()
        silent.close()


# -- Rspamd -------------------------------------------------------------------------------


def test_rspamd_rejects_gtube_and_scores_ordinary_mail(tmp_path, rspamd_server):  # noqa: F811
    node = start(tmp_path, f'[spam]\nrspamd = "{rspamd_server}"\n')
    try:
        with pytest.raises(smtplib.SMTPDataError) as e:
            send(node, b"From: a@partner.example\r\nTo: tanaka@corp.example\r\nSubject: test\r\n\r\n" + GTUBE + b"\r\n")
        assert e.value.smtp_code == 550 and b"5.7.1" in e.value.smtp_error
        send(node, japanese_message(subject="会議の件", body="明日の会議は10時からです。"))
        (msg,) = delivered(node)
        assert b"X-Spam-Score: " in msg
    finally:
        node.stop()


class StandIn(BaseHTTPRequestHandler):
    """Rspamd's /checkv2 answering what the test sets (and keeping what it was sent)."""

    answer: dict = {}
    seen: list = []

    def do_POST(self):  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        StandIn.seen.append((dict(self.headers), body))
        data = json.dumps(StandIn.answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def standin():
    server = ThreadingHTTPServer(("127.0.0.83", 0), StandIn)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    StandIn.seen = []
    yield f"http://127.0.0.83:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("action, score, expect", [
    ("no action", 1.0, "delivered"),
    ("add header", 7.0, "X-Spam: Yes"),
    ("rewrite subject", 9.0, "Subject: [SPAM] "),
    ("soft reject", 9.0, 451),
    ("greylist", 5.0, 451),
    ("reject", 20.0, 550),
])
def test_each_rspamd_action_maps_to_ours(tmp_path, standin, action, score, expect):
    StandIn.answer = {"score": score, "required_score": 15.0, "action": action, "symbols": {"X": {"score": score}}}
    node = start(tmp_path, f'[spam]\nrspamd = "{standin}"\n')
    try:
        if isinstance(expect, int):
            with pytest.raises(smtplib.SMTPDataError) as e:
                send(node, japanese_message())
            assert e.value.smtp_code == expect
            return
        send(node, japanese_message())
        (msg,) = delivered(node)
        assert f"X-Spam-Score: {score:.2f} / 15.00".encode() in msg
        if expect != "delivered":
            assert expect.encode() in msg
        headers, body = StandIn.seen[0]
        assert headers["IP"] == OUTSIDE and headers["From"] == "katou@partner.example"
        assert headers["Rcpt"] == "tanaka@corp.example" and headers["Helo"] == "client.partner.example"
        assert body.rstrip().endswith(japanese_message().rstrip()[-40:])
    finally:
        node.stop()


def test_rspamd_score_reaches_the_profiles_quarantine_score(tmp_path, standin):
    StandIn.answer = {"score": 8.0, "required_score": 15.0, "action": "no action", "symbols": {}}
    node = start(tmp_path, f'[spam]\nrspamd = "{standin}"\n[[content_profile]]\nname = "inbound"\nquarantine_score = 6.0\n')
    try:
        send(node, japanese_message())
        assert delivered(node) == []
        (line,) = events(node, "quarantined (spam)")
        assert "spam score 8.00" in line
    finally:
        node.stop()


def test_rspamd_answering_garbage_is_a_scanner_failure(tmp_path, standin):
    StandIn.answer = {"nonsense": True}
    node = start(tmp_path, f'[spam]\nrspamd = "{standin}"\n')
    try:
        with pytest.raises(smtplib.SMTPDataError) as e:
            send(node, japanese_message())
        assert e.value.smtp_code == 451
        assert events(node, "scanner rspamd failed")
    finally:
        node.stop()


class FakeClamd:
    """A clamd stand-in on a socket: down (closed port) until start(), then it answers
    every INSTREAM with "stream: OK" (a real clamd cannot be stopped and started at will
    inside one test cheaply)."""

    def __init__(self):
        self.port = free_port("127.0.0.82")
        self.sock: socket.socket | None = None
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.82", self.port))
        self.sock.listen(8)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        assert self.sock is not None
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                data = b""
                while not data.endswith(b"\0\0\0\0"):
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                conn.sendall(b"stream: OK\0")

    def stop(self) -> None:
        if self.sock is not None:
            self.sock.close()


def test_scanner_alert_is_raised_when_clamd_fails_and_cleared_when_it_answers(tmp_path):
    fake = FakeClamd()
    node = start(tmp_path, f'[antivirus]\nclamd = "127.0.0.82:{fake.port}"\n')
    alerts = node.node.monitoring.alerts

    def active() -> bool:
        st = alerts.states.get(("scanner", "clamd"))
        return bool(st and st.active)

    try:
        with pytest.raises(smtplib.SMTPDataError):
            send(node, japanese_message())
        node.flush()
        wait_for(active, 20, "the scanner alert")
        fake.start()
        send(node, japanese_message())
        assert b"X-Kanmon-Antivirus: clean" in delivered(node)[0]
        node.flush()
        wait_for(lambda: not active(), 20, "the scanner alert cleared")
        assert events(node, "scanner clamd answers again")
    finally:
        node.stop()
        fake.stop()
