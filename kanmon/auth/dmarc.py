"""DMARC (RFC 7489): the From domain, its policy record, alignment and the result.

Role: from_domains(header) reads the RFC5322.From domains; dmarc_record_names() says
which TXT records to fetch (_dmarc.<From domain>, then _dmarc.<organizational domain>);
evaluate_dmarc() combines the record with the SPF and DKIM results: pass when an SPF
pass or a DKIM pass is aligned (relaxed: same organizational domain; strict: the same
name) with the From domain, else fail, and the policy that applies (p=, or sp= for a
subdomain of the record's domain; pct= sampling makes a policy the next milder one for
the messages outside the sample, RFC 7489 6.6.4). The organizational domain comes from
the Public Suffix List bundled with the publicsuffixlist package (never downloaded at
run time).

Trusts: nothing in the records or the message. Never: do I/O.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import getaddresses

from publicsuffixlist import PublicSuffixList

from kanmon.auth.dkim import DkimSignatureResult
from kanmon.auth.lookup import NXDOMAIN, NODATA, OK, TEMPFAIL, LookupAnswer, txt_strings
from kanmon.auth.spf import SpfResult

MILDER = {"reject": "quarantine", "quarantine": "none", "none": "none"}


@functools.cache
def _psl() -> PublicSuffixList:
    return PublicSuffixList()  # its bundled copy of the list


def load_public_suffix_list() -> None:
    """Load the list now (about 0.1 s): the pipeline calls this when it is built."""
    _psl()


def organizational_domain(domain: str) -> str:
    """RFC 7489 3.2: the registrable domain (one label below the public suffix)."""
    domain = domain.lower().rstrip(".")
    return _psl().privatesuffix(domain) or domain


def aligned(a: str, b: str, mode: str) -> bool:
    a, b = a.lower().rstrip("."), b.lower().rstrip(".")
    if not a or not b:
        return False
    if mode == "s":
        return a == b
    return organizational_domain(a) == organizational_domain(b)


def _unfolded_fields(header: bytes, name: bytes) -> list[str]:
    out = []
    for m in re.finditer(rb"(?im)^" + re.escape(name) + rb"[ \t]*:((?:[^\r\n]*\r\n[ \t])*[^\r\n]*)", header):
        out.append(m.group(1).replace(b"\r\n", b"").decode("utf-8", "replace"))
    return out


@dataclass(frozen=True, slots=True)
class FromHeader:
    domains: tuple[str, ...]  # one per address found (lower case)
    fields: int  # From fields in the header

    @property
    def domain(self) -> str:
        """The single From domain, or "" (no From, several, or one without a domain)."""
        return self.domains[0] if self.fields == 1 and len(self.domains) == 1 else ""


def from_header(header: bytes) -> FromHeader:
    values = _unfolded_fields(header, b"From")
    domains = []
    for _name, addr in getaddresses(values):
        _local, at, domain = addr.rpartition("@")
        domain = domain.strip().lower().rstrip(".") if at else ""
        if domain and re.fullmatch(r"[a-z0-9.-]{1,253}", domain) and "." in domain:
            domains.append(domain)
        else:
            domains.append("")
    return FromHeader(tuple(domains), len(values))


def dmarc_record_names(from_domain: str) -> tuple[str, str]:
    """The record to ask first, and the organizational domain's to ask when that has none."""
    org = organizational_domain(from_domain)
    return f"_dmarc.{from_domain}", (f"_dmarc.{org}" if org != from_domain else "")


@dataclass(frozen=True, slots=True)
class DmarcRecord:
    p: str
    sp: str
    adkim: str  # r | s
    aspf: str
    pct: int
    domain: str  # where it was found (the From domain or its organizational domain)


