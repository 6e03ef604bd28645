"""Output for people (rich tables) and the JSON views of a run.

Imported only by commands that render, so ``reserve``/``increase``/``release`` never
load rich.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from escalate.ledger import RunState
from escalate.money import format_usd as usd

TASK_ROWS = 50
BAR_WIDTH = 30


def console(*, stderr: bool = False) -> Console:
    """A console that honours ``NO_COLOR`` and drops colour when output is not a terminal."""
    return Console(file=sys.stderr if stderr else sys.stdout, highlight=False,
                   no_color="NO_COLOR" in os.environ, soft_wrap=False)


def usage_bar(used: int, cap: int, width: int = BAR_WIDTH) -> Text:
    """``███████░░░ 70%`` — green below 80 %, yellow below 100 %, red at or over the cap."""
    share = used / cap if cap > 0 else 1.0
    filled = min(width, round(share * width))
    style = "green" if share < 0.8 else ("yellow" if share < 1 else "red")
    bar = Text("█" * filled, style=style)
    bar.append("░" * (width - filled), style="dim")
    bar.append(f" {share * 100:.0f}%")
    return bar


def run_view(state: RunState, *, all_tasks: bool = True) -> dict[str, Any]:
    """``runs show --json``: the totals, every task and every escalation, in exact micros."""
    tasks = [task.to_json(task_id) for task_id, task in state.tasks.items()]
    escalations = [e.to_json() for e in state.escalations.values()]
    view = state.totals()
    view.update({
        "shadow_escalations": sum(1 for e in state.escalations.values() if e.shadow),
        "open_escalations": len(state.open_escalations),
        "tasks": tasks if all_tasks else tasks[-TASK_ROWS:],
        "escalations": escalations,
    })
    return view


def show_run(state: RunState, *, all_tasks: bool = False, warnings: Iterable[str] = ()) -> None:
    """``runs show`` for people: the totals with a usage bar, then tasks and escalations."""
    out = console()
    for warning in warnings:
        console(stderr=True).print(Text(f"warning: {warning}", style="yellow"))
    summary = Table.grid(padding=(0, 2))
    summary.add_column(style="bold")
    summary.add_column(justify="right")
    summary.add_row("run", state.run_id)
    summary.add_row("cap", usd(state.cap_micros)
                    + (f" (incl. {usd(state.extended_micros)} extension)" if state.extended_micros else ""))
    summary.add_row("spent", usd(state.spent_micros))
    summary.add_row("reserved", usd(state.reserved_micros))
    summary.add_row("committed", usd(state.committed_micros))
    remaining = Text(usd(state.remaining_micros), style="red" if state.remaining_micros < 0 else "")
    summary.add_row("remaining", remaining)
    summary.add_row("used", usage_bar(state.committed_micros, state.cap_micros))
    summary.add_row("escalation", state.policy.mode
                    + (f", threshold {usd(state.policy.approval_threshold_micros)}"
                       if state.policy.approval_threshold_micros is not None else ""))
    summary.add_row("events", str(state.seq))
    out.print(summary)

    items = list(state.tasks.items())
    shown = items if all_tasks else items[-TASK_ROWS:]
    table = Table(title=f"tasks ({len(items)})", title_justify="left")
    table.add_column("task")
    table.add_column("state")
    table.add_column("reserved", justify="right")
    table.add_column("actual", justify="right")
    table.add_column("note")
    styles = {"released": "", "reserved": "cyan", "halted": "red", "escalated": "yellow", "paused": "yellow"}
    for task_id, task in shown:
        note = task.halt_reason or (task.escalation_id if task.state in ("escalated", "paused") else "")
        table.add_row(task_id, Text(task.state, style=styles.get(task.state, "")),
                      usd(task.reserved_micros) if task.holding or task.state == "released" else "-",
                      "-" if task.actual_micros is None else usd(task.actual_micros), note or "")
    if items:
        out.print(table)
    if len(shown) < len(items):
        out.print(f"… {len(items) - len(shown)} earlier tasks not shown (use --all or --json)")
    escalations = list(state.escalations.values())
    if escalations:
        out.print(escalation_table(
            [{"run": state.run_id, **e.to_json()} for e in escalations], title="escalations",
            with_run=False))


def escalation_table(rows: list[dict[str, Any]], *, title: str, with_run: bool = True) -> Table:
    """Escalations for an approver: what is asked, what is left, and what can be done."""
    table = Table(title=f"{title} ({len(rows)})", title_justify="left")
    for column in (["run"] if with_run else []) + ["id", "task", "asked", "remaining", "state",
                                                    "offered / outcome", "opened", "expires"]:
        table.add_column(column, justify="right" if column in ("asked", "remaining") else "left")
    for row in rows:
        if row["shadow"]:
            state, outcome = Text("shadow", style="dim"), "would have fired"
        elif row["state"] == "open":
            state, outcome = Text("open", style="yellow bold"), "/".join(row["offered"])
        else:
            state = Text("resolved")
            outcome = f"{row['mode']} by {row['by']}"
        cells = [row["id"], row["task"], usd(row["requested_micros"]), usd(row["remaining_micros"]),
                 state, outcome, _short_ts(row["opened_at"]), _short_ts(row["expires_at"])]
        table.add_row(*([row["run"]] if with_run else []), *cells)
    return table


def runs_table(rows: list[dict[str, Any]]) -> Table:
    """``runs list``: one row per run, newest first."""
    table = Table(title=f"runs ({len(rows)})", title_justify="left")
    for column in ("run", "cap", "committed", "remaining", "used", "state", "opened"):
        table.add_column(column, justify="right" if column in ("cap", "committed", "remaining") else "left")
    for row in rows:
        if "error" in row:
            table.add_row(row["run"], "-", "-", "-", "", Text(row["error"], style="red"), "")
            continue
        table.add_row(row["run"], usd(row["cap_micros"]), usd(row["committed_micros"]),
                      usd(row["remaining_micros"]), usage_bar(row["committed_micros"], row["cap_micros"], 12),
                      row["state"], _short_ts(row["opened_at"]))
    return table


def _short_ts(ts: str | None) -> str:
    return "-" if not ts else ts[:19].replace("T", " ")
