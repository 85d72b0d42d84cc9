"""Parsers for the tag=value TXT records a mail domain publishes: DMARC (RFC 7489),
DKIM keys (RFC 6376), MTA-STS (RFC 8461) and TLS-RPT (RFC 8460).

Role: turn one TXT string into a small frozen value, or raise TagRecordError saying
what a receiver would find wrong with it. Pure functions, no I/O.

Trusts: nothing; the text is DNS data.
Never: guess. A record a receiver would ignore is an error here, with the reason.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass


class TagRecordError(ValueError):
    pass


def parse_tags(text: str) -> list[tuple[str, str]]:
    """'v=DMARC1; p=reject' -> [('v', 'DMARC1'), ('p', 'reject')] (RFC 6376 3.2 tag-list)."""
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    for part in text.split(";"):
        part = part.strip()
        if not part:
            continue
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or not re.match(r"^[A-Za-z][A-Za-z0-9_]*$", name):
            raise TagRecordError(f"{part!r} is not tag=value")
        if name.lower() in seen:  # RFC 6376 3.2: a duplicate tag makes the list invalid
            raise TagRecordError(f"tag {name}= appears twice")
        seen.add(name.lower())
        out.append((name.lower(), value.strip()))
    return out


def _first_is(tags: list[tuple[str, str]], tag: str, value: str) -> None:
    if not tags or tags[0][0] != tag or tags[0][1] != value:
        raise TagRecordError(f"does not start with {tag}={value}")


# ---------------------------------------------------------------------------
# DMARC, RFC 7489 6.3 / 6.4


@dataclass(frozen=True)
class DmarcRecord:
    policy: str  # none | quarantine | reject
    subdomain_policy: str
    pct: int
    rua: tuple[str, ...]
    ruf: tuple[str, ...]
    adkim: str
    aspf: str

    def summary(self) -> str:
        parts = [f"p={self.policy}"]
        if self.subdomain_policy != self.policy:
            parts.append(f"sp={self.subdomain_policy}")
        if self.pct != 100:
            parts.append(f"pct={self.pct}")
        if self.adkim == "s" or self.aspf == "s":
            parts.append(f"adkim={self.adkim} aspf={self.aspf}")
        parts.append("reports to " + ", ".join(self.rua) if self.rua else "no aggregate reports (rua)")
        return ", ".join(parts)


_DMARC_POLICIES = ("none", "quarantine", "reject")


def is_dmarc(text: str) -> bool:
    return bool(re.match(r"^\s*v\s*=\s*DMARC1\s*(;|$)", text))


def parse_dmarc(text: str) -> DmarcRecord:
    tags = parse_tags(text)
    _first_is(tags, "v", "DMARC1")  # RFC 7489 6.4: v first, exactly DMARC1
    t = dict(tags)
    policy = t.get("p", "").lower()
    if policy not in _DMARC_POLICIES:  # RFC 7489 6.3: p is required
        raise TagRecordError("p= is missing" if "p" not in t else f"p={t['p']} is not none, quarantine or reject")
    sp = t.get("sp", policy).lower()
    if sp not in _DMARC_POLICIES:
        raise TagRecordError(f"sp={t['sp']} is not none, quarantine or reject")
    pct_text = t.get("pct", "100")
    if not pct_text.isdigit() or int(pct_text) > 100:
        raise TagRecordError(f"pct={pct_text} is not 0..100")
    for tag in ("adkim", "aspf"):
        if t.get(tag, "r").lower() not in ("r", "s"):
            raise TagRecordError(f"{tag}={t[tag]} is not r or s")

    def uris(tag: str) -> tuple[str, ...]:
        return tuple(u.strip() for u in t.get(tag, "").split(",") if u.strip())

    for uri in uris("rua") + uris("ruf"):
        if not re.match(r"^[a-z][a-z0-9+.-]*:", uri, re.I):
            raise TagRecordError(f"{uri!r} is not a URI (write mailto:dmarc@example.com)")
    return DmarcRecord(
        policy, sp, int(pct_text), uris("rua"), uris("ruf"), t.get("adkim", "r").lower(), t.get("aspf", "r").lower()
    )


# ---------------------------------------------------------------------------
# DKIM key records, RFC 6376 3.6.1 (and RFC 8463 for ed25519)


@dataclass(frozen=True)
class DkimKeyRecord:
    key_type: str  # rsa | ed25519
    public_key: bytes  # p= decoded; b"" means revoked (RFC 6376 3.6.1)
    testing: bool  # t=y


def parse_dkim_key(text: str) -> DkimKeyRecord:
    tags = parse_tags(text)
    t = dict(tags)
    if "v" in t:
        _first_is(tags, "v", "DKIM1")  # RFC 6376 3.6.1: if present, first and DKIM1
    if "p" not in t:
        raise TagRecordError("p= (the public key) is missing")
    key_type = t.get("k", "rsa").lower()
    if key_type not in ("rsa", "ed25519"):
        raise TagRecordError(f"k={key_type} is not a key type receivers know (rsa, ed25519)")
    try:
        key = base64.b64decode(re.sub(r"\s+", "", t["p"]), validate=True)
    except (binascii.Error, ValueError):
        raise TagRecordError("p= is not base64") from None
    flags = [f.strip() for f in t.get("t", "").split(":")]
    return DkimKeyRecord(key_type, key, "y" in flags)


# ---------------------------------------------------------------------------
# MTA-STS, RFC 8461 3.1 and TLS-RPT, RFC 8460 3


@dataclass(frozen=True)
class MtaStsRecord:
    policy_id: str


def parse_mta_sts(text: str) -> MtaStsRecord:
    tags = parse_tags(text)
    _first_is(tags, "v", "STSv1")
    policy_id = dict(tags).get("id", "")
    if not re.match(r"^[A-Za-z0-9]{1,32}$", policy_id):  # RFC 8461 3.1: sts-id = 1*32(ALPHA / DIGIT)
        raise TagRecordError("id= is missing" if not policy_id else f"id={policy_id} is not 1-32 letters and digits")
    return MtaStsRecord(policy_id)


@dataclass(frozen=True)
class TlsRptRecord:
    rua: tuple[str, ...]


def parse_tls_rpt(text: str) -> TlsRptRecord:
    tags = parse_tags(text)
    _first_is(tags, "v", "TLSRPTv1")
    rua = tuple(u.strip() for u in dict(tags).get("rua", "").split(",") if u.strip())
    if not rua:
        raise TagRecordError("rua= (where reports go) is missing")
    for uri in rua:
        if not re.match(r"^(mailto:[^@\s]+@[^@\s]+|https://\S+)$", uri, re.I):  # RFC 8460 3
            raise TagRecordError(f"{uri!r} is neither mailto: nor https:")
    return TlsRptRecord(rua)
