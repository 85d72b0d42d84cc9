"""The quarantine in PostgreSQL, shared by every node (`[records] url`): a message
quarantined on one relay is listed, shown, released and deleted from any node.

Role: kanmon.quarantine.store.QuarantineStore over one table, `quarantine`, in the
database of the shared records and state: a row an entry, index and content together
(the envelope and message in the spool's checksummed queue-file format, as bytea), so
an entry exists whole or not at all (put is one INSERT, acknowledged once committed).
A release is exactly-once across nodes: claim() is one conditional UPDATE (the row is
locked by it): of two nodes claiming at once the second waits for the first's update,
then finds the row claimed by another node (or, once the first deleted it, gone), and is
told so. A claim outlives a crash of its node: that node resolves it when it comes back
(kanmon.admin.quarantine_ops.purge), no other node takes it over (the message may
already be in the dead node's queue).

Size bound: an entry is one bytea value, and PostgreSQL holds at most 1 GB in one; put
refuses entries above MAX_ENTRY_BYTES (an OSError: the SMTP client gets 451, as for a
full disk). Each load reads the whole message into memory, as the local store does;
[smtp] max_message_size (50 MB by default) is the practical bound.

Trusts: the URL and password file of the validated configuration; what it reads back
is checked (checksum, JSON types) by kanmon.quarantine.store, as the local store's files.
Never: run on the event loop's thread (callers use an executor); delete or release an
entry another node has claimed; acknowledge a put before its transaction committed.
"""

from __future__ import annotations

import errno
from pathlib import Path

from kanmon.model import Envelope, is_queue_id
from kanmon.quarantine.store import Entry, Meta, QuarantineError, decode_entry, without_rcpts
from kanmon.spool.store import encode_queue_file
from kanmon.state.postgresql import _Db

MAX_ENTRY_BYTES = 512 * 1024 * 1024  # half of PostgreSQL's 1 GB limit on one value
WRITE_TIMEOUT_MS = 120_000  # one put or load of a large message may take longer than a check's statement

_SCHEMA = """
CREATE TABLE IF NOT EXISTS quarantine (
    id TEXT PRIMARY KEY, kind TEXT NOT NULL, stored DOUBLE PRECISION NOT NULL,
    node TEXT NOT NULL, meta TEXT NOT NULL, data BYTEA NOT NULL, size BIGINT NOT NULL,
    claimed_by TEXT, claimed_at DOUBLE PRECISION);
CREATE INDEX IF NOT EXISTS quarantine_stored ON quarantine (stored);
CREATE INDEX IF NOT EXISTS quarantine_claimed_by ON quarantine (claimed_by) WHERE claimed_by IS NOT NULL;
"""


def _check_id(queue_id: str) -> None:
    if not is_queue_id(queue_id):
        raise QuarantineError(f"{queue_id!r} is not a queue id")


def _gone(queue_id: str) -> QuarantineError:
    return QuarantineError(f"{queue_id}: not in the quarantine")


