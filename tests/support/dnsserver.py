"""A real authoritative DNS server on loopback, for tests (built with dnslib).

Role: answer DNS queries over UDP and TCP on 127.0.0.1 (or another loopback address)
from records the test gives as BIND zone text and/or a dict, so that code under test
talks to a real server through its real resolver. It runs in background threads.

Trusts: the test that configures it. Queries come from code under test and are parsed
with dnslib; a packet that does not parse is ignored.

Never: bind anything but the address it is given (default 127.0.0.1), forward a query,
or recurse. Unknown names are NXDOMAIN; it never asks another server.

API
---

    from tests.support.dnsserver import DnsServer, dns_server, txt

    with DnsServer(zone=ZONE_TEXT, records={...}) as srv:   # starts on a free port
        srv.host, srv.port            # '127.0.0.1', 53xxx (UDP and TCP, same port)
        srv.address                   # "127.0.0.1:53xxx" (the form of --server / [dns] servers)
        srv.resolver(timeout=1.0)     # a dns.resolver.Resolver aimed only at this server

        srv.set_records(zone=..., records=...)   # replace everything, while running
        srv.add_records(zone=..., records=...)   # add to what is there
        srv.servfail("mx1.example.test")          # answer SERVFAIL (optionally qtype="A")
        srv.drop("mx1.example.test", "MX")        # never answer: clients time out
        srv.clear_faults()
        srv.queries                   # [Query(name="example.test.", qtype="MX", proto="udp"), ...]

    DnsServer(..., port=5353, host="127.0.0.2") binds a given address and port.

    srv.authenticated = True      # set the AD bit on every answer (plays a validating
                                  # resolver for DANE tests; no signatures are made)

``zone`` is BIND zone text as dnslib's ``RR.fromZone`` reads it ($ORIGIN, $TTL, relative
names, ``@``). ``records`` maps a name to a list of ``"TYPE rdata"`` strings in zone
syntax, e.g.::

    {"example.test": ["MX 10 mx1.example.test.", 'TXT "v=spf1 ip4:192.0.2.1 -all"'],
     "mx1.example.test": ["A 192.0.2.1"],
     "1.2.0.192.in-addr.arpa": ["PTR mx1.example.test."],
     "null.test": ["MX 0 ."]}                     # RFC 7505 null MX

For TXT data longer than 255 octets use ``txt(text)``, which splits it into quoted
character-strings (RFC 7208 3.3): ``"TXT " + txt(long_spf)``.

Delegations: NS records at a name below a served SOA (`mail IN NS linkp1`) are a zone
cut. A query at or below it gets a referral, as from the parent's server: no AA, no
answer, the NS records in the authority section and their A/AAAA (glue) in the
additional section. Another DnsServer can play the delegated servers.

Answers: records of the asked type; for a name with a CNAME (and another type asked)
the CNAME plus, when the target is served here, the target's records (chased up to 8
times). A name that exists (or has names below it) but lacks the type: NOERROR with no
answer. Anything else: NXDOMAIN. Negative answers carry the SOA of the closest
enclosing zone when one is served. UDP answers larger than 512 octets (or the client's
EDNS size) are truncated with TC set, so the client must retry over TCP, as real servers
make it do.

The pytest fixture ``dns_server`` (import it into a test module or conftest) yields a
started, empty DnsServer and stops it afterwards; the test fills it with set_records().
"""

from __future__ import annotations

import socket
import socketserver
import struct
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import pytest
from dnslib import CLASS, EDNS0, QTYPE, RCODE, RR, DNSError, DNSLabel, DNSRecord

__all__ = ["DnsServer", "Query", "dns_server", "txt"]

_MAX_CNAME_CHASE = 8
_PLAIN_UDP_LIMIT = 512  # RFC 1035 4.2.1
_DROP_HOLD_SECONDS = 30.0  # a dropped TCP query holds its connection at most this long


def txt(text: str) -> str:
    """TXT rdata in zone syntax: text split into quoted strings of at most 255 octets."""
    data = text.encode("utf-8")
    chunks = [data[i : i + 255] for i in range(0, len(data), 255)] or [b""]
    out = []
    for chunk in chunks:
        s = chunk.decode("utf-8", "surrogateescape").replace("\\", "\\\\").replace('"', '\\"')
        out.append(f'"{s}"')
    return " ".join(out)


@dataclass(frozen=True, slots=True)
class Query:
    name: str  # lower case, with the trailing dot
    qtype: str  # "A", "MX", ...
    proto: str  # "udp" | "tcp"


def _key(name: str | DNSLabel) -> str:
    text = str(name).lower()
    return text if text.endswith(".") else text + "."


