"""Real OS processes racing on one run, started together by a barrier.

Every race runs on both stores (a runs folder, a PostgreSQL database) and is checked twice:
by the library's own replay, and by an independent line-by-line audit (conftest.audit_log)
that the cap holds at every prefix of the log, seq runs 1..N without a gap or duplicate, and
the prev chain is intact.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from escalate import Conflict, Ledger, LockTimeout, Refused
from tests.conftest import RESULT_TIMEOUT_S, WORKERS, Location, log_bytes, race_processes

USD = 1_000_000


def _outcome(call: Any) -> str:
    try:
        return str(call()["status"])
    except Refused:
        return "refused"
    except Conflict:
        return "conflict"


# ---------------------------------------------------------------------- reserves


def _reserve_many(worker: int, barrier: Any, root: Location, per_worker: int) -> Counter[str]:
    run = Ledger.open(root, "race", actor=f"worker-{worker}", lock_timeout=60)
    barrier.wait(RESULT_TIMEOUT_S)
    return Counter(_outcome(lambda i=i: run.reserve(f"w{worker}-t{i}", "1"))
                   for i in range(per_worker))


def test_200_reserves_of_one_dollar_against_a_100_dollar_cap(store: Location, audit: Any) -> None:
    Ledger.init(store, "race", cap="100")
    outcomes = race_processes(_reserve_many, store, 200 // WORKERS)

    total: Counter[str] = sum(outcomes, Counter())
    assert total == Counter(reserved=100, refused=100)

    found = audit(log_bytes(store, "race"))  # cap checked at every prefix
    assert found.types == Counter(run_opened=1, budget_reserved=100, halt=100)
    assert [event["seq"] for event in found.events] == list(range(1, 202))
    assert found.reserved_micros == 100 * USD
    assert {event["reason"] for event in found.of_type("halt")} == {"run_cap"}
    assert {event["remaining_micros"] for event in found.of_type("halt")} == {0}
    # Every one of the 200 tasks got exactly one answer on the log.
    tasks = [event["task"] for event in found.events[1:]]
    assert len(tasks) == len(set(tasks)) == 200
    # All eight processes wrote, so the race was real.
    assert {event["actor"] for event in found.events[1:]} == {f"worker-{w}" for w in range(WORKERS)}

    state = Ledger.open(store, "race").state()
    assert (state.reserved_micros, state.remaining_micros, state.halts, state.seq) == (100 * USD, 0, 100, 201)


def _reserve_same_task(worker: int, barrier: Any, root: Location) -> str:
    run = Ledger.open(root, "same", actor=f"worker-{worker}", lock_timeout=60)
    barrier.wait(RESULT_TIMEOUT_S)
    return _outcome(lambda: run.reserve("shared", "5"))


def test_racing_the_same_reservation_appends_it_once(store: Location, audit: Any) -> None:
    Ledger.init(store, "same", cap="10")
    outcomes = race_processes(_reserve_same_task, store)
    assert Counter(outcomes) == Counter(reserved=1, exists=WORKERS - 1)
    found = audit(log_bytes(store, "same"))
    assert found.types == Counter(run_opened=1, budget_reserved=1)
    assert found.held == {"shared": 5 * USD}


def _write_or_read(worker: int, barrier: Any, root: Location, writers: int, per_writer: int) -> Any:
    """Workers below ``writers`` reserve; the others read the run without the lock until the
    last line is in, checking every state they see."""
    run = Ledger.open(root, "watched", actor=f"worker-{worker}", lock_timeout=60)
    final_seq = 1 + writers * per_writer
    barrier.wait(RESULT_TIMEOUT_S)
    if worker < writers:
        return Counter(_outcome(lambda i=i: run.reserve(f"w{worker}-t{i}", "1"))
                       for i in range(per_writer))
    seen_seq = 0
    reads = 0
    while seen_seq < final_seq:
        state = run.state()
        reads += 1
        assert state.seq >= seen_seq, "a reader went back in time"
        seen_seq = state.seq
        assert state.committed_micros <= state.cap_micros
        held = sum(1 for task in state.tasks.values() if task.holding)
        assert held + state.halts == state.seq - 1
        assert state.reserved_micros == held * USD
    return reads


def test_readers_never_see_a_broken_state_while_writers_race(store: Location, audit: Any) -> None:
    writers, per_writer = 6, 30  # 180 reserves of $1 against a $90 cap
    Ledger.init(store, "watched", cap="90")
    outcomes = race_processes(_write_or_read, store, writers, per_writer)
    total: Counter[str] = sum(outcomes[:writers], Counter())
    assert total == Counter(reserved=90, refused=90)
    assert all(reads >= 1 for reads in outcomes[writers:])
    found = audit(log_bytes(store, "watched"))
    assert found.types == Counter(run_opened=1, budget_reserved=90, halt=90)


def _init_run(worker: int, barrier: Any, root: Location) -> str:
    barrier.wait(RESULT_TIMEOUT_S)
    cap = "10" if worker % 2 == 0 else "20"
    try:
        Ledger.init(root, "born", cap=cap, actor=f"worker-{worker}")
    except Conflict:
        return "conflict"
    return cap


def test_racing_runs_init_creates_one_run(store: Location, audit: Any) -> None:
    outcomes = race_processes(_init_run, store)
    found = audit(log_bytes(store, "born"))
    assert found.types == Counter(run_opened=1)
    winner_cap = found.cap_micros // USD
    # Everyone asking for the winner's settings succeeds (idempotent); the others conflict.
    for worker, outcome in enumerate(outcomes):
        asked = 10 if worker % 2 == 0 else 20
        assert outcome == (str(asked) if asked == winner_cap else "conflict")


# ---------------------------------------------------------------------- increases and releases


def _reserve_increase_release(worker: int, barrier: Any, root: Location, per_worker: int) -> Counter[str]:
    """Each task: reserve $1, raise it to $3, release it at $2 actual (also after a halted
    increase: a release is never refused, docs/concepts.md)."""
    run = Ledger.open(root, "flow", actor=f"worker-{worker}", lock_timeout=60)
    seen: Counter[str] = Counter()
    barrier.wait(RESULT_TIMEOUT_S)
    for i in range(per_worker):
        task = f"w{worker}-t{i}"
        reserved = _outcome(lambda task=task: run.reserve(task, "1"))
        seen["reserve:" + reserved] += 1
        if reserved != "reserved":
            continue
        seen["increase:" + _outcome(lambda task=task: run.increase(task, "3", reason="more"))] += 1
        seen["release:" + _outcome(lambda task=task: run.release(task, "2"))] += 1
    return seen


def test_racing_increases_and_releases_with_room_for_all(store: Location, audit: Any) -> None:
    Ledger.init(store, "flow", cap="1000")
    per_worker = 10
    total: Counter[str] = sum(race_processes(_reserve_increase_release, store, per_worker), Counter())
    tasks = WORKERS * per_worker
    assert total == Counter({"reserve:reserved": tasks, "increase:increased": tasks,
                             "release:released": tasks})
    found = audit(log_bytes(store, "flow"))
    assert found.types == Counter(run_opened=1, budget_reserved=tasks, budget_increased=tasks,
                                  released=tasks)
    assert len(found.events) == 1 + 3 * tasks
    assert found.spent_micros == 2 * USD * tasks
    assert found.held == {}
    state = Ledger.open(store, "flow").state()
    assert (state.spent_micros, state.reserved_micros, state.remaining_micros) == (
        160 * USD, 0, 840 * USD)


def test_racing_increases_and_releases_against_a_tight_cap(store: Location, audit: Any) -> None:
    # 80 tasks would like $3 each at peak and settle at $2: a $100 cap cannot hold them all,
    # so some reserves and increases halt, and spending runs past the cap only by releases.
    Ledger.init(store, "flow", cap="100")
    per_worker = 10
    total: Counter[str] = sum(race_processes(_reserve_increase_release, store, per_worker), Counter())
    found = audit(log_bytes(store, "flow"))  # cap checked at every prefix
    reserved_ok = total["reserve:reserved"]
    assert reserved_ok + total["reserve:refused"] == WORKERS * per_worker
    assert total["increase:increased"] + total["increase:refused"] == reserved_ok
    # Nothing is stranded: every reservation is settled, halted increase or not.
    assert total["release:released"] == reserved_ok
    assert total["reserve:refused"] > 0  # the cap did bite
    assert found.types["budget_reserved"] == reserved_ok
    assert found.types["budget_increased"] == total["increase:increased"]
    assert found.types["halt"] == total["reserve:refused"] + total["increase:refused"]
    assert found.types["released"] == reserved_ok
    assert found.held == {}
    assert found.spent_micros == 2 * USD * reserved_ok
    state = Ledger.open(store, "flow").state()
    assert state.spent_micros == found.spent_micros
    assert state.reserved_micros == 0
    assert state.seq == len(found.events)


def _release_all(worker: int, barrier: Any, root: Location, task_count: int) -> dict[str, str]:
    run = Ledger.open(root, "settle", actor=f"worker-{worker}", lock_timeout=60)
    order = [f"t{i}" for i in range(task_count)]
    random.Random(worker).shuffle(order)
    actual = "0.50" if worker % 2 == 0 else "0.75"
    barrier.wait(RESULT_TIMEOUT_S)
    return {task: _outcome(lambda task=task: run.release(task, actual)) for task in order}


def test_racing_repeated_releases_write_exactly_one_released_line(store: Location, audit: Any) -> None:
    run = Ledger.init(store, "settle", cap="100")
    task_count = 40
    for i in range(task_count):
        run.reserve(f"t{i}", "1")
    outcomes = race_processes(_release_all, store, task_count)

    found = audit(log_bytes(store, "settle"))
    released = found.of_type("released")
    assert sorted(event["task"] for event in released) == sorted(f"t{i}" for i in range(task_count))
    for event in released:
        task = event["task"]
        winner_actual = event["actual_micros"]
        answers = [outcomes[worker][task] for worker in range(WORKERS)]
        # Workers sending the winning amount see released (one) or exists; the others conflict.
        same = [answers[w] for w in range(WORKERS) if (500_000 if w % 2 == 0 else 750_000) == winner_actual]
        other = [answers[w] for w in range(WORKERS) if (500_000 if w % 2 == 0 else 750_000) != winner_actual]
        assert sorted(same) == ["exists"] * (len(same) - 1) + ["released"]
        assert other == ["conflict"] * len(other)
    assert found.held == {}
    assert found.types == Counter(run_opened=1, budget_reserved=task_count, released=task_count)


# ---------------------------------------------------------------------- the lock


def test_a_held_lock_times_out_then_is_freed_when_its_holder_dies(
        runs_dir: Path, lock_holder: Any, audit: Any) -> None:
    Ledger.init(runs_dir, "locked", cap="10")
    lock_file = runs_dir / "locked" / "events.ndjson.lock"
    log = runs_dir / "locked" / "events.ndjson"
    before = log.read_bytes()
    with lock_holder(lock_file) as holder:
        with pytest.raises(LockTimeout) as caught:
            Ledger.open(runs_dir, "locked", lock_timeout=0.2).reserve("t", "1")
        assert caught.value.exit_code == 7
        assert caught.value.lock_file == str(lock_file)
        assert str(lock_file) in caught.value.message

        env = {**os.environ, "ESCALATE_RUNS_DIR": str(runs_dir)}
        completed = subprocess.run(
            [sys.executable, "-m", "escalate", "reserve", "locked", "t", "--estimate", "1",
             "--lock-timeout", "0.2"], capture_output=True, text=True, env=env, timeout=60, check=False)
        assert completed.returncode == 7
        assert completed.stdout == ""
        [line] = completed.stderr.splitlines()
        assert str(lock_file) in line
        assert log.read_bytes() == before  # nothing written while the lock was held

        # The kernel drops a flock when its holder dies: no stale lock is left behind.
        os.kill(holder.pid, signal.SIGKILL)
        holder.join(60)
        assert holder.exitcode == -signal.SIGKILL
        result = Ledger.open(runs_dir, "locked", lock_timeout=30).reserve("t", "1")
    assert result["status"] == "reserved"
    assert audit(log).types == Counter(run_opened=1, budget_reserved=1)


# ---------------------------------------------------------------------- one write, then fsync


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name file descriptors")
def test_each_append_is_one_write_then_fsync_and_a_new_run_fsyncs_its_folders(
        runs_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, str, bytes]] = []
    real_write, real_fsync = os.write, os.fsync

    def name(fd: int) -> str:
        return os.readlink(f"/proc/self/fd/{fd}")

    def write(fd: int, data: Any) -> int:
        calls.append(("write", name(fd), bytes(data)))
        return real_write(fd, data)

    def fsync(fd: Any) -> None:
        calls.append(("fsync", name(fd if isinstance(fd, int) else fd.fileno()), b""))
        real_fsync(fd)

    monkeypatch.setattr(os, "write", write)
    monkeypatch.setattr(os, "fsync", fsync)
    log = str(runs_dir.resolve() / "d" / "events.ndjson")

    run = Ledger.init(runs_dir, "d", cap="1")
    fsynced = [path for kind, path, _ in calls if kind == "fsync"]
    assert str(runs_dir.resolve()) in fsynced  # the folder that gained the run folder
    assert str(runs_dir.resolve() / "d") in fsynced  # the run folder that gained the log
    assert log in fsynced

    def log_calls() -> list[tuple[str, bytes]]:
        return [(kind, data) for kind, path, data in calls if path == log]

    steps: list[tuple[Any, int]] = [
        (lambda: run.reserve("t", "0.5"), 1),
        (lambda: _outcome(lambda: run.reserve("u", "2")), 1),  # the halt line
        (lambda: run.increase("t", "0.75"), 1),
        (lambda: run.release("t", "0.5"), 1),
        (lambda: _outcome(lambda: run.release("t", "0.6")), 0),  # conflict: nothing written
        (lambda: run.release("t", "0.5"), 0),  # idempotent repeat: nothing written
    ]
    for step, lines in steps:
        calls.clear()
        step()
        if lines == 0:
            # Nothing written; the answer still waits for an fsync, since it may rest on a
            # line another process wrote and has not yet synced.
            assert log_calls() == [("fsync", b"")]
            continue
        [(first, data), (second, _)] = log_calls()
        assert (first, second) == ("write", "fsync")  # the whole line in one write, then fsync
        assert data.endswith(b"\n") and data.count(b"\n") == lines
