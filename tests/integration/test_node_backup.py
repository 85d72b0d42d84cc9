"""`kanmon backup` while the node runs, `kanmon restore` onto a fresh machine (no config,
no TLS files, no data_dir): the node serves the same mailboxes (POP3 and IMAP logins with
the old password, the old mail), keys and queue. A second restore changes nothing; a
file that differs is refused without --force; --only restores one part.
"""

from __future__ import annotations

import imaplib
import json
import os
import poplib
import shutil
import smtplib
import ssl
import time
from pathlib import Path

import pytest
import trustme
from click.testing import CliRunner

from kanmon.admin import lastdigest, maintenance
from kanmon.alerts import STATE_FILE, AlertState, decode_state, encode_state
from kanmon.cli import main
from kanmon.config import load_config
from kanmon.admin.nodebackup import NodeBackupError, verify_node_archive
from kanmon.store.maildir import Folder, Mailbox, unique_name
from tests.support.kanmon_node import RunningNode, free_port, maildir_messages, wait_for

NODE = """
[server]
hostname = "mx1.example.test"
data_dir = "{data_dir}"
[smtp]
listen = ["127.0.0.1:{smtp}"]
relay_networks = ["127.0.0.0/8"]
min_free_disk = "1MB"
[tls]
cert = "{tls_dir}/cert.pem"
key = "{tls_dir}/key.pem"
[[domain]]
name = "example.test"
mailboxes = ["alice", "bob"]
[[domain]]
name = "dest.example"
deliver = "relay"
servers = ["127.0.0.1:9"]
tls = "none"
[pop3]
listen = ["127.0.0.1:{pop3}"]
[imap]
listen = ["127.0.0.1:{imap}"]
"""


@pytest.fixture
def site(tmp_path: Path):
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost", "mx1.example.test")
    tls_dir = tmp_path / "etc-tls"
    tls_dir.mkdir()
    cert.cert_chain_pems[0].write_to_path(str(tls_dir / "cert.pem"))
    cert.private_key_pem.write_to_path(str(tls_dir / "key.pem"))
    config_file = tmp_path / "etc" / "kanmon.toml"
    config_file.parent.mkdir()
    config_file.write_text(NODE.format(data_dir=tmp_path / "data", smtp=free_port(), pop3=free_port(),
                                       imap=free_port(), tls_dir=tls_dir))
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    return config_file, tls_dir, tmp_path / "data", client_ctx


def cli(*args: str, input: str | None = None):
    return CliRunner().invoke(main, list(args), input=input)


def pop3_login(cfg, ctx, password: str) -> int:
    host, port = cfg.pop3.listen[0]
    p = poplib.POP3(host, port, timeout=10)
    try:
        p.stls(ctx)
        p.user("alice@example.test")
        p.pass_(password)
        return p.stat()[0]
    finally:
        p.quit()


def imap_login(cfg, ctx, password: str) -> int:
    host, port = cfg.imap.listen[0]
    with imaplib.IMAP4(host, port, timeout=10) as m:
        m.starttls(ctx)
        m.login("alice@example.test", password)
        typ, data = m.select("INBOX", readonly=True)
        assert typ == "OK"
        return int(data[0])


