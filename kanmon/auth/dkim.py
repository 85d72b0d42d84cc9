"""DKIM (RFC 6376) and ARC (RFC 8617) verification, from prefetched keys.

Role: key_names(header) lists the key records (selector._domainkey.domain) the message's
DKIM-Signature, ARC-Message-Signature and ARC-Seal fields need, so the caller fetches
them with its async resolver first; verify_dkim() then checks every DKIM signature (up to
MAX_SIGNATURES) and verify_arc() the ARC chain (dkimpy), both with a DNS function that
only reads those answers. A body length limit (l=) is verified as the RFC says and
reported with how much of the body it leaves unsigned. rsa-sha1 signatures are a
permerror (RFC 8301 3.1: never valid), whatever dkimpy would say.

Two verifiers, one answer. The common case, a CRLF message with an rsa-sha256 or
ed25519-sha256 signature over a well-formed key, is verified here: the canonical forms
of kanmon.auth.dkimsign (C-speed bytes and re work), hashlib, and one `cryptography`
call (OpenSSL) for the signature. dkimpy does the same in pure Python (its RSA is a
Python pow() and its canonicalization a regex per line), several times slower. Every
other case (an odd header, another algorithm, a key dkimpy would refuse or accept in a
way of its own, a signature its checks reject) goes to dkimpy, which stays the reference:
tests/unit/test_dkim_verify.py checks that both give the same result on the same
messages.

Trusts: nothing in the message or the key records. Never: do I/O (dkimpy's own resolver
is never called); raise for a malformed signature or key (they are results).
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import logging
import re
from dataclasses import dataclass

import dkim as dkimpy
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from dkim.canonicalization import CanonicalizationPolicy, InvalidCanonicalizationPolicyError
from dkim.util import InvalidTagValueList, parse_tag_value

from kanmon.auth.dkimsign import canonical_body_relaxed, canonical_header_relaxed, split_fields
from kanmon.auth.lookup import OK, TEMPFAIL, DnsTemporaryError, Lookup, txt_strings

MAX_SIGNATURES = 10  # DKIM signatures verified per message (RFC 6376 6.1: a verifier may limit them)
MAX_ARC_SETS = 10
MIN_RSA_BITS = 1024  # RFC 8301 3.2: shorter RSA keys are not accepted

_log = logging.getLogger("kanmon.auth.dkim")
_log.addHandler(logging.NullHandler())
_log.propagate = False  # dkimpy logs the message's text at error level: never into our log


@dataclass(frozen=True, slots=True)
class DkimSignatureResult:
    result: str  # pass | fail | neutral | permerror | temperror
    domain: str  # d= ("" when the signature does not parse)
    selector: str  # s=
    algorithm: str  # a=
    reason: str = ""  # why not pass, or the body length note
    identity: str = ""  # i=
    length: int | None = None  # l=, when present
    unsigned_octets: int = 0  # body octets (canonicalized) after l=
    b: str = ""  # the first characters of b= (RFC 6008 header.b)


@dataclass(frozen=True, slots=True)
class ArcResult:
    result: str  # pass | fail | none | temperror
    instances: int = 0  # the chain's length (the highest i=)
    sealer: str = ""  # d= of the newest ARC-Seal
    reason: str = ""


def _fields(header: bytes, name: bytes) -> list[bytes]:
    """The values of the header fields called name (unfolded), in order."""
    out = []
    for m in re.finditer(rb"(?im)^" + re.escape(name) + rb"[ \t]*:((?:[^\r\n]*\r?\n[ \t])*[^\r\n]*)", header):
        out.append(re.sub(rb"\r?\n", b"", m.group(1)))
    return out


def _tags(value: bytes) -> dict[bytes, bytes] | None:
    try:
        return parse_tag_value(value)
    except (InvalidTagValueList, ValueError):
        return None


def _text(b: bytes | None) -> str:
    return (b or b"").decode("ascii", "replace").strip()


def key_name(selector: str, domain: str) -> str:
    return f"{selector}._domainkey.{domain}".lower().rstrip(".")


def key_names(header: bytes) -> list[str]:
    """The key records (TXT names) the message's signatures and seals refer to."""
    names: list[str] = []
    for field, limit in ((b"DKIM-Signature", MAX_SIGNATURES), (b"ARC-Message-Signature", MAX_ARC_SETS),
                         (b"ARC-Seal", MAX_ARC_SETS)):
        for value in _fields(header, field)[:limit]:
            tags = _tags(value)
            if tags is None or b"s" not in tags or b"d" not in tags:
                continue
            name = key_name(_text(tags[b"s"]), _text(tags[b"d"]))
            if name not in names and re.fullmatch(r"[a-z0-9._-]{1,253}", name):
                names.append(name)
    return names


