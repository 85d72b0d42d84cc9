"""`kanmon serve` and `kanmon reload`: run the roles, and tell a running server to reload.

Role: load and validate the config, then hand it to kanmon.node (serve) or signal the
running server's pid (reload). Trusts: nothing from argv; config errors name the key,
exit 2. Never: signal a process other than the one in <data_dir>/kanmon.pid.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import click

from kanmon.commands.options import EMBEDDED, config_option, load_with_path


@click.command()
@config_option
@click.option("--quiet", is_flag=True, help="Do not echo event-log lines to stdout (they still go to the log file).")
def serve(config_path: str | None, quiet: bool) -> None:
    """Run the roles the config asks for (the embedded default without -c)."""
    from kanmon.node import run_node  # noqa: PLC0415 - the other commands need not load the servers

    config, config_path = load_with_path(config_path)
    sys.exit(run_node(config, config_path, echo=None if quiet else sys.stdout))


@click.command()
@config_option
def reload(config_path: str | None) -> None:
    """Validate the config, then tell the running `kanmon serve` to reload it (SIGHUP)."""
    config, config_path = load_with_path(config_path)
    pid_file = Path(config.server.data_dir) / "kanmon.pid"
    try:
        pid = int(pid_file.read_text().split()[0])
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError, IndexError):
        click.echo(f"kanmon: no running server found ({pid_file})", err=True)
        sys.exit(1)
    click.echo(f"kanmon: asked pid {pid} to reload {config_path or EMBEDDED}")
