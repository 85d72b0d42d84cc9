"""`kanmon quarantine ...`: the messages checks set aside, for a person to look at.

Role: list, show, release (optionally to another recipient) and delete quarantined
messages, through the running server's control socket or, when it is down, the data
directory under its lock (kanmon.commands.admin_session); the work is done by
kanmon.admin.quarantine_ops. docs/content.md is the user's page. Exit 0 on success, 1 when
an operation failed for some id, 2 for bad arguments.

Trusts: nothing in the messages: subjects, senders and reasons are printed with control
characters escaped (\\x.. escapes); --json keeps the exact text.
Never: open quarantine files itself.
"""

from __future__ import annotations

import sys

import click

from kanmon.commands.admin_session import AdminSession
from kanmon.commands.options import config_option, format_time, json_option, load_or_exit, shown
from kanmon.escape import json_for_terminal

@click.group("quarantine")
def quarantine() -> None:
    """Quarantined messages: list, show, release, delete."""


def _filter_options(fn):
    for opt in reversed([
        click.option("--kind", type=click.Choice(["admin", "spam"]), help="The admin quarantine or the users' spam quarantine."),
        click.option("--from", "mail_from", metavar="PATTERN", help="Envelope sender (* and ?, or a part of it)."),
        click.option("--to", metavar="PATTERN", help="Any recipient (* and ?, or a part of it)."),
        click.option("--reason", metavar="REGEX", help="The reason it was quarantined (a rule's name, a virus...)."),
        click.option("--older-than", metavar="DURATION", help="Quarantined longer ago than this (e.g. 7d)."),
    ]):
        fn = opt(fn)
    return fn


@quarantine.command("list")
@config_option
@_filter_options
@json_option()
def list_cmd(config_path, as_json, kind, mail_from, to, reason, older_than) -> None:
    """The quarantined messages, oldest first: id, kind, date, sender, recipients, subject, reason."""
    cfg = load_or_exit(config_path)
    filters = {"kind": kind, "from": mail_from, "to": to, "reason": reason, "older_than": older_than}
    with AdminSession(cfg) as admin:
        result = admin.call("quarantine_list", {"filters": filters})
    items = result["items"]
    if as_json:
        click.echo(json_for_terminal(result))
        return
    if not items:
        click.echo("The quarantine is empty" if not any(filters.values()) else "No message matches")
        return
    for r in items:
        if "corrupt" in r:
            click.echo(f"{r['id']}  (damaged: {shown(r['corrupt'], limit=200)})")
            continue
        click.echo(f"{r['id']}  {r['kind']:<5}  {format_time(r['stored'])}  {r['size']:>8}  {shown(r['from'], limit=200) or '<>'}")
        click.echo(f"{'':>17}to: {shown(', '.join(r['rcpts']), limit=300)}")
        click.echo(f"{'':>17}subject: {shown(r['subject'], limit=200)}")
        click.echo(f"{'':>17}why: {shown(r['reason'], limit=200)} ({r['classification']}{', score %g' % r['score'] if r['score'] else ''})")
        if r.get("node"):  # the quarantine every node shares
            click.echo(f"{'':>17}on: {r['node']}" + (f", being released by {r['releasing']}" if r.get("releasing") else ""))
    click.echo(f"-- {len(items)} message{'s' if len(items) != 1 else ''}")


