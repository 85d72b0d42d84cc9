"""The text of `kanmon queue summary` (Postfix's qshape): a summary's rows as lines.

Role: the one formatter of the table, for the command (kanmon.commands.queue) and its quick
path (kanmon.quick). Trusts: a summary as kanmon.admin.queue_ops.QueueOps.summary returns
it. Its keys are domains from the network (an SMTPUTF8 domain may hold C1 controls or bidi
overrides): each is escaped for the terminal (kanmon.escape). Never: import more than that.
"""

from __future__ import annotations

from kanmon.escape import for_terminal


def summary_lines(s: dict) -> list[str]:
    """Header, TOTAL, then one line per row: counts by minutes since arrival."""
    heads = ["T"] + [b.replace("m", "") for b in s["buckets"]]
    keys = [for_terminal(r["key"]) for r in s["rows"]]
    width = max([len(k) for k in keys] + [5]) + 1
    col = max(7, len(str(s["total"]["count"])) + 1)  # a million and more still has a space before it
    lines = [" " * width + "".join(f"{h:>{col}}" for h in heads)]
    for key, row in [("TOTAL", s["total"])] + list(zip(keys, s["rows"], strict=True)):
        lines.append(f"{key:>{width}}" + "".join(f"{n:>{col}}" for n in [row["count"], *row["counts"]]))
    return lines
