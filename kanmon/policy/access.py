"""Accept checks: who may send what to whom (relay access, local recipients, disk).

Role: answer the SMTP session at each phase with a Verdict. Pure decisions over the
config and a free-disk probe; no network I/O.

Trusts: addresses already parsed by kanmon.smtp.address; the client IP as the
listener reports it (after a PROXY header only from trusted proxies).
Never: let a client outside relay_networks, and not authenticated, send to a domain
that is not ours (DESIGN.md promise 4); accept an unknown local recipient (promise 5).
"""

from __future__ import annotations

import ipaddress
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from kanmon.config import Config, DomainSection
from kanmon.model import ACCEPT, ClientInfo, Verdict, VerdictKind
from kanmon.smtp import replies
from kanmon.smtp.address import Path


def reject(reply) -> Verdict:
    return Verdict(VerdictKind.REJECT if reply.is_permanent else VerdictKind.DEFER, reply)


@dataclass(frozen=True, slots=True)
class RcptDecision:
    verdict: Verdict
    expands_to: tuple[str, ...] = ()  # final recipient addresses (aliases expanded)


def free_disk_bytes(path: str) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


class AcceptPolicy:
    def __init__(
        self,
        config: Config,
        free_disk: Callable[[], int] | None = None,
        quota_usage: Callable[[str, str], int] | None = None,
    ):
        self.config = config
        self._relay_nets = list(config.smtp.relay_networks)
        self._domains: dict[str, DomainSection] = {d.name: d for d in config.domain}
        self._free_disk = free_disk or (lambda: free_disk_bytes(str(config.server.data_dir)))
        if quota_usage is None and any(d.quota is not None for d in config.domain):
            from kanmon.store.maildir import mailbox_usage

            data_dir = config.server.data_dir

            def quota_usage(domain: str, local: str) -> int:
                try:
                    return mailbox_usage(data_dir, domain, local)
                except OSError:
                    return 0  # an unreadable mailbox is delivery's problem, not a quota answer

        self._quota_usage = quota_usage
        self.quota_notices = None  # kanmon.store.quota.QuotaNotices, set by the listener's owner
        self._disk_checked_at = 0.0
        self._disk_low = False

    # -- helpers -------------------------------------------------------------

    def is_relay_client(self, ip: str) -> bool:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        if addr.version == 6 and addr.ipv4_mapped:
            addr = addr.ipv4_mapped
        return any(addr in net for net in self._relay_nets)

    def is_local_domain(self, domain: str) -> bool:
        return domain in self._domains

    def disk_is_low(self) -> bool:
        # statvfs at most once a second: cheap, and fresh enough for a disk filling up.
        now = time.monotonic()
        if now - self._disk_checked_at >= 1.0:
            self._disk_checked_at = now
            try:
                self._disk_low = self._free_disk() < self.config.smtp.min_free_disk
            except OSError:
                self._disk_low = True
        return self._disk_low

    def sender_addresses(self, user: str) -> set[str]:
        """Envelope senders an authenticated mailbox may use: itself and its aliases."""
        user = user.lower()
        local, _, domain_name = user.rpartition("@")
        out = {user}
        domain = self._domains.get(domain_name)
        if domain is not None:
            for alias, targets in domain.aliases.items():
                expanded = {t.lower() if "@" in t else f"{t.lower()}@{domain.name}" for t in targets}
                if user in expanded:
                    out.add(f"{alias.lower()}@{domain.name}")
        return out

    # -- phases ----------------------------------------------------------------

    def check_mail(self, client: ClientInfo, sender: Path) -> Verdict:
        if self.disk_is_low():
            return reject(replies.LOW_DISK)  # RFC 5321 4.5.3.1.10-ish: 452 4.3.1
        return ACCEPT

    def check_rcpt(self, client: ClientInfo, rcpt: Path) -> RcptDecision:
        if rcpt.domain == "" and rcpt.local == "postmaster":
            # RFC 5321 4.5.1: <postmaster> must be accepted; it means ours.
            domain = self.config.domain[0] if self.config.domain else None
            if domain is None:
                return RcptDecision(reject(replies.UNKNOWN_USER))
            rcpt = Path(f"postmaster@{domain.name}", "postmaster", domain.name)
        domain = self._domains.get(rcpt.domain)
        if domain is None:
            if client.auth_user or self.is_relay_client(client.ip):
                return RcptDecision(ACCEPT, (rcpt.address,))
            return RcptDecision(reject(replies.RELAY_DENIED))
        if domain.deliver == "relay":
            return RcptDecision(ACCEPT, (rcpt.address,))
        local = rcpt.local.lower()
        if local in domain.mailboxes:
            targets: tuple[str, ...] = (f"{local}@{domain.name}",)
        elif local in {a.lower() for a in domain.aliases}:
            alias = next(v for k, v in domain.aliases.items() if k.lower() == local)
            seen: dict[str, None] = {}
            for t in alias:
                seen[t.lower() if "@" in t else f"{t.lower()}@{domain.name}"] = None
            targets = tuple(seen)
        else:
            return RcptDecision(reject(replies.UNKNOWN_USER))
        if domain.quota is not None and self._quota_usage is not None:
            for t in targets:
                lp, _, dom = t.partition("@")
                if dom != domain.name:
                    continue
                usage = self._quota_usage(dom, lp)
                if usage >= domain.quota:
                    if self.quota_notices is not None:
                        self.quota_notices.over(t, usage, domain.quota)
                    return RcptDecision(reject(replies.OVER_QUOTA))
                if self.quota_notices is not None:
                    self.quota_notices.under(t)
        return RcptDecision(ACCEPT, targets)
