"""Next-hop resolution: a domain's MX hosts (RFC 5321 5.1), or a host's addresses.

Role: turn a recipient domain into the ordered list of servers to try (NextHop), with
DNS answers read through dnspython: MX by preference, equal preferences shuffled, the
domain's own A/AAAA when it has no MX (implicit MX), null MX refused (RFC 7505), and
mail that would loop back to this host refused (5.4.6) instead of retried forever.

Errors are SmtpError (DESIGN.md promise 7) with a Reply whose class says what the queue
manager does with the recipients: 5xx bounce, 4xx defer. A DNS server failure or
timeout is always 4xx: a lookup problem never bounces mail.

Trusts: the configuration (DNS servers, our names and addresses). DNS answers are
untrusted data: at most MAX_MX_HOSTS MX hosts and MAX_ADDRESSES_PER_HOST addresses each
are used; names are handled as dnspython Name objects, never as shell or file input.

Never: ask any DNS server but the configured ones (or the system's when none are
configured), resolve without a timeout, or turn a temporary DNS failure into a bounce.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.name
import dns.nameserver
import dns.resolver

from kanmon.aio import kept
from kanmon.model import Reply, SmtpError

if TYPE_CHECKING:
    from kanmon.config import Config
    from kanmon.dnscache import DnsCache

MAX_MX_HOSTS = 10  # MX hosts used per domain (Postfix: smtp_mx_address_limit)
MAX_ADDRESSES_PER_HOST = 5


@dataclass(frozen=True, slots=True)
class NextHop:
    """One server to try: its name (MX target or configured host), port, addresses.

    `addresses` empty means "resolve `host` when it is tried" (or `host` is an IP).
    `preference` is the MX preference (None for configured servers).
    """

    host: str
    port: int
    addresses: tuple[str, ...] = ()
    preference: int | None = None

    @classmethod
    def from_endpoint(cls, endpoint: tuple[str, int]) -> NextHop:
        """A configured `host:port` ([[domain]] servers, smarthost) as a NextHop."""
        host, port = endpoint
        return cls(host, port, (host,) if is_ip(host) else ())

    @property
    def is_literal(self) -> bool:
        return is_ip(self.host)

    @property
    def tls_relay(self) -> str:
        """The relay= of a STARTTLS=client line, as sendmail writes it: `mx.example.test.`,
        `[192.0.2.7]` (`:port` added when it is not 25), as the to= line's relay= begins."""
        port = f":{self.port}" if self.port != 25 else ""
        return (f"[{self.host}]" if self.is_literal else f"{self.host.rstrip('.')}.") + port

    def relay_text(self, address: str) -> str:
        """`store.corp.example. [192.0.2.7]` (`:port` added when it is not 25)."""
        port = f":{self.port}" if self.port != 25 else ""
        if self.is_literal:
            return f"[{address}]{port}"
        return f"{self.host.rstrip('.')}. [{address}]{port}"


@dataclass(frozen=True, slots=True)
class Lookup:
    """The records of one DNS answer; `authenticated`: a trusted validating resolver set AD."""

    records: tuple = ()
    authenticated: bool = False
    nxdomain: bool = False


@functools.lru_cache(maxsize=1024)
def is_ip(text: str) -> bool:
    """An IP address (asked for each next hop of each delivery: remembered)."""
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


# ---------------------------------------------------------------------------
# Replies (named, RFC 3463 codes)


def _null_mx(domain: str) -> Reply:
    # RFC 7505 3.3 / 4.2: 556 at SMTP time; in a DSN, 5.1.10.
    return Reply(556, "5.1.10", f"Domain {domain} does not accept mail (nullMX)")


def _loop(domain: str) -> Reply:
    return Reply(554, "5.4.6", f"mail for {domain} loops back to myself")


def _nxdomain(name: str, rdtype: str) -> Reply:
    return Reply(550, "5.1.2", f"Host or domain name not found. Name service error for name={name} type={rdtype}: Host not found")


def _no_data(name: str) -> Reply:
    return Reply(550, "5.4.4", f"Host or domain name not found. Name service error for name={name}: no MX or address records")


def _dns_temporary(name: str, rdtype: str, why: str) -> Reply:
    return Reply(451, "4.4.3", f"Host or domain name not found. Name service error for name={name} type={rdtype}: {why}, try again")


# ---------------------------------------------------------------------------


class _Nxdomain(Exception):
    pass


