"""`kanmon serve` and `kanmon reload`: run the roles, and tell a running server to reload.

Role: load and validate the config, then hand it to kanmon.node (serve) or ask the
running server to reload over its control socket (kanmon.control) and report the outcome:
exit 0 when the new configuration is in effect, 1 with the reason when the server refused
or failed to prepare it (the running configuration stays), or when no server runs.
Trusts: nothing from argv; config errors name the key, exit 2. Never: signal a process
(SIGHUP remains for service managers; it cannot tell the outcome).
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from kanmon.commands.options import config_option, load_with_path, shown


@click.command()
@config_option
@click.option("--quiet", is_flag=True, help="Do not echo event-log lines to stdout (they still go to the log file).")
def serve(config_path: str | None, quiet: bool) -> None:
    """Run the roles the config asks for (the embedded default without -c)."""
    from kanmon.node import run_node  # noqa: PLC0415 - the other commands need not load the servers

    from kanmon import sdnotify  # noqa: PLC0415

    config, config_path = load_with_path(config_path)
    # Under systemd with [log] to syslog, the lines reach the journal through /dev/log
    # with their own tags (kanmon/smtpd...): echoing them on stdout, which is the
    # journal too, would put each line in it twice.
    if "syslog" in config.log.to and sdnotify.is_journal_stream(sys.stdout.fileno()):
        quiet = True
    sys.exit(run_node(config, config_path, echo=None if quiet else sys.stdout))


@click.command()
@config_option
def reload(config_path: str | None) -> None:
    """Validate the config, then have the running `kanmon serve` load it; exit 1 with the
    reason if it refuses (the running configuration stays)."""
    from kanmon.control import ControlClient, NoServer  # noqa: PLC0415

    config, config_path = load_with_path(config_path)
    data_dir = Path(config.server.data_dir)
    try:
        with ControlClient(data_dir) as client:
            reply = client.request("reload")
    except NoServer:
        click.echo(f"kanmon: no running server found for {data_dir} (is kanmon serve running?)", err=True)
        sys.exit(1)
    except (OSError, ValueError) as e:
        click.echo(f"kanmon: reload: the server did not answer: {e}", err=True)
        sys.exit(1)
    if not reply.get("ok"):
        click.echo(f"kanmon: reload failed, the running configuration stays: {reply.get('error')}", err=True)
        sys.exit(1)
    result = reply.get("result") or {}
    changed = ", ".join(result.get("changed") or []) or "nothing"
    click.echo(f"kanmon: reloaded {result.get('config', config_path)} (changed: {changed})")
    cluster = result.get("cluster")
    if cluster is not None:  # a node following the cluster runs its pushed version, as a restart would
        refused = cluster.get("refused")
        if refused:
            click.echo(shown(f"kanmon: cluster: configuration version {refused['version']} refused: {refused['error']}"),
                       err=True)
        click.echo(f"kanmon: cluster: running configuration version {cluster['version']}" if cluster.get("version")
                   else "kanmon: cluster: running the local file (no pushed version applied)")
