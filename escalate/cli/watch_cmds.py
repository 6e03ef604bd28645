"""``escalate runs watch RUN``: follow a run as other processes append to it (``runs_cmds``
adds it to the ``runs`` group)."""

from __future__ import annotations

import signal
import sys
import time
from typing import TYPE_CHECKING, Annotated, Any

import typer

from escalate.cli import JsonOption, RunArg, RunsDirOption, echo_line, fail, open_ledger, print_json
from escalate.errors import EscalateError

if TYPE_CHECKING:
    from rich.console import Console

    from escalate.service import Ledger


def watch(
    run: RunArg,
    events: Annotated[int, typer.Option("--events", "-n", min=0, metavar="N",
                                        help="How many recent events to show.")] = 10,
    interval: Annotated[str, typer.Option(
        "--interval", metavar="DURATION",
        help="How often to look for new events in a runs folder, e.g. 200ms or 2s, at most 1h "
        "(a PostgreSQL store tells of them as they commit).")] = "500ms",
    timeout: Annotated[str | None, typer.Option(
        "--timeout", metavar="DURATION",
        help="Stop after this long, e.g. 10m, at most 365d [default: until Ctrl-C].")] = None,
    runs_dir: RunsDirOption = None,
    json_out: JsonOption = False,
) -> None:
    """Redraw RUN as other processes append to it, until Ctrl-C.

    On a terminal the run and its last N events are redrawn in place. Piped, the last
    N events and then each new one are printed one per line as they arrive (with
    --json: one JSON object per event line).
    """
    try:
        from escalate.core.durations import MAX_INTERVAL_S, MAX_WAIT_S, parse_duration
        from escalate.reports.render import console

        pause = max(parse_duration(interval, what="interval", maximum=MAX_INTERVAL_S), 0.01)
        deadline = None if timeout is None else \
            time.monotonic() + parse_duration(timeout, what="timeout", maximum=MAX_WAIT_S)
        ledger = open_ledger(run, runs_dir, None)
        out = console()
        # SIGTERM unwinds like Ctrl-C (exit 143, as a killed process): the live view gets to
        # give the terminal its cursor back.
        signal.signal(signal.SIGTERM, _exit_on_signal)
        try:
            if out.is_terminal and not json_out:
                _redraw(ledger, out, events, pause, deadline)
            else:
                _follow(ledger, events, pause, deadline, json_out)
        except KeyboardInterrupt:  # Ctrl-C is how a watch ends
            return
        finally:
            ledger.close()
    except EscalateError as error:
        fail(error, json_out)


def _exit_on_signal(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


def _redraw(ledger: Ledger, out: Console, last: int, pause: float, deadline: float | None) -> None:
    """Redraw the run whenever its log grows (rich Live)."""
    from rich.console import Group
    from rich.live import Live
    from rich.text import Text

    from escalate.reports.render import run_panel, timeline_table

    def view() -> Group:
        snapshot = ledger.replayed()
        # The header goes first: Live crops what does not fit the terminal from the bottom.
        parts: list[Any] = [Text(f"watching {ledger.run_id} — Ctrl-C to stop", style="dim")]
        if snapshot.problem is not None:
            parts.append(Text(f"warning: {snapshot.problem.message}", style="yellow"))
        parts.append(run_panel(snapshot.state))
        if last:
            parts.append(timeline_table(ledger.events(last=last)[0]))
        return Group(*parts)

    size = ledger.log_size()
    live = Live(view(), console=out, auto_refresh=False, redirect_stdout=False, redirect_stderr=False)
    try:  # not `with`: a signal during start() must still give the cursor back
        live.start(refresh=True)
        while not _past(deadline):
            ledger.wait_for_change(size, _left(deadline), poll_s=pause)
            now_size = ledger.log_size()
            if now_size != size:
                size = now_size
                live.update(view(), refresh=True)
    finally:
        live.stop()


def _follow(ledger: Ledger, last: int, pause: float, deadline: float | None, json_out: bool) -> None:
    """Print the last ``last`` events, then each event as it is appended (like ``tail -f``)."""
    from escalate.reports.report import timeline_line

    size = ledger.log_size()
    batch, offset = ledger.events(last=last)
    while True:
        for event in batch:
            if json_out:
                print_json(event)
            else:
                echo_line(timeline_line(event))
        sys.stdout.flush()
        if _past(deadline):
            return
        ledger.wait_for_change(size, _left(deadline), poll_s=pause)
        size = ledger.log_size()
        batch, offset = ledger.events(after_offset=offset)


def _past(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() >= deadline


def _left(deadline: float | None) -> float:
    """How long to wait for a change before looking at the deadline again."""
    return 60.0 if deadline is None else max(0.0, deadline - time.monotonic())
