"""Per-client rate limits of the session profiles, counted across sessions and processes.

Role: three checks, each named after the profile key it enforces (the name the event
log, `kanmon stats` and `kanmon_checks_total{check}` show): connections_per_minute at
connect (421 4.7.0, the session closes), messages_per_hour at MAIL and
recipients_per_hour at RCPT (451 4.7.1 ... rate limit: the client retries later). The
counts are RateCounter hits in the SharedState of every receiver process, keyed by the
client address. Postfix counts the same way (anvil): every request counts, accepted or
not, so a client refused for its rate does not get a fresh allowance by retrying.
(The per-session limits and the concurrent connections per client are the session's and
the listener's: kanmon.smtp.session, kanmon.smtp.server.)

Trusts: the session's profile (ctx.profile) and the client address the listener gives.
Never: touch the state when the client's profile sets no limit (a limit of 0: the hook is not
even asked for that profile), or call the state other than through `await state.submit`.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from kanmon.config import SessionProfile
from kanmon.model import Reply
from kanmon.policy.pipeline import ACCEPTED, Check, CheckResult, Context, Stage, refuse
from kanmon.smtp import replies
from kanmon.state.api import SharedState


class _RateCheck(Check):
    """Counts one hit per request for the client's address in a window of `window`
    seconds; above the profile's `name` limit, refuses with `reply`."""

    window: float = 60.0
    reply: Reply = replies.LOCAL_ERROR

    def __init__(self, state: SharedState, clock: Callable[[], float] = time.time):
        self.state = state
        self.clock = clock

    def active(self, stage: Stage, profile: SessionProfile) -> bool:
        return bool(getattr(profile, self.name))  # off: the hook accepts every client of the profile

    def _limit(self, ctx: Context) -> CheckResult | Awaitable[CheckResult]:
        profile = ctx.profile
        limit = getattr(profile, self.name, 0) if profile is not None else 0
        if not limit:
            return ACCEPTED
        return self._count(f"{self.name} {ctx.client.ip}", limit)

    async def _count(self, key: str, limit: int) -> CheckResult:
        state = self.state
        n = await state.submit(state.counters.hit, key, self.window, self.clock())
        return refuse(self.reply) if n > limit else ACCEPTED


class ConnectionRateCheck(_RateCheck):
    name = "connections_per_minute"
    window = 60.0
    reply = replies.CONNECTION_RATE

    def connect(self, ctx: Context) -> CheckResult | Awaitable[CheckResult]:
        return self._limit(ctx)


class MessageRateCheck(_RateCheck):
    name = "messages_per_hour"
    window = 3600.0
    reply = replies.MESSAGE_RATE

    def mail(self, ctx: Context) -> CheckResult | Awaitable[CheckResult]:
        return self._limit(ctx)


class RecipientRateCheck(_RateCheck):
    name = "recipients_per_hour"
    window = 3600.0
    reply = replies.RECIPIENT_RATE

    def rcpt(self, ctx: Context) -> CheckResult | Awaitable[CheckResult]:
        return self._limit(ctx)


def rate_checks(profiles, state: SharedState | None, clock: Callable[[], float] = time.time) -> list[Check]:
    """The rate checks some profile needs (none: no hook at all on the accept path).
    A needed check without a state is a ValueError (at build time)."""
    out: list[Check] = []
    for cls in (ConnectionRateCheck, MessageRateCheck, RecipientRateCheck):
        if any(getattr(p, cls.name) for p in profiles):
            if state is None:
                raise ValueError(f"a session profile sets {cls.name}: the rate limits need the shared state")
            out.append(cls(state, clock))
    return out
