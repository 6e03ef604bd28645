"""``escalate pools …``: create, list, show and re-configure pools (docs/pools.md)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Annotated, Any

import typer

from escalate.cli import (
    ByOption,
    JsonOption,
    LockTimeoutOption,
    RunsDirOption,
    bad_input,
    echo_line,
    open_options,
    opened,
    respond,
)
from escalate.cli.escalation_cmds import ApproverKeyOption, ChangeSignOption
from escalate.cli.runs_cmds import (
    _POLICY_FIELDS,
    ApproversMatchOption,
    ApproversOption,
    EscalationTimeoutOption,
    ModeOption,
    NewApproversMatchOption,
    QuorumAboveOption,
    QuorumOption,
    ShowFormat,
    ThresholdOption,
    _escalation_timeout,
    init_settings,
)
from escalate.core.money import format_usd as usd

if TYPE_CHECKING:
    from escalate.pools.pool import Pool, PoolReport, PoolRow, PoolVerifyReport

pools_app = typer.Typer(help="Create, list, show and re-configure pools: one budget shared by many runs.",
                        no_args_is_help=True)

PoolArg = Annotated[str, typer.Argument(help="Pool id.", show_default=False, metavar="POOL")]


def _pool(pool: str, runs_dir: Any, lock_timeout: str | None = None, by: str | None = None) -> Pool:
    from escalate.pools.pool import Pool

    options = open_options(runs_dir, lock_timeout, by)
    return opened(Pool.open(options.pop("location"), pool, **options))


@pools_app.command("init")
def init(
    pool: PoolArg,
    cap: Annotated[str, typer.Option("--cap", metavar="USD", help="The pool's budget in USD, per period.",
                                     show_default=False)],
    period: Annotated[str, typer.Option(
        "--period", metavar="PERIOD", help="none, or day, week (ISO, Monday first) or month: the cap "
        "applies to each calendar period anew.")] = "none",
    tz: Annotated[str, typer.Option("--tz", metavar="ZONE", help="IANA time zone the periods follow, "
                                    "e.g. Europe/Berlin.")] = "UTC",
    escalation: ModeOption = None,
    approval_threshold: ThresholdOption = None,
    escalation_timeout: EscalationTimeoutOption = None,
    max_extension: Annotated[str | None, typer.Option(
        "--max-extension", metavar="USD", help="Most USD that approvals of pool_cap escalations may add "
        "per period [default: 0].")] = None,
    approvers: ApproversOption = None,
    approvers_match: ApproversMatchOption = None, approver_key: ApproverKeyOption = None,
    quorum: QuorumOption = None, quorum_above: QuorumAboveOption = None,
    runs_dir: RunsDirOption = None,
    lock_timeout: LockTimeoutOption = None,
    by: ByOption = None,
    json_out: JsonOption = False,
) -> None:
    """Create POOL, a cap over the runs that join it (the same settings again is a no-op)."""

    def action() -> dict[str, Any]:
        from escalate.pools.pool import Pool

        options = open_options(runs_dir, lock_timeout, by)
        settings = init_settings(escalation=escalation, approval_threshold=approval_threshold,
                                 escalation_timeout=escalation_timeout, max_extension=max_extension,
                                 approvers=approvers, approvers_match=approvers_match,
                                 approver_keys=approver_key, quorum=(quorum, quorum_above))
        created = opened(Pool.init(options.pop("location"), pool, cap=cap, period=period, tz=tz,
                                   **settings, **options))
        return {**created.show(), "status": "created" if created.created else "exists"}

    def human(result: dict[str, Any]) -> None:
        if result["status"] == "exists":
            echo_line(f"pool {result['pool']} already exists with these settings; nothing changed")
            return
        per = "" if result["period_kind"] == "none" else f" per {result['period_kind']} ({result['tz']})"
        echo_line(f"pool {result['pool']}: cap {usd(result['pool_cap_micros'])}{per}, escalation "
                  f"{result['escalation']['mode']}; add runs with 'escalate runs init RUN --pool "
                  f"{result['pool']}'")

    respond(json_out, action, human)


@pools_app.command("list")
def list_pools(runs_dir: RunsDirOption = None, json_out: JsonOption = False) -> None:
    """List every pool with its cap, period and number of runs."""

    def action() -> dict[str, list[PoolRow]]:
        import escalate.pools.pool  # (this command is list_pools too)

        return {"pools": escalate.pools.pool.list_pools(open_options(runs_dir, None)["location"])}

    def human(result: dict[str, list[PoolRow]]) -> None:
        rows = result["pools"]
        if not rows:
            echo_line("no pools; create one with 'escalate pools init POOL --cap USD'")
        for row in rows:
            per = "" if row["period"] == "none" else f" per {row['period']} ({row['tz']})"
            echo_line(f"{row['pool']}: cap {usd(row['cap_micros'])}{per}, {row['runs']} run(s)")

    respond(json_out, action, human)


@pools_app.command("show")
def show(
    pool: PoolArg,
    period: Annotated[str | None, typer.Option(
        "--period", metavar="DATE", help="Show an earlier period: one holding DATE (e.g. 2026-11-30), "
        "or the pool's own key (2026-W48 for a week pool, 2026-11 for a month pool).",
        show_default=False)] = None,
    output_format: Annotated[ShowFormat | None, typer.Option(
        "--format", "-f", help="table for people, json for scripts (same as --json), markdown for "
        "reports [default: table].", show_default=False)] = None,
    runs_dir: RunsDirOption = None,
    json_out: JsonOption = False,
) -> None:
    """Show POOL's money in the current period (or --period): cap, spent, reserved, each run."""
    if json_out and output_format not in (None, ShowFormat.json):
        bad_input(f"--json and --format {output_format.value} disagree; give one of them", json_out)
    chosen = ShowFormat.json if json_out else (output_format or ShowFormat.table)

    def action() -> PoolReport:
        report = _pool(pool, runs_dir).show(period)
        # What can be read is shown; the totals leave out a member that cannot be, so say so.
        for member in report["unreadable"]:
            print(f"escalate: warning: the totals leave out run {member['run']}: {member['message']}",
                  file=sys.stderr)
        return report

    def human(report: PoolReport) -> None:
        from escalate.core.text import printable
        from escalate.reports.report import pool_markdown, pool_period_line

        if chosen is ShowFormat.markdown:
            sys.stdout.write(pool_markdown(report))
            return
        echo_line(f"pool {report['pool']}: {pool_period_line(report)}")
        extended = f" (extensions {usd(report['extended_micros'])})" if report["extended_micros"] else ""
        echo_line(f"cap {usd(report['cap_micros'])}{extended}, spent {usd(report['spent_micros'])}, "
                  f"reserved {usd(report['reserved_micros'])}, committed {usd(report['committed_micros'])}, "
                  f"remaining {usd(report['remaining_micros'])}")
        for row in report["runs"]:
            echo_line(f"  {printable(row['run'])}: committed {usd(row['committed_micros'])}")

    respond(chosen is ShowFormat.json, action, human)


