#!/usr/bin/env python3
"""Benchmark: the records writer's CPU per row (history insert, status update, delivery
event, free-text note): kanmon.records.store.Records._write called directly on batches
of 250 items (40 batches each, median), in this process, no thread. Compare trees by
PYTHONPATH, alternating rounds:

    PYTHONPATH=/path/to/tree python bench/records_writer.py [hist status delivery note]
"""

import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from kanmon.records import events as ev
from kanmon.records.store import Records


def run(kind, n_batches=40, per=250):
    d = Path(tempfile.mkdtemp(prefix="kanmon-bench-writer-"))
    r = Records(d, "mx.example.test", log_file=False)
    r.close(); r._open_db()
    times = []
    base = time.time()
    for b in range(n_batches):
        batch = []
        for i in range(per):
            qid = f"Q{b:04d}{i:06d}"
            if kind == "hist":
                batch.append(("hist", base + b * 0.2 + i * 1e-4, "192.0.2.1", "a@sender.example", f"r{i}@example.test", "Subject x", "<m@x>", 5000, "NotSpam", "Accept", qid, "Queued", "", "helo.example", 1))
            elif kind == "event":
                batch.append(("event", base + b * 0.2, qid, ev.Removed(), None, None))
            elif kind == "delivery":
                batch.append(("event", base + b * 0.2, qid, ev.Delivery(rcpt=f"r{i}@example.test", status="sent", mailer="local", reply="delivered to maildir", relay="local", delay=0.5, xdelay=0.1), None, None))
            elif kind == "note":
                batch.append(("event", base + b * 0.2, qid, ev.Note("a note"), None, None))
        if kind == "status":
            hist = [("hist", base + b * 0.2 + i * 1e-4, "192.0.2.1", "a@sender.example", f"r{i}@example.test", "S", "<m>", 5000, "NotSpam", "Accept", f"Q{b:04d}{i:06d}", "Queued", "", "h", 1) for i in range(per)]
            r._write(hist, None)
            batch = [("status", base + b * 0.2 + 1, f"Q{b:04d}{i:06d}", f"r{i}@example.test", "Delivered") for i in range(per)]
        t = time.process_time()
        r._write(batch, None)
        times.append((time.process_time() - t) / per * 1e6)
    r._db.close()
    shutil.rmtree(d, ignore_errors=True)
    return statistics.median(times)


for kind in sys.argv[1:] or ["hist", "status", "delivery", "note"]:
    print(f"{kind:7} {run(kind):6.1f} us/row", flush=True)
