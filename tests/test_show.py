"""``runs show`` formats and timeline, ``runs list``, ``runs watch``, and shell manners:
no colour codes in a pipe or under NO_COLOR, and errors that say what to do next."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from escalate import Ledger
from tests.conftest import FakeClock

ESC = "\x1b["
# An SGR sequence that sets a foreground or background colour (bold, dim, italic are not colour).
COLOUR = re.compile(r"\x1b\[(?:[0-9]+;)*(?:3[0-9]|4[0-9]|9[0-7]|10[0-7])(?:;[0-9]+)*m")


@pytest.fixture
def run(runs_dir: Path, clock: FakeClock) -> Ledger:
    ledger = Ledger.init(runs_dir, "r", cap="10", clock=clock)
    for task, estimate, actual in (("a", "1", "0.5"), ("b", "2", "2.25"), ("c", "3", None)):
        clock.advance(60)
        ledger.reserve(task, estimate)
        if actual is not None:
            ledger.release(task, actual)
    return ledger


def test_table_is_the_default_format(run: Ledger, cli: Any) -> None:
    default = cli("runs", "show", "r")
    assert default.exit_code == 0
    assert default.stdout == cli("runs", "show", "r", "--format", "table").stdout
    assert "remaining" in default.stdout and "$4.25" in default.stdout
    assert "last" not in default.stdout  # no timeline unless asked
    assert ESC not in default.stdout


def test_json_format_is_the_json_flag(run: Ledger, cli: Any) -> None:
    by_format = cli("runs", "show", "r", "-f", "json")
    assert by_format.exit_code == 0
    assert by_format.stdout == cli("runs", "show", "r", "--json").stdout
    body = by_format.json()
    assert (body["spent_micros"], body["reserved_micros"], body["remaining_micros"]) == (
        2_750_000, 3_000_000, 4_250_000)
    assert [t["task"] for t in body["tasks"]] == ["a", "b", "c"]
    assert "recent_events" not in body


def test_json_flag_and_other_format_disagree(run: Ledger, cli: Any) -> None:
    result = cli("runs", "show", "r", "--json", "--format", "markdown")
    assert result.exit_code == 2
    assert result.json()["error"] == "invalid_input"
    assert "give one of them" in result.stderr
    assert cli("runs", "show", "r", "--format", "yaml").exit_code == 2


def test_markdown_format(run: Ledger, cli: Any) -> None:
    result = cli("runs", "show", "r", "--format", "markdown", "--events", "2")
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[0] == "## escalate run `r`"
    assert "| remaining | $4.25 |" in lines
    assert "| `c` | reserved | $3.00 |" in lines
    assert "### Last 2 events" in lines
    # Values from the log are Markdown-escaped ("\\$" shows as "$", and can open no math).
    assert lines[-2:] == ["5. `2026-11-23 14:02:00` tester: released b: \\$2.25 actual of \\$2.00 reserved",
                          "6. `2026-11-23 14:03:00` tester: reserved c: \\$3.00"]


def test_events_timeline(run: Ledger, cli: Any) -> None:
    table = cli("runs", "show", "r", "--events", "2")
    assert table.exit_code == 0
    assert "last 2 events" in table.stdout
    assert "reserved c: $3.00" in table.stdout
    assert "released b: $2.25 actual of $2.00 reserved" in table.stdout
    assert "reserved b: $2.00" not in table.stdout  # the third-last event is not shown
    body = cli("runs", "show", "r", "--json", "-n", "3").json()
    assert [e["seq"] for e in body["recent_events"]] == [4, 5, 6]
    assert body["recent_events"][-1]["type"] == "budget_reserved"
    many = cli("runs", "show", "r", "--json", "-n", "100").json()
    assert [e["seq"] for e in many["recent_events"]] == [1, 2, 3, 4, 5, 6]
    assert cli("runs", "show", "r", "--events", "-1").exit_code == 2


def test_list_newest_first(runs_dir: Path, cli: Any) -> None:
    old_clock, new_clock = FakeClock(), FakeClock()
    new_clock.advance(3600)
    Ledger.init(runs_dir, "zz-old", cap="5", clock=old_clock).reserve("t", "5")
    Ledger.init(runs_dir, "aa-new", cap="20", clock=new_clock)
    rows = cli("runs", "list", "--json").json()["runs"]
    assert [row["run"] for row in rows] == ["aa-new", "zz-old"]
    assert [(r["cap_micros"], r["committed_micros"], r["remaining_micros"], r["state"]) for r in rows] == [
        (20_000_000, 0, 20_000_000, "idle"), (5_000_000, 5_000_000, 0, "active")]
    table = cli("runs", "list").stdout
    assert table.index("aa-new") < table.index("zz-old")
    for heading in ("cap", "committed", "remaining", "state"):
        assert heading in table


def _append_later(runs_dir: Path, delay: float, monkeypatch: pytest.MonkeyPatch) -> threading.Thread:
    """Append one reservation ``delay`` seconds after the watch first waits for a change
    (its first output is out by then), from another thread, as another process would."""
    started = threading.Event()
    wait_for_change = Ledger.wait_for_change

    def waiting(self: Ledger, *args: Any, **kwargs: Any) -> bool:
        started.set()
        return wait_for_change(self, *args, **kwargs)

    monkeypatch.setattr(Ledger, "wait_for_change", waiting)

    def append() -> None:
        started.wait(10)
        time.sleep(delay)
        Ledger.open(runs_dir, "r").reserve("late", "1")

    thread = threading.Thread(target=append)
    thread.start()
    return thread


def test_watch_piped_prints_new_events(run: Ledger, runs_dir: Path, cli: Any,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    thread = _append_later(runs_dir, 0.1, monkeypatch)
    result = cli("runs", "watch", "r", "--events", "1", "--interval", "50ms", "--timeout", "1.2s")
    thread.join()
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "#6  2026-11-23 14:03:00  tester  reserved c: $3.00"
    assert len(lines) == 2 and lines[1].startswith("#7  ") and lines[1].endswith("reserved late: $1.00")


def test_watch_json_is_one_event_per_line(run: Ledger, runs_dir: Path, cli: Any,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    thread = _append_later(runs_dir, 0.1, monkeypatch)
    result = cli("runs", "watch", "r", "-n", "0", "--interval", "50ms", "--timeout", "1s", "--json")
    thread.join()
    assert result.exit_code == 0
    assert [orjson.loads(line)["task"] for line in result.stdout.splitlines()] == ["late"]


def test_watch_redraws_on_a_terminal(run: Ledger, runs_dir: Path, cli: Any,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORCE_COLOR", "1")  # rich treats the output as a terminal: Live redraws
    thread = _append_later(runs_dir, 0.1, monkeypatch)
    result = cli("runs", "watch", "r", "--interval", "50ms", "--timeout", "1.2s")
    thread.join()
    assert result.exit_code == 0
    frames = result.stdout.split("watching r")[1:]
    assert len(frames) >= 2
    assert "late" not in frames[0]  # the first frame is from before the append …
    assert "reserved late: $1.00" in frames[-1]  # … and a redraw shows it
    assert "\x1b[1A" in result.stdout  # redrawn in place (cursor up), not appended
    assert not COLOUR.search(result.stdout)  # NO_COLOR (set by the fixture): no colour codes


def test_watch_unknown_run(runs_dir: Path, cli: Any) -> None:
    result = cli("runs", "watch", "missing", "--timeout", "0s")
    assert result.exit_code == 2
    assert "create it with 'escalate runs init missing --cap USD'" in result.stderr


def test_no_colour_when_piped(run: Ledger, runs_dir: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR")}
    piped = subprocess.run([sys.executable, "-m", "escalate", "runs", "show", "r", "-n", "3"],
                           capture_output=True, env=env, check=True)
    assert b"remaining" in piped.stdout
    assert ESC.encode() not in piped.stdout


def test_no_color_respected_even_on_a_terminal(run: Ledger, cli: Any,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORCE_COLOR", "1")
    monkeypatch.delenv("NO_COLOR")
    coloured = cli("runs", "show", "r").stdout
    assert COLOUR.search(coloured)  # the control: a terminal gets colour …
    monkeypatch.setenv("NO_COLOR", "1")
    plain = cli("runs", "show", "r").stdout
    assert not COLOUR.search(plain)  # … but not under NO_COLOR
    assert "remaining" in plain


# Each error a user meets most, and the words that say what to do next.
ERROR_CASES: list[tuple[list[str], str]] = [
    (["reserve", "nope", "t", "-e", "1"], "create it with 'escalate runs init nope --cap USD'"),
    (["reserve", "r", "t", "-e", "abc"], "expected USD like 2.50"),
    (["reserve", "r", "bad/id", "-e", "1"], "use 1-128 ASCII letters"),
    (["reserve", "r", "x", "-e", "100"], "ask for at most $10.00 under a new task id"),
    (["reserve", "r", "a", "-e", "1"], "reserve under a new task id"),
    (["increase", "r", "c", "--to", "1"], "--to is the new absolute amount"),
    (["release", "r", "zz", "--actual", "1"], "reserve it first"),
    (["release", "r", "a", "--actual", "9"], "check the task id"),
    (["approve", "r", "esc-99"], "list them with 'escalate escalations --run r'"),
    (["runs", "init", "r", "--cap", "11"], "pick a new run id"),
    (["runs", "init", "q", "--cap", "5", "--task-cap", "6"], "lower --task-cap or raise --cap"),
    (["reserve", "r", "t", "--lock-timeout", "soon", "-e", "1"], "use a number of seconds"),
    (["reserve", "r"], "see 'escalate reserve --help'"),
    (["wait", "r", "esc-99", "--timeout", "0s"], "list them with 'escalate escalations --run r'"),
]


@pytest.mark.parametrize(("args", "next_step"), ERROR_CASES, ids=lambda value: " ".join(value)
                         if isinstance(value, list) else "")
def test_errors_say_what_to_do_next(run: Ledger, cli: Any, args: list[str], next_step: str) -> None:
    result = cli(*args)
    assert result.exit_code != 0
    lines = result.stderr.splitlines()
    assert len(lines) == 1, lines
    assert next_step in lines[0]


def test_a_large_replay_shows_a_progress_bar_on_a_terminal_only(
        runs_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    from rich.console import Console

    from escalate.core import events
    from escalate.reports.render import ReplayProgress
    from escalate.service import Ledger as Run

    monkeypatch.setattr(events, "_READ_CHUNK", 4096)  # many reads, as a large log would take

    run = Run.init(runs_dir, "big", cap="1000")
    for number in range(300):
        run.reserve(f"t{number}", "1")
    size = (runs_dir / "big" / "events.ndjson").stat().st_size
    calls: list[tuple[int, int]] = []
    run.progress = lambda done, total: calls.append((done, total))
    run.verify()
    assert calls[-1] == (size, size)
    assert all(total == size for _, total in calls)
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)

    terminal = io.StringIO()
    run.progress = ReplayProgress(Console(file=terminal, force_terminal=True, width=80), threshold=1)
    run.verify()
    assert "reading the log" in terminal.getvalue()

    piped = io.StringIO()
    run.progress = ReplayProgress(Console(file=piped, force_terminal=False, width=80), threshold=1)
    run.verify()
    assert piped.getvalue() == ""
    small = io.StringIO()
    run.progress = ReplayProgress(Console(file=small, force_terminal=True, width=80), threshold=size + 1)
    run.verify()
    assert small.getvalue() == ""


def test_runs_show_events_describes_every_line_a_run_holds(runs_dir: Path) -> None:
    """Every event type of a run's log has its line in ``runs show --events`` and ``runs
    watch`` (an event type added without one would show as unknown to this version)."""
    from escalate.reports.report import describe_event
    from tests.test_docs import drive_every_event_type

    drive_every_event_type(runs_dir)
    unknown, seen = set(), set()
    for folder in sorted(runs_dir.iterdir()):
        events = [orjson.loads(line) for line in (folder / "events.ndjson").read_bytes().splitlines()]
        if events[0]["type"] != "run_opened":
            continue  # a pool's log: never shown as a run's timeline
        seen |= {event["type"] for event in events}
        unknown |= {event["type"] for event in events if "unknown to this version" in describe_event(event)}
    assert "run_archived" in seen
    assert unknown == set()
