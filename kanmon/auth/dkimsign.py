"""DKIM signing of our outgoing mail (RFC 6376; ed25519-sha256 from RFC 8463).

Role: given a message (CRLF line ends, as spooled), find the From domain, pick the
active [[dkim]] key(s) of that domain (or of the closest parent domain we sign for) and
return the DKIM-Signature header field(s) to put on top. Canonicalization is
relaxed/relaxed (RFC 6376 3.4.2, 3.4.4); the signed fields are the entry's `headers`
(each instance present) and `oversign` (one instance more than present, RFC 6376 8.15).
The listener calls it for mail from relay networks and authenticated users before the
message is spooled; the injector for the notices kanmon writes.

Pure and synchronous: canonicalization is C-level (bytes.replace, re), hashing is
hashlib, the signature is one `cryptography` call (RSA-2048 about a millisecond). The
caller decides whether a large message is signed off the event loop (OFF_LOOP_SIZE).

Trusts: the keys loaded from the config. The message comes from our own users and
networks, but its header is parsed defensively: a From field we cannot read, more than
one From field, or a header block that is not CRLF text gets no signature (never an
exception for the content's sake).
Never: sign mail whose From domain is not one of ours; sign a second time for a domain
and algorithm that already signed the message (the store node signed, the relay sees
it again); log or do I/O after loading the keys.
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ed25519, padding

from kanmon.auth.dkimkeys import DkimKeyError, PrivateKey, load_private_key
from kanmon.config import Config

OFF_LOOP_SIZE = 256 * 1024  # larger messages are signed in a thread: hashing them takes a while

_WSP = re.compile(rb"[ \t]+")
_FOLD = re.compile(rb"\r\n(?=[ \t])")
_TAG_D = re.compile(rb"(?:^|;)\s*d\s*=\s*([^;\s]+)", re.IGNORECASE)
_TAG_A = re.compile(rb"(?:^|;)\s*a\s*=\s*([^;\s]+)", re.IGNORECASE)
LINE = 76  # fold the signature's lines near this width


@dataclass(frozen=True)
class SigningKey:
    """An active [[dkim]] entry with its key loaded."""

    domain: str
    selector: str
    algorithm: str  # rsa-sha256 | ed25519-sha256
    private: PrivateKey
    headers: tuple[str, ...]
    oversign: tuple[str, ...]


def load_signer(config: Config) -> Signer:
    """The signer of config's active [[dkim]] keys. Raises DkimKeyError naming the key
    of the first entry whose file does not load (start and reload then fail)."""
    keys = []
    for i, entry in enumerate(config.dkim):
        if not entry.active:
            continue
        path = config.dkim_key_path(entry)
        try:
            private = load_private_key(path, entry.algorithm)
        except DkimKeyError as e:
            raise DkimKeyError(f"dkim[{i}] ({entry.selector}._domainkey.{entry.domain}): {e}") from None
        keys.append(SigningKey(entry.domain, entry.selector, entry.algorithm, private,
                               tuple(entry.headers), tuple(entry.oversign)))
    return Signer(keys)


def load_signer_lenient(config: Config) -> Signer:
    """load_signer, or a signer of nothing when a key does not load: for the injectors
    of alert mail and admin bounces, built after the node's start loaded (and so
    checked) the same keys, and in commands that run without the node."""
    try:
        return load_signer(config)
    except DkimKeyError:
        return Signer()


def canonical_body_relaxed(body: bytes) -> bytes:
    """RFC 6376 3.4.4: WSP runs become one SP, WSP at line ends goes, empty lines at the
    end go; a non-empty body ends in CRLF."""
    if not body:
        return b""
    if not body.endswith(b"\r\n"):
        body += b"\r\n"
    # bytes.replace passes (C speed) rather than one regex over the body: a tab is a
    # space, runs of spaces halve each pass.
    if b"\t" in body:
        body = body.replace(b"\t", b" ")
    while b"  " in body:
        body = body.replace(b"  ", b" ")
    if b" \r\n" in body:
        body = body.replace(b" \r\n", b"\r\n")
    body = body.rstrip(b"\r\n")
    return body + b"\r\n" if body else b""


def canonical_header_relaxed(name: bytes, value: bytes) -> bytes:
    """RFC 6376 3.4.2: lowercase name, unfolded value, WSP runs as one SP, no WSP
    around the colon or at the end. With the CRLF (the caller drops the last one's)."""
    value = _WSP.sub(b" ", _FOLD.sub(b"", value)).strip(b" ")
    return name.strip(b" \t").lower() + b":" + value + b"\r\n"


def split_fields(header: bytes) -> list[tuple[bytes, bytes]] | None:
    """The header block (fields ending in CRLF) as (name, value) with folds kept;
    None when a line is not a field (no colon) or not CRLF text."""
    if not header:
        return []
    if header.count(b"\n") != header.count(b"\r\n") or header.count(b"\r") != header.count(b"\r\n"):
        return None
    fields: list[tuple[bytes, bytes]] = []
    for line in header[:-2].split(b"\r\n") if header.endswith(b"\r\n") else header.split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):
            if not fields:
                return None
            name, value = fields[-1]
            fields[-1] = (name, value + b"\r\n" + line)
            continue
        name, colon, value = line.partition(b":")
        if not colon or not name.strip():
            return None
        fields.append((name, value))
    return fields


