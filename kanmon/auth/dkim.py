"""DKIM (RFC 6376) and ARC (RFC 8617) verification with dkimpy, from prefetched keys.

Role: key_names(header) lists the key records (selector._domainkey.domain) the message's
DKIM-Signature, ARC-Message-Signature and ARC-Seal fields need, so the caller fetches
them with its async resolver first; verify_dkim() then checks every DKIM signature (up to
MAX_SIGNATURES; rsa-sha256, ed25519-sha256 and what else dkimpy accepts) and verify_arc()
the ARC chain, both with a DNS function that only reads those answers. A body length
limit (l=) is verified as the RFC says and reported with how much of the body it leaves
unsigned.

Trusts: nothing in the message or the key records. Never: do I/O (dkimpy's own resolver
is never called); raise for a malformed signature or key (they are results).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import dkim as dkimpy
from dkim.canonicalization import CanonicalizationPolicy, InvalidCanonicalizationPolicyError
from dkim.util import InvalidTagValueList, parse_tag_value

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


def _key_state(keys: _Keys, selector: str, domain: str) -> str:
    """'' when a usable-looking key record exists, else why not ('no key', 'key revoked')."""
    record = keys(key_name(selector, domain))
    if record is None:
        return "no key"
    tags = _tags(record)
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


def verify_dkim(message: bytes, lookup: Lookup) -> list[DkimSignatureResult]:
    """Every DKIM signature's result, first signature first (empty: the message is unsigned).
    Raises nothing for the message's faults; DNS answers come from lookup (see key_names)."""
    header_end = message.find(b"\r\n\r\n")
    header = message if header_end < 0 else message[: header_end + 2]
    values = _fields(header, b"DKIM-Signature")[:MAX_SIGNATURES]
    if not values:
        return []
    keys = _Keys(lookup)
    try:
        d = dkimpy.DKIM(message, logger=_log, minkey=MIN_RSA_BITS)
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
        try:
            missing = _key_state(keys, selector, domain)
            if missing:
                out.append(result("permerror", missing))
                continue
            ok = d.verify(idx, dnsfunc=keys)
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
