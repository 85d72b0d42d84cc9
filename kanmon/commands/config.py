"""`kanmon config ...`: check, print and document configuration files.

Role: validate a config completely (the models, then what only the roles can see, such
as the balancer's duplicates), print the commented example and the key reference.
Trusts: nothing from argv. Never: start anything (checking binds no socket).
"""

from __future__ import annotations

import click

from kanmon.commands.options import config_option, exit_config_error, load_or_exit
from kanmon.config import ConfigError, example_config_text, reference_markdown


@click.group()
def config() -> None:
    """Check, print and document configuration files."""


@config.command("check")
@config_option
def config_check(config_path: str | None) -> None:
    """Validate a configuration; exit 0 if it is usable, 2 naming each bad key if not."""
    cfg = load_or_exit(config_path)
    if cfg.balancer is not None:
        from kanmon.balancer.service import validate_balancer  # noqa: PLC0415 - only with a balancer

        try:
            validate_balancer(cfg)  # what the models alone cannot see (duplicates, ICMP privilege)
        except ConfigError as e:
            exit_config_error(e)
    for warning in cfg.warnings():
        click.echo(f"warning: {warning}", err=True)
    click.echo(f"{config_path or '<embedded default>'}: ok")


@config.command("example")
def config_example() -> None:
    """Print a complete, commented example configuration."""
    click.echo(example_config_text(), nl=False)


@config.command("reference")
def config_reference() -> None:
    """Print the reference of every key (docs/configuration.md is this output)."""
    click.echo(reference_markdown(), nl=False)
