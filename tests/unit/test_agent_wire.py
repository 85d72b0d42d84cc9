"""The delivery agents' wire (kanmon.agent): results travel as typed journal records."""

from __future__ import annotations

import pytest

from kanmon.agent import AGENT_EXITED, agent_count, result_from_wire, result_to_wire, route_from_wire, route_to_wire
from kanmon.model import LocalReply, RecipientResult, Reply, Status
from kanmon.routing import Route
from kanmon.spool import journal
from kanmon.spool.journal import JournalError


@pytest.mark.parametrize("result", [
    RecipientResult("a@example.test", Status.SENT, Reply(250, "2.0.0", "Ok: queued as 1"), "[127.0.0.2]:25",
                    "esmtp", "TLSv1.3", True),
    RecipientResult("b@example.test", Status.DEFERRED, LocalReply(451, "4.4.1", "Connection refused by 192.0.2.7"),
                    mailer="esmtp"),
    RecipientResult("c@example.test", Status.BOUNCED, Reply(550, "", "no such user\nsecond line"), "local", "local"),
    RecipientResult("d@example.test", Status.DEFERRED, AGENT_EXITED, mailer="local"),
])
def test_a_result_survives_the_wire(result):
    wire = result_to_wire(result, 1_700_000_000.5)
    back = result_from_wire(wire)
    assert back == result
    assert type(back.reply) is type(result.reply)  # ours stays ours: logged bare, X-Kanmon in a DSN
    # It is a journal record: the journal's own strict decoder reads it.
    rec = journal.from_dict(wire)
    assert rec == journal.Result(1_700_000_000.5, result.rcpt, result.status.value, str(result.reply),
                                 result.relay, result.mailer, result.tls)


@pytest.mark.parametrize("change", [
    {"k": "attempt"}, {"status": "lost"}, {"code": "250"}, {"code": 99}, {"code": 600}, {"enh": None},
    {"text": 5}, {"ours": 1}, {"dsn": "yes"}, {"rcpt": None},
])
def test_a_malformed_result_is_refused(change):
    wire = result_to_wire(RecipientResult("a@example.test", Status.SENT, Reply(250, "2.0.0", "Ok")), 1.0)
    wire.update(change)
    with pytest.raises(JournalError):
        result_from_wire(wire)


def test_a_route_survives_the_wire():
    for route in (Route("local", "local", "example.test"),
                  Route("relay", "relay:corp.test", "corp.test", (("127.0.0.7", 25), ("127.0.0.8", 2525)), "verify"),
                  Route("mx", "mx:remote.test", "remote.test", (), "opportunistic")):
        assert route_from_wire(route_to_wire(route)) == route


def test_agent_count_is_the_setting_and_none_when_unset():
    assert agent_count(0) == 0
    assert agent_count(3) == 3
    assert agent_count(None) == 0  # opt-in: on two cores an agent costs more than it saves
