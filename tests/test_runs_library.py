"""The many-runs calls and the gate as a library (docs/library.md, "The gate and many runs"):
each returns what its command prints with --json, and behaves as the command does on a
missing or wrong runs folder and on a run that cannot be read (the calls and the gate on both
stores; the damaged runs in a runs folder)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from escalate import (
    CorruptLedger,
    InputError,
    Ledger,
    Pending,
    Refused,
    UnknownRun,
    check_gate,
    inbox,
    list_runs,
    sweep_all,
    verify_report,
)
from escalate.core.state import Policy, RunState
from escalate.reports.gate import evaluate
from tests.conftest import FakeClock, Location


@pytest.fixture(autouse=True)
def _not_on_github(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GITHUB_ACTIONS", raising=False)
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)


def two_runs(runs_dir: Location, clock: FakeClock) -> tuple[Ledger, Ledger]:
    """``a``: an open escalation and a halt; ``b``: opened later, one task in flight."""
    a = Ledger.init(runs_dir, "a", cap="10", escalation="enforce", approval_threshold="4",
                    escalation_timeout_s=60, clock=clock)
    with pytest.raises(Pending):
        a.reserve("big", "5")
    with pytest.raises(Refused):
        a.reserve("huge", "11")
    clock.advance(5)
    b = Ledger.init(runs_dir, "b", cap="5", clock=clock)
    b.reserve("t", "4.5")
    return a, b


def break_log(runs_dir: Path, run: str) -> None:
    log = runs_dir / run / "events.ndjson"
    log.write_bytes(log.read_bytes() + b"not json\n" + b'{"v":1}\n')


def test_each_call_returns_what_its_command_prints(store: Location, cli: Any, clock: FakeClock) -> None:
    a, b = two_runs(store, clock)
    assert list_runs(store) == cli("runs", "list", "--json").json()["runs"]
    assert [row["run"] for row in list_runs(store)] == ["b", "a"]
    found = inbox(store)
    assert found["skipped"] == []
    assert found["escalations"] == cli("escalations", "--json").json()["escalations"]
    assert [row["task"] for row in found["escalations"]] == ["big"]
    assert verify_report(a) == cli("runs", "verify", "a", "--json").json()
    assert check_gate(b).to_json() == cli("gate", "b", "--json").json()
    clock.advance(120)
    swept = sweep_all(store, clock=clock)
    assert swept == {"status": "swept", "runs": 2, "expired": [{"run": "a", "escalation_id": "esc-2"}],
                     "notified": [], "deferred": [], "failures": []}
    assert inbox(store, open_only=True)["escalations"] == []


@pytest.mark.parametrize("call", [list_runs, lambda root: inbox(root)["escalations"],
                                  lambda root: sweep_all(root)["expired"]],
                         ids=["list_runs", "inbox", "sweep_all"])
def test_a_missing_runs_folder_is_empty_and_a_file_is_bad_input(tmp_path: Path, call: Any) -> None:
    assert call(tmp_path / "not-yet") == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError) as error:
        call(tmp_path / "file")
    assert (error.value.code, error.value.exit_code) == ("no_runs_dir", 2)


def test_a_broken_run_is_reported_beside_the_others(runs_dir: Path, clock: FakeClock) -> None:
    two_runs(runs_dir, clock)
    break_log(runs_dir, "b")
    rows = list_runs(runs_dir)
    assert [(row["run"], row.get("error")) for row in rows] == [("a", None), ("b", "corrupt_ledger")]
    found = inbox(runs_dir)
    assert [row["run"] for row in found["escalations"]] == ["a"]
    assert [(skipped["run"], skipped["error"]) for skipped in found["skipped"]] == [("b", "corrupt_ledger")]
    with pytest.raises(CorruptLedger):
        inbox(runs_dir, run="b")
    clock.advance(120)
    swept = sweep_all(runs_dir, clock=clock)  # b fails; a is still swept
    assert swept["expired"] == [{"run": "a", "escalation_id": "esc-2"}]
    assert [(f["run"], f["error"], f["exit_code"]) for f in swept["failures"]] == [("b", "corrupt_ledger", 6)]
    with pytest.raises(UnknownRun):
        sweep_all(runs_dir, run="nope")


def test_verify_report_lists_every_problem_without_raising(runs_dir: Path, cli: Any,
                                                           clock: FakeClock) -> None:
    _, b = two_runs(runs_dir, clock)
    before = b.state()
    break_log(runs_dir, "b")
    report = verify_report(b)
    assert report["ok"] is False
    assert [problem["line"] for problem in report["problems"]] == [before.seq + 1, before.seq + 2]
    printed = cli("runs", "verify", "b", "--json")
    assert printed.exit_code == 6
    # The command's error carries the report as its facts.
    assert {k: v for k, v in printed.json().items() if k not in ("error", "message", "exit_code")} \
        == {k: v for k, v in report.items() if k != "run"}


def test_check_gate_gives_the_verdict_annotations_and_summary(store: Location, clock: FakeClock) -> None:
    a, _ = two_runs(store, clock)
    checked = check_gate(a, max_spent="8")
    assert checked.passed is False
    assert [f.code for f in checked.failures] == ["halted", "escalation_open"]
    assert [(n.level, n.message) for n in checked.annotations] == [
        ("error", "run a: 1 task halted (huge: task_cap)"),
        ("error", "run a: 1 escalation open (esc-2 for big)")]
    assert checked.annotations[0].command == ("::error title=escalate gate::run a: 1 task halted "
                                              "(huge: task_cap)")
    assert checked.summary_markdown.startswith("## escalate gate ❌ failed: run `a`")
    assert checked.to_json()["max_spent_micros"] == 8_000_000
    # A state is judged as it is; a ledger is folded strictly first.
    assert check_gate(a.state(), max_spent="8").to_json() == checked.to_json()
    assert check_gate(a, allow_halts=True, allow_open_escalations=True).passed


@given(cap=st.integers(1, 10**15), share=st.integers(0, 1000))
def test_the_near_limit_warning_and_the_bar_colours_agree(cap: int, share: int) -> None:
    """80 % lives in one place: the gate warns exactly where a bar turns from green."""
    from escalate.reports.render import usage_bar

    used = cap * share // 1000
    state = RunState(run_id="r", run_cap_micros=cap, task_cap_micros=cap, policy=Policy(),
                     opened_at="2026-11-23T14:00:00.000000Z", spent_micros=used)
    warned = [w.code for w in evaluate(state).warnings] == ["near_limit"]
    assert warned == (usage_bar(used, cap).style != "green")
    assert warned == (used * 5 >= cap * 4)
