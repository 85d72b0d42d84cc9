"""MTA-STS (RFC 8461) for MX delivery: the TXT record, the HTTPS policy, the cache.

Role: for a destination domain, answer "which MTA-STS policy applies now": look up
`_mta-sts.<domain>` TXT through our resolver, fetch the policy over HTTPS from
`https://mta-sts.<domain>/.well-known/mta-sts.txt` when the cached one is missing,
expired or has another id, parse it strictly, and keep it for its max_age in a JSON
file under data_dir (so a restart keeps it). A fetch that fails leaves a still-valid
cached policy in force (RFC 8461 5.1) and is reported (a TLS-RPT result type).

Trusts: the configuration (CA file, DNS servers). Nothing from the network: TXT data
and the policy body are bounded and parsed strictly; a policy that does not parse is
no policy. The policy host's certificate must be valid for `mta-sts.<domain>` (the
system CAs or [outbound] ca_file); redirects are not followed (RFC 8461 3.3).

Never: block the event loop (the socket work is asyncio, the cache file is read and
written in a thread), connect anywhere but the addresses our resolver gave for
`mta-sts.<domain>`, or wait without a timeout.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kanmon.deliver.mx import MxResolver
from kanmon.model import SmtpError

MAX_POLICY_BYTES = 64 * 1024  # RFC 8461 3.3: senders may limit the body (64 KB suggested)
MAX_HEADER_BYTES = 16 * 1024
MAX_AGE_LIMIT = 31_557_600  # RFC 8461 3.2: max_age at most one year
TXT_RECHECK = 300.0  # seconds a TXT answer (or its absence) is believed before asking again
MAX_CACHED_DOMAINS = 10_000

_ID_RE = re.compile(r"^[A-Za-z0-9]{1,32}$")
_LABEL = r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)"
_MX_PATTERN_RE = re.compile(rf"^(?:\*\.)?{_LABEL}(?:\.{_LABEL})+\.?$")

# RFC 8460 4.3.1 result types for failures to obtain a policy
FETCH_ERROR = "sts-policy-fetch-error"
POLICY_INVALID = "sts-policy-invalid"
WEBPKI_INVALID = "sts-webpki-invalid"


class StsError(Exception):
    """A policy could not be obtained; `result_type` is the TLS-RPT name for why."""

    def __init__(self, result_type: str, text: str):
        super().__init__(text)
        self.result_type = result_type
        self.text = text


@dataclass(frozen=True, slots=True)
class StsPolicy:
    policy_id: str  # the TXT id the policy was fetched under
    mode: str  # enforce | testing | none
    mx: tuple[str, ...]
    max_age: int
    fetched: float  # wall time of the fetch

    @property
    def expires(self) -> float:
        return self.fetched + self.max_age

    def matches(self, host: str) -> bool:
        return any(mx_matches(p, host) for p in self.mx)

    def policy_strings(self) -> list[str]:
        """The policy as lines, for a TLS-RPT report's policy-string (RFC 8460 4.4)."""
        return ["version: STSv1", f"mode: {self.mode}", *(f"mx: {p}" for p in self.mx), f"max_age: {self.max_age}"]

    def as_dict(self) -> dict:
        return {"id": self.policy_id, "mode": self.mode, "mx": list(self.mx), "max_age": self.max_age,
                "fetched": self.fetched}

    @classmethod
    def from_dict(cls, d: dict) -> StsPolicy:
        """Strict: a cached entry that is not exactly what as_dict wrote raises ValueError."""
        if not isinstance(d, dict) or set(d) != {"id", "mode", "mx", "max_age", "fetched"}:
            raise ValueError("not a cached policy")
        mx = d["mx"]
        if (not isinstance(d["id"], str) or not _ID_RE.match(d["id"]) or d["mode"] not in ("enforce", "testing", "none")
                or not isinstance(mx, list) or not all(isinstance(p, str) and _MX_PATTERN_RE.match(p) for p in mx)
                or not isinstance(d["max_age"], int) or not 0 <= d["max_age"] <= MAX_AGE_LIMIT
                or not isinstance(d["fetched"], (int, float))):
            raise ValueError("not a cached policy")
        return cls(d["id"], d["mode"], tuple(p.lower().rstrip(".") for p in mx), d["max_age"], float(d["fetched"]))


