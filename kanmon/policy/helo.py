"""HELO checks, decided at MAIL (as Postfix does with smtpd_delay_reject): the name the
client gave in HELO/EHLO must be a host name or an address literal (helo_strict), not our
own name or address from a client outside our networks (reject_own_helo), and may have
to resolve (helo_resolvable).

Role: three checks ("helo_syntax", "helo_own", "helo_resolvable") read the client's
profile; replies like Postfix's (`504 5.5.2 <name>: Helo command rejected: need
fully-qualified hostname`). HELO itself is always required before MAIL (the session
answers 503 5.5.1), so helo_required needs no check of its own.

Trusts: the HELO name only as text (one word, but it may carry control characters: a
reply shows it escaped, as kanmon.escape.for_log writes it); our own names and addresses
from the configuration.
Never: pass a name because DNS failed (helo_resolvable answers 450 then), query DNS for
a profile that does not ask for it, send the client's name back raw.
"""

from __future__ import annotations

import ipaddress
import re

from kanmon.config import Config, SessionProfile
from kanmon.escape import for_log
from kanmon.model import Reply
from kanmon.policy.access import RelayAccess
from kanmon.policy.dns import CheckResolver, DnsAnswer
from kanmon.policy.pipeline import ACCEPTED, Check, CheckResult, Context, Stage, refuse
from kanmon.policy.profiles import client_profile

_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def _helo(ctx: Context) -> str:
    return ctx.client.helo


def helo_invalid(name: str) -> Reply:
    return Reply(501, "5.5.2", f"<{for_log(name)}>: Helo command rejected: Invalid name")


def helo_not_fqdn(name: str) -> Reply:
    return Reply(504, "5.5.2", f"<{for_log(name)}>: Helo command rejected: need fully-qualified hostname")


def helo_is_ours(name: str) -> Reply:
    return Reply(550, "5.7.1", f"<{for_log(name)}>: Helo command rejected: that is my name, not yours")


def helo_not_found(name: str) -> Reply:
    return Reply(450, "4.7.1", f"<{for_log(name)}>: Helo command rejected: Host not found")


def address_literal(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address of a literal `[192.0.2.1]` or `[IPv6:2001:db8::1]`, else None."""
    if not (name.startswith("[") and name.endswith("]")):
        return None
    inner = name[1:-1]
    try:
        if inner[:5].lower() == "ipv6:":
            return ipaddress.IPv6Address(inner[5:])
        return ipaddress.IPv4Address(inner)
    except ValueError:
        return None


def helo_syntax(name: str) -> str:
    """"literal", "fqdn", "host" (one label) or "invalid"."""
    if name.startswith("["):
        return "literal" if address_literal(name) is not None else "invalid"
    labels = name.lower().removesuffix(".").split(".")
    if len(name) > 255 or not all(_LABEL.match(label) for label in labels):
        return "invalid"
    if len(labels) < 2 or labels[-1].isdigit():
        return "host"  # "localhost", or a bare address "192.0.2.1" without brackets
    return "fqdn"


class HeloSyntaxCheck(Check):
    """MAIL: helo_strict: a fully-qualified host name or an address literal."""

    name = "helo_syntax"

    def __init__(self, config: Config):
        self.config = config

    def active(self, stage: Stage, profile: SessionProfile) -> bool:
        return profile.helo_strict  # off: the hook accepts every client of the profile

    def mail(self, ctx: Context) -> CheckResult:
        if not client_profile(ctx, self.config).helo_strict:
            return ACCEPTED
        name = _helo(ctx)
        kind = helo_syntax(name)
        if kind == "invalid":
            return refuse(helo_invalid(name))
        if kind == "host":
            return refuse(helo_not_fqdn(name))
        return ACCEPTED


class OwnHeloCheck(Check):
    """MAIL: reject_own_helo: a client outside relay_networks, not authenticated, that
    greets with our host name or one of our listening addresses."""

    name = "helo_own"

    def __init__(self, access: RelayAccess):
        self.access = access
        self.config = config = access.config
        self.names = {config.server.hostname.lower()}
        addrs: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = set()
        listens = list(config.smtp.listen)
        if config.submission is not None:
            listens += [*config.submission.listen, *config.submission.listen_tls]
        for host, _port in listens:
            try:
                addr = ipaddress.ip_address(host)
            except ValueError:
                continue
            if not addr.is_unspecified:
                addrs.add(addr)
        self.addresses = frozenset(addrs)

    def active(self, stage: Stage, profile: SessionProfile) -> bool:
        return profile.reject_own_helo  # off: the hook accepts every client of the profile

    def mail(self, ctx: Context) -> CheckResult:
        client = ctx.client
        if client.auth_user or self.access.is_relay_client(client.ip):
            return ACCEPTED
        if not client_profile(ctx, self.config).reject_own_helo:
            return ACCEPTED
        name = _helo(ctx)
        if name.lower().removesuffix(".") in self.names:
            return refuse(helo_is_ours(name))
        literal = address_literal(name)
        if literal is not None and literal in self.addresses:
            return refuse(helo_is_ours(name))
        return ACCEPTED


class HeloResolvableCheck(Check):
    """MAIL: helo_resolvable: the HELO name has an A or AAAA record (an address literal
    passes; 450 while it has none or DNS fails, like Postfix's reject_unknown_helo_hostname)."""

    name = "helo_resolvable"

    def __init__(self, config: Config, resolver: CheckResolver):
        self.config = config
        self.resolver = resolver
        self.timeout = resolver.timeout + 1.0

    def active(self, stage: Stage, profile: SessionProfile) -> bool:
        return profile.helo_resolvable  # off: the hook accepts every client of the profile

    def mail(self, ctx: Context):
        if not client_profile(ctx, self.config).helo_resolvable:
            return ACCEPTED
        name = _helo(ctx)
        kind = helo_syntax(name)
        if kind == "literal":
            return ACCEPTED
        if kind != "fqdn":
            return refuse(helo_not_found(name))
        a = self.resolver.cached_nowait(name, "A")
        aaaa = self.resolver.cached_nowait(name, "AAAA")
        if (a is not None and a.ok) or (aaaa is not None and aaaa.ok):
            return ACCEPTED
        return self._lookup(name)

    async def _lookup(self, name: str) -> CheckResult:
        answer: DnsAnswer = await self.resolver.addresses(name)
        return ACCEPTED if answer.ok else refuse(helo_not_found(name))
