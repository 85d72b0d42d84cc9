"""Which config file a command uses when -c does not say: $KANMON_CONFIG, else
/etc/kanmon/kanmon.toml when it exists, else the embedded default.

Role: the one place that says so, for the CLI's options (kanmon.commands.options) and the
quick path of `kanmon queue summary` (kanmon.quick), which must not import the CLI.
Trusts: the environment. Never: read the file (loading it is the caller's business).
"""

from __future__ import annotations

import os
from pathlib import Path

CONFIG_ENV = "KANMON_CONFIG"
SYSTEM_CONFIG = Path("/etc/kanmon/kanmon.toml")
DEFAULT_DATA_DIR = "./kanmon-data"  # [server] data_dir when the file does not set it (kanmon.config's default)


def find_config(explicit: str | None, system: Path = SYSTEM_CONFIG) -> tuple[str | None, str | None]:
    """(path or None for the embedded default, why it was chosen or None when -c gave it).

    -c wins; then $KANMON_CONFIG (even if the file is missing: that is an error to report,
    not a reason to look elsewhere), then `system` (SYSTEM_CONFIG) when it exists, then the
    embedded default.
    """
    if explicit is not None:
        return explicit, None
    env = os.environ.get(CONFIG_ENV)
    if env:
        return env, f"from ${CONFIG_ENV}"
    try:
        present = system.is_file()
    except OSError:  # there, but this user may not look (0640 root:kanmon): loading it says so
        present = True
    if present:
        return str(system), "no -c and no $KANMON_CONFIG"
    return None, f"no -c, no ${CONFIG_ENV}, no {system}"