def parse_record(text: bytes, domain: str) -> DmarcRecord | None:
    """RFC 7489 6.3; None when it is not a valid DMARC record."""
    try:
        s = text.decode("ascii")
    except UnicodeDecodeError:
        return None
    tags: dict[str, str] = {}
    for i, part in enumerate(s.split(";")):
        part = part.strip()
        if not part:
            continue
        k, eq, v = part.partition("=")
        k, v = k.strip().lower(), v.strip()
        if not eq:
            return None
        if i == 0 and (k != "v" or v != "DMARC1"):
            return None
        tags.setdefault(k, v)
    p = tags.get("p", "").lower()
    if p not in ("none", "quarantine", "reject"):
        # RFC 7489 6.6.3: a record without a valid p= but with rua= is p=none.
        if "rua" not in tags:
            return None
        p = "none"
    sp = tags.get("sp", "").lower()
    if sp not in ("none", "quarantine", "reject"):
        sp = p
    adkim = tags.get("adkim", "r").lower()
    aspf = tags.get("aspf", "r").lower()
    try:
        pct = min(100, max(0, int(tags.get("pct", "100"))))
    except ValueError:
        pct = 100
    return DmarcRecord(p, sp, adkim if adkim in ("r", "s") else "r", aspf if aspf in ("r", "s") else "r", pct, domain)


@dataclass(frozen=True, slots=True)
class DmarcResult:
    result: str  # pass | fail | none | temperror | permerror
    from_domain: str
    policy: str = "none"  # what to do: none | quarantine | reject (after pct)
    record: DmarcRecord | None = None
    reason: str = ""  # a comment for the header
    sampled_out: bool = False  # pct= made the policy milder for this message

    @property
    def published(self) -> str:
        """The policy the domain published for this From domain (p= or sp=)."""
        if self.record is None:
            return "none"
        return self.record.p if self.record.domain == self.from_domain else self.record.sp


def find_record(from_domain: str, answers: Callable[[str], LookupAnswer]) -> DmarcRecord | str | None:
    """The record for from_domain (answers(name) gives the TXT lookup); "temperror" when DNS
    failed; None when there is none (RFC 7489 6.6.3: several records are none too)."""
    first, org = dmarc_record_names(from_domain)
    for name in (first, org):
        if not name:
            continue
        ans = answers(name)
        if ans.status == TEMPFAIL:
            return "temperror"
        if ans.status in (NXDOMAIN, NODATA) or ans.status != OK:
            continue
        records = [t for t in txt_strings(ans) if re.match(rb"^v\s*=\s*DMARC1\s*(;|$)", t)]
        if len(records) != 1:
            continue
        rec = parse_record(records[0], name.removeprefix("_dmarc."))
        if rec is not None:
            return rec
    return None


def evaluate_dmarc(
    from_domain: str, record: DmarcRecord | str | None, spf: SpfResult | None,
    dkim: list[DkimSignatureResult], sample: float,
) -> DmarcResult:
    """The DMARC result for a single From domain. sample: a number in [0, 100) drawn for
    this message; the policy applies when it is below pct."""
    if record == "temperror":
        return DmarcResult("temperror", from_domain, reason="policy lookup failed")
    if record is None or isinstance(record, str):
        return DmarcResult("none", from_domain, reason="no policy published")
    dkim_ok = [s.domain for s in dkim if s.result == "pass" and aligned(s.domain, from_domain, record.adkim)]
    spf_ok = ""
    if spf is not None and spf.mailfrom.result == "pass" and aligned(spf.mailfrom.domain, from_domain, record.aspf):
        spf_ok = spf.mailfrom.domain
    if dkim_ok or spf_ok:
        how = f"dkim {dkim_ok[0]}" if dkim_ok else f"spf {spf_ok}"
        return DmarcResult("pass", from_domain, "none", record, f"aligned {how}")
    temporary = any(s.result == "temperror" for s in dkim) or (spf is not None and spf.mailfrom.result == "temperror")
    if temporary:
        return DmarcResult("temperror", from_domain, "none", record, "an SPF or DKIM lookup failed")
    published = record.p if record.domain == from_domain else record.sp
    if published != "none" and sample >= record.pct:
        return DmarcResult("fail", from_domain, MILDER[published], record, f"pct={record.pct}: sampled out", True)
    return DmarcResult("fail", from_domain, published, record, "no aligned SPF or DKIM pass")
