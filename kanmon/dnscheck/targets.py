"""What the DNS health check looks at and whom it asks, from the config and the command line.

Role: turn a Config (and the command's options, which win) into Targets and a
DnsSource. Shared by `kanmon dns check` and the in-server monitor so both check the
same things the same way.

Trusts: the Config (validated by config.py); options are validated by the CLI.
Never: run a check, or pick the system resolver when zone files or servers were given.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from pathlib import Path

from kanmon.auth import dkimkeys
from kanmon.config import Config
from kanmon.dnscheck.checks import SigningKey, Target, ThisNode, dkim_public_key_from_pem
from kanmon.dnscheck.sources import DnsSource, ResolverSource, ZoneSource


class TargetError(Exception):
    """Something to check is unusable: a bad IP in the config, an unreadable DKIM key."""


def load_dkim_key(path: str | Path) -> tuple[str, bytes]:
    p = Path(path)
    try:
        pem = p.read_bytes()
    except OSError as e:
        raise TargetError(f"{p}: cannot read: {e.strerror}") from None
    try:
        return dkim_public_key_from_pem(pem)
    except (ValueError, TypeError) as e:
        raise TargetError(f"{p}: not a PEM private or public key ({e})") from None


def signing_keys(config: Config, domain: str) -> tuple[SigningKey, ...]:
    """The [[dkim]] keys that sign domain's mail: those of the domain itself, else of its
    closest parent with [[dkim]] entries (as the signer picks them)."""
    labels = domain.lower().rstrip(".").split(".")
    for i in range(len(labels) - 1):
        d = ".".join(labels[i:])
        entries = [e for e in config.dkim if e.domain == d]
        if entries:
            out = []
            for e in entries:
                try:
                    pub = dkimkeys.public_key(dkimkeys.load_private_key(config.dkim_key_path(e), e.algorithm))
                except dkimkeys.DkimKeyError as err:
                    out.append(SigningKey(d, e.selector, None, e.active, str(err)))
                else:
                    out.append(SigningKey(d, e.selector, (pub.key_type, pub.data), e.active))
            return tuple(out)
    return ()


def outbound_tls_notes(config: Config) -> list[str]:
    """What our own MX delivery does about the destinations' DANE and MTA-STS (the
    config decides; docs/outbound-tls.md). Notes of every report made with a config:
    `kanmon dns check`, the console's DNS page and the periodic check say the same."""
    if config.dns.dnssec == "trust-ad":
        servers = ", ".join(f"{h}:{p}" for h, p in config.dns.servers) or "the system resolver"
        dane = (f"outbound DANE: on ([dns] dnssec = \"trust-ad\": the AD bit of {servers} is trusted; "
                "it must be a validating resolver on this host or a link you control)")
    else:
        dane = ("outbound DANE: off (no validating resolver: [dns] dnssec is not \"trust-ad\", "
                "so destinations' TLSA records are not used)")
    sts = "outbound MTA-STS: " + ("on ([outbound] mta_sts = true)" if config.outbound.mta_sts
                                  else "off ([outbound] mta_sts = false)")
    return [dane, sts]


def this_node(config: Config, ips: Sequence[str] = ()) -> ThisNode:
    """Where the config says mail for our domains arrives: this node (its names and
    addresses; ips: our outgoing addresses as the check was given them) and the hosts in
    front of it (docs/dnscheck.md, "Is the MX this node?")."""
    names = [config.server.hostname] + ([config.dnscheck.helo] if config.dnscheck.helo else [])
    addresses: list[str] = []
    wildcard = False
    for host, _port in config.smtp.listen:
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            names.append(host)  # a listen address given as a name
            continue
        if ip.is_unspecified:
            wildcard = True
        else:
            addresses.append(str(ip))
    for ip_text in [config.outbound.bind_address or "", *config.outbound.source_ips, *config.dnscheck.ips, *ips]:
        try:
            addresses.append(str(ipaddress.ip_address(ip_text.strip())))
        except ValueError:
            pass  # not an address: make_targets reports a bad [dnscheck] ips / source_ips
    if config.balancer is not None:  # our own virtual addresses: the balancer runs on this node
        addresses.extend(vs.listen[0] for vs in config.balancer.virtual_server)
    fronts = [(str(net), "a balancer in front of this node, [smtp] trusted_proxies")
              for net in config.smtp.trusted_proxies]
    fronts += [(host, "the relay of this mail store, [outbound] smarthost") for host, _port in config.outbound.smarthost]
    return ThisNode(
        names=tuple(dict.fromkeys(n.lower().rstrip(".") for n in names)),
        addresses=tuple(dict.fromkeys(addresses)),
        wildcard=wildcard,
        fronts=tuple(fronts),
    )


def make_source(
    config: Config | None, server: tuple[str, int] | None = None, zones: Sequence[str | Path] = ()
) -> DnsSource:
    """Zone files if given; else --server; else [dns] servers; else the system resolver."""
    if zones:
        return ZoneSource(zones)
    timeout = config.dns.timeout if config is not None else 5.0
    if server is not None:
        return ResolverSource([server], timeout)
    if config is not None and config.dns.servers:
        return ResolverSource(config.dns.servers, timeout)
    return ResolverSource((), timeout)


def make_targets(
    config: Config | None,
    domains: Sequence[str] = (),
    ips: Sequence[str] = (),
    helo: str | None = None,
    dkim_selector: str | None = None,
    dkim_key: tuple[str, bytes] | None = None,
) -> list[Target]:
    """Targets for domains (default: [dnscheck] domains, else every [[domain]]).
    Without a config nothing is defaulted: the embedded default's names are examples."""
    if config is not None:
        dc = config.dnscheck
        domains = list(domains) or list(dc.domains) or [d.name for d in config.domain]
        if not ips:
            ips = _valid_ips(dc.ips, "dnscheck.ips") or _valid_ips(config.outbound.source_ips, "outbound.source_ips")
        helo = helo or dc.helo or config.server.hostname
        dkim_selector = dkim_selector or dc.dkim_selector
        if dkim_key is None and dc.dkim_key is not None and dkim_selector:
            dkim_key = load_dkim_key(dc.dkim_key)
    return [
        Target(
            domain=d.lower().rstrip("."),
            ips=tuple(ips),
            helo=helo.lower().rstrip(".") if helo else None,
            dkim_selector=dkim_selector,
            dkim_key=dkim_key,
            receives_mail=config is not None and config.find_domain(d) is not None,
            signing_keys=signing_keys(config, d) if config is not None and not dkim_selector else (),
            notes=tuple(outbound_tls_notes(config)) if config is not None else (),
            node=this_node(config, ips) if config is not None else None,
        )
        for d in domains
    ]


def _valid_ips(ips: Sequence[str], key: str) -> list[str]:
    out = []
    for ip in ips:
        try:
            out.append(str(ipaddress.ip_address(ip.strip())))
        except ValueError:
            raise TargetError(f"{key}: {ip!r} is not an IP address") from None
    return out
