"""Message structure for IMAP FETCH: MIME parts, ENVELOPE, BODYSTRUCTURE, sections.

Role: parse a message in wire form (CRLF) into parts with exact byte ranges, so that
``BODY[1.2.MIME]`` and friends return the octets the RFC asks for (RFC 3501 6.4.5,
7.4.2), and render ENVELOPE and BODYSTRUCTURE.

Trusts: nothing in the message. Headers are decoded leniently (bytes that are not
UTF-8 stay as they are inside literals); nesting is cut at ``MAX_DEPTH``; a broken
multipart becomes a part with fewer children, never an exception.

Never: decode transfer encodings (IMAP returns the raw octets), or change the bytes
of a section.
"""

from __future__ import annotations

import email.utils
import re
from dataclasses import dataclass, field

from kanmon.scan import count_crlf

MAX_DEPTH = 20
MAX_PARTS = 1000


# ---------------------------------------------------------------------------
# IMAP output values


_NOT_QUOTABLE = re.compile(rb"[^\x20-\x7e]")


def istr(value: str | bytes | None) -> bytes:
    """NIL, a quoted string, or a literal when the text cannot be quoted (RFC 3501 4.3)."""
    if value is None:
        return b"NIL"
    data = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else value
    if len(data) < 1000 and not _NOT_QUOTABLE.search(data):
        return b'"' + data.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    return b"{%d}\r\n" % len(data) + data


_ATOM_RE = re.compile(rb"^[A-Za-z0-9!#$&'+,\-./:;<=>?@^_`|~\]]+$")


def iastring(value: str) -> bytes:
    """An atom when the text allows it (mailbox names), else a string (RFC 3501 9 astring)."""
    data = value.encode("utf-8", "surrogateescape")
    if _ATOM_RE.match(data) and data.upper() != b"NIL":
        return data
    return istr(data)


def ilist(items: list[bytes]) -> bytes:
    return b"(" + b" ".join(items) + b")"


# ---------------------------------------------------------------------------
# Headers


def header_fields(header: bytes) -> list[tuple[str, str, bytes]]:
    """[(lower name, unfolded value, raw lines)] in order."""
    out: list[tuple[str, str, bytes]] = []
    lines = header.split(b"\r\n")
    current: list[bytes] = []

    def flush() -> None:
        if current:
            raw = b"\r\n".join(current) + b"\r\n"
            name, _, value = current[0].partition(b":")
            unfolded = b" ".join(x.strip() for x in [value, *current[1:]]).strip()
            if name.strip() and b":" in current[0]:
                out.append(
                    (name.strip().decode("latin-1").lower(), unfolded.decode("utf-8", "surrogateescape"), raw)
                )

    for line in lines:
        if not line:
            continue
        if line[:1] in (b" ", b"\t") and current:
            current.append(line)
        else:
            flush()
            current = [line]
    flush()
    return out


def filter_header(header: bytes, names: list[str], keep: bool) -> bytes:
    """HEADER.FIELDS (keep=True) or HEADER.FIELDS.NOT; always ends with the blank line."""
    wanted = {n.lower() for n in names}
    raw = b"".join(r for name, _, r in header_fields(header) if (name in wanted) == keep)
    return raw + b"\r\n"


@dataclass
class Part:
    header: bytes  # MIME header including the blank line (may be b"")
    body: bytes
    maintype: str = "text"
    subtype: str = "plain"
    params: list[tuple[str, str]] = field(default_factory=list)
    children: list[Part] = field(default_factory=list)  # multipart
    message: Part | None = None  # message/rfc822
    fields: list[tuple[str, str, bytes]] = field(default_factory=list)

    def get(self, name: str) -> str | None:
        name = name.lower()
        for n, v, _ in self.fields:
            if n == name:
                return v
        return None

    @property
    def is_multipart(self) -> bool:
        return self.maintype == "multipart"

    @property
    def is_message(self) -> bool:
        return self.maintype == "message" and self.subtype == "rfc822" and self.message is not None


def split_params(value: str) -> tuple[str, list[tuple[str, str]]]:
    """'text/plain; charset="utf-8"; x*=a' -> ('text/plain', [('charset', 'utf-8'), ('x*', 'a')]).

    Parameters stay as written (RFC 2231 forms included), as IMAP servers return them.
    """
    items: list[str] = []
    current: list[str] = []
    quoted = False
    escaped = False
    for ch in value:
        if escaped:
            current.append(ch)
            escaped = False
        elif ch == "\\" and quoted:
            current.append(ch)
            escaped = True
        elif ch == '"':
            quoted = not quoted
            current.append(ch)
        elif ch == ";" and not quoted:
            items.append("".join(current))
            current = []
        else:
            current.append(ch)
    items.append("".join(current))
    head = items[0].strip()
    params: list[tuple[str, str]] = []
    for item in items[1:]:
        name, eq, val = item.partition("=")
        name = name.strip().lower()
        if not eq or not name:
            continue
        val = val.strip()
        if len(val) >= 2 and val[0] == val[-1] == '"':
            val = re.sub(r"\\(.)", r"\1", val[1:-1])
        params.append((name, val))
    return head, params


