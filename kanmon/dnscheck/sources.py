"""Where the DNS health check gets its answers: a DNS server, or BIND zone files.

Role: one small interface, ``lookup(name, rdtype) -> Answer``, with two sources behind
it. ``ResolverSource`` asks DNS servers (the ones given with --server or ``[dns]
servers``, else the system resolver) through dnspython. ``ZoneSource`` reads BIND-format
zone files (forward and reverse) with dnspython's zone parser and answers from them as
an authoritative server would, with no network at all, so zones can be checked before
they are published. Every check, including the SPF evaluation, asks the same source.

Trusts: nothing it reads. Answers from the network and zone file contents are data;
a zone file that does not parse is a ZoneFileError naming the file and line.

Never: fall back from one source to another (a zone-file check never touches the
network; a --server check never asks the system resolver), raise on an ordinary DNS
failure (SERVFAIL, timeout, NXDOMAIN are Answers the checks report), or cache between
runs (each check run builds a new source, so a fixed zone shows up at once).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Protocol

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.nameserver
import dns.query
import dns.rcode
import dns.rdata
import dns.rrset
import dns.rdataclass
import dns.rdatatype
import dns.resolver
import dns.zone

_MAX_CNAME_CHAIN = 8


class Status(Enum):
    OK = "ok"  # records of the asked type (possibly after CNAMEs)
    NODATA = "nodata"  # the name exists, no record of that type
    NXDOMAIN = "nxdomain"  # the name does not exist
    FAILED = "failed"  # SERVFAIL, REFUSED, timeout: nothing can be said
    OUTSIDE = "outside"  # zone files only: no given zone holds the name
    # The name is below a zone cut (NS records: `mail IN NS linkp1`) and its own name
    # servers were not asked (zone files) or did not answer: nothing can be said here.
    DELEGATED = "delegated"


# The statuses for which no records could be seen (a check reports them, never judges them).
UNANSWERED = (Status.FAILED, Status.OUTSIDE, Status.DELEGATED)
NAMESERVER_PORT = 53  # where delegated name servers are asked (tests run theirs elsewhere)
_MAX_REFERRALS = 4


@dataclass(frozen=True)
class Answer:
    name: str  # as asked, lower case, no trailing dot
    rdtype: str  # "A", "MX", ...
    status: Status
    records: tuple[dns.rdata.Rdata, ...] = ()
    canonical: str = ""  # the name the records belong to, after CNAMEs
    error: str = ""  # FAILED / OUTSIDE / DELEGATED: why
    delegated_to: tuple[str, ...] = ()  # DELEGATED: the name servers, as the zone names them
    server: str = ""  # who answered, when not the source itself (a delegated name server)

    @property
    def ok(self) -> bool:
        return self.status is Status.OK

    @property
    def via_cname(self) -> bool:
        return bool(self.canonical) and self.canonical != self.name

    def texts(self) -> list[str]:
        """TXT records, each one's character-strings joined (RFC 7208 3.3)."""
        out = []
        for rd in self.records:
            strings = getattr(rd, "strings", None)
            if strings is not None:
                out.append(b"".join(strings).decode("utf-8", "replace"))
        return out

    def addresses(self) -> list[str]:
        return [rd.address for rd in self.records if hasattr(rd, "address")]

    def describe(self) -> str:
        """A short phrase for finding texts: 'NXDOMAIN', 'no MX record', 'SERVFAIL'."""
        if self.status is Status.NXDOMAIN:
            return f"{self.name} does not exist (NXDOMAIN)"
        if self.status is Status.NODATA:
            return f"{self.name} has no {self.rdtype} record"
        if self.status is Status.DELEGATED:
            return f"{self.name} delegated to {', '.join(self.delegated_to)}: not checked ({self.error})"
        if self.status in (Status.FAILED, Status.OUTSIDE):
            return f"{self.rdtype} lookup of {self.name} failed: {self.error}"
        return ", ".join(rd.to_text() for rd in self.records)


class SourceError(Exception):
    """No source can be built: no resolver configuration, a zone file that does not parse."""


