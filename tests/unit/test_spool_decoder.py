"""The strict decoder of stored data: envelopes (queue files), journal records and backup
entries (DESIGN.md promise 10). Whatever the bytes, decoding returns a well-typed value
or raises the decoder's error; recovery never raises and sets aside what it refused."""

from __future__ import annotations

import json
import math
import os
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kanmon.model import ClientInfo, Envelope
from kanmon.spool import journal
from kanmon.spool.store import CorruptEntry, Spool, encode_queue_file, envelope_from_json, envelope_to_json

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
LONG = bool(os.environ.get("KANMON_LONG"))  # more examples in long mode
ENVELOPE_KEYS = ["from", "rcpts", "orcpts", "at", "size_hint", "8bit", "utf8", "notice", "crlf", "ret", "envid",
                 "notify", "orcpt", "client"]
CLIENT_KEYS = ["ip", "port", "name", "helo", "proto", "tls", "cipher", "bits", "auth"]
# Objects with the envelope's own keys and values of any type: what a hand edit or a
# damaged restore produces, much likelier to reach deep checks than random dictionaries.
envelope_like = st.fixed_dictionaries({}, optional={
    **{k: json_values for k in ENVELOPE_KEYS},
    "rcpts": st.lists(json_values, max_size=3) | json_values,
    "client": st.fixed_dictionaries({}, optional={k: json_values for k in CLIENT_KEYS}) | json_values,
})
journal_like = st.fixed_dictionaries(
    {"k": st.sampled_from(["result", "attempt", "warned", "hold", "schedule"]) | json_values},
    optional={k: json_values for k in ("t", "rcpt", "status", "reply", "relay", "mailer", "tls", "n", "next", "on",
                                       "by")},
)


def good_envelope() -> Envelope:
    return Envelope("a@remote.example", ["alice@example.test"], {"alice@example.test": "Alice@Example.test"},
                    ClientInfo("127.0.0.6", 4242, "c.example", "c", "ESMTPS", "TLSv1.3", "X", 256, "u"),
                    size_hint=10, body_8bit=True, received_at=1.5, crlf_checked=True, dsn_ret="HDRS",
                    dsn_envid="e", dsn_notify={"alice@example.test": "NEVER"})


def assert_well_typed(env: Envelope) -> None:
    assert isinstance(env.mail_from, str) and env.rcpts and all(isinstance(r, str) for r in env.rcpts)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in env.original_rcpts.items())
    assert isinstance(env.size_hint, int) and not isinstance(env.size_hint, bool) and env.size_hint >= 0
    assert isinstance(env.received_at, float) and math.isfinite(env.received_at) and env.received_at >= 0
    for flag in (env.body_8bit, env.smtputf8, env.is_notice, env.crlf_checked):
        assert isinstance(flag, bool)
    if env.client is not None:
        c = env.client
        assert all(isinstance(v, str) for v in (c.ip, c.name, c.helo, c.proto, c.tls_version, c.tls_cipher,
                                                 c.auth_user))
        assert isinstance(c.port, int) and 0 <= c.port <= 65535 and isinstance(c.tls_bits, int)


def test_a_written_envelope_decodes_to_itself():
    env = good_envelope()
    assert envelope_from_json(envelope_to_json(env)) == env


@pytest.mark.parametrize("raw, why", [
    (b"[]", "object"),
    (b'"text"', "object"),
    (b"null", "object"),
    (b'{"from": "a@b", "rcpts": [12345]}', "rcpts"),
    (b'{"from": "a@b", "rcpts": ["x@y"], "at": "yesterday"}', "at"),
    (b'{"from": "a@b", "rcpts": ["x@y"], "at": NaN}', "at"),
    (b'{"from": "a@b", "rcpts": ["x@y"], "at": -5}', "at"),
    (b'{"from": "a@b", "rcpts": ["x@y"], "size_hint": -1}', "size_hint"),
    (b'{"from": "a@b", "rcpts": ["x@y"], "size_hint": true}', "size_hint"),
    (b'{"from": "a@b", "rcpts": ["x@y"], "8bit": "yes"}', "8bit"),
    (b'{"from": "a@b", "rcpts": ["x@y"], "orcpts": []}', "orcpts"),
    (b'{"from": "a@b", "rcpts": ["x@y"], "client": []}', "client"),
    (b'{"from": "a@b", "rcpts": ["x@y"], "client": {"ip": 5}}', "ip"),
    (b'{"from": "a@b", "rcpts": ["x@y"], "client": {"ip": "1.2.3.4", "port": 70000}}', "port"),
    (b'{"from": "' + b"a" * 5000 + b'", "rcpts": ["x@y"]}', "from"),
    (b'{"from": "a@b", "rcpts": ["x@y"], "envid": ["e"]}', "envid"),
])
def test_envelopes_of_the_wrong_shape_are_refused_with_a_reason(raw, why):
    with pytest.raises(CorruptEntry, match=why):
        envelope_from_json(raw)


@settings(max_examples=3000 if LONG else 120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(json_values, envelope_like))
def test_any_json_value_decodes_to_a_well_typed_envelope_or_is_refused(value):
    raw = json.dumps(value).encode()
    try:
        env = envelope_from_json(raw)
    except CorruptEntry:
        return
    assert_well_typed(env)


@settings(max_examples=3000 if LONG else 200)
@given(st.binary(max_size=200))
def test_any_bytes_decode_to_an_envelope_or_are_refused(raw):
    try:
        env = envelope_from_json(raw)
    except CorruptEntry:
        return
    assert_well_typed(env)


