"""A message as the content rules read it: decoded header fields, the text of every text
part, and the attachments with their real names.

Role: turn a received message (bytes, CRLF) into text a person would read: RFC 2047
encoded-words in header fields, raw header bytes (8-bit, or 7-bit ISO-2022-JP), RFC 2231 parameter values (continuations, charsets),
bodies in base64 and quoted-printable, charsets as Japanese mail uses them (ISO-2022-JP
with the CP932 extensions Windows mailers write, Shift_JIS as CP932, EUC-JP, UTF-8), and
HTML reduced to its text. Text is NFKC-normalised for matching, so full-width and
half-width forms of the same word match one keyword.

Trusts: nothing in the message. A charset it does not know, a broken encoded-word or a
broken base64 body decodes as best it can (replacement characters), never an exception.
Never: hold more than the bounds below (parts, depth, decoded bytes), or run on the event
loop (the content check calls it in a worker thread).
"""

from __future__ import annotations

import base64
import codecs
import email
import email.errors
import email.header
import email.parser
import email.policy
import email.utils
import re
import unicodedata
from dataclasses import dataclass, field
from email.message import Message
import html as _html
from urllib.parse import unquote_to_bytes

MAX_PARTS = 1000  # MIME parts walked; beyond: the message is marked truncated
MAX_DEPTH = 30  # multipart nesting
MAX_TEXT = 4 * 1024 * 1024  # decoded text kept for matching, in characters
MAX_PART_BYTES = 64 * 1024 * 1024  # one part's decoded payload

# Charset labels as mail writes them -> the codec that reads what mailers really send.
_CHARSETS = {
    "shift_jis": "cp932", "shift-jis": "cp932", "sjis": "cp932", "x-sjis": "cp932", "ms_kanji": "cp932",
    "windows-31j": "cp932", "csshiftjis": "cp932", "cp932": "cp932",
    "euc-jp": "euc_jp", "x-euc-jp": "euc_jp", "eucjp": "euc_jp", "cseucpkdfmtjapanese": "euc_jp",
    "iso-2022-jp": "iso2022_jp", "csiso2022jp": "iso2022_jp", "iso-2022-jp-1": "iso2022_jp",
    "iso-2022-jp-2": "iso2022_jp_2", "iso-2022-jp-3": "iso2022_jp_3",
    "us-ascii": "utf-8", "ascii": "utf-8", "unknown-8bit": "", "x-unknown": "", "8bit": "",
}


def _codec(label: str | None) -> str:
    """The codec for a charset label, or "" when it is missing or unknown (then guess)."""
    if not label:
        return ""
    label = label.strip().strip('"').lower()
    if label in _CHARSETS:
        return _CHARSETS[label]
    try:
        return codecs.lookup(label).name
    except LookupError:
        return ""


def _jis_to_sjis(data: bytes) -> bytes:
    """ISO-2022-JP (with the NEC and IBM rows Windows writes, which Python's codec refuses)
    rewritten as Shift_JIS bytes, for CP932 to decode: JIS X 0208 row/cell arithmetic."""
    out = bytearray()
    mode = "ascii"
    i, n = 0, len(data)
    while i < n:
        b = data[i]
        if b == 0x1B and i + 2 < n:
            seq = data[i + 1:i + 3]
            if seq in (b"$B", b"$@"):
                mode, i = "kanji", i + 3
                continue
            if seq in (b"(B", b"(J"):
                mode, i = "ascii", i + 3
                continue
            if seq == b"(I":
                mode, i = "kana", i + 3
                continue
        if b in (0x0D, 0x0A):  # a line end passes through (the mode is kept: mailers forget to reset)
            out.append(b)
            i += 1
            continue
        if mode == "kanji" and i + 1 < n and 0x21 <= b <= 0x7E and 0x21 <= data[i + 1] <= 0x7E:
            j1, j2 = b, data[i + 1]
            s1 = ((j1 + 1) >> 1) + (0x70 if j1 <= 0x5E else 0xB0)
            if j1 & 1:
                s2 = j2 + 0x1F + (1 if j2 >= 0x60 else 0)
            else:
                s2 = j2 + 0x7E
            out += bytes((s1, s2))
            i += 2
            continue
        if mode == "kana" and 0x21 <= b <= 0x5F:
            out.append(b + 0x80)
        else:
            out.append(b)
        i += 1
    return bytes(out)


