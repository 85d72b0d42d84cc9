"""DKIM keys: make, load and publish them (RFC 6376 3.6.1, RFC 8463 for ed25519).

Role: generate a private key for `kanmon dkim keygen` and write it privately; load the
key file a [[dkim]] entry names (checking that it is the algorithm the entry says);
give the public key as DNS publishes it (k= and p=) and the TXT record text, split into
character-strings of at most 255 octets (RFC 1035 3.3.14).

Trusts: the paths it is given (from the config or the command line). The key file's
content is checked: not PEM, the wrong kind of key, or RSA under 1024 bits (RFC 8301 3.2)
is a DkimKeyError naming the file.
Never: overwrite a key file unless told to (force), or create a key or its directory
readable by anyone but the owner (DESIGN.md promise 10).
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

ALGORITHMS = ("rsa-sha256", "ed25519-sha256")
RSA_BITS = 2048  # RFC 8301 3.2: signers use at least 1024, SHOULD 2048
MIN_RSA_BITS = 1024

PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


class DkimKeyError(OSError):
    """A key file that cannot be used; str() names the file and what is wrong. An
    OSError, as an unreadable certificate is: start fails and a reload is refused."""


@dataclass(frozen=True)
class PublicKey:
    """A public key as its DNS record publishes it."""

    key_type: str  # k=: "rsa" or "ed25519"
    data: bytes  # p=, decoded: SubjectPublicKeyInfo DER (rsa) or the raw 32 octets (ed25519)

    def record(self) -> str:
        """The TXT record's text: v=DKIM1; k=...; p=... (RFC 6376 3.6.1)."""
        return f"v=DKIM1; k={self.key_type}; p={base64.b64encode(self.data).decode('ascii')}"


def key_type(algorithm: str) -> str:
    """rsa-sha256 -> rsa, ed25519-sha256 -> ed25519 (the record's k=)."""
    return algorithm.split("-", 1)[0]


def generate_key(algorithm: str) -> PrivateKey:
    if algorithm == "rsa-sha256":
        return rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
    if algorithm == "ed25519-sha256":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(f"unknown DKIM algorithm {algorithm!r} (rsa-sha256 | ed25519-sha256)")


def private_pem(key: PrivateKey) -> bytes:
    """PKCS#8 PEM, the format OpenDKIM, rspamd and openssl read."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def public_key(key: PrivateKey) -> PublicKey:
    pub = key.public_key()
    if isinstance(pub, ed25519.Ed25519PublicKey):  # RFC 8463 4.2: the raw 32 octets, base64
        return PublicKey("ed25519", pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))
    return PublicKey("rsa", pub.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))


def load_private_key(path: Path, algorithm: str) -> PrivateKey:
    """The private key in path, which must be of algorithm's kind."""
    try:
        pem = Path(path).read_bytes()
    except OSError as e:
        raise DkimKeyError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as e:
        raise DkimKeyError(f"{path}: not an unencrypted PEM private key ({e})") from None
    want = key_type(algorithm)
    if want == "rsa" and isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            raise DkimKeyError(f"{path}: RSA key of {key.key_size} bits; receivers ignore keys under 1024 (RFC 8301)")
        return key
    if want == "ed25519" and isinstance(key, ed25519.Ed25519PrivateKey):
        return key
    raise DkimKeyError(f"{path}: not an {want} key, as algorithm = {algorithm!r} says")


def write_private_key(path: Path, key: PrivateKey, *, force: bool = False) -> None:
    """Write key to path (0600), creating its directory (0700) when missing. Refuses
    an existing file unless force (FileExistsError). The file appears whole or not at all."""
    path = Path(path)
    if path.exists() and not force:
        raise FileExistsError(f"{path} exists")
    if not path.parent.is_dir():
        os.makedirs(path.parent, mode=0o700, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(private_pem(key))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)  # whatever the umask said
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def txt_strings(text: str, limit: int = 255) -> list[str]:
    """text as TXT character-strings of at most limit octets (RFC 1035 3.3.14);
    receivers join them without a separator (RFC 6376 3.6.2.2)."""
    data = text.encode("ascii")
    return [data[i:i + limit].decode("ascii") for i in range(0, len(data), limit)] or [""]


def record_name(domain: str, selector: str) -> str:
    return f"{selector}._domainkey.{domain}"  # RFC 6376 3.6.2.1


def zone_line(domain: str, selector: str, pub: PublicKey) -> str:
    """The record as a BIND zone file line: name, TXT, the quoted strings."""
    strings = " ".join(f'"{s}"' for s in txt_strings(pub.record()))
    return f"{record_name(domain, selector)}. IN TXT ( {strings} )"
