"""The `kanmon` command.

Role: parse arguments, load the config, call into the roles (serve) or the admin
operations, and print results (rich tables by default, JSON with --json).

Trusts: nothing from argv; config errors are printed with the key named, exit 2.
Never: open spool files itself (the admin operations do), or print a traceback for an
expected error.
"""

from __future__ import annotations

import sys

import click

from kanmon import __version__
from kanmon.config import Config, ConfigError, load_config

config_option = click.option(
    "-c",
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Configuration file (TOML). Without it: the embedded default.",
)


def load_or_exit(config_path: str | None) -> Config:
    """The validated config, or a clear message naming the key and exit code 2."""
    try:
        return load_config(config_path)
    except ConfigError as e:
        for line in e.messages:
            click.echo(f"kanmon: config error: {line}", err=True)
        sys.exit(2)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="kanmon")
def main() -> None:
    """kanmon: an on-premises mail gateway (relay, mail store, balancer)."""


# ---------------------------------------------------------------------------
# Feature command groups, each defined in its own package, registered here so that
# `kanmon --help` lists them all. Add one import and one add_command per group.
from kanmon.store.cli import user  # noqa: E402
main.add_command(user)

# ---------------------------------------------------------------------------
# serve and config


@main.command()
@config_option
@click.option("--quiet", is_flag=True, help="Do not echo event-log lines to stdout (they still go to the log file).")
def serve(config_path: str | None, quiet: bool) -> None:
    """Run the roles the config asks for (the embedded default without -c)."""
    from kanmon.node import run_node

    config = load_or_exit(config_path)
    sys.exit(run_node(config, config_path, echo=None if quiet else sys.stdout))


@main.command()
@config_option
def reload(config_path: str | None) -> None:
    """Validate the config, then tell the running `kanmon serve` to reload it (SIGHUP)."""
    import os
    import signal
    from pathlib import Path

    config = load_or_exit(config_path)
    pid_file = Path(config.server.data_dir) / "kanmon.pid"
    try:
        pid = int(pid_file.read_text().split()[0])
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError, IndexError):
        click.echo(f"kanmon: no running server found ({pid_file})", err=True)
        sys.exit(1)
    click.echo(f"kanmon: asked pid {pid} to reload {config_path or '<embedded default>'}")


@main.group()
def config() -> None:
    """Check, print and document configuration files."""


@config.command("check")
@config_option
def config_check(config_path: str | None) -> None:
    """Validate a configuration; exit 0 if it is usable, 2 naming each bad key if not."""
    cfg = load_or_exit(config_path)
    if cfg.balancer is not None:
        from kanmon.balancer.service import validate_balancer

        try:
            validate_balancer(cfg)  # what the models alone cannot see (duplicates, ICMP privilege)
        except ConfigError as e:
            for line in e.messages:
                click.echo(f"kanmon: config error: {line}", err=True)
            sys.exit(2)
    click.echo(f"{config_path or '<embedded default>'}: ok")


@config.command("example")
def config_example() -> None:
    """Print a complete, commented example configuration."""
    from kanmon.config import example_config_text

    click.echo(example_config_text(), nl=False)


@config.command("reference")
def config_reference() -> None:
    """Print the reference of every key (docs/configuration.md is this output)."""
    from kanmon.config import reference_markdown

    click.echo(reference_markdown(), nl=False)
from kanmon.dnscheck.cli import dns  # noqa: E402
main.add_command(dns)


# ---------------------------------------------------------------------------
# log


def parse_since(text: str | None, option: str = "--since") -> float | None:
    """`--since 3d` -> the Unix time 3 days ago (None stays None); a bad value is a usage error."""
    import time

    from kanmon.config import parse_duration

    if text is None:
        return None
    try:
        return time.time() - parse_duration(text)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint=option) from None


def format_time(ts: float | None, empty: str = "-") -> str:
    """How every command shows a time: local, to the second."""
    import time

    if not ts:
        return empty
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


@main.group()
def log() -> None:
    """Search the event log and the message history."""


@log.command("events")
@config_option
@click.option("--since", help="Only the last DURATION (e.g. 1h, 3d).")
@click.option("--id", "queue_id", help="Only lines about this queue id.")
@click.option("--grep", help="Only lines containing TEXT (case-insensitive).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.option("--limit", default=10_000, show_default=True, help="At most this many lines (the newest).")
def log_events(config_path, since, queue_id, grep, as_json, limit) -> None:
    """The event log: connections, TLS, accepts, rejects, deliveries."""
    import json

    from kanmon.records.query import search_events

    cfg = load_or_exit(config_path)
    rows = search_events(cfg.server.data_dir, since=parse_since(since), queue_id=queue_id, grep=grep, limit=limit)
    for r in rows:
        if as_json:
            click.echo(json.dumps({"time": r.ts, "queue_id": r.queue_id, "kind": r.kind, "text": r.text}))
        else:
            click.echo(f"{format_time(r.ts)} {r.queue_id + ': ' if r.queue_id else ''}{r.text}")


@log.command("history")
@config_option
@click.option("--since", help="Only the last DURATION (e.g. 1h, 3d).")
@click.option("--from", "mail_from", help="Envelope sender contains TEXT.")
@click.option("--to", "rcpt", help="Recipient contains TEXT.")
@click.option("--subject", help="Subject contains TEXT.")
@click.option("--id", "queue_id", help="This queue id.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.option("--limit", default=10_000, show_default=True, help="At most this many rows (the newest).")
def log_history(config_path, since, mail_from, rcpt, subject, queue_id, as_json, limit) -> None:
    """The message history: one row per message and recipient."""
    import dataclasses
    import json

    from rich.console import Console
    from rich.table import Table

    from kanmon.records.query import search_history

    cfg = load_or_exit(config_path)
    rows = search_history(
        cfg.server.data_dir, since=parse_since(since), mail_from=mail_from, rcpt=rcpt, subject=subject,
        queue_id=queue_id, limit=limit,
    )
    if as_json:
        for r in rows:
            click.echo(json.dumps(dataclasses.asdict(r), ensure_ascii=False))
        return
    table = Table(box=None, header_style="bold")
    for col in ("time", "client", "from", "to", "subject", "size", "class", "disposition", "queue id", "status"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(
            format_time(r.ts), r.client_ip, r.mail_from or "<>", r.rcpt, r.subject, str(r.size), r.classification,
            r.disposition, r.queue_id, r.status,
        )
    Console(width=200 if not sys.stdout.isatty() else None).print(table)
from kanmon.admin.cli import queue, maintenance  # noqa: E402
main.add_command(queue)
main.add_command(maintenance)
from kanmon.balancer.cli import balance  # noqa: E402
main.add_command(balance)
from kanmon.records.cli import stats, trace  # noqa: E402
from kanmon.alerts_cli import alert  # noqa: E402
main.add_command(trace)
main.add_command(stats)
main.add_command(alert)
