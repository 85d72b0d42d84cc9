"""`kanmon sendmail` and the `kanmon-sendmail` / `kanmon-mailq` entry points (docs/sendmail.md).

Role: the sendmail command line cron jobs, PHP and monitoring tools expect at
/usr/sbin/sendmail. It reads one message on stdin, works out the envelope (-f, -t, the
arguments) and writes it into the node's maildrop (kanmon.queue.pickup), then wakes a
running server through the control socket; the server's pickup injects it like any mail
kanmon writes. With the server down the file waits in maildrop and is picked up at the
next start: exit 0 means the message is durable on disk.

Behaviour does not depend on argv[0]: `kanmon-sendmail` is always sendmail and
`kanmon-mailq` always mailq, so packagers link whichever name they need.

Exit codes are sendmail's (sysexits.h): 0 queued, 64 EX_USAGE (bad flags, no
recipient), 65 EX_DATAERR (message too large), 67 EX_NOUSER (a bad address), 69
EX_UNAVAILABLE (-q/-bp with no way to the queue), 75 EX_TEMPFAIL (the message could not
be made durable), 78 EX_CONFIG (bad configuration).

Trusts: nothing from argv or stdin: addresses are parsed as SMTP paths; the server
decodes the maildrop file again, strictly. Never: exit 0 before the maildrop file is
fsynced and renamed into place, or print a traceback for an expected error.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from email.utils import getaddresses
from pathlib import Path
from typing import BinaryIO

import click

from kanmon.admin.reach import Unreachable, poke_server, reach_queue
from kanmon.commands.options import resolve_config_path
from kanmon.config import Config, ConfigError, load_config
from kanmon.queue.pickup import MAILDROP, PickupError, check_address, encode_pickup, write_maildrop

EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_NOUSER = 67
EX_UNAVAILABLE = 69
EX_TEMPFAIL = 75
EX_CONFIG = 78

# sendmail flags that take a value (attached or as the next argument) and change nothing here.
VALUE_FLAGS = set("BNRVXLhOp")
# sendmail flags accepted and ignored (-v verbose, -U initial submission, -m, -n, -x, -G, -A...).
IGNORED_FLAGS = set("vUmnxGA")
IGNORED_E = {"m", "e", "p", "q", "w"}  # -em -ee -ep -eq -ew (error reporting modes)


class UsageError(Exception):
    def __init__(self, message: str, code: int = EX_USAGE):
        super().__init__(message)
        self.code = code


@dataclass
class Invocation:
    mode: str = "send"  # send | mailq | flush | newaliases
    extract: bool = False  # -t
    mail_from: str | None = None  # -f / -r
    fullname: str = ""  # -F
    ignore_dots: bool = False  # -i / -oi
    config: str | None = None  # -C (sendmail's config file) or -c
    rcpts: list[str] = field(default_factory=list)


def parse_args(argv: list[str]) -> Invocation:
    """sendmail's command line (getopt-like: -fADDR or -f ADDR, -oi, -bp, -q1h...)."""
    inv = Invocation()
    i = 0

    def value(flag: str, rest: str) -> str:
        nonlocal i
        if rest:
            return rest
        i += 1
        if i >= len(argv):
            raise UsageError(f"option -{flag} requires a value")
        return argv[i]

    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            inv.rcpts.extend(argv[i + 1:])
            break
        if not arg.startswith("-") or arg == "-":
            inv.rcpts.append(arg)
            i += 1
            continue
        flag, rest = arg[1], arg[2:]
        if flag == "t":
            inv.extract = True
            if rest == "i":  # -ti
                inv.ignore_dots = True
        elif flag == "i":
            inv.ignore_dots = True
        elif flag in "fr":
            inv.mail_from = value(flag, rest)
        elif flag == "F":
            inv.fullname = value(flag, rest)
        elif flag in "Cc":
            inv.config = value(flag, rest)
        elif flag == "o":
            if rest == "i":
                inv.ignore_dots = True
            elif not rest:
                value(flag, rest)  # -o i: a space-separated option
                if argv[i] == "i":
                    inv.ignore_dots = True
            # every other -oX (-oem, -odi, -odb, -oQ/dir ...) is accepted and ignored
        elif flag == "b":
            modes = {"m": "send", "p": "mailq", "i": "newaliases", "": "send"}
            if rest not in modes:
                raise UsageError(f"-b{rest} is not supported (kanmon sendmail knows -bm, -bp and -bi)")
            inv.mode = modes[rest]
        elif flag == "q":
            inv.mode = "flush"  # -q, -q1h, -qR..., -qS...: flush once
        elif flag == "e" and rest in IGNORED_E:
            pass
        elif flag in VALUE_FLAGS:
            value(flag, rest)
        elif flag in IGNORED_FLAGS:
            pass
        else:
            raise UsageError(f"unknown option {arg}")
        i += 1
    return inv