@quarantine.command("show")
@click.argument("queue_id")
@click.option("--lines", default=50, show_default=True, help="Body lines to show.")
@config_option
@json_option()
def show_cmd(queue_id, lines, config_path, as_json) -> None:
    """One quarantined message: why it is here, its header and the start of its body."""
    cfg = load_or_exit(config_path)
    with AdminSession(cfg) as admin:
        r = admin.call("quarantine_show", {"id": queue_id, "lines": lines})
    if as_json:
        click.echo(json_for_terminal(r))
        return
    click.echo(f"id: {r['id']} ({r['kind']} quarantine, since {format_time(r['stored'])})")
    click.echo(f"why: {shown(r['reason'], limit=200)}; check {r['check'] or '-'}; {r['classification']}"
               + (f", score {r['score']:g}" if r["score"] else ""))
    click.echo(f"from: {shown(r['from'], limit=200) or '<>'} (client {r['client'] or '-'})")
    click.echo(f"to: {shown(', '.join(r['rcpts']), limit=500)}")
    click.echo(f"subject: {shown(r['subject'], limit=200)}")
    click.echo("")
    for line in r["header"].split("\r\n"):
        click.echo(shown(line, limit=500, block=True))  # a folded field's tab is kept
    click.echo("")
    for line in r["body"]:
        click.echo(shown(line, limit=500, block=True))
    click.echo("")
    click.echo(f"To deliver it: kanmon quarantine release {r['id']}   To remove it: kanmon quarantine delete {r['id']}")


@quarantine.command("release")
@click.argument("queue_ids", nargs=-1, required=True)
@click.option("--to", "to", multiple=True, metavar="ADDRESS", help="Deliver to this recipient instead (repeat for several).")
@config_option
@json_option()
def release_cmd(queue_ids, to, config_path, as_json) -> None:
    """Send quarantined messages on to their recipients (or --to others); `kanmon trace ID` follows them."""
    for addr in to:
        if "@" not in addr or any(c.isspace() or ord(c) < 32 for c in addr):
            click.echo(f"kanmon: --to {addr!r} is not an address", err=True)
            sys.exit(2)
    cfg = load_or_exit(config_path)
    with AdminSession(cfg) as admin:
        r = admin.call("quarantine_release", {"ids": list(queue_ids), "to": list(to) or None, "by": "kanmon quarantine release"})
    _report(r, "released", as_json)


@quarantine.command("delete")
@click.argument("queue_ids", nargs=-1, required=True)
@config_option
@json_option()
def delete_cmd(queue_ids, config_path, as_json) -> None:
    """Remove quarantined messages for good."""
    cfg = load_or_exit(config_path)
    with AdminSession(cfg) as admin:
        r = admin.call("quarantine_delete", {"ids": list(queue_ids), "by": "kanmon quarantine delete"})
    _report(r, "deleted", as_json)


def _report(r: dict, verb: str, as_json: bool) -> None:
    if as_json:
        click.echo(json_for_terminal(r))
    else:
        for qid in r[verb]:
            click.echo(f"{qid}: {verb}")
        for err in r["errors"]:
            click.echo(f"kanmon: {shown(err, limit=200)}", err=True)
    sys.exit(1 if r["errors"] else 0)


@quarantine.command("digest")
@click.option("--since", "since", default="1d", show_default=True, metavar="DURATION",
              help="List what arrived in this last period.")
@click.option("--dry-run", is_flag=True, help="Only say who would get a digest and of how many messages.")
@config_option
@json_option()
def digest_cmd(since, dry_run, config_path, as_json) -> None:
    """Mail each recipient the list of their spam quarantine now (as [quarantine] digest does on its schedule)."""
    from kanmon.config import parse_duration  # noqa: PLC0415 - a value check, only here

    try:
        seconds = parse_duration(since)
    except ValueError as e:
        click.echo(f"kanmon: --since: {e}", err=True)
        sys.exit(2)
    cfg = load_or_exit(config_path)
    with AdminSession(cfg) as admin:
        r = admin.call("quarantine_digest", {"since_ago": seconds, "dry_run": dry_run})
    if as_json:
        click.echo(json_for_terminal(r))
        return
    if not r["digests"]:
        click.echo("No spam quarantined for anyone in that period: no digest")
    for rcpt, n in r["digests"].items():
        click.echo(f"{shown(rcpt, limit=200)}: {n} message{'s' if n != 1 else ''}" + (" (dry run: not sent)" if dry_run else ": digest queued"))
