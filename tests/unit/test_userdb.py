"""The users file: strict decoding, atomic private writes, the cheap change-following
reader, and how the file combines with the config's mailboxes and aliases."""

from __future__ import annotations

import asyncio
import os
import stat
import threading
from pathlib import Path

import pytest

from kanmon import userdb
from kanmon.config import parse_config
from kanmon.policy.access import LocalRecipientsCheck, RelayAccess
from kanmon.policy.pipeline import Context, Outcome
from kanmon.model import ClientInfo
from kanmon.smtp.address import Path as SmtpPath
from kanmon.store.users import Users

CONFIG = """
[server]
data_dir = "{d}"
[[domain]]
name = "example.test"
mailboxes = ["alice"]
aliases = {{ sales = ["alice"] }}
[[domain]]
name = "relay.test"
deliver = "relay"
servers = ["127.0.0.1:25"]
"""


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def cfg(tmp_path: Path):
    return parse_config(CONFIG.format(d=tmp_path / "data"))


def rcpt(check: LocalRecipientsCheck, address: str):
    local, _, domain = address.rpartition("@")
    return check.rcpt(Context(ClientInfo(ip="192.0.2.1"), rcpt=SmtpPath(address, local, domain)))


def test_round_trip_and_private_atomic_write(tmp_path: Path) -> None:
    data = userdb.UserData({"bob@example.test": None}, {"info@example.test": ("bob@example.test",)})
    path = tmp_path / "users.json"
    userdb.write(path, data)
    assert userdb.read(path) == data
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["users.json"]  # no temp file left


@pytest.mark.parametrize("raw", [
    b"", b"[]", b"{}", b'{"format": "kanmon-users 2", "mailboxes": {}, "aliases": {}}',
    b'{"format": "kanmon-users 1", "mailboxes": {}, "aliases": {}, "extra": 1}',
    b'{"format": "kanmon-users 1", "mailboxes": {"Bob@example.test": {"password": null}}, "aliases": {}}',
    b'{"format": "kanmon-users 1", "mailboxes": {"bob@example.test": {"password": "plain"}}, "aliases": {}}',
    b'{"format": "kanmon-users 1", "mailboxes": {"bob@example.test": {}}, "aliases": {}}',
    b'{"format": "kanmon-users 1", "mailboxes": {"bob": {"password": null}}, "aliases": {}}',
    b'{"format": "kanmon-users 1", "mailboxes": {}, "aliases": {"a@example.test": []}}',
    b'{"format": "kanmon-users 1", "mailboxes": {}, "aliases": {"a@example.test": "b@example.test"}}',
    b'{"format": "kanmon-users 1", "mailboxes": {"a@example.test": {"password": null}},'
    b' "aliases": {"a@example.test": ["b@example.test"]}}',
    b"\xff\xfe",
])
def test_the_decoder_is_strict(raw: bytes) -> None:
    with pytest.raises(userdb.UserFileError):
        userdb.decode(raw)


def test_reader_stats_at_most_once_a_second_and_keeps_the_old_content_of_a_damaged_file(tmp_path: Path) -> None:
    path = tmp_path / "users.json"
    clock, errors = Clock(), []
    reader = userdb.UserFile(path, clock=clock, on_error=errors.append)
    assert reader.current() == userdb.EMPTY
    good = userdb.UserData({"bob@example.test": None}, {})
    userdb.write(path, good)
    assert reader.current() == userdb.EMPTY  # not looked at again within the second
    clock.t += 1.0
    assert reader.current() == good
    path.write_bytes(b'{"format": "kanmon-users 1", "mailboxes": {"BROKEN": 1}}')
    clock.t += 1.0
    assert reader.current() == good
    assert len(errors) == 1 and "refused, the previous users stay" in errors[0]
    clock.t += 1.0
    assert reader.current() == good and len(errors) == 1  # reported once per change
    path.unlink()
    clock.t += 1.0
    assert reader.current() == userdb.EMPTY


def test_a_running_check_sees_users_added_by_another_process_without_a_reload(cfg, tmp_path: Path) -> None:
    clock = Clock()
    directory = userdb.Directory(cfg, userdb.UserFile(userdb.users_path(cfg), clock=clock))
    check = LocalRecipientsCheck(RelayAccess(cfg, directory))
    assert rcpt(check, "carol@example.test").outcome is not Outcome.ACCEPT
    admin = Users(cfg)  # the command line: its own objects
    admin.add("carol@example.test", "pw-carol")
    admin.set_alias("team@example.test", ["carol@example.test", "alice@example.test"])
    clock.t += 1.0
    assert rcpt(check, "carol@example.test").recipients == ("carol@example.test",)
    assert rcpt(check, "team@example.test").recipients == ("carol@example.test", "alice@example.test")
    assert rcpt(check, "sales@example.test").recipients == ("alice@example.test",)  # the config's
    assert RelayAccess(cfg, directory).sender_addresses("carol@example.test") == {
        "carol@example.test", "team@example.test"}
    admin.delete("carol@example.test")
    clock.t += 1.0
    assert rcpt(check, "carol@example.test").outcome is not Outcome.ACCEPT