def from_domain(fields: Sequence[tuple[bytes, bytes]]) -> str | None:
    """The domain of the From field's address(es), lowercase; None when there is not
    exactly one From field or its addresses are not all of one domain."""
    values = [v for n, v in fields if n.strip(b" \t").lower() == b"from"]
    if len(values) != 1:
        return None
    text = _FOLD.sub(b"", values[0]).decode("utf-8", "replace")
    domains = set()
    for _name, addr in email.utils.getaddresses([text]):
        local, at, domain = addr.rpartition("@")
        if not at or not local or not domain:
            return None
        domains.add(domain.lower().rstrip("."))
    return domains.pop() if len(domains) == 1 else None


class Signer:
    """The active signing keys by domain. Empty (false) when nothing is configured."""

    def __init__(self, keys: Sequence[SigningKey] = ()):
        self.by_domain: dict[str, list[SigningKey]] = {}
        for k in keys:
            self.by_domain.setdefault(k.domain, []).append(k)

    def __bool__(self) -> bool:
        return bool(self.by_domain)

    def keys_for(self, domain: str) -> list[SigningKey]:
        """The keys of domain, or of its closest parent we sign for."""
        labels = domain.split(".")
        for i in range(len(labels) - 1):
            keys = self.by_domain.get(".".join(labels[i:]))
            if keys:
                return keys
        return []

    def sign(self, content: bytes, now: float, crlf_checked: bool = False) -> bytes:
        """The DKIM-Signature field(s) (CRLF-terminated) to put on top of content, or b""
        when the message is not ours to sign. now: the signature's t= (Unix time);
        crlf_checked: content is known to have CRLF line ends only (checked at DATA)."""
        if not self.by_domain:
            return b""
        end = content.find(b"\r\n\r\n")
        if content.startswith(b"\r\n"):
            return b""  # no header at all: no From
        header, body = (content, b"") if end < 0 else (content[:end + 2], content[end + 4:])
        fields = split_fields(header)
        if fields is None:
            return b""
        domain = from_domain(fields)
        if domain is None:
            return b""
        keys = self.keys_for(domain)
        if not keys:
            return b""
        present = _existing_signatures(fields)
        keys = [k for k in keys if (k.domain, k.algorithm) not in present]
        if not keys:
            return b""
        if not crlf_checked and (body.count(b"\n") != body.count(b"\r\n") or body.count(b"\r") != body.count(b"\r\n")):
            return b""  # not CRLF text: a canonical form we would not compute as receivers do
        body_hash = base64.b64encode(hashlib.sha256(canonical_body_relaxed(body)).digest()).decode("ascii")
        return b"".join(_signature(k, fields, body_hash, int(now)) for k in keys)

    def signed(self, content: bytes, now: float, crlf_checked: bool = False) -> bytes:
        """content with its signature(s) on top (content itself when not signed)."""
        sig = self.sign(content, now, crlf_checked)
        return sig + content if sig else content


