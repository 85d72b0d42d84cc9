"""DKIM signing end to end: `kanmon dkim keygen` makes the key and prints the record; the
record is served by the loopback DNS server; a relay node signs what its users send
and the notices it writes; dkimpy and OpenDKIM (`opendkim-testmsg`, a C implementation)
verify the signatures through that DNS server. `kanmon dns check` and `kanmon dkim
status` compare the published record with the key in use.
"""

from __future__ import annotations

import email.utils
import importlib.util
import json
import os
import re
import shutil
import smtplib
import ssl
import subprocess
import sys
import textwrap
from pathlib import Path

import dkim
import pytest
from click.testing import CliRunner

from kanmon.auth.dkimsign import load_signer
from kanmon.cli import main
from kanmon.config import parse_config
from kanmon.store.users import Users
from tests.support.dnsserver import DnsServer, dns_server  # noqa: F401  (fixture)
from tests.support.kanmon_node import TEST_DEFAULT_PROFILE, RunningNode, free_port, maildir_messages, wait_for
from tests.support.smtpsink import SmtpSink

ROOT = Path(__file__).resolve().parents[2]
NOW = 1_790_000_000
HAVE_NACL = importlib.util.find_spec("nacl") is not None
DKIMPY_ALGORITHMS = [
    "rsa-sha256",
    pytest.param("ed25519-sha256", marks=pytest.mark.skipif(
        not HAVE_NACL, reason="dkimpy verifies ed25519 only with PyNaCl, not a dependency (OpenDKIM checks ed25519)")),
]
MESSAGE = (
    b"From: Alice <alice@example.test>\r\nTo: bob@remote.example\r\nSubject: signed\r\n"
    b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-ID: <s1@example.test>\r\n\r\nHello  Bob.\r\n"
)

NODE = """
[server]
hostname = "mx1.example.test"
data_dir = "{data_dir}"
[smtp]
listen = ["127.0.0.1:{port}"]
relay_networks = ["127.0.0.1/32"]
greet_pause = "0s"  # the pregreet wait has its own tests (test_hostile_input)
min_free_disk = "1MB"
[[domain]]
name = "example.test"
mailboxes = ["alice", "postmaster"]
[outbound]
smarthost = ["127.0.0.9:{sink}"]
tls = "none"
[dns]
servers = ["{dns}"]
timeout = "2s"
[[dkim]]
domain = "example.test"
selector = "k2026"
key = "{key}"
algorithm = "{algorithm}"
[[dkim]]
domain = "example.test"
selector = "k2027"
key = "{next_key}"
active = false
""" + TEST_DEFAULT_PROFILE


def keygen(tmp_path: Path, selector: str = "k2026", algorithm: str = "rsa-sha256", *extra: str) -> tuple[Path, str]:
    """Run `kanmon dkim keygen` as a command; the key file and the zone line it printed."""
    key = tmp_path / f"example.test.{selector}.key"
    out = subprocess.run(
        [sys.executable, "-m", "kanmon", "dkim", "keygen", "--domain", "example.test", "--selector", selector,
         "--algorithm", algorithm, "--out", str(key), *extra],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])},
    )
    assert out.returncode == 0, out.stderr
    (zone,) = [line for line in out.stdout.splitlines() if line.startswith(f"{selector}._domainkey.example.test. IN TXT")]
    assert f"private key: {key}" in out.stdout
    return key, zone


def dns_txt(server: DnsServer):
    """dkimpy's DNS lookups, through the loopback server only."""
    resolver = server.resolver(timeout=2.0)

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        answer = resolver.resolve(name.decode(), "TXT", raise_on_no_answer=False)
        return b"".join(b"".join(rd.strings) for rd in answer)
    return dnsfunc


def config_for(tmp_path: Path, key: Path, algorithm: str = "rsa-sha256", dns: str = "127.0.0.1:1"):
    return parse_config(NODE.format(data_dir=tmp_path / "data", port=free_port(), sink=1, dns=dns, key=key,
                                    algorithm=algorithm, next_key=tmp_path / "next.key"))


