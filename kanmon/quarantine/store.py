"""The quarantine: messages a check set aside for a person to look at, kept durably.

Role: one directory, data_dir/quarantine/, two files an entry, named by the queue id the
message got at acceptance (so `kanmon trace ID` follows it from acceptance to release):
  ID.msg   the envelope and the message, in the spool's queue-file format (checksummed)
  ID.meta  what put it here: JSON {kind, reason, check, classification, score, stored}
The .msg is written and synced first, the .meta last: an entry exists once its .meta is
durable; a .msg without its .meta (a crash in between) was never acknowledged and is
removed when the store opens. `kind` is "admin" (viruses, attachments, policy: only the
administrator releases) or "spam" (the per-user spam quarantine: digests go to the
recipients).

QuarantineStore is the interface the SMTP server and the quarantine operations use; this
module's Quarantine is its one-node implementation, kanmon.state.pgquarantine the shared
one (several nodes, `[records] url`), and kanmon.state.backends.open_quarantine picks
one. A release first claims the entry for the releasing node (claim()): in the shared
store, of two nodes releasing one entry at once one wins and the other is told it is
gone; here, where one node's admin operations run one at a time, a claim only checks
that the entry is there.

Trusts: nothing it reads back: every file is checked (checksum, JSON types); an entry
that fails is reported as corrupt, never half-read.
Never: acknowledge (return from put) before both files and the directory are synced;
keep a file readable by others (0600, directory 0700).
"""

from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from kanmon.model import Envelope, flags_problem, is_queue_id
from kanmon.spool.groupcommit import fsync_dir, write_durably
from kanmon.spool.store import CorruptEntry, decode_queue_header, encode_queue_file, envelope_from_json

KINDS = ("admin", "spam")


class QuarantineError(Exception):
    """An entry that does not exist or cannot be read (str: what and why)."""


@dataclass(frozen=True)
class Meta:
    kind: str  # admin | spam
    reason: str  # what the check said ("content rule invoice-spam")
    check: str  # the check that asked ("content", "antivirus", "spf"...)
    classification: str  # Spam | Virus | Policy | Suspicious
    score: float
    stored: float  # epoch seconds

    def to_json(self) -> bytes:
        return json.dumps({"kind": self.kind, "reason": self.reason, "check": self.check,
                           "classification": self.classification, "score": self.score, "stored": self.stored},
                          ensure_ascii=False).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Meta:
        try:
            d = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise CorruptEntry(f"metadata is not JSON: {e}") from None
        if not isinstance(d, dict):
            raise CorruptEntry("metadata is not an object")
        types = {"kind": str, "reason": str, "check": str, "classification": str, "score": (int, float), "stored": (int, float)}
        for key, t in types.items():
            if not isinstance(d.get(key), t) or isinstance(d.get(key), bool):
                raise CorruptEntry(f"metadata: {key} missing or of the wrong type")
        if d["kind"] not in KINDS:
            raise CorruptEntry(f"metadata: unknown kind {d['kind']!r}")
        return cls(d["kind"], d["reason"], d["check"], d["classification"], float(d["score"]), float(d["stored"]))


@dataclass(frozen=True)
class Entry:
    id: str
    envelope: Envelope
    size: int
    meta: Meta


def decode_entry(queue_id: str, data: bytes, meta: Meta) -> tuple[Entry, bytes]:
    """An entry from its queue-file bytes (checksum and envelope checked); CorruptEntry
    when damaged."""
    elen, clen, crc, off = decode_queue_header(data[:512])
    ej = data[off:off + elen]
    content = data[off + elen + 1:]
    if data[off + elen:off + elen + 1] != b"\n" or len(content) != clen:
        raise CorruptEntry(f"{queue_id}: truncated")
    if zlib.crc32(content, zlib.crc32(ej)) != crc:
        raise CorruptEntry(f"{queue_id}: checksum mismatch")
    try:
        env = envelope_from_json(ej)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CorruptEntry(f"{queue_id}: bad envelope: {e}") from None
    # Entries come from elsewhere too (a node backup's quarantine, the shared quarantine in
    # PostgreSQL); a release sends the content on the trust of these flags.
    if (problem := flags_problem(env, content)) is not None:
        raise CorruptEntry(f"{queue_id}: {problem}")
    return Entry(queue_id, env, len(content), meta), content


def without_rcpts(env: Envelope, rcpts: list[str]) -> Envelope:
    """The envelope without these recipients (compared case-insensitively) and their DSN data."""
    drop = {r.lower() for r in rcpts}
    env.rcpts = [r for r in env.rcpts if r.lower() not in drop]
    for table in (env.original_rcpts, env.dsn_notify, env.dsn_orcpt):
        for key in [k for k in table if k.lower() in drop]:
            del table[key]
    return env