def test_backup_while_running_then_restore_on_a_fresh_machine(site, tmp_path: Path) -> None:
    config_file, tls_dir, data_dir, ctx = site
    c = str(config_file)
    (data_dir / "dkim").mkdir(parents=True, exist_ok=True)
    (data_dir / "dkim" / "example.test.key").write_text("-----BEGIN PRIVATE KEY-----\nkey\n-----END PRIVATE KEY-----\n")
    # An alert mailed a minute ago: after a restore it must not be mailed again at once.
    now = time.time()
    raised = AlertState("queue", "test-backlog", "the queue is long", since=now - 60, last_sent=now - 60,
                        last_seen=now)
    (data_dir / STATE_FILE).write_bytes(encode_state({("queue", "test-backlog"): raised}, {}))
    # The run logs: the last digest's time (its next one lists from there), the jobs' last runs.
    lastdigest.save(data_dir, now - 3600, fsync=False)
    (data_dir / maintenance.FILE).write_bytes(maintenance.encode({}, {"nightly": now - 7200}))
    (data_dir / "users.json.lock").write_bytes(b"")  # kanmon user's lock file: not data, not archived
    archive, result = _backed_up_node(site, tmp_path, "old secret")
    assert not [n for n in verify_node_archive(archive).members if n.endswith(".lock")]
    assert result["parts"]["dkim"] == 1 and result["parts"]["tls"] == 2
    assert result["parts"]["alerts"] == 2  # the alert events and the alert state
    # An existing file is not replaced without --force.
    r = cli("backup", str(archive), "-c", c)
    assert r.exit_code == 1 and "--force" in r.output
    verify_node_archive(archive)

    # New hardware: nothing of the old node is left.
    shutil.rmtree(data_dir)
    shutil.rmtree(tls_dir)
    config_file.unlink()
    r = cli("restore", str(archive), "-c", c)
    assert r.exit_code == 0, r.output
    assert config_file.exists() and (tls_dir / "key.pem").exists()
    assert (data_dir / "dkim" / "example.test.key").read_text().startswith("-----BEGIN PRIVATE KEY-----")
    states, _failover = decode_state((data_dir / STATE_FILE).read_bytes())
    assert states[("queue", "test-backlog")].last_sent == pytest.approx(now - 60)
    assert lastdigest.load(data_dir) == (pytest.approx(now - 3600), "")
    assert maintenance.decode((data_dir / maintenance.FILE).read_bytes())[1] == {"nightly": pytest.approx(now - 7200)}
    assert oct((data_dir / lastdigest.FILE).stat().st_mode & 0o777) == "0o600"
    # Idempotent: a second run restores nothing and duplicates nothing.
    r = cli("restore", str(archive), "-c", c, "--json")
    assert r.exit_code == 0, r.output
    second = json.loads(r.output)
    assert all(p["restored"] == 0 for p in second["parts"].values()), second

    cfg = load_config(config_file)
    with RunningNode(cfg):
        assert pop3_login(cfg, ctx, "old secret") == 1
        assert imap_login(cfg, ctx, "old secret") == 1
        r = cli("queue", "list", "--json", "-c", c)
        assert r.exit_code == 0, r.output
        assert [i["rcpts"] for i in json.loads(r.output)["items"]] == [["someone@dest.example"]]


def _two_queued(cfg, c: str) -> dict[str, str]:
    """Two messages queued for dest.example (its server down) on the running node: recipient -> queue id."""
    with smtplib.SMTP(*cfg.smtp.listen[0], timeout=10) as s:
        for rcpt in ("one@dest.example", "two@dest.example"):
            s.sendmail("a@remote.example", [rcpt], f"Subject: to {rcpt}\r\n\r\nwaiting\r\n")
    wait_for(lambda: len(json.loads(cli("queue", "list", "--json", "-c", c).output)["items"]) == 2, 15, "two queued")
    return {i["rcpts"][0]: i["id"] for i in json.loads(cli("queue", "list", "--json", "-c", c).output)["items"]}


def test_a_held_message_stays_held_after_a_node_restore(site, tmp_path: Path) -> None:
    """The node carries on where it stopped: what the admin held there is not delivered."""
    config_file, _tls_dir, _data_dir, _ctx = site
    c = str(config_file)
    cfg = load_config(config_file)
    archive = tmp_path / "node.tar"
    with RunningNode(cfg):
        held = _two_queued(cfg, c)["two@dest.example"]  # say, the suspicious one
        assert cli("queue", "hold", held, "-c", c).exit_code == 0
        r = cli("backup", str(archive), "-c", c, "--only", "queue")
        assert r.exit_code == 0, r.output
    assert cli("queue", "delete", "--state", "all", "--yes", "-c", c).exit_code == 0  # the queue lost
    r = cli("restore", str(archive), "-c", c, "--only", "queue", "--json")
    assert r.exit_code == 0, r.output
    states = {i["id"]: i["state"] for i in json.loads(cli("queue", "list", "--json", "-c", c).output)["items"]}
    assert states[held] == "hold" and sorted(states.values()) == ["deferred", "hold"]
    assert json.loads(r.output)["queue"] == {"restored": 2, "skipped": 0, "held": 1}


