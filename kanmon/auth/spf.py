"""SPF (RFC 7208): the MAIL FROM and HELO identities evaluated with pyspf, and Received-SPF.

Role: evaluate_spf(ip, sender, helo, lookup) runs pyspf, the reference implementation,
for the HELO identity (when the name is a domain) and the MAIL FROM identity (the HELO
identity again for the null sender, RFC 7208 2.4). pyspf never queries DNS itself: its
one DNS method is replaced per query object by one that asks the `lookup` it is given
(kanmon.auth.lookup): its module-level resolver is never called and never patched. The
limits of RFC 7208 4.6.4 are pyspf's: at most 10 terms that cause DNS queries (strict
mode: a permerror past 10) and at most 2 void lookups (kept by our dns method below).

Trusts: nothing in the records (DNS data) or the identities (from the client).
Never: do I/O; raise for anything the records say (a bad record is a permerror).
"""

from __future__ import annotations

from dataclasses import dataclass

import spf as pyspf

from kanmon.auth.lookup import NODATA, NXDOMAIN, OK, TEMPFAIL, Lookup, LookupAnswer, NeedLookup, txt_strings
from kanmon.auth.values import comment, value

RESULTS = ("pass", "fail", "softfail", "neutral", "none", "permerror", "temperror")


@dataclass(frozen=True, slots=True)
class SpfOutcome:
    """One identity's SPF result."""

    result: str  # pass | fail | softfail | neutral | none | permerror | temperror
    identity: str  # mailfrom | helo
    domain: str  # the domain whose record was evaluated ("" when there is none to ask)
    explanation: str = ""


@dataclass(frozen=True, slots=True)
class SpfResult:
    """What SPF says about a transaction: the identity that decides (MAIL FROM, or HELO for
    the null sender) and the HELO identity on its own (None when HELO is not a domain)."""

    mailfrom: SpfOutcome
    helo: SpfOutcome | None
    sender: str  # the envelope sender as checked ("" for <>)
    helo_name: str
    ip: str

    @property
    def decisive(self) -> SpfOutcome:
        """The result actions apply to: MAIL FROM's, or HELO's fail when MAIL FROM does not
        pass (RFC 7208 2.3 lets a receiver act on a HELO fail, as policyd-spf does)."""
        if self.helo is not None and self.helo.result == "fail" and self.mailfrom.result != "pass":
            return self.helo
        return self.mailfrom


class _LookupQuery(pyspf.query):
    """pyspf's query, answering from a Lookup instead of the system resolver."""

    def __init__(self, *args: object, lookup: Lookup, **kwargs: object):
        self._lookup = lookup
        super().__init__(*args, **kwargs)

    def dns(self, name, qtype, cnames=None, ignore_void=False):  # noqa: ANN001, ANN201 (pyspf's signature)
        """Replaces pyspf.query.dns: the same values and void-lookup limit (RFC 7208 4.6.4)."""
        name = str(name).rstrip(".").lower()
        if not name or not all(0 < len(label) < 64 for label in name.split(".")):
            return []
        result = _values(qtype, self._lookup(name, qtype))
        if not result and not ignore_void:
            self.void_lookups += 1
            if self.void_lookups > pyspf.MAX_VOID_LOOKUPS:
                raise pyspf.PermError(f"Void lookup limit of {pyspf.MAX_VOID_LOOKUPS} exceeded")
        return result


def _values(qtype: str, ans: LookupAnswer) -> list[object]:
    """An answer in the shapes pyspf's DNSLookup returns."""
    if ans.status == TEMPFAIL:
        raise pyspf.TempError(f"DNS {ans.error or 'temporary failure'}")
    if ans.status in (NXDOMAIN, NODATA) or ans.status != OK:
        return []
    if qtype in ("TXT", "SPF"):
        return [(s,) for s in txt_strings(ans)]
    out: list[object] = []
    for rd in ans.records:
        if qtype == "MX":
            pref, _, exchange = rd.partition(" ")
            out.append((int(pref), exchange.rstrip(".")))
        elif qtype == "PTR":
            out.append(rd.rstrip("."))
        else:
            out.append(rd)
    return out


def _evaluate(ip: str, sender: str, helo: str, lookup: Lookup, identity: str) -> SpfOutcome:
    try:
        q = _LookupQuery(i=ip, s=sender, h=helo, lookup=lookup, strict=True)
        domain = q.d or ""
        if not domain or domain.startswith("["):
            return SpfOutcome("none", identity, "", "no domain to check")
        result, _code, explanation = q.check()
    except NeedLookup:
        raise
    except Exception as e:  # noqa: BLE001 - pyspf on hostile input: a result, never a crash
        return SpfOutcome("permerror", identity, sender.rpartition("@")[2] or helo, f"cannot evaluate: {type(e).__name__}")
    if result not in RESULTS:  # pyspf's "ambiguous" (harsh mode only) and anything else
        result = "permerror"
    return SpfOutcome(result, identity, domain, explanation)


def _is_domain(name: str) -> bool:
    return "." in name and not name.startswith("[") and all(c.isalnum() or c in ".-_" for c in name)


def evaluate_spf(ip: str, sender: str, helo: str, lookup: Lookup) -> SpfResult:
    """SPF for the HELO and MAIL FROM identities (may raise NeedLookup: see kanmon.auth.lookup)."""
    helo = helo.lower().rstrip(".")
    helo_out = _evaluate(ip, "", helo, lookup, "helo") if _is_domain(helo) else None
    if sender:
        mailfrom = _evaluate(ip, sender, helo, lookup, "mailfrom")
    elif helo_out is not None:
        mailfrom = helo_out  # RFC 7208 2.4: <> is checked as postmaster@HELO
    else:
        mailfrom = SpfOutcome("none", "helo", "", "null sender and no HELO domain")
    return SpfResult(mailfrom, helo_out, sender, helo, ip)


def received_spf(r: SpfResult, receiver: str) -> str:
    """The Received-SPF field's value (RFC 7208 9.1) for the decisive identity."""
    o = r.decisive
    what = {
        "pass": "designates", "fail": "does not designate", "softfail": "does not designate",
        "neutral": "neither permits nor denies", "none": "does not designate",
    }.get(o.result)
    who = r.sender if o.identity == "mailfrom" else f"postmaster@{r.helo_name}"
    if what is not None:
        text = f"{receiver}: domain of {who} {what} {r.ip} as permitted sender"
    else:
        text = f"{receiver}: {o.explanation}"
    parts = [f"client-ip={r.ip}", f"envelope-from={value(r.sender)}"]
    if r.helo_name:
        parts.append(f"helo={value(r.helo_name)}")
    parts += [f"receiver={receiver}", f"identity={o.identity}"]
    return f"{o.result} ({comment(text)}) " + "; ".join(parts)