@runtime_checkable
class QuarantineStore(Protocol):
    """The quarantine's index and content, local or shared (blocking calls)."""

    def put(self, queue_id: str, env: Envelope, content: bytes, meta: Meta) -> None:
        """Keep the message; returns once it is durable. OSError when it cannot be."""
        ...

    def delete(self, queue_id: str, node: str = "") -> None:
        """Remove the entry (QuarantineError when it is not there, or another node than
        `node` is releasing it)."""
        ...

    def remove_rcpts(self, queue_id: str, rcpts: list[str], node: str = "") -> None:
        """Drop these recipients (case-insensitive) from the entry's envelope, durably;
        the entry stays for the others (the caller deletes it when none would be left).
        QuarantineError when it is gone or another node than `node` is releasing it."""
        ...

    def ids(self) -> list[str]: ...

    def meta(self, queue_id: str) -> Meta: ...

    def load(self, queue_id: str) -> tuple[Entry, bytes]:
        """The entry and its message; QuarantineError when missing, CorruptEntry when damaged."""
        ...

    def claim(self, queue_id: str, node: str, now: float) -> None:
        """Node starts releasing the entry: from here until delete() or unclaim() no
        other node releases or deletes it. QuarantineError when it is gone or another
        node claimed it (a claim by `node` itself is a release it did not finish: it
        may resume it)."""
        ...

    def unclaim(self, queue_id: str, node: str) -> None:
        """The release by node did not happen: the entry is back in the quarantine."""
        ...

    def claimed(self, node: str) -> list[str]:
        """The entries node claimed and neither deleted nor unclaimed (it stopped
        in the middle of a release)."""
        ...

    def remove_orphans(self) -> int:
        """Remove what interrupted puts left (never acknowledged); how many."""
        ...

    def locations(self) -> dict[str, tuple[str, str]]:
        """id -> (the node that quarantined it, the node releasing it or ""); empty for
        a store of one node."""
        ...

    def close(self) -> None: ...


class Quarantine:
    """The one-node store (blocking calls: the listener runs put() in an executor)."""

    def __init__(self, data_dir: Path, *, fsync: bool = True):
        self.dir = Path(data_dir) / "quarantine"
        self.fsync = fsync
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)

    # -- writing ----------------------------------------------------------------------------

    def put(self, queue_id: str, env: Envelope, content: bytes, meta: Meta) -> None:
        """Keep the message; returns once it is durable. OSError when it cannot be."""
        self._check_id(queue_id)
        msg, info = self.dir / f"{queue_id}.msg", self.dir / f"{queue_id}.meta"
        tmp_msg, tmp_info = self.dir / f".{queue_id}.msg.tmp", self.dir / f".{queue_id}.meta.tmp"
        try:
            write_durably(tmp_msg, encode_queue_file(env, content), sync=self.fsync)
            os.replace(tmp_msg, msg)
            write_durably(tmp_info, meta.to_json(), sync=self.fsync)
            os.replace(tmp_info, info)
            if self.fsync:
                fsync_dir(self.dir)
        except OSError:
            for p in (tmp_msg, tmp_info, info, msg):
                p.unlink(missing_ok=True)
            raise

    def delete(self, queue_id: str, node: str = "") -> None:
        self._check_id(queue_id)
        info = self.dir / f"{queue_id}.meta"
        if not info.exists():
            raise QuarantineError(f"{queue_id}: not in the quarantine")
        info.unlink()  # the entry is gone from here on; the .msg follows
        (self.dir / f"{queue_id}.msg").unlink(missing_ok=True)
        if self.fsync:
            fsync_dir(self.dir)

    def remove_rcpts(self, queue_id: str, rcpts: list[str], node: str = "") -> None:
        entry, content = self.load(queue_id)
        env = without_rcpts(entry.envelope, rcpts)
        msg, tmp = self.dir / f"{queue_id}.msg", self.dir / f".{queue_id}.msg.tmp"
        try:
            write_durably(tmp, encode_queue_file(env, content), sync=self.fsync)
            os.replace(tmp, msg)  # the .meta stays: the entry is never absent meanwhile
            if self.fsync:
                fsync_dir(self.dir)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise

    def claim(self, queue_id: str, node: str, now: float) -> None:
        """Only this node's admin operations (one at a time) release from here."""
        self.meta(queue_id)

    def unclaim(self, queue_id: str, node: str) -> None:
        pass

    def claimed(self, node: str) -> list[str]:
        return []

    def locations(self) -> dict[str, tuple[str, str]]:
        return {}

    def close(self) -> None:
        pass

    def remove_orphans(self) -> int:
        """Remove .msg files without a .meta and temporary files (never acknowledged)."""
        removed = 0
        for p in self.dir.iterdir():
            name = p.name
            if name.startswith(".") and name.endswith(".tmp"):
                p.unlink(missing_ok=True)
                removed += 1
            elif name.endswith(".msg") and not (self.dir / (name[:-4] + ".meta")).exists():
                p.unlink(missing_ok=True)
                removed += 1
        return removed

    # -- reading -----------------------------------------------------------------------------

    def ids(self) -> list[str]:
        return sorted(p.name[:-5] for p in self.dir.iterdir() if p.name.endswith(".meta") and not p.name.startswith("."))

    def meta(self, queue_id: str) -> Meta:
        self._check_id(queue_id)
        try:
            raw = (self.dir / f"{queue_id}.meta").read_bytes()
        except FileNotFoundError:
            raise QuarantineError(f"{queue_id}: not in the quarantine") from None
        return Meta.from_json(raw)

    def load(self, queue_id: str) -> tuple[Entry, bytes]:
        """The entry and its message; QuarantineError when missing, CorruptEntry when damaged."""
        meta = self.meta(queue_id)
        try:
            data = (self.dir / f"{queue_id}.msg").read_bytes()
        except FileNotFoundError:
            raise CorruptEntry(f"{queue_id}: the message file is missing") from None
        return decode_entry(queue_id, data, meta)

    @staticmethod
    def _check_id(queue_id: str) -> None:
        if not is_queue_id(queue_id):
            raise QuarantineError(f"{queue_id!r} is not a queue id")
