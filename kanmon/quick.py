"""The `kanmon` command's entry point, with a quick path for `kanmon queue summary`.

Role: a monitoring script runs `kanmon queue summary` every minute; the whole command line
(click, pydantic and the config's validation, every command group) costs a second or two
of start-up, while a running server answers the summary from its queue index in a
fraction of that. So when argv is exactly `[-c FILE] queue summary [-c FILE] [--by
domain|sender] [--json]`, this reads [server] data_dir from the config file (TOML, as
kanmon.commands.options would find it), asks the server on the control socket and prints
what the command prints. Anything else (other options, --help, no server answering, a
file that does not parse, an error reply) goes the whole way (kanmon.cli), which says
what is wrong as it always has.

Trusts: nothing from argv it does not recognise (it leaves it to kanmon.cli). Never:
touch the spool (only a server's answer is printed), or print anything before it knows
it can answer.
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

from kanmon.escape import json_for_terminal


def main() -> None:
    if not _summary(sys.argv[1:]):
        from kanmon.cli import main as cli_main  # noqa: PLC0415 - the whole command line

        cli_main()


def _summary(argv: list[str]) -> bool:
    """Answered `queue summary` from a running server (True), or left it to the CLI."""
    if "queue" not in argv:
        return False
    at = argv.index("queue")
    before, after = argv[:at], argv[at + 2 :]
    if argv[at + 1 : at + 2] != ["summary"] or before not in ([], ["-c", *before[1:2]], ["--config", *before[1:2]]):
        return False
    config = before[1] if len(before) == 2 else None
    by, as_json = "domain", False
    args = iter(after)
    try:
        for a in args:
            if a in ("-c", "--config"):
                config = next(args)
            elif a == "--by":
                by = next(args)
            elif a == "--json":
                as_json = True
            else:
                return False  # filters, --help, the = forms: the whole way
    except StopIteration:
        return False
    if by not in ("domain", "sender") or (before and len(before) != 2):
        return False
    from kanmon.configpath import DEFAULT_DATA_DIR, find_config  # noqa: PLC0415
    from kanmon.control import ControlClient  # noqa: PLC0415

    path, why = find_config(config)
    if path is None:
        return False  # the embedded default: the CLI says so and goes on
    try:
        with open(path, "rb") as f:
            data_dir = tomllib.load(f).get("server", {}).get("data_dir", DEFAULT_DATA_DIR)
        if not isinstance(data_dir, str):
            return False
        with ControlClient(Path(data_dir), timeout=3600) as client:
            reply = client.request("summary", {"filters": {}, "by": by})
    except Exception:  # noqa: BLE001 - no server, no file, not TOML...: the CLI says it better
        return False
    if not isinstance(reply, dict) or not reply.get("ok") or not isinstance(reply.get("result"), dict):
        return False
    if why is not None:
        print(f"kanmon: using {path} ({why})", file=sys.stderr)
    s = reply["result"]
    if as_json:
        print(json_for_terminal(s, indent=1))
    else:
        from kanmon.qshape import summary_lines  # noqa: PLC0415

        print("\n".join(summary_lines(s)))
    return True
