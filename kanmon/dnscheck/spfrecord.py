"""SPF records (RFC 7208): parse one, count its DNS-querying terms, evaluate it for an IP.

Role: the SPF part of the DNS health check. Parsing and counting are ours (the check
must say *which* term is wrong and how many lookups the whole tree costs); the verdict
for an IP comes from pyspf, the reference implementation, so we report what receivers
will compute. pyspf is made to ask the same DnsSource as every other check: a query
subclass overrides its one DNS method per instance (pyspf's module-level DNSLookup,
which goes to the system resolver, is never called and never patched).

Trusts: nothing in the record; it is DNS data. Macros (RFC 7208 7) are not expanded
when counting: a term whose target holds a macro is counted once and not followed.

Never: query anything but the DnsSource it is given; raise on a bad record (a syntax
error is a result the caller reports).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

import spf

from kanmon.dnscheck.sources import UNANSWERED, Answer, DnsSource

# RFC 7208 4.6.4: at most 10 terms that cause DNS queries, across the whole tree.
MAX_DNS_TERMS = 10
_DNS_MECHANISMS = {"include", "a", "mx", "ptr", "exists"}
_MECHANISMS = {"all", "ip4", "ip6"} | _DNS_MECHANISMS
_CIDR_RE = re.compile(r"^(?P<spec>.*?)(?:/(?P<v4>\d+))?(?://(?P<v6>\d+))?$")
_VERSION_RE = re.compile(r"^v=spf1(?: |$)", re.I)  # RFC 7208 4.5


def is_spf(text: str) -> bool:
    return bool(_VERSION_RE.match(text))


class SpfSyntaxError(ValueError):
    """The record does not parse; receivers return permerror (RFC 7208 4.6)."""


@dataclass(frozen=True)
class Term:
    text: str
    name: str  # mechanism or modifier name, lower case
    qualifier: str = ""  # "+", "-", "~", "?" or "" (means "+"), mechanisms only
    target: str = ""  # domain-spec or network, as written
    is_modifier: bool = False

    @property
    def queries_dns(self) -> bool:
        return self.name in _DNS_MECHANISMS or (self.is_modifier and self.name == "redirect")


@dataclass(frozen=True)
class SpfRecord:
    text: str
    terms: tuple[Term, ...]

    def mechanisms(self, name: str) -> list[Term]:
        return [t for t in self.terms if not t.is_modifier and t.name == name]

    def modifier(self, name: str) -> Term | None:
        for t in self.terms:
            if t.is_modifier and t.name == name:
                return t
        return None


def parse_spf(text: str) -> SpfRecord:
    """Parse a v=spf1 record (RFC 7208 4.6.1, 5, 6, 12); SpfSyntaxError says what is wrong."""
    if not is_spf(text):
        raise SpfSyntaxError("does not start with v=spf1")
    terms = []
    seen_modifiers: set[str] = set()
    for word in text.split(" ")[1:]:
        if not word:
            continue
        terms.append(_parse_term(word, seen_modifiers))
    return SpfRecord(text, tuple(terms))


def _parse_term(word: str, seen_modifiers: set[str]) -> Term:
    m = re.match(r"^([A-Za-z][A-Za-z0-9_.-]*)=(.*)$", word)
    if m:  # modifier, RFC 7208 6 and 12
        name, value = m.group(1).lower(), m.group(2)
        if name in ("redirect", "exp"):
            if name in seen_modifiers:
                raise SpfSyntaxError(f"{name}= appears twice (RFC 7208 6)")
            if not value:
                raise SpfSyntaxError(f"{word!r}: {name}= needs a domain")
        seen_modifiers.add(name)
        return Term(word, name, target=value, is_modifier=True)
    qualifier = word[0] if word[0] in "+-~?" else ""
    body = word[len(qualifier) :]
    name, sep, arg = body.partition(":")
    lname = name.lower()
    slash = ""
    if not sep and "/" in name:  # "a/24", "mx//64"
        lname, _, rest = name.partition("/")
        lname = lname.lower()
        slash = "/" + rest
    if lname not in _MECHANISMS:
        raise SpfSyntaxError(f"unknown mechanism {word!r}")
    if lname == "all":
        if sep or slash:
            raise SpfSyntaxError(f"{word!r}: all takes no argument")
        return Term(word, "all", qualifier)
    if lname in ("ip4", "ip6"):
        if not arg:
            raise SpfSyntaxError(f"{word!r}: {lname} needs a network")
        try:
            net = ipaddress.ip_network(arg, strict=False)
        except ValueError:
            raise SpfSyntaxError(f"{word!r}: {arg!r} is not an IPv{lname[-1]} network") from None
        if net.version != int(lname[-1]):
            raise SpfSyntaxError(f"{word!r}: {arg!r} is not an IPv{lname[-1]} network")
        return Term(word, lname, qualifier, arg)
    if lname in ("include", "exists") and not arg:
        raise SpfSyntaxError(f"{word!r}: {lname} needs a domain")
    spec = arg
    if lname in ("a", "mx"):  # RFC 7208 5.6 dual-cidr-length
        m = _CIDR_RE.match(arg + slash)
        assert m is not None
        spec = m.group("spec")
        if m.group("v4") and int(m.group("v4")) > 32 or m.group("v6") and int(m.group("v6")) > 128:
            raise SpfSyntaxError(f"{word!r}: prefix length out of range")
    elif slash:
        raise SpfSyntaxError(f"{word!r}: {lname} takes no prefix length")
    if sep and not spec:
        raise SpfSyntaxError(f"{word!r}: empty domain after ':'")
    return Term(word, lname, qualifier, spec)


# ---------------------------------------------------------------------------
# Counting the DNS-querying terms of the whole tree (RFC 7208 4.6.4)


@dataclass
class LookupCount:
    total: int = 0
    path: list[str] = field(default_factory=list)  # "include:x (3)" ... for the text
    problems: list[str] = field(default_factory=list)  # includes with no/broken record: permerror
    unknown: list[str] = field(default_factory=list)  # could not be looked at (offline, failed)


def count_dns_terms(source: DnsSource, record: SpfRecord, domain: str) -> LookupCount:
    count = LookupCount()
    _count(source, record, domain, count, {domain.lower()}, depth=0)
    return count


def _count(source: DnsSource, record: SpfRecord, domain: str, count: LookupCount, seen: set[str], depth: int) -> None:
    has_all = bool(record.mechanisms("all"))
    for term in record.terms:
        if not term.queries_dns or (term.name == "redirect" and has_all):  # RFC 7208 6.1
            continue
        count.total += 1
        if term.name not in ("include", "redirect"):
            continue
        target = term.target.lower().rstrip(".")
        if "%" in target:
            count.unknown.append(f"{term.text} (macro, not followed)")
            continue
        if target in seen:
            count.problems.append(f"{term.text} loops back to {target}")
            continue
        if depth > 10 or count.total > 4 * MAX_DNS_TERMS:
            return
        ans = source.lookup(target, "TXT")
        if ans.status in UNANSWERED:
            count.unknown.append(f"{term.text} ({ans.error})")
            continue
        records = [t for t in ans.texts() if is_spf(t)]
        if len(records) != 1:
            what = "no SPF record" if not records else f"{len(records)} SPF records"
            count.problems.append(f"{term.text}: {target} has {what}")  # RFC 7208 5.2, 6.1
            continue
        try:
            sub = parse_spf(records[0])
        except SpfSyntaxError as e:
            count.problems.append(f"{term.text}: {target}'s record does not parse ({e})")
            continue
        before = count.total
        _count(source, sub, target, count, seen | {target}, depth + 1)
        count.path.append(f"{term.text} +{count.total - before}")


# ---------------------------------------------------------------------------
# Evaluation with pyspf, against our DnsSource


class _SourceQuery(spf.query):
    """pyspf's query, asking our DnsSource instead of the system resolver."""

    def __init__(self, *args: object, source: DnsSource, **kwargs: object):
        self._source = source
        self._answers: dict[tuple[str, str], list[object]] = {}
        super().__init__(*args, **kwargs)

    def dns(self, name, qtype, cnames=None, ignore_void=False):  # noqa: ANN001, ANN201 (pyspf's signature)
        """Replaces spf.query.dns: same results and void-lookup limit (RFC 7208 4.6.4)."""
        name = str(name).rstrip(".").lower()
        if not name or not all(0 < len(label) < 64 for label in name.split(".")):
            return []
        key = (name, qtype)
        if key not in self._answers:
            self._answers[key] = _pyspf_values(self._source.lookup(name, qtype))
        result = list(self._answers[key])
        if not result and not ignore_void:
            self.void_lookups += 1
            if self.void_lookups > spf.MAX_VOID_LOOKUPS:
                raise spf.PermError(f"Void lookup limit of {spf.MAX_VOID_LOOKUPS} exceeded")
        return result


def _pyspf_values(ans: Answer) -> list[object]:
    """Our Answer in the shapes pyspf's DNSLookup returns."""
    if ans.status in UNANSWERED:
        raise spf.TempError(f"DNS {ans.error}")
    out: list[object] = []
    for rd in ans.records:
        if ans.rdtype in ("A", "AAAA"):
            out.append(rd.address)
        elif ans.rdtype == "MX":
            out.append((rd.preference, rd.exchange.to_text(omit_final_dot=True)))
        elif ans.rdtype == "PTR":
            out.append(rd.target.to_text(omit_final_dot=True))
        elif ans.rdtype in ("TXT", "SPF"):
            out.append(tuple(rd.strings))
    return out


@dataclass(frozen=True)
class SpfVerdict:
    result: str  # pass, fail, softfail, neutral, none, permerror, temperror
    explanation: str


def evaluate(source: DnsSource, ip: str, domain: str, helo: str | None) -> SpfVerdict:
    """What a receiver computes for mail from postmaster@domain sent by ip (RFC 7208 2.4)."""
    q = _SourceQuery(i=ip, s=f"postmaster@{domain}", h=helo or domain, source=source)
    result, _code, explanation = q.check()
    return SpfVerdict(result, explanation)