class _Keys:
    """dkimpy's dnsfunc, answering from the lookup (the keys fetched beforehand)."""

    def __init__(self, lookup: Lookup):
        self.lookup = lookup

    def __call__(self, name: bytes | str, timeout: float = 5) -> bytes | None:  # dkimpy's signature
        qname = (name.decode("ascii", "replace") if isinstance(name, bytes) else name).lower().rstrip(".")
        ans = self.lookup(qname, "TXT")
        if ans.status == TEMPFAIL:
            raise DnsTemporaryError(f"{qname}: {ans.error or 'temporary failure'}")
        if ans.status != OK:
            return None
        texts = txt_strings(ans)
        # RFC 6376 3.6.2.2: one key record; several (or none that parses) is no key.
        return texts[0] if len(texts) == 1 else None


@functools.lru_cache(maxsize=256)
def _key_tags(record: bytes) -> dict[bytes, bytes] | None:
    """A key record's tags (cached: a sender's key comes back with each message; read only)."""
    return _tags(record)


def _key_state(record: bytes | None) -> str:
    """'' when a usable-looking key record exists, else why not ('no key', 'key revoked')."""
    if record is None:
        return "no key"
    tags = _key_tags(record)
    if tags is None:
        return "key record does not parse"
    if not tags.get(b"p", b"").strip():
        return "key revoked"  # RFC 6376 3.6.1: an empty p= means revoked
    return ""


def _body_after(body: bytes, c: bytes, length: int) -> int:
    try:
        policy = CanonicalizationPolicy.from_c_value(c)
    except InvalidCanonicalizationPolicyError:
        return 0
    return max(0, len(policy.canonicalize_body(body)) - length)


# The verifier of the common case (see the module docstring). Each function answers
# None for "not the common case": the caller then asks dkimpy.

_NAME = re.compile(rb"[\x21-\x39\x3b-\x7e]+")  # a field name as dkimpy reads one (RFC 5322 ftext)
_BTAG = re.compile(rb"([;\s]b(?:(?:\s*\r?\n)?\s+)?=)(?:(?:(?:\s*\r?\n)?\s+)?[a-zA-Z0-9+/=])*(?:\r?\n\Z)?")  # b='s value
_WS = re.compile(rb"\s+")
PASS, BODY_FAIL, SIGNATURE_FAIL = "pass", "body", "signature"


class _Parsed:
    """A CRLF message's header fields (kanmon.auth.dkimsign.split_fields) and body,
    with its canonical bodies computed once for all signatures."""

    __slots__ = ("fields", "body", "signatures", "bodies")

    def __init__(self, fields: list[tuple[bytes, bytes]], body: bytes):
        self.fields = fields
        self.body = body
        self.signatures = [(n, v) for n, v in fields if n.lower() == b"dkim-signature"]
        self.bodies: dict[bytes, bytes] = {}

    def canonical_body(self, how: bytes) -> bytes:
        out = self.bodies.get(how)
        if out is None:
            if how == b"relaxed":
                out = canonical_body_relaxed(self.body)
            else:  # simple (RFC 6376 3.4.3): empty lines at the end go; at least one CRLF
                out = self.body.rstrip(b"\r\n") + b"\r\n"  # CRLF text: rstrip takes whole CRLFs
            self.bodies[how] = out
        return out


def _parse(message: bytes, header_end: int) -> _Parsed | None:
    """The message as _Parsed, or None when it is not CRLF text with a well-formed header."""
    if header_end < 0 or message.startswith(b"\r\n"):
        return None
    body = message[header_end + 4:]
    if body.count(b"\n") != body.count(b"\r\n") or body.count(b"\r") != body.count(b"\r\n"):
        return None
    fields = split_fields(message[: header_end + 2])
    if fields is None or not all(_NAME.fullmatch(name) for name, _ in fields):
        return None
    return _Parsed(fields, body)


