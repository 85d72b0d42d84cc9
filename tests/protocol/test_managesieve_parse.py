"""ManageSieve command parsing (kanmon.store.managesieve.parse_command) fed in pieces:
quoted strings, both literal forms, input split anywhere, bounds."""

from __future__ import annotations

import pytest

from kanmon.store.managesieve import _Bad, _TooLarge, parse_command

CMD = b'PUTSCRIPT "my \\"script\\"" {12+}\r\nkeep;\r\nstop;\r\nLISTSCRIPTS\r\n'


def test_whole_command_and_every_split_point():
    words, used = parse_command(CMD, 1000)
    assert words == [b"PUTSCRIPT", b'my "script"', b"keep;\r\nstop;"]
    assert CMD[used:] == b"LISTSCRIPTS\r\n"
    for cut in range(used):
        assert parse_command(CMD[:cut], 1000) is None, cut


def test_synchronising_literal_and_bare_lf():
    assert parse_command(b"CHECKSCRIPT {3}\r\nabc\n", 10) == ([b"CHECKSCRIPT", b"abc"], 21)
    assert parse_command(b"NOOP\n", 10) == ([b"NOOP"], 5)


def test_oversized_literal_says_where_its_bytes_start():
    with pytest.raises(_TooLarge) as err:
        parse_command(b'PUTSCRIPT "a" {99999+}\r\nkeep;', 1000)
    assert (err.value.start, err.value.size) == (len(b'PUTSCRIPT "a" {99999+}\r\n'), 99999)


@pytest.mark.parametrize("data", [
    b'NOOP "a\rb"\r\n',  # CR inside a quoted string
    b"PUTSCRIPT {x}\r\n",
    b"A" * 9000,  # a line that never ends
])
def test_refused(data):
    with pytest.raises(_Bad):
        parse_command(data, 1000)
