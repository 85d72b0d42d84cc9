"""The DNS health check: the MX / A / PTR / SPF / DMARC / DKIM / MTA-STS / TLS-RPT
mistakes that make other servers refuse or distrust our mail, as findings.

Role: given a DnsSource and what we know about ourselves (domain, outgoing IPs, HELO
name, DKIM selector and key), ask the DNS the questions a receiving server asks and
say, for each, what was seen and what it means for our mail in plain words. Every
finding has a severity: ok, warning (mail flows but something is fragile or weak),
error (some receivers will refuse, queue or junk our mail, or mail to us fails).

Trusts: its caller for the domain, IPs and names (the CLI has validated them); nothing
in DNS answers.

Never: ask anything but the DnsSource it is given, raise on a broken zone (a broken
zone is what findings are for), or change anything.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from enum import IntEnum

import dns.reversename
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from kanmon.dnscheck import spfrecord, tagrecords
from kanmon.dnscheck.sources import UNANSWERED, Answer, DnsSource, Status


class Severity(IntEnum):
    OK = 0
    WARNING = 1
    ERROR = 2

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class Finding:
    severity: Severity
    check: str  # mx, ptr, fcrdns, helo, spf, dmarc, dkim, mta-sts, tls-rpt
    subject: str  # the name or address the finding is about
    seen: str  # what was seen in DNS
    consequence: str  # what it means for our mail, in plain words

    def as_dict(self) -> dict[str, str]:
        d = asdict(self)
        d["severity"] = self.severity.label
        return d


@dataclass(frozen=True)
class SigningKey:
    """One of our [[dkim]] keys that signs (or will sign) the target domain's mail."""

    domain: str  # d=: the target domain or the parent domain whose key signs it
    selector: str
    key: tuple[str, bytes] | None  # (key type, public key as DKIM publishes it); None: the file does not load
    signing: bool  # active: signing now; else configured for rotation, not signing yet
    problem: str = ""  # why key is None


@dataclass(frozen=True)
class ThisNode:
    """What the config knows of where mail for our domains should arrive: this node's
    names and addresses, and the hosts in front of it that pass mail on to it."""

    names: tuple[str, ...] = ()  # [server] hostname, [dnscheck] helo
    addresses: tuple[str, ...] = ()  # specific [smtp] listen addresses, [outbound] bind_address and
    # source_ips, [dnscheck] ips, our own [balancer] virtual addresses
    wildcard: bool = False  # [smtp] listen on 0.0.0.0 or ::: every address of the host, none named
    fronts: tuple[tuple[str, str], ...] = ()  # (network or host name, what it is): a balancer in front
    # ([smtp] trusted_proxies), the relay of a mail store ([outbound] smarthost)


@dataclass(frozen=True)
class Target:
    """What to check: one domain and our side of the mail path."""

    domain: str
    ips: tuple[str, ...] = ()
    helo: str | None = None
    dkim_selector: str | None = None
    dkim_key: tuple[str, bytes] | None = None  # (key type, public key as DKIM publishes it)
    receives_mail: bool = False  # a [[domain]] of ours: a null MX is then a mistake
    signing_keys: tuple[SigningKey, ...] = ()  # our [[dkim]] keys for this domain (when no selector is given)
    notes: tuple[str, ...] = ()  # what the config says beside the checks (outbound DANE, MTA-STS), after their notes
    node: ThisNode | None = None  # from the config: are the MX hosts of a domain we receive mail for ours?


@dataclass
class Report:
    domain: str
    source: str
    findings: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what was not checked, and why
    looked_at: list[Answer] = field(default_factory=list)  # --show: every answer, in order asked

    @property
    def worst(self) -> Severity:
        return max((f.severity for f in self.findings), default=Severity.OK)

    @property
    def exit_code(self) -> int:
        return int(self.worst)  # 0 all good, 1 warnings, 2 errors

    def count(self, severity: Severity) -> int:
        return sum(1 for f in self.findings if f.severity is severity)


