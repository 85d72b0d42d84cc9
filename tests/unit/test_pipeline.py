"""The check pipeline's runner (kanmon.policy.pipeline) and the standard checks, without sockets."""

from __future__ import annotations

import asyncio

import pytest

from kanmon.config import parse_config
from kanmon.model import ClientInfo, Envelope, Reply
from kanmon.policy.disk import FreeDiskCheck
from kanmon.policy.loop import MAX_RECEIVED, LoopCheck
from kanmon.policy.pipeline import (
    ACCEPT_DECISION,
    ACCEPTED,
    Check,
    CheckResult,
    Context,
    Decision,
    Outcome,
    Pending,
    Pipeline,
    Stage,
    accept,
    refuse,
    reject,
    tempfail,
)
from kanmon.policy.quota import QuotaCheck, QuotaOver, QuotaUnder
from kanmon.smtp import replies
from kanmon.smtp.address import Path

DENIED = Reply(550, "5.7.1", "denied")
LATER = Reply(450, "4.7.1", "later")


class Fixed(Check):
    """Answers every MAIL with the same result, and remembers that it was asked."""

    def __init__(self, name: str, result: CheckResult = ACCEPTED, calls: list[str] | None = None, **attrs):
        self.name = name
        self.result = result
        self.calls = calls if calls is not None else []
        for k, v in attrs.items():
            setattr(self, k, v)

    def mail(self, ctx: Context) -> CheckResult:
        self.calls.append(self.name)
        return self.result


class Slow(Check):
    """Answers MAIL with an awaitable: the result once `release` is set."""

    def __init__(self, name: str, result: CheckResult = ACCEPTED, calls: list[str] | None = None, timeout: float = 5.0):
        self.name = name
        self.result = result
        self.calls = calls if calls is not None else []
        self.timeout = timeout
        self.release = asyncio.Event()
        self.release.set()

    def mail(self, ctx: Context):
        self.calls.append(self.name)
        return self._answer()

    async def _answer(self) -> CheckResult:
        await self.release.wait()
        return self.result


def ctx() -> Context:
    client = ClientInfo(ip="192.0.2.1")
    return Context(client, Envelope(mail_from="a@remote.example", client=client), sender=Path("a@remote.example"))


def run(pipeline: Pipeline, stage: Stage = Stage.MAIL, c: Context | None = None) -> Decision:
    d = pipeline.run(stage, c or ctx())
    if isinstance(d, Pending):
        return asyncio.run(d.resolve())
    return d


# -- the synchronous path --------------------------------------------------------------


def test_checks_run_in_order_and_all_accept():
    calls: list[str] = []
    d = run(Pipeline([Fixed("a", calls=calls), Fixed("b", calls=calls), Fixed("c", calls=calls)]))
    assert calls == ["a", "b", "c"]
    assert d.accepted and d.check == "" and d.reply is None and d.error == ""


def test_first_refusal_decides_and_later_checks_are_not_asked():
    calls: list[str] = []
    d = run(Pipeline([Fixed("a", calls=calls), Fixed("b", reject(DENIED), calls),
                      Fixed("c", tempfail(LATER), calls)]))
    assert calls == ["a", "b"]
    assert (d.outcome, d.reply, d.check, d.classification) == (Outcome.REJECT, DENIED, "b", "Policy")


def test_tempfail_decides_with_its_4xx():
    d = run(Pipeline([Fixed("a", tempfail(LATER)), Fixed("b", reject(DENIED))]))
    assert (d.outcome, d.reply, d.check) == (Outcome.TEMPFAIL, LATER, "a")


def test_headers_scores_effects_accumulate_in_order():
    d = run(Pipeline([
        Fixed("a", accept(headers=(("X-A", "1"),), score=1.5, effects=("e1",))),
        Fixed("b", accept(headers=(("X-B", "2"),), score=2.0, quarantine="looks odd", effects=("e2",))),
        Fixed("c", accept(score=-0.5, quarantine="second reason")),
    ]))
    assert d.accepted
    assert d.headers == (("X-A", "1"), ("X-B", "2"))
    assert d.score == 3.0 and d.effects == ("e1", "e2")
    assert d.quarantine == "looks odd"  # the first request's reason


