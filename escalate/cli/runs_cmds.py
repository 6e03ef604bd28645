"""``escalate runs …``: create, list, show, verify and re-configure runs."""

from __future__ import annotations

import enum
import sys
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Annotated, Any

import typer

from escalate.cli import (
    ByOption,
    JsonOption,
    LockTimeoutOption,
    RunArg,
    RunsDirOption,
    bad_input,
    echo_line,
    open_ledger,
    open_options,
    opened,
    respond,
)
from escalate.cli.archive_cmds import archive
from escalate.cli.escalation_cmds import ApproverKeyOption, ChangeSignOption
from escalate.cli.store_cmds import add_runs_commands
from escalate.cli.watch_cmds import watch
from escalate.core.money import format_usd as usd
from escalate.core.text import printable
from escalate.reports.report import pool_binding

if TYPE_CHECKING:
    from escalate.pools.verify import VerifyReport
    from escalate.reports.runs import BrokenRun, RunRow
    from escalate.service import Ledger
    from escalate.settings import PolicyOptions, RunPolicyOptions

runs_app = typer.Typer(help="Create, list, show, verify and re-configure runs.", no_args_is_help=True)

ModeOption = Annotated[str | None, typer.Option("--escalation", metavar="MODE",
                                                help="What a refusal does: off (halt), shadow "
                                                "(halt, and record would-be escalations) or "
                                                "enforce (ask a person).")]
ThresholdOption = Annotated[str | None, typer.Option(
    "--approval-threshold", metavar="USD",
    help="In enforce mode, reservations above this USD amount need a person.")]
EscalationTimeoutOption = Annotated[str | None, typer.Option(
    "--escalation-timeout", metavar="DURATION",
    help="An open escalation is paused by timeout after this long, e.g. 30m, 1h; 1s to 365d "
    "[default: 1h].")]
MaxExtensionOption = Annotated[str | None, typer.Option(
    "--max-extension", metavar="USD",
    help="Most USD that approvals may add to the cap in total [default: 0].")]
ApproversOption = Annotated[str | None, typer.Option(
    "--approvers", metavar="NAMES",
    help="Comma-separated names that may approve, pause or cancel escalations; never the "
    "requester [default: anyone].")]
ApproversMatchOption = Annotated[str | None, typer.Option(
    "--approvers-match", metavar="claimed|vouched",
    help="What approvers are matched, and the requester told apart, on: the names given "
    "(claimed), or who the store vouches for, the OS user or the database role (vouched) "
    "[default: claimed].", show_default=False)]
QuorumOption = Annotated[int | None, typer.Option(
    "--quorum", metavar="N", help="Distinct approvers an approval needs (above --quorum-above); the "
    "escalation stays open until the N-th [default: 1; on set: unchanged].", show_default=False)]
QuorumAboveOption = Annotated[str | None, typer.Option(
    "--quorum-above", metavar="USD", help="The quorum applies to escalations needing a cap extension "
    "above this [default: every escalation; on set: unchanged].", show_default=False)]
NewApproversMatchOption = Annotated[str | None, typer.Option(
    "--approvers-match", metavar="claimed|vouched", help="New match of approvers: the names given "
    "(claimed), or who the store vouches for (vouched) [default: unchanged].", show_default=False)]
RenotifyOption = Annotated[str | None, typer.Option(
    "--renotify-every", metavar="DURATION",
    help="'escalate sweep' sends an open escalation's notice again this often, e.g. 30m; "
    "1m to 365d [default: never].", show_default=False)]


