"""`kanmon status`: is kanmon running, and is it well (like `systemctl status`).

Role: ask the running node for its status document over the control socket
(kanmon.admin.status builds it inside the server), print it as text or JSON, and exit
0 healthy, 1 degraded, 3 not running.

Trusts: the server's document (it is ours, from a socket only our uid may use); nothing
from argv. Never: open the spool or the records database itself, or create data_dir.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from kanmon.admin.status import NOT_RUNNING, UNKNOWN, fetch_status, health
from kanmon.control import REFUSED_USER
from kanmon.commands.options import EMBEDDED, config_option, format_time, json_option, load_with_path, shown
from kanmon.units import format_duration
from kanmon.escape import json_for_terminal


@click.command()
@config_option
@json_option("The status document as JSON ({\"running\": false, ...} when not running).")
def status(config_path: str | None, as_json: bool) -> None:
    """Running or not, listeners, queue, alerts, maintenance, balancer.

    Exit 0: running and healthy; 1: running, degraded (an active alert, a corrupt queue
    file, a failed maintenance run, a virtual server with no real server up); 3: not
    running (as `systemctl status`); 4: running, but this user may not ask (run it as
    the service's user or root).
    """
    from kanmon.alerts import alert_title  # noqa: PLC0415 - the alerts module only for this command

    cfg, path = load_with_path(config_path)
    data_dir = Path(cfg.server.data_dir)
    doc, why = fetch_status(data_dir)
    if doc is None and REFUSED_USER in why:  # it runs, but will not tell this user
        if as_json:
            click.echo(json_for_terminal({"running": True, "health": "unknown", "why": why, "data_dir": str(data_dir)},
                                  indent=1))
        else:
            click.echo(f"kanmon: running, status unknown ({why}); run as the service's user or root")
        sys.exit(UNKNOWN)
    code, reasons = health(doc)
    if as_json:
        out = doc if doc is not None else {"running": False, "why": why, "data_dir": str(data_dir)}
        click.echo(json_for_terminal({**out, "health": "not running" if code == NOT_RUNNING else
                               "degraded" if code else "healthy", "reasons": reasons}, indent=1))
        sys.exit(code)
    if doc is None:
        click.echo(f"kanmon: not running ({why}; config {path or EMBEDDED})")
        sys.exit(code)
    state = "degraded" if code else "healthy"
    click.echo(f"kanmon {doc['version']}: running, {state} (pid {doc['pid']}, up {format_duration(doc['uptime'])}, "
               f"since {format_time(doc['started_at'])})")
    c = doc["config"]
    click.echo(f"  config:      {c['file'] or EMBEDDED} sha256 {(c['sha256'] or '?')[:12]}"
               + ("  (changed on disk since: kanmon reload applies it)" if c["changed_on_disk"] else ""))
    cluster = c.get("cluster")
    if cluster is not None:  # the file gives only [records] and [cluster] while a pushed version runs
        click.echo(f"  cluster:     node {cluster['node']}, " + (
            f"runs pushed configuration version {cluster['version']}" if cluster["version"] is not None
            else "runs its local file (no pushed version applied)"))
    click.echo(f"  data:        {doc['data_dir']}")
    runtime = doc.get("runtime")
    if runtime is not None:  # a server started before this kanmon was installed does not say
        click.echo(f"  runtime:     Python {runtime['python']}, DATA scans "
                   + ("compiled" if runtime["compiled_scans"] else
                      "in Python (the C part was not built: install with a C compiler for the faster scans)"))
    for listener in doc["listeners"]:
        click.echo(f"  listening:   {listener['address']:<22} {listener['key']}")
    q = doc["queue"]
    oldest = ""
    if q["oldest"]:
        oldest = f", oldest {q['oldest_id']} ({format_duration(time.time() - q['oldest'])})"
    click.echo(f"  queue:       {q['total']} message(s): {q['active']} active, {q['new']} new, {q['deferred']} deferred, "
               f"{q['hold']} held" + (f", {q['corrupt']} corrupt" if q["corrupt"] else "") + oldest)
    click.echo(f"  alerts:      {len(doc['alerts'])} active")
    for a in doc["alerts"]:
        click.echo(shown(f"               {a['category']} since {format_time(a['since'])}: "
                         f"{alert_title(a['category'], a['key'], a['text'])}"))
    for job in doc["maintenance"]:
        last = format_time(job["last_run"], "not yet") + (f" FAILED: {job['last_error']}" if job["last_error"] else "")
        click.echo(f"  maintenance: {job['name']} ({job['action']}): last {last}, next {format_time(job['next_run'])}")
    for vs in doc["balancer"] or []:
        servers = ", ".join(f"{s['address']} {s['state']}" for s in vs["servers"])
        click.echo(f"  balancer:    {vs['name']} on {vs['listen']} serving {vs['serving']}: {servers}")
    for r in reasons:
        click.echo(shown(f"  degraded:    {r}"))
    sys.exit(code)
