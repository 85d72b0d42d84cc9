"""Greylisting: a new (client network, sender, recipient) triplet is deferred once.

Role: at RCPT, for a client whose session profile has `greylist = true`, answer
451 4.7.1 to a triplet first seen less than greylist_delay ago; accept its retry between
greylist_delay and greylist_window after the first try and remember it as passed
(greylist_remember after its last use); a triplet not retried within the window starts
over. A client network (IPv4 /24, IPv6 /64: a sender's pool of outbound servers) that
passed greylist_pass_count triplets skips greylisting. The triplets live in the shared
state (kanmon.state.api.GreylistStore), so every receiver process of a node sees the
same first try. refresh() prunes old triplets at most once an hour.

Why RCPT (as postgrey behind Postfix's check_policy_service): each recipient is its own
triplet with its own reply; a 4xx at RCPT costs the client no DATA transfer.

Trusts: the configuration and the shared state. Sender and recipient come from the
client: they are only keys (bound parameters in the backend), lower-cased.
Never: call the shared state from the event loop but through state.submit; accept a
triplet whose state could not be read or written (the check fails by its failure mode,
451 4.3.0); sleep.
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections.abc import Awaitable, Callable

from kanmon.config import Config, SessionProfile
from kanmon.model import Reply
from kanmon.policy.pipeline import ACCEPTED, Check, CheckResult, Context, Stage, tempfail
from kanmon.policy.profiles import client_profile
from kanmon.state.api import SharedState, Triplet

PRUNE_EVERY = 3600.0  # seconds between two prunes of the triplets (per process)


def greylisted_reply(seconds: float) -> Reply:
    """451 4.7.1 Greylisted, try again in N seconds."""
    return Reply(451, "4.7.1", f"Greylisted, try again in {max(1, math.ceil(seconds))} seconds")


def client_network(ip: str) -> str:
    """The network greylisting keys a client by: its /24 (IPv4) or /64 (IPv6), as text.
    An IPv4-mapped IPv6 address is its IPv4 /24; a text that is no address is itself."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if addr.version == 6 and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    prefix = 24 if addr.version == 4 else 64
    return str(ipaddress.ip_network(f"{addr}/{prefix}", strict=False))


class GreylistCheck(Check):
    """RCPT: defer new triplets for profiles with greylist = true (see the module docstring)."""

    name = "greylist"

    def __init__(self, config: Config, state: SharedState, *, clock: Callable[[], float] = time.time):
        self.config = config
        self.state = state
        self._clock = clock
        on = [p for p in config.session_profiles.values() if p.greylist]
        # Pruning keeps what the most patient profile still needs.
        self._prune_window = max((p.greylist_window for p in on), default=0.0)
        self._prune_remember = max((p.greylist_remember for p in on), default=0.0)
        self._last_prune: float | None = None

    def active(self, stage: Stage, profile: SessionProfile) -> bool:
        return profile.greylist  # off: the hook accepts every client of the profile

    def rcpt(self, ctx: Context) -> CheckResult | Awaitable[CheckResult]:
        client = ctx.client
        profile = client_profile(ctx, self.config)
        if not profile.greylist or ctx.rcpt is None:
            return ACCEPTED
        sender = ctx.envelope.mail_from if ctx.envelope is not None else ""
        triplet = Triplet(client_network(client.ip), sender.lower(), ctx.rcpt.address.lower())
        return self._ask(triplet, profile)

    async def _ask(self, triplet: Triplet, profile: SessionProfile) -> CheckResult:
        wait = await self.state.submit(self.decide, triplet, profile, self._clock())
        return ACCEPTED if wait <= 0 else tempfail(greylisted_reply(wait))

    def decide(self, triplet: Triplet, profile: SessionProfile, now: float) -> float:
        """Blocking (the state's thread): record this try; the seconds the client must
        still wait (0: accepted)."""
        grey = self.state.greylist
        if profile.greylist_pass_count and grey.client_passes(triplet.client) >= profile.greylist_pass_count:
            return 0.0
        st = grey.attempt(triplet, now)
        if st.passed is not None:
            return 0.0
        if now - st.first_seen > profile.greylist_window:
            grey.forget(triplet)  # not retried in time: this try is a new first try
            st = grey.attempt(triplet, now)
        wait = st.first_seen + profile.greylist_delay - now
        if wait > 0:
            return wait
        grey.mark_passed(triplet, now)
        return 0.0

    def refresh(self) -> None:
        """Prune triplets (blocking; the listener's probe thread): at most once an hour."""
        now = self._clock()
        if self._last_prune is not None and now - self._last_prune < PRUNE_EVERY:
            return
        self._last_prune = now
        self.state.greylist.prune(now, self._prune_window, self._prune_remember)