def _existing_signatures(fields: Sequence[tuple[bytes, bytes]]) -> set[tuple[str, str]]:
    """(d=, a=) of the DKIM-Signature fields already on the message."""
    out = set()
    for name, value in fields:
        if name.strip(b" \t").lower() == b"dkim-signature":
            flat = _FOLD.sub(b"", value)
            d, a = _TAG_D.search(flat), _TAG_A.search(flat)
            if d and a:
                out.add((d.group(1).decode("ascii", "replace").lower().rstrip("."),
                         a.group(1).decode("ascii", "replace").lower()))
    return out


def _signature(key: SigningKey, fields: Sequence[tuple[bytes, bytes]], body_hash: str, now: int) -> bytes:
    # RFC 6376 5.4.2: each name in h= takes the next instance from the bottom; a name
    # listed once more than it occurs (oversigning) stands for a field that must not exist.
    by_name: dict[bytes, list[tuple[bytes, bytes]]] = {}
    for name, value in fields:
        by_name.setdefault(name.strip(b" \t").lower(), []).append((name, value))
    signed: list[str] = []
    for name in key.headers:
        signed += [name] * len(by_name.get(name.encode("ascii"), ()))
    for name in key.oversign:
        if name not in key.headers:
            signed += [name] * len(by_name.get(name.encode("ascii"), ()))
        signed.append(name)
    data = bytearray()
    for name in signed:
        instances = by_name.get(name.encode("ascii"))
        if instances:
            data += canonical_header_relaxed(*instances.pop())
    tags = [
        "v=1", f"a={key.algorithm}", "c=relaxed/relaxed", f"d={key.domain}", f"s={key.selector}", f"t={now}",
        "h=" + ":".join(signed), f"bh={body_hash}", "b=",
    ]
    template = _fold("DKIM-Signature: ", tags)
    name, _, value = template.partition(b":")
    data += canonical_header_relaxed(name, value)[:-2]  # RFC 6376 3.7: without the last CRLF
    if key.algorithm == "rsa-sha256":
        signature = key.private.sign(bytes(data), padding.PKCS1v15(), hashes.SHA256())
    else:  # RFC 8463 3: Ed25519 over the SHA-256 hash
        assert isinstance(key.private, ed25519.Ed25519PrivateKey)
        signature = key.private.sign(hashlib.sha256(data).digest())
    b = base64.b64encode(signature)
    last = template.rsplit(b"\r\n", 1)[-1]
    first = max(8, LINE - len(last))
    chunks = [b[:first]] + [b[i:i + LINE - 1] for i in range(first, len(b), LINE - 1)]
    return template + b"\r\n\t".join(chunks) + b"\r\n"


def _fold(start: str, tags: Sequence[str]) -> bytes:
    """start and the tags joined by "; ", folded before a tag that would pass LINE
    columns (h= also between its names: FWS may stand around its colons, RFC 6376
    3.5), without the final CRLF."""
    lines = [start.rstrip()]

    def add(piece: str, sep: str) -> None:
        if len(lines[-1]) + len(sep) + len(piece) > LINE:
            lines.append("\t" + (piece if sep == " " else sep + piece))
        else:
            lines[-1] += sep + piece

    for i, tag in enumerate(tags):
        end = ";" if i < len(tags) - 1 else ""
        if tag.startswith("h="):
            first, *rest = tag[2:].split(":")
            add("h=" + first, " ")
            for name in rest:
                add(name, ":")
            lines[-1] += end
        else:
            add(tag + end, " ")
    return "\r\n".join(lines).encode("ascii")
