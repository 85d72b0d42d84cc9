"""Attachments as they really are: type by content, classes, and what archives hold.

Role: for each attachment of a decoded message, its true type from magic numbers (not
the name or the declared type), its classes (executable, script, macro, archive,
encrypted, disk_image) and, for archives, the members inside, recursively, with the
bounds FortiMail uses: depth 12, a member count, a total uncompressed size and a
compression ratio cap. An encrypted archive member cannot be read; it is reported as
encrypted (the "PPAP" habit: a password-protected zip, the password in a second mail).

Trusts: nothing in the attachment. Sizes are read from archive headers only to refuse
early; the decompression itself is bounded by reading in chunks.
Never: decompress without a bound (a zip bomb costs at most max_total bytes), write
anything to disk, or execute anything.
"""

from __future__ import annotations

import bz2
import fnmatch
import gzip
import io
import lzma
import tarfile
import zipfile
import zlib
from dataclasses import dataclass, field

from kanmon.content.decode import Attachment

MAX_DEPTH = 12
MAX_MEMBERS = 1000
MAX_TOTAL = 200 * 1024 * 1024  # uncompressed bytes read from all archives of one message
MAX_RATIO = 100  # uncompressed / compressed, per member (beyond: a bomb)

_EXECUTABLE_EXT = {"exe", "scr", "com", "pif", "dll", "cpl", "msi", "msp", "bat", "cmd", "sys", "drv", "ocx", "jar", "apk", "app"}
_SCRIPT_EXT = {"js", "jse", "vbs", "vbe", "wsf", "wsh", "ps1", "psm1", "hta", "sh", "lnk", "reg", "scf", "py", "pl", "url", "iqy", "slk"}
_MACRO_EXT = {"docm", "xlsm", "pptm", "dotm", "xltm", "xlam", "ppsm", "potm", "sldm"}
_ARCHIVE_EXT = {"zip", "gz", "tgz", "tar", "7z", "rar", "lzh", "lha", "cab", "bz2", "xz", "zipx", "arj"}
_DISK_IMAGE_EXT = {"iso", "img", "vhd", "vhdx", "dmg", "udf"}

# Magic numbers: (offset, bytes, MIME type, classes).
_MAGIC: tuple[tuple[int, bytes, str, frozenset[str]], ...] = (
    (0, b"MZ", "application/x-msdownload", frozenset({"executable"})),
    (0, b"\x7fELF", "application/x-executable", frozenset({"executable"})),
    (0, b"\xcf\xfa\xed\xfe", "application/x-mach-binary", frozenset({"executable"})),
    (0, b"\xfe\xed\xfa\xcf", "application/x-mach-binary", frozenset({"executable"})),
    (0, b"\xca\xfe\xba\xbe", "application/java-vm", frozenset({"executable"})),
    (0, b"PK\x03\x04", "application/zip", frozenset({"archive"})),
    (0, b"PK\x05\x06", "application/zip", frozenset({"archive"})),
    (0, b"\x1f\x8b", "application/gzip", frozenset({"archive"})),
    (0, b"7z\xbc\xaf\x27\x1c", "application/x-7z-compressed", frozenset({"archive"})),
    (0, b"Rar!\x1a\x07", "application/vnd.rar", frozenset({"archive"})),
    (0, b"MSCF", "application/vnd.ms-cab-compressed", frozenset({"archive"})),
    (0, b"BZh", "application/x-bzip2", frozenset({"archive"})),
    (0, b"\xfd7zXZ\x00", "application/x-xz", frozenset({"archive"})),
    (2, b"-lh", "application/x-lzh-compressed", frozenset({"archive"})),
    (0, b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "application/x-ole-storage", frozenset()),
    (0, b"%PDF-", "application/pdf", frozenset()),
    (0, b"\x89PNG\r\n\x1a\n", "image/png", frozenset()),
    (0, b"\xff\xd8\xff", "image/jpeg", frozenset()),
    (0, b"GIF8", "image/gif", frozenset()),
    (0, b"#!", "text/x-shellscript", frozenset({"script"})),
    (257, b"ustar", "application/x-tar", frozenset({"archive"})),
    (32769, b"CD001", "application/x-iso9660-image", frozenset({"disk_image"})),
    (0, b"conectix", "application/x-vhd", frozenset({"disk_image"})),
    (0, b"vhdxfile", "application/x-vhdx", frozenset({"disk_image"})),
    (0, b"koly", "application/x-apple-diskimage", frozenset({"disk_image"})),
)