def test_a_refusal_keeps_what_came_before_it_and_its_own_effects():
    d = run(Pipeline([Fixed("a", accept(headers=(("X-A", "1"),), effects=("e1",))),
                      Fixed("b", refuse(LATER, effects=("e2",)))]))
    assert d.outcome is Outcome.TEMPFAIL and d.effects == ("e1", "e2") and d.headers == (("X-A", "1"),)


def test_classification_of_a_refusal_is_the_checks_class_unless_the_result_names_one():
    assert run(Pipeline([Fixed("av", reject(DENIED), classification="Virus")])).classification == "Virus"
    assert run(Pipeline([Fixed("rules", reject(DENIED, classification="Spam"))])).classification == "Spam"
    assert run(Pipeline([Fixed("score", accept(classification="Spam"))])).classification == "Spam"
    assert run(Pipeline([Fixed("a")])).classification == ""  # the session's default: NotSpam


def test_an_exception_fails_by_the_failure_reply_naming_the_check():
    class Broken(Check):
        name = "broken"

        def mail(self, ctx):
            raise KeyError("zone")

    d = run(Pipeline([Broken(), Fixed("after")]))
    assert (d.outcome, d.reply, d.check) == (Outcome.TEMPFAIL, replies.LOCAL_ERROR, "broken")
    assert "KeyError" in d.error and "zone" in d.error


def test_a_check_may_fail_closed_with_a_5xx_failure_reply():
    class Broken(Check):
        name = "strict"
        failure_reply = Reply(554, "5.7.0", "policy unavailable")

        def mail(self, ctx):
            raise RuntimeError("down")

    d = run(Pipeline([Broken()]))
    assert (d.outcome, d.reply.code, d.check) == (Outcome.REJECT, 554, "strict")


def test_a_wrong_return_value_is_a_failure_never_an_accept():
    d = run(Pipeline([Fixed("odd", result=None)]))  # type: ignore[arg-type]
    assert d.outcome is Outcome.TEMPFAIL and d.check == "odd" and "NoneType" in d.error


def test_a_refusal_with_a_positive_reply_is_still_a_refusal():
    d = run(Pipeline([Fixed("sloppy", CheckResult(Outcome.REJECT, Reply(250, "2.0.0", "ok")))]))
    assert d.outcome is Outcome.REJECT and d.reply == replies.LOCAL_ERROR


def test_the_pipeline_refuses_checks_that_could_fail_open_or_collide():
    with pytest.raises(ValueError, match="never accept"):
        Pipeline([Fixed("open", failure_reply=Reply(250, "2.0.0", "ok"))])
    with pytest.raises(ValueError, match="unique"):
        Pipeline([Fixed("x"), Fixed("x")])
    with pytest.raises(ValueError, match="timeout"):
        Pipeline([Fixed("x", timeout=0)])
    with pytest.raises(ValueError):
        reject(LATER)
    with pytest.raises(ValueError):
        tempfail(DENIED)


def test_the_synchronous_path_needs_no_event_loop():
    # No task, no await: run() answers outside any loop when every check answers at once.
    d = Pipeline([Fixed("a"), Fixed("b")]).run(Stage.MAIL, ctx())
    assert isinstance(d, Decision) and d.accepted


def test_a_stage_without_hooks_is_accepted_at_once():
    p = Pipeline([Fixed("mail_only")])
    assert p.run(Stage.HELO, ctx()) is ACCEPT_DECISION
    assert not p.has_hooks(Stage.CONNECT) and p.has_hooks(Stage.MAIL)
    c = Context(ClientInfo(ip="192.0.2.1"), rcpt=Path("bob@example.test", "bob", "example.test"))
    assert p.run(Stage.RCPT, c).recipients == ("bob@example.test",)


def test_rcpt_recipients_are_replaced_and_seen_by_later_checks():
    seen = []

    class Expand(Check):
        name = "expand"

        def rcpt(self, ctx):
            return accept(recipients=("alice@example.test", "bob@example.test"))

    class Look(Check):
        name = "look"

        def rcpt(self, ctx):
            seen.append(ctx.recipients)
            return ACCEPTED

    c = Context(ClientInfo(ip="192.0.2.1"), rcpt=Path("info@example.test", "info", "example.test"))
    d = Pipeline([Expand(), Look()]).run(Stage.RCPT, c)
    assert seen == [("alice@example.test", "bob@example.test")] and d.recipients == seen[0]


