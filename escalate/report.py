"""Plain-text reports of a run: the Markdown summary and one readable line per event.

No rich here: the CI gate writes its step summary without loading a terminal renderer,
and ``runs show --format markdown`` prints the same document.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from escalate.gate import Verdict, halted_tasks, top_tasks
from escalate.ledger import RunState
from escalate.money import format_usd as usd

TOP_TASKS = 10
BAR_WIDTH = 20


def text_bar(used: int, cap: int, width: int = BAR_WIDTH) -> str:
    """``██████░░░░ 60%``: how much of ``cap`` is used, in plain characters."""
    share = used / cap if cap > 0 else 1.0
    filled = max(0, min(width, round(share * width)))
    return "█" * filled + "░" * (width - filled) + f" {share * 100:.0f}%"


def describe_event(event: Mapping[str, Any]) -> str:
    """What one event says, for a timeline: ``reserved t1: $2.50``."""
    kind = event.get("type")
    task = event.get("task", "")
    if kind == "run_opened":
        return (f"opened run {event.get('run')}: cap {_usd(event, 'run_cap_micros')}, task cap "
                f"{_usd(event, 'task_cap_micros')}, escalation {event.get('escalation', {}).get('mode')}")
    if kind == "budget_reserved":
        return f"reserved {task}: {_usd(event, 'amount_micros')}"
    if kind == "budget_increased":
        why = f" ({event['reason']})" if event.get("reason") else ""
        return f"increased {task}: {_usd(event, 'from_micros')} → {_usd(event, 'to_micros')}{why}"
    if kind == "released":
        return (f"released {task}: {_usd(event, 'actual_micros')} actual of "
                f"{_usd(event, 'reserved_micros')} reserved")
    if kind == "halt":
        return (f"halted {task} ({event.get('reason')}): asked {_usd(event, 'requested_micros')} "
                f"with {_usd(event, 'remaining_micros')} remaining")
    if kind == "escalation":
        if event.get("shadow"):
            return (f"shadow escalation {event.get('id')} for {task}: {_usd(event, 'requested_micros')} "
                    "would have needed a person")
        return (f"escalation {event.get('id')} for {task}: asked {_usd(event, 'requested_micros')} with "
                f"{_usd(event, 'remaining_micros')} remaining; offers {'/'.join(event.get('offered', []))}")
    if kind == "escalation_resolved":
        extension = event.get("extension_micros") or 0
        return (f"escalation {event.get('id')} resolved: {event.get('mode')} by {event.get('by')}"
                + (f", cap extended by {usd(extension)}" if extension else ""))
    if kind == "recovery":
        return f"recovered a torn tail: {event.get('torn_bytes')} bytes set aside in {event.get('saved_to')}"
    if kind == "policy_changed":
        policy = event.get("escalation", {})
        threshold = policy.get("approval_threshold_micros")
        return (f"escalation policy changed: {policy.get('mode')}"
                + (f", threshold {usd(threshold)}" if threshold is not None else ""))
    return f"{kind} (unknown to this version)"


def timeline_line(event: Mapping[str, Any]) -> str:
    """``#3  2026-11-23 14:00:00  alice  reserved t1: $2.50``: one event on one line."""
    return (f"#{event.get('seq', '?')}  {str(event.get('ts', ''))[:19].replace('T', ' ')}  "
            f"{event.get('actor', '')}  {describe_event(event)}")


def _usd(event: Mapping[str, Any], key: str) -> str:
    value = event.get(key)
    return usd(value) if isinstance(value, int) else "?"


def _cell(value: object) -> str:
    """A Markdown table cell: pipes escaped, no line breaks."""
    return str(value).replace("|", "\\|").replace("\n", " ")


def run_markdown(state: RunState, *, verdict: Verdict | None = None,
                 events: Sequence[Mapping[str, Any]] = ()) -> str:
    """A run as Markdown: totals, a usage bar, top tasks by cost, halts, escalations, and
    (optionally) the gate's verdict and the last events."""
    lines: list[str] = []
    if verdict is None:
        lines.append(f"## escalate run `{state.run_id}`")
    else:
        outcome = "✅ passed" if verdict.passed else "❌ failed"
        lines.append(f"## escalate gate {outcome}: run `{state.run_id}`")
        lines.append("")
        lines.extend(f"- **failed:** {_cell(f.message)}"
                     for f in verdict.failures)
        lines.extend(f"- **warning:** {_cell(f.message)}" for f in verdict.warnings)
        if verdict.passed and not verdict.warnings:
            lines.append(f"- within budget: committed {usd(verdict.committed_micros)} of "
                         f"{usd(verdict.max_spent_micros)}")
    lines += ["", "| | USD |", "|---|---:|",
              f"| cap | {usd(state.cap_micros)} |"]
    if state.extended_micros:
        lines.append(f"| of which extensions | {usd(state.extended_micros)} |")
    lines += [f"| spent | {usd(state.spent_micros)} |",
              f"| reserved | {usd(state.reserved_micros)} |",
              f"| committed | {usd(state.committed_micros)} |",
              f"| remaining | {usd(state.remaining_micros)} |"]
    if verdict is not None and verdict.max_spent_micros != state.cap_micros:
        lines.append(f"| max spent (gate) | {usd(verdict.max_spent_micros)} |")
    lines += ["", f"`{text_bar(state.committed_micros, state.cap_micros)}` of the cap committed"]

    top = top_tasks(state, TOP_TASKS)
    if top:
        lines += ["", f"### Top tasks by cost ({len(top)} of {len(state.tasks)})", "",
                  "| task | state | cost |", "|---|---|---:|"]
        lines += [f"| `{task}` | {task_state} | {usd(cost)} |" for task, cost, task_state in top]

    halted = halted_tasks(state)
    if halted:
        lines += ["", f"### Halts ({len(halted)})", "", "| task | reason |", "|---|---|"]
        lines += [f"| `{task}` | {reason} |" for task, reason in halted]

    escalations = list(state.escalations.values())
    if escalations:
        lines += ["", f"### Escalations ({len(escalations)})", "",
                  "| id | task | asked | state | outcome |", "|---|---|---:|---|---|"]
        for e in escalations:
            if e.shadow:
                status, outcome = "shadow", "would have fired"
            elif e.state == "open":
                status, outcome = "**open**", "offers " + "/".join(e.offered)
            else:
                status, outcome = "resolved", f"{e.mode} by {_cell(e.by)}"
            lines.append(f"| {e.id} | `{e.task}` | {usd(e.requested_micros)} | {status} | {outcome} |")

    if events:
        lines += ["", f"### Last {len(events)} events", ""]
        lines += [f"{event.get('seq')}. `{str(event.get('ts', ''))[:19].replace('T', ' ')}` "
                  f"{_cell(event.get('actor', ''))}: {_cell(describe_event(event))}" for event in events]
    return "\n".join(lines) + "\n"
