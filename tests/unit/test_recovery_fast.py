"""Start-up recovery's fast path (kanmon.spool.recovery.read_one: store.envelope_fields_fast,
journal.fold_fast) gives exactly the record of the strict decoders (read_one_strict) for
every queue file and journal: the same entry fields for what both accept, the same refusal
(reason, move to corrupt/) or the same count of refused journal lines for what is damaged.
"""

from __future__ import annotations

import json
import os
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kanmon.spool import journal, schema
from kanmon.spool.recovery import read_one, read_one_strict
from kanmon.spool.store import MAGIC, envelope_fields_fast

ENVELOPE = {
    "from": "a@example.test", "rcpts": ["r1@d1.example", "r2@d2.example"], "orcpts": {}, "at": 1795746233.96,
    "size_hint": 0, "8bit": False, "utf8": False, "notice": False,
    "client": {"ip": "127.0.0.1", "port": 0, "name": "unknown", "helo": "pc", "proto": "ESMTP", "tls": "",
               "cipher": "", "bits": 0, "auth": ""},
}
LINES = [
    {"k": "result", "t": 1795746293.5, "rcpt": "r1@d1.example", "status": "deferred", "reply": "451 4.4.1 refused",
     "relay": "", "mailer": "esmtp", "tls": ""},
    {"k": "result", "t": 1795746293.5, "rcpt": "r2@d2.example", "status": "sent", "reply": "250 ok"},
    {"k": "attempt", "t": 1795746293.5, "n": 1, "next": 1796181545.16},
    {"k": "warned", "t": 1795746300},
    {"k": "hold", "on": True, "t": 1796178285.08, "by": "bench"},
    {"k": "hold", "on": False, "t": 1796178302.16},
    {"k": "schedule", "t": 1796178302.16, "next": 0.0},
    {"k": "result", "t": 1795746400.0, "rcpt": "r1@d1.example", "status": "deferred", "reply": "452 full"},
]
BIG = 10**400  # json parses it as an int that float() cannot take


def env_bytes(env) -> bytes:
    return env if isinstance(env, bytes) else json.dumps(env, separators=(",", ":"), ensure_ascii=False).encode()


def journal_bytes(lines) -> bytes:
    if isinstance(lines, bytes):
        return lines
    return b"".join((x if isinstance(x, bytes) else json.dumps(x, separators=(",", ":")).encode()) + b"\n"
                    for x in lines)


def write(tmp_path, qid: str, env, lines) -> tuple[str, str]:
    q, s = tmp_path / "queue", tmp_path / "state"
    q.mkdir(exist_ok=True)
    s.mkdir(exist_ok=True)
    ej, content = env_bytes(env), b"Subject: x\r\n\r\nbody\r\n"
    crc = zlib.crc32(content, zlib.crc32(ej))
    (q / qid).write_bytes(b"".join((MAGIC, b"%d %d %08x\n" % (len(ej), len(content), crc), ej, b"\n", content)))
    if lines is None:
        (s / qid).unlink(missing_ok=True)
    else:
        (s / qid).write_bytes(journal_bytes(lines))
    return os.fspath(q), os.fspath(s)


def same(tmp_path, env, lines, qid="Q1") -> tuple:
    q, s = write(tmp_path, qid, env, lines)
    strict = read_one_strict(q, s, qid)
    assert read_one(q, s, qid) == strict
    return strict


def with_(d: dict, **kw) -> dict:
    out = dict(d)
    for k, v in kw.items():
        if v is ...:
            out.pop(k.replace("_", ""), None)
        else:
            out[{"eightbit": "8bit"}.get(k, k)] = v
    return out


def client(**kw) -> dict:
    return with_(ENVELOPE, client=with_(ENVELOPE["client"], **kw))


def test_the_usual_message_takes_the_fast_path_and_matches(tmp_path):
    """The fast path is used (both fast decoders accept) and gives the strict record."""
    assert envelope_fields_fast(env_bytes(ENVELOPE)) is not None
    assert journal.fold_fast(journal_bytes(LINES)) is not None
    r = same(tmp_path, ENVELOPE, LINES)
    assert len(r) == 13 and r[-1] == 0 and r[5] == frozenset({"r2@d2.example"})
    same(tmp_path, ENVELOPE, None)  # no journal
    same(tmp_path, ENVELOPE, b"")  # an empty one
    same(tmp_path, with_(ENVELOPE, rcpts=["one@x.example"]), LINES[:1])


