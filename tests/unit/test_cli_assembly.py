"""kanmon/cli.py names every command group and imports each one only when it is asked for."""

from __future__ import annotations

import importlib
import json
import pkgutil
import subprocess
import sys

import click

import kanmon.commands
from kanmon.cli import COMMANDS, main


def _subcommands(group: click.Group) -> list[click.Command]:
    found = []
    for sub in group.commands.values():
        found.append(sub)
        if isinstance(sub, click.Group):
            found += _subcommands(sub)
    return found


def _top_level_commands() -> dict[str, str]:
    """Every click command defined in kanmon/commands/ that is no group's subcommand:
    its name -> its module's name."""
    defined: list[tuple[click.Command, str]] = []
    for info in pkgutil.iter_modules(kanmon.commands.__path__):
        module = importlib.import_module(f"kanmon.commands.{info.name}")
        defined += [(v, info.name) for v in vars(module).values()
                    if isinstance(v, click.Command) and getattr(v.callback, "__module__", None) == module.__name__]
    nested = {id(sub) for command, _ in defined if isinstance(command, click.Group) for sub in _subcommands(command)}
    return {command.name: name for command, name in defined if id(command) not in nested}


def test_every_command_group_is_named_and_resolves():
    ctx = click.Context(main)
    assert main.list_commands(ctx) == sorted(COMMANDS)
    for name, (module, _attr) in COMMANDS.items():
        command = main.get_command(ctx, name)
        assert isinstance(command, click.Command) and command.name == name
        assert command.callback.__module__ == f"kanmon.commands.{module}"
    assert main.get_command(ctx, "no-such-command") is None
    # a group added under kanmon/commands/ and not to COMMANDS would be missing from `kanmon`
    assert _top_level_commands() == {name: module for name, (module, _attr) in COMMANDS.items()}


def test_a_command_imports_only_its_own_group():
    """`kanmon status` does not import the other groups (importing them all cost every
    command ~0.3 s of CPU)."""
    probe = ("import json, sys\nfrom kanmon.cli import main\n"
             "try:\n    main(['status', '--help'], standalone_mode=False)\nfinally:\n"
             "    print(json.dumps(sorted(m for m in sys.modules if m.startswith('kanmon.commands.'))))\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True).stdout
    loaded = set(json.loads(out.strip().splitlines()[-1]))
    assert "kanmon.commands.status" in loaded
    assert not {"kanmon.commands.backup", "kanmon.commands.verify", "kanmon.commands.queue",
                "kanmon.commands.balance", "kanmon.commands.user"} & loaded, loaded


def test_verify_takes_its_options_before_or_after_the_address(tmp_path) -> None:
    """`kanmon verify -c FILE ADDRESS` (options first, as everywhere else) reaches the
    command as `kanmon verify ADDRESS -c FILE` does, and so do `cache`'s subcommands: the
    missing config is the error, not the option."""
    from click.testing import CliRunner

    from kanmon.cli import main

    nope = str(tmp_path / "nope.toml")
    for args in (["verify", "-c", nope, "x@example.test"], ["verify", "x@example.test", "-c", nope],
                 ["verify", "--probe", "x@example.test", "-c", nope], ["verify", "--json", "-c", nope, "x@example.test"],
                 ["verify", "-c", nope, "address", "x@example.test"], ["verify", "cache", "-c", nope, "list"],
                 ["verify", "-c", nope, "cache", "flush", "x@"]):
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 2 and "nope.toml" in r.output and "No such option" not in r.output, (args, r.output)
    r = CliRunner().invoke(main, ["verify", "--help"])
    assert r.exit_code == 0 and "address" in r.output and "cache" in r.output
