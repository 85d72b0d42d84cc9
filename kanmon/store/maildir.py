"""Maildir++ mailboxes: the reading and writing side used by POP3, IMAP and the admin.

Role: one account's mailbox at ``<data_dir>/mailboxes/<domain>/<local-part>`` in the
Maildir++ layout Dovecot uses (``mail_location = maildir:<data_dir>/mailboxes/%d/%n``):
INBOX is the root's ``new/ cur/ tmp/``, folders are ``.Name`` and ``.Parent.Child``
directories (hierarchy delimiter "."), flags live in the ``:2,FLAGS`` filename suffix,
messages are stored with LF line endings. UIDs and UIDVALIDITY are kept per folder in
Dovecot's own ``dovecot-uidlist`` (version 3 format, updated under Dovecot's dotlock
and replaced atomically), so they survive restarts and Dovecot shows the same UIDs. Delivery (kanmon/deliver) writes into ``new/``; a scan moves
such files to ``cur/`` the way an IMAP server does.

Trusts: the files under the mailbox root (written by delivery, Dovecot or us) to be
Maildir files; file names that do not parse are skipped, never fatal. Folder names come
from IMAP clients and are checked by ``check_folder_name`` before they touch a path.

Never: follow a folder name out of the mailbox root (no "/" or NUL, no empty
hierarchy parts), write a message anywhere but ``tmp/`` first (rename into place), or
reuse a UID within one UIDVALIDITY.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import itertools
import os
import re
import shutil
import socket
import threading
import time
import uuid
from kanmon.spool.groupcommit import fsync_dir
from kanmon.store.index import MailboxIndex, index_path
from kanmon.store.modseq import ModseqLog, changed_messages, modseq_path
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

DELIMITER = "."
UIDLIST = "dovecot-uidlist"  # Dovecot's own file and format, so both agree on UIDs
LOCK_STALE = 120.0  # a dotlock older than this was left by a crash (Dovecot uses 2 min)
LOCK_WAIT = 10.0
SUBSCRIPTIONS = "subscriptions"
MAX_FOLDER_NAME = 200

# Maildir info flags (cr.yp.to/proto/maildir.html, Dovecot's mapping of IMAP flags).
FLAG_TO_LETTER = {
    "\\Draft": "D",
    "\\Flagged": "F",
    "\\Answered": "R",
    "\\Seen": "S",
    "\\Deleted": "T",
}
LETTER_TO_FLAG = {v: k for k, v in FLAG_TO_LETTER.items()}
SYSTEM_FLAGS = frozenset(FLAG_TO_LETTER)

# Keywords ($Junk, $Forwarded, $label1, ...) are the letters a..z in the info part; the
# names are in the folder's dovecot-keywords file, "<index> <name>" per line (Dovecot's).
KEYWORDS_FILE = "dovecot-keywords"
MAX_KEYWORDS = 26
_KEYWORD_RE = re.compile(r"^[!#$&'+\-.0-9:;<=>?@A-Z^_`a-z|~]{1,100}$")


def is_keyword(name: str) -> bool:
    """An IMAP flag-keyword (RFC 3501 9: atom, no backslash) that we can store."""
    return bool(_KEYWORD_RE.match(name))


# RFC 6154 special-use folders created with every mailbox.
SPECIAL_USE = {"Sent": "\\Sent", "Drafts": "\\Drafts", "Trash": "\\Trash", "Junk": "\\Junk"}
# Attributes a client may give a folder it creates (RFC 6154 3, CREATE-SPECIAL-USE); \\All
# and \\Flagged would be virtual folders, which we do not have. Kept per account in
# SPECIAL_USE_FILE, one "<attribute> <folder name>" per line.
CREATABLE_USES = frozenset({"\\Archive", "\\Drafts", "\\Junk", "\\Sent", "\\Trash"})
SPECIAL_USE_FILE = "kanmon-special-use"


class MaildirError(Exception):
    """A mailbox operation that cannot be done; str() is safe to show the user."""


class FolderNotFound(MaildirError):
    pass


class FolderExists(MaildirError):
    pass


class BadFolderName(MaildirError):
    pass


def mailbox_path(data_dir: Path | str, domain: str, local: str) -> Path:
    """Where the Maildir of local@domain lives (both parts lower-cased, as config does)."""
    domain = domain.lower()
    local = local.lower()
    for part in (domain, local):
        if not part or "/" in part or "\0" in part or part in (".", "..") or part.startswith("."):
            raise MaildirError(f"{part!r} cannot name a mailbox directory")
    return Path(data_dir) / "mailboxes" / domain / local


def check_folder_name(name: str) -> str:
    """The folder name, or BadFolderName. INBOX (any case) is returned as "INBOX"."""
    if name.upper() == "INBOX":
        return "INBOX"
    if not name or len(name) > MAX_FOLDER_NAME:
        raise BadFolderName("folder name is empty or too long")
    if any(ch in name for ch in "/\\\0\r\n") or any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in name):
        raise BadFolderName("folder name has a character that is not allowed")
    parts = name.split(DELIMITER)
    if any(not p for p in parts):
        raise BadFolderName("folder name has an empty hierarchy level")
    if parts[0].upper() == "INBOX":
        raise BadFolderName("folders below INBOX are not supported; create it at the top level")
    return name


_hostname_cache: list[str] = []


def _host_part() -> str:
    if not _hostname_cache:
        _hostname_cache.append(socket.gethostname().replace("/", "\\057").replace(":", "\\072") or "localhost")
    return _hostname_cache[0]


_seq = itertools.count(1)


def unique_name(size: int, vsize: int, now: float | None = None) -> str:
    """A Maildir unique name: <time>.M<usec>P<pid>Q<n>.<host>,S=<size>,W=<vsize>."""
    t = time.time() if now is None else now
    sec = int(t)
    usec = int((t - sec) * 1_000_000)
    return f"{sec}.M{usec}P{os.getpid()}Q{next(_seq)}.{_host_part()},S={size},W={vsize}"


def to_crlf(data: bytes) -> bytes:
    """Stored (LF) text -> wire (CRLF) text; a CRLF already present stays one CRLF."""
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def to_lf(data: bytes) -> bytes:
    """Wire (CRLF) text -> stored (LF) text."""
    return data.replace(b"\r\n", b"\n")


_SIZE_RE = re.compile(r",S=(\d+)")
_VSIZE_RE = re.compile(r",W=(\d+)")


@dataclass(slots=True)
class MessageInfo:
    """One message as a scan saw it. ``flags`` are IMAP system flags."""

    uid: int
    base: str  # unique part of the file name (before ":2,")
    subdir: str  # "cur" or "new"
    flags: frozenset[str]
    extra: str = ""  # info letters we do not map (keywords, P); kept on rename
    size: int | None = None  # stored size (LF)
    vsize: int | None = None  # wire size (CRLF), what POP3 and IMAP report
    recent: bool = False  # moved from new/ by the scan that found it
    modseq: int = 0  # RFC 7162 mod-sequence of its last change (0: the folder has none)

    @property
    def filename(self) -> str:
        if self.subdir == "new" and not self.flags and not self.extra:
            return self.base
        return f"{self.base}:2,{flag_letters(self.flags, self.extra)}"


def flag_letters(flags: Iterable[str], extra: str = "") -> str:
    letters = {FLAG_TO_LETTER[f] for f in flags if f in FLAG_TO_LETTER} | set(extra)
    return "".join(sorted(letters))


def parse_filename(name: str) -> tuple[str, frozenset[str], str] | None:
    """'base:2,FS' -> (base, {\\Flagged, \\Seen}, extra). None if it is not a message name."""
    if not name or name.startswith("."):
        return None
    base, sep, info = name.partition(":")
    flags: set[str] = set()
    extra = ""
    if sep and info.startswith("2,"):
        for ch in info[2:]:
            if ch in LETTER_TO_FLAG:
                flags.add(LETTER_TO_FLAG[ch])
            elif ch.isalpha():
                extra += ch
    key = frozenset(flags)
    return base, _FLAG_SETS.setdefault(key, key), extra


# One shared frozenset per combination of system flags (at most 2**5): a 20,000-message
# folder then holds a few sets instead of 20,000, which Python's cyclic garbage collector
# would otherwise walk on every full collection.
_FLAG_SETS: dict[frozenset[str], frozenset[str]] = {}


@dataclass
class _UidState:
    uidvalidity: int = 0
    uidnext: int = 1
    uids: dict[str, int] = field(default_factory=dict)  # base -> uid
    exts: dict[str, str] = field(default_factory=dict)  # base -> Dovecot's per-line extension fields
    guid: str = ""  # Dovecot's mailbox GUID header field (kept as found, made when missing)
    stamp: tuple[int, int, int] | None = None  # (ino, size, mtime_ns) of the file read


@dataclass(slots=True, eq=False)
class Snapshot:
    """A folder's messages as one scan saw them, shared by every session of the process
    until the folder's directories change. Read-only for its users (copy before changing)."""

    messages: list[MessageInfo]  # ordered by UID
    uids: list[int]
    by_uid: dict[int, MessageInfo]
    recent: set[int]  # moved from new/ by the scan that made it; the first session to SELECT takes them
    stamp: tuple = ()
    reusable: bool = False  # its directories were last changed well before the scan
    has_new: bool = False  # made without moving new/: some messages are still there
    highest_modseq: int = 0  # the folder's HIGHESTMODSEQ as of this scan (0: none kept)


