"""The retry planner (kanmon.queue.plan): every case of what follows an attempt, without a queue."""

from __future__ import annotations

import random

import pytest

from kanmon.model import Envelope, RecipientResult, Reply, Status
from kanmon.queue.plan import (
    DELAYED,
    FAILED,
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
