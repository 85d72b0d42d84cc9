"""How every kanmon connection to PostgreSQL is made safe against a slow or lost
database: the libpq parameters added to the URL of `[records] url` (the shared records'
writer, the shared state, the cluster's configuration watch, the admin commands).

- TCP keepalives (libpq `keepalives*`) and `tcp_user_timeout`: a database host that
  vanished (power lost, a network cut: no RST ever comes) is noticed within about a
  minute, on an idle connection (LISTEN) as on a busy one, instead of the kernel's two
  hours;
- `statement_timeout` and `lock_timeout` (server settings sent at connect, `options`):
  a statement stuck behind a lock or a runaway query ends with an error, so the caller's
  failure path (the records journal, a check's failure mode) takes over.

A parameter the URL sets itself wins (`?keepalives_idle=10`, `?options=-c%20statement_timeout%3D2s`):
these are defaults, documented in docs/cluster.md.

The password of `[records] password_file` is read here too (read_password), so a file
the service's user cannot read says so, naming the key, wherever kanmon connects.

Trusts: the validated URL. Never: connect (this module only computes parameters), or
put a password anywhere.
"""

from __future__ import annotations

import os
import pwd
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

CONNECT_TIMEOUT = 5  # seconds: libpq connect_timeout
KEEPALIVES = {"keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 3}
TCP_USER_TIMEOUT_MS = 60_000  # unacknowledged data on a connection for this long: the host is gone

# Per use: (statement_timeout, lock_timeout), milliseconds.
WRITE_TIMEOUTS = (30_000, 10_000)  # the records writer, heartbeats, configuration versions
STATE_TIMEOUTS = (5_000, 2_000)  # a check waits no longer than this on the shared state
READ_TIMEOUTS = (300_000, 10_000)  # admin commands searching the shared records


def libpq_parameters(url: str, application_name: str, timeouts: tuple[int, int]) -> dict[str, object]:
    """Keyword parameters for psycopg.connect(url, **...): the defaults above for what the
    URL does not set itself."""
    given = {k.lower() for k in parse_qs(urlsplit(url).query, keep_blank_values=True)}
    statement, lock = timeouts
    params: dict[str, object] = {"connect_timeout": CONNECT_TIMEOUT, "application_name": application_name,
                                 **KEEPALIVES, "tcp_user_timeout": TCP_USER_TIMEOUT_MS}
    out = {k: v for k, v in params.items() if k not in given}
    if "options" not in given:  # the URL's own options replace these whole (libpq's rule for a parameter)
        out["options"] = f"-c statement_timeout={statement} -c lock_timeout={lock}"
    return out


class PasswordFileError(OSError):
    """[records] password_file cannot be read (as a database that cannot be reached: the
    caller's failure path for an unavailable database applies)."""

    def __str__(self) -> str:
        return self.strerror or ""


def read_password(path: Path) -> str:
    """The password in `path` ([records] password_file); PasswordFileError naming the key,
    the file and the user kanmon runs as when it cannot be read."""
    try:
        return Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        try:
            user = pwd.getpwuid(os.geteuid()).pw_name
        except KeyError:
            user = f"uid {os.geteuid()}"
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise PasswordFileError(getattr(e, "errno", None) or 0,
                                f"[records] password_file {path}: cannot be read by user {user} ({reason}); "
                                "make it readable by kanmon's user (docs/cluster.md)") from None