def test_a_damaged_queue_file_does_not_stop_a_node_backup(site, tmp_path: Path) -> None:
    """Stopped, as running: the damaged file is set aside (spool/corrupt/) and the rest is in."""
    config_file, _tls_dir, data_dir, _ctx = site
    c = str(config_file)
    cfg = load_config(config_file)
    with RunningNode(cfg):
        damaged = _two_queued(cfg, c)["two@dest.example"]
    path = data_dir / "spool" / "queue" / damaged
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x20
    path.write_bytes(bytes(data))
    archive = tmp_path / "node.tar"
    r = cli("backup", str(archive), "-c", c, "--only", "queue")
    assert r.exit_code == 0, r.output
    assert "1 queued message(s), 1 damaged queue file(s) left out (in spool/corrupt/)" in r.output
    assert (data_dir / "spool" / "corrupt" / damaged).exists()
    r = cli("backup", str(tmp_path / "again.tar"), "-c", c, "--only", "queue", "--json")
    assert json.loads(r.output)["queue_corrupt"] == 1 and json.loads(r.output)["queue"] == 1


def test_restore_refuses_to_overwrite_without_force_and_only(site, tmp_path: Path) -> None:
    config_file, _tls_dir, data_dir, _ctx = site
    c = str(config_file)
    (data_dir / "dkim").mkdir(parents=True)
    key = data_dir / "dkim" / "k.key"
    key.write_text("one\n")
    archive = tmp_path / "node.tar"
    r = cli("backup", str(archive), "-c", c, "--only", "dkim,config")
    assert r.exit_code == 0, r.output
    key.write_text("two\n")
    r = cli("restore", str(archive), "-c", c)
    assert r.exit_code == 1 and "--force" in r.output and "k.key" in r.output
    assert key.read_text() == "two\n"
    r = cli("restore", str(archive), "-c", c, "--force", "--only", "dkim")
    assert r.exit_code == 0, r.output
    assert key.read_text() == "one\n"
    assert cli("restore", str(archive), "-c", c, "--only", "nope").exit_code == 2


def test_a_node_keeps_its_own_run_logs_when_restored_onto(site, tmp_path: Path) -> None:
    """The run logs in an archive are restored where the node has none; a node that has
    its own (it ran since) keeps them, and that is no conflict to force."""
    config_file, _tls_dir, data_dir, _ctx = site
    c = str(config_file)
    data_dir.mkdir(mode=0o700)
    lastdigest.save(data_dir, 1_000_000.0, fsync=False)
    archive = tmp_path / "node.tar"
    assert cli("backup", str(archive), "-c", c, "--only", "queue").exit_code == 0
    lastdigest.save(data_dir, 2_000_000.0, fsync=False)
    r = cli("restore", str(archive), "-c", c, "--only", "queue")
    assert r.exit_code == 0, r.output
    assert lastdigest.load(data_dir) == (2_000_000.0, "")


def test_a_damaged_archive_is_refused_before_anything_is_written(site, tmp_path: Path) -> None:
    config_file, _tls_dir, data_dir, _ctx = site
    (data_dir / "dkim").mkdir(parents=True)
    (data_dir / "dkim" / "k.key").write_text("x" * 5000)
    archive = tmp_path / "node.tar"
    assert cli("backup", str(archive), "-c", str(config_file), "--only", "dkim").exit_code == 0
    data = bytearray(archive.read_bytes())
    at = data.index(b"x" * 100)
    data[at] = ord("y")
    archive.write_bytes(bytes(data))
    with pytest.raises(NodeBackupError, match="checksum"):
        verify_node_archive(archive)
    shutil.rmtree(data_dir / "dkim")
    r = cli("restore", str(archive), "-c", str(config_file))
    assert r.exit_code == 1 and "checksum" in r.output
    assert not (data_dir / "dkim").exists()


