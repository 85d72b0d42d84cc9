"""How an admin command reaches the queue and the quarantine: the running server's control
socket if one answers, else the spool itself under <data_dir>/kanmon.lock.

Role: AdminSession, shared by the command groups that run kanmon.admin operations
(queue, maintenance, quarantine). Never: open spool files itself.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path

import click

from kanmon.admin.queue_ops import QueueOps, dispatch, offline_queue_ops
from kanmon.config import Config
from kanmon.control import ControlClient, DataDirLock, LockBusy, NoServer
from kanmon.privileges import hand_over_to_owner

FIND_SERVER_WAIT = 30.0  # a server starting up holds the lock before its socket listens


class AdminSession:
    """`with AdminSession(cfg) as admin: admin.call("list", {...})`."""

    def __init__(self, config: Config, require_server: bool = False, make_spool: bool = False):
        self.config = config
        self.require_server = require_server
        # A restore onto a node never served: the spool is made (0700, as kanmon serve
        # makes it) instead of refused; other operations on no spool mean a wrong -c.
        self.make_spool = make_spool
        self._umask: int | None = None
        self.data_dir = Path(config.server.data_dir)
        self.client: ControlClient | None = None
        self.lock: DataDirLock | None = None
        self._offline: contextlib.ExitStack | None = None
        self.ops: QueueOps | None = None

    @property
    def online(self) -> bool:
        return self.client is not None

    def __enter__(self) -> AdminSession:
        if not (self.data_dir / "spool").is_dir():
            if not self.make_spool:
                _fail(f"no spool in {self.data_dir} (wrong -c file, or kanmon never ran here)")
            click.echo(f"kanmon: no spool in {self.data_dir} yet (kanmon never served it): making one, "
                       "as kanmon serve would", err=True)
            # As `kanmon serve` runs: what is made here (the spool, the records database)
            # is private whatever umask this command runs with.
            self._umask = os.umask(0o077)
            self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        deadline = time.monotonic() + FIND_SERVER_WAIT
        while True:
            try:
                self.client = ControlClient(self.data_dir).connect()
                return self
            except NoServer:
                pass
            except OSError as e:
                _fail(f"cannot reach the control socket in {self.data_dir}: {e}")
            lock = DataDirLock(self.data_dir)
            try:
                lock.acquire(wait=0)
                if self.require_server:
                    lock.release()
                    _fail("kanmon is not running (no server for this data_dir: the mail system is down)")
                self.lock = lock
                break
            except LockBusy as e:
                if time.monotonic() >= deadline:
                    _fail(f"{e}, and no control socket answers")
                time.sleep(0.1)
        self._offline = contextlib.ExitStack()
        self.ops = self._offline.enter_context(offline_queue_ops(self.config))
        return self

    def call(self, op: str, args: dict | None = None, progress=None) -> dict:
        """The operation's result (exit 1 with its error); progress(done, total) as it runs."""
        request = {"op": op, "args": args or {}}
        if self.client is not None:
            try:
                reply = self.client.request(op, args, progress)
            except (OSError, ValueError) as e:
                _fail(f"control socket: {e}")
        else:
            assert self.ops is not None
            reply = dispatch(self.ops, request, progress)
        if not reply.get("ok"):
            _fail(str(reply.get("error")), 1)
        return reply["result"]

    def __exit__(self, *exc) -> None:
        if self.client is not None:
            self.client.close()
        if self._offline is not None:
            self._offline.close()
        try:
            if self._umask is not None and self.lock is not None:
                hand_over_to_owner(self.data_dir)  # made as root for the service user: theirs
        finally:
            if self.lock is not None:
                self.lock.release()
            if self._umask is not None:
                os.umask(self._umask)


def _fail(message: str, code: int = 1):
    click.echo(f"kanmon: {message}", err=True)
    sys.exit(code)
