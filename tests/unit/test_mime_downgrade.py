"""8-bit -> 7-bit MIME conversion for a next hop without 8BITMIME (kanmon.smtp.downgrade)."""

from __future__ import annotations

import binascii
import email
import email.policy
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kanmon.deliver.dsn import build_failure_notice
from kanmon.model import Reply
from kanmon.smtp.downgrade import MAX_DEPTH, MAX_STEPS, ConversionLimit, downgrade_8bit, encode_quoted_printable


def parse(data: bytes):
    return email.message_from_bytes(data, policy=email.policy.default)


def leaves(data: bytes) -> list[tuple[str, bytes]]:
    return [(p.get_content_type(), p.get_payload(decode=True)) for p in parse(data).walk() if not p.is_multipart()
            and p.get_content_type() != "message/rfc822"]


def head_and_body(data: bytes) -> tuple[bytes, bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    return head, body


TEXT = "Grüße aus Köln — 日本語のテキスト\r\n".encode()


def test_ascii_message_is_the_same_object():
    data = b"Subject: x\r\nContent-Transfer-Encoding: 8bit\r\n\r\nplain\r\n"
    assert downgrade_8bit(data) is data


def test_single_8bit_text_part_becomes_quoted_printable():
    data = (b"Subject: hi\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Transfer-Encoding: 8bit\r\nX-After: kept\r\n\r\n" + TEXT)
    out = downgrade_8bit(data)
    assert out.isascii()
    assert out.startswith(b"Subject: hi\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
                          b"Content-Transfer-Encoding: quoted-printable\r\nX-After: kept\r\n\r\n")
    assert parse(out).get_content().encode() == TEXT
    assert leaves(out) == [("text/plain", TEXT)]


def test_folded_and_commented_transfer_encoding_is_replaced():
    data = (b"MIME-Version: 1.0\r\nContent-Type: text/plain;\r\n charset=utf-8\r\n"
            b"Content-Transfer-Encoding:\r\n 8BIT (raw)\r\n\r\n" + TEXT)
    out = downgrade_8bit(data)
    assert out.isascii() and out.count(b"Content-Transfer-Encoding") == 1
    assert leaves(out) == [("text/plain", TEXT)]


def test_non_mime_body_gets_mime_headers_and_its_charset():
    data = b"From: a@x.test\r\nSubject: old style\r\n\r\n" + TEXT
    out = downgrade_8bit(data)
    head, _ = head_and_body(out)
    assert out.isascii()
    assert b"MIME-Version: 1.0" in head and b"Content-Type: text/plain; charset=utf-8" in head
    assert parse(out).get_content().encode() == TEXT


def test_non_utf8_octets_are_labelled_unknown_8bit():
    latin1 = "café\r\n".encode("latin-1")
    out = downgrade_8bit(b"Subject: x\r\n\r\n" + latin1)
    assert b"charset=unknown-8bit" in out
    assert leaves(out) == [("text/plain", latin1)]


def test_8bit_header_is_left_as_it_is():
    # As Postfix: header octets cannot be re-encoded reliably; the body still is.
    data = "Subject: 件名\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n".encode() + TEXT
    out = downgrade_8bit(data)
    head, body = head_and_body(out)
    assert head.startswith("Subject: 件名\r\n".encode())
    assert body.isascii()


MULTIPART = (
    b"MIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="outer"\r\n'
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n"
    b"preamble\r\n"
    b"--outer\r\n"
    b"Content-Type: multipart/alternative; boundary=inner\r\n"
    b"\r\n"
    b"--inner\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n" + TEXT +
    b"--inner\r\n"
    b"Content-Type: text/html; charset=us-ascii\r\n"
    b"\r\n"
    b"<p>seven   bit  \r\n"
    b"--inner--\r\n"
    b"--outer\r\n"
    b"Content-Type: message/rfc822\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n"
    b"Subject: forwarded\r\n"
    b"\r\n" + TEXT +
    b"--outer\r\n"
    b"Content-Type: application/octet-stream\r\n"
    b"Content-Transfer-Encoding: binary\r\n"
    b"\r\n"
    b"\x00\x01\xff\xfe\r\n"
    b"--outer\r\n"
    b"Content-Type: image/png\r\n"
    b"Content-Transfer-Encoding: base64\r\n"
    b"\r\n"
    b"iVBORw0KGgo=\r\n"
    b"--outer--\r\n"
    b"epilogue\r\n"
)


def test_multipart_walk_converts_8bit_leaves_and_keeps_7bit_parts_byte_identical():
    out = downgrade_8bit(MULTIPART)
    assert out.isascii()
    assert leaves(out) == leaves(MULTIPART)
    # The 7-bit parts, the preamble and the epilogue are byte for byte as they were.
    for same in (b"preamble\r\n--outer\r\n",
                 b"--inner\r\nContent-Type: text/html; charset=us-ascii\r\n\r\n<p>seven   bit  \r\n--inner--\r\n",
                 b"Content-Type: image/png\r\nContent-Transfer-Encoding: base64\r\n\r\niVBORw0KGgo=\r\n--outer--\r\nepilogue\r\n"):
        assert same in out
    head, _ = head_and_body(out)
    assert b"Content-Transfer-Encoding: 7bit" in head  # the container is 7-bit now
    # Inside message/rfc822: the enclosed message's body is converted, the part relabelled.
    fwd = [p for p in parse(out).walk() if p.get_content_type() == "message/rfc822"][0]
    assert fwd["Content-Transfer-Encoding"] == "7bit"
    inner = fwd.get_content()
    assert inner["Subject"] == "forwarded" and inner.get_content().encode() == TEXT[:-2]  # CRLF: the delimiter's
    assert b"Content-Transfer-Encoding: base64\r\n\r\nAAH//g==\r\n" in out  # binary -> base64


def test_digest_parts_default_to_message_rfc822():
    data = (b'MIME-Version: 1.0\r\nContent-Type: multipart/digest; boundary="d"\r\n\r\n'
            b"--d\r\n\r\nSubject: one\r\n\r\n" + TEXT + b"--d--\r\n")
    out = downgrade_8bit(data)
    assert out.isascii()
    assert b"--d\r\n\r\nSubject: one\r\nContent-Type: text/plain; charset=utf-8\r\n" in out
    assert leaves(out) == [("text/plain", TEXT[:-2])]


def test_bare_line_feeds_are_made_crlf_first():
    data = b"Subject: x\nMIME-Version: 1.0\nContent-Type: text/plain; charset=utf-8\n\n" + TEXT.replace(b"\r\n", b"\n")
    out = downgrade_8bit(data)
    assert out.isascii() and out.count(b"\n") == out.count(b"\r\n")
    assert leaves(out) == [("text/plain", TEXT)]


def test_malformed_structures_are_left_alone():
    no_boundary = b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed\r\n\r\n" + TEXT
    assert downgrade_8bit(no_boundary) == no_boundary
    in_base64 = b"MIME-Version: 1.0\r\nContent-Transfer-Encoding: base64\r\n\r\n" + TEXT
    assert downgrade_8bit(in_base64) == in_base64
    header_only = "Subject: ü".encode()
    assert downgrade_8bit(header_only) == header_only


def test_unterminated_multipart_last_part_is_converted():
    data = (b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b"\r\n\r\n'
            b"--b\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n" + TEXT)
    out = downgrade_8bit(data)
    assert out.isascii()


def test_a_boundary_prefix_inside_a_part_is_not_a_delimiter():
    data = (b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b"\r\n\r\n'
            b"--b\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n" + TEXT + b"--bx not a delimiter\r\n" + TEXT +
            b"--b--\r\n")
    out = downgrade_8bit(data)
    assert out.isascii()
    assert leaves(out) == [("text/plain", TEXT + b"--bx not a delimiter\r\n" + TEXT[:-2])]


def test_8bit_nesting_beyond_the_bound_cannot_be_converted():
    # RFC 6152 3: convert or fail the delivery; never 8-bit octets to a 7-bit server.
    inner = b"Subject: deep\r\n\r\n" + TEXT
    for _ in range(MAX_DEPTH + 5):
        inner = b"MIME-Version: 1.0\r\nContent-Type: message/rfc822\r\n\r\n" + inner
    with pytest.raises(ConversionLimit):
        downgrade_8bit(inner)  # no RecursionError, no unbounded work


def test_7bit_nesting_beyond_the_bound_is_sent_as_it_is():
    inner = b"Subject: deep\r\n\r\nascii\r\n"
    for _ in range(MAX_DEPTH + 5):
        inner = b"MIME-Version: 1.0\r\nContent-Type: message/rfc822\r\n\r\n" + inner
    data = "Subject: ü\r\n".encode() + inner  # 8-bit only in the top header
    assert downgrade_8bit(data) == data


def test_too_many_parts_cannot_be_converted():
    parts = b"".join(b"--b\r\n\r\nx\r\n" for _ in range(MAX_STEPS))
    data = b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b"\r\n\r\n' + parts + \
        b"--b\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n" + TEXT + b"--b--\r\n"
    with pytest.raises(ConversionLimit):
        downgrade_8bit(data)


def nested_message(size: int, depth: int) -> bytes:
    text = "Grüße aus Köln, ein Text mit Umlauten: äöü ÄÖÜ ß, und ASCII.\r\n".encode()
    inner = b"Content-Type: text/plain; charset=utf-8\r\n\r\n" + text * (size // len(text))
    for i in range(depth):
        inner = (b'Content-Type: multipart/mixed; boundary="b%d"\r\n\r\n--b%d\r\n' % (i, i)
                 + inner + b"\r\n--b%d--\r\n" % i)
    return b"MIME-Version: 1.0\r\n" + inner


@pytest.mark.parametrize("depth", [0, MAX_DEPTH])
def test_memory_stays_within_a_small_multiple_of_the_message(depth):
    # DESIGN.md promise 6: no copy of a part per nesting level (a sanity bound, not speed).
    data = nested_message(2_000_000, depth)
    tracemalloc.start()
    try:
        out = downgrade_8bit(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert out.isascii() and leaves(out) == leaves(data)
    assert peak < 4 * len(data)


# RFC 2045 6.7: quoted-printable lines of at most 76 characters, CRLF line ends only.
line = st.one_of(
    st.binary(max_size=200).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
    # text near the line limit, with blanks that must be encoded at a line's end
    st.lists(st.sampled_from([b"x", b" ", b"\t", b"=", b".", "ü".encode()]), min_size=70, max_size=90).map(b"".join),
)
crlf_text = st.lists(line, max_size=8).map(b"\r\n".join)


def check_quoted_printable(body: bytes, encoded: bytes) -> None:
    assert encoded.isascii()
    assert encoded.count(b"\n") == encoded.count(b"\r\n") == encoded.count(b"\r")
    assert all(len(line) <= 76 for line in encoded.split(b"\r\n"))
    assert binascii.a2b_qp(encoded) == body


@settings(max_examples=400, deadline=None)
@given(crlf_text)
def test_quoted_printable_lines_are_short_crlf_and_decode_back(body):
    check_quoted_printable(body, b"".join(encode_quoted_printable(body)))


@pytest.mark.parametrize("body", [
    b"x" * 74 + b"\t\r\nabc",  # b2a_qp: a 77-character line
    b"x" * 74 + b" ",
    "ü".encode() * 200,  # no line feed: b2a_qp soft-breaks with a bare LF
    b"y" * 75 + b"\t" * 3 + b"\r\n",
])
def test_quoted_printable_edge_cases(body):
    check_quoted_printable(body, b"".join(encode_quoted_printable(body)))


def test_quoted_printable_of_a_long_line_is_cut_in_chunks(monkeypatch):
    import kanmon.smtp.downgrade as downgrade
    monkeypatch.setattr(downgrade, "QP_CHUNK", 100)
    body = ("ü x\t" * 200 + "\r\n" + "a" * 99 + "\r\n" + "b" * 500).encode()
    check_quoted_printable(body, b"".join(encode_quoted_printable(body)))


def test_a_notice_with_the_8bit_original_is_converted():
    # Our own notices say 8bit; with RET=FULL the returned message goes through the walk.
    original = b"From: a@corp.example\r\nSubject: x\r\nMIME-Version: 1.0\r\n" \
               b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n" + TEXT
    notice = build_failure_notice(original, "a@corp.example", "relay.corp.example",
                                  [("b@dest.example", Reply(550, "5.1.1", "User unknown"), "mx.dest.example")],
                                  arrival=1_800_000_000.0, now=1_800_000_100.0, include_body=True)
    out = downgrade_8bit(notice.data)
    assert out.isascii()
    msg = parse(out)
    assert msg.get_content_type() == "multipart/report" and msg["Content-Transfer-Encoding"] == "7bit"
    returned = [p for p in msg.walk() if p.get_content_type() == "message/rfc822"][0].get_content()
    assert returned.get_content().encode() == TEXT
