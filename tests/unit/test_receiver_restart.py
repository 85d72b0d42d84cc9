"""ReceiverPool's restarts: a receiver that listened and died is started again after
RESTART_DELAY; one that dies before it listens (what killed it at its start may last)
after 1 s doubled each time up to RESTART_DELAY_MAX, never in a tight loop and never
stopping the node. The pool's children here are a small script in place of
`python -m kanmon.receiver`: its first life says "ready" and exits, the later ones exit
at once."""

from __future__ import annotations

import asyncio
import sys

from kanmon import receiver as receiver_module
from kanmon.receiver import RESTART_DELAY_MAX, ReceiverPool

CHILD = """
import os, sys
fd = int(sys.argv[sys.argv.index("--notify-fd") + 1])
marker = {marker!r}
if not os.path.exists(marker):
    open(marker, "w").close()
    os.write(fd, b"ready\\n")
    sys.exit(3)
sys.exit(4)
"""


class RecordingPool(ReceiverPool):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.pauses: list[float] = []
        self.enough = asyncio.Event()

    async def _pause(self, delay: float) -> None:
        self.pauses.append(delay)
        if len(self.pauses) >= 10:
            self.enough.set()
            await self._stopped.wait()
        await asyncio.sleep(0)


def test_a_receiver_that_dies_before_it_listens_is_restarted_with_a_doubling_delay(tmp_path, monkeypatch):
    script = CHILD.format(marker=str(tmp_path / "listened-once"))
    monkeypatch.setattr(receiver_module, "module_command", lambda module: [sys.executable, "-c", script])
    events: list[tuple[str, str]] = []

    async def main() -> None:
        pool = RecordingPool(None, [], [], 1, lambda qid: None,
                             lambda text, kind="info": events.append((text, kind)))
        await pool.start(ready_timeout=30)
        try:
            await asyncio.wait_for(pool.enough.wait(), 60)
        finally:
            await pool.stop()

    asyncio.run(main())
    pool_pauses = [float(text.rsplit(" ", 1)[1].rstrip("s")) for text, _ in events if "restarting in" in text]
    assert pool_pauses[:10] == [1, 1, 2, 4, 8, 16, 32, RESTART_DELAY_MAX, RESTART_DELAY_MAX, RESTART_DELAY_MAX]
    assert "before it listened" not in events[0][0] and "status 3" in events[0][0]
    assert all("before it listened" in text and "status 4" in text for text, _ in events[1:10])