class DnsSource(Protocol):
    description: str

    def lookup(self, name: str, rdtype: str) -> Answer: ...


def _norm(name: str | dns.name.Name) -> str:
    text = name.to_text() if isinstance(name, dns.name.Name) else name
    return text.lower().rstrip(".")


def _short_names(cut: dns.name.Name, targets: Iterable[dns.name.Name]) -> tuple[str, ...]:
    """Name servers as the delegating zone writes them: `linkp1` for linkp1.<parent of
    the cut>, the full name for a server elsewhere."""
    parent = cut.parent() if len(cut) > 1 else cut
    out = []
    for t in targets:
        out.append(_norm(t.relativize(parent)) if t.is_subdomain(parent) and t != parent else _norm(t))
    return tuple(sorted(dict.fromkeys(out)))


class RecordingSource:
    """Any source, keeping every answer it gave (each question once, in the order asked):
    what `kanmon dns check --show` prints."""

    def __init__(self, source: DnsSource):
        self.source = source
        self.description = source.description
        self._answers: dict[tuple[str, str], Answer] = {}

    def lookup(self, name: str, rdtype: str) -> Answer:
        ans = self.source.lookup(name, rdtype)
        self._answers.setdefault((ans.name, rdtype), ans)
        return ans

    def take(self) -> list[Answer]:
        """The answers so far; the next take() starts afresh (one per checked domain)."""
        out = list(self._answers.values())
        self._answers.clear()
        return out


# ---------------------------------------------------------------------------
# DNS servers


class ResolverSource:
    """Asks DNS servers: the given ones (host, port), or the system resolver when none."""

    def __init__(self, servers: Sequence[tuple[str, int]] = (), timeout: float = 5.0,
                 nameserver_port: int | None = None):
        if servers:
            resolver = dns.resolver.Resolver(configure=False)
            resolver.nameservers = [
                dns.nameserver.Do53Nameserver(_server_address(host), port) for host, port in servers
            ]
            self.description = "DNS server " + ", ".join(
                f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in servers
            )
        else:
            try:
                resolver = dns.resolver.Resolver()  # /etc/resolv.conf
            except dns.resolver.NoResolverConfiguration:
                raise SourceError("no DNS server configured on this system: give --server or [dns] servers") from None
            self.description = "system resolver (" + ", ".join(str(n) for n in resolver.nameservers) + ")"
        resolver.timeout = timeout
        resolver.lifetime = timeout
        resolver.cache = None
        self._resolver = resolver
        self._timeout = timeout
        self._ns_port = NAMESERVER_PORT if nameserver_port is None else nameserver_port
        self._dead: set[str] = set()  # delegated servers that did not answer in this run

    def lookup(self, name: str, rdtype: str) -> Answer:
        asked = _norm(name)
        try:
            ans = self._resolver.resolve(asked + ".", rdtype, raise_on_no_answer=False, search=False)
        except dns.resolver.NXDOMAIN as e:
            canonical = _norm(e.canonical_name) if e.kwargs.get("qnames") else asked
            return Answer(asked, rdtype, Status.NXDOMAIN, canonical=canonical)
        except dns.resolver.NoNameservers as e:
            return Answer(asked, rdtype, Status.FAILED, error=_server_errors(e))
        except dns.exception.Timeout:
            return Answer(asked, rdtype, Status.FAILED, error=f"no answer within {self._timeout:g}s")
        except dns.exception.DNSException as e:
            return Answer(asked, rdtype, Status.FAILED, error=str(e))
        records = tuple(ans.rrset) if ans.rrset is not None else ()
        canonical = _norm(ans.canonical_name)
        if not records:
            cut = _referral(ans.response, ans.canonical_name)
            if cut is not None:  # an authoritative server of the parent sent us on
                return self._follow(asked, rdtype, ans.canonical_name, ans.response, cut, _MAX_REFERRALS)
        return Answer(asked, rdtype, Status.OK if records else Status.NODATA, records, canonical=canonical)

    # -- delegations: RFC 1034 4.3.2 step 3b, done by hand because the server we were told to
    # ask is authoritative for the parent and does not recurse.

    def _follow(self, asked: str, rdtype: str, qname: dns.name.Name, response: dns.message.Message,
                cut: dns.rrset.RRset, budget: int) -> Answer:
        targets = [rd.target for rd in cut]
        shown = _short_names(cut.name, targets)
        glue: dict[dns.name.Name, list[str]] = {}
        for rrset in response.additional:
            if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
                glue.setdefault(rrset.name, []).extend(rd.address for rd in rrset)
        tried: list[str] = []
        for target in targets:
            addresses = glue.get(target)
            if addresses is None:  # no glue: the server's name is elsewhere; ask for it
                addresses = self.lookup(_norm(target), "A").addresses() if budget > 0 else []
            for address in addresses:
                label = f"{_norm(target)} [{address}]"
                if address in self._dead:
                    tried.append(f"{label}: no answer")
                    continue
                try:
                    reply, _ = dns.query.udp_with_fallback(
                        dns.message.make_query(qname, rdtype), address, timeout=self._timeout, port=self._ns_port)
                except (dns.exception.DNSException, OSError) as e:
                    self._dead.add(address)
                    tried.append(f"{label}: {'no answer' if isinstance(e, dns.exception.Timeout) else e}")
                    continue
                rcode = reply.rcode()
                if rcode == dns.rcode.NXDOMAIN:
                    return Answer(asked, rdtype, Status.NXDOMAIN, canonical=_norm(qname), server=label)
                if rcode != dns.rcode.NOERROR:
                    tried.append(f"{label}: {dns.rcode.to_text(rcode)}")
                    continue
                chain = reply.resolve_chaining()
                records = tuple(chain.answer) if chain.answer is not None else ()
                if not records:
                    deeper = _referral(reply, chain.canonical_name)
                    if deeper is not None and budget > 0 and deeper.name != cut.name:
                        return self._follow(asked, rdtype, chain.canonical_name, reply, deeper, budget - 1)
                return Answer(asked, rdtype, Status.OK if records else Status.NODATA, records,
                              canonical=_norm(chain.canonical_name), server=label)
        error = "; ".join(tried) or "no address for its name servers"
        return Answer(asked, rdtype, Status.DELEGATED, canonical=_norm(qname), delegated_to=shown,
                      error=f"{_norm(cut.name)} has its own name servers, not reachable from here: {error}")