def test_a_restored_maildir_is_whole_and_shows_its_read_mail(site, tmp_path: Path) -> None:
    """The archive holds files only, so a Maildir's empty cur/, new/ or tmp/ is not in it:
    the restore makes every folder whole again. A message that was read (in cur/ only, as
    an IMAP client leaves it) is counted and readable, and an empty folder still exists."""
    config_file, _tls_dir, data_dir, _ctx = site
    c = str(config_file)
    box = Mailbox.for_address(data_dir, "example.test", "alice").ensure()  # with the empty special-use folders
    box.folder("INBOX").append(b"Subject: read\r\n\r\nold mail\r\n", flags=["\\Seen"])
    root = box.root
    assert not any((root / "new").iterdir()) and len(box.folder_names()) == 5
    folders = box.folder_names()
    # bob's mail was delivered and not read yet: in new/ only.
    bob = Mailbox.for_address(data_dir, "example.test", "bob").ensure(special_use=False).root
    (bob / "new" / unique_name(9, 11)).write_bytes(b"\nnew mail\n")
    archive = tmp_path / "node.tar"
    r = cli("backup", str(archive), "-c", c, "--only", "mailboxes")
    assert r.exit_code == 0, r.output
    shutil.rmtree(data_dir)
    r = cli("restore", str(archive), "-c", c, "--only", "mailboxes")
    assert r.exit_code == 0, r.output
    assert Mailbox(root).folder_names() == folders
    for name in folders:
        path = root if name == "INBOX" else root / f".{name}"
        for sub in ("cur", "new", "tmp"):
            assert (path / sub).is_dir(), path / sub
            assert oct((path / sub).stat().st_mode & 0o777) == "0o700"
    r = cli("user", "list", "--json", "-c", c)
    assert r.exit_code == 0, r.output
    counts = {u["mailbox"]: u["messages"] for u in json.loads(r.output)}
    assert counts == {"alice@example.test": 1, "bob@example.test": 1}
    inbox = Folder(root, "INBOX")  # not the cached one of the tree removed above
    [msg] = inbox.sync()
    assert inbox.read(msg) == b"Subject: read\n\nold mail\n"


def _backed_up_node(site, tmp_path: Path, password: str = "secret") -> tuple[Path, dict]:
    """A node with alice's password, a delivered and a queued message, backed up while it
    runs: the archive and what `kanmon backup --json` said."""
    config_file, _tls_dir, data_dir, _ctx = site
    c = str(config_file)
    assert cli("user", "passwd", "alice@example.test", "--stdin", "-c", c, input=f"{password}\n").exit_code == 0
    cfg = load_config(config_file)
    archive = tmp_path / "node.tar"
    with RunningNode(cfg):
        with smtplib.SMTP(*cfg.smtp.listen[0], timeout=10) as s:
            s.sendmail("a@remote.example", ["alice@example.test"], "Subject: kept\r\n\r\nold mail\r\n")
            s.sendmail("a@remote.example", ["someone@dest.example"], "Subject: queued\r\n\r\nwaiting\r\n")
        wait_for(lambda: len(maildir_messages(data_dir, "alice@example.test")) == 1, 15, "delivery")
        r = cli("backup", str(archive), "-c", c, "--json")
        assert r.exit_code == 0, r.output
        result = json.loads(r.output)
        assert result["queue"] == 1
    return archive, result


def test_a_restore_writes_private_modes_whatever_the_umask(site, tmp_path: Path) -> None:
    """Run as root with umask 022 (or a node's new data_dir), a restore still leaves
    every directory it makes under data_dir 0700 and every file 0600: SQLite's own files
    (records.sqlite holds the password hashes) and the mailboxes/<domain> parents too."""
    config_file, _tls_dir, data_dir, _ctx = site
    c = str(config_file)
    archive, _result = _backed_up_node(site, tmp_path)
    shutil.rmtree(data_dir)
    old = os.umask(0o022)
    try:
        r = cli("restore", str(archive), "-c", c)
        assert os.umask(0o022) == 0o022  # the caller's umask is given back
    finally:
        os.umask(old)
    assert r.exit_code == 0, r.output
    assert (data_dir / "records.sqlite").exists() and (data_dir / "mailboxes" / "example.test").is_dir()
    loose = []
    for root, dirs, files in os.walk(data_dir):
        for name, want in [*((d, 0o700) for d in dirs), *((f, 0o600) for f in files)]:
            path = Path(root) / name
            if path.stat().st_mode & 0o777 != want:
                loose.append(f"{path.relative_to(data_dir)} {oct(path.stat().st_mode & 0o777)}")
    assert oct(data_dir.stat().st_mode & 0o777) == "0o700"
    assert loose == [], loose


