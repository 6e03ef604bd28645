"""``escalate gate RUN``: the CI budget gate (exit 0 within budget, 3 when not)."""

from __future__ import annotations

import os
import sys
from typing import Annotated, Any

import typer

from escalate.cli import JsonOption, RunsDirOption, echo_line, open_ledger, respond
from escalate.errors import EscalateError, Refused

RunArg = Annotated[str, typer.Argument(help="Run id.", show_default=False, metavar="RUN")]


def gate(
    run: RunArg,
    max_spent: Annotated[str | None, typer.Option(
        "--max-spent", metavar="USD", help="Fail when spent or committed is over this USD amount "
        "[default: the run's cap, extensions included].")] = None,
    allow_halts: Annotated[bool, typer.Option("--allow-halts",
                                              help="Do not fail on halted tasks (warn instead).")] = False,
    allow_open_escalations: Annotated[bool, typer.Option(
        "--allow-open-escalations", help="Do not fail on escalations still waiting for a person "
        "(warn instead).")] = False,
    fail_on_held: Annotated[bool, typer.Option(
        "--fail-on-held", help="Fail when tasks still hold reservations (a job that crashed "
        "before its release) [default: warn].")] = False,
    runs_dir: RunsDirOption = None,
    json_out: JsonOption = False,
) -> None:
    """Fail (exit 3) when RUN is over budget, has a halt or an open escalation; for CI.

    Reservations still held are a warning (or, with --fail-on-held, a failure).

    On GitHub Actions (GITHUB_ACTIONS=true) it prints ::error:: and ::warning::
    annotations; when GITHUB_STEP_SUMMARY is set it appends a Markdown summary there.
    """
    github = os.environ.get("GITHUB_ACTIONS") == "true"
    # Annotations go where the runner reads them without spoiling --json's one object.
    annotations = sys.stderr if json_out else sys.stdout

    def action() -> dict[str, Any]:
        from escalate.gate import evaluate
        from escalate.money import parse_micros

        try:
            limit = None if max_spent is None else parse_micros(max_spent, what="--max-spent")
            # A verdict: fold the whole log with every check, never trusting the cache.
            state = open_ledger(run, runs_dir, None, progress=True).verified_state()
            verdict = evaluate(state, max_spent_micros=limit, allow_halts=allow_halts,
                               allow_open_escalations=allow_open_escalations, fail_on_held=fail_on_held)
        except EscalateError as error:
            if github:
                _annotate(annotations, "error", f"budget gate could not check run {run}: {error.message}")
            raise
        if github:
            for finding in verdict.failures:
                _annotate(annotations, "error", f"run {run}: {finding.message}")
            for finding in verdict.warnings:
                _annotate(annotations, "warning", f"run {run}: {finding.message}")
        summary_path = os.environ.get("GITHUB_STEP_SUMMARY")
        if summary_path:
            from escalate.report import run_markdown

            with open(summary_path, "a", encoding="utf-8") as summary:
                summary.write(run_markdown(state, verdict=verdict) + "\n")
        result = {**state.totals(), **verdict.to_json()}
        if not verdict.passed:
            raise Refused(f"gate failed for run {run}: {verdict.reason()}; see "
                          f"'escalate runs show {run}' for the tasks", code="gate_failed",
                          **{key: value for key, value in result.items() if key != "run"})
        return result

    def human(result: dict[str, Any]) -> None:
        from escalate.money import format_usd as usd

        echo_line(f"gate passed for run {result['run']}: committed {usd(result['committed_micros'])} "
                  f"(spent {usd(result['spent_micros'])}) of {usd(result['max_spent_micros'])}")
        for warning in result["warnings"]:
            print(f"escalate: warning: {warning['message']}", file=sys.stderr)

    respond(json_out, action, human)


def _annotate(stream: Any, level: str, message: str) -> None:
    """One GitHub Actions workflow command, with its data escaped as the runner expects."""
    escaped = message.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")
    stream.write(f"::{level} title=escalate gate::{escaped}\n")


def register(app: typer.Typer) -> None:
    """Add the ``gate`` command to ``app``."""
    app.command()(gate)
