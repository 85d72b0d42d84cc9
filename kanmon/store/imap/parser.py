"""IMAP command syntax (RFC 3501 9): framing of lines and literals, and tokenizing.

Role: ``CommandReader`` turns the byte stream into whole commands (a line plus any
literals it announces, RFC 3501 4.3 and RFC 7888 LITERAL+); ``tokenize`` turns one
command into Python values; ``parse_sequence_set`` reads message sets.

Trusts: nothing. Every size is bounded before memory is taken: a line longer than
``max_line`` or a literal larger than ``max_literal`` is refused by its announced size,
before any of its bytes are kept.

Never: allocate a buffer from a client-announced size, or let one command's bytes
leak into the next.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_LINE = 64 * 1024
MAX_DEPTH = 16  # parenthesis nesting
_LITERAL_AT_END = re.compile(rb"\{(\d{1,20})(\+?)\}\r?\n\Z")


class ParseError(Exception):
    """Bad syntax: the session answers BAD with this text."""


class QStr(str):
    """A quoted string (not an atom): "NIL" in quotes is the string NIL."""


@dataclass(frozen=True, slots=True)
class Literal:
    data: bytes

    def text(self) -> str:
        return self.data.decode("utf-8", "replace")


# ---------------------------------------------------------------------------
# Framing


@dataclass(frozen=True, slots=True)
class Frame:
    """What CommandReader found: a whole command, a request for literal data (the
    server must answer "+" for a synchronizing literal), or a refusal."""

    kind: str  # "command" | "continue" | "too_big" | "line_too_long" | "fatal"
    data: bytes = b""  # the command: lines with "{n}\r\n" followed by n literal bytes
    size: int = 0


class CommandReader:
    def __init__(self, max_literal: int, max_line: int = MAX_LINE):
        self.max_literal = max_literal
        self.max_line = max_line
        self.buf = bytearray()
        self._cmd = bytearray()
        self._need = 0  # literal bytes still to come
        self._skip = 0  # bytes to drop (a refused non-synchronizing literal)
        self._discarding = False  # dropping the rest of a refused command

    def feed(self, data: bytes) -> None:
        self.buf += data

    def clear(self) -> None:
        self.buf.clear()
        self._cmd.clear()
        self._need = self._skip = 0
        self._discarding = False

    @property
    def partial(self) -> bool:
        """Part of a command has been read (a DONE during IDLE must be a whole line)."""
        return bool(self._cmd) or self._need > 0

    def next(self) -> Frame | None:
        """The next frame, or None until more bytes arrive."""
        while True:
            if self._skip:
                n = min(self._skip, len(self.buf))
                del self.buf[:n]
                self._skip -= n
                if self._skip:
                    return None
                self._cmd.clear()
                continue  # the rest of the refused command's line is dropped below
            if self._need:
                n = min(self._need, len(self.buf))
                self._cmd += self.buf[:n]
                del self.buf[:n]
                self._need -= n
                if self._need:
                    return None
            nl = self.buf.find(b"\n")
            if nl < 0:
                if len(self.buf) > self.max_line:
                    self.clear()
                    return Frame("line_too_long")
                return None
            if nl + 1 > self.max_line:
                self.clear()
                return Frame("line_too_long")
            line = bytes(self.buf[: nl + 1])
            del self.buf[: nl + 1]
            if self._discarding:
                m = _LITERAL_AT_END.search(line)
                if m and m.group(2) and int(m.group(1)) <= 4 * self.max_literal:
                    self._skip = int(m.group(1))
                else:
                    self._discarding = False
                continue
            if len(self._cmd) + len(line) > self.max_literal + 4 * self.max_line:
                self.clear()
                return Frame("line_too_long")
            self._cmd += line
            m = _LITERAL_AT_END.search(line)
            if m is None:
                cmd = bytes(self._cmd)
                self._cmd.clear()
                return Frame("command", cmd)
            size = int(m.group(1))
            plus = bool(m.group(2))
            if size > self.max_literal:
                head = bytes(self._cmd)
                self._cmd.clear()
                if plus:
                    # RFC 7888 4: the client sends it anyway; drop it without keeping it.
                    if size > 4 * self.max_literal + (1 << 20):
                        self.clear()
                        return Frame("fatal", head, size)
                    self._skip = size
                    self._discarding = True
                return Frame("too_big", head, size)
            self._need = size
            if not plus:
                return Frame("continue", b"", size)


# ---------------------------------------------------------------------------
# Tokens

_ATOM_SPECIALS = set(b'(){ %*"\\]') | set(range(0, 32)) | {127}


def tokenize(data: bytes) -> list:
    """Command bytes (without the final CRLF) -> list of str/QStr/Literal/list.

    Atoms may carry a bracketed part with spaces, as FETCH items do:
    ``BODY.PEEK[HEADER.FIELDS (FROM TO)]<0.100>`` is one atom.
    """
    pos = 0
    n = len(data)
    stack: list[list] = [[]]
    while pos < n:
        c = data[pos]
        if c == 0x20:
            pos += 1
        elif c == 0x28:  # (
            if len(stack) > MAX_DEPTH:
                raise ParseError("too deeply nested")
            new: list = []
            stack[-1].append(new)
            stack.append(new)
            pos += 1
        elif c == 0x29:  # )
            if len(stack) == 1:
                raise ParseError("unbalanced )")
            stack.pop()
            pos += 1
        elif c == 0x22:  # "
            pos += 1
            out = bytearray()
            while True:
                if pos >= n:
                    raise ParseError("unterminated quoted string")
                ch = data[pos]
                if ch == 0x5C:  # backslash
                    if pos + 1 >= n or data[pos + 1] not in (0x22, 0x5C):
                        raise ParseError("bad escape in quoted string")
                    out.append(data[pos + 1])
                    pos += 2
                elif ch == 0x22:
                    pos += 1
                    break
                elif ch in (0x0D, 0x0A):
                    raise ParseError("line break in quoted string")
                else:
                    out.append(ch)
                    pos += 1
            stack[-1].append(QStr(out.decode("utf-8", "replace")))
        elif c == 0x7B:  # {n}CRLF<n bytes>
            m = re.match(rb"\{(\d{1,20})\+?\}\r?\n", data[pos:pos + 40])
            if not m:
                raise ParseError("bad literal")
            size = int(m.group(1))
            start = pos + m.end()
            if start + size > n:
                raise ParseError("literal shorter than announced")
            stack[-1].append(Literal(bytes(data[start:start + size])))
            pos = start + size
        else:
            start = pos
            depth = 0
            while pos < n:
                ch = data[pos]
                if ch == 0x5B:  # [
                    depth += 1
                elif ch == 0x5D:  # ]
                    if depth == 0:
                        break
                    depth -= 1
                elif depth == 0 and (ch in _ATOM_SPECIALS and ch not in (0x25, 0x2A, 0x5C)):
                    break
                elif depth and ch in (0x0D, 0x0A):
                    break
                pos += 1
            if pos == start:
                raise ParseError(f"unexpected character {chr(c)!r}")
            stack[-1].append(data[start:pos].decode("utf-8", "replace"))
    if len(stack) != 1:
        raise ParseError("unbalanced (")
    return stack[0]


def astring(value: object) -> str:
    """An atom, quoted string or literal as text."""
    if isinstance(value, Literal):
        return value.text()
    if isinstance(value, str):
        return value
    raise ParseError("expected a string")


# ---------------------------------------------------------------------------
# Sequence sets (RFC 3501 9: sequence-set)

_SEQ_RE = re.compile(r"^(\d+|\*)(?::(\d+|\*))?$")


def parse_sequence_set(text: str) -> list[tuple[int | None, int | None]]:
    """'1:3,5,7:*' -> [(1, 3), (5, 5), (7, None)]; None stands for '*'."""
    if not isinstance(text, str) or not text or len(text) > 10_000:
        raise ParseError("bad sequence set")
    out: list[tuple[int | None, int | None]] = []
    for item in text.split(","):
        m = _SEQ_RE.match(item)
        if not m:
            raise ParseError(f"bad sequence set {text[:50]!r}")
        a = None if m.group(1) == "*" else int(m.group(1))
        b = a if m.group(2) is None else (None if m.group(2) == "*" else int(m.group(2)))
        if a == 0 or b == 0:
            raise ParseError("0 is not a message number")
        out.append((a, b))
    return out


def in_set(ranges: list[tuple[int | None, int | None]], value: int, largest: int) -> bool:
    """Is value in the set, where '*' means largest (RFC 3501 9: seq-range is unordered)."""
    for a, b in ranges:
        lo = largest if a is None else a
        hi = largest if b is None else b
        if lo > hi:
            lo, hi = hi, lo
        if lo <= value <= hi:
            return True
    return False
