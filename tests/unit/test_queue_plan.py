"""The retry planner (kanmon.queue.plan): every case of what follows an attempt, without a queue."""

from __future__ import annotations

import random

import pytest

from kanmon.model import Envelope, RecipientResult, Reply, Status
from kanmon.queue.plan import (
    DELAYED,
    DELIVERED,
    FAILED,
    RELAYED,
    NoticeRequest,
    Settings,
    attempt_now,
    plan_attempt,
    retry_delay,
)
from kanmon.spool import journal
from kanmon.spool.journal import QueueState

HOUR = 3600.0
ARRIVED = 1_800_000_000.0
SETTINGS = Settings(retry_first=300.0, retry_most=HOUR, warn_after=4 * HOUR, lifetime=72 * HOUR)
OK = Reply(250, "2.0.0", "Ok")
LATER = Reply(451, "4.3.0", "try later")
UNKNOWN = Reply(550, "5.1.1", "User unknown")


class NoJitter:
    """The lower bound of the jitter: delays are exact."""

    def uniform(self, a: float, b: float) -> float:
        return a


class MostJitter:
    def uniform(self, a: float, b: float) -> float:
        return b


def env(mail_from: str = "alice@example.test", **kw) -> Envelope:
    return Envelope(mail_from, ["bob@dest.example", "carol@dest.example"], received_at=ARRIVED, **kw)


def res(rcpt: str, status: Status, reply: Reply) -> RecipientResult:
    return RecipientResult(rcpt, status, reply, "mx.dest.example [192.0.2.1]:25", "esmtp", "")


def plan(results, *, age=60.0, state=None, settings=SETTINGS, e=None, rng=None, notices=True):
    return plan_attempt(e or env(), state or QueueState(), results, settings, ARRIVED + age, rng or NoJitter(),
                        notices=notices)


SENT_BOTH = [res("bob@dest.example", Status.SENT, OK), res("carol@dest.example", Status.SENT, OK)]
DEFER_ONE = [res("bob@dest.example", Status.SENT, OK), res("carol@dest.example", Status.DEFERRED, LATER)]


def test_all_delivered_removes_without_journal():
    p = plan(SENT_BOTH)
    assert p.remove and p.retry_at is None and not p.expired
    assert p.journal == () and p.notices == () and p.no_notice == ()
    assert p.results == tuple(SENT_BOTH)


def test_deferred_retries_after_the_first_interval_and_journals_results_then_attempt():
    now = ARRIVED + 60
    p = plan(DEFER_ONE)
    assert not p.remove and p.retry_at == now + 300
    assert p.journal == (
        journal.Result(now, "bob@dest.example", "sent", "250 2.0.0 Ok", "mx.dest.example [192.0.2.1]:25", "esmtp"),
        journal.Result(now, "carol@dest.example", "deferred", "451 4.3.0 try later",
                       "mx.dest.example [192.0.2.1]:25", "esmtp"),
        journal.Attempt(now, 1, now + 300),
    )
    assert p.notices == () and not p.warn


@pytest.mark.parametrize("attempts, delay", [(0, 300), (1, 600), (2, 1200), (3, 2400), (4, 3600), (9, 3600)])
def test_retry_interval_doubles_up_to_the_most(attempts, delay):
    p = plan(DEFER_ONE, state=QueueState(attempts=attempts))
    assert p.retry_at == ARRIVED + 60 + delay
    assert p.journal[-1] == journal.Attempt(ARRIVED + 60, attempts + 1, ARRIVED + 60 + delay)


def test_jitter_is_upward_by_at_most_ten_percent_and_capped():
    assert plan(DEFER_ONE, rng=MostJitter()).retry_at == pytest.approx(ARRIVED + 60 + 330)
    assert plan(DEFER_ONE, state=QueueState(attempts=4), rng=MostJitter()).retry_at == ARRIVED + 60 + HOUR
    rng = random.Random(7)
    for n in range(1, 8):
        d = retry_delay(n, 300, HOUR, rng)
        assert min(HOUR, 300 * 2 ** (n - 1)) <= d <= min(HOUR, 330 * 2 ** (n - 1))