def test_context_slices_header_and_body_on_demand():
    c = Context(ClientInfo(ip="192.0.2.1"), content=b"A: 1\r\nB: 2\r\n\r\nbody\r\n", header_end=10)
    assert c.header == b"A: 1\r\nB: 2\r\n" and c.body == b"body\r\n"
    c = Context(ClientInfo(ip="192.0.2.1"), content=b"A: 1\r\n", header_end=-1)
    assert c.header == b"A: 1\r\n" and c.body == b""


# -- checks that need I/O ------------------------------------------------------------------


def test_an_async_check_is_awaited_then_the_rest_run_in_order():
    calls: list[str] = []
    p = Pipeline([Fixed("a", accept(score=1.0), calls), Slow("dns", accept(score=2.0), calls),
                  Fixed("b", calls=calls), Slow("av", accept(headers=(("X-AV", "clean"),)), calls),
                  Fixed("c", calls=calls)])
    pending = p.run(Stage.MAIL, ctx())
    assert isinstance(pending, Pending) and pending.check.name == "dns"
    assert calls == ["a", "dns"]  # nothing after the awaitable ran yet
    d = asyncio.run(pending.resolve())
    assert calls == ["a", "dns", "b", "av", "c"]
    assert d.accepted and d.score == 3.0 and d.headers == (("X-AV", "clean"),)


def test_an_async_refusal_decides():
    calls: list[str] = []
    d = run(Pipeline([Slow("dnsbl", reject(DENIED), calls), Fixed("later", calls=calls)]))
    assert (d.outcome, d.check, calls) == (Outcome.REJECT, "dnsbl", ["dnsbl"])


def test_a_check_that_does_not_answer_in_time_tempfails_naming_it():
    async def main() -> Decision:
        slow = Slow("dns", timeout=0.01)
        slow.release.clear()  # never answers
        pending = Pipeline([slow, Fixed("after")]).run(Stage.MAIL, ctx())
        assert isinstance(pending, Pending)
        return await pending.resolve()

    d = asyncio.run(main())
    assert (d.outcome, d.reply, d.check) == (Outcome.TEMPFAIL, replies.LOCAL_ERROR, "dns")
    assert "no answer within" in d.error


def test_an_async_check_that_raises_tempfails_naming_it():
    class Failing(Check):
        name = "resolver"

        async def mail(self, ctx):
            raise OSError("network unreachable")

    d = run(Pipeline([Failing()]))
    assert (d.outcome, d.check) == (Outcome.TEMPFAIL, "resolver") and "network unreachable" in d.error


def test_a_pending_never_resolved_releases_its_coroutine():
    # filterwarnings=error turns "coroutine was never awaited" into a failure.
    pending = Pipeline([Slow("dns")]).run(Stage.MAIL, ctx())
    assert isinstance(pending, Pending)
    pending.discard()


# -- the standard checks -------------------------------------------------------------------

CONFIG = """
[server]
hostname = "mx1.example.test"
data_dir = "/nonexistent"
[smtp]
min_free_disk = "1MB"
[[domain]]
name = "example.test"
mailboxes = ["alice", "bob"]
aliases = { info = ["alice", "bob", "someone@elsewhere.example"] }
quota = "2KB"
[[domain]]
name = "open.example"
mailboxes = ["carol"]
"""


def rcpt_ctx(address: str, recipients: tuple[str, ...]) -> Context:
    local, _, domain = address.partition("@")
    c = Context(ClientInfo(ip="192.0.2.1"), rcpt=Path(address, local, domain))
    c.recipients = recipients
    return c


