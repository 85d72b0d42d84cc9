"""The quarantine store's interface, the same for this node's directory and the store
every node shares in PostgreSQL (the tests' own server): put, list, load, delete,
claims (a release is exactly-once across nodes), the size bound, damaged entries."""

from __future__ import annotations

import threading

import pytest

from kanmon.model import ClientInfo, Envelope, new_queue_id
from kanmon.quarantine.store import Meta, Quarantine, QuarantineError, QuarantineStore, decode_entry
from kanmon.spool.store import CorruptEntry
from kanmon.state import pgquarantine
from kanmon.state.pgquarantine import PgQuarantine

T0 = 1_800_000_000.0
CONTENT = b"From: x@remote.example\r\nSubject: invoice\r\n\r\n" + b"body line\r\n" * 2000


def envelope() -> Envelope:
    return Envelope(mail_from="x@remote.example", rcpts=["alice@example.test", "bob@example.test"], received_at=T0,
                    client=ClientInfo(ip="192.0.2.7", port=4000, name="mail.remote.example", helo="remote.example"))


def meta(kind: str = "spam", stored: float = T0) -> Meta:
    return Meta(kind, "content rule invoice-spam", "content", "Spam", 7.5, stored)


@pytest.fixture(params=["local", "postgresql"])
def backend(request, tmp_path):
    """(the store of node mr1, a function opening the store as another node sees it)."""
    opened = []
    if request.param == "postgresql":  # skips where PostgreSQL is missing
        url = request.getfixturevalue("pg_url")

        def open_as(node: str) -> QuarantineStore:
            opened.append(PgQuarantine(url, node))
            return opened[-1]
    else:
        def open_as(node: str) -> QuarantineStore:
            opened.append(Quarantine(tmp_path, fsync=False))
            return opened[-1]
    yield request.param, open_as
    for store in opened:
        store.close()


def test_stores_implement_the_interface(backend):
    _kind, open_as = backend
    assert isinstance(open_as("mr1"), QuarantineStore)


def test_put_list_load_delete(backend):
    _kind, open_as = backend
    store = open_as("mr1")
    a, b = new_queue_id(T0), new_queue_id(T0 + 1)
    store.put(a, envelope(), CONTENT, meta())
    store.put(b, envelope(), b"Subject: two\r\n\r\nx\r\n", meta("admin", T0 + 1))
    assert store.ids() == sorted([a, b])
    assert store.meta(b) == meta("admin", T0 + 1)
    entry, content = store.load(a)
    assert content == CONTENT and entry.size == len(CONTENT) and entry.meta == meta()
    assert (entry.envelope.mail_from, entry.envelope.rcpts, entry.envelope.client.ip) == (
        "x@remote.example", ["alice@example.test", "bob@example.test"], "192.0.2.7")
    store.delete(a)
    assert store.ids() == [b]
    for call in (lambda: store.load(a), lambda: store.meta(a), lambda: store.delete(a), lambda: store.claim(a, "mr1", T0)):
        with pytest.raises(QuarantineError, match="not in the quarantine"):
            call()
    with pytest.raises(QuarantineError, match="not a queue id"):
        store.load("../../etc/passwd")
    assert store.remove_orphans() == 0


def test_a_claim_by_one_node_keeps_the_entry_from_the_others(backend):
    kind, open_as = backend
    mr1 = open_as("mr1")
    qid = new_queue_id(T0)
    mr1.put(qid, envelope(), CONTENT, meta())
    mr1.claim(qid, "mr1", T0)
    mr1.claim(qid, "mr1", T0 + 5)  # the same node again: a release it did not finish, resumed
    if kind == "local":
        return  # one node: nobody else to keep it from
    mr2 = open_as("mr2")
    assert mr2.ids() == [qid]  # still listed everywhere
    for call in (lambda: mr2.claim(qid, "mr2", T0), lambda: mr2.delete(qid, "mr2")):
        with pytest.raises(QuarantineError, match="being released by mr1"):
            call()
    assert mr2.claimed("mr1") == [qid] and mr2.claimed("mr2") == []
    mr1.unclaim(qid, "mr1")  # its release failed: back in the quarantine, anyone's again
    mr2.claim(qid, "mr2", T0)
    mr2.delete(qid, "mr2")
    assert mr1.ids() == []


def test_one_recipients_copy_is_removed_and_the_entry_stays_for_the_others(backend):
    kind, open_as = backend
    mr1 = open_as("mr1")
    qid = new_queue_id(T0)
    env = envelope()
    env.dsn_notify = {"alice@example.test": "NEVER", "bob@example.test": "FAILURE"}
    mr1.put(qid, env, CONTENT, meta())
    mr1.remove_rcpts(qid, ["ALICE@example.test"])  # addresses compare case-insensitively
    entry, content = mr1.load(qid)
    assert entry.envelope.rcpts == ["bob@example.test"] and entry.envelope.dsn_notify == {"bob@example.test": "FAILURE"}
    assert content == CONTENT and entry.meta == meta() and mr1.ids() == [qid]
    if kind == "postgresql":
        mr1.claim(qid, "mr1", T0)
        with pytest.raises(QuarantineError, match="being released by mr1"):
            open_as("mr2").remove_rcpts(qid, ["bob@example.test"], "mr2")
        mr1.unclaim(qid, "mr1")
    mr1.delete(qid)
    with pytest.raises(QuarantineError, match="not in the quarantine"):
        mr1.remove_rcpts(qid, ["bob@example.test"])