STABLE_NS = 1_000_000_000  # a directory changed less than this before a scan is scanned again
# A new scan of at least this many messages moves the process's live objects out of the
# cyclic garbage collector's reach (gc.freeze). The scan's MessageInfo objects live as long as
# the folder is unchanged; left in the oldest generation, every full collection walks all of
# them, and a full collection triggered by the 20,000 small allocations of one
# FETCH 1:* (FLAGS) cost that command more than its own work. Frozen objects are still freed
# by reference counting when a later scan replaces them (they form no cycles); a collection
# runs first so that no garbage cycle is frozen. That collection holds the interpreter (the
# node's event loop with it) for tens of milliseconds on a big heap, so it runs at most once
# every FREEZE_EVERY seconds in a process, not after each scan a delivery causes.
FREEZE_AFTER_SCAN = 1000
FREEZE_EVERY = 300.0  # seconds (monotonic)
_last_freeze = float("-inf")


def _freeze_live_objects() -> None:
    global _last_freeze
    now = time.monotonic()
    if now - _last_freeze < FREEZE_EVERY:
        return
    _last_freeze = now
    gc.collect()
    gc.freeze()


class Folder:
    """One Maildir (INBOX or a Maildir++ subfolder). Shared by all sessions of a process,
    which call it from several threads (the IMAP/POP3 file executor): what it caches (UID
    state, keyword table, scanned messages) changes only under ``_lock``.

    ``sync()`` is the only way to learn the folder's contents; it returns the messages
    ordered by UID. Methods that change a message take a MessageInfo from a sync and
    return the new one (or None when the message is gone).
    """

    def __init__(self, path: Path, name: str):
        self.path = path
        self.name = name
        self._lock = threading.RLock()
        self._state = _UidState()
        self._messages: dict[str, MessageInfo] = {}  # base -> info
        self._keywords: list[str] = []  # index -> name, from dovecot-keywords
        self._keywords_stamp: tuple[int, int, int] | None = None
        self._snapshot: Snapshot | None = None
        self._index: MailboxIndex | None = None
        self._modseqs: ModseqLog | None = None
        self.modseq_error = False  # the mod-sequence file could not be written at the last scan

    @property
    def index(self) -> MailboxIndex:
        """The folder's cache file (kanmon.store.index), opened on first use."""
        with self._lock:
            if self._index is None:
                self._index = MailboxIndex(index_path(self.path))
            return self._index

    @property
    def modseqs(self) -> ModseqLog:
        """The folder's mod-sequences (kanmon.store.modseq), opened on first use."""
        with self._lock:
            if self._modseqs is None:
                self._modseqs = ModseqLog(modseq_path(self.path), self.path / "cur")
            return self._modseqs

    def _record_modseqs(self, decide) -> int:
        """ModseqLog.update for this folder's UIDVALIDITY (caller holds _lock); 0 when
        the file cannot be written (the folder then answers NOMODSEQ until it can)."""
        try:
            return self.modseqs.update(self._state.uidvalidity, decide)
        except OSError:
            self.modseq_error = True
            return 0

    def _note_scan(self, msgs: list[MessageInfo]) -> int:
        """Give every scanned message its mod-sequence, recording arrivals, expunges and
        flag changes made behind our back (a rename by Dovecot or a user) with a new
        one; return the folder's HIGHESTMODSEQ (0 when none can be kept)."""
        memo: dict[tuple[frozenset[str], str], str] = {}  # few distinct flag sets in a folder
        present = []
        for m in msgs:
            key = (m.flags, m.extra)
            letters = memo.get(key)
            if letters is None:
                letters = memo[key] = flag_letters(m.flags, m.extra)
            present.append((m.uid, letters))
        self.modseq_error = False
        self._record_modseqs(lambda log: changed_messages(log, present))
        if self.modseq_error:
            return 0
        log = self.modseqs
        recs = log.msgs
        for m in msgs:
            rec = recs.get(m.uid)
            m.modseq = rec[0] if rec is not None else log.highest
        return log.highest

    def vanished_since(self, modseq: int) -> set[int] | None:
        """UIDs expunged after modseq (None: not known that far back, see ModseqLog)."""
        with self._lock:
            return self.modseqs.vanished_since(modseq)

    # -- locking: a thread lock for this process, Dovecot's dotlock for other processes
    def _dotlock(self) -> _DotLock:
        return _DotLock(self.path / UIDLIST)

    @property
    def uidvalidity(self) -> int:
        return self._state.uidvalidity

    @property
    def uidnext(self) -> int:
        return self._state.uidnext

    def exists(self) -> bool:
        return (self.path / "cur").is_dir()

    def _read_uidlist(self) -> None:
        """Load dovecot-uidlist (version 3: "3 V<validity> N<next> G<guid>", then
        "<uid> [ext...] :<base name>" per message) if it changed since we read it."""
        p = self.path / UIDLIST
        try:
            st = p.stat()
        except FileNotFoundError:
            if self._state.uidvalidity == 0:
                self._state = _UidState(uidvalidity=int(time.time()), uidnext=1, guid=uuid.uuid4().hex)
            return
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        if stamp == self._state.stamp:
            return
        state = _UidState(stamp=stamp)
        try:
            lines = p.read_text("utf-8", "replace").splitlines()
        except OSError:
            lines = []
        if lines:
            for tok in lines[0].split()[1:]:
                if tok[:1] == "V" and tok[1:].isdigit():
                    state.uidvalidity = int(tok[1:])
                elif tok[:1] == "N" and tok[1:].isdigit():
                    state.uidnext = int(tok[1:])
                elif tok[:1] == "G":
                    state.guid = tok[1:]
        for line in lines[1:]:
            head, colon, base = line.partition(":")
            uid_text, _, ext = head.strip().partition(" ")
            if not colon:  # version 1 lines: "<uid> <flags> <name>"
                parts = line.split()
                uid_text, base, ext = (parts[0], parts[-1], "") if len(parts) >= 2 else ("", "", "")
            base = base.partition(":")[0]
            if uid_text.isdigit() and base:
                uid = int(uid_text)
                state.uids[base] = uid
                if ext.strip():
                    state.exts[base] = ext.strip()
                state.uidnext = max(state.uidnext, uid + 1)
        if state.uidvalidity == 0:
            state.uidvalidity = int(time.time())
        if not state.guid:
            state.guid = uuid.uuid4().hex
        self._state = state

    def _write_uidlist(self, lock: _DotLock) -> None:
        s = self._state
        lines = [f"3 V{s.uidvalidity} N{s.uidnext} G{s.guid}"]
        for base, uid in sorted(s.uids.items(), key=lambda kv: kv[1]):
            ext = s.exts.get(base)
            lines.append(f"{uid} {ext} :{base}" if ext else f"{uid} :{base}")
        lock.commit(("\n".join(lines) + "\n").encode())
        st = (self.path / UIDLIST).stat()
        s.stamp = (st.st_ino, st.st_size, st.st_mtime_ns)

    def sync(self, move_new: bool = True) -> list[MessageInfo]:
        """Scan new/ and cur/, give new files UIDs, persist, return messages by UID.

        With move_new, files in new/ are renamed to cur/ and come back with recent=True.
        """
        return list(self.snapshot(move_new).messages)

    def _stamp(self) -> tuple:
        """The cheap state of the folder: mtimes of cur/ and new/, and the identity of
        dovecot-uidlist and dovecot-keywords (any rename, delivery, expunge or UID
        assignment by anyone changes one of them)."""
        out: list = []
        for name in ("cur", "new", UIDLIST, KEYWORDS_FILE):
            try:
                st = os.stat(self.path / name)
            except FileNotFoundError:
                if name == "cur":
                    raise FolderNotFound(f"folder {self.name} does not exist") from None
                out.append(None)
                continue
            out.append((st.st_ino, st.st_size, st.st_mtime_ns))
        return tuple(out)

    def snapshot(self, move_new: bool = True) -> Snapshot:
        """The folder's messages: the last scan's when nothing changed since (a few
        stat calls: SELECT, NOOP and IDLE on a large folder cost no directory listing),
        else a new scan (see sync)."""
        with self._lock:
            snap, scanned = self._snapshot_locked(move_new)
        if scanned and len(snap.messages) >= FREEZE_AFTER_SCAN:
            _freeze_live_objects()  # outside the folder's lock: a finalizer may use the folder
        return snap

    def _snapshot_locked(self, move_new: bool) -> tuple[Snapshot, bool]:
        """(snapshot, whether it is a new scan); the caller holds self._lock."""
        stamp = self._stamp()
        snap = self._snapshot
        if snap is not None and snap.reusable and snap.stamp == stamp and not (move_new and snap.has_new):
            return snap, False
        started = time.time_ns()
        try:  # most scans change nothing: they need no lock (IDLE polls often)
            msgs = self._sync_locked(move_new, None)
        except _NeedLock:
            with self._dotlock() as lock:
                msgs = self._sync_locked(move_new, lock)
            stamp = self._stamp()
        highest = self._note_scan(msgs)
        changed = max(s[2] for s in stamp[:2] if s is not None)
        uids = [m.uid for m in msgs]
        snap = Snapshot(msgs, uids, dict(zip(uids, msgs, strict=True)), {m.uid for m in msgs if m.recent},
                        stamp, changed < started - STABLE_NS, any(m.subdir == "new" for m in msgs), highest)
        old = self._snapshot
        self._snapshot = snap
        if old is not None and self._index is not None and len(msgs) < len(old.messages):
            self._index.compact(set(self._messages))  # expunged: drop dead entries when many
        return snap, True

    def locate(self, msg: MessageInfo) -> Path | None:
        """The file of msg now, or None when it is gone."""
        return self._locate(msg)

    def _sync_locked(self, move_new: bool, lock: _DotLock | None) -> list[MessageInfo]:
        """The scan; without a lock it raises _NeedLock before changing anything."""
        self._read_uidlist()
        self._load_keywords()
        state = self._state
        found: dict[str, MessageInfo] = {}
        newly: list[str] = []
        listing = {}
        for subdir in ("cur", "new"):  # list both before moving anything
            try:
                listing[subdir] = os.listdir(self.path / subdir)
            except FileNotFoundError:
                listing[subdir] = []
        for subdir in ("cur", "new"):
            for name in listing[subdir]:
                parsed = parse_filename(name)
                if parsed is None:
                    continue
                base, flags, extra = parsed
                if base in found:  # the same message in new/ and cur/: keep cur/
                    continue
                sub = subdir
                recent = False
                if subdir == "new" and move_new:
                    if lock is None:
                        raise _NeedLock
                    target = f"{base}:2,{flag_letters(flags, extra)}"
                    try:
                        os.rename(self.path / "new" / name, self.path / "cur" / target)
                        sub = "cur"
                        recent = True
                    except FileNotFoundError:
                        continue  # someone else moved or removed it
                old = self._messages.get(base)
                size = vsize = None
                if old is not None:
                    size, vsize = old.size, old.vsize
                else:
                    m = _SIZE_RE.search(base)
                    size = int(m.group(1)) if m else None
                    m = _VSIZE_RE.search(base)
                    vsize = int(m.group(1)) if m else None
                found[base] = MessageInfo(0, base, sub, flags, extra, size, vsize, recent)
                if base not in state.uids:
                    newly.append(base)
        if lock is None and (newly or len(found) != len(state.uids) or not (self.path / UIDLIST).exists()):
            raise _NeedLock
        changed = False
        for base in sorted(newly, key=_arrival_key):
            state.uids[base] = state.uidnext
            state.uidnext += 1
            changed = True
        for base in list(state.uids):
            if base not in found:
                del state.uids[base]
                changed = True
        for base in list(state.exts):
            if base not in state.uids:
                del state.exts[base]
        if changed or not (self.path / UIDLIST).exists():
            assert lock is not None
            self._write_uidlist(lock)
        for base, info in found.items():
            info.uid = state.uids[base]
        self._messages = found
        return sorted(found.values(), key=lambda m: m.uid)

    def path_of(self, msg: MessageInfo) -> Path:
        return self.path / msg.subdir / msg.filename

    def _locate(self, msg: MessageInfo) -> Path | None:
        """The file of msg now (another session may have changed its flags)."""
        cur = self._messages.get(msg.base)
        if cur is not None:
            p = self.path_of(cur)
            if p.exists():
                return p
        for subdir in ("cur", "new"):
            try:
                for name in os.listdir(self.path / subdir):
                    if name == msg.base or name.startswith(msg.base + ":"):
                        return self.path / subdir / name
            except FileNotFoundError:
                pass
        return None

    def read(self, msg: MessageInfo) -> bytes | None:
        """The stored (LF) bytes of msg, or None if it was expunged meanwhile."""
        p = self._locate(msg)
        if p is None:
            return None
        try:
            return p.read_bytes()
        except FileNotFoundError:
            return None

    def wire_size(self, msg: MessageInfo) -> int:
        """Size with CRLF line endings (RFC822.SIZE, POP3 LIST); 0 if gone."""
        size = self.wire_size_or_none(msg)
        return size if size is not None else 0

    def wire_size_or_none(self, msg: MessageInfo) -> int | None:
        """Size with CRLF line endings; None when it is not known (no W= in its name)
        and the file is gone."""
        if msg.vsize is None:
            data = self.read(msg)
            if data is None:
                return None
            msg.vsize = len(to_crlf(data))
            cached = self._messages.get(msg.base)
            if cached is not None:
                cached.vsize = msg.vsize
        return msg.vsize

    def internal_date(self, msg: MessageInfo) -> float:
        """The file's mtime (IMAP INTERNALDATE); now if gone."""
        when = self.internal_date_or_none(msg)
        return when if when is not None else time.time()

    def internal_date_or_none(self, msg: MessageInfo) -> float | None:
        """The file's mtime; None when the file is gone."""
        p = self._locate(msg)
        try:
            return p.stat().st_mtime if p else None
        except FileNotFoundError:
            return None

    # -- keywords
    def _load_keywords(self) -> None:
        p = self.path / KEYWORDS_FILE
        try:
            st = p.stat()
        except FileNotFoundError:
            self._keywords, self._keywords_stamp = [], None
            return
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        if stamp == self._keywords_stamp:
            return
        names: list[str] = []
        try:
            text = p.read_text("utf-8", "replace")
        except OSError:
            return
        for line in text.splitlines():
            idx, _, name = line.partition(" ")
            if idx.isdigit() and int(idx) < MAX_KEYWORDS and name:
                i = int(idx)
                while len(names) <= i:
                    names.append("")
                names[i] = name
        self._keywords, self._keywords_stamp = names, stamp

    def keyword_names(self) -> list[str]:
        """Keywords defined in this folder (what PERMANENTFLAGS/FLAGS list)."""
        with self._lock:  # sessions call this from several threads
            self._load_keywords()
            return [n for n in self._keywords if n]

    def keywords_of(self, msg: MessageInfo) -> frozenset[str]:
        out = set()
        for ch in msg.extra:
            i = ord(ch) - ord("a")
            if 0 <= i < len(self._keywords) and self._keywords[i]:
                out.add(self._keywords[i])
        return frozenset(out)

    def _letters(self, names: Iterable[str]) -> str:
        """Letters for these keywords, defining new ones (up to 26; the rest are dropped)."""
        wanted = [n for n in dict.fromkeys(names) if is_keyword(n)]
        if not wanted:
            return ""
        with self._lock:  # the keyword table is shared by every session of the process
            self._load_keywords()
            known = {n.lower() for n in self._keywords if n}
            if any(n.lower() not in known for n in wanted):
                with _DotLock(self.path / KEYWORDS_FILE) as lock:
                    self._keywords_stamp = None
                    self._load_keywords()
                    table = list(self._keywords)
                    lowers = {x.lower() for x in table if x}
                    for n in wanted:
                        if n.lower() not in lowers and len(table) < MAX_KEYWORDS:
                            table.append(n)
                            lowers.add(n.lower())
                    if len(table) != len(self._keywords):
                        lock.commit("".join(f"{i} {n}\n" for i, n in enumerate(table) if n).encode())
                self._keywords_stamp = None
                self._load_keywords()
            index = {n.lower(): i for i, n in enumerate(self._keywords) if n}
            return "".join(sorted({chr(ord("a") + index[n.lower()]) for n in wanted if n.lower() in index}))

    def set_flags(
        self, msg: MessageInfo, flags: Iterable[str], keywords: Iterable[str] | None = None
    ) -> MessageInfo | None:
        """Rename msg so its info carries exactly these system flags (and keywords,
        when given; otherwise its keywords stay)."""
        return self.store_flags([(msg, flags, keywords)])[0][0]

    def store_flags(
        self,
        changes: list[tuple[MessageInfo, Iterable[str] | None, Iterable[str] | None]],
        unchanged_since: int | None = None,
    ) -> tuple[list[MessageInfo | None], set[int]]:
        """Set flags of several messages as one change: (message, system flags or None
        to leave it as it is, keywords or None to keep them). The messages whose flags
        changed get one new mod-sequence. With unchanged_since (RFC 7162 UNCHANGEDSINCE),
        a message whose mod-sequence is higher is left alone and its UID returned in the
        second set. Returns each message after (None: it is gone) and that set."""
        modified: set[int] = set()
        results: list[MessageInfo | None] = [None] * len(changes)
        touched: list[int] = []

        def decide(log: ModseqLog) -> tuple[list[tuple[int, str]], list[int]]:
            out = []
            for n, (msg, flags, keywords) in enumerate(changes):
                rec = log.msgs.get(msg.uid)
                if unchanged_since is not None and (rec is None or rec[0] > unchanged_since):
                    modified.add(msg.uid)
                    results[n] = msg
                    continue
                new = msg if flags is None else self._rename_flags(msg, flags, keywords)
                results[n] = new
                if new is None:
                    continue
                letters = flag_letters(new.flags, new.extra)
                if rec is None or rec[1] != letters:
                    out.append((new.uid, letters))
                    touched.append(n)
                else:
                    new.modseq = rec[0]
            return out, []

        with self._lock:
            modseq = self._record_modseqs(decide)
            if self.modseq_error and not any(results) and not modified:
                # the file could not be opened: the renames are still wanted
                modified.clear()
                for n, (msg, flags, keywords) in enumerate(changes):
                    results[n] = msg if flags is None else self._rename_flags(msg, flags, keywords)
            for n in touched:
                info = results[n]
                if info is not None:
                    info.modseq = modseq
        return results, modified

    def _rename_flags(self, msg: MessageInfo, flags: Iterable[str], keywords: Iterable[str] | None) -> MessageInfo | None:
        flags = frozenset(f for f in flags if f in SYSTEM_FLAGS)
        src = self._locate(msg)
        if src is None:
            return None
        parsed = parse_filename(src.name)
        extra = parsed[2] if parsed else msg.extra
        if keywords is not None:
            others = "".join(ch for ch in extra if not "a" <= ch <= "z")
            extra = others + self._letters(keywords)
        new = MessageInfo(msg.uid, msg.base, "cur", flags, extra, msg.size, msg.vsize, msg.recent, msg.modseq)
        dst = self.path / "cur" / new.filename
        if src != dst:
            try:
                os.rename(src, dst)
            except FileNotFoundError:
                return None
        self._messages[msg.base] = new
        return new

    def _deliver_tmp(self, data: bytes, flags: Iterable[str], internaldate: float | None) -> tuple[str, Path]:
        """Write stored bytes into tmp/, fsync; return (base, tmp path)."""
        vsize = len(to_crlf(data))
        base = unique_name(len(data), vsize)
        tmp = self.path / "tmp" / base
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
        finally:
            os.close(fd)
        if internaldate is not None:
            os.utime(tmp, (internaldate, internaldate))
        return base, tmp

    def append(
        self,
        wire_data: bytes,
        flags: Iterable[str] = (),
        internaldate: float | None = None,
        keywords: Iterable[str] = (),
    ) -> MessageInfo:
        """Store a message given in wire form (CRLF); return it with its new UID."""
        data = to_lf(wire_data)
        flags = frozenset(f for f in flags if f in SYSTEM_FLAGS)
        base, tmp = self._deliver_tmp(data, flags, internaldate)
        info = MessageInfo(0, base, "cur", flags, self._letters(keywords), len(data), None)
        os.rename(tmp, self.path / "cur" / info.filename)
        fsync_dir(self.path / "cur")
        return self._assign(info)

    def _assign(self, info: MessageInfo) -> MessageInfo:
        with self._lock:
            with self._dotlock() as lock:
                self._read_uidlist()
                st = self._state
                uid = st.uids.get(info.base)
                if uid is None:
                    uid = st.uidnext
                    st.uids[info.base] = uid
                    st.uidnext += 1
                    self._write_uidlist(lock)
                info.uid = uid
                self._messages[info.base] = info
            letters = flag_letters(info.flags, info.extra)
            info.modseq = self._record_modseqs(lambda log: ([(uid, letters)], []))
            return info

    def copy_in(self, src: Folder, msg: MessageInfo, flags: Iterable[str] | None = None) -> MessageInfo | None:
        """Copy msg from src into this folder (hard link when possible), with its flags
        and keywords (keyword letters are translated: each folder has its own table)."""
        path = src._locate(msg)
        if path is None:
            return None
        keep = msg.flags if flags is None else frozenset(flags)
        letters = self._letters(src.keywords_of(msg))
        vsize = msg.vsize
        size = msg.size
        if size is None:
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                return None
        if vsize is None:
            vsize = src.wire_size(msg)
        base = unique_name(size, vsize)
        info = MessageInfo(0, base, "cur", keep, letters, size, vsize)
        tmp = self.path / "tmp" / base
        try:
            os.link(path, tmp)
        except FileNotFoundError:
            return None
        except OSError:
            try:
                shutil.copy2(path, tmp)
            except FileNotFoundError:
                return None
        os.rename(tmp, self.path / "cur" / info.filename)
        fsync_dir(self.path / "cur")
        return self._assign(info)

    def remove(self, msgs: Iterable[MessageInfo]) -> list[MessageInfo]:
        """Unlink messages; return those that were removed (not already gone)."""
        removed = []
        with self._lock:
            for msg in msgs:
                p = self._locate(msg)
                if p is None:
                    continue
                try:
                    p.unlink()
                except FileNotFoundError:
                    continue
                self._messages.pop(msg.base, None)
                removed.append(msg)
            if removed:
                gone = [m.uid for m in removed]
                self._record_modseqs(lambda log: ([], [u for u in gone if u in log.msgs]))
        return removed

    def usage(self) -> tuple[int, int]:
        """(message count, stored bytes) without assigning UIDs or moving files."""
        count = total = 0
        for subdir in ("new", "cur"):
            try:
                entries = list(os.scandir(self.path / subdir))
            except FileNotFoundError:
                continue
            for entry in entries:
                parsed = parse_filename(entry.name)
                if parsed is None:
                    continue
                m = _SIZE_RE.search(parsed[0])
                if m:
                    size = int(m.group(1))
                else:
                    try:
                        size = entry.stat().st_size
                    except FileNotFoundError:
                        continue
                count += 1
                total += size
        return count, total


