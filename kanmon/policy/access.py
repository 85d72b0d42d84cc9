"""Relay access and local recipients: who may send to whom (two checks and their tables).

Role: RelayAccess answers questions about the config's tables (relay networks, local
domains, the senders an authenticated user may use); RelayAccessCheck refuses a foreign
recipient from a client that may not relay; LocalRecipientsCheck refuses an unknown
local recipient and expands aliases. Decisions over the config and the users file
(kanmon.userdb.Directory, which follows the file's changes with at most one stat() a
second); no other I/O.

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
from kanmon.userdb import Directory


RELAY_ANSWERS_MAX = 4096  # client addresses whose relay_networks answer is remembered


class RelayAccess:
    """The config's access tables, asked by the checks and the listener."""

    def __init__(self, config: Config, directory: Directory | None = None):
        self.config = config
        self.directory = directory or Directory(config)
        self._relay_nets = list(config.smtp.relay_networks)
        self.domains: dict[str, DomainSection] = {d.name: d for d in config.domain}
        # ip -> answer: several checks ask about each session's client (the accept path
        # is benchmarked; parsing the address is most of the cost). Bounded: cleared when full.
        self._relay_answers: dict[str, bool] = {}

    def is_relay_client(self, ip: str) -> bool:
        answer = self._relay_answers.get(ip)
        if answer is None:
            answer = self._is_relay_client(ip)
            if len(self._relay_answers) >= RELAY_ANSWERS_MAX:
                self._relay_answers.clear()
            self._relay_answers[ip] = answer
        return answer

    def _is_relay_client(self, ip: str) -> bool:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        if addr.version == 6 and addr.ipv4_mapped:
            addr = addr.ipv4_mapped
        return any(addr in net for net in self._relay_nets)

    def from_outside(self, client) -> bool:
        """Mail from this client (a ClientInfo) goes the "inbound" way: it neither logged
        in nor is in relay_networks."""
        return not (client.auth_user or self.is_relay_client(client.ip))

    def is_local_domain(self, domain: str) -> bool:
        return domain in self.domains

    def sender_addresses(self, user: str) -> set[str]:
        """Envelope senders an authenticated mailbox may use: itself and its aliases."""
        user = user.lower()
        local, _, domain_name = user.rpartition("@")
        out = {user}
        for alias, targets in self.directory.tables().aliases.get(domain_name, {}).items():
            if user in targets:
                out.add(f"{alias}@{domain_name}")
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
        targets = self.access.directory.local_targets(f"{rcpt.local}@{domain.name}")
        if targets is None:
            return refuse(replies.UNKNOWN_USER)
        return accept(recipients=targets)