def test_quota_check_looks_up_usage_in_an_executor_and_returns_effects():
    usage = {"alice": 5000, "bob": 10}
    asked: list[tuple[str, str]] = []

    def lookup(domain: str, local: str) -> int:
        asked.append((domain, local))
        return usage[local]

    check = QuotaCheck(parse_config(CONFIG), lookup)
    # A mailbox in a domain without a quota, or a foreign address, answers at once.
    assert check.rcpt(rcpt_ctx("carol@open.example", ("carol@open.example",))) is ACCEPTED
    aw = check.rcpt(rcpt_ctx("bob@example.test", ("bob@example.test",)))
    r = asyncio.run(aw)
    assert r.outcome is Outcome.ACCEPT and r.effects == (QuotaUnder("bob@example.test"),)
    r = asyncio.run(check.rcpt(rcpt_ctx("info@example.test",
                                        ("bob@example.test", "alice@example.test", "someone@elsewhere.example"))))
    assert r.outcome is Outcome.TEMPFAIL and r.reply == replies.OVER_QUOTA
    assert r.effects == (QuotaUnder("bob@example.test"), QuotaOver("alice@example.test", 5000, 2000))
    assert ("elsewhere.example", "someone") not in asked


def test_quota_check_treats_an_unreadable_mailbox_as_empty():
    def lookup(domain: str, local: str) -> int:
        raise PermissionError("denied")

    r = asyncio.run(QuotaCheck(parse_config(CONFIG), lookup).rcpt(rcpt_ctx("bob@example.test", ("bob@example.test",))))
    assert r.outcome is Outcome.ACCEPT


def test_free_disk_check_reads_the_probe_the_listener_refreshes():
    free = [10**12]
    check = FreeDiskCheck(parse_config(CONFIG), lambda: free[0])
    check.refresh()
    assert check.mail(ctx()) is ACCEPTED
    free[0] = 10
    assert check.mail(ctx()) is ACCEPTED  # no I/O in the hook: the last probe still holds
    check.refresh()
    assert check.mail(ctx()).reply == replies.LOW_DISK

    def broken() -> int:
        raise OSError("EIO")

    check = FreeDiskCheck(parse_config(CONFIG), broken)
    check.refresh()
    assert check.mail(ctx()).reply == replies.LOW_DISK  # an unreadable file system counts as full


def test_loop_check_counts_received_fields():
    def data_ctx(n: int) -> Context:
        content = b"Received: x\r\n" * n + b"Subject: s\r\n\r\nReceived: in the body\r\n"
        return Context(ClientInfo(ip="192.0.2.1"), content=content, header_end=content.find(b"\r\n\r\n"))

    assert LoopCheck().data(data_ctx(MAX_RECEIVED - 1)) is ACCEPTED
    assert LoopCheck().data(data_ctx(MAX_RECEIVED)).reply == replies.MAIL_LOOP


def test_a_graver_classification_is_not_replaced_by_a_later_check():
    from kanmon.policy.pipeline import Check, Context, accept

    class Virus(Check):
        name = "virus"

        def data(self, ctx):
            return accept(quarantine="virus X", classification="Virus")

    class Spam(Check):
        name = "spam"

        def data(self, ctx):
            return accept(classification="Spam")

    from kanmon.model import ClientInfo, Envelope
    from kanmon.policy.pipeline import Pipeline, Stage

    d = Pipeline([Virus(), Spam()]).run(Stage.DATA, Context(ClientInfo("192.0.2.1"), Envelope("a@b", ["c@d"]),
                                                           content=b"x\r\n\r\ny", header_end=1))
    assert d.classification == "Virus" and d.quarantine == "virus X"


# -- the hooks a session profile switches off are left out of its list --------------------

PROFILE_CONFIG = """
[server]
hostname = "mx1.example.test"
[smtp]
relay_networks = ["127.0.0.1/32"]
[[domain]]
name = "example.test"
mailboxes = ["alice"]
"""


def _names(pipeline: Pipeline, profile, stage: Stage) -> list[str]:
    return [c.name for c, _ in pipeline.hooks_for(profile)[stage]]


def _standard(text: str) -> tuple[object, Pipeline]:
    from kanmon.policy.dns import CheckResolver
    from kanmon.policy.standard import standard_pipeline
    from kanmon.state.api import MemoryState

    cfg = parse_config(text)
    resolver = CheckResolver(servers=[("127.0.0.1", 53)], timeout=1.0)
    return cfg, standard_pipeline(cfg, free_disk=lambda: 10**12, resolver=resolver, state=MemoryState())