@functools.lru_cache(maxsize=256)
def _public_key(kind: bytes, p: bytes) -> rsa.RSAPublicKey | ed25519.Ed25519PublicKey | None:
    """The key of a record's p= (cached: a sender's key comes back with each message);
    None for what the common case does not cover (an RSA key below MIN_RSA_BITS, anything
    that does not load as SubjectPublicKeyInfo or PKCS#1 RSAPublicKey, as dkimpy reads them)."""
    try:
        der = base64.b64decode(p)
        if kind == b"ed25519":
            return ed25519.Ed25519PublicKey.from_public_bytes(der) if len(der) == 32 else None
        key = serialization.load_der_public_key(der)
    except (ValueError, TypeError, binascii.Error):
        return None
    if isinstance(key, rsa.RSAPublicKey) and key.key_size >= MIN_RSA_BITS:
        return key
    return None


def _verify_common(parsed: _Parsed, idx: int, record: bytes) -> str | None:
    """The idx-th signature's result (PASS, BODY_FAIL, SIGNATURE_FAIL), or None when the
    signature, the key or the message is not the common case."""
    if idx >= len(parsed.signatures):
        return None
    sig_name, sig_value = parsed.signatures[idx]
    try:
        sig = parse_tag_value(sig_value)
        dkimpy.validate_signature_fields(sig)  # the same tag checks as dkimpy's
        key = _key_tags(record)
        bh = base64.b64decode(_WS.sub(b"", sig[b"bh"]))
        signature = base64.b64decode(_WS.sub(b"", sig[b"b"]))
    except (dkimpy.DKIMException, InvalidTagValueList, ValueError, binascii.Error):
        return None
    if key is None:
        return None
    algorithm = sig[b"a"]
    kind = key.get(b"k", b"rsa")
    if (algorithm, kind) not in ((b"rsa-sha256", b"rsa"), (b"ed25519-sha256", b"ed25519")):
        return None
    if key.get(b"v", b"DKIM1") != b"DKIM1" or key.get(b"s", b"*") not in (b"*", b"email"):
        return None
    public = _public_key(kind, key.get(b"p", b""))
    if public is None:
        return None
    c = sig.get(b"c", b"simple/simple").split(b"/")
    header_c, body_c = (c[0], c[1]) if len(c) == 2 else (c[0], b"simple")
    if len(c) > 2 or header_c not in (b"simple", b"relaxed") or body_c not in (b"simple", b"relaxed"):
        return None

    body = parsed.canonical_body(body_c)
    if b"l" in sig:
        body = body[: int(sig[b"l"])]
    if hashlib.sha256(body).digest() != bh:
        return BODY_FAIL

    # RFC 6376 5.4.2: each name in h= takes the next instance from the bottom; dkimpy
    # also hashes one From more than h= lists (a second From then breaks the signature).
    names = [n.lower() for n in re.split(rb"\s*:\s*", sig[b"h"])]
    if b"from" in names:
        names.append(b"from")
    by_name: dict[bytes, list[tuple[bytes, bytes]]] = {}
    for name, value in parsed.fields:
        by_name.setdefault(name.lower(), []).append((name, value))
    data = bytearray()
    relaxed = header_c == b"relaxed"
    for n in names:
        instances = by_name.get(n)
        if instances:
            name, value = instances.pop()
            data += canonical_header_relaxed(name, value) if relaxed else name + b":" + value + b"\r\n"
    value = _BTAG.sub(rb"\1", sig_value + b"\r\n")
    if relaxed:
        data += canonical_header_relaxed(sig_name, value.removesuffix(b"\r\n"))[:-2]
    else:
        data += sig_name + b":" + value.rstrip()
    try:
        if isinstance(public, rsa.RSAPublicKey):
            public.verify(signature, bytes(data), padding.PKCS1v15(), hashes.SHA256())
        else:
            if len(signature) != 64:
                return None
            public.verify(signature, hashlib.sha256(data).digest())  # RFC 8463 3
    except InvalidSignature:
        return SIGNATURE_FAIL
    return PASS


