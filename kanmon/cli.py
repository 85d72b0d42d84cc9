"""The `kanmon` command: assembles the command groups, nothing else.

Role: one `main` group with every command group added. Each group lives in its own
module under kanmon/commands/ (a leaf: it imports kanmon.commands.options and the
operations it calls, never another group or this module); adding a group is one import
here and one name in the tuple below.

Trusts: nothing (argv is parsed by the groups). Never: define a command itself, open
spool files, or import the servers before a command that needs them runs.
"""

from __future__ import annotations

import click

from kanmon import __version__
from kanmon.commands.admins import admin
from kanmon.commands.alert import alert
from kanmon.commands.backup import backup, restore
from kanmon.commands.balance import balance
from kanmon.commands.cluster import cluster
from kanmon.commands.config import config
from kanmon.commands.dkim import dkim
from kanmon.commands.dns import dns
from kanmon.commands.options import root_config_option
from kanmon.commands.quarantine import quarantine
from kanmon.commands.queue import maintenance, queue
from kanmon.commands.records import log, records, stats, trace
from kanmon.commands.rules import rules
from kanmon.commands.sendmail import sendmail
from kanmon.commands.serve import reload, serve
from kanmon.commands.service import service
from kanmon.commands.status import status
from kanmon.commands.user import user
from kanmon.commands.verify import verify


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="kanmon")
@root_config_option
def main() -> None:
    """kanmon: an on-premises mail gateway (relay, mail store, balancer)."""


for _command in (user, serve, reload, status, config, dns, dkim, log, queue, maintenance, balance, trace, stats,
                 alert, sendmail, backup, restore, service, verify, rules, quarantine, admin, records, cluster):
    main.add_command(_command)
