"""The text of `kanmon queue summary` (Postfix's qshape): a summary's rows as lines.

Role: the one formatter of the table, for the command (kanmon.commands.queue) and its quick
path (kanmon.quick). Trusts: a summary as kanmon.admin.queue_ops.QueueOps.summary returns
it (keys are domains the node escaped for display where needed). Never: import anything.
"""

from __future__ import annotations


def summary_lines(s: dict) -> list[str]:
    """Header, TOTAL, then one line per row: counts by minutes since arrival."""
    heads = ["T"] + [b.replace("m", "") for b in s["buckets"]]
    width = max([len(r["key"]) for r in s["rows"]] + [5]) + 1
    col = max(7, len(str(s["total"]["count"])) + 1)  # a million and more still has a space before it
    lines = [" " * width + "".join(f"{h:>{col}}" for h in heads)]
    for key, row in [("TOTAL", s["total"])] + [(r["key"], r) for r in s["rows"]]:
        lines.append(f"{key:>{width}}" + "".join(f"{n:>{col}}" for n in [row["count"], *row["counts"]]))
    return lines