def test_an_existing_config_is_kept_and_decides_where_every_part_goes(site, tmp_path: Path) -> None:
    """A new machine with its own config (another data_dir, other TLS paths): the restore
    puts every part where that config says, the queue too, and keeps the file, even with
    --force (the archive's config over it would split the node over two data_dirs)."""
    config_file, _tls_dir, data_dir, _ctx = site
    archive, _result = _backed_up_node(site, tmp_path)
    shutil.rmtree(data_dir)  # the old machine is gone
    new_data, new_tls = tmp_path / "new-data", tmp_path / "new-tls"
    new_config = tmp_path / "new-etc" / "kanmon.toml"
    new_config.parent.mkdir()
    new_config.write_text(NODE.format(data_dir=new_data, smtp=free_port(), pop3=free_port(), imap=free_port(),
                                      tls_dir=new_tls))
    text = new_config.read_bytes()
    n = str(new_config)
    for force in ((), ("--force",)):  # no conflict to force: the kept config is not compared
        r = cli("restore", str(archive), "-c", n, *force)
        assert r.exit_code == 0, r.output
        assert f"config: kept {n} (its paths are used); the archive's is not restored" in r.output
        assert new_config.read_bytes() == text
    assert not data_dir.exists()  # nothing went to the archive's data_dir
    assert (new_tls / "cert.pem").exists() and (new_tls / "key.pem").exists()
    assert len(maildir_messages(new_data, "alice@example.test")) == 1
    r = cli("restore", str(archive), "-c", n, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["config_kept"] == n
    new_cfg = load_config(new_config)
    with RunningNode(new_cfg):
        r = cli("queue", "list", "--json", "-c", n)
        assert r.exit_code == 0, r.output
        assert [i["rcpts"] for i in json.loads(r.output)["items"]] == [["someone@dest.example"]]


def test_some_parts_onto_a_node_without_config_need_the_config_part(site, tmp_path: Path) -> None:
    """No config file and --only without config: refused before anything is written (the
    parts would land where no config of this node points; the queue needs the config).
    With the config part among them, they go where the archive's config says."""
    config_file, tls_dir, data_dir, _ctx = site
    archive, _result = _backed_up_node(site, tmp_path)
    shutil.rmtree(data_dir)
    config_file.unlink()
    shutil.rmtree(tls_dir)
    before = sorted(tmp_path.rglob("*"))
    for only in ("users", "queue", "dkim"):
        r = cli("restore", str(archive), "-c", str(config_file), "--only", only)
        assert r.exit_code == 1, r.output
        assert (f"{config_file} does not exist and the config is not among the parts restored" in r.stderr
                and f"--only config,{only}" in r.stderr), r.stderr
        assert sorted(tmp_path.rglob("*")) == before
    # the config and queue without the tls part: the config (its certificate is missing
    # here) is found invalid before anything is written, not after
    r = cli("restore", str(archive), "-c", str(config_file), "--only", "config,queue")
    assert r.exit_code == 1 and "the config restored onto is not valid" in r.stderr and "cert" in r.stderr, r.output
    assert sorted(tmp_path.rglob("*")) == before
    r = cli("restore", str(archive), "-c", str(config_file), "--only", "config,users")
    assert r.exit_code == 0, r.output
    assert config_file.exists() and (data_dir / "records.sqlite").exists()
    r = cli("restore", str(archive), "-c", str(config_file), "--only", "tls,queue", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["queue"]["restored"] == 1


def test_a_kept_config_without_tls_is_told_the_archives_certificate_is_not_restored(site, tmp_path: Path) -> None:
    """The kept config decides the TLS paths: one without [tls] has none, so the archive's
    certificate and key are not restored; the restore says so, and how to get them."""
    archive, _result = _backed_up_node(site, tmp_path)
    plain = tmp_path / "plain-etc" / "kanmon.toml"
    plain.parent.mkdir()
    plain.write_text(f'[server]\nhostname = "mx2.example.test"\ndata_dir = "{tmp_path / "plain-data"}"\n')
    r = cli("restore", str(archive), "-c", str(plain), "--only", "tls")
    assert r.exit_code == 0, r.output
    assert (f"tls: the archive's tls/cert and tls/key not restored: {plain} has no [tls] section" in r.stderr
            and f"tar xOf {archive} tls/cert > cert.pem" in r.stderr), r.stderr
    r = cli("restore", str(archive), "-c", str(plain), "--only", "tls", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["tls_not_restored"] == ["tls/cert", "tls/key"]
