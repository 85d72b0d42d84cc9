"""`kanmon service install`: the dry run changes nothing; a real run into test
directories writes the config (kept on a second run) and a unit that systemd-analyze
accepts."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from kanmon.cli import main

REQUIRED = ("Type=notify", "ExecReload=/bin/kill -HUP $MAINPID", "ProtectSystem=strict", "NoNewPrivileges=yes",
            "CapabilityBoundingSet=CAP_NET_BIND_SERVICE", "AmbientCapabilities=CAP_NET_BIND_SERVICE",
            "PrivateTmp=yes", "WatchdogSec=", "User=nobody")


def config(tmp_path: Path) -> Path:
    p = tmp_path / "source.toml"
    p.write_text(f'[server]\ndata_dir = "{tmp_path / "var" / "kanmon"}"\n')
    return p


def args(tmp_path: Path, *extra: str) -> list[str]:
    return ["service", "install", "--config", str(config(tmp_path)), "--config-dir", str(tmp_path / "etc"),
            "--unit-dir", str(tmp_path / "units"), "--user", "nobody", "--no-user", *extra]


def test_dry_run_prints_the_steps_and_the_unit_and_changes_nothing(tmp_path: Path) -> None:
    r = CliRunner().invoke(main, args(tmp_path, "--dry-run"))
    assert r.exit_code == 0, r.output
    assert "would: write" in r.output and f"ReadWritePaths={tmp_path / 'var' / 'kanmon'}" in r.output
    for line in REQUIRED:
        assert line in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source.toml"]


def test_install_writes_config_data_dir_and_a_valid_unit(tmp_path: Path) -> None:
    r = CliRunner().invoke(main, args(tmp_path))
    assert r.exit_code == 0, r.output
    conf = tmp_path / "etc" / "kanmon.toml"
    assert conf.read_text() == config(tmp_path).read_text()
    assert conf.stat().st_mode & 0o777 == 0o640
    data = tmp_path / "var" / "kanmon"
    assert data.stat().st_mode & 0o777 == 0o700
    unit = (tmp_path / "units" / "kanmon.service").read_text()
    for line in REQUIRED:
        assert line in unit
    assert f"serve -c {conf}" in unit
    edited = f'# edited by the admin\n[server]\ndata_dir = "{data}"\n'
    conf.write_text(edited)
    r = CliRunner().invoke(main, args(tmp_path))
    assert r.exit_code == 0 and "keep the existing" in r.output
    assert conf.read_text() == edited
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    out = subprocess.run([analyze, "verify", str(tmp_path / "units" / "kanmon.service")],
                         capture_output=True, text=True, timeout=60)
    # the only remark allowed is systemd's about the test's User=nobody
    problems = [ln for ln in (out.stdout + out.stderr).splitlines() if ln.strip() and "Special user nobody" not in ln]
    assert out.returncode == 0 and problems == [], out.stdout + out.stderr


def test_the_config_is_readable_by_the_services_group_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o077)  # a hardened admin shell
    try:
        r = CliRunner().invoke(main, args(tmp_path))
    finally:
        os.umask(old)
    assert r.exit_code == 0, r.output
    assert (tmp_path / "etc").stat().st_mode & 0o777 == 0o750
    assert (tmp_path / "etc" / "kanmon.toml").stat().st_mode & 0o777 == 0o640


def test_a_relative_data_dir_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "rel.toml"
    src.write_text('[server]\ndata_dir = "./data"\n')
    r = CliRunner().invoke(main, ["service", "install", "--config", str(src), "--config-dir", str(tmp_path / "etc"),
                                  "--unit-dir", str(tmp_path / "u"), "--no-user", "--dry-run"])
    assert r.exit_code == 2 and "relative" in r.output


def test_a_program_the_sandbox_hides_is_warned_about(tmp_path: Path) -> None:
    """ProtectHome=yes and PrivateTmp=yes hide /home, /root and /tmp from the service: a
    `pip install --user` or a venv in /tmp would not start under the unit."""
    for program, hidden in (("/home/ann/.local/bin/kanmon", "/home"), ("/tmp/venv/bin/python -m kanmon", "/tmp"),
                            ("/opt/kanmon/bin/kanmon", None)):
        r = CliRunner().invoke(main, args(tmp_path, "--dry-run", "--exec-start", program))
        assert r.exit_code == 0, r.output
        if hidden:
            assert f"is under {hidden}, which the unit's sandbox hides" in r.stderr
        else:  # (the test's directories are under /tmp: they are warned about, not the program)
            assert f"{program.split()[0]} is under" not in r.stderr


def test_a_second_install_with_another_config_follows_the_kept_config(tmp_path: Path) -> None:
    """The config in place is kept, so the unit's ReadWritePaths= and the data directory
    are the kept config's data_dir, not the one of the --config FILE not installed."""
    assert CliRunner().invoke(main, args(tmp_path)).exit_code == 0
    other = tmp_path / "other.toml"
    other.write_text(f'[server]\ndata_dir = "{tmp_path / "elsewhere"}"\n')
    r = CliRunner().invoke(main, ["service", "install", "--config", str(other), "--config-dir", str(tmp_path / "etc"),
                                  "--unit-dir", str(tmp_path / "units"), "--user", "nobody", "--no-user"])
    assert r.exit_code == 0, r.output
    kept = tmp_path / "etc" / "kanmon.toml"
    assert f"keep the existing {kept} (its data_dir {tmp_path / 'var' / 'kanmon'} is used)" in r.stdout
    assert f"{other} is not installed" in r.stderr
    assert kept.read_text() == config(tmp_path).read_text()
    unit = (tmp_path / "units" / "kanmon.service").read_text()
    assert f"ReadWritePaths={tmp_path / 'var' / 'kanmon'}\n" in unit
    assert not (tmp_path / "elsewhere").exists()
    # the same file again (or a copy of the kept one) is no news
    r = CliRunner().invoke(main, args(tmp_path))
    assert r.exit_code == 0 and "not installed" not in r.stderr


