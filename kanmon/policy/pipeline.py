"""The check pipeline: the interface every accept check implements, and its runner.

Role: at each SMTP stage (connect, HELO, MAIL, RCPT, end of DATA) the session asks the
pipeline; the runner calls each check's hook for that stage in order and combines their
results into one Decision: the first result that is not an accept decides (its reply,
the check's name); headers to add, scores and side effects accumulate; a quarantine
request and a classification are carried along. A hook answers at once (a CheckResult)
or, when it needs I/O, with an awaitable. When every hook answers at once the runner
returns the Decision directly: no task, no await (the SMTP accept path is benchmarked).
Otherwise it returns a Pending that the listener awaits (Pending.resolve), each check
bounded by its timeout.

Trusts: the checks (our own code) to return CheckResults; nothing else. A check that
raises, times out or returns something else fails by its failure_reply (451 4.3.0 by
default, a 5xx for a check that must fail closed) and the Decision names it.
Never: turn a check failure into an accept (DESIGN.md promise 7); do I/O itself (side
effects are data, carried out by the listener); log (the listener writes the events).
"""

from __future__ import annotations

import asyncio
import enum
import inspect
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from kanmon.config import SessionProfile
from kanmon.model import ClientInfo, Envelope, Reply
from kanmon.smtp import replies
from kanmon.smtp.address import Path


class Stage(enum.Enum):
    """An SMTP stage; its value is the name of the check hook called at it."""

    CONNECT = "connect"
    HELO = "helo"
    MAIL = "mail"
    RCPT = "rcpt"
    DATA = "data"

    # Members are singletons compared by identity: the C-level identity hash, not
    # Enum's hash of the name in Python (the hook tables are looked up by stage at
    # every SMTP stage).
    __hash__ = object.__hash__


class Outcome(enum.Enum):
    ACCEPT = "accept"
    REJECT = "reject"  # 5xx: the client must not retry
    TEMPFAIL = "tempfail"  # 4xx: the client retries later


@dataclass(frozen=True, slots=True)
class Finding:
    """Something a check found that belongs in the message's trace (a content rule that
    matched, also one only logged): recorded as an event with the queue id once stored."""

    check: str
    rule: str
    action: str  # what the rule does (or would do, when log_only)
    detail: str  # what matched, in our words (network text quoted with repr)
    log_only: bool = False


@dataclass(frozen=True, slots=True)
class Amend:
    """What an accepting DATA check changes: the Subject, the recipients, or the message
    dropped (accepted with 250 and discarded, logged)."""

    subject_prefix: str = ""
    redirect: tuple[str, ...] = ()  # non-empty: these replace every recipient
    bcc: tuple[str, ...] = ()  # added recipients
    discard: str = ""  # non-empty: discard the message, for this reason


@dataclass(frozen=True, slots=True)
class CheckResult:
    """One check's answer at one stage."""

    outcome: Outcome = Outcome.ACCEPT
    reply: Reply | None = None  # the reply for REJECT / TEMPFAIL
    headers: tuple[tuple[str, str], ...] = ()  # header fields to add to the message (name, value)
    score: float = 0.0  # added to the message's score
    quarantine: str = ""  # non-empty: quarantine the message, for this reason
    effects: tuple[Any, ...] = ()  # side effects as data, carried out by the listener
    recipients: tuple[str, ...] | None = None  # RCPT: the final recipients (aliases expanded)
    classification: str = ""  # history classification ("Spam", "Virus"...); "" leaves it
    content: bytes | None = None  # DATA: the message rewritten (fields removed, Subject tagged); the later checks see it
    amend: Amend | None = None  # DATA: changes to the message or its recipients
    findings: tuple[Finding, ...] = ()  # for the message's trace
    tagged: bool = False  # DATA: this check's content has a Subject prefix it put there (history: Tag)


ACCEPTED = CheckResult()


