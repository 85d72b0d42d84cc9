"""Routing: which transport and next hops a recipient goes to.

Role: a pure function of the config: recipient address -> Route. Local domains go to
the local agent; `deliver = "relay"` domains to their servers in order (the first that
takes the mail wins, the rest are alternates); everything else to the smarthost list,
or by MX when there is none.
Trusts: addresses that passed the accept checks. Never: do I/O (MX lookups happen in
the delivery agent, at delivery time, so a DNS change is seen on the next try).
"""

from __future__ import annotations

from dataclasses import dataclass

from kanmon.config import Config, TlsPolicy


@dataclass(frozen=True, slots=True)
class Route:
    transport: str  # "local" | "relay" | "smarthost" | "mx"
    key: str  # destination, for grouping and per-destination concurrency
    domain: str
    hops: tuple[tuple[str, int], ...] = ()
    tls: TlsPolicy = "opportunistic"


class Router:
    def __init__(self, config: Config):
        self.config = config
        self._domains = {d.name: d for d in config.domain}

    def route(self, rcpt: str) -> Route:
        domain = rcpt.rpartition("@")[2].lower()
        d = self._domains.get(domain)
        if d is not None:
            if d.deliver == "local":
                return Route("local", "local", domain)
            return Route("relay", f"relay:{domain}", domain, tuple(d.servers), d.tls)
        out = self.config.outbound
        if out.smarthost:
            return Route("smarthost", "smarthost", domain, tuple(out.smarthost), out.tls)
        return Route("mx", f"mx:{domain}", domain, (), out.tls)
