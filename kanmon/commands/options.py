"""What every `kanmon` command group shares: the -c and --json options, loading the
config, and reading and showing times.

Role: the one options module of the CLI. Each command group (kanmon/commands/*.py) is a
leaf that imports this module and the operations it calls, never another group;
kanmon/cli.py only assembles the groups.

Trusts: nothing from argv: a bad duration is a usage error naming the option, a bad
config prints each bad key and exits 2. Never: print a traceback for an expected error.
"""

from __future__ import annotations

import sys
import time

import click

from kanmon.config import Config, ConfigError, load_config, parse_duration

config_option = click.option(
    "-c",
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Configuration file (TOML). Without it: the embedded default.",
)


def json_option(help: str = "JSON instead of text."):  # noqa: A002 - click's own keyword
    """`--json` (the parameter `as_json`): machine-readable output instead of text or tables."""
    return click.option("--json", "as_json", is_flag=True, help=help)


def exit_config_error(e: ConfigError) -> None:
    """Print each bad key of a config error and exit 2."""
    for line in e.messages:
        click.echo(f"kanmon: config error: {line}", err=True)
    sys.exit(2)


def load_or_exit(config_path: str | None) -> Config:
    """The validated config, or a clear message naming the key and exit code 2."""
    try:
        return load_config(config_path)
    except ConfigError as e:
        exit_config_error(e)
        raise AssertionError("unreachable") from None


def parse_since(text: str | None, option: str = "--since") -> float | None:
    """`--since 3d` -> the Unix time 3 days ago (None stays None); a bad value is a usage error."""
    if text is None:
        return None
    try:
        return time.time() - parse_duration(text)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint=option) from None


def format_time(ts: float | None, empty: str = "-") -> str:
    """How every command shows a time: local, to the second."""
    if not ts:
        return empty
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))
