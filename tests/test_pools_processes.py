"""Pools under real processes (docs/pools.md): writers racing on the runs of one pool never
take it past its cap, and a writer killed between a run's append and the pool's books
leaves no hole a later reservation could slip through.

Run as a script (``python tests/test_pools_processes.py ROOT SEED``), this file is one
writer of the kill storm."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import Location

from escalate import Ledger
from escalate.errors import EscalateError, Refused
from escalate.pools import Pool

FORK = multiprocessing.get_context("fork")
RUNS = ["r0", "r1", "r2", "r3"]
POOL_CAP = 40_000_000


def make_pool(root: Path | str) -> None:
    Pool.init(root, "pool", cap="40", actor="tester")
    for run in RUNS:
        Ledger.init(root, run, pool="pool", cap="100", actor="tester")


def run_logs(root: Path | str) -> dict[str, bytes]:
    """Each member run's log: read from its folder, or (a store URL) through the library."""
    if isinstance(root, Path):
        return {run: (root / run / "events.ndjson").read_bytes() for run in RUNS}
    logs = {}
    for run in RUNS:
        with Ledger.open(root, run).read_log() as stream:
            logs[run] = stream.read()
    return logs


def merged_history(root: Path | str) -> list[dict[str, Any]]:
    """Every line of the member runs, in the order they were written (one writer at a time
    holds the pool, and each line's time is at least its run's last)."""
    events = []
    for run, data in run_logs(root).items():
        for line in data[:data.rfind(b"\n") + 1].splitlines():  # not a torn tail a kill left
            event = json.loads(line)
            event["run"] = run
            events.append(event)
    return sorted(events, key=lambda event: (event["ts"], event["run"], event["seq"]))


def audit_pool(root: Path | str, cap: int = POOL_CAP) -> tuple[int, int]:
    """An independent fold of the merged history (stdlib only): after every reservation the
    pool's committed money is within its cap. Returns (spent, reserved)."""
    held: dict[tuple[str, str], int] = {}
    spent = 0
    for event in merged_history(root):
        key = (event["run"], event.get("task", ""))
        if event["type"] == "budget_reserved":
            assert key not in held
            held[key] = event["amount_micros"]
        elif event["type"] == "budget_increased":
            assert held[key] == event["from_micros"]
            held[key] = event["to_micros"]
        elif event["type"] == "released":
            assert held.pop(key) == event["reserved_micros"]
            spent += event["actual_micros"]
        if event["type"] in ("budget_reserved", "budget_increased"):
            assert spent + sum(held.values()) <= cap, f"over the pool's cap at {event}"
    return spent, sum(held.values())


def worker(root: Path | str, number: int, start: Any, results: Any) -> None:
    rng = random.Random(number)
    run = Ledger.open(root, RUNS[number % len(RUNS)], lock_timeout=60, actor=f"w{number}")
    start.wait()
    done = refused = 0
    for step in range(40):
        task = f"w{number}-{step}"
        try:
            tenths = rng.randint(1, 20)
            run.reserve(task, str(tenths / 10))
            if rng.random() < 0.3:
                run.increase(task, str((tenths + rng.randint(1, 10)) / 10))
            if rng.random() < 0.8:
                run.release(task, str(rng.randint(0, 10) / 10))
            done += 1
        except Refused:
            refused += 1
    results.put((done, refused))


def test_eight_processes_on_four_runs_never_take_the_pool_past_its_cap(store: Location) -> None:
    root = store  # a runs folder, or a PostgreSQL database
    make_pool(root)
    start, results = FORK.Barrier(8), FORK.Queue()
    workers = [FORK.Process(target=worker, args=(root, n, start, results)) for n in range(8)]
    for process in workers:
        process.start()
    outcomes = [results.get(timeout=300) for _ in workers]
    for process in workers:
        process.join(60)
        assert process.exitcode == 0
    assert sum(done for done, _ in outcomes) > 20 and sum(refused for _, refused in outcomes) > 20
    spent, reserved = audit_pool(root)
    shown = Pool.open(root, "pool").show()
    assert (shown["spent_micros"], shown["reserved_micros"]) == (spent, reserved)
    for run in RUNS:
        assert Ledger.open(root, run).verify().problems == []


