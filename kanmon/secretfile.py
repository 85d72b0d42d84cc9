"""A node's signing secrets (the console's session cookies, the quarantine digest's
links) and the unpadded URL-safe base64 their tokens are written in.

Role: create a secret file once (0600, in a 0700 directory, fsynced) and read it after.
Trusts: the data directory. Never: log a secret, or shorten one silently (a damaged file
is an error that says to delete it).
"""

from __future__ import annotations

import base64
import os
import secrets
from pathlib import Path

SECRET_BYTES = 32


def load_secret(directory: Path | str, name: str) -> bytes:
    """The secret in directory/name, created on first use."""
    d = Path(directory)
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = d / name
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        data = path.read_bytes()
        if len(data) < SECRET_BYTES:
            raise ValueError(f"{path} is damaged (shorter than {SECRET_BYTES} bytes): delete it to make a new one") from None
        return data[:SECRET_BYTES]
    secret = secrets.token_bytes(SECRET_BYTES)
    with os.fdopen(fd, "wb") as f:
        f.write(secret)
        f.flush()
        os.fsync(f.fileno())
    return secret


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
