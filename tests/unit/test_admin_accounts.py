"""The console's admin accounts: verification of known and unknown names, and a
`kanmon` command that pays for no password hash when it starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from kanmon.admin.accounts import AdminAccounts

ROOT = Path(__file__).resolve().parents[2]


def test_a_known_name_needs_its_password_and_an_unknown_name_is_refused(tmp_path):
    accounts = AdminAccounts(tmp_path)
    accounts.add("audrey", "auditor", "audrey-pw")
    assert accounts.verify("audrey", "audrey-pw").name == "audrey"
    assert accounts.verify("audrey", "wrong") is None
    assert accounts.verify("nobody", "audrey-pw") is None  # checked against the dummy hash
    assert accounts.verify("Not A Name!", "x") is None


def test_starting_a_command_hashes_no_password():
    """The dummy hash an unknown name is checked against was made at import: ~0.3 s of
    CPU and 29 MB for every `kanmon` command and process."""
    probe = ("import argon2\n"
             "def refuse(*a, **k):\n"
             "    raise SystemExit('an argon2 hash at import')\n"
             "argon2.PasswordHasher.hash = refuse\n"
             "import kanmon.cli, kanmon.admin.accounts, kanmon.store.users\n")
    r = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