def verify_dkim(message: bytes, lookup: Lookup, *, common: bool = True) -> list[DkimSignatureResult]:
    """Every DKIM signature's result, first signature first (empty: the message is unsigned).
    Raises nothing for the message's faults; DNS answers come from lookup (see key_names).
    common=False: dkimpy verifies every signature (the reference the tests compare with)."""
    header_end = message.find(b"\r\n\r\n")
    header = message if header_end < 0 else message[: header_end + 2]
    values = _fields(header, b"DKIM-Signature")[:MAX_SIGNATURES]
    if not values:
        return []
    keys = _Keys(lookup)
    parsed = _parse(message, header_end) if common else None
    reference = None  # dkimpy's reading of the message, made when a signature needs it
    if parsed is None:
        try:
            reference = dkimpy.DKIM(message, logger=_log, minkey=MIN_RSA_BITS)
        except Exception:  # noqa: BLE001 - a header dkimpy cannot parse: no signature can verify
            return [DkimSignatureResult("permerror", "", "", "", "message header does not parse") for _ in values]
    out = []
    for idx, value in enumerate(values):
        tags = _tags(value)
        if tags is None:
            out.append(DkimSignatureResult("permerror", "", "", "", "signature does not parse"))
            continue
        domain, selector, algo = _text(tags.get(b"d")).lower(), _text(tags.get(b"s")), _text(tags.get(b"a"))
        ident = _text(tags.get(b"i"))
        b = re.sub(r"\s+", "", _text(tags.get(b"b")))[:8]
        length = int(tags[b"l"]) if re.fullmatch(rb"\d{1,76}", tags.get(b"l", b"x")) else None

        def result(res: str, reason: str = "", unsigned: int = 0) -> DkimSignatureResult:
            return DkimSignatureResult(res, domain, selector, algo, reason, ident, length, unsigned, b)

        if not domain or not selector:
            out.append(result("permerror", "signature without d= or s="))
            continue
        if algo.lower() == "rsa-sha1":  # dkimpy would verify it
            out.append(result("permerror", "rsa-sha1 is not accepted (RFC 8301)"))
            continue
        try:
            record = keys(key_name(selector, domain))
            missing = _key_state(record)
            if missing:
                out.append(result("permerror", missing))
                continue
            assert record is not None
            common = None if parsed is None else _verify_common(parsed, idx, record)
            if common == BODY_FAIL:
                out.append(result("fail", "body hash did not verify"))
                continue
            if common is not None:
                ok = common == PASS
            else:
                if reference is None:
                    reference = dkimpy.DKIM(message, logger=_log, minkey=MIN_RSA_BITS)
                ok = reference.verify(idx, dnsfunc=keys)
        except DnsTemporaryError as e:
            out.append(result("temperror", f"key lookup failed: {e}"))
            continue
        except dkimpy.ValidationError as e:
            text = str(e)
            out.append(result("fail" if "body hash mismatch" in text else "permerror",
                              "body hash did not verify" if "body hash mismatch" in text else text[:120]))
            continue
        except dkimpy.DKIMException as e:
            out.append(result("permerror", str(e)[:120]))
            continue
        except Exception as e:  # noqa: BLE001 - dkimpy on hostile input: a result, never a crash
            out.append(result("permerror", f"{type(e).__name__}"))
            continue
        if not ok:
            out.append(result("fail", "signature did not verify"))
            continue
        if length is not None:
            body = b"" if header_end < 0 else message[header_end + 4 :]
            unsigned = _body_after(body, tags.get(b"c", b"simple/simple"), length)
            note = f"body length limit l={length}" + (f", {unsigned} octets not signed" if unsigned else "")
            out.append(result("pass", note, unsigned))
            continue
        out.append(result("pass"))
    return out


def verify_arc(message: bytes, lookup: Lookup) -> ArcResult:
    """The ARC chain's validation (RFC 8617 5.2): none, pass (and the newest sealer), fail."""
    header_end = message.find(b"\r\n\r\n")
    header = message if header_end < 0 else message[: header_end + 2]
    if not _fields(header, b"ARC-Seal"):
        return ArcResult("none")
    try:
        arc = dkimpy.ARC(message, logger=_log, minkey=MIN_RSA_BITS)
        _max, sets = arc.sorted_arc_headers()
        if _max > MAX_ARC_SETS:
            return ArcResult("fail", _max, "", f"more than {MAX_ARC_SETS} ARC sets")
        cv, results, reason = arc.verify(dnsfunc=_Keys(lookup))
    except DnsTemporaryError as e:
        return ArcResult("temperror", 0, "", f"key lookup failed: {e}")
    except dkimpy.DKIMException as e:
        return ArcResult("fail", 0, "", str(e)[:120])
    except Exception as e:  # noqa: BLE001 - dkimpy on hostile input: a result, never a crash
        return ArcResult("fail", 0, "", type(e).__name__)
    newest = results[0] if results else {}
    sealer = _text(newest.get("as-domain")).lower()
    n = int(newest.get("instance", 0) or 0)
    if cv == dkimpy.CV_Pass:
        return ArcResult("pass", n, sealer, "")
    if cv == dkimpy.CV_None:
        return ArcResult("none", n, sealer, _text(reason.encode() if isinstance(reason, str) else reason))
    return ArcResult("fail", n, sealer, str(reason)[:120])