class _NeedLock(Exception):
    """A scan found something to change: do it again holding the uidlist lock."""


class _DotLock:
    """Dovecot's dotlock for dovecot-uidlist: ``<file>.lock`` created with O_EXCL; a
    commit writes the new content into the lock file and renames it over the file, which
    also releases the lock. A lock older than LOCK_STALE seconds is taken over.
    Waiting for another process's lock blocks the caller (briefly: Dovecot holds it for
    milliseconds) and gives up after LOCK_WAIT seconds with MaildirError.
    """

    def __init__(self, target: Path):
        self.target = target
        self.path = target.with_name(target.name + ".lock")
        self.fd: int | None = None

    def __enter__(self) -> _DotLock:
        deadline = time.monotonic() + LOCK_WAIT
        while True:
            try:
                self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                return self
            except FileExistsError:
                try:
                    age = time.time() - self.path.stat().st_mtime
                except FileNotFoundError:
                    continue
                if age > LOCK_STALE:
                    with contextlib.suppress(FileNotFoundError):
                        self.path.unlink()
                    continue
                if time.monotonic() > deadline:
                    raise MaildirError(f"{self.target.parent.name}: the folder is locked by another process") from None
                time.sleep(0.005)

    def commit(self, data: bytes) -> None:
        assert self.fd is not None
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = None
        os.rename(self.path, self.target)

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


