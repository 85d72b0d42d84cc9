"""The session and the check pipeline, driven by bytes: the WAIT_CHECK state while a check
needs I/O (pipelined input stays buffered), and what the checks' decisions become."""

from __future__ import annotations

import asyncio

from kanmon.config import parse_config
from kanmon.model import ClientInfo, Reply
from kanmon.policy.pipeline import ACCEPTED, Check, Context, Decision, Pipeline, accept, reject
from kanmon.policy.standard import standard_checks
from kanmon.smtp import replies
from kanmon.smtp.session import (
    CarryOut,
    Close,
    Rejected,
    RunChecks,
    Session,
    SessionSettings,
    StartTls,
    State,
    StoreMessage,
)
from tests.protocol.test_session import CONFIG, codes, sent, stores

DENIED = Reply(550, "5.7.1", "Sender address rejected: test")


class AsyncAt(Check):
    """Answers at one stage with an awaitable (as a DNS lookup would)."""

    def __init__(self, stage: str, result=ACCEPTED, name: str = "slow"):
        self.name = name
        self.result = result
        setattr(self, stage, self._hook)

    def _hook(self, ctx: Context):
        return self._answer()

    async def _answer(self):
        return self.result


class SyncAt(Check):
    def __init__(self, stage: str, result, name: str = "sync"):
        self.name = name
        setattr(self, stage, lambda ctx: result)


def session(*extra: Check, ip: str = "127.0.0.1", **settings) -> Session:
    cfg = parse_config(CONFIG)
    pipeline = Pipeline([*standard_checks(cfg, free_disk=lambda: 10**12), *extra])
    pipeline.refresh()
    s = SessionSettings(hostname="mx1.example.test", max_message_size=cfg.smtp.max_message_size,
                        max_recipients=100, **settings)
    return Session(s, pipeline, ClientInfo(ip=ip), now=1_700_000_000.0)


def ehlo(s: Session) -> Session:
    s.greeting()
    assert codes(s.feed(b"EHLO client.example\r\n")) == ["250"]
    return s


def pending(actions) -> RunChecks:
    runs = [a for a in actions if isinstance(a, RunChecks)]
    assert len(runs) == 1, actions
    return runs[0]


def resolve(action: RunChecks):
    return asyncio.run(action.pending.resolve())


MAIL = b"MAIL FROM:<sender@remote.example>\r\n"
RCPT = b"RCPT TO:<alice@example.test>\r\n"
BODY = b"Subject: hi\r\n\r\nhello\r\n.\r\n"


def test_pipelined_commands_wait_behind_a_pending_rcpt_check():
    s = ehlo(session(AsyncAt("rcpt")))
    out = s.feed(MAIL + RCPT + b"DATA\r\n" + BODY)
    assert codes(out) == ["250"]  # MAIL; RCPT waits for its check
    run = pending(out)
    assert s.state is State.WAIT_CHECK and s.waiting and s.buffered() > 0
    assert s.feed(b"NOOP\r\n") == []  # still waiting: more input is only buffered
    out = s.check_result(resolve(run))
    assert codes(out) == ["250", "354"] and len(stores(out)) == 1
    assert stores(out)[0].envelope.rcpts == ["alice@example.test"]
    out = s.message_stored(stores(out)[0].queue_id)
    assert codes(out) == ["250", "250"]  # the message, then the NOOP sent while waiting


def test_a_pending_refusal_is_answered_in_order_and_names_the_check():
    s = ehlo(session(AsyncAt("rcpt", reject(DENIED), name="dnsbl")))
    out = s.feed(MAIL + RCPT + b"DATA\r\n")
    out = s.check_result(resolve(pending(out)))
    assert sent(out) == DENIED.wire() + replies.NEED_RCPT.wire()  # the refused RCPT, then DATA without one
    r = [a for a in out if isinstance(a, Rejected)][0]
    assert (r.command, r.check, r.rcpt, r.classification) == ("RCPT", "dnsbl", "alice@example.test", "Policy")
    assert s.state is State.MAIL


def test_a_check_that_failed_tempfails_with_the_error_for_the_event():
    class Never(Check):
        name = "dns"
        timeout = 0.01

        async def mail(self, ctx):
            await asyncio.Event().wait()

    s = ehlo(session(Never()))
    out = s.check_result(resolve(pending(s.feed(MAIL))))
    assert sent(out) == replies.LOCAL_ERROR.wire()
    r = [a for a in out if isinstance(a, Rejected)][0]
    assert (r.command, r.check) == ("MAIL", "dns") and "no answer" in r.error


def test_quit_while_waiting_is_answered_after_the_check():
    s = ehlo(session(AsyncAt("mail")))
    out = s.feed(MAIL + b"QUIT\r\n")
    assert codes(out) == [] and s.state is State.WAIT_CHECK
    out = s.check_result(resolve(pending(out)))
    assert codes(out) == ["250", "221"] and isinstance(out[-1], Close) and s.state is State.CLOSED


def test_closed_while_waiting_the_result_is_dropped():
    s = ehlo(session(AsyncAt("mail")))
    run = pending(s.feed(MAIL + RCPT))
    out = s.close(replies.SHUTTING_DOWN)
    assert codes(out) == ["421"] and s.state is State.CLOSED
    # The listener's task never ran it: the session released the coroutine (no warning).
    assert run.pending._awaitable is None
    assert s.check_result(Decision()) == []