def parse_txt(texts: list[str]) -> str | None:
    """The policy id of `_mta-sts` TXT strings (RFC 8461 3.1), or None: no record, more
    than one, or one that does not parse all mean "no MTA-STS policy"."""
    records = [t for t in texts if t.startswith("v=STSv1")]
    if len(records) != 1:
        return None
    fields: dict[str, str] = {}
    for part in records[0].split(";"):
        part = part.strip(" \t")
        if not part:
            continue
        key, eq, value = part.partition("=")
        if not eq or not key:
            return None
        fields.setdefault(key, value)
    if fields.get("v") != "STSv1":
        return None
    policy_id = fields.get("id", "")
    return policy_id if _ID_RE.match(policy_id) else None


def parse_policy(text: str, policy_id: str, fetched: float) -> StsPolicy:
    """The policy body (RFC 8461 3.2), strictly; raises StsError(sts-policy-invalid)."""
    lines = text.split("\n")
    fields: dict[str, str] = {}
    mx: list[str] = []
    for n, raw in enumerate(lines):
        line = raw[:-1] if raw.endswith("\r") else raw
        if not line.strip():
            continue
        key, colon, value = line.partition(":")
        key, value = key.strip(), value.strip(" \t")
        if not colon or not key or not re.fullmatch(r"[A-Za-z0-9_]{1,32}", key):
            raise StsError(POLICY_INVALID, f"line {n + 1} is not `key: value`")
        if n == 0 and key != "version":
            raise StsError(POLICY_INVALID, "the first line is not the version")
        if key == "mx":
            if not _MX_PATTERN_RE.match(value):
                raise StsError(POLICY_INVALID, f"bad mx pattern {value[:80]!r}")
            mx.append(value.lower().rstrip("."))
        else:
            fields.setdefault(key, value)  # a repeated field: the first counts; unknown keys are extensions
    if fields.get("version") != "STSv1":
        raise StsError(POLICY_INVALID, "version is not STSv1")
    mode = fields.get("mode")
    if mode not in ("enforce", "testing", "none"):
        raise StsError(POLICY_INVALID, f"mode is {mode!r}, not enforce, testing or none")
    age = fields.get("max_age", "")
    if not re.fullmatch(r"[0-9]{1,10}", age) or int(age) > MAX_AGE_LIMIT:
        raise StsError(POLICY_INVALID, f"max_age {age[:20]!r} is not 0..{MAX_AGE_LIMIT}")
    if mode != "none" and not mx:
        raise StsError(POLICY_INVALID, f"mode {mode} without any mx")
    return StsPolicy(policy_id, mode, tuple(mx), int(age), fetched)


def mx_matches(pattern: str, host: str) -> bool:
    """RFC 8461 4.1: case-insensitive; `*.example.com` stands for exactly one label."""
    pattern = pattern.lower().rstrip(".")
    host = host.lower().rstrip(".")
    if pattern.startswith("*."):
        first, dot, rest = host.partition(".")
        return bool(first) and bool(dot) and rest == pattern[2:]
    return host == pattern


# ---------------------------------------------------------------------------
# Fetching the policy over HTTPS


def policy_context(ca_file: Path | None) -> ssl.SSLContext:
    """Web PKI verification for the policy host (RFC 8461 3.3): the system CAs or ca_file."""
    ctx = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


