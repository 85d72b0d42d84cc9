"""Sieve at local delivery: run a user's active script, say where the message goes,
then send what the script asked to send (redirects, a vacation reply).

Role: the small hook of the local delivery agent (kanmon.deliver.local). ``decide``
(in a worker thread: it reads the script, may create a folder, consults the vacation
memory) returns a ``Decision``: the Maildir folders to write into, and the messages to
send once the message is stored. ``send`` hands those to the injector, the one way into
the queue for mail kanmon writes itself. Without an active script nothing is read but
one missing file.

Envelopes (RFC 5228 4.2, RFC 5230 5.1): a redirect keeps the original envelope sender
(so a bounce goes back to whoever sent it; <> stays <>), goes to the new recipient only,
and carries a Delivered-To: line for the user; a message that already carries the
user's Delivered-To: came round a loop and is kept instead of redirected again. A
vacation reply goes from <> to the envelope sender.

Trusts: the script store's files (compiled again, never trusted blindly) and the
message (only parsed by kanmon.store.sieve's bounded header reader).

Never: lose the message: a script that fails to compile or to run, a folder that cannot
be made, or any unexpected error means "keep in INBOX" (with an event); a redirect that
cannot be queued for a message nobody keeps defers the delivery (retried) rather than
dropping it.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from kanmon.escape import for_log as escape
from kanmon.model import Envelope
from kanmon.store.maildir import MaildirError, Mailbox, mailbox_path
from kanmon.store.sieve import MessageView, SieveError, evaluate, parse_headers
from kanmon.store.sievescripts import ActiveScripts, sieve_dir
from kanmon.store.vacation import VacationMemory, build_reply, handle_of, refusal

Inject = Callable[[Envelope, bytes, str], Awaitable[str]]
Emit = Callable[..., None]


@dataclass(slots=True)
class Outgoing:
    envelope: Envelope
    content: bytes
    origin: str  # "sieve redirect" | "vacation reply"
    claim: Callable[[float], bool] | None = None  # vacation: remember the sender (False: answered already)
    days: int = 0


@dataclass(slots=True)
class Decision:
    boxes: list[Path]  # Maildir folders to store the message in (empty: discarded)
    outgoing: list[Outgoing] = field(default_factory=list)
    notes: list[tuple[str, str]] = field(default_factory=list)  # (event text, kind)


def has_script(data_dir: Path, rcpt: str) -> bool:
    """Whether rcpt has an active script (one stat; the cheap question asked first)."""
    try:
        return os.path.exists(sieve_dir(data_dir, rcpt) / "active")
    except MaildirError:
        return False


class SieveFilter:
    """settings(): (max_redirects, max_script_size, enabled), asked at each delivery so a
    reload applies at once. clock(): now, for the vacation memory."""

    def __init__(self, data_dir: Path, hostname: str, inject: Inject, emit: Emit, *,
                 clock: Callable[[], float], settings: Callable[[], tuple[int, int, bool]] = lambda: (4, 65536, True)):
        self.data_dir = Path(data_dir)
        self.hostname = hostname
        self.inject = inject
        self.emit = emit
        self.clock = clock
        self.settings = settings
        self.scripts = ActiveScripts(self.data_dir)
        # unknown_local(address): a local domain's address that is no mailbox or alias
        # (kanmon.userdb.Directory.is_unknown_local); a redirect there keeps the message
        # in INBOX, as its bounce would go to the outside sender. None: not asked.
        self.unknown_local: Callable[[str], bool] | None = None

    def wanted(self, rcpt: str) -> bool:
        return self.settings()[2] and has_script(self.data_dir, rcpt)

    def decide(self, mail_from: str, rcpt: str, content: bytes) -> Decision:
        """Where the message goes for rcpt (worker thread). Never raises."""
        inbox = _mailbox_of(self.data_dir, rcpt)
        try:
            return self._decide(mail_from, rcpt, content, inbox)
        except Exception as e:  # noqa: BLE001 - whatever went wrong, the message is kept
            return Decision([inbox.root], notes=[(f"sieve {rcpt}: {type(e).__name__}: {escape(str(e))}; kept in INBOX", "error")])

    def _decide(self, mail_from: str, rcpt: str, content: bytes, box: Mailbox) -> Decision:
        max_redirects, max_size, _enabled = self.settings()
        self.scripts.max_size = max_size
        found = self.scripts.lookup(rcpt)
        if found is None:
            return Decision([box.root])
        name, script = found
        if isinstance(script, SieveError):
            return Decision([box.root], notes=[(f"sieve {rcpt}: script {escape(name)!s} does not compile "
                                                f"({escape(str(script))}); kept in INBOX", "error")])
        headers = parse_headers(content)
        view = MessageView(headers, mail_from, rcpt, len(content))
        outcome = evaluate(script, view, max_redirects=max_redirects)
        decision = Decision([])
        for err in outcome.errors:
            decision.notes.append((f"sieve {rcpt}: script {escape(name)}: {escape(err)}; kept in INBOX", "error"))
        for folder in outcome.folders:
            decision.boxes.append(self._folder(box, folder, folder in outcome.created, rcpt, decision))
        looped = any(v.strip().lower() == rcpt.lower() for v in view.values("delivered-to"))
        for address in outcome.redirects:
            if looped:
                decision.notes.append((f"sieve {rcpt}: not redirected to {address}: the message already went "
                                       f"through this mailbox (Delivered-To); kept in INBOX", "warning"))
                if box.root not in decision.boxes:
                    decision.boxes.append(box.root)
                continue
            if self.unknown_local is not None and self.unknown_local(address):
                decision.notes.append((f"sieve {rcpt}: not redirected to {escape(address)}: not a mailbox or alias of "
                                       f"a local domain; kept in INBOX", "warning"))
                if box.root not in decision.boxes:
                    decision.boxes.append(box.root)
                continue
            data = f"Delivered-To: {rcpt}\r\n".encode() + content
            decision.outgoing.append(Outgoing(Envelope(mail_from=mail_from, rcpts=[address]), data, "sieve redirect"))
        if outcome.vacation is not None:
            args = outcome.vacation
            why = refusal(view, args, {rcpt.lower()})
            if why is not None:
                decision.notes.append((f"sieve {rcpt}: no vacation reply to <{escape(mail_from)}>: {why}", "info"))
            else:
                reply = build_reply(view, args, rcpt, self.hostname, self.clock())
                # Who was answered is remembered only when the reply is queued (send), so
                # a delivery deferred and retried still answers once.
                claim = partial(VacationMemory(sieve_dir(self.data_dir, rcpt)).claim, handle_of(args, name),
                                mail_from, args.days)
                decision.outgoing.append(Outgoing(Envelope(mail_from="", rcpts=[mail_from]), reply, "vacation reply",
                                                  claim, args.days))
        if outcome.discarded and not decision.boxes and not decision.outgoing:
            decision.notes.append((f"sieve {rcpt}: discarded by script {escape(name)}", "info"))
        return decision

    def _folder(self, box: Mailbox, folder: str, create: bool, rcpt: str, decision: Decision) -> Path:
        if folder == "INBOX" or folder.upper() == "INBOX":
            return box.root
        try:
            return box.folder(folder).path
        except MaildirError:
            pass
        if create:
            try:
                box.create_folder(folder)
                box.subscribe(folder)
                decision.notes.append((f"sieve {rcpt}: created folder {escape(folder)}", "info"))
                return box.folder(folder).path
            except (MaildirError, OSError) as e:
                decision.notes.append((f"sieve {rcpt}: cannot create folder {escape(folder)} ({escape(str(e))}); "
                                       f"filed into INBOX", "warning"))
                return box.root
        decision.notes.append((f"sieve {rcpt}: fileinto {escape(folder)}: no such folder (and no :create); "
                               f"filed into INBOX", "warning"))
        return box.root

    async def send(self, decision: Decision, queue_id: str, rcpt: str) -> bool:
        """Queue the decision's outgoing messages; False if one could not be queued."""
        ok = True
        loop = asyncio.get_running_loop()
        for out in decision.outgoing:
            if out.claim is not None:
                try:
                    fresh = await loop.run_in_executor(None, out.claim, self.clock())
                except OSError as e:
                    self.emit(f"sieve {rcpt}: vacation memory unusable ({escape(str(e))}); no reply sent",
                              queue_id or None, "error")
                    continue
                if not fresh:
                    self.emit(f"sieve {rcpt}: no vacation reply to <{escape(out.envelope.rcpts[0])}>: "
                              f"answered within {out.days} days", queue_id or None)
                    continue
            try:
                new_id = await self.inject(out.envelope, out.content, out.origin)
            except Exception as e:  # noqa: BLE001 - the caller decides (defer, or a logged error)
                self.emit(f"sieve {rcpt}: {out.origin} to {escape(out.envelope.rcpts[0])} could not be queued: "
                          f"{type(e).__name__}: {escape(str(e))}", queue_id or None, "error")
                ok = False
                continue
            self.emit(f"sieve {rcpt}: {out.origin} to <{escape(out.envelope.rcpts[0])}> queued as {new_id}",
                      queue_id or None)
        return ok


def _mailbox_of(data_dir: Path, address: str) -> Mailbox:
    local, _, domain = address.rpartition("@")
    return Mailbox(mailbox_path(data_dir, domain, local))