def _content_type(value: str | None, default: str) -> tuple[str, str, list[tuple[str, str]]]:
    if not value:
        maintype, _, subtype = default.partition("/")
        return maintype, subtype, []
    head, params = split_params(value)
    maintype, slash, subtype = head.lower().partition("/")
    if not slash or not maintype.strip() or not subtype.strip() or " " in head:
        # RFC 2045 5.2: an unparseable Content-Type means the default
        maintype, _, subtype = default.partition("/")
        params = [(k, v) for k, v in params if k == "charset"]
    return maintype.strip(), subtype.strip(), params


def _split_header(data: bytes) -> tuple[bytes, bytes]:
    if data.startswith(b"\r\n"):
        return b"\r\n", data[2:]
    i = data.find(b"\r\n\r\n")
    if i < 0:
        return data, b""
    return data[: i + 4], data[i + 4 :]


def _split_multipart(body: bytes, boundary: bytes) -> list[bytes]:
    delim = b"--" + boundary
    parts: list[bytes] = []

    def is_delim(at: int) -> bool:
        after = body[at + len(delim) : at + len(delim) + 1]
        return after in (b"", b"\r", b"-", b" ", b"\t")

    if body.startswith(delim) and is_delim(0):
        idx = 0
    else:
        idx = -1
        search = 0
        while True:
            j = body.find(b"\r\n" + delim, search)
            if j < 0:
                return []
            if is_delim(j + 2):
                idx = j + 2
                break
            search = j + 2
    while len(parts) < MAX_PARTS:
        after = idx + len(delim)
        if body[after : after + 2] == b"--":
            break
        eol = body.find(b"\r\n", after)
        if eol < 0:
            break
        start = eol + 2
        search = eol
        nxt = -1
        while True:
            j = body.find(b"\r\n" + delim, search)
            if j < 0:
                break
            if is_delim(j + 2):
                nxt = j
                break
            search = j + 2
        if nxt < 0:
            parts.append(body[start:])
            break
        parts.append(body[start:nxt] if nxt >= start else b"")
        idx = nxt + 2
    return parts


def parse(data: bytes, default: str = "text/plain", depth: int = 0) -> Part:
    """A message or MIME part in wire form -> Part tree."""
    header, body = _split_header(data)
    fields = header_fields(header)
    ctype = next((v for n, v, _ in fields if n == "content-type"), None)
    maintype, subtype, params = _content_type(ctype, default)
    part = Part(header, body, maintype, subtype, params, fields=fields)
    if depth >= MAX_DEPTH:
        return part
    if maintype == "multipart":
        boundary = dict(params).get("boundary")
        if boundary:
            child_default = "message/rfc822" if subtype == "digest" else "text/plain"
            part.children = [
                parse(p, child_default, depth + 1) for p in _split_multipart(body, boundary.encode("utf-8", "replace"))
            ]
        if not part.children:  # RFC 2046 5.1: a multipart needs a part; treat as text
            part.maintype, part.subtype = "text", "plain"
    elif maintype == "message" and subtype == "rfc822":
        part.message = parse(body, "text/plain", depth + 1)
    return part


# ---------------------------------------------------------------------------
# ENVELOPE (RFC 3501 7.4.2)


def _addresses(value: str | None) -> bytes:
    if value is None or not value.strip():
        return b"NIL"
    out = []
    for name, addr in email.utils.getaddresses([value]):
        if not name and not addr:
            continue
        local, at, host = addr.rpartition("@") if "@" in addr else (addr, "", "")
        out.append(ilist([istr(name or None), b"NIL", istr(local or None), istr(host or None)]))
    return ilist(out) if out else b"NIL"


def envelope(part: Part) -> bytes:
    g = part.get
    sender = g("sender") or g("from")
    reply_to = g("reply-to") or g("from")
    seen: dict[str | None, bytes] = {}

    def addresses(value: str | None) -> bytes:  # From is usually Sender and Reply-To too
        if value not in seen:
            seen[value] = _addresses(value)
        return seen[value]

    return ilist(
        [
            istr(g("date")),
            istr(g("subject")),
            addresses(g("from")),
            addresses(sender),
            addresses(reply_to),
            addresses(g("to")),
            addresses(g("cc")),
            addresses(g("bcc")),
            istr(g("in-reply-to")),
            istr(g("message-id")),
        ]
    )


