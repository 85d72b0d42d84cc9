"""Header values built from untrusted text: tokens and quoted strings (RFC 2045, RFC 5322).

Role: put a domain, selector, address or explanation from the network into a header we
write (Authentication-Results, Received-SPF) without letting it break the field: a
token when it is one, else a quoted-string without controls or line breaks.
Never: return text with CR, LF or other controls.
"""

from __future__ import annotations

import re

_TOKEN = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`{|}~@-]+$")  # RFC 2045 token (plus @ for local@domain values)
_CONTROLS = re.compile(r"[\x00-\x1f\x7f]+")
MAX_VALUE = 200


def value(text: str) -> str:
    """A token, or a quoted-string (RFC 8601 2.2: a property value is a value or a quoted-string)."""
    text = _CONTROLS.sub(" ", text)[:MAX_VALUE]
    if _TOKEN.match(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def comment(text: str) -> str:
    """A comment's text: no parentheses, backslashes or controls (they would end or break it)."""
    return _CONTROLS.sub(" ", text).replace("\\", "").replace("(", "[").replace(")", "]")[:MAX_VALUE].strip()