@pytest.mark.parametrize("algorithm", DKIMPY_ALGORITHMS)
def test_the_record_keygen_prints_verifies_our_signatures(tmp_path, dns_server, algorithm):
    key, zone = keygen(tmp_path, algorithm=algorithm)
    dns_server.set_records(zone=zone + "\n")
    signed = load_signer(config_for(tmp_path, key, algorithm)).signed(MESSAGE, NOW)
    assert b"s=k2026;" in signed
    assert dkim.verify(signed, dnsfunc=dns_txt(dns_server))
    assert not dkim.verify(signed.replace(b"Hello", b"Hullo"), dnsfunc=dns_txt(dns_server))
    assert [q.name for q in dns_server.queries] == ["k2026._domainkey.example.test."] * 2


def test_keygen_refuses_to_overwrite_and_writes_privately(tmp_path):
    key, _zone = keygen(tmp_path)
    before = key.read_bytes()
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    result = CliRunner().invoke(main, ["dkim", "keygen", "--domain", "example.test", "--selector", "k2026",
                                       "--out", str(key)])
    assert result.exit_code == 2 and "exists; use --force" in result.output
    assert key.read_bytes() == before
    keygen(tmp_path, "k2026", "rsa-sha256", "--force")
    assert key.read_bytes() != before
    result = CliRunner().invoke(main, ["dkim", "keygen", "--domain", "example.test", "--selector", "bad_sel",
                                       "--out", str(tmp_path / "x.key")])
    assert result.exit_code == 2 and "not a selector" in result.output and not (tmp_path / "x.key").exists()


def test_keygen_default_path_is_in_data_dir(tmp_path):
    cfg = tmp_path / "kanmon.toml"
    cfg.write_text(f'[server]\ndata_dir = "{tmp_path / "data"}"\n')
    result = CliRunner().invoke(main, ["dkim", "keygen", "--domain", "Example.Test", "--selector", "e1",
                                       "--algorithm", "ed25519-sha256", "--json", "-c", str(cfg)])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    path = tmp_path / "data" / "dkim" / "example.test.e1.key"
    assert out["key"] == str(path) and path.is_file()
    assert oct(path.parent.stat().st_mode & 0o777) == "0o700"
    assert out["name"] == "e1._domainkey.example.test" and out["value"].startswith("v=DKIM1; k=ed25519; p=")


# -- OpenDKIM, an independent verifier -------------------------------------------------------


def _namespaces_usable() -> str:
    """Why opendkim-testmsg cannot be run here ("" when it can). It asks the system
    resolver (port 53, /etc/resolv.conf): the test runs it in private mount and network
    namespaces with our DNS server on 127.0.0.1:53 and a resolv.conf naming it."""
    if shutil.which("opendkim-testmsg") is None:
        return "opendkim-testmsg is not installed (Debian package opendkim-tools)"
    if shutil.which("unshare") is None or os.geteuid() != 0:
        return "needs root and unshare(1) to give opendkim-testmsg a private resolver"
    probe = subprocess.run(["unshare", "--mount", "--net", "true"], capture_output=True, timeout=30)
    if probe.returncode != 0:
        return f"unshare --mount --net fails here: {probe.stderr.decode(errors='replace').strip()}"
    return ""


