"""`kanmon user sieve ADDRESS [FILE|-]`: set, show and switch off a user's Sieve filter."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from kanmon.cli import main
from kanmon.store.sievescripts import ActiveScripts
from tests.integration.test_user_cli import config_file  # noqa: F401 - the fixture

ALICE = "alice@example.test"


def run(config_file: Path, *args: str, input: str | None = None):
    return CliRunner().invoke(main, ["user", "sieve", *args, "-c", str(config_file)], input=input)


def test_set_from_stdin_and_file_show_and_off(config_file: Path, tmp_path: Path) -> None:  # noqa: F811
    data = tmp_path / "data"
    r = run(config_file, ALICE)
    assert r.exit_code == 1 and "no active Sieve script" in r.output
    r = run(config_file, ALICE, "-", input='require "fileinto";\nif header :contains "subject" "x" { fileinto "X"; }\n')
    assert r.exit_code == 0, r.output
    name, script = ActiveScripts(data).lookup(ALICE)
    assert name == "kanmon" and script.extensions == frozenset({"fileinto"})
    path = tmp_path / "vacation.sieve"
    path.write_text('require "vacation";\nvacation "away\x1b[2J";\n')
    r = run(config_file, ALICE, str(path), "--name", "away")
    assert r.exit_code == 0, r.output
    assert ActiveScripts(data).lookup(ALICE)[0] == "away"
    r = run(config_file, ALICE)
    assert r.exit_code == 0 and "# away (active)" in r.output
    assert "\x1b" not in r.output and "\\x1b[2J" in r.output  # escaped for the terminal
    r = run(config_file, ALICE, "--off")
    assert r.exit_code == 0 and ActiveScripts(data).lookup(ALICE) is None


def test_a_broken_script_is_refused_with_line_and_reason(config_file: Path, tmp_path: Path) -> None:  # noqa: F811
    r = run(config_file, ALICE, "-", input='keep;\nfileinto "X";\n')
    assert r.exit_code == 2
    assert 'line 2: fileinto needs require "fileinto"' in r.output and "nothing changed" in r.output
    r = run(config_file, ALICE, "-", input='require "fileinto";\nfileinto :create "Reports";\n')
    assert r.exit_code == 2 and 'line 2: fileinto :create needs require "mailbox"' in r.output, r.output
    assert ActiveScripts(tmp_path / "data").lookup(ALICE) is None
    r = run(config_file, "nobody@example.test", "-", input="keep;")
    assert r.exit_code == 2 and "not a mailbox" in r.output
