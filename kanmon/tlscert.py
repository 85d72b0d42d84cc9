"""Server TLS: load the configured certificate, or make a self-signed pair on first start.

Role: build the ssl.SSLContext every listener (SMTP STARTTLS, submission, POP3, IMAP)
offers. Without a [tls] section a self-signed certificate for server.hostname is
created once in <data_dir>/tls/ (key file mode 0600) and reused, as Postfix
installations do with a snakeoil pair.
Never: overwrite an existing key; accept protocols older than TLS 1.2.
"""

from __future__ import annotations

import datetime
import os
import ssl
from pathlib import Path

from kanmon.config import Config


def self_signed_paths(data_dir: Path) -> tuple[Path, Path]:
    d = Path(data_dir) / "tls"
    return d / "selfsigned-cert.pem", d / "selfsigned-key.pem"


def make_self_signed(hostname: str, cert_path: Path, key_path: Path, days: int = 3650) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    fd = os.open(cert_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))


def server_cert_paths(config: Config) -> tuple[Path, Path]:
    """The certificate and key in use, creating the self-signed pair if needed."""
    if config.tls is not None:
        return config.tls.cert, config.tls.key
    cert, key = self_signed_paths(config.server.data_dir)
    if not (cert.exists() and key.exists()):
        make_self_signed(config.server.hostname, cert, key)
    return cert, key


def server_context(config: Config) -> ssl.SSLContext:
    cert, key = server_cert_paths(config)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    return ctx