_OLE_VBA = "_VBA_PROJECT".encode("utf-16-le")  # the stream a macro-carrying .doc/.xls holds


@dataclass
class Item:
    """One attachment or archive member, as found."""

    name: str  # the name given (the member path inside an archive)
    declared: str  # the MIME type declared ("" inside archives)
    true_type: str  # by content ("application/octet-stream" when unknown)
    classes: set[str] = field(default_factory=set)
    depth: int = 0  # 0: a MIME part; 1: inside an archive part; ...
    container: str = ""  # the archive it was found in


@dataclass
class Inventory:
    """Every attachment and archive member of a message, and the bound reached, if any."""

    items: list[Item] = field(default_factory=list)
    limit: str = ""  # non-empty: an archive went beyond a bound (what)

    def names(self) -> list[str]:
        return [i.name for i in self.items if i.name]

    @property
    def encrypted(self) -> list[Item]:
        return [i for i in self.items if "encrypted" in i.classes]


def sniff(data: bytes) -> tuple[str, frozenset[str]]:
    for offset, magic, mime, classes in _MAGIC:
        if data[offset:offset + len(magic)] == magic:
            return mime, classes
    return "application/octet-stream", frozenset()


def _ext_classes(name: str) -> set[str]:
    """Classes a name claims, by every extension in it (invoice.pdf.exe is executable)."""
    lowered = name.lower().rstrip(". ")
    parts = lowered.rsplit("/", 1)[-1].split(".")[1:]
    out: set[str] = set()
    if not parts:
        return out
    last = parts[-1]
    if last in _EXECUTABLE_EXT:
        out.add("executable")
    if last in _SCRIPT_EXT:
        out.add("script")
    if last in _MACRO_EXT:
        out.add("macro")
    if last in _ARCHIVE_EXT:
        out.add("archive")
    if last in _DISK_IMAGE_EXT:
        out.add("disk_image")
    return out


class _Budget:
    def __init__(self) -> None:
        self.members = 0
        self.total = 0
        self.limit = ""

    def hit(self, what: str) -> None:
        if not self.limit:
            self.limit = what


def _read_bounded(stream, budget: _Budget, compressed: int) -> bytes | None:
    """Read a member in chunks, refusing beyond the total and ratio caps (None)."""
    chunks = []
    size = 0
    cap = max(compressed, 1) * MAX_RATIO
    while True:
        chunk = stream.read(64 * 1024)
        if not chunk:
            break
        size += len(chunk)
        budget.total += len(chunk)
        if budget.total > MAX_TOTAL:
            budget.hit(f"more than {MAX_TOTAL // (1024 * 1024)} MB uncompressed in archives")
            return None
        if size > cap and size > 1024 * 1024:
            budget.hit(f"a compression ratio over {MAX_RATIO}:1")
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _inspect(name: str, declared: str, data: bytes, depth: int, container: str, inv: Inventory, budget: _Budget) -> None:
    mime, magic_classes = sniff(data)
    classes = set(magic_classes) | _ext_classes(name)
    if mime == "application/x-ole-storage" and _OLE_VBA in data:
        classes.add("macro")
    item = Item(name, declared, mime, classes, depth, container)
    inv.items.append(item)
    if mime == "application/zip":
        _walk_zip(name, data, depth, inv, budget, item)
    elif mime == "application/gzip":
        _walk_gzip(name, data, depth, inv, budget)
    elif mime in ("application/x-bzip2", "application/x-xz"):
        _walk_compressed(name, data, depth, inv, budget, bz2.BZ2File if mime == "application/x-bzip2" else lzma.LZMAFile)
    elif mime == "application/x-tar":
        _walk_tar(name, data, depth, inv, budget)
    elif mime in ("application/x-7z-compressed", "application/vnd.rar"):
        # No maintained pure-Python reader is a dependency: listed as an archive we cannot open.
        pass