def check_domain(source: DnsSource, target: Target) -> Report:
    """Every check for one domain, in the order an administrator reads them."""
    report = Report(target.domain, source.description)
    add = report.findings.extend
    hosts: dict[str, list[str] | None] = {}
    add(check_mx(source, target.domain, target.receives_mail, hosts))
    if target.receives_mail and target.node is not None:
        findings, notes = check_mx_reaches_us(target.domain, hosts, target.node)
        add(findings)
        report.notes.extend(notes)
    if target.ips:
        add(check_reverse(source, target.ips))
    else:
        report.notes.append("reverse DNS and SPF authorization not checked: no --ip given (or in the config)")
    if target.helo:
        add(check_helo(source, target.helo, target.ips))
    else:
        report.notes.append("HELO name not checked: no --helo given (or server hostname in the config)")
    add(check_spf(source, target.domain, target.ips, target.helo))
    add(check_dmarc(source, target.domain))
    if target.dkim_selector:
        add(check_dkim(source, target.domain, target.dkim_selector, target.dkim_key))
    elif target.signing_keys:
        add(check_signing_keys(source, target.signing_keys))
    else:
        # No [[dkim]] key signs this domain's mail either (kanmon dkim keygen makes one).
        report.notes.append("DKIM not checked: no selector configured ([dnscheck] dkim_selector or --dkim-selector)")
    add(check_mta_sts(source, target.domain))
    add(check_tls_rpt(source, target.domain))
    report.notes.extend(target.notes)
    return report


def _ok(check: str, subject: str, seen: str, consequence: str = "") -> Finding:
    return Finding(Severity.OK, check, subject, seen, consequence)


def _warn(check: str, subject: str, seen: str, consequence: str) -> Finding:
    return Finding(Severity.WARNING, check, subject, seen, consequence)


def _error(check: str, subject: str, seen: str, consequence: str) -> Finding:
    return Finding(Severity.ERROR, check, subject, seen, consequence)


def _failed(check: str, subject: str, ans: Answer, consequence: str) -> Finding:
    """A lookup that could not be answered. Offline (zone files), a name outside the
    given zones is a warning (not checkable here); a failing server is an error, since
    receivers see the same failure."""
    if ans.status is Status.OUTSIDE:
        return _warn(check, subject, ans.describe(), "not checked; give the zone file that holds it with --zone")
    if ans.status is Status.DELEGATED:
        return _delegated(check, subject, ans)
    return _error(check, subject, ans.describe(), consequence)


def _delegated(check: str, subject: str, ans: Answer, what: str = "") -> Finding:
    """A name with its own name servers (a link-balancing device answering for `mail`)
    that could not be asked: not checked, never an error of the zone we were given."""
    return _warn(
        check, subject, f"{what or ans.name} delegated to {', '.join(ans.delegated_to)}: not checked",
        f"{ans.error}; senders get {ans.name}'s records from those servers only, so check from outside "
        "that they answer",
    )


def _is_ip_literal(name: str) -> bool:
    text = name.rstrip(".").strip("[]")
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def _addresses(source: DnsSource, name: str) -> tuple[list[str], list[Answer]]:
    """A and AAAA of name; the answers are returned for their status."""
    answers = [source.lookup(name, "A"), source.lookup(name, "AAAA")]
    return [a for ans in answers for a in ans.addresses()], answers


# ---------------------------------------------------------------------------
# MX: RFC 5321 5.1, RFC 7505 (null MX), RFC 2181 10.3 (no CNAME targets)


def check_mx(source: DnsSource, domain: str, receives_mail: bool = False,
             hosts: dict[str, list[str] | None] | None = None) -> list[Finding]:
    """The mx findings; hosts (when given) gets each MX host's addresses (None: its own
    name servers could not be asked)."""
    ans = source.lookup(domain, "MX")
    if ans.status in UNANSWERED:
        return [_failed("mx", domain, ans, f"senders cannot find where to deliver; mail to {domain} is delayed")]
    if ans.status is Status.NXDOMAIN:
        return [_error("mx", domain, ans.describe(), f"every message to {domain} bounces: the domain does not exist")]
    if not ans.records:
        return [_implicit_mx(source, domain)]

    mxs = sorted((rd.preference, rd.exchange.to_text().lower()) for rd in ans.records)
    if any(host == "." for _, host in mxs):
        if len(mxs) == 1 and mxs[0][0] != 0:  # RFC 7505 3: the null MX has preference 0
            return [_warn(
                "mx", domain, f"null MX written as MX {mxs[0][0]} . (RFC 7505 says MX 0 .)",
                f"most senders still read it as 'accepts no mail' and bounce mail to {domain}; write MX 0 .",
            )]
        if mxs == [(0, ".")]:  # RFC 7505 3
            if receives_mail:
                return [_error(
                    "mx", domain, "null MX (MX 0 .): the domain says it accepts no mail (RFC 7505)",
                    f"senders bounce every message to {domain} at once, but kanmon is configured to receive "
                    "mail for it; publish the MX of our relay",
                )]
            return [_ok(
                "mx", domain, "deliberate null MX (MX 0 .): the domain accepts no mail (RFC 7505)",
                f"senders bounce mail to {domain} at once instead of queueing it",
            )]
        return [_error(
            "mx", domain, "null MX (MX 0 .) mixed with other MX records",
            "RFC 7505 3 allows a null MX only as the single MX; senders may treat the domain as accepting "
            "no mail and bounce",
        )]

    findings = []
    reachable = 0
    unchecked = 0  # hosts whose own name servers could not be asked
    seen_hosts: dict[str, int] = {}
    for pref, host in mxs:
        name = host.rstrip(".")
        if name in seen_hosts:
            findings.append(_warn(
                "mx", domain, f"{name} is listed twice (preferences {seen_hosts[name]} and {pref})",
                "harmless to delivery but a sign of an edit gone wrong; keep one",
            ))
            continue
        seen_hosts[name] = pref
        finding, has_address, addrs = _check_mx_host(source, domain, pref, name)
        findings.append(finding)
        if hosts is not None:
            hosts[name] = addrs
        reachable += has_address is True
        unchecked += has_address is None
    if not reachable and not unchecked:
        findings.append(_error(
            "mx", domain, "no MX host of the domain is usable",
            f"no sender can deliver to {domain}: mail queues at the senders and bounces after days",
        ))
    return findings


