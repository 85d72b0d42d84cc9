"""8-bit to 7-bit MIME conversion, for a next hop that does not offer 8BITMIME (RFC 6152 3).

Role: the outbound client (kanmon.smtp.client) hands a message with 8-bit octets to
`downgrade_8bit` when the server's EHLO lacks 8BITMIME (or it spoke HELO); what comes
back is the same message with every leaf part that held 8-bit octets re-encoded —
text/* and message/* leaves as quoted-printable, other types as base64 — walking
multipart/* and message/rfc822 (recursing into the enclosed message), and the
Content-Transfer-Encoding of the containers relabelled 7bit once their content is.
A message without MIME-Version and Content-Type (a bare 8-bit body) becomes text/plain
with the charset the octets show (utf-8 when they decode as UTF-8, unknown-8bit
otherwise, RFC 1428). Everything else stays byte for byte as it was: headers, 7-bit
parts, preambles, epilogues, boundaries. What it does and does not (8-bit octets in
headers are sent as they are, as Postfix does) is in docs/outbound-smtp.md.

Works on bytes, never decodes or re-serialises a header it does not change (the Python
email package would re-fold and re-encode them). Line ends are made CRLF first.

Trusts: nothing in the message (it came from the network): a malformed header, a
missing boundary or an unknown encoding leaves that part as it was. Nesting deeper than
MAX_DEPTH is left as it was (bounded recursion, DESIGN.md promise 6).
"""

from __future__ import annotations

import binascii
import re

# multipart/message nesting followed, at most; deeper content is sent as it is.
MAX_DEPTH = 32

_CT_RE = re.compile(rb"^\s*([!#$%&'*+.^_`|~0-9A-Za-z-]+)\s*/\s*([!#$%&'*+.^_`|~0-9A-Za-z-]+)")
_BOUNDARY_RE = re.compile(rb';\s*boundary\s*=\s*(?:"((?:[^"\\\r\n]|\\.)*)"|([^;\s"]+))', re.IGNORECASE)
_SPACE = b" \t"


def downgrade_8bit(message: bytes) -> bytes:
    """The message with its 8-bit leaf parts encoded 7-bit (see the module docstring).

    Returns the message unchanged (the same object) when it has no 8-bit octets.
    """
    if message.isascii():
        return message
    crlf = message.count(b"\r\n")
    if message.count(b"\r") != crlf or message.count(b"\n") != crlf:
        message = message.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    converted = _message(message, 0)
    return message if converted is None else converted


# ---------------------------------------------------------------------------
# Header fields on bytes


def _split_entity(data: bytes) -> tuple[bytes, bytes | None]:
    """An entity -> (header block with the CRLF of its last field, body after the empty
    line); body None when there is no empty line (a header-only entity)."""
    if data.startswith(b"\r\n"):
        return b"", data[2:]
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return data, None
    return data[: end + 2], data[end + 4 :]


def _fields(head: bytes) -> list[bytes]:
    """The header block as raw fields (each with its continuation lines and CRLFs)."""
    out: list[bytes] = []
    for line in head.splitlines(keepends=True):
        if out and line[:1] in (b" ", b"\t"):
            out[-1] += line
        else:
            out.append(line)
    return out


def _name(field: bytes) -> bytes:
    colon = field.find(b":")
    return field[:colon].strip().lower() if colon > 0 else b""


def _value(field: bytes) -> bytes:
    """The unfolded value of a field."""
    colon = field.find(b":")
    return field[colon + 1 :].replace(b"\r\n", b"").strip()


def _find(fields: list[bytes], name: bytes) -> int | None:
    for i, f in enumerate(fields):
        if _name(f) == name:
            return i
    return None


def _content_type(fields: list[bytes], default: bytes) -> tuple[bytes, bytes]:
    """(type/subtype in lower case, the raw value); the default when absent or malformed."""
    i = _find(fields, b"content-type")
    if i is None:
        return default, b""
    value = _value(fields[i])
    m = _CT_RE.match(value)
    if not m:
        return b"text/plain", value  # RFC 2045 5.2: an unparseable type is text/plain
    return m.group(1).lower() + b"/" + m.group(2).lower(), value


def _encoding(fields: list[bytes]) -> bytes:
    i = _find(fields, b"content-transfer-encoding")
    if i is None:
        return b"7bit"
    return _value(fields[i]).split(b"(")[0].strip().lower() or b"7bit"


def _set_encoding(fields: list[bytes], encoding: bytes) -> None:
    line = b"Content-Transfer-Encoding: " + encoding + b"\r\n"
    i = _find(fields, b"content-transfer-encoding")
    if i is None:
        fields.append(line)
    else:
        fields[i] = line


# ---------------------------------------------------------------------------
# The MIME walk


