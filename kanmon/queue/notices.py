"""Delay and failure notices for the queue manager (RFC 3464 DSNs).

Role: turn "these recipients of this message failed / are delayed" into a new message
for the injector, addressed to the original envelope sender, from <>. The message text is
built by kanmon.deliver.dsn; this module supplies what only the queue knows (arrival,
original recipients, lifetime) and the notice's envelope.

Trusts: spool entries. Never: build a notice about a message from <> or about a notice
(DESIGN.md promise 5) — the queue manager checks, and so does this module.
"""

from __future__ import annotations

from kanmon.config import Config
from kanmon.deliver.dsn import NoticeRecipient, build_delay_notice, build_failure_notice
from kanmon.model import Envelope, RecipientResult
from kanmon.spool.store import SpoolEntry


class Notices:
    def __init__(self, config: Config):
        self.config = config

    def build(
        self, entry: SpoolEntry, content: bytes, results: list[RecipientResult], action: str, now: float
    ) -> tuple[Envelope, bytes]:
        env = entry.envelope
        if not env.mail_from or env.is_notice:
            raise ValueError("no notice about a message from <> or about a notice")
        recipients = [NoticeRecipient.from_result(r, env.original_rcpts.get(r.rcpt, "")) for r in results]
        hostname = self.config.server.hostname
        arrival = env.received_at or now
        if action == "failed":
            notice = build_failure_notice(
                content, env.mail_from, hostname, recipients, arrival, now, queue_id=entry.queue_id
            )
        else:
            notice = build_delay_notice(
                content, env.mail_from, hostname, recipients, arrival, now,
                will_retry_until=arrival + self.config.queue.lifetime, queue_id=entry.queue_id,
            )
        # The internal client is filled in by the injector (kanmon.queue.inject).
        notice_env = Envelope(mail_from=notice.mail_from, rcpts=[env.mail_from], received_at=now, is_notice=True)
        return notice_env, notice.data