def _implicit_mx(source: DnsSource, domain: str) -> Finding:
    addrs, answers = _addresses(source, domain)
    if addrs:  # RFC 5321 5.1: the domain itself is the implicit MX
        return _warn(
            "mx", domain, f"no MX record; senders use the domain's own address {', '.join(addrs)} (implicit MX)",
            "mail goes to whatever host has that address, often a web server; if it does not accept mail "
            f"on port 25, mail to {domain} queues at the senders and bounces after days. Publish an MX record",
        )
    failed = [a for a in answers if a.status in UNANSWERED]
    if failed:
        return _failed("mx", domain, failed[0], f"senders cannot find where to deliver; mail to {domain} is delayed")
    return _error(
        "mx", domain, "no MX record and no A/AAAA record",
        f"no one can send mail to {domain}: senders bounce it",
    )


def _check_mx_host(source: DnsSource, domain: str, pref: int, host: str) -> tuple[Finding, bool | None, list[str] | None]:
    """The finding for one MX host, whether senders can find an address for it (None:
    not known here, the host's own name servers could not be asked), and its addresses
    (None: the lookup failed or could not be made)."""
    if _is_ip_literal(host):  # RFC 7505 3 / RFC 5321 5.1: an MX names a host, never an address
        return _error(
            "mx", domain, f"MX {pref} {host} is an IP address, not a host name",
            "senders look it up as a name, find nothing and cannot deliver there; publish an A record "
            "for a name and point the MX at that name",
        ), False, []
    addrs, answers = _addresses(source, host)
    cname = next((a for a in answers if a.via_cname), None)
    if cname is not None:  # RFC 2181 10.3
        return _error(
            "mx", domain, f"MX {pref} {host} is a CNAME (to {cname.canonical})",
            "an MX must name the host itself (RFC 2181 10.3); some senders refuse or mis-route it and mail "
            f"to {domain} is delayed. Point the MX at {cname.canonical}",
        ), bool(addrs), addrs
    if addrs:
        via = next((a.server for a in answers if a.server), "")
        return _ok("mx", domain, f"MX {pref} {host} -> {', '.join(addrs)}"
                   + (f" (from its own name server {via})" if via else "")), True, addrs
    failed = [a for a in answers if a.status in UNANSWERED]
    delegated = next((a for a in failed if a.status is Status.DELEGATED), None)
    if delegated is not None:
        return _delegated("mx", domain, delegated, f"MX {pref} {host}"), None, None
    if failed:
        return _failed("mx", domain, failed[0], f"senders cannot reach {host}; mail to {domain} is delayed"), False, None
    what = "does not exist (NXDOMAIN)" if answers[0].status is Status.NXDOMAIN else "has no A or AAAA record"
    return _error(
        "mx", domain, f"MX {pref} {host} {what}",
        f"senders cannot connect to {host}; they try the other MX hosts, and with none left mail to "
        f"{domain} queues at the senders and bounces after days",
    ), False, []


