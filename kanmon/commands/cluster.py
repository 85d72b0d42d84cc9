"""`kanmon cluster`: the nodes that share records in PostgreSQL, seen from any of them,
and the configuration pushed to them.

Role: parse the options, read the nodes' heartbeats (kanmon.records.pgquery) and the
configuration versions (kanmon.clusterconfig), print a table or JSON; `push` validates a
file and stores it as a new version. Trusts: nothing from argv. Never: store a file that
does not validate; show alert or error text unescaped (it may hold text from the network).
"""

from __future__ import annotations

import time
from pathlib import Path

import click

from kanmon.commands.options import cell, config_option, format_time, json_option, load_or_exit, shown
from kanmon.units import format_duration
from kanmon.escape import json_for_terminal

SILENT_AFTER = 3  # heartbeats missed before a node shows as silent


@click.group()
def cluster() -> None:
    """The nodes sharing records and state in PostgreSQL ([records] url, docs/cluster.md)."""


@cluster.command("status")
@config_option
@json_option("One JSON object per node.")
def cluster_status(config_path, as_json) -> None:
    """Every node: last seen, version, queue (what waits on a stopped or dead node), active alerts."""
    import psycopg
    from rich.console import Console
    from rich.table import Table

    from kanmon.alerts import alert_title
    from kanmon.monitoring import HEARTBEAT
    from kanmon.records import pgquery

    cfg = load_or_exit(config_path)
    if not cfg.records.url:
        raise click.UsageError("no shared records: set [records] url (docs/cluster.md)")
    from kanmon import clusterconfig

    try:
        nodes = pgquery.cluster_nodes(cfg.records)
        configs = clusterconfig.states(cfg.records)
        newest = clusterconfig.newest_version(cfg.records)
    except (psycopg.Error, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        click.echo(shown(f"kanmon: shared records ({cfg.records.url}): {first}"), err=True)
        raise SystemExit(1) from None
    now = time.time()
    if as_json:
        for n in nodes:
            v = configs.get(n.node)
            config = {"version": v[0], "state": v[1], "error": v[2]} if v else None
            click.echo(json_for_terminal({**n.as_dict(), "silent": not n.stopped and now - n.last_seen > SILENT_AFTER * HEARTBEAT,
                                   "queue_as_of": n.last_seen, "config": config}))
        return
    if not nodes:
        click.echo("no node has reported yet (nodes report every "
                   f"{format_duration(HEARTBEAT)} while `kanmon serve` runs with [records] url)")
        return
    table = Table(box=None, header_style="bold")
    if newest is not None:
        click.echo(f"newest pushed configuration: version {newest}")
    for col in ("node", "hostname", "version", "last seen", "config", "queue", "oldest waiting", "active alerts"):
        table.add_column(col, overflow="fold")
    for n in nodes:
        age = max(0.0, now - n.last_seen)
        silent = not n.stopped and age > SILENT_AFTER * HEARTBEAT
        seen = f"{format_duration(age)} ago" + (" (stopped)" if n.stopped else " (SILENT)" if silent else "")
        q = n.queue
        queue = f"{q.get('size', 0)} (new {q.get('new', 0)}, deferred {q.get('deferred', 0)}, hold {q.get('hold', 0)})"
        if n.stopped:  # its last heartbeat, sent as it stopped: what it holds until it returns
            queue += " at its stop"
        elif silent:  # it died: what it held at its last heartbeat (it may have taken more since)
            queue += f" as of its last heartbeat, {format_time(n.last_seen)}"
        oldest = format_time(q.get("oldest_waiting")) if q.get("oldest_waiting") else "-"
        alerts = "; ".join(f"{a.get('category')}: {alert_title(str(a.get('category')), str(a.get('key')), str(a.get('text') or ''))}"
                           for a in n.alerts) or "-"
        v = configs.get(n.node)
        config = "local file" if v is None else f"v{v[0]} {v[1]}" + (f": {v[2]}" if v[2] else "")
        table.add_row(*(cell(v) for v in (n.node, n.hostname, n.version, seen, config, queue, oldest, alerts)))
    Console(width=200, force_terminal=False).print(table)


@cluster.command("push")
@click.option("-c", "--config", "path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="The cluster's configuration file, with [node.NAME.SECTION] overlays.")
@click.option("--check", "check_only", is_flag=True,
              help="Only validate the file (as it is and with each node's overlay): nothing is pushed and the "
                   "database is not asked. Exit 0 when it would be pushed, 1 when not.")
def cluster_push(path, check_only) -> None:
    """Validate FILE (as it is, and with each node's overlay) and store it as the newest
    version; nodes with [cluster] apply it by a graceful reload and report the outcome
    (`kanmon cluster status`). The file's own [records] url says where to push."""
    import tomllib

    import psycopg

    from kanmon import clusterconfig
    from kanmon.config import ConfigError

    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise click.UsageError(f"{path}: {e}") from None
    errors = clusterconfig.validate_push(text)
    if errors:
        for line in errors:
            click.echo(shown(f"kanmon: {path}: {line}"), err=True)
        click.echo("kanmon: nothing pushed", err=True)
        raise SystemExit(1)
    data = tomllib.loads(text)
    cfg, _text = clusterconfig.node_config(text, "", {k: v for k, v in data.items()
                                                      if k in clusterconfig.LOCAL_SECTIONS}, path)
    if not cfg.records.url:
        raise click.UsageError("the file's [records] url says where to push: set it")
    if check_only:
        nodes = sorted(data.get("node", {}))
        click.echo(shown(f"{path}: ok (as it is" + (f", and for node {', '.join(nodes)}" if nodes else "")
                         + "); nothing pushed"))
        return
    try:
        version = clusterconfig.push(cfg.records, text)
    except ConfigError as e:  # validated above; a race with the file changing
        click.echo(shown("kanmon: " + "; ".join(e.messages)), err=True)
        raise SystemExit(1) from None
    except (psycopg.Error, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        click.echo(shown(f"kanmon: shared records ({cfg.records.url}): {first}"), err=True)
        raise SystemExit(1) from None
    click.echo(f"pushed configuration version {version}; the nodes apply it now (kanmon cluster status)")
