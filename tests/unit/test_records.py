"""Records helpers: header extraction and subject decoding never crash."""

from __future__ import annotations

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
