"""``escalate gate RUN``: the CI budget gate (exit 0 within budget, 3 when not)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TextIO

import typer

from escalate.cli import (
    JsonOption,
    RunsDirOption,
    bad_input,
    echo_line,
    open_ledger,
    open_options,
    opened,
    respond,
)
from escalate.errors import EscalateError, Refused

if TYPE_CHECKING:
    from escalate.reports.gate import GateResult


def gate(
    run: Annotated[str | None, typer.Argument(help="Run id (or give --pool).", show_default=False,
                                              metavar="RUN")] = None,
    pool: Annotated[str | None, typer.Option(
        "--pool", metavar="POOL", help="Gate a pool instead: its money in the period now, and each "
        "member run's own gate.", show_default=False)] = None,
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
    """Fail (exit 3) when RUN (or --pool POOL) is over budget, has a halt or an open escalation; for CI.

    Reservations still held are a warning (or, with --fail-on-held, a failure).

    On GitHub Actions (GITHUB_ACTIONS=true) it prints ::error:: and ::warning::
    annotations; when GITHUB_STEP_SUMMARY is set it appends a Markdown summary there.
    """
    if (run is None) == (pool is None):
        bad_input("give a run id or --pool POOL (one of them)", json_out, code="usage")
    name = f"run {run}" if pool is None else f"pool {pool}"
    allow = {"allow_halts": allow_halts, "allow_open_escalations": allow_open_escalations,
             "fail_on_held": fail_on_held}
    respond(json_out, lambda: _verdict(run, pool, name, runs_dir, max_spent, json_out, **allow), _human)


def _verdict(run: str | None, pool: str | None, name: str, runs_dir: Path | None,
             max_spent: str | None, json_out: bool, **allow: bool) -> dict[str, Any]:
    """The gate's result, or :class:`Refused` when it fails; on GitHub Actions, annotations
    and the step summary as well."""
    from escalate.reports.gate import github_annotation

    github = os.environ.get("GITHUB_ACTIONS") == "true"
    # Annotations go where the runner reads them without spoiling --json's one object.
    annotations = sys.stderr if json_out else sys.stdout
    try:
        checked = _check(run, pool, runs_dir, max_spent, **allow)
    except EscalateError as error:
        if github:
            print(github_annotation("error", f"budget gate could not check {name}: "
                                    f"{error.message}"), file=annotations)
        raise
    _show_on_github(checked, annotations if github else None)
    result = checked.to_json()
    if not checked.passed:
        see = " and ".join(f"'{command}'" for command in checked.see())
        see += " for the tasks" if pool is None else ""
        raise Refused(f"gate failed for {checked.name}: {checked.verdict.reason()}; see {see}",
                      code="gate_failed",
                      **{key: value for key, value in result.items() if key != "run"})
    return result


def _human(result: dict[str, Any]) -> None:
    from escalate.core.money import format_usd as usd
    from escalate.reports.gate import gate_subject

    name = gate_subject("pool", result["pool"], result) if "pool" in result else f"run {result['run']}"
    echo_line(f"gate passed for {name}: committed {usd(result['committed_micros'])} "
              f"(spent {usd(result['spent_micros'])}) of {usd(result['max_spent_micros'])}")
    for warning in result["warnings"]:
        print(f"escalate: warning: {warning['message']}", file=sys.stderr)


def _check(run: str | None, pool: str | None, runs_dir: Path | None, max_spent: str | None,
           **options: bool) -> GateResult:
    """The gate's verdict over the run, or over the pool (library calls of escalate.reports.gate)."""
    from escalate.core.money import Micros, parse_micros
    from escalate.reports.gate import check_gate, check_pool_gate

    limit = None if max_spent is None else Micros(parse_micros(max_spent, what="--max-spent"))
    if pool is not None:
        from escalate.pools.pool import Pool

        chosen = opened(Pool.open(open_options(runs_dir, None)["location"], pool))
        return check_pool_gate(chosen, max_spent=limit, **options)
    return check_gate(open_ledger(run or "", runs_dir, None, progress=True), max_spent=limit, **options)


def _show_on_github(checked: GateResult, annotations: TextIO | None) -> None:
    """The annotations (to ``annotations``, on GitHub Actions) and the step summary (when the
    runner names a file for it)."""
    for annotation in checked.annotations if annotations is not None else ():
        print(annotation.command, file=annotations)
    summary_path = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary_path:
        # The summary is a courtesy of the runner's page: failing to write it changes no verdict.
        try:
            with open(summary_path, "a", encoding="utf-8") as summary:
                summary.write(checked.summary_markdown + "\n")
        except OSError as exc:
            print(f"escalate: warning: could not append the step summary to GITHUB_STEP_SUMMARY "
                  f"({summary_path}: {exc.strerror or exc}); the verdict stands", file=sys.stderr)


def register(app: typer.Typer) -> None:
    """Add the ``gate`` command to ``app``."""
    app.command()(gate)
