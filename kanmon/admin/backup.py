"""The queue backup archive: write, verify and read (docs/queue-backup.md).

Role: a portable file holding queued messages exactly as the spool keeps them — the
queue file (KANMON-Q1: envelope JSON and content, with its CRC-32) and the state journal
(attempt history) — plus a SHA-256 of each, in a POSIX tar archive any tar can list:

    kanmon-backup.json            {"format": "kanmon-queue-backup", "version": 1, ...}
    <queue id>/meta.json          {"id", "sha256": {"queue": .., "state": ..}, "from", "rcpts", ...}
    <queue id>/queue              the queue file, byte for byte
    <queue id>/state              the journal, byte for byte
    ... one group per message ...
    kanmon-backup-end.json        {"count": N, "ids_sha256": ..}: a truncated archive lacks it

Trusts: nothing in an archive being read: every member's size is bounded, every
checksum and the end record are verified before anything is restored, names are
checked to be queue ids (no path is ever taken from the archive), meta.json is
type-checked and each queue file goes through the spool's strict envelope decoder.
Never: write a partial archive under the final name (it is written to FILE.partial and
renamed), or restore from an archive that failed verification.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from kanmon.model import is_queue_id
from kanmon.spool import schema
from kanmon.spool.schema import SchemaError
from kanmon.spool.store import CorruptEntry, Spool

FORMAT = "kanmon-queue-backup"
VERSION = 1
HEAD = "kanmon-backup.json"
END = "kanmon-backup-end.json"
MAX_MEMBER = 1 << 31  # 2 GiB: larger than any message kanmon accepts


class BackupError(Exception):
    """The archive cannot be used: damaged, truncated, or not a kanmon backup."""


@dataclass(slots=True)
class ArchivedMessage:
    queue_id: str
    queue_bytes: bytes
    state_bytes: bytes
    meta: dict


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _add(tar: tarfile.TarFile, name: str, data: bytes, mtime: float) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = int(mtime)
    info.mode = 0o600
    tar.addfile(info, io.BytesIO(data))


class BackupWriter:
    """with BackupWriter(path, hostname, filters) as w: w.add(spool, queue_id) ..."""

    def __init__(self, path: Path, hostname: str, filters: str, now: float | None = None, origin: dict | None = None):
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.now = time.time() if now is None else now
        self.ids: list[str] = []
        fd = os.open(self.partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        self._fh = os.fdopen(fd, "wb")
        self._tar = tarfile.open(fileobj=self._fh, mode="w|", format=tarfile.PAX_FORMAT)
        head = {"format": FORMAT, "version": VERSION, "created": self.now, "hostname": hostname, "filters": filters}
        if origin:
            head["origin"] = origin  # where it was written, and what `--then` did there
        _add(self._tar, HEAD, json.dumps(head, indent=1).encode(), self.now)

    def add(self, spool: Spool, queue_id: str, summary: dict) -> bool:
        """Add one message; False if it left the queue meanwhile."""
        try:
            queue_bytes, state_bytes = spool.export_raw(queue_id)
        except FileNotFoundError:
            return False
        meta = dict(summary, id=queue_id, sha256={"queue": _sha(queue_bytes), "state": _sha(state_bytes)})
        _add(self._tar, f"{queue_id}/meta.json", json.dumps(meta, ensure_ascii=False).encode(), self.now)
        _add(self._tar, f"{queue_id}/queue", queue_bytes, self.now)
        _add(self._tar, f"{queue_id}/state", state_bytes, self.now)
        self.ids.append(queue_id)
        return True

    def finish(self) -> None:
        end = {"count": len(self.ids), "ids_sha256": _sha("\n".join(self.ids).encode())}
        _add(self._tar, END, json.dumps(end).encode(), self.now)
        self._tar.close()
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        os.replace(self.partial, self.path)
        _sync_dir(self.path.parent)

    def abort(self) -> None:
        try:
            self._tar.close()
            self._fh.close()
        finally:
            self.partial.unlink(missing_ok=True)


def read_archive(path: Path) -> Iterator[ArchivedMessage]:
    """Each message of the archive, checked; raises BackupError at the first problem.

    Messages are yielded as they are read, so a caller that must not act on a damaged
    archive calls verify_archive() first.
    """
    try:
        tar = tarfile.open(path, mode="r|*")
    except (OSError, tarfile.TarError) as e:
        raise BackupError(f"{path}: not a readable tar archive: {e}") from None
    ids: list[str] = []
    with tar:
        try:
            members = iter(tar)
            first = next(members, None)
            if first is None or first.name != HEAD:
                raise BackupError(f"{path}: not a kanmon queue backup (no {HEAD})")
            head = _json(tar, first)
            if head.get("format") != FORMAT or head.get("version") != VERSION:
                raise BackupError(f"{path}: unsupported backup format {head.get('format')!r} version {head.get('version')!r}")
            while True:
                m = next(members, None)
                if m is None:
                    raise BackupError(f"{path}: truncated after {len(ids)} message(s) (no end record)")
                if m.name == END:
                    end = _json(tar, m)
                    if end.get("count") != len(ids) or end.get("ids_sha256") != _sha("\n".join(ids).encode()):
                        raise BackupError(f"{path}: end record does not match the {len(ids)} message(s) read")
                    return
                qid, _, part = m.name.partition("/")
                if part != "meta.json" or not is_queue_id(qid):
                    raise BackupError(f"{path}: unexpected member {m.name!r}")
                meta = _json(tar, m)
                try:
                    if schema.text(meta, "id", None, 64) != qid:
                        raise SchemaError("id is not the member's queue id")
                    sums = schema.obj(meta.get("sha256"), "sha256")
                    schema.text(sums, "queue", None, 64), schema.text(sums, "state", None, 64)
                except SchemaError as e:
                    raise BackupError(f"{path}: {qid}/meta.json: {e}") from None
                blobs = {}
                for want in ("queue", "state"):
                    mm = next(members, None)
                    if mm is None or mm.name != f"{qid}/{want}":
                        raise BackupError(f"{path}: {qid}: missing {want}")
                    blobs[want] = _bytes(tar, mm)
                    if _sha(blobs[want]) != sums[want]:
                        raise BackupError(f"{path}: {qid}/{want}: SHA-256 mismatch")
                try:
                    Spool._check_bytes(blobs["queue"], qid)
                except CorruptEntry as e:
                    raise BackupError(f"{path}: {e}") from None
                ids.append(qid)
                yield ArchivedMessage(qid, blobs["queue"], blobs["state"], meta)
        except (OSError, tarfile.TarError, EOFError) as e:
            raise BackupError(f"{path}: damaged archive: {e}") from None


def _sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)  # the rename is durable too: the archive exists after a crash
    finally:
        os.close(fd)


def archive_head(path: Path) -> dict:
    """The first member (format, hostname, filters, origin); the rest is not read."""
    try:
        with tarfile.open(path, mode="r|*") as tar:
            first = next(iter(tar), None)
            if first is None or first.name != HEAD:
                raise BackupError(f"{path}: not a kanmon queue backup (no {HEAD})")
            return _json(tar, first)
    except (OSError, tarfile.TarError, EOFError) as e:
        raise BackupError(f"{path}: not a readable tar archive: {e}") from None


def archive_ids(path: Path) -> list[str]:
    """The queue ids of a whole, verified archive, in archive order."""
    return [m.queue_id for m in read_archive(path)]


def verify_archive(path: Path) -> int:
    """Read the whole archive, checking everything; the number of messages."""
    return sum(1 for _ in read_archive(path))


def _bytes(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    if not member.isfile() or member.size > MAX_MEMBER:
        raise BackupError(f"member {member.name!r} is not a regular file of a sane size")
    fh = tar.extractfile(member)
    assert fh is not None
    data = fh.read()
    if len(data) != member.size:
        raise BackupError(f"member {member.name!r} is truncated")
    return data


def _json(tar: tarfile.TarFile, member: tarfile.TarInfo) -> dict:
    try:
        value = json.loads(_bytes(tar, member))
    except ValueError:
        raise BackupError(f"member {member.name!r} is not JSON") from None
    if not isinstance(value, dict):
        raise BackupError(f"member {member.name!r} is not a JSON object")
    return value
