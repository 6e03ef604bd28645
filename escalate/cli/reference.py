"""The CLI reference (docs/cli.md), generated from every command's ``--help``.

Run ``python -m escalate.cli.reference > docs/cli.md`` after changing a command; a test
fails when the file is stale or a command is missing from it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import typer
from typer.core import TyperGroup

from escalate.cli import app

WIDTH = 100
HEADER = """# CLI reference

Generated from `escalate --help` by `python -m escalate.cli.reference > docs/cli.md`;
do not edit by hand. Every command also takes `-h`. Exit codes are in
[exit-codes.md](exit-codes.md).
"""


def iter_commands() -> Iterator[tuple[str, typer.Context]]:
    """``(command path, context)`` for the root and every command and group, depth first."""

    def walk(command: Any, context: typer.Context) -> Iterator[tuple[str, typer.Context]]:
        yield context.command_path, context
        if isinstance(command, TyperGroup):
            for name in command.list_commands(context):
                sub = command.get_command(context, name)
                if sub is not None and not sub.hidden:
                    yield from walk(sub, typer.Context(sub, info_name=name, parent=context,
                                                       terminal_width=WIDTH, max_content_width=WIDTH))

    root = typer.main.get_command(app)
    settings = {**root.context_settings, "terminal_width": WIDTH, "max_content_width": WIDTH}
    yield from walk(root, typer.Context(root, info_name="escalate", **settings))


def render() -> str:
    """The whole reference as Markdown."""
    sections = [HEADER]
    for path, context in iter_commands():
        sections.append(f"## {path}\n\n```text\n{context.command.get_help(context).rstrip()}\n```\n")
    return "\n".join(sections)


if __name__ == "__main__":
    import sys

    sys.stdout.write(render())
