"""The hot commands shell scripts call: reserve, increase, release."""

import sys
from collections.abc import Mapping
from typing import Annotated, Any

import typer

from escalate.cli import (
    ByOption,
    JsonOption,
    LockTimeoutOption,
    NotifyOption,
    RunsDirOption,
    bad_input,
    echo_line,
    open_ledger,
    respond,
)
from escalate.core.money import format_usd as usd
from escalate.errors import Pending

RunArg = Annotated[str, typer.Argument(help="Run id.", show_default=False, metavar="RUN")]
TaskArg = Annotated[str, typer.Argument(help="Task id (single-use).", show_default=False, metavar="TASK")]
ReasonOption = Annotated[str, typer.Option("--reason", metavar="TEXT",
                                           help="Why it needs this (recorded; shown to an approver).")]
PriorityOption = Annotated[str, typer.Option("--priority", metavar="LEVEL",
                                             help="low, normal, high or urgent: how soon an approver "
                                                  "should look, if it escalates.")]


def _say(result: dict[str, Any]) -> None:
    status = result["status"]
    task = result.get("task", "")
    remaining = usd(result["remaining_micros"]) if "remaining_micros" in result else "?"
    if status == "exists":
        # A repeat of an in-flight reserve or increase finds the money held; of a release, spent.
        if result.get("actual_micros") is None:
            echo_line(f"{task}: already reserved, nothing changed ({usd(result['reserved_micros'])} "
                      f"reserved, remaining {remaining})")
        else:
            echo_line(f"{task}: already released with {usd(result['actual_micros'])} actual, nothing "
                      f"changed (remaining {remaining})")
    elif status == "released":
        withdrawn = result.get("withdrawn_escalation_id")
        echo_line(f"released {task}: {usd(result['actual_micros'])} actual of "
                  f"{usd(result['reserved_micros'])} reserved (remaining {remaining})"
                  + (f"; its escalation {withdrawn} is withdrawn" if withdrawn else ""))
    elif status == "approved":
        echo_line(f"{task}: approved by {result.get('by')}, {usd(result['reserved_micros'])} reserved")
    else:
        shadow = result.get("shadow_escalation_id")
        pool = ""
        if "pool_escalation" in result:  # a member run: which pool binds it too, and how
            from escalate.reports.report import policy_line

            pool = (f"; pool {result['pool']}: {usd(result['pool_remaining_micros'])} left, escalation "
                    f"{policy_line(result['pool_escalation'])}")
        echo_line(f"{status} {task}: {usd(result['reserved_micros'])} (remaining {remaining}{pool})"
                  + (f"; would have escalated (shadow {shadow})" if shadow else ""))


def reserve(
    run: RunArg,
    task: TaskArg,
    estimate: Annotated[str, typer.Option("--estimate", "-e", metavar="USD", show_default=False,
                                          help="USD to reserve, e.g. 2.50.")],
    wait: Annotated[bool, typer.Option("--wait", help="If escalated, block until a person resolves it.")]
    = False,
    timeout: Annotated[str | None, typer.Option(
        "--timeout", metavar="DURATION",
        help="With --wait: give up after this long (e.g. 10m, at most 365d); exit 4.")] = None,
    reason: ReasonOption = "",
    priority: PriorityOption = "normal",
    runs_dir: RunsDirOption = None,
    lock_timeout: LockTimeoutOption = None,
    by: ByOption = None,
    notify_cmd: NotifyOption = None,
    json_out: JsonOption = False,
) -> None:
    """Reserve a slice of the run's budget for TASK before spending it."""
    if timeout is not None and not wait:
        bad_input("--timeout only applies with --wait; add --wait to block until a person decides",
                  json_out, code="usage")

    def action() -> Mapping[str, Any]:
        from escalate.core.durations import MAX_WAIT_S, parse_duration

        wait_s = None if timeout is None else parse_duration(timeout, what="timeout", maximum=MAX_WAIT_S)
        ledger = open_ledger(run, runs_dir, lock_timeout, by, notify_cmd)
        try:
            return ledger.reserve(task, estimate, reason=reason, priority=priority)
        except Pending as pending:
            if not wait:
                raise
            # Blocking in silence looks like a hang: say what it waits for, as without --wait,
            # with the advice after the last dash ("run 'escalate wait' …") made true for --wait.
            escalation_id = pending.escalation_id
            said = pending.message.rpartition(" — ")[0] or pending.message
            print(f"escalate: {said} — waiting for a person (escalate approve {run} {escalation_id})",
                  file=sys.stderr, flush=True)
            return ledger.wait(escalation_id, timeout_s=wait_s)

    respond(json_out, action, _say)


def increase(
    run: RunArg,
    task: TaskArg,
    to: Annotated[str, typer.Option("--to", metavar="USD", help="The new absolute reservation in USD.",
                                    show_default=False)],
    reason: ReasonOption = "",
    priority: PriorityOption = "normal",
    runs_dir: RunsDirOption = None,
    lock_timeout: LockTimeoutOption = None,
    by: ByOption = None,
    notify_cmd: NotifyOption = None,
    json_out: JsonOption = False,
) -> None:
    """Raise TASK's reservation to an absolute amount mid-flight."""
    respond(json_out,
            lambda: open_ledger(run, runs_dir, lock_timeout, by, notify_cmd).increase(
                task, to, reason=reason, priority=priority),
            _say)


def release(
    run: RunArg,
    task: TaskArg,
    actual: Annotated[str, typer.Option("--actual", "-a", metavar="USD", show_default=False,
                                        help="What TASK actually cost in USD.")],
    runs_dir: RunsDirOption = None,
    lock_timeout: LockTimeoutOption = None,
    by: ByOption = None,
    json_out: JsonOption = False,
) -> None:
    """Settle TASK's reservation with its actual cost (may exceed the reservation)."""
    respond(json_out, lambda: open_ledger(run, runs_dir, lock_timeout, by).release(task, actual), _say)


def register(app: typer.Typer, only: str | None = None) -> None:
    """Add the ``reserve``, ``increase`` and ``release`` commands to ``app`` (``only``: that
    one alone, for a process that runs it: each command costs typer a build at start-up)."""
    for command in (reserve, increase, release):
        if only is None or command.__name__ == only:
            app.command()(command)
