"""The content check: a message's content profile, run at the end of DATA.

Role: choose each recipient's [[content_profile]] (a [[recipient_policy]] naming one for
the recipient, else "inbound" for mail from outside or "outbound" for relay_networks and
authenticated clients, when a profile of that name exists; with several, the gravest
verdict applies to the message), run it in a bounded thread
pool (kanmon.content.inspect), and turn its verdict into the pipeline's answer: reject
(550 5.7.1), quarantine, discard, redirect, bcc, a Subject prefix, headers, a score, and
a Finding for each rule that matched (the listener records them with the queue id).

Trusts: the profile (validated config); the message is data.
Never: decode on the event loop; accept a message whose inspection failed (the
pipeline's failure mode answers 451 4.3.0).
"""

from __future__ import annotations

import asyncio
import ipaddress
from concurrent.futures import ThreadPoolExecutor

from kanmon.config import Config
from kanmon.content.inspect import inspect_message
from kanmon.content.rules import CompiledProfile, Facts, Verdict
from kanmon.model import Reply
from kanmon.policy.access import RelayAccess
from kanmon.policy.pipeline import ACCEPTED, Amend, Check, CheckResult, Context, Finding, accept, reject
from kanmon.policy.profiles import recipient_policy_for

# Inspections at once (each in a thread; decoding holds the GIL much of the time, so
# more threads would not make it faster, only use more memory).
POOL_SIZE = 2


def content_profile_names(config: Config, sender: str, recipients, from_outside: bool, client_ip: str = "") -> list[str]:
    """Every recipient's content profile (see the module docstring), distinct, in order:
    a recipient's [[recipient_policy]] content_profile, else the first [[ip_policy]] with a
    content_profile whose source holds the client, else "inbound"/"outbound" by direction
    when defined; [] when none applies to any recipient."""
    names = {p.name for p in config.content_profile}
    if not names:
        return []
    default = _ip_content_profile(config, client_ip) or ("inbound" if from_outside else "outbound")
    out: list[str] = []
    for rcpt in recipients or ("",):
        policy = recipient_policy_for(sender, rcpt, config) if rcpt else None
        name = policy.content_profile if policy is not None and policy.content_profile is not None else (
            default if default in names else None)
        if name is not None and name not in out:
            out.append(name)
    return out


def _ip_content_profile(config: Config, client_ip: str) -> str | None:
    if not client_ip or not any(p.content_profile for p in config.ip_policy):
        return None
    try:
        addr = ipaddress.ip_address(client_ip)
    except ValueError:
        return None
    if addr.version == 6 and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    for policy in config.ip_policy:
        if policy.content_profile and any(addr in net for net in policy.source):
            return policy.content_profile
    return None


def content_profile_name(config: Config, sender: str, recipients, from_outside: bool, client_ip: str = "") -> str | None:
    """The first of content_profile_names (for a dry run and for messages with one profile)."""
    names = content_profile_names(config, sender, recipients, from_outside, client_ip)
    return names[0] if names else None


def verdict_result(verdict: Verdict) -> CheckResult:
    """The pipeline's answer for a content verdict."""
    findings = tuple(Finding("content", h.rule, h.action, h.why, h.log_only) for h in verdict.hits)
    headers = tuple(verdict.headers)
    cls = verdict.classification
    if verdict.action == "reject":
        return reject(Reply(550, "5.7.1", verdict.reply_text), findings=findings, classification=cls or "Policy")
    extra: dict = {}
    if findings:
        extra["findings"] = findings
    if headers:
        extra["headers"] = headers
    if verdict.score:
        extra["score"] = verdict.score
    if cls:
        extra["classification"] = cls
    if verdict.action == "quarantine":
        extra["quarantine"] = f"content rule {verdict.rule}"
    redirect = (verdict.redirect,) if verdict.action == "redirect" else ()
    discard = f"content rule {verdict.rule}" if verdict.action == "discard" else ""
    if verdict.subject_prefix or redirect or verdict.bcc or discard:
        extra["amend"] = Amend(verdict.subject_prefix, redirect, tuple(verdict.bcc), discard)
    return accept(**extra) if extra else ACCEPTED


class ContentCheck(Check):
    name = "content"
    timeout = 120.0  # a large message with archives inside: seconds, not minutes
    classification = "Policy"

    def __init__(self, config: Config, access: RelayAccess, pool: ThreadPoolExecutor | None = None):
        self.config = config
        self.access = access
        self.profiles = {p.name: CompiledProfile(p) for p in config.content_profile}
        self._pool = pool or ThreadPoolExecutor(max_workers=POOL_SIZE, thread_name_prefix="content")

    def data(self, ctx: Context):
        env = ctx.envelope
        assert env is not None
        client = ctx.client
        authenticated = bool(client.auth_user)
        from_outside = self.access.from_outside(client)
        names = content_profile_names(self.config, env.mail_from, env.rcpts, from_outside, client.ip)
        if not names:
            return ACCEPTED
        facts = Facts(env.mail_from, tuple(env.rcpts), from_outside, authenticated)
        return self._inspect([self.profiles[n] for n in names], ctx.content, facts)

    async def _inspect(self, profile: list[CompiledProfile], content: bytes, facts: Facts) -> CheckResult:
        loop = asyncio.get_running_loop()
        found = await loop.run_in_executor(self._pool, inspect_message, profile, content, facts)
        return verdict_result(found.verdict)


class ArchiveCopyCheck(Check):
    """[archive] to = ADDRESS: the archive's copy is an added recipient of each message
    of the configured direction and domains (delivered, traced and retried like any)."""

    name = "archive"

    def __init__(self, config: Config, access: RelayAccess):
        self.cfg = config.archive
        self.access = access
        assert self.cfg.to is not None
        self._amend = Amend(bcc=(self.cfg.to,))

    def data(self, ctx: Context) -> CheckResult:
        env = ctx.envelope
        assert env is not None
        client = ctx.client
        from_outside = self.access.from_outside(client)
        if self.cfg.applies(env.mail_from, env.rcpts, from_outside):
            return accept(amend=self._amend)
        return ACCEPTED
