"""The node archive's strict member names, parts and Maildir idempotency."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from kanmon.admin.nodebackup import (END, HEAD, PARTS, NodeBackupError, _check_name, _in_maildir, parse_parts,
                                     verify_node_archive)


def test_parse_parts() -> None:
    assert parse_parts(None) == PARTS
    assert parse_parts("queue, users") == ("users", "queue")  # archive order
    with pytest.raises(ValueError, match="nope"):
        parse_parts("users,nope")


@pytest.mark.parametrize("name", ["/etc/passwd", "dkim/../../x", "other/x", "dkim", "dkim//x", "dkim/./x", "tls/a\\b"])
def test_bad_member_names(name: str) -> None:
    with pytest.raises(NodeBackupError):
        _check_name(name)


def test_good_member_names() -> None:
    for name in (HEAD, END, "dkim/example.test.key", "mailboxes/example.test/alice/cur/1.x:2,S"):
        assert _check_name(name) == name


def _tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_archive_without_end_record_or_with_extra_member(tmp_path: Path) -> None:
    head = json.dumps({"format": "kanmon-node-backup", "version": 1}).encode()
    _tar(tmp_path / "a.tar", [(HEAD, head), ("dkim/k", b"x")])
    with pytest.raises(NodeBackupError, match="truncated"):
        verify_node_archive(tmp_path / "a.tar")
    _tar(tmp_path / "b.tar", [(HEAD, head), ("dkim/k", b"x"), (END, json.dumps({"members": {}}).encode())])
    with pytest.raises(NodeBackupError, match="missing member|mismatch"):
        verify_node_archive(tmp_path / "b.tar")
    _tar(tmp_path / "c.tar", [("dkim/k", b"x")])
    with pytest.raises(NodeBackupError, match="not a kanmon node backup"):
        verify_node_archive(tmp_path / "c.tar")


def test_a_read_maildir_message_counts_as_there(tmp_path: Path) -> None:
    box = tmp_path / "alice"
    (box / "new").mkdir(parents=True)
    (box / "cur").mkdir()
    (box / "cur" / "123.abc.host:2,S").write_text("m")
    assert _in_maildir(box / "new" / "123.abc.host")
    assert not _in_maildir(box / "new" / "124.abc.host")
    assert not _in_maildir(box / "index")