ENVELOPES = [
    with_(ENVELOPE, **{"from": None}), {k: v for k, v in ENVELOPE.items() if k != "from"},
    with_(ENVELOPE, **{"from": 5}), with_(ENVELOPE, **{"from": "a" * 2049}), with_(ENVELOPE, **{"from": "a" * 2048}),
    with_(ENVELOPE, rcpts=[]), with_(ENVELOPE, rcpts="a@b"), with_(ENVELOPE, rcpts=[1]), with_(ENVELOPE, rcpts=["a" * 2049]),
    with_(ENVELOPE, rcpts=None), {k: v for k, v in ENVELOPE.items() if k != "rcpts"},
    with_(ENVELOPE, at=-1), with_(ENVELOPE, at=True), with_(ENVELOPE, at=1e12), with_(ENVELOPE, at=5), with_(ENVELOPE, at="1"),
    with_(ENVELOPE, at=BIG), with_(ENVELOPE, at=schema.MAX_TIME), with_(ENVELOPE, at=None),
    {k: v for k, v in ENVELOPE.items() if k != "at"},
    with_(ENVELOPE, size_hint=-1), with_(ENVELOPE, size_hint=True), with_(ENVELOPE, size_hint=1.0),
    with_(ENVELOPE, size_hint=schema.MAX_SIZE + 1), with_(ENVELOPE, size_hint=BIG),
    with_(ENVELOPE, eightbit="yes"), with_(ENVELOPE, utf8=None), with_(ENVELOPE, notice=1), with_(ENVELOPE, crlf=True),
    with_(ENVELOPE, crlf=0), with_(ENVELOPE, ret="FULL"), with_(ENVELOPE, ret="X"), with_(ENVELOPE, ret=5),
    with_(ENVELOPE, ret=["FULL"]), with_(ENVELOPE, ret=None), with_(ENVELOPE, envid="e" * 65537), with_(ENVELOPE, envid=1),
    with_(ENVELOPE, orcpts=None), with_(ENVELOPE, orcpts=[]), with_(ENVELOPE, orcpts={"a": 1}),
    with_(ENVELOPE, orcpts={"a" * 2049: "x"}), with_(ENVELOPE, notify={"r1@d1.example": "n" * 65537}),
    with_(ENVELOPE, orcpt={"r1@d1.example": "rfc822;x"}), with_(ENVELOPE, notify=None),
    with_(ENVELOPE, client=None), with_(ENVELOPE, client=[]), with_(ENVELOPE, client="x"),
    client(ip=...), client(ip=None), client(ip="i" * 2049), client(port=70000), client(port=True), client(port=-1),
    client(port=...), client(bits=-1), client(bits=65536), client(proto="p" * 65), client(proto="p" * 64),
    client(auth="a" * 2049), client(name=None), client(helo=3), client(tls=False), client(cipher=[]),
    with_(ENVELOPE, extra={"unknown": [1, 2]}), [ENVELOPE], "x", 5, None,
    b"not json", b"", b"{", b'{"from":"a","rcpts":["b"],"at":NaN}', b'{"from":"a","rcpts":["b"],"at":Infinity}',
    b'{"from":"a","from":5,"rcpts":["b"]}', b'{"from":5,"from":"a","rcpts":["b"]}',
    b"\xef\xbb\xbf" + env_bytes(ENVELOPE), env_bytes(ENVELOPE).decode().encode("utf-16-le"),
    env_bytes(ENVELOPE).decode().encode("utf-16"), b'{"from":"\xed\xa0\x80","rcpts":["b"]}',
    b'{"from":"\xff","rcpts":["b"]}', b"[" * 100_000, b" " + env_bytes(ENVELOPE) + b" \n",
]


@pytest.mark.parametrize("n", range(len(ENVELOPES)))
def test_envelopes_as_the_strict_decoder(tmp_path, n):
    same(tmp_path, ENVELOPES[n], LINES)


def line(i: int, **kw) -> dict:
    return with_(LINES[i], **kw)


JOURNALS = [
    [line(0, t=...)], [line(0, t=True)], [line(0, t=-0.5)], [line(0, t=BIG)], [line(0, t=1e12)], [line(0, t="1")],
    [b'{"k":"warned","t":NaN}'], [b'{"k":"warned","t":Infinity}'], [b'{"k":"warned","t":-Infinity}'],
    [line(0, status="later")], [line(0, status=5)], [line(0, status=...)], [line(0, status="sent" * 5)],
    [line(0, rcpt="r" * 2049)], [line(0, rcpt=None)], [line(0, reply=...)], [line(0, reply="x" * 65537)],
    [line(0, relay=None)], [line(0, mailer="m" * 65)], [line(0, mailer="m" * 64)], [line(0, tls=1)],
    [line(0, extra=5)], [line(1, status="bounced", reply="")],
    [line(2, n=True)], [line(2, n=-1)], [line(2, n=schema.MAX_COUNT + 1)], [line(2, n=1.0)], [line(2, n=BIG)],
    [line(2, next=...)], [line(2, next=BIG)], [line(2, next=True)], [line(2, t=0)],
    [line(3, t=...)], [line(3, t=None)],
    [line(4, on=1)], [line(4, on=None)], [line(4, on=...)], [line(4, by=5)], [line(4, by="b" * 65537)],
    [line(6, next=...)], [line(6, next=-1)], [line(6, next="0")],
    [{"k": "nope", "t": 1.0}], [{"t": 1.0}], [{"k": ["result"], "t": 1.0}], [[1, 2]], [5], [b"null"], [b"1,2"],
    [b'{"k":"warned","t":1.0},{"k":"warned","t":2.0}'], [b"{"], [b'{"k":"warned","t":1.0} '],
    [b' {"k":"warned","t":1.0}'], [b'{"k":"warned","t":1.0,"t":"x"}'], [b'{"k":"warned","t":"x","t":1.0}'],
    [b"\xef\xbb\xbf" + journal_bytes(LINES[:1])[:-1]], [b'{"k":"hold","on":true,"t":1.0,"by":"\xed\xa0\x80"}'],
    [b'{"k":"hold","on":true,"t":1.0,"by":"\xff"}'],
    journal_bytes(LINES)[:-1], journal_bytes(LINES)[:-7], b"\n" + journal_bytes(LINES),
    journal_bytes(LINES[:2]) + b"\n" + journal_bytes(LINES[2:]), journal_bytes(LINES).decode().encode("utf-16-le"),
    b"\n", b"\n\n", b"[" * 100_000 + b"\n", b"\x00\n",
]


