"""`kanmon queue ...` and `kanmon maintenance ...`: the queue operations on the command line.

Role: parse arguments, find the way to the spool — the running server's control socket
if one answers, else the spool itself under <data_dir>/kanmon.lock — call
kanmon.admin.queue_ops, print the result (mailq-style text by default, JSON with --json).
docs/queue.md is the user's page for every command here.

Trusts: nothing from argv (durations, regexes and ids are checked before anything is
done). Never: open spool files itself (queue_ops does, through the Spool API); act on a
filter match without showing how many and asking, unless --yes; print a traceback for
an expected error (exit 1 for a failed operation, 2 for bad arguments).
"""

from __future__ import annotations

import sys
import tarfile
from pathlib import Path

import click

from kanmon.admin.backup import BackupError, archive_ids
from kanmon.admin.filters import STATES, Filters, flag
from kanmon.admin.queue_ops import dispatch
from kanmon.commands.admin_session import AdminSession, _fail
from kanmon.commands.options import (
    config_option, format_time, json_option, load_or_exit, load_with_path, progress_bar, shown,
)
from kanmon.config import QueueFilter, parse_hostport
from kanmon.qshape import summary_lines
from kanmon.spool import journal
from kanmon.units import format_duration
from kanmon.escape import json_for_terminal



# ---------------------------------------------------------------------------
# Filters as options


FILTER_METAVARS = {"from": "PATTERN", "to": "PATTERN", "domain": "DOMAIN", "older_than": "DURATION",
                   "reason": "REGEX", "subject": "REGEX", "header": "REGEX", "body": "REGEX",
                   "size": "[<|>]SIZE", "attempts": "[<|>]N"}


def filter_options(fn=None, *, to_flag: str = "--to"):
    """The filter options: the vocabulary of [[maintenance]] jobs (kanmon.config.QueueFilter),
    each NAME as --NAME; drain names its recipient filter --rcpt (its --to is the target)."""
    if fn is None:
        return lambda f: filter_options(f, to_flag=to_flag)
    options = [click.option("--state", type=click.Choice(STATES), default=None,
                            help="Messages in this state only (default: all; corrupt files, which have no envelope, "
                                 "only when no other filter is given).")]
    for name, field in QueueFilter.model_fields.items():
        key = field.alias or name
        option = to_flag if key == "to" else flag(key)
        options.append(click.option(option, key if key != "from" else "mail_from", metavar=FILTER_METAVARS.get(key, "VALUE"),
                                    help=f"{field.description}."))
    for opt in reversed(options):
        fn = opt(fn)
    return fn


def make_filters(ids=(), state=None, **criteria) -> dict:
    """Filters (kanmon.admin.filters) from the options, as the control socket's JSON."""
    try:
        f = Filters(ids=list(ids), state=state or "all", **criteria)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    return f.to_json()


def _echo_json(value) -> None:
    click.echo(json_for_terminal(value, indent=1))


# ---------------------------------------------------------------------------


@click.group("queue")
def queue() -> None:
    """The mail queue: list, inspect, hold, release, delete, bounce, flush, back up, move."""