def test_permanent_failure_is_final_and_asks_for_a_failure_notice():
    results = [res("bob@dest.example", Status.SENT, OK), res("carol@dest.example", Status.BOUNCED, UNKNOWN)]
    p = plan(results)
    assert p.remove and p.retry_at is None
    assert [type(r) for r in p.journal] == [journal.Result, journal.Result]
    assert p.notices == (NoticeRequest(FAILED, (results[1],)),)


def test_warn_after_sends_one_delay_notice():
    p = plan(DEFER_ONE, age=4 * HOUR)
    assert p.warn and p.notices == (NoticeRequest(DELAYED, (DEFER_ONE[1],)),)
    assert p.journal[-1] == journal.Warned(ARRIVED + 4 * HOUR)
    # Once warned, never again.
    again = plan(DEFER_ONE, age=8 * HOUR, state=QueueState(attempts=5, warned=True))
    assert not again.warn and again.notices == () and not any(isinstance(r, journal.Warned) for r in again.journal)
    # Before warn_after: no notice.
    assert not plan(DEFER_ONE, age=4 * HOUR - 1).warn


def test_warn_after_zero_never_warns():
    p = plan(DEFER_ONE, age=70 * HOUR, settings=Settings(300, HOUR, 0, 72 * HOUR))
    assert not p.warn and p.notices == ()


def test_lifetime_reached_turns_deferred_into_bounced():
    p = plan(DEFER_ONE, age=72 * HOUR, state=QueueState(attempts=20, warned=True))
    assert p.expired and p.remove and p.retry_at is None
    carol = p.results[1]
    assert carol.status is Status.BOUNCED and carol.reply == LATER  # the last reply is kept
    assert p.journal[1] == journal.Result(ARRIVED + 72 * HOUR, "carol@dest.example", "bounced",
                                          "451 4.3.0 try later", "mx.dest.example [192.0.2.1]:25", "esmtp")
    assert not any(isinstance(r, journal.Attempt) for r in p.journal)
    assert p.notices == (NoticeRequest(FAILED, (carol,)),)


def test_lifetime_zero_bounces_a_temporary_failure_at_once():
    p = plan(DEFER_ONE, age=0.0, settings=Settings(300, HOUR, 4 * HOUR, 0))
    assert p.expired and p.remove and p.results[1].status is Status.BOUNCED
    assert [n.action for n in p.notices] == [FAILED]


def test_expiry_only_when_something_is_deferred():
    p = plan(SENT_BOTH, age=100 * HOUR)
    assert not p.expired and p.remove and p.journal == ()


@pytest.mark.parametrize("e", [env(""), env(is_notice=True)], ids=["null sender", "a notice"])
def test_no_notice_about_mail_from_null_or_about_a_notice(e):
    bounced = [res("bob@dest.example", Status.BOUNCED, UNKNOWN), res("carol@dest.example", Status.DEFERRED, LATER)]
    p = plan(bounced, age=5 * HOUR, e=e)
    assert p.notices == () and p.no_notice == (FAILED,) and not p.warn
    assert not any(isinstance(r, journal.Warned) for r in p.journal)


def test_a_node_without_notices_plans_none_and_reports_none():
    bounced = [res("bob@dest.example", Status.BOUNCED, UNKNOWN), res("carol@dest.example", Status.DEFERRED, LATER)]
    p = plan(bounced, age=5 * HOUR, notices=False)
    assert p.notices == () and p.no_notice == () and not p.warn


def test_failure_and_delay_notice_in_one_attempt_failure_first():
    mixed = [res("bob@dest.example", Status.BOUNCED, UNKNOWN), res("carol@dest.example", Status.DEFERRED, LATER)]
    p = plan(mixed, age=5 * HOUR)
    assert [n.action for n in p.notices] == [FAILED, DELAYED]
    assert [type(r) for r in p.journal] == [journal.Result, journal.Result, journal.Attempt, journal.Warned]


