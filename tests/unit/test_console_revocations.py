"""The console's logged-out sessions on disk (kanmon.console.security.Revocations): kept
across a new instance (a restart), pruned when they would have expired anyway, private,
and a damaged file refuses every older session instead of forgetting the logouts."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from kanmon.console.security import REVOKED_FILE, Revocations, decode_revoked


class Clock:
    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_a_logout_is_refused_by_a_new_instance_and_the_file_is_private(tmp_path: Path) -> None:
    clock = Clock(1000.0)
    Revocations(tmp_path, clock=clock).revoke("sid-a", until=5000.0)
    again = Revocations(tmp_path, clock=clock)  # the node restarted
    assert again.is_revoked("sid-a", login=900.0)
    assert not again.is_revoked("sid-b", login=900.0)
    assert stat.S_IMODE((tmp_path / "console" / REVOKED_FILE).stat().st_mode) == 0o600


def test_an_instance_sees_a_logout_another_one_wrote(tmp_path: Path) -> None:
    clock = Clock(1000.0)
    first, second = Revocations(tmp_path, clock=clock), Revocations(tmp_path, clock=clock)
    second.revoke("sid-a", until=5000.0)
    assert first.is_revoked("sid-a", login=900.0)


def test_entries_past_their_session_lifetime_are_dropped_at_the_next_logout(tmp_path: Path) -> None:
    clock = Clock(1000.0)
    r = Revocations(tmp_path, clock=clock)
    r.revoke("old", until=1500.0)
    clock.now = 2000.0
    r.revoke("new", until=9000.0)
    _, kept = decode_revoked((tmp_path / "console" / REVOKED_FILE).read_bytes())
    assert kept == {"new": 9000.0}


@pytest.mark.parametrize("damage", [b"{", b"[]", b'{"format": "x", "not_before": 0, "revoked": {}}',
                                    b'{"format": "kanmon-console-revoked 1", "not_before": 0, "revoked": {"a": "x"}}'])
def test_a_damaged_file_is_moved_aside_and_older_sessions_are_refused(tmp_path: Path, damage: bytes) -> None:
    (tmp_path / "console").mkdir()
    (tmp_path / "console" / REVOKED_FILE).write_bytes(damage)
    warnings: list[str] = []
    r = Revocations(tmp_path, warn=warnings.append, clock=Clock(1000.0))
    assert r.is_revoked("any", login=999.0)  # what the file held is unknown: log in again
    assert not r.is_revoked("any", login=1001.0)
    assert len(warnings) == 1 and "damaged" in warnings[0]
    assert list((tmp_path / "console").glob(REVOKED_FILE + ".bad-*"))
    assert Revocations(tmp_path, clock=Clock(1000.0)).is_revoked("any", login=999.0)  # and so after a restart


def test_concurrent_logouts_are_all_kept(tmp_path):
    """Logouts run in threads (and other console processes write the same file): each
    one's read-modify-write of the file must keep the others'."""
    import threading

    from kanmon.console.security import Revocations

    stores = [Revocations(tmp_path) for _ in range(4)]  # as separate consoles of one node
    sids = [f"s{i}" for i in range(64)]

    def logout(i: int) -> None:
        stores[i % 4].revoke(sids[i], 4_000_000_000.0)

    threads = [threading.Thread(target=logout, args=(i,)) for i in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    fresh = Revocations(tmp_path)
    assert all(fresh.is_revoked(sid, 3_000_000_000.0) for sid in sids)
