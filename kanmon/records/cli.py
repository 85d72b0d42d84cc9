"""`kanmon trace` and `kanmon stats`: the records, read for the administrator.

Role: parse the options, call kanmon.records.trace / kanmon.records.stats, print text
(or JSON with --json). Trusts: nothing from argv (durations are validated, queries go
to SQL as parameters). Never: open spool files or write the records.
"""

from __future__ import annotations

import json
import time

import click

from kanmon.cli import config_option, format_time, load_or_exit, parse_since


@click.command()
@config_option
@click.argument("query")
@click.option("--since", default="7d", show_default=True, help="Only messages of the last DURATION.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per message.")
def trace(config_path, query, since, as_json) -> None:
    """One timeline per message: QUERY is a queue id, a Message-ID or an address."""
    from kanmon.records.trace import trace as find

    cfg = load_or_exit(config_path)
    timelines = find(cfg.server.data_dir, query, parse_since(since))
    if as_json:
        for t in timelines:
            click.echo(json.dumps(t.as_dict(), ensure_ascii=False))
        return
    if not timelines:
        click.echo(f"kanmon: nothing found for {query!r} in the last {since}", err=True)
        raise SystemExit(1)
    for n, t in enumerate(timelines):
        if n:
            click.echo()
        head = t.queue_id or "(rejected, not queued)"
        click.echo(f"{head}  {t.message_id or '-'}")
        click.echo(f"  from=<{t.mail_from}> to=" + ", ".join(f"<{r}>" for r in t.rcpts)
                   + (f"  size={t.size}" if t.size else "") + (f"  subject={t.subject!r}" if t.subject else ""))
        if t.client_ip:
            click.echo(f"  client {t.client_ip}" + (f" EHLO {t.helo}" if t.helo else ""))
        for s in t.steps:
            extra = ""
            if s.detail.get("tls"):
                extra = f"  [TLS {s.detail['tls']}]"
            elif s.step == "attempt" and "mailer=esmtp" in s.text and "stat=Deferred" not in s.text:
                extra = "  [no TLS]"
            if s.detail.get("helo"):
                extra += f"  [EHLO {s.detail['helo']}]"
            click.echo(f"  {format_time(s.ts)}  {s.step:<9} {s.text}{extra}")
        click.echo(f"  final: {t.final}")


@click.command()
@config_option
@click.option("--by", type=click.Choice(["hour", "day"]), default="day", show_default=True, help="Bucket size.")
@click.option("--since", default="7d", show_default=True, help="The last DURATION.")
@click.option("--json", "as_json", is_flag=True, help="The whole report as one JSON object.")
@click.option("--top", default=10, show_default=True, help="How many top senders, recipients and domains.")
def stats(config_path, by, since, as_json, top) -> None:
    """Mail volume: received, delivered, deferred, bounced, rejected, bytes; top senders,
    recipients and destination domains."""
    from rich.console import Console
    from rich.table import Table

    from kanmon.records.stats import collect

    cfg = load_or_exit(config_path)
    report = collect(cfg.server.data_dir, parse_since(since), by=by, top=top)
    if as_json:
        click.echo(json.dumps(report.as_dict(), ensure_ascii=False))
        return
    console = Console(width=120, force_terminal=False)
    table = Table(box=None, header_style="bold", title=f"by {by}, last {since}")
    cols = ("start", "received", "bytes", "delivered", "deferred", "bounced", "rejected")
    for col in cols:
        table.add_column(col, justify="left" if col == "start" else "right")
    fmt = "%Y-%m-%d %H:00" if by == "hour" else "%Y-%m-%d"
    for b in [*report.buckets, report.totals]:
        label = "total" if b is report.totals else time.strftime(fmt, time.localtime(b.start))
        table.add_row(label, str(b.received), str(b.bytes), str(b.delivered), str(b.deferred), str(b.bounced),
                      str(b.rejected))
    console.print(table)
    for title, rows in (("top senders", report.top_senders), ("top recipients", report.top_recipients),
                        ("top destination domains", report.top_domains)):
        console.print(f"\n{title}:")
        for name, count in rows:
            console.print(f"  {count:>8}  {name}", markup=False, highlight=False)
