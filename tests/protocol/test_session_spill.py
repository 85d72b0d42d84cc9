"""DATA bigger than the session's buffer goes out in pieces (SpoolData) and comes back in
one (spooled_content): the same message, the same replies, as when it is held whole.

The pieces are cut wherever the client's bytes happen to end, so the terminator, dot-
stuffing, CRLF pairs and bare CR/LF fall across every boundary: hypothesis drives the
split points and the content, and compares with a session whose buffer never fills (the
in-memory path, unchanged).
"""

from __future__ import annotations

import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kanmon.smtp import replies
from kanmon.smtp.session import DropSpooled, ReadSpooled, Session, SpoolData, State, StoreMessage
from tests.protocol.test_session import CONFIG, codes, make_session

BIG = CONFIG.replace('max_message_size = "10KB"', 'max_message_size = "20KB"')


class Listener:
    """What the SMTP listener does with a session's spill actions, in memory."""

    def __init__(self, session: Session):
        self.session = session
        self.spill: bytearray | None = None
        self.stored: list[StoreMessage] = []
        self.actions: list = []
        self.max_buffer = 0
        self.dropped = 0

    def feed(self, data: bytes) -> None:
        self.run(self.session.feed(data))
        self.max_buffer = max(self.max_buffer, len(self.session._data))

    def run(self, actions) -> None:
        todo = list(actions)
        while todo:
            a = todo.pop(0)
            self.actions.append(a)
            if isinstance(a, SpoolData):
                if self.spill is None:
                    self.spill = bytearray()
                self.spill += a.data
            elif isinstance(a, DropSpooled):
                self.spill = None
                self.dropped += 1
            elif isinstance(a, ReadSpooled):
                assert self.spill is not None and len(self.spill) == a.size
                content, self.spill = bytes(self.spill), None
                todo += self.session.spooled_content(content)
            elif isinstance(a, StoreMessage):
                self.stored.append(a)
                todo += self.session.message_stored(a.queue_id)


def open_transaction(trusted: bool, buffer: int, config: str = CONFIG) -> Listener:
    s = make_session("127.0.0.1" if trusted else "192.0.2.9", config=config, data_buffer=buffer)
    s.settings.bare_lf = trusted
    lis = Listener(s)
    lis.run(s.greeting())
    lis.feed(b"EHLO client.example\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n")
    assert s.state is State.DATA
    return lis


def outcome(lis: Listener) -> tuple[list[str], list[bytes]]:
    def body(a: StoreMessage) -> bytes:
        return re.sub(rb" id [0-9A-Za-z]+", b" id X", a.content)  # the queue id differs per message
    return codes(lis.actions), [body(a) for a in lis.stored]


def feed_in_pieces(lis: Listener, message: bytes, cuts: list[int]) -> Listener:
    """message fed to lis in reads cut at `cuts` (taken modulo its length, sorted)."""
    at = 0
    for cut in sorted(set(c % (len(message) + 1) for c in cuts)) + [len(message)]:
        if cut > at:
            lis.feed(message[at:cut])
            at = cut
    return lis


def run_both(message: bytes, cuts: list[int], trusted: bool, buffer: int, config: str = CONFIG):
    whole = open_transaction(trusted, 1 << 30, config)
    whole.feed(message)
    return whole, feed_in_pieces(open_transaction(trusted, buffer, config), message, cuts)


ATOMS = [b".", b"..", b"\r\n", b"\r", b"\n", b"x", b"Subject: hi", b"\r\n.\r", b"\r\n..\r\n", b"\n.\n", b"\n.\r\n", b" "]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    parts=st.lists(st.sampled_from(ATOMS), max_size=60),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=12),
    trusted=st.booleans(),
    buffer=st.integers(min_value=1, max_value=40),
)
def test_pieces_give_the_same_message_as_the_whole(parts, cuts, trusted, buffer):
    message = b"".join(parts) + b"\r\n.\r\nNOOP\r\n"
    whole, pieces = run_both(message, cuts, trusted, buffer)
    assert outcome(pieces) == outcome(whole)
    assert pieces.spill is None  # read back or dropped: nothing left
    assert pieces.session.state is whole.session.state


def test_a_big_message_is_spilled_and_read_back_byte_for_byte():
    line = b"..dot-stuffed line " + b"y" * 60 + b"\r\n"
    body = b"Subject: big\r\n\r\n" + line * 200
    whole, pieces = run_both(body + b".\r\n", list(range(0, len(body), 97)), False, 1024, BIG)
    assert any(isinstance(a, SpoolData) for a in pieces.actions)
    assert not any(isinstance(a, SpoolData) for a in whole.actions)
    assert outcome(pieces) == outcome(whole)
    assert codes(pieces.actions)[-1] == "250"
    assert pieces.stored[0].content.endswith(b"\r\n" + (b".dot-stuffed line " + b"y" * 60 + b"\r\n") * 200)
    assert pieces.max_buffer <= 1024 + 97  # the buffer, plus one read


def test_bare_lf_in_a_spilled_message_is_refused_and_the_file_dropped():
    body = b"Subject: x\r\n\r\n" + b"a" * 3000 + b"\nsmuggled\r\n" + b"b" * 3000 + b"\r\n.\r\n"
    whole, pieces = run_both(body, list(range(0, len(body), 500)), False, 1024)
    assert outcome(pieces) == outcome(whole)
    assert codes(pieces.actions)[-1] == replies.BARE_NEWLINE.wire()[:3].decode()
    assert pieces.dropped == 1 and not pieces.stored


def test_a_message_over_the_limit_is_dropped_while_it_still_arrives():
    lis = open_transaction(False, 1024)
    chunk = (b"z" * 998 + b"\r\n") * 4
    while lis.session._data_len < 12 * 1024:
        lis.feed(chunk)
    assert lis.dropped == 1 and lis.spill is None  # refused before its end: nothing more written
    lis.feed(b".\r\n")
    assert codes(lis.actions)[-1] == "552" and not lis.stored
    assert lis.spill is None


def test_the_header_limit_applies_to_a_spilled_message():
    lis = open_transaction(False, 256)
    lis.session.settings.max_header_size = 500
    message = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 40) for i in range(40)) + b"\r\nbody\r\n.\r\n"
    for i in range(0, len(message), 100):
        lis.feed(message[i : i + 100])
    assert codes(lis.actions)[-1] == "552" and not lis.stored and lis.spill is None
    assert any(isinstance(a, SpoolData) for a in lis.actions)


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from([b"\r", b"\n", b"\r\n", b"x", b"\n\r", b"\r\r\n"]), max_size=30).map(b"".join))
def test_the_one_pass_line_end_check_agrees_with_counting_each(data):
    """kanmon.model.crlf_only (the DATA paths' check) says "CRLF only" exactly when no CR
    or LF is left once the CRLF pairs are taken out."""
    from kanmon.model import crlf_only

    rest = data.replace(b"\r\n", b"")
    assert crlf_only(data) == (b"\r" not in rest and b"\n" not in rest)
