"""Signed links of the quarantine digest: release or delete one recipient's copy.

Role: make and check the tokens in the digest's links (`<[console] public_url>/q/TOKEN`).
A token binds the quarantine id, the recipient address, the action (release | delete)
and an expiry, signed with HMAC-SHA256 under a secret kept in
data_dir/console/quarantine-links.key (0600, made on first use). Nodes that share the
quarantine ([records] url) must hold the same file: a link mailed by one node is then
honoured by any of them.
Token: base64url(payload) "." base64url(mac), payload "action:id:expiry:recipient"
(action, id and expiry hold no colon; the recipient comes last and may).

Trusts: nothing in a token until its MAC matched (compared in constant time).
Never: tell what a tampered token said (the caller shows "forged", nothing more); accept
an expired one.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from pathlib import Path

from kanmon import secretfile
from kanmon.secretfile import b64, unb64

ACTIONS = ("release", "delete")
SECRET_BYTES = secretfile.SECRET_BYTES
SECRET_FILE = "quarantine-links.key"
MAX_TOKEN = 1024  # longer than any token we make: refused before decoding


class LinkError(Exception):
    """A token refused. reason: "forged" (bad MAC or format) or "expired"."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Link:
    qid: str
    rcpt: str
    action: str
    expires: float


def load_secret(data_dir: Path | str) -> bytes:
    """The signing secret, created 0600 on first use (copy the file to every node that
    shares the quarantine; replacing it voids every link already mailed)."""
    return secretfile.load_secret(Path(data_dir) / "console", SECRET_FILE)


def _mac(secret: bytes, payload: bytes) -> bytes:
    return hmac.new(secret, b"kanmon quarantine link\0" + payload, hashlib.sha256).digest()


def sign(secret: bytes, qid: str, rcpt: str, action: str, expires: float) -> str:
    if action not in ACTIONS:
        raise ValueError(f"action must be one of {', '.join(ACTIONS)}")
    if ":" in qid:
        raise ValueError("a quarantine id has no colon")
    payload = f"{action}:{qid}:{int(expires)}:{rcpt}".encode()
    return f"{b64(payload)}.{b64(_mac(secret, payload))}"


def verify(secret: bytes, token: str, now: float) -> Link:
    """The link a token names; LinkError("forged") or LinkError("expired")."""
    if not isinstance(token, str) or len(token) > MAX_TOKEN or token.count(".") != 1:
        raise LinkError("forged")
    body, mac = token.split(".")
    try:
        payload, given = unb64(body), unb64(mac)
    except (ValueError, TypeError):
        raise LinkError("forged") from None
    if not hmac.compare_digest(_mac(secret, payload), given):
        raise LinkError("forged")
    try:
        action, qid, expires, rcpt = payload.decode().split(":", 3)
        expiry = int(expires)
    except ValueError:  # signed by us, so never; still no stack trace
        raise LinkError("forged") from None
    if action not in ACTIONS:
        raise LinkError("forged")
    if now >= expiry:
        raise LinkError("expired")
    return Link(qid, rcpt, action, float(expiry))


def url(base: str, token: str) -> str:
    return f"{base.rstrip('/')}/q/{token}"
