"""`kanmon dkim`: make DKIM keys and see which one signs and whether DNS publishes it.

Role: `keygen` writes a private key (0600, its directory 0700; default
<data_dir>/dkim/<domain>.<selector>.key) and prints the TXT record to publish;
`status` shows each [[dkim]] key: file, algorithm, signing or not, and whether the
record in DNS matches it (kanmon/dnscheck/dkimstatus.py). The signing itself is
kanmon/auth/dkimsign.py, in the server.

Trusts: nothing from argv: the domain and selector are checked as the config checks
them. DNS text is shown through terminal_safe.
Never: overwrite a key file without --force; print a private key; print a traceback
for an expected error (exit 2 with a message).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from pydantic import ValidationError

from kanmon.auth import dkimkeys
from kanmon.commands.options import config_option, json_option, load_or_exit
from kanmon.config import DkimSection, dkim_default_key_path, parse_hostport


def _fail(message: str) -> None:
    click.echo(f"kanmon: {message}", err=True)
    sys.exit(2)


def _server(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[str, int] | None:
    if value is None:
        return None
    try:
        return parse_hostport(value if ":" in value else f"{value}:53")
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


@click.group("dkim")
def dkim() -> None:
    """DKIM signing keys: make one, see which signs and whether DNS publishes it."""


@dkim.command("keygen")
@click.option("--domain", required=True, help="The signing domain (d=), e.g. example.test.")
@click.option("--selector", required=True, help="The selector (s=), e.g. k2026: the record is SELECTOR._domainkey.DOMAIN.")
@click.option("--algorithm", type=click.Choice(dkimkeys.ALGORITHMS), default="rsa-sha256", show_default=True,
              help="rsa-sha256 makes an RSA-2048 key; ed25519-sha256 (RFC 8463) an Ed25519 key.")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Write the private key here. Default: <data_dir>/dkim/<domain>.<selector>.key.")
@click.option("--force", is_flag=True, help="Replace an existing key file (its old key stops verifying once signing moves).")
@json_option("Print the key file and the record as JSON.")
@config_option
def keygen(domain: str, selector: str, algorithm: str, out: str | None, force: bool, as_json: bool,
           config_path: str | None) -> None:
    """Make a DKIM key: write the private key (mode 0600) and print the DNS TXT record to publish."""
    try:
        entry = DkimSection(domain=domain, selector=selector, algorithm=algorithm)
    except ValidationError as e:
        _fail("; ".join(err["msg"].removeprefix("Value error, ") for err in e.errors()))
    if out is None:
        config = load_or_exit(config_path)
        path = dkim_default_key_path(config.server.data_dir, entry.domain, entry.selector)
    else:
        path = Path(out)
    key = dkimkeys.generate_key(algorithm)
    try:
        dkimkeys.write_private_key(path, key, force=force)
    except FileExistsError:
        _fail(f"{path} exists; use --force to replace it (mail signed with the old key then fails once it is gone)")
    except OSError as e:
        _fail(f"cannot write {path}: {e.strerror or e}")
    pub = dkimkeys.public_key(key)
    name = dkimkeys.record_name(entry.domain, entry.selector)
    value = pub.record()
    if as_json:
        click.echo(json.dumps({
            "key": str(path), "domain": entry.domain, "selector": entry.selector, "algorithm": algorithm,
            "name": name, "value": value, "strings": dkimkeys.txt_strings(value),
            "zone": dkimkeys.zone_line(entry.domain, entry.selector, pub),
        }, indent=2))
        return
    click.echo(f"private key: {path} ({algorithm}, mode 0600)")
    click.echo("")
    click.echo(f"Publish this TXT record in the zone of {entry.domain}:")
    click.echo("")
    click.echo(dkimkeys.zone_line(entry.domain, entry.selector, pub))
    click.echo("")
    click.echo(f"name:  {name}")
    click.echo(f"value: {value}")
    click.echo("")
    click.echo("and configure it (active = false until the record is visible, when rotating):")
    click.echo("")
    click.echo("[[dkim]]")
    click.echo(f'domain = "{entry.domain}"')
    click.echo(f'selector = "{entry.selector}"')
    if out is not None:
        click.echo(f'key = "{path}"')
    click.echo(f'algorithm = "{algorithm}"')


@dkim.command("status")
@click.option("--server", default=None, callback=_server, metavar="HOST:PORT",
              help="Ask this DNS server. Default: [dns] servers from -c, else the system resolver.")
@json_option("Print one object per key as JSON.")
@config_option
def status(server: tuple[str, int] | None, as_json: bool, config_path: str | None) -> None:
    """Each [[dkim]] key: algorithm, key file, which one signs, and whether DNS publishes it.

    Exit 0: all good; 1: warnings (a key not signing yet is not published); 2: a signing
    key does not load or DNS does not publish it.
    """
    from kanmon.dnscheck.dkimstatus import key_statuses  # noqa: PLC0415 - DNS checks (spf, cryptography) only for this command
    from kanmon.dnscheck.report import terminal_safe  # noqa: PLC0415
    from kanmon.dnscheck.sources import SourceError  # noqa: PLC0415
    from kanmon.dnscheck.targets import make_source  # noqa: PLC0415

    config = load_or_exit(config_path)
    if not config.dkim:
        click.echo("no [[dkim]] keys configured: kanmon signs no mail (make one with kanmon dkim keygen)")
        return
    try:
        source = make_source(config, server)
    except SourceError as e:
        _fail(str(e))
    rows = key_statuses(config, source)
    if as_json:
        click.echo(json.dumps([r.as_dict() for r in rows], indent=2))
    else:
        for r in rows:
            signing = "SIGNING" if r.signing else ("not signing (active = false)" if not r.active else "NOT SIGNING")
            click.echo(f"{r.selector}._domainkey.{r.domain}  {r.algorithm}  {signing}")
            click.echo(f"    key file: {r.key_file} ({r.key})")
            click.echo(f"    DNS:      {r.dns}: {terminal_safe(r.dns_detail)}")
    sys.exit(max((int(r.severity) for r in rows), default=0))
