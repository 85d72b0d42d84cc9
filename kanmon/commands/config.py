"""`kanmon config ...`: check, print and document configuration files.

Role: validate a config completely (the models, then what only the roles can see, such
as the balancer's duplicates, then what serve will hit on this host: kanmon.admin.preflight),
print the commented example and the key reference.
Trusts: nothing from argv. Never: start anything (a test bind is closed at once; nothing
listens).
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from kanmon.commands.options import EMBEDDED, config_option, exit_config_error, json_option, resolve_config_path
from kanmon.config import ConfigError, example_config_text, load_config, parse_hostport, reference_markdown
from kanmon.escape import json_for_terminal


@click.group()
def config() -> None:
    """Check, print and document configuration files."""


@config.command("check")
@config_option
@json_option("The findings as JSON: {\"config\": ..., \"findings\": [{\"severity\", \"key\", \"text\"}]}.")
def config_check(config_path: str | None, as_json: bool) -> None:
    """Validate a configuration and check what `kanmon serve` will hit on this host.

    Beyond every key's value: listen addresses bindable (or held by the running kanmon
    for this data_dir), the same address in two sections, the [tls] certificate and key
    (a pair, not expired), mailbox and alias names that differ only in case, CIDRs with
    host bits set, files readable and data_dir writable (checked as the current user).

    Exit 0: usable (notes only); 1: warnings only; 2: errors (or a bad key).
    """
    from kanmon.admin.preflight import exit_code, preflight, raw_toml  # noqa: PLC0415
    from kanmon.admin.status import fetch_status  # noqa: PLC0415

    def refused(e: ConfigError, name: str) -> None:
        if as_json:  # the errors as findings too: a script reading --json gets them
            click.echo(json_for_terminal({"config": name, "findings": [
                {"severity": "error", "key": "", "text": line} for line in e.messages]}, indent=1))
            sys.exit(2)
        exit_config_error(e)

    path, why = resolve_config_path(config_path)
    if why is not None:
        click.echo(f"kanmon: using {path or EMBEDDED} ({why})", err=True)
    try:
        cfg = load_config(path)
    except ConfigError as e:
        refused(e, path or EMBEDDED)
        raise AssertionError("unreachable") from None
    if cfg.balancer is not None:
        from kanmon.balancer.service import validate_balancer  # noqa: PLC0415 - only with a balancer

        try:
            validate_balancer(cfg)  # what the models alone cannot see (duplicates, ICMP privilege)
        except ConfigError as e:
            refused(e, path or EMBEDDED)
    doc, _why = fetch_status(Path(cfg.server.data_dir))
    ours = {parse_hostport(entry["address"]) for entry in doc["listeners"]} if doc else set()
    findings = preflight(cfg, raw_toml(path), ours)
    code = exit_code(findings)
    name = path or EMBEDDED
    if as_json:
        click.echo(json_for_terminal({"config": name, "findings": [f.as_dict() for f in findings]}, indent=1))
        sys.exit(code)
    for f in findings:
        click.echo(f"{f.severity.upper():<7} {f.key}: {f.text}", err=f.severity != "note")
    counts = [f"{n} {what}{'s' if n != 1 else ''}" for what, n in
              (("error", sum(f.severity == "error" for f in findings)),
               ("warning", sum(f.severity == "warning" for f in findings))) if n]
    click.echo(f"{name}: " + (", ".join(counts) if counts else "ok"))
    sys.exit(code)


@config.command("example")
def config_example() -> None:
    """Print a complete, commented example configuration."""
    click.echo(example_config_text(), nl=False)


@config.command("reference")
def config_reference() -> None:
    """Print the reference of every key (docs/configuration.md is this output)."""
    click.echo(reference_markdown(), nl=False)
