"""Client identity: the reverse and forward-confirmed DNS name of each client (FCrDNS),
and the profile's require_ptr check.

Role: at connect the check starts the lookup without delaying the greeting (a task;
the default profile's greet_pause runs meanwhile); the stages that need the name wait
for it: MAIL when the profile has require_ptr ("client_ptr": 450 4.7.1 Client host
rejected: cannot find your hostname, [ip]), and the end of DATA, so the Received:
header and the accept event say `name [ip]` (`unknown [ip]` when the lookup fails, as
Postfix). A name is the PTR whose A/AAAA records include the client's address.
Results are kept per address for the answers' TTL (a warm client costs no await); a
lookup that failed is retried after TEMPFAIL_TTL, so a resolver that is down delays a
client's mail once per TEMPFAIL_TTL, not at each message (require_ptr answers 450
meanwhile: never a pass).
Clients in relay_networks are not looked up (their name stays "unknown"): they are ours,
and internal addresses often have no PTR or only a slow resolver to ask.

Trusts: the resolver's typed answers (names are untrusted text: at most MAX_NAMES PTRs
are confirmed; the session prints them through its printable filter).
Never: delay the greeting, fail a message because the name is unknown (only
require_ptr refuses, and a DNS temporary failure is 450 then, never a pass), run a
lookup without a bound.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import Callable

from kanmon.config import Config
from kanmon.model import ClientInfo, Reply
from kanmon.policy.access import RelayAccess
from kanmon.policy.dns import DEFAULT_NEGATIVE_TTL, CheckResolver
from kanmon.policy.pipeline import ACCEPTED, Check, CheckResult, Context, tempfail
from kanmon.policy.profiles import client_profile

MAX_NAMES = 2  # PTR names confirmed per address
TEMPFAIL_TTL = 30.0  # a failed lookup is retried after this long, not at each message
MAX_ENTRIES = 10_000  # addresses remembered


class Identity:
    """What the lookup found: the confirmed name, or "unknown" and why."""

    __slots__ = ("name", "status")

    FOUND = "found"
    NO_PTR = "no-ptr"
    MISMATCH = "mismatch"  # a PTR whose forward lookup does not give the address back
    TEMPFAIL = "tempfail"

    def __init__(self, name: str, status: str):
        self.name = name
        self.status = status

    def __repr__(self) -> str:
        return f"Identity({self.name!r}, {self.status!r})"


def cannot_find_hostname(ip: str) -> Reply:
    return Reply(450, "4.7.1", f"Client host rejected: cannot find your hostname, [{ip}]")


def _same_address(a: str, b: str) -> bool:
    try:
        x, y = ipaddress.ip_address(a), ipaddress.ip_address(b)
    except ValueError:
        return False
    if x.version == 6 and x.ipv4_mapped is not None:
        x = x.ipv4_mapped
    if y.version == 6 and y.ipv4_mapped is not None:
        y = y.ipv4_mapped
    return x == y


def _name(client: ClientInfo, task: asyncio.Task[Identity]) -> None:
    if not task.cancelled() and task.exception() is None:  # retrieved: never "never retrieved"
        client.name = task.result().name


class ClientIdentityCheck(Check):
    """connect: start the lookup; MAIL: require_ptr; DATA: the name for the Received: header."""

    name = "client_ptr"

    def __init__(self, config: Config, resolver: CheckResolver, access: RelayAccess | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.resolver = resolver
        self.access = access or RelayAccess(config)
        self._clock = clock
        # PTR, then the names' A and AAAA together: two rounds, each bounded by [dns] timeout.
        self.lookup_bound = 2 * resolver.timeout + 0.5
        self.timeout = self.lookup_bound + 1.0  # the hooks bound their own wait below this
        self._known: dict[str, tuple[float, Identity]] = {}  # ip -> (expires, identity)
        self._running: dict[str, asyncio.Task[Identity]] = {}

    # -- hooks

    def connect(self, ctx: Context) -> CheckResult:
        client = ctx.client
        if self.access.is_relay_client(client.ip):
            return ACCEPTED
        known = self.known(client.ip)
        if known is not None:
            client.name = known.name
        else:
            try:
                self._start(client)
            except RuntimeError:
                pass  # no running event loop (a session driven by bytes): the name stays unknown
        return ACCEPTED

    def mail(self, ctx: Context):
        # The transaction's events name the client: wait for the name here (the lookup
        # started at connect is normally done by now; a warm one answers at once).
        require = client_profile(ctx, self.config).require_ptr
        return self._answer(ctx.client, self._require if require else None)

    def data(self, ctx: Context):
        return self._answer(ctx.client, None)

    def name_client(self, client: ClientInfo) -> None:
        """Before the connect event: the remembered name of a client seen recently."""
        known = self.known(client.ip) if self._known else None
        if known is not None and not self.access.is_relay_client(client.ip):
            client.name = known.name

    # -- lookups

    def known(self, ip: str) -> Identity | None:
        """The remembered identity of ip, or None."""
        hit = self._known.get(ip)
        if hit is None:
            return None
        if hit[0] <= self._clock():
            del self._known[ip]
            return None
        return hit[1]

    def _answer(self, client: ClientInfo, then: Callable[[ClientInfo, Identity], CheckResult] | None):
        if self.access.is_relay_client(client.ip):
            return ACCEPTED
        known = self.known(client.ip)
        if known is not None:
            client.name = known.name
            return then(client, known) if then is not None else ACCEPTED
        return self._wait(client, then)

    async def _wait(self, client: ClientInfo, then) -> CheckResult:
        task = self._start(client)
        try:
            async with asyncio.timeout(self.lookup_bound):
                identity = await asyncio.shield(task)
        except Exception:  # noqa: BLE001 - a timeout or a failed lookup: the name is unknown
            identity = Identity("unknown", Identity.TEMPFAIL)
        client.name = identity.name
        return then(client, identity) if then is not None else ACCEPTED

    def _require(self, client: ClientInfo, identity: Identity) -> CheckResult:
        if identity.status == Identity.FOUND:
            return ACCEPTED
        return tempfail(cannot_find_hostname(client.ip))

    def _start(self, client: ClientInfo) -> asyncio.Task[Identity]:
        """The lookup of client.ip (one per address, shared by its sessions); when it
        ends it names the client, so later events carry the name without a wait."""
        ip = client.ip
        task = self._running.get(ip)
        if task is None:
            task = self._running[ip] = asyncio.ensure_future(self.identify(ip))
            task.add_done_callback(lambda t, ip=ip: self._done(ip, t))
        task.add_done_callback(lambda t, c=client: _name(c, t))
        return task

    def _done(self, ip: str, task: asyncio.Task[Identity]) -> None:
        if self._running.get(ip) is task:
            del self._running[ip]

    async def aclose(self) -> None:
        """The listeners stopped: end the lookups still running."""
        tasks = list(self._running.values())
        self._running.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def identify(self, ip: str) -> Identity:
        """The FCrDNS name of ip (remembered for the answers' TTL; a failure for TEMPFAIL_TTL)."""
        ptr = await self.resolver.ptr(ip)
        if ptr.temporary:
            return self._remember(ip, Identity("unknown", Identity.TEMPFAIL), TEMPFAIL_TTL)
        if not ptr.ok:
            return self._remember(ip, Identity("unknown", Identity.NO_PTR), ptr.ttl or DEFAULT_NEGATIVE_TTL)
        names = [n for n in ptr.records if n][:MAX_NAMES]
        answers = await asyncio.gather(*(self.resolver.addresses(n) for n in names))
        temporary = False
        ttl = ptr.ttl
        for name, answer in zip(names, answers):
            if answer.ok and any(_same_address(ip, a) for a in answer.records):
                return self._remember(ip, Identity(name, Identity.FOUND), min(ttl, answer.ttl))
            temporary = temporary or answer.temporary
            if answer.ttl:
                ttl = min(ttl, answer.ttl)
        if temporary:
            return self._remember(ip, Identity("unknown", Identity.TEMPFAIL), TEMPFAIL_TTL)
        return self._remember(ip, Identity("unknown", Identity.MISMATCH), ttl or DEFAULT_NEGATIVE_TTL)

    def _remember(self, ip: str, identity: Identity, ttl: float) -> Identity:
        if ttl > 0:
            if ip not in self._known and len(self._known) >= MAX_ENTRIES:
                del self._known[next(iter(self._known))]  # the oldest inserted
            self._known[ip] = (self._clock() + ttl, identity)
        return identity