def _referral(response: dns.message.Message | None, qname: dns.name.Name) -> dns.rrset.RRset | None:
    """The NS set of a referral (a non-authoritative answer with no records, no SOA, and
    NS records for qname or a name above it in the authority section), else None."""
    if response is None or response.flags & dns.flags.AA or response.rcode() != dns.rcode.NOERROR:
        return None
    if any(r.rdtype == dns.rdatatype.SOA for r in response.authority):
        return None
    for rrset in response.authority:
        if rrset.rdtype == dns.rdatatype.NS and qname.is_subdomain(rrset.name):
            return rrset
    return None


def _server_address(host: str) -> str:
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        return socket.getaddrinfo(host, 53, proto=socket.IPPROTO_UDP)[0][4][0]


def _server_errors(e: dns.resolver.NoNameservers) -> str:
    answers = []
    for err in e.kwargs.get("errors", []):  # (server, tcp, port, error or rcode text, response)
        answers.append(str(err[3]) if len(err) > 3 else str(err[-1]))
    return "; ".join(dict.fromkeys(answers)) or "no server answered"


# ---------------------------------------------------------------------------
# Zone files


class ZoneFileError(SourceError):
    """A zone file that cannot be read or parsed; the text names the file (and line)."""


def load_zone(path: str | Path) -> dns.zone.Zone:
    """A zone file parsed by dnspython. Without $ORIGIN, the origin is the file name
    minus a .zone/.db suffix or db. prefix (named.conf gives it; we cannot)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ZoneFileError(f"{p}: cannot read: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ZoneFileError(f"{p}: not UTF-8 text") from None
    try:
        return dns.zone.from_text(text, origin=None, relativize=False, filename=str(p), check_origin=False)
    except dns.zone.UnknownOrigin:
        origin = _origin_from_filename(p)
        try:
            return dns.zone.from_text(text, origin=origin, relativize=False, filename=str(p), check_origin=False)
        except dns.exception.DNSException as e:
            raise ZoneFileError(f"{p}: {e} (no $ORIGIN in the file; assumed {origin}.)") from None
    except dns.exception.DNSException as e:  # dnspython's text starts "file:line:"
        raise ZoneFileError(str(e) if str(e).startswith(str(p)) else f"{p}: {e}") from None


def _origin_from_filename(p: Path) -> str:
    name = p.name
    for suffix in (".zone", ".db", ".hosts"):
        name = name.removesuffix(suffix)
    return name.removeprefix("db.") + "."


class ZoneSource:
    """Answers from BIND zone files, as their authoritative server would."""

    def __init__(self, paths: Iterable[str | Path]):
        self.paths = [Path(p) for p in paths]
        self.zones = [load_zone(p) for p in self.paths]
        self.description = "zone files " + ", ".join(str(p) for p in self.paths)

    def _zone_for(self, name: dns.name.Name) -> dns.zone.Zone | None:
        best = None
        for zone in self.zones:
            if name.is_subdomain(zone.origin) and (best is None or len(zone.origin) > len(best.origin)):
                best = zone
        return best

    def lookup(self, name: str, rdtype: str) -> Answer:
        asked = _norm(name)
        qname = dns.name.from_text(asked)
        want = dns.rdatatype.from_text(rdtype)
        for _ in range(_MAX_CNAME_CHAIN):
            zone = self._zone_for(qname)
            if zone is None:
                return Answer(
                    asked, rdtype, Status.OUTSIDE, canonical=_norm(qname),
                    error=f"{_norm(qname)} is in none of the given zone files",
                )
            cut = _zone_cut(zone, qname, want)
            if cut is not None:  # RFC 1034 4.2.1: below a cut, the data is the child zone's
                cut_name, ns = cut
                return Answer(
                    asked, rdtype, Status.DELEGATED, canonical=_norm(qname),
                    delegated_to=_short_names(cut_name, [rd.target for rd in ns]),
                    error=f"{_norm(cut_name)} has its own name servers; zone files are checked without asking them",
                )
            node = zone.get_node(qname)
            if node is None:
                exists = any(n.is_subdomain(qname) for n in zone.nodes)
                status = Status.NODATA if exists else Status.NXDOMAIN
                return Answer(asked, rdtype, status, canonical=_norm(qname))
            rdataset = node.get_rdataset(dns.rdataclass.IN, want)
            if rdataset:
                return Answer(asked, rdtype, Status.OK, tuple(rdataset), canonical=_norm(qname))
            cname = node.get_rdataset(dns.rdataclass.IN, dns.rdatatype.CNAME)
            if cname and want != dns.rdatatype.CNAME:
                qname = next(iter(cname)).target
                continue
            return Answer(asked, rdtype, Status.NODATA, canonical=_norm(qname))
        return Answer(asked, rdtype, Status.FAILED, error=f"CNAME chain longer than {_MAX_CNAME_CHAIN}")


def _zone_cut(zone: dns.zone.Zone, qname: dns.name.Name, want: int) -> tuple[dns.name.Name, object] | None:
    """The highest delegation (NS records below the zone's origin) at or above qname.
    NS (and DS) asked at the cut itself are the parent's data: answered, not referred."""
    labels = len(qname) - len(zone.origin)
    for i in range(labels - 1, -1, -1):  # from just below the origin down to qname
        name = qname.split(len(zone.origin) + labels - i)[1]
        node = zone.get_node(name)
        ns = node.get_rdataset(dns.rdataclass.IN, dns.rdatatype.NS) if node is not None else None
        if not ns:
            continue
        if name == qname and want in (dns.rdatatype.NS, dns.rdatatype.DS):
            return None
        return name, ns
    return None
