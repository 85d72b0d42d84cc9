"""`kanmon cluster`: the nodes that share records in PostgreSQL, seen from any of them.

Role: parse the options, read the nodes' heartbeats (kanmon.records.pgquery), print a
table or JSON. Trusts: nothing from argv. Never: write to the shared records; show
alert text unescaped (it may hold text from the network).
"""

from __future__ import annotations

import json
import time

import click

from kanmon.commands.options import cell, config_option, format_time, json_option, load_or_exit, shown
from kanmon.units import format_duration

SILENT_AFTER = 3  # heartbeats missed before a node shows as silent


@click.group()
def cluster() -> None:
    """The nodes sharing records and state in PostgreSQL ([records] url, docs/cluster.md)."""


@cluster.command("status")
@config_option
@json_option("One JSON object per node.")
def cluster_status(config_path, as_json) -> None:
    """Every node: last seen, version, queue (what waits on a dead node), active alerts."""
    import psycopg
    from rich.console import Console
    from rich.table import Table

    from kanmon.monitoring import HEARTBEAT
    from kanmon.records import pgquery

    cfg = load_or_exit(config_path)
    if not cfg.records.url:
        raise click.UsageError("no shared records: set [records] url (docs/cluster.md)")
    try:
        nodes = pgquery.cluster_nodes(cfg.records)
    except (psycopg.Error, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        click.echo(shown(f"kanmon: shared records ({cfg.records.url}): {first}"), err=True)
        raise SystemExit(1) from None
    now = time.time()
    if as_json:
        for n in nodes:
            click.echo(json.dumps({**n.as_dict(), "silent": now - n.last_seen > SILENT_AFTER * HEARTBEAT},
                                  ensure_ascii=False))
        return
    if not nodes:
        click.echo("no node has reported yet (nodes report every "
                   f"{format_duration(HEARTBEAT)} while `kanmon serve` runs with [records] url)")
        return
    table = Table(box=None, header_style="bold")
    for col in ("node", "hostname", "version", "last seen", "queue", "oldest waiting", "active alerts"):
        table.add_column(col, overflow="fold")
    for n in nodes:
        age = max(0.0, now - n.last_seen)
        seen = f"{format_duration(age)} ago" + (" (SILENT)" if age > SILENT_AFTER * HEARTBEAT else "")
        q = n.queue
        queue = f"{q.get('size', 0)} (new {q.get('new', 0)}, deferred {q.get('deferred', 0)}, hold {q.get('hold', 0)})"
        oldest = format_time(q.get("oldest_waiting")) if q.get("oldest_waiting") else "-"
        alerts = "; ".join(f"{a.get('category')}/{a.get('key')}: {a.get('text', '').splitlines()[0] if a.get('text') else ''}"
                           for a in n.alerts) or "-"
        table.add_row(*(cell(v) for v in (n.node, n.hostname, n.version, seen, queue, oldest, alerts)))
    Console(width=200, force_terminal=False).print(table)