def _fronts(node: ThisNode) -> tuple[list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, str]],
                                     dict[str, str]]:
    nets, names = [], {}
    for spec, what in node.fronts:
        try:
            nets.append((ipaddress.ip_network(spec, strict=False), what))
        except ValueError:
            names[spec.rstrip(".").lower()] = what
    return nets, names


def _node_description(node: ThisNode) -> str:
    parts = list(dict.fromkeys(node.names)) + list(dict.fromkeys(node.addresses))
    if node.wildcard:
        parts.append("listening on every address ([smtp] listen 0.0.0.0 or ::)")
    text = ", ".join(parts)
    if node.fronts:
        text += "; in front of it: " + ", ".join(f"{spec} ({what})" for spec, what in node.fronts)
    return text


def check_mx_reaches_us(domain: str, hosts: dict[str, list[str] | None],
                        node: ThisNode) -> tuple[list[Finding], list[str]]:
    """For a domain we receive mail for: is one of its MX hosts this node, or a host the
    config says passes mail on to it (a balancer in front, the relay of a mail store)?
    hosts: each MX host's addresses (None: not known). A warning only when the config
    can tell; when it cannot (no address of this node named, a private address behind a
    NAT, an MX host not looked up), a note says what was not compared and why.
    (findings, notes)."""
    if not hosts:
        return [], []  # null MX, implicit MX, no MX: check_mx has said what it means
    names = {n.rstrip(".").lower() for n in node.names}
    ours = {ipaddress.ip_address(a) for a in node.addresses}
    front_nets, front_names = _fronts(node)
    for host, addrs in hosts.items():
        if host in names or host in front_names:
            return [], []
        for a in addrs or ():
            ip = ipaddress.ip_address(a)
            if ip in ours or any(ip in net for net, _ in front_nets):
                return [], []
    listing = "; ".join(f"{h} ({', '.join(a)})" for h, a in hosts.items() if a)
    unknown = [h for h, a in hosts.items() if a is None]
    if not listing:
        if unknown:
            return [], [f"MX of {domain} not compared with this node: the addresses of {', '.join(unknown)} "
                         "could not be looked up"]
        return [], []  # no MX host has an address: check_mx reports that as an error
    if unknown:
        return [], [f"MX of {domain} not compared with this node: {listing} is not this node, but the addresses "
                    f"of {', '.join(unknown)} could not be looked up"]
    if not ours:
        return [], [f"MX of {domain} ({listing}) not compared with this node: the config names none of its "
                    "addresses ([smtp] listen is 0.0.0.0 or ::, no [dnscheck] ips or [outbound] source_ips); "
                    "set [dnscheck] ips to the public address the MX should reach"]
    mx_ips = [ipaddress.ip_address(a) for a in (addr for a in hosts.values() if a for addr in a)]
    if any(ip.is_global for ip in mx_ips) and not any(ip.is_global for ip in ours):
        return [], [f"MX of {domain} ({listing}) not compared with this node: the config knows only its "
                    f"private addresses ({', '.join(node.addresses)}), and a NAT address that forwards to this "
                    "node cannot be told from someone else's server; set [dnscheck] ips to this node's public "
                    "address to have it compared"]
    return [_warn(
        "mx", domain, f"no MX host of {domain} is this node: {listing}; this node is {_node_description(node)}",
        f"senders deliver mail for {domain} to those hosts, not to this node: if they are someone else's "
        "servers (an old provider's, a typo), our mail goes there or bounces; point the MX at this node. If one "
        "of them passes mail on to this node, the config does not say so: a balancer in front of it is named "
        "by [smtp] trusted_proxies, the relay in front of a mail store by [outbound] smarthost",
    )], []


# ---------------------------------------------------------------------------
# Reverse DNS of our outgoing IPs: PTR present and forward-confirmed (RFC 1912 2.1,
# Postfix reject_unknown_client_hostname). The PTR name's A record is also "the relay's
# own name": after a migration it is the A that still points at the old address.


def _ptr_missing_consequence(ip: str) -> str:
    return (
        f"receiving servers that check reverse DNS will answer '450 4.7.1 Access denied. IP name lookup "
        f"failed [{ip}]' (or 'Client host rejected: cannot find your hostname') and our mail to them will "
        "queue until a PTR is published; the reverse zone is usually run by the ISP"
    )


def _fcrdns_consequence(ip: str, name: str) -> str:
    return (
        f"reverse DNS of {ip} is not forward-confirmed: servers that require it answer '450 4.7.1 Client "
        f"host rejected: cannot find your hostname [{ip}]' and our mail to them will queue; make the A "
        f"record of {name} point at {ip} (or the PTR name a host that does)"
    )