def test_a_check_the_profile_switches_off_is_not_in_its_pipeline():
    cfg, p = _standard(PROFILE_CONFIG)
    default, trusted = cfg.session_profiles["default"], cfg.session_profiles["trusted"]
    every = [c.name for c, _ in p.hooks_for(None)[Stage.MAIL]]
    assert "helo_syntax" in every and "sender_domain" in every  # built, asked when no profile is known
    # default: helo_strict and helo_resolvable false; sender domain and own-domain spoof checks on.
    assert _names(p, default, Stage.MAIL) == [n for n in every if n not in ("helo_syntax", "helo_resolvable")]
    assert {"sender_domain", "sender_spoof", "helo_own"} <= set(_names(p, default, Stage.MAIL))
    # trusted: no sender domain check, no spoof or own-HELO check.
    assert not {"helo_syntax", "helo_own", "sender_spoof", "sender_domain"} & set(_names(p, trusted, Stage.MAIL))
    assert "free_disk" in _names(p, trusted, Stage.MAIL) and "client_ptr" in _names(p, trusted, Stage.MAIL)
    assert "greylist" not in _names(p, default, Stage.RCPT)  # no profile greylists: not even built
    assert p.has_hooks(Stage.CONNECT, default) and not p.has_hooks(Stage.HELO, default)


def test_enabling_a_check_in_a_reload_adds_it():
    cfg, p = _standard(PROFILE_CONFIG)
    assert "helo_syntax" not in _names(p, cfg.session_profiles["default"], Stage.MAIL)
    # The reload's configuration turns the default profile's HELO syntax check and
    # greylisting on; the pipeline built for it asks them, the old one still does not.
    cfg2, p2 = _standard(PROFILE_CONFIG + '[[session_profile]]\nname = "default"\nhelo_strict = true\ngreylist = true\n')
    default2 = cfg2.session_profiles["default"]
    assert "helo_syntax" in _names(p2, default2, Stage.MAIL)
    assert _names(p2, default2, Stage.RCPT)[-1] == "greylist"
    assert "greylist" not in _names(p2, cfg2.session_profiles["trusted"], Stage.RCPT)
    assert "helo_syntax" not in _names(p, cfg.session_profiles["default"], Stage.MAIL)
    # And it decides: a HELO that is not a host name is refused at MAIL for that profile only.
    c = Context(ClientInfo(ip="192.0.2.9", helo="localhost"), sender=Path("a@example.test", "a", "example.test"))
    c.profile = default2
    assert p2.run(Stage.MAIL, c).check == "helo_syntax"
    c.profile = cfg.session_profiles["default"]
    d = p.run(Stage.MAIL, c)  # past the HELO checks, waiting for the client's name
    assert isinstance(d, Pending) and d.check.name == "client_ptr"
    d.discard()


class Switched(Fixed):
    """Fixed, with its MAIL hook active only for profiles named in `on`."""

    def __init__(self, name: str, on: set[str], **kw):
        super().__init__(name, **kw)
        self.on = on

    def active(self, stage: Stage, profile) -> bool:
        return profile.name in self.on


def test_a_switched_off_hook_is_never_called_and_a_new_profile_gets_its_list():
    cfg = parse_config(PROFILE_CONFIG)
    calls: list[str] = []
    p = Pipeline([Switched("a", {"trusted"}, calls=calls), Fixed("b", calls=calls)], cfg.session_profiles.values())
    c = ctx()
    c.profile = cfg.session_profiles["default"]
    assert p.run(Stage.MAIL, c).accepted and calls == ["b"]
    c.profile = cfg.session_profiles["trusted"]
    calls.clear()
    assert p.run(Stage.MAIL, c).accepted and calls == ["a", "b"]
    # A profile the pipeline was not built with (another configuration's) gets its own list.
    other = parse_config(PROFILE_CONFIG).session_profiles["default"]
    c.profile = other
    calls.clear()
    assert p.run(Stage.MAIL, c).accepted and calls == ["b"]
    c.profile = None  # no profile known: every hook is asked
    calls.clear()
    assert p.run(Stage.MAIL, c).accepted and calls == ["a", "b"]
