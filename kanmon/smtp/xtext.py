"""xtext (RFC 3461 4): how DSN parameters (ENVID, ORCPT) travel in MAIL and RCPT.

Role: decode what a client sent, encode what we pass on to a next hop. Shared by the
session's parameter parsing (kanmon.smtp.address) and the outbound client.
Trusts: nothing it decodes. Never: decode a malformed escape or a character xtext does
not allow (ValueError; the session answers 501 5.5.4).
"""

from __future__ import annotations

_HEXDIGITS = "0123456789ABCDEFabcdef"


def xtext_decode(text: str, *, utf8: bool = False) -> str:
    """RFC 3461 4: xtext -> text (`+2B` is "+"). ValueError for anything else: a
    character outside "!".."~", "=", or a "+" without two hex digits. utf8: non-ASCII
    characters stand for themselves (RFC 6533 utf-8 addresses)."""
    out: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "+":
            hx = text[i + 1 : i + 3]
            if len(hx) != 2 or any(c not in _HEXDIGITS for c in hx):
                raise ValueError("bad xtext escape")
            out.append(chr(int(hx, 16)))
            i += 3
            continue
        if not ("!" <= ch <= "~" or (utf8 and ord(ch) > 127)) or ch == "=":
            raise ValueError("bad xtext character")
        out.append(ch)
        i += 1
    return "".join(out)


def xtext_encode(text: str) -> str:
    """text -> RFC 3461 xtext: "+", "=" and everything outside "!".."~" as +XX."""
    return "".join(
        ch if "!" <= ch <= "~" and ch not in "+=" else "".join(f"+{b:02X}" for b in ch.encode("utf-8"))
        for ch in text
    )