@runs_app.command("init")
def init(
    run: RunArg,
    cap: Annotated[str | None, typer.Option(
        "--cap", metavar="USD", help="The run's budget in USD (required, unless --pool gives it).",
        show_default=False)] = None,
    task_cap: Annotated[str | None, typer.Option("--task-cap", metavar="USD", help="Most one task may "
                                                 "reserve [default: the run cap].")] = None,
    escalation: ModeOption = None,
    approval_threshold: ThresholdOption = None,
    escalation_timeout: EscalationTimeoutOption = None,
    max_extension: MaxExtensionOption = None,
    approvers: ApproversOption = None,
    approvers_match: ApproversMatchOption = None, approver_key: ApproverKeyOption = None,
    quorum: QuorumOption = None, quorum_above: QuorumAboveOption = None,
    renotify_every: RenotifyOption = None,
    pool: Annotated[str | None, typer.Option(
        "--pool", metavar="POOL", help="Join POOL for good: every reservation must also fit the pool; "
        "--cap defaults to the pool's cap.", show_default=False)] = None,
    runs_dir: RunsDirOption = None,
    lock_timeout: LockTimeoutOption = None,
    by: ByOption = None,
    json_out: JsonOption = False,
) -> None:
    """Create RUN with a budget cap (the same settings again is a no-op)."""
    if approval_threshold is not None and (escalation or "off") == "off":
        # Kept (a later 'runs set --escalation enforce' uses it), but nothing reads it now.
        print("escalate: warning: --approval-threshold has no effect while escalation is off; "
              "add --escalation enforce (or shadow) to use it", file=sys.stderr)

    def action() -> dict[str, Any]:
        from escalate.service import Ledger

        options = open_options(runs_dir, lock_timeout, by)
        settings: RunPolicyOptions = {**init_settings(
            escalation=escalation, approval_threshold=approval_threshold,
            escalation_timeout=escalation_timeout, max_extension=max_extension, approvers=approvers,
            approvers_match=approvers_match, approver_keys=approver_key, quorum=(quorum, quorum_above)),
            "renotify_every_s": None if renotify_every is None else _renotify(renotify_every)}
        ledger = opened(Ledger.init(options.pop("location"), run, cap=cap, task_cap=task_cap, pool=pool,
                                    **settings, **options))
        if pool is not None and cap is not None:
            _warn_over_pool(ledger, pool)
        return {**ledger.state().totals(), "status": "created" if ledger.created else "exists",
                **({"pool": pool} if pool is not None else {})}

    def human(r: Mapping[str, Any]) -> None:
        if r["status"] == "exists":
            echo_line(f"run {r['run']} already exists with these settings ({usd(r['spent_micros'])} spent, "
                      f"{usd(r['remaining_micros'])} remaining); nothing changed")
            return
        echo_line(f"run {r['run']}: cap {usd(r['run_cap_micros'])}, task cap "
                  f"{usd(r['task_cap_micros'])}, escalation {r['escalation']['mode']}"
                  + (f", in pool {r['pool']}" if "pool" in r else ""))

    respond(json_out, action, human)


def _warn_over_pool(ledger: Ledger, pool_id: str) -> None:
    """A run cap above its pool's cap is allowed, but the pool refuses first: say so."""
    from escalate.pools.pool import Pool

    pool_cap, run_cap = Pool.open(ledger.runs_store, pool_id).facts.cap_micros, ledger.state().run_cap_micros
    if run_cap > pool_cap:
        print(f"escalate: warning: run {ledger.run_id}'s cap {usd(run_cap)} is above pool {pool_id}'s cap "
              f"{usd(pool_cap)}; the pool refuses first (omit --cap to take the pool's)", file=sys.stderr)