@queue.command("list")
@config_option
@filter_options
@json_option("JSON instead of the mailq-style listing.")
def list_cmd(config_path, as_json, **filters) -> None:
    """What is queued (like mailq): id, arrival, size, sender, recipients, last reply, next try.

    Marks after the id: * active (being delivered), ! held, # corrupt.
    """
    cfg = load_or_exit(config_path)
    with AdminSession(cfg) as admin:
        result = admin.call("list", {"filters": make_filters(**filters)})
    if as_json:
        _echo_json(result)
        return
    items = result["items"]
    if not items:
        click.echo("Mail queue is empty" if not any(filters.values()) else "No message matches")
        return
    click.echo(f"{'-Queue ID-':<17} {'--Size--':>8} {'----Arrival Time----':<20} -Sender/Recipient-------")
    total = 0
    for r in items:
        mark = {"active": "*", "hold": "!", "corrupt": "#"}.get(r["state"], " ")
        total += r["size"] or 0
        size = str(r["size"]) if r["size"] is not None else "?"
        sender = r["from"] or ("MAILER-DAEMON" if r["state"] != "corrupt" else "(damaged queue file)")
        click.echo(f"{r['id'] + mark:<17} {size:>8} {format_time(r['arrival']):<20} {shown(sender)}")
        if r["last_reply"]:  # a remote server's reply text: escaped for the terminal
            click.echo(f"{'':<48}({shown(r['last_reply'][:200])})")
        for rcpt in r["rcpts"]:
            click.echo(f"{'':<48}{shown(rcpt)}")
        if r["state"] == "deferred":
            when = format_time(r["next_attempt"]) if r["next_attempt"] else "as soon as possible"
            click.echo(f"{'':<48}next attempt {when}, {r['attempts']} so far")
        click.echo("")
    click.echo(f"-- {total // 1024} Kbytes in {len(items)} Request{'s' if len(items) != 1 else ''}.")


@queue.command("show")
@config_option
@click.argument("queue_id")
@click.option("--lines", default=50, show_default=True, help="Body lines to show.")
@json_option()
def show_cmd(config_path, queue_id, lines, as_json) -> None:
    """One message: envelope, attempt history with remote replies, headers, first body lines."""
    cfg = load_or_exit(config_path)
    with AdminSession(cfg) as admin:
        d = admin.call("show", {"id": queue_id, "lines": lines})
    if as_json:
        _echo_json(d)
        return
    _print_detail(d)


def _print_detail(d: dict) -> None:
    click.echo(f"Queue ID:  {d['id']} ({d['state']})")
    click.echo(f"Arrival:   {format_time(d['arrival'])}")
    click.echo(f"Size:      {d['size']} bytes")
    click.echo(shown(f"Sender:    <{d['from']}>"))
    c = d.get("client")
    if c:
        click.echo(shown(f"Client:    {c.get('name')} [{c.get('ip')}] helo={c.get('helo')} {c.get('proto')}"
                         + (f" auth={c['auth_user']}" if c.get("auth_user") else "")))
    for r in d["rcpts_all"]:
        orig = f" (orig {r['original']})" if r.get("original") else ""
        click.echo(shown(f"Recipient: <{r['rcpt']}>{orig} {r['status']}"))
    if d["state"] == "deferred":
        click.echo(f"Attempts:  {d['attempts']}, next {format_time(d['next_attempt'])}")
    if d["history"]:
        click.echo("History:")
        for h in d["history"]:
            try:
                rec = journal.from_dict(h)
            except journal.JournalError:
                continue  # a newer server's record kind: not ours to show
            if isinstance(rec, journal.Result):
                click.echo(shown(f"  {format_time(rec.t)} <{rec.rcpt}> {rec.status}: {rec.reply}"
                                 + (f" (relay {rec.relay})" if rec.relay else "")))
            elif isinstance(rec, journal.Hold):
                click.echo(shown(f"  {format_time(rec.t)} {'held' if rec.on else 'released'}"
                                 + (f" by {rec.by}" if rec.by else "")))
            elif isinstance(rec, journal.Warned):
                click.echo(f"  {format_time(rec.t)} delay notice sent")
    click.echo("")
    # The message as received: its lines kept, their control characters escaped.
    click.echo(shown(d["headers"].rstrip("\r\n").replace("\r\n", "\n"), block=True))
    click.echo("")
    click.echo(shown(d["body"].replace("\r\n", "\n"), block=True))
    lines_shown = d["body"].count("\r\n") + 1 if d["body"] else 0
    if d["body_lines_total"] > lines_shown:
        click.echo(f"[... {d['body_lines_total'] - lines_shown} more line(s)]")