def test_a_held_message_is_not_attempted_nor_rescheduled():
    held = QueueState(hold=True)
    assert not attempt_now(held) and attempt_now(QueueState())
    p = plan(DEFER_ONE, state=held)
    assert p.retry_at is None and not p.remove
    assert isinstance(p.journal[-1], journal.Attempt)  # the backoff still counts


def test_received_at_missing_counts_as_now():
    e = Envelope("alice@example.test", ["carol@dest.example"])
    p = plan([res("carol@dest.example", Status.DEFERRED, LATER)], e=e, settings=Settings(300, HOUR, 1, 1))
    assert not p.expired and not p.warn


# -- warn_every: the delay notice again, every so often ---------------------------------------

REPEAT = Settings(300, HOUR, 4 * HOUR, 72 * HOUR, warn_every=4 * HOUR)


def test_warn_every_repeats_the_delay_notice_counting_from_the_last_one():
    first = plan(DEFER_ONE, age=4 * HOUR, settings=REPEAT)
    assert first.warn and first.journal[-1] == journal.Warned(ARRIVED + 4 * HOUR)
    state = QueueState(attempts=5)
    for rec in first.journal:
        state.apply(rec)
    assert state.warned and state.warned_at == ARRIVED + 4 * HOUR
    assert not plan(DEFER_ONE, age=8 * HOUR - 1, state=state, settings=REPEAT).warn  # not yet 4h since
    again = plan(DEFER_ONE, age=8 * HOUR + 600, state=state, settings=REPEAT)
    assert again.warn and again.journal[-1] == journal.Warned(ARRIVED + 8 * HOUR + 600)
    # The default (warn_every 0) is one notice, whatever the time since.
    assert not plan(DEFER_ONE, age=50 * HOUR, state=state).warn


def test_an_old_journal_warned_line_gives_the_time_of_the_last_notice():
    raw = b'{"k":"warned","t":100.0}\n{"k":"attempt","t":150.0,"n":3,"next":200.0}\n{"k":"warned","t":300.0}\n'
    state = QueueState.from_bytes(raw)
    assert state.warned and state.warned_at == 300.0 and state.refused == 0


# -- min_attempts: a greylisting server gets its retry even with lifetime 0 ----------------------

GREYLIST = Reply(451, "4.7.1", "Greylisted, try again in 5 minutes")


def test_lifetime_zero_with_min_attempts_two_retries_once_then_bounces():
    greylisted = [res("carol@dest.example", Status.DEFERRED, GREYLIST)]
    e = Envelope("alice@example.test", ["carol@dest.example"], received_at=ARRIVED)
    s = Settings(300, HOUR, 4 * HOUR, 0, min_attempts=2)
    first = plan(greylisted, age=0.0, settings=s, e=e)
    assert not first.expired and not first.remove and first.retry_at == ARRIVED + 300 and first.notices == ()
    second = plan(greylisted, age=300.0, settings=s, e=e, state=QueueState(attempts=1))
    assert second.expired and second.remove and [n.action for n in second.notices] == [FAILED]
    # Delivered at the retry: no notice at all.
    ok = plan([res("carol@dest.example", Status.SENT, OK)], age=300.0, settings=s, e=e, state=QueueState(attempts=1))
    assert ok.remove and ok.notices == ()


def test_min_attempts_also_holds_a_message_past_its_lifetime():
    s = Settings(300, HOUR, 4 * HOUR, 72 * HOUR, min_attempts=3)
    assert not plan(DEFER_ONE, age=80 * HOUR, settings=s, state=QueueState(attempts=1)).expired
    assert plan(DEFER_ONE, age=80 * HOUR, settings=s, state=QueueState(attempts=2)).expired


