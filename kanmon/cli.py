"""The `kanmon` command: assembles the command groups, nothing else.

Role: one `main` group naming every command group, each imported when it is asked for
(`kanmon status` does not import what `kanmon backup` or `kanmon verify` need: every
command paid ~0.3 s of CPU for the others' imports). Each group lives in its own module
under kanmon/commands/ (a leaf: it imports kanmon.commands.options and the operations it
calls, never another group or this module); adding a group is one line in COMMANDS.

Trusts: nothing (argv is parsed by the groups). Never: define a command itself, open
spool files, or import the servers before a command that needs them runs.
"""

from __future__ import annotations

import importlib

import click

from kanmon import __version__
from kanmon.commands.options import root_config_option

# name: (module under kanmon.commands, the click command's attribute there)
COMMANDS: dict[str, tuple[str, str]] = {
    "admin": ("admins", "admin"),
    "alert": ("alert", "alert"),
    "backup": ("backup", "backup"),
    "balance": ("balance", "balance"),
    "cluster": ("cluster", "cluster"),
    "config": ("config", "config"),
    "dkim": ("dkim", "dkim"),
    "dns": ("dns", "dns"),
    "log": ("records", "log"),
    "maintenance": ("queue", "maintenance"),
    "quarantine": ("quarantine", "quarantine"),
    "queue": ("queue", "queue"),
    "records": ("records", "records"),
    "reload": ("serve", "reload"),
    "restore": ("backup", "restore"),
    "rules": ("rules", "rules"),
    "sendmail": ("sendmail", "sendmail"),
    "serve": ("serve", "serve"),
    "service": ("service", "service"),
    "stats": ("records", "stats"),
    "status": ("status", "status"),
    "trace": ("records", "trace"),
    "user": ("user", "user"),
    "verify": ("verify", "verify"),
}


class _Commands(click.Group):
    """The command groups of COMMANDS, each module imported when its command is asked
    for (a run, its --help, or `kanmon --help`, which lists them all)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        where = COMMANDS.get(cmd_name)
        if where is None:
            return None
        return getattr(importlib.import_module(f"kanmon.commands.{where[0]}"), where[1])


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="kanmon")
@root_config_option
def main() -> None:
    """kanmon: an on-premises mail gateway (relay, mail store, balancer)."""
