"""Loop detection: a message that already passed MAX_RECEIVED hops is refused at DATA.

Role: count the Received: fields in the header block (RFC 5321 6.3) with C-level counts.
Trusts: nothing of the header; it only counts.
Never: read the body.
"""

from __future__ import annotations

from kanmon.policy.pipeline import ACCEPTED, Check, CheckResult, Context, refuse
from kanmon.smtp import replies

MAX_RECEIVED = 50  # RFC 5321 6.3: loop detection by counting Received: headers


class LoopCheck(Check):
    name = "loop"

    def data(self, ctx: Context) -> CheckResult:
        header = ctx.header
        received = header.lower().count(b"\r\nreceived:") + header[:9].lower().startswith(b"received:")
        if received >= MAX_RECEIVED:
            return refuse(replies.MAIL_LOOP)
        return ACCEPTED
