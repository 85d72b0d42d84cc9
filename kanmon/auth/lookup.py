"""How the verifiers ask DNS: a synchronous lookup that answers from data or asks for more.

Role: SPF (pyspf), DKIM and ARC (dkimpy) are synchronous libraries that call a DNS
function in the middle of their work. kanmon never lets them touch the network: they get
a `Lookup`, a function (name, rdtype) -> LookupAnswer that answers from what the caller
has already fetched and raises NeedLookup for anything else. The caller (the check, on
the event loop) fetches that one name with its async, cached resolver and runs the
verifier again: a verification whose answers are all cached finishes at once, without
an await; one that needs DNS costs one re-run per missing answer (a few, bounded by
MAX_LOOKUPS).

Trusts: nothing in the answers (DNS data). Never: do I/O.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import dns.exception
import dns.rdata
import dns.rdataclass
import dns.rdatatype

MAX_LOOKUPS = 60  # distinct names one message's verification may ask (SPF alone stops at 10 terms)

OK, NXDOMAIN, NODATA, TEMPFAIL = "ok", "nxdomain", "nodata", "tempfail"


@dataclass(frozen=True, slots=True)
class LookupAnswer:
    status: str  # ok | nxdomain | nodata | tempfail
    records: tuple[str, ...] = ()  # rdata as zone text ("192.0.2.1", '"v=spf1 " "-all"')
    error: str = ""


class NeedLookup(Exception):
    """The verifier needs this answer; fetch it and run the verifier again."""

    def __init__(self, name: str, rdtype: str):
        super().__init__(f"{name}/{rdtype}")
        self.name = name
        self.rdtype = rdtype


class DnsTemporaryError(Exception):
    """A lookup failed temporarily (timeout, SERVFAIL): the result is temperror."""


Lookup = Callable[[str, str], LookupAnswer]


def txt_strings(answer: LookupAnswer) -> list[bytes]:
    """Each TXT record of an answer as its character-strings joined (RFC 7208 3.3, RFC 6376 3.6.2.2)."""
    out = []
    for text in answer.records:
        data = _txt_data(text)
        if data is not None:
            out.append(data)
    return out


@functools.lru_cache(maxsize=4096)
def _txt_data(text: str) -> bytes | None:
    """One TXT record's zone text (as the resolver gives it) as bytes; None if it does not parse.
    Cached: the same keys and policies come back with every message from a sender."""
    try:
        rd = dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.TXT, text)
    except (dns.exception.DNSException, ValueError):
        return None
    return b"".join(rd.strings)
