"""Escalations under real concurrency: OS processes released together by a barrier race to
resolve, to reserve against an approval, and wait in other processes for the outcome (on
both stores: on PostgreSQL the waiters wake on LISTEN/NOTIFY)."""

from __future__ import annotations

import contextlib
import io
import multiprocessing
import subprocess
import sys
import time
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any

import orjson
import pytest

from escalate import Ledger, Pending
from escalate.cli import app  # imported before the fork, so children do not pay for it
from tests.conftest import Location, log_bytes

USD = 1_000_000
# fork: the children start at once, so the barrier, not interpreter start-up, decides who is first.
CONTEXT = multiprocessing.get_context("fork")


def log_lines(store: Location, run: str) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in log_bytes(store, run).splitlines()]


def _run_cli(args: list[str]) -> tuple[int, dict[str, Any]]:
    """One ``escalate`` command in this process: (exit code, the JSON it printed)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        try:
            app(args)
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
    return code, orjson.loads(out.getvalue())


def _cli_after_barrier(args: list[str], barrier: Barrier, results: Any) -> None:
    """In a child process: wait for the others, then run one real command and report it."""
    barrier.wait()
    results.put((args, *_run_cli(args)))


@pytest.fixture(scope="module", autouse=True)
def _warm_cli(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Load what the commands import lazily once, before any fork, so that the barrier and
    not start-up cost on a busy machine decides who goes first."""
    root = tmp_path_factory.mktemp("warm")
    run = Ledger.init(root, "w", cap="1", escalation="enforce", approval_threshold="0.5")
    with pytest.raises(Pending):
        run.reserve("t", "1")
    assert _run_cli(["approve", "w", "esc-2", "--runs-dir", str(root), "--by", "alice", "--json"])[0] == 0


def run_together(commands: list[list[str]]) -> list[tuple[list[str], int, dict[str, Any]]]:
    barrier = CONTEXT.Barrier(len(commands))
    results = CONTEXT.Queue()
    children = [CONTEXT.Process(target=_cli_after_barrier, args=(args, barrier, results))
                for args in commands]
    for child in children:
        child.start()
    outcomes = [results.get(timeout=60) for _ in children]
    for child in children:
        child.join(timeout=60)
        assert child.exitcode == 0
    return outcomes


@pytest.mark.parametrize("round_no", range(3))
def test_concurrent_resolutions_one_winner(store: Location, round_no: int) -> None:
    run_id = f"race-{round_no}"
    run = Ledger.init(store, run_id, cap="10", escalation="enforce", approval_threshold="2",
                      max_extension="1")
    with pytest.raises(Pending):
        run.reserve("t", "3")
    modes = ["approve", "pause", "cancel"]
    commands = [[modes[(i + round_no) % 3], run_id, "esc-2", "--by", f"p{i}", "--json",
                 "--lock-timeout", "30s"] for i in range(6)]

    outcomes = run_together(commands)

    winners = [o for o in outcomes if o[1] == 0]
    assert len(winners) == 1, outcomes
    (win_args, _, win_body) = winners[0]
    winner_by = win_args[4]
    winner_mode = {"approve": "extend", "pause": "pause", "cancel": "cancel"}[win_args[0]]
    assert (win_body["by"], win_body["mode"]) == (winner_by, winner_mode)
    for args, code, body in outcomes:
        if args is win_args:
            continue
        assert code == 5, (args, body)
        assert (body["error"], body["by"], body["mode"]) == ("conflict", winner_by, winner_mode)
        assert f"{winner_mode} by {winner_by} at {body['resolved_at']}" in body["message"]

    lines = log_lines(store, run_id)
    resolutions = [e for e in lines if e["type"] == "escalation_resolved"]
    assert len(resolutions) == 1
    assert (resolutions[0]["by"], resolutions[0]["mode"]) == (winner_by, winner_mode)
    follow = {"extend": "budget_reserved", "cancel": "halt"}.get(winner_mode)
    assert [e["type"] for e in lines[resolutions[0]["seq"]:]] == ([follow] if follow else [])
    assert not run.verify().problems


def _assert_never_over_cap(lines: list[dict[str, Any]]) -> None:
    """Fold the log independently: at every prefix, committed <= run cap + extensions so far."""
    cap = lines[0]["run_cap_micros"]
    holding: dict[str, int] = {}
    spent = 0
    for event in lines[1:]:
        kind = event["type"]
        if kind == "budget_reserved":
            holding[event["task"]] = event["amount_micros"]
        elif kind == "budget_increased":
            holding[event["task"]] = event["to_micros"]
        elif kind == "released":
            spent += event["actual_micros"]
            del holding[event["task"]]
        elif kind == "escalation_resolved":
            cap += event["extension_micros"]
        assert spent + sum(holding.values()) <= cap, event["seq"]


