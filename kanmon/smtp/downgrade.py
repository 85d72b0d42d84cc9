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

Memory and work are bounded (DESIGN.md promise 6): the walk plans edits by offsets into
the one message (no copy per part or per nesting level), then writes the result once,
encoding leaves in chunks; the peak is about twice the converted message. It is plain
CPU work: the client runs it off the event loop.

Trusts: nothing in the message (it came from the network): a malformed header, a
missing boundary or an unknown encoding leaves that part as it was. 8-bit content
nested deeper than MAX_DEPTH, or a message with more than MAX_STEPS parts and boundary
lines to walk, raises ConversionLimit: the caller must not send it 8-bit (RFC 6152 3
leaves converting or a delivery failure) and bounces it for that server.
"""

from __future__ import annotations

import binascii
import codecs
import re

# multipart/message nesting followed, at most (Postfix: mime_nesting_limit).
MAX_DEPTH = 16
# Entities plus boundary lines examined in one message: the walk's work budget.
MAX_STEPS = 20_000

_CT_RE = re.compile(rb"^\s*([!#$%&'*+.^_`|~0-9A-Za-z-]+)\s*/\s*([!#$%&'*+.^_`|~0-9A-Za-z-]+)")
_BOUNDARY_RE = re.compile(rb';\s*boundary\s*=\s*(?:"((?:[^"\\\r\n]|\\.)*)"|([^;\s"]+))', re.IGNORECASE)
# The fields the walk reads, with their continuation lines: (name, raw value).
_FIELD_RE = re.compile(
    rb"^(content-type|content-transfer-encoding|mime-version)[ \t]*:([^\r\n]*(?:\r\n[ \t][^\r\n]*)*)(?:\r\n|\Z)",
    re.IGNORECASE | re.MULTILINE,
)
# What may follow `--boundary` on a delimiter line (RFC 2046 5.1.1: `--` closes, then blanks).
_DELIMITER_TAIL = re.compile(rb"(--)?[ \t]*(?:\r\n|\Z)")

SCAN_CHUNK = 1 << 20  # octets checked for 8-bit per slice
QP_CHUNK = 1 << 18  # octets quoted-printable-encoded per call
BASE64_CHUNK = 57 * 4096  # a multiple of 57 octets: whole 76-character lines

_HEAD, _QP, _BASE64 = 0, 1, 2


class ConversionLimit(Exception):
    """The message is beyond the walk's bounds (nesting, work): it cannot be converted."""


def downgrade_8bit(message: bytes) -> bytes:
    """The message with its 8-bit leaf parts encoded 7-bit (see the module docstring).

    Returns the message unchanged (the same object) when it has no 8-bit octets. Raises
    ConversionLimit when 8-bit content lies beyond the bounds.
    """
    if message.isascii():
        return message
    crlf = message.count(b"\r\n")
    if message.count(b"\r") != crlf or message.count(b"\n") != crlf:
        message = message.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    walk = _Walk(message)
    changed, _ = walk.entity(0, len(message), b"text/plain", 0, whole_message=True)
    if not changed:
        return message
    return walk.render()


# ---------------------------------------------------------------------------
# Quoted-printable and base64 (RFC 2045 6.7, 6.8): CRLF line ends, lines of at most 76


def encode_quoted_printable(data: bytes, start: int = 0, end: int | None = None) -> list[bytes]:
    """data[start:end] (CRLF line ends) as quoted-printable, in pieces to join.

    binascii.b2a_qp does the encoding; its two slips are mended here: a line whose
    encoded end (`=09`, `=20`) reaches column 77, and `=\\n` soft breaks in input without
    a line feed (it picks LF or CRLF from the first LF it sees).
    """
    end = len(data) if end is None else end
    out = []
    pos = start
    while pos < end:
        stop = end
        mid_line = False
        if end - pos > QP_CHUNK:
            nl = data.rfind(b"\r\n", pos, pos + QP_CHUNK)
            if nl >= 0:
                stop = nl + 2
            else:  # one very long line: cut it, and join the pieces with a soft break
                stop = pos + QP_CHUNK
                if data[stop - 1] == 0x0D:
                    stop -= 1
                mid_line = True
        segment = data[pos:stop]
        encoded = binascii.b2a_qp(segment, quotetabs=False, istext=True, header=False)
        if b"\n" not in segment:
            encoded = encoded.replace(b"\n", b"\r\n")  # only soft breaks have a line feed here
        if mid_line:
            encoded += b"=\r\n"
        lines = encoded.split(b"\r\n")  # (C-level; a regex search for long lines is far slower)
        if max(map(len, lines)) > 76:
            encoded = b"\r\n".join([_rewrap(line) if len(line) > 76 else line for line in lines])
        out.append(encoded)
        pos = stop
    return out