def read_message(stream: BinaryIO, ignore_dots: bool, limit: int) -> bytes:
    """stdin up to EOF, or (without -i) up to a line that is a lone dot."""
    chunks: list[bytes] = []
    size = 0
    for line in iter(lambda: stream.readline(65536), b""):
        if not ignore_dots and line in (b".\n", b".\r\n", b"."):
            break
        chunks.append(line)
        size += len(line)
        if size > limit:
            raise UsageError(f"message larger than max_message_size ({limit} bytes)", EX_DATAERR)
    return b"".join(chunks)


def _split_head(content: bytes) -> tuple[list[bytes], bytes]:
    """Header lines (each with its line end, continuation lines kept apart) and the rest."""
    lines = content.splitlines(keepends=True)
    head: list[bytes] = []
    for n, line in enumerate(lines):
        if line in (b"\n", b"\r\n"):
            return head, b"".join(lines[n:])
        head.append(line)
    return head, b""


def extract_recipients(content: bytes) -> tuple[list[str], bytes]:
    """-t: the addresses in To, Cc and Bcc, and the content with its Bcc fields removed."""
    head, body = _split_head(content)
    fields: list[tuple[str, list[bytes]]] = []
    for line in head:
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1][1].append(line)
        else:
            fields.append((line.split(b":", 1)[0].strip().lower().decode("latin-1"), [line]))
    values = {"to": [], "cc": [], "bcc": []}
    kept: list[bytes] = []
    for name, lines in fields:
        if name in values:
            text = b"".join(lines).split(b":", 1)[1] if b":" in lines[0] else b""
            values[name].append(" ".join(text.decode("utf-8", "replace").split()))
        if name != "bcc":
            kept.extend(lines)
    rcpts = [addr for _name, addr in getaddresses(values["to"] + values["cc"] + values["bcc"]) if addr]
    return rcpts, b"".join(kept) + body


def _say(message: str) -> None:
    click.echo(f"sendmail: {message}", err=True)


def _normalise(address: str, *, is_sender: bool) -> str:
    """<addr> or addr as given on the command line or in a header; PickupError if bad."""
    text = address.strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1]
    return check_address(text, is_sender=is_sender)


def send(inv: Invocation, config: Config, stdin: BinaryIO) -> int:
    limit = config.smtp.max_message_size
    content = read_message(stdin, inv.ignore_dots, limit)
    rcpts = list(inv.rcpts)
    if inv.extract:
        found, content = extract_recipients(content)
        rcpts += found
    try:
        rcpts = [_normalise(r, is_sender=False) for r in rcpts]
        sender = None if inv.mail_from is None else _normalise(inv.mail_from, is_sender=True)
    except PickupError as e:
        _say(str(e))
        return EX_NOUSER
    if not rcpts:
        raise UsageError("no recipient addresses found" + (" in the message header" if inv.extract else ""))
    fullname = " ".join(inv.fullname.split())
    if any(ord(c) < 32 for c in fullname) or len(fullname) > 200:
        raise UsageError("-F: the full name must be one short printable line")
    data_dir = Path(config.server.data_dir)
    try:
        write_maildrop(data_dir, encode_pickup(sender, rcpts, fullname, content))
    except OSError as e:
        _say(f"cannot queue the message in {data_dir / MAILDROP}: {e.strerror or e}")
        return EX_TEMPFAIL
    poke_server(data_dir, "pickup")  # not running, or not ours to reach: the next scan or start takes it
    return EX_OK


