"""IMAP THREAD (RFC 5256): the ORDEREDSUBJECT and REFERENCES algorithms.

Role: turn one row per message (sequence number, UID, Message-ID, References,
In-Reply-To, subject, sent date) into the thread tree and render it as the THREAD
response's data. The rows come from the mailbox index (or the message file when the
index does not hold the header fields); nothing here reads files.

Trusts: nothing in the rows: Message-IDs and References are whatever senders wrote, so
links that would make a loop are refused (RFC 5256 REFERENCES 1), references are
bounded per message, and every walk over the tree is iterative (a hostile chain of
10,000 replies must not exhaust the stack).
Never: raise on a message's content; drop a message (each one is in the answer once).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

MAX_REFERENCES = 1000  # the last this many Message-IDs of a References field are used

_MSG_ID = re.compile(r"<([^<>]+)>")
_SUBJ_BLOBS = re.compile(r"^(?:\s*\[[^\[\]]*\])*\s*")
_SUBJ_REFWD = re.compile(r"^(?:re|fwd?)\s*(?:\[[^\[\]]*\])?\s*:", re.I)


@dataclass
class Row:
    """One message as THREAD sees it (strings decoded; sent is a POSIX time)."""

    seq: int
    uid: int
    message_id: str
    references: str
    in_reply_to: str
    subject: str  # the base subject (RFC 5256 2.1)
    refwd: bool  # the subject marked a reply or forward
    sent: float


@dataclass(eq=False)
class _Node:
    row: Row | None = None  # None: a dummy (a message referred to but not here)
    parent: _Node | None = None
    children: list[_Node] = field(default_factory=list)


def msg_ids(value: str) -> list[str]:
    """The Message-IDs (without angle brackets, whitespace removed) in a field."""
    return ["".join(m.split()) for m in _MSG_ID.findall(value or "") if m.strip()]


def is_reply_or_forward(subject: str) -> bool:
    """RFC 5256 2.1: did base-subject extraction remove a reply/forward marker?"""
    text = " ".join(subject.split())
    if text.lower().endswith("(fwd)") or text.lower().startswith("[fwd:"):
        return True
    return bool(_SUBJ_REFWD.match(_SUBJ_BLOBS.sub("", text, count=1)))


def _date_key(n: _Node) -> tuple[float, int]:
    """Sent date and sequence number; a dummy sorts as its first child."""
    while n.row is None:
        if not n.children:
            return (0.0, 0)
        n = n.children[0]
    return (n.row.sent, n.row.seq)


def ordered_subject(rows: list[Row]) -> list[_Node]:
    """ORDEREDSUBJECT: by base subject, then sent date; the first of each subject is the
    parent of the rest, which are siblings."""
    ordered = sorted(rows, key=lambda r: (r.subject, r.sent, r.seq))
    roots: list[_Node] = []
    last: _Node | None = None
    for r in ordered:
        n = _Node(r)
        if last is not None and last.row is not None and last.row.subject == r.subject:
            n.parent = last
            last.children.append(n)
        else:
            roots.append(n)
            last = n
    roots.sort(key=_date_key)
    return roots


def _ancestor(a: _Node, b: _Node) -> bool:
    """Is a b or one of b's ancestors? (A node without children is nobody's ancestor:
    no walk, so a long chain of replies links in linear time.)"""
    if a is not b and not a.children:
        return False
    n: _Node | None = b
    while n is not None:
        if n is a:
            return True
        n = n.parent
    return False


def _link(parent: _Node, child: _Node) -> None:
    if child.parent is not None:
        child.parent.children.remove(child)
    child.parent = parent
    parent.children.append(child)


def references(rows: list[Row]) -> list[_Node]:
    """REFERENCES (RFC 5256 3): link by References/In-Reply-To, prune dummies, sort,
    merge root threads with the same base subject, sort the siblings."""
    table: dict[str, _Node] = {}
    nodes: list[_Node] = []
    for r in sorted(rows, key=lambda r: r.seq):
        # (1) a message without a Message-ID, or with one an earlier message has, gets a
        # unique one: it can be a parent of nothing.
        ids = msg_ids(r.message_id)
        key = ids[0] if ids else ""
        if key and key in table and table[key].row is None:
            node = table[key]
            node.row = r
        else:
            node = _Node(r)
            if key and key not in table:
                table[key] = node
        nodes.append(node)
        refs = msg_ids(r.references)[-MAX_REFERENCES:]
        if not refs:
            refs = msg_ids(r.in_reply_to)[:1]
        # (1A) link the references in order, never changing an existing link or making a loop
        prev: _Node | None = None
        for ref in refs:
            cur = table.get(ref)
            if cur is None:
                cur = table[ref] = _Node()
            if prev is not None and cur.parent is None and not _ancestor(cur, prev):
                _link(prev, cur)
            prev = cur
        # (1B) the last reference is the parent (replacing a link from a truncated
        # References field), unless that makes a loop
        if prev is not None and prev is not node and not _ancestor(node, prev):
            _link(prev, node)
        elif prev is None and node.parent is not None:
            node.parent.children.remove(node)
            node.parent = None
    # (2) the root set: containers without a parent
    every = {id(n): n for n in [*table.values(), *nodes]}
    roots = [n for n in every.values() if n.parent is None]
    # (4) prune dummies
    roots = _prune(roots)
    # (5) sort the root set
    for n in roots:
        if n.row is None:
            n.children.sort(key=_date_key)
    roots.sort(key=_date_key)
    # (6) group the root set by base subject
    roots = _group(roots)
    # (7) sort every set of siblings (dummies sort as their first child)
    _sort_all(roots)
    return roots


def _prune(roots: list[_Node]) -> list[_Node]:
    """RFC 5256 REFERENCES 4: a dummy without children goes; one with children gives way to
    them, except at the root when it has more than one."""
    # Post-order over the tree, so a dummy's children are final when it is pruned.
    order: list[_Node] = []
    stack = list(roots)
    while stack:
        n = stack.pop()
        order.append(n)
        stack.extend(n.children)
    for n in reversed(order):
        kept: list[_Node] = []
        for c in n.children:
            if c.row is None:
                for g in c.children:
                    g.parent = n
                kept.extend(c.children)
            else:
                kept.append(c)
        n.children = kept
    out: list[_Node] = []
    for n in roots:
        if n.row is None and len(n.children) <= 1:
            for g in n.children:
                g.parent = None
            out.extend(n.children)
        else:
            out.append(n)
    return out


def _thread_subject(n: _Node) -> tuple[str, bool]:
    m = n if n.row is not None else (n.children[0] if n.children else None)
    if m is None or m.row is None:
        return "", False
    return m.row.subject, m.row.refwd


def _group(roots: list[_Node]) -> list[_Node]:
    """RFC 5256 REFERENCES 6: root threads with the same base subject become one."""
    subjects: dict[str, _Node] = {}
    for n in roots:  # (6B)
        subject, refwd = _thread_subject(n)
        if not subject:
            continue
        old = subjects.get(subject)
        if old is None:
            subjects[subject] = n
        elif old.row is not None and (n.row is None or (old.row.refwd and not refwd)):
            subjects[subject] = n
    out: list[_Node] = []
    position: dict[int, int] = {}  # id of a root in `out` -> its index
    for n in roots:  # (6C)
        subject, refwd = _thread_subject(n)
        into = subjects.get(subject) if subject else None
        if into is None or into is n:
            position[id(n)] = len(out)
            out.append(n)
            continue
        if into.row is None and n.row is None:
            for c in n.children:
                c.parent = into
            into.children.extend(n.children)
            n.children = []
        elif into.row is None:
            n.parent = into
            into.children.append(n)
        elif n.row is not None and refwd and not into.row.refwd:
            n.parent = into
            into.children.append(n)
        else:
            dummy = _Node(None, None, [into, n])
            into.parent = dummy
            n.parent = dummy
            subjects[subject] = dummy
            if id(into) in position:
                out[position[id(into)]] = dummy
                position[id(dummy)] = position.pop(id(into))
            else:  # the table's thread comes later in the root set: it will be put there
                _replace_later(roots, into, dummy)
    return [n for n in out if n.row is not None or n.children]


def _replace_later(roots: list[_Node], old: _Node, new: _Node) -> None:
    for i, n in enumerate(roots):
        if n is old:
            roots[i] = new
            return


def _sort_all(roots: list[_Node]) -> None:
    stack = list(roots)
    while stack:
        n = stack.pop()
        n.children.sort(key=_date_key)
        stack.extend(n.children)
    # Children first, so a dummy's first child is known when the level above is sorted.
    roots.sort(key=_date_key)


def render(roots: list[_Node], uid: bool) -> str:
    """The THREAD response data: "(1 2 (3)(4 5))..."; a chain of only children is flat."""
    out: list[str] = []
    # Work items: a node to open a parenthesised thread at, or a literal ")".
    stack: list[_Node | str] = [c for r in reversed(roots) for c in (")", r)]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            out.append(item)
            continue
        out.append("(")
        n: _Node = item
        first = True
        while True:
            if n.row is not None:
                if not first:
                    out.append(" ")
                out.append(str(n.row.uid if uid else n.row.seq))
                first = False
            if len(n.children) == 1 and n.row is not None:
                n = n.children[0]
                continue
            if n.children:
                if not first:
                    out.append(" ")
                for c in reversed(n.children):
                    stack.append(")")
                    stack.append(c)
            break
    return "".join(out)
