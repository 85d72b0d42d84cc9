"""Logging in while the records database cannot be read (damaged: another file put in
its place): every protocol answers a temporary failure, never "wrong
password" and never an internal error: SMTP AUTH 454 4.7.0, IMAP NO [UNAVAILABLE],
POP3 -ERR [SYS/TEMP] (RFC 4954 6, RFC 5530, RFC 3206). The right password works again
once the database is free. The busy timeout is shortened for the test."""

from __future__ import annotations

import imaplib
import poplib
import smtplib
import ssl

import pytest
import trustme
from click.testing import CliRunner

import kanmon.store.users as users_store
from kanmon.cli import main
from kanmon.config import load_config
from tests.support.kanmon_node import RunningNode, free_port

NODE = """
[server]
hostname = "mx1.example.test"
data_dir = "{data_dir}"
[smtp]
listen = ["127.0.0.1:{smtp}"]
relay_networks = ["127.0.0.1/32"]
min_free_disk = "1MB"
[tls]
cert = "{tls}/cert.pem"
key = "{tls}/key.pem"
[submission]
listen = ["127.0.0.1:{sub}"]
[pop3]
listen = ["127.0.0.1:{pop3}"]
[imap]
listen = ["127.0.0.1:{imap}"]
[[domain]]
name = "example.test"
mailboxes = ["alice"]
"""


@pytest.fixture
def node(tmp_path, monkeypatch):
    monkeypatch.setattr(users_store, "BUSY_TIMEOUT", 0.3, raising=False)
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    tls = tmp_path / "tls"
    tls.mkdir()
    cert.cert_chain_pems[0].write_to_path(str(tls / "cert.pem"))
    cert.private_key_pem.write_to_path(str(tls / "key.pem"))
    conf = tmp_path / "kanmon.toml"
    conf.write_text(NODE.format(data_dir=tmp_path / "data", smtp=free_port(), sub=free_port(), pop3=free_port(),
                                imap=free_port(), tls=tls))
    assert CliRunner().invoke(main, ["user", "passwd", "alice@example.test", "--stdin", "-c", str(conf)],
                              input="s3cret\n").exit_code == 0
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    cfg = load_config(conf)
    with RunningNode(cfg) as n:
        yield n, cfg, ctx


def smtp_auth(cfg, ctx) -> tuple[int, bytes]:
    with smtplib.SMTP(*cfg.submission.listen[0], timeout=15) as s:
        s.starttls(context=ctx)
        try:
            return s.login("alice@example.test", "s3cret")
        except smtplib.SMTPAuthenticationError as e:
            return e.smtp_code, e.smtp_error


def imap_login(cfg, ctx) -> str:
    with imaplib.IMAP4(*cfg.imap.listen[0], timeout=15) as m:
        m.starttls(ssl_context=ctx)
        try:
            return m.login("alice@example.test", "s3cret")[0]
        except imaplib.IMAP4.error as e:
            return str(e)


def pop3_login(cfg, ctx) -> str:
    p = poplib.POP3(*cfg.pop3.listen[0], timeout=15)
    try:
        p.stls(ctx)
        p.user("alice@example.test")
        try:
            return p.pass_("s3cret").decode()
        except poplib.error_proto as e:
            return e.args[0].decode()
    finally:
        p.close()


def test_logins_while_the_records_database_cannot_be_read_fail_temporarily(node):
    n, cfg, ctx = node
    assert smtp_auth(cfg, ctx)[0] == 235
    db = n.data_dir / "records.sqlite"
    kept = n.data_dir / "records.sqlite.kept"
    db.rename(kept)
    db.write_bytes(b"not a database, " * 512)
    try:
        code, text = smtp_auth(cfg, ctx)
        assert (code, text[:5]) == (454, b"4.7.0")
        assert "[UNAVAILABLE]" in imap_login(cfg, ctx)
        assert pop3_login(cfg, ctx).startswith("-ERR [SYS/TEMP]")
    finally:
        kept.replace(db)
    assert smtp_auth(cfg, ctx)[0] == 235
    assert imap_login(cfg, ctx) == "OK"
    assert pop3_login(cfg, ctx).startswith("+OK")
