"""``escalate store init``, ``escalate runs export`` and ``escalate runs import``: preparing
a store, and moving runs between stores (:mod:`escalate.transfer`)."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer

from escalate.cli import JsonOption, RunArg, RunsDirOption, echo_line, fail, open_options, respond
from escalate.errors import EscalateError, InputError, storage_error

store_app = typer.Typer(help="Prepare a store (a runs folder or a PostgreSQL database).",
                        no_args_is_help=True)


@store_app.command("init")
def store_init(runs_dir: RunsDirOption = None, json_out: JsonOption = False) -> None:
    """Create or upgrade the store's tables (PostgreSQL) or its folder; safe to repeat."""
    from escalate.transfer import init_store

    def say(result: Any) -> None:
        done = f"{result['steps_applied']} step(s) applied" if result["steps_applied"] else "up to date"
        echo_line(f"store {result['store']}: {done}")

    respond(json_out, lambda: init_store(open_options(runs_dir, None)["location"]), say)


# The log is NDJSON with or without --json: only an error becomes one JSON object.
ExportJsonOption = Annotated[bool, typer.Option(
    "--json", help="Print an error as one JSON object on stdout (the log is NDJSON either way).")]


def export_run(run: RunArg, runs_dir: RunsDirOption = None, json_out: ExportJsonOption = False) -> None:
    """Print RUN's log as NDJSON, byte for byte a file store's log ('runs verify' passes on it)."""
    from escalate.transfer import export_lines

    out = sys.stdout.buffer
    try:
        for chunk in export_lines(open_options(runs_dir, None)["location"], run):
            out.write(chunk)
        out.flush()
    except EscalateError as error:
        fail(error, json_out)
    except BrokenPipeError:  # `escalate runs export r | head`: the reader had enough
        sys.stderr.close()


def import_run(
    run: RunArg,
    file: Annotated[str, typer.Argument(help="An NDJSON log (from 'runs export', or a run's "
                                        "events.ndjson); - reads stdin (copied to a temporary "
                                        "file in $TMPDIR).", show_default=False, metavar="FILE")],
    runs_dir: RunsDirOption = None,
    json_out: JsonOption = False,
) -> None:
    """Create RUN from a log after checking every line as 'runs verify' does; a damaged log
    or an existing run changes nothing."""
    from escalate.transfer import import_log

    def load() -> Any:
        if file == "-":
            return import_log(open_options(runs_dir, None)["location"], run, sys.stdin.buffer, source="stdin")
        try:
            data = open(file, "rb")  # noqa: SIM115 (closed below, after the import)
        except FileNotFoundError:
            raise InputError(f"no file {file}: give the log to import (or - for stdin)",
                             code="no_such_file", path=file) from None
        except IsADirectoryError:
            raise InputError(f"{file} is a folder: give the run's events.ndjson inside it",
                             code="no_such_file", path=file) from None
        except OSError as exc:
            raise storage_error(exc, file) from exc
        with data:
            return import_log(open_options(runs_dir, None)["location"], run, data, source=file)

    respond(json_out, load, lambda result: echo_line(
        f"imported run {result['run']}: {result['lines']} lines ({result['bytes']} bytes)"))


def add_runs_commands(runs_app: typer.Typer) -> None:
    """``runs export`` and ``runs import`` in the ``runs`` group."""
    runs_app.command("export")(export_run)
    runs_app.command("import")(import_run)


def register(app: typer.Typer) -> None:
    """Add the ``store`` group to ``app``."""
    app.add_typer(store_app, name="store")
