"""Records: header extraction and subject decoding never crash; the writer never drops the plain log line."""

from __future__ import annotations

import sqlite3

from kanmon.queue.plan import retry_delay
from kanmon.records.store import decode_subject, header_fields


def test_header_fields_unfolds_and_stops_at_body():
    content = b"Received: x\r\nSubject: =?utf-8?q?a?=\r\n =?utf-8?q?b?=\r\nMessage-ID: <1@x>\r\n\r\nSubject: not this\r\n"
    assert header_fields(content) == {"subject": "=?utf-8?q?a?= =?utf-8?q?b?=", "message-id": "<1@x>"}


def test_decode_subject():
    assert decode_subject("=?utf-8?q?h=C3=A9llo?=") == "héllo"
    assert decode_subject("=?utf-8?b?aMOpbGxv?=") == "héllo"
    for broken in ("=?bogus?x?y?=", "=?utf-8?b?!!!?=", "=?utf-8?q?\x00?=", "=?"):
        assert isinstance(decode_subject(broken), str)


def test_header_fields_with_nul_and_garbage():
    assert header_fields(b"Sub\x00ject: x\r\n\xff\xfe: y\r\nSubject: ok\r\n\r\n") == {"subject": "ok"}


def test_retry_delay():
    import random

    rng = random.Random(1)
    delays = [retry_delay(n, 300, 3600, rng) for n in range(1, 8)]
    assert 300 <= delays[0] <= 330 and 600 <= delays[1] <= 660
    assert delays[-1] == 3600 and all(d <= 3600 for d in delays)


class _BrokenDb:
    """A records database whose every write fails (locked, deleted, disk full)."""

    def __enter__(self):
        raise sqlite3.OperationalError("database is locked")

    def __exit__(self, *exc):
        return False

    def close(self) -> None:
        pass


def test_the_log_line_is_written_even_when_the_database_write_fails(tmp_path, capsys):
    from kanmon.records import events as ev
    from kanmon.records.store import Records

    records = Records(tmp_path, "mx1.example.test")
    real_db, records._db = records._db, _BrokenDb()
    try:
        records.record(ev.Removed(), "0123456789BCDFG")
        records.emit("a free-text note")
        records.flush()
    finally:
        records._db = real_db
        records.close()
    log = (tmp_path / "log" / "kanmon.log").read_text()
    assert "0123456789BCDFG: removed" in log and "a free-text note" in log
    assert "records write failed: database is locked" in capsys.readouterr().err


def test_an_event_whose_fields_cannot_be_encoded_loses_nothing_else(tmp_path):
    from kanmon.records import events as ev
    from kanmon.records.query import search_events
    from kanmon.records.store import Records

    records = Records(tmp_path, "mx1.example.test")
    records.emit("bad fields", detail={"x": object()})  # not JSON
    records.record(ev.Removed(), "0123456789BCDFG")
    records.close()
    texts = [e.text for e in search_events(tmp_path)]
    assert "removed" in texts
    assert any(t.startswith("unprintable") for t in texts)


def test_after_lines_is_called_once_the_lines_recorded_before_it_are_in_the_log(tmp_path):
    from kanmon.records.events import Note
    from kanmon.records.store import Records

    records = Records(tmp_path, "mx1.example.test")
    seen: list[str] = []
    records.record(Note("from=<a@b.test>, size=1"), "0000000000001BC")
    records.after_lines(lambda: seen.append((tmp_path / "log/kanmon.log").read_text()))
    records.after_lines(lambda: 1 / 0)  # printed on stderr, the writer goes on
    records.record(Note("later"))
    records.flush()
    records.close()
    (text,) = seen
    assert "0000000000001BC: from=<a@b.test>, size=1" in text
    assert "later" in (tmp_path / "log/kanmon.log").read_text()


def test_a_raw_japanese_subject_is_decoded_for_the_history():
    """Subjects sent as raw bytes (no encoded-word), as Japanese mailers still do: the
    charset told by ISO-2022-JP's escapes, or UTF-8, CP932, EUC-JP tried strictly."""
    text = "請求書送付のお知らせ"

    def subject(raw: bytes) -> str:
        return decode_subject(header_fields(b"Subject: " + raw + b"\r\nMessage-ID: <m@x>\r\n\r\nbody\r\n")["subject"])

    assert subject(text.encode("shift_jis")) == text
    assert subject(text.encode("iso2022_jp")) == text
    assert subject(text.encode("euc_jp")) == text
    assert subject(text.encode("utf-8")) == text
    assert subject("①請求書".encode("cp932")) == "①請求書"  # a Windows extension (NEC row 13)
    assert subject(b"=?ISO-2022-JP?B?" + __import__("base64").b64encode(text.encode("iso2022_jp")) + b"?=") == text
    # Folded over two lines, each ISO-2022-JP with its own escapes.
    folded = "請求書".encode("iso2022_jp") + b"\r\n " + "送付".encode("iso2022_jp")
    assert subject(folded) == "請求書 送付"
    assert subject(b"plain =?broken") == "plain =?broken"
    assert isinstance(subject(bytes(range(0x80, 0x100))), str)  # garbage: some text, never an exception
    assert header_fields(b"Message-ID: <\xff@x>\r\n\r\n")["message-id"] == "<\ufffd@x>"
