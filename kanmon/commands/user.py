"""`kanmon user`: mailboxes and aliases of the users file, passwords, lock state, listing,
Sieve filters.

Role: the administrator's commands for accounts (kanmon/store/users.py does the work;
the users file is kanmon/userdb.py). The running server sees changes within a second,
without a reload.
Trusts: nothing from argv; an address that is not a mailbox exits 2 with a clear
message. Passwords come from a prompt (asked twice) or, with --stdin, the first
line of standard input; with no terminal and no --stdin the command exits 2.

Never: echo a password, accept an empty one, or print a traceback for an expected error.
"""

from __future__ import annotations

import datetime as dt
import json
import sys

import click
from rich.console import Console
from rich.table import Table

from kanmon.commands.options import (
    ask_new_password, cell, config_option, json_option, load_or_exit, require_data_dir, shown,
)
from kanmon.store.maildir import MaildirError
from kanmon.store.sieve import SieveError
from kanmon.store.sievescripts import ScriptError, ScriptStore
from kanmon.store.users import UnknownMailbox, Users
from kanmon.units import format_size


def _users(config_path: str | None) -> Users:
    return Users(load_or_exit(config_path))


def _fail(message: str, code: int = 2) -> None:
    click.echo(f"kanmon: {message}", err=True)
    sys.exit(code)


def _when(ts: float | None) -> str:
    if ts is None:
        return "never"
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


@click.group("user")
def user() -> None:
    """Mailbox accounts: add/delete, aliases, passwords, lock state, listing, Sieve filters."""


def _read_password(from_stdin: bool) -> str:
    return ask_new_password(from_stdin, "--stdin")


@user.command("add")
@click.argument("address")
@click.option("--stdin", "from_stdin", is_flag=True, help="Read the password from the first line of standard input.")
@click.option("--no-password", is_flag=True, help="Create the mailbox without a password (it cannot log in yet).")
@config_option
def add(address: str, from_stdin: bool, no_password: bool, config_path: str | None) -> None:
    """Add mailbox ADDRESS to the users file (prompts for its password twice)."""
    users = _users(config_path)
    password = None if no_password else _read_password(from_stdin)
    if password == "":
        _fail("the password is empty; nothing changed")
    try:
        users.add(address, password)
    except (ValueError, UnknownMailbox, OSError) as e:
        _fail(f"{e}; nothing changed")
    click.echo(f"mailbox {address.lower()} added")


@user.command("del")
@click.argument("address")
@config_option
def delete(address: str, config_path: str | None) -> None:
    """Remove mailbox ADDRESS from the users file (its mail stays on disk)."""
    users = _users(config_path)
    try:
        users.delete(address)
    except (ValueError, UnknownMailbox, OSError) as e:
        _fail(f"{e}; nothing changed")
    click.echo(f"mailbox {address.lower()} removed (its Maildir stays in the data directory)")


@user.command("alias")
@click.argument("address")
@click.argument("targets", nargs=-1)
@click.option("--delete", "remove", is_flag=True, help="Remove the alias.")
@config_option
def alias(address: str, targets: tuple[str, ...], remove: bool, config_path: str | None) -> None:
    """Make ADDRESS an alias of TARGETS (full addresses) in the users file; with no
    TARGETS, print the alias; --delete removes it."""
    users = _users(config_path)
    if not targets and not remove:
        found = users.aliases().get(address.lower())
        if found is None:
            _fail(f"{address.lower()} is not an alias", 1)
        click.echo(f"{address.lower()}: {', '.join(found)}")
        return
    if targets and remove:
        _fail("give TARGETS or --delete, not both")
    try:
        users.set_alias(address, [] if remove else list(targets))
    except (ValueError, UnknownMailbox, OSError) as e:
        _fail(f"{e}; nothing changed")
    click.echo(f"alias {address.lower()} {'removed' if remove else '-> ' + ', '.join(t.lower() for t in targets)}")