class PgQuarantine:
    """QuarantineStore in PostgreSQL; node: this node's name (kept with each entry it puts)."""

    def __init__(self, url: str, node: str, *, password_file: Path | None = None):
        self.node = node
        self._db = _Db(url, password_file, _SCHEMA)

    # -- writing ----------------------------------------------------------------------------

    def put(self, queue_id: str, env: Envelope, content: bytes, meta: Meta) -> None:
        _check_id(queue_id)
        data = encode_queue_file(env, content)
        if len(data) > MAX_ENTRY_BYTES:
            raise OSError(errno.EFBIG, f"larger than the shared quarantine keeps ({MAX_ENTRY_BYTES} bytes)")
        with self._db.transaction() as c:
            c.execute(f"SET LOCAL statement_timeout = {WRITE_TIMEOUT_MS}")
            # The same id again from this node replaces the entry, as the local store's
            # rename does; another node's entry under the same id (queue ids are unique
            # per node only) is never overwritten: this put fails, the client retries.
            row = c.execute("INSERT INTO quarantine (id, kind, stored, node, meta, data, size) VALUES (%s, %s, %s, %s, %s, %s, %s)"
                      " ON CONFLICT (id) DO UPDATE SET kind = excluded.kind, stored = excluded.stored,"
                      " node = excluded.node, meta = excluded.meta, data = excluded.data, size = excluded.size,"
                      " claimed_by = NULL, claimed_at = NULL WHERE quarantine.node = excluded.node RETURNING 1",
                      (queue_id, meta.kind, meta.stored, self.node, meta.to_json().decode(), data, len(content))).fetchone()
            if row is None:
                raise OSError(errno.EEXIST, f"{queue_id}: another node's quarantine entry has this id")

    def delete(self, queue_id: str, node: str = "") -> None:
        _check_id(queue_id)
        with self._db.transaction() as c:
            row = c.execute("DELETE FROM quarantine WHERE id = %s AND (claimed_by IS NULL OR claimed_by = %s)"
                            " RETURNING 1", (queue_id, node)).fetchone()
            if row is None:
                raise self._why_not(c, queue_id)

    def remove_rcpts(self, queue_id: str, rcpts: list[str], node: str = "") -> None:
        _check_id(queue_id)
        with self._db.transaction() as c:
            c.execute(f"SET LOCAL statement_timeout = {WRITE_TIMEOUT_MS}")
            row = c.execute("SELECT meta, data FROM quarantine WHERE id = %s AND (claimed_by IS NULL OR claimed_by = %s)"
                            " FOR UPDATE", (queue_id, node)).fetchone()
            if row is None:
                raise self._why_not(c, queue_id)
            entry, content = decode_entry(queue_id, bytes(row[1]), Meta.from_json(row[0].encode()))
            data = encode_queue_file(without_rcpts(entry.envelope, rcpts), content)
            c.execute("UPDATE quarantine SET data = %s WHERE id = %s", (data, queue_id))

    def claim(self, queue_id: str, node: str, now: float) -> None:
        _check_id(queue_id)
        with self._db.transaction() as c:
            row = c.execute("UPDATE quarantine SET claimed_by = %s, claimed_at = %s"
                            " WHERE id = %s AND (claimed_by IS NULL OR claimed_by = %s) RETURNING 1",
                            (node, now, queue_id, node)).fetchone()
            if row is None:
                raise self._why_not(c, queue_id)

    def unclaim(self, queue_id: str, node: str) -> None:
        with self._db.transaction() as c:
            c.execute("UPDATE quarantine SET claimed_by = NULL, claimed_at = NULL WHERE id = %s AND claimed_by = %s",
                      (queue_id, node))

    def claimed(self, node: str) -> list[str]:
        return [r[0] for r in self._db.read("SELECT id FROM quarantine WHERE claimed_by = %s ORDER BY id", (node,))]

    @staticmethod
    def _why_not(c, queue_id: str) -> QuarantineError:
        row = c.execute("SELECT claimed_by FROM quarantine WHERE id = %s", (queue_id,)).fetchone()
        if row is None:
            return _gone(queue_id)
        return QuarantineError(f"{queue_id}: not in the quarantine any more (being released by {row[0]})")

    def remove_orphans(self) -> int:
        return 0  # a put is one transaction: nothing is left half-written

    # -- reading -----------------------------------------------------------------------------

    def ids(self) -> list[str]:
        return [r[0] for r in self._db.read('SELECT id FROM quarantine ORDER BY id COLLATE "C"', ())]

    def meta(self, queue_id: str) -> Meta:
        _check_id(queue_id)
        rows = self._db.read("SELECT meta FROM quarantine WHERE id = %s", (queue_id,))
        if not rows:
            raise _gone(queue_id)
        return Meta.from_json(rows[0][0].encode())

    def load(self, queue_id: str) -> tuple[Entry, bytes]:
        _check_id(queue_id)
        with self._db.transaction() as c:
            c.execute(f"SET LOCAL statement_timeout = {WRITE_TIMEOUT_MS}")
            row = c.execute("SELECT meta, data FROM quarantine WHERE id = %s", (queue_id,)).fetchone()
        if row is None:
            raise _gone(queue_id)
        return decode_entry(queue_id, bytes(row[1]), Meta.from_json(row[0].encode()))

    def locations(self) -> dict[str, tuple[str, str]]:
        """id -> (the node that quarantined it, the node releasing it or "")."""
        return {r[0]: (r[1], r[2] or "") for r in self._db.read("SELECT id, node, claimed_by FROM quarantine", ())}

    def close(self) -> None:
        self._db.close()
