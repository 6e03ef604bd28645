"""Rough edges a new user meets first: a missing option value, amounts people type, a silent
``--wait``, ``runs set`` without a change, a wrong runs folder, a sweep that fails, bare
commands, and long ids in messages."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from escalate import Ledger

ROOT = Path(__file__).resolve().parent.parent


def one_line(text: str) -> str:
    lines = text.splitlines()
    assert len(lines) == 1, text
    return lines[0]


# ------------------------------------------------------------------ amounts


def test_a_missing_value_does_not_swallow_the_next_option(cli: Any) -> None:
    assert cli("runs", "init", "demo", "--cap", "10").exit_code == 0
    result = cli("reserve", "demo", "t", "--estimate", "--json")
    assert result.exit_code == 2
    assert one_line(result.stderr) == ("escalate: invalid estimate '--json': that is an option, not an "
                                       "amount — give a value after --estimate")
    as_json = cli("reserve", "demo", "t", "--json", "--estimate", "--wait")
    assert as_json.exit_code == 2
    assert as_json.json()["error"] == "invalid_amount"
    assert as_json.json()["message"].endswith("give a value after --estimate")
    assert cli("increase", "demo", "t", "--to", "--json").stderr.endswith("give a value after --to\n")


@pytest.mark.parametrize(("text", "says"), [
    ("-0", "invalid estimate '-0': expected USD like 2.50"),
    ("1,000", "invalid estimate '1,000': remove the thousands separator, e.g. 1000"),
])
def test_amount_messages_through_the_cli(cli: Any, text: str, says: str) -> None:
    assert cli("runs", "init", "demo", "--cap", "10").exit_code == 0
    result = cli("reserve", "demo", "t", "--estimate", text)
    assert result.exit_code == 2
    assert one_line(result.stderr).startswith(f"escalate: {says}")
    assert "negative" not in result.stderr


def test_a_trailing_dot_is_accepted(cli: Any) -> None:
    assert cli("runs", "init", "demo", "--cap", "10.").exit_code == 0
    reserved = cli("reserve", "demo", "t", "--estimate", "5.", "--json")
    assert reserved.exit_code == 0
    assert reserved.json()["reserved_micros"] == 5_000_000


# ------------------------------------------------------------------ reserve --wait


def _escalating_run(cli: Any) -> None:
    assert cli("runs", "init", "r", "--cap", "10", "--escalation", "enforce",
               "--approval-threshold", "1").exit_code == 0


def test_reserve_wait_says_what_it_waits_for(cli: Any) -> None:
    _escalating_run(cli)
    result = cli("reserve", "r", "t", "--estimate", "2", "--wait", "--timeout", "0.05")
    assert result.exit_code == 4
    first, *rest = result.stderr.splitlines()
    assert first.startswith("escalate: escalated t: $2.00 needs a person")
    assert first.endswith(" — waiting for a person (escalate approve r esc-2)")
    assert "escalate wait" not in first
    assert rest and "still open" in rest[-1]


def test_reserve_wait_prints_before_blocking(runs_dir: Path) -> None:
    Ledger.init(runs_dir, "r", cap="10", escalation="enforce", approval_threshold="1")
    env = {**os.environ, "ESCALATE_RUNS_DIR": str(runs_dir), "PYTHONPATH": str(ROOT)}
    waiter = subprocess.Popen([sys.executable, "-m", "escalate", "reserve", "r", "t", "--estimate", "2",
                               "--wait", "--timeout", "60"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert waiter.stderr is not None
        line = waiter.stderr.readline()  # arrives while the command still blocks
        assert waiter.poll() is None
        assert "waiting for a person (escalate approve r esc-2)" in line
        Ledger.open(runs_dir, "r", actor="boss").approve("esc-2")
        out, _ = waiter.communicate(timeout=60)
    finally:
        if waiter.poll() is None:
            waiter.kill()
            waiter.communicate()
    assert waiter.returncode == 0
    assert "approved by boss" in out


def test_reserve_timeout_needs_wait(cli: Any) -> None:
    _escalating_run(cli)
    result = cli("reserve", "r", "t", "--estimate", "0.5", "--timeout", "10m")
    assert result.exit_code == 2
    assert one_line(result.stderr).startswith("escalate: --timeout only applies with --wait")
    as_json = cli("reserve", "r", "t", "--estimate", "0.5", "--timeout", "1s", "--json")
    assert as_json.json()["error"] == "usage"
    assert cli("runs", "show", "r", "--json").json()["tasks"] == []  # nothing was reserved


# ------------------------------------------------------------------ runs set


def test_runs_set_refuses_both_threshold_options(cli: Any) -> None:
    _escalating_run(cli)
    result = cli("runs", "set", "r", "--approval-threshold", "2", "--no-approval-threshold")
    assert result.exit_code == 2
    assert "disagree" in one_line(result.stderr)


def test_runs_set_without_a_change_is_an_input_error(cli: Any) -> None:
    _escalating_run(cli)
    result = cli("runs", "set", "r")
    assert result.exit_code == 2
    assert one_line(result.stderr) == (
        "escalate: nothing to change; give --escalation, --approval-threshold, --no-approval-threshold, "
        "--escalation-timeout, --max-extension, --approvers, --approver-key, --renotify-every "
        "or --no-renotify")
    assert cli("runs", "set", "r", "--json").json()["error"] == "usage"


def test_runs_set_says_what_changed(cli: Any) -> None:
    assert cli("runs", "init", "t3", "--cap", "10").exit_code == 0
    assert cli("runs", "set", "t3", "--max-extension", "5").stdout == "run t3: max extension $0.00 → $5.00\n"
    changed = cli("runs", "set", "t3", "--escalation", "enforce", "--approval-threshold", "2.5",
                  "--escalation-timeout", "90m")
    assert changed.stdout == ("run t3: escalation off → enforce, approval threshold none → $2.50, "
                              "escalation timeout 1h → 90m\n")
    assert cli("runs", "set", "t3", "--no-approval-threshold").stdout == \
        "run t3: approval threshold $2.50 → none\n"
    assert cli("runs", "set", "t3", "--max-extension", "5").stdout == \
        "run t3: escalation policy unchanged (enforce)\n"
    assert cli("runs", "set", "t3", "--max-extension", "6", "--json").json()["status"] == "changed"


def test_runs_set_help_shows_no_init_defaults(cli: Any) -> None:
    help_text = " ".join(cli("runs", "set", "--help").stdout.split())  # undo the wrapping
    assert "[default: 1h]" not in help_text and "[default: 0]" not in help_text
    assert help_text.count("[default: unchanged]") == 5
    assert "[default: 1h]" in " ".join(cli("runs", "init", "--help").stdout.split())


# ------------------------------------------------------------------ the runs folder


LISTING = [pytest.param(["runs", "list"], id="runs-list"), pytest.param(["escalations"], id="escalations"),
           pytest.param(["sweep"], id="sweep")]


@pytest.mark.parametrize("command", LISTING)
def test_a_runs_folder_that_is_a_file_is_an_input_error(cli: Any, runs_dir: Path, command: list[str]) -> None:
    runs_dir.parent.mkdir(parents=True, exist_ok=True)
    runs_dir.write_text("not a folder")
    result = cli(*command)
    assert result.exit_code == 2
    assert one_line(result.stderr) == (
        f"escalate: the runs folder {runs_dir} is a file; give a folder with --runs-dir or ESCALATE_RUNS_DIR")
    assert cli(*command, "--json").json()["error"] == "no_runs_dir"


@pytest.mark.parametrize("command", LISTING)
def test_an_empty_runs_folder_is_fine(cli: Any, runs_dir: Path, command: list[str]) -> None:
    runs_dir.mkdir()
    assert cli(*command).exit_code == 0


# ------------------------------------------------------------------ sweep failures


def test_sweep_reports_a_failed_run_and_exits_with_its_code(cli: Any, runs_dir: Path) -> None:
    assert cli("runs", "init", "good", "--cap", "10").exit_code == 0
    assert cli("runs", "init", "bad", "--cap", "10").exit_code == 0
    with (runs_dir / "bad" / "events.ndjson").open("ab") as log:
        log.write(b"{not json\n")
    result = cli("sweep")
    assert result.exit_code == 6
    assert result.stdout.startswith("swept 2 run(s): 0 escalation(s) paused by timeout, 1 run(s) failed")
    failure = one_line(result.stderr)
    assert failure.startswith("escalate: bad: ")
    as_json = cli("sweep", "--json")
    assert as_json.exit_code == 6
    assert [(f["run"], f["error"]) for f in as_json.json()["failures"]] == [("bad", "corrupt_ledger")]
    assert one_line(as_json.stderr) == failure


# ------------------------------------------------------------------ bare commands and usage errors


@pytest.mark.parametrize(("args", "usage"), [([], "Usage: escalate [OPTIONS] COMMAND"),
                                             (["runs"], "Usage: escalate runs [OPTIONS] COMMAND")])
def test_bare_command_prints_help(cli: Any, args: list[str], usage: str) -> None:
    result = cli(*args)
    assert result.exit_code == 0
    assert result.stderr == ""
    assert result.stdout.startswith(usage)
    assert "--help'" not in result.stdout


def test_bare_command_in_a_real_process() -> None:
    done = subprocess.run([sys.executable, "-m", "escalate"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60, check=False)
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout.startswith("Usage: escalate")


def test_one_line_usage_errors_keep_their_hint(cli: Any) -> None:
    result = cli("runs", "list", "--bogus")
    assert result.exit_code == 2
    assert one_line(result.stderr) == \
        "escalate: error: No such option: --bogus; see 'escalate runs list --help'"


# ------------------------------------------------------------------ messages and docs


def test_a_long_invalid_id_keeps_its_closing_quote(cli: Any) -> None:
    result = cli("runs", "show", "a/" + "a" * 200)
    assert result.exit_code == 2
    message = one_line(result.stderr)
    assert "'a/aaaa" in message and "...': use 1-128" in message


def test_docs_name_the_usage_code_and_watch_json() -> None:
    exit_codes = (ROOT / "docs" / "exit-codes.md").read_text()
    row = next(line for line in exit_codes.splitlines() if line.startswith("| 2 |"))
    assert "`usage`" in row and "`no_runs_dir`" in row
    assert "`runs watch --json`" in (ROOT / "README.md").read_text()
