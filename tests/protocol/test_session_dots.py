"""Lines that start with a dot, seen by the scan for the end of DATA (Envelope.no_dot_lines).

The session notes whether any line of the message starts with a dot while it looks for
<CRLF>.<CRLF>; when none does it skips the unstuffing, and the envelope tells the outbound
client it need not double dots either. Whatever the cuts between reads, the buffer size
(spilled or not), the client (CRLF only, or a trusted client whose bare LF is
normalised) or the scans (compiled kanmon._scan, or kanmon.scan's Python definitions),
the stored message and the flag must be what a line-by-line reading of RFC 5321 4.5.2
gives: a line that starts with a dot and has more loses that first dot, whether the
client doubled it ("..x" is kept ".x") or not (".x" is kept "x", as Postfix does).
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kanmon import scan
from kanmon.model import has_dot_line
from kanmon.smtp import session as session_module
from kanmon.policy.pipeline import Amend, accept
from kanmon.smtp.session import StoreMessage
from tests.protocol.test_session_checks import MAIL, RCPT, SyncAt, ehlo, session
from tests.protocol.test_session_spill import BIG, feed_in_pieces, open_transaction

LINES = [b"", b".", b"..", b"...", b".x", b"..x", b"x", b"x.", b"Subject: hi", b" .", b".\r", b"." * 70, b"y" * 90]


def wire_and_expected(lines: list[bytes]) -> tuple[bytes, bytes, bool]:
    """The DATA as a client sends it, the message kanmon keeps (a line starting with a dot
    loses it: RFC 5321 4.5.2), and whether no kept line starts with a dot."""
    lines = [line for line in lines if line not in (b".", b".\r")]  # "." alone would end DATA
    wire = b"".join(line + b"\r\n" for line in lines) + b".\r\nNOOP\r\n"
    kept = [line[1:] if line.startswith(b".") else line for line in lines]
    return wire, b"".join(line + b"\r\n" for line in kept), not any(line.startswith(b".") for line in kept)


@pytest.fixture(params=["compiled", "python"])
def scans(request, monkeypatch):
    """The session's scans: kanmon._scan where it was built, or kanmon.scan's Python ones."""
    if request.param == "compiled":
        if not scan.COMPILED:
            pytest.skip("kanmon._scan is not built here (python setup.py build_ext --inplace)")
    else:
        monkeypatch.setattr(session_module, "find_short", scan.py_find_short)
        monkeypatch.setattr(session_module, "line_ends", scan.py_line_ends)
        monkeypatch.setattr("kanmon.model.line_ends", scan.py_line_ends)
    return request.param


# The scans fixture is set once for all examples (function_scoped_fixture: on purpose).
@settings(max_examples=500, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(
    lines=st.lists(st.sampled_from(LINES), max_size=40),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=14),
    trusted=st.booleans(),
    buffer=st.sampled_from([1, 7, 40, 300, 1 << 30]),
)
def test_the_flag_and_the_message_match_a_line_by_line_reading(scans, lines, cuts, trusted, buffer):
    wire, expected, no_dots = wire_and_expected(lines)
    lis = feed_in_pieces(open_transaction(trusted, buffer, BIG), wire, cuts)
    [store] = lis.stored
    content = store.content
    assert content.endswith(expected)
    head = content[: len(content) - len(expected)]
    assert head.startswith(b"Received: ") and not has_dot_line(head)
    assert store.envelope.no_dot_lines is no_dots
    assert store.envelope.no_dot_lines is not has_dot_line(content)


@pytest.mark.parametrize("buffer", [1 << 30, 512], ids=["whole", "spilled"])
@pytest.mark.parametrize("trusted", [False, True], ids=["crlf-only", "bare-lf-normalised"])
def test_a_leading_dot_is_deleted_whether_doubled_or_not(scans, trusted, buffer):
    # RFC 5321 4.5.2: "If the first character is a period and there are other characters
    # on the line, the first character is deleted." A client that did not double a dot
    # (".x") loses it; one that did ("..x") keeps one. "<CRLF>.<CRLF>" alone ends DATA.
    filler = b"filler line\r\n" * 60  # past the 512-octet buffer: the dot lines come in later pieces
    body = b"Subject: dots\r\n\r\n.x\r\n..y\r\n...z\r\n" + filler + b".late\r\n..later\r\nend\r\n"
    kept = b"Subject: dots\r\n\r\nx\r\n.y\r\n..z\r\n" + filler + b"late\r\n.later\r\nend\r\n"
    for cuts in ([], list(range(0, len(body), 7))):
        lis = feed_in_pieces(open_transaction(trusted, buffer, BIG), body + b".\r\n", cuts)
        [store] = lis.stored
        assert store.content.endswith(b"\r\n" + kept) and store.envelope.no_dot_lines is False
        # Only undoubled dots: nothing of the stored message starts with a dot any more.
        lis = feed_in_pieces(open_transaction(trusted, buffer, BIG), b".a\r\n" + filler + b".b\r\n.\r\n", cuts)
        [store] = lis.stored
        assert store.content.endswith(b"\r\na\r\n" + filler + b"b\r\n") and store.envelope.no_dot_lines is True


def test_a_dot_line_only_in_a_later_piece_of_a_spilled_message_is_unstuffed():
    # The first pieces go out before the dot line arrives: nothing in them to unstuff.
    body = b"Subject: big\r\n\r\n" + b"plain line\r\n" * 300 + b"..late dot\r\n" + b"tail\r\n"
    lis = feed_in_pieces(open_transaction(False, 512, BIG), body + b".\r\n", list(range(0, len(body), 101)))
    [store] = lis.stored
    assert store.content.endswith(b"\r\n" + b"plain line\r\n" * 300 + b".late dot\r\ntail\r\n")
    assert store.envelope.no_dot_lines is False


def test_a_dot_line_split_across_reads_is_seen():
    for cut in range(1, 8):
        wire = b"Subject: x\r\n\r\nab\r\n..c\r\n.\r\n"
        at = wire.index(b"\r\n..c") + cut
        lis = feed_in_pieces(open_transaction(False, 1 << 30, BIG), wire, [at])
        [store] = lis.stored
        assert store.content.endswith(b"\r\nab\r\n.c\r\n") and store.envelope.no_dot_lines is False, cut


def data_with(check) -> StoreMessage:
    s = ehlo(session(check))
    out = s.feed(MAIL + RCPT + b"DATA\r\nSubject: hi\r\n\r\nno dot here\r\n.\r\n")
    [store] = [a for a in out if isinstance(a, StoreMessage)]
    return store


def test_a_check_adding_a_field_whose_name_starts_with_a_dot_clears_the_flag():
    # A content rule's add_header may name a field ".X" (RFC 5322 ftext allows it).
    assert data_with(SyncAt("data", accept(headers=(("X-Plain", "1"),)))).envelope.no_dot_lines is True
    store = data_with(SyncAt("data", accept(headers=((".X-Dotted", "1"),))))
    assert b"\r\n.X-Dotted: 1\r\n" in store.content
    assert store.envelope.no_dot_lines is False


def test_a_rewritten_message_is_judged_by_what_is_stored():
    rewritten = b"Subject: hi\r\n\r\n.now a dot line\r\n"
    store = data_with(SyncAt("data", accept(content=rewritten)))
    assert store.content.endswith(rewritten) and store.envelope.no_dot_lines is False
    store = data_with(SyncAt("data", accept(content=b"Subject: hi\r\n\r\nstill none\r\n")))
    assert store.envelope.no_dot_lines is True
    store = data_with(SyncAt("data", accept(amend=Amend(subject_prefix="[SPAM]"))))
    assert b"Subject: [SPAM] hi" in store.content and store.envelope.no_dot_lines is True


def test_a_trusted_clients_bare_lf_lines_are_seen_too(scans):
    for wire, kept, no_dots in [(b"a\n..b\n.\n", b"a\r\n.b\r\n", False), (b"a\nb\r\n.\n", b"a\r\nb\r\n", True),
                                (b"..a\nb\n.\r\n", b".a\r\nb\r\n", False), (b".a\n.b\n.\n", b"a\r\nb\r\n", True)]:
        lis = feed_in_pieces(open_transaction(True, 1 << 30, BIG), wire, [])
        [store] = lis.stored
        assert store.content.endswith(b"\r\n" + kept) and store.envelope.no_dot_lines is no_dots, wire