def _zip_entries(data: bytes) -> int | None:
    """The entry count the zip's end record claims (read before the central directory is
    parsed: a zip listing 300,000 names costs seconds and memory to open), or None."""
    at = data.rfind(b"PK\x05\x06", max(0, len(data) - 65557))
    if at < 0 or at + 12 > len(data):
        return None
    return int.from_bytes(data[at + 10:at + 12], "little")


def _member_name(info: zipfile.ZipInfo) -> str:
    """A zip member's name as the sender's machine wrote it. Without the UTF-8 flag
    (APPNOTE 4.4.4 bit 11) zipfile reads the bytes as CP437, the format's original
    charset, but Japanese zips are not: Windows Explorer writes CP932, Info-ZIP on Linux
    UTF-8 without the flag. The bytes come back from CP437 (a one-to-one table) and are
    read as UTF-8, then CP932; neither: the CP437 text. Never raises."""
    if info.flag_bits & 0x800:
        return info.filename
    try:
        raw = info.filename.encode("cp437")
    except UnicodeEncodeError:  # not a name zipfile decoded from CP437: keep it
        return info.filename
    return _name_from(raw, info.filename)


def _name_from(raw: bytes, otherwise: str) -> str:
    """An archive member's name from its bytes: UTF-8, then CP932; neither: `otherwise`."""
    for codec in ("utf-8", "cp932"):
        try:
            return raw.decode(codec)
        except UnicodeDecodeError:
            pass
    return otherwise


def _tar_name(member: tarfile.TarInfo) -> str:
    """A tar member's name: tarfile reads the bytes as UTF-8 with surrogateescape, so a
    CP932 name (a tar made on Windows) comes back as lone surrogates; it is read as CP932
    then (as a zip member's name is). Names that are neither keep their escapes, which
    kanmon.escape writes as `\\udcXX` wherever they are shown."""
    try:
        raw = member.name.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return member.name
    return _name_from(raw, member.name)


def _walk_zip(name: str, data: bytes, depth: int, inv: Inventory, budget: _Budget, item: Item) -> None:
    if depth + 1 > MAX_DEPTH:
        budget.hit(f"archives nested deeper than {MAX_DEPTH}")
        return
    claimed = _zip_entries(data)
    if claimed is not None and budget.members + claimed > MAX_MEMBERS:
        budget.hit(f"more than {MAX_MEMBERS} files in archives")
        return
    try:
        z = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError, RuntimeError) as e:
        # Its members cannot be listed (a damaged central directory; a name flagged UTF-8
        # that is not): nothing inside could be checked, so the profile's archive_limit
        # decides, as for an archive past its bounds. Skipping it hid `evil.exe` inside.
        budget.hit(f"a zip archive that cannot be opened ({type(e).__name__})")
        return
    with z:
        infos = z.infolist()
        if any(i.filename.lower().endswith("vbaproject.bin") for i in infos[:MAX_MEMBERS]):
            item.classes.add("macro")  # an Office Open XML document carrying a VBA project
        for info in infos:
            budget.members += 1
            if budget.members > MAX_MEMBERS:
                budget.hit(f"more than {MAX_MEMBERS} files in archives")
                return
            if info.is_dir():
                continue
            member = _member_name(info)
            if info.flag_bits & 0x1:  # APPNOTE 4.4.4 bit 0: encrypted
                item.classes.add("encrypted")
                inv.items.append(Item(member, "", "application/octet-stream",
                                      {"encrypted"} | _ext_classes(member), depth + 1, name))
                continue
            if info.file_size > MAX_TOTAL or (info.compress_size and info.file_size / info.compress_size > MAX_RATIO
                                              and info.file_size > 1024 * 1024):
                budget.hit(f"a member of {info.file_size} bytes from {info.compress_size} (a zip bomb)")
                return
            try:
                with z.open(info) as stream:
                    content = _read_bounded(stream, budget, info.compress_size)
            except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError, RuntimeError, zlib.error):
                # A member we cannot decompress (Deflate64, a damaged stream): still listed,
                # by name, so a name rule sees `evil.exe` that Windows would extract.
                inv.items.append(Item(member, "", "application/octet-stream", _ext_classes(member), depth + 1, name))
                continue
            if content is None:
                return
            _inspect(member, "", content, depth + 1, name, inv, budget)
            if budget.limit:
                return