@runs_app.command("set")
def set_policy(
    run: RunArg,
    escalation: Annotated[str | None, typer.Option(
        "--escalation", metavar="MODE", help="New refusal mode: off, shadow or enforce [default: unchanged].",
        show_default=False)] = None,
    approval_threshold: Annotated[str | None, typer.Option(
        "--approval-threshold", metavar="USD",
        help="New USD amount above which reservations need a person in enforce mode "
        "[default: unchanged].", show_default=False)] = None,
    no_threshold: Annotated[bool, typer.Option("--no-approval-threshold",
                                               help="Remove the approval threshold.")] = False,
    escalation_timeout: Annotated[str | None, typer.Option(
        "--escalation-timeout", metavar="DURATION",
        help="New time after which an open escalation is paused, e.g. 30m; 1s to 365d "
        "[default: unchanged].", show_default=False)] = None,
    max_extension: Annotated[str | None, typer.Option(
        "--max-extension", metavar="USD", help="New most USD that approvals may add to the cap in total "
        "[default: unchanged].", show_default=False)] = None,
    approvers: Annotated[str | None, typer.Option(
        "--approvers", metavar="NAMES", help="New comma-separated names that may approve, pause or "
        "cancel escalations; \"\" lets anyone but the requester [default: unchanged].",
        show_default=False)] = None,
    approvers_match: NewApproversMatchOption = None, approver_key: ApproverKeyOption = None,
    quorum: QuorumOption = None, quorum_above: QuorumAboveOption = None,
    renotify_every: RenotifyOption = None,
    no_renotify: Annotated[bool, typer.Option("--no-renotify",
                                              help="Stop sending open escalations' notices again.")] = False,
    runs_dir: RunsDirOption = None,
    lock_timeout: LockTimeoutOption = None,
    by: ByOption = None,
    sign: ChangeSignOption = None,
    json_out: JsonOption = False,
) -> None:
    """Change RUN's escalation policy (recorded as a policy_changed event)."""
    changes = policy_changes(json_out, escalation=escalation, approval_threshold=approval_threshold,
                             no_threshold=no_threshold, escalation_timeout=escalation_timeout,
                             max_extension=max_extension, approvers=approvers,
                             renotify_every=renotify_every, no_renotify=no_renotify,
                             approvers_match=approvers_match, approver_keys=approver_key,
                             quorum=(quorum, quorum_above))
    before: dict[str, Any] = {}

    def action() -> Mapping[str, Any]:
        ledger = open_ledger(run, runs_dir, lock_timeout, by)
        if not json_out:
            before.update(ledger.state().policy.to_json())
        return ledger.set_policy(sign=sign, **changes())

    def human(result: dict[str, Any]) -> None:
        after = result["escalation"]
        changed = [f"{label} {show(before.get(key))} → {show(after.get(key))}"
                   for key, (label, show) in _POLICY_FIELDS.items()
                   if before and before.get(key) != after.get(key)]
        binding = pool_binding(result)  # a member run: its pool's policy still binds it
        if result["status"] == "exists" or not changed:
            echo_line(f"run {result['run']}: escalation policy unchanged ({after['mode']}){binding}")
        else:
            echo_line(f"run {result['run']}: {', '.join(changed)}{binding}")

    respond(json_out, action, human)


def init_settings(*, escalation: str | None, approval_threshold: str | None, escalation_timeout: str | None,
                  max_extension: str | None, approvers: str | None, approvers_match: str | None,
                  approver_keys: list[str] | None,
                  quorum: tuple[int | None, str | None]) -> PolicyOptions:
    """The escalation settings ``runs init`` and ``pools init`` were given, as the keywords of
    ``init``: one left out (or empty) takes its default
    (:class:`escalate.settings.PolicySettings`); a duration is parsed here, inside the command,
    so a bad one is reported as its error."""
    given: PolicyOptions = {"approval_threshold": approval_threshold, "quorum_above": quorum[1]}
    if escalation:
        given["escalation"] = escalation
    if escalation_timeout is not None:
        given["escalation_timeout_s"] = _escalation_timeout(escalation_timeout)
    if max_extension:
        given["max_extension"] = max_extension
    if approvers:
        given["approvers"] = approvers
    if approvers_match:
        given["approvers_match"] = approvers_match
    if approver_keys:
        given["approver_keys"] = approver_keys
    if quorum[0] is not None:
        given["quorum"] = quorum[0]
    return given


def policy_changes(json_out: bool, *, escalation: str | None, approval_threshold: str | None,
                   no_threshold: bool, escalation_timeout: str | None, max_extension: str | None,
                   approvers: str | None, renotify_every: str | None,
                   no_renotify: bool, approvers_match: str | None = None,
                   approver_keys: list[str] | None = None,
                   quorum: tuple[int | None, str | None] = (None, None)) -> Callable[[], dict[str, Any]]:
    """The options of ``runs set`` checked for usage (exit 2 before anything is opened),
    and a call that turns them into ``set_policy``'s keyword arguments (durations parsed
    then, inside the command, so a bad one is reported as its error)."""
    if approval_threshold is not None and no_threshold:
        bad_input("--approval-threshold and --no-approval-threshold disagree; give one of them",
                  json_out, code="usage")
    if renotify_every is not None and no_renotify:
        bad_input("--renotify-every and --no-renotify disagree; give one of them", json_out, code="usage")
    if (escalation, approval_threshold, escalation_timeout, max_extension, approvers,
            renotify_every, approvers_match, approver_keys, *quorum) == (None,) * 10 and not no_threshold \
            and not no_renotify:
        bad_input("nothing to change; give --escalation, --approval-threshold, --no-approval-threshold, "
                  "--escalation-timeout, --max-extension, --approvers, --approvers-match, --approver-key, "
                  "--quorum, --quorum-above, --renotify-every or --no-renotify", json_out, code="usage")

    def changes() -> dict[str, Any]:
        given: dict[str, Any] = {}
        if escalation is not None:
            given["escalation"] = escalation
        if approval_threshold is not None or no_threshold:
            given["approval_threshold"] = approval_threshold
        if escalation_timeout is not None:
            given["escalation_timeout_s"] = _escalation_timeout(escalation_timeout)
        if max_extension is not None:
            given["max_extension"] = max_extension
        if approvers is not None:
            given["approvers"] = approvers
        if approvers_match is not None:
            given["approvers_match"] = approvers_match
        if approver_keys is not None:
            given["approver_keys"] = approver_keys
        given.update({key: value for key, value in zip(("quorum", "quorum_above"), quorum, strict=True)
                      if value is not None})
        if renotify_every is not None or no_renotify:
            given["renotify_every_s"] = None if renotify_every is None else _renotify(renotify_every)
        return given

    return changes


