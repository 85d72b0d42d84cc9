"""The suite's own pytest setup (pyproject.toml): a failing property test is reported with
its example and the run goes on. Every warning is an error there, and Hypothesis's report
of a failure imported a module that warns: the run stopped at the first failing property
test with an INTERNALERROR, the example lost and the tests after it never run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_a_failing_property_test_shows_its_example_and_the_run_goes_on(tmp_path: Path) -> None:
    (tmp_path / "test_sample.py").write_text(
        "from hypothesis import given, strategies as st\n\n"
        "@given(st.integers())\n"
        "def test_fails(i):\n"
        "    assert i < 10\n\n"
        "def test_after():\n"
        "    pass\n"
    )
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", str(ROOT / "pyproject.toml"),
         "--rootdir", str(tmp_path), str(tmp_path / "test_sample.py")],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert "INTERNALERROR" not in out.stdout + out.stderr, out.stdout[-3000:]
    assert "1 failed, 1 passed" in out.stdout, out.stdout[-3000:]
    # The shrunk example's failure is shown ("Falsifying example" or "Failing test case",
    # by Hypothesis's version).
    assert "assert 10 < 10" in out.stdout, out.stdout[-3000:]
