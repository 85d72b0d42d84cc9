"""Content rules: which rules of a content profile match a message, and what follows.

Role: a pure function from a content profile (compiled once per configuration), a decoded
message (kanmon.content.decode), its attachment inventory (kanmon.content.attachments)
and the transaction's facts (sender, recipients, from outside, authenticated) to a
Verdict: the rules that matched, in order, and the one outcome. Rules run in order;
tag, add_header, score and bcc add to the outcome and go on; accept, quarantine, reject,
discard and redirect end the walk (accept: no later rule applies). A log_only rule is
recorded with what it would have done and changes nothing. Attachment policies of the
profile (encrypted archives, archive bounds) apply after the rules unless a rule accepted.

Trusts: the profile (validated config). Everything in the message is data to match.
Never: do I/O; let a message's text reach a reply or a header unescaped (rule names and
configured texts only).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from kanmon.config import ContentProfileSection, ContentRuleSection, TextMatch
from kanmon.content.attachments import Inventory, name_matches
from kanmon.content.decode import DecodedMessage, normalize

TERMINAL = {"accept", "quarantine", "reject", "discard", "redirect"}


@dataclass(frozen=True)
class Facts:
    """What the rules know of the transaction besides the message."""

    sender: str
    recipients: tuple[str, ...]
    from_outside: bool
    authenticated: bool


@dataclass(frozen=True)
class Hit:
    rule: str
    action: str
    why: str  # which condition matched, e.g. 'subject contains "請求書"'
    log_only: bool = False


@dataclass
class Verdict:
    """The outcome for one message."""

    hits: list[Hit] = field(default_factory=list)
    action: str = "accept"  # accept | quarantine | reject | discard | redirect (the terminal outcome)
    rule: str = ""  # the rule (or policy) that decided the terminal outcome
    reply_text: str = ""  # reject: the text after 550 5.7.1
    subject_prefix: str = ""
    headers: list[tuple[str, str]] = field(default_factory=list)
    score: float = 0.0
    redirect: str = ""
    bcc: list[str] = field(default_factory=list)
    classification: str = ""  # Policy / Spam / Suspicious ... for the history

    def describe(self) -> str:
        if self.action == "accept" and not (self.subject_prefix or self.headers or self.score or self.bcc):
            return "accept (no rule changes it)"
        parts = [self.action + (f" by {self.rule}" if self.rule else "")]
        if self.subject_prefix:
            parts.append(f"subject prefix {self.subject_prefix!r}")
        for name, value in self.headers:
            parts.append(f"header {name}: {value}")
        if self.score:
            parts.append(f"score {self.score:g}")
        if self.redirect:
            parts.append(f"redirect to {self.redirect}")
        for a in self.bcc:
            parts.append(f"bcc to {a}")
        return ", ".join(parts)


class _Text:
    """A compiled TextMatch: normalised keywords and a case-insensitive regex."""

    __slots__ = ("keywords", "regex")

    def __init__(self, m: TextMatch):
        self.keywords = [(k, normalize(k)) for k in m.keywords if k]
        self.regex = re.compile(m.regex, re.IGNORECASE) if m.regex is not None else None

    def find(self, text: str, normalized: str | None = None) -> str:
        """What matched in text (a description), or ""."""
        if self.keywords:
            norm = normalized if normalized is not None else normalize(text)
            for original, key in self.keywords:
                if key in norm:
                    return f"contains {original!r}"
        if self.regex is not None and self.regex.search(text):
            return f"matches /{self.regex.pattern}/"
        return ""


class CompiledRule:
    def __init__(self, rule: ContentRuleSection):
        self.rule = rule
        self.sender = _Text(rule.sender) if rule.sender else None
        self.recipient = _Text(rule.recipient) if rule.recipient else None
        self.header = {k.lower(): _Text(v) for k, v in (rule.header or {}).items()}
        self.subject = _Text(rule.subject) if rule.subject else None
        self.body = _Text(rule.body) if rule.body else None

    def conditions(self, msg: DecodedMessage, inv: Inventory, facts: Facts, norm: dict[str, str]):
        """Each written condition's result: what matched (a description), or ""."""
        r = self.rule
        if self.sender is not None:
            yield _said("sender", self.sender.find(facts.sender))
        if self.recipient is not None:
            yield _said("recipient", next((w for w in (self.recipient.find(a) for a in facts.recipients) if w), ""))
        if r.from_outside is not None:
            yield ("from outside" if r.from_outside else "not from outside") if facts.from_outside == r.from_outside else ""
        if r.authenticated is not None:
            yield ("authenticated" if r.authenticated else "not authenticated") if facts.authenticated == r.authenticated else ""
        for name, text in self.header.items():
            yield _said(f"header {name}", next((w for w in (text.find(v) for v in msg.header(name)) if w), ""))
        if self.subject is not None:
            if "subject" not in norm:
                norm["subject"] = normalize(msg.subject)
            yield _said("subject", self.subject.find(msg.subject, norm["subject"]))
        if self.body is not None:
            if "body" not in norm:
                norm["body"] = normalize(msg.text)
            yield _said("body", self.body.find(msg.text, norm["body"]))
        if r.attachment_name is not None:
            yield next((f"attachment {i.name!r} matches {p!r}" for i in inv.items
                        if i.name and (p := name_matches(i.name, r.attachment_name))), "")
        if r.attachment_type is not None:
            yield next((f"attachment {i.name or '(unnamed)'!r} is {t}" for i in inv.items for t in r.attachment_type
                        if _type_matches(i, t)), "")
        if r.size_over is not None:
            yield f"size {msg.size} over {r.size_over}" if msg.size > r.size_over else ""

    def match(self, msg: DecodedMessage, inv: Inventory, facts: Facts, norm: dict[str, str]) -> str:
        """Why the rule matches (what its conditions found), or "" when it does not."""
        whys = []
        for why in self.conditions(msg, inv, facts, norm):
            if self.rule.match == "any":
                if why:
                    return why
            elif not why:
                return ""
            else:
                whys.append(why)
        return "; ".join(whys)