def _ids_from(path: str | None) -> list[str]:
    """--ids-from: queue ids from a text file (whitespace-separated; - is stdin) or from a
    queue backup archive (all of its ids, the archive verified whole first)."""
    if path is None:
        return []
    if path != "-":
        try:
            is_tar = tarfile.is_tarfile(path)
        except OSError as e:
            raise click.BadParameter(f"{path}: {e.strerror}", param_hint="--ids-from") from None
        if is_tar:
            try:
                return archive_ids(Path(path))
            except BackupError as e:
                raise click.BadParameter(str(e), param_hint="--ids-from") from None
    try:
        with click.open_file(path, "r", encoding="ascii", errors="replace") as fh:
            return fh.read().split()
    except OSError as e:
        raise click.BadParameter(f"{path}: {e.strerror}", param_hint="--ids-from") from None


def _act_command(action: str, doc: str, confirm: bool = True):
    @queue.command(action, help=doc)
    @config_option
    @click.argument("ids", nargs=-1)
    @click.option("--ids-from", "ids_from", metavar="FILE",
                  help="Also the queue ids in FILE: a list (one or more a line; - reads stdin) or a queue "
                       "backup archive (every message in it).")
    @filter_options
    @click.option("--dry-run", is_flag=True, help="Show what would be done; change nothing.")
    @click.option("--yes", "-y", is_flag=True, help="Do not ask before acting on a filter match.")
    @json_option()
    def command(config_path, ids, ids_from, dry_run, yes, as_json, **filters) -> None:
        cfg = load_or_exit(config_path)
        from_file = _ids_from(ids_from)
        if ids_from is not None and not from_file:
            click.echo(f"No queue ids in {ids_from}")
            return
        ids = tuple(ids) + tuple(from_file)
        f = make_filters(ids, **filters)
        by_filter = any(v is not None for v in filters.values())
        whole = filters.get("state") == "all"
        if not ids and not by_filter and confirm:
            raise click.UsageError("give queue ids or filters (--state all for the whole queue)")
        source = f"kanmon queue {action}"
        # Flushing asks the running queue manager: with none there is nothing to ask.
        with AdminSession(cfg, require_server=action == "flush") as admin:
            if by_filter or dry_run:
                preview = admin.call("act", {"action": action, "filters": f, "dry_run": True, "whole_queue": whole})
                if dry_run:
                    if as_json:
                        _echo_json(preview)
                    else:
                        click.echo(f"{preview['matched']} message(s) match; would {action}:")
                        for qid in preview["ids"]:
                            click.echo(f"  {qid}")
                    return
                if not preview["ids"]:
                    click.echo("No message matches")
                    return
                if confirm and not yes:
                    click.echo(f"{preview['matched']} message(s) match.")
                    if not click.confirm(f"{action.capitalize()} them?", default=False):
                        click.echo("Nothing done.")
                        return
                # Exactly the messages counted (still matching): nothing new slips in.
                f = dict(f, ids=preview["ids"])
            with progress_bar(f"{action}", not as_json) as progress:
                result = admin.call("act", {"action": action, "filters": f, "source": source, "whole_queue": whole},
                                    progress)
        if as_json:
            _echo_json(result)
            return
        done = {"delete": "deleted", "hold": "held", "release": "released", "bounce": "returned to sender",
                "flush": "scheduled for delivery now", "requeue": "requeued"}[action]
        click.echo(f"{len(result['acted'])} message(s) {done}")
        if result["skipped"]:
            click.echo(f"{len(result['skipped'])} skipped (no longer queued): {' '.join(result['skipped'][:20])}")
        missing = result.get("missing") or []
        if missing:  # an id given that no message has (a typo, or gone before): said, as postsuper does
            click.echo(f"{len(missing)} not in the queue: {shown(' '.join(missing[:20]))}")

    return command


_act_command("delete", "Delete messages (postsuper -d): by id, or every message the filters match.")
_act_command("hold", "Put messages on hold (postsuper -h): the queue leaves them alone until released.")
_act_command("release", "Release held messages (postsuper -H); they are delivered now.")
_act_command("bounce", "Return messages to their senders with a failure notice (postsuper -e), then delete them.")
_act_command("flush", "Try these messages now (postqueue -f / -i); without ids or filters: every deferred one.", False)
_act_command("requeue", "Route again and try now, with the retry backoff restarted (postsuper -r).", False)