def killed_after_the_append(root: Path | str) -> None:
    """Reserve on r0, and die after the run's append, before the pool's books are saved
    (on PostgreSQL: before anything is committed)."""
    from escalate import pool_book

    def die(self: Any, events: list[Any], *args: Any) -> None:
        if events:  # the run's lines are appended; the books would be saved next
            os._exit(9)

    pool_book.MemberWrite.finish = die  # type: ignore[method-assign]
    Ledger.open(root, "r0", actor="doomed").reserve("doomed", "30")


def test_a_writer_killed_before_the_books_are_saved_leaves_no_hole(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    make_pool(root)
    for run in RUNS:
        Ledger.open(root, run).reserve("warm", "0")  # the books exist and are current
    killed = FORK.Process(target=killed_after_the_append, args=(root,))
    killed.start()
    killed.join(60)
    assert killed.exitcode == 9
    assert b'"task":"doomed"' in (root / "r0" / "events.ndjson").read_bytes()  # the money is on record
    with pytest.raises(Refused) as refused:
        Ledger.open(root, "r2").reserve("late", "10.01")  # $10 left: the stale books said $40
    assert refused.value.code == "over_pool_budget" and refused.value.facts["remaining_micros"] == 10_000_000
    assert Ledger.open(root, "r3").reserve("fits", "10")["pool_remaining_micros"] == 0
    audit_pool(root)


def test_deleting_the_books_changes_no_answer(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    make_pool(root)
    Ledger.open(root, "r0").reserve("a", "37")
    for path in (root / "pool").glob("events.ndjson.derived.sqlite*"):
        path.unlink()
    with pytest.raises(Refused):
        Ledger.open(root, "r1").reserve("b", "3.01")
    (root / "pool" / "events.ndjson.derived.sqlite").write_bytes(b"not a database at all")
    assert Ledger.open(root, "r1").reserve("c", "3")["pool_remaining_micros"] == 0


def _spawn(root: Path, seed: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, __file__, str(root), str(seed)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_killed_writers_leave_pool_and_runs_consistent(tmp_path: Path) -> None:
    from tests.killing import kill_storm

    root = tmp_path / "runs"
    make_pool(root)
    rng = random.Random(13)
    kills = kill_storm(lambda slot: _spawn(root, rng.randrange(2**32)), 4, 6.0, rng, lambda: None)
    assert kills >= 8
    after = Ledger.open(root, "r0", actor="tester")
    with contextlib.suppress(EscalateError):  # the next write sets aside what a kill left
        after.reserve("after-the-storm", "0.01")
    for run in RUNS:
        report = Ledger.open(root, run).verify()
        assert report.problems == []
    spent, reserved = audit_pool(root)
    shown = Pool.open(root, "pool").show()
    assert (shown["spent_micros"], shown["reserved_micros"]) == (spent, reserved)
    # What the writers' books say equals the fold of the logs: a write needing exactly the
    # rest of the pool fits, a micro more does not.
    left = POOL_CAP - spent - reserved
    probe = Ledger.open(root, "r1", actor="tester")
    if left > 0:
        with pytest.raises(Refused):
            probe.reserve("one-micro-too-many", f"{(left + 1) / 1e6:.6f}")
        assert probe.reserve("exactly-the-rest", f"{left / 1e6:.6f}")["pool_remaining_micros"] == 0


def _storm_writer(root: Path, seed: int) -> None:
    rng = random.Random(seed)
    runs = {run: Ledger.open(root, run, lock_timeout=60, actor="storm") for run in RUNS}
    print("ready", flush=True)
    while True:
        run = runs[rng.choice(RUNS)]
        task = f"s{seed}-{rng.randrange(10**9)}"
        try:
            run.reserve(task, str(rng.randint(1, 20) / 10))
            run.release(task, str(rng.randint(0, 5) / 100))
        except Refused:
            pass


if __name__ == "__main__":
    _storm_writer(Path(sys.argv[1]), int(sys.argv[2]))
