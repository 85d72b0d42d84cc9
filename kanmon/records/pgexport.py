"""Moving a node's SQLite records into the shared records in PostgreSQL
(`kanmon records export --since`), when a single node becomes one of several.

Role: read events and history rows newer than a time from <data_dir>/records.sqlite
(read-only) and insert them under the node's name, in chunks, each row keyed by its
SQLite id in records_batches (`export.e.<id>`, `export.h.<id>`): an export run twice,
or cut and run again, copies nothing twice; rows from the node's `live-since` mark on (its
first row written to the shared records by itself) are not copied: they are there.
History rows keep their status and deferrals.

Trusts: the node's own database. Never: write to the SQLite records, or touch rows of
another node.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

from kanmon.records.pg import LIVE_SINCE, _clean_detail, _no_nul
from kanmon.records.store import open_db

if TYPE_CHECKING:
    import psycopg

CHUNK = 1000

EVENT_COLUMNS = "id, ts, queue_id, kind, text, session, detail"
HISTORY_COLUMNS = ("id, ts, client_ip, mail_from, rcpt, subject, message_id, size, classification, disposition,"
                   " queue_id, status, auth_user, helo, first, deferrals, updated")


def live_since(conn: psycopg.Connection, node: str) -> float | None:
    """When the node started writing to the shared records itself (None: never)."""
    row = conn.execute("SELECT ts FROM records_batches WHERE node = %s AND batch = %s", (node, LIVE_SINCE)).fetchone()
    return row[0] if row else None


def export_sqlite(conn: psycopg.Connection, data_dir: Path, node: str, since: float) -> tuple[int, int]:
    """Copy rows with ts >= since and older than the node's own first shipped row (what
    it wrote itself is there already); (events, history rows) copied by this run."""
    from psycopg.types.json import Jsonb

    until = live_since(conn, node)
    until = float("inf") if until is None else until

    path = Path(data_dir) / "records.sqlite"
    if not path.exists():
        return 0, 0
    db = open_db(path, readonly=True)
    try:
        counts = []
        for table, columns, tag in (("events", EVENT_COLUMNS, "e"), ("history", HISTORY_COLUMNS, "h")):
            copied, last = 0, 0
            while True:
                rows = db.execute(f"SELECT {columns} FROM {table} WHERE ts >= ? AND ts < ? AND id > ? ORDER BY id"
                                  " LIMIT ?", (since, until, last, CHUNK)).fetchall()
                if not rows:
                    break
                last = rows[-1][0]
                with conn.transaction(), conn.cursor() as c:
                    new = c.execute(
                        "INSERT INTO records_batches (node, batch, ts) SELECT %s, k, %s FROM unnest(%s::text[]) AS k"
                        " ON CONFLICT DO NOTHING RETURNING batch",
                        (node, time.time(), [f"export.{tag}.{r[0]}" for r in rows])).fetchall()
                    fresh = {int(b.rsplit(".", 1)[1]) for (b,) in new}
                    todo = [r for r in rows if r[0] in fresh]
                    if table == "events":
                        c.executemany(
                            "INSERT INTO events (node, ts, queue_id, kind, text, session, detail)"
                            " VALUES (%s,%s,%s,%s,%s,%s,%s)",
                            [(node, *map(_no_nul, r[1:6]),
                              None if r[6] is None else Jsonb(json.loads(_clean_detail(r[6]))))
                             for r in todo])
                    else:
                        c.executemany(
                            "INSERT INTO history (node, ts, client_ip, mail_from, rcpt, subject, message_id, size,"
                            " classification, disposition, queue_id, status, auth_user, helo, first, deferrals,"
                            " updated) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)",
                            [(node, *map(_no_nul, r[1:])) for r in todo])
                copied += len(todo)
            counts.append(copied)
        return counts[0], counts[1]
    finally:
        db.close()
