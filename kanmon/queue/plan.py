"""Retry planning: what follows one delivery attempt, as a pure function.

Role: from a message's state (its envelope and what its journal adds up to), the results
of this attempt and the [queue] settings, decide everything that follows: each
recipient's final status (a temporary failure becomes a bounce once the message has
expired), the journal records to append, when the next attempt is due (doubling from
the first interval to the most, jittered upward by up to 10%), whether a delay notice
goes out now (once after warn_after, or again every warn_every), which failure, delay and
success notices to send (as far as the sender's RFC 3461 NOTIFY asked for them), and
whether the message leaves the queue. A message is not expired before it had
min_attempts attempts (a greylisting server gets its retry even with lifetime 0). The queue manager carries the plan out (journal first, then logs, notices,
schedule or removal); this module does no I/O and reads no clock: `now` and the random
source are passed in, so every case is a unit test.

Trusts: its arguments. Never: plan a notice about a message from <> or about a notice
(DESIGN.md promise 5); plan the removal of a message with a recipient still deferred;
plan a retry for a held message (release schedules it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from kanmon.model import Envelope, RecipientResult, Status
from kanmon.spool import journal
from kanmon.spool.journal import QueueState

FAILED = "failed"  # RFC 3464 action of a failure notice
DELAYED = "delayed"  # ... of a delay notice
DELIVERED = "delivered"  # ... of a success notice: delivered into a mailbox here
RELAYED = "relayed"  # ... of a success notice: taken by a next hop that does not do DSN
# The RFC 3461 NOTIFY keyword that asks for each action's notice.
NOTIFY_KEYWORD = {FAILED: "FAILURE", DELAYED: "DELAY", DELIVERED: "SUCCESS", RELAYED: "SUCCESS"}


class Uniform(Protocol):
    """The random source for jitter (random.Random, or a fixed stand-in in tests)."""

    def uniform(self, a: float, b: float) -> float: ...


@dataclass(frozen=True, slots=True)
class Settings:
    """[queue] retry, warn_after and lifetime, in seconds (0: never warn / bounce at once);
    warn_every (0: one delay notice only) and min_attempts (attempts before expiry)."""

    retry_first: float
    retry_most: float
    warn_after: float
    lifetime: float
    warn_every: float = 0.0
    min_attempts: int = 1

    @classmethod
    def from_config(cls, queue) -> Settings:
        """From a kanmon.config queue section."""
        first, most = queue.retry_bounds
        return cls(first, most, queue.warn_after, queue.lifetime, queue.warn_every, queue.attempts_before_expiry)


@dataclass(frozen=True, slots=True)
class NoticeRequest:
    """Send a notice (RFC 3464 action `failed` or `delayed`) about these recipients."""

    action: str
    results: tuple[RecipientResult, ...]


@dataclass(frozen=True, slots=True)
class Plan:
    results: tuple[RecipientResult, ...]  # one per recipient tried, final status
    expired: bool  # lifetime reached: temporary failures were turned into bounces
    journal: tuple[journal.Record, ...]  # to append (durably) before anything else
    retry_at: float | None  # next attempt; None: nothing to retry (or held)
    notices: tuple[NoticeRequest, ...]  # to send, in order
    no_notice: tuple[str, ...]  # actions whose notice is not sent: from <> or about a notice
    remove: bool  # every recipient is final: the message leaves the queue
    not_requested: tuple[str, ...] = ()  # (failed,): some recipients left out, the sender's NOTIFY did not ask

    @property
    def warn(self) -> bool:
        return any(n.action == DELAYED for n in self.notices)


def retry_delay(attempts: int, first: float, most: float, rng: Uniform) -> float:
    """[queue] retry = "first..most": doubling per failed attempt, jittered upward by up to 10%, capped."""
    base = first * (2 ** max(0, attempts - 1))
    return min(most, base * rng.uniform(1.0, 1.1))


def _success_notices(env: Envelope, final: list[RecipientResult], may_notify: bool) -> tuple[NoticeRequest, ...]:
    """Success notices, only when asked (NOTIFY=SUCCESS) and only where the next hop did
    not take the request over (RFC 3461 5.2.2): delivered here, or relayed onward."""
    if not may_notify or not env.dsn_notify:  # without NOTIFY, never a success notice (RFC 3461 4.1)
        return ()
    sent = [r for r in final if r.status is Status.SENT and not r.dsn_passed]
    out = []
    for action, rs in ((DELIVERED, [r for r in sent if r.mailer == "local"]),
                       (RELAYED, [r for r in sent if r.mailer != "local"])):
        if wanted := tuple(r for r in rs if env.wants_notice(r.rcpt, NOTIFY_KEYWORD[action])):
            out.append(NoticeRequest(action, wanted))
    return tuple(out)


def attempt_now(state: QueueState) -> bool:
    """Whether a due message is attempted (a held one is left alone)."""
    return not state.hold


def plan_attempt(
    env: Envelope,
    state: QueueState,
    results: list[RecipientResult],
    settings: Settings,
    now: float,
    rng: Uniform,
    *,
    notices: bool = True,
) -> Plan:
    """The plan after an attempt that produced `results` at `now`.

    notices: whether this node sends notices at all (False: none are planned, and none
    reported as suppressed either).
    """
    may_notify = bool(env.mail_from) and not env.is_notice and notices
    if all(r.status is Status.SENT for r in results):
        # Every recipient delivered (the common case): nothing to journal, retry, warn
        # about or bounce; only success notices, where NOTIFY asked for them.
        return Plan(results=tuple(results), expired=False, journal=(), retry_at=None,
                    notices=_success_notices(env, results, may_notify), no_notice=(), remove=True)
    age = now - (env.received_at or now)
    deferred = any(r.status is Status.DEFERRED for r in results)
    # Expiry: lifetime reached (or lifetime 0) turns temporary failures into bounces, once
    # the message had its minimum number of attempts (this one included).
    expired = (
        deferred and (settings.lifetime == 0 or age >= settings.lifetime)
        and state.attempts + 1 >= settings.min_attempts
    )
    final: list[RecipientResult] = []
    for r in results:
        if r.status is Status.DEFERRED and expired:
            # The last reply is kept; the notice reports it as a permanent 5.x.x.
            r = RecipientResult(r.rcpt, Status.BOUNCED, r.reply, r.relay, r.mailer, r.tls)
        final.append(r)
    still_deferred = tuple(r for r in final if r.status is Status.DEFERRED)
    bounced = tuple(r for r in final if r.status is Status.BOUNCED)
    records: list[journal.Record] = [
        journal.Result(now, r.rcpt, r.status.value, str(r.reply), r.relay, r.mailer, r.tls) for r in final
    ]
    retry_at = None
    if still_deferred:
        retry_at = now + retry_delay(state.attempts + 1, settings.retry_first, settings.retry_most, rng)
        records.append(journal.Attempt(now, state.attempts + 1, retry_at))
    not_requested: list[str] = []

    def asked(action: str, rs: tuple[RecipientResult, ...]) -> tuple[RecipientResult, ...]:
        """The recipients whose NOTIFY asks for this action's notice (RFC 3461 4.1)."""
        keyword = NOTIFY_KEYWORD[action]
        wanted = tuple(r for r in rs if env.wants_notice(r.rcpt, keyword))
        # Reported for failures only: a failure notice the sender did not ask for is the
        # one an admin looks for; a delay notice would be reported at every retry.
        if rs and len(wanted) < len(rs) and may_notify and action == FAILED:
            not_requested.append(action)
        return wanted

    # A delay notice once after warn_after; with warn_every, again each time that much
    # has passed since the last one.
    warn_due = (
        settings.warn_after > 0 and age >= settings.warn_after
        and (not state.warned or (settings.warn_every > 0 and now - state.warned_at >= settings.warn_every))
    )
    delayed = asked(DELAYED, still_deferred) if warn_due and may_notify else ()
    warn = bool(delayed)
    if warn:
        records.append(journal.Warned(now))
    planned: list[NoticeRequest] = []
    suppressed: list[str] = []
    if bounced:
        if not (env.mail_from and not env.is_notice):
            suppressed.append(FAILED)
        elif notices and (failed := asked(FAILED, bounced)):
            planned.append(NoticeRequest(FAILED, failed))
    if warn:
        planned.append(NoticeRequest(DELAYED, delayed))
    planned += _success_notices(env, final, may_notify)
    # The journal first: after a crash, what is written is what happened. When every
    # recipient was delivered the removal is the record (a crash before it delivers
    # again: twice, never zero times), so nothing is journaled.
    if not (still_deferred or bounced or warn):
        records = []
    return Plan(
        results=tuple(final),
        expired=expired,
        journal=tuple(records),
        retry_at=None if state.hold else retry_at,
        notices=tuple(planned),
        no_notice=tuple(suppressed),
        remove=not still_deferred,
        not_requested=tuple(not_requested),
    )
