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
from escalate.core.state import RunState, task_json
from escalate.core.text import printable
from escalate.reports.report import (
    approvals_line,
    bar_cells,
    percent,
    policy_line,
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
    stored = getattr(state.tasks.rows, "json_array", None)
    if all_tasks and stored is not None:
        # A reader's snapshot of the checkpoint hands over its rows as they are stored.
        tasks: Any = orjson.Fragment(stored())
    else:
        tasks = [task_json(task_id, task) for task_id, task in state.tasks.rows.items()]
        tasks = tasks if all_tasks else tasks[-TASK_ROWS:]
    escalations = [e.to_json() for e in state.escalations.values()]
    return {
        **state.totals(),
        "shadow_escalations": sum(1 for e in state.escalations.values() if e.shadow),
        "open_escalations": len(state.open_escalations),
        "tasks": tasks,
        "escalations": escalations,
    }


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
        from escalate.reports.inbox import escalation_row  # what each needs now, as the inbox shows it

        pool_id = None if pool is None else pool["pool"]
        pool_left = None if pool is None else pool["pool_remaining_micros"]
        parts.append(escalation_table([escalation_row(state, e, pool_id, pool_left) for e in escalations],
                                      title="escalations", with_run=False))
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
                     now: datetime | None = None, wide: bool = False) -> Table:
    """Escalations for an approver (``now`` is for tests; it defaults to the clock). Two
    lines or more per row, to hold 80 columns: what is asked and what it needs now, who
    asked, how urgent and until when, and the whole reason, wrapped; ``wide``: one column
    per fact, as wide as it takes (age, what remained when asked, what is offered)."""
    if wide:
        return _wide_escalation_table(rows, title=title, with_run=with_run, now=now)
    from rich import box

    moment = now or datetime.now(UTC)
    table = Table(title=f"{title} ({len(rows)})", title_justify="left", box=box.SIMPLE_HEAD,
                  show_edge=False, pad_edge=False, leading=1)
    table.add_column("run\nid" if with_run else "id", no_wrap=True)
    table.add_column("task\nfrom", overflow="fold")
    table.add_column("amount\nneeded", justify="right", no_wrap=True)
    table.add_column("priority\nstate", overflow="fold")
    # The reason takes what is left of the width and wraps: it is what an approver needs most.
    table.add_column("reason", overflow="fold")
    for row in rows:
        waiting = row["state"] == "open" and not row["shadow"]
        ids = Text("\n").join([_plain(row["run"]), _plain(row["id"])] if with_run else [_plain(row["id"])])
        asked = Text("\n").join([_plain(row["task"]), _plain(_asker(row))])
        money = "\n".join([usd(row["requested_micros"]), *_needed(row).split(" ", 1)])
        status = Text("\n").join([_priority(row, waiting), _state(row)
                                  + (f", {_expires(row, moment)}" if waiting else "")])
        table.add_row(ids, asked, money, status, _lines(_reason_lines(row)))
    return whole_words(table)


def _wide_escalation_table(rows: Sequence[Mapping[str, Any]], *, title: str, with_run: bool,
                           now: datetime | None) -> Table:
    """``escalations --wide``: one column per fact."""
    moment = now or datetime.now(UTC)
    table = Table(title=f"{title} ({len(rows)})", title_justify="left")
    money = ("amount", "needed", "remaining", "pool left")
    for column in (["run"] if with_run else []) + ["id", "task", "priority", "amount", "needed", "remaining",
                                                    "pool left", "from", "reason", "state", "age", "expires",
                                                    "offered"]:
        # Short values never wrap; names and the reason fold when the terminal is narrow.
        table.add_column(column, justify="right" if column in money else "left",
                         overflow="fold",
                         no_wrap=column not in ("run", "task", "from", "reason", "needed", "state"),
                         min_width=10 if column == "reason" else None)
    for row in rows:
        waiting = row["state"] == "open" and not row["shadow"]
        left = row.get("pool_remaining_micros")
        cells: list[RenderableType] = [
            _plain(row["id"]), _plain(row["task"]), _priority(row, waiting),
            usd(row["requested_micros"]), _needed(row), usd(row["remaining_micros"]),
            "-" if left is None else usd(left), _plain(_asker(row)),
            _plain(_why(row)), _state(row),
            format_duration(_seconds_between(row["opened_at"], moment), exact=False),
            _expires(row, moment), _plain("/".join(row["offered"])) if waiting else "-"]
        table.add_row(*([_plain(row["run"])] if with_run else []), *cells)
    return whole_words(table)