class MxResolver:
    """Resolves domains to NextHops.

    servers: ("ip", port) pairs to ask (config [dns] servers); empty: the system resolver.
    own_names: host names that are this node (its server.hostname).
    own_endpoints: (ip, port) pairs this node accepts SMTP on; an MX host with one of these
    addresses at the MX port is "myself".
    rng: for shuffling equal preferences (tests pass a seeded one).
    """

    def __init__(
        self,
        *,
        servers: Sequence[tuple[str, int]] = (),
        timeout: float = 5.0,
        port: int = 25,
        own_names: Iterable[str] = (),
        own_endpoints: Iterable[tuple[str, int]] = (),
        rng: random.Random | None = None,
        trust_ad: bool = False,
        cache: DnsCache | None = None,
    ):
        if timeout <= 0:
            raise ValueError("DNS timeout must be positive")
        if not 0 < port < 65536:
            raise ValueError(f"port {port} out of range")
        self.port = port
        self.own_names = {n.lower().rstrip(".") for n in own_names}
        self.own_endpoints = {(str(ipaddress.ip_address(ip)), p) for ip, p in own_endpoints}
        self._rng = rng or random.Random()
        if servers:
            self._resolver = dns.asyncresolver.Resolver(configure=False)
            self._resolver.nameservers = [dns.nameserver.Do53Nameserver(ip, p) for ip, p in servers]
        else:
            self._resolver = dns.asyncresolver.Resolver()
        self._resolver.timeout = timeout
        self._resolver.lifetime = timeout
        self._resolver.cache = cache  # the node's DNS cache (kanmon.dnscache), shared with the checks
        self.timeout = timeout
        # [dns] dnssec = "trust-ad": the servers validate and we believe their AD bit
        # (RFC 6840 5.7: a query with AD set asks for it). Only then is DANE possible.
        self.trust_ad = trust_ad
        if trust_ad:
            self._resolver.flags = dns.flags.RD | dns.flags.AD

    @classmethod
    def from_config(cls, config: Config, *, rng: random.Random | None = None, cache: DnsCache | None = None) -> MxResolver:
        own_endpoints = []
        for ip, port in config.smtp.listen:
            if ip in ("0.0.0.0", "::"):
                # A wildcard listener answers on loopback too; other interface addresses
                # are not enumerated (list them in [smtp] listen to have them counted).
                own_endpoints += [("127.0.0.1", port), ("::1", port)]
            elif is_ip(ip):
                own_endpoints.append((ip, port))
        return cls(
            servers=config.dns.servers,
            timeout=config.dns.timeout,
            port=config.outbound.mx_port,
            own_names=[config.server.hostname],
            own_endpoints=own_endpoints,
            rng=rng,
            trust_ad=config.dns.dnssec == "trust-ad",
            cache=cache,
        )

    # -- queries

    async def _query(self, name: dns.name.Name, rdtype: str) -> list:
        """Records of rdtype (empty: the name exists without them). Raises _Nxdomain or SmtpError 4xx."""
        text = name.to_text(omit_final_dot=True)
        try:
            answer = await kept(self._resolver.resolve(name, rdtype, search=False, raise_on_no_answer=False))
        except dns.resolver.NXDOMAIN:
            raise _Nxdomain(text) from None
        except dns.resolver.LifetimeTimeout:
            raise SmtpError(_dns_temporary(text, rdtype, "timed out")) from None
        except dns.resolver.NoNameservers:
            raise SmtpError(_dns_temporary(text, rdtype, "server failure")) from None
        except dns.exception.DNSException as e:
            raise SmtpError(_dns_temporary(text, rdtype, type(e).__name__)) from None
        return list(answer.rrset) if answer.rrset is not None else []

    async def lookup(self, name: str, rdtype: str) -> Lookup:
        """Any record type, with whether the answer is DNSSEC-authenticated (the AD bit of
        a server we trust, else never). Raises SmtpError 4.4.3 when DNS fails."""
        qname = _to_name(name)
        text = qname.to_text(omit_final_dot=True)
        try:
            answer = await kept(self._resolver.resolve(qname, rdtype, search=False, raise_on_no_answer=False))
        except dns.resolver.NXDOMAIN as e:
            # RFC 4035 3.2.3: a validated denial carries AD too.
            responses = list(e.responses().values()) if hasattr(e, "responses") else []
            ad = self.trust_ad and bool(responses) and all(r.flags & dns.flags.AD for r in responses)
            return Lookup((), authenticated=ad, nxdomain=True)
        except dns.resolver.LifetimeTimeout:
            raise SmtpError(_dns_temporary(text, rdtype, "timed out")) from None
        except dns.resolver.NoNameservers:
            raise SmtpError(_dns_temporary(text, rdtype, "server failure")) from None
        except dns.exception.DNSException as e:
            raise SmtpError(_dns_temporary(text, rdtype, type(e).__name__)) from None
        ad = self.trust_ad and bool(answer.response.flags & dns.flags.AD)
        return Lookup(tuple(answer.rrset) if answer.rrset is not None else (), authenticated=ad)

    async def resolve_host(self, host: str) -> tuple[str, ...]:
        """A host's addresses, IPv4 first (an IP literal is its own address).

        Raises SmtpError: 5.1.2 when the name does not exist or has no addresses, 4.4.3
        when DNS fails.
        """
        if is_ip(host):
            return (host,)
        name = _to_name(host)
        text = name.to_text(omit_final_dot=True)
        results = await asyncio.gather(self._query(name, "A"), self._query(name, "AAAA"), return_exceptions=True)
        addresses: list[str] = []
        temporary: SmtpError | None = None
        nx = False
        for res in results:
            if isinstance(res, _Nxdomain):
                nx = True
            elif isinstance(res, SmtpError):
                temporary = res
            elif isinstance(res, BaseException):
                raise res
            else:
                addresses += [r.address for r in res][:MAX_ADDRESSES_PER_HOST]
        if addresses:
            return tuple(addresses)
        if temporary is not None:
            raise temporary
        if nx:
            raise SmtpError(_nxdomain(text, "A"))
        raise SmtpError(Reply(550, "5.1.2", f"Host or domain name not found. Name service error for name={text}: no address records"))

    async def resolve_domain(self, domain: str) -> list[NextHop]:
        """The servers to try for a recipient domain, best first (RFC 5321 5.1).

        Raises SmtpError: 556 5.1.10 null MX; 554 5.4.6 loop to myself; 550 5.1.2
        domain does not exist; 550 5.4.4 no usable MX or address; 451 4.4.3 DNS failure.
        """
        literal = _address_literal(domain)
        if literal is not None:
            hops = [NextHop(literal, self.port, (literal,))]
            return self._without_myself(domain, hops)
        name = _to_name(domain)
        text = name.to_text(omit_final_dot=True)
        try:
            records = await self._query(name, "MX")
        except _Nxdomain:
            raise SmtpError(_nxdomain(text, "MX")) from None

        if not records:
            # RFC 5321 5.1: no MX -> the domain itself is the host (implicit MX).
            try:
                addresses = await self.resolve_host(text)
            except SmtpError as e:
                if e.reply.is_permanent:
                    raise SmtpError(_no_data(text)) from None
                raise
            return self._without_myself(text, [NextHop(text, self.port, addresses, 0)])

        exchanges = [(int(r.preference), r.exchange) for r in records]
        real = [(p, x) for p, x in exchanges if x != dns.name.root]
        if not real:
            raise SmtpError(_null_mx(text))  # RFC 7505 3: MX 0 .
        # RFC 5321 5.1: by preference; equal preferences in random order.
        self._rng.shuffle(real)
        real.sort(key=lambda px: px[0])
        real = real[:MAX_MX_HOSTS]

        lookups = await asyncio.gather(
            *(self.resolve_host(x.to_text(omit_final_dot=True)) for _, x in real), return_exceptions=True
        )
        hops: list[NextHop] = []
        temporary: SmtpError | None = None
        for (pref, exchange), res in zip(real, lookups):
            host = exchange.to_text(omit_final_dot=True)
            if isinstance(res, SmtpError):
                if res.reply.is_transient:
                    temporary = res
                continue
            if isinstance(res, BaseException):
                raise res
            hops.append(NextHop(host, self.port, res, pref))
        hops = self._without_myself(text, hops)
        if hops:
            return hops
        if temporary is not None:
            raise temporary
        raise SmtpError(Reply(550, "5.4.4", f"Host or domain name not found. Name service error for name={text}: no MX host has an address"))

    def is_myself(self, hop: NextHop) -> bool:
        if hop.host.lower().rstrip(".") in self.own_names:
            return True
        return any((str(ipaddress.ip_address(a)), hop.port) in self.own_endpoints for a in hop.addresses)

    def _without_myself(self, domain: str, hops: list[NextHop]) -> list[NextHop]:
        """RFC 5321 5.1: when we are one of the MX hosts, only more preferred hosts are
        candidates; when we are the best (or only) one, the mail loops: 5.4.6."""
        mine = [h.preference or 0 for h in hops if self.is_myself(h)]
        if not mine:
            return hops
        best_own = min(mine)
        keep = [h for h in hops if (h.preference or 0) < best_own]
        if not keep:
            raise SmtpError(_loop(domain))
        return keep

    async def resolve_hop(self, hop: NextHop) -> NextHop:
        """A configured hop with its addresses filled in (host names resolved now)."""
        if hop.addresses:
            return hop
        addresses = await self.resolve_host(hop.host)
        return NextHop(hop.host, hop.port, addresses, hop.preference)


def _to_name(text: str) -> dns.name.Name:
    text = text.strip()
    if not text or text == ".":
        raise ValueError("empty domain name")
    try:
        return dns.name.from_text(text.rstrip(".") + ".")
    except (dns.exception.DNSException, UnicodeError) as e:
        raise SmtpError(Reply(550, "5.1.2", f"Bad destination domain {text!r}: {e}")) from None


def _address_literal(domain: str) -> str | None:
    """RFC 5321 4.1.3 address literal `[192.0.2.1]` / `[IPv6:2001:db8::1]` -> the IP."""
    if not (domain.startswith("[") and domain.endswith("]")):
        return None
    inner = domain[1:-1]
    if inner[:5].lower() == "ipv6:":
        inner = inner[5:]
    try:
        return str(ipaddress.ip_address(inner))
    except ValueError:
        raise SmtpError(Reply(550, "5.1.2", f"Bad address literal {domain!r}")) from None


__all__ = ["MAX_ADDRESSES_PER_HOST", "MAX_MX_HOSTS", "Lookup", "MxResolver", "NextHop", "is_ip"]