def _walk_gzip(name: str, data: bytes, depth: int, inv: Inventory, budget: _Budget) -> None:
    _walk_compressed(name, data, depth, inv, budget, lambda f: gzip.GzipFile(fileobj=f))


def _walk_compressed(name: str, data: bytes, depth: int, inv: Inventory, budget: _Budget, opener) -> None:
    """gzip, bzip2, xz: one stream, bounded; a tar inside is walked, anything else inspected."""
    if depth + 1 > MAX_DEPTH:
        budget.hit(f"archives nested deeper than {MAX_DEPTH}")
        return
    try:
        with opener(io.BytesIO(data)) as stream:
            content = _read_bounded(stream, budget, len(data))
    except (OSError, EOFError, zlib.error, lzma.LZMAError, ValueError):
        return
    if content is None:
        return
    lowered = name.lower()
    inner = name
    for ext, repl in ((".tgz", ".tar"), (".tbz2", ".tar"), (".txz", ".tar"), (".gz", ""), (".bz2", ""), (".xz", "")):
        if lowered.endswith(ext):
            inner = name[:-len(ext)] + repl
            break
    if content[257:262] == b"ustar" and _walk_tar(name, content, depth, inv, budget, nested=True):
        return
    _inspect(inner, "", content, depth + 1, name, inv, budget)


def _walk_tar(name: str, data: bytes, depth: int, inv: Inventory, budget: _Budget, nested: bool = False) -> bool:
    """The members of a tar (regular files only: links are names, not content). False
    when it is not a readable tar after all."""
    if not nested and depth + 1 > MAX_DEPTH:
        budget.hit(f"archives nested deeper than {MAX_DEPTH}")
        return True
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for member in tar:
                budget.members += 1
                if budget.members > MAX_MEMBERS:
                    budget.hit(f"more than {MAX_MEMBERS} files in archives")
                    return True
                if not member.isfile():
                    continue
                f = tar.extractfile(member)
                body = _read_bounded(f, budget, member.size) if f is not None else b""
                if body is None:
                    return True
                _inspect(_tar_name(member), "", body, depth + 1, name, inv, budget)
                if budget.limit:
                    return True
    except (tarfile.TarError, OSError, EOFError, ValueError):
        return False
    return True


def inventory(attachments: list[Attachment]) -> Inventory:
    """Every attachment and archive member of a message with its true type and classes."""
    inv = Inventory()
    budget = _Budget()
    for att in attachments:
        _inspect(att.name, att.content_type, att.data, 0, "", inv, budget)
        if budget.limit:
            break
    inv.limit = budget.limit
    return inv


def name_matches(name: str, patterns: list[str]) -> str:
    """The first glob pattern the name matches (case-insensitive), or ""."""
    lowered = name.lower()
    base = lowered.rsplit("/", 1)[-1]
    for p in patterns:
        p = p.lower()
        if fnmatch.fnmatchcase(base, p) or fnmatch.fnmatchcase(lowered, p):
            return p
    return ""