def accept(**extra: Any) -> CheckResult:
    return CheckResult(**extra) if extra else ACCEPTED


def reject(reply: Reply, **extra: Any) -> CheckResult:
    if not reply.is_permanent:
        raise ValueError(f"reject needs a 5xx reply, not {reply}")
    return CheckResult(Outcome.REJECT, reply, **extra)


def tempfail(reply: Reply, **extra: Any) -> CheckResult:
    if not 400 <= reply.code < 500:
        raise ValueError(f"tempfail needs a 4xx reply, not {reply}")
    return CheckResult(Outcome.TEMPFAIL, reply, **extra)


def refuse(reply: Reply, **extra: Any) -> CheckResult:
    """Reject or tempfail, as the reply's code says."""
    return CheckResult(Outcome.REJECT if reply.is_permanent else Outcome.TEMPFAIL, reply, **extra)


class Context:
    """What a hook sees: the client, the transaction so far, and the stage's input."""

    __slots__ = ("client", "envelope", "sender", "rcpt", "recipients", "content", "header_end", "profile")

    def __init__(
        self, client: ClientInfo, envelope: Envelope | None = None, *, sender: Path | None = None,
        rcpt: Path | None = None, content: bytes = b"", header_end: int = -1,
    ):
        self.client = client  # client.helo is the HELO/EHLO name (at HELO: the one being checked)
        self.envelope = envelope  # MAIL: the envelope being built; RCPT, DATA: the transaction's
        self.sender = sender  # MAIL
        self.rcpt = rcpt  # RCPT: the address as the client gave it
        self.recipients: tuple[str, ...] = (rcpt.address,) if rcpt is not None else ()  # RCPT: as expanded so far
        self.content = content  # DATA: the message (dot-unstuffed, CRLF), without our Received:
        self.header_end = header_end  # DATA: offset of the CRLFCRLF ending the header block, or -1
        self.profile: SessionProfile | None = None  # the client's session profile (set by the session)

    @property
    def header(self) -> bytes:
        """DATA: the header block, each field ending in CRLF."""
        return self.content if self.header_end < 0 else self.content[: self.header_end + 2]

    @property
    def body(self) -> bytes:
        """DATA: the body (sliced on demand: most checks never read it)."""
        return b"" if self.header_end < 0 else self.content[self.header_end + 4 :]


class Check:
    """Base class of a check. Define any of the hooks connect, helo, mail, rcpt, data:
    each takes a Context and returns a CheckResult, or an awaitable of one when it needs
    I/O. A check may also define refresh(): blocking I/O the listener runs in a thread of
    its own about once a second (a probe whose result the hooks read at once);
    name_client(client): set client.name from what the check remembers, at once and
    without I/O, before the connect event is written; and active(stage, profile): whether
    the hook is asked at all for clients of a session profile."""

    name: str = ""
    timeout: float = 10.0  # seconds the listener waits for an awaitable answer
    failure_reply: Reply = replies.LOCAL_ERROR  # on timeout or error; 4xx by default, never an accept
    classification: str = "Policy"  # history classification of a message this check refuses

    def active(self, stage: Stage, profile: SessionProfile) -> bool:
        """False only when the hook at `stage` answers ACCEPTED, with nothing else (no
        header, effect, count or lookup started), to every client of `profile`, whatever
        the transaction: the pipeline then leaves it out for that profile. A check whose
        setting lives in the profile says so here; by default every hook is asked."""
        return True


