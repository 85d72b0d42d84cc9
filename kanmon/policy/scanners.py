"""The scanner check: clamd (viruses) and Rspamd (spam score) at the end of DATA.

Role: send each message to the configured scanners at once (kanmon.content.clamd,
kanmon.content.rspamd; at most [antivirus] max_scans at a time), and answer by the
message's content profile (kanmon.policy.content; built-in defaults when none applies):
- a virus: `virus` = quarantine (admin quarantine, classification Virus) or reject
  (554 5.7.1, as Postfix with ClamAV milters answers);
- Rspamd's action: reject -> 550 5.7.1, soft reject and greylist -> 451 4.7.1,
  rewrite subject -> a Subject prefix (Rspamd's subject, else the profile's tag),
  add header -> X-Spam: Yes; its score adds to the message's score, so the profile's
  quarantine_score / reject_score apply to it;
- a scanner down, slow or answering garbage: `scanner_failure` = tempfail (451 4.7.1: the
  client retries) or accept_and_tag (a header says it was not scanned) - never a silent
  accept; the first failure and the recovery after it are effects (events, and the
  `scanner` alert in the main process).
A message larger than a scanner's max_size is not sent to it; a header says so.

Trusts: the scanners' answers as parsed by their clients.
Never: scan on the event loop's time beyond the socket I/O (the scanners do the work in
their own processes); accept without a header when a scanner could not look.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from kanmon.config import Config, ContentProfileSection
from kanmon.content import clamd, rspamd
from kanmon.model import Reply
from kanmon.policy.access import RelayAccess
from kanmon.policy.content import content_profile_names
from kanmon.policy.pipeline import ACCEPTED, Amend, Check, CheckResult, Context, Finding, accept, refuse

DEFAULT_PROFILE = ContentProfileSection(name="built-in")  # when no [[content_profile]] applies
VIRUS_REPLY = "Message refused: virus found ({name})"
SCANNER_TEMPFAIL = Reply(451, "4.7.1", "Message could not be scanned, try again later")


@dataclass(frozen=True)
class ScannerState:
    """Effect: a scanner failed (error set) or answered again after failing."""

    scanner: str  # "clamd" | "rspamd"
    error: str = ""


def scanner_effect_handlers(on_change: Callable[[ScannerState], Any]) -> dict[type, Callable[[Any], Awaitable[None]]]:
    async def handle(effect: ScannerState) -> None:
        on_change(effect)

    return {ScannerState: handle}


class ScannerCheck(Check):
    name = "scanners"
    classification = "Virus"
    failure_reply = SCANNER_TEMPFAIL

    def __init__(self, config: Config, access: RelayAccess):
        self.config = config
        self.access = access
        self.timeout = max(config.antivirus.timeout, config.spam.timeout) + 5.0
        self.profiles = {p.name: p for p in config.content_profile}
        self._limit = asyncio.Semaphore(config.antivirus.max_scans)
        self._failing: set[str] = set()  # scanners whose last answer was a failure (this process)

    def data(self, ctx: Context):
        return self._scan(ctx)

    def _profile(self, ctx: Context) -> ContentProfileSection:
        env = ctx.envelope
        assert env is not None
        client = ctx.client
        from_outside = self.access.from_outside(client)
        profiles = [self.profiles[n] for n in content_profile_names(self.config, env.mail_from, env.rcpts, from_outside, client.ip)]
        if not profiles:
            return DEFAULT_PROFILE
        if len(profiles) == 1:
            return profiles[0]
        # Recipients with different profiles: the strictest setting of each (one copy is stored).
        def lowest(values):
            present = [v for v in values if v is not None]
            return min(present) if present else None

        return profiles[0].model_copy(update={
            "virus": "reject" if any(p.virus == "reject" for p in profiles) else "quarantine",
            "scanner_failure": "tempfail" if any(p.scanner_failure == "tempfail" for p in profiles) else "accept_and_tag",
            "quarantine_score": lowest(p.quarantine_score for p in profiles),
            "reject_score": lowest(p.reject_score for p in profiles),
        })

    async def _scan(self, ctx: Context) -> CheckResult:
        env = ctx.envelope
        assert env is not None
        content = ctx.content
        av, spam = self.config.antivirus, self.config.spam
        async with self._limit:
            jobs: list[Awaitable] = []
            if av.clamd:
                jobs.append(clamd.scan(av.clamd, content, timeout=av.timeout, max_length=av.max_size))
            if spam.rspamd and len(content) <= spam.max_size:
                c = ctx.client
                jobs.append(rspamd.check(spam.rspamd, content, ip=c.ip, helo=c.helo, mail_from=env.mail_from,
                                         rcpts=env.rcpts, user=c.auth_user, timeout=spam.timeout))
            results = await asyncio.gather(*jobs)
        virus: clamd.ScanResult | None = results.pop(0) if av.clamd else None
        score: rspamd.SpamResult | None = results.pop(0) if results else None
        return self._answer(self._profile(ctx), virus, score, skipped_spam=bool(spam.rspamd) and score is None)

    def _answer(self, profile: ContentProfileSection, virus, score, *, skipped_spam: bool) -> CheckResult:
        effects: list[ScannerState] = []
        failures: list[str] = []
        headers: list[tuple[str, str]] = []
        findings: list[Finding] = []
        for scanner, failed, error in (
            ("clamd", virus is not None and virus.failed, virus.name if virus is not None else ""),
            ("rspamd", score is not None and score.status == "error", score.error if score is not None else ""),
        ):
            if failed:
                failures.append(error)
                if scanner not in self._failing:
                    self._failing.add(scanner)
                    effects.append(ScannerState(scanner, error))
            elif scanner in self._failing and (virus if scanner == "clamd" else score) is not None:
                self._failing.discard(scanner)
                effects.append(ScannerState(scanner))
        extra: dict[str, Any] = {"effects": tuple(effects)} if effects else {}
        if virus is not None and virus.status == "infected":
            findings.append(Finding("antivirus", virus.name, profile.virus, f"clamd found {virus.name}"))
            if profile.virus == "reject":
                return refuse(Reply(554, "5.7.1", VIRUS_REPLY.format(name=virus.name)), findings=tuple(findings),
                              classification="Virus", **extra)
            return accept(quarantine=f"virus {virus.name}", classification="Virus",
                          headers=(("X-Kanmon-Virus", virus.name),), findings=tuple(findings), **extra)
        if failures:
            if profile.scanner_failure == "tempfail":
                return refuse(SCANNER_TEMPFAIL, **extra)
            headers.append(("X-Kanmon-Scan", "not scanned: " + "; ".join(failures)[:200]))
        if virus is not None:
            headers.append(("X-Kanmon-Antivirus", "clean" if virus.status == "clean" else
                            "not scanned: " + virus.name if virus.status == "too_big" else "not scanned"))
        if skipped_spam:
            headers.append(("X-Spam-Status", "not scored (message too large)"))
        result: dict[str, Any] = {}
        if score is not None and score.status == "ok" and score.action not in ("reject", "soft reject", "greylist"):
            # The profile's thresholds apply to Rspamd's score (content rules' scores are
            # counted apart, in the content check).
            if profile.reject_score is not None and score.score >= profile.reject_score:
                return refuse(Reply(550, "5.7.1", "Message refused as spam"), classification="Spam",
                              findings=(*findings, Finding("spam", "rspamd", "reject", f"score {score.score:.2f} reaches reject_score")),
                              **extra)
            if profile.quarantine_score is not None and score.score >= profile.quarantine_score:
                result["quarantine"] = f"spam score {score.score:.2f}"
                result["classification"] = "Spam"
        if score is not None and score.status == "ok":
            headers.append(("X-Spam-Score", f"{score.score:.2f} / {score.required:.2f}"))
            findings.append(Finding("spam", "rspamd", score.action, f"score {score.score:.2f}, action {score.action}"))
            result["score"] = score.score
            if score.action == "reject":
                return refuse(Reply(550, "5.7.1", "Message refused as spam"), findings=tuple(findings),
                              classification="Spam", **extra)
            if score.action in ("soft reject", "greylist"):
                return refuse(Reply(451, "4.7.1", "Try again later"), findings=tuple(findings), classification="Spam", **extra)
            if score.action == "rewrite subject":
                prefix = profile.tag
                result["amend"] = Amend(subject_prefix=prefix)
                result["classification"] = "Spam"
            elif score.action == "add header":
                headers.append(("X-Spam", "Yes"))
                result["classification"] = "Spam"
            elif score.score >= score.required > 0:
                result["classification"] = "Spam"
        if headers:
            result["headers"] = tuple(headers)
        if findings:
            result["findings"] = tuple(findings)
        result.update(extra)
        return accept(**result) if result else ACCEPTED
