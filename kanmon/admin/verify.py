"""Recipient verification operations: what the relay would answer to RCPT, and the cache.

Role: the admin plane's side of `kanmon verify` (and later the console): explain one
address with the same check the listeners run (kanmon.policy.verify), list and flush the
verification cache shared by the receivers (data_dir/state.db, namespace "verify").
Safe while the node runs: the state database is shared by design (WAL, one transaction
per write). A running listener keeps a result in its own memory for at most
kanmon.policy.verify.MEMO_SECONDS, so a flush reaches it within that time.

Trusts: the validated config; the address from argv is parsed like a RCPT argument.
Never: create a data_dir that does not exist (nothing is cached there: an empty,
in-memory cache answers), or send DATA (probes are the check's).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from kanmon.config import Config
from kanmon.model import ClientInfo, Reply, SmtpError
from kanmon.policy.access import LocalRecipientsCheck, RelayAccess
from kanmon.policy.pipeline import Context
from kanmon.policy.verify import CACHE_NAMESPACE, PROBE_TIMEOUT, Explanation, ProbeResult, RecipientVerifyCheck
from kanmon.smtp.address import parse_path
from kanmon.smtp.replies import RELAY_DENIED
from kanmon.state.api import MemoryState, SharedState
from kanmon.state.backends import open_state, state_exists


class BadAddress(ValueError):
    """The address cannot be a recipient (the text says why)."""


@dataclass(frozen=True, slots=True)
class CachedResult:
    address: str
    status: str  # valid | unknown | "?" (a value that is not a result)
    reply: str  # what the server said
    server: str
    stored: float
    expires: float


@contextmanager
def _state(config: Config, *, create: bool) -> Iterator[SharedState | None]:
    data_dir = Path(config.server.data_dir)
    if not state_exists(config, data_dir) and not (create and data_dir.is_dir()):
        yield None
        return
    state = open_state(config, data_dir)
    try:
        yield state
    finally:
        state.close()


def explain_address(config: Config, address: str, *, probe: bool = False) -> Explanation:
    """What RCPT TO:<address> gets from an internet client, and why. A callout domain
    answers from the shared cache, else by a probe (waited for up to PROBE_TIMEOUT) whose
    final result is stored like the listener's. probe: skip the cache."""
    try:
        path = parse_path(f"<{address}>", is_sender=False, smtputf8_allowed=True)
    except SmtpError as e:
        raise BadAddress(f"{address!r} is not a recipient address ({e.reply})") from None
    access = RelayAccess(config)
    domain = access.domains.get(path.domain)
    if domain is None:
        return Explanation(path.address, RELAY_DENIED, "policy",
                           "not a domain of ours: relayed only for relay_networks and authenticated users")
    if domain.deliver == "local":
        d = LocalRecipientsCheck(access).rcpt(Context(ClientInfo(ip="192.0.2.1"), rcpt=path))
        if d.reply is None:
            return Explanation(path.address, None, "list", "a mailbox or alias of a local domain"
                               + (f" (expands to {', '.join(d.recipients)})" if d.recipients else ""))
        return Explanation(path.address, d.reply, "list", "not a mailbox or alias of this local domain")
    if domain.verify == "none":
        return Explanation(path.address, None, "none",
                           "relay domain with verify = \"none\": any recipient is accepted (unknown ones bounce later)")
    with _state(config, create=True) as state:
        check = RecipientVerifyCheck(config, state=state or MemoryState(), probe_wait=PROBE_TIMEOUT)

        async def run() -> Explanation:
            try:
                return await check.explain(path.address, probe=probe)
            finally:
                await check.aclose()

        return asyncio.run(run())


def list_cache(config: Config, prefix: str = "", *, now: float | None = None) -> list[CachedResult]:
    """The live entries of the verification cache, by address."""
    with _state(config, create=False) as state:
        if state is None:
            return []
        out = []
        for e in state.cache(CACHE_NAMESPACE).list(time.time() if now is None else now, prefix.lower()):
            r = ProbeResult.decode(e.value)
            out.append(CachedResult(e.key, r.status if r else "?", r.reply if r else e.value, r.server if r else "",
                                    e.stored, e.expires))
        return out


def flush_cache(config: Config, prefix: str = "") -> int:
    """Delete the entries whose address starts with prefix (all with ""); how many."""
    with _state(config, create=False) as state:
        if state is None:
            return 0
        return state.cache(CACHE_NAMESPACE).flush(prefix.lower())


def reply_text(reply: Reply | None) -> str:
    return "250 2.1.5 Ok" if reply is None else str(reply)
