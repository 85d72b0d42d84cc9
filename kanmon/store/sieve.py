"""Sieve mail filtering (RFC 5228): a strict, bounded parser and an interpreter.

Role: turn a user's script text into a checked program (``compile_script``), and run
that program over one message at local delivery (``evaluate``), giving back what should
happen as data (``Outcome``: the folders to file into, addresses to redirect to, a
vacation reply to consider). Supported: ``require``, ``if``/``elsif``/``else``,
``stop``, ``keep``, ``discard``, ``fileinto`` (RFC 5228 4.1, ``:create`` from RFC 5490
"mailbox", ``:copy`` from RFC 3894), ``redirect`` (``:copy``), ``vacation`` (RFC 5230);
the tests ``address``, ``envelope``, ``header``, ``exists``, ``size``, ``allof``,
``anyof``, ``not``, ``true``, ``false``; comparators ``i;ascii-casemap`` (the default)
and ``i;octet``; match types ``:is``, ``:contains``, ``:matches``.

Trusts: nothing. Scripts come from users (ManageSieve, the command line) and messages
from the network. The script is bounded in size (``max_size``), block nesting
(``MAX_NESTING``) and tokens; ``:matches`` is a wildcard matcher that never backtracks
more than the product of the two lengths (no regular expressions built from input);
header values are cut at ``MAX_VALUE`` characters before they are compared, and one run
may spend at most ``MAX_WORK`` comparison steps (then the message is kept).

Never: do I/O (the delivery adapter reads the script and the message and carries out
the outcome), raise anything but ``SieveError`` from ``compile_script``, or raise at
all from ``evaluate`` (a failing run is an ``Outcome`` that keeps the message: RFC 5228
2.10.6, mail is never lost to a script).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from email.utils import getaddresses

from kanmon.content.decode import decode_header_value

MAX_NESTING = 15  # blocks and tests inside each other (Pigeonhole's default is 32)
MAX_TOKENS = 20_000
MAX_STRING_LIST = 256
MAX_VALUE = 4096  # characters of a header value that are compared
MAX_HEADER_BYTES = 256 * 1024  # the header section scanned for tests
MAX_ACTIONS = 32
MAX_NUMBER = 2**62
MAX_WORK = 5_000_000  # comparison steps per run (see _Budget): about a second of :matches at worst

# What `require` may name (RFC 5228 3.2); also the SIEVE capability of ManageSieve.
EXTENSIONS = ("fileinto", "envelope", "vacation", "mailbox", "copy",
              "comparator-i;octet", "comparator-i;ascii-casemap")
COMPARATORS = ("i;ascii-casemap", "i;octet")
MATCH_TYPES = (":is", ":contains", ":matches")
ADDRESS_PARTS = (":all", ":localpart", ":domain")


class SieveError(Exception):
    """A script that does not compile: the line and the reason."""

    def __init__(self, line: int, reason: str):
        super().__init__(f"line {line}: {reason}")
        self.line = line
        self.reason = reason


# ---------------------------------------------------------------------------
# Tokens (RFC 5228 8.1)

@dataclass(frozen=True, slots=True)
class _Token:
    kind: str  # ident | tag | number | string | one of "[](),;{}"
    value: object
    line: int


def _tokens(text: str) -> list[_Token]:
    out: list[_Token] = []
    i, n, line = 0, len(text), 1
    while i < n:
        if len(out) > MAX_TOKENS:
            raise SieveError(line, "the script is too long (too many tokens)")
        c = text[i]
        if c == "\n":
            line += 1
            i += 1
        elif c in " \t\r":
            i += 1
        elif c == "#":
            end = text.find("\n", i)
            i = n if end < 0 else end
        elif text.startswith("/*", i):
            end = text.find("*/", i + 2)
            if end < 0:
                raise SieveError(line, "unterminated /* comment")
            line += text.count("\n", i, end)
            i = end + 2
        elif c in "[](),;{}":
            out.append(_Token(c, c, line))
            i += 1
        elif c == '"':
            start_line = line
            buf: list[str] = []
            i += 1
            while True:
                if i >= n:
                    raise SieveError(start_line, "unterminated string")
                ch = text[i]
                if ch == '"':
                    i += 1
                    break
                if ch == "\\" and i + 1 < n:
                    ch = text[i + 1]  # RFC 5228 2.4.2: \" and \\; any other \x is x
                    i += 1
                if ch == "\n":
                    line += 1
                buf.append(ch)
                i += 1
            out.append(_Token("string", "".join(buf), start_line))
        elif c == ":":
            j = i + 1
            while j < n and (text[j].isascii() and (text[j].isalnum() or text[j] == "_")):
                j += 1
            if j == i + 1:
                raise SieveError(line, "':' without a tag name")
            out.append(_Token("tag", text[i:j].lower(), line))
            i = j
        elif c.isascii() and c.isdigit():
            j = i
            while j < n and text[j].isascii() and text[j].isdigit():
                j += 1
            if j - i > 18:
                raise SieveError(line, "number too large")
            value = int(text[i:j])
            if j < n and text[j] in "KkMmGg":
                value <<= {"k": 10, "m": 20, "g": 30}[text[j].lower()]
                j += 1
            if value > MAX_NUMBER:
                raise SieveError(line, "number too large")
            out.append(_Token("number", value, line))
            i = j
        elif c.isascii() and (c.isalpha() or c == "_"):
            j = i
            while j < n and text[j].isascii() and (text[j].isalnum() or text[j] == "_"):
                j += 1
            word = text[i:j].lower()
            if word == "text" and j < n and text[j] == ":":
                value, i, lines = _multiline(text, j + 1, line)
                out.append(_Token("string", value, line))
                line += lines
                continue
            out.append(_Token("ident", word, line))
            i = j
        else:
            raise SieveError(line, f"unexpected character {c!r}")
    return out


def _multiline(text: str, i: int, line: int) -> tuple[str, int, int]:
    """RFC 5228 2.4.2: text: [spaces] [#comment] CRLF, lines, a line of ".";
    a line starting with ".." loses one dot. Returns (value, next index, lines used)."""
    end = text.find("\n", i)
    if end < 0:
        raise SieveError(line, "text: needs a line break")
    rest = text[i:end].rstrip("\r").strip(" \t")
    if rest and not rest.startswith("#"):
        raise SieveError(line, "text: must end its line")
    i = end + 1
    lines: list[str] = []
    used = 1
    while True:
        end = text.find("\n", i)
        if end < 0:
            raise SieveError(line, "unterminated text: (no line with a single '.')")
        row = text[i:end].rstrip("\r")
        used += 1
        i = end + 1
        if row == ".":
            break
        lines.append(row[1:] if row.startswith("..") else row)
    return "".join(r + "\r\n" for r in lines), i, used


# ---------------------------------------------------------------------------
# Generic syntax tree (RFC 5228 8.2), then checked commands and tests.

@dataclass(slots=True)
class _Node:
    name: str
    line: int
    args: list[object]  # tag str (":x"), int, or list[str]
    tests: list[_Node]
    block: list[_Node] | None = None


class _Parser:
    def __init__(self, tokens: list[_Token]):
        self.toks = tokens
        self.pos = 0

    def peek(self) -> _Token | None:
        return self.toks[self.pos] if self.pos < len(self.toks) else None

    def take(self) -> _Token:
        tok = self.peek()
        if tok is None:
            last = self.toks[-1].line if self.toks else 1
            raise SieveError(last, "unexpected end of script")
        self.pos += 1
        return tok

    def commands(self, depth: int, until: str | None) -> list[_Node]:
        out: list[_Node] = []
        while True:
            tok = self.peek()
            if tok is None:
                if until is not None:
                    raise SieveError(self.toks[-1].line, "missing '}'")
                return out
            if until is not None and tok.kind == until:
                self.pos += 1
                return out
            out.append(self.command(depth))

    def command(self, depth: int) -> _Node:
        tok = self.take()
        if tok.kind != "ident":
            raise SieveError(tok.line, f"expected a command, found {_show(tok)}")
        args, tests = self.arguments(depth)
        end = self.take()
        if end.kind == ";":
            return _Node(tok.value, tok.line, args, tests)  # type: ignore[arg-type]
        if end.kind == "{":
            if depth + 1 > MAX_NESTING:
                raise SieveError(end.line, f"blocks nested too deep (more than {MAX_NESTING})")
            block = self.commands(depth + 1, "}")
            return _Node(tok.value, tok.line, args, tests, block)  # type: ignore[arg-type]
        raise SieveError(end.line, f"expected ';' or '{{' after {tok.value}, found {_show(end)}")

    def arguments(self, depth: int) -> tuple[list[object], list[_Node]]:
        args: list[object] = []
        while True:
            tok = self.peek()
            if tok is None:
                break
            if tok.kind == "tag":
                args.append(tok.value)
            elif tok.kind == "number":
                args.append(tok.value)
            elif tok.kind == "string":
                args.append([tok.value])
            elif tok.kind == "[":
                self.pos += 1
                args.append(self.string_list(tok.line))
                continue
            else:
                break
            self.pos += 1
        tok = self.peek()
        tests: list[_Node] = []
        if tok is not None and tok.kind == "ident":
            tests = [self.test(depth + 1)]
        elif tok is not None and tok.kind == "(":
            tests = self.test_list(depth + 1)
        return args, tests

    def string_list(self, line: int) -> list[str]:
        out: list[str] = []
        while True:
            tok = self.take()
            if tok.kind != "string":
                raise SieveError(tok.line, f"expected a string in the list, found {_show(tok)}")
            out.append(tok.value)  # type: ignore[arg-type]
            if len(out) > MAX_STRING_LIST:
                raise SieveError(line, f"string list longer than {MAX_STRING_LIST}")
            sep = self.take()
            if sep.kind == "]":
                return out
            if sep.kind != ",":
                raise SieveError(sep.line, f"expected ',' or ']', found {_show(sep)}")

    def test(self, depth: int) -> _Node:
        if depth > MAX_NESTING:
            raise SieveError(self.toks[self.pos].line, f"tests nested too deep (more than {MAX_NESTING})")
        tok = self.take()
        if tok.kind != "ident":
            raise SieveError(tok.line, f"expected a test, found {_show(tok)}")
        args, tests = self.arguments(depth)
        return _Node(tok.value, tok.line, args, tests)  # type: ignore[arg-type]

    def test_list(self, depth: int) -> list[_Node]:
        self.take()  # "("
        out: list[_Node] = []
        while True:
            out.append(self.test(depth))
            sep = self.take()
            if sep.kind == ")":
                return out
            if sep.kind != ",":
                raise SieveError(sep.line, f"expected ',' or ')', found {_show(sep)}")


def _show(tok: _Token) -> str:
    if tok.kind == "string":
        return "a string"
    if tok.kind == "number":
        return "a number"
    return repr(str(tok.value))


# Checked program.

@dataclass(frozen=True, slots=True)
class Match:
    comparator: str
    match_type: str
    keys: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Test:
    kind: str  # address envelope header exists size allof anyof not true false
    line: int
    names: tuple[str, ...] = ()  # header names, or envelope parts
    match: Match | None = None
    part: str = ":all"
    over: bool = False  # size: :over (else :under)
    limit: int = 0
    tests: tuple[Test, ...] = ()


@dataclass(frozen=True, slots=True)
class VacationArgs:
    reason: str
    days: int = 7
    subject: str | None = None
    sender: str | None = None  # :from
    addresses: tuple[str, ...] = ()
    handle: str | None = None
    mime: bool = False


@dataclass(frozen=True, slots=True)
class Command:
    kind: str  # if keep discard stop fileinto redirect vacation
    line: int
    branches: tuple[tuple[Test | None, tuple[Command, ...]], ...] = ()  # if: (test or None for else, block)
    folder: str = ""
    create: bool = False
    copy: bool = False
    address: str = ""
    vacation: VacationArgs | None = None


@dataclass(frozen=True, slots=True)
class Script:
    commands: tuple[Command, ...]
    extensions: frozenset[str]


def _take_tags(node: _Node, allowed: dict[str, int]) -> tuple[dict[str, object], list[object]]:
    """Split node.args into tagged arguments (tag -> value; allowed[tag] = how many values
    follow it: 0 or 1) and the positional ones after them."""
    tags: dict[str, object] = {}
    args = list(node.args)
    while args and isinstance(args[0], str):
        tag = args.pop(0)
        assert isinstance(tag, str)
        if tag not in allowed:
            raise SieveError(node.line, f"{node.name}: unknown or misplaced tagged argument {tag}")
        if tag in tags or (tag in MATCH_TYPES and any(t in tags for t in MATCH_TYPES)) or (
                tag in ADDRESS_PARTS and any(t in tags for t in ADDRESS_PARTS)):
            raise SieveError(node.line, f"{node.name}: {tag} given twice or with a conflicting tag")
        if allowed[tag]:
            if not args or isinstance(args[0], str):
                raise SieveError(node.line, f"{node.name}: {tag} needs a value")
            tags[tag] = args.pop(0)
        else:
            tags[tag] = True
    for a in args:
        if isinstance(a, str):
            raise SieveError(node.line, f"{node.name}: tagged argument {a} must come before the others")
    return tags, args


def _one_string(node: _Node, value: object, what: str) -> str:
    if not isinstance(value, list) or len(value) != 1:
        raise SieveError(node.line, f"{node.name}: {what} must be a single string")
    return value[0]


def _strings(node: _Node, value: object, what: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise SieveError(node.line, f"{node.name}: {what} must be a string or a string list")
    return tuple(value)


def _number(node: _Node, value: object, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise SieveError(node.line, f"{node.name}: {what} must be a number")
    return value


def valid_address(text: str) -> bool:
    """A plain addr-spec local@domain a redirect may go to (no route, no spaces)."""
    if len(text) > 320 or text.count("@") != 1:
        return False
    local, domain = text.split("@")
    if not local or not domain or "." not in domain.strip(".") or domain.startswith(".") or domain.endswith("."):
        return False
    return all(c.isprintable() and c not in ' <>()[]\\,;:"' for c in text) and "%" not in local and "!" not in local


class _Checker:
    def __init__(self) -> None:
        self.extensions: set[str] = set()

    def need(self, node: _Node, extension: str, tag: str = "") -> None:
        """tag: the tagged argument that needs the extension (`fileinto :create`), when
        the command itself does not."""
        if extension not in self.extensions:
            what = f"{node.name} {tag}" if tag else node.name
            raise SieveError(node.line, f'{what} needs require "{extension}"')

    def block(self, nodes: list[_Node], top: bool) -> tuple[Command, ...]:
        out: list[Command] = []
        requires_allowed = top
        i = 0
        while i < len(nodes):
            node = nodes[i]
            if node.name == "require":
                if not requires_allowed:
                    raise SieveError(node.line, "require must come before every other command")
                self.require(node)
                i += 1
                continue
            requires_allowed = False
            if node.name in ("elsif", "else"):
                raise SieveError(node.line, f"{node.name} without an if before it")
            if node.name == "if":
                branches = [self.branch(node)]
                i += 1
                while i < len(nodes) and nodes[i].name in ("elsif", "else"):
                    branches.append(self.branch(nodes[i]))
                    i += 1
                    if branches[-1][0] is None:
                        break
                out.append(Command("if", node.line, branches=tuple(branches)))
                continue
            out.append(self.action(node))
            i += 1
        return tuple(out)

    def require(self, node: _Node) -> None:
        if node.tests or node.block is not None or len(node.args) != 1:
            raise SieveError(node.line, "require takes one string or string list")
        for name in _strings(node, node.args[0], "the extension list"):
            if name not in EXTENSIONS:
                raise SieveError(node.line, f"unsupported extension {name!r} (supported: {', '.join(EXTENSIONS)})")
            self.extensions.add(name)

    def branch(self, node: _Node) -> tuple[Test | None, tuple[Command, ...]]:
        if node.block is None:
            raise SieveError(node.line, f"{node.name} needs a block {{ ... }}")
        if node.args:
            raise SieveError(node.line, f"{node.name} takes no arguments but a test")
        if node.name == "else":
            if node.tests:
                raise SieveError(node.line, "else takes no test")
            test = None
        else:
            if len(node.tests) != 1:
                raise SieveError(node.line, f"{node.name} needs exactly one test")
            test = self.test(node.tests[0])
        return test, self.block(node.block, top=False)

    def action(self, node: _Node) -> Command:
        if node.block is not None:
            raise SieveError(node.line, f"{node.name} takes no block")
        if node.tests:
            raise SieveError(node.line, f"{node.name} takes no test")
        name = node.name
        if name in ("keep", "discard", "stop"):
            if node.args:
                raise SieveError(node.line, f"{name} takes no arguments")
            return Command(name, node.line)
        if name == "fileinto":
            self.need(node, "fileinto")
            tags, args = _take_tags(node, {":create": 0, ":copy": 0})
            if ":create" in tags:
                self.need(node, "mailbox", ":create")
            if ":copy" in tags:
                self.need(node, "copy", ":copy")
            if len(args) != 1:
                raise SieveError(node.line, "fileinto needs one folder name")
            folder = _one_string(node, args[0], "the folder")
            if not folder or len(folder) > 200 or any(ord(c) < 0x20 or c in "/\\\x7f" for c in folder):
                raise SieveError(node.line, f"fileinto: {folder!r} cannot name a folder")
            return Command("fileinto", node.line, folder=folder, create=":create" in tags, copy=":copy" in tags)
        if name == "redirect":
            tags, args = _take_tags(node, {":copy": 0})
            if ":copy" in tags:
                self.need(node, "copy", ":copy")
            if len(args) != 1:
                raise SieveError(node.line, "redirect needs one address")
            address = _one_string(node, args[0], "the address").strip()
            if not valid_address(address):
                raise SieveError(node.line, f"redirect: {address!r} is not a mail address (local@domain)")
            return Command("redirect", node.line, address=address, copy=":copy" in tags)
        if name == "vacation":
            self.need(node, "vacation")
            tags, args = _take_tags(node, {":days": 1, ":subject": 1, ":from": 1, ":addresses": 1, ":mime": 0,
                                           ":handle": 1})
            if len(args) != 1:
                raise SieveError(node.line, "vacation needs one reason string")
            days = _number(node, tags[":days"], ":days") if ":days" in tags else 7
            sender = _one_string(node, tags[":from"], ":from") if ":from" in tags else None
            if sender is not None and not valid_address(_bare(sender)):
                raise SieveError(node.line, f"vacation: :from {sender!r} is not a mail address")
            args_ = VacationArgs(
                reason=_one_string(node, args[0], "the reason"),
                days=max(1, min(days, 365)),  # RFC 5230 4.1: the site may bound :days
                subject=_one_string(node, tags[":subject"], ":subject") if ":subject" in tags else None,
                sender=sender,
                addresses=tuple(a.strip().lower() for a in _strings(node, tags[":addresses"], ":addresses"))
                if ":addresses" in tags else (),
                handle=_one_string(node, tags[":handle"], ":handle") if ":handle" in tags else None,
                mime=":mime" in tags,
            )
            return Command("vacation", node.line, vacation=args_)
        if name in ("if", "elsif", "else", "require"):
            raise SieveError(node.line, f"misplaced {name}")
        raise SieveError(node.line, f"unknown command {name!r}")

    def match(self, node: _Node, tags: dict[str, object], keys: object) -> Match:
        comparator = "i;ascii-casemap"
        if ":comparator" in tags:
            comparator = _one_string(node, tags[":comparator"], ":comparator")
            if comparator not in COMPARATORS:  # RFC 5228 2.7.3: these two need no require
                raise SieveError(node.line, f"unsupported comparator {comparator!r}")
        match_type = next((t for t in MATCH_TYPES if t in tags), ":is")
        return Match(comparator, match_type, _strings(node, keys, "the key list"))

    def test(self, node: _Node) -> Test:
        name = node.name
        if node.block is not None:
            raise SieveError(node.line, f"{name} is a test, not a command")
        match_tags = {":comparator": 1, ":is": 0, ":contains": 0, ":matches": 0}
        if name in ("address", "envelope"):
            if name == "envelope":
                self.need(node, "envelope")
            tags, args = _take_tags(node, {**match_tags, ":all": 0, ":localpart": 0, ":domain": 0})
            if len(args) != 2 or node.tests:
                raise SieveError(node.line, f"{name} needs a header (or part) list and a key list")
            names = tuple(h.lower() for h in _strings(node, args[0], "the header list"))
            if name == "envelope":
                for part in names:
                    if part not in ("from", "to"):
                        raise SieveError(node.line, f"envelope: unsupported part {part!r} (from, to)")
            part = next((t for t in ADDRESS_PARTS if t in tags), ":all")
            return Test(name, node.line, names=names, match=self.match(node, tags, args[1]), part=part)
        if name == "header":
            tags, args = _take_tags(node, match_tags)
            if len(args) != 2 or node.tests:
                raise SieveError(node.line, "header needs a header list and a key list")
            names = tuple(h.lower() for h in _strings(node, args[0], "the header list"))
            return Test("header", node.line, names=names, match=self.match(node, tags, args[1]))
        if name == "exists":
            if len(node.args) != 1 or node.tests:
                raise SieveError(node.line, "exists needs a header list")
            return Test("exists", node.line, names=tuple(h.lower() for h in _strings(node, node.args[0], "the header list")))
        if name == "size":
            tags, args = _take_tags(node, {":over": 0, ":under": 0})
            if len(tags) != 1 or len(args) != 1 or node.tests:
                raise SieveError(node.line, "size needs :over or :under and a number")
            return Test("size", node.line, over=":over" in tags, limit=_number(node, args[0], "the limit"))
        if name in ("allof", "anyof"):
            if node.args or not node.tests:
                raise SieveError(node.line, f"{name} needs a list of tests in ( )")
            return Test(name, node.line, tests=tuple(self.test(t) for t in node.tests))
        if name == "not":
            if node.args or len(node.tests) != 1:
                raise SieveError(node.line, "not needs one test")
            return Test("not", node.line, tests=(self.test(node.tests[0]),))
        if name in ("true", "false"):
            if node.args or node.tests:
                raise SieveError(node.line, f"{name} takes no arguments")
            return Test(name, node.line)
        raise SieveError(node.line, f"unknown test {name!r}")


def compile_script(text: str | bytes, max_size: int = 64 * 1024) -> Script:
    """The checked program of a script, or SieveError (line, reason)."""
    if isinstance(text, bytes):
        if len(text) > max_size:
            raise SieveError(1, f"the script is larger than {max_size} bytes")
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise SieveError(text[: e.start].count(b"\n") + 1, "the script is not UTF-8") from None
    elif len(text.encode("utf-8")) > max_size:
        raise SieveError(1, f"the script is larger than {max_size} bytes")
    if "\0" in text:
        raise SieveError(text[: text.index("\0")].count("\n") + 1, "NUL in the script")
    tree = _Parser(_tokens(text)).commands(0, None)
    checker = _Checker()
    commands = checker.block(tree, top=True)
    return Script(commands, frozenset(checker.extensions))


# ---------------------------------------------------------------------------
# The message as the tests see it.

@dataclass(slots=True)
class MessageView:
    """What a script may look at: the header fields, the envelope, the size."""

    headers: list[tuple[str, str]]  # (lower-case name, raw unfolded value)
    mail_from: str  # "" for <>
    rcpt: str
    size: int

    def values(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n == name]


def parse_headers(content: bytes) -> list[tuple[str, str]]:
    """The header fields of a message (LF or CRLF): (lower-case name, unfolded value).
    Bounded: at most MAX_HEADER_BYTES are looked at; lines that are not fields are skipped."""
    head = content[:MAX_HEADER_BYTES]
    end = len(head)
    for sep in (b"\r\n\r\n", b"\n\n"):
        pos = head.find(sep)
        if pos >= 0:
            end = min(end, pos)
    text = head[:end].decode("utf-8", "surrogateescape")
    if text.startswith("\n") or text.startswith("\r\n"):
        return []
    out: list[tuple[str, str]] = []
    for raw in text.replace("\r\n", "\n").split("\n"):
        if raw[:1] in (" ", "\t") and out:
            name, value = out[-1]
            out[-1] = (name, value + " " + raw.strip())
            continue
        name, sep, value = raw.partition(":")
        if not sep or not name or any(c <= " " or c > "~" for c in name):
            continue
        out.append((name.lower(), value.strip()))
    return out


def _decoded(value: str) -> str:
    return decode_header_value(value)[:MAX_VALUE]


def _bare(address: str) -> str:
    """The addr-spec of 'Name <a@b>' or 'a@b'."""
    pairs = getaddresses([address])
    return pairs[0][1] if pairs and pairs[0][1] else address.strip()


def _addresses(value: str) -> list[str]:
    return [a for _n, a in getaddresses([value[:MAX_VALUE]]) if a]


def _address_part(address: str, part: str) -> str:
    local, at, domain = address.rpartition("@")
    if not at:
        local, domain = address, ""
    if part == ":localpart":
        return local
    if part == ":domain":
        return domain
    return address


def _casefold(text: str) -> str:
    """i;ascii-casemap: only A-Z fold (RFC 4790 9.2)."""
    return text.translate(_ASCII_LOWER)


_ASCII_LOWER = {c: c + 32 for c in range(ord("A"), ord("Z") + 1)}


def wildcard_match(value: str, pattern: str) -> bool:
    """RFC 5228 2.7.1 :matches: '*' any sequence, '?' one character, '\\' quotes the next.
    Iterative, remembering only the last '*' (linear backtracking, O(len(value)*len(pattern)))."""
    pat: list[tuple[str, bool]] = []  # (char, is wildcard)
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\" and i + 1 < len(pattern):
            pat.append((pattern[i + 1], False))
            i += 2
            continue
        pat.append((c, c in "*?"))
        i += 1
    v = p = 0
    star_p, star_v = -1, 0
    while v < len(value):
        if p < len(pat) and (pat[p] == ("?", True) or (not pat[p][1] and pat[p][0] == value[v])):
            v += 1
            p += 1
        elif p < len(pat) and pat[p] == ("*", True):
            star_p, star_v = p, v
            p += 1
        elif star_p >= 0:
            star_v += 1
            v = star_v
            p = star_p + 1
        else:
            return False
    while p < len(pat) and pat[p] == ("*", True):
        p += 1
    return p == len(pat)


class _Budget:
    """Work a run may do comparing: each comparison costs the product of the lengths (the
    worst case of :matches), so a script cannot make one delivery take minutes."""

    def __init__(self, units: int):
        self.left = units

    def spend(self, units: int) -> None:
        self.left -= units
        if self.left < 0:
            raise SieveRuntimeError("the script compares too much (work limit)")


def _matches(match: Match, values: list[str], budget: _Budget) -> bool:
    fold = match.comparator == "i;ascii-casemap"
    keys = [_casefold(k) if fold else k for k in match.keys]
    for value in values:
        v = _casefold(value) if fold else value
        for key in keys:
            budget.spend((len(v) + 1) * (len(key) + 1) if match.match_type == ":matches" else len(v) + len(key) + 1)
            if match.match_type == ":is":
                hit = v == key
            elif match.match_type == ":contains":
                hit = key in v
            else:
                hit = wildcard_match(v, key)
            if hit:
                return True
    return False


def _test(test: Test, msg: MessageView, budget: _Budget) -> bool:
    kind = test.kind
    if kind == "true":
        return True
    if kind == "false":
        return False
    if kind == "not":
        return not _test(test.tests[0], msg, budget)
    if kind == "allof":
        return all(_test(t, msg, budget) for t in test.tests)
    if kind == "anyof":
        return any(_test(t, msg, budget) for t in test.tests)
    if kind == "size":
        return msg.size > test.limit if test.over else msg.size < test.limit
    if kind == "exists":
        return all(msg.values(name) for name in test.names)
    assert test.match is not None
    if kind == "header":
        return _matches(test.match, [_decoded(v) for name in test.names for v in msg.values(name)], budget)
    if kind == "address":
        found = [_address_part(a, test.part) for name in test.names for v in msg.values(name)
                 for a in _addresses(_decoded(v))]
        return _matches(test.match, found, budget)
    # envelope (RFC 5228 5.4): "from" is the reverse path ("" for <>), "to" the recipient
    values = []
    for part in test.names:
        address = msg.mail_from if part == "from" else msg.rcpt
        values.append("" if not address else _address_part(address, test.part))
    return _matches(test.match, values, budget)


# ---------------------------------------------------------------------------
# Running a script.

@dataclass(slots=True)
class Outcome:
    """What a run decided. folders: where to store the message (in order, each once;
    "INBOX" is keep); created: folders that :create allows to make; redirects: addresses
    to forward to; vacation: the reply to consider (the adapter decides whether to send
    it); errors: why the run stopped early (the message is then kept)."""

    folders: list[str] = field(default_factory=list)
    created: set[str] = field(default_factory=set)
    redirects: list[str] = field(default_factory=list)
    vacation: VacationArgs | None = None
    discarded: bool = False
    errors: list[str] = field(default_factory=list)

    @property
    def kept(self) -> bool:
        return "INBOX" in self.folders


class _Stop(Exception):
    pass


class _Run:
    def __init__(self, msg: MessageView, max_redirects: int):
        self.msg = msg
        self.max_redirects = max_redirects
        self.out = Outcome()
        self.implicit_keep = True
        self.actions = 0
        self.budget = _Budget(MAX_WORK)

    def count(self, cmd: Command) -> None:
        self.actions += 1
        if self.actions > MAX_ACTIONS:
            raise SieveRuntimeError(f"line {cmd.line}: more than {MAX_ACTIONS} actions")

    def file(self, folder: str) -> None:
        if folder not in self.out.folders:
            self.out.folders.append(folder)

    def block(self, commands: tuple[Command, ...]) -> None:
        for cmd in commands:
            kind = cmd.kind
            if kind == "if":
                for test, body in cmd.branches:
                    if test is None or _test(test, self.msg, self.budget):
                        self.block(body)
                        break
            elif kind == "stop":
                raise _Stop
            elif kind == "keep":
                self.count(cmd)
                self.file("INBOX")
                self.implicit_keep = False
            elif kind == "discard":
                self.implicit_keep = False
                self.out.discarded = True
            elif kind == "fileinto":
                self.count(cmd)
                self.file(cmd.folder)
                if cmd.create:
                    self.out.created.add(cmd.folder)
                if not cmd.copy:
                    self.implicit_keep = False
            elif kind == "redirect":
                self.count(cmd)
                if cmd.address.lower() not in (a.lower() for a in self.out.redirects):
                    if len(self.out.redirects) >= self.max_redirects:
                        raise SieveRuntimeError(f"line {cmd.line}: more than {self.max_redirects} redirects")
                    self.out.redirects.append(cmd.address)
                if not cmd.copy:
                    self.implicit_keep = False
            elif kind == "vacation":
                if self.out.vacation is not None:  # RFC 5230 4: at most one vacation per run
                    raise SieveRuntimeError(f"line {cmd.line}: a second vacation action")
                self.out.vacation = cmd.vacation


class SieveRuntimeError(Exception):
    """A limit reached while the script ran: the message is kept (RFC 5228 2.10.6)."""


def evaluate(script: Script, msg: MessageView, *, max_redirects: int = 4) -> Outcome:
    """Run script over msg; never raises. After a run-time error the outcome is "keep in
    INBOX" and nothing else (RFC 5228 2.10.6: the implicit keep), with the error noted."""
    run = _Run(msg, max_redirects)
    try:
        run.block(script.commands)
    except _Stop:
        pass
    except (SieveRuntimeError, RecursionError, ValueError) as e:
        return Outcome(folders=["INBOX"], errors=[str(e) or type(e).__name__])
    out = run.out
    if run.implicit_keep:
        # RFC 5228 2.10.2: the implicit keep, cancelled by discard, fileinto, redirect;
        # vacation does not cancel it.
        if "INBOX" not in out.folders:
            out.folders.insert(0, "INBOX")
    return out
