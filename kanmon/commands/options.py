"""What every `kanmon` command group shares: the -c and --json options, finding and
loading the config, reading and showing times, and asking for a new password.

Which config a command uses, like other daemons: `-c FILE` (before or after the
subcommand: `kanmon -c FILE queue list` and `kanmon queue list -c FILE` are the same),
else $KANMON_CONFIG, else /etc/kanmon/kanmon.toml when it exists, else the embedded
default. When -c was not given the command says which one it used in one line on
stderr (never on stdout, so --json output stays clean).

Role: the one options module of the CLI. Each command group (kanmon/commands/*.py) is a
leaf that imports this module and the operations it calls, never another group;
kanmon/cli.py only assembles the groups.

Trusts: nothing from argv: a bad duration is a usage error naming the option, a bad
config prints each bad key and exits 2. Never: print a traceback for an expected error.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import click

from kanmon.configpath import CONFIG_ENV, SYSTEM_CONFIG, find_config
from kanmon.escape import for_terminal
from kanmon.config import Config, ConfigError, load_config, parse_duration

EMBEDDED = "<embedded default>"
_ROOT_KEY = "kanmon.config_path"

_CONFIG_HELP = (f"Configuration file (TOML). Without it: ${CONFIG_ENV}, then {SYSTEM_CONFIG}, "
                "then the embedded default.")


def _remember_root_config(ctx: click.Context, _param, value: str | None) -> str | None:
    if value is not None:
        ctx.meta[_ROOT_KEY] = value
    return value


# On the `kanmon` group itself (cli.py): `kanmon -c FILE queue list`.
root_config_option = click.option(
    "-c", "--config", "config_path", type=click.Path(dir_okay=False), default=None, expose_value=False,
    is_eager=True, callback=_remember_root_config, help=_CONFIG_HELP,
)

# On every command that reads a config: `kanmon queue list -c FILE`.
config_option = click.option(
    "-c",
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    default=None,
    help=_CONFIG_HELP,
)


def explicit_config_path(given: str | None) -> str | None:
    """The file -c named (on the command, else before the subcommand), or None."""
    if given is not None:
        return given
    ctx = click.get_current_context(silent=True)
    return ctx.meta.get(_ROOT_KEY) if ctx is not None else None


def resolve_config_path(given: str | None) -> tuple[str | None, str | None]:
    """(path or None for the embedded default, why it was chosen or None when -c gave it):
    -c on the command wins over -c before the subcommand; then kanmon.configpath.find_config."""
    return find_config(explicit_config_path(given), SYSTEM_CONFIG)


def json_option(help: str = "JSON instead of text."):  # noqa: A002 - click's own keyword
    """`--json` (the parameter `as_json`): machine-readable output instead of text or tables."""
    return click.option("--json", "as_json", is_flag=True, help=help)


def exit_config_error(e: ConfigError) -> None:
    """Print each bad key of a config error and exit 2."""
    for line in e.messages:
        click.echo(f"kanmon: config error: {line}", err=True)
    sys.exit(2)


def load_with_path(config_path: str | None) -> tuple[Config, str | None]:
    """(the validated config, its path or None for the embedded default); a bad config
    prints each bad key and exits 2. Says on stderr which file it used unless -c gave it."""
    path, why = resolve_config_path(config_path)
    if why is not None:
        click.echo(f"kanmon: using {path or EMBEDDED} ({why})", err=True)
    try:
        return load_config(path), path
    except ConfigError as e:
        exit_config_error(e)
        raise AssertionError("unreachable") from None


def load_or_exit(config_path: str | None) -> Config:
    """The validated config, or a clear message naming the key and exit code 2."""
    return load_with_path(config_path)[0]


def require_data_dir(config: Config, config_path: str | None = None) -> Path:
    """data_dir, which must exist: a command that reads the records or the spool never
    creates it (a wrong or forgotten -c would otherwise leave an empty kanmon-data behind
    and print nothing). Exits 1 with a message naming the config when it is missing."""
    data_dir = Path(config.server.data_dir)
    if not data_dir.is_dir():
        path, _ = resolve_config_path(config_path)
        click.echo(f"kanmon: data_dir {data_dir} does not exist (server.data_dir of {path or EMBEDDED}): "
                   "wrong config file, or kanmon serve never ran with it", err=True)
        sys.exit(1)
    return data_dir


def _isatty(stream) -> bool:
    try:
        return stream is not None and stream.isatty()
    except (AttributeError, ValueError):  # replaced or closed
        return False


def ask_new_password(from_stdin: bool, stdin_flag: str) -> str:
    """A new password: the first line of standard input (with `stdin_flag`), else asked
    twice on the terminal. With no terminal to ask on (standard input piped, redirected
    or closed) the command exits 2 and names `stdin_flag`, as passwd(1) refuses, rather
    than let getpass warn that the password may be echoed and read it from the pipe."""
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    if not _isatty(sys.stdin):
        click.echo(f"kanmon: no terminal to ask the password on: pipe it with {stdin_flag}", err=True)
        sys.exit(2)
    return click.prompt("New password", hide_input=True, confirmation_prompt="Repeat password")


@contextlib.contextmanager
def progress_bar(description: str, enabled: bool = True) -> Iterator[Callable[[int, int | None], None] | None]:
    """`with progress_bar("backing up", not as_json) as progress:` a rich progress bar on
    stderr, fed by progress(done, total or None); None (no bar, nothing printed) when
    disabled or when stdout or stderr is not a terminal (output piped or redirected, a
    cron job, a script)."""
    if not enabled or not (_isatty(sys.stdout) and _isatty(sys.stderr)):
        yield None
        return
    from rich.console import Console  # noqa: PLC0415 - only on a terminal
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int | None) -> None:
            bar.update(task, completed=done, total=total)

        yield update


TIME_HELP = "a DURATION ago (1h, 3d) or a time: 2026-12-03, 2026-12-03T19:43[:SS] (local time; or with Z, +09:00)"


def parse_since(text: str | None, option: str = "--since", now: float | None = None) -> float | None:
    """`--since 3d` -> the Unix time 3 days before now; `--since 2026-12-03T19:43` -> that
    time (ISO 8601: local time unless it says Z or an offset; a date alone is its local
    midnight). None stays None; a bad value is a usage error naming the option."""
    if text is None:
        return None
    text = text.strip()
    try:
        return (time.time() if now is None else now) - parse_duration(text)
    except ValueError as e:
        error = str(e)
    if text[:4].isdigit() and text[4:5] == "-":  # a duration never starts like a year
        import datetime

        try:
            when = datetime.datetime.fromisoformat(text)
        except ValueError:
            raise click.BadParameter(f"{text!r} is not a time (YYYY-MM-DD, YYYY-MM-DDTHH:MM[:SS], "
                                     "local unless it ends with Z or an offset such as +09:00)",
                                     param_hint=option) from None
        return when.timestamp()  # naive: local time, as mktime reads it
    raise click.BadParameter(f"{error}; or a time such as 2026-12-03T19:43", param_hint=option) from None


def parse_until(text: str | None, option: str = "--until", now: float | None = None) -> float | None:
    """`--until`: the same forms as parse_since (a DURATION is that long before now); the
    period ends before it."""
    return parse_since(text, option, now)


def format_time(ts: float | None, empty: str = "-") -> str:
    """How every command shows a time: local, to the second."""
    if not ts:
        return empty
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def shown(text: object, *, block: bool = False, limit: int | None = None) -> str:
    """Text for the terminal: control characters escaped (kanmon.escape), None as "";
    with limit, cut to that many characters and "..."."""
    out = "" if text is None else for_terminal(str(text), block=block)
    return out if limit is None or len(out) <= limit else out[:limit] + "..."


def cell(text: object):
    """A rich table cell of text from the network: shown literally (never parsed as
    markup: a Subject "[/bold]" or "[link=...]" is text), control characters escaped."""
    from rich.text import Text  # noqa: PLC0415 - rich only for the table views

    return Text(shown(text))
