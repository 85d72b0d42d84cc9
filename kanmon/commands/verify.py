"""`kanmon verify`: what the relay would answer to RCPT TO, and the verification cache.

Role: `kanmon verify ADDRESS` (the same as `kanmon verify address ADDRESS`) prints the
reply an internet client would get at RCPT and why (list, cache hit, probe result);
`kanmon verify cache list|flush` shows and empties the cache the receivers share. The
work is done by kanmon.admin.verify. Exit 0 when the address would be accepted, 1 when
refused or deferred, 2 for a usage or config error.

Trusts: nothing from argv (the address is parsed like a RCPT argument).
Never: open the state database itself, or print a traceback for an expected error.
"""

from __future__ import annotations

import json
import sys

import click

from kanmon.admin.verify import BadAddress, explain_address, flush_cache, list_cache, reply_text
from kanmon.commands.options import config_option, format_time, json_option, load_or_exit


_VALUED = ("-c", "--config")  # the options before a subcommand that take a value


class _OptionsFirst(click.Group):
    """A group whose subcommand's options may come before its name, as `-c FILE` may
    anywhere else (`kanmon verify cache -c FILE list`): they are moved after it. With
    `default`, a first argument that names no subcommand is that command's
    (`kanmon verify -c FILE x@y` runs `address`)."""

    default: str | None = None

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        i = 0
        while i < len(args) and args[i].startswith("-") and args[i] != "--":
            i += 2 if args[i] in _VALUED else 1
        if i < len(args) and args[i] != "--":
            if args[i] in self.commands:
                args = [args[i], *args[:i], *args[i + 1:]]
            elif self.default is not None:
                args = [self.default, *args]
        return super().parse_args(ctx, args)


class _AddressGroup(_OptionsFirst):
    """`kanmon verify x@y` runs `address`."""

    default = "address"


@click.group("verify", cls=_AddressGroup)
def verify() -> None:
    """Recipient verification: `kanmon verify ADDRESS` shows what RCPT TO:<ADDRESS> gets and why."""


@verify.command("address")
@click.argument("address")
@click.option("--probe", is_flag=True, help="Ask the domain's servers even when the cache has an answer.")
@config_option
@json_option()
def address_cmd(address: str, probe: bool, config_path: str | None, as_json: bool) -> None:
    """What the relay answers to RCPT TO:<ADDRESS> from an internet client, and why."""
    config = load_or_exit(config_path)
    try:
        ex = explain_address(config, address, probe=probe)
    except BadAddress as e:
        click.echo(f"kanmon: {e}", err=True)
        sys.exit(2)
    if as_json:
        out = {"address": ex.address, "reply": reply_text(ex.reply), "accepted": ex.reply is None,
               "source": ex.source, "why": ex.why}
        if ex.probe is not None:
            out["result"] = {"status": ex.probe.status, "reply": ex.probe.reply, "server": ex.probe.server}
        if ex.cached is not None:
            out["cached"] = {"stored": ex.cached.stored, "expires": ex.cached.expires}
        click.echo(json.dumps(out))
    else:
        click.echo(f"RCPT TO:<{ex.address}> -> {reply_text(ex.reply)}")
        how = {"cache": "cache hit", "probe": "probe", "list": "list", "file": "recipients file",
               "none": "no verification", "policy": "relay access"}.get(ex.source, ex.source)
        click.echo(f"  by: {how}: {ex.why}")
        if ex.cached is not None:
            click.echo(f"  cached: {format_time(ex.cached.stored)}, expires {format_time(ex.cached.expires)}")
    sys.exit(0 if ex.reply is None else 1)


@verify.group("cache", cls=_OptionsFirst)
def cache() -> None:
    """The verification cache shared by the receivers (callout results)."""


@cache.command("list")
@click.argument("prefix", required=False, default="")
@config_option
@json_option()
def cache_list(prefix: str, config_path: str | None, as_json: bool) -> None:
    """The cached results (addresses starting with PREFIX)."""
    rows = list_cache(load_or_exit(config_path), prefix)
    if as_json:
        for r in rows:
            click.echo(json.dumps({"address": r.address, "status": r.status, "reply": r.reply, "server": r.server,
                                   "stored": r.stored, "expires": r.expires}))
        return
    if not rows:
        click.echo("verification cache is empty")
        return
    for r in rows:
        click.echo(f"{r.address}  {r.status}  until {format_time(r.expires)}  {r.server}: {r.reply}")


@cache.command("flush")
@click.argument("prefix", required=False, default="")
@config_option
def cache_flush(prefix: str, config_path: str | None) -> None:
    """Forget the cached results (addresses starting with PREFIX; all without)."""
    n = flush_cache(load_or_exit(config_path), prefix)
    click.echo(f"{n} cached result(s) flushed")
