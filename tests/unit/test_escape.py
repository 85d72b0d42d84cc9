"""kanmon.escape: control characters escaped, printable text untouched."""

from __future__ import annotations

from hypothesis import given, strategies as st

from kanmon.escape import for_log, for_terminal


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
