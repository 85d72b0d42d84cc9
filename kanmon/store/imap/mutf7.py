"""Modified UTF-7 (RFC 3501 5.1.3), the 7-bit form of IMAP folder names.

Role: convert folder names between UTF-8 (what a client that enabled UTF8=ACCEPT,
RFC 6855, sends and reads) and modified UTF-7 (what is on disk, as Dovecot keeps it, and
what every other client uses).

Trusts: nothing: ``decode`` refuses malformed input (ValueError) rather than guessing.
Never: change a name's printable ASCII other than "&" (written "&-").
"""

from __future__ import annotations

import base64
import binascii
import re

_SHIFTED = re.compile(r"&([^-]*)-")


def encode(name: str) -> str:
    """A Unicode name in modified UTF-7."""
    out: list[str] = []
    run: list[str] = []

    def flush() -> None:
        if run:
            data = "".join(run).encode("utf-16-be", "surrogatepass")
            out.append("&" + base64.b64encode(data).rstrip(b"=").decode("ascii").replace("/", ",") + "-")
            run.clear()

    for ch in name:
        if 0x20 <= ord(ch) <= 0x7E:
            flush()
            out.append("&-" if ch == "&" else ch)
        else:
            run.append(ch)
    flush()
    return "".join(out)


def decode(name: str) -> str:
    """A modified UTF-7 name in Unicode; ValueError if it is not well formed."""
    if not name.isascii():
        raise ValueError("8-bit characters in a modified UTF-7 name")

    def one(m: re.Match[str]) -> str:
        body = m.group(1)
        if not body:
            return "&"
        raw = body.replace(",", "/")
        try:
            data = base64.b64decode(raw + "=" * (-len(raw) % 4), validate=True)
            text = data.decode("utf-16-be")
        except (binascii.Error, UnicodeDecodeError) as e:
            raise ValueError("bad modified UTF-7") from e
        if any(0x20 <= ord(c) <= 0x7E for c in text):
            raise ValueError("printable ASCII shifted in modified UTF-7")
        return text

    out = _SHIFTED.sub(one, name)
    if "&" in _SHIFTED.sub("", name):
        raise ValueError("unterminated shift in modified UTF-7")
    return out
