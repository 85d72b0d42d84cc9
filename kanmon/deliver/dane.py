"""DANE for SMTP (RFC 7672): TLSA records of an MX host and matching a certificate chain.

Role: look up `_<port>._tcp.<mx host>` TLSA through our resolver and keep the records
only when the answer is DNSSEC-authenticated (the AD bit of a resolver the config marks
as validating: `[dns] dnssec = "trust-ad"`); match a server's certificate chain against
them: DANE-EE (usage 3) against the leaf alone, no name or date check (RFC 7672 3.1.1);
DANE-TA (usage 2) against a certificate the server presented above its leaf, which must
then chain to it and carry the MX host name (3.1.2). PKIX usages 0 and 1 are unusable
for SMTP (3.1.3).

Trusts: the resolver's AD bit only when the config says so (MxResolver.trust_ad);
nothing in the chain the server sent — every certificate is parsed defensively, and a
certificate that does not parse never matches.

Never: treat an unauthenticated TLSA answer as DANE, or accept a chain because parsing
it failed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from kanmon.deliver.mx import MxResolver

DANE_TA, DANE_EE = 2, 3
SPKI, FULL = 1, 0
MAX_TLSA = 20


@dataclass(frozen=True, slots=True)
class Tlsa:
    usage: int
    selector: int
    mtype: int  # 0 exact, 1 SHA-256, 2 SHA-512
    data: bytes

    @property
    def usable(self) -> bool:
        return self.usage in (DANE_TA, DANE_EE) and self.selector in (FULL, SPKI) and self.mtype in (0, 1, 2)

    def __str__(self) -> str:
        return f"{self.usage} {self.selector} {self.mtype} {self.data.hex()[:16]}..."


@dataclass(frozen=True, slots=True)
class TlsaAnswer:
    """`secure`: the answer was authenticated (DANE applies when records are there too)."""

    records: tuple[Tlsa, ...] = ()
    secure: bool = False

    @property
    def usable(self) -> tuple[Tlsa, ...]:
        return tuple(r for r in self.records if r.usable)


async def lookup_tlsa(resolver: MxResolver, host: str, port: int) -> TlsaAnswer:
    """The TLSA RRset of an MX host (RFC 7672 2.2). Raises SmtpError 4.4.3 when DNS fails."""
    answer = await resolver.lookup(f"_{port}._tcp.{host.rstrip('.')}", "TLSA")
    if not answer.authenticated:
        return TlsaAnswer((), False)
    records = tuple(Tlsa(int(r.usage), int(r.selector), int(r.mtype), bytes(r.cert)) for r in answer.records[:MAX_TLSA])
    return TlsaAnswer(records, True)


def _selected(der: bytes, selector: int) -> bytes:
    if selector == FULL:
        return der
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    cert = x509.load_der_x509_certificate(der)
    return cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def _digest(data: bytes, mtype: int) -> bytes:
    if mtype == 1:
        return hashlib.sha256(data).digest()
    if mtype == 2:
        return hashlib.sha512(data).digest()
    return data


def _matches(record: Tlsa, der: bytes) -> bool:
    try:
        return _digest(_selected(der, record.selector), record.mtype) == record.data
    except Exception:  # a certificate that does not parse matches nothing
        return False


def match_chain(records: Sequence[Tlsa], chain_der: Sequence[bytes], host: str) -> bool:
    """Does the server's chain (leaf first) satisfy one of the usable TLSA records?"""
    if not chain_der:
        return False
    leaf = chain_der[0]
    for record in records:
        if not record.usable:
            continue
        if record.usage == DANE_EE and _matches(record, leaf):
            return True  # RFC 7672 3.1.1: no name check, no expiry check
        if record.usage == DANE_TA:
            for i, der in enumerate(chain_der[1:], start=1):
                if _matches(record, der) and _chains_to(leaf, chain_der[1:i], der, host):
                    return True
    return False


def _chains_to(leaf: bytes, intermediates: Sequence[bytes], anchor: bytes, host: str) -> bool:
    """RFC 7672 3.1.2: the leaf chains to the matched trust anchor and names the host."""
    try:
        from cryptography import x509
        from cryptography.x509.verification import PolicyBuilder, Store

        from kanmon.smtp.client import leaf_policy

        builder = PolicyBuilder().store(Store([x509.load_der_x509_certificate(anchor)]))
        try:
            from cryptography.x509.verification import ExtensionPolicy

            builder = builder.extension_policies(ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=leaf_policy())
        except ImportError:  # older cryptography: its defaults
            pass
        verifier = builder.build_server_verifier(x509.DNSName(host.rstrip(".")))
        verifier.verify(x509.load_der_x509_certificate(leaf), [x509.load_der_x509_certificate(d) for d in intermediates])
        return True
    except Exception:
        return False


__all__ = ["TlsaAnswer", "Tlsa", "lookup_tlsa", "match_chain"]
