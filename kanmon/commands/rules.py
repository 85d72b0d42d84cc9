"""`kanmon rules test FILE.eml`: which content rules match a message, and what would happen.

Role: a dry run of the content check on a message file: the same profile choice, the
same decoding and the same rules as the server (kanmon.content.inspect), printed as the
rules that matched (also log_only ones), the attachments found (with their true types)
and the outcome. Nothing is sent, queued or recorded. Exit 0 when the message would be
accepted unchanged, 1 when a rule would change, quarantine, discard or refuse it, 2 for a
usage or config error.

Trusts: nothing in the file: every text from it is shown escaped (control characters as
\\x.. escapes).
Never: write anything.
"""

from __future__ import annotations

import re
import sys
from email.utils import getaddresses

import click

from kanmon.commands.options import config_option, json_option, load_or_exit, shown
from kanmon.content.decode import decode_header_value
from kanmon.content.inspect import inspect_message
from kanmon.content.rules import CompiledProfile, Facts
from kanmon.policy.content import content_profile_name
from kanmon.escape import json_for_terminal

@click.group("rules")
def rules() -> None:
    """Content rules ([[content_profile]]): try them on a message file."""


@rules.command("test")
@click.argument("message", type=click.Path(exists=True, dir_okay=False))
@click.option("--profile", "profile_name", help="The content profile to run (default: the one the server would choose).")
@click.option("--from", "sender", help="The envelope sender (default: the From: header's address).")
@click.option("--to", "rcpts", multiple=True, help="An envelope recipient (repeat; default: the To: and Cc: addresses).")
@click.option("--inside", is_flag=True, help="As if sent from relay_networks (default: from outside).")
@click.option("--authenticated", is_flag=True, help="As if sent by an authenticated user (submission).")
@click.option("--client", "client_ip", default="", metavar="IP", help="As if sent from this address ([[ip_policy]] content_profile).")
@config_option
@json_option()
def test_cmd(message: str, profile_name: str | None, sender: str | None, rcpts: tuple[str, ...], inside: bool,
             authenticated: bool, client_ip: str, config_path: str | None, as_json: bool) -> None:
    """Which rules match MESSAGE (an .eml file) and what the server would do with it."""
    config = load_or_exit(config_path)
    with open(message, "rb") as f:
        content = f.read().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    header = content.split(b"\r\n\r\n", 1)[0].decode("utf-8", "surrogateescape")
    fields: dict[str, list[str]] = {}
    for line in re.split(r"\r\n(?![ \t])", header):
        name, sep, value = line.partition(":")
        if sep:
            fields.setdefault(name.strip().lower(), []).append(value.strip())
    if sender is None:
        found = getaddresses([decode_header_value(v) for v in fields.get("from", [])])
        sender = found[0][1] if found else ""
    if not rcpts:
        rcpts = tuple(a for _, a in getaddresses([decode_header_value(v) for k in ("to", "cc") for v in fields.get(k, [])]) if a)
    from_outside = not (inside or authenticated)
    if profile_name is None:
        profile_name = content_profile_name(config, sender, rcpts, from_outside, client_ip)
        if profile_name is None:
            click.echo("kanmon: no content profile applies (define [[content_profile]] \"inbound\"/\"outbound\","
                       " or name one with --profile)", err=True)
            sys.exit(2)
    profile = next((p for p in config.content_profile if p.name == profile_name), None)
    if profile is None:
        click.echo(f"kanmon: no content profile named {profile_name!r}", err=True)
        sys.exit(2)
    facts = Facts(sender, tuple(rcpts), from_outside, authenticated)
    found = inspect_message(CompiledProfile(profile), content, facts)
    v = found.verdict
    changed = v.action != "accept" or bool(v.subject_prefix or v.headers or v.score or v.bcc)
    if as_json:
        click.echo(json_for_terminal({
            "profile": profile_name, "sender": sender, "recipients": list(rcpts), "from_outside": from_outside,
            "subject": found.message.subject,
            "matched": [{"rule": h.rule, "action": h.action, "why": h.why, "log_only": h.log_only} for h in v.hits],
            "attachments": [{"name": i.name, "type": i.true_type, "declared": i.declared, "classes": sorted(i.classes),
                             "inside": i.container} for i in found.attachments.items],
            "limit": found.attachments.limit,
            "outcome": {"action": v.action, "rule": v.rule, "reply": f"550 5.7.1 {v.reply_text}" if v.action == "reject" else "",
                        "subject_prefix": v.subject_prefix, "headers": [f"{n}: {val}" for n, val in v.headers],
                        "score": v.score, "redirect": v.redirect, "bcc": v.bcc},
        }))
        sys.exit(1 if changed else 0)
    click.echo(f"profile: {profile_name} (sender {shown(sender, limit=200) or '<>'}, "
               f"{'from outside' if from_outside else 'authenticated' if authenticated else 'from relay_networks'})")
    click.echo(f"subject: {shown(found.message.subject, limit=200)}")
    for item in found.attachments.items:
        where = f" in {shown(item.container, limit=200)}" if item.container else ""
        classes = f" [{', '.join(sorted(item.classes))}]" if item.classes else ""
        click.echo(f"attachment: {shown(item.name, limit=200) or '(unnamed)'}{where}: {item.true_type}{classes}")
    if found.attachments.limit:
        click.echo(f"archive limit: {found.attachments.limit}")
    if not v.hits:
        click.echo("no rule matched")
    for h in v.hits:
        mode = f"log only, would {h.action}" if h.log_only else h.action
        click.echo(f"matched: {shown(h.rule, limit=200)} ({mode}): {shown(h.why, limit=300)}")
    outcome = v.describe()
    if v.action == "reject":
        outcome += f": 550 5.7.1 {v.reply_text}"
    click.echo(f"outcome: {outcome}")
    sys.exit(1 if changed else 0)
