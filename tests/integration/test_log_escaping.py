"""Control characters from the network never reach the log file raw (DESIGN.md promise 9).

A client's EHLO name with ESC, VT, tab and NUL, and a Message-ID with a terminal escape,
over a real socket: kanmon.log holds them escaped (`\\x1b`, as Postfix does), one event
per line, nothing grep takes for a binary file; `kanmon log events` shows the same text.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess

import pytest

from kanmon.records.query import search_events
from tests.integration.test_hostile_input import OUTSIDE, make_node
from tests.integration.test_relay_core import recv_reply, recv_until

EHLO = b"EHLO ev\x1b]0;owned\x07il\x0bname\ttab\x00nul\r\n"
CONTROLS = re.compile(rb"[\x00-\x09\x0b-\x1f\x7f]")  # every C0 control but the line end, and DEL


def test_client_strings_are_escaped_in_the_log_file(tmp_path) -> None:
    with make_node(tmp_path, greet_pause="0s") as n:
        s = socket.create_connection((n.host, n.port), source_address=(OUTSIDE, 0), timeout=10)
        try:
            assert recv_reply(s).startswith(b"220")
            s.sendall(EHLO)
            assert recv_reply(s).startswith(b"250")
            s.sendall(b"MAIL FROM:<bad sender>\r\n")  # refused: its event line names the HELO
            assert recv_reply(s).startswith(b"501")
            s.sendall(b"MAIL FROM:<a@remote.example>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n")
            # Pipelined: the three replies may come in one segment (RFC 2920), so read to the 354.
            replies = recv_until(s, b"354 ").split(b"\r\n")
            assert [r[:3] for r in replies if r] == [b"250", b"250", b"354"], replies
            s.sendall(b"Subject: hi\x1b[2K\r\nMessage-ID: <m\x1b[2K\x00x@remote.example>\r\n\r\nbody\r\n.\r\n")
            assert recv_reply(s).startswith(b"250")
            s.sendall(b"QUIT\r\n")
            recv_reply(s)
        finally:
            s.close()
        n.wait_idle()
        n.node.records.flush()
        log = n.data_dir / "log" / "kanmon.log"
        data = log.read_bytes()
        assert b"helo=<" in data and b"msgid=<" in data
        assert CONTROLS.findall(data) == []
        assert rb"helo=<ev\x1b]0;owned\x07il\x0bname\ttab\x00nul>" in data
        assert rb"msgid=<m\x1b[2K\x00x@remote.example>" in data
        rows = search_events(n.data_dir, grep="helo=<ev")
        assert rows and all(not CONTROLS.search(r.text.encode()) for r in rows)
    if shutil.which("grep") is None:
        pytest.skip("no grep")
    out = subprocess.run(["grep", "-c", "helo=<ev", str(log)], capture_output=True, text=True)
    assert out.stdout.strip().isdigit() and int(out.stdout) >= 1, out.stdout  # not "binary file matches"
