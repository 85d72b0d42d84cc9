"""Sender authentication checks: SPF at MAIL; DKIM, ARC and DMARC at the end of DATA.

Role: three checks of the pipeline (docs/authentication.md), enabled per session profile
(spf, dkim, dmarc, arc_trusted, auth_tag) for mail from outside only: a client in
relay_networks or an authenticated one is never checked.

- SpfCheck ("spf", MAIL): SPF for the HELO and MAIL FROM identities (kanmon.auth.spf);
  adds Received-SPF; keeps the result on the envelope for DMARC. A fail does what the
  profile's `spf` says (tag, quarantine, reject 550 5.7.23); a softfail the same, but
  never more than tag; a temporary DNS failure is 451 4.7.24 while the action is more
  than `none`.
- DkimCheck ("dkim", DATA): every DKIM signature and the ARC chain (kanmon.auth.dkim),
  with the keys fetched first through the resolver. A failing signature (and none that
  passes) does what `dkim` says (reject 550 5.7.20); a key lookup failure 451 4.7.5.
- DmarcCheck ("dmarc", DATA, last): the From domain's DMARC result (kanmon.auth.dmarc),
  overridden for a valid ARC chain sealed by an `arc_trusted` domain; `honor` applies
  the domain's policy (reject 550 5.7.1 naming it, quarantine holds the message), `tag`
  tags instead; several From addresses are refused (550 5.7.1) under `honor`. It writes
  the one Authentication-Results header (authserv-id: [server] authserv_id, else the
  hostname) after removing incoming ones that carry our authserv-id, tags the Subject
  when any of the three asked for it, and returns an AuthVerified effect (the event).

DNS goes through the checks' cached async resolver (kanmon.policy.dns): the verifiers
are synchronous and ask a lookup that answers from the cache or asks for the name to be
fetched (kanmon.auth.lookup), so a warm cache answers at once, without an await, and the
event loop never blocks on DNS. DKIM of a message larger than INLINE_VERIFY_LIMIT runs
in a small thread pool (hashing a large body would hold the loop).

Trusts: the resolver's typed answers as data; the profile. Nothing in the message.
Never: treat a DNS temporary failure as a pass while an action is configured; check a
relay or authenticated client; keep an incoming Authentication-Results with our id.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from kanmon.auth import authres
from kanmon.auth.dkim import ArcResult, DkimSignatureResult, key_names, verify_arc, verify_dkim
from kanmon.auth.dmarc import DmarcResult, evaluate_dmarc, find_record, from_header, load_public_suffix_list
from kanmon.auth.lookup import MAX_LOOKUPS, LookupAnswer, NeedLookup
from kanmon.auth.spf import SpfResult, evaluate_spf, received_spf
from kanmon.config import Config, SessionProfile
from kanmon.model import Reply
from kanmon.content.decode import prefix_subject
from kanmon.policy.access import RelayAccess
from kanmon.policy.dns import CheckResolver, DnsAnswer
from kanmon.policy.pipeline import ACCEPTED, Check, CheckResult, Context, Stage, accept, refuse
from kanmon.policy.profiles import client_profile

T = TypeVar("T")

CLASSIFICATION = "Spoofing"  # history classification of mail refused, held or tagged by these checks
INLINE_VERIFY_LIMIT = 1_000_000  # bytes: larger messages are DKIM-verified in a thread
_VERIFY_POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="kanmon-dkim")

SPF_TEMPFAIL = Reply(451, "4.7.24", "SPF validation error (DNS temporary failure), try again later")
DKIM_TEMPFAIL = Reply(451, "4.7.5", "DKIM key lookup failed (DNS temporary failure), try again later")
DMARC_TEMPFAIL = Reply(451, "4.7.1", "DMARC check failed (DNS temporary failure), try again later")
DKIM_FAILED = Reply(550, "5.7.20", "No passing DKIM signature found")
MULTIPLE_FROM = Reply(550, "5.7.1", "Message rejected: several From addresses (RFC 7489 6.6.1)")


def spf_failed(result: SpfResult) -> Reply:
    o = result.decisive
    who = result.sender if o.identity == "mailfrom" else f"HELO {result.helo_name}"
    return Reply(550, "5.7.23", f"SPF validation failed: {o.domain} does not allow {result.ip} to send for {who}"[:400])


def dmarc_rejected(domain: str) -> Reply:
    return Reply(550, "5.7.1", f"Message rejected: the DMARC policy of {domain} is reject (no aligned SPF or DKIM pass)")


@dataclass(frozen=True, slots=True)
class AuthVerified:
    """Side effect: record what the checks found (an auth-results event; the metrics)."""

    spf: str  # the decisive SPF result, "" when not checked
    dkim: str  # pass | fail | permerror | temperror | none ("" when not checked): the best signature's
    dmarc: str
    arc: str
    from_domain: str
    action: str  # none | tag | quarantine (a refusal is its own event)
    detail: str  # the Authentication-Results value


def _notes(ctx: Context) -> dict[str, Any]:
    env = ctx.envelope
    if env is None:
        return {}
    if env.check_notes is None:
        env.check_notes = {}
    return env.check_notes


def _convert(a: DnsAnswer) -> LookupAnswer:
    return LookupAnswer(a.status.value, a.records, a.error)


class _Answers:
    """A Lookup for the verifiers: answers from what it fetched or from the resolver's
    cache; anything else raises NeedLookup (see kanmon.auth.lookup)."""

    __slots__ = ("resolver", "got")

    def __init__(self, resolver: CheckResolver):
        self.resolver = resolver
        self.got: dict[tuple[str, str], LookupAnswer] = {}

    def __call__(self, name: str, rdtype: str) -> LookupAnswer:
        key = (name.lower().rstrip("."), rdtype.upper())
        a = self.got.get(key)
        if a is None:
            cached = self.resolver.cached_nowait(*key)
            if cached is None:
                raise NeedLookup(*key)
            a = self.got[key] = _convert(cached)
        return a

    async def fetch(self, name: str, rdtype: str) -> None:
        if len(self.got) >= MAX_LOOKUPS:
            raise RuntimeError(f"more than {MAX_LOOKUPS} DNS lookups for one message")
        self.got[(name, rdtype)] = _convert(await self.resolver.query(name, rdtype))

    async def fetch_all(self, names: list[tuple[str, str]]) -> None:
        """Every answer of names into got (the verifier may then run in another thread)."""
        answers = await asyncio.gather(*(self.resolver.query(*k) for k in names if k not in self.got))
        for k, a in zip([k for k in names if k not in self.got], answers):
            self.got[k] = _convert(a)


async def _run_fetching(fn: Callable[[_Answers], T], answers: _Answers, need: NeedLookup) -> T:
    while True:
        await answers.fetch(need.name, need.rdtype)
        try:
            return fn(answers)
        except NeedLookup as again:
            need = again


def _outside(ctx: Context, access: RelayAccess) -> bool:
    """Mail from outside: neither authenticated nor from relay_networks."""
    return not ctx.client.auth_user and not access.is_relay_client(ctx.client.ip)


def auth_enabled(profile: SessionProfile) -> bool:
    return profile.spf != "off" or profile.dkim != "off" or profile.dmarc != "off"


class SpfCheck(Check):
    name = "spf"
    classification = CLASSIFICATION
    failure_reply = SPF_TEMPFAIL

    def __init__(self, config: Config, resolver: CheckResolver, access: RelayAccess):
        self.config = config
        self.resolver = resolver
        self.access = access
        self.receiver = config.server.hostname
        self.timeout = max(20.0, 4 * resolver.timeout)  # a few lookups in a row (policyd-spf: 20 s)

    def active(self, stage: Stage, profile: SessionProfile) -> bool:
        return profile.spf != "off" or profile.dmarc != "off"  # off: the hook accepts every client of the profile

    def mail(self, ctx: Context):
        profile = client_profile(ctx, self.config)
        if (profile.spf == "off" and profile.dmarc == "off") or not _outside(ctx, self.access):
            return ACCEPTED
        sender = ctx.sender.address if ctx.sender is not None else ""
        client = ctx.client

        def run(answers: _Answers) -> SpfResult:
            return evaluate_spf(client.ip, sender, client.helo, answers)

        answers = _Answers(self.resolver)
        try:
            result = run(answers)
        except NeedLookup as need:
            return self._later(ctx, profile, run, answers, need)
        return self._decide(ctx, profile, result)

    async def _later(self, ctx, profile, run, answers, need) -> CheckResult:
        return self._decide(ctx, profile, await _run_fetching(run, answers, need))

    def _decide(self, ctx: Context, profile: SessionProfile, result: SpfResult) -> CheckResult:
        notes = _notes(ctx)
        notes["spf"] = result
        headers = (("Received-SPF", received_spf(result, self.receiver)),)
        action = profile.spf
        r = result.decisive.result
        if action in ("off", "none"):
            return accept(headers=headers)
        if r == "temperror":
            return refuse(SPF_TEMPFAIL)
        if r == "softfail" and action in ("quarantine", "reject"):
            action = "tag"  # ~all asks to accept, marked (policyd-spf refuses only a fail)
        if r not in ("fail", "softfail"):
            return accept(headers=headers)
        if action == "reject":
            return refuse(spf_failed(result))
        notes.setdefault("actions", []).append(f"spf={action}")
        if action == "quarantine":
            return accept(headers=headers, quarantine=f"SPF {r} for {result.decisive.domain}",
                          classification=CLASSIFICATION)
        notes["tag"] = True
        return accept(headers=headers, classification=CLASSIFICATION)


class DkimCheck(Check):
    name = "dkim"
    classification = CLASSIFICATION
    failure_reply = DKIM_TEMPFAIL

    def __init__(self, config: Config, resolver: CheckResolver, access: RelayAccess):
        self.config = config
        self.resolver = resolver
        self.access = access
        self.timeout = 2 * resolver.timeout + 10.0  # the keys in parallel, then the hashing

    def active(self, stage: Stage, profile: SessionProfile) -> bool:
        return profile.dkim != "off" or profile.dmarc != "off"  # off: the hook accepts every client of the profile

    def data(self, ctx: Context):
        profile = client_profile(ctx, self.config)
        if (profile.dkim == "off" and profile.dmarc == "off") or not _outside(ctx, self.access):
            return ACCEPTED
        names = [(n, "TXT") for n in key_names(ctx.header)]
        answers = _Answers(self.resolver)
        if all(answers.resolver.cached_nowait(*k) is not None for k in names) and len(ctx.content) <= INLINE_VERIFY_LIMIT:
            return self._decide(ctx, profile, *self._verify(ctx.content, answers))
        return self._later(ctx, profile, names, answers)

    @staticmethod
    def _verify(content: bytes, answers: _Answers) -> tuple[list[DkimSignatureResult], ArcResult]:
        return verify_dkim(content, answers), verify_arc(content, answers)

    async def _later(self, ctx: Context, profile: SessionProfile, names, answers: _Answers) -> CheckResult:
        await answers.fetch_all(names)
        content = ctx.content
        if len(content) <= INLINE_VERIFY_LIMIT:
            sigs, arc = self._verify(content, answers)
        else:
            sigs, arc = await asyncio.get_running_loop().run_in_executor(_VERIFY_POOL, self._verify, content, answers)
        return self._decide(ctx, profile, sigs, arc)

    def _decide(self, ctx: Context, profile: SessionProfile, sigs: list[DkimSignatureResult], arc: ArcResult) -> CheckResult:
        notes = _notes(ctx)
        notes["dkim"] = sigs
        notes["arc"] = arc
        action = profile.dkim
        if action in ("off", "none") or not sigs or any(s.result == "pass" for s in sigs):
            return ACCEPTED
        if any(s.result == "temperror" for s in sigs):
            return refuse(DKIM_TEMPFAIL)
        if action == "reject":
            return refuse(DKIM_FAILED)
        notes.setdefault("actions", []).append(f"dkim={action}")
        if action == "quarantine":
            return accept(quarantine=f"DKIM {sigs[0].result} for {sigs[0].domain or 'a signature'}",
                          classification=CLASSIFICATION)
        notes["tag"] = True
        return accept(classification=CLASSIFICATION)


class DmarcCheck(Check):
    name = "dmarc"
    classification = CLASSIFICATION
    failure_reply = DMARC_TEMPFAIL

    def __init__(self, config: Config, resolver: CheckResolver, access: RelayAccess,
                 rng: Callable[[], float] = random.random):
        self.config = config
        self.resolver = resolver
        self.access = access
        self.authserv_id = config.server.authserv_id or config.server.hostname
        self.rng = rng  # [0, 1): the pct= sample (tests pass their own)
        self.timeout = 2 * resolver.timeout + 1.0
        load_public_suffix_list()

    def active(self, stage: Stage, profile: SessionProfile) -> bool:
        return auth_enabled(profile)  # off: the hook accepts every client of the profile

    def data(self, ctx: Context):
        profile = client_profile(ctx, self.config)
        if not auth_enabled(profile) or not _outside(ctx, self.access):
            return ACCEPTED
        if profile.dmarc == "off":
            return self._finish(ctx, profile, None, "")
        frm = from_header(ctx.header)
        if frm.fields > 1 or len(frm.domains) > 1:
            return self._multiple_from(ctx, profile)
        domain = frm.domain
        if not domain:
            return self._finish(ctx, profile, DmarcResult("none", "", reason="no From domain"), "")
        answers = _Answers(self.resolver)

        def run(a: _Answers) -> Any:
            return find_record(domain, lambda name: a(name, "TXT"))

        try:
            record = run(answers)
        except NeedLookup as need:
            return self._later(ctx, profile, domain, run, answers, need)
        return self._evaluate(ctx, profile, domain, record)

    async def _later(self, ctx, profile, domain, run, answers, need) -> CheckResult:
        return self._evaluate(ctx, profile, domain, await _run_fetching(run, answers, need))

    def _multiple_from(self, ctx: Context, profile: SessionProfile) -> CheckResult:
        if profile.dmarc == "honor":
            return refuse(MULTIPLE_FROM)
        result = DmarcResult("permerror", "", reason="several From addresses")
        if profile.dmarc == "tag":
            _notes(ctx).setdefault("actions", []).append("dmarc=tag")
            _notes(ctx)["tag"] = True
        return self._finish(ctx, profile, result, "")

    def _evaluate(self, ctx: Context, profile: SessionProfile, domain: str, record) -> CheckResult:
        notes = _notes(ctx)
        result = evaluate_dmarc(domain, record, notes.get("spf"), notes.get("dkim") or [], self.rng() * 100)
        note = ""
        arc: ArcResult | None = notes.get("arc")
        if (result.result == "fail" and result.policy != "none" and arc is not None and arc.result == "pass"
                and arc.sealer in profile.arc_trusted):
            note = f"policy overridden: ARC chain sealed by trusted {arc.sealer}"
            result = DmarcResult(result.result, result.from_domain, "none", result.record, result.reason)
        action = profile.dmarc
        if action in ("honor", "tag"):
            if result.result == "temperror":
                return refuse(DMARC_TEMPFAIL)
            if result.policy == "reject" and action == "honor":
                return refuse(dmarc_rejected(domain))
            if result.policy in ("reject", "quarantine"):
                what = "quarantine" if action == "honor" else "tag"
                notes.setdefault("actions", []).append(f"dmarc={what}")
                if what == "tag":
                    notes["tag"] = True
                else:
                    notes["quarantine"] = f"DMARC policy of {domain} is {result.published}"
        return self._finish(ctx, profile, result, note)

    def _finish(self, ctx: Context, profile: SessionProfile, dmarc: DmarcResult | None, note: str) -> CheckResult:
        notes = _notes(ctx)
        spf: SpfResult | None = notes.get("spf")
        sigs: list[DkimSignatureResult] | None = notes.get("dkim")
        arc: ArcResult | None = notes.get("arc")
        ar = authres.authentication_results(
            self.authserv_id, spf=spf, dkim=sigs, dkim_checked=sigs is not None, dmarc=dmarc, dmarc_note=note,
            arc=arc if arc is not None and arc.result != "none" else None,
        )
        content = ctx.content
        header, removed = authres.strip_forged(ctx.header, self.authserv_id)
        tagged = bool(notes.get("tag"))
        if tagged:
            header = prefix_subject(header, profile.auth_tag)
        new_content = header + content[len(ctx.header):] if (removed or tagged) else None
        actions = notes.get("actions") or []
        quarantine = notes.get("quarantine", "")
        action = "quarantine" if quarantine or any(a.endswith("=quarantine") for a in actions) else ("tag" if tagged else "none")
        effect = AuthVerified(
            spf.decisive.result if spf is not None else "", _best(sigs), dmarc.result if dmarc is not None else "",
            arc.result if arc is not None and arc.result != "none" else "", dmarc.from_domain if dmarc is not None else "", action, ar,
        )
        return accept(headers=(("Authentication-Results", ar),), content=new_content, effects=(effect,),
                      quarantine=quarantine, classification=CLASSIFICATION if action != "none" else "", tagged=tagged)


def _best(sigs: list[DkimSignatureResult] | None) -> str:
    if sigs is None:
        return ""
    if not sigs:
        return "none"
    for r in ("pass", "temperror", "fail", "permerror", "neutral"):
        if any(s.result == r for s in sigs):
            return r
    return sigs[0].result


def auth_checks(config: Config, resolver: CheckResolver, access: RelayAccess) -> list[Check]:
    """The checks a config needs: none when no profile turns authentication on."""
    profiles = config.session_profiles.values()
    if not any(auth_enabled(p) for p in profiles):
        return []
    return [SpfCheck(config, resolver, access), DkimCheck(config, resolver, access), DmarcCheck(config, resolver, access)]