# ---------------------------------------------------------------------------
# BODYSTRUCTURE / BODY (RFC 3501 7.4.2)


def _params(params: list[tuple[str, str]]) -> bytes:
    if not params:
        return b"NIL"
    out = []
    for k, v in params:
        out += [istr(k.upper()), istr(v)]
    return ilist(out)


def _disposition(part: Part) -> bytes:
    value = part.get("content-disposition")
    if not value:
        return b"NIL"
    kind, params = split_params(value)
    if not kind:
        return b"NIL"
    return ilist([istr(kind.upper()), _params(params)])


def _lines(body: bytes) -> int:
    n = count_crlf(body)
    if body and not body.endswith(b"\r\n"):
        n += 1
    return n


def bodystructure(part: Part, extended: bool = True) -> bytes:
    if part.is_multipart:
        items = [b"".join(bodystructure(c, extended) for c in part.children), istr(part.subtype.upper())]
        if extended:
            items += [_params(part.params), _disposition(part), istr(part.get("content-language")), istr(part.get("content-location"))]
        return b"(" + b" ".join(items) + b")"
    cte = (part.get("content-transfer-encoding") or "7BIT").strip().upper()
    items = [
        istr(part.maintype.upper()),
        istr(part.subtype.upper()),
        _params(part.params) if part.params or part.maintype != "text" else b'("CHARSET" "US-ASCII")',
        istr(part.get("content-id")),
        istr(part.get("content-description")),
        istr(cte),
        str(len(part.body)).encode(),
    ]
    if part.is_message:
        assert part.message is not None
        items += [envelope(part.message), bodystructure(part.message, extended), str(_lines(part.body)).encode()]
    elif part.maintype == "text":
        items.append(str(_lines(part.body)).encode())
    if extended:
        items += [istr(part.get("content-md5")), _disposition(part), istr(part.get("content-language")), istr(part.get("content-location"))]
    return ilist(items)


# ---------------------------------------------------------------------------
# Sections (RFC 3501 6.4.5 FETCH BODY[<section>])

_SECTION_RE = re.compile(
    r"^(?P<nums>\d+(?:\.\d+)*)?(?:\.?(?P<text>HEADER\.FIELDS\.NOT|HEADER\.FIELDS|HEADER|TEXT|MIME))?"
    r"(?:\s*\((?P<fields>[^()]*)\))?$",
    re.I,
)


@dataclass(frozen=True, slots=True)
class Section:
    nums: tuple[int, ...]
    text: str  # "" | HEADER | HEADER.FIELDS | HEADER.FIELDS.NOT | TEXT | MIME
    fields: tuple[str, ...]

    def label(self) -> str:
        out = ".".join(str(n) for n in self.nums)
        if self.text:
            out = f"{out}.{self.text}" if out else self.text
        if self.fields:
            out += " (" + " ".join(f.upper() for f in self.fields) + ")"
        return out


def parse_section(spec: str) -> Section | None:
    spec = spec.strip()
    m = _SECTION_RE.match(spec)
    if not m:
        return None
    nums = tuple(int(n) for n in m.group("nums").split(".")) if m.group("nums") else ()
    if any(n == 0 for n in nums):
        return None
    text = (m.group("text") or "").upper()
    fields_text = m.group("fields")
    if text.startswith("HEADER.FIELDS"):
        if fields_text is None:
            return None
        fields = tuple(f.strip('"') for f in fields_text.split())
        if not fields:
            return None
    elif fields_text is not None:
        return None
    else:
        fields = ()
    if text == "MIME" and not nums:
        return None
    return Section(nums, text, fields)


def _find(root: Part, nums: tuple[int, ...]) -> Part | None:
    cur = root
    for i, n in enumerate(nums):
        if cur.is_message and i > 0:
            assert cur.message is not None
            cur = cur.message
        if cur.is_multipart:
            if n > len(cur.children):
                return None
            cur = cur.children[n - 1]
        elif n != 1:
            return None
    return cur


def section_bytes(root: Part, whole: bytes, sec: Section) -> bytes | None:
    """The octets of a section, or None when it does not exist (answered as empty)."""
    if not sec.nums:
        target = root
        if sec.text == "":
            return whole
    else:
        part = _find(root, sec.nums)
        if part is None:
            return None
        if sec.text == "":
            return part.body
        if sec.text == "MIME":
            return part.header if part is not root else root.header
        if not part.is_message:
            return None if part is not root else _message_text(part, sec)
        assert part.message is not None
        target = part.message
    return _message_text(target, sec)


def _message_text(msg: Part, sec: Section) -> bytes:
    if sec.text == "HEADER":
        return msg.header
    if sec.text == "TEXT":
        return msg.body
    return filter_header(msg.header, list(sec.fields), sec.text == "HEADER.FIELDS")