@pools_app.command("set")
def set_policy(
    pool: PoolArg,
    cap: Annotated[str | None, typer.Option("--cap", metavar="USD", help="New cap per period "
                                            "[default: unchanged].", show_default=False)] = None,
    escalation: Annotated[str | None, typer.Option(
        "--escalation", metavar="MODE", help="New refusal mode: off, shadow or enforce [default: unchanged].",
        show_default=False)] = None,
    approval_threshold: Annotated[str | None, typer.Option(
        "--approval-threshold", metavar="USD", help="New USD amount above which reservations need a "
        "person in enforce mode [default: unchanged].", show_default=False)] = None,
    no_threshold: Annotated[bool, typer.Option("--no-approval-threshold",
                                               help="Remove the approval threshold.")] = False,
    escalation_timeout: Annotated[str | None, typer.Option(
        "--escalation-timeout", metavar="DURATION", help="New time after which an open pool_cap "
        "escalation is paused [default: unchanged].", show_default=False)] = None,
    max_extension: Annotated[str | None, typer.Option(
        "--max-extension", metavar="USD", help="New most USD approvals may add per period "
        "[default: unchanged].", show_default=False)] = None,
    approvers: Annotated[str | None, typer.Option("--approvers", metavar="NAMES", help="New comma-separated "
        "approvers of pool_cap escalations [default: unchanged].", show_default=False)] = None,
    approver_key: ApproverKeyOption = None, approvers_match: NewApproversMatchOption = None,
    quorum: QuorumOption = None, quorum_above: QuorumAboveOption = None,
    runs_dir: RunsDirOption = None,
    lock_timeout: LockTimeoutOption = None,
    by: ByOption = None, sign: ChangeSignOption = None,
    json_out: JsonOption = False,
) -> None:
    """Change POOL's cap or escalation policy (recorded as a policy_changed event)."""
    given = {"cap": cap, "escalation": escalation, "approval_threshold": approval_threshold,
             "max_extension": max_extension, "approvers": approvers, "approvers_match": approvers_match,
             "approver_keys": approver_key, "quorum": quorum, "quorum_above": quorum_above}
    changes: dict[str, Any] = {key: value for key, value in given.items() if value is not None}
    if approval_threshold is not None and no_threshold:
        bad_input("--approval-threshold and --no-approval-threshold disagree; give one of them",
                  json_out, code="usage")
    if no_threshold:
        changes["approval_threshold"] = None
    if not changes and escalation_timeout is None:
        bad_input(_NOTHING_TO_CHANGE, json_out, code="usage")
    before: dict[str, Any] = {}

    def action() -> Mapping[str, Any]:
        if escalation_timeout is not None:
            changes["escalation_timeout_s"] = _escalation_timeout(escalation_timeout)
        target = _pool(pool, runs_dir, lock_timeout, by)
        before.update(target.state().policy.to_json(), cap_micros=target.facts.cap_micros)
        return target.set_policy(sign=sign, **changes)

    def human(result: dict[str, Any]) -> None:
        after = {**result["escalation"], "cap_micros": result["cap_micros"]}
        fields: dict[str, tuple[str, Callable[[Any], str]]] = {"cap_micros": ("cap", usd), **_POLICY_FIELDS}
        changed = [f"{label} {show(before.get(key))} → {show(after.get(key))}"
                   for key, (label, show) in fields.items() if before.get(key) != after.get(key)]
        if result["status"] == "exists" or not changed:
            echo_line(f"pool {result['pool']}: unchanged (cap {usd(result['cap_micros'])}, escalation "
                      f"{result['escalation']['mode']})")
        else:
            echo_line(f"pool {result['pool']}: {', '.join(changed)}")

    respond(json_out, action, human)


