"""How a command outside the server reaches the queue operations.

Role: the running server's control socket when one answers, else the spool itself
under <data_dir>/kanmon.lock (kanmon.admin.queue_ops.offline_queue_ops), exactly as
`kanmon queue` does; used by `kanmon sendmail -bp/-q` and `kanmon backup/restore`.
`poke_server` tells a running server something without waiting for the lock.

Trusts: the validated config. Never: touch the spool without holding the data_dir lock,
or wait for the lock longer than `wait` seconds.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

from kanmon.admin.queue_ops import dispatch, offline_queue_ops
from kanmon.config import Config
from kanmon.control import ControlClient, DataDirLock, LockBusy, NoServer


class Unreachable(Exception):
    """Neither a server answers nor can the spool be locked; str() says why."""


class QueueReach:
    """call(op, args) -> the operation's result; raises RuntimeError with its error text."""

    def __init__(self, client: ControlClient | None, ops):
        self.client = client
        self.ops = ops

    @property
    def online(self) -> bool:
        return self.client is not None

    def call(self, op: str, args: dict | None = None) -> dict:
        if self.client is not None:
            reply = self.client.request(op, args)
        else:
            reply = dispatch(self.ops, {"op": op, "args": args or {}})
        if not reply.get("ok"):
            raise RuntimeError(str(reply.get("error")))
        return reply["result"]


@contextlib.contextmanager
def reach_queue(config: Config, wait: float = 30.0, offline: bool = True) -> Iterator[QueueReach]:
    """The queue operations of this data_dir's node, running or not (offline=False: only
    a running one; Unreachable otherwise)."""
    data_dir = Path(config.server.data_dir)
    if not (data_dir / "spool").is_dir():
        raise Unreachable(f"no spool in {data_dir} (wrong -c file, or kanmon never ran here)")
    deadline = time.monotonic() + wait
    while True:
        try:
            client = ControlClient(data_dir).connect()
        except NoServer:
            client = None
        except OSError as e:
            raise Unreachable(f"cannot reach the control socket in {data_dir}: {e}") from None
        if client is not None:
            try:
                yield QueueReach(client, None)
            finally:
                client.close()
            return
        if not offline:
            raise Unreachable("kanmon is not running")
        lock = DataDirLock(data_dir)
        try:
            lock.acquire(wait=0)
            break
        except LockBusy as e:
            if time.monotonic() >= deadline:
                raise Unreachable(f"{e}, and no control socket answers") from None
            time.sleep(0.1)
    try:
        with offline_queue_ops(config) as ops:
            yield QueueReach(None, ops)
    finally:
        lock.release()


def poke_server(data_dir: Path, op: str) -> bool:
    """Send one request to a running server, if one answers us; whether it did."""
    try:
        with ControlClient(Path(data_dir), timeout=5.0) as client:
            return bool(client.request(op).get("ok"))
    except (NoServer, OSError, ValueError):
        return False