def check_reverse(source: DnsSource, ips: Sequence[str]) -> list[Finding]:
    findings = []
    for ip in ips:
        rev = dns.reversename.from_address(ip).to_text(omit_final_dot=True)
        ans = source.lookup(rev, "PTR")
        if ans.status in UNANSWERED:
            if ans.status is Status.DELEGATED:
                findings.append(_delegated("ptr", ip, ans))
            elif ans.status is Status.OUTSIDE:
                findings.append(_warn(
                    "ptr", ip, f"{rev} is in none of the given zone files",
                    "reverse DNS not checked; give the reverse zone file with --zone",
                ))
            else:
                findings.append(_error(
                    "ptr", ip, f"PTR lookup of {rev} failed: {ans.error}",
                    "receivers see the same failure and answer '450 4.7.1 ... IP name lookup failed'; "
                    "our mail to them will queue",
                ))
            continue
        if not ans.records:
            findings.append(_error(
                "ptr", ip, f"no PTR record for {ip} ({rev}: {'NXDOMAIN' if ans.status is Status.NXDOMAIN else 'no PTR'})",
                _ptr_missing_consequence(ip),
            ))
            continue
        names = [rd.target.to_text(omit_final_dot=True).lower() for rd in ans.records]
        if len(names) > 1:
            findings.append(_warn(
                "ptr", ip, f"{len(names)} PTR records: {', '.join(names)}",
                "receivers pick one; checks that compare it with the HELO name or its A record fail at random",
            ))
        else:
            findings.append(_ok("ptr", ip, f"PTR {names[0]}"))
        for name in names:
            findings.append(_check_fcrdns(source, ip, name))
    return findings


def _check_fcrdns(source: DnsSource, ip: str, name: str) -> Finding:
    rdtype = "A" if ipaddress.ip_address(ip).version == 4 else "AAAA"
    ans = source.lookup(name, rdtype)
    if ans.status in UNANSWERED:
        return _failed("fcrdns", ip, ans, _fcrdns_consequence(ip, name))
    addrs = ans.addresses()
    if any(ipaddress.ip_address(a) == ipaddress.ip_address(ip) for a in addrs):
        return _ok("fcrdns", ip, f"PTR {name} has {rdtype} {ip} (forward-confirmed)")
    if not addrs:
        what = "does not exist (NXDOMAIN)" if ans.status is Status.NXDOMAIN else f"has no {rdtype} record"
        return _error("fcrdns", ip, f"PTR names {name}, which {what}", _fcrdns_consequence(ip, name))
    return _error(
        "fcrdns", ip, f"PTR names {name}, but {name} has {rdtype} {', '.join(addrs)}, not {ip}",
        _fcrdns_consequence(ip, name),
    )


def check_helo(source: DnsSource, helo: str, ips: Sequence[str]) -> list[Finding]:
    """The name in our EHLO resolves, and to one of our IPs (RFC 5321 4.1.1.1, 2.3.5)."""
    name = helo.rstrip(".").lower()
    if _is_ip_literal(name) or "." not in name:
        return [_error(
            "helo", name, f"HELO name {name} is not a fully qualified host name",
            "RFC 5321 4.1.1.1 wants a host name; many receivers answer '504 5.5.2 Helo command rejected: "
            "need fully-qualified hostname' and refuse our mail",
        )]
    addrs, answers = _addresses(source, name)
    if not addrs:
        failed = [a for a in answers if a.status in UNANSWERED]
        if failed:
            return [_failed("helo", name, failed[0], "receivers see the same failure and may answer 450 4.7.1")]
        what = "does not exist (NXDOMAIN)" if answers[0].status is Status.NXDOMAIN else "has no A or AAAA record"
        return [_error(
            "helo", name, f"HELO name {name} {what}",
            "servers that check the HELO name answer '450 4.7.1 Helo command rejected: Host not found' and "
            "our mail to them will queue; give the name an A record with our outgoing address",
        )]
    if not ips:
        return [_ok("helo", name, f"HELO name {name} -> {', '.join(addrs)}")]
    ours = {ipaddress.ip_address(ip) for ip in ips}
    if any(ipaddress.ip_address(a) in ours for a in addrs):
        return [_ok("helo", name, f"HELO name {name} -> {', '.join(addrs)} (ours)")]
    return [_warn(
        "helo", name, f"HELO name {name} resolves to {', '.join(addrs)}, none of our IPs ({', '.join(ips)})",
        "receivers that compare the HELO name with the connecting address score our mail as suspicious; "
        "after a move this is usually an A record still pointing at the old address",
    )]


