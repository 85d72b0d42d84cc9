"""`kanmon admin`: the web console's administrators (add, list, remove, passwords, API tokens).

Role: the commands for console accounts (kanmon.admin.accounts does the work; the file
is <data_dir>/admins.json). A running console sees a change at its next request. Every
change is an `audit:` line in the event log (`kanmon log events --grep audit:`).
Trusts: nothing from argv (names and roles are checked). Passwords come from a prompt
(asked twice) or, with --password-stdin, the first line of standard input; with no
terminal and no --password-stdin the command exits 2.
Never: echo a password, print a stored token (a new one is shown once), or print a
traceback for an expected error.
"""

from __future__ import annotations

import json
import sys

import click

from kanmon.admin.accounts import LANGUAGES, ROLES, AccountError, AdminAccounts, audit_offline
from kanmon.commands.options import ask_new_password, config_option, format_time, json_option, load_or_exit


def _fail(message: str, code: int = 2) -> None:
    click.echo(f"kanmon: {message}", err=True)
    sys.exit(code)


def _password(from_stdin: bool) -> str:
    return ask_new_password(from_stdin, "--password-stdin")


def _open(config_path):
    cfg = load_or_exit(config_path)
    return cfg, AdminAccounts(cfg.server.data_dir)


@click.group("admin")
def admin() -> None:
    """Web console administrators: add, list, remove, passwords, API tokens."""


@admin.command("add")
@click.argument("name")
@click.option("--role", type=click.Choice(ROLES), required=True,
              help="admin: everything; operator: queue, quarantine, alert test; auditor: read only.")
@click.option("--password-stdin", "from_stdin", is_flag=True, help="Read the password from the first line of standard input.")
@config_option
def add(name: str, role: str, from_stdin: bool, config_path) -> None:
    """Add administrator NAME with a role (prompts for the password twice)."""
    cfg, accounts = _open(config_path)
    password = _password(from_stdin)
    try:
        accounts.add(name, role, password)
    except (AccountError, OSError) as e:
        _fail(f"{e}; nothing changed")
    audit_offline(cfg, name, role, "admin add", name)
    click.echo(f"admin {name} ({role}) added; log in at the console's /login")


@admin.command("list")
@config_option
@json_option()
def list_cmd(config_path, as_json: bool) -> None:
    """The administrators, their roles and whether they hold an API token."""
    _cfg, accounts = _open(config_path)
    try:
        rows = [a.public() for a in accounts.list()]
    except (AccountError, OSError) as e:
        _fail(str(e), 1)
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    if not rows:
        click.echo("no administrators (add one: kanmon admin add NAME --role admin)")
    for r in rows:
        click.echo(f"{r['name']:<24} {r['role']:<9} token={'yes' if r['token'] else 'no':<4} "
                   f"lang={r['lang'] or 'browser':<8} added {format_time(r['created'])}")


@admin.command("remove")
@click.argument("name")
@config_option
def remove(name: str, config_path) -> None:
    """Remove administrator NAME (their sessions and token stop working at once)."""
    cfg, accounts = _open(config_path)
    try:
        account = accounts.get(name)
        accounts.remove(name)
    except (AccountError, OSError) as e:
        _fail(f"{e}; nothing changed")
    audit_offline(cfg, name, account.role if account else "-", "admin remove", name)
    click.echo(f"admin {name} removed")


@admin.command("passwd")
@click.argument("name")
@click.option("--password-stdin", "from_stdin", is_flag=True, help="Read the password from the first line of standard input.")
@config_option
def passwd(name: str, from_stdin: bool, config_path) -> None:
    """Set a new password for NAME (their console sessions end)."""
    cfg, accounts = _open(config_path)
    if accounts.get(name) is None:
        _fail(f"no admin named {name!r}")
    try:
        account = accounts.set_password(name, _password(from_stdin))
    except (AccountError, OSError) as e:
        _fail(f"{e}; nothing changed")
    audit_offline(cfg, name, account.role, "admin passwd", name)
    click.echo(f"password of {name} changed")


@admin.command("role")
@click.argument("name")
@click.argument("role", type=click.Choice(ROLES))
@config_option
def role_cmd(name: str, role: str, config_path) -> None:
    """Give NAME another role."""
    cfg, accounts = _open(config_path)
    try:
        accounts.set_role(name, role)
    except (AccountError, OSError) as e:
        _fail(f"{e}; nothing changed")
    audit_offline(cfg, name, role, "admin role", f"{name} {role}")
    click.echo(f"admin {name} is now {role}")


@admin.command("lang")
@click.argument("name")
@click.argument("lang", type=click.Choice((*LANGUAGES, "browser")))
@config_option
def lang_cmd(name: str, lang: str, config_path) -> None:
    """The console's language for NAME (browser: from Accept-Language)."""
    _cfg, accounts = _open(config_path)
    try:
        accounts.set_lang(name, None if lang == "browser" else lang)
    except (AccountError, OSError) as e:
        _fail(f"{e}; nothing changed")
    click.echo(f"console language of {name}: {lang}")


@admin.command("token")
@click.argument("name")
@click.option("--revoke", is_flag=True, help="Remove NAME's token instead of making a new one.")
@config_option
def token(name: str, revoke: bool, config_path) -> None:
    """Print a new API token for NAME (replaces the previous one; shown only now).

    Use it as `Authorization: Bearer TOKEN` on /api/v1/.
    """
    cfg, accounts = _open(config_path)
    account = accounts.get(name)
    if account is None:
        _fail(f"no admin named {name!r}")
    try:
        if revoke:
            accounts.revoke_token(name)
        else:
            secret = accounts.new_token(name)
    except (AccountError, OSError) as e:
        _fail(f"{e}; nothing changed")
    audit_offline(cfg, name, account.role, "admin token revoke" if revoke else "admin token", name)
    click.echo(f"token of {name} revoked" if revoke else secret)