def _priority(row: Mapping[str, Any], waiting: bool) -> Text:
    priority = row.get("priority", "normal")
    return Text(priority, style=_PRIORITY_STYLES.get(priority, "") if waiting else "")


def _state(row: Mapping[str, Any]) -> Text:
    if row["shadow"]:
        return Text("shadow", style="dim")
    if row["state"] == "open":  # and, short of a quorum, where it stands
        return Text("open" + (f": {approvals_line([a['by'] for a in row['approvals']], row['quorum'])}"
                              if row.get("approvals") else ""), style="yellow bold")
    return _plain(f"{_RESOLVED_AS.get(row['mode'], row['mode'])} by "
                  f"{who(row['by'], row.get('resolved_role'))}")


def _asker(row: Mapping[str, Any]) -> str:
    """Who asked: the name given, and who the store vouches for where that differs."""
    return who(row.get("requested_by"), row.get("requested_role"))


def _needed(row: Mapping[str, Any]) -> str:
    """The extension an approval needs: computed now (``needed_now_micros``) where the row
    has it, and what it needed when asked beside it when that differs: ``$2.00 (was $1.00)``."""
    asked = row.get("needed_extension_micros", 0)
    now = row.get("needed_now_micros")
    if now is None or now == asked:
        return usd(asked)
    return f"{usd(now)} (was {usd(asked)})"


def _reason_lines(row: Mapping[str, Any]) -> list[str]:
    """The reason cell: what fired and why it was asked, then, for a pool member, what its
    pool has left now."""
    lines = [_why(row)]
    if row.get("run_pool"):
        left = row.get("pool_remaining_micros")
        lines.append(f"pool {row['run_pool']}: " + ("unreadable" if left is None else f"{usd(left)} left"))
    return lines


def _why(row: Mapping[str, Any]) -> str:
    """The reason column: what fired (``pool_cap of pool team-a`` says whose approvers must
    act), then the requester's reason."""
    fired = str(row.get("fired") or row.get("reason") or "-")
    fired += f" of pool {row['pool']}" if row.get("pool") else ""
    return fired + (f": {row['request_reason']}" if row.get("request_reason") else "")