def _escalation_timeout(text: str) -> float:
    from escalate.core.durations import MAX_ESCALATION_TIMEOUT_S, parse_duration

    return parse_duration(text, what="escalation timeout", minimum=1, maximum=MAX_ESCALATION_TIMEOUT_S)


def _renotify(text: str) -> float:
    from escalate.core.durations import MAX_ESCALATION_TIMEOUT_S, parse_duration

    return parse_duration(text, what="renotify interval", minimum=60, maximum=MAX_ESCALATION_TIMEOUT_S)


def _timeout_text(seconds: int | None) -> str:
    """Exact, unlike the rounded durations of the tables: ``90s``, ``30m``, ``1h``, ``2d``."""
    from escalate.core.durations import format_duration

    return "never" if seconds is None else format_duration(seconds)


_POLICY_FIELDS: dict[str, tuple[str, Callable[[Any], str]]] = {
    "mode": ("escalation", str),
    "approval_threshold_micros": ("approval threshold",
                                  lambda micros: "none" if micros is None else usd(micros)),
    "timeout_s": ("escalation timeout", _timeout_text),
    "max_extension_micros": ("max extension", usd),
    "approvers": ("approvers", lambda names: ", ".join(names or ()) or "anyone"),
    "approver_keys": ("pinned keys of", lambda keys: ", ".join(keys or {}) or "nobody"),
    "renotify_every_s": ("renotify every", _timeout_text),
    "approvers_match": ("approvers match", lambda match: match or "claimed"),
    "quorum": ("quorum", lambda quorum: str(quorum or 1)),
    "quorum_above_micros": ("quorum above", lambda micros: "any" if micros is None else usd(micros)),
}


@runs_app.command("list")
def list_runs(
    every_run: Annotated[bool, typer.Option("--all", help="Archived runs too.")] = False,
    runs_dir: RunsDirOption = None,
    json_out: JsonOption = False,
) -> None:
    """List every run with its cap, committed and remaining money, newest first."""

    def action() -> dict[str, list[RunRow | BrokenRun]]:
        import escalate.reports.runs  # (this command is list_runs too)

        return {"runs": escalate.reports.runs.list_runs(open_options(runs_dir, None)["location"],
                                                        every_run=every_run)}

    def human(result: dict[str, list[RunRow | BrokenRun]]) -> None:
        from escalate.reports.render import print_whole, runs_table

        rows = result["runs"]
        if not rows:
            echo_line("no runs; start one with 'escalate runs init RUN --cap USD'")
            return
        print_whole(runs_table(rows))
        for row in rows:
            if "error" in row:
                print(f"escalate: warning: {printable(row['message'], limit=1000)}", file=sys.stderr)

    respond(json_out, action, human)


class ShowFormat(enum.StrEnum):
    table = "table"
    json = "json"
    markdown = "markdown"


