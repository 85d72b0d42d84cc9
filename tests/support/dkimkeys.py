"""DKIM keys and an independent signer for tests: dkimpy signs, the loopback DNS serves the keys.

Role: make RSA and ed25519 key pairs, their DNS TXT records (RFC 6376 3.6.1) in the
zone syntax of tests.support.dnsserver, and sign or ARC-seal a message with dkimpy
(used here as a separate signer, not through kanmon's code).
Never: touch the network.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

import dkim
import nacl.signing
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.support.dnsserver import txt


@dataclass(frozen=True)
class Key:
    private: bytes  # what dkimpy's sign() takes
    public_b64: str
    algorithm: str  # rsa-sha256 | ed25519-sha256

    def record(self) -> str:
        """The TXT record in zone syntax."""
        k = "ed25519" if self.algorithm.startswith("ed25519") else "rsa"
        return "TXT " + txt(f"v=DKIM1; k={k}; p={self.public_b64}")


def rsa_key(bits: int = 2048) -> Key:
    priv = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    pem = priv.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())
    der = priv.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return Key(pem, base64.b64encode(der).decode(), "rsa-sha256")


def ed25519_key() -> Key:
    sk = nacl.signing.SigningKey.generate()
    return Key(base64.b64encode(bytes(sk)), base64.b64encode(bytes(sk.verify_key)).decode(), "ed25519-sha256")


def sign(message: bytes, key: Key, domain: str, selector: str, *, length: bool = False,
         headers: list[bytes] | None = None) -> bytes:
    """The message with a DKIM-Signature by dkimpy prepended."""
    sig = dkim.sign(message, selector.encode(), domain.encode(), key.private, length=length,
                    signature_algorithm=key.algorithm.encode(), include_headers=headers,
                    canonicalize=(b"relaxed", b"relaxed"))
    return sig + message


def arc_seal(message: bytes, key: Key, domain: str, selector: str, authserv_id: str) -> bytes:
    """The message with an ARC set by dkimpy prepended (the sealer's own A-R must be in it)."""
    fields = dkim.arc_sign(message, selector.encode(), domain.encode(), key.private, authserv_id.encode())
    return b"".join(fields) + message