_JIS_DESIGNATION = re.compile(rb"\x1b\$[@B]")  # ESC $ @, ESC $ B: JIS X 0208 (RFC 1468)


def decode_bytes(data: bytes, label: str | None = None) -> str:
    """Bytes in a declared (or missing, or wrong) charset as text; never raises.
    Undeclared ISO-2022-JP is recognised by its JIS X 0208 designation only."""
    codec = _codec(label)
    if codec == "iso2022_jp" or (not codec and b"\x1b$" in data and _JIS_DESIGNATION.search(data)):
        try:
            return data.decode("iso2022_jp")
        except UnicodeDecodeError:
            return _jis_to_sjis(data).decode("cp932", "replace")
    if codec:
        try:
            return data.decode(codec)
        except UnicodeDecodeError:
            if codec not in ("cp932", "euc_jp", "utf-8"):
                return data.decode(codec, "replace")
    # Undeclared, or not what was declared: UTF-8, then the Japanese encodings, then Latin-1.
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    found = []
    for guess in ("cp932", "euc_jp"):
        try:
            found.append(data.decode(guess))
        except UnicodeDecodeError:
            pass
    if found:
        # EUC-JP bytes often decode as CP932 too, as half-width katakana and the user-defined
        # area (which Japanese mail hardly uses): the reading with fewer of those wins, CP932 on a tie.
        return min(found, key=_odd_chars)
    return data.decode(codec, "replace") if codec else data.decode("latin-1")


_ODD = re.compile("[\uff61-\uff9f\ue000-\uf8ff]")  # half-width katakana, private use


def _odd_chars(text: str) -> int:
    """How many of those in the first 64 K characters (enough to tell; bounded)."""
    return len(_ODD.findall(text, 0, 65536))


_ENCODED_WORD = re.compile(r"=\?[^?\s]+\?[bBqQ]\?[^?\s]*\?=")


def decode_header_value(value: str) -> str:
    """A header field's value as text: RFC 2047 encoded-words decoded (in any charset,
    also where a mailer put them inside quotes), raw bytes guessed (8-bit: UTF-8, then
    Shift_JIS/CP932, then EUC-JP; 7-bit with an ISO-2022-JP designation such as
    ``ESC $ B``: ISO-2022-JP, as older Japanese mailers write a Subject), folding undone."""
    if "\x1b" in value or not value.isascii():
        # Raw header bytes (the parser keeps 8-bit ones as surrogate escapes); a lone
        # ESC that designates nothing stays as it is.
        raw = value.encode("utf-8", "surrogateescape")
        value = decode_bytes(raw)
    value = value.replace("\r\n", "").replace("\n", "")
    if "=?" not in value:
        return value
    out: list[str] = []
    pos = 0
    last_was_word = False
    for m in _ENCODED_WORD.finditer(value):
        gap = value[pos:m.start()]
        if not (last_was_word and gap.strip() == ""):  # RFC 2047 6.2: space between words drops
            out.append(gap)
        out.append(_decode_word(m.group(0)))
        last_was_word = True
        pos = m.end()
    out.append(value[pos:])
    return "".join(out)


def _decode_word(word: str) -> str:
    try:
        (data, charset), = email.header.decode_header(word)
    except (ValueError, email.errors.HeaderParseError, UnicodeError):
        return word
    if isinstance(data, str):
        return data
    return decode_bytes(data, charset.split("*")[0] if charset else None)  # RFC 2231 5: charset*lang


_TAG = re.compile(r"<[^<>]*>")
_BLOCK = re.compile(r"(?i)</?(?:br|p|div|tr|li|h[1-6]|table|td|th)\b")