def _parse(zone: str, records: Mapping[str, Iterable[str]] | None) -> list[RR]:
    rrs: list[RR] = []
    if zone:
        rrs.extend(RR.fromZone(zone))
    for name, lines in (records or {}).items():
        for line in [lines] if isinstance(lines, str) else lines:
            rrs.extend(RR.fromZone(f"{_key(name)} 300 IN {line}"))
    return rrs


class _Zones:
    """The served data: name -> list of RRs. Swapped whole under a lock."""

    def __init__(self, rrs: list[RR]):
        self.by_name: dict[str, list[RR]] = {}
        for rr in rrs:
            self.by_name.setdefault(_key(rr.rname), []).append(rr)
        self.parents: set[str] = set()
        for name in self.by_name:
            labels = name.rstrip(".").split(".")
            for i in range(1, len(labels)):
                self.parents.add(".".join(labels[i:]) + ".")

    def exists(self, name: str) -> bool:
        return name in self.by_name or name in self.parents

    def cut_for(self, name: str) -> tuple[list[RR], list[RR]] | None:
        """A zone cut at or above name: NS records at a name below a served SOA (the
        parent's delegation, RFC 1034 4.2.1), with the glue for its servers, or None."""
        labels = name.rstrip(".").split(".")
        below_apex = False
        for i in range(len(labels) - 1, -1, -1):  # from the top down
            owner = ".".join(labels[i:]) + "."
            rrs = self.by_name.get(owner, [])
            if any(rr.rtype == QTYPE.SOA for rr in rrs):
                below_apex = True
                continue
            ns = [rr for rr in rrs if rr.rtype == QTYPE.NS]
            if below_apex and ns:
                glue = [rr for n in ns for rr in self.by_name.get(_key(n.rdata.label), [])
                        if rr.rtype in (QTYPE.A, QTYPE.AAAA)]
                return ns, glue
        return None

    def soa_for(self, name: str) -> RR | None:
        labels = name.rstrip(".").split(".")
        for i in range(len(labels)):
            for rr in self.by_name.get(".".join(labels[i:]) + ".", []):
                if rr.rtype == QTYPE.SOA:
                    return rr
        return None


class _Handler(socketserver.BaseRequestHandler):
    server: _UdpServer | _TcpServer

    def handle(self) -> None:
        owner: DnsServer = self.server.owner
        if isinstance(self.server, _TcpServer):
            sock: socket.socket = self.request
            sock.settimeout(5.0)
            try:
                while True:
                    head = _recv_exact(sock, 2)
                    if head is None:
                        return
                    (length,) = struct.unpack("!H", head)
                    data = _recv_exact(sock, length)
                    if data is None:
                        return
                    reply = owner._answer(data, "tcp")
                    if reply is None:  # dropped: hold the connection, say nothing
                        owner._stopping.wait(_DROP_HOLD_SECONDS)
                        return
                    sock.sendall(struct.pack("!H", len(reply)) + reply)
            except OSError:
                return
        else:
            data, sock = self.request
            reply = owner._answer(data, "udp")
            if reply is not None:
                try:
                    sock.sendto(reply, self.client_address)
                except OSError:
                    pass


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


class _UdpServer(socketserver.ThreadingMixIn, socketserver.UDPServer):
    daemon_threads = True
    allow_reuse_address = False
    owner: DnsServer


class _TcpServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True
    owner: DnsServer


