"""kanmon.tlsaccept's pure parts: an Admission is given back once; a crowd's end trims the heap once."""

from __future__ import annotations

from kanmon import tlsaccept
from kanmon.tlsaccept import CROWD, Admission, Crowd


def test_an_admission_is_released_exactly_once():
    released: list[str] = []
    a = Admission("192.0.2.1", released.append)
    a.release()
    a.release()
    assert released == ["192.0.2.1"]


def test_the_heap_is_trimmed_once_when_a_crowd_has_mostly_left(monkeypatch):
    trims: list[int] = []
    monkeypatch.setattr(tlsaccept, "_malloc_trim", lambda: trims.append(1))
    c = Crowd()
    for _ in range(CROWD - 1):  # below a crowd: never
        c.opened()
    for _ in range(CROWD - 1):
        c.closed()
    assert trims == []
    for _ in range(4 * CROWD):
        c.opened()
    for _ in range(3 * CROWD - 1):
        c.closed()
    assert trims == []  # still more than a quarter open
    c.closed()
    assert trims == [1]
    for _ in range(CROWD // 2):  # the rest leaving is no new crowd
        c.closed()
    assert trims == [1] and c.open == CROWD // 2

