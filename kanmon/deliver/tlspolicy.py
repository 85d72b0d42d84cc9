"""Outbound transport security for MX delivery: which TLS a destination gets, and
whether a session met it.

Role: for an MX route, decide per destination domain and per MX host what one
connection must have, in this order (docs/outbound-tls.md):

1. a `[[tls_policy]]` row for the domain (like Postfix smtp_tls_policy_maps: the
   administrator's explicit word wins over anything the destination publishes);
2. DANE (RFC 7672) for an MX host with DNSSEC-authenticated TLSA records, when the
   resolver is trusted to validate (`[dns] dnssec = "trust-ad"`);
3. the domain's MTA-STS policy (RFC 8461) when `[outbound] mta_sts = true`:
   `enforce` -> a certificate valid for an MX name the policy lists, or that host is
   not used; `testing` -> the mail goes anyway and the failure is reported;
4. else `[outbound] tls`.

Each new session is counted for TLS-RPT (kanmon.records.tlsrpt) under the policy that
applied, and each failure is a `tls-policy` event. The decision is data
(`Requirement`); the delivery agent connects and asks `Requirement.check`.

Trusts: the configuration; DNS answers only through MxResolver (AD only when trusted);
the server's certificate chain as data to check, nothing more.

Never: let an enforced policy fall back to plaintext or to an unlisted MX, treat an
unauthenticated TLSA answer as DANE, or do file I/O on the event loop (the MTA-STS cache
and the TLS reports are written in threads).
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kanmon.deliver.dane import Tlsa, lookup_tlsa, match_chain
from kanmon.deliver.mtasts import MtaSts, StsPolicy
from kanmon.deliver.mx import MxResolver, NextHop
from kanmon.model import SmtpError
from kanmon.records.events import Event, Note, TlsPolicyFailed
from kanmon.records.tlsrpt import TlsReports
from kanmon.smtp.client import TlsInfo, clean_text

if TYPE_CHECKING:
    from kanmon.config import Config, TlsPolicyEntry

FLUSH_DELAY = 60.0  # seconds between counting a session and writing the day's TLS report

NO_POLICY = "no-policy-found"


@dataclass(frozen=True, slots=True)
class Requirement:
    """What one connection to one MX host must have.

    connect: the TLS the client negotiates (kanmon.smtp.client policies).
    source: table | dane | mta-sts | default. enforce: a failure means "not this server";
    False (MTA-STS testing): report the failure and deliver.
    unavailable: a reason this host must not be tried at all (MX not in the MTA-STS
    policy, TLSA lookup failed); `unavailable_type` its TLS-RPT result type.
    """

    connect: str
    source: str = "default"
    enforce: bool = True
    verify_name: bool = False
    pins: tuple[str, ...] = ()
    tlsa: tuple[Tlsa, ...] = ()
    dane: bool = False
    description: str = ""
    unavailable: str = ""
    unavailable_type: str = ""
    policy_type: str = NO_POLICY
    policy_strings: tuple[str, ...] = ()
    mx_host: tuple[str, ...] = ()

    @property
    def strict(self) -> bool:
        """Anything to check after the handshake."""
        return self.source != "default"

    def check(self, tls: TlsInfo | None, host: str) -> tuple[str, str] | None:
        """None when the session meets the requirement, else (RFC 8460 result type, reason)."""
        if not self.strict or self.connect in ("none",):
            return None
        if self.connect == "opportunistic" and self.source == "table":
            return None
        if tls is None:
            return "starttls-not-supported", f"TLS is required by {self.description}, but {host} did not offer it"
        if self.dane:
            if self.tlsa and not match_chain(self.tlsa, tls.chain, host):
                return "validation-failure", f"no TLSA record of {host} matches its certificate ({self.description})"
            return None
        if self.verify_name and tls.verify != "OK":
            result = classify_certificate(tls.chain, host)
            return result, f"the certificate of {host} is not valid for it ({result}; {self.description})"
        if self.pins and not pin_matches(self.pins, tls.chain):
            return "validation-failure", f"the certificate of {host} matches no pinned fingerprint ({self.description})"
        return None


def fingerprints(der: bytes) -> set[str]:
    """`sha256:` of the certificate and of its SubjectPublicKeyInfo."""
    out = {"sha256:" + hashlib.sha256(der).hexdigest()}
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        spki = x509.load_der_x509_certificate(der).public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
        out.add("sha256:" + hashlib.sha256(spki).hexdigest())
    except Exception:
        pass
    return out


def pin_matches(pins: Sequence[str], chain: Sequence[bytes]) -> bool:
    return bool(chain) and bool(fingerprints(chain[0]) & set(pins))


def classify_certificate(chain: Sequence[bytes], host: str) -> str:
    """Why a certificate did not verify, as an RFC 8460 result type (best effort)."""
    if not chain:
        return "certificate-not-trusted"
    try:
        from cryptography import x509

        leaf = x509.load_der_x509_certificate(chain[0])
        if leaf.not_valid_after_utc < datetime.datetime.now(datetime.UTC):
            return "certificate-expired"
        try:
            names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
        except x509.ExtensionNotFound:
            names = []
        from kanmon.deliver.mtasts import mx_matches

        if not any(mx_matches(n, host) if n.startswith("*.") else n.lower().rstrip(".") == host.lower().rstrip(".")
                   for n in names):
            return "certificate-host-mismatch"
    except Exception:
        return "certificate-not-trusted"
    return "certificate-not-trusted"


@dataclass(slots=True)
class Destination:
    """The decision for one recipient domain in one attempt."""

    domain: str
    entry: TlsPolicyEntry | None = None
    sts: StsPolicy | None = None
    mx_secure: bool = False  # the MX RRset was authenticated (DANE may apply per host)
    default: str = "opportunistic"


class TransportSecurity:
    """Table, DANE, MTA-STS and TLS-RPT for one delivery agent.

    data_dir: where the MTA-STS cache and the TLS reports are kept (None: memory only).
    emit: the event log (`emit(event, queue_id)`). https_port/fetch: tests (MtaSts).
    """

    def __init__(
        self,
        config: Config,
        resolver: MxResolver,
        emit: Callable[[Event, str | None], object],
        *,
        data_dir: Path | None = None,
        now: Callable[[], float] | None = None,
        https_port: int = 443,
        fetch: Callable[[str], object] | None = None,
    ):
        import time

        self.now = now or time.time
        self.resolver = resolver
        self.emit = emit
        out = config.outbound
        self.default = out.tls
        self.table = {t.domain: t for t in config.tls_policy}
        self.mta_sts = MtaSts(
            resolver, path=(Path(data_dir) / "mta-sts" / "policies.json") if data_dir is not None else None,
            ca_file=out.ca_file, now=self.now, https_port=https_port, timeout=out.connect_timeout, fetch=fetch,
        ) if out.mta_sts else None
        self.dane = resolver.trust_ad
        sending_ip = out.bind_address or (out.source_ips[0] if out.source_ips else None)
        self.reports = TlsReports(data_dir, config.server.hostname, now=self.now, sending_ip=sending_ip)
        self._flush_timer: asyncio.TimerHandle | None = None
        self._flush_task: asyncio.Task | None = None

    # -- deciding

    def table_entry(self, domain: str) -> TlsPolicyEntry | None:
        entry = self.table.get(domain)
        if entry is not None:
            return entry
        labels = domain.split(".")
        for i in range(1, len(labels)):  # ".example.com" rows match subdomains
            entry = self.table.get("." + ".".join(labels[i:]))
            if entry is not None:
                return entry
        return None

    async def destination(self, domain: str, queue_id: str | None = None) -> Destination:
        domain = domain.lower().rstrip(".")
        entry = self.table_entry(domain)
        if entry is not None:
            return Destination(domain, entry=entry, default=self.default)
        dest = Destination(domain, default=self.default)
        if self.dane:
            try:
                dest.mx_secure = (await self.resolver.lookup(domain, "MX")).authenticated
            except SmtpError:
                dest.mx_secure = False
        if self.mta_sts is not None:
            found = await self.mta_sts.lookup(domain)
            dest.sts = found.policy
            if found.failure is not None:
                self.reports.failure(domain, "sts", found.failure.result_type, reason=found.failure.text[:300],
                                     session=False)
                self.emit(TlsPolicyFailed(domain, "mta-sts", found.failure.result_type, f"mta-sts.{domain}",
                                          clean_text(found.failure.text), enforced=False), queue_id)
                self._schedule_flush()
        return dest

    async def requirement(self, dest: Destination, hop: NextHop) -> Requirement:
        """What a connection to this MX host must have (module docstring, the order)."""
        if dest.entry is not None:
            e = dest.entry
            connect = "required" if e.level == "verify" else e.level
            return Requirement(connect, "table", True, e.level == "verify", tuple(e.fingerprints),
                               description=f"tls_policy for {dest.domain} (level {e.level})")
        if dest.mx_secure and not hop.is_literal:
            try:
                tlsa = await lookup_tlsa(self.resolver, hop.host, hop.port)
            except SmtpError as e:
                # RFC 7672 2.2: a secure MX whose TLSA lookup fails is not used
                return Requirement("required", "dane", True, dane=True, description=f"DANE for {hop.host}",
                                   unavailable=f"TLSA lookup for {hop.host} failed: {e.reply.text}",
                                   unavailable_type="dnssec-invalid", policy_type="tlsa")
            if tlsa.secure and tlsa.records:
                return Requirement("required", "dane", True, tlsa=tlsa.usable, dane=True,
                                   description=f"DANE TLSA for {hop.host}", policy_type="tlsa",
                                   policy_strings=tuple(f"{r.usage} {r.selector} {r.mtype} {r.data.hex()}"
                                                        for r in tlsa.records),
                                   mx_host=(hop.host,))
        sts = dest.sts
        if sts is not None and sts.mode != "none":
            enforce = sts.mode == "enforce"
            description = f"MTA-STS policy of {dest.domain} ({sts.mode})"
            strings, mx_host = tuple(sts.policy_strings()), sts.mx
            unavailable = ""
            if not sts.matches(hop.host):
                unavailable = f"MX host {hop.host} is not listed in the {description} (mx: {', '.join(sts.mx)})"
            # enforce: STARTTLS required, the certificate checked after the handshake (so the
            # failure can be named); testing: exactly what [outbound] tls says (a failure
            # the client itself refuses, e.g. tls = "verify", still stops the session).
            connect = "required" if enforce else self.default
            return Requirement(connect, "mta-sts", enforce, verify_name=True, description=description,
                               unavailable=unavailable, unavailable_type="validation-failure" if unavailable else "",
                               policy_type="sts", policy_strings=strings, mx_host=mx_host)
        return Requirement(self.default, "default")

    # -- reporting

    def session(self, dest: Destination, req: Requirement, hop: NextHop, address: str,
                failure: tuple[str, str] | None, queue_id: str | None, *, encrypted: bool = True) -> None:
        """Count a new session (TLS-RPT) and log a failure (`tls-policy` event).

        encrypted: the session has TLS. A plaintext session under no policy is counted as
        a `starttls-not-supported` failure of `no-policy-found` (RFC 8460: a session that
        did not establish TLS), without an event: no policy was broken.
        """
        if failure is None and not encrypted and not req.strict and req.connect != "none":
            self.reports.failure(dest.domain, NO_POLICY, "starttls-not-supported", mx=hop.host, ip=address,
                                 reason="plaintext: STARTTLS not offered or failed")
        elif failure is None:
            self.reports.success(dest.domain, req.policy_type, list(req.policy_strings), list(req.mx_host))
        else:
            result, reason = failure
            reason = clean_text(reason)
            self.reports.failure(dest.domain, req.policy_type, result, mx=hop.host, ip=address, reason=reason,
                                 policy_strings=list(req.policy_strings), mx_host=list(req.mx_host))
            policy = {"table": "tls_policy", "dane": "dane", "mta-sts": "mta-sts"}.get(req.source, req.source)
            self.emit(TlsPolicyFailed(dest.domain, policy, result, hop.relay_text(address), reason, req.enforce),
                      queue_id)
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if self._flush_timer is not None or self.reports.directory is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._flush_timer = loop.call_later(FLUSH_DELAY, self._start_flush)

    def _start_flush(self) -> None:
        self._flush_timer = None
        if self._flush_task is None or self._flush_task.done():
            self._flush_task = asyncio.get_running_loop().create_task(self._flush_quietly())

    async def _flush_quietly(self) -> None:
        try:
            await self.reports.flush()
        except OSError as e:  # a report that cannot be written never stops delivery
            self.emit(Note(f"TLS report not written: {e}", "error"), None)

    async def flush(self) -> None:
        """Write what was counted now (tests, shutdown)."""
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        if self._flush_task is not None:
            await self._flush_task
            self._flush_task = None
        await self._flush_quietly()

    async def close(self) -> None:
        await self.flush()


__all__ = ["Destination", "Requirement", "TransportSecurity", "classify_certificate", "fingerprints", "pin_matches"]
