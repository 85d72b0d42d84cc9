"""docs/cli.md, generated from the click commands (`python -m kanmon.clidoc`).

Role: keep the CLI reference equal to the code: a test regenerates it and compares.
Never: import anything that starts services.
"""

from __future__ import annotations

import click

from kanmon.cli import main


def _walk(cmd: click.Command, path: list[str], out: list[str]) -> None:
    ctx = click.Context(cmd, info_name=" ".join(path), terminal_width=100, max_content_width=100)
    if path[1:]:
        out.append(f"## `{' '.join(path)}`")
        out.append("")
        out.append("```")
        out.append(cmd.get_help(ctx).replace("\r", ""))
        out.append("```")
        out.append("")
    if isinstance(cmd, click.Group):
        for name in sorted(cmd.list_commands(ctx)):
            sub = cmd.get_command(ctx, name)
            if sub is not None and not sub.hidden:
                _walk(sub, [*path, name], out)


def reference_markdown() -> str:
    out = [
        "# Command reference",
        "",
        "Generated from the code by `python -m kanmon.clidoc`; a test checks that this file",
        "matches. Every command takes `-c FILE` (the configuration; without it, the embedded",
        "default) after its name.",
        "",
        "```",
        main.get_help(click.Context(main, info_name="kanmon", terminal_width=100, max_content_width=100)),
        "```",
        "",
    ]
    _walk(main, ["kanmon"], out)
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    print(reference_markdown(), end="")