def test_two_nodes_releasing_one_entry_at_once_one_wins(backend):
    kind, open_as = backend
    if kind == "local":
        pytest.skip("one node's quarantine is released by its admin operations one at a time")
    qid = new_queue_id(T0)
    open_as("mr1").put(qid, envelope(), CONTENT, meta())
    stores = [open_as(f"mr{n}") for n in (1, 2, 3, 4)]
    start = threading.Barrier(len(stores))
    outcome: dict[str, str] = {}

    def release(store: PgQuarantine) -> None:
        start.wait()
        try:
            store.claim(qid, store.node, T0)
            store.load(qid)
            store.delete(qid, store.node)
            outcome[store.node] = "released"
        except QuarantineError as e:
            outcome[store.node] = str(e)

    threads = [threading.Thread(target=release, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(outcome) == ["mr1", "mr2", "mr3", "mr4"]
    assert list(outcome.values()).count("released") == 1
    assert all("not in the quarantine" in v for v in outcome.values() if v != "released")
    assert stores[0].ids() == []


def test_a_claim_waits_for_a_concurrent_one_and_then_finds_it_taken(pg_url):
    # Node mr1's claim is in flight (its UPDATE done, not committed); mr2's claim waits
    # for it instead of reading the old row, then is told the entry is being released.
    import psycopg

    store = PgQuarantine(pg_url, "mr2")
    qid = new_queue_id(T0)
    try:
        store.put(qid, envelope(), CONTENT, meta())
        with psycopg.connect(pg_url) as other:
            other.execute("UPDATE quarantine SET claimed_by = 'mr1', claimed_at = 0 WHERE id = %s", (qid,))
            result: list[BaseException | None] = []

            def claim() -> None:
                try:
                    store.claim(qid, "mr2", T0)
                    result.append(None)
                except QuarantineError as e:
                    result.append(e)

            t = threading.Thread(target=claim)
            t.start()

            with psycopg.connect(pg_url, autocommit=True) as watcher:
                for _ in range(1000):
                    if watcher.execute("SELECT count(*) FROM pg_locks WHERE NOT granted").fetchone()[0]:
                        break
                    threading.Event().wait(0.01)
                else:
                    pytest.fail("the second claim did not wait for the first")
            assert not result
            other.commit()
            t.join(10)
        assert len(result) == 1 and "being released by mr1" in str(result[0])
    finally:
        store.close()


def test_the_shared_store_keeps_another_nodes_entry_under_the_same_id(pg_url):
    mr1, mr2 = PgQuarantine(pg_url, "mr1"), PgQuarantine(pg_url, "mr2")
    try:
        qid = new_queue_id(T0)
        mr1.put(qid, envelope(), CONTENT, meta())
        with pytest.raises(OSError, match="another node"):  # the client gets 451 and retries
            mr2.put(qid, envelope(), b"Subject: other\r\n\r\n", meta())
        mr1.put(qid, envelope(), b"Subject: again\r\n\r\n", meta())  # the same node: replaced
        assert mr2.load(qid)[1] == b"Subject: again\r\n\r\n"
        assert mr2.locations() == {qid: ("mr1", "")}
    finally:
        mr1.close()
        mr2.close()


def test_the_shared_store_refuses_entries_above_its_bound(pg_url, monkeypatch):
    monkeypatch.setattr(pgquarantine, "MAX_ENTRY_BYTES", len(CONTENT))
    store = PgQuarantine(pg_url, "mr1")
    try:
        with pytest.raises(OSError, match="larger than the shared quarantine keeps"):
            store.put(new_queue_id(T0), envelope(), CONTENT, meta())
        assert store.ids() == []
    finally:
        store.close()


def test_a_damaged_shared_entry_is_reported_never_half_read(pg_url):
    import psycopg

    store = PgQuarantine(pg_url, "mr1")
    try:
        qid = new_queue_id(T0)
        store.put(qid, envelope(), CONTENT, meta())
        with psycopg.connect(pg_url) as conn:
            conn.execute("UPDATE quarantine SET data = overlay(data placing 'X'::bytea from length(data) - 3)")
        with pytest.raises(CorruptEntry, match="checksum mismatch"):
            store.load(qid)
        with psycopg.connect(pg_url) as conn:
            conn.execute("UPDATE quarantine SET meta = '{\"kind\": 3}'")
        with pytest.raises(CorruptEntry, match="kind"):
            store.meta(qid)
    finally:
        store.close()


@pytest.mark.parametrize("flags, content, problem", [
    ({"crlf_checked": True, "no_dot_lines": True}, b"Subject: x\r\n\r\nhi\r\n.\r\nMAIL FROM:<evil@x>\r\n", "nodots is true"),
    ({"crlf_checked": True}, b"Subject: x\r\n\r\nhi\n.\r\nMAIL FROM:<evil@x>\r\n", "crlf is true"),
])
def test_an_entry_whose_flags_its_content_belies_is_refused(flags, content, problem):
    """Entries come from elsewhere too (a node backup's quarantine restored file for file,
    the shared quarantine in PostgreSQL): a release sends the content on the trust of the
    envelope's crlf and nodots, and a lone "." line would end DATA at the next hop."""
    from kanmon.spool.store import encode_queue_file

    meta = Meta("quarantine", "r", "c", "Spam", 1.0, 1.0)
    qid = new_queue_id()
    with pytest.raises(CorruptEntry, match=problem):
        decode_entry(qid, encode_queue_file(Envelope("a@b.example", ["c@d.example"], **flags), content), meta)
    honest = Envelope("a@b.example", ["c@d.example"], crlf_checked=True, no_dot_lines=False)
    entry, got = decode_entry(qid, encode_queue_file(honest, b"Subject: x\r\n\r\n.a dot line\r\n"), meta)
    assert got.endswith(b"\r\n.a dot line\r\n") and entry.envelope.no_dot_lines is False
