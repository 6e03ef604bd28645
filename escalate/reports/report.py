"""Plain-text reports of a run: the Markdown summary, one readable line per event, and how
full a run is (the percentage, the bar, the 80 % level every colour and warning uses).

No rich here: the CI gate writes its step summary without loading a terminal renderer,
and ``runs show --format markdown`` prints the same document.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

from escalate.core.money import format_usd as usd
from escalate.core.state import RunState
from escalate.core.text import printable

if TYPE_CHECKING:
    from escalate.pools.pool import PoolReport
    from escalate.reports.gate import Verdict

TOP_TASKS = 10
BAR_WIDTH = 20
# Markdown and HTML syntax: escaped in every value a summary shows, so a name or reason from
# the log cannot render as emphasis, a link, an image, a tag, math or a new table cell
# (with "[" escaped, "(", "!" and ")" make no link; "#" and "+" only act at a line start).
_MARKDOWN_SYNTAX = str.maketrans({char: "\\" + char for char in "\\`*_[]<>|~&$"})


UsageLevel = Literal["low", "near", "full"]


def usage_level(used: int, cap: int) -> UsageLevel:
    """How close ``used`` is to ``cap``: ``near`` from 80 %, ``full`` at or over it (a cap of
    zero is full). Every bar's colour and the gate's near-limit warning read this one."""
    if cap <= 0 or used >= cap:
        return "full"
    # 80 % in integer arithmetic: micros are never compared through a float.
    return "near" if used * 5 >= cap * 4 else "low"


def percent(part: int, whole: int) -> str:
    """``part`` as a whole percentage of ``whole``, rounded down (99.96 % of a cap is not
    100 %), in integer arithmetic; every bar and message shows this one."""
    return f"{part * 100 // whole}%" if whole > 0 else "100%"


def bar_cells(used: int, cap: int, width: int) -> int:
    """How many of a bar's ``width`` cells ``used`` of ``cap`` fills, rounded down like
    :func:`percent` (only a full cap fills every cell), in integer arithmetic."""
    if cap <= 0:
        return width
    return max(0, min(width, used * width // cap))


def text_bar(used: int, cap: int, width: int = BAR_WIDTH) -> str:
    """``██████░░░░ 60%``: how much of ``cap`` is used, in plain characters."""
    filled = bar_cells(used, cap, width)
    return "█" * filled + "░" * (width - filled) + f" {percent(used, cap)}"


def halted_tasks(state: RunState) -> list[tuple[str, str]]:
    """``(task, halt reason)`` for every task that was halted, in log order."""
    return [(task_id, task.halt_reason or "") for task_id, task in state.tasks.items()
            if task.halt_reason is not None]


def top_tasks(state: RunState, limit: int = 10) -> list[tuple[str, int, str]]:
    """The most expensive tasks: ``(task, cost, state)``, where cost is the actual cost of a
    released task and what an in-flight task holds; ties keep log order."""
    costs: list[tuple[str, int, str]] = []
    for task_id, task in state.tasks.items():
        if task.actual_micros is not None:
            costs.append((task_id, task.actual_micros, task.state))
        elif task.holding:
            costs.append((task_id, task.reserved_micros, task.state))
    return sorted(costs, key=lambda row: -row[1])[:limit]


def describe_event(event: Mapping[str, Any]) -> str:
    """What one event says, for a timeline: ``reserved t1: $2.50``. Any event, even a
    damaged one, gives a printable line."""
    kind = event.get("type")
    task = _text(event, "task")
    if kind == "run_opened":
        return (f"opened run {_text(event, 'run')}: cap {_usd(event, 'run_cap_micros')}, task cap "
                f"{_usd(event, 'task_cap_micros')}, escalation {_text(_object(event, 'escalation'), 'mode')}")
    if kind == "budget_reserved":
        return f"reserved {task}: {_usd(event, 'amount_micros')}"
    if kind == "budget_increased":
        why = f" ({_text(event, 'reason')})" if event.get("reason") else ""
        return f"increased {task}: {_usd(event, 'from_micros')} → {_usd(event, 'to_micros')}{why}"
    if kind == "released":
        return (f"released {task}: {_usd(event, 'actual_micros')} actual of "
                f"{_usd(event, 'reserved_micros')} reserved")
    if kind == "halt":
        return (f"halted {task} ({_text(event, 'reason')}): asked {_usd(event, 'requested_micros')} "
                f"with {_usd(event, 'remaining_micros')} remaining")
    if kind == "escalation":
        if event.get("shadow"):
            return (f"shadow escalation {_text(event, 'id')} for {task}: "
                    f"{_usd(event, 'requested_micros')} would have needed a person")
        offered = event.get("offered")
        offers = "/".join(map(str, offered)) if isinstance(offered, list) else offered
        return (f"escalation {_text(event, 'id')} for {task}: asked {_usd(event, 'requested_micros')} "
                f"with {_usd(event, 'remaining_micros')} remaining; offers {printable(offers)}")
    if kind == "escalation_resolved":
        extension = event.get("extension_micros")
        return (f"escalation {_text(event, 'id')} resolved: {_text(event, 'mode')} by "
                f"{who(event.get('by'), event.get('role'))}"
                + (f", cap extended by {_usd(event, 'extension_micros')}" if extension else ""))
    if kind == "escalation_approved":
        return (f"escalation {_text(event, 'id')} approved by {who(event.get('by'), event.get('role'))}, "
                f"short of its quorum of {_text(event, 'quorum')}")
    if kind == "recovery":
        return (f"recovered a torn tail: {_text(event, 'torn_bytes')} bytes set aside in "
                f"{_text(event, 'saved_to')}")
    if kind == "policy_changed":
        policy = _object(event, "escalation")
        threshold = policy.get("approval_threshold_micros")
        return (f"escalation policy changed: {_text(policy, 'mode')}"
                + ("" if threshold is None else f", threshold {_usd(policy, 'approval_threshold_micros')}"))
    if kind == "escalation_notified":
        return (f"escalation {_text(event, 'id')} notice {_text(event, 'attempt')}: "
                f"{'delivered' if event.get('ok') is True else 'failed'} ({_text(event, 'detail')})")
    if kind == "run_archived":
        return "archived the run: no line may follow"
    return f"{printable(kind)} (unknown to this version)"


def policy_line(policy: Mapping[str, Any]) -> str:
    """An escalation policy (``escalation`` of a run or a pool) in a few words, who decides
    included: ``enforce, threshold $10.00, approvers lead``."""
    threshold = "" if policy.get("approval_threshold_micros") is None else \
        f", threshold {_usd(policy, 'approval_threshold_micros')}"
    approvers = printable(", ".join(map(str, policy.get("approvers") or ()))) or "anyone"
    return f"{_text(policy, 'mode')}{threshold}, approvers {approvers}"


def pool_binding(result: Mapping[str, Any]) -> str:
    """``; pool team's escalation binds it too, whatever its own: enforce, …`` for an answer
    about a member run (one that names its ``pool_escalation``); ``""`` for any other."""
    if result.get("pool_escalation") is None:
        return ""
    return (f"; pool {printable(result['pool'])}'s escalation binds it too, whatever its own: "
            f"{policy_line(result['pool_escalation'])}")


def timeline_line(event: Mapping[str, Any]) -> str:
    """``#3  2026-11-23 14:00:00  alice  reserved t1: $2.50``: one event on one line."""
    return (f"#{_text(event, 'seq')}  {printable(str(event.get('ts', ''))[:19].replace('T', ' '))}  "
            f"{who(event.get('actor'), event.get('role'))}  {describe_event(event)}")