def escalation_panel(view: Mapping[str, Any], *, now: datetime | None = None) -> Table:
    """``escalations show``: one escalation in full (:class:`escalate.reports.inbox.EscalationView`),
    one fact a line; long values wrap."""
    moment = now or datetime.now(UTC)
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")
    waiting = view["state"] == "open" and not view["shadow"]
    kind = view.get("kind", "reserve")
    ask = (f"{usd(view['requested_micros'])} for task " if kind == "reserve" else
           f"{usd(view['from_micros'])} to {usd(view['requested_micros'])} for task ")
    grid.add_row("escalation", _plain(f"{view['id']} of run {view['run']}"))
    grid.add_row("state", _state(view) + (Text(", expires ") + _expires(view, moment) if waiting else ""))
    grid.add_row("asks", _plain(f"{ask}{view['task']} ({kind})"))
    grid.add_row("reason", _plain(view.get("request_reason") or "-"))
    grid.add_row("priority", _priority(view, waiting))
    grid.add_row("fired", _plain(_FIRED.get(view.get("fired", ""), view.get("fired") or "-")
                                 + (f" (pool {view['pool']})" if view.get("pool") else "")))
    asked = f"claimed {view.get('requested_by') or '-'}"
    if view.get("requested_role"):
        asked += f", vouched {view['requested_role']}"
    grid.add_row("who asked", _plain(f"{asked}, {_ago(view['opened_at'], moment)}"))
    grid.add_row("needs now", _plain(_needs_now(view)))
    run = view["run_money"]
    grid.add_row("run", _plain(f"cap {usd(run['cap_micros'])}, committed {usd(run['committed_micros'])}, "
                               f"{usd(run['remaining_micros'])} left; extension left "
                               f"{usd(max(run['extension_left_micros'], 0))}"))
    pool = view.get("pool_money")
    if pool is not None:
        grid.add_row("pool", _plain(f"{pool['pool']} ({pool['period']}): cap {usd(pool['cap_micros'])}, "
                                    f"committed {usd(pool['committed_micros'])}, "
                                    f"{usd(pool['remaining_micros'])} left; extension left "
                                    f"{usd(max(pool['extension_left_micros'], 0))}"))
    elif view.get("run_pool"):
        grid.add_row("pool", _plain(f"{view['run_pool']}: cannot be read"))
    approvers = view.get("approvers") or []
    approvals = view.get("approvals") or []
    names = [who(a["by"], a.get("role")) + (f" {_ago(a['at'], moment)}" if a.get("at") else "")
             for a in approvals]
    grid.add_row("approvals", _plain(
        (approvals_line(names, view.get("quorum", 1)) if names else f"0 of {view.get('quorum', 1)} approvals")
        + "; approvers: " + (", ".join(approvers) if approvers else "anyone but the requester")))
    if view["state"] != "open" or view["shadow"]:
        grid.add_row("settled", _state(view) + (f", {_ago(view['resolved_at'], moment)}"
                                                if view.get("resolved_at") else ""))
    notices = view.get("notices") or []
    grid.add_row("notices", _lines([
        f"{n['attempt']}: {'delivered' if n['ok'] else 'failed'} {_ago(n['at'], moment)} ({n['detail']})"
        for n in notices] or ["none sent"]))
    commands = view.get("commands") or {}
    grid.add_row("answer", _lines(list(commands.values()) or ["nothing to answer"]))
    return grid


_FIRED = {"run_cap": "run_cap: over what the run had left", "threshold": "threshold: over the run's "
          "approval threshold", "pool_cap": "pool_cap: over what the pool had left",
          "pool_threshold": "pool_threshold: over the pool's approval threshold"}


def _needs_now(view: Mapping[str, Any]) -> str:
    """``needs $2.00 now (was $1.00)``: the extension approving it needs now, from what the
    run (or, for a pool_cap escalation, the pool) has left now."""
    asked = view.get("needed_extension_micros", 0)
    now = view.get("needed_now_micros")
    whose = "the pool" if view.get("reason") == "pool_cap" else "the run"
    if now is None:
        return f"nothing now (it needed {usd(asked)} when asked)"
    text = f"{usd(now)} extension of {whose}" if now else "no extension: it fits"
    return text + (f" (was {usd(asked)} when asked)" if now != asked else "")


_RESOLVED_AS = {"extend": "approved", "pause": "paused", "cancel": "cancelled", "withdraw": "withdrawn"}
_PRIORITY_STYLES = {"urgent": "red bold", "high": "yellow", "low": "dim"}


def _ago(ts: str, moment: datetime) -> str:
    """``3m ago``: how long before ``moment`` the instant ``ts`` was."""
    return f"{format_duration(_seconds_between(ts, moment), exact=False)} ago"


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


def _lines(values: Sequence[object]) -> Text:
    """Values from a log as one cell, one a line (each printable, none markup)."""
    return Text("\n").join(_plain(value) for value in values)


def _plain(value: object) -> Text:
    """A value from a log as a cell: printable, and never read as rich markup."""
    return Text(printable(value))
