"""DATA: the From: header of an authenticated user's message must be the user's own.

Role: the submission policy `[submission] from_header` ("own": the authenticated
address; "own_or_alias": it or an alias that delivers to it, the same set the envelope
sender may use; "any": not checked). Postfix has no header equivalent of
reject_sender_login_mismatch; this is what mail administrators add with a milter, so a
logged-in account (or its stolen password) cannot write as the CEO. The reply is
553 5.7.1, the one the envelope sender gets (RFC 6409 8.1).

Trusts: the session's auth_user (set only after a verified login) and the directory.
The header block is client data: parsed with the standard library's address parser,
bounded by the session's header size limit. A message without a From: field claims
nobody and passes. Never: accept a From: field it cannot parse, a second From: field, or
one without an address, when the policy asks for "own".
"""

from __future__ import annotations

from email.header import decode_header, make_header
from email.utils import getaddresses

from kanmon.model import Reply
from kanmon.policy.access import RelayAccess
from kanmon.policy.pipeline import ACCEPTED, Check, CheckResult, Context, reject

FROM_NOT_OWNED = Reply(553, "5.7.1", "From: header address not owned by the authenticated user")


def from_fields(header: bytes) -> list[str]:
    """The unfolded values of every From: field of a header block (CRLF line ends)."""
    out: list[str] = []
    current: list[bytes] | None = None
    for line in header.split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):
            if current is not None:
                current.append(line)
            continue
        if current is not None:
            out.append(b" ".join(part.strip() for part in current).decode("utf-8", "replace"))
            current = None
        name, colon, value = line.partition(b":")
        if colon and name.strip().lower() == b"from":
            current = [value]
    if current is not None:
        out.append(b" ".join(part.strip() for part in current).decode("utf-8", "replace"))
    return out


def _decoded(value: str) -> str:
    if "=?" not in value:
        return value
    try:
        return str(make_header(decode_header(value)))
    except Exception:  # noqa: BLE001 - a broken encoded-word: parse it as written
        return value


class FromHeaderCheck(Check):
    """DATA: an authenticated user's From: header names only addresses it owns."""

    name = "from_header"

    def __init__(self, access: RelayAccess, policy: str):
        self.access = access
        self.policy = policy

    def data(self, ctx: Context) -> CheckResult:
        user = ctx.client.auth_user
        if not user or self.policy == "any":
            return ACCEPTED
        fields = from_fields(ctx.header)
        if not fields:
            return ACCEPTED  # nothing claimed (RFC 6409 8.1 lets an MSA add it)
        if len(fields) > 1:  # RFC 5322 3.6: at most one From: field
            return reject(FROM_NOT_OWNED)
        addresses = [a.strip().lower() for _, a in getaddresses([_decoded(fields[0])])]
        allowed = {user.lower()} if self.policy == "own" else self.access.sender_addresses(user)
        if not addresses or any(not a or a not in allowed for a in addresses):
            return reject(FROM_NOT_OWNED)
        return ACCEPTED