@dataclass(slots=True)
class Decision:
    """The pipeline's combined answer at one stage (read it, never change it)."""

    outcome: Outcome = Outcome.ACCEPT
    reply: Reply | None = None
    check: str = ""  # the check that decided (not an accept); "" when all accepted
    classification: str = ""  # refused: the deciding check's class; accepted: what a check said, or ""
    headers: tuple[tuple[str, str], ...] = ()
    score: float = 0.0
    quarantine: str = ""
    effects: tuple[Any, ...] = ()
    recipients: tuple[str, ...] = ()  # RCPT: the final recipients
    error: str = ""  # the deciding check failed (timeout, exception): what happened
    content: bytes | None = None  # DATA: the message as the checks rewrote it (None: unchanged)
    amend: Amend | None = None  # DATA, accepted: changes to the message or its recipients
    findings: tuple[Finding, ...] = ()
    quarantine_check: str = ""  # the check that asked for quarantine
    tagged: bool = False  # DATA, accepted: a check's rewritten content has a Subject prefix of its own

    @property
    def accepted(self) -> bool:
        return self.outcome is Outcome.ACCEPT


ACCEPT_DECISION = Decision()

Hook = Callable[[Context], "CheckResult | Awaitable[CheckResult]"]


class _Tally:
    """Results accumulated so far at one stage."""

    __slots__ = ("headers", "score", "quarantine", "effects", "classification", "content", "amend", "findings",
                 "quarantine_check", "tagged")

    def __init__(self) -> None:
        self.headers: tuple[tuple[str, str], ...] = ()
        self.score = 0.0
        self.quarantine = ""
        self.effects: tuple[Any, ...] = ()
        self.classification = ""
        self.content: bytes | None = None
        self.amend: Amend | None = None
        self.findings: tuple[Finding, ...] = ()
        self.quarantine_check = ""
        self.tagged = False

    def add(self, check: Check, r: CheckResult, ctx: Context) -> Decision | None:
        """Take one result; the Decision when it decides (not an accept), else None."""
        if r.headers:
            self.headers += r.headers
        if r.score:
            self.score += r.score
        if r.quarantine and not self.quarantine:
            self.quarantine = r.quarantine
            self.quarantine_check = check.name
        if r.effects:
            self.effects += r.effects
        if r.recipients is not None:
            ctx.recipients = r.recipients
        if r.classification and outranks(r.classification, self.classification):
            self.classification = r.classification
        if r.content is not None:
            self.content = ctx.content = r.content
            ctx.header_end = r.content.find(b"\r\n\r\n")
            self.tagged = self.tagged or r.tagged
        if r.findings:
            self.findings += r.findings
        if r.amend is not None:
            self.amend = r.amend if self.amend is None else _combine(self.amend, r.amend)
        if r.outcome is Outcome.ACCEPT:
            return None
        reply = r.reply if r.reply is not None and not r.reply.is_positive else check.failure_reply
        return self._decision(ctx, r.outcome, reply, check, r.classification or check.classification)

    def fail(self, check: Check, error: str, ctx: Context) -> Decision:
        reply = check.failure_reply
        outcome = Outcome.REJECT if reply.is_permanent else Outcome.TEMPFAIL
        return self._decision(ctx, outcome, reply, check, check.classification, error)

    def done(self, ctx: Context) -> Decision:
        if ctx.rcpt is None and not (self.headers or self.score or self.quarantine or self.effects or self.classification
                                     or self.content is not None or self.amend or self.findings):
            return ACCEPT_DECISION  # the common case: nothing to carry
        return Decision(
            headers=self.headers, score=self.score, quarantine=self.quarantine, effects=self.effects,
            recipients=ctx.recipients, classification=self.classification, content=self.content,
            amend=self.amend, findings=self.findings, quarantine_check=self.quarantine_check, tagged=self.tagged,
        )

    def _decision(self, ctx: Context, outcome: Outcome, reply: Reply, check: Check, cls: str, error: str = "") -> Decision:
        return Decision(outcome, reply, check.name, cls, self.headers, self.score, self.quarantine, self.effects,
                        ctx.recipients, error, findings=self.findings)


# A later check's classification replaces an earlier one unless the earlier is graver: a
# message clamd found infected stays Virus when a spam scorer also calls it Spam.
_CLASS_RANK = {"Virus": 3, "Spam": 2}


