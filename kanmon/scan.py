"""The scans over every received message's octets: line ends counted, "<CRLF>." found,
CRs taken out.

Role: what the DATA paths (kanmon.smtp.session), the spool's flag checks (kanmon.model)
and local delivery (kanmon.deliver.local) ask of a message's octets, defined here in
Python, and done by the compiled kanmon._scan (kanmon/_scan.c) when the install built
it: CPython's ``bytes.count`` and ``bytes.find`` look at two- and three-octet patterns
one octet at a time and ``translate`` looks up every octet, ~330 us of a 100 KB message
on this project's machine class (and ~130 us for the CRs a Maildir file leaves out); the
C reads 16 octets a step (SSE2; docs/performance.md). ``COMPILED`` says which runs. Both
give the same answers (tests/unit/test_scan.py compares them).

Trusts: nothing in the octets. Never: change them.
"""

from __future__ import annotations

Buffer = bytes | bytearray | memoryview


def py_line_ends(data: Buffer) -> tuple[int, int, int]:
    """(crlf, cr, lf): how many "\\r\\n" pairs, "\\r" and "\\n" octets data holds. The line
    ends are CRLF only exactly when the three are equal."""
    b = bytes(data) if not isinstance(data, (bytes, bytearray)) else data
    crlf = b.count(b"\r\n")
    if len(b) - len(b.translate(None, b"\r\n")) == 2 * crlf:
        return crlf, crlf, crlf  # every CR and LF is in a pair (the usual case): two passes, not three
    return crlf, b.count(b"\r"), b.count(b"\n")


def py_find_short(data: Buffer, pattern: bytes, start: int) -> int:
    """data.find(pattern, start) for a pattern of two or three octets and a start that is
    not negative."""
    if len(pattern) not in (2, 3):
        raise ValueError("pattern must be two or three octets")
    if start < 0:
        raise ValueError("start must not be negative")
    b = bytes(data) if not isinstance(data, (bytes, bytearray)) else data
    return b.find(pattern, start)


def py_strip_cr(data: Buffer) -> bytes:
    """data without its "\\r" octets (CRLF line ends become LF, as a Maildir file holds them)."""
    b = bytes(data) if not isinstance(data, (bytes, bytearray)) else data
    return bytes(b.translate(None, b"\r"))


try:
    from kanmon import _scan
except ImportError:  # not built (no C compiler where it was installed): the same in Python
    _scan = None

# The compiled DATA scans where they read 16 octets a step (SSE2: every x86-64); elsewhere
# their plain loops are no faster than CPython's, and the Python definitions run.
# strip_cr is compiled wherever it was built: memchr and memcpy are the C library's own
# block-at-a-time loops (on ARM too; not measured there), where translate looks up each
# octet. COMPILED speaks of the DATA scans only.
COMPILED = _scan is not None and bool(_scan.VECTOR)
line_ends = _scan.line_ends if COMPILED else py_line_ends
find_short = _scan.find_short if COMPILED else py_find_short
strip_cr = _scan.strip_cr if _scan is not None else py_strip_cr


def count_crlf(data: bytes | bytearray) -> int:
    """How many "\\r\\n" pairs data holds (one count, compiled or not)."""
    return line_ends(data)[0] if COMPILED else data.count(b"\r\n")