def _rewrap(line: bytes) -> bytes:
    """An encoded line longer than 76 characters, cut with soft breaks, never inside `=XX`."""
    soft = line.endswith(b"=")  # an encoded "=" is "=3D": a final "=" is a soft break
    rest = line[:-1] if soft else line
    limit = 75 if soft else 76  # room for the "=" of the soft break
    pieces = []
    while len(rest) > limit:
        cut = 75
        if rest[cut - 1] == 0x3D:  # every "=" left in the payload starts an escape
            cut -= 1
        elif rest[cut - 2] == 0x3D:
            cut -= 2
        pieces.append(rest[:cut])
        rest = rest[cut:]
    pieces.append(rest)
    return b"=\r\n".join(pieces) + (b"=" if soft else b"")


def encode_base64(data: bytes, start: int = 0, end: int | None = None) -> list[bytes]:
    """data[start:end] as base64 lines of 76 characters, each ending CRLF, in pieces."""
    end = len(data) if end is None else end
    out = []
    for pos in range(start, end, BASE64_CHUNK):
        raw = binascii.b2a_base64(data[pos : min(pos + BASE64_CHUNK, end)], newline=False)
        out.append(b"\r\n".join([raw[i : i + 76] for i in range(0, len(raw), 76)]) + b"\r\n")
    return out


# ---------------------------------------------------------------------------
# The MIME walk: plan edits by offsets, then write the result once


