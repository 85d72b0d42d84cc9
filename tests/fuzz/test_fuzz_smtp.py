"""Run the atheris fuzz target for the SMTP parsers briefly (CI), or longer with KANMON_LONG=1.

The target and the command for a long run by hand are in tests/fuzz/fuzz_smtp.py. It runs
in a subprocess: libFuzzer owns the process and exits on the first crash, leaving the
input that caused it in crash-<sha1> (here: in the test's tmp_path).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("atheris", reason="atheris is in the test extra: pip install -e '.[test]'")

HERE = Path(__file__).parent


def run_fuzzer(tmp_path: Path, *args: str) -> None:
    corpus = tmp_path / "corpus"  # new inputs go here; the committed seeds are only read
    corpus.mkdir()
    r = subprocess.run(
        [sys.executable, str(HERE / "fuzz_smtp.py"), "-max_len=2048", "-len_control=0", f"-dict={HERE / 'smtp.dict'}",
         f"-artifact_prefix={tmp_path}/", *args, str(corpus), str(HERE / "seeds")],
        capture_output=True, text=True, timeout=3600,
    )
    crashes = list(tmp_path.glob("crash-*"))
    assert r.returncode == 0 and not crashes, r.stderr[-4000:]
    assert "Done " in r.stderr


def test_fuzz_smtp_parsers_briefly(tmp_path):
    run_fuzzer(tmp_path, "-runs=10000", "-seed=1")  # ~10 s: instrumenting only kanmon made the start ~4 s


@pytest.mark.long
def test_fuzz_smtp_parsers_for_ten_minutes(tmp_path):
    run_fuzzer(tmp_path, "-max_total_time=600")
