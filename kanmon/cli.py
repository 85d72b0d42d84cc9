"""The `kanmon` command: assembles the command groups, nothing else.

Role: one `main` group with every command group added. Each group lives in its own
module (a leaf: it imports kanmon.cli_options and the operations it calls, never another
group or this module); adding a group is one import and one add_command here.

Trusts: nothing (argv is parsed by the groups). Never: define a command itself, open
spool files, or import the servers before a command that needs them runs.
"""

from __future__ import annotations

import click

from kanmon import __version__
from kanmon.admin.cli import maintenance, queue
from kanmon.alerts_cli import alert
from kanmon.balancer.cli import balance
from kanmon.config_cli import config
from kanmon.dnscheck.cli import dns
from kanmon.node_cli import reload, serve
from kanmon.records.cli import log, stats, trace
from kanmon.store.cli import user


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="kanmon")
def main() -> None:
    """kanmon: an on-premises mail gateway (relay, mail store, balancer)."""


for _command in (user, serve, reload, config, dns, log, queue, maintenance, balance, trace, stats, alert):
    main.add_command(_command)