def test_passwords_of_file_mailboxes_live_in_the_file(cfg) -> None:
    users = Users(cfg)
    users.add("carol@example.test", "first")
    raw = userdb.users_path(cfg).read_bytes()
    assert b"$argon2id$" in raw and b"first" not in raw
    assert users.verify("carol@example.test", "first")
    users.set_password("carol@example.test", "second")
    assert not users.verify("carol@example.test", "first")
    assert users.verify("carol@example.test", "second")
    users.lock("carol@example.test")
    assert not users.verify("carol@example.test", "second")
    # a config mailbox keeps its password in the records database, as before
    users.set_password("alice@example.test", "pw")
    assert users.verify("alice@example.test", "pw")
    assert b"alice" not in userdb.users_path(cfg).read_bytes()
    assert [i.address for i in users.list()] == ["alice@example.test", "carol@example.test"]


def test_the_config_wins_and_foreign_domains_are_refused(cfg) -> None:
    users = Users(cfg)
    for bad in ("alice@example.test", "sales@example.test", "x@relay.test", "x@other.test", "not-an-address"):
        with pytest.raises(ValueError):
            users.add(bad, "pw")
    with pytest.raises(ValueError):
        users.set_alias("sales@example.test", ["x@example.test"])
    with pytest.raises(ValueError, match="declared in the config"):
        users.delete("alice@example.test")


def test_a_damaged_file_is_never_overwritten(cfg) -> None:
    path = userdb.users_path(cfg)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"garbage")
    with pytest.raises(userdb.UserFileError):
        Users(cfg).add("carol@example.test", "pw")
    assert path.read_bytes() == b"garbage"
    assert not os.path.exists(str(path) + ".tmp")


def test_mail_kanmon_queues_itself_is_expanded_as_rcpt_would_expand_it(cfg) -> None:
    """Directory.expand (the injector's): a mailbox in its lower-case spelling, an alias to
    its targets, everything else as it is (an unknown local part is local delivery's to
    refuse; a relay domain and foreign domains are not expanded)."""
    directory = userdb.Directory(cfg)
    assert directory.expand("Alice@EXAMPLE.test") == ("alice@example.test",)
    assert directory.expand("SALES@example.test") == ("alice@example.test",)
    assert directory.expand("ghost@example.test") == ("ghost@example.test",)
    assert directory.expand("sales@relay.test") == ("sales@relay.test",)
    assert directory.expand("Someone@Elsewhere.example") == ("Someone@Elsewhere.example",)
    assert directory.expand("no-at-sign") == ("no-at-sign",)
    assert directory.is_mailbox("alice@example.test") and not directory.is_mailbox("sales@example.test")


def test_delivery_reads_the_file_again_before_it_calls_a_recipient_unknown(cfg) -> None:
    """Directory.deliverable (local delivery's): a mailbox added a moment ago (a receiver
    may have accepted mail for it already) is found by reading the file now, not bounced
    until the next once-a-second look; while the file is refused, nothing can be told
    (None: deferred, never bounced)."""
    clock = Clock()
    directory = userdb.Directory(cfg, userdb.UserFile(userdb.users_path(cfg), clock=clock, on_error=lambda _m: None))
    assert directory.deliverable("alice@example.test") is True  # the config's
    assert directory.deliverable("carol@example.test") is False
    Users(cfg).add("carol@example.test", "pw-carol")  # no clock step: the cached look is still current
    assert not directory.is_mailbox("carol@example.test")
    assert directory.deliverable("carol@example.test") is True
    userdb.users_path(cfg).write_bytes(b"garbage")
    assert directory.deliverable("dave@example.test") is None
    assert directory.deliverable("carol@example.test") is True  # the last good file's mailboxes stay
    assert directory.deliverable("alice@example.test") is True


def test_delivery_reads_the_users_file_off_the_event_loop(cfg, monkeypatch) -> None:
    """Directory.wait_deliverable (what local delivery awaits): the same answers as
    deliverable, and the look at the file for a recipient not known yet (a stat, a read)
    is made in a worker thread, not on the event loop's."""
    clock = Clock()
    directory = userdb.Directory(cfg, userdb.UserFile(userdb.users_path(cfg), clock=clock, on_error=lambda _m: None))
    Users(cfg).add("carol@example.test", "pw-carol")
    directory.tables()  # the cached look: carol's addition is seen by it
    Users(cfg).add("dave@example.test", "pw-dave")  # no clock step: not seen until the file is read again
    reads: list[threading.Thread] = []
    read = userdb.read
    monkeypatch.setattr(userdb, "read", lambda path: (reads.append(threading.current_thread()), read(path))[1])

    async def ask() -> tuple[list[bool | None], threading.Thread]:
        answers = [await directory.wait_deliverable(a) for a in
                   ("alice@example.test", "carol@example.test", "dave@example.test", "ghost@example.test")]
        return answers, threading.current_thread()

    answers, loop_thread = asyncio.run(ask())
    assert answers == [True, True, True, False]
    assert reads and loop_thread not in reads
    userdb.users_path(cfg).write_bytes(b"garbage")
    assert asyncio.run(directory.wait_deliverable("erin@example.test")) is None  # refused: cannot tell


def test_an_unknown_local_address_is_one_no_mailbox_or_alias_leads_to(cfg) -> None:
    directory = userdb.Directory(cfg)
    assert directory.is_unknown_local("ghost@example.test")
    assert not directory.is_unknown_local("Alice@example.test") and not directory.is_unknown_local("sales@example.test")
    assert not directory.is_unknown_local("anyone@relay.test") and not directory.is_unknown_local("x@elsewhere.example")
