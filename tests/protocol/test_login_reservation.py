"""A client that goes away while its password is being verified gives its throttle
reservation back (else a few dropped connections would block an account for good)."""

from __future__ import annotations

from kanmon.store.connection import Verify
from tests.protocol.test_imap_session import ALICE, env  # noqa: F401 - env is a fixture


def test_imap_reservation_is_given_back_when_the_client_goes(env) -> None:
    d = env.session()
    gauges = env.throttle.state.gauges
    events = d.session.receive(f"a LOGIN {ALICE} wrong\r\n".encode())
    while not any(isinstance(e, Verify) for e in events):  # run the reserve file work inline
        work = events[-1]
        events = d.session.file_done(work.call(*work.args))
    assert gauges.count(f"auth account {ALICE}") == 1  # in flight
    d.session.connection_lost()
    assert d.session.owed is not None
    d.session.owed()
    assert gauges.count(f"auth account {ALICE}") == 0
