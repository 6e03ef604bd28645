"""A run folder swapped for a symbolic link while writers run: nothing lands outside the
runs root, and every reservation reported done is in the real log.

Each command resolves the run folder once (no link followed) and opens the log, the lock
and any side file relative to that handle, so a lock taken in one folder and an append
made in another cannot happen.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from escalate import EscalateError, Ledger

FORK = multiprocessing.get_context("fork")
WRITERS = 4
ATTEMPTS = 400  # the swapper goes on until the writers have made this many


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _writer(runs_dir: Path, worker: int, start: Any, stop: Any, attempts: Any, results: Any) -> None:
    done: list[str] = []
    refused: set[str] = set()
    start.wait()
    attempt = 0
    while not stop.is_set():
        task = f"w{worker}-{attempt}"
        attempt += 1
        with attempts.get_lock():
            attempts.value += 1
        try:
            run = Ledger.open(runs_dir, "r", lock_timeout=60)
            run.reserve(task, "0.01")
        except EscalateError as error:
            refused.add(error.code)
            continue
        except Exception as error:  # reported to the test, which fails on it
            refused.add(type(error).__name__)
            continue
        done.append(task)
    results.put((done, sorted(refused)))


def _swapper(runs_dir: Path, decoy: Path, start: Any, stop: Any, attempts: Any) -> None:
    """Swap the run folder for a link to ``decoy`` and back, one step each time a writer
    starts another attempt, so that commands run in every phase and across every step."""
    run, moved = runs_dir / "r", runs_dir / "r.moved"
    steps = [lambda: os.rename(run, moved), lambda: os.symlink(decoy, run, target_is_directory=True),
             lambda: os.unlink(run), lambda: os.rename(moved, run)]
    start.wait()
    try:
        seen = 0
        while seen < ATTEMPTS:
            for step in steps:
                while attempts.value == seen:
                    os.sched_yield()
                seen = attempts.value
                step()
    finally:
        stop.set()


def test_swapping_the_run_folder_for_a_link_never_writes_outside(tmp_path: Path, audit: Any) -> None:
    runs_dir, outside = tmp_path / "runs", tmp_path / "outside"
    Ledger.init(runs_dir, "r", cap="100000", actor="tester").reserve("first", "1")
    outside.mkdir()
    decoy = outside / "r"
    shutil.copytree(runs_dir / "r", decoy)  # a valid run a link-follower would write into
    for checkpoint in decoy.glob("*.cache.sqlite*"):
        checkpoint.unlink()
    (runs_dir / "r" / "events.ndjson.cache.sqlite").unlink(missing_ok=True)
    before_outside = _tree(outside)

    start, stop, results = FORK.Barrier(WRITERS + 1), FORK.Event(), FORK.Queue()
    attempts = FORK.Value("i", 0)
    writers = [FORK.Process(target=_writer, args=(runs_dir, n, start, stop, attempts, results))
               for n in range(WRITERS)]
    swapper = FORK.Process(target=_swapper, args=(runs_dir, decoy, start, stop, attempts))
    for process in [*writers, swapper]:
        process.start()
    outcomes = [results.get(timeout=300) for _ in writers]
    for process in [*writers, swapper]:
        process.join(60)
        assert process.exitcode == 0

    assert _tree(outside) == before_outside  # not a byte, not a lock or side file, outside
    assert sorted(p.name for p in runs_dir.iterdir()) == ["r"]
    done = [task for tasks, _ in outcomes for task in tasks]
    assert done, "no writer got a reservation through"
    fold = audit(runs_dir / "r" / "events.ndjson")
    reserved = [event["task"] for event in fold.of_type("budget_reserved")]
    assert sorted(reserved) == sorted(["first", *done])  # every exit-0 reservation, once
    refusals = {code for _, codes in outcomes for code in codes}
    assert refusals <= {"symlink", "unknown_run"}, refusals
    assert Ledger.open(runs_dir, "r").verify().problems == []


@pytest.mark.parametrize("checkpoint", ["kept", "rebuilt"])
def test_a_swap_inside_a_command_moves_none_of_its_writes(tmp_path: Path, monkeypatch: Any,
                                                          checkpoint: str) -> None:
    """The run folder is swapped for a link to a decoy run at the worst moment: after the
    lock is taken and the log read, before the append (in ``decide``). The append, the
    fsync and the checkpoint (kept from the last command, or made anew) still go to the folder
    whose lock was taken."""
    from escalate import service
    from escalate.core import decide

    runs_dir, outside = tmp_path / "runs", tmp_path / "outside"
    run = Ledger.init(runs_dir, "r", cap="100", actor="tester")
    run.reserve("first", "1")
    outside.mkdir()
    decoy = outside / "r"
    shutil.copytree(runs_dir / "r", decoy)
    if checkpoint == "rebuilt":
        for path in (runs_dir / "r").glob("*.cache.sqlite*"):
            path.unlink()
        run = Ledger.open(runs_dir, "r", actor="tester")
    before_outside = _tree(outside)
    decide_reserve = decide.decide_reserve

    def swap_then_decide(*args: Any) -> Any:
        os.rename(runs_dir / "r", runs_dir / "r.moved")
        os.symlink(decoy, runs_dir / "r", target_is_directory=True)
        return decide_reserve(*args)

    monkeypatch.setattr(service, "decide_reserve", swap_then_decide)  # (where Ledger.reserve looks it up)
    assert run.reserve("second", "1")["status"] == "reserved"
    assert _tree(outside) == before_outside
    moved = runs_dir / "r.moved" / "events.ndjson"
    assert [line.count(b'"task":"second"') for line in moved.read_bytes().splitlines()][-1] == 1


def test_a_write_opens_its_log_once_and_makes_that_file_durable(tmp_path: Path, monkeypatch: Any) -> None:
    """A command opens the log once, under the lock: the fold's checks, the checkpoint's,
    the append and the fsync after the lock is let go all go through that one descriptor, so
    the file made durable is the file that was checked and written."""
    runs_dir = tmp_path / "runs"
    run = Ledger.init(runs_dir, "r", cap="100", actor="tester")
    run.reserve("first", "1")  # (a Ledger reads its run's first line once: not counted)
    opened: list[int] = []
    synced: list[int] = []
    real_open, real_fsync = os.open, os.fsync

    def recorded_open(path: Any, flags: int, *args: Any, **options: Any) -> int:
        fd = real_open(path, flags, *args, **options)
        if os.fspath(path).endswith("events.ndjson"):
            opened.append(fd)
        return fd

    def recorded_fsync(fd: int) -> None:
        synced.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "open", recorded_open)
    monkeypatch.setattr(os, "fsync", recorded_fsync)
    log = runs_dir / "r" / "events.ndjson"
    for command in (lambda: run.reserve("second", "1"), lambda: run.release("second", "0.5"),
                    lambda: run.release("second", "0.5")):  # (the last: answered, nothing written)
        size = log.stat().st_size
        opened.clear()
        synced.clear()
        command()
        assert len(opened) == 1 and synced == opened, (opened, synced)
    assert log.stat().st_size == size
    assert Ledger.open(runs_dir, "r").verify().problems == []


def test_opening_a_run_resolves_its_folder_once(tmp_path: Path, monkeypatch: Any) -> None:
    """``Ledger.open`` checks that the run is there and reads its first line (its pool)
    through one handle of the run folder: what it found there is what it read; a command
    then resolves the folder once more, for all it does."""
    from escalate.stores.file.run_folder import RunFolder

    runs_dir = tmp_path / "runs"
    Ledger.init(runs_dir, "r", cap="100", actor="tester").close()
    resolved: list[str] = []
    real_open_run_dir = RunFolder._open_run_dir

    def recorded(folder: RunFolder) -> int:
        resolved.append(folder.run_dir.name)
        return real_open_run_dir(folder)

    monkeypatch.setattr(RunFolder, "_open_run_dir", recorded)
    with Ledger.open(runs_dir, "r", actor="tester") as run:
        assert resolved == ["r"] and run.pool_id() is None
        run.reserve("t", "1")
    assert resolved == ["r", "r"]


# Another process takes the run's lock as any writer does, replaces the log with a copy of
# itself (cp + rename: what a backup restore or an editor does), and lets the lock go; it
# waits for a line on stdin and answers one when done.
_REPLACE_LOG = """
import fcntl, os, shutil, sys
run = sys.argv[1]
sys.stdin.readline()
fd = os.open(os.path.join(run, "events.ndjson.lock"), os.O_RDWR)
fcntl.flock(fd, fcntl.LOCK_EX)
shutil.copyfile(os.path.join(run, "events.ndjson"), os.path.join(run, "copy"))
os.replace(os.path.join(run, "copy"), os.path.join(run, "events.ndjson"))
os.close(fd)
print("replaced", flush=True)
"""


def _log_replacer(run_dir: Path) -> Any:
    import subprocess
    import sys

    return subprocess.Popen([sys.executable, "-c", _REPLACE_LOG, str(run_dir)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)


def _replaced_now(replacer: Any) -> None:
    replacer.stdin.write("go\n")
    replacer.stdin.flush()
    assert replacer.stdout.readline() == "replaced\n"


def test_a_write_retried_in_its_command_appends_to_the_log_that_is_there_then(
        tmp_path: Path, monkeypatch: Any) -> None:
    """A write whose checkpoint row fails its checksum is decided again from the log in the
    same command, under the run's lock taken again. If another process replaced the log in
    between, the retry opens the log again under that lock: the acknowledged line is in the
    log that is there, never only in the file moved away."""
    import sqlite3

    import escalate.write as write_module
    from escalate.stores.file.checkpoint import CHECKPOINT_NAME

    runs_dir = tmp_path / "runs"
    Ledger.init(runs_dir, "r", cap="10", actor="tester")
    run = Ledger.open(runs_dir, "r", actor="tester")
    run.reserve("t1", "2")
    run.reserve("t2", "3")
    run.close()
    with contextlib.closing(sqlite3.connect(runs_dir / "r" / CHECKPOINT_NAME)) as db, db:
        assert db.execute("UPDATE tasks SET crc = crc + 1 WHERE key = 't2'").rowcount == 1
    replacer = _log_replacer(runs_dir / "r")
    real, attempts = write_module._write_once, []

    def replaced_before_the_retry(*args: Any, **options: Any) -> Any:
        attempts.append(options["checkpoint"])
        if len(attempts) == 2:  # (the run's lock is free between the attempts)
            _replaced_now(replacer)
        return real(*args, **options)

    monkeypatch.setattr(write_module, "_write_once", replaced_before_the_retry)
    run = Ledger.open(runs_dir, "r", actor="tester")
    assert run.release("t2", "0.5")["status"] == "released"
    assert attempts == [True, False] and replacer.wait() == 0
    monkeypatch.undo()
    fresh = Ledger.open(runs_dir, "r")
    assert fresh.state().tasks["t2"].actual_micros == 500_000
    assert fresh.verify().problems == []


def test_a_log_handle_kept_from_before_the_lock_is_not_used_under_it(tmp_path: Path) -> None:
    """Within one command, a handle on the log opened before the run's lock (a read, or an
    attempt retried under the lock taken again: a damaged checkpoint row, a run whose pool
    changed) is closed when the lock is taken: under it the log is opened again, and is the
    file another process put there in between."""
    runs_dir = tmp_path / "runs"
    Ledger.init(runs_dir, "r", cap="10", actor="tester")
    store = Ledger.open(runs_dir, "r").store
    log_path = runs_dir / "r" / "events.ndjson"
    replacer = _log_replacer(runs_dir / "r")
    log = store.log  # type: ignore[attr-defined]
    with store.command():
        with log.locked():
            before = os.fstat(log.handle(writable=True)).st_ino
        _replaced_now(replacer)
        with log.locked():
            after = os.fstat(log.handle(writable=True)).st_ino
    assert replacer.wait() == 0
    assert before != after == log_path.stat().st_ino


def test_a_write_redispatched_under_the_runs_new_pool_appends_to_the_log_that_is_there_then(
        tmp_path: Path, monkeypatch: Any) -> None:
    """A Ledger that read its run before the run was made again in a pool writes, finds the
    pool under the run's lock and writes again under the pool's lock and the run's, in the
    same command. If another process replaced the log in between, the second attempt opens
    the log again: the acknowledged reservation is in the log that is there."""
    from escalate import service
    from escalate.pools.pool import Pool

    runs_dir = tmp_path / "runs"
    Ledger.init(runs_dir, "r", cap="10", actor="tester")
    run = Ledger.open(runs_dir, "r", actor="tester")
    run.reserve("t1", "1")  # (it knows the run as one without a pool)
    shutil.rmtree(runs_dir / "r")
    Pool.init(runs_dir, "team", cap="100", period="day", actor="owner")
    Ledger.init(runs_dir, "r", cap="10", pool="team", actor="tester")
    replacer = _log_replacer(runs_dir / "r")
    real, pools = service._write_run, []

    def replaced_before_the_second(runs: Any, pool_id: Any, *args: Any, **options: Any) -> Any:
        pools.append(pool_id)
        if len(pools) == 2:  # (no lock is held between the attempts)
            _replaced_now(replacer)
        return real(runs, pool_id, *args, **options)

    monkeypatch.setattr(service, "_write_run", replaced_before_the_second)
    assert run.reserve("t2", "2")["status"] == "reserved"
    assert pools == [None, "team"] and replacer.wait() == 0
    monkeypatch.undo()
    fresh = Ledger.open(runs_dir, "r")
    assert fresh.state().tasks["t2"].reserved_micros == 2_000_000
    assert fresh.verify().problems == []