@pytest.mark.parametrize("round_no", range(3))
def test_approve_races_other_reserves(store: Location, round_no: int) -> None:
    run_id = f"squeeze-{round_no}"
    run = Ledger.init(store, run_id, cap="10", escalation="enforce", approval_threshold="5",
                      max_extension="3")
    with pytest.raises(Pending):
        run.reserve("big", "6")  # over the threshold only: needs no extension yet
    reservers = [["reserve", run_id, f"w{i}", "--estimate", "1", "--json"] for i in range(6)]
    approver = ["approve", run_id, "esc-2", "--by", "alice", "--json"]
    commands = [*reservers[:round_no], approver, *reservers[round_no:]]

    outcomes = run_together(commands)

    [approved] = [o for o in outcomes if o[0] == approver]
    assert approved[1] == 0, approved
    assert (approved[2]["status"], approved[2]["reserved_micros"]) == ("approved", 6 * USD)
    lines = log_lines(store, run_id)
    [resolved] = [e for e in lines if e["type"] == "escalation_resolved" and e["id"] == "esc-2"]
    granted = lines[resolved["seq"]]  # the line right after it: the same write
    assert (granted["type"], granted["task"], granted["amount_micros"]) == ("budget_reserved", "big", 6 * USD)
    assert granted["ts"] == resolved["ts"]
    # Every other reserve either got its dollar or escalated; none was lost or doubled.
    reserved_small = {e["task"] for e in lines if e["type"] == "budget_reserved" and e["task"] != "big"}
    for args, code, body in outcomes:
        if args == approver:
            continue
        assert code in (0, 4), body
        assert (code == 0) == (args[2] in reserved_small)
    _assert_never_over_cap(lines)
    state = run.state()
    assert state.committed_micros <= state.cap_micros <= 13 * USD
    assert not run.verify().problems


def test_release_races_approve_on_the_same_escalation(runs_dir: Path) -> None:
    """The worker settles while an approver approves its waiting increase: either the release
    withdraws the escalation (and the approval loses), or the approval wins and the release
    settles the raised reservation — never both, never neither."""
    outcomes_seen = set()
    for round_no in range(30):
        run_id = f"settle-{round_no}"
        run = Ledger.init(runs_dir, run_id, cap="10", escalation="enforce", approval_threshold="5",
                          approvers="alice", actor="wk")
        run.reserve("t", "4")
        with pytest.raises(Pending):
            run.increase("t", "6")
        release = ["release", run_id, "t", "--actual", "5", "--by", "wk", "--json", "--lock-timeout", "30s"]
        approve = ["approve", run_id, "esc-3", "--by", "alice", "--json", "--lock-timeout", "30s"]
        commands = [release, approve] if round_no % 2 else [approve, release]

        results = {args[0]: (code, body) for args, code, body in run_together(commands)}

        lines = log_lines(runs_dir, run_id)
        [resolved] = [e for e in lines if e["type"] == "escalation_resolved"]
        [released] = [e for e in lines if e["type"] == "released"]
        assert results["release"][0] == 0, results
        if resolved["mode"] == "withdraw":
            assert (resolved["by"], released["seq"], released["reserved_micros"]) == \
                ("wk", resolved["seq"] + 1, 4 * USD)
            assert not any(e["type"] == "budget_increased" for e in lines)
            assert results["approve"][0] == 5 and "withdraw by wk" in results["approve"][1]["message"]
            assert results["release"][1]["withdrawn_escalation_id"] == "esc-3"
        else:
            assert (resolved["mode"], resolved["by"]) == ("extend", "alice")
            assert [e["type"] for e in lines[resolved["seq"]:]] == ["budget_increased", "released"]
            assert released["reserved_micros"] == 6 * USD
            assert results["approve"][0] == 0 and "withdrawn_escalation_id" not in results["release"][1]
        outcomes_seen.add(resolved["mode"])
        state = run.state()
        assert (state.tasks["t"].state, state.spent_micros, state.reserved_micros) == ("released", 5 * USD, 0)
        assert not run.verify().problems
    # Not asserted: which side wins is up to the scheduler; both are correct.
    print("outcomes seen:", sorted(outcomes_seen))


def _escalate(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "escalate", *args, "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _until_escalated(run: Ledger, task: str, deadline_s: float = 60) -> str:
    """Poll (read-only) until ``task`` has an open escalation; its id."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        task_state = run.state().tasks.get(task)
        if task_state is not None and task_state.escalation_id in run.state().open_escalations:
            return str(task_state.escalation_id)
        time.sleep(0.02)
    raise AssertionError(f"task {task} never escalated")


def test_waiters_in_other_processes_get_the_outcome(store: Location) -> None:
    run = Ledger.init(store, "w", cap="10", escalation="enforce", approval_threshold="1")
    opened = {}
    for task in ("a", "b"):
        with pytest.raises(Pending) as escalated:
            run.reserve(task, "2")
        opened[task] = escalated.value.escalation_id
    waiters = {task: _escalate("wait", "w", opened[task], "--timeout", "60s") for task in opened}
    # These two open their own escalation and then block on it.
    waiters["d"] = _escalate("reserve", "w", "d", "--estimate", "2", "--wait", "--timeout", "60s")
    waiters["e"] = _escalate("reserve", "w", "e", "--estimate", "2", "--wait", "--timeout", "60s")
    try:
        opened["d"] = _until_escalated(run, "d")
        opened["e"] = _until_escalated(run, "e")
        assert all(waiter.poll() is None for waiter in waiters.values())  # all blocked

        run.approve(opened["a"], by="alice")
        run.cancel(opened["b"], by="alice")
        run.approve(opened["d"], by="alice")
        run.pause(opened["e"], by="alice")
        finished = {task: waiter.communicate(timeout=60) for task, waiter in waiters.items()}
    finally:
        for waiter in waiters.values():
            if waiter.poll() is None:
                waiter.kill()
    codes = {task: waiter.returncode for task, waiter in waiters.items()}
    assert codes == {"a": 0, "b": 3, "d": 0, "e": 4}, finished
    bodies = {task: orjson.loads(out) for task, (out, _) in finished.items()}
    for task, body in bodies.items():
        assert body["escalation_id"] == opened[task]
    assert bodies["a"]["status"] == bodies["d"]["status"] == "approved"
    assert bodies["d"]["reserved_micros"] == 2 * USD
    assert (bodies["b"]["error"], bodies["e"]["error"]) == ("cancelled", "paused")
    assert run.state().tasks["d"].state == "reserved"
