"""The command groups of `kanmon`, one module per group, and the options they share.

Each group module is a leaf: it imports kanmon.commands.options and the operations it
calls (queue operations, records queries, users, the DNS check...), never another group
and never kanmon.cli, which only assembles them. A group never opens spool files or the
records database itself: the operations modules do.
"""
