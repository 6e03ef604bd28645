"""Output for people (rich tables) and the JSON views of a run.

Imported only by commands that render, so ``reserve``/``increase``/``release`` never
load rich.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import orjson
from rich.cells import cell_len
from rich.console import Console, Group, RenderableType
from rich.measure import Measurement
from rich.progress import BarColumn, DownloadColumn, Progress, TaskID, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from escalate.core.durations import format_duration
from escalate.core.events import parse_ts
from escalate.core.money import format_usd as usd
from escalate.core.state import RunState
from escalate.reports.report import (
    approvals_line,
    bar_cells,
    percent,
    policy_line,
    printable,
    usage_level,
    who,
)

TASK_ROWS = 50
BAR_WIDTH = 30


def console(*, stderr: bool = False) -> Console:
    """A console that drops colour when output is not a terminal. Rich reads ``NO_COLOR``
    itself, as the convention says: set and not empty turns colour off."""
    return Console(file=sys.stderr if stderr else sys.stdout, highlight=False, soft_wrap=False)


def print_whole(renderable: RenderableType, out: Console | None = None) -> None:
    """Print tables without breaking a word: every column is at least as wide as its longest
    word (header included), and where that is wider than the console (80 columns in a pipe or
    a CI log) the lines are printed longer rather than an id or a header split or cut."""
    out = out or console()
    needed = Measurement.get(out, out.options.update_width(_UNBOUNDED), renderable).minimum
    out.width = max(out.width, needed)
    out.print(renderable, crop=False)


_UNBOUNDED = 100_000


def whole_words(table: Table) -> Table:
    """``table`` with each column's ``min_width`` raised to its longest word, header included;
    a column of one-word cells (ids, amounts) never wraps, so rich narrows the others first."""
    for column in table.columns:
        cells = [(cell.plain if isinstance(cell, Text) else str(cell)).split()
                 for cell in (column.header, *column.cells)]
        longest = max((cell_len(word) for words in cells for word in words), default=0)
        column.min_width = max(column.min_width or 0, longest)
        column.no_wrap = column.no_wrap or all(len(words) <= 1 for words in cells)
    return table


LARGE_LOG_BYTES = 64 << 20


class ReplayProgress:
    """A progress bar on stderr while a large log is replayed; only on a terminal, and gone
    when the replay ends. Pass it as :attr:`escalate.Ledger.progress`."""

    def __init__(self, out: Console | None = None, threshold: int = LARGE_LOG_BYTES) -> None:
        self._console = out or console(stderr=True)
        self._threshold = threshold
        self._bar: Progress | None = None
        self._task: TaskID | None = None

    def __call__(self, done: int, total: int) -> None:
        if self._bar is None:
            if total < self._threshold or done >= total or not self._console.is_terminal:
                return
            self._bar = Progress(TextColumn("reading the log"), BarColumn(), DownloadColumn(),
                                 TimeRemainingColumn(), console=self._console, transient=True)
            self._bar.start()
            self._task = self._bar.add_task("replay", total=total)
        assert self._task is not None
        self._bar.update(self._task, completed=done)
        if done >= total:
            self._bar.stop()
            self._bar = None


_USAGE_STYLES = {"low": "green", "near": "yellow", "full": "red"}


def usage_bar(used: int, cap: int, width: int = BAR_WIDTH) -> Text:
    """``███████░░░ 70%`` — green below 80 %, yellow below 100 %, red at or over the cap."""
    filled = bar_cells(used, cap, width)
    bar = Text("█" * filled, style=_USAGE_STYLES[usage_level(used, cap)])
    bar.append("░" * (width - filled), style="dim")
    bar.append(f" {percent(used, cap)}")
    return bar


def run_view(state: RunState, *, all_tasks: bool = True) -> dict[str, Any]:
    """``runs show --json``: the totals, every task and every escalation, in exact micros."""
    stored = getattr(state.tasks, "json_array", None)
    if all_tasks and stored is not None:
        # A reader's snapshot of the checkpoint hands over its rows as they are stored.
        tasks: Any = orjson.Fragment(stored())
    else:
        tasks = [task.to_json(task_id) for task_id, task in state.tasks.items()]
        tasks = tasks if all_tasks else tasks[-TASK_ROWS:]
    escalations = [e.to_json() for e in state.escalations.values()]
    view = state.totals()
    view.update({
        "shadow_escalations": sum(1 for e in state.escalations.values() if e.shadow),
        "open_escalations": len(state.open_escalations),
        "tasks": tasks,
        "escalations": escalations,
    })
    return view


def show_run(state: RunState, *, all_tasks: bool = False, pool: Mapping[str, Any] | None = None) -> None:
    """``runs show`` for people: the totals with a usage bar, then tasks and escalations."""
    print_whole(run_panel(state, all_tasks=all_tasks, pool=pool))


def run_panel(state: RunState, *, all_tasks: bool = False, pool: Mapping[str, Any] | None = None) -> Group:
    """The run for people as one renderable (``runs show``, and redrawn by ``runs watch``);
    ``pool``: the run's pool and its money left (:func:`escalate.pools.pool.pool_of_run`)."""
    parts: list[RenderableType] = []
    summary = Table.grid(padding=(0, 2))
    summary.add_column(style="bold")
    summary.add_column(justify="right")
    summary.add_row("run", _plain(state.run_id) + (" (archived)" if state.archived else ""))
    summary.add_row("cap", usd(state.cap_micros)
                    + (f" (incl. {usd(state.extended_micros)} extension)" if state.extended_micros else ""))
    summary.add_row("spent", usd(state.spent_micros))
    summary.add_row("reserved", usd(state.reserved_micros))
    summary.add_row("committed", usd(state.committed_micros))
    remaining = Text(usd(state.remaining_micros), style="red" if state.remaining_micros < 0 else "")
    summary.add_row("remaining", remaining)
    summary.add_row("used", usage_bar(state.committed_micros, state.cap_micros))
    if pool is not None and pool["pool"] is not None:
        left = pool["pool_remaining_micros"]
        summary.add_row("pool", _plain(pool["pool"]))
        summary.add_row("pool remaining", Text(usd(left), style="red" if left < 0 else ""))
    summary.add_row("escalation", state.policy.mode
                    + (f", threshold {usd(state.policy.approval_threshold_micros)}"
                       if state.policy.approval_threshold_micros is not None else ""))
    if pool is not None and pool.get("pool_escalation") is not None:
        # The pool's checks bind the run whatever its own row above says (docs/pools.md).
        binding = f"{policy_line(pool['pool_escalation'])} (binds this run too)"
        summary.add_row("pool escalation", _plain(binding))
    summary.add_row("escalations", f"{len(state.open_escalations)} open, "
                    f"{sum(e.shadow for e in state.escalations.values())} shadow (would have fired)")
    summary.add_row("events", str(state.seq))
    parts.append(whole_words(summary))

    task_ids = list(state.tasks)  # ids only: a task is decoded when its row is shown
    shown = [(task_id, state.tasks[task_id])
             for task_id in (task_ids if all_tasks else task_ids[-TASK_ROWS:])]
    table = Table(title=f"tasks ({len(task_ids)})", title_justify="left")
    table.add_column("task")
    table.add_column("state")
    table.add_column("reserved", justify="right")
    table.add_column("actual", justify="right")
    table.add_column("note")
    styles = {"released": "", "reserved": "cyan", "halted": "red", "escalated": "yellow", "paused": "yellow"}
    for task_id, task in shown:
        note = task.halt_reason or (task.escalation_id if task.state in ("escalated", "paused") else "")
        table.add_row(_plain(task_id), Text(task.state, style=styles.get(task.state, "")),
                      usd(task.reserved_micros) if task.holding or task.state == "released" else "-",
                      "-" if task.actual_micros is None else usd(task.actual_micros), _plain(note or ""))
    if task_ids:
        parts.append(whole_words(table))
    if len(shown) < len(task_ids):
        parts.append(Text(f"… {len(task_ids) - len(shown)} earlier tasks not shown (use --all or --json)"))
    escalations = list(state.escalations.values())
    if escalations:
        parts.append(escalation_table(
            [{"run": state.run_id, **e.to_json()} for e in escalations], title="escalations",
            with_run=False))
    return Group(*parts)