# ---------------------------------------------------------------------------
# SPF, RFC 7208


_SPF_PERMERROR = (
    "receivers get 'permerror' for our SPF (RFC 7208): our mail counts as unauthenticated, DMARC fails "
    "unless DKIM passes, and strict receivers reject it"
)


def check_spf(source: DnsSource, domain: str, ips: Sequence[str], helo: str | None) -> list[Finding]:
    ans = source.lookup(domain, "TXT")
    if ans.status in UNANSWERED:
        return [_failed("spf", domain, ans, "receivers get 'temperror' for SPF and may defer our mail (451 4.7.x)")]
    records = [t for t in ans.texts() if spfrecord.is_spf(t)]  # RFC 7208 4.5
    if not records:
        return [_error(
            "spf", domain, f"no SPF record (no TXT starting with v=spf1 at {domain})",
            "receivers cannot tell our mail from forgeries: large providers junk or reject unauthenticated "
            "mail, and DMARC can pass only through DKIM",
        )]
    if len(records) > 1:
        return [_error(
            "spf", domain, f"{len(records)} SPF records: " + " | ".join(records),
            "RFC 7208 4.5 allows exactly one; " + _SPF_PERMERROR + ". Merge them into one record",
        )]
    text = records[0]
    try:
        record = spfrecord.parse_spf(text)
    except spfrecord.SpfSyntaxError as e:
        return [_error("spf", domain, f"SPF record does not parse: {e} in {text!r}", _SPF_PERMERROR)]

    findings = []
    count = spfrecord.count_dns_terms(source, record, domain)
    if count.problems:
        findings.append(_error("spf", domain, "; ".join(count.problems), _SPF_PERMERROR))
    if count.total > spfrecord.MAX_DNS_TERMS:
        findings.append(_error(
            "spf", domain,
            f"{count.total} DNS-querying terms (include, a, mx, ptr, exists, redirect; limit "
            f"{spfrecord.MAX_DNS_TERMS}, RFC 7208 4.6.4) in {text!r}",
            _SPF_PERMERROR + ". Replace includes and a/mx terms by ip4:/ip6: networks",
        ))
    else:
        detail = f", {count.total} of {spfrecord.MAX_DNS_TERMS} DNS-querying terms"
        if count.unknown:
            detail += " (not followed: " + "; ".join(count.unknown) + ")"
        findings.append(_ok("spf", domain, f"SPF record {text!r}{detail}"))

    all_terms = record.mechanisms("all")
    if any(t.qualifier in ("", "+") for t in all_terms):
        findings.append(_error(
            "spf", domain, f"SPF ends in {all_terms[0].text}: every host on the internet is authorized",
            "anyone can send mail as this domain and pass SPF; receivers distrust such domains and DMARC "
            "protects nothing. End the record with -all or ~all",
        ))
    elif any(t.qualifier == "?" for t in all_terms):
        findings.append(_warn(
            "spf", domain, "SPF ends in ?all (neutral)",
            "forged mail from this domain is neither passed nor failed by SPF; end the record with -all or ~all",
        ))
    elif not all_terms and record.modifier("redirect") is None:
        findings.append(_warn(
            "spf", domain, "SPF has no 'all' term (and no redirect=)",
            "mail from hosts not listed gets 'neutral', so forgeries are not failed; end the record with -all or ~all",
        ))
    if record.mechanisms("ptr"):
        findings.append(_warn(
            "spf", domain, "SPF uses the ptr mechanism",
            "RFC 7208 5.5 says not to use it: it is slow, and some receivers skip it, so mail it authorizes may fail",
        ))

    for ip in ips:
        verdict = spfrecord.evaluate(source, ip, domain, helo)
        if verdict.result == "pass":
            findings.append(_ok("spf", ip, f"SPF of {domain} authorizes {ip} (pass)"))
        elif verdict.result == "temperror":
            findings.append(_warn(
                "spf", ip, f"SPF of {domain} for {ip} could not be evaluated: {verdict.explanation}",
                "receivers that hit the same failure defer our mail or treat it as unauthenticated",
            ))
        elif verdict.result == "permerror":
            reason = verdict.explanation.removeprefix("SPF Permanent Error: ")
            findings.append(_error(
                "spf", ip, f"SPF of {domain} gives permerror for {ip}: {reason}",
                _SPF_PERMERROR + ". Fix the record",
            ))
        else:
            findings.append(_error(
                "spf", ip, f"SPF of {domain} does not authorize {ip} (result: {verdict.result})",
                f"receivers see SPF {verdict.result} for our mail from {ip}: it is rejected (550 5.7.23) or "
                f"junked, and DMARC fails unless DKIM passes. Add ip{ipaddress.ip_address(ip).version}:{ip} "
                "to the record",
            ))
    return findings