@pytest.mark.parametrize("n", range(len(JOURNALS)))
def test_journals_as_the_strict_decoder(tmp_path, n):
    """Each damaged line alone, and between good lines (refused and counted: the strict path)."""
    j = JOURNALS[n]
    same(tmp_path, ENVELOPE, j)
    if isinstance(j, list):
        r = same(tmp_path, ENVELOPE, LINES[:3] + j + LINES[3:])
        assert r[-1] in (0, 1)


def test_a_refused_line_is_counted(tmp_path):
    assert same(tmp_path, ENVELOPE, LINES + [line(0, status="later")])[-1] == 1
    assert same(tmp_path, ENVELOPE, LINES + [line(0, t=BIG)])[-1] == 1  # was an OverflowError


def test_a_damaged_queue_file_is_refused_as_before(tmp_path):
    q, s = write(tmp_path, "Q1", ENVELOPE, LINES)
    path = tmp_path / "queue" / "Q1"
    path.write_bytes(path.read_bytes()[:-1] + b"X")
    assert read_one(q, s, "Q1") == read_one_strict(q, s, "Q1") == ("Q1", "checksum mismatch", True)
    assert read_one(q, s, "nope") == read_one_strict(q, s, "nope")


# Generated lines: values of every JSON type, the right ones more often, keys from the record kinds.
_texts = st.one_of(st.sampled_from(["", "r1@d1.example", "r2@d2.example", "sent", "deferred", "bounced", "451 x"]),
                   st.text(max_size=5), st.just("x" * 65))
_values = st.one_of(_texts, st.booleans(), st.none(), st.integers(-2, 3), st.sampled_from([BIG, 10**7, 10**12]),
                    st.floats(allow_nan=True, allow_infinity=True), st.floats(0, 2e11), st.lists(st.integers(), max_size=1),
                    st.dictionaries(st.text(max_size=2), st.integers(), max_size=1))
_keys = st.sampled_from(["t", "rcpt", "status", "reply", "relay", "mailer", "tls", "n", "next", "on", "by", "x"])
_kinds = st.sampled_from(["result", "attempt", "warned", "hold", "schedule", "other"])


@st.composite
def _line(draw):
    if draw(st.integers(0, 9)) < 3:  # a valid line, one value changed or removed
        d = dict(draw(st.sampled_from(LINES)))
        key = draw(_keys)
        if draw(st.booleans()):
            d.pop(key, None)
        else:
            d[key] = draw(_values)
        return d
    d = {"k": draw(_kinds)}
    for k in draw(st.lists(_keys, max_size=8)):
        d[k] = draw(_values)
    return d


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(st.one_of(_line(), st.sampled_from(LINES)), max_size=6))
def test_generated_journals_as_the_strict_decoder(tmp_path, lines):
    same(tmp_path, ENVELOPE, lines)


_env_keys = st.sampled_from(["from", "rcpts", "orcpts", "at", "size_hint", "8bit", "utf8", "notice", "crlf", "ret",
                             "envid", "notify", "orcpt", "client"])
_client_keys = st.sampled_from(["ip", "port", "name", "helo", "proto", "tls", "cipher", "bits", "auth"])
_env_values = st.one_of(_values, st.lists(_texts, max_size=2), st.dictionaries(_texts, _texts, max_size=2),
                        st.sampled_from(["FULL", "HDRS", 65535, 65536, 2**53, 2**53 + 1]))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=st.lists(st.tuples(st.booleans(), st.booleans(), _env_keys, _client_keys, _env_values), max_size=3))
def test_generated_envelopes_as_the_strict_decoder(tmp_path, changes):
    env = json.loads(json.dumps(ENVELOPE))
    for in_client, remove, key, ckey, value in changes:
        target, k = (env["client"], ckey) if in_client and type(env.get("client")) is dict else (env, key)
        if remove:
            target.pop(k, None)
        else:
            target[k] = value
    same(tmp_path, env, LINES)
