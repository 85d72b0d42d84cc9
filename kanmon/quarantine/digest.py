"""The spam quarantine digest: one mail per recipient listing what waits for them.

Role: compose the digest (pure: rows in, a message out). Each entry shows date, sender,
subject and score, and how to get it: with `[console] public_url` set, a release link and
a delete link (signed, kanmon.quarantine.links: the caller passes them in); without it,
the way is a command the administrator runs (`kanmon quarantine release ID`), so the
digest tells the recipient to ask for it by its id.
Never: put a sender's text into a header field (subjects are listed in the body only,
control characters removed).
"""

from __future__ import annotations

import datetime
import email.policy
import re
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _clean(text: str, limit: int = 120) -> str:
    text = _CONTROL.sub(" ", text)
    return text if len(text) <= limit else text[:limit] + "..."


def digest_message(rcpt: str, rows: list[dict], *, sender: str, hostname: str, now: float, keep_days: int,
                   links: dict[str, tuple[str, str]] | None = None) -> bytes:
    """The digest for one recipient (rows: quarantine_ops list rows, oldest first;
    links: id -> (release URL, delete URL), or None: the administrator's command)."""
    msg = EmailMessage(policy=email.policy.SMTP)
    msg["From"] = f"Mail quarantine <{sender}>"
    msg["To"] = rcpt
    msg["Subject"] = f"Quarantine digest: {len(rows)} message{'s' if len(rows) != 1 else ''} held for you"
    msg["Date"] = format_datetime(datetime.datetime.fromtimestamp(now).astimezone())
    msg["Message-ID"] = make_msgid("digest", domain=hostname)
    msg["Auto-Submitted"] = "auto-generated"  # RFC 3834: no replies, no vacation answers
    msg["X-Kanmon-Digest"] = "quarantine"
    lines = [
        f"These messages to {rcpt} were held as spam on {hostname}.",
        f"They are deleted after {keep_days} days.",
        "",
    ]
    if links:
        lines += [
            "To receive one, open its release link; to remove it now, its delete link",
            "(each link asks you to confirm; it works for you only, until the message's deletion).",
            "",
        ]
    else:
        lines += [
            "To receive one, ask your mail administrator to release it by its id",
            "(the administrator runs: kanmon quarantine release ID).",
            "",
        ]
    for r in rows:
        when = datetime.datetime.fromtimestamp(r["stored"]).astimezone().strftime("%Y-%m-%d %H:%M")
        score = f"  score {r['score']:g}" if r.get("score") else ""
        lines += [
            f"id:      {r['id']}",
            f"date:    {when}{score}",
            f"from:    {_clean(r['from']) or '<>'}",
            f"subject: {_clean(r['subject'])}",
        ]
        if links and r["id"] in links:
            release, delete = links[r["id"]]
            lines += [f"release: {release}", f"delete:  {delete}", ""]
        else:
            lines += [f"release: kanmon quarantine release {r['id']} --to {rcpt}", ""]
    msg.set_content("\n".join(lines))
    return msg.as_bytes()