async def fetch_policy_text(
    domain: str, resolver: MxResolver, context: ssl.SSLContext, *, port: int = 443, timeout: float = 30.0
) -> str:
    """GET https://mta-sts.<domain>/.well-known/mta-sts.txt. Raises StsError."""
    host = f"mta-sts.{domain}"
    try:
        addresses = await resolver.resolve_host(host)
    except SmtpError as e:
        raise StsError(FETCH_ERROR, f"{host}: {e.reply.text}") from None
    last = StsError(FETCH_ERROR, f"{host}: no address")
    for address in addresses:
        try:
            async with asyncio.timeout(timeout):
                return await _get(address, port, host, context)
        except StsError as e:
            if e.result_type != FETCH_ERROR:
                raise
            last = e
        except ssl.SSLCertVerificationError as e:
            raise StsError(WEBPKI_INVALID, f"{host} [{address}]: {e.verify_message or e.reason}") from None
        except (OSError, TimeoutError, ssl.SSLError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
            last = StsError(FETCH_ERROR, f"{host} [{address}]: {type(e).__name__}: {str(e)[:200]}")
    raise last


async def _get(address: str, port: int, host: str, context: ssl.SSLContext) -> str:
    reader, writer = await asyncio.open_connection(address, port, ssl=context, server_hostname=host,
                                                   limit=MAX_HEADER_BYTES)
    try:
        # HTTP/1.0: the answer is the body up to the close (no chunked encoding to decode).
        writer.write(f"GET /.well-known/mta-sts.txt HTTP/1.0\r\nHost: {host}\r\nUser-Agent: kanmon\r\n"
                     "Accept: text/plain\r\nConnection: close\r\n\r\n".encode("ascii"))
        await writer.drain()
        status = (await reader.readuntil(b"\n")).decode("latin-1").strip()
        parts = status.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
            raise StsError(FETCH_ERROR, f"{host}: not an HTTP answer")
        if parts[1] != "200":  # RFC 8461 3.3: only 200; redirects are not followed
            raise StsError(FETCH_ERROR, f"{host}: HTTP status {parts[1][:3]}")
        content_type = ""
        length: int | None = None
        size = 0
        while True:
            line = await reader.readuntil(b"\n")
            size += len(line)
            if size > MAX_HEADER_BYTES:
                raise StsError(FETCH_ERROR, f"{host}: HTTP header too long")
            if line in (b"\r\n", b"\n"):
                break
            name, _, value = line.decode("latin-1").partition(":")
            name = name.strip().lower()
            if name == "content-type":
                content_type = value.strip().lower()
            elif name == "content-length" and value.strip().isdigit():
                length = int(value.strip())
        if content_type.split(";")[0].strip() != "text/plain":
            raise StsError(POLICY_INVALID, f"{host}: Content-Type {content_type[:40]!r} is not text/plain")
        if length is not None and length > MAX_POLICY_BYTES:
            raise StsError(POLICY_INVALID, f"{host}: policy larger than {MAX_POLICY_BYTES} bytes")
        body = await reader.read(MAX_POLICY_BYTES + 1)
        while len(body) <= MAX_POLICY_BYTES:
            more = await reader.read(MAX_POLICY_BYTES + 1 - len(body))
            if not more:
                break
            body += more
        if len(body) > MAX_POLICY_BYTES:
            raise StsError(POLICY_INVALID, f"{host}: policy larger than {MAX_POLICY_BYTES} bytes")
        try:
            return body.decode("utf-8")
        except UnicodeDecodeError:
            raise StsError(POLICY_INVALID, f"{host}: policy is not UTF-8") from None
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except (OSError, ssl.SSLError):
            pass


# ---------------------------------------------------------------------------
# The cache and the decision


@dataclass(frozen=True, slots=True)
class StsLookup:
    """What applies to a domain now: a policy (or None) and a failure to report (or None)."""

    policy: StsPolicy | None
    failure: StsError | None = None


class MtaSts:
    """Policies by domain: TXT, fetch, cache. One per delivery agent.

    path: the cache file (data_dir/mta-sts/policies.json); None keeps it in memory only.
    fetch: replaces the HTTPS fetch (tests of the cache logic); https_port: tests serve
    the policy on another port than 443.
    """

    def __init__(
        self,
        resolver: MxResolver,
        *,
        path: Path | None,
        ca_file: Path | None = None,
        now: Callable[[], float],
        https_port: int = 443,
        timeout: float = 30.0,
        fetch: Callable[[str], object] | None = None,
    ):
        self.resolver = resolver
        self.path = path
        self.ca_file = ca_file
        self.now = now
        self.https_port = https_port
        self.timeout = timeout
        self._fetch_override = fetch
        self._context: ssl.SSLContext | None = None
        self._policies: dict[str, StsPolicy] = {}
        self._txt: dict[str, tuple[float, str | None]] = {}
        self._loaded = False
        self._load_lock: asyncio.Lock | None = None
        self._locks: dict[str, asyncio.Lock] = {}
        self.fetches = 0  # policy fetches started (tests, stats)

    # -- the cache file

    async def _load(self) -> None:
        if self._loaded:
            return
        if self._load_lock is None:
            self._load_lock = asyncio.Lock()
        async with self._load_lock:
            if not self._loaded and self.path is not None:
                self._policies.update(await asyncio.to_thread(load_cache, self.path))
            self._loaded = True

    async def _save(self) -> None:
        if self.path is not None:
            await asyncio.to_thread(save_cache, self.path, dict(self._policies))

    # -- the decision

    async def _txt_id(self, domain: str) -> tuple[str | None, bool]:
        """(policy id or None, answered). answered False: DNS failed (keep the cache)."""
        cached = self._txt.get(domain)
        now = self.now()
        if cached is not None and now - cached[0] < TXT_RECHECK:
            return cached[1], True
        try:
            answer = await self.resolver.lookup(f"_mta-sts.{domain}", "TXT")
        except SmtpError:
            return None, False
        texts = [b"".join(r.strings).decode("utf-8", "replace") for r in answer.records]
        policy_id = parse_txt(texts)
        if len(self._txt) >= MAX_CACHED_DOMAINS:
            self._txt.clear()
        self._txt[domain] = (now, policy_id)
        return policy_id, True

    async def lookup(self, domain: str) -> StsLookup:
        """The policy in force for `domain` (RFC 8461 3.3, 5.1), fetching it if needed."""
        domain = domain.lower().rstrip(".")
        await self._load()
        policy_id, _answered = await self._txt_id(domain)
        if len(self._locks) >= MAX_CACHED_DOMAINS:
            self._locks = {d: lk for d, lk in self._locks.items() if lk.locked()}
        lock = self._locks.setdefault(domain, asyncio.Lock())
        async with lock:  # one fetch per domain at a time; the others find the result
            cached = self._policies.get(domain)
            valid = cached if cached is not None and cached.expires > self.now() else None
            if policy_id is None:
                # No (usable) TXT, or DNS failed: a cached policy stays valid for its
                # max_age (5.1); without one the domain has no MTA-STS.
                return StsLookup(valid)
            if valid is not None and valid.policy_id == policy_id:
                return StsLookup(valid)
            try:
                text = await self._fetch(domain)
                policy = parse_policy(text, policy_id, self.now())
            except StsError as e:
                return StsLookup(valid, e)
            if len(self._policies) >= MAX_CACHED_DOMAINS and domain not in self._policies:
                self._expire()
            self._policies[domain] = policy
            await self._save()
            return StsLookup(policy)

    async def _fetch(self, domain: str) -> str:
        self.fetches += 1
        if self._fetch_override is not None:
            return await self._fetch_override(domain)  # type: ignore[misc]
        if self._context is None:
            try:
                self._context = await asyncio.to_thread(policy_context, self.ca_file)  # reads the CA files
            except (OSError, ssl.SSLError) as e:
                raise StsError(FETCH_ERROR, f"cannot load the CA file {self.ca_file}: {e}") from None
        return await fetch_policy_text(domain, self.resolver, self._context, port=self.https_port, timeout=self.timeout)

    def _expire(self) -> None:
        now = self.now()
        for name in [d for d, p in self._policies.items() if p.expires <= now]:
            del self._policies[name]
        while len(self._policies) >= MAX_CACHED_DOMAINS:
            self._policies.pop(next(iter(self._policies)))

    def cached(self) -> dict[str, StsPolicy]:
        return dict(self._policies)


def load_cache(path: Path) -> dict[str, StsPolicy]:
    """The cache file, strictly: a file that is not valid JSON is moved aside; an
    entry that does not decode is dropped (the policy is fetched again)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        try:
            path.replace(path.with_name(path.name + ".bad"))
        except OSError:
            pass
        return {}
    out: dict[str, StsPolicy] = {}
    if isinstance(data, dict):
        for domain, entry in list(data.items())[:MAX_CACHED_DOMAINS]:
            try:
                out[str(domain)] = StsPolicy.from_dict(entry)
            except (ValueError, KeyError, TypeError):
                continue
    return out


def save_cache(path: Path, policies: dict[str, StsPolicy]) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump({d: p.as_dict() for d, p in policies.items()}, f, sort_keys=True)
    os.replace(tmp, path)


__all__ = ["MtaSts", "StsError", "StsLookup", "StsPolicy", "fetch_policy_text", "mx_matches", "parse_policy",
           "parse_txt"]
