"""Text from the network made safe for a log line or a terminal.

Role: the one place that says which characters a client's string may not carry into
kanmon's own output. `for_log` escapes them (`\\x1b`, `\\t`, as Postfix logs them), so a
log line stays one line of printable text and still shows what the client sent;
`for_terminal` does the same for a table cell or any text printed to a TTY;
`json_for_terminal` is the JSON a command prints (`--json`): the same value, with those
characters written as JSON's `\\uXXXX` escapes.

Covered: C0 controls (NUL, TAB, LF, CR, ESC...), DEL, C1 controls (U+0080-U+009F, which
some terminals take as CSI/OSC), the line and paragraph separators, and the
bidirectional overrides and isolates (text that reads differently than it is stored),
and lone surrogates (bytes that were not UTF-8, kept by surrogateescape: they cannot be
written to a UTF-8 log or terminal at all).

Trusts: nothing; any str. Never: change printable text (backslashes included: existing
lines keep their form), or raise.
"""

from __future__ import annotations

import json
import re
from typing import Any

_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
_SHORT = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


def _escape(m: re.Match[str]) -> str:
    ch = m.group()
    short = _SHORT.get(ch)
    if short is not None:
        return short
    code = ord(ch)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def for_log(text: str) -> str:
    """`text` with every unsafe character escaped: one printable line."""
    if _UNSAFE.search(text) is None:  # the common case: no copy
        return text
    return _UNSAFE.sub(_escape, text)


_UNSAFE_BLOCK = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def for_terminal(text: str, *, block: bool = False) -> str:
    """What a table cell or a terminal line may show of `text` (the same escapes).
    block: a text of several lines (a message's header or body), whose line ends and
    tabs are kept."""
    if not block:
        return for_log(text)
    if _UNSAFE_BLOCK.search(text) is None:
        return text
    return _UNSAFE_BLOCK.sub(_escape, text)


# What json.dumps(ensure_ascii=False) leaves raw: it escapes C0 controls itself.
_UNSAFE_JSON = re.compile("[\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def json_for_terminal(value: Any, **dumps: Any) -> str:
    """json.dumps(value, ensure_ascii=False, **dumps) with every unsafe character left
    in it written as a `\\uXXXX` escape: the same JSON value, other text (Japanese,
    UTF-8 addresses) readable as it is. (They can only occur inside JSON strings, where
    the escape means the same character.)"""
    text = json.dumps(value, ensure_ascii=False, **dumps)
    if _UNSAFE_JSON.search(text) is None:
        return text
    return _UNSAFE_JSON.sub(lambda m: f"\\u{ord(m.group()):04x}", text)