def timeline_table(events: Iterable[Mapping[str, Any]]) -> Table:
    """``runs show --events N`` and ``runs watch``: one row per event, oldest first."""
    from escalate.reports.report import describe_event

    rows = list(events)
    table = Table(title=f"last {len(rows)} events", title_justify="left")
    for column in ("seq", "time", "actor", "event"):
        table.add_column(column, justify="right" if column == "seq" else "left")
    styles = {"halt": "red", "escalation": "yellow", "escalation_resolved": "yellow", "recovery": "magenta"}
    for event in rows:
        table.add_row(_plain(event.get("seq", "?")), Text(_short_ts(event.get("ts"))),
                      _plain(who(event.get("actor", ""), event.get("role"))),
                      Text(describe_event(event), style=styles.get(str(event.get("type")), "")))
    return whole_words(table)


def escalation_table(rows: Sequence[Mapping[str, Any]], *, title: str, with_run: bool = True,
                     now: datetime | None = None) -> Table:
    """Escalations for an approver: what is asked, what is left, how old, when it times out,
    and what can be done (``now`` is for tests; it defaults to the clock)."""
    moment = now or datetime.now(UTC)
    table = Table(title=f"{title} ({len(rows)})", title_justify="left")
    for column in (["run"] if with_run else []) + ["id", "task", "priority", "amount", "needed", "remaining",
                                                    "from", "reason", "state", "age", "expires", "offered"]:
        # Short values never wrap; names and the reason fold when the terminal is narrow.
        table.add_column(column, justify="right" if column in ("amount", "needed", "remaining") else "left",
                         overflow="fold", no_wrap=column not in ("run", "task", "from", "reason", "state"),
                         min_width=10 if column == "reason" else None)
    for row in rows:
        waiting = row["state"] == "open" and not row["shadow"]
        if row["shadow"]:
            state = Text("shadow", style="dim")
        elif row["state"] == "open":
            state = Text("open" + (f": {approvals_line([a['by'] for a in row['approvals']], row['quorum'])}"
                                   if row.get("approvals") else ""), style="yellow bold")
        else:
            state = _plain(f"{_RESOLVED_AS.get(row['mode'], row['mode'])} by "
                           f"{who(row['by'], row.get('resolved_role'))}")
        priority = row.get("priority", "normal")
        cells: list[RenderableType] = [
            _plain(row["id"]), _plain(row["task"]),
            Text(priority, style=_PRIORITY_STYLES.get(priority, "") if waiting else ""),
            usd(row["requested_micros"]), usd(row.get("needed_extension_micros", 0)),
            usd(row["remaining_micros"]), _plain(who(row.get("requested_by"), row.get("requested_role"))),
            _plain(_why(row)), state,
            format_duration(_seconds_between(row["opened_at"], moment), exact=False),
            _expires(row, moment), _plain("/".join(row["offered"])) if waiting else "-"]
        table.add_row(*([_plain(row["run"])] if with_run else []), *cells)
    return whole_words(table)