@pytest.mark.parametrize("record, why", [
    ({"k": "attempt", "t": 1.0, "n": 1, "next": float("nan")}, "next"),
    ({"k": "attempt", "t": 1.0, "n": 1, "next": 1e300}, "next"),
    ({"k": "schedule", "t": -1.0, "next": 5.0}, "t"),
    ({"k": "result", "t": 1.0, "rcpt": "r" * 5000, "status": "sent", "reply": "250"}, "rcpt"),
    ({"k": "attempt", "t": 1.0, "n": 10**12, "next": 5.0}, "n"),
])
def test_journal_records_out_of_range_are_refused(record, why):
    with pytest.raises(journal.JournalError, match=why):
        journal.from_dict(json.loads(json.dumps(record)))


@settings(max_examples=3000 if LONG else 120, deadline=None)
@given(st.one_of(json_values, journal_like))
def test_any_json_value_is_a_journal_record_or_refused_and_adds_up(value):
    try:
        rec = journal.from_dict(json.loads(json.dumps(value)))
    except journal.JournalError:
        return
    state = journal.QueueState()
    state.apply(rec)  # never raises
    assert math.isfinite(state.next_attempt) and isinstance(state.attempts, int)


def queue_file(envelope_json: bytes, content: bytes = b"Subject: x\r\n\r\nhi\r\n") -> bytes:
    """A queue file whose header and checksum are right around any envelope bytes."""
    crc = zlib.crc32(content, zlib.crc32(envelope_json))
    return b"KANMON-Q1 %d %d %08x\n" % (len(envelope_json), len(content), crc) + envelope_json + b"\n" + content


@settings(max_examples=1000 if LONG else 60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(envelope=st.one_of(json_values.map(lambda v: json.dumps(v).encode()),
                          envelope_like.map(lambda v: json.dumps(v).encode()), st.binary(max_size=100)),
       state=st.one_of(st.binary(max_size=200), st.lists(st.one_of(json_values, journal_like), max_size=4).map(
           lambda rs: b"".join(json.dumps(r).encode() + b"\n" for r in rs))),
       whole=st.binary(max_size=100))
def test_recovery_never_raises_and_sets_aside_what_it_refuses(tmp_path_factory, envelope, state, whole):
    data = tmp_path_factory.mktemp("spool")
    spool = Spool(data, fsync=False)
    good = "20260101000000AAAA0000"
    spool.store_blocking(good, good_envelope(), b"Subject: ok\r\n\r\nok\r\n")
    (spool.queue / "20260101000000AAAA0001").write_bytes(queue_file(envelope))
    (spool.state_dir / "20260101000000AAAA0001").write_bytes(state)
    (spool.state_dir / good).write_bytes(state)
    (spool.queue / "20260101000000AAAA0002").write_bytes(whole)
    entries, corrupt, _ = spool.recover()
    kept = {e.queue_id for e in entries}
    assert good in kept
    set_aside = {qid for qid, _ in corrupt}
    assert kept | set_aside == {good, "20260101000000AAAA0001", "20260101000000AAAA0002"}
    assert set_aside == set(spool.corrupt_ids())
    for e in entries:
        assert_well_typed(e.envelope)
        assert math.isfinite(e.state.next_attempt)
    spool.close()


# -- backup entries ----------------------------------------------------------------------------


def archive_with(tmp_path, meta_of, queue_bytes: bytes | None = None):
    """An archive of one message, its meta.json replaced by meta_of(meta) and, when given,
    its queue file by queue_bytes (checksums recomputed: the archive's own checks pass)."""
    import hashlib
    import io
    import tarfile

    from kanmon.admin.backup import END, HEAD

    from kanmon.model import new_queue_id

    spool = Spool(tmp_path / "src", fsync=False)
    qid = new_queue_id()
    spool.store_blocking(qid, good_envelope(), b"Subject: x\r\n\r\nx\r\n")
    qb = queue_bytes if queue_bytes is not None else (spool.queue / qid).read_bytes()
    sha = {"queue": hashlib.sha256(qb).hexdigest(), "state": hashlib.sha256(b"").hexdigest()}
    meta = meta_of({"id": qid, "sha256": sha})
    path = tmp_path / "b.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in ((HEAD, json.dumps({"format": "kanmon-queue-backup", "version": 1}).encode()),
                           (f"{qid}/meta.json", json.dumps(meta).encode()), (f"{qid}/queue", qb),
                           (f"{qid}/state", b""),
                           (END, json.dumps({"count": 1, "ids_sha256": hashlib.sha256(qid.encode()).hexdigest()})
                            .encode())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    spool.close()
    return path


@pytest.mark.parametrize("meta_of", [
    lambda m: {**m, "sha256": []},
    lambda m: {**m, "sha256": {"queue": 5, "state": None}},
    lambda m: {**m, "id": ["x"]},
    lambda m: {**m, "id": "1M1C97Q7ZXJ5SSD"},
])
def test_backup_entries_of_the_wrong_shape_are_refused_by_verification(tmp_path, meta_of):
    from kanmon.admin.backup import BackupError, verify_archive

    with pytest.raises(BackupError, match="meta.json"):
        verify_archive(archive_with(tmp_path, meta_of))


def test_a_sound_backup_entry_is_accepted(tmp_path):
    from kanmon.admin.backup import verify_archive

    assert verify_archive(archive_with(tmp_path, lambda m: m)) == 1


def test_a_backup_entry_whose_envelope_has_wrong_types_is_refused(tmp_path):
    from kanmon.admin.backup import BackupError, verify_archive

    bad = queue_file(b'{"from": "a@b", "rcpts": [12345]}')
    with pytest.raises(BackupError, match="rcpts"):
        verify_archive(archive_with(tmp_path, lambda m: m, bad))
