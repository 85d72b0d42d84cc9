"""IMAP extensions driven by bytes: QUOTA (RFC 9208) and its STATUS items."""

from __future__ import annotations

from pathlib import Path

from kanmon.config import parse_config
from kanmon.store.connection import PeerInfo
from kanmon.store.imap.session import ImapSession
from kanmon.store.users import AuthThrottle, Users
from tests.protocol.test_imap_session import ALICE, FAST, SIMPLE, Driver, deliver_new


def session(tmp_path: Path, quota: str | None) -> tuple[Driver, Users]:
    text = f'[server]\ndata_dir = "{tmp_path}"\n[[domain]]\nname = "example.test"\nmailboxes = ["alice"]\n'
    if quota:
        text += f'quota = "{quota}"\n'
    users = Users(parse_config(text), hasher=FAST)
    users.set_password(ALICE, "pw")
    box = users.mailbox(ALICE).ensure()
    for _ in range(3):
        deliver_new(box.root, SIMPLE)
    s = ImapSession(hostname="h", users=users, throttle=AuthThrottle(), peer=PeerInfo("127.0.0.1", 1, True),
                    tls_available=True, emit=lambda *a, **k: None)
    d = Driver(s, users)
    assert "QUOTA" not in d.cmd("c CAPABILITY")  # offered once logged in
    d.cmd(f"a LOGIN {ALICE} pw")
    return d, users


def test_quota_root_and_usage(tmp_path: Path) -> None:
    d, users = session(tmp_path, "1MiB")
    assert " QUOTA QUOTA=RES-STORAGE" in d.cmd("c CAPABILITY")
    used = 3 * len(SIMPLE)  # stored bytes (LF), rounded up to KiB
    limit = users.quota(ALICE) // 1024
    # RFC 9208 4.1.2 example
    assert d.cmd("A003 GETQUOTAROOT INBOX") == (
        f'* QUOTAROOT INBOX ""\r\n* QUOTA "" (STORAGE {(used + 1023) // 1024} {limit})\r\nA003 OK GETQUOTAROOT completed\r\n')
    assert d.cmd('A004 GETQUOTA ""') == f'* QUOTA "" (STORAGE 1 {limit})\r\nA004 OK GETQUOTA completed\r\n'
    assert "A005 NO [NONEXISTENT]" in d.cmd('A005 GETQUOTA "other"')
    assert "A006 NO [NONEXISTENT]" in d.cmd("A006 GETQUOTAROOT Nowhere")
    assert "A007 NO [NOPERM]" in d.cmd('A007 SETQUOTA "" (STORAGE 512)')  # no QUOTASET
    assert "BAD" in d.cmd("A008 GETQUOTAROOT")


def test_no_quota_no_root(tmp_path: Path) -> None:
    d, _ = session(tmp_path, None)
    assert d.cmd("A GETQUOTAROOT INBOX") == "* QUOTAROOT INBOX\r\nA OK GETQUOTAROOT completed\r\n"
    assert "B NO [NONEXISTENT]" in d.cmd('B GETQUOTA ""')


def test_status_deleted_and_deleted_storage(tmp_path: Path) -> None:
    d, _ = session(tmp_path, "1MiB")
    d.cmd("s SELECT INBOX")
    d.cmd("t STORE 1:2 +FLAGS.SILENT (\\Deleted)")
    out = d.cmd("u STATUS INBOX (MESSAGES DELETED DELETED-STORAGE)")
    assert "* STATUS INBOX (MESSAGES 3 DELETED 2 DELETED-STORAGE 1)" in out  # 2 x 70 bytes: 1 KiB
