"""IMAP bounds a hostile client hits: SEARCH nesting, folder name length, 8-bit folder names.

- `SEARCH NOT NOT ... ALL` 2000 deep (or OR, or parentheses) is refused with BAD, not a
  RecursionError that drops the connection unlogged; the connection stays usable.
- A folder name over 255 bytes is `NO [LIMIT]` (it used to reach the file system and come
  back as `NO [SERVERBUG]`).
- A raw 8-bit folder name is refused (RFC 3501 5.1.3: modified UTF-7; RFC 6855 3: 8-bit
  names only after ENABLE UTF8=ACCEPT, which kanmon does not offer); its mUTF-7 form works.
"""

from __future__ import annotations

from tests.protocol.test_imap_session import deliver_new, env, logged_in  # noqa: F401 - env is a fixture

MSG = b"From: a@example.test\r\nSubject: x\r\n\r\nhello\r\n"


def test_deep_search_nesting_is_bad_and_the_connection_lives(env) -> None:
    deliver_new(env.box.root, MSG)
    d = logged_in(env)
    assert "n1 BAD" in d.cmd("n1 SEARCH " + "NOT " * 2000 + "ALL")
    assert "n2 BAD" in d.cmd("n2 SEARCH " + "OR ALL " * 2000 + "ALL")
    assert "n3 BAD" in d.cmd("n3 SEARCH " + "(" * 2000 + "ALL" + ")" * 2000)
    assert not d.closed
    out = d.cmd("n4 SEARCH NOT NOT NOT NOT ALL")  # a modest depth still works
    assert "* SEARCH 1\r\n" in out and "n4 OK" in out
    assert "* SEARCH 1" in d.cmd("n5 SEARCH (((ALL)))")


def test_folder_names_over_255_bytes_are_no_limit(env) -> None:
    d = logged_in(env, select=None)
    out = d.cmd("a CREATE " + "x" * 300)
    assert "a NO [LIMIT]" in out and "SERVERBUG" not in out
    out = d.cmd("b CREATE &AOk-" + "&AOk-" * 60)  # modified UTF-7, 305 bytes
    assert "b NO [LIMIT]" in out
    out = d.cmd("c RENAME INBOX " + "y" * 256)
    assert "c NO [LIMIT]" in out


def test_raw_8bit_folder_names_are_refused(env) -> None:
    d = logged_in(env, select=None)
    out = d.send('a CREATE "Caf\xe9"\r\n'.encode())  # UTF-8 on the wire
    assert out.startswith("a BAD")
    out = d.send(b'b CREATE "' + "é".encode() * 150 + b'"\r\n')  # 300 bytes of UTF-8
    assert out.startswith("b BAD") and "SERVERBUG" not in out
    assert "c OK" in d.cmd("c CREATE Caf&AOk-")  # the same name in modified UTF-7
    assert "Caf&AOk-" in d.cmd('d LIST "" "*"')