def _message(data: bytes, depth: int) -> bytes | None:
    """A whole message (the top level, or inside message/rfc822) converted; None: unchanged."""
    head, body = _split_entity(data)
    fields = _fields(head)
    new_head, new_body = _entity(fields, body, b"text/plain", depth)
    if new_head is None:
        return None
    if _find(fields, b"mime-version") is None:
        # RFC 2045 4: the Content-Transfer-Encoding just written counts only in a MIME message.
        new_head += b"MIME-Version: 1.0\r\n"
    return new_head + b"\r\n" + new_body


def _entity(fields: list[bytes], body: bytes | None, default_type: bytes, depth: int) -> tuple[bytes | None, bytes]:
    """(new header block, new body) of one entity, or (None, body) when it is unchanged."""
    if body is None or body.isascii() or depth > MAX_DEPTH:
        return None, body or b""
    ctype, ct_value = _content_type(fields, default_type)
    encoding = _encoding(fields)
    if encoding not in (b"7bit", b"8bit", b"binary"):
        return None, body  # 8-bit octets in a base64 or quoted-printable part: malformed, left

    if ctype.startswith(b"multipart/"):
        new_body = _multipart(body, ct_value, ctype, depth)
    elif ctype == b"message/rfc822":
        new_body = _message(body, depth + 1)
    else:
        return _leaf(fields, body, ctype)
    if new_body is None:
        return None, body
    fields = list(fields)
    if new_body.isascii() and encoding != b"7bit":
        _set_encoding(fields, b"7bit")  # RFC 2045 6.4: a container says what its parts are
    return b"".join(fields), new_body


def _leaf(fields: list[bytes], body: bytes, ctype: bytes) -> tuple[bytes, bytes]:
    fields = list(fields)
    if ctype == b"text/plain" and _find(fields, b"content-type") is None:
        # The octets came without a type (RFC 2045 5.2's default says us-ascii): say which
        # charset they are, so the encoded text decodes to what a reader saw before.
        try:
            body.decode("utf-8")
            charset = b"utf-8"
        except UnicodeDecodeError:
            charset = b"unknown-8bit"  # RFC 1428
        fields.append(b"Content-Type: text/plain; charset=" + charset + b"\r\n")
    if ctype.startswith((b"text/", b"message/")):
        encoded = binascii.b2a_qp(body, quotetabs=False, istext=True, header=False)
        _set_encoding(fields, b"quoted-printable")
    else:
        raw = binascii.b2a_base64(body, newline=False)
        encoded = b"\r\n".join(raw[i : i + 76] for i in range(0, len(raw), 76)) + b"\r\n"
        _set_encoding(fields, b"base64")
    return b"".join(fields), encoded


def _boundary(ct_value: bytes) -> bytes | None:
    m = _BOUNDARY_RE.search(ct_value)
    if not m:
        return None
    if m.group(1) is not None:
        return re.sub(rb"\\(.)", rb"\1", m.group(1))
    return m.group(2)


def _multipart(body: bytes, ct_value: bytes, ctype: bytes, depth: int) -> bytes | None:
    """The multipart body with its 8-bit parts converted; None when nothing changed."""
    boundary = _boundary(ct_value)
    if not boundary:
        return None
    default_type = b"message/rfc822" if ctype == b"multipart/digest" else b"text/plain"  # RFC 2046 5.1.5
    delimiter = b"\r\n--" + boundary
    padded = b"\r\n" + body  # the first line may be a delimiter too
    # Parts lie between the end of one delimiter line and the CRLF that starts the next.
    spans: list[tuple[int, int]] = []
    start: int | None = None
    pos = 0
    while True:
        i = padded.find(delimiter, pos)
        if i < 0:
            break
        after = i + len(delimiter)
        line_end = padded.find(b"\r\n", after)
        rest = padded[after : len(padded) if line_end < 0 else line_end]
        closing = rest.startswith(b"--")
        if rest[2 if closing else 0 :].strip(_SPACE):
            pos = after  # a longer string that starts with the boundary: not a delimiter
            continue
        if start is not None and start <= i:  # (start > i: an empty part, left as it is)
            spans.append((start, i))
        if closing or line_end < 0:
            start = None
            break
        start = line_end + 2
        pos = line_end
    if start is not None:
        spans.append((start, len(padded)))  # no closing delimiter: the last part runs to the end
    if not spans:
        return None
    out = bytearray()
    last = 0
    changed = False
    for a, b in spans:
        part = padded[a:b]
        head, part_body = _split_entity(part)
        new_head, new_body = _entity(_fields(head), part_body, default_type, depth + 1)
        out += padded[last:a]
        if new_head is None:
            out += part
        else:
            out += new_head + b"\r\n" + new_body
            changed = True
        last = b
    if not changed:
        return None
    out += padded[last:]
    return bytes(out[2:])


__all__ = ["MAX_DEPTH", "downgrade_8bit"]
