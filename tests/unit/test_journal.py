"""Journal records (kanmon.spool.journal): one encoder, one strict decoder, old files decode."""

from __future__ import annotations

import pytest

from kanmon.model import Envelope, new_queue_id
from kanmon.spool import journal
from kanmon.spool.store import Spool

# A journal as the queue manager, `kanmon queue` and restore wrote it before the record
# types existed (byte for byte: key order, compact separators).
OLD_JOURNAL = (
    b'{"k":"result","t":1800000060.5,"rcpt":"bob@dest.example","status":"sent","reply":"250 2.0.0 Ok",'
    b'"relay":"mx.dest.example [192.0.2.1]:25","mailer":"esmtp","tls":"TLSv1.3 TLS_AES_256_GCM_SHA384 verify=OK"}\n'
    b'{"k":"result","t":1800000060.5,"rcpt":"carol@dest.example","status":"deferred","reply":"451 4.3.0 later",'
    b'"relay":"","mailer":"esmtp","tls":""}\n'
    b'{"k":"attempt","t":1800000060.5,"n":1,"next":1800000390.1}\n'
    b'{"k":"warned","t":1800014460}\n'
    b'{"k":"hold","on":true,"t":1800014500.0,"by":"kanmon queue"}\n'
    b'{"k":"hold","on":false,"t":1800014600.0,"by":"kanmon queue"}\n'
    b'{"k":"schedule","t":1800014600.0,"next":0.0}\n'
    b'{"k":"attempt","t":1800014700.0,"n":0,"next":0.0}\n'
    b'{"k":"result","t":1800014800.0,"rcpt":"carol@dest.example","status":"sent","reply":"250 ok",'
    b'"relay":"relay.new:25","mailer":"drain","tls":""}\n'
)


def test_a_journal_in_the_old_format_decodes():
    records, refused = journal.decode_all(OLD_JOURNAL)
    assert refused == 0 and len(records) == 9
    assert records[0] == journal.Result(1800000060.5, "bob@dest.example", "sent", "250 2.0.0 Ok",
                                        "mx.dest.example [192.0.2.1]:25", "esmtp",
                                        "TLSv1.3 TLS_AES_256_GCM_SHA384 verify=OK")
    assert records[2] == journal.Attempt(1800000060.5, 1, 1800000390.1)
    assert records[3] == journal.Warned(1800014460.0)
    assert records[4] == journal.Hold(1800014500.0, True, "kanmon queue")
    assert records[6] == journal.Schedule(1800014600.0, 0.0)
    state = journal.QueueState.from_bytes(OLD_JOURNAL)
    assert set(state.done) == {"bob@dest.example", "carol@dest.example"} and state.last == {}
    assert state.warned and not state.hold and state.attempts == 0 and state.next_attempt == 0.0
    assert [type(h).__name__ for h in state.history] == ["Result", "Result", "Warned", "Hold", "Hold", "Result"]


def test_encoding_is_byte_for_byte_the_old_format():
    lines = [line for line in OLD_JOURNAL.split(b"\n") if line]
    for line in lines:
        if b'"t":1800014460}' in line:
            continue  # an integer time is read as a float, and written back as one
        assert journal.encode([journal.decode(line)]) == line + b"\n"


def test_old_journal_through_the_spool(tmp_path):
    spool = Spool(tmp_path, fsync=False)
    qid = new_queue_id()
    spool.store_blocking(qid, Envelope("a@example.test", ["bob@dest.example", "carol@dest.example"]), b"x\r\n")
    (spool.state_dir / qid).write_bytes(OLD_JOURNAL[: OLD_JOURNAL.index(b'{"k":"warned"')])
    entry = spool.load(qid)
    assert entry.pending_rcpts() == ["carol@dest.example"] and entry.state.attempts == 1
    assert entry.state.last["carol@dest.example"].reply == "451 4.3.0 later"
    spool.append_state(qid, [journal.Hold(5.0, True, "test")])
    assert spool.read_state(qid).hold
    spool.close()


@pytest.mark.parametrize("line", [
    b'{"k":"bogus","t":1}',
    b'{"t":1}',
    b'[1,2]',
    b'{"k":"result","t":1,"rcpt":"a@b","status":"lost","reply":"250"}',
    b'{"k":"result","t":1,"status":"sent","reply":"250"}',
    b'{"k":"result","t":"yesterday","rcpt":"a@b","status":"sent","reply":"250"}',
    b'{"k":"result","t":1,"rcpt":"a@b","status":"sent","reply":250}',
    b'{"k":"attempt","t":1,"n":-1,"next":0}',
    b'{"k":"attempt","t":1,"n":true,"next":0}',
    b'{"k":"attempt","t":1,"n":1}',
    b'{"k":"hold","t":1,"on":"yes"}',
    b'{"k":"schedule","t":1,"next":null}',
    b'{"k":"warned"}',
    b'{"k":"result","rcpt":"bob@ex',
])
def test_the_decoder_is_strict(line):
    with pytest.raises(journal.JournalError):
        journal.decode(line)


def test_refused_lines_are_skipped_and_counted():
    raw = OLD_JOURNAL + b'{"k":"bogus","t":1}\n' + b'{"k":"result","rcpt":"bob@ex'
    state = journal.QueueState.from_bytes(raw)
    assert state.refused == 2 and len(state.history) == 6


def test_to_dict_refuses_what_is_not_a_record():
    with pytest.raises(TypeError):
        journal.encode([{"k": "hold", "on": True}])  # type: ignore[list-item]