def _arrival_key(base: str) -> tuple[int, int, str]:
    sec, _, rest = base.partition(".")
    m = re.match(r"M(\d+)", rest)
    return (int(sec) if sec.isdigit() else 0, int(m.group(1)) if m else 0, base)




_folders: dict[Path, Folder] = {}
_folders_lock = threading.Lock()
_subscriptions_lock = threading.Lock()


def _shared_folder(path: Path, name: str) -> Folder:
    with _folders_lock:
        f = _folders.get(path)
        if f is None or f.name != name:
            f = Folder(path, name)
            _folders[path] = f
        return f


def forget_indexes() -> None:
    """Let every shared folder open its cache file anew (its place may have changed)."""
    with _folders_lock:
        for f in _folders.values():
            with f._lock:
                f._index = None
                f._modseqs = None


def make_dirs_private(path: Path) -> None:
    """mkdir -p with every directory it creates 0700 (pathlib gives missing parents the
    umask's mode, which would leave mailboxes/<domain> readable by all)."""
    missing = []
    while not path.is_dir():
        missing.append(path)
        if path.parent == path:
            break
        path = path.parent
    for p in reversed(missing):
        p.mkdir(mode=0o700, exist_ok=True)


def _make_maildir(path: Path) -> None:
    make_dirs_private(path)
    for sub in ("cur", "new", "tmp"):
        (path / sub).mkdir(exist_ok=True, mode=0o700)


