"""The sendmail command line, -t extraction and the strict maildrop decoder."""

from __future__ import annotations

import io
import json
import os
import stat

import pytest

from kanmon.commands.sendmail import UsageError, extract_recipients, parse_args, read_message
from kanmon.queue.pickup import MAGIC, MAILDROP, PickupError, decode_pickup, encode_pickup, to_crlf, write_maildrop


def test_parse_args_sendmail_style() -> None:
    inv = parse_args(["-t", "-oi", "-oem", "-odi", "-fops@example.test", "-F", "Cron Daemon", "-v", "-U",
                      "-B", "8BITMIME", "-N", "never", "-em", "x@example.test"])
    assert inv.extract and inv.ignore_dots and inv.mail_from == "ops@example.test"
    assert inv.fullname == "Cron Daemon" and inv.rcpts == ["x@example.test"] and inv.mode == "send"
    assert parse_args(["-bp"]).mode == "mailq"
    assert parse_args(["-q1h"]).mode == "flush"
    assert parse_args(["-i", "--", "-odd@example.test"]).rcpts == ["-odd@example.test"]
    assert parse_args(["-o", "i"]).ignore_dots
    assert parse_args(["-C", "/etc/k.toml"]).config == "/etc/k.toml"


@pytest.mark.parametrize("argv", [["-Z"], ["-f"], ["-bd"], ["-bs"]])
def test_parse_args_refuses(argv: list[str]) -> None:
    with pytest.raises(UsageError):
        parse_args(argv)


def test_read_message_lone_dot() -> None:
    text = b"Subject: a\n\nx\n..\n.\nrest\n"
    assert read_message(io.BytesIO(text), False, 1000) == b"Subject: a\n\nx\n..\n"
    assert read_message(io.BytesIO(text), True, 1000) == text
    with pytest.raises(UsageError):
        read_message(io.BytesIO(b"x" * 100), True, 10)


def test_extract_recipients_removes_bcc_with_its_continuation() -> None:
    content = (b"From: a@example.test\nTo: \"B, C\" <b@example.test>, c@example.test\nCc: d@example.test\n"
               b"Bcc: e@example.test,\n f@example.test\nSubject: s\n\nBcc: not a header\n")
    rcpts, out = extract_recipients(content)
    assert rcpts == ["b@example.test", "c@example.test", "d@example.test", "e@example.test", "f@example.test"]
    assert out == (b"From: a@example.test\nTo: \"B, C\" <b@example.test>, c@example.test\nCc: d@example.test\n"
                   b"Subject: s\n\nBcc: not a header\n")


def test_pickup_round_trip() -> None:
    data = encode_pickup("a@example.test", ["b@example.test", "root", "b@example.test"], "A", b"x\n")
    got = decode_pickup(data, 100)
    assert (got.mail_from, got.fullname, got.content) == ("a@example.test", "A", b"x\n")
    assert got.rcpts == ["b@example.test", "root"]  # a bare login name: the pickup adds the hostname


@pytest.mark.parametrize("data", [
    b"",
    b"NOT-PICKUP\n{}\n",
    MAGIC + b"{not json\n",
    MAGIC + b"[1]\n",
    MAGIC + json.dumps({"rcpts": []}).encode() + b"\n",
    MAGIC + json.dumps({"rcpts": ["a@b.example"], "extra": 1}).encode() + b"\n",
    MAGIC + json.dumps({"rcpts": ["a@@b"]}).encode() + b"\n",
    MAGIC + json.dumps({"rcpts": ["a@b.example"], "from": 3}).encode() + b"\n",
    MAGIC + json.dumps({"rcpts": ["a@b.example"], "fullname": "a\nBcc: x"}).encode() + b"\n",
    MAGIC + json.dumps({"rcpts": ["a@b.example"]}).encode() + b"\n" + b"x" * 101,
    MAGIC + b"{" + b" " * (2 << 20),
])
def test_pickup_decoder_is_strict(data: bytes) -> None:
    with pytest.raises(PickupError):
        decode_pickup(data, 100)


def test_write_maildrop_is_atomic_and_private(tmp_path) -> None:
    path = write_maildrop(tmp_path, b"data")
    assert path.parent == tmp_path / MAILDROP and path.read_bytes() == b"data"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left


def test_to_crlf() -> None:
    assert to_crlf(b"a\nb\r\nc\rd\n") == b"a\r\nb\r\ncd\r\n"