def mailq(config: Config) -> int:
    try:
        with reach_queue(config) as q:
            items = q.call("list", {"filters": {}})["items"]
    except (Unreachable, RuntimeError, OSError) as e:
        _say(f"queue report unavailable: {e}")
        return EX_UNAVAILABLE
    waiting = _maildrop_count(Path(config.server.data_dir))
    if not items:
        click.echo("Mail queue is empty")
    else:
        click.echo(f"{'-Queue ID-':<17} {'--Size--':>8} {'----Arrival Time----':<20} -Sender/Recipient-------")
        total = 0
        for r in items:
            mark = {"active": "*", "hold": "!", "corrupt": "#"}.get(r["state"], " ")
            total += r["size"] or 0
            arrival = r["arrival"]
            when = time.strftime("%a %b %d %H:%M:%S", time.localtime(arrival)) if arrival else ""
            sender = r["from"] or ("MAILER-DAEMON" if r["state"] != "corrupt" else "(damaged queue file)")
            click.echo(f"{r['id'] + mark:<17} {r['size'] if r['size'] is not None else '?':>8} {when:<20} {sender}")
            if r["last_reply"]:
                click.echo(f"{'':<48}({r['last_reply'][:200]})")
            for rcpt in r["rcpts"]:
                click.echo(f"{'':<48}{rcpt}")
            click.echo("")
        click.echo(f"-- {total // 1024} Kbytes in {len(items)} Request{'s' if len(items) != 1 else ''}.")
    if waiting:
        click.echo(f"-- {waiting} message(s) in maildrop waiting for pickup.")
    return EX_OK


def _maildrop_count(data_dir: Path) -> int:
    try:
        return sum(1 for n in os.listdir(data_dir / MAILDROP) if not n.startswith(".") and n != "corrupt")
    except OSError:
        return 0


def flush(config: Config) -> int:
    data_dir = Path(config.server.data_dir)
    try:
        with reach_queue(config, offline=False) as q:
            q.call("act", {"action": "flush", "filters": {}, "whole_queue": True, "source": "kanmon sendmail -q"})
    except (Unreachable, RuntimeError, OSError) as e:
        _say(f"cannot flush the queue: {e}")
        return EX_UNAVAILABLE
    poke_server(data_dir, "pickup")
    return EX_OK


def run(argv: list[str], stdin: BinaryIO | None = None, mode: str | None = None) -> int:
    """The whole command; its sysexits code."""
    try:
        inv = parse_args(argv)
        if mode is not None:
            inv.mode = mode
        try:
            # The lookup every command uses (-C/-c, $KANMON_CONFIG, /etc/kanmon/kanmon.toml,
            # the embedded default), but silent about it: sendmail says nothing when all
            # is well (cron mails whatever a job prints, through sendmail again).
            config = load_config(resolve_config_path(inv.config)[0])
        except ConfigError as e:
            for line in e.messages:
                _say(f"config error: {line}")
            return EX_CONFIG
        if inv.mode == "mailq":
            return mailq(config)
        if inv.mode == "flush":
            return flush(config)
        if inv.mode == "newaliases":
            _say("aliases are managed with `kanmon user alias`; nothing to rebuild")
            return EX_OK
        return send(inv, config, stdin if stdin is not None else sys.stdin.buffer)
    except UsageError as e:
        _say(str(e))
        return e.code


SENDMAIL_HELP = """Queue one message read on stdin, like sendmail (link it as /usr/sbin/sendmail).

\b
ARGS are sendmail's:
  RCPT...       recipients (a bare login name gets the server's hostname)
  -t            also take recipients from To, Cc and Bcc (Bcc is removed)
  -f ADDR       envelope sender (default: your login name at the hostname)
  -F NAME       full name for the From header the server adds when there is none
  -i, -oi       a line with a lone dot does not end the message (read to EOF)
  -bp           list the queue (mailq);  -q  flush the queue
  -C FILE       kanmon's configuration (also -c; else $KANMON_CONFIG, /etc/kanmon/kanmon.toml)
  -oem -odi -v -U -B -N -R -V ...   accepted and ignored

The message goes into <data_dir>/maildrop/ and the running server picks it up; with the
server down it waits there until the next start. Exit codes (sysexits): 0 queued,
64 usage, 65 too large, 67 bad address, 69 queue unreachable (-bp, -q), 75 could not
be queued, 78 configuration error.
"""


@click.command("sendmail", help=SENDMAIL_HELP,
               context_settings={"ignore_unknown_options": True, "help_option_names": ["--help"]})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def sendmail(args: tuple[str, ...]) -> None:
    sys.exit(run(list(args)))


def sendmail_main() -> None:
    """The `kanmon-sendmail` entry point: sendmail whatever argv[0] is."""
    sys.exit(run(sys.argv[1:]))


def mailq_main() -> None:
    """The `kanmon-mailq` entry point: sendmail -bp."""
    sys.exit(run(sys.argv[1:], mode="mailq"))
