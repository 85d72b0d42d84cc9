"""`kanmon alert test` and `kanmon alert list`.

Role: the appliance's test button and the list of recent alerts. `alert test` asks the
running server for a test alert (kanmon.alerts.request_test_alert) and says what
happened; `alert list` reads the alert events back (kanmon.alerts.read_alerts): every
node's from the shared records with `[records] url` (`--node` picks one), else this
node's own.

Trusts: nothing from argv (the category is one of a fixed set). Never: open spool files
or the records database, or send mail itself; show alert text unescaped (it may hold
text from the network).
"""

from __future__ import annotations


import click

from kanmon.commands.options import (
    config_option,
    format_time,
    json_option,
    load_or_exit,
    parse_since,
    require_data_dir,
    shown,
)
from kanmon.config import ALERT_CATEGORIES
from kanmon.escape import json_for_terminal

WAIT_FOR_SERVER = 15.0
WAIT_FOR_DELIVERY = 10.0


@click.group()
def alert() -> None:
    """Alert mail: send a test alert, list recent alerts."""


@alert.command("test")
@config_option
@click.option("--category", type=click.Choice(ALERT_CATEGORIES), default="critical", show_default=True)
@click.option("--wait", default=WAIT_FOR_SERVER, show_default=True, help="Seconds to wait for the server.")
@click.option("--to", "to", metavar="ADDRESS",
              help="Send the test to this address instead of [alerts] to (one mailbox, local@domain).")
@click.option("--wait-delivery", default=WAIT_FOR_DELIVERY, show_default=True,
              help="Seconds to wait for the mail's delivery outcome (exit 1 when it bounced); 0: do not wait.")
def alert_test(config_path, category, to, wait, wait_delivery) -> None:
    """Ask the running server to mail a test alert now, and say whether it was delivered."""
    from kanmon.alerts import is_test_address, request_test_alert, wait_alert_delivery

    if to is not None and not is_test_address(to):
        raise click.BadParameter(shown(f"{to!r} is not a mail address (one mailbox, local@domain)"), param_hint="--to")
    cfg = load_or_exit(config_path)
    require_data_dir(cfg, config_path)
    try:
        outcome = request_test_alert(cfg.server.data_dir, category, wait, to or "")
    except FileNotFoundError:
        raise click.ClickException(f"no records in {cfg.server.data_dir}: has kanmon serve run with this config?") from None
    if outcome is None:
        raise click.ClickException(f"no running kanmon serve took the request within {wait:.0f} s")
    click.echo(shown(f"kanmon: {outcome}"))
    if category not in cfg.alerts.categories:
        # The test button mails any category; the node's real alerts of this one are not.
        click.echo(f"kanmon: note: {category} is not in [alerts] categories: real {category} alerts are "
                   "recorded (kanmon alert list), not mailed; add it there and reload to have them mailed")
    if outcome.startswith("alert not mailed"):
        raise SystemExit(1)
    qid = outcome.rpartition("(queue id ")[2].rstrip(")") if "(queue id " in outcome else None
    if not qid:
        click.echo("kanmon: follow it with `kanmon log events --since 5m --grep alert`")
        return
    # Queued is not delivered: the alert mail is sent from <>, so a server that refuses
    # it tells nobody but our records. Wait a little for its outcome, as the console does.
    final, done = wait_alert_delivery(cfg.server.data_dir, qid, wait_delivery)
    click.echo(shown(f"kanmon: delivery: {final}" if done else f"kanmon: delivery: not final after {wait_delivery:.0f} s: {final}"))
    click.echo(f"kanmon: follow it with `kanmon trace {qid}`")
    if done and "bounced for " in final:
        raise SystemExit(1)


@alert.command("list")
@config_option
@click.option("--since", default="7d", show_default=True, help="Alerts of the last DURATION.")
@click.option("--node", help="Only this node's alerts (shared records, [records] url); without it every node's.")
@json_option("JSON: {\"active\": [...], \"recent\": [...]}; each alert has a node with shared records.")
def alert_list(config_path, since, node, as_json) -> None:
    """Recent alerts, and which are still active (on every node with [records] url)."""
    import dataclasses

    from kanmon.alerts import alert_title, read_alerts

    cfg = load_or_exit(config_path)
    require_data_dir(cfg, config_path)
    if node is not None and not cfg.records.url:
        raise click.UsageError("--node reads the shared records: set [records] url (docs/cluster.md)")
    start = parse_since(since)
    try:
        recent, active = read_alerts(cfg, start, node)
    except Exception as e:
        if not cfg.records.url or not _is_database_error(e):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        click.echo(shown(f"kanmon: shared records ({cfg.records.url}): {first}"), err=True)
        raise SystemExit(1) from None
    if as_json:
        click.echo(json_for_terminal({"active": [dataclasses.asdict(a) for a in active],
                               "recent": [dataclasses.asdict(a) for a in recent]}))
        return

    def where(a) -> str:
        return f"{a.node:<10} " if cfg.records.url else ""

    def title(a) -> str:
        # The latest text, not a critical alert's key (its text masked and cut, for matching).
        return alert_title(a.category, a.key, a.text)

    whose = f", node {node}" if node else ", every node" if cfg.records.url else ""
    click.echo(f"active ({len(active)}{whose}):")
    for a in active:
        click.echo(shown(f"  {where(a)}{a.category:<12} since {format_time(a.since)}  {title(a)}"))
    click.echo(f"\nrecent ({len(recent)}):")
    for a in recent:
        click.echo(shown(f"  {format_time(a.ts)}  {where(a)}{a.category:<12} {a.state:<10} {title(a)}"))


def _is_database_error(e: Exception) -> bool:
    if isinstance(e, OSError):
        return True
    try:
        import psycopg
    except ImportError:
        return False
    return isinstance(e, psycopg.Error)
