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