def outranks(new: str, old: str) -> bool:
    return _CLASS_RANK.get(new, 1) >= _CLASS_RANK.get(old, 0 if not old else 1)


def _combine(a: Amend, b: Amend) -> Amend:
    """Two checks' amendments: the first subject prefix and discard reason, the later
    redirect, every bcc."""
    return Amend(a.subject_prefix or b.subject_prefix, b.redirect or a.redirect, a.bcc + b.bcc, a.discard or b.discard)


def _bad_result(r: object) -> str:
    return f"returned {type(r).__name__}, not a CheckResult"


class Pipeline:
    """The checks, in order. run() answers a stage; see the module docstring."""

    def __init__(self, checks: Sequence[Check], profiles: Iterable[SessionProfile] = ()):
        """profiles: the configuration's session profiles, whose hook lists are made now;
        a profile not among them gets its list made the first time a session brings it."""
        names: set[str] = set()
        for c in checks:
            if not c.name or c.name in names:
                raise ValueError(f"check {c!r}: a check needs a unique name")
            names.add(c.name)
            if not c.timeout > 0:
                raise ValueError(f"check {c.name}: timeout must be positive")
            if c.failure_reply.is_positive:
                raise ValueError(f"check {c.name}: a failure must never accept ({c.failure_reply})")
        self.checks = tuple(checks)
        self._hooks: dict[Stage, tuple[tuple[Check, Hook], ...]] = {
            stage: tuple((c, h) for c in checks if callable(h := getattr(c, stage.value, None)))
            for stage in Stage
        }
        # Per profile (by identity: the configuration's profile objects live as long as
        # the pipeline built for it): the hooks that profile needs at each stage.
        self._by_profile: dict[int, tuple[SessionProfile, dict[Stage, tuple[tuple[Check, Hook], ...]]]] = {}
        self._last: tuple[SessionProfile | None, dict[Stage, tuple[tuple[Check, Hook], ...]]] = (None, self._hooks)
        for profile in profiles:
            self.hooks_for(profile)
        self._refreshers = tuple(r for c in checks if callable(r := getattr(c, "refresh", None)))
        self._namers = tuple(n for c in checks if callable(n := getattr(c, "name_client", None)))

    def hooks_for(self, profile: SessionProfile | None) -> dict[Stage, tuple[tuple[Check, Hook], ...]]:
        """The hooks asked at each stage for a client of `profile` (None: every hook; the
        checks then find the client's profile themselves)."""
        last = self._last  # the profile asked last (one tuple: read and replaced whole)
        if last[0] is profile:
            return last[1]
        if profile is None:
            return self._hooks
        entry = self._by_profile.get(id(profile))
        if entry is not None and entry[0] is profile:
            self._last = entry
            return entry[1]
        table = {
            stage: tuple((c, h) for c, h in hooks if _active(c, stage, profile))
            for stage, hooks in self._hooks.items()
        }
        if len(self._by_profile) >= _MAX_PROFILES:  # profiles made outside the configuration (tests)
            self._by_profile.clear()
        self._by_profile[id(profile)] = self._last = (profile, table)
        return table

    def has_hooks(self, stage: Stage, profile: SessionProfile | None = None) -> bool:
        return bool(self.hooks_for(profile)[stage])

    def refresh(self) -> None:
        """Run the checks' probes (blocking I/O: the listener calls this in its probe thread).
        One that raises does not keep the others from running; after them, the one error
        is raised, or an ExceptionGroup of them all when several failed."""
        errors: list[Exception] = []
        for r in self._refreshers:
            try:
                r()
            except Exception as e:  # noqa: BLE001 - raised below, once every probe ran
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        if errors:
            raise ExceptionGroup("probes failed", errors)

    def name_client(self, client: ClientInfo) -> None:
        """Name a client the checks remember (no I/O): its connect event then says who it is."""
        for n in self._namers:
            n(client)

    def run(self, stage: Stage, ctx: Context) -> Decision | Pending:
        """The Decision when every hook answered at once, else a Pending to await."""
        hooks = self.hooks_for(ctx.profile)[stage]
        if not hooks:
            return ACCEPT_DECISION if ctx.rcpt is None else Decision(recipients=ctx.recipients)
        return _run_from(stage, hooks, 0, None, ctx)


