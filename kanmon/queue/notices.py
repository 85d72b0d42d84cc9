"""Delay, failure and success notices for the queue manager (RFC 3464 DSNs).

Role: turn "these recipients of this message failed / are delayed / were delivered" into
a new message for the injector, addressed to the original envelope sender, from <>. The
message text is built by kanmon.deliver.dsn; this module supplies what only the queue
knows (arrival, original recipients, lifetime, the sender's RFC 3461 RET, ENVID and
ORCPT) and the notice's envelope. Which recipients a notice covers (NOTIFY) is the
planner's decision (kanmon.queue.plan), or the admin operation's for `queue bounce`.

Trusts: spool entries. Never: build a notice about a message from <> or about a notice
(DESIGN.md promise 5) — the queue manager checks, and so does this module.
"""

from __future__ import annotations

from kanmon.config import Config
from kanmon.deliver.dsn import NoticeRecipient, build_delay_notice, build_failure_notice, build_success_notice
from kanmon.model import Envelope, RecipientResult
from kanmon.spool.store import SpoolEntry

# RET=FULL returns the whole message in a failure notice up to this size; a bigger one
# comes back as its headers (Postfix's bounce_size_limit does the same, at 50 KB).
MAX_RETURNED = 10 * 1024 * 1024


class Notices:
    def __init__(self, config: Config):
        self.config = config

    def build(
        self, entry: SpoolEntry, content: bytes, results: list[RecipientResult], action: str, now: float
    ) -> tuple[Envelope, bytes]:
        env = entry.envelope
        if not env.mail_from or env.is_notice:
            raise ValueError("no notice about a message from <> or about a notice")
        recipients = [
            NoticeRecipient.from_result(r, env.original_rcpts.get(r.rcpt, ""), env.dsn_orcpt.get(r.rcpt, ""))
            for r in results
        ]
        hostname = self.config.server.hostname
        arrival = env.received_at or now
        envid = env.dsn_envid
        if action == "failed":
            # RFC 3461 4.3: RET=FULL asks for the whole message; RET=HDRS (and no RET) the headers.
            full = env.dsn_ret == "FULL" and len(content) <= MAX_RETURNED
            notice = build_failure_notice(
                content, env.mail_from, hostname, recipients, arrival, now, queue_id=entry.queue_id,
                include_body=full, envid=envid,
            )
        elif action == "delayed":
            notice = build_delay_notice(
                content, env.mail_from, hostname, recipients, arrival, now,
                will_retry_until=arrival + self.config.queue.lifetime, queue_id=entry.queue_id, envid=envid,
            )
        else:
            notice = build_success_notice(
                content, env.mail_from, hostname, recipients, arrival, now, action=action,
                queue_id=entry.queue_id, envid=envid,
            )
        # The internal client is filled in by the injector (kanmon.queue.inject).
        notice_env = Envelope(mail_from=notice.mail_from, rcpts=[env.mail_from], received_at=now, is_notice=True)
        return notice_env, notice.data
