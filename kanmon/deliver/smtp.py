"""The SMTP delivery agent: one message's recipients to one destination, over SMTP.

Role: given the ordered server list of a destination (a `[[domain]] deliver = "relay"`
servers list, the smarthost list, or the MX result of kanmon.deliver.mx), try the servers
in order within ONE attempt and return one RecipientResult per recipient:

- a server that cannot be reached, refuses (4xx/5xx greeting or EHLO), cannot give the
  TLS the policy asks for, answers 4xx to MAIL FROM, or drops the connection before the
  final dot -> the next address / the next server;
- once a server has taken the transaction, its per-recipient answers are final for this
  attempt: 2xx SENT, 4xx DEFERRED, 5xx BOUNCED;
- a connection lost after the final dot -> DEFERRED without trying another server (the
  message may have arrived; a duplicate later is better than two now);
- every server failed -> every recipient DEFERRED with the last reason
  (`Connection refused by 192.0.2.7`, or the server's `451 4.3.0 ...`).

Sessions are reused through kanmon.deliver.scache (bounded by [outbound]
max_per_destination and the connection_cache_* keys): a cached session that the server
closed while idle (EOF, 421, a broken pipe) is dropped and the message goes over a fresh
session to the same server in the same attempt, as if nothing had happened — no failed
try is recorded. Each TLS session and each failed try is written to the event log as a
typed event (kanmon.records.events) through `emit(event, queue_id)`; the queue manager
records the delivery results (`to=<..>, stat=` lines), one per delivery whether its
session was new or reused.

Trusts: the queue manager's envelope (spooled by us; it travels whole, SMTPUTF8 flag
included); the server list from config or DNS. Never: give up on a recipient because of
a temporary problem (that is the queue's decision), send one message to two servers in
one attempt after one may have taken it, or raise for a network problem — every such
problem becomes a RecipientResult.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kanmon.deliver.mx import MxResolver, NextHop
from kanmon.deliver.scache import CacheLimits, SessionCache, SessionKey
from kanmon.deliver.tlspolicy import Destination, Requirement, TransportSecurity
from kanmon.model import Envelope, LocalReply, RecipientResult, Reply, SmtpError, Status, describe_reply
from kanmon.records.events import DomainFailed, Event, HopFailed, HopUnresolved, TlsClient
from kanmon.smtp.client import (
    TLS_POLICIES,
    ClientSettings,
    ConnectionLost,
    DsnParams,
    SmtpClientError,
    SmtpConnection,
    TlsUnavailable,
    check_address,
)

if TYPE_CHECKING:
    from kanmon.clock import ManualClock, SystemClock
    from kanmon.config import Config, TlsPolicy
    from kanmon.dnscache import DnsCache

MAILER = "esmtp"

Emit = Callable[[Event, "str | None"], Any]
# on_server_used(destination, used, failed): after a watched attempt (relay/smarthost
# routes) a server took the transaction; used is its relay text, failed the (relay,
# reason) pairs tried before it in this attempt (empty: the first server answered).
ServerUsed = Callable[[str, str, "list[tuple[str, str]]"], Any]

NO_SERVER_REACHED = LocalReply(451, "4.4.1", "no server could be reached")
BAD_SENDER = "Bad sender address syntax"
BAD_RECIPIENT = "Bad recipient address syntax"


def status_of(reply: Reply) -> Status:
    if reply.is_positive:
        return Status.SENT
    if reply.is_transient:
        return Status.DEFERRED
    return Status.BOUNCED


class PolicyRefused(SmtpClientError):
    """The session did not meet the destination's TLS policy (enforced): not this server."""