def html_to_text(html: str) -> str:
    """HTML reduced to its text: script, style and head content dropped, tags removed,
    block elements as line breaks, entities decoded. Linear in the input (a find loop and
    one-pass regexes): the standard library's HTMLParser can take minutes on crafted
    input (CVE-2025-6069), which would hold a content worker that long."""
    out: list[str] = []
    lowered = html.lower()
    pos, n = 0, len(html)
    while pos < n:
        start = lowered.find("<", pos)
        if start < 0:
            out.append(html[pos:])
            break
        out.append(html[pos:start])
        skipped = False
        for name in ("script", "style", "head", "title"):
            if lowered.startswith(name, start + 1) and not lowered[start + 1 + len(name):start + 2 + len(name)].isalnum():
                close = lowered.find(f"</{name}", start)
                pos = n if close < 0 else (lowered.find(">", close) + 1 or n)
                skipped = True
                break
        if skipped:
            continue
        out.append("<")
        pos = start + 1
    text = "".join(out)
    text = _BLOCK.sub("\n<", text)
    text = _TAG.sub(" ", text)
    return _html.unescape(text)


def normalize(text: str) -> str:
    """For matching: NFKC (full-width ASCII and half-width kana to their usual forms), case folded."""
    return unicodedata.normalize("NFKC", text).casefold()


@dataclass
class Attachment:
    name: str  # the decoded file name ("" when the part names none)
    content_type: str  # as declared, lower case
    data: bytes  # the decoded payload
    depth: int = 0  # how deep inside archives (0: a MIME part of the message)


@dataclass
class DecodedMessage:
    headers: list[tuple[str, str]]  # (lower-case name, decoded value), in order
    subject: str
    text: str  # the text of every text part (HTML reduced), joined
    attachments: list[Attachment] = field(default_factory=list)
    size: int = 0
    truncated: str = ""  # non-empty: a bound was reached (which one)

    def header(self, name: str) -> list[str]:
        name = name.lower()
        return [v for n, v in self.headers if n == name]


def part_filename(part: Message) -> str:
    """A part's file name: Content-Disposition filename (RFC 2231, continuations, charset),
    else Content-Type name; encoded-words decoded (mailers put them there too)."""
    name = None
    for header, param in (("content-disposition", "filename"), ("content-type", "name")):
        try:
            value = part.get_param(param, None, header)
        except Exception:  # noqa: BLE001 - a malformed parameter list
            value = None
        if value is None:
            continue
        if isinstance(value, tuple):  # RFC 2231: (charset, language, value)
            charset, _lang, raw = value
            data = raw.encode("latin-1", "surrogateescape") if isinstance(raw, str) else raw
            name = decode_bytes(unquote_to_bytes(data), charset or None)
        else:
            name = email.utils.unquote(value)
        if name:
            break
    return decode_header_value(name) if name else ""


class _Lenient(email.policy.Compat32):
    """compat32, but a header field with raw 8-bit bytes reads as text (decoded as mailers
    meant it), never as an email.header.Header object that the parameter parsers mangle."""

    def header_fetch_parse(self, name, value):
        if any("\udc80" <= c <= "\udcff" for c in value):
            return decode_bytes(value.encode("utf-8", "surrogateescape"))
        return value


_POLICY = _Lenient()


