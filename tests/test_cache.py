"""The checkpoint cache is derived and disposable: whatever happens to it, every answer is
the one a replay of the log alone gives, byte for byte in the log too."""

from __future__ import annotations

import os
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from escalate import EscalateError, Ledger
from escalate.cache import CACHE_NAME, Rows
from escalate.log import LOG_NAME
from tests.conftest import FakeClock

# Copies of a run leave the cache (and SQLite's -wal/-shm, which a connection closing
# elsewhere may remove mid-copy) behind: the copy is the log alone.
NO_CACHE = shutil.ignore_patterns("*.cache.sqlite*")

# A workload that touches every kind of event: reserves, an increase, halts, an escalation
# that is approved, releases (one over its reservation), and idempotent repeats.
SETUP: list[tuple[str, tuple[Any, ...]]] = [
    ("reserve", ("a", "1.00")),
    ("reserve", ("b", "2.00")),
    ("increase", ("a", "1.50")),
    ("reserve", ("too-big", "9")),
    ("release", ("b", "2.25")),
    ("reserve", ("esc", "3.50")),
]
MORE: list[tuple[str, tuple[Any, ...]]] = [
    ("reserve", ("a", "1.50")),       # exists
    ("reserve", ("b", "1")),          # conflict: released
    ("reserve", ("too-big", "1")),    # refused: halted
    ("approve", ("esc-7",)),
    ("release", ("a", "0.50")),
    ("release", ("esc", "3.00")),
    ("reserve", ("c", "0.25")),
    ("reserve", ("d", "50")),         # halt: over budget
    ("release", ("a", "0.50")),       # exists
    ("release", ("a", "0.60")),       # conflict
]


def _ledger(root: Path, clock: FakeClock) -> Ledger:
    return Ledger.open(root, "r", clock=clock, actor="tester")


def _make(root: Path, clock: FakeClock) -> Ledger:
    Ledger.init(root, "r", cap="10", task_cap="5", escalation="enforce", approval_threshold="3",
                max_extension="5", clock=clock, actor="tester")
    run = _ledger(root, clock)
    _play(run, SETUP)
    return run


def _play(run: Ledger, calls: list[tuple[str, tuple[Any, ...]]]) -> list[Any]:
    outcomes: list[Any] = []
    for method, args in calls:
        try:
            outcomes.append(getattr(run, method)(*args))
        except EscalateError as error:
            outcomes.append((type(error).__name__, error.code, error.message))
    return outcomes


def _view(run: Ledger) -> dict[str, Any]:
    state = run.state()
    return {
        "totals": state.totals(),
        "tasks": {key: task.to_json(key) for key, task in state.tasks.items()},
        "escalations": {e.id: e.to_json() for e in state.escalations.values()},
        "open": sorted(state.open_escalations),
    }


def _delete(cache: Path) -> None:
    cache.unlink()