class SmtpDelivery:
    """The SMTP transport. One per node; `deliver` may run concurrently.

    config: server.hostname (EHLO), [outbound] timeouts, ca_file, bind_address,
    max_per_destination, connection_cache_*, mx_port, mta_sts, [[tls_policy]], [dns].
    emit: the event log, `emit(event, queue_id)` (Records.record). data_dir: where the
    MTA-STS cache and TLS reports live (None: memory only). resolver/cache/security: given
    by tests; made from config otherwise. clock: the cache's idle and reuse limits run on
    it (the node's clock; tests advance a ManualClock). idle_timeout: overrides [outbound]
    connection_cache_time (0: no session is cached).
    """

    def __init__(
        self,
        config: Config,
        emit: Emit,
        *,
        resolver: MxResolver | None = None,
        cache: SessionCache | None = None,
        idle_timeout: float | None = None,
        data_dir: Path | None = None,
        security: TransportSecurity | None = None,
        dns_cache: DnsCache | None = None,
        clock: SystemClock | ManualClock | None = None,
    ):
        self.emit = emit
        self.on_server_used: ServerUsed | None = None  # failover alerts (kanmon.alerts)
        self.settings = ClientSettings.from_config(config)
        self.resolver = resolver or MxResolver.from_config(config, cache=dns_cache)
        if cache is None:
            limits = CacheLimits.from_config(config)
            if idle_timeout is not None:
                limits = replace(limits, enabled=idle_timeout > 0, idle=idle_timeout if idle_timeout > 0 else limits.idle)
            cache = SessionCache(self.settings, limits, clock=clock)
        self.cache = cache
        # MX delivery only: MTA-STS, DANE, the [[tls_policy]] table, TLS-RPT counting.
        self.security = security or TransportSecurity(config, self.resolver, emit, data_dir=data_dir)

    async def close(self) -> None:
        """Close the cached sessions (QUIT), write the TLS reports. Call at shutdown."""
        await self.cache.close()
        await self.security.close()

    def flush_sessions(self, *, retire: bool = False) -> None:
        """Close the cached idle sessions now (a reload: later messages open new ones).
        retire: this agent is being replaced; sessions still in use are closed when done."""
        self.cache.flush_nowait(retire=retire)

    # -- resolution

    async def resolve(self, domain: str) -> list[NextHop]:
        """A domain's MX hosts (kanmon.deliver.mx). Raises SmtpError: 5xx bounce, 4xx defer."""
        return await self.resolver.resolve_domain(domain)

    async def deliver_route(
        self, queue_id: str, env: Envelope, rcpts: list[str], body: bytes, route: Any
    ) -> list[RecipientResult]:
        """Adapter for a kanmon.routing.Route (transport, domain, hops, tls).

        env: the message's envelope, whole (its sender and its SMTPUTF8 flag); rcpts: the
        recipients this route takes. transport "mx": resolve route.domain (a DNS error
        applies to every recipient); otherwise route.hops are the configured servers in order.
        """
        if route.transport == "mx":
            try:
                hops = await self.resolve(route.domain)
            except SmtpError as e:
                self.emit(DomainFailed(route.domain, describe_reply(e.reply)), queue_id)
                return [RecipientResult(r, status_of(e.reply), e.reply, "", MAILER) for r in rcpts]
            dest = await self.security.destination(route.domain, queue_id)
        else:
            hops = [NextHop.from_endpoint(tuple(h)) for h in route.hops]
            return await self.deliver(queue_id, env.mail_from, rcpts, body, hops, route.tls,
                                      smtputf8=env.smtputf8, watch=True, dsn=DsnParams.of(env))
        return await self.deliver(queue_id, env.mail_from, rcpts, body, hops, route.tls, smtputf8=env.smtputf8,
                                  dsn=DsnParams.of(env), dest=dest)

    # -- delivery

    async def deliver(
        self,
        queue_id: str,
        mail_from: str,
        rcpts: list[str],
        body: bytes,
        hops: Sequence[NextHop],
        tls: TlsPolicy,
        *,
        smtputf8: bool = False,
        watch: bool = False,
        dsn: DsnParams | None = None,
        dest: Destination | None = None,
    ) -> list[RecipientResult]:
        """One attempt for these recipients over the servers in `hops`, in order.

        watch: tell on_server_used which server took it (configured relay/smarthost lists).
        dsn: the sender's RFC 3461 parameters, passed on to a server that offers DSN (its
        results then say dsn_passed: further notices are that server's job).
        dest: MX delivery's transport security decision (kanmon.deliver.tlspolicy): each
        server's TLS requirement replaces `tls`, and new sessions are counted for TLS-RPT.

        Returns one RecipientResult per recipient, in the order of `rcpts`. Raises only
        ValueError for a programming error (no hops, unknown TLS policy).
        """
        if tls not in TLS_POLICIES:
            raise ValueError(f"unknown TLS policy {tls!r} (one of {', '.join(TLS_POLICIES)})")
        if not hops:
            raise ValueError("deliver needs at least one next hop")
        hops = [h if isinstance(h, NextHop) else NextHop.from_endpoint(tuple(h)) for h in hops]
        results: dict[str, RecipientResult] = {}
        try:
            check_address(mail_from)
        except ValueError:
            reply = LocalReply(550, "5.1.7", BAD_SENDER)
            return [RecipientResult(r, Status.BOUNCED, reply, "", MAILER) for r in rcpts]
        pending: list[str] = []
        for r in rcpts:
            try:
                check_address(r)
                if not r:
                    raise ValueError("empty recipient")
            except ValueError:
                results[r] = RecipientResult(r, Status.BOUNCED, LocalReply(550, "5.1.3", BAD_RECIPIENT), "", MAILER)
                continue
            if r not in pending:
                pending.append(r)

        last: Reply = NO_SERVER_REACHED
        last_relay = ""
        failed: list[tuple[str, str]] = []
        for index, hop in enumerate(hops):
            if not pending:
                break
            try:
                hop = await self.resolver.resolve_hop(hop)
            except SmtpError as e:
                last = LocalReply(451, "4.4.3", e.reply.text)
                last_relay = ""
                failed.append((hop.host, e.reply.text))
                self.emit(HopUnresolved(hop.host, e.reply.text, self._next_note(index, len(hops))), queue_id)
                continue
            req: Requirement | None = None
            if dest is not None:
                req = await self.security.requirement(dest, hop)
                if req.unavailable:
                    address = hop.addresses[0] if hop.addresses else ""
                    self.security.session(dest, req, hop, address, (req.unavailable_type, req.unavailable), queue_id)
                    if req.enforce:
                        last, last_relay = LocalReply(451, "4.7.5", req.unavailable), ""
                        failed.append((hop.host, req.unavailable))
                        continue
            for n, address in enumerate(hop.addresses):
                if not pending:
                    break
                relay = hop.relay_text(address)
                more = index < len(hops) - 1 or n < len(hop.addresses) - 1
                outcome = await self._try_server(queue_id, hop, address, relay, mail_from, pending, body, tls, smtputf8,
                                                 dsn, dest, req)
                if isinstance(outcome, dict):
                    results.update(outcome)
                    pending = []
                    if watch and self.on_server_used is not None:
                        destination = ", ".join(f"{h.host}:{h.port}" for h in hops)
                        self.on_server_used(destination, relay, failed)
                    break
                error, final = outcome
                last, last_relay = error, relay
                failed.append((relay, describe_reply(error)))
                if final:
                    more = False
                self.emit(HopFailed(relay, describe_reply(error), more), queue_id)
                if final:
                    for r in pending:
                        results[r] = RecipientResult(r, Status.DEFERRED, error, relay, MAILER)
                    pending = []
        for r in pending:
            results[r] = RecipientResult(r, Status.DEFERRED, last, last_relay, MAILER)
        return [results[r] for r in rcpts]

    @staticmethod
    def _next_note(index: int, count: int) -> str:
        return "; trying next server" if index < count - 1 else ""

    async def _try_server(
        self,
        queue_id: str,
        hop: NextHop,
        address: str,
        relay: str,
        mail_from: str,
        rcpts: list[str],
        body: bytes,
        tls: TlsPolicy,
        smtputf8: bool,
        dsn: DsnParams | None = None,
        dest: Destination | None = None,
        req: Requirement | None = None,
    ) -> dict[str, RecipientResult] | tuple[Reply, bool]:
        """Results for every recipient, or (reason, final) when this server did not take it.

        final: the connection was lost after the final dot; do not try another server.
        """
        key = self._session_key(hop, address, req.connect if req is not None else tls, dest, req)
        fresh = False
        while True:
            lease = self.cache.session(key, fresh=fresh)
            first_transaction = -1  # the session's transaction count before this delivery's first
            try:
                async with lease as conn:
                    first_transaction = conn.transactions
                    if not lease.reused:
                        self._log_session(queue_id, conn, hop)
                    if dest is not None and req is not None:
                        failure = req.check(conn.tls, hop.host)
                        if not lease.reused:
                            self.security.session(dest, req, hop, address, failure, queue_id,
                                                  encrypted=conn.tls is not None)
                        if failure is not None and req.enforce:
                            raise PolicyRefused(LocalReply(451, "4.7.5", failure[1]))
                    tls_text = conn.tls.describe() if conn.tls else ""
                    passed = dsn is not None and conn.supports("DSN")
                    results = await self._transactions(conn, mail_from, rcpts, body, smtputf8, dsn)
            except ConnectionLost as e:
                if lease.reused and e.try_next and not fresh and conn.transactions == first_transaction + 1:
                    # The cached session died under us (or refused its RSET) in this delivery's
                    # first transaction, before its final dot: nothing of it was delivered.
                    self.cache.dropped += 1
                    fresh = True
                    continue
                return e.reply, not e.try_next
            except TlsUnavailable as e:
                if dest is not None and req is not None and req.strict:
                    result = "starttls-not-supported" if e.reply.enhanced == "4.7.4" else "validation-failure"
                    self.security.session(dest, req, hop, address, (result, e.reply.text), queue_id)
                    return LocalReply(451, e.reply.enhanced or "4.7.5", f"{e.reply.text} ({req.description})"), False
                return e.reply, False
            except SmtpClientError as e:
                return e.reply, False
            if isinstance(results, Reply):
                if lease.reused and results.code == 421 and not fresh:
                    fresh = True  # 421 to MAIL: the server was closing the cached session
                    continue
                return results, False
            return {r: RecipientResult(r, status_of(reply), reply, relay, MAILER, tls_text, passed)
                    for r, reply in results}

    def _session_key(
        self, hop: NextHop, address: str, policy: str, dest: Destination | None, req: Requirement | None
    ) -> SessionKey:
        """Everything that makes a session different (kanmon.deliver.scache)."""
        security = ""
        if dest is not None and req is not None:
            # The policy domain too: TLS-RPT counts each new session under one domain's policy.
            security = f"{dest.domain}|{req.source}|{req.description}|{'enforce' if req.enforce else 'report'}"
        return SessionKey(address, hop.port, hop.host, policy, security, self.settings.hostname,
                          self.settings.bind_address or "")

    async def _transactions(
        self, conn: SmtpConnection, mail_from: str, rcpts: list[str], body: bytes, smtputf8: bool,
        dsn: DsnParams | None = None,
    ) -> list[tuple[str, Reply]] | Reply:
        """Send the message; more transactions for recipients refused with 452 (too many
        recipients, RFC 5321 4.5.3.1.10) as long as each one makes progress.

        Returns per-recipient replies, or the MAIL FROM reply when it was 4xx (the caller
        tries another server).
        """
        final: dict[str, Reply] = {}
        remaining = list(rcpts)
        while remaining:
            result = await conn.send_message(mail_from, remaining, body, smtputf8=smtputf8, dsn=dsn)
            if result.mail_reply is not None and result.mail_reply.is_transient and not final:
                return result.mail_reply
            final.update(result.replies)
            accepted = any(rr.code in (250, 251) for _, rr in result.rcpt_replies)
            delivered = result.data_reply is not None and result.data_reply.is_positive
            again = [r for r, rr in result.rcpt_replies if rr.code == 452]
            if not (accepted and delivered and again):
                break
            remaining = again
        return [(r, final[r]) for r in rcpts]

    def _log_session(self, queue_id: str, conn: SmtpConnection, hop: NextHop) -> None:
        if conn.tls is not None:
            t = conn.tls
            self.emit(TlsClient(hop.tls_relay, t.version, t.verify, t.cipher, t.bits, t.alg_bits), queue_id)
        elif conn.tls_note and "does not offer" not in conn.tls_note:
            self.emit(TlsClient(hop.tls_relay, note=conn.tls_note), queue_id)


__all__ = ["MAILER", "SmtpDelivery", "status_of"]