def test_min_attempts_default_from_the_config():
    from kanmon.config import parse_config

    def settings(queue: str) -> Settings:
        return Settings.from_config(parse_config(f'[server]\nhostname = "h.example"\n[queue]\n{queue}\n').queue)

    assert settings('lifetime = "0"').min_attempts == 2
    assert settings('lifetime = "3d"').min_attempts == 1
    assert settings('lifetime = "0"\nmin_attempts = 1').min_attempts == 1
    assert settings('warn_every = "4h"').warn_every == 4 * HOUR
    with pytest.raises(Exception, match="min_attempts"):
        settings("min_attempts = 0")


# -- NOTIFY (RFC 3461): which notices the sender asked for ----------------------------------------

LOCAL_OK = RecipientResult("bob@dest.example", Status.SENT, Reply(250, "2.0.0", "delivered to maildir"), "local", "local")


def test_notify_never_means_no_notice_of_any_kind():
    e = env(dsn_notify={"bob@dest.example": "NEVER", "carol@dest.example": "NEVER"})
    mixed = [res("bob@dest.example", Status.BOUNCED, UNKNOWN), res("carol@dest.example", Status.DEFERRED, LATER)]
    p = plan(mixed, age=5 * HOUR, e=e)
    assert p.notices == () and not p.warn and p.no_notice == ()
    assert p.not_requested == (FAILED,)  # reported for failures (a delay would be at every retry)
    assert not any(isinstance(r, journal.Warned) for r in p.journal)


def test_notify_without_failure_or_delay_leaves_out_only_that_kind_and_those_recipients():
    e = env(dsn_notify={"bob@dest.example": "DELAY", "carol@dest.example": "FAILURE"})
    both_bounce = [res("bob@dest.example", Status.BOUNCED, UNKNOWN), res("carol@dest.example", Status.BOUNCED, UNKNOWN)]
    p = plan(both_bounce, e=e)
    assert [(n.action, [r.rcpt for r in n.results]) for n in p.notices] == [(FAILED, ["carol@dest.example"])]
    both_late = [res("bob@dest.example", Status.DEFERRED, LATER), res("carol@dest.example", Status.DEFERRED, LATER)]
    p = plan(both_late, age=5 * HOUR, e=e)
    assert [(n.action, [r.rcpt for r in n.results]) for n in p.notices] == [(DELAYED, ["bob@dest.example"])]


def test_notify_success_asks_for_a_success_notice_delivered_or_relayed():
    e = env(dsn_notify={"bob@dest.example": "SUCCESS", "carol@dest.example": "SUCCESS,FAILURE"})
    relayed = res("carol@dest.example", Status.SENT, OK)
    p = plan([LOCAL_OK, relayed], e=e)
    assert p.remove and p.journal == ()
    assert p.notices == (NoticeRequest(DELIVERED, (LOCAL_OK,)), NoticeRequest(RELAYED, (relayed,)))
    # Without NOTIFY=SUCCESS: no success notice (the default is failures and delays).
    assert plan([LOCAL_OK, relayed]).notices == ()


def test_a_next_hop_that_took_the_dsn_request_sends_the_success_notice_itself():
    e = env(dsn_notify={"bob@dest.example": "SUCCESS", "carol@dest.example": "SUCCESS"})
    passed = RecipientResult("carol@dest.example", Status.SENT, OK, "mx.dest.example [192.0.2.1]:25", "esmtp",
                             dsn_passed=True)
    assert plan([LOCAL_OK, passed], e=e).notices == (NoticeRequest(DELIVERED, (LOCAL_OK,)),)


@pytest.mark.parametrize("e", [env("", dsn_notify={"bob@dest.example": "SUCCESS"}),
                               env(is_notice=True, dsn_notify={"bob@dest.example": "SUCCESS"})],
                         ids=["null sender", "a notice"])
def test_no_success_notice_to_null_or_about_a_notice(e):
    assert plan([LOCAL_OK], e=e).notices == ()


def test_a_node_without_notices_plans_no_success_notice():
    e = env(dsn_notify={"bob@dest.example": "SUCCESS"})
    assert plan([LOCAL_OK], e=e, notices=False).notices == ()