class DnsServer:
    """An authoritative DNS server on loopback (UDP and TCP on one port). See module doc."""

    def __init__(
        self,
        zone: str = "",
        records: Mapping[str, Iterable[str]] | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
    ):
        self.host = host
        self.port = port
        self._lock = threading.Lock()
        self._zones = _Zones(_parse(zone, records))
        self._faults: dict[tuple[str, str | None], str] = {}
        self.queries: list[Query] = []
        self.authenticated = False  # AD bit on answers (a validating resolver's "secure")
        self._stopping = threading.Event()
        self._udp: _UdpServer | None = None
        self._tcp: _TcpServer | None = None
        self._threads: list[threading.Thread] = []

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> DnsServer:
        if self._udp is not None:
            return self
        last_error: OSError | None = None
        for _ in range(20):  # a free UDP port whose TCP twin is free too
            udp = _UdpServer((self.host, self.port), _Handler)
            port = udp.server_address[1]
            try:
                tcp = _TcpServer((self.host, port), _Handler)
            except OSError as e:
                udp.server_close()
                last_error = e
                if self.port:
                    raise
                continue
            break
        else:
            raise RuntimeError(f"no free port for a DNS server on {self.host}: {last_error}")
        self.port = port
        self._stopping.clear()
        for srv in (udp, tcp):
            srv.owner = self
            t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
            t.start()
            self._threads.append(t)
        self._udp, self._tcp = udp, tcp
        return self

    def stop(self) -> None:
        self._stopping.set()
        for srv in (self._udp, self._tcp):
            if srv is not None:
                srv.shutdown()
                srv.server_close()
        for t in self._threads:
            t.join()
        self._threads.clear()
        self._udp = self._tcp = None

    def __enter__(self) -> DnsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def resolver(self, timeout: float = 2.0):  # -> dns.resolver.Resolver
        """A dnspython resolver that asks only this server (never /etc/resolv.conf)."""
        import dns.resolver

        r = dns.resolver.Resolver(configure=False)
        r.nameservers = [self.host]
        r.port = self.port
        r.timeout = timeout
        r.lifetime = timeout
        return r

    # -- data and faults -----------------------------------------------------------

    def set_records(self, zone: str = "", records: Mapping[str, Iterable[str]] | None = None) -> None:
        zones = _Zones(_parse(zone, records))
        with self._lock:
            self._zones = zones

    def add_records(self, zone: str = "", records: Mapping[str, Iterable[str]] | None = None) -> None:
        new = _parse(zone, records)
        with self._lock:
            old = [rr for rrs in self._zones.by_name.values() for rr in rrs]
            self._zones = _Zones(old + new)

    def servfail(self, name: str, qtype: str | None = None) -> None:
        with self._lock:
            self._faults[(_key(name), qtype)] = "servfail"

    def drop(self, name: str, qtype: str | None = None) -> None:
        with self._lock:
            self._faults[(_key(name), qtype)] = "drop"

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    # -- answering -------------------------------------------------------------------

    def _answer(self, data: bytes, proto: str) -> bytes | None:
        try:
            request = DNSRecord.parse(data)
        except DNSError:
            return None
        qname = _key(request.q.qname)
        qtype = QTYPE.get(request.q.qtype, str(request.q.qtype))
        with self._lock:
            self.queries.append(Query(qname, qtype, proto))
            zones = self._zones
            fault = self._faults.get((qname, qtype)) or self._faults.get((qname, None))
        if fault == "drop":
            return None
        reply = request.reply(ra=0, aa=1)
        reply.header.ad = 1 if self.authenticated else 0  # reply() copies the query's flags
        edns_size = 0
        for rr in request.ar:
            if rr.rtype == QTYPE.OPT:
                edns_size = max(rr.edns_len, _PLAIN_UDP_LIMIT)
                reply.add_ar(EDNS0(udp_len=1232))
        if fault == "servfail":
            reply.header.aa = 0
            reply.header.rcode = RCODE.SERVFAIL
            return reply.pack()
        if request.q.qclass != CLASS.IN:
            reply.header.rcode = RCODE.REFUSED
            return reply.pack()

        cut = zones.cut_for(qname)
        if cut is not None:  # a referral: not authoritative, the child's servers in authority
            reply.header.aa = 0
            for rr in cut[0]:
                reply.add_auth(rr)
            for rr in cut[1]:
                reply.add_ar(rr)
            return reply.pack()

        name = qname
        answered = False
        for _ in range(_MAX_CNAME_CHASE):
            rrs = zones.by_name.get(name, [])
            matching = [rr for rr in rrs if rr.rtype == request.q.qtype or request.q.qtype == QTYPE.ANY]
            if matching:
                for rr in matching:
                    reply.add_answer(rr)
                answered = True
                break
            cnames = [rr for rr in rrs if rr.rtype == QTYPE.CNAME]
            if cnames and request.q.qtype != QTYPE.CNAME:
                reply.add_answer(cnames[0])
                answered = True
                name = _key(cnames[0].rdata.label)
                continue
            if not answered:
                if not zones.exists(name):
                    reply.header.rcode = RCODE.NXDOMAIN
                soa = zones.soa_for(name)
                if soa is not None:
                    reply.add_auth(soa)
            break

        packed = reply.pack()
        if proto == "udp" and len(packed) > (edns_size or _PLAIN_UDP_LIMIT):
            # RFC 2181 9: TC set, the question kept, the answer left to TCP
            reply.rr, reply.auth = [], []
            reply.ar = [rr for rr in reply.ar if rr.rtype == QTYPE.OPT]
            reply.header.tc = 1
            packed = reply.pack()
        return packed


@pytest.fixture
def dns_server() -> Iterator[DnsServer]:
    """A started, empty DnsServer on 127.0.0.1; fill it with set_records()."""
    with DnsServer() as srv:
        yield srv
