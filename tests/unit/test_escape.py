"""kanmon.escape: control characters escaped, printable text untouched."""

from __future__ import annotations

import json

from hypothesis import given, strategies as st

from kanmon.escape import for_log, for_terminal, json_for_terminal


def test_controls_are_escaped_like_postfix() -> None:
    assert for_log("ev\x1b]0;x\x07il\x0b\t\x00\r\n\x7f\x9b") == "ev\\x1b]0;x\\x07il\\x0b\\t\\x00\\r\\n\\x7f\\x9b"
    assert for_log("a\u202eb\u2028c") == "a\\u202eb\\u2028c"
    assert for_terminal("\x1b[2K") == "\\x1b[2K"


def test_printable_text_is_kept() -> None:
    text = 'álice "quoted\\" [bold] 日本語 <a@b>'
    assert for_log(text) is text


@given(st.text())
def test_result_is_one_printable_line(text: str) -> None:
    out = for_log(text)
    assert "\n" not in out and "\x1b" not in out
    assert all(not (ord(ch) < 0x20 or 0x7F <= ord(ch) <= 0x9F) for ch in out)


UNSAFE = set(range(0x00, 0x20)) | set(range(0x7F, 0xA0)) | {0x2028, 0x2029, 0x200E, 0x200F} | set(
    range(0x202A, 0x202F)) | set(range(0x2066, 0x206A))


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
                    max_leaves=8))
def test_json_for_a_terminal_is_the_same_value_with_nothing_unsafe_raw(value) -> None:
    out = json_for_terminal(value, indent=1)
    assert json.loads(out) == value
    assert not any(ord(ch) in UNSAFE and ch != "\n" for ch in out)  # indent's own line ends only


def test_json_for_a_terminal_keeps_readable_text() -> None:
    assert json_for_terminal({"d": "ev\u009b31m\u202e.example", "s": "日本語"}) == \
        '{"d": "ev\\u009b31m\\u202e.example", "s": "日本語"}'


def test_lone_surrogates_are_escaped_so_the_text_can_be_written():
    """Bytes that were not UTF-8, kept by surrogateescape (a tar member's name): written
    raw they cannot be encoded at all (the log line or the command would fail)."""
    text = "a\udc8cb"
    for out in (for_log(text), for_terminal(text), for_terminal(text, block=True), json_for_terminal(text)):
        assert "\\udc8c" in out
        out.encode("utf-8")
