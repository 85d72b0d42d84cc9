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


def inspect_message(profile: CompiledProfile, content: bytes, facts: Facts) -> Inspection:
    msg = decode_message(content)
    inv = inventory(msg.attachments)
    return Inspection(msg, inv, profile.evaluate(msg, inv, facts))
