"""The checkpoint is derived and disposable: whatever happens to it, every answer is
the one a replay of the log alone gives, byte for byte in the log too."""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from escalate import EscalateError, Ledger
from escalate.core.events import line_hash, seal
from escalate.stores.file.checkpoint import CHECKPOINT_NAME, Rows
from escalate.stores.file.log import LOG_NAME
from tests.conftest import FakeClock

# Copies of a run leave the checkpoint (and SQLite's -wal/-shm, which a connection closing
# elsewhere may remove mid-copy) behind: the copy is the log alone.
NO_CHECKPOINT = shutil.ignore_patterns("*.cache.sqlite*")

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


def _delete(checkpoint: Path) -> None:
    checkpoint.unlink()


def _truncate(checkpoint: Path) -> None:
    with open(checkpoint, "r+b") as handle:
        handle.truncate(os.path.getsize(checkpoint) // 2)


def _garbage_middle(checkpoint: Path) -> None:
    size = os.path.getsize(checkpoint)
    with open(checkpoint, "r+b") as handle:
        handle.seek(size // 3)
        handle.write(os.urandom(size // 3))


def _garbage_file(checkpoint: Path) -> None:
    checkpoint.write_bytes(b"not a database at all\n" * 100)


def _empty(checkpoint: Path) -> None:
    checkpoint.write_bytes(b"")


def _flip_row(checkpoint: Path) -> None:
    # A valid SQLite file whose task row says something else: its checksum no longer matches.
    with sqlite3.connect(checkpoint) as connection:
        connection.execute("UPDATE tasks SET data = ? WHERE key = 'b'",
                           (b'["reserved",2000000,true,null,null,null]',))


def _swap_rows(checkpoint: Path) -> None:
    # Two rows that each pass their checksum, filed under each other's ids.
    with sqlite3.connect(checkpoint) as connection:
        connection.execute("UPDATE tasks SET key = CASE key WHEN 'a' THEN '~' ELSE key END")
        connection.execute("UPDATE tasks SET key = 'a' WHERE key = 'b'")
        connection.execute("UPDATE tasks SET key = 'b' WHERE key = '~'")


def _zero_page(table: str) -> Callable[[Path], None]:
    """Zero the first page of ``table`` (or index): SQLite then fails every read through it."""

    def damage(checkpoint: Path) -> None:
        with contextlib.closing(sqlite3.connect(checkpoint)) as connection:
            connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # every page in the main file
            page_size = connection.execute("PRAGMA page_size").fetchone()[0]
            [root] = connection.execute("SELECT rootpage FROM sqlite_master WHERE name = ?",
                                        (table,)).fetchone()
        with open(checkpoint, "r+b") as handle:
            handle.seek((root - 1) * page_size)
            handle.write(bytes(page_size))

    return damage


DAMAGES: dict[str, Callable[[Path], None]] = {
    "deleted": _delete,
    "truncated": _truncate,
    "garbage in the middle": _garbage_middle,
    "garbage file": _garbage_file,
    "empty file": _empty,
    "row edited": _flip_row,
    "rows swapped": _swap_rows,
    "zeroed task table page": _zero_page("tasks"),
    "zeroed task index page": _zero_page("sqlite_autoindex_tasks_1"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_checkpoint_changes_no_answer(tmp_path: Path, damage: str) -> None:
    with_checkpoint, without = tmp_path / "with", tmp_path / "without"
    clock_a, clock_b = FakeClock(), FakeClock()
    _make(with_checkpoint, clock_a)
    shutil.copytree(with_checkpoint, without, ignore=NO_CHECKPOINT)
    assert (with_checkpoint / "r" / CHECKPOINT_NAME).exists()

    DAMAGES[damage](with_checkpoint / "r" / CHECKPOINT_NAME)

    a, b = _ledger(with_checkpoint, clock_a), _ledger(without, clock_b)
    assert _view(a) == _view(b)
    assert _play(a, MORE) == _play(b, MORE)
    assert _view(a) == _view(b)
    assert (with_checkpoint / "r" / LOG_NAME).read_bytes() == (without / "r" / LOG_NAME).read_bytes()


def test_rows_newer_than_the_run_blob_fall_back_to_the_log(tmp_path: Path) -> None:
    # What a checkpoint write cut short could leave: rows from a later fold under an older blob.
    clock = FakeClock()
    run = _make(tmp_path, clock)
    checkpoint = tmp_path / "r" / CHECKPOINT_NAME
    with sqlite3.connect(checkpoint) as connection:
        older = connection.execute("SELECT data, crc FROM run").fetchone()
    _play(run, MORE[:6])  # the rows move on ...
    with sqlite3.connect(checkpoint) as connection:  # ... but the run blob goes back
        connection.execute("UPDATE run SET data = ?, crc = ?", older)
    copy = tmp_path / "copy"
    shutil.copytree(tmp_path / "r", copy / "r", ignore=NO_CHECKPOINT)
    assert _view(run) == _view(_ledger(copy, FakeClock(clock.now)))
    assert _play(run, MORE[6:]) == _play(_ledger(copy, FakeClock(clock.now)), MORE[6:])
    assert (tmp_path / "r" / LOG_NAME).read_bytes() == (copy / "r" / LOG_NAME).read_bytes()


def test_a_log_appended_behind_the_checkpoints_back_is_folded(tmp_path: Path) -> None:
    clock = FakeClock()
    run = _make(tmp_path, clock)
    stale = (tmp_path / "r" / CHECKPOINT_NAME).read_bytes()
    _play(run, MORE)  # the checkpoint moves on ...
    (tmp_path / "r" / CHECKPOINT_NAME).write_bytes(stale)  # ... and is put back as it was
    truth_root = tmp_path / "truth"
    shutil.copytree(tmp_path / "r", truth_root / "r", ignore=NO_CHECKPOINT)
    assert _view(_ledger(tmp_path, clock)) == _view(_ledger(truth_root, FakeClock(clock.now)))
    # Another writer that keeps no checkpoint appends; the checkpoint is now behind the log.
    other = _ledger(tmp_path, clock)
    other.store.checkpoint = None
    other.reserve("from-elsewhere", "0.10")
    view = _view(_ledger(tmp_path, clock))
    assert view["tasks"]["from-elsewhere"]["state"] == "reserved"
    assert view["totals"]["events"] == other.state().seq


def test_a_log_replaced_by_another_is_noticed(tmp_path: Path) -> None:
    clock = FakeClock()
    _make(tmp_path, clock)
    checkpoint = tmp_path / "r" / CHECKPOINT_NAME
    kept = checkpoint.read_bytes()
    # Recreate the run from scratch (a new file, a different history), then restore the old checkpoint.
    shutil.rmtree(tmp_path / "r")
    Ledger.init(tmp_path, "r", cap="10", clock=clock, actor="tester")
    checkpoint.write_bytes(kept)
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


def _read_through_checkpoint(run: Ledger) -> tuple[Any, bool]:
    """A reader's fold of ``run``, and whether it started from the checkpoint."""
    checkpoint = run.store.checkpoint
    load, loaded = checkpoint.load, []

    def recorded(*args: Any, **kwargs: Any) -> Any:
        found = load(*args, **kwargs)
        loaded.append(found is not None)
        return found

    checkpoint.load = recorded
    try:
        return run.replayed(), any(loaded)
    finally:
        del checkpoint.load


def test_readers_use_the_checkpoint_and_never_write_it(tmp_path: Path) -> None:
    clock = FakeClock()
    run = _make(tmp_path, clock)
    checkpoint = tmp_path / "r" / CHECKPOINT_NAME
    before = checkpoint.read_bytes()
    assert _read_through_checkpoint(run)[1]  # the read came from the checkpoint
    assert checkpoint.read_bytes() == before
    checkpoint.unlink()
    assert not _read_through_checkpoint(run)[1]  # a read without it replays the log ...
    assert not checkpoint.exists()  # ... and does not build it; the next writer does
    run.reserve("next", "0.01")
    assert checkpoint.exists()


def test_rows_keep_first_seen_order_and_count(tmp_path: Path) -> None:
    clock = FakeClock()
    run = _make(tmp_path, clock)
    _play(run, MORE)
    from_checkpoint, through_checkpoint = _read_through_checkpoint(run)
    assert through_checkpoint
    (tmp_path / "r" / CHECKPOINT_NAME).unlink()
    from_log = run.replayed()
    assert list(from_checkpoint.state.tasks) == list(from_log.state.tasks)
    assert from_checkpoint.state.totals() == from_log.state.totals()


def test_writer_rows_are_lazy_and_counted(tmp_path: Path) -> None:
    clock = FakeClock()
    run = _make(tmp_path, clock)
    checkpoint = run.store.checkpoint
    log = os.open(tmp_path / "r" / LOG_NAME, os.O_RDONLY)
    try:
        loaded = checkpoint.load(log, writable=True) if checkpoint else None
        # A second load in the same transaction is the same checkpoint, not a fall-back to the log.
        assert checkpoint is not None and checkpoint.load(log, writable=True) is not None
    finally:
        os.close(log)
    assert loaded is not None
    tasks = loaded[0].tasks.rows
    assert isinstance(tasks, Rows)
    assert len(tasks) == len(_view(run)["tasks"])
    assert "a" in tasks and "nope" not in tasks
    tasks["new"] = tasks["a"]
    assert len(tasks) == len(_view(run)["tasks"]) + 1



def test_a_writer_at_a_current_checkpoint_reads_no_line(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer whose checkpoint matches the log to its last byte (same file, untouched)
    folds nothing more: no read of the log after it; a log grown behind it is still folded."""
    from escalate.stores import checkpoint as codec

    clock = FakeClock()
    run = _make(tmp_path, clock)
    folds: list[int] = []
    replay = codec.replay

    def counted(*args: Any, **options: Any) -> Any:
        folds.append(1)
        return replay(*args, **options)

    monkeypatch.setattr(codec, "replay", counted)
    run.reserve("fresh", "0.25")
    assert folds == []
    log = tmp_path / "r" / LOG_NAME
    state = run.state()
    [(_, line, _)] = seal([{"type": "budget_reserved", "task": "behind", "amount_micros": 1}],
                          seq=state.seq, prev=state.last_hash, ts=state.last_ts, actor="other")
    with log.open("ab") as out:
        out.write(line + b"\n")
    run.reserve("after", "0.25")
    assert folds and run.state().tasks["behind"].reserved_micros == 1
    truth_root = tmp_path / "truth"
    shutil.copytree(tmp_path / "r", truth_root / "r", ignore=NO_CHECKPOINT)
    assert _view(run) == _view(_ledger(truth_root, clock))

def test_a_writer_reads_back_nothing_it_saved_itself_and_every_other_writers(tmp_path: Path) -> None:
    """A writer whose last save is still the checkpoint (the same file through its kept
    connection, its run-wide row still the bytes of that save, the log untouched since) reads
    that row back once and decodes nothing, nor reads back the rows it wrote then; after
    another writer's write it reads what that one saved, and every answer is the log's."""
    clock = FakeClock()
    run, other = _make(tmp_path, clock), _ledger(tmp_path, clock)
    run.reserve("t1", "1")
    statements: list[str] = []
    checkpoint = run.store.checkpoint
    assert checkpoint is not None and checkpoint._writer is not None
    checkpoint._writer.set_trace_callback(statements.append)
    run.reserve("t2", "1")
    assert len([s for s in statements if "FROM run" in s]) == 1
    statements.clear()
    run.release("t2", "0.5")  # (the row of t2 it saved too)
    assert len([s for s in statements if "FROM run" in s]) == 1
    assert [s for s in statements if "FROM tasks" in s] == []
    other.reserve("t3", "1")
    other.release("t1", "0.5")
    statements.clear()
    run.reserve("t4", "1")
    assert [s for s in statements if "FROM run" in s] != []
    assert run.reserve("t3", "1")["status"] == "exists"
    truth_root = tmp_path / "truth"
    shutil.copytree(tmp_path / "r", truth_root / "r", ignore=NO_CHECKPOINT)
    assert _view(run) == _view(_ledger(truth_root, clock))
    assert run.verify().problems == []


def test_a_writer_builds_no_state_from_its_own_save(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer whose last save is still the checkpoint takes the state it saved as it is (no
    state built again from the run-wide row); after another writer's write it builds the one
    that writer saved, and every answer is the log's."""
    from escalate.stores.file import checkpoint as file_checkpoint

    built: list[int] = []
    state_from_blob = file_checkpoint.state_from_blob

    def counted(*args: Any) -> Any:
        built.append(1)
        return state_from_blob(*args)

    monkeypatch.setattr(file_checkpoint, "state_from_blob", counted)
    clock = FakeClock()
    run, other = _make(tmp_path, clock), _ledger(tmp_path, clock)
    run.reserve("t1", "1")
    built.clear()
    run.reserve("t2", "1")
    run.release("t2", "0.5")
    assert built == []
    other.reserve("t3", "1")
    assert built == [1]
    built.clear()
    assert run.reserve("t3", "1")["status"] == "exists"
    assert built == [1]
    truth_root = tmp_path / "truth"
    shutil.copytree(tmp_path / "r", truth_root / "r", ignore=NO_CHECKPOINT)
    assert _view(run) == _view(_ledger(truth_root, clock))


def test_a_writer_that_rebuilt_the_checkpoint_keeps_no_whole_fold(tmp_path: Path) -> None:
    """A writer that folded the whole log (no checkpoint to start from) keeps nothing of that
    fold past its command: its state holds every task, and a long-lived handle would hold it
    between commands. The next command builds its state from the checkpoint just saved."""
    clock = FakeClock()
    run = _make(tmp_path, clock)
    run.close()
    (tmp_path / "r" / CHECKPOINT_NAME).unlink()
    run.reserve("t1", "1")
    checkpoint = run.store.checkpoint
    assert checkpoint is not None and checkpoint._saved is not None
    assert checkpoint._saved[4] is None
    run.reserve("t2", "1")
    assert checkpoint._saved is not None and checkpoint._saved[4] is not None
    assert run.verify().problems == []


def test_a_command_refused_after_its_fold_leaves_no_state_kept(tmp_path: Path) -> None:
    """The state a writer saved is folded into in place by its next command: when that
    command is refused after folding lines it then does not write (an escalation's expiry,
    before an approval of an unknown id), nothing of it is kept, and the command after it
    decides from the checkpoint as the file holds it: it writes the expiry itself."""
    clock = FakeClock()
    run = _make(tmp_path, clock)  # (esc-7 is open, and expires in an hour)
    run.reserve("t1", "1")
    clock.advance(2 * 3600)
    lines = (tmp_path / "r" / LOG_NAME).read_bytes()
    with pytest.raises(EscalateError, match="no escalation nope"):
        run.approve("nope", by="boss")
    assert (tmp_path / "r" / LOG_NAME).read_bytes() == lines
    assert run.reserve("t2", "1")["status"] == "reserved"
    written = [orjson.loads(line) for line in (tmp_path / "r" / LOG_NAME).read_bytes().splitlines()]
    assert [event["type"] for event in written[-2:]] == ["escalation_resolved", "budget_reserved"]
    truth_root = tmp_path / "truth"
    shutil.copytree(tmp_path / "r", truth_root / "r", ignore=NO_CHECKPOINT)
    assert _view(run) == _view(_ledger(truth_root, clock))
    assert run.verify().problems == []


# Another process folds SQLite's write-ahead log into the checkpoint (as any sqlite3 client
# may), then copies it to ``argv[2]`` (a backup) or from ``argv[2]`` over it in place (same
# file: `cp backup cache.sqlite`, `rsync --inplace`).
_BACKUP_OR_RESTORE = """
import sqlite3, sys
checkpoint, backup, restore = sys.argv[1], sys.argv[2], sys.argv[3] == "restore"
connection = sqlite3.connect(checkpoint)
connection.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
connection.close()
if restore:
    with open(backup, "rb") as source, open(checkpoint, "r+b") as target:
        target.write(source.read())
        target.truncate()
else:
    with open(checkpoint, "rb") as source, open(backup, "wb") as target:
        target.write(source.read())
"""


def _backup_or_restore(checkpoint: Path, backup: Path, what: str) -> None:
    subprocess.run([sys.executable, "-c", _BACKUP_OR_RESTORE, str(checkpoint), str(backup), what],
                   check=True)


def test_an_older_checkpoint_put_back_in_place_is_never_taken_for_a_writers_own_save(
        tmp_path: Path) -> None:
    """A long-lived writer's save is the checkpoint; another process then puts an older copy
    of the checkpoint back over the same file (the log untouched since that save). The writer
    finds its run-wide row is no longer its save's (a random token in each save), so it
    trusts nothing it kept: the older copy names another state of the log and is bypassed.
    A task released before is not released twice, and no later writer passes the cap."""
    clock = FakeClock()
    Ledger.init(tmp_path, "r", cap="10", clock=clock, actor="tester")
    checkpoint, backup = tmp_path / "r" / CHECKPOINT_NAME, tmp_path / "backup.sqlite"
    other = _ledger(tmp_path, clock)
    other.reserve("t5", "3")
    _backup_or_restore(checkpoint, backup, "backup")  # (t5 holds $3 in it)
    other.release("t5", "1")
    other.close()
    run = _ledger(tmp_path, clock)
    run.reserve("a1", "1")  # (its save is now the checkpoint)
    _backup_or_restore(checkpoint, backup, "restore")
    assert run.release("t5", "1")["status"] == "exists"
    with pytest.raises(EscalateError, match="already released"):
        run.reserve("t5", "3")
    run.reserve("b1", "4")
    with pytest.raises(EscalateError):
        run.reserve("b2", "5")  # ($4 left of the cap: halted)
    truth_root = tmp_path / "truth"
    shutil.copytree(tmp_path / "r", truth_root / "r", ignore=NO_CHECKPOINT)
    assert _view(run) == _view(_ledger(truth_root, clock))
    assert run.verify().problems == []
    run.close()


def test_a_writers_command_is_one_sqlite_transaction(tmp_path: Path) -> None:
    """A writer's reads of the checkpoint and its save are one SQLite transaction, and a
    command that writes nothing lets it go: no connection is left inside one."""
    clock = FakeClock()
    run, other = _make(tmp_path, clock), _ledger(tmp_path, clock)
    run.reserve("t1", "1")
    checkpoint = run.store.checkpoint
    assert checkpoint is not None and checkpoint._writer is not None
    connection = checkpoint._writer
    statements: list[str] = []
    connection.set_trace_callback(statements.append)
    other.reserve("t2", "1")  # (so that the run-wide row is read back)
    run.release("t1", "0.5")
    assert statements[0] == "BEGIN IMMEDIATE" and statements[-1] == "COMMIT", statements
    assert statements.count("BEGIN IMMEDIATE") == 1 and any("FROM run" in s for s in statements)
    statements.clear()
    assert run.release("t1", "0.5")["status"] == "exists"  # nothing written
    assert statements[0] == "BEGIN IMMEDIATE" and statements[-1] == "ROLLBACK", statements
    assert not connection.in_transaction
    assert run.verify().problems == []


# ---------------------------------------------------------------------- a checkpoint that cannot be used


def _checkpoint_is_folder(checkpoint: Path, outside: Path) -> None:
    for name in (checkpoint, Path(f"{checkpoint}-wal"), Path(f"{checkpoint}-shm")):
        name.unlink(missing_ok=True)
    checkpoint.mkdir()


def _checkpoint_links_outside(checkpoint: Path, outside: Path) -> None:
    # A valid checkpoint, moved out of the run folder: SQLite would follow the link and use it.
    checkpoint.rename(outside)
    checkpoint.symlink_to(outside)


def _wal_links_outside(checkpoint: Path, outside: Path) -> None:
    outside.write_bytes(b"not escalate's\n")
    Path(f"{checkpoint}-wal").unlink(missing_ok=True)  # empty since the checkpoint
    Path(f"{checkpoint}-wal").symlink_to(outside)


def _journal_links_outside(checkpoint: Path, outside: Path) -> None:
    outside.write_bytes(b"not escalate's\n")
    Path(f"{checkpoint}-journal").symlink_to(outside)


def _checkpoint_hard_linked(checkpoint: Path, outside: Path) -> None:
    os.link(checkpoint, outside)


# Each leaves the checkpoint in a state SQLite could use, at the cost of writing outside the run
# folder, or that it cannot use at all.
UNUSABLE: dict[str, Callable[[Path, Path], None]] = {
    "checkpoint is a folder": _checkpoint_is_folder,
    "checkpoint is a symlink": _checkpoint_links_outside,
    "-wal is a symlink": _wal_links_outside,
    "-journal is a symlink": _journal_links_outside,
    "checkpoint is hard-linked": _checkpoint_hard_linked,
}


@pytest.mark.parametrize("unusable", list(UNUSABLE))
def test_a_checkpoint_that_cannot_be_used_is_bypassed(cli: Any, runs_dir: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch, unusable: str) -> None:
    assert cli("runs", "init", "r", "--cap", "10").exit_code == 0
    assert cli("reserve", "r", "a", "--estimate", "1").exit_code == 0
    run_dir = runs_dir / "r"
    with contextlib.closing(sqlite3.connect(run_dir / CHECKPOINT_NAME)) as connection:
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the checkpoint is one file now
    outside = tmp_path / "outside"
    UNUSABLE[unusable](run_dir / CHECKPOINT_NAME, outside)
    outside_before = outside.read_bytes() if outside.exists() else None
    log = run_dir / LOG_NAME
    synced: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.fstat(fd).st_ino)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    for attempt in range(2):  # the write, then its retry: both succeed
        synced.clear()
        done = cli("reserve", "r", "b", "--estimate", "2", "--json")
        assert done.exit_code == 0, done.stdout + done.stderr
        assert done.json()["status"] == ("reserved", "exists")[attempt]
        assert log.stat().st_ino in synced  # the append was made durable before the answer
    done = cli("release", "r", "a", "--actual", "1", "--json")
    assert done.exit_code == 0 and done.json()["status"] == "released"
    assert cli("runs", "verify", "r").exit_code == 0
    assert len(log.read_bytes().splitlines()) == 4
    if outside_before is not None:
        assert outside.read_bytes() == outside_before  # never written through a link


def test_an_immutable_checkpoint_is_bypassed(cli: Any, runs_dir: Path) -> None:
    # What a second user meets in a shared run folder: a checkpoint it can neither write nor remove.
    assert cli("runs", "init", "r", "--cap", "10").exit_code == 0
    assert cli("reserve", "r", "a", "--estimate", "1").exit_code == 0
    checkpoint = runs_dir / "r" / CHECKPOINT_NAME
    if subprocess.run(["chattr", "+i", str(checkpoint)], capture_output=True, check=False).returncode:
        pytest.skip("chattr +i is not available here")
    try:
        for attempt in range(2):
            done = cli("reserve", "r", "b", "--estimate", "2", "--json")
            assert done.exit_code == 0, done.stdout + done.stderr
            assert done.json()["status"] == ("reserved", "exists")[attempt]
        assert cli("runs", "show", "r", "--json").json()["reserved_micros"] == 3_000_000
    finally:
        subprocess.run(["chattr", "-i", str(checkpoint)], check=True)
    assert cli("runs", "verify", "r").exit_code == 0


# ---------------------------------------------------------------------- threads


THREADS_CHILD = """
import sqlite3, sys, threading
from pathlib import Path
from escalate import Ledger
from escalate.stores.file.checkpoint import CHECKPOINT_NAME

root = Path(sys.argv[1])
TASKS, THREADS = 160, 4
Ledger.init(root, "r", cap="1000", actor="tester")
setup = Ledger.open(root, "r", actor="tester")
for number in range(TASKS):
    setup.reserve(f"t{number}", "1")
shared = Ledger.open(root, "r", actor="tester")


def break_every_row() -> None:
    # Under the run's lock, as a writer would: every task row now fails its CRC.
    with Ledger.open(root, "r").store.log.locked(), \
            sqlite3.connect(root / "r" / CHECKPOINT_NAME) as checkpoint:
        checkpoint.execute("UPDATE tasks SET crc = crc + 1")


start = threading.Barrier(THREADS)
outcomes: list[str] = []


def worker(first: int) -> None:
    start.wait()
    for number in range(first, TASKS, THREADS):
        try:
            outcomes.append(shared.release(f"t{number}", "0.5")["status"])
        except Exception as error:
            outcomes.append(repr(error))
        break_every_row()


break_every_row()
threads = [threading.Thread(target=worker, args=(n,)) for n in range(THREADS)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print(sorted(set(outcomes)), len(outcomes))
"""


def test_threads_sharing_a_ledger_survive_a_damaged_checkpoint(tmp_path: Path) -> None:
    # Run in a child: the failure this guards against is a crash inside SQLite (SIGSEGV).
    done = subprocess.run([sys.executable, "-c", THREADS_CHILD, str(tmp_path)], capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-2000:]}"
    assert done.stdout.split() == ["['released']", "160"]
    report = Ledger.open(tmp_path, "r").verify()
    assert report.problems == [] and report.state.spent_micros == 80_000_000


# ---------------------------------------------------------------------- the gate


def test_the_gate_never_passes_a_log_verify_fails(cli: Any, runs_dir: Path) -> None:
    # An edit in place before the checkpointed offset, plus a correctly chained line after it: the
    # log grew, so a reader through the checkpoint folds only the new line and sees no problem.
    assert cli("runs", "init", "r", "--cap", "10").exit_code == 0
    for task in ("a", "b", "c"):
        assert cli("reserve", "r", task, "--estimate", "1").exit_code == 0
    log = runs_dir / "r" / LOG_NAME
    lines = log.read_bytes().splitlines()
    edited = lines[2].replace(b'"amount_micros":1000000', b'"amount_micros":9000000')
    assert len(edited) == len(lines[2]) and edited != lines[2]
    last = orjson.loads(lines[-1])
    [(_, appended, _)] = seal([{"type": "budget_reserved", "task": "d", "amount_micros": 1}],
                              seq=last["seq"], prev=line_hash(lines[-1]), ts=last["ts"], actor="x")
    with log.open("r+b") as handle:
        handle.seek(sum(len(line) + 1 for line in lines[:2]))
        handle.write(edited)
        handle.seek(0, os.SEEK_END)
        handle.write(appended + b"\n")
    assert cli("runs", "verify", "r").exit_code == 6
    gate = cli("gate", "r", "--json")
    assert gate.exit_code == 6, gate.stdout
    assert gate.json()["error"] == "corrupt_ledger" and gate.json()["line"] == 4


def _handles_on(folder: Path) -> int:
    """How many of this process's open handles are the folder ``folder`` itself."""
    fds = Path("/proc/self/fd")
    count = 0
    for fd in os.listdir(fds):
        with contextlib.suppress(OSError):
            count += os.readlink(fds / fd) == str(folder)
    return count


def test_a_dropped_ledger_closes_its_kept_connection_and_folder_handle(tmp_path: Path) -> None:
    """A writer keeps its checkpoint connection (and a handle of the run folder for it) across
    commands; a Ledger let go must give both back, or a long-lived process that makes a
    Ledger per job runs out of handles."""
    import gc

    Ledger.init(tmp_path, "r", cap="100", actor="tester")
    before = _handles_on(tmp_path / "r")
    for job in range(20):
        Ledger.open(tmp_path, "r", actor="tester").reserve(f"job-{job}", "1")
    gc.collect()
    assert _handles_on(tmp_path / "r") == before