def test_starttls_pipelined_behind_a_pending_check_still_discards_what_follows_it():
    # CVE-2011-0411: the plaintext after STARTTLS is dropped even when STARTTLS itself
    # waited in the buffer for a check.
    s = session(AsyncAt("helo"))
    s.greeting()
    out = s.feed(b"EHLO client.example\r\nSTARTTLS\r\nMAIL FROM:<evil@remote.example>\r\n")
    assert codes(out) == []
    out = s.check_result(resolve(pending(out)))
    assert codes(out) == ["250", "220"] and isinstance(out[-1], StartTls)
    assert s.buffered() == 0
    assert codes(s.tls_started("TLSv1.3", "TLS_AES_256_GCM_SHA384", 256)) == []
    assert codes(s.feed(MAIL)) == ["503"]  # EHLO again first: nothing injected was kept


def test_a_pending_data_check_adds_headers_and_classification_to_the_stored_message():
    s = ehlo(session(AsyncAt("data", accept(headers=(("X-Spam-Score", "7.5\r\nInjected: yes"),),
                                            classification="Spam", score=7.5))))
    out = s.feed(MAIL + RCPT + b"DATA\r\n" + BODY + b"NOOP\r\n")
    assert codes(out) == ["250", "250", "354"]
    out = s.check_result(resolve(pending(out)))
    [store] = stores(out)
    assert isinstance(store, StoreMessage) and (store.classification, store.score) == ("Spam", 7.5)
    header = store.content.split(b"\r\n\r\n", 1)[0]
    assert b"\r\nX-Spam-Score: 7.5 Injected: yes\r\nSubject: hi" in header  # no line break gets through
    assert header.startswith(b"Received: ")
    assert codes(s.message_stored(store.queue_id)) == ["250", "250"]


def test_a_pending_data_refusal_ends_the_transaction():
    s = ehlo(session(AsyncAt("data", reject(Reply(554, "5.7.1", "Message content rejected")), name="rules")))
    out = s.feed(MAIL + RCPT + b"DATA\r\n" + BODY)
    out = s.check_result(resolve(pending(out)))
    assert codes(out) == ["554"] and stores(out) == []
    r = [a for a in out if isinstance(a, Rejected)][0]
    assert (r.command, r.check) == ("DATA", "rules") and s.state is State.READY


def test_accepted_mail_is_classified_notspam_by_default():
    s = ehlo(session())
    out = s.feed(MAIL + RCPT + b"DATA\r\n" + BODY)
    assert stores(out)[0].classification == "NotSpam"


def test_the_standard_checks_answer_at_once():
    s = ehlo(session())
    out = s.feed(MAIL + RCPT + b"RCPT TO:<nobody@example.test>\r\nRCPT TO:<x@foreign.example>\r\n")
    assert not [a for a in out if isinstance(a, RunChecks)]
    assert codes(out) == ["250", "250", "550", "250"]  # 127.0.0.1 is a relay client
    rejected = [a for a in out if isinstance(a, Rejected)]
    assert [(r.check, r.reply) for r in rejected] == [("local_recipients", replies.UNKNOWN_USER)]


def test_relay_denied_names_the_relay_check():
    s = ehlo(session(ip="192.0.2.9"))
    out = s.feed(MAIL + b"RCPT TO:<x@foreign.example>\r\n")
    [r] = [a for a in out if isinstance(a, Rejected)]
    assert (r.check, r.reply) == ("relay_access", replies.RELAY_DENIED)


def test_a_loop_is_refused_by_the_loop_check():
    s = ehlo(session())
    out = s.feed(MAIL + RCPT + b"DATA\r\n" + b"Received: x\r\n" * 50 + BODY)
    [r] = [a for a in out if isinstance(a, Rejected)]
    assert (r.command, r.check, r.reply) == ("DATA", "loop", replies.MAIL_LOOP)


def test_effects_of_an_immediate_decision_go_to_the_listener():
    s = ehlo(session(SyncAt("mail", accept(effects=("count-this",)))))
    out = s.feed(MAIL)
    carry = [a for a in out if isinstance(a, CarryOut)]
    assert codes(out) == ["250"] and [c.effects for c in carry] == [("count-this",)]


def test_a_connect_check_can_refuse_the_greeting():
    s = session(AsyncAt("connect", reject(Reply(554, "5.7.1", "Access denied")), name="client_access"))
    out = s.greeting()
    out = s.check_result(resolve(pending(out)))
    assert codes(out) == ["554"] and isinstance(out[-1], Close)
    assert [a.check for a in out if isinstance(a, Rejected)] == ["client_access"]


def test_a_connect_check_that_accepts_gives_the_banner():
    s = session(AsyncAt("connect"))
    out = s.greeting()
    assert codes(out) == [] and s.state is State.WAIT_CHECK
    assert sent(s.check_result(resolve(pending(out)))).startswith(b"220 mx1.example.test")
    assert s.state is State.GREETING


def test_a_helo_check_refusal_requires_a_new_greeting():
    s = session(SyncAt("helo", reject(Reply(550, "5.7.1", "Helo command rejected")), name="helo_name"))
    s.greeting()
    out = s.feed(b"EHLO bad.example\r\n" + MAIL)
    assert codes(out) == ["550", "503"] and s.client.helo == ""
    assert [a.check for a in out if isinstance(a, Rejected)] == ["helo_name", ""]
