"""Files kanmon's user cannot read, as `sudo -u kanmon kanmon config check` meets them.

[records] password_file (the docs' recipe once made it root's alone): `kanmon config
check` says so on the key; `kanmon serve` starts (its SMTP receiver processes too) and
takes mail, as with a database it cannot reach, and its log names the key and the file.
A [tls] certificate in a directory that user cannot search: a config error naming the
key, in `config check` and `serve`, never a traceback.

"That user" is root without the capabilities that let it read any file (setpriv), the
password file being another user's with mode 0600: the same refusal the service user
meets, without a second interpreter reachable by an unprivileged user.
"""

from __future__ import annotations

import os
import shutil
import smtplib
import subprocess
import sys

import pytest

from tests.integration.test_cluster_records import CONFIG
from tests.support.kanmon_node import KanmonProcess, free_port, maildir_messages, wait_for

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                                reason="needs root and setpriv(1)")

NO_DAC = ["setpriv", "--inh-caps=-dac_override,-dac_read_search", "--bounding-set=-dac_override,-dac_read_search"]


def test_an_unreadable_password_file_is_named_by_config_check_and_serve_degrades(tmp_path, pg_url):
    password = tmp_path / "db.pass"
    password.write_text("secret\n")
    os.chown(password, 65534, 65534)  # nobody's, 0600: not ours to read
    password.chmod(0o600)
    port = free_port()
    text = CONFIG.format(data_dir=tmp_path / "mr1", port=port, url=pg_url, node="mr1")
    text = text.replace("[server]\n", "[server]\nworkers = 1\n", 1)
    text = text.replace('node = "mr1"\n', f'node = "mr1"\npassword_file = "{password}"\n', 1)
    cfg = tmp_path / "mr1.toml"
    cfg.write_text(text)

    check = subprocess.run([*NO_DAC, sys.executable, "-m", "kanmon", "config", "check", "-c", str(cfg)],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 2, check.stdout + check.stderr
    assert "records.password_file" in check.stderr and str(password) in check.stderr, check.stderr
    assert "Traceback" not in check.stderr

    server = KanmonProcess(cfg, "127.0.0.1", port)
    with open(server.stderr_path, "ab") as err:
        server.proc = subprocess.Popen([*NO_DAC, sys.executable, "-m", "kanmon", "serve", "-c", str(cfg), "--quiet"],
                                       stdout=subprocess.DEVNULL, stderr=err)
    try:
        wait_for(lambda: server.proc.poll() is not None or _answers(port), 30, "the server taking connections")
        assert server.proc.poll() is None, server.stderr_tail()
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
            s.sendmail("suzuki@corp.example", ["tanaka@corp.example"], "Subject: t\r\n\r\nbody\r\n")
        wait_for(lambda: maildir_messages(tmp_path / "mr1", "tanaka@corp.example"), 30, "local delivery")
        log = tmp_path / "mr1" / "log" / "kanmon.log"
        wait_for(lambda: log.exists() and f"[records] password_file {password}: cannot be read" in log.read_text(),
                 30, "the log naming the key")
    finally:
        server.terminate()


def _answers(port: int) -> bool:
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=5) as s:
            return s.noop()[0] == 250
    except OSError:
        return False


def test_a_certificate_in_a_directory_the_user_cannot_search_is_a_config_error(tmp_path):
    import trustme

    locked = tmp_path / "certs"
    locked.mkdir()
    pem = locked / "both.pem"
    trustme.CA().issue_cert("mx1.example.test").private_key_and_cert_chain_pem.write_to_path(str(pem))
    os.chown(locked, 65534, 65534)
    locked.chmod(0o700)
    cfg = tmp_path / "k.toml"
    cfg.write_text(f'[server]\nhostname = "mx1.example.test"\ndata_dir = "{tmp_path / "data"}"\n'
                   f'[smtp]\nlisten = ["127.0.0.1:{free_port()}"]\n[tls]\ncert = "{pem}"\nkey = "{pem}"\n')
    for command in (["config", "check"], ["serve", "--quiet"]):
        run = subprocess.run([*NO_DAC, sys.executable, "-m", "kanmon", *command, "-c", str(cfg)],
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == 2, run.stdout + run.stderr
        assert "Traceback" not in run.stderr, run.stderr
        assert "tls.cert (line 7): file " in run.stderr, run.stderr  # (a long path is shortened in the middle)
        assert "cannot be reached by this user: Permission denied" in run.stderr, run.stderr
