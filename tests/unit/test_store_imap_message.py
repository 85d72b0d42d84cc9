"""IMAP message structure: ENVELOPE, BODYSTRUCTURE, sections, strings (RFC 3501 7.4.2)."""

from __future__ import annotations

from kanmon.store.imap.message import (
    bodystructure,
    envelope,
    filter_header,
    iastring,
    istr,
    parse,
    parse_section,
    section_bytes,
)
from kanmon.store.imap.parser import in_set, parse_sequence_set


def test_strings_quote_or_become_literals() -> None:
    assert istr(None) == b"NIL"
    assert istr('say "hi" \\') == b'"say \\"hi\\" \\\\"'
    assert istr("café") == b"{5}\r\ncaf\xc3\xa9"
    assert istr("a\r\nb") == b"{4}\r\na\r\nb"
    assert iastring("Sent") == b"Sent" and iastring("My Folder") == b'"My Folder"' and iastring("NIL") == b'"NIL"'


def test_envelope_defaults_and_groups() -> None:
    msg = b"From: A <a@x.test>\r\nTo: undisclosed-recipients:;\r\nSubject: s\r\n\r\nbody\r\n"
    env = envelope(parse(msg))
    # Sender and Reply-To default to From (RFC 3501 7.4.2); an empty group is NIL.
    assert env == (b'(NIL "s" (("A" NIL "a" "x.test")) (("A" NIL "a" "x.test")) (("A" NIL "a" "x.test")) '
                   b"NIL NIL NIL NIL NIL)")


def test_eight_bit_subject_is_a_literal_in_envelope() -> None:
    env = envelope(parse("Subject: grüße\r\n\r\nx\r\n".encode()))
    assert b"{7}\r\ngr\xc3\xbc\xc3\x9fe" in env


def test_single_part_bodystructure_and_sections() -> None:
    msg = b"Subject: s\r\nContent-Type: text/html; charset=\"utf-8\"\r\n\r\n<p>a</p>\r\n<p>b</p>\r\n"
    tree = parse(msg)
    assert bodystructure(tree, extended=False) == b'("TEXT" "HTML" ("CHARSET" "utf-8") NIL NIL "7BIT" 20 2)'
    assert section_bytes(tree, msg, parse_section("1")) == b"<p>a</p>\r\n<p>b</p>\r\n"
    assert section_bytes(tree, msg, parse_section("TEXT")) == b"<p>a</p>\r\n<p>b</p>\r\n"
    assert section_bytes(tree, msg, parse_section("")) == msg
    assert section_bytes(tree, msg, parse_section("2")) is None


def test_no_content_type_defaults_to_text_plain_us_ascii() -> None:
    assert bodystructure(parse(b"Subject: s\r\n\r\nhi\r\n"), extended=False) == (
        b'("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 4 1)')


def test_multipart_without_boundary_or_closing_delimiter() -> None:
    broken = b'Content-Type: multipart/mixed\r\n\r\nno boundary here\r\n'
    assert bodystructure(parse(broken), extended=False).startswith(b'("TEXT" "PLAIN"')
    unclosed = b'Content-Type: multipart/mixed; boundary=q\r\n\r\n--q\r\n\r\none\r\n--q\r\n\r\ntwo'
    tree = parse(unclosed)
    assert [c.body for c in tree.children] == [b"one", b"two"]


def test_boundary_prefix_inside_a_line_is_not_a_delimiter() -> None:
    msg = (b'Content-Type: multipart/mixed; boundary=ab\r\n\r\n--ab\r\n\r\n--abc is text\r\n--ab\r\n\r\nsecond\r\n'
           b"--ab--\r\n")
    tree = parse(msg)
    assert [c.body for c in tree.children] == [b"--abc is text", b"second"]


def test_deep_nesting_is_cut_not_recursed_forever() -> None:
    msg = b""
    for i in range(200):
        msg = f"Content-Type: multipart/mixed; boundary=b{i}\r\n\r\n--b{i}\r\n".encode() + msg + f"\r\n--b{i}--\r\n".encode()
    tree = parse(msg)
    depth = 0
    while tree.children:
        tree = tree.children[0]
        depth += 1
    assert depth <= 20


def test_rfc2231_parameters_and_disposition() -> None:
    msg = (b"Content-Type: application/octet-stream\r\n"
           b"Content-Disposition: attachment; filename*=utf-8''r%C3%A9sum%C3%A9.pdf\r\n\r\nxx\r\n")
    bs = bodystructure(parse(msg))
    # Kept as written, as Dovecot does: RFC 2231 decoding is the client's job.
    assert b'("ATTACHMENT" ("FILENAME*" "utf-8\'\'r%C3%A9sum%C3%A9.pdf"))' in bs


def test_header_fields_keep_folded_lines() -> None:
    header = b"Subject: a\r\n long\r\nFrom: x@y\r\nX-Other: 1\r\n\r\n"
    assert filter_header(header, ["subject"], True) == b"Subject: a\r\n long\r\n\r\n"
    assert filter_header(header, ["SUBJECT", "x-other"], False) == b"From: x@y\r\n\r\n"


def test_params_with_quotes_and_semicolons() -> None:
    from kanmon.store.imap.message import split_params

    assert split_params('attachment; filename="a;b \\"c\\".txt"; size=3') == (
        "attachment", [("filename", 'a;b "c".txt'), ("size", "3")])
    assert bodystructure(parse(b"Content-Type: garbage\r\n\r\nx"), extended=False).startswith(b'("TEXT" "PLAIN"')


def test_section_specs() -> None:
    assert parse_section("1.2.HEADER.FIELDS.NOT (X-A X-B)").label() == "1.2.HEADER.FIELDS.NOT (X-A X-B)"
    assert parse_section("header.fields (from)").label() == "HEADER.FIELDS (FROM)"
    for bad in ("MIME", "1.0", "HEADER.FIELDS ()", "TEXT (x)", "x"):
        assert parse_section(bad) is None, bad


def test_sequence_sets() -> None:
    ranges = parse_sequence_set("1:3,7,9:*")
    assert [v for v in range(1, 12) if in_set(ranges, v, 10)] == [1, 2, 3, 7, 9, 10]
    assert in_set(parse_sequence_set("*:4"), 5, 6)  # ranges are unordered