# ---------------------------------------------------------------------------
# DMARC (RFC 7489), DKIM (RFC 6376), MTA-STS (RFC 8461), TLS-RPT (RFC 8460)


def _tag_records(source: DnsSource, name: str, is_kind: Callable[[str], bool]) -> tuple[Answer, list[str]]:
    ans = source.lookup(name, "TXT")
    return ans, [t for t in ans.texts() if is_kind(t)]


def check_dmarc(source: DnsSource, domain: str) -> list[Finding]:
    name = f"_dmarc.{domain}"  # RFC 7489 6.1
    ans, records = _tag_records(source, name, tagrecords.is_dmarc)
    if ans.status in UNANSWERED:
        return [_failed("dmarc", name, ans, "receivers cannot find our DMARC policy and apply their own")]
    if not records:
        return [_warn(
            "dmarc", name, f"no DMARC record at {name}",
            "receivers apply their own policy to mail that fails SPF and DKIM, so forgeries of this domain "
            "are delivered; large providers require DMARC from bulk senders. Publish v=DMARC1; p=none at least",
        )]
    if len(records) > 1:  # RFC 7489 6.6.3
        return [_error(
            "dmarc", name, f"{len(records)} DMARC records",
            "RFC 7489 6.6.3: receivers then apply no DMARC policy at all; keep one",
        )]
    try:
        rec = tagrecords.parse_dmarc(records[0])
    except tagrecords.TagRecordError as e:
        return [_error(
            "dmarc", name, f"DMARC record does not parse: {e} in {records[0]!r}",
            "receivers ignore it and apply their own policy, as if there were none",
        )]
    meaning = {
        "none": "monitoring only: mail failing DMARC is still delivered",
        "quarantine": "mail failing DMARC goes to spam",
        "reject": "mail failing DMARC is refused",
    }[rec.policy]
    return [_ok("dmarc", name, f"DMARC {rec.summary()}", meaning)]


def dkim_public_key_from_pem(pem: bytes) -> tuple[str, bytes]:
    """Our DKIM key (PEM, private or public) as DNS publishes it: (k=, p= bytes)."""
    try:
        key = serialization.load_pem_private_key(pem, password=None).public_key()
    except (ValueError, TypeError):
        key = serialization.load_pem_public_key(pem)
    if isinstance(key, ed25519.Ed25519PublicKey):  # RFC 8463 4.2: the raw 32 octets
        return "ed25519", key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "rsa", key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _normalise_dns_key(key_type: str, data: bytes) -> bytes:
    if key_type != "rsa":
        return data
    try:  # RFC 6376 3.6.1 says SubjectPublicKeyInfo; some publish bare RSAPublicKey
        return serialization.load_der_public_key(data).public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    except ValueError:
        return data


def check_dkim(source: DnsSource, domain: str, selector: str, our_key: tuple[str, bytes] | None) -> list[Finding]:
    name = f"{selector}._domainkey.{domain}"  # RFC 6376 3.6.2.1
    ans = source.lookup(name, "TXT")
    if ans.status in UNANSWERED:
        return [_failed("dkim", name, ans, "receivers cannot fetch our key: DKIM gives temperror")]
    texts = ans.texts()
    if not texts:
        return [_error(
            "dkim", name, f"no DKIM key record at {name} ({ans.describe()})",
            "receivers cannot verify our signatures: DKIM fails, and DMARC rests on SPF alone "
            "(forwarded mail then fails DMARC)",
        )]
    if len(texts) > 1:
        return [_error("dkim", name, f"{len(texts)} TXT records at {name}", "receivers may pick the wrong one and DKIM fails")]
    try:
        rec = tagrecords.parse_dkim_key(texts[0])
    except tagrecords.TagRecordError as e:
        return [_error(
            "dkim", name, f"DKIM key record does not parse: {e}", "receivers cannot verify our signatures: DKIM fails"
        )]
    if not rec.public_key:
        return [_error("dkim", name, "DKIM key is revoked (empty p=)", "every signature with this selector fails")]
    if our_key is not None:
        ours_type, ours = our_key
        same = ours_type == rec.key_type and _normalise_dns_key(rec.key_type, rec.public_key) == ours
        if not same:
            return [_error(
                "dkim", name, f"the {rec.key_type} key in DNS is not our DKIM key (dkim_key)",
                "every message signed with our key fails DKIM verification; DMARC then rests on SPF alone. "
                "Publish our public key under this selector",
            )]
        seen = f"DKIM {rec.key_type} key published and matches ours"
    else:
        seen = f"DKIM {rec.key_type} key published (no key of ours given to compare)"
    if rec.testing:
        return [_warn("dkim", name, seen + "; t=y (testing)", "receivers may treat failed signatures as unsigned")]
    return [_ok("dkim", name, seen)]


