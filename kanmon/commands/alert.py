"""`kanmon alert test` and `kanmon alert list`.

Role: the appliance's test button and the list of recent alerts. `alert test` asks the
running server for a test alert (kanmon.alerts.request_test_alert) and says what
happened; `alert list` reads the alert events back (kanmon.alerts.recent_alerts).

Trusts: nothing from argv (the category is one of a fixed set). Never: open spool files
or the records database, or send mail itself.
"""

from __future__ import annotations

import json

import click

from kanmon.commands.options import config_option, format_time, json_option, load_or_exit, parse_since, require_data_dir
from kanmon.config import ALERT_CATEGORIES

WAIT_FOR_SERVER = 15.0


@click.group()
def alert() -> None:
    """Alert mail: send a test alert, list recent alerts."""


@alert.command("test")
@config_option
@click.option("--category", type=click.Choice(ALERT_CATEGORIES), default="critical", show_default=True)
@click.option("--wait", default=WAIT_FOR_SERVER, show_default=True, help="Seconds to wait for the server.")
def alert_test(config_path, category, wait) -> None:
    """Ask the running server to mail a test alert now."""
    from kanmon.alerts import request_test_alert

    cfg = load_or_exit(config_path)
    require_data_dir(cfg, config_path)
    try:
        outcome = request_test_alert(cfg.server.data_dir, category, wait)
    except FileNotFoundError:
        raise click.ClickException(f"no records in {cfg.server.data_dir}: has kanmon serve run with this config?") from None
    if outcome is None:
        raise click.ClickException(f"no running kanmon serve took the request within {wait:.0f} s")
    click.echo(f"kanmon: {outcome}")
    if outcome.startswith("alert not mailed"):
        raise SystemExit(1)
    qid = outcome.rpartition("(queue id ")[2].rstrip(")") if "(queue id " in outcome else None
    click.echo(f"kanmon: follow it with `kanmon trace {qid}`" if qid
               else "kanmon: follow it with `kanmon log events --since 5m --grep alert`")


@alert.command("list")
@config_option
@click.option("--since", default="7d", show_default=True, help="Alerts of the last DURATION.")
@json_option("JSON: {\"active\": [...], \"recent\": [...]}.")
def alert_list(config_path, since, as_json) -> None:
    """Recent alerts, and which are still active."""
    import dataclasses

    from kanmon.alerts import recent_alerts

    cfg = load_or_exit(config_path)
    require_data_dir(cfg, config_path)
    start = parse_since(since)
    recent, active = recent_alerts(cfg.server.data_dir, start)
    if as_json:
        click.echo(json.dumps({"active": [dataclasses.asdict(a) for a in active],
                               "recent": [dataclasses.asdict(a) for a in recent]}, ensure_ascii=False))
        return
    click.echo(f"active ({len(active)}):")
    for a in active:
        click.echo(f"  {a.category:<12} since {format_time(a.since)}  {a.key}: {a.text.splitlines()[0] if a.text else ''}")
    click.echo(f"\nrecent ({len(recent)}):")
    for a in recent:
        click.echo(f"  {format_time(a.ts)}  {a.category:<12} {a.state:<10} {a.key}: {a.text.splitlines()[0] if a.text else ''}")
