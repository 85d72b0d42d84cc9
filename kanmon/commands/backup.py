"""`kanmon backup FILE` and `kanmon restore FILE`: the whole node in one archive.

Role: parse arguments and call kanmon.admin.nodebackup (docs/operations.md, "Backup and
restore"); print what was written or restored (JSON with --json).

Trusts: nothing from argv (part names are checked). Never: overwrite a file without
--force, restore onto a running node, or print a traceback for an expected error (exit
1 for a failed operation, 2 for bad arguments).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from kanmon.admin.nodebackup import PARTS, NodeBackupError, backup_node, parse_parts, restore_node
from kanmon.commands import options
from kanmon.commands.options import config_option, json_option, load_or_exit, load_with_path


def _config_file(config_path: str | None) -> Path | None:
    """The config file in use: -c (before or after the subcommand), else $KANMON_CONFIG,
    else the system path when it exists (kanmon.commands.options decides)."""
    path, _why = options.resolve_config_path(config_path)
    return Path(path) if path else None


def _parts(only: str | None) -> tuple[str, ...]:
    try:
        return parse_parts(only)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--only") from None


def _fail(message: str) -> None:
    click.echo(f"kanmon: {message}", err=True)
    sys.exit(1)


only_option = click.option("--only", metavar="PARTS",
                           help=f"Comma-separated parts only: {', '.join(PARTS)} (default: all).")
force_option = click.option("--force", is_flag=True, help="Replace what exists and differs.")


@click.command("backup")
@config_option
@click.argument("file", type=click.Path(dir_okay=False))
@only_option
@force_option
@json_option()
def backup(config_path, file, only, force, as_json) -> None:
    """Back up the whole node into FILE: config, users and passwords, DKIM keys, TLS files,
    alert state, quarantine, mailboxes and the queue, with a SHA-256 of each member.

    Safe while the node runs: the queue part goes through the running server (as `queue
    backup` does). Restore with `kanmon restore FILE`.
    """
    parts = _parts(only)
    cfg, path = load_with_path(config_path)
    source = Path(path) if path else None
    say = None if as_json else (lambda text: click.echo(f"kanmon: backup: {text}", err=True))
    try:
        result = backup_node(cfg, source, Path(file), parts, force=force, progress=say)
    except (NodeBackupError, OSError, RuntimeError) as e:
        _fail(f"backup failed: {e}")
        return
    if as_json:
        click.echo(json.dumps(result, indent=1))
    else:
        queue = "" if result["queue"] is None else f", {result['queue']} queued message(s)"
        if result.get("queue_corrupt"):
            queue += f", {result['queue_corrupt']} damaged queue file(s) left out (in spool/corrupt/)"
        click.echo(f"backup written to {result['path']} ({sum(result['parts'].values())} file(s){queue})")


@click.command("restore")
@config_option
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@only_option
@force_option
@json_option()
def restore(config_path, file, only, force, as_json) -> None:
    """Restore a `kanmon backup` archive onto this node, which must be stopped.

    The whole archive is verified first. The config goes to the -c file when it does not
    exist (its data_dir is where the rest goes); a -c file that exists is kept, even with
    --force, and its own paths are used; without one, --only must include config. Anything else that exists and differs is refused
    unless --force; what is already there is skipped, so a second run changes nothing.
    """
    parts = _parts(only)
    target = _config_file(config_path) or options.SYSTEM_CONFIG
    say = None if as_json else (lambda text: click.echo(f"kanmon: restore: {text}", err=True))
    try:
        result = restore_node(Path(file), target, parts, force=force,
                              load=lambda p: load_or_exit(str(p)), progress=say)
    except (NodeBackupError, OSError, RuntimeError) as e:
        _fail(f"restore failed: {e}")
        return
    if as_json:
        click.echo(json.dumps(result, indent=1))
    else:
        restored = sum(p["restored"] for p in result["parts"].values())
        same = sum(p["same"] for p in result["parts"].values())
        click.echo(f"restored {restored} item(s), {same} already there, from {file}")