@queue.command("summary")
@config_option
@filter_options
@click.option("--by", type=click.Choice(["domain", "sender"]), default="domain", show_default=True,
              help="Rows by recipient domain, or by sender domain (qshape -s).")
@json_option()
def summary_cmd(config_path, by, as_json, **filters) -> None:
    """Counts by destination and age (like Postfix's qshape), in minutes since arrival."""
    cfg = load_or_exit(config_path)
    with AdminSession(cfg) as admin:
        s = admin.call("summary", {"filters": make_filters(**filters), "by": by})
    if as_json:
        _echo_json(s)
        return
    for line in summary_lines(s):
        click.echo(line)


@queue.command("review")
@config_option
@filter_options
def review_cmd(config_path, **filters) -> None:
    """Go through messages one by one: envelope, last reply, first 50 lines; keep, delete, hold or quit."""
    cfg = load_or_exit(config_path)
    counts = {"kept": 0, "deleted": 0, "held": 0}
    with AdminSession(cfg) as admin:
        items = [r for r in admin.call("list", {"filters": make_filters(**filters)})["items"] if r["state"] != "corrupt"]
        if not items:
            click.echo("No message matches")
            return
        for n, item in enumerate(items, 1):
            reply = admin.client.request("show", {"id": item["id"], "lines": 50}) if admin.online else \
                dispatch(admin.ops, {"op": "show", "args": {"id": item["id"], "lines": 50}})
            if not reply.get("ok"):
                click.echo(f"{item['id']}: gone ({reply.get('error')})")
                continue
            click.echo(f"==== {n}/{len(items)} " + "=" * 60)
            _print_detail(reply["result"])
            choice = click.prompt("[k]eep, [d]elete, [h]old, [q]uit", type=click.Choice(["k", "d", "h", "q"]),
                                  default="k", show_choices=False)
            if choice == "q":
                break
            if choice == "k":
                counts["kept"] += 1
                continue
            action = "delete" if choice == "d" else "hold"
            result = admin.call("act", {"action": action, "filters": {"ids": [item["id"]]},
                                        "source": "kanmon queue review"})
            if result["acted"]:
                counts["deleted" if action == "delete" else "held"] += 1
                click.echo(f"{item['id']}: {'deleted' if action == 'delete' else 'held'}")
    click.echo(f"Reviewed: {counts['kept']} kept, {counts['deleted']} deleted, {counts['held']} held")


@queue.command("backup")
@config_option
@click.argument("file", type=click.Path(dir_okay=False))
@filter_options
@click.option("--then", "then", type=click.Choice(["hold", "delete"]), default=None,
              help="Once FILE is complete and on disk, hold (or delete) here exactly the messages written "
                   "into it, so this node never delivers them again (moving a queue to another relay).")
@click.option("--force", is_flag=True, help="Overwrite FILE if it exists.")
@json_option()
def backup_cmd(config_path, file, then, force, as_json, **filters) -> None:
    """Write the matching messages, envelopes and attempt history to FILE (docs/queue-backup.md)."""
    cfg, config_path = load_with_path(config_path)
    path = Path(file).resolve()
    if path.exists() and not force:
        _fail(f"{path} exists; nothing written (--force overwrites it)")
    origin_config = str(Path(config_path).resolve()) if config_path else None
    with AdminSession(cfg) as admin, progress_bar("backing up", not as_json) as progress:
        r = admin.call("backup", {"path": str(path), "filters": make_filters(**filters), "then": then,
                                  "origin_config": origin_config}, progress)
    if as_json:
        _echo_json(r)
        return
    click.echo(f"{r['count']} message(s) written to {r['path']}")
    if r["set_aside"]:
        click.echo(f"{len(r['set_aside'])} damaged queue file(s) set aside to spool/corrupt/, not in the archive: "
                   + " ".join(r["set_aside"][:20]))
    if r["corrupt"] > len(r["set_aside"]):
        click.echo(f"{r['corrupt'] - len(r['set_aside'])} other damaged queue file(s) in spool/corrupt/, not in the "
                   "archive (kanmon queue list --state corrupt)")
    if then:
        done = "held" if then == "hold" else "deleted"
        click.echo(f"{len(r['acted'])} of them {done} here")
        if r["skipped"]:
            click.echo(f"{len(r['skipped'])} left the queue meanwhile: {' '.join(r['skipped'][:20])}")