@user.command("passwd")
@click.argument("address")
@click.option("--stdin", "from_stdin", is_flag=True, help="Read the password from the first line of standard input.")
@config_option
def passwd(address: str, from_stdin: bool, config_path: str | None) -> None:
    """Set the password of mailbox ADDRESS (prompts twice)."""
    users = _users(config_path)
    if not users.is_mailbox(address):
        _fail(f"{address} is not a mailbox of a local domain")
    password = _read_password(from_stdin)
    if not password:
        _fail("the password is empty; nothing changed")
    try:
        users.set_password(address, password)
    except (ValueError, UnknownMailbox, OSError) as e:
        _fail(f"{e}; nothing changed")
    click.echo(f"password set for {address.lower()}")


@user.command("list")
@json_option("Print JSON instead of a table.")
@config_option
def list_users(as_json: bool, config_path: str | None) -> None:
    """List mailboxes: password set, locked, size, messages, last login."""
    cfg = load_or_exit(config_path)
    require_data_dir(cfg, config_path)
    infos = Users(cfg).list()
    if as_json:
        click.echo(
            json.dumps(
                [
                    {
                        "mailbox": i.address,
                        "has_password": i.has_password,
                        "locked": i.locked,
                        "size": i.size,
                        "messages": i.messages,
                        "last_login": i.last_login,
                        "last_ip": i.last_ip,
                    }
                    for i in infos
                ],
                indent=2,
            )
        )
        return
    table = Table(title="Mailboxes")
    for col in ("mailbox", "password", "locked", "size", "messages", "last login"):
        table.add_column(col, justify="right" if col in ("size", "messages") else "left")
    for i in infos:
        table.add_row(
            cell(i.address),
            "yes" if i.has_password else "no",
            "LOCKED" if i.locked else "",
            format_size(i.size),
            str(i.messages),
            cell(_when(i.last_login) + (f" from {i.last_ip}" if i.last_ip else "")),
        )
    Console(width=160).print(table)


def _set_locked(address: str, config_path: str | None, locked: bool) -> None:
    users = _users(config_path)
    try:
        users.set_locked(address, locked)
    except UnknownMailbox as e:
        _fail(str(e))
    click.echo(f"{address.lower()} {'locked' if locked else 'unlocked'}")


@user.command("lock")
@click.argument("address")
@config_option
def lock(address: str, config_path: str | None) -> None:
    """Refuse every login of ADDRESS (mail is still delivered)."""
    _set_locked(address, config_path, True)


@user.command("unlock")
@click.argument("address")
@config_option
def unlock(address: str, config_path: str | None) -> None:
    """Allow logins of ADDRESS again."""
    _set_locked(address, config_path, False)


@user.command("sieve")
@click.argument("address")
@click.argument("file", required=False, type=click.File("rb"))
@click.option("--name", default="kanmon", show_default=True, help="The script's name (as ManageSieve clients show it).")
@click.option("--off", is_flag=True, help="Deactivate the user's filter (the scripts stay).")
@config_option
def sieve(address: str, file, name: str, off: bool, config_path: str | None) -> None:
    """Set the Sieve filter of mailbox ADDRESS from FILE ("-": standard input) and make it
    the active one; with no FILE, print the active script. A script that does not compile
    is refused with its line and reason (docs/sieve.md)."""
    cfg = load_or_exit(config_path)
    users = Users(cfg)
    if not users.is_mailbox(address):
        _fail(f"{address} is not a mailbox of a local domain")
    store = ScriptStore(cfg.server.data_dir, address, max_size=cfg.sieve.max_script_size,
                        max_scripts=cfg.sieve.max_scripts)
    if file is not None and off:
        _fail("give FILE or --off, not both")
    try:
        if off:
            store.activate(None)
            click.echo(f"{address.lower()}: no active Sieve script")
            return
        if file is None:
            active = store.active_name()
            if active is None:
                _fail(f"{address.lower()} has no active Sieve script", 1)
            click.echo(f"# {shown(active)} (active)")
            click.echo(shown(store.get(active).decode("utf-8", "replace"), block=True))
            return
        text = file.read(cfg.sieve.max_script_size + 1)
        store.put(name, text)
        store.activate(name)
    except SieveError as e:
        _fail(f"the script does not compile: {e}; nothing changed")
    except (ScriptError, MaildirError, OSError) as e:
        _fail(f"{e}; nothing changed")
    click.echo(f"{address.lower()}: Sieve script {name!r} stored and active")