@runs_app.command("show")
def show(
    run: RunArg,
    output_format: Annotated[ShowFormat | None, typer.Option(
        "--format", "-f", help="table for people, json for scripts (same as --json), markdown for "
        "reports [default: table].", show_default=False)] = None,
    events: Annotated[int, typer.Option("--events", "-n", min=0, metavar="N",
                                        help="Also show the last N events as a timeline.")] = 0,
    all_tasks: Annotated[bool, typer.Option("--all", help="List every task, not only the latest.")] = False,
    runs_dir: RunsDirOption = None,
    json_out: JsonOption = False,
) -> None:
    """Show RUN's totals, a usage bar, every task with its state, and escalations."""
    if json_out and output_format not in (None, ShowFormat.json):
        bad_input(f"--json and --format {output_format.value} disagree; give one of them", json_out)
    chosen = ShowFormat.json if json_out else (output_format or ShowFormat.table)
    as_json = chosen is ShowFormat.json

    def action() -> Any:
        from escalate.pools.pool import pool_of_run

        ledger = open_ledger(run, runs_dir, None, progress=True)
        snapshot = ledger.replayed()
        recent = ledger.events(last=events)[0] if events else []
        pool = pool_of_run(ledger)
        if not as_json:
            return snapshot, recent, pool
        from escalate.reports.render import run_view

        view = {**run_view(snapshot.state), **pool}
        view["warnings"] = _warnings(snapshot)
        # False when the log is corrupt and the totals stop at the line before the problem.
        view["complete"] = snapshot.problem is None
        if events:
            view["recent_events"] = recent
        return view

    def human(shown: Any) -> None:
        snapshot, recent, pool = shown
        # One plain line each, as every warning: rich would wrap a long one at 80 columns.
        for warning in _warnings(snapshot):
            print(f"escalate: warning: {printable(warning, limit=1000)}", file=sys.stderr)
        if chosen is ShowFormat.markdown:
            from escalate.reports.report import run_markdown

            sys.stdout.write(run_markdown(snapshot.state, events=recent, pool=pool))
            return
        from escalate.reports.render import print_whole, show_run, timeline_table

        show_run(snapshot.state, all_tasks=all_tasks, pool=pool)
        if recent:
            print_whole(timeline_table(recent))

    respond(as_json, action, human)


def _warnings(snapshot: Any) -> list[str]:
    """What a reader of ``snapshot`` (``Ledger.replayed()``) is warned about."""
    warnings = []
    if snapshot.problem is not None:
        # The totals are those of the lines folded before the problem was found.
        warnings.append(f"{snapshot.problem.message} (totals as of line {snapshot.state.seq})")
    if snapshot.torn_bytes:
        warnings.append(f"the log ends in {snapshot.torn_bytes} bytes of an unfinished line; "
                        "the next write sets them aside")
    return warnings


@runs_app.command("verify")
def verify(
    run: RunArg,
    runs_dir: RunsDirOption = None,
    json_out: JsonOption = False,
) -> None:
    """Check every line, the seq run, the prev chain and the ledger rules of RUN."""

    def action() -> VerifyReport:
        from escalate.errors import CorruptLedger
        from escalate.reports.runs import verify_report

        report = verify_report(open_ledger(run, runs_dir, None, progress=True))
        if not json_out:
            for warning in report["warnings"]:
                print(f"line {warning['line']}: warning: {printable(warning['warning'], limit=1000)}",
                      file=sys.stderr)
            for problem in report["problems"]:
                print(f"line {problem['line']}: {problem['problem']}", file=sys.stderr)
        if report["problems"]:
            first = report["problems"][0]
            facts: dict[str, Any] = {k: v for k, v in report.items() if k != "run"}
            raise CorruptLedger(
                f"run {run}: {len(report['problems'])} problem(s), first at line {first['line']}: "
                f"{first['problem']}", **facts)
        return report

    def human(result: VerifyReport) -> None:
        torn = f"; {result['torn_bytes']} torn bytes at the end (set aside by the next write)" \
            if result["torn_bytes"] else ""
        echo_line(f"OK {result['run']}: {result['lines']} lines, seq 1..{result['events']}, "
                  f"prev chain intact, ledger rules hold{torn}")

    respond(json_out, action, human)


# ``runs watch`` lives in its own module (it alone needs signals and a live view).
runs_app.command("watch")(watch)
add_runs_commands(runs_app)  # runs export, runs import
runs_app.command("archive")(archive)


def register(app: typer.Typer) -> None:
    """Add the ``runs`` group to ``app``."""
    app.add_typer(runs_app, name="runs")

