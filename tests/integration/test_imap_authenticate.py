"""IMAP AUTHENTICATE with imaplib over STARTTLS: LOGIN (what Outlook uses) beside PLAIN."""

from __future__ import annotations

import imaplib
from pathlib import Path

import pytest
import trustme

from tests.integration.test_imap import ALICE, PW, make_server


@pytest.fixture
def server(tmp_path: Path):
    s = make_server(tmp_path / "data", trustme.CA())
    try:
        yield s
    finally:
        s.loop.run(s.svc.stop())
        s.loop.close()


def _client(server) -> imaplib.IMAP4:
    c = imaplib.IMAP4("127.0.0.1", server.plain, timeout=10)
    c.starttls(server.client_ctx)
    return c


def test_authenticate_login_and_plain(server) -> None:
    asked: list[bytes] = []

    def login_answers(challenge: bytes) -> str:
        asked.append(challenge)
        return ALICE if challenge == b"Username:" else PW

    c = _client(server)
    try:
        assert "AUTH=LOGIN" in c.capabilities and "AUTH=PLAIN" in c.capabilities
        typ, _ = c.authenticate("LOGIN", login_answers)
        assert typ == "OK" and asked == [b"Username:", b"Password:"]
        assert c.select("INBOX")[0] == "OK"
    finally:
        c.logout()
    c = _client(server)
    try:
        typ, _ = c.authenticate("PLAIN", lambda _challenge: f"\0{ALICE}\0{PW}")
        assert typ == "OK"
    finally:
        c.logout()
    c = _client(server)
    try:
        with pytest.raises(imaplib.IMAP4.error):
            c.authenticate("LOGIN", lambda ch: ALICE if ch == b"Username:" else "wrong")
    finally:
        c.logout()
