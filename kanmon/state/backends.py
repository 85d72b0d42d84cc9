"""Which SharedState and quarantine store a process opens: PostgreSQL when `[records] url`
is set (several nodes share it), else the node's SQLite file and quarantine directory in
data_dir.

Role: the one place the node, the receiver processes and the admin commands choose the
backend, so that they always agree. Trusts: the validated configuration.
Never: open anything but what the configuration names.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from kanmon.quarantine.store import Quarantine
from kanmon.state.sqlite import STATE_FILE, SqliteState

if TYPE_CHECKING:
    from kanmon.config import Config
    from kanmon.quarantine.store import QuarantineStore
    from kanmon.state.api import SharedState


def is_shared(config: Config) -> bool:
    return bool(config.records.url)


def open_state(config: Config, data_dir: Path | None = None) -> SharedState:
    """The state every process of this node (and, shared, every node) uses."""
    if config.records.url:
        from kanmon.state.postgresql import PostgresState

        return PostgresState(config.records.url, config.records.node or config.server.hostname,
                             password_file=config.records.password_file)
    return SqliteState(Path(data_dir if data_dir is not None else config.server.data_dir))


def node_name(config: Config) -> str:
    """This node's name in what is shared (records, gauges, quarantine claims)."""
    return config.records.node or config.server.hostname


def open_quarantine(config: Config, *, fsync: bool = True) -> QuarantineStore:
    """The quarantine every node shares (PostgreSQL), or this node's (data_dir/quarantine)."""
    if config.records.url:
        from kanmon.state.pgquarantine import PgQuarantine

        return PgQuarantine(config.records.url, node_name(config), password_file=config.records.password_file)
    return Quarantine(config.server.data_dir, fsync=fsync)


def state_exists(config: Config, data_dir: Path) -> bool:
    """Whether there is state to read (the admin commands do not create an empty one)."""
    return is_shared(config) or (Path(data_dir) / STATE_FILE).exists()
