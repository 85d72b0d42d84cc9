"""The cyclic garbage collector's settings in a serving process (node, SMTP receiver,
delivery agent).

Role: once a process has started (modules, configuration, listeners, the recovered
queue), what it built lives as long as the process. settle_after_start() collects once,
then gc.freeze()s it: full collections no longer walk tens of thousands of objects that
never become garbage (one took 50-70 ms of the event loop on a 2-core machine). It also
raises the first generation's threshold from CPython's 700 to YOUNG_THRESHOLD container
allocations: each message makes a few hundred short-lived objects (coroutines, futures,
frames of the SMTP client and the queue), most gone before a larger young generation is
ever examined, so the collector examines far fewer objects per message (docs/performance.md,
"The edge policy's cost"). Reference counting still frees everything outside cycles at
once; cyclic garbage waits a little longer.

Called by the process entry points only (kanmon.node.run_node, kanmon.receiver,
kanmon.agent), never by library code: a test process keeps CPython's defaults.
Never: leave what a reload replaced frozen (resettle() unfreezes and collects it).
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 10_000  # container allocations (net) between first-generation collections


def settle_after_start() -> None:
    """Freeze what start-up built and set the serving thresholds."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, older, oldest)


def resettle() -> None:
    """After a reload: what the old configuration held becomes collectable again (a
    cycle of it frozen would never be freed), then the survivors are frozen anew."""
    gc.unfreeze()
    settle_after_start()
