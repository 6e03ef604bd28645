"""Pools under real processes (docs/pools.md): writers racing on the runs of one pool never
take any of its days past its cap, and a writer killed between a run's append and the
pool's books leaves no hole a later reservation could slip through.

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
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import Location

from escalate import Ledger
from escalate.errors import EscalateError, Refused
from escalate.pools.pool import Pool

FORK = multiprocessing.get_context("fork")
RUNS = ["r0", "r1", "r2", "r3"]
POOL_CAP = 40_000_000


def make_pool(root: Path | str, period: str = "none", clock: Any = None) -> None:
    Pool.init(root, "pool", cap="40", period=period, actor="tester", clock=clock)
    for run in RUNS:
        Ledger.init(root, run, pool="pool", cap="100", actor="tester", clock=clock)


class SharedClock:
    """One clock for every forked writer: each reading is ``step`` after the one before, so
    time passes over midnights during the test, and (each write reads it under the pool's
    lock) the lines' order in time is the order they were written in."""

    def __init__(self, start: datetime, step: timedelta) -> None:
        self.start, self.step = start, step
        self.ticks = FORK.Value("q", 0)

    def __call__(self) -> datetime:
        with self.ticks.get_lock():
            self.ticks.value += 1
            return self.start + self.ticks.value * self.step


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


def audit_pool(root: Path | str, cap: int = POOL_CAP,
               period_at: Callable[[str], str] = lambda ts: "all") -> dict[str, tuple[int, int]]:
    """An independent fold of the merged history (stdlib only), by the rule of
    docs/pools.md: money counts in the period (``period_at`` of a line's time) it is added
    in; a release's cost fills the periods its task's money was added in, oldest first,
    and the rest counts when released. After every reservation and increase, the period it
    counts in is within the cap. Returns each period's (spent, reserved)."""
    added: dict[tuple[str, str], list[tuple[str, int]]] = {}  # each task's money by period
    spent: dict[str, int] = {}
    reserved: dict[str, int] = {}
    for event in merged_history(root):
        task, now = (event["run"], event.get("task", "")), period_at(event["ts"])
        if event["type"] == "budget_reserved":
            assert task not in added
            added[task], amount = [], event["amount_micros"]
        elif event["type"] == "budget_increased":
            assert sum(held for _, held in added[task]) == event["from_micros"]
            amount = event["to_micros"] - event["from_micros"]
        elif event["type"] == "released":
            assert sum(held for _, held in added[task]) == event["reserved_micros"]
            cost = event["actual_micros"]
            for period, held in added.pop(task):
                spent[period] = spent.get(period, 0) + min(cost, held)
                reserved[period] -= held
                cost -= min(cost, held)
            spent[now] = spent.get(now, 0) + cost
            continue
        else:
            continue
        added[task].append((now, amount))
        reserved[now] = reserved.get(now, 0) + amount
        assert spent.get(now, 0) + reserved[now] <= cap, f"over the pool's cap at {event}"
    return {period: (spent.get(period, 0), reserved.get(period, 0)) for period in {*spent, *reserved}}


def worker(root: Path | str, number: int, start: Any, results: Any, clock: SharedClock) -> None:
    rng = random.Random(number)
    run = Ledger.open(root, RUNS[number % len(RUNS)], lock_timeout=60, actor=f"w{number}", clock=clock)
    start.wait()
    done = refused = 0
    held: list[tuple[str, int]] = []  # this worker's tasks holding money, in tenths of a dollar
    for step in range(40):
        try:
            if held and rng.random() < 0.5:  # a task of an earlier step, often of an earlier day
                task, tenths = held.pop(rng.randrange(len(held)))
                if rng.random() < 0.4:
                    tenths += rng.randint(1, 10)
                    run.increase(task, str(tenths / 10))
                    held.append((task, tenths))
                else:  # below or above its reservation
                    run.release(task, str(rng.randint(0, 2 * tenths + 5) / 10))
            else:
                task, tenths = f"w{number}-{step}", rng.randint(0, 20)  # $0 placeholders too
                run.reserve(task, str(tenths / 10))
                held.append((task, tenths))
            done += 1
        except Refused:
            refused += 1
    results.put((done, refused))


def test_eight_processes_on_four_runs_never_take_a_day_past_its_cap(store: Location) -> None:
    root = store  # a runs folder, or a PostgreSQL database
    clock = SharedClock(datetime(2026, 11, 23, 20, 0, tzinfo=UTC), timedelta(minutes=15))
    make_pool(root, "day", clock)
    start, results = FORK.Barrier(8), FORK.Queue()
    workers = [FORK.Process(target=worker, args=(root, n, start, results, clock)) for n in range(8)]
    for process in workers:
        process.start()
    outcomes = [results.get(timeout=300) for _ in workers]
    for process in workers:
        process.join(60)
        assert process.exitcode == 0
    assert sum(done for done, _ in outcomes) > 20 and sum(refused for _, refused in outcomes) > 20
    days = audit_pool(root, period_at=lambda ts: ts[:10])  # the pool's days are UTC's
    assert len(days) >= 3  # every write reads the clock: 320 of them take 80 hours at least
    pool = Pool.open(root, "pool", clock=clock)
    for day, (spent, reserved) in days.items():
        shown = pool.show(day)
        assert (shown["spent_micros"], shown["reserved_micros"]) == (spent, reserved), day
    for run in RUNS:
        assert Ledger.open(root, run).verify().problems == []


def killed_after_the_append(root: Path | str) -> None:
    """Reserve on r0, and die after the run's append, before the pool's books are saved
    (on PostgreSQL: before anything is committed)."""
    from escalate.pools import book as pool_book

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
    kills = kill_storm(lambda slot: _spawn(root, rng.randrange(2**32)), 4, 60.0, rng, lambda: None,
                       enough=lambda kills: kills >= 8)
    assert kills >= 8
    after = Ledger.open(root, "r0", actor="tester")
    with contextlib.suppress(EscalateError):  # the next write sets aside what a kill left
        after.reserve("after-the-storm", "0.01")
    for run in RUNS:
        report = Ledger.open(root, run).verify()
        assert report.problems == []
    [(spent, reserved)] = audit_pool(root).values()
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
