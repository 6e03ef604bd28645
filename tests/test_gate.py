"""``escalate gate``: each exit case, the step summary against a golden file, annotations."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from escalate import Ledger
from escalate.reports.gate import check_gate, evaluate, github_annotation
from tests.conftest import Location

GOLDEN = Path(__file__).parent / "golden"


@pytest.fixture(autouse=True)
def _not_on_github(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GITHUB_ACTIONS", raising=False)
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)


def busy_run(store: Location, clock: Any) -> Ledger:
    """A run with a released task (over its estimate), one in flight, an open escalation and a halt."""
    run = Ledger.init(store, "r", cap="10", escalation="enforce", approval_threshold="4",
                      max_extension="5", clock=clock)
    run.reserve("build", "2")
    run.release("build", "2.5")
    run.reserve("test", "3")
    with pytest.raises(Exception, match="escalated"):
        run.reserve("review", "6")
    with pytest.raises(Exception, match="task cap"):
        run.reserve("deploy", "11")
    return run


def test_within_budget_exits_0(store: Location, cli: Any) -> None:
    run = Ledger.init(store, "r", cap="10")
    run.reserve("t", "4")
    run.release("t", "3")
    result = cli("gate", "r")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "gate passed for run r: committed $3.00 (spent $3.00) of $10.00\n"
    assert result.stderr == ""


def test_exactly_at_the_limit_passes_with_a_warning(store: Location, cli: Any) -> None:
    run = Ledger.init(store, "r", cap="10")
    run.reserve("t", "10")
    run.release("t", "10")
    result = cli("gate", "r", "--json")
    assert result.exit_code == 0
    body = result.json()
    assert body["passed"] is True
    assert body["failures"] == []
    assert [w["code"] for w in body["warnings"]] == ["near_limit"]


def test_spent_over_the_cap_exits_3_with_one_line(store: Location, cli: Any) -> None:
    run = Ledger.init(store, "r", cap="10")
    run.reserve("t", "9")
    run.release("t", "12.5")  # the money is gone: recorded, never refused
    result = cli("gate", "r")
    assert result.exit_code == 3
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("escalate: gate failed for run r: spent $12.50 is over the cap $10.00")
    assert lines[0].endswith("see 'escalate runs show r' for the tasks")


def test_committed_over_max_spent_exits_3(store: Location, cli: Any) -> None:
    run = Ledger.init(store, "r", cap="10")
    run.reserve("a", "2")
    run.release("a", "2")
    run.reserve("b", "4")
    assert cli("gate", "r", "--max-spent", "6").exit_code == 0
    result = cli("gate", "r", "--max-spent", "5.99", "--json")
    assert result.exit_code == 3
    body = result.json()
    assert body["error"] == "gate_failed"
    assert [f["code"] for f in body["failures"]] == ["over_max_committed"]
    assert body["max_spent_micros"] == 5_990_000
    assert body["committed_micros"] == 6_000_000
    assert "committed $6.00 (spent $2.00 + reserved $4.00) is over --max-spent $5.99" in result.stderr


def test_max_spent_default_includes_extensions(store: Location, clock: Any) -> None:
    run = Ledger.init(store, "r", cap="10", escalation="enforce", max_extension="5", clock=clock)
    run.reserve("a", "8")
    with pytest.raises(Exception, match="escalated"):
        run.reserve("b", "4")
    run.approve("esc-3", by="lead")
    state = run.state()
    assert state.cap_micros == 12_000_000
    assert evaluate(state).passed
    assert not evaluate(state, max_spent_micros=11_000_000).passed


def test_halt_fails_unless_allowed(store: Location, cli: Any) -> None:
    run = Ledger.init(store, "r", cap="10")
    run.reserve("small", "8")
    with pytest.raises(Exception, match="halted"):
        run.reserve("big", "5")
    result = cli("gate", "r")
    assert result.exit_code == 3
    assert "1 task halted (big: run_cap)" in result.stderr
    allowed = cli("gate", "r", "--allow-halts")
    assert allowed.exit_code == 0
    assert "escalate: warning: 1 task halted (big: run_cap)" in allowed.stderr


def test_cancelled_escalation_counts_as_a_halt(store: Location, cli: Any) -> None:
    run = Ledger.init(store, "r", cap="10", escalation="enforce", approval_threshold="1")
    with pytest.raises(Exception, match="escalated"):
        run.reserve("t", "2")
    run.cancel("esc-2", by="lead")
    result = cli("gate", "r", "--json")
    assert result.exit_code == 3
    assert result.json()["failures"][0]["message"] == "1 task halted (t: cancelled)"


def test_open_escalation_fails_unless_allowed(store: Location, cli: Any) -> None:
    run = Ledger.init(store, "r", cap="10", escalation="enforce", approval_threshold="1")
    with pytest.raises(Exception, match="escalated"):
        run.reserve("t", "2")
    result = cli("gate", "r")
    assert result.exit_code == 3
    assert "1 escalation open (esc-2 for t)" in result.stderr
    assert cli("gate", "r", "--allow-open-escalations").exit_code == 0
    run.pause("esc-2", by="lead")  # a paused task waits for nobody: the gate passes
    assert cli("gate", "r").exit_code == 0


def test_bad_input_exits_2(store: Location, cli: Any) -> None:
    Ledger.init(store, "r", cap="10")
    bad_amount = cli("gate", "r", "--max-spent", "ten")
    assert bad_amount.exit_code == 2
    assert "invalid --max-spent 'ten'" in bad_amount.stderr
    unknown = cli("gate", "nope", "--json")
    assert unknown.exit_code == 2
    assert unknown.json()["error"] == "unknown_run"


def test_github_annotations_and_summary(store: Location, cli: Any, clock: Any, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    busy_run(store, clock)
    summary = tmp_path / "summary.md"
    summary.write_text("earlier step\n", encoding="utf-8")
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    result = cli("gate", "r")
    assert result.exit_code == 3
    assert result.stdout.splitlines() == [
        "::error title=escalate gate::run r: 1 task halted (deploy: task_cap)",
        "::error title=escalate gate::run r: 1 escalation open (esc-5 for review)",
        "::warning title=escalate gate::run r: 1 task still holds $3.00 (test: $3.00); a job that ended "
        "without its release leaks its hold — release it with 'escalate release r TASK --actual USD'",
    ]
    text = summary.read_text(encoding="utf-8")
    assert text.startswith("earlier step\n")  # appended, never overwritten
    golden = (GOLDEN / "gate_summary_failed.md").read_text(encoding="utf-8")
    assert text.removeprefix("earlier step\n") == golden

    allowed = cli("gate", "r", "--allow-halts", "--allow-open-escalations", "--json")
    assert allowed.exit_code == 0
    assert allowed.json()["passed"] is True
    # With --json, stdout stays one JSON object; the annotations move to stderr.
    assert "::warning title=escalate gate::run r: 1 task halted (deploy: task_cap)" in allowed.stderr
    assert summary.read_text(encoding="utf-8").count("## escalate gate") == 2
    assert "## escalate gate ✅ passed: run `r`" in summary.read_text(encoding="utf-8")


def test_error_is_annotated_on_github(store: Location, cli: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    result = cli("gate", "missing")
    assert result.exit_code == 2
    assert result.stdout.startswith("::error title=escalate gate::budget gate could not check run missing: ")


def test_no_annotations_off_github(store: Location, cli: Any, clock: Any) -> None:
    busy_run(store, clock)
    result = cli("gate", "r")
    assert result.exit_code == 3
    assert "::error" not in result.stdout + result.stderr
    assert result.stdout == ""


def test_annotation_data_is_escaped() -> None:
    line = github_annotation("warning", "100% used\nsecond line")
    assert line == "::warning title=escalate gate::100%25 used%0Asecond line"


def test_golden_summary_is_current(store: Location, clock: Any) -> None:
    """Regenerate with ESCALATE_UPDATE_GOLDEN=1 after an intended change of the summary."""
    from escalate.reports.report import run_markdown

    state = busy_run(store, clock).state()
    text = run_markdown(state, verdict=evaluate(state)) + "\n"
    assert check_gate(state).summary_markdown + "\n" == text  # what the gate command writes
    golden = GOLDEN / "gate_summary_failed.md"
    if os.environ.get("ESCALATE_UPDATE_GOLDEN"):
        golden.write_text(text, encoding="utf-8")
    assert text == golden.read_text(encoding="utf-8")
