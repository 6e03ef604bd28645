"""What a new user hits first: an empty runs folder, hints, repeats, --help, refused caps,
tables in a pipe, colour, a watch ended by SIGTERM, a damaged log, and held reservations."""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from escalate import Ledger
from tests.conftest import Location

ROOT = Path(__file__).resolve().parent.parent


def escalate_process(*args: str, runs_dir: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """``python -m escalate ARGS`` in a real process with pipes for stdout and stderr."""
    environment = {key: value for key, value in os.environ.items()
                   if not key.startswith("ESCALATE_") and key not in ("NO_COLOR", "FORCE_COLOR", "COLUMNS")}
    environment.update(ESCALATE_RUNS_DIR=str(runs_dir), ESCALATE_ACTOR="tester", **env)
    return subprocess.run([sys.executable, "-m", "escalate", *args], env=environment, capture_output=True,
                          text=True, timeout=60, check=False)


# ------------------------------------------------------------------ no runs folder yet


@pytest.mark.parametrize("command", [["runs", "list"], ["escalations"], ["escalations", "--open"], ["sweep"]])
def test_no_runs_folder_yet_is_an_empty_answer(cli: Any, runs_dir: Path, command: list[str]) -> None:
    assert not runs_dir.exists()
    human = cli(*command)
    assert (human.exit_code, human.stderr) == (0, "")
    as_json = cli(*command, "--json")
    assert as_json.exit_code == 0
    assert {"runs list": {"runs": []}, "escalations": {"escalations": []},
            "sweep": {"status": "swept", "runs": 0, "expired": [], "notified": [], "deferred": [],
                      "failures": []}}[
        " ".join(command[:2]) if command[0] == "runs" else command[0]] == as_json.json()
    assert not runs_dir.exists()  # looking creates nothing


def test_no_runs_is_a_hint_to_start_one_and_an_empty_list_in_json(cli: Any, store: Location) -> None:
    if isinstance(store, Path):
        store.mkdir()  # a runs folder that exists, empty
    human = cli("runs", "list")
    assert (human.exit_code, human.stdout, human.stderr) == (
        0, "no runs; start one with 'escalate runs init RUN --cap USD'\n", "")
    as_json = cli("runs", "list", "--json")
    assert (as_json.exit_code, as_json.json(), as_json.stderr) == (0, {"runs": []}, "")
    assert cli("runs", "init", "r", "--cap", "1").exit_code == 0
    assert "no runs" not in cli("runs", "list").stdout


# ------------------------------------------------------------------ messages


def test_the_hint_names_the_real_run(cli: Any) -> None:
    assert cli("runs", "init", "nightly", "--cap", "10", "--escalation", "enforce",
               "--approval-threshold", "1").exit_code == 0
    assert cli("reserve", "nightly", "t", "--estimate", "2").exit_code == 4
    result = cli("release", "nightly", "t", "--actual", "1")  # nothing held yet
    assert result.exit_code == 5
    assert "'escalate wait nightly esc-2'" in result.stderr
    assert "'escalate withdraw nightly esc-2'" in result.stderr
    assert " RUN " not in result.stderr


def test_a_repeated_reserve_or_increase_says_already_reserved(cli: Any) -> None:
    assert cli("runs", "init", "r", "--cap", "10").exit_code == 0
    assert cli("reserve", "r", "t", "--estimate", "2").exit_code == 0
    again = cli("reserve", "r", "t", "--estimate", "2")
    assert again.exit_code == 0
    assert again.stdout == "t: already reserved, nothing changed ($2.00 reserved, remaining $8.00)\n"
    assert cli("increase", "r", "t", "--to", "3").exit_code == 0
    raised_again = cli("increase", "r", "t", "--to", "3")
    assert raised_again.stdout == "t: already reserved, nothing changed ($3.00 reserved, remaining $7.00)\n"
    assert cli("release", "r", "t", "--actual", "2.5").exit_code == 0
    released_again = cli("release", "r", "t", "--actual", "2.5")
    assert released_again.stdout.startswith("t: already released with $2.50 actual, nothing changed")


@pytest.mark.parametrize(("command", "usage", "option_line"), [
    (["reserve"], "Usage: escalate reserve [OPTIONS] RUN TASK", "-e, --estimate USD"),
    (["increase"], "Usage: escalate increase [OPTIONS] RUN TASK", "--to USD"),
    (["release"], "Usage: escalate release [OPTIONS] RUN TASK", "-a, --actual USD"),
    (["approve"], "Usage: escalate approve [OPTIONS] RUN ESCALATION_ID", "--by NAME"),
    (["sweep"], "Usage: escalate sweep [OPTIONS] [RUN]", "--runs-dir PATH"),
    (["gate"], "Usage: escalate gate [OPTIONS] [RUN]", "--max-spent USD"),  # or --pool POOL
    (["runs", "init"], "Usage: escalate runs init [OPTIONS] RUN", "--cap USD"),
    (["runs", "show"], "Usage: escalate runs show [OPTIONS] RUN", "--runs-dir PATH"),
])
def test_help_shows_placeholders_people_write(cli: Any, command: list[str], usage: str,
                                              option_line: str) -> None:
    text = cli(*command, "--help").stdout
    assert text.splitlines()[0] == usage
    assert option_line in text
    assert "{" not in text.splitlines()[0]


def test_a_cap_of_zero_or_less_says_more_than_zero(cli: Any, runs_dir: Path) -> None:
    for cap in ("-5", "0", "-0.01"):
        result = cli("runs", "init", "r", "--cap", cap)
        assert result.exit_code == 2
        assert result.stderr == (f"escalate: invalid cap '{cap}': must be more than 0; give --cap, "
                                 "e.g. --cap 10\n")
    assert not runs_dir.exists()


def test_an_approval_threshold_with_escalation_off_warns(cli: Any) -> None:
    result = cli("runs", "init", "r", "--cap", "10", "--approval-threshold", "3")
    assert result.exit_code == 0
    assert result.stderr == ("escalate: warning: --approval-threshold has no effect while escalation is off; "
                             "add --escalation enforce (or shadow) to use it\n")
    enforced = cli("runs", "init", "s", "--cap", "10", "--approval-threshold", "3", "--escalation", "enforce")
    assert (enforced.exit_code, enforced.stderr) == (0, "")


# ------------------------------------------------------------------ output in pipes

LONG_RUN = "nightly-build-2026-11-30-main"
LONG_TASKS = ("summarise-pull-request-4711", "refactor-module-with-a-long-name-1234")


@pytest.fixture
def wide_ids(runs_dir: Path) -> Ledger:
    run = Ledger.init(runs_dir, LONG_RUN, cap="10", escalation="enforce", approval_threshold="3")
    run.reserve(LONG_TASKS[0], "1")
    with pytest.raises(Exception, match="escalated"):
        run.reserve(LONG_TASKS[1], "3.5")
    return run


@pytest.mark.parametrize(("command", "ids", "headers"), [
    (["runs", "list"], [LONG_RUN], ["run", "cap", "committed", "remaining", "used", "state", "opened"]),
    (["escalations"], [LONG_RUN, "esc-3", LONG_TASKS[1]],
     ["run", "id", "task", "from", "amount", "needed", "priority", "state", "reason"]),
    (["escalations", "--wide"], [LONG_RUN, "esc-3", LONG_TASKS[1]],
     ["run", "id", "task", "amount", "remaining", "state", "age", "expires", "offered"]),
    (["runs", "show", LONG_RUN, "-n", "5"], [LONG_RUN, "esc-3", *LONG_TASKS],
     ["task", "state", "reserved", "actual", "note", "remaining", "reason", "seq", "actor", "event"]),
])
def test_tables_in_an_80_column_pipe_keep_ids_and_headers_whole(
        wide_ids: Ledger, runs_dir: Path, command: list[str], ids: list[str], headers: list[str]) -> None:
    done = escalate_process(*command, runs_dir=runs_dir, COLUMNS="80")
    assert done.returncode == 0, done.stderr
    words = {word.strip(":") for line in done.stdout.splitlines() for word in re.split(r"[\s│┃]+", line)}
    missing = [word for word in (*ids, *headers) if word not in words]
    assert missing == [], done.stdout


def test_no_escape_codes_in_a_pipe_and_an_empty_no_color_keeps_colour(wide_ids: Ledger,
                                                                       runs_dir: Path) -> None:
    piped = escalate_process("runs", "show", LONG_RUN, runs_dir=runs_dir)
    assert piped.returncode == 0 and "\x1b[" not in piped.stdout
    # FORCE_COLOR makes the pipe count as a terminal; NO_COLOR then decides about colour (bold stays).
    colour = re.compile(r"\x1b\[(?:\d+;)*(?:3[0-8]|9[0-7])(?:;\d+)*m")
    coloured = escalate_process("runs", "show", LONG_RUN, runs_dir=runs_dir, FORCE_COLOR="1", NO_COLOR="")
    assert colour.search(coloured.stdout)
    plain = escalate_process("runs", "show", LONG_RUN, runs_dir=runs_dir, FORCE_COLOR="1", NO_COLOR="1")
    assert not colour.search(plain.stdout)


def test_runs_watch_gives_the_cursor_back_on_sigterm(runs_dir: Path) -> None:
    Ledger.init(runs_dir, "r", cap="10")
    ours, theirs = pty.openpty()
    environment = {**{k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR")},
                   "ESCALATE_RUNS_DIR": str(runs_dir), "TERM": "xterm", "COLUMNS": "100", "LINES": "40"}
    watcher = subprocess.Popen([sys.executable, "-m", "escalate", "runs", "watch", "r"], stdin=theirs,
                               stdout=theirs, stderr=theirs, env=environment, close_fds=True)
    os.close(theirs)
    seen = b""

    def read_until(done: Any, seconds: float) -> None:
        nonlocal seen
        deadline = time.monotonic() + seconds
        while not done() and time.monotonic() < deadline:
            ready, _, _ = select.select([ours], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(ours, 65536)
                except OSError:  # the other side closed: the process is gone
                    return
                if not chunk:
                    return
                seen += chunk

    try:
        # The first frame ends with the bottom right corner of its table.
        read_until(lambda: b"watching r" in seen and "┘".encode() in seen, 60)
        assert b"watching r" in seen, seen
        watcher.send_signal(signal.SIGTERM)
        read_until(lambda: False, 30)
        assert watcher.wait(30) == 128 + signal.SIGTERM
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait()
        os.close(ours)
    hide, show = b"\x1b[?25l", b"\x1b[?25h"
    assert hide in seen
    assert seen.rfind(show) > seen.rfind(hide), seen[-300:]


# ------------------------------------------------------------------ a damaged log


def test_a_damaged_log_is_one_warning_line_with_the_totals_it_shows(cli: Any, runs_dir: Path) -> None:
    run = Ledger.init(runs_dir, "r", cap="10")
    for task in ("a", "b", "c"):
        run.reserve(task, "1")
    log = runs_dir / "r" / "events.ndjson"
    lines = log.read_bytes().splitlines(keepends=True)
    lines[3] = b"{not json\n"  # line 4, the reservation of c
    log.write_bytes(b"".join(lines))
    result = cli("runs", "show", "r")
    assert result.exit_code == 0
    [warning] = result.stderr.splitlines()
    assert warning.startswith(f"escalate: warning: {log} line 4: ")
    assert warning.endswith("(totals as of line 3)")
    assert re.search(r"^reserved\s+\$2\.00", result.stdout, re.M), result.stdout
    assert cli("runs", "show", "r", "--json").json()["events"] == 3


def test_totals_stop_before_a_line_the_broken_chain_casts_doubt_on(cli: Any, runs_dir: Path) -> None:
    run = Ledger.init(runs_dir, "r", cap="10")
    for task in ("a", "b", "c"):
        run.reserve(task, "1")
    log = runs_dir / "r" / "events.ndjson"
    lines = log.read_bytes().splitlines(keepends=True)
    lines[2] = lines[2].replace(b'"amount_micros":1000000', b'"amount_micros":9000000')  # b's line
    log.write_bytes(b"".join(lines))
    result = cli("runs", "show", "r", "--json")
    # Line 4 names the break; line 3 (the edited one) is not counted: only a's $1 is.
    assert result.json()["reserved_micros"] == 1_000_000 and result.json()["events"] == 2
    [warning] = cli("runs", "show", "r").stderr.splitlines()
    assert " line 4: " in warning and warning.endswith("(totals as of line 2)")


# ------------------------------------------------------------------ gate and held reservations


def test_gate_warns_on_held_reservations_and_fails_with_fail_on_held(
        runs_dir: Path, cli: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    run = Ledger.init(runs_dir, "r", cap="10")
    run.reserve("crashed-job", "2")
    run.reserve("done", "1")
    run.release("done", "1")
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    passed = cli("gate", "r")
    assert passed.exit_code == 0
    assert ("::warning title=escalate gate::run r: 1 task still holds $2.00 (crashed-job: $2.00); a job "
            "that ended without its release leaks its hold — release it with 'escalate release r TASK "
            "--actual USD'") in passed.stdout.splitlines()
    assert "escalate: warning: 1 task still holds $2.00" in passed.stderr
    failed = cli("gate", "r", "--fail-on-held", "--json")
    assert failed.exit_code == 3
    assert [finding["code"] for finding in failed.json()["failures"]] == ["held"]
    run.release("crashed-job", "0.5")
    clean = cli("gate", "r", "--fail-on-held")
    assert (clean.exit_code, clean.stderr) == (0, "")


def test_a_step_summary_that_cannot_be_written_changes_no_verdict(
        runs_dir: Path, cli: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    Ledger.init(runs_dir, "r", cap="10")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(tmp_path / "no-such-folder" / "summary.md"))
    passed = cli("gate", "r")
    assert passed.exit_code == 0 and passed.stdout.startswith("gate passed for run r")
    assert "escalate: warning: could not append the step summary to GITHUB_STEP_SUMMARY" in passed.stderr


def test_a_bar_is_full_only_when_the_cap_is() -> None:
    from escalate.reports.report import text_bar

    almost = text_bar(54_250_000, 54_450_000)  # 99.6 %
    assert almost.endswith(" 99%") and "░" in almost
    assert "░" not in text_bar(5, 5) and text_bar(0, 5).startswith("░")


def test_runs_init_again_says_the_run_exists_and_what_it_holds(cli: Any) -> None:
    first = cli("runs", "init", "nightly", "--cap", "25", "--json")
    assert first.exit_code == 0 and first.json()["status"] == "created"
    cli("reserve", "nightly", "t", "--estimate", "2")
    cli("release", "nightly", "t", "--actual", "1.5")
    again = cli("runs", "init", "nightly", "--cap", "25")
    assert again.exit_code == 0
    assert again.stdout == ("run nightly already exists with these settings ($1.50 spent, "
                            "$23.50 remaining); nothing changed\n")
    assert cli("runs", "init", "nightly", "--cap", "25", "--json").json()["status"] == "exists"
