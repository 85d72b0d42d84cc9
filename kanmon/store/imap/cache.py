"""Cache entries of messages: what the mailbox index keeps so IMAP need not reread files.

Role: turn one message (wire form) into a ``kanmon.store.index.CacheEntry`` (rendered
ENVELOPE, BODY and BODYSTRUCTURE, the raw lines of the header fields clients fetch, the
decoded and normalized text of the address and subject fields SEARCH looks at), and
fill a folder's index for messages it lacks. Used by IMAP (lazily) and by local
delivery (which has the message in hand).

Trusts: nothing in the message: parsing is message.py's (bounded, never raises on
content); header decoding is kanmon.content.decode's (never raises).
Never: keep a message's body, or write anything but index entries.
"""

from __future__ import annotations

import email.utils
import os
from pathlib import Path

from kanmon.content.decode import decode_header_value, normalize
from kanmon.store import index as mindex
from kanmon.store.imap import message as mime
from kanmon.store.maildir import Folder, MessageInfo, to_crlf

# The fields Thunderbird, Outlook, iOS Mail and webmails ask for in
# BODY.PEEK[HEADER.FIELDS (...)]: a request for a subset of these is answered from the cache.
CACHED_HEADERS = frozenset({
    "from", "to", "cc", "bcc", "subject", "date", "message-id", "priority", "x-priority",
    "importance", "references", "in-reply-to", "newsgroups", "content-type", "reply-to", "sender",
    "list-id", "list-post", "list-unsubscribe", "x-mailer", "mime-version", "disposition-notification-to",
})
SEARCH_FIELDS = ("subject", "from", "to", "cc", "bcc")  # in the entry's search text, in this order
MAX_CACHED_HEADERS = 16 * 1024  # more header bytes than this: not cached (read from the file)


def sent_day(value: str | None) -> int:
    """A Date: header's day as yyyymmdd (the date as written, RFC 3501 SENTON), 0 if none."""
    if not value:
        return 0
    try:
        d = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return 0
    if not 1000 <= d.year <= 9999:
        return 0
    return d.year * 10000 + d.month * 100 + d.day


def search_text(tree: mime.Part) -> bytes:
    """Decoded (RFC 2047, Japanese charsets too, raw ISO-2022-JP included), normalized
    values of SEARCH_FIELDS. It never holds an ESC (see outdated_text)."""
    out = []
    for name in SEARCH_FIELDS:
        values = [decode_header_value(v) for n, v, _ in tree.fields if n == name]
        out.append(normalize(" ".join(values)).replace("\0", " ").replace("\x1b", " "))
    return "\0".join(out).encode("utf-8", "surrogatepass")


def outdated_text(search: bytes) -> bool:
    """Whether an entry's search text was made before raw ISO-2022-JP header fields were
    decoded (it kept their ESC sequences): such an entry is made again from the file
    when SEARCH, SORT or THREAD needs its text (docs/mailbox-index.md)."""
    return b"\x1b" in search


def make_entry(wire: bytes, internal_date: float, size: int, tree: mime.Part | None = None) -> mindex.CacheEntry:
    """The cache entry of a message in wire form (CRLF); size is its stored (LF) size."""
    if tree is None:
        tree = mime.parse(wire)
    headers = b"".join(raw for n, _, raw in tree.fields if n in CACHED_HEADERS)
    if len(headers) > MAX_CACHED_HEADERS:
        headers = b""  # too much to keep: such a request reads the file
    return mindex.CacheEntry(
        size=size,
        vsize=len(wire),
        internal_date=int(internal_date),
        sent_day=sent_day(tree.get("date")),
        envelope=mime.envelope(tree),
        body=mime.bodystructure(tree, extended=False),
        bodystructure=mime.bodystructure(tree, extended=True),
        headers=headers,
        search=search_text(tree),
    )


def search_fields(entry: mindex.CacheEntry) -> dict[str, str]:
    """{field: normalized decoded text} from an entry's search text."""
    parts = entry.search.decode("utf-8", "surrogatepass").split("\0")
    return dict(zip(SEARCH_FIELDS, parts, strict=False))


def headers_cached(entry: mindex.CacheEntry, names: tuple[str, ...]) -> bool:
    """Whether HEADER.FIELDS (names) can be answered from this entry."""
    return bool(entry.headers) and all(n.lower() in CACHED_HEADERS for n in names)


def entry_for_file(path: os.PathLike | str) -> tuple[mindex.CacheEntry, bytes, mime.Part] | None:
    """Read and parse one message file: (entry, wire bytes, tree); None when it is gone."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            raw = f.read()
    except FileNotFoundError:
        return None
    wire = to_crlf(raw)
    tree = mime.parse(wire)
    return make_entry(wire, st.st_mtime, len(raw), tree), wire, tree


def entries(folder: Folder, infos: list[MessageInfo], search_only: bool = False,
            texts: bool = False) -> list[mindex.CacheEntry | None]:
    """The cache entries of these messages, reading and adding the missing ones (None:
    the message is gone). search_only: what SEARCH needs (see MailboxIndex.get_many);
    search_only or texts: the caller reads the search text, so an outdated one
    (outdated_text) counts as missing."""
    idx = folder.index
    found = idx.get_many([i.base for i in infos], search_only)
    missing: list[tuple[str, mindex.CacheEntry]] = []
    texts = texts or search_only
    for n, (info, e) in enumerate(zip(infos, found, strict=True)):
        if e is not None and not (texts and outdated_text(e.search)):
            continue
        p = folder.locate(info)
        got = entry_for_file(p) if p is not None else None
        if got is not None:
            found[n] = got[0]
            missing.append((info.base, got[0]))
    if missing:
        idx.add_many(missing)
    return found


MAX_DELIVERY_ENTRY = 1 << 20  # larger messages get their entry when IMAP first asks


def record_deliveries(files: list[tuple[Path, bytes, tuple[bytes, ...] | None]]) -> None:
    """Local delivery's hook: add the cache entries of messages it has just written
    (path in a Maildir's new/, the stored LF bytes, and their wire form, to_crlf(stored),
    in pieces when the delivery has it already; None: made here). A failure is the
    cache's, never the delivery's: that entry is skipped (IMAP makes it when it is asked for)."""
    for path, stored, pieces in files:
        if len(stored) > MAX_DELIVERY_ENTRY:
            continue
        try:
            mtime = os.stat(path).st_mtime
            wire = to_crlf(stored) if pieces is None else b"".join(pieces)
            entry = make_entry(wire, mtime, len(stored))
            mindex.MailboxIndex(mindex.index_path(path.parent.parent)).add(path.name.partition(":")[0], entry)
        except (OSError, ValueError):
            continue