def test_a_kept_config_that_is_invalid_stops_the_install(tmp_path: Path) -> None:
    conf = tmp_path / "etc" / "kanmon.toml"
    conf.parent.mkdir()
    conf.write_text("[server]\nno_such_key = 1\n")
    r = CliRunner().invoke(main, args(tmp_path))
    assert r.exit_code == 2 and "no_such_key" in r.stderr and f"the existing {conf} is kept and must be valid" in r.stderr
    assert not (tmp_path / "units").exists() and not (tmp_path / "var").exists()


def test_files_and_directories_the_sandbox_hides_are_warned_about(tmp_path: Path) -> None:
    """[tls] cert and key, records.password_file (and every file serve reads), data_dir and
    --config-dir under /tmp (PrivateTmp=yes) or /home, /root (ProtectHome=yes): the
    service would not find them."""
    from kanmon.commands.service import _sandbox_hidden
    import trustme

    pem = tmp_path / "both.pem"
    trustme.CA().issue_cert("mx1.example.test").private_key_and_cert_chain_pem.write_to_path(str(pem))
    src = tmp_path / "tls.toml"
    src.write_text(f'[server]\ndata_dir = "/var/lib/kanmon-test"\n[tls]\ncert = "{pem}"\nkey = "{pem}"\n'
                   f'[records]\nurl = "postgresql://kanmon@127.0.0.81:5432/kanmon"\n'
                   f'password_file = "{tmp_path / "db.pass"}"\n')
    r = CliRunner().invoke(main, ["service", "install", "--config", str(src), "--config-dir", str(tmp_path / "etc"),
                                  "--unit-dir", str(tmp_path / "u"), "--user", "nobody", "--no-user", "--dry-run"])
    assert r.exit_code == 0, r.output
    for key, path in (("tls.cert", pem), ("tls.key", pem), ("records.password_file", tmp_path / "db.pass"),
                      ("--config-dir", tmp_path / "etc")):
        assert f"warning: {key} {path} is under /tmp, which the unit's sandbox hides" in r.stderr, r.stderr
    assert "server.data_dir" not in r.stderr
    assert _sandbox_hidden(Path("/root/certs-walk/mx1.pem")) == Path("/root")
    assert _sandbox_hidden(Path("/home/ann/db.pass")) == Path("/home")
    assert _sandbox_hidden(Path("/etc/kanmon/db.pass")) is None