def check_signing_keys(source: DnsSource, keys: Sequence[SigningKey]) -> list[Finding]:
    """Our [[dkim]] keys against DNS, saying which selector signs. A key that does not
    sign yet (rotation) and is not published is a warning: publish it before it signs."""
    findings: list[Finding] = []
    if not any(k.signing for k in keys):
        findings.append(_warn(
            "dkim", keys[0].domain, "no [[dkim]] key of this domain is active: kanmon does not sign its mail",
            "receivers see unsigned mail: DMARC rests on SPF alone (forwarded mail then fails DMARC)",
        ))
    for k in keys:
        role = "signing" if k.signing else "not signing yet (active = false)"
        name = f"{k.selector}._domainkey.{k.domain}"
        if k.key is None:
            findings.append(_error("dkim", name, f"selector {k.selector} ({role}): our key does not load: {k.problem}",
                                   "kanmon cannot sign with it; fix the key file ([[dkim]] key)"))
            continue
        for f in check_dkim(source, k.domain, k.selector, k.key):
            seen = f"selector {k.selector} ({role}): {f.seen}"
            severity = f.severity
            if not k.signing and severity is Severity.ERROR:
                severity = Severity.WARNING
                consequence = "publish this record before the key signs (set active = true once it is visible)"
            else:
                consequence = f.consequence
            findings.append(Finding(severity, f.check, f.subject, seen, consequence))
    return findings


def check_mta_sts(source: DnsSource, domain: str) -> list[Finding]:
    name = f"_mta-sts.{domain}"  # RFC 8461 3.1
    ans, records = _tag_records(source, name, lambda t: t.startswith("v=STSv1"))
    if ans.status in UNANSWERED:
        return [_failed("mta-sts", name, ans, "senders cannot see whether we publish an MTA-STS policy")]
    if not records:
        return [_ok("mta-sts", name, "no MTA-STS record (optional)", "senders use TLS opportunistically")]
    if len(records) > 1:  # RFC 8461 3.1: more than one means no policy
        return [_warn("mta-sts", name, f"{len(records)} MTA-STS records", "senders treat this as no MTA-STS policy at all")]
    try:
        rec = tagrecords.parse_mta_sts(records[0])
    except tagrecords.TagRecordError as e:
        return [_warn(
            "mta-sts", name, f"MTA-STS record does not parse: {e} in {records[0]!r}",
            "senders ignore it and our MTA-STS policy is not applied",
        )]
    return [_ok(
        "mta-sts", name, f"MTA-STS policy id {rec.policy_id}",
        f"senders fetch https://mta-sts.{domain}/.well-known/mta-sts.txt (not checked here) and refetch when the id changes",
    )]


def check_tls_rpt(source: DnsSource, domain: str) -> list[Finding]:
    name = f"_smtp._tls.{domain}"  # RFC 8460 3
    ans, records = _tag_records(source, name, lambda t: t.startswith("v=TLSRPTv1"))
    if ans.status in UNANSWERED:
        return [_failed("tls-rpt", name, ans, "senders cannot find where to send TLS reports")]
    if not records:
        return [_ok("tls-rpt", name, "no TLS-RPT record (optional)", "senders send no reports of TLS failures to us")]
    if len(records) > 1:
        return [_warn("tls-rpt", name, f"{len(records)} TLS-RPT records", "senders may send no reports at all")]
    try:
        rec = tagrecords.parse_tls_rpt(records[0])
    except tagrecords.TagRecordError as e:
        return [_warn(
            "tls-rpt", name, f"TLS-RPT record does not parse: {e} in {records[0]!r}",
            "senders ignore it and send no TLS reports",
        )]
    return [_ok("tls-rpt", name, "TLS-RPT reports to " + ", ".join(rec.rua))]

