"""`kanmon log`, `kanmon trace`, `kanmon stats` and `kanmon records`: the records, read
for the administrator, and the shared records' schema and import.

Role: parse the options, call kanmon.records.query / pgquery / trace / stats / pg, print
text (or JSON with --json). With `[records] url` set, `kanmon log` reads the shared
records of every node (`--node` picks one). Trusts: nothing from argv (durations are validated, queries go
to SQL as parameters). Never: open spool files or write the records.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time

import click

from kanmon.commands.options import (
    TIME_HELP, cell, config_option, format_time, json_option, load_or_exit, parse_since, parse_until, progress_bar,
    require_data_dir, shown,
)
from kanmon.escape import json_for_terminal


@click.group()
def log() -> None:
    """Search the event log and the message history."""


node_option = click.option(
    "--node", help="Only this node's rows (shared records, [records] url); without it every node's.")


@contextlib.contextmanager
def shared_records(cfg):
    """The PostgreSQL errors of a command on the shared records, as a one-line message."""
    import psycopg

    try:
        yield
    except (psycopg.Error, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        click.echo(shown(f"kanmon: shared records ({cfg.records.url}): {first}"), err=True)
        raise SystemExit(1) from None


def _need_shared(cfg, node: str | None) -> bool:
    """True when the records are shared; --node without them is a usage error."""
    if cfg.records.url:
        return True
    if node is not None:
        raise click.UsageError("--node reads the shared records: set [records] url (docs/cluster.md)")
    return False


def _period(since: str | None, until: str | None) -> tuple[float | None, float | None]:
    """--since and --until as Unix times; an empty period is a usage error."""
    start, end = parse_since(since), parse_until(until)
    if start is not None and end is not None and end <= start:
        raise click.BadParameter(f"the period ends ({until}) before it starts ({since})", param_hint="--until")
    return start, end


def _since_words(since: str, last: str = "last") -> str:
    """'last 7d' for a duration, 'since 2026-12-03T19:43' for a time."""
    is_time = since[:4].isdigit() and since[4:5] == "-"
    return f"since {since}" if is_time else f"{last} {since}"


def _period_text(since: str | None, until: str | None) -> str:
    if since and until:
        return f" from {since} until {until}"
    return f" since {since}" if since else f" until {until}" if until else ""


since_option = click.option("--since", metavar="WHEN", help=f"Only from WHEN on: {TIME_HELP}.")
until_option = click.option("--until", metavar="WHEN", help="Only before WHEN (the same forms as --since).")


@log.command("events")
@config_option
@since_option
@until_option
@click.option("--id", "queue_id", help="Only lines about this queue id.")
@click.option("--grep", help="Only lines containing TEXT (case-insensitive).")
@node_option
@json_option("One JSON object per line.")
@click.option("--limit", default=10_000, show_default=True, help="At most this many lines (the newest).")
def log_events(config_path, since, until, queue_id, grep, node, as_json, limit) -> None:
    """The event log: connections, TLS, accepts, rejects, deliveries."""
    from kanmon.records.query import search_events

    cfg = load_or_exit(config_path)
    require_data_dir(cfg, config_path)
    start, end = _period(since, until)
    if _need_shared(cfg, node):
        from kanmon.records import pgquery

        with shared_records(cfg):
            rows = pgquery.search_events(cfg.records, since=start, until=end, queue_id=queue_id, grep=grep,
                                         node=node, limit=limit)
    else:
        rows = search_events(cfg.server.data_dir, since=start, until=end, queue_id=queue_id, grep=grep, limit=limit)
    if queue_id and not rows:
        click.echo(f"kanmon: no event for queue id {queue_id!r}{_period_text(since, until)}", err=True)
        raise SystemExit(1)
    for r in rows:
        if as_json:
            click.echo(json.dumps(r.as_dict()))
        else:
            where = f"{r.node} " if r.node else ""
            click.echo(shown(f"{format_time(r.ts)} {where}{r.queue_id + ': ' if r.queue_id else ''}{r.text}"))


@log.command("history")
@config_option
@since_option
@until_option
@click.option("--from", "mail_from", metavar="PATTERN",
              help="Envelope sender: contains TEXT, or a shell pattern with * and ? (*@example.com); <> is the null sender.")
@click.option("--to", "rcpt", metavar="PATTERN", help="Recipient: contains TEXT, or a shell pattern with * and ?.")
@click.option("--subject", help="Subject contains TEXT.")
@click.option("--id", "queue_id", help="This queue id.")
@click.option("--msgid", "message_id", metavar="MESSAGE-ID",
              help="This Message-ID, exactly (the angle brackets are optional).")
@node_option
@json_option("One JSON object per line.")
@click.option("--limit", default=10_000, show_default=True, help="At most this many rows (the newest).")
def log_history(config_path, since, until, mail_from, rcpt, subject, queue_id, message_id, node, as_json,
                limit) -> None:
    """The message history: one row per message and recipient."""
    from rich.console import Console
    from rich.table import Table

    from kanmon.records.query import search_history

    cfg = load_or_exit(config_path)
    require_data_dir(cfg, config_path)
    shared = _need_shared(cfg, node)
    start, end = _period(since, until)
    if shared:
        from kanmon.records import pgquery

        with shared_records(cfg):
            rows = pgquery.search_history(cfg.records, since=start, until=end, mail_from=mail_from, rcpt=rcpt,
                                          subject=subject, queue_id=queue_id, message_id=message_id, node=node,
                                          limit=limit)
    else:
        rows = search_history(
            cfg.server.data_dir, since=start, until=end, mail_from=mail_from, rcpt=rcpt, subject=subject,
            queue_id=queue_id, message_id=message_id, limit=limit,
        )
    if as_json:
        for r in rows:
            click.echo(json_for_terminal(r.as_dict()))
        return
    table = Table(box=None, header_style="bold")
    cols = ("time", "client", "from", "to", "subject", "size", "class", "disposition", "queue id", "status")
    for col in (*cols, "node") if shared else cols:
        table.add_column(col, overflow="fold")
    for r in rows:
        # Every cell is text, not markup: subjects and addresses come from the network.
        # The null sender is <>; a refusal before any MAIL command has no sender: "-".
        sender = "-" if r.mail_from is None else r.mail_from or "<>"
        values = (format_time(r.ts), r.client_ip, sender, r.rcpt, r.subject, str(r.size),
                  r.classification, r.disposition, r.queue_id, r.status)
        table.add_row(*(cell(v) for v in ((*values, r.node) if shared else values)))
    Console(width=200 if not sys.stdout.isatty() else None).print(table)


@click.command()
@config_option
@click.argument("query")
@click.option("--since", metavar="WHEN", default="7d", show_default=True, help=f"Only messages from WHEN on: {TIME_HELP}.")
@node_option
@json_option("One JSON object per message.")
def trace(config_path, query, since, node, as_json) -> None:
    """One timeline per message: QUERY is a queue id, a Message-ID or an address."""
    from kanmon.records.trace import trace as find

    cfg = load_or_exit(config_path)
    require_data_dir(cfg, config_path)
    if _need_shared(cfg, node):
        from kanmon.records import pgquery

        with shared_records(cfg):
            timelines = pgquery.trace(cfg.records, query, parse_since(since), node=node)
    else:
        timelines = find(cfg.server.data_dir, query, parse_since(since))
    if as_json:
        for t in timelines:
            click.echo(json_for_terminal(t.as_dict()))
        return
    if not timelines:
        click.echo(f"kanmon: nothing found for {query!r} {_since_words(since, 'in the last')}", err=True)
        raise SystemExit(1)
    for n, t in enumerate(timelines):
        if n:
            click.echo()
        head = t.queue_id or "(rejected, not queued)"
        # Message-IDs, addresses, subjects, EHLO names and replies come from the network.
        nodes = t.nodes()  # shared records: every node its steps come from, each line names its own
        click.echo(shown(f"{head}  {t.message_id or '-'}" + (f"  on {', '.join(nodes)}" if nodes else "")))
        width = max((len(s.node) for s in t.steps), default=0)
        click.echo(shown(f"  from=<{t.mail_from}> to=" + ", ".join(f"<{r}>" for r in t.rcpts)
                         + (f"  size={t.size}" if t.size else "") + (f"  subject={t.subject!r}" if t.subject else "")))
        if t.client_ip:
            click.echo(shown(f"  client {t.client_ip}" + (f" EHLO {t.helo}" if t.helo else "")))
        for s in t.steps:
            extra = ""
            if s.detail.get("tls"):
                extra = f"  [TLS {s.detail['tls']}]"
            elif s.kind == "delivery" and s.detail.get("mailer") == "esmtp" and s.detail.get("status") != "Deferred":
                extra = "  [no TLS]"
            if s.kind == "connect" and s.detail.get("helo"):
                extra += f"  [EHLO {s.detail['helo']}]"
            text = "the message left the queue" if s.kind == "removed" else s.text  # its log line is just "removed"
            node = f"{s.node:<{width}} " if width else ""
            click.echo(shown(f"  {format_time(s.ts)}  {node}{s.step:<9} {text}{extra}"))
        click.echo(f"  final: {t.final}")


@click.command()
@config_option
@click.option("--by", type=click.Choice(["hour", "day"]), default="day", show_default=True, help="Bucket size.")
@click.option("--since", metavar="WHEN", default="7d", show_default=True, help=f"From WHEN on: {TIME_HELP}.")
@until_option
@json_option("The whole report as one JSON object.")
@click.option("--top", default=10, show_default=True, help="How many top senders, recipients and domains.")
@click.option("--tls", "tls_reports", is_flag=True,
              help="Outbound TLS instead: sessions and failures per destination policy domain (the TLS-RPT daily reports).")
@node_option
def stats(config_path, by, since, until, as_json, top, tls_reports, node) -> None:
    """Mail volume: received, delivered, deferred, bounced, rejected, bytes; top senders,
    recipients and destination domains. With --tls: outbound TLS sessions and policy
    failures per destination domain (MTA-STS, DANE, tls_policy; RFC 8460 reports)."""
    from rich.console import Console
    from rich.table import Table

    from kanmon.records.stats import collect

    cfg = load_or_exit(config_path)
    require_data_dir(cfg, config_path)
    shared = _need_shared(cfg, node)
    if tls_reports:
        if node is not None:
            raise click.UsageError("--tls reads this node's own reports: no --node")
        if until is not None:
            raise click.UsageError("--tls reads the day reports since --since: no --until")
        _tls_stats(cfg, since, as_json)
        return
    start, end = _period(since, until)
    if shared:
        from kanmon.records import pgquery

        with shared_records(cfg):
            report = pgquery.collect(cfg.records, start, end, by=by, top=top, node=node)
    else:
        with progress_bar("counting", not as_json) as progress:
            report = collect(cfg.server.data_dir, start, end, by=by, top=top, progress=progress)
    if as_json:
        click.echo(json_for_terminal(report.as_dict()))
        return
    console = Console(width=120, force_terminal=False)
    whose = f", node {node}" if node else ", every node" if shared else ""
    period = f"from {since} until {until}" if until else _since_words(since)
    table = Table(box=None, header_style="bold", title=f"by {by}, {period}{whose}")
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
                        ("top destination domains", report.top_domains), ("rejected by check", report.rejected_by_check),
                        ("connections refused by check", report.connections_refused_by_check)):
        console.print(f"\n{title}:")
        for name, count in rows:
            console.print(f"  {count:>8}  {shown(name)}", markup=False, highlight=False)


def _tls_stats(cfg, since: str, as_json: bool) -> None:
    """`kanmon stats --tls`: the day reports of kanmon.records.tlsrpt, one row per domain."""
    from rich.console import Console
    from rich.table import Table

    from kanmon.records.tlsrpt import read_reports, report_dir

    start = parse_since(since) or 0.0
    reports = read_reports(cfg.server.data_dir, start, time.time())
    if as_json:
        click.echo(json_for_terminal(reports))
        return
    if not reports:
        click.echo(f"no outbound TLS sessions counted in the last {since} (reports in {report_dir(cfg.server.data_dir)})")
        return
    console = Console(width=140, force_terminal=False)
    table = Table(box=None, header_style="bold", title=f"outbound TLS by destination, last {since} (UTC days)")
    for col in ("day", "domain", "policy", "sessions ok", "failed", "failures"):
        table.add_column(col, justify="right" if col in ("sessions ok", "failed") else "left")
    for report in reports:
        day = report["date-range"]["start-datetime"][:10]
        for p in report["policies"]:
            summary = p["summary"]
            failures: dict[str, int] = {}
            for row in p["failure-details"]:
                failures[row["result-type"]] = failures.get(row["result-type"], 0) + row["failed-session-count"]
            text = ", ".join(f"{k} {v}" for k, v in sorted(failures.items(), key=lambda kv: -kv[1]))
            # cell(): the domain and names came from the network; never read as markup.
            table.add_row(day, cell(p["policy"]["policy-domain"]), cell(p["policy"]["policy-type"]),
                          str(summary["total-successful-session-count"]), str(summary["total-failure-session-count"]),
                          cell(text))
    console.print(table)
    console.print(f"\nreports (RFC 8460 JSON): {report_dir(cfg.server.data_dir)}", markup=False, highlight=False)


@click.group()
def records() -> None:
    """The shared records in PostgreSQL ([records] url): schema and import."""


@records.command("migrate")
@config_option
@click.option("--check", is_flag=True, help="Change nothing: exit 1 when migrations are pending (for CI and deploys).")
def records_migrate(config_path, check) -> None:
    """Bring the shared records' schema to this kanmon's version (nodes also do it at
    start; versions in the database that this kanmon does not know are refused)."""
    from kanmon.records import pg

    cfg = load_or_exit(config_path)
    if not cfg.records.url:
        raise click.UsageError("no shared records: set [records] url (docs/cluster.md)")
    with shared_records(cfg), pg.connect(cfg.records.url, cfg.records.password_file, autocommit=True) as conn:
        newer = pg.newer_than_known(conn)
        if newer:
            click.echo(f"kanmon: the shared records have schema version(s) {', '.join(map(str, newer))}, newer than "
                       f"this kanmon knows: upgrade kanmon", err=True)
            raise SystemExit(2)
        waiting = pg.pending(conn)
        if check:
            for m in waiting:
                click.echo(f"pending: {m.version} {m.description}")
            if waiting:
                raise SystemExit(1)
            click.echo("schema up to date")
            return
        done = pg.migrate(conn)
    for m in done:
        click.echo(f"applied: {m.version} {m.description}")
    if not done:
        click.echo("schema up to date")


@records.command("export")
@config_option
@click.option("--since", required=True, help="Rows of the last DURATION (e.g. 30d), or since a DATE (YYYY-MM-DD).")
def records_export(config_path, since) -> None:
    """Copy this node's SQLite history and events into the shared records, under its node
    name. Run again, it copies nothing twice."""
    from kanmon.records import pg, pgexport

    cfg = load_or_exit(config_path)
    require_data_dir(cfg, config_path)
    if not cfg.records.url:
        raise click.UsageError("no shared records: set [records] url (docs/cluster.md)")
    start = _since_date(since)
    node = cfg.records.node or cfg.server.hostname
    with shared_records(cfg), pg.connect(cfg.records.url, cfg.records.password_file, autocommit=True) as conn:
        pg.migrate(conn)
        events, history = pgexport.export_sqlite(conn, cfg.server.data_dir, node, start)
    click.echo(f"exported to node {node}: {events} event(s), {history} history row(s) (already there: skipped)")


def _since_date(text: str) -> float:
    """--since as a DATE (local midnight) or a DURATION ago."""
    import datetime

    try:
        return datetime.datetime.strptime(text, "%Y-%m-%d").timestamp()
    except ValueError:
        return parse_since(text)