_MAX_PROFILES = 64


def _active(check: Check, stage: Stage, profile: SessionProfile) -> bool:
    active = getattr(check, "active", None)  # a check not derived from Check is always asked
    return True if active is None else bool(active(stage, profile))


def _run_from(stage: Stage, hooks: tuple[tuple[Check, Hook], ...], i: int, tally: _Tally | None,
              ctx: Context) -> Decision | Pending:
    """tally: what the hooks before i answered; None while every one answered a plain
    ACCEPTED (made at the first answer that carries something)."""
    n = len(hooks)
    while i < n:
        check, hook = hooks[i]
        try:
            r = hook(ctx)
        except Exception as e:  # noqa: BLE001 - a failing check fails by its failure mode
            return (tally or _Tally()).fail(check, f"{type(e).__name__}: {e}", ctx)
        if r is ACCEPTED:  # the common answer carries nothing to add up
            i += 1
            continue
        if tally is None:
            tally = _Tally()
        if r.__class__ is not CheckResult:
            if inspect.isawaitable(r):
                return Pending(stage, hooks, i, tally, ctx, r)
            if not isinstance(r, CheckResult):
                return tally.fail(check, _bad_result(r), ctx)
        decided = tally.add(check, r, ctx)
        if decided is not None:
            return decided
        i += 1
    if tally is None:  # every hook answered a plain ACCEPTED: what _Tally.done() gives for nothing
        return ACCEPT_DECISION if ctx.rcpt is None else Decision(recipients=ctx.recipients)
    return tally.done(ctx)


class Pending:
    """A stage whose check hooks[index] answered with an awaitable: the listener awaits
    resolve(), which waits for it (bounded by the check's timeout), then runs the rest."""

    __slots__ = ("stage", "_hooks", "_index", "_tally", "_ctx", "_awaitable")

    def __init__(self, stage: Stage, hooks: tuple[tuple[Check, Hook], ...], index: int, tally: _Tally,
                 ctx: Context, awaitable: Awaitable[CheckResult]):
        self.stage = stage
        self._hooks = hooks
        self._index = index
        self._tally = tally
        self._ctx = ctx
        self._awaitable: Awaitable[CheckResult] | None = awaitable

    @property
    def check(self) -> Check:
        """The check being waited for."""
        return self._hooks[self._index][0]

    async def resolve(self) -> Decision:
        tally, ctx = self._tally, self._ctx
        while True:
            aw, self._awaitable = self._awaitable, None
            assert aw is not None, "resolve() runs once"
            check = self._hooks[self._index][0]
            try:
                async with asyncio.timeout(check.timeout):
                    r = await aw
            except asyncio.TimeoutError:
                return tally.fail(check, f"no answer within {check.timeout:g} s", ctx)
            except Exception as e:  # noqa: BLE001 - a failing check fails by its failure mode
                return tally.fail(check, f"{type(e).__name__}: {e}", ctx)
            if not isinstance(r, CheckResult):
                return tally.fail(check, _bad_result(r), ctx)
            decided = tally.add(check, r, ctx)
            if decided is not None:
                return decided
            nxt = _run_from(self.stage, self._hooks, self._index + 1, tally, ctx)
            if not isinstance(nxt, Pending):
                return nxt
            self._index, self._awaitable = nxt._index, nxt._awaitable

    def discard(self) -> None:
        """Never to be resolved (the session closed): release the awaitable unstarted."""
        aw, self._awaitable = self._awaitable, None
        close = getattr(aw, "close", None)
        if inspect.iscoroutine(aw) and close is not None:
            close()
