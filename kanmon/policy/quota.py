"""Mailbox quota: a recipient whose mailbox is over its domain's quota gets 452 4.2.2.

Role: at RCPT, after LocalRecipientsCheck expanded the recipient, look up the usage of
each final mailbox in a domain with a quota. The lookup walks a Maildir, so it runs in
an executor (the hook answers with an awaitable); domains without a quota answer at once.
The owner's notice and its marker are side effects as data (QuotaOver, QuotaUnder), which
the listener carries out (kanmon.store.quota.QuotaNotices).

Trusts: the usage function it is given (the composition root passes the Maildir one).
Never: touch a file itself, on the event loop or elsewhere; refuse for an unreadable
mailbox (that is delivery's problem, not a quota answer).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from kanmon.config import Config
from kanmon.policy.pipeline import ACCEPTED, Check, CheckResult, Context, accept, refuse
from kanmon.smtp import replies


@dataclass(frozen=True, slots=True)
class QuotaOver:
    """Effect: address was refused for being over quota; tell its owner (once per overflow)."""

    address: str
    usage: int
    quota: int


@dataclass(frozen=True, slots=True)
class QuotaUnder:
    """Effect: address is under its quota; the next overflow gets a new notice."""

    address: str


class QuotaCheck(Check):
    name = "quota"
    timeout = 30.0  # a big Maildir on a busy disk; past this, 451 and the sender retries

    def __init__(self, config: Config, usage: Callable[[str, str], int],
                 is_mailbox: Callable[[str], bool] | None = None):
        """usage(domain, local) -> bytes stored (blocking; run in an executor);
        is_mailbox(address): whether a recipient has a mailbox (default: the config's)."""
        self._usage = usage
        self._quota: dict[str, int] = {
            d.name: d.quota for d in config.domain if d.quota is not None and d.deliver != "relay"
        }
        mailboxes = {d.name: d.mailboxes for d in config.domain}
        self._is_mailbox = is_mailbox or (lambda a: a.rpartition("@")[0] in mailboxes.get(a.rpartition("@")[2], ()))

    def rcpt(self, ctx: Context) -> CheckResult | Awaitable[CheckResult]:
        if not self._quota:
            return ACCEPTED
        limited = []
        for t in ctx.recipients:
            local, _, domain = t.rpartition("@")
            quota = self._quota.get(domain)
            if quota is not None and self._is_mailbox(t):
                limited.append((t, domain, local, quota))
        if not limited:
            return ACCEPTED
        return self._lookup(limited)

    def _usage_or_zero(self, domain: str, local: str) -> int:
        try:
            return self._usage(domain, local)
        except OSError:
            return 0  # an unreadable mailbox is delivery's problem, not a quota answer

    async def _lookup(self, limited: list[tuple[str, str, str, int]]) -> CheckResult:
        loop = asyncio.get_running_loop()
        effects: list[Any] = []
        for address, domain, local, quota in limited:
            usage = await loop.run_in_executor(None, self._usage_or_zero, domain, local)
            if usage >= quota:
                effects.append(QuotaOver(address, usage, quota))
                return refuse(replies.OVER_QUOTA, effects=tuple(effects))
            effects.append(QuotaUnder(address))
        return accept(effects=tuple(effects))


def quota_effect_handlers(notices: Any) -> dict[type, Callable[[Any], Awaitable[None]]]:
    """The listener's handlers for the quota effects, carried out by notices
    (a kanmon.store.quota.QuotaNotices)."""
    return {
        QuotaOver: lambda e: notices.over(e.address, e.usage, e.quota),
        QuotaUnder: lambda e: notices.under(e.address),
    }