class Mailbox:
    """One account's Maildir++ tree: INBOX plus folders."""

    def __init__(self, root: Path):
        self.root = Path(root)

    @classmethod
    def for_address(cls, data_dir: Path | str, domain: str, local: str) -> Mailbox:
        return cls(mailbox_path(data_dir, domain, local))

    def ensure(self, special_use: bool = True) -> Mailbox:
        """Create INBOX (and the special-use folders) if missing."""
        _make_maildir(self.root)
        if special_use:
            for name in SPECIAL_USE:
                p = self._folder_path(name)
                if not p.exists():
                    _make_maildir(p)
                    (p / "maildirfolder").touch()
                    self.subscribe(name)
        return self

    def _folder_path(self, name: str) -> Path:
        name = check_folder_name(name)
        if name == "INBOX":
            return self.root
        return self.root / (DELIMITER + name)

    def folder(self, name: str) -> Folder:
        name = check_folder_name(name)
        path = self._folder_path(name)
        if not (path / "cur").is_dir():
            raise FolderNotFound(f"folder {name} does not exist")
        return _shared_folder(path, name)

    def folder_names(self) -> list[str]:
        """Every folder, INBOX first, then by name."""
        names = []
        if (self.root / "cur").is_dir():
            names.append("INBOX")
        try:
            entries = os.listdir(self.root)
        except FileNotFoundError:
            return names
        for entry in sorted(entries):
            if entry.startswith(".") and entry not in (".", "..") and (self.root / entry / "cur").is_dir():
                try:
                    names.append(check_folder_name(entry[1:]))
                except BadFolderName:
                    continue
        return names

    def create_folder(self, name: str) -> None:
        """Create a folder and the superior names it needs that do not exist yet, as
        folders too (RFC 3501 6.3.3: CREATE a.b.c makes a and a.b, which LIST then shows
        and SELECT opens)."""
        name = check_folder_name(name)
        if name == "INBOX" or self._folder_path(name).exists():
            raise FolderExists(f"folder {name} already exists")
        self._create_parents(name)
        p = self._folder_path(name)
        _make_maildir(p)
        (p / "maildirfolder").touch()

    def _create_parents(self, name: str) -> None:
        """Make the missing superior folders of name (Maildir++ keeps each level in its
        own directory: .a, .a.b; a missing one would only be a \\Noselect name)."""
        parts = name.split(DELIMITER)
        for n in range(1, len(parts)):
            p = self._folder_path(DELIMITER.join(parts[:n]))
            if not (p / "cur").is_dir():
                _make_maildir(p)
                (p / "maildirfolder").touch()

    def delete_folder(self, name: str) -> None:
        name = check_folder_name(name)
        if name == "INBOX":
            raise MaildirError("INBOX cannot be deleted")
        p = self._folder_path(name)
        if not (p / "cur").is_dir():
            raise FolderNotFound(f"folder {name} does not exist")
        # Rename first so a concurrent scan never sees a half-deleted folder.
        trash = self.root / f"..deleting.{os.getpid()}.{next(_seq)}"
        os.rename(p, trash)
        shutil.rmtree(trash, ignore_errors=True)
        with _folders_lock:
            _folders.pop(p, None)
        self.unsubscribe(name)

    def rename_folder(self, old: str, new: str) -> None:
        """Rename a folder and its children (RFC 3501 6.3.5)."""
        old = check_folder_name(old)
        new = check_folder_name(new)
        if new == "INBOX" or self._folder_path(new).exists():
            raise FolderExists(f"folder {new} already exists")
        if old == "INBOX":
            self._rename_inbox(new)
            return
        if not (self._folder_path(old) / "cur").is_dir():
            raise FolderNotFound(f"folder {old} does not exist")
        if new.startswith(old + DELIMITER):
            raise MaildirError("a folder cannot be moved below itself")
        self._create_parents(new)  # RFC 3501 6.3.5, as CREATE does
        moves = [(old, new)]
        for name in self.folder_names():
            if name.startswith(old + DELIMITER):
                moves.append((name, new + name[len(old):]))
        subs = self.subscriptions()
        uses = self.special_uses()
        if any(src in uses and SPECIAL_USE.get(src) != uses[src] for src, _ in moves):
            with _subscriptions_lock:  # the folder keeps the use a client gave it
                for src, dst in moves:
                    if src in uses and SPECIAL_USE.get(src) != uses[src]:
                        uses[dst] = uses.pop(src)
                self._write_special_uses(uses)
        for src, dst in moves:
            os.rename(self._folder_path(src), self._folder_path(dst))
            with _folders_lock:
                _folders.pop(self._folder_path(src), None)
            if src in subs:
                self.unsubscribe(src)
                self.subscribe(dst)

    def _rename_inbox(self, new: str) -> None:
        """RFC 3501 6.3.5: RENAME INBOX moves its messages into a new folder and leaves
        INBOX empty (and there). Each message file is renamed into the new folder's
        cur/ or new/ (same name, flags kept; its keyword letters mean the same there:
        the new folder starts with INBOX's dovecot-keywords). It takes new UIDs there,
        as any folder a client has not seen. Not atomic as a whole: a crash midway
        leaves some messages in each folder, never none or two copies. Mail delivered
        meanwhile may land in either."""
        self.create_folder(new)  # FolderExists if another session made it meanwhile
        dest = self._folder_path(new)
        inbox = self.folder("INBOX")
        with inbox._lock:  # this process's flag and keyword changes wait
            try:
                keywords = (self.root / KEYWORDS_FILE).read_bytes()
            except FileNotFoundError:
                keywords = b""
            if keywords:
                tmp = dest / f"{KEYWORDS_FILE}.tmp"
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(keywords)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, dest / KEYWORDS_FILE)
            for _ in range(3):  # a file renamed meanwhile (a flag change by another program): again
                missed = False
                for sub in ("cur", "new"):
                    try:
                        names = os.listdir(self.root / sub)
                    except FileNotFoundError:
                        continue
                    for name in names:
                        if parse_filename(name) is None:
                            continue
                        try:
                            os.rename(self.root / sub / name, dest / sub / name)
                        except FileNotFoundError:
                            missed = True
                if not missed:
                    break
            for path in (dest / "cur", dest / "new", self.root / "cur", self.root / "new"):
                fsync_dir(path)
        self.subscribe(new)

    # -- special use (RFC 6154): the defaults by name, and what clients asked for at CREATE
    def special_uses(self) -> dict[str, str]:
        """Folder name -> its special-use attribute."""
        out = dict(SPECIAL_USE)
        try:
            text = (self.root / SPECIAL_USE_FILE).read_text("utf-8", "replace")
        except FileNotFoundError:
            return out
        for line in text.splitlines():
            attr, _, name = line.partition(" ")
            if attr in CREATABLE_USES and name:
                out[name] = attr
        return out

    def _write_special_uses(self, uses: dict[str, str]) -> None:
        extra = {n: a for n, a in uses.items() if SPECIAL_USE.get(n) != a}
        tmp = self.root / f"{SPECIAL_USE_FILE}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("".join(f"{a} {n}\n" for n, a in sorted(extra.items())))
        os.replace(tmp, self.root / SPECIAL_USE_FILE)

    def create_special_folder(self, name: str, use: str) -> None:
        """CREATE with USE (RFC 6154 3): the folder, marked with one attribute that no
        other existing folder has (MaildirError otherwise, before anything is made)."""
        name = check_folder_name(name)
        if use not in CREATABLE_USES:
            raise MaildirError(f"{use} cannot be given to a folder")
        with _subscriptions_lock:
            uses = self.special_uses()
            existing = set(self.folder_names())
            if any(a == use and n in existing for n, a in uses.items()):
                raise MaildirError(f"another folder is already {use}")
            self.create_folder(name)
            uses = {n: a for n, a in uses.items() if n in existing or n in SPECIAL_USE}
            uses[name] = use
            self._write_special_uses(uses)

    # -- subscriptions: one name per line in <root>/subscriptions (Dovecot reads this)
    def subscriptions(self) -> list[str]:
        try:
            text = (self.root / SUBSCRIPTIONS).read_text("utf-8", "replace")
        except FileNotFoundError:
            return []
        out = []
        for line in text.splitlines():
            line = line.strip()
            if not line or line == "V\t2":
                continue
            out.extend(n for n in line.split("\t") if n)
        return out

    def _write_subscriptions(self, names: list[str]) -> None:
        make_dirs_private(self.root)
        tmp = self.root / f"{SUBSCRIPTIONS}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("".join(n + "\n" for n in names))
        os.replace(tmp, self.root / SUBSCRIPTIONS)

    def subscribe(self, name: str) -> None:
        name = check_folder_name(name)
        with _subscriptions_lock:  # read-modify-write, from several sessions' threads
            subs = self.subscriptions()
            if name not in subs:
                self._write_subscriptions([*subs, name])

    def unsubscribe(self, name: str) -> None:
        with _subscriptions_lock:
            subs = self.subscriptions()
            if name in subs:
                self._write_subscriptions([n for n in subs if n != name])

    def usage(self) -> tuple[int, int]:
        """(messages, bytes) over all folders."""
        count = total = 0
        for name in self.folder_names():
            c, t = Folder(self._folder_path(name), name).usage()
            count += c
            total += t
        return count, total


def mailbox_usage(data_dir: Path | str, domain: str, local: str) -> int:
    """Bytes stored in local@domain's mailbox, all folders (for quota checks)."""
    try:
        return Mailbox.for_address(data_dir, domain, local).usage()[1]
    except OSError as e:
        if e.errno == errno.ENOENT:
            return 0
        raise
