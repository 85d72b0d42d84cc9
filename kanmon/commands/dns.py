"""`kanmon dns check`: the DNS health check from the command line.

Role: parse options, build the source and targets (dnscheck/targets.py), run the checks and print
one line per finding and a summary (or JSON). Exit 0 all good, 1 warnings, 2 errors;
a usage, config, zone-file or key error is also exit 2, with a message and no traceback.

Trusts: nothing from argv: IPs, names and endpoints are validated here.
Never: use the system resolver when --zone or --server (or [dns] servers) is given.
"""

from __future__ import annotations

import ipaddress
import sys

import click

from kanmon.commands.admin_session import AdminSession
from kanmon.commands.options import config_option, json_option, load_or_exit, load_with_path, shown
from kanmon.config import parse_hostport
from kanmon.units import format_duration
from kanmon.escape import json_for_terminal


def _ip(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> tuple[str, ...]:
    out = []
    for v in values:
        try:
            out.append(str(ipaddress.ip_address(v)))
        except ValueError:
            raise click.BadParameter(f"{v!r} is not an IP address") from None
    return tuple(out)


def _server(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[str, int] | None:
    if value is None:
        return None
    try:
        return parse_hostport(value if ":" in value else f"{value}:53")
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


@click.group("dns")
def dns() -> None:
    """DNS health check (the MX/A/PTR/SPF mistakes that make servers refuse our mail) and the DNS cache."""


@dns.command("check")
@click.argument("domain", required=False)
@click.option("--ip", "ips", multiple=True, callback=_ip, help="Our outgoing address (repeatable). Default: from the config.")
@click.option("--helo", default=None, help="The name we announce in EHLO. Default: from the config.")
@click.option("--zone", "zones", multiple=True, type=click.Path(dir_okay=False),
              help="Check this BIND zone file (repeatable: forward and reverse zones), no DNS server used.")
@click.option("--server", default=None, callback=_server, metavar="HOST:PORT",
              help="Ask this DNS server. Default: [dns] servers from the config, else the system resolver.")
@click.option("--dkim-selector", default=None, help="DKIM selector to check. Default: [dnscheck] dkim_selector.")
@click.option("--dkim-key", default=None, type=click.Path(dir_okay=False),
              help="Our DKIM key (PEM) to compare with DNS. Default: [dnscheck] dkim_key.")
@click.option("--show", is_flag=True,
              help="Also print every record looked at (like nslookup's ls -d), to review a zone run by someone else.")
@json_option("Print the report as JSON.")
@config_option
def check(
    domain: str | None,
    ips: tuple[str, ...],
    helo: str | None,
    zones: tuple[str, ...],
    server: tuple[str, int] | None,
    dkim_selector: str | None,
    dkim_key: str | None,
    show: bool,
    as_json: bool,
    config_path: str | None,
) -> None:
    """Check DOMAIN's MX, reverse DNS of our IPs, HELO name, SPF, DMARC, DKIM, MTA-STS, TLS-RPT.

    Without DOMAIN: [dnscheck] domains of the config, else every [[domain]] (one report each).
    Exit 0: all good; 1: warnings; 2: errors (the worst of the reports).
    """
    from kanmon.dnscheck.checks import check_domain  # noqa: PLC0415 - DNS checks (spf, cryptography) only for this command
    from kanmon.dnscheck.report import render_json, render_text  # noqa: PLC0415
    from kanmon.dnscheck.sources import RecordingSource, SourceError  # noqa: PLC0415
    from kanmon.dnscheck.targets import TargetError, load_dkim_key, make_source, make_targets  # noqa: PLC0415

    if zones and server:
        raise click.UsageError("--zone and --server exclude each other: zone files are checked without DNS")
    # The config every command finds (-c, $KANMON_CONFIG, /etc/kanmon/kanmon.toml); the
    # embedded default's names are examples, so with it nothing is defaulted.
    config, found = load_with_path(config_path)
    if found is None:
        config = None
    if domain is None and config is None:
        raise click.UsageError("give DOMAIN: without a config file (-c, $KANMON_CONFIG, /etc/kanmon/kanmon.toml) "
                               "there is no [[domain]] to check")
    try:
        key = load_dkim_key(dkim_key) if dkim_key else None
        source = make_source(config, server, zones)
        targets = make_targets(config, [domain] if domain else [], ips, helo, dkim_selector, key)
    except (SourceError, TargetError) as e:
        click.echo(f"kanmon: {e}", err=True)
        sys.exit(2)
    if not targets:
        raise click.UsageError(f"give DOMAIN: {found} has no [[domain]] and no [dnscheck] domains")
    reports = []
    recorder = RecordingSource(source) if show else None
    for t in targets:
        report = check_domain(recorder or source, t)
        if recorder is not None:
            report.looked_at = recorder.take()
        reports.append(report)
    if as_json:
        click.echo(render_json(reports), nl=False)
    else:
        click.echo(render_text(reports, colour=sys.stdout.isatty()), nl=False)
    sys.exit(max(r.exit_code for r in reports))


@dns.group("cache")
def cache() -> None:
    """The running node's DNS cache (answers kept for their TTL, positive and negative)."""


@cache.command("show")
@click.option("--limit", type=click.IntRange(min=0), default=50, show_default=True,
              help="Answers listed, most recently used first (the counts cover them all).")
@json_option("Counts and answers as JSON.")
@config_option
def cache_show(limit: int, as_json: bool, config_path: str | None) -> None:
    """Counts (positive, negative, hits, misses) and the most recently used answers."""
    config = load_or_exit(config_path)
    with AdminSession(config, require_server=True) as admin:
        result = admin.call("dns_cache", {"action": "show", "limit": limit})
    if as_json:
        click.echo(json_for_terminal(result, indent=1))
        return
    click.echo(f"{result['entries']} answers ({result['positive']} positive, {result['negative']} negative; "
               f"at most {result['max_entries']}); {result['hits']} hits, {result['misses']} misses")
    for e in result["items"]:
        what = " ".join(e["records"]) if e["kind"] == "positive" else e["kind"].upper()
        click.echo(f"{shown(e['name'])} {e['type']} ({format_duration(e['ttl_left'])} left): {shown(what, limit=200)}")


@cache.command("flush")
@config_option
def cache_flush(config_path: str | None) -> None:
    """Forget every cached answer: the next lookups ask the DNS servers."""
    config = load_or_exit(config_path)
    with AdminSession(config, require_server=True) as admin:
        result = admin.call("dns_cache", {"action": "flush"})
    told = f", and the caches of {result['receivers']} receiver process(es)" if result.get("receivers") else ""
    if result.get("agents"):
        told += f", and of {result['agents']} delivery agent process(es)"
    click.echo(f"{result['flushed']} answer(s) flushed{told}")