@queue.command("restore")
@config_option
@click.argument("file", type=click.Path(dir_okay=False, exists=True))
@click.option("--hold", is_flag=True, help="Restore on hold instead of scheduling for delivery.")
@click.option("--again", is_flag=True,
              help="Also restore what a restore here put in the queue before and has left it since (deleted by mistake).")
@json_option()
def restore_cmd(config_path, file, hold, again, as_json) -> None:
    """Put the messages of a backup into this queue (checksums verified; never twice).

    A message held in the archive stays held. Then it prints the command that removes them from the node the backup came from.
    """
    cfg = load_or_exit(config_path)
    with AdminSession(cfg, make_spool=True) as admin, progress_bar("restoring", not as_json) as progress:
        r = admin.call("restore", {"path": str(Path(file).resolve()), "hold": hold, "again": again}, progress)
    if as_json:
        _echo_json(r)
        return
    on_hold = set(r["on_hold"])
    for qid in r["restored"]:
        click.echo(f"restored {qid}" + (" (held)" if qid in on_hold else ""))
    before = r.get("before") or []
    click.echo(f"{len(r['restored'])} message(s) restored, {len(r['skipped']) - len(before)} already here, "
               + (f"{len(before)} restored here before and gone since (delivered, or deleted: --again restores "
                  "those), " if before else "") + f"{r['in_archive']} in the archive")
    if on_hold and not hold:
        click.echo(f"{len(on_hold)} of them held, as they were in the archive (`kanmon queue release` delivers them)")
    if r["same_node"]:
        click.echo("The backup was written by this node: nothing to finish on another one")
    elif r["finish_command"]:
        if r["then"] != "hold":
            click.echo(f"Warning: the backup left these messages queued on {r['origin']}: until they are "
                       "deleted there, it may deliver them too")
        click.echo(f"To finish the move, run on {r['origin']}:")
        click.echo(f"  {r['finish_command']}")
        if r.get("finish_placeholder"):
            click.echo(f"  (replace {r['finish_placeholder']} with the config file kanmon runs with on "
                       f"{shown(r['origin'])}: the archive does not say)")
        click.echo(f"or, on the console of {shown(r['origin'])}, upload the archive under Queue backup and restore, "
                   "Finish a move")
    elif r["then"] == "delete":
        click.echo(f"Nothing to finish on {r['origin']}: the backup deleted them there (--then delete)")


@queue.command("drain")
@config_option
@click.option("--to", "target", required=True, metavar="HOST:PORT", help="The relay that takes the mail over.")
@click.option("--tls", type=click.Choice(["none", "opportunistic", "required", "verify", "smtps"]),
              default="opportunistic", show_default=True)
