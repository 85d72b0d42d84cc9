"""A real PostgreSQL for the tests: Debian's `postgresql` package, a cluster made by
initdb in a temporary directory, run by the unprivileged `postgres` user the package
creates when the tests run as root (initdb refuses root; otherwise by the tests' user), listening on 127.0.0.81 (a free port) with its unix
socket in the temporary directory, trust authentication, fsync off (tests only).

`pg_server` (session): one server for the whole run; `pg_url` (per test): a fresh
database on it, as a postgresql:// URL. `PgServer` can also be started by a test on its
own (`private_pg`) when the test stops and restarts it (an outage).
Tests that need PostgreSQL skip, saying why, where the package or psycopg is missing
(.ci/run installs the package).
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.support.kanmon_node import free_port

PG_HOST = "127.0.0.81"
PG_USER = "kanmon"
_databases = itertools.count(1)


def _bindir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(found[-1]).parent if found else None


def skip_reason() -> str | None:
    """Why PostgreSQL tests cannot run here, or None."""
    if _bindir() is None:
        return "PostgreSQL is not installed (apt-get install postgresql)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "the postgres user does not exist (the postgresql package creates it)"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install 'psycopg[binary]')"
    return None


class PgServer:
    """One PostgreSQL cluster in a temporary directory, started and stopped on demand."""

    def __init__(self) -> None:
        reason = skip_reason()
        if reason:
            pytest.skip(reason)
        self.bindir = _bindir()
        self.dir = Path(tempfile.mkdtemp(prefix="kanmon-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "log"
        self.port = free_port(PG_HOST)
        self.host = PG_HOST
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres")
        self._as_postgres([str(self.bindir / "initdb"), "-D", str(self.data), "-U", PG_USER, "--auth=trust",
                           "-E", "UTF8", "--no-sync", "--locale=C"])
        with open(self.data / "postgresql.conf", "a") as f:
            f.write(f"listen_addresses = '{PG_HOST}'\nport = {self.port}\n"
                    f"unix_socket_directories = '{self.dir}'\nfsync = off\nmax_connections = 200\n")

    def _as_postgres(self, argv: list[str]) -> None:
        # initdb refuses root: as root, the package's postgres user runs it; otherwise we do.
        argv = ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv
        proc = subprocess.run(argv, cwd=self.dir,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)
        if proc.returncode != 0:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{argv[0]} failed ({proc.returncode}): {proc.stdout.decode(errors='replace')}{log}")

    def start(self) -> None:
        self._as_postgres([str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "start"])

    def stop(self) -> None:
        """An abrupt stop (as a crash or a lost database host): sessions are cut."""
        self._as_postgres([str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop"])

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{PG_USER}@{self.host}:{self.port}/{dbname}"

    def create_database(self) -> str:
        """A fresh, empty database; its URL."""
        import psycopg

        name = f"t{os.getpid()}_{next(_databases)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def destroy(self) -> None:
        try:
            self.stop()
        except RuntimeError:
            pass  # already stopped
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_server():
    """The tests' shared PostgreSQL (started once)."""
    server = PgServer()
    try:
        server.start()
        yield server
    finally:
        server.destroy()


@pytest.fixture
def pg_url(pg_server) -> str:
    """A fresh database on the shared server, as a postgresql:// URL."""
    return pg_server.create_database()


@pytest.fixture
def private_pg():
    """A PostgreSQL of the test's own (started), which the test may stop and restart."""
    server = PgServer()
    try:
        server.start()
        yield server
    finally:
        server.destroy()
