"""One message through a content profile: decode, inventory the attachments, evaluate.

Role: the one function the content check (at the end of DATA, in a worker thread) and
`kanmon rules test` (a dry run on a file) both call, so a dry run shows exactly what the
server would do.
Never: run on the event loop (decoding a large message takes milliseconds to seconds).
"""

from __future__ import annotations

from dataclasses import dataclass

from kanmon.content.attachments import Inventory, inventory
from kanmon.content.decode import DecodedMessage, decode_message
from kanmon.content.rules import CompiledProfile, Facts, Verdict


@dataclass
class Inspection:
    message: DecodedMessage
    attachments: Inventory
    verdict: Verdict


# When recipients of one message have different profiles, the gravest verdict applies to
# the message (one copy is stored): an added recipient can only make it stricter.
GRAVITY = {"reject": 5, "quarantine": 4, "discard": 3, "redirect": 2, "accept": 1}


def inspect_message(profile: CompiledProfile | list[CompiledProfile], content: bytes, facts: Facts) -> Inspection:
    msg = decode_message(content)
    inv = inventory(msg.attachments)
    if msg.truncated.startswith("a part could not be read") and not inv.limit:
        inv.limit = msg.truncated  # what cannot be read cannot be judged: the profile's archive_limit decides
    profiles = profile if isinstance(profile, list) else [profile]
    verdicts = [p.evaluate(msg, inv, facts) for p in profiles]
    gravest = max(verdicts, key=lambda v: GRAVITY.get(v.action, 1))  # the first of equals
    return Inspection(msg, inv, gravest)