def _truncate(cache: Path) -> None:
    with open(cache, "r+b") as handle:
        handle.truncate(os.path.getsize(cache) // 2)


def _garbage_middle(cache: Path) -> None:
    size = os.path.getsize(cache)
    with open(cache, "r+b") as handle:
        handle.seek(size // 3)
        handle.write(os.urandom(size // 3))


def _garbage_file(cache: Path) -> None:
    cache.write_bytes(b"not a database at all\n" * 100)


def _empty(cache: Path) -> None:
    cache.write_bytes(b"")


def _flip_row(cache: Path) -> None:
    # A valid SQLite file whose task row says something else: its checksum no longer matches.
    with sqlite3.connect(cache) as connection:
        connection.execute("UPDATE tasks SET data = ? WHERE key = 'b'",
                           (b'["reserved",2000000,true,null,null,null]',))


def _swap_rows(cache: Path) -> None:
    # Two rows that each pass their checksum, filed under each other's ids.
    with sqlite3.connect(cache) as connection:
        connection.execute("UPDATE tasks SET key = CASE key WHEN 'a' THEN '~' ELSE key END")
        connection.execute("UPDATE tasks SET key = 'a' WHERE key = 'b'")
        connection.execute("UPDATE tasks SET key = 'b' WHERE key = '~'")


DAMAGES: dict[str, Callable[[Path], None]] = {
    "deleted": _delete,
    "truncated": _truncate,
    "garbage in the middle": _garbage_middle,
    "garbage file": _garbage_file,
    "empty file": _empty,
    "row edited": _flip_row,
    "rows swapped": _swap_rows,
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_cache_changes_no_answer(tmp_path: Path, damage: str) -> None:
    with_cache, without = tmp_path / "with", tmp_path / "without"
    clock_a, clock_b = FakeClock(), FakeClock()
    _make(with_cache, clock_a)
    shutil.copytree(with_cache, without, ignore=NO_CACHE)
    assert (with_cache / "r" / CACHE_NAME).exists()

    DAMAGES[damage](with_cache / "r" / CACHE_NAME)

    a, b = _ledger(with_cache, clock_a), _ledger(without, clock_b)
    assert _view(a) == _view(b)
    assert _play(a, MORE) == _play(b, MORE)
    assert _view(a) == _view(b)
    assert (with_cache / "r" / LOG_NAME).read_bytes() == (without / "r" / LOG_NAME).read_bytes()


def test_rows_newer_than_the_run_blob_fall_back_to_the_log(tmp_path: Path) -> None:
    # What a cache write cut short could leave: rows from a later fold under an older blob.
    clock = FakeClock()
    run = _make(tmp_path, clock)
    cache = tmp_path / "r" / CACHE_NAME
    with sqlite3.connect(cache) as connection:
        older = connection.execute("SELECT data, crc FROM run").fetchone()
    _play(run, MORE[:6])  # the rows move on ...
    with sqlite3.connect(cache) as connection:  # ... but the run blob goes back
        connection.execute("UPDATE run SET data = ?, crc = ?", older)
    copy = tmp_path / "copy"
    shutil.copytree(tmp_path / "r", copy / "r", ignore=NO_CACHE)
    assert _view(run) == _view(_ledger(copy, FakeClock(clock.now)))
    assert _play(run, MORE[6:]) == _play(_ledger(copy, FakeClock(clock.now)), MORE[6:])
    assert (tmp_path / "r" / LOG_NAME).read_bytes() == (copy / "r" / LOG_NAME).read_bytes()


def test_a_log_appended_behind_the_caches_back_is_folded(tmp_path: Path) -> None:
    clock = FakeClock()
    run = _make(tmp_path, clock)
    stale = (tmp_path / "r" / CACHE_NAME).read_bytes()
    _play(run, MORE)  # the cache moves on ...
    (tmp_path / "r" / CACHE_NAME).write_bytes(stale)  # ... and is put back as it was
    truth_root = tmp_path / "truth"
    shutil.copytree(tmp_path / "r", truth_root / "r", ignore=NO_CACHE)
    assert _view(_ledger(tmp_path, clock)) == _view(_ledger(truth_root, FakeClock(clock.now)))
    # Another writer that keeps no cache appends; the cache is now behind the log.
    other = _ledger(tmp_path, clock)
    other.checkpoint = None
    other.reserve("from-elsewhere", "0.10")
    view = _view(_ledger(tmp_path, clock))
    assert view["tasks"]["from-elsewhere"]["state"] == "reserved"
    assert view["totals"]["events"] == other.state().seq


def test_a_log_replaced_by_another_is_noticed(tmp_path: Path) -> None:
    clock = FakeClock()
    _make(tmp_path, clock)
    cache = tmp_path / "r" / CACHE_NAME
    kept = cache.read_bytes()
    # Recreate the run from scratch (a new file, a different history), then restore the old cache.
    shutil.rmtree(tmp_path / "r")
    Ledger.init(tmp_path, "r", cap="10", clock=clock, actor="tester")
    cache.write_bytes(kept)
    run = _ledger(tmp_path, clock)
    assert run.state().seq == 1
    assert run.reserve("a", "1")["status"] == "reserved"  # "a" is new in this history
    assert run.state().reserved_micros == 1_000_000


def test_a_truncated_log_is_noticed(tmp_path: Path) -> None:
    clock = FakeClock()
    run = _make(tmp_path, clock)
    log = tmp_path / "r" / LOG_NAME
    first_line = log.read_bytes().split(b"\n")[0] + b"\n"
    with open(log, "r+b") as handle:
        handle.truncate(len(first_line))
    assert run.state().seq == 1
    assert run.reserve("a", "1")["status"] == "reserved"


def test_readers_use_the_cache_and_never_write_it(tmp_path: Path) -> None:
    clock = FakeClock()
    run = _make(tmp_path, clock)
    cache = tmp_path / "r" / CACHE_NAME
    before = cache.read_bytes()
    assert run.snapshot().from_checkpoint  # the read came from the checkpoint
    assert cache.read_bytes() == before
    cache.unlink()
    assert not run.snapshot().from_checkpoint  # a read without it replays the log ...
    assert not cache.exists()  # ... and does not build it; the next writer does
    run.reserve("next", "0.01")
    assert cache.exists()


def test_rows_keep_first_seen_order_and_count(tmp_path: Path) -> None:
    clock = FakeClock()
    run = _make(tmp_path, clock)
    _play(run, MORE)
    from_cache = run.snapshot()
    assert from_cache.from_checkpoint
    (tmp_path / "r" / CACHE_NAME).unlink()
    from_log = run.snapshot()
    assert list(from_cache.state.tasks) == list(from_log.state.tasks)
    assert from_cache.state.totals() == from_log.state.totals()


def test_writer_rows_are_lazy_and_counted(tmp_path: Path) -> None:
    clock = FakeClock()
    run = _make(tmp_path, clock)
    loaded = run.checkpoint.load(tmp_path / "r" / LOG_NAME, writable=True) if run.checkpoint else None
    assert loaded is not None
    tasks = loaded[0].tasks
    assert isinstance(tasks, Rows)
    assert len(tasks) == len(_view(run)["tasks"])
    assert "a" in tasks and "nope" not in tasks
    tasks["new"] = tasks["a"]
    assert len(tasks) == len(_view(run)["tasks"]) + 1
