"""`kanmon dkim status`: each [[dkim]] key, whether it loads, whether it signs, and
whether DNS publishes it.

Role: for every [[dkim]] entry, load its key (kanmon.auth.dkimkeys), ask the DnsSource
for its record and compare (checks.check_dkim, the same comparison `kanmon dns check`
makes), and say in one row per key what an administrator rotating keys needs to know.

Trusts: the Config (validated). Nothing in DNS answers (they go through check_dkim's
parsing and are shown escaped by the caller).
Never: change a key or the config; ask anything but the DnsSource it is given.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from kanmon.auth import dkimkeys
from kanmon.config import Config
from kanmon.dnscheck.checks import Severity, check_dkim
from kanmon.dnscheck.sources import DnsSource


@dataclass(frozen=True)
class KeyStatus:
    domain: str
    selector: str
    algorithm: str
    key_file: str
    key: str  # "ok", or why the key does not load
    active: bool  # [[dkim]] active
    signing: bool  # active and the key loads: mail is signed with it
    dns: str  # "ok", "warning", "error"
    dns_detail: str  # what was seen in DNS (from other people's servers: escape before showing)

    @property
    def severity(self) -> Severity:
        """error: a key that should sign cannot, or receivers cannot verify it; warning:
        a key not signing yet is not published (or anything dns check warns about)."""
        if self.active and self.key != "ok":
            return Severity.ERROR
        worst = {"ok": Severity.OK, "warning": Severity.WARNING, "error": Severity.ERROR}[self.dns]
        if not self.active and worst is Severity.ERROR:
            return Severity.WARNING
        return worst

    def as_dict(self) -> dict:
        return {**asdict(self), "severity": self.severity.label}


def key_statuses(config: Config, source: DnsSource) -> list[KeyStatus]:
    out = []
    for entry in config.dkim:
        path = Path(config.dkim_key_path(entry))
        try:
            pub = dkimkeys.public_key(dkimkeys.load_private_key(path, entry.algorithm))
        except dkimkeys.DkimKeyError as e:
            key_state, ours = str(e), None
        else:
            key_state, ours = "ok", (pub.key_type, pub.data)
        findings = check_dkim(source, entry.domain, entry.selector, ours)
        worst = max(findings, key=lambda f: f.severity)
        seen = worst.seen + (f" -- {worst.consequence}" if worst.severity is not Severity.OK and worst.consequence else "")
        out.append(KeyStatus(
            entry.domain, entry.selector, entry.algorithm, str(path), key_state, entry.active,
            entry.active and key_state == "ok", worst.severity.label, seen,
        ))
    return out