def opendkim_verify(tmp_path: Path, zone: str, message: bytes) -> subprocess.CompletedProcess:
    (tmp_path / "zone").write_text(zone + "\n")
    (tmp_path / "message.eml").write_bytes(message)
    (tmp_path / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:2 attempts:2\n")
    (tmp_path / "verify.py").write_text(textwrap.dedent(f"""
        import subprocess, sys
        sys.path.insert(0, {str(ROOT)!r})
        from tests.support.dnsserver import DnsServer
        with DnsServer(zone=open({str(tmp_path / "zone")!r}).read(), host="127.0.0.1", port=53):
            r = subprocess.run(["opendkim-testmsg"], stdin=open({str(tmp_path / "message.eml")!r}, "rb"),
                               capture_output=True, timeout=60)
        sys.stderr.buffer.write(r.stdout + r.stderr)
        sys.exit(r.returncode)
    """))
    script = (f"ip link set lo up && mount --bind {tmp_path / 'resolv.conf'} /etc/resolv.conf && "
              f"exec {sys.executable} {tmp_path / 'verify.py'}")
    return subprocess.run(["unshare", "--mount", "--net", "sh", "-c", script], capture_output=True, timeout=120)


@pytest.mark.parametrize("algorithm", ["rsa-sha256", "ed25519-sha256"])
def test_opendkim_verifies_our_signatures(tmp_path, algorithm):
    why = _namespaces_usable()
    if why:
        pytest.skip(why)
    key, zone = keygen(tmp_path, algorithm=algorithm)
    signed = load_signer(config_for(tmp_path, key, algorithm)).signed(MESSAGE, NOW)
    good = opendkim_verify(tmp_path, zone, signed)
    assert good.returncode == 0, good.stderr
    bad = opendkim_verify(tmp_path, zone, signed.replace(b"Subject: signed", b"Subject: changed"))
    assert bad.returncode != 0 and b"Bad signature" in bad.stderr


# -- the relay signs at acceptance -----------------------------------------------------------


def test_the_relay_signs_its_users_mail_and_its_notices_not_outside_mail(tmp_path, dns_server):
    key, zone = keygen(tmp_path)
    dns_server.set_records(zone=zone + "\n")
    with SmtpSink("127.0.0.9") as sink:
        sink.rcpt_replies = {"gone@remote.example": "550 5.1.1 <gone@remote.example>: User unknown"}
        text = NODE.format(data_dir=tmp_path / "data", port=free_port(), sink=sink.port, dns=dns_server.address,
                           key=key, algorithm="rsa-sha256", next_key=tmp_path / "next.key")
        with RunningNode(parse_config(text)) as node:
            # From a relay network, From: our domain: signed, and the copy the sink got verifies.
            with smtplib.SMTP(node.host, node.port, source_address=("127.0.0.1", 0), timeout=10) as c:
                c.sendmail("alice@example.test", ["bob@remote.example"], MESSAGE)
            (tx,) = sink.wait_for_messages(1)
            assert tx.data.startswith(b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=example.test;\r\n\ts=k2026;")
            assert dkim.verify(tx.data, dnsfunc=dns_txt(dns_server))
            assert tx.data.count(b"DKIM-Signature:") == 1
            # A recipient the next hop refuses: the failure notice to alice is ours, signed too.
            with smtplib.SMTP(node.host, node.port, source_address=("127.0.0.1", 0), timeout=10) as c:
                c.sendmail("alice@example.test", ["gone@remote.example"], MESSAGE.replace(b"bob@", b"gone@"))
            wait_for(lambda: len(maildir_messages(node.data_dir, "alice@example.test")) == 1, what="the failure notice")
            (notice,) = maildir_messages(node.data_dir, "alice@example.test")
            assert b"From: MAILER-DAEMON@mx1.example.test" in notice
            assert b"d=example.test;\r\n\ts=k2026;" in notice.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
            assert dkim.verify(notice.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"), dnsfunc=dns_txt(dns_server))
            # From outside relay_networks, unauthenticated, claiming our domain: not signed.
            with smtplib.SMTP(node.host, node.port, source_address=("127.0.0.2", 0), timeout=10) as c:
                c.sendmail("x@remote.example", ["alice@example.test"], MESSAGE.replace(b"bob@remote.example", b"alice@example.test"))
            wait_for(lambda: len(maildir_messages(node.data_dir, "alice@example.test")) == 2, what="the outside mail")
            outside = [m for m in maildir_messages(node.data_dir, "alice@example.test") if b"MAILER-DAEMON" not in m]
            assert len(outside) == 1 and b"DKIM-Signature" not in outside[0]
            # From a relay network, From: another domain: not ours to sign.
            with smtplib.SMTP(node.host, node.port, source_address=("127.0.0.1", 0), timeout=10) as c:
                c.sendmail("a@other.example", ["bob@remote.example"], MESSAGE.replace(b"alice@example.test", b"a@other.example"))
            tx2 = sink.wait_for_messages(2)[1]
            assert b"DKIM-Signature" not in tx2.data


def test_submission_without_date_and_message_id_gets_both_and_they_are_signed(tmp_path, dns_server):
    # Added before the signature is made: covered by it (h= names them), and it verifies.
    key, zone = keygen(tmp_path)
    dns_server.set_records(zone=zone + "\n")
    submission = free_port()
    with SmtpSink("127.0.0.9") as sink:
        text = NODE.format(data_dir=tmp_path / "data", port=free_port(), sink=sink.port, dns=dns_server.address,
                           key=key, algorithm="rsa-sha256", next_key=tmp_path / "next.key")
        cfg = parse_config(text + f'[submission]\nlisten = ["127.0.0.1:{submission}"]\n')
        Users(cfg).set_password("alice@example.test", "correct horse")
        with RunningNode(cfg) as node:
            with smtplib.SMTP(node.host, submission, timeout=10) as c:
                c.starttls(context=ssl._create_unverified_context())
                c.login("alice@example.test", "correct horse")
                c.sendmail("alice@example.test", ["bob@remote.example"],
                           b"From: Alice <alice@example.test>\r\nTo: bob@remote.example\r\nSubject: bare\r\n\r\nHi.\r\n")
            (tx,) = sink.wait_for_messages(1)
    header = tx.data.split(b"\r\n\r\n", 1)[0].replace(b"\r\n\t", b" ")
    fields = header.split(b"\r\n")
    assert [f.split(b":")[0] for f in fields[:4]] == [b"DKIM-Signature", b"Received", b"Date", b"Message-ID"]
    assert re.fullmatch(rb"Message-ID: <\d+\.[0-9a-f]{16}@mx1\.example\.test>", fields[3])
    assert email.utils.parsedate_to_datetime(fields[2][6:].decode()).tzinfo is not None  # RFC 5322 date-time
    signed = re.search(rb"h=([^;]*);", fields[0].replace(b" ", b"")).group(1).split(b":")
    assert b"date" in signed and b"message-id" in signed
    assert dkim.verify(tx.data, dnsfunc=dns_txt(dns_server))


def test_a_key_that_does_not_load_stops_the_start(tmp_path):
    cfg = config_for(tmp_path, tmp_path / "missing.key")
    node = RunningNode(cfg)
    with pytest.raises(Exception, match=r"dkim\[0\] \(k2026._domainkey.example.test\).*cannot read"):
        node.start()
    node.stop()


# -- dns check and dkim status ---------------------------------------------------------------


def test_dns_check_and_status_compare_the_published_record_with_the_key_in_use(tmp_path, dns_server):
    key, zone = keygen(tmp_path)
    next_key, next_zone = keygen(tmp_path, "k2027")
    cfg = tmp_path / "kanmon.toml"
    cfg.write_text(NODE.format(data_dir=tmp_path / "data", port=free_port(), sink=1, dns=dns_server.address, key=key,
                               algorithm="rsa-sha256", next_key=next_key))
    dns_server.set_records(zone=zone + "\n")
    runner = CliRunner()
    check = runner.invoke(main, ["dns", "check", "example.test", "-c", str(cfg), "--json"])
    report = json.loads(check.output)
    dkim_findings = [f for f in report["findings"] if f["check"] == "dkim"]
    assert [(f["severity"], f["subject"]) for f in dkim_findings] == [
        ("ok", "k2026._domainkey.example.test"), ("warning", "k2027._domainkey.example.test")]
    assert dkim_findings[0]["seen"] == "selector k2026 (signing): DKIM rsa key published and matches ours"
    assert "not signing yet" in dkim_findings[1]["seen"] and "publish this record" in dkim_findings[1]["consequence"]

    status = runner.invoke(main, ["dkim", "status", "-c", str(cfg)])
    assert status.exit_code == 1, status.output  # the next key is not published yet
    assert "k2026._domainkey.example.test  rsa-sha256  SIGNING" in status.output
    assert "k2027._domainkey.example.test  rsa-sha256  not signing (active = false)" in status.output

    # The new key published: all good.
    dns_server.set_records(zone=zone + "\n" + next_zone + "\n")
    status = runner.invoke(main, ["dkim", "status", "-c", str(cfg), "--json"])
    assert status.exit_code == 0, status.output
    rows = json.loads(status.output)
    assert [(r["selector"], r["signing"], r["dns"], r["severity"]) for r in rows] == [
        ("k2026", True, "ok", "ok"), ("k2027", False, "ok", "ok")]

    # The signing selector's record holds another key: an error in both.
    dns_server.set_records(zone=next_zone.replace("k2027", "k2026") + "\n" + next_zone + "\n")
    check = runner.invoke(main, ["dns", "check", "example.test", "-c", str(cfg)])
    assert check.exit_code == 2
    assert "ERROR dkim     k2026._domainkey.example.test: selector k2026 (signing): the rsa key in DNS is not our DKIM key" in check.output
    status = runner.invoke(main, ["dkim", "status", "-c", str(cfg)])
    assert status.exit_code == 2 and "error: the rsa key in DNS is not our DKIM key" in status.output
