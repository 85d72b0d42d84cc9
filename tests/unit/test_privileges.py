"""The checks around the switch to the service user that run without switching."""

from __future__ import annotations

import os
import pwd

import pytest

from kanmon.privileges import PrivilegeError, drop_privileges, lookup, prepare_data_dir


def test_unknown_user_and_group_are_named() -> None:
    with pytest.raises(PrivilegeError, match="no user 'no-such-kanmon-user'"):
        lookup("no-such-kanmon-user", None)
    with pytest.raises(PrivilegeError, match="no group 'no-such-kanmon-group'"):
        lookup("root", "no-such-kanmon-group")


def test_no_user_asked_for_changes_nothing(tmp_path) -> None:
    assert drop_privileges(None, None, tmp_path / "data") is None
    assert not (tmp_path / "data").exists()


def test_already_that_user_changes_nothing(tmp_path) -> None:
    me = pwd.getpwuid(os.geteuid()).pw_name
    if os.geteuid() == 0:
        pytest.skip("as root this would switch for real (tests/integration/test_privilege_drop.py)")
    old = os.umask(0o022)
    try:
        assert "running as" in drop_privileges(me, None, tmp_path / "data")
        assert os.umask(0o022) == 0o077
    finally:
        os.umask(old)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_prepare_data_dir_hands_over_what_root_left(tmp_path) -> None:
    nobody = pwd.getpwnam("nobody")
    data = tmp_path / "data"
    (data / "log").mkdir(parents=True)
    (data / "users.json").write_text("{}")
    (data / "log" / "kanmon.log").write_text("")
    (data / "spool" / "queue").mkdir(parents=True)
    (data / "spool" / "queue" / "deep").write_text("")
    prepare_data_dir(data, nobody.pw_uid, nobody.pw_gid)  # data_dir was root's: everything
    assert {p.stat().st_uid for p in [data, *data.rglob("*")]} == {nobody.pw_uid}
    assert data.stat().st_mode & 0o777 == 0o700
    (data / "users.json").chmod(0o600)
    os.chown(data / "users.json", 0, 0)  # `kanmon user add` run as root later
    os.chown(data / "spool" / "queue" / "deep", 0, 0)
    (data / "spool" / "recycle").mkdir()  # a folder a newer version adds, made by a command run as root
    prepare_data_dir(data, nobody.pw_uid, nobody.pw_gid)
    assert (data / "users.json").stat().st_uid == nobody.pw_uid
    assert (data / "spool" / "recycle").stat().st_uid == nobody.pw_uid
    assert (data / "spool" / "queue" / "deep").stat().st_uid == 0  # not walked when data_dir is already the user's


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_hand_over_gives_roots_files_to_the_data_dirs_owner_and_follows_no_link(tmp_path):
    from kanmon.privileges import hand_over_to_owner

    data, outside = tmp_path / "data", tmp_path / "etc"
    (data / "spool").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret").write_text("x")
    (data / "spool" / "f").write_text("x")
    (data / "link-dir").symlink_to(outside)
    (data / "link-file").symlink_to(outside / "secret")
    os.chown(data, 65534, 65534)
    hand_over_to_owner(data)
    assert os.stat(data / "spool").st_uid == 65534 and os.stat(data / "spool" / "f").st_uid == 65534
    assert os.lstat(data / "link-dir").st_uid == 65534  # the link itself
    assert os.stat(outside).st_uid == 0 and os.stat(outside / "secret").st_uid == 0  # never what it points at