_NOTHING_TO_CHANGE = ("nothing to change; give --cap, --escalation, --approval-threshold, "
                      "--no-approval-threshold, --escalation-timeout, --max-extension, --approvers, "
                      "--approvers-match, --approver-key, --quorum or --quorum-above")


@pools_app.command("verify")
def verify(pool: PoolArg, runs_dir: RunsDirOption = None, json_out: JsonOption = False) -> None:
    """Check every line of POOL's log (the seq run, the prev chain, the pool's rules) and of
    every member run it names; exit 6 naming each problem."""

    def action() -> PoolVerifyReport:
        from escalate.errors import CorruptLedger
        from escalate.pools.pool import verify_pool

        report = verify_pool(open_options(runs_dir, None)["location"], pool)
        found = [(f"pool {pool}", problem) for problem in report["problems"]]
        found += [(f"run {member['run']}", problem) for member in report["members"]
                  for problem in member["problems"]]
        if not json_out:
            for ledger, problem in found:
                print(f"{ledger} line {problem['line']}: {problem['problem']}", file=sys.stderr)
        if found:
            ledger, first = found[0]
            facts: dict[str, Any] = {key: value for key, value in report.items() if key != "pool"}
            raise CorruptLedger(f"pool {pool}: {len(found)} problem(s), first in {ledger} line "
                                f"{first['line']}: {first['problem']}", pool=pool, **facts)
        return report

    def human(result: PoolVerifyReport) -> None:
        echo_line(f"OK pool {result['pool']}: {result['lines']} lines, prev chain intact, pool rules hold; "
                  f"{len(result['members'])} member run(s) verified")

    respond(json_out, action, human)


def register(app: typer.Typer) -> None:
    """Add the ``pools`` group to ``app``."""
    app.add_typer(pools_app, name="pools")