def decode_message(content: bytes) -> DecodedMessage:
    """The decoded view of a message (see the module docstring); never raises on content:
    a part that cannot be read is kept as an unnamed attachment and the message marked."""
    try:
        msg = email.message_from_bytes(content, policy=_POLICY)
    except RecursionError:
        # Thousands of nested multiparts: the standard parser recurses before our depth
        # bound can look. Read the header alone; the body stays one unread part.
        msg = email.parser.BytesParser(policy=_POLICY).parsebytes(content, headersonly=True)
        head = [(k.lower(), decode_header_value(str(v))) for k, v in msg.raw_items()]
        end = content.find(b"\r\n\r\n")
        body = content[end + 4:] if end >= 0 else b""
        return DecodedMessage(head, next((v for n, v in head if n == "subject"), ""), "",
                              [Attachment("", "application/octet-stream", body[:MAX_PART_BYTES])], size=len(content),
                              truncated=f"a part could not be read (MIME nesting deeper than {MAX_DEPTH})")
    headers = [(k.lower(), decode_header_value(str(v))) for k, v in msg.raw_items()]
    subject = next((v for n, v in headers if n == "subject"), "")
    out = DecodedMessage(headers, subject, "", size=len(content))
    texts: list[str] = []
    state = {"parts": 0, "chars": 0}

    def walk(part: Message, depth: int) -> None:
        try:
            walk_part(part, depth)
        except Exception as e:  # noqa: BLE001 - hostile structure: keep what was read, say so
            out.truncated = out.truncated or f"a part could not be read ({type(e).__name__})"
            try:
                raw = part.as_bytes()
            except Exception:  # noqa: BLE001
                raw = b""
            out.attachments.append(Attachment("", "application/octet-stream", raw[:MAX_PART_BYTES]))

    def walk_part(part: Message, depth: int) -> None:
        state["parts"] += 1
        if state["parts"] > MAX_PARTS:
            out.truncated = out.truncated or f"more than {MAX_PARTS} MIME parts"
            return
        if depth > MAX_DEPTH:
            out.truncated = out.truncated or f"MIME nesting deeper than {MAX_DEPTH}"
            return
        ctype = part.get_content_type().lower()
        if part.is_multipart():
            payload = part.get_payload()
            for sub in payload if isinstance(payload, list) else ():
                walk(sub, depth + 1)
            return
        if ctype == "message/rfc822":
            payload = part.get_payload()
            for sub in payload if isinstance(payload, list) else ():
                sub_headers = [(k.lower(), decode_header_value(str(v))) for k, v in sub.raw_items()]
                texts.extend(v for n, v in sub_headers if n in ("subject", "from"))
                walk(sub, depth + 1)
            return
        try:
            data = part.get_payload(decode=True) or b""
        except Exception:  # noqa: BLE001 - broken transfer encoding: the raw text
            data = str(part.get_payload()).encode("utf-8", "surrogateescape")
        if len(data) > MAX_PART_BYTES:
            out.truncated = out.truncated or f"a part larger than {MAX_PART_BYTES} bytes"
            data = data[:MAX_PART_BYTES]
        name = part_filename(part)
        disposition = str(part.get("content-disposition") or "").split(";")[0].strip().lower()
        if ctype.startswith("text/") and not name and disposition != "attachment":
            text = decode_bytes(data, part.get_content_charset())
            if ctype == "text/html":
                text = html_to_text(text)
            room = MAX_TEXT - state["chars"]
            if room <= 0:
                out.truncated = out.truncated or f"more than {MAX_TEXT} characters of text"
                return
            texts.append(text[:room])
            state["chars"] += min(len(text), room)
            return
        out.attachments.append(Attachment(name, ctype, data))

    walk(msg, 0)
    out.text = "\n".join(texts)
    return out


_SUBJECT = re.compile(rb"(?im)^subject[ \t]*:[ \t]*")


def prefix_subject(message: bytes, prefix: str) -> bytes:
    """The message (or a header block alone) with `prefix` before its Subject's text; a
    Subject field made at the end of the header when there is none; unchanged when the
    Subject already starts with it. A prefix that is not ASCII is written as an RFC 2047
    encoded-word (a header field stays 7-bit). The one Subject tagging of the checks
    (content rules, Rspamd, sender authentication)."""
    header_end = message.find(b"\r\n\r\n")
    head_len = len(message) if header_end < 0 else header_end + 2
    prefix = prefix.replace("\r", "").replace("\n", "")
    m = _SUBJECT.search(message, 0, head_len)
    # RFC 2047 6.2: the space between two encoded-words is dropped when read, so before an
    # encoded Subject the separating space goes inside our word.
    spaced = m is not None and message.startswith(b"=?", m.end())
    word = (prefix.encode("ascii") if prefix.isascii()
            else b"=?UTF-8?B?" + base64.b64encode((prefix + (" " if spaced else "")).encode()) + b"?=")
    if m is None:
        return message[:head_len] + b"Subject: " + word + b"\r\n" + message[head_len:]
    if message.startswith(word, m.end()):
        return message
    return message[:m.end()] + word + b" " + message[m.end():]