def _said(name: str, why: str) -> str:
    return f"{name} {why}" if why else ""


def _type_matches(item, t: str) -> bool:
    if "/" in t:
        return _mime_matches(item.true_type, t) or bool(item.declared and _mime_matches(item.declared, t))
    return t in item.classes


def _mime_matches(actual: str, pattern: str) -> bool:
    pattern = pattern.lower()
    if pattern.endswith("/*"):
        return actual.startswith(pattern[:-1])
    return actual == pattern


class CompiledProfile:
    """A content profile, compiled once per configuration."""

    def __init__(self, profile: ContentProfileSection):
        self.profile = profile
        self.rules = [CompiledRule(r) for r in profile.rule]

    def evaluate(self, msg: DecodedMessage, inv: Inventory, facts: Facts) -> Verdict:
        p = self.profile
        v = Verdict()
        norm: dict[str, str] = {}
        accepted = False
        for cr in self.rules:
            why = cr.match(msg, inv, facts, norm)
            if not why:
                continue
            r = cr.rule
            v.hits.append(Hit(r.name, r.action, why, r.log_only))
            if r.log_only:
                continue
            if r.action == "accept":
                v.rule = r.name
                accepted = True
                break
            if r.action == "tag":
                v.subject_prefix = v.subject_prefix or (r.tag if r.tag is not None else p.tag)
                if r.add_header:
                    v.headers.append(_split_header(r.add_header))
            elif r.action == "add_header":
                assert r.add_header is not None
                v.headers.append(_split_header(r.add_header))
            elif r.action == "score":
                v.score += r.score
            elif r.action == "bcc":
                assert r.address is not None
                v.bcc.append(r.address)
            elif r.action in TERMINAL:
                v.action, v.rule = r.action, r.name
                if r.action == "reject":
                    v.reply_text = r.reply or f"Message refused by content rule {r.name}"
                elif r.action == "redirect":
                    assert r.address is not None
                    v.redirect = r.address
                v.classification = "Policy"
                break
        if not accepted and v.action == "accept":
            self._attachment_policies(v, inv)
        if not accepted and v.action == "accept" and v.score:
            if p.reject_score is not None and v.score >= p.reject_score:
                v.action, v.rule, v.reply_text = "reject", f"score {v.score:g}", "Message refused as spam"
                v.classification = "Spam"
            elif p.quarantine_score is not None and v.score >= p.quarantine_score:
                v.action, v.rule, v.classification = "quarantine", f"score {v.score:g}", "Spam"
        return v

    def _attachment_policies(self, v: Verdict, inv: Inventory) -> None:
        p = self.profile
        for what, setting, found in (
            ("archive_limit", p.archive_limit, inv.limit),
            ("encrypted_archive", p.encrypted_archive, ", ".join(repr(i.container or i.name) for i in inv.encrypted[:3])),
        ):
            if not found or setting == "accept":
                continue
            v.hits.append(Hit(what, setting, found))
            if setting == "tag":
                v.subject_prefix = v.subject_prefix or p.tag
                continue
            v.action, v.rule, v.classification = setting, what, "Suspicious"
            if setting == "reject":
                v.reply_text = ("Message refused: an encrypted archive cannot be scanned" if what == "encrypted_archive"
                                else "Message refused: an archive beyond the inspection limits")
            return


def _split_header(text: str) -> tuple[str, str]:
    name, _, value = text.partition(":")
    return name.strip(), value.strip()
