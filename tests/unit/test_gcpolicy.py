"""The collector's serving settings, applied in a child interpreter (the test process
keeps CPython's defaults)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_start_up_is_frozen_and_a_reload_lets_what_it_replaced_be_collected():
    code = textwrap.dedent("""
        import gc, weakref
        from kanmon import gcpolicy

        class Config:
            pass

        old = Config()
        old.me = old  # a cycle: only the cyclic collector frees it
        ref = weakref.ref(old)
        gcpolicy.settle_after_start()
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold()[0] == gcpolicy.YOUNG_THRESHOLD
        del old  # replaced by a reload
        gc.collect()
        assert ref() is not None  # frozen: out of the collector's sight
        gcpolicy.resettle()
        assert ref() is None  # unfrozen, collected
        assert gc.get_freeze_count() > 0 and gc.get_threshold()[0] == gcpolicy.YOUNG_THRESHOLD
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