def approvals_line(names: list[str], quorum: int) -> str:
    """``1 of 2 approvals (alice)``: where an escalation that needs a quorum stands."""
    return f"{len(names)} of {quorum} approvals ({', '.join(printable(name) for name in names)})"


def who(name: object, vouched: object) -> str:
    """A person as shown: the name they gave, and in brackets who the store vouches for
    (the OS user, or the database role) when that differs: ``lead [alice]``."""
    shown = printable(name if name is not None else "-")
    return shown if vouched is None or vouched == name else f"{shown} [{printable(vouched)}]"


def _text(event: Mapping[str, Any], key: str) -> str:
    return printable(event.get(key, ""))


def _object(event: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = event.get(key)
    return value if isinstance(value, dict) else {}


def _usd(event: Mapping[str, Any], key: str) -> str:
    value = event.get(key)
    return usd(value) if type(value) is int else "?"


def _cell(value: object) -> str:
    """A value from the log as Markdown text (also a table cell): printable, and every
    Markdown or HTML character escaped, so it shows as written and does nothing else."""
    return printable(value).translate(_MARKDOWN_SYNTAX)


def _code(value: object) -> str:
    """A value as a Markdown code span (ids): nothing inside is markup, but a backtick would
    end it and a pipe would end the table cell."""
    return "`" + printable(value).replace("`", "'").replace("|", "\\|") + "`"


def pool_period_line(report: PoolReport) -> str:
    """Which period a pool report shows, and when the next one starts."""
    if report["period_kind"] == "none":
        return "no period (the cap covers all time)"
    when = "the current" if report["current"] else "an earlier"
    return (f"{when} {report['period_kind']} {report['period']} ({report['tz']}), from "
            f"{report['period_start']}; the next starts {report['period_end']}")


def pool_markdown(report: PoolReport) -> str:
    """A pool's period as Markdown: which period, the totals with a usage bar, each run."""
    lines = [f"## escalate pool {_code(report['pool'])}", "", pool_period_line(report), "",
             "| | USD |", "|---|---:|", f"| cap | {usd(report['cap_micros'])} |"]
    if report["extended_micros"]:
        lines.append(f"| of which extensions | {usd(report['extended_micros'])} |")
    lines += [f"| spent | {usd(report['spent_micros'])} |",
              f"| reserved | {usd(report['reserved_micros'])} |",
              f"| committed | {usd(report['committed_micros'])} |",
              f"| remaining | {usd(report['remaining_micros'])} |",
              "", f"`{text_bar(report['committed_micros'], report['cap_micros'])}` of the cap committed",
              "", f"### Runs ({len(report['runs'])})", "", "| run | committed |", "|---|---:|"]
    lines += [f"| {_code(row['run'])} | {usd(row['committed_micros'])} |" for row in report["runs"]]
    return "\n".join(lines) + "\n"


def _totals_table(state: RunState, verdict: Verdict | None, pool: Mapping[str, Any] | None) -> list[str]:
    """The money of :func:`run_markdown` as a Markdown table."""
    lines = ["", "| | USD |", "|---|---:|", f"| cap | {usd(state.cap_micros)} |"]
    if state.extended_micros:
        lines.append(f"| of which extensions | {usd(state.extended_micros)} |")
    lines += [f"| spent | {usd(state.spent_micros)} |",
              f"| reserved | {usd(state.reserved_micros)} |",
              f"| committed | {usd(state.committed_micros)} |",
              f"| remaining | {usd(state.remaining_micros)} |"]
    if verdict is not None and verdict.max_spent_micros != state.cap_micros:
        lines.append(f"| max spent (gate) | {usd(verdict.max_spent_micros)} |")
    if pool is not None and pool["pool"] is not None:
        lines.append(f"| left in pool {_code(pool['pool'])} | {usd(pool['pool_remaining_micros'])} |")
    return lines


def run_markdown(state: RunState, *, verdict: Verdict | None = None,
                 events: Sequence[Mapping[str, Any]] = (), noun: str = "run",
                 pool: Mapping[str, Any] | None = None) -> str:
    """A run as Markdown: totals, a usage bar, top tasks by cost, halts, escalations, and
    (optionally) the gate's verdict, the run's pool and the last events. ``noun``: what
    ``state`` is (a pool's gate shows the pool's period as a state)."""
    lines: list[str] = []
    if verdict is None:
        lines.append(f"## escalate {noun} {_code(state.run_id)}")
    else:
        outcome = "✅ passed" if verdict.passed else "❌ failed"
        lines.append(f"## escalate gate {outcome}: {noun} {_code(state.run_id)}")
        lines.append("")
        lines.extend(f"- **failed:** {_cell(f.message)}"
                     for f in verdict.failures)
        lines.extend(f"- **warning:** {_cell(f.message)}" for f in verdict.warnings)
        if verdict.passed and not verdict.warnings:
            lines.append(f"- within budget: committed {usd(verdict.committed_micros)} of "
                         f"{usd(verdict.max_spent_micros)}")
    lines += _totals_table(state, verdict, pool)
    lines += ["", f"`{text_bar(state.committed_micros, state.cap_micros)}` of the cap committed"]

    top = top_tasks(state, TOP_TASKS)
    if top:
        lines += ["", f"### Top tasks by cost ({len(top)} of {len(state.tasks)})", "",
                  "| task | state | cost |", "|---|---|---:|"]
        lines += [f"| {_code(task)} | {task_state} | {usd(cost)} |" for task, cost, task_state in top]

    halted = halted_tasks(state)
    if halted:
        lines += ["", f"### Halts ({len(halted)})", "", "| task | reason |", "|---|---|"]
        lines += [f"| {_code(task)} | {_cell(reason)} |" for task, reason in halted]

    escalations = list(state.escalations.values())
    if escalations:
        lines += ["", f"### Escalations ({len(escalations)})", "",
                  "| id | task | asked | state | outcome |", "|---|---|---:|---|---|"]
        for e in escalations:
            if e.shadow:
                status, outcome = "shadow", "would have fired"
            elif e.state == "open":
                status, outcome = "**open**", "offers " + _cell("/".join(e.offered))
            else:
                status, outcome = "resolved", f"{_cell(e.mode)} by {_cell(e.by)}"
            lines.append(f"| {_cell(e.id)} | {_code(e.task)} | {usd(e.requested_micros)} | {status} "
                         f"| {outcome} |")

    if events:
        lines += ["", f"### Last {len(events)} events", ""]
        lines += [f"{_cell(event.get('seq'))}. {_code(str(event.get('ts', ''))[:19].replace('T', ' '))} "
                  f"{_cell(event.get('actor', ''))}: {_cell(describe_event(event))}" for event in events]
    return "\n".join(lines) + "\n"
