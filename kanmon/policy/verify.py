"""Recipient verification for relay domains: refuse unknown recipients at RCPT.

Role: for a `[[domain]]` with `deliver = "relay"`, decide at RCPT whether the recipient
exists, so that mail to an unknown address is refused (550 5.1.1) instead of accepted
and bounced later to a forged sender (backscatter; DESIGN.md promise 5).
- `verify = "list"`: the domain's mailboxes and aliases, plus the addresses of its
  optional recipients_file (re-read in refresh(), the listener's probe thread, when its
  mtime, size or inode change: no restart, never a read on the event loop).
- `verify = "callout"`: a probe to the domain's servers (MAIL FROM:<>, RCPT TO, RSET,
  QUIT; never DATA) through kanmon.smtp.client, with the domain's TLS policy. Results
  live in the shared TTL cache (namespace "verify", every receiver process sees them):
  valid for verify_positive_ttl, unknown for verify_negative_ttl; an entry used in the
  last quarter of its life is re-probed in the background. A temporary answer or an
  unreachable store is never cached; it answers 450 4.1.1, or accepts with
  verify_unreachable = "accept". At most MAX_PROBES_PER_SERVER probes run at once per
  server; RCPT waits at most PROBE_WAIT for one (then 450, while the probe goes on and
  fills the cache for the client's retry), well under a client's RCPT patience.

Trusts: the configuration; addresses parsed by kanmon.smtp.address. The store's replies
are untrusted: only their code decides, their text is cleaned before anyone sees it.
Never: send DATA to a probed server, cache a temporary result, turn a failure of the
check itself into an accept (the pipeline answers 450 by failure_reply), or read a file
or the shared state on the event loop (the state through state.submit).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path as FsPath

from kanmon.config import Config, DomainSection
from kanmon.model import Reply
from kanmon.policy.pipeline import ACCEPTED, Check, CheckResult, Context, accept, reject, tempfail
from kanmon.smtp.client import ClientSettings, ConnectionLost, SmtpClientError, clean_text, open_connection
from kanmon.state.api import CacheEntry, SharedState

CACHE_NAMESPACE = "verify"
MAX_PROBES_PER_SERVER = 4  # concurrent probes to one server, per process
PROBE_TIMEOUT = 30.0  # a whole probe (connect, greeting, EHLO, TLS, MAIL, RCPT, RSET)
PROBE_WAIT = 8.0  # RCPT waits this long for a probe, then answers 450 (the probe goes on)
REFRESH_PART = 0.25  # an entry used in the last quarter of its life is re-probed
MEMO_SECONDS = 30.0  # a result is also kept in the process this long (no await when warm)
MEMO_MAX = 20_000
MAX_BACKGROUND = 64  # background refresh probes at once, per process


def unknown_reply(address: str) -> Reply:
    return Reply(550, "5.1.1", f"<{address}>: Recipient address rejected: User unknown")


def unverified_reply(address: str, why: str) -> Reply:
    return Reply(450, "4.1.1", f"<{address}>: Recipient address rejected: unverified address: {why}")


VERIFY_FAILED = Reply(450, "4.1.1", "Recipient address rejected: address verification failed, try again later")

VALID, UNKNOWN, TEMPFAIL, UNREACHABLE = "valid", "unknown", "tempfail", "unreachable"


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """What a probe found. status: valid (RCPT 2xx), unknown (RCPT 5xx), tempfail (RCPT
    4xx) or unreachable (no server answered, MAIL refused, timeout). reply: the server's
    reply (cleaned) or why there was none; server: host:port that answered ("" none)."""

    status: str
    reply: str
    server: str = ""
    when: float = 0.0  # epoch seconds of the probe

    def encode(self) -> str:
        return json.dumps({"status": self.status, "reply": self.reply, "server": self.server, "when": self.when},
                          separators=(",", ":"))

    @classmethod
    def decode(cls, text: str) -> ProbeResult | None:
        """The stored result, or None for a value that is not one (it is then probed anew)."""
        try:
            d = json.loads(text)
            if d["status"] not in (VALID, UNKNOWN):
                return None
            return cls(str(d["status"]), str(d["reply"]), str(d.get("server", "")), float(d.get("when", 0.0)))
        except (ValueError, KeyError, TypeError):
            return None


@dataclass(frozen=True, slots=True)
class Explanation:
    """What the relay would answer to RCPT TO:<address>, and why (for `kanmon verify`)."""

    address: str
    reply: Reply | None  # None: accepted (250)
    source: str  # "none", "list", "file", "cache", "probe", "policy"
    why: str
    probe: ProbeResult | None = None
    cached: CacheEntry | None = None


class RecipientList:
    """verify = "list": the valid local parts of one domain, and its recipients_file.

    reload_if_changed() is blocking (stat, read): the listener's probe thread runs it,
    and it swaps in a new frozenset, so the event loop only ever reads a complete one."""

    def __init__(self, domain: DomainSection):
        self.domain = domain.name
        self.local_parts = frozenset(lp.lower() for lp in domain.mailboxes) | frozenset(
            a.lower() for a in domain.aliases)
        self.path = domain.recipients_file
        self.addresses: frozenset[str] = frozenset()
        self._signature: tuple[int, int, int] | None = None
        self.error = ""  # the last read failure (the previous list stays in use)
        if self.path is not None:
            st = self._stat()
            if st is None:
                raise ValueError(f"domain {domain.name}: recipients_file {str(self.path)!r}: {self.error}")
            self._load(st)

    def _stat(self) -> os.stat_result | None:
        assert self.path is not None
        try:
            return os.stat(self.path)
        except OSError as e:
            self.error = e.strerror or str(e)
            return None

    def _load(self, st: os.stat_result) -> None:
        assert self.path is not None
        try:
            text = FsPath(self.path).read_text("utf-8", errors="replace")
        except OSError as e:
            self.error = e.strerror or str(e)
            return
        out = set()
        for line in text.splitlines():
            line = line.split("#", 1)[0].strip().lower()
            if not line:
                continue
            if "@" not in line:
                line = f"{line}@{self.domain}"  # a bare local part means one of this domain
            out.add(line)
        self.addresses = frozenset(out)
        self._signature = (st.st_mtime_ns, st.st_size, st.st_ino)
        self.error = ""

    def reload_if_changed(self) -> bool:
        """Re-read the file if it changed; True when it did."""
        if self.path is None:
            return False
        st = self._stat()
        if st is None or (st.st_mtime_ns, st.st_size, st.st_ino) == self._signature:
            return False
        self._load(st)
        return True

    def knows(self, local: str, address: str) -> str:
        """Where address is found ("list", "file") or ""."""
        if local in self.local_parts:
            return "list"
        if address in self.addresses:
            return "file"
        return ""


class ServerLimits:
    """A semaphore per server: at most `limit` probes at once to each."""

    def __init__(self, limit: int = MAX_PROBES_PER_SERVER):
        self.limit = limit
        self._sems: dict[tuple[str, int], asyncio.Semaphore] = {}

    def __getitem__(self, server: tuple[str, int]) -> asyncio.Semaphore:
        sem = self._sems.get(server)
        if sem is None:
            sem = self._sems[server] = asyncio.Semaphore(self.limit)
        return sem


async def probe_recipient(
    address: str, domain: DomainSection, settings: ClientSettings, limits: ServerLimits, *,
    mail_from: str = "", now: Callable[[], float] = time.time,
) -> ProbeResult:
    """Ask the domain's servers, in order, whether they take RCPT TO:<address>.
    The first server that answers RCPT decides; one that cannot be reached (or refuses
    the session or MAIL) passes the question to the next. Never raises for the network."""
    last = ProbeResult(UNREACHABLE, "no server configured", "", now())
    for host, port in domain.servers:
        server = f"{host}:{port}"
        async with limits[(host, port)]:
            try:
                conn = await open_connection(host, port, server_name=host, policy=domain.tls, settings=settings)
            except SmtpClientError as e:
                last = ProbeResult(UNREACHABLE, clean_text(str(e.reply)), server, now())
                continue
            try:
                mail_reply, rcpt_reply = await conn.probe_recipient(mail_from, address)
            except ConnectionLost as e:
                last = ProbeResult(UNREACHABLE, clean_text(str(e.reply)), server, now())
                continue
            finally:
                await conn.quit()
        if rcpt_reply is None:
            last = ProbeResult(UNREACHABLE, f"MAIL FROM refused: {clean_text(str(mail_reply))}", server, now())
            continue
        text = clean_text(str(rcpt_reply))
        if rcpt_reply.code in (250, 251):
            return ProbeResult(VALID, text, server, now())
        if rcpt_reply.is_permanent:
            return ProbeResult(UNKNOWN, text, server, now())
        return ProbeResult(TEMPFAIL, text, server, now())
    return last


class RecipientVerifyCheck(Check):
    """RCPT: the recipient of a relay domain with verify = list | callout must exist."""

    name = "verify"
    timeout = PROBE_WAIT + 4.0  # the hook itself answers within PROBE_WAIT (+ the cache's I/O)
    failure_reply = VERIFY_FAILED

    def __init__(
        self, config: Config, *, state: SharedState | None = None, clock: Callable[[], float] = time.time,
        settings: ClientSettings | None = None, probe_wait: float = PROBE_WAIT, probe_timeout: float = PROBE_TIMEOUT,
        max_probes_per_server: int = MAX_PROBES_PER_SERVER,
    ):
        self.domains: dict[str, DomainSection] = {
            d.name: d for d in config.domain if d.deliver == "relay" and d.verify != "none"}
        self.lists = {name: RecipientList(d) for name, d in self.domains.items() if d.verify == "list"}
        callout = any(d.verify == "callout" for d in self.domains.values())
        if callout and state is None:
            raise ValueError("verify = \"callout\" needs the shared state (its cache)")
        self.state = state
        self.cache = state.cache(CACHE_NAMESPACE) if state is not None else None
        self.clock = clock
        base = settings or ClientSettings.from_config(config)
        self.settings = dataclasses.replace(
            base, connect_timeout=min(base.connect_timeout, probe_timeout),
            command_timeout=min(base.command_timeout, probe_timeout))
        self.probe_wait = probe_wait
        self.timeout = probe_wait + 4.0  # the listener's bound: the hook answers within probe_wait (+ cache I/O)
        self.probe_timeout = probe_timeout
        self.limits = ServerLimits(max_probes_per_server)
        self.probes = 0  # probes started by this process (tests, stats)
        self._inflight: dict[str, asyncio.Task[ProbeResult]] = {}
        # key -> (memo until, entry, its decoded result): a warm RCPT decodes nothing
        self._memo: dict[str, tuple[float, CacheEntry, ProbeResult]] = {}

    # -- list

    def refresh(self) -> None:
        """Blocking: re-read changed recipients files (the listener's probe thread)."""
        for lst in self.lists.values():
            lst.reload_if_changed()

    # -- the hook

    def rcpt(self, ctx: Context) -> CheckResult | Awaitable[CheckResult]:
        rcpt = ctx.rcpt
        assert rcpt is not None
        domain = self.domains.get(rcpt.domain)
        if domain is None:
            return ACCEPTED
        address = rcpt.address
        key = address.lower()
        if domain.verify == "list":
            if self.lists[domain.name].knows(rcpt.local.lower(), key):
                return ACCEPTED
            return reject(unknown_reply(address))
        memo = self._memo.get(key)
        if memo is not None:
            until, entry, result = memo
            now = self.clock()
            if until > now and entry.expires > now:
                self._maybe_refresh(key, address, domain, entry, now)
                return self._answer(result, address, domain)
            del self._memo[key]
        return self._callout(key, address, domain)

    def _answer(self, result: ProbeResult, address: str, domain: DomainSection) -> CheckResult:
        if result.status == VALID:
            return ACCEPTED
        if result.status == UNKNOWN:
            return reject(unknown_reply(address))
        if domain.verify_unreachable == "accept":
            return accept()
        why = "try again later" if result.status == UNREACHABLE else "the mail store answered with a temporary error"
        return tempfail(unverified_reply(address, why))

    async def _callout(self, key: str, address: str, domain: DomainSection) -> CheckResult:
        result, _entry = await self.lookup(key, address, domain)
        return self._answer(result, address, domain)

    async def lookup(self, key: str, address: str, domain: DomainSection, *, probe: bool = False
                     ) -> tuple[ProbeResult, CacheEntry | None]:
        """The cached result (and its entry), else a probe's (waited for at most
        probe_wait: an unfinished one reads as unreachable). probe: skip the cache."""
        assert self.state is not None and self.cache is not None
        now = self.clock()
        if not probe:
            entry = await self.state.submit(self.cache.get, key, now)
            if entry is not None:
                result = ProbeResult.decode(entry.value)
                if result is not None:
                    self._remember(key, entry, result, now)
                    self._maybe_refresh(key, address, domain, entry, now)
                    return result, entry
        task = self._start_probe(key, address, domain)
        try:
            async with asyncio.timeout(self.probe_wait):
                return await asyncio.shield(task), None
        except TimeoutError:
            return ProbeResult(UNREACHABLE, f"no answer within {self.probe_wait:g} s (still probing)", "", now), None

    # -- probes and the cache

    def _start_probe(self, key: str, address: str, domain: DomainSection) -> asyncio.Task[ProbeResult]:
        task = self._inflight.get(key)
        if task is None:
            self.probes += 1
            task = asyncio.get_running_loop().create_task(self._probe_and_store(key, address, domain))
            self._inflight[key] = task
            task.add_done_callback(lambda _t, k=key: self._inflight.pop(k, None))
        return task

    async def _probe_and_store(self, key: str, address: str, domain: DomainSection) -> ProbeResult:
        try:
            async with asyncio.timeout(self.probe_timeout):
                result = await probe_recipient(address, domain, self.settings, self.limits, now=self.clock)
        except TimeoutError:
            return ProbeResult(UNREACHABLE, f"probe timed out after {self.probe_timeout:g} s", "", self.clock())
        if result.status in (VALID, UNKNOWN):
            ttl = domain.verify_positive_ttl if result.status == VALID else domain.verify_negative_ttl
            assert self.state is not None and self.cache is not None
            now = self.clock()
            try:
                await self.state.submit(self.cache.put, key, result.encode(), ttl, now)
            except Exception:  # noqa: BLE001 - the answer stands; the next RCPT probes again
                return result
            self._remember(key, CacheEntry(key, result.encode(), now, now + ttl), result, now)
        return result

    def _remember(self, key: str, entry: CacheEntry, result: ProbeResult, now: float) -> None:
        if len(self._memo) >= MEMO_MAX:
            self._memo.clear()  # rare; the shared cache still answers
        self._memo[key] = (now + MEMO_SECONDS, entry, result)

    def _maybe_refresh(self, key: str, address: str, domain: DomainSection, entry: CacheEntry, now: float) -> None:
        """An entry in the last part of its life is re-probed in the background (the
        answer stays the cached one), so a valid address never waits for a probe."""
        life = entry.expires - entry.stored
        if now < entry.expires - life * REFRESH_PART or key in self._inflight:
            return
        if len(self._inflight) >= MAX_BACKGROUND:
            return
        self._start_probe(key, address, domain)

    async def aclose(self) -> None:
        """Cancel the probes still running (tests, shutdown)."""
        tasks = list(self._inflight.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- `kanmon verify`

    async def explain(self, address: str, *, probe: bool = False) -> Explanation:
        """What RCPT TO:<address> gets from this check, and why. probe: ignore the cache."""
        local, _, domain_name = address.rpartition("@")
        domain = self.domains.get(domain_name.lower())
        if domain is None:
            return Explanation(address, None, "none", "no verification for this domain")
        key = f"{local}@{domain.name}".lower()
        if domain.verify == "list":
            where = self.lists[domain.name].knows(local.lower(), key)
            if where == "list":
                return Explanation(address, None, "list", "in the domain's mailboxes or aliases")
            if where == "file":
                return Explanation(address, None, "file", f"in {domain.recipients_file}")
            files = f" or {domain.recipients_file}" if domain.recipients_file else ""
            return Explanation(address, unknown_reply(address), "list", f"not in the domain's mailboxes, aliases{files}")
        result, entry = await self.lookup(key, address, domain, probe=probe)
        answer = self._answer(result, address, domain)
        source = "cache" if entry is not None else "probe"
        said = f"{result.server} said: {result.reply}" if result.server else result.reply
        if result.status in (TEMPFAIL, UNREACHABLE) and domain.verify_unreachable == "accept":
            said += " (verify_unreachable = \"accept\")"
        return Explanation(address, answer.reply, source, said, result, entry)