def _why(row: Mapping[str, Any]) -> str:
    """The reason column: what fired (``pool_cap of pool team-a`` says whose approvers must
    act), then the requester's reason."""
    fired = str(row.get("reason") or "-") + (f" of pool {row['pool']}" if row.get("pool") else "")
    return fired + (f": {row['request_reason']}" if row.get("request_reason") else "")


_RESOLVED_AS = {"extend": "approved", "pause": "paused", "cancel": "cancelled", "withdraw": "withdrawn"}
_PRIORITY_STYLES = {"urgent": "red bold", "high": "yellow", "low": "dim"}


def _seconds_between(ts: str, moment: datetime) -> float:
    return (moment - parse_ts(ts)).total_seconds()


def _expires(row: Mapping[str, Any], moment: datetime) -> Text | str:
    """``in 48m`` for an open escalation; ``overdue 3m`` once past it (the next command that
    touches the run, or a sweep, pauses it); ``-`` when nobody needs to act."""
    if row["shadow"] or row["state"] != "open":
        return "-"
    if row["expires_at"] is None:
        return "never"
    left = -_seconds_between(row["expires_at"], moment)
    if left > 0:
        return f"in {format_duration(left, exact=False)}"
    return Text(f"overdue {format_duration(-left, exact=False)}", style="red")


def runs_table(rows: Sequence[Mapping[str, Any]]) -> Table:
    """``runs list``: one row per run, newest first; compact, to fit 80 columns where it can."""
    from rich import box

    table = Table(title=f"runs ({len(rows)})", title_justify="left", box=box.SIMPLE_HEAD,
                  show_edge=False, pad_edge=False)
    # The pool column only where a run has one, and then (to hold 80 columns unwrapped) the
    # day a run was opened without its time, and no "used" share: cap and committed say it.
    pooled = any(row.get("pool") for row in rows)
    columns = ("run", "pool", "cap", "committed", "remaining", "state", "opened") if pooled else \
        ("run", "cap", "committed", "remaining", "used", "state", "opened")
    for column in columns:
        money = column in ("cap", "committed", "remaining", "used")
        table.add_column(column, justify="right" if money else "left", no_wrap=money)
    state_styles = {"over cap": "red", "escalation open": "yellow", "halted tasks": "red"}
    for row in rows:
        if "error" in row:
            cells: list[Any] = [Text(row["error"], style="red"), "-"]
            table.add_row(_plain(row["run"]), *["-"] * (len(columns) - 3), *cells)
            continue
        cap, committed = row["cap_micros"], row["committed_micros"]
        used = Text(percent(committed, cap), style=_USAGE_STYLES[usage_level(committed, cap)])
        table.add_row(_plain(row["run"]), *([_plain(row.get("pool") or "-")] if pooled else []),
                      usd(cap), usd(committed), usd(row["remaining_micros"]), *([] if pooled else [used]),
                      Text(row["state"], style=state_styles.get(row["state"], "")),
                      _short_ts(row["opened_at"])[:10 if pooled else 16])
    return whole_words(table)


def _short_ts(ts: object) -> str:
    return "-" if not ts else printable(str(ts)[:19].replace("T", " "))


def _plain(value: object) -> Text:
    """A value from a log as a cell: printable, and never read as rich markup."""
    return Text(printable(value))