class _Walk:
    def __init__(self, data: bytes):
        self.data = data
        self.steps = 0
        # (start, end, kind, new header block) in the order of the message
        self.edits: list[tuple[int, int, int, bytes]] = []

    def render(self) -> bytes:
        data = self.data
        view = memoryview(data)
        pieces: list[bytes | memoryview] = []
        pos = 0
        for start, end, kind, head in self.edits:
            pieces.append(view[pos:start])
            if kind == _HEAD:
                pieces.append(head)
            elif kind == _QP:
                pieces += encode_quoted_printable(data, start, end)
            else:
                pieces += encode_base64(data, start, end)
            pos = end
        pieces.append(view[pos:])
        return b"".join(pieces)

    def _step(self) -> None:
        self.steps += 1
        if self.steps > MAX_STEPS:
            raise ConversionLimit(f"more than {MAX_STEPS} MIME parts and boundary lines")

    def has_8bit(self, start: int, end: int) -> bool:
        data = self.data
        for pos in range(start, end, SCAN_CHUNK):
            if not data[pos : min(pos + SCAN_CHUNK, end)].isascii():
                return True
        return False

    def entity(self, start: int, end: int, default_type: bytes, depth: int, whole_message: bool = False) -> tuple[bool, bool]:
        """Plan the conversion of the entity data[start:end] (start is at a line start).

        Returns (changed, its converted form is all 7-bit).
        """
        self._step()
        data = self.data
        if data.startswith(b"\r\n", start, end):
            head_end, body_start = start, start + 2
        else:
            blank = data.find(b"\r\n\r\n", start, end)
            if blank < 0:  # a header-only entity
                return False, not self.has_8bit(start, end)
            head_end, body_start = blank + 2, blank + 4
        head_clean = not self.has_8bit(start, head_end)
        if not self.has_8bit(body_start, end):
            return False, head_clean
        if depth > MAX_DEPTH:
            raise ConversionLimit(f"8-bit content nested deeper than {MAX_DEPTH} MIME levels")

        fields: dict[bytes, tuple[int, int, bytes]] = {}
        for m in _FIELD_RE.finditer(data, start, head_end):
            fields.setdefault(m.group(1).lower(), (m.start(), m.end(), m.group(2).replace(b"\r\n", b"").strip()))
        ctype, ct_value = _content_type(fields.get(b"content-type"), default_type)
        cte = fields.get(b"content-transfer-encoding")
        encoding = (cte[2].split(b"(")[0].strip().lower() if cte else b"") or b"7bit"
        if encoding not in (b"7bit", b"8bit", b"binary"):
            return False, False  # 8-bit octets in a base64 or quoted-printable part: malformed, left

        add: list[bytes] = []
        new_encoding = None
        slot = len(self.edits)  # the header edit goes before the edits of the body
        if ctype.startswith(b"multipart/"):
            changed, clean = self._multipart(body_start, end, ct_value, ctype, depth)
            if not changed:
                return False, False
            if clean and encoding != b"7bit":
                new_encoding = b"7bit"  # RFC 2045 6.4: a container says what its parts are
        elif ctype == b"message/rfc822":
            changed, clean = self.entity(body_start, end, b"text/plain", depth + 1, whole_message=True)
            if not changed:
                return False, False
            if clean and encoding != b"7bit":
                new_encoding = b"7bit"
        else:
            if ctype == b"text/plain" and b"content-type" not in fields:
                # The octets came without a type (RFC 2045 5.2's default says us-ascii): say
                # which charset they are, so the encoded text decodes to what a reader saw.
                charset = b"utf-8" if self._is_utf8(body_start, end) else b"unknown-8bit"  # RFC 1428
                add.append(b"Content-Type: text/plain; charset=" + charset + b"\r\n")
            if ctype.startswith((b"text/", b"message/")):
                self.edits.append((body_start, end, _QP, b""))
                new_encoding = b"quoted-printable"
            else:
                self.edits.append((body_start, end, _BASE64, b""))
                new_encoding = b"base64"

        head = data[start:head_end]
        if new_encoding is not None:
            line = b"Content-Transfer-Encoding: " + new_encoding + b"\r\n"
            if cte is None:
                add.append(line)
            else:
                head = head[: cte[0] - start] + line + head[cte[1] - start :]
        if whole_message and b"mime-version" not in fields:
            # RFC 2045 4: a Content-Transfer-Encoding counts only in a MIME message.
            add.append(b"MIME-Version: 1.0\r\n")
        if add or new_encoding is not None:
            self.edits.insert(slot, (start, head_end, _HEAD, head + b"".join(add)))
        return True, head_clean

    def _is_utf8(self, start: int, end: int) -> bool:
        decoder = codecs.getincrementaldecoder("utf-8")()
        try:
            for pos in range(start, end, SCAN_CHUNK):
                decoder.decode(self.data[pos : min(pos + SCAN_CHUNK, end)])
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            return False
        return True

    def _multipart(self, body_start: int, end: int, ct_value: bytes, ctype: bytes, depth: int) -> tuple[bool, bool]:
        """Plan the multipart body data[body_start:end]: (changed, converted form all 7-bit)."""
        boundary = _boundary(ct_value)
        if not boundary:
            return False, False
        data = self.data
        default_type = b"message/rfc822" if ctype == b"multipart/digest" else b"text/plain"  # RFC 2046 5.1.5
        delimiter = b"\r\n--" + boundary
        # Parts lie between the end of one delimiter line and the CRLF that starts the next;
        # the body's first line may be a delimiter too (the CRLF before body_start is ours).
        spans: list[tuple[int, int]] = []
        start: int | None = None
        pos = body_start - 2
        while True:
            i = data.find(delimiter, pos, end)
            if i < 0:
                break
            self._step()
            after = i + len(delimiter)
            m = _DELIMITER_TAIL.match(data, after, end)
            if m is None:
                pos = after  # a longer string that starts with the boundary: not a delimiter
                continue
            if start is not None and start <= i:  # (start > i: an empty part, left as it is)
                spans.append((start, i))
            if m.group(1) is not None or not m.group(0).endswith(b"\r\n"):
                start = None  # the closing delimiter, or the end of the data
                break
            start = m.end()
            pos = m.end() - 2
        if start is not None:
            spans.append((start, end))  # no closing delimiter: the last part runs to the end
        if not spans:
            return False, False
        changed = False
        clean = True
        last = body_start
        for a, b in spans:
            if clean and self.has_8bit(last, a):
                clean = False
            part_changed, part_clean = self.entity(a, b, default_type, depth + 1)
            changed = changed or part_changed
            clean = clean and part_clean
            last = b
        if clean and self.has_8bit(last, end):
            clean = False
        return changed, clean


def _content_type(field: tuple[int, int, bytes] | None, default: bytes) -> tuple[bytes, bytes]:
    """(type/subtype in lower case, the raw value); the default when absent or malformed."""
    if field is None:
        return default, b""
    value = field[2]
    m = _CT_RE.match(value)
    if not m:
        return b"text/plain", value  # RFC 2045 5.2: an unparseable type is text/plain
    return m.group(1).lower() + b"/" + m.group(2).lower(), value


def _boundary(ct_value: bytes) -> bytes | None:
    m = _BOUNDARY_RE.search(ct_value)
    if not m:
        return None
    if m.group(1) is not None:
        return re.sub(rb"\\(.)", rb"\1", m.group(1))
    return m.group(2)


__all__ = ["MAX_DEPTH", "MAX_STEPS", "ConversionLimit", "downgrade_8bit", "encode_base64", "encode_quoted_printable"]