@click.argument("ids", nargs=-1)
@filter_options(to_flag="--rcpt")
@click.option("--all", "whole", is_flag=True, help="The whole queue (held messages stay unless named by id).")
@click.option("--dry-run", is_flag=True, help="List what would move; change nothing.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask before moving a filter match or --all.")
@json_option()
def drain_cmd(config_path, target, tls, ids, whole, dry_run, yes, as_json, **filters) -> None:
    """Deliver queued messages to HOST:PORT; each is removed here only after its 250.

    By id it acts at once; with filters or --all it shows how many match and asks first
    (unless --yes; without a terminal to ask on, it refuses).
    """
    cfg = load_or_exit(config_path)
    try:
        host, port = parse_hostport(target)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--to") from None
    f = make_filters(ids, **filters)
    by_filter = any(v is not None for v in filters.values())
    whole = whole or filters.get("state") == "all"  # as for delete: --state all is the whole queue
    if not ids and not by_filter and not whole:
        raise click.UsageError("give queue ids, filters or --all (the whole queue)")
    args = {"host": host, "port": port, "tls": tls, "whole_queue": whole}
    with AdminSession(cfg) as admin:
        if by_filter or whole or dry_run:
            preview = admin.call("drain", {**args, "filters": f, "dry_run": True})
            if dry_run:
                if as_json:
                    _echo_json(preview)
                else:
                    click.echo(f"{preview['matched']} message(s) match; would move to {preview['to']}:")
                    for qid in preview["ids"]:
                        click.echo(f"  {qid}")
                return
            if not preview["ids"]:
                click.echo("No message matches")
                return
            if not yes:
                if not sys.stdin.isatty():
                    _fail(f"{preview['matched']} message(s) match; not moving them without --yes "
                          "(no terminal to ask on)")
                click.echo(f"{preview['matched']} message(s) match.")
                if not click.confirm(f"Move them to {preview['to']}?", default=False):
                    click.echo("Nothing done.")
                    return
            f = dict(f, ids=preview["ids"])  # exactly the messages counted
        r = admin.call("drain", {**args, "filters": f})
    if as_json:
        _echo_json(r)
        return
    click.echo(f"{len(r['drained'])} message(s) delivered to {r['to']} and removed here")
    for k in r["kept"]:
        click.echo(f"kept {k['id']}: " + "; ".join(f"<{a}> {b}" for a, b in k["replies"].items()))
    if r["kept"]:
        sys.exit(1)


# ---------------------------------------------------------------------------


@click.group("maintenance")
def maintenance() -> None:
    """Scheduled queue maintenance ([[maintenance]] in the config)."""


@maintenance.command("list")
@config_option
@json_option()
def maintenance_list(config_path, as_json) -> None:
    """The configured jobs: filters, next run, and the last run (when, how long, how many
    matched and acted on, the error if it failed)."""
    cfg = load_or_exit(config_path)
    if not cfg.maintenance:
        click.echo("No [[maintenance]] jobs configured")
        return
    with AdminSession(cfg) as admin:
        r = admin.call("maintenance_list")
    if as_json:
        _echo_json(r)
        return
    for j in r["jobs"]:
        what = [f"older than {format_duration(v)}" if k == "older_than" else f"{k} {v!r}" for k, v in j["filters"].items()]
        click.echo(f"{j['index']}. {j['name']}: \"{j['schedule']}\" {j['action']} {j['state']} messages"
                   + (f" {', '.join(what)}" if what else "") + (" (catch_up)" if j["catch_up"] else "")
                   + f"; next run {format_time(j['next_run'])}")
        click.echo(f"   {j['last_run_text']}" + (f"; MISSED the run of {format_time(j['missed'])}" if j.get("missed") else ""))


@maintenance.command("run")
@config_option
@click.argument("job")
@click.option("--dry-run", is_flag=True, help="Show what it would do; change nothing.")
@json_option()
def maintenance_run(config_path, job, dry_run, as_json) -> None:
    """Run job NAME (or its 1-based INDEX) now."""
    cfg = load_or_exit(config_path)
    with AdminSession(cfg) as admin:
        r = admin.call("maintenance_run", {"job": job, "dry_run": dry_run, "by": "kanmon maintenance run"})
    if as_json:
        _echo_json(r)
        return
    if dry_run:
        click.echo(f"{r['job']}: {r['matched']} message(s) match; would {r['action']}: {' '.join(r['ids'])}")
    else:
        click.echo(f"{r['job']}: {r['action']} matched {r['matched']}, acted on {len(r['acted'])}")
