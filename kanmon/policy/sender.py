"""Sender checks at MAIL: the sender's domain must exist in DNS, and a client outside our
networks may not use one of our domains without logging in.

Role: two checks, each enabled by the client's session profile (docs/policy.md):
SenderDomainCheck ("sender_domain": MX, else A/AAAA; RFC 7505 null MX; 451 4.1.8 while
DNS fails) and SenderSpoofCheck ("sender_spoof": own_domain_spoof). The null sender <>
is never checked; neither are our own domains' DNS or address-literal senders.

Trusts: the sender as parsed by kanmon.smtp.address (valid syntax, lower-case domain);
the resolver's typed answers. A warm cache answers at once (no await on the common path).
Never: accept a sender because DNS failed (a temporary failure is 451 4.1.8), query DNS
for a profile that does not ask for it.
"""

from __future__ import annotations

from kanmon.config import Config, SessionProfile
from kanmon.model import Reply
from kanmon.policy.access import RelayAccess
from kanmon.policy.dns import CheckResolver, DnsAnswer, DnsStatus
from kanmon.policy.pipeline import ACCEPTED, Check, CheckResult, Context, Stage, refuse
from kanmon.policy.profiles import client_profile
from kanmon.smtp.address import Path


def domain_not_found(address: str) -> Reply:
    return Reply(501, "5.1.8", f"<{address}>: Sender address rejected: Domain not found")


def domain_null_mx(address: str) -> Reply:
    return Reply(550, "5.7.27", f"<{address}>: Sender address rejected: Domain has null MX (RFC 7505)")


def domain_tempfail(address: str) -> Reply:
    return Reply(451, "4.1.8", f"<{address}>: Sender address rejected: Domain not found (DNS temporary failure)")


def spoofed(address: str) -> Reply:
    return Reply(550, "5.7.1", f"<{address}>: Sender address rejected: not logged in")


def is_null_mx(answer: DnsAnswer) -> bool:
    """RFC 7505 3: a single MX record with preference 0 and the root as exchange."""
    return len(answer.records) == 1 and answer.records[0].split() in (["0", "."], ["0", ""])


class SenderDomainCheck(Check):
    """MAIL: the sender domain has an MX, or A/AAAA without one (Postfix
    reject_unknown_sender_domain)."""

    name = "sender_domain"

    def __init__(self, config: Config, resolver: CheckResolver):
        self.config = config
        self.resolver = resolver
        self.timeout = 2 * resolver.timeout + 1.0  # MX, then A and AAAA together

    def active(self, stage: Stage, profile: SessionProfile) -> bool:
        return profile.sender_domain_check  # off: the hook accepts every client of the profile

    def mail(self, ctx: Context):
        sender = ctx.sender
        if sender is None or not sender.address or sender.domain.startswith("["):
            return ACCEPTED  # <> is never checked; an address literal has no DNS to ask
        if not client_profile(ctx, self.config).sender_domain_check:
            return ACCEPTED
        if self.config.find_domain(sender.domain) is not None:
            return ACCEPTED  # ours: split DNS may hide it, and sender_spoof decides
        domain = sender.domain
        mx = self.resolver.cached_nowait(domain, "MX")
        if mx is not None:
            if mx.status is not DnsStatus.NODATA:
                return self._decide(sender, mx, None)
            a = self.resolver.cached_nowait(domain, "A")
            aaaa = self.resolver.cached_nowait(domain, "AAAA")
            if (a is not None and a.ok) or (aaaa is not None and aaaa.ok):
                return ACCEPTED
            if a is not None and aaaa is not None:
                return refuse(domain_not_found(sender.address))
        return self._lookup(sender)

    async def _lookup(self, sender: Path) -> CheckResult:
        mx = await self.resolver.query(sender.domain, "MX")
        addresses = await self.resolver.addresses(sender.domain) if mx.status is DnsStatus.NODATA else None
        return self._decide(sender, mx, addresses)

    def _decide(self, sender: Path, mx: DnsAnswer, addresses: DnsAnswer | None) -> CheckResult:
        if mx.ok:
            return refuse(domain_null_mx(sender.address)) if is_null_mx(mx) else ACCEPTED
        if mx.temporary:
            return refuse(domain_tempfail(sender.address))
        if mx.status is DnsStatus.NXDOMAIN or addresses is None:
            return refuse(domain_not_found(sender.address))
        if addresses.ok:
            return ACCEPTED
        if addresses.temporary:
            return refuse(domain_tempfail(sender.address))
        return refuse(domain_not_found(sender.address))


class SenderSpoofCheck(Check):
    """MAIL: a sender in one of our domains from a client outside relay_networks that has
    not authenticated is refused when its profile says own_domain_spoof = "reject"."""

    name = "sender_spoof"

    def __init__(self, access: RelayAccess):
        self.access = access
        self.config = access.config

    def active(self, stage: Stage, profile: SessionProfile) -> bool:
        return profile.own_domain_spoof == "reject"  # off: the hook accepts every client of the profile

    def mail(self, ctx: Context) -> CheckResult:
        sender = ctx.sender
        if sender is None or not sender.address or not self.access.is_local_domain(sender.domain):
            return ACCEPTED
        client = ctx.client
        if client.auth_user or self.access.is_relay_client(client.ip):
            return ACCEPTED
        if client_profile(ctx, self.config).own_domain_spoof != "reject":
            return ACCEPTED
        return refuse(spoofed(sender.address))
