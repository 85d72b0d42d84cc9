"""Relay access and local recipients: who may send to whom (two checks and their tables).

Role: RelayAccess answers questions about the config's tables (relay networks, local
domains, the senders an authenticated user may use); RelayAccessCheck refuses a foreign
recipient from a client that may not relay; LocalRecipientsCheck refuses an unknown
local recipient and expands aliases. Pure decisions over the config: no I/O.

Trusts: addresses already parsed by kanmon.smtp.address; the client IP as the
listener reports it (after a PROXY header only from trusted proxies).
Never: let a client outside relay_networks, and not authenticated, send to a domain
that is not ours (DESIGN.md promise 4); accept an unknown local recipient (promise 5).
"""

from __future__ import annotations

import ipaddress

from kanmon.config import Config, DomainSection
from kanmon.policy.pipeline import ACCEPTED, Check, CheckResult, Context, accept, refuse
from kanmon.smtp import replies
from kanmon.smtp.address import Path


class RelayAccess:
    """The config's access tables, asked by the checks and the listener."""

    def __init__(self, config: Config):
        self.config = config
        self._relay_nets = list(config.smtp.relay_networks)
        self.domains: dict[str, DomainSection] = {d.name: d for d in config.domain}

    def is_relay_client(self, ip: str) -> bool:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        if addr.version == 6 and addr.ipv4_mapped:
            addr = addr.ipv4_mapped
        return any(addr in net for net in self._relay_nets)

    def is_local_domain(self, domain: str) -> bool:
        return domain in self.domains

    def sender_addresses(self, user: str) -> set[str]:
        """Envelope senders an authenticated mailbox may use: itself and its aliases."""
        user = user.lower()
        local, _, domain_name = user.rpartition("@")
        out = {user}
        domain = self.domains.get(domain_name)
        if domain is not None:
            for alias, targets in domain.aliases.items():
                expanded = {t.lower() if "@" in t else f"{t.lower()}@{domain.name}" for t in targets}
                if user in expanded:
                    out.add(f"{alias.lower()}@{domain.name}")
        return out


def _is_bare_postmaster(rcpt: Path) -> bool:
    # RFC 5321 4.5.1: <postmaster> must be accepted; it means ours.
    return rcpt.domain == "" and rcpt.local == "postmaster"


class RelayAccessCheck(Check):
    """RCPT: a domain that is not ours only from relay networks and authenticated users."""

    name = "relay_access"

    def __init__(self, access: RelayAccess):
        self.access = access

    def rcpt(self, ctx: Context) -> CheckResult:
        rcpt = ctx.rcpt
        assert rcpt is not None
        if rcpt.domain in self.access.domains or _is_bare_postmaster(rcpt):
            return ACCEPTED
        if ctx.client.auth_user or self.access.is_relay_client(ctx.client.ip):
            return ACCEPTED
        return refuse(replies.RELAY_DENIED)


class LocalRecipientsCheck(Check):
    """RCPT: a local domain's recipient is one of its mailboxes or aliases (expanded here)."""

    name = "local_recipients"

    def __init__(self, access: RelayAccess):
        self.access = access
        self.config = access.config
        # alias (lower case) -> its final addresses, per domain; computed once.
        self._aliases: dict[str, dict[str, tuple[str, ...]]] = {}
        for d in self.config.domain:
            table: dict[str, tuple[str, ...]] = {}
            for alias, targets in d.aliases.items():
                if alias.lower() in table:
                    continue  # the first spelling wins, as before
                seen: dict[str, None] = {}
                for t in targets:
                    seen[t.lower() if "@" in t else f"{t.lower()}@{d.name}"] = None
                table[alias.lower()] = tuple(seen)
            self._aliases[d.name] = table

    def rcpt(self, ctx: Context) -> CheckResult:
        rcpt = ctx.rcpt
        assert rcpt is not None
        if _is_bare_postmaster(rcpt):
            if not self.config.domain:
                return refuse(replies.UNKNOWN_USER)
            name = self.config.domain[0].name
            rcpt = Path(f"postmaster@{name}", "postmaster", name)
        domain = self.access.domains.get(rcpt.domain)
        if domain is None or domain.deliver == "relay":
            return ACCEPTED if rcpt is ctx.rcpt else accept(recipients=(rcpt.address,))
        local = rcpt.local.lower()
        if local in domain.mailboxes:
            return accept(recipients=(f"{local}@{domain.name}",))
        targets = self._aliases[domain.name].get(local)
        if targets is None:
            return refuse(replies.UNKNOWN_USER)
        return accept(recipients=targets)
