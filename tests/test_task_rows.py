"""A task as the fold keeps it (``escalate.core.state.TaskRow``): one int for the two shapes
nearly every task has (reserved and holding; released), its facts otherwise. Every reader
sees the same task whichever shape it is kept in, a checkpoint stores the same bytes, and
a fold keeps no object the collector watches for a task of those shapes."""

from __future__ import annotations

import gc
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from escalate import Ledger
from escalate.core.events import HALT_REASONS
from escalate.core.money import MAX_MICROS
from escalate.core.state import Task, TaskTable, released_row, task_facts, task_json
from tests.conftest import Location

AMOUNTS = st.integers(0, 2**70)  # past any total the fold lets through: the shape holds anyway


@given(reserved=AMOUNTS, actual=st.integers(0, MAX_MICROS),
       halt_reason=st.sampled_from([None, *HALT_REASONS]))
def test_a_released_task_reads_back_as_it_was_released(reserved: int, actual: int,
                                                       halt_reason: str | None) -> None:
    assert MAX_MICROS < 2**64  # an actual fits below the reserved part of a released row
    row = released_row(reserved, actual, halt_reason)  # type: ignore[arg-type]
    assert task_facts(row) == ("released", reserved, False, actual, halt_reason, None)
    assert isinstance(row, int) == (halt_reason is None)  # a halt reason keeps its facts
    assert task_json("t", row) == Task("released", reserved, False, actual, halt_reason).to_json("t")  # type: ignore[arg-type]


@given(held=AMOUNTS)
def test_a_held_amount_reads_back_as_a_reservation(held: int) -> None:
    assert task_facts(held) == ("reserved", held, True, None, None, None)
    table = TaskTable({"t": held})
    assert table["t"] == table.get("t") == Task("reserved", held, True)
    assert dict(table.items()) == {"t": Task("reserved", held, True)}


def _run(store: Location) -> Ledger:
    """Twelve tasks: all reserved at $1, every other one increased to $2, every third
    released at $0.50."""
    run = Ledger.init(store, "r", cap="100", actor="tester")
    for number in range(12):
        run.reserve(f"t{number}", "1")
    for number in range(0, 12, 2):
        run.increase(f"t{number}", "2")
    for number in range(0, 12, 3):
        run.release(f"t{number}", "0.50")
    return run


def _expected() -> dict[str, Task]:
    held = {f"t{number}": 2_000_000 if number % 2 == 0 else 1_000_000 for number in range(12)}
    return {task_id: Task("released", amount, False, 500_000) if int(task_id[1:]) % 3 == 0
            else Task("reserved", amount, True) for task_id, amount in held.items()}


def test_a_fold_keeps_no_object_the_collector_watches_for_a_task(tmp_path: Path) -> None:
    run = _run(tmp_path / "runs")
    was_enabled = gc.isenabled()
    gc.disable()  # (no collection may untrack anything the fold made)
    try:
        state = run.verify().state
        rows = state.tasks.rows
        assert [task_id for task_id, row in rows.items() if gc.is_tracked(row)] == []
        assert not gc.is_tracked(rows)
    finally:
        if was_enabled:
            gc.enable()
    assert dict(state.tasks.items()) == _expected()


def test_every_reader_sees_the_tasks_the_log_says(store: Location) -> None:
    run = _run(store)
    expected = _expected()
    assert dict(run.verify().state.tasks.items()) == expected  # every line folded
    assert dict(Ledger.open(store, "r").state().tasks.items()) == expected  # from the checkpoint
    run.reserve("t99", "1")  # a writer: the checkpoint's rows, and a new one
    expected["t99"] = Task("reserved", 1_000_000, True)
    for reader in (Ledger.open(store, "r").state(), run.verify().state):
        assert dict(reader.tasks.items()) == expected
        assert [task_json(task_id, row) for task_id, row in reader.tasks.rows.items()] == [
            task.to_json(task_id) for task_id, task in expected.items()]
