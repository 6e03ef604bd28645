"""``escalate schema``: the JSON Schema of one event line."""

from __future__ import annotations

from typing import Any

import typer

from escalate.cli import JsonOption, respond


def schema(json_out: JsonOption = False) -> None:
    """Print the JSON Schema of the event format (one line of events.ndjson).

    The output is JSON either way; --json is accepted like everywhere.
    """

    def action() -> dict[str, Any]:
        from escalate.core.schema import json_schema

        return json_schema()

    def human(result: dict[str, Any]) -> None:
        import orjson

        from escalate.cli import echo_line

        echo_line(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())

    respond(json_out, action, human)


def register(app: typer.Typer) -> None:
    """Add the ``schema`` command to ``app``."""
    app.command()(schema)
