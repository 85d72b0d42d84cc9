"""Retention: `[records] keep`; older event-log and history rows are pruned daily.

Role: a loop in the node's TaskGroup. Once at start and then every day (on the node's
clock) it deletes rows older than `keep` in small transactions (PRUNE_BATCH rows each,
its own connection, in a worker thread), so the records writer — and through it the
mail path — never waits long for the database lock. A failure is an event of kind
"error" (the critical alert category picks it up) and the loop goes on.

With shared records (`[records] url`), the node also prunes its own rows in PostgreSQL
by the same `keep` (each node prunes its own; kanmon.records.pg.prune).

Trusts: the validated Config. Never: delete the counters table (metrics are running
totals), another node's shared rows, or run on the event loop's thread.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

from kanmon.records.store import SLOT_COLUMNS, add_slot_counts, open_db, slot_counts, slot_of

PRUNE_BATCH = 5000
DAY = 86400.0


def prune(db_path: Path, before: float, batch: int = PRUNE_BATCH) -> tuple[int, int]:
    """Delete events and history rows with ts < before; (events, history) deleted."""
    if not Path(db_path).exists():
        return 0, 0
    db = open_db(db_path)
    counts = []
    try:
        for table in ("events", "history"):
            total = 0
            while True:
                with db:
                    cur = db.execute(
                        f"DELETE FROM {table} WHERE id IN (SELECT id FROM {table} WHERE ts < ? ORDER BY ts LIMIT ?)"
                        + (" RETURNING ts, first, size, status, deferrals, disposition" if table == "history" else ""),
                        (before, batch),
                    )
                    if table == "history":
                        # The deleted rows' counts leave history_slots in the same transaction.
                        deleted = cur.fetchall()
                        add_slot_counts(db, _slot_sums(deleted, -1))
                        count = len(deleted)
                    else:
                        count = cur.rowcount
                total += count
                if count < batch:
                    break
                time.sleep(0.01)  # let the writer in between batches
            counts.append(total)
        with db:  # the slots the prune emptied
            db.execute("DELETE FROM history_slots WHERE slot <= ? AND "
                       + " AND ".join(f"{c} = 0" for c in SLOT_COLUMNS), (slot_of(before),))
    finally:
        db.close()
    return counts[0], counts[1]


def _slot_sums(rows, sign: int) -> dict[int, list[int]]:
    """History rows (ts, first, size, status, deferrals, disposition) summed per slot, times sign."""
    sums: dict[int, list[int]] = {}
    for ts, *row in rows:
        c = slot_counts(*row)
        s = sums.setdefault(slot_of(ts), [0] * 6)
        for i in range(6):
            s[i] += sign * c[i]
    return sums


class Retention:
    def __init__(self, config, emit, clock):
        self.keep = config.records.keep
        self.db_path = Path(config.server.data_dir) / "records.sqlite"
        self.emit = emit
        self.clock = clock
        self.shared = config.records if config.records.url else None
        self.node = config.records.node or config.server.hostname
        self.last_run: float | None = None  # on the clock: a kept Retention waits out its day

    def settings(self) -> tuple:
        """What it prunes and where: a reload that leaves these alone keeps it (and its day)."""
        return (self.keep, self.db_path, self.shared, self.node)

    async def run_once(self) -> tuple[int, int]:
        if not self.keep:
            return 0, 0
        cutoff = self.clock.now() - self.keep
        try:
            events, history = await asyncio.to_thread(prune, self.db_path, cutoff)
        except sqlite3.Error as e:
            self.emit(f"records: pruning failed: {e}", kind="error")
            return 0, 0
        stamp = time.strftime("%Y-%m-%d %H:%M", time.localtime(cutoff))
        if events or history:
            self.emit(f"records: pruned {events} event line(s) and {history} history row(s) older than {stamp}")
        if self.shared is not None:
            await self._prune_shared(cutoff, stamp)
        return events, history

    async def _prune_shared(self, cutoff: float, stamp: str) -> None:
        import psycopg

        from kanmon.records.pg import connect, prune as prune_shared

        def run() -> tuple[int, int]:
            with connect(self.shared.url, self.shared.password_file, autocommit=True) as conn:
                return prune_shared(conn, self.node, cutoff)

        try:
            events, history = await asyncio.to_thread(run)
        except psycopg.errors.UndefinedTable:
            self.emit("records: pruning the shared records failed: the database has no records schema yet "
                      "(create it: kanmon records migrate, docs/cluster.md step 3)", kind="error")
            return
        except (psycopg.Error, OSError) as e:
            self.emit(f"records: pruning the shared records failed: {e}", kind="error")
            return
        if events or history:
            self.emit(f"records: pruned {events} event line(s) and {history} history row(s) of node {self.node}"
                      f" older than {stamp} from the shared records")

    async def run(self) -> None:
        """Prune now (or, run again after a reload, a day after the last time) and then
        daily, until cancelled; nothing when keep is 0."""
        if not self.keep:
            return
        while True:
            if self.last_run is not None:  # started again by a reload: not before its day is over
                await self.clock.sleep_until(self.last_run + DAY)
            self.last_run = self.clock.now()
            await self.run_once()
