"""`kanmon balance`: the balancer's status, an administrator's mode for a real server,
and its HAProxy export.

Role: `status` reads <data_dir>/balancer-status.json, which the running service
rewrites every second, and shows each real server (state, checks, connections, bytes)
as a table or JSON; `set` asks the running node, over its control socket, to set a real
server to disabled (drain), standby or back to its configured mode; `export --haproxy`
prints the equivalent HAProxy configuration.

Trusts: nothing from argv or the status file (status.read_status checks it); the node
validates what `set` asks.
Never: contact the real servers, change the config file, or print a traceback for an
expected problem (exit 1: not running, stale or refused; exit 2: config error).
"""

from __future__ import annotations

import getpass
import json
import os
import sys
import time
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from kanmon.balancer.haproxy import haproxy_config
from kanmon.balancer.pool import ADMIN_MODES
from kanmon.balancer.status import read_status, status_path
from kanmon.commands.admin_session import AdminSession
from kanmon.commands.options import cell, config_option, json_option, load_with_path, shown
from kanmon.units import format_duration, format_size


@click.group("balance")
def balance() -> None:
    """The balancer: status of the real servers, drain one, HAProxy export."""


def _bytes(n: Any) -> str:
    return format_size(n) if isinstance(n, int) else "-"


def _since(t: Any, now: float) -> str:
    return format_duration(now - t) if isinstance(t, (int, float)) else "-"


@balance.command("status")
@config_option
@json_option("Print the status document as JSON.")
def status_command(config_path: str | None, as_json: bool) -> None:
    """Each real server: state, checks passed/failed, connections now and in all, bytes in/out."""
    config, config_path = load_with_path(config_path)
    if config.balancer is None:
        click.echo(f"kanmon: {config_path or 'the embedded default config'} has no [balancer] section", err=True)
        sys.exit(2)
    path = status_path(config.server.data_dir)
    found = read_status(path)
    if as_json:
        click.echo(json.dumps({"status": found.document, "problem": found.problem, "file": str(path)}, indent=1))
        sys.exit(1 if found.problem else 0)
    if found.problem:
        click.echo(f"kanmon: {found.problem}", err=True)
    if found.document is not None:
        _print_table(found.document, stale=found.problem is not None)
    sys.exit(1 if found.problem else 0)


def _print_table(doc: dict[str, Any], stale: bool) -> None:
    now = time.time()
    console = Console(width=160)
    for vs in doc.get("virtual_servers", []):
        if not isinstance(vs, dict):
            continue
        title = (
            f"{vs.get('name')}  {vs.get('listen')}  method {vs.get('method')}  "
            f"checks {vs.get('health')}  serving {vs.get('serving')}"
            + ("  (last known, stale)" if stale else "")
        )
        table = Table(title=title, title_justify="left")
        for col, justify in (
            ("real server", "left"), ("mode", "left"), ("state", "left"), ("since", "right"),
            ("checks ok", "right"), ("failed", "right"), ("last check", "left"), ("rtt ms", "right"),
            ("conns", "right"), ("total", "right"), ("bytes in", "right"), ("bytes out", "right"),
        ):
            table.add_column(col, justify=justify)  # type: ignore[arg-type]
        for s in vs.get("servers", []):
            if not isinstance(s, dict):
                continue
            state = str(s.get("state"))
            mode = str(s.get("mode"))
            if s.get("admin_mode"):
                mode = f"{mode} (set; configured {s.get('configured_mode')})"
            style = {"up": "green", "down": "bold red", "disabled": "dim"}.get(state, "")
            rtt = s.get("rtt_ms")
            table.add_row(
                cell(s.get("address")), cell(mode), f"[{style}]{state}[/]" if style else cell(state),
                _since(s.get("since"), now), str(s.get("checks_passed")), str(s.get("checks_failed")),
                cell(str(s.get("last_check"))[:40]), "-" if rtt is None else f"{rtt:.1f}",  # a server's reply: text
                str(s.get("connections")), str(s.get("total_connections")),
                _bytes(s.get("bytes_in")), _bytes(s.get("bytes_out")),
            )
        console.print(table)


@balance.command("set")
@click.argument("virtual")
@click.argument("real")
@click.argument("mode", type=click.Choice(ADMIN_MODES))
@config_option
@json_option("Print the real server's status after the change as JSON.")
def set_command(virtual: str, real: str, mode: str, config_path: str | None, as_json: bool) -> None:
    """Set real server REAL (ip:port) of virtual server VIRTUAL to disabled, standby or
    enabled (its configured mode), in the running node, without editing the config.

    disabled drains it: no new connections, the open ones finish. The choice is kept
    across reloads and restarts until it is set to enabled (docs/balancer.md).
    """
    config, config_path = load_with_path(config_path)
    if config.balancer is None:
        click.echo(f"kanmon: {config_path or 'the embedded default config'} has no [balancer] section", err=True)
        sys.exit(2)
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid {os.getuid()}"
    with AdminSession(config, require_server=True) as admin:
        result = admin.call("balance_set", {"virtual": virtual, "real": real, "mode": mode,
                                            "by": f"{user} (kanmon balance set)"})
    if as_json:
        click.echo(json.dumps(result, indent=1))
        return
    what = "now" if result.get("changed") else "already"
    configured = f" (configured {result.get('configured_mode')})" if result.get("admin_mode") else ""
    click.echo(f"{shown(virtual)} {shown(result.get('address'))}: {what} {result.get('mode')}{configured}, "
               f"{result.get('state')}, {result.get('connections')} open connection(s)")


@balance.command("export")
@config_option
@click.option("--haproxy", "haproxy", is_flag=True, help="Print an equivalent HAProxy configuration.")
def export_command(config_path: str | None, haproxy: bool) -> None:
    """Print the [balancer] setup in another balancer's configuration language."""
    if not haproxy:
        raise click.UsageError("say which format: --haproxy")
    config, config_path = load_with_path(config_path)
    if config.balancer is None or not config.balancer.virtual_server:
        click.echo(f"kanmon: {config_path or 'the embedded default config'} has no [[balancer.virtual_server]]", err=True)
        sys.exit(2)
    export = haproxy_config(config, config_path or "the embedded default config")
    click.echo(export.text, nl=False)
    for note in export.notes:
        click.echo(f"kanmon: note: {note}", err=True)
