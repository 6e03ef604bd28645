"""A write of several lines is atomic as a unit (docs/events.md, "Writes of several lines":
an approval is ONE append).

Every line of one write but the last carries ``"more": K``. A log whose complete lines end
inside such a write is a torn tail from the write's first line: readers count none of it,
the next writer sets it aside whole. A write that fails part-way is rolled back by the
process that made it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from escalate import EscalateError, Ledger
from escalate.core.events import seal
from escalate.stores.file.log import LOG_NAME
from tests.conftest import FakeClock, rechained

USD = 1_000_000


def _events(root: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in (root / "r" / LOG_NAME).read_bytes().splitlines()]


def _escalated_run(root: Path, clock: FakeClock) -> tuple[Ledger, str]:
    """Cap $10 with $6 held by ``a``; ``t1`` asks for $7 and waits on an escalation."""
    run = Ledger.init(root, "r", cap="10", task_cap="8", escalation="enforce", max_extension="10",
                      escalation_timeout_s=3600, clock=clock)
    run.reserve("a", "6")
    with pytest.raises(EscalateError) as pending:
        run.reserve("t1", "7")
    return run, str(pending.value.escalation_id)


def _outcome(call: Any, *args: Any, **kwargs: Any) -> tuple[int, Any]:
    try:
        return 0, call(*args, **kwargs)
    except EscalateError as error:
        return error.exit_code, error.code


def test_one_write_is_one_group_and_a_lone_line_has_no_marker(tmp_path: Path, clock: FakeClock) -> None:
    run, escalation_id = _escalated_run(tmp_path, clock)
    assert all("more" not in event for event in _events(tmp_path))  # byte-identical to before
    run.approve(escalation_id, by="boss")
    *_, resolved, reserved = _events(tmp_path)
    assert (resolved["type"], resolved["more"]) == ("escalation_resolved", 1)
    assert reserved["type"] == "budget_reserved" and "more" not in reserved
    assert run.verify().problems == [] and run.verify().torn_bytes == 0


def _second_line_cuts(before: int, whole: bytes) -> list[int]:
    """Cuts of an approval: right after its first line, inside its second, one byte short."""
    second = before + whole[before:].index(b"\n") + 1
    return [second, second + 1, (second + len(whole)) // 2, len(whole) - 1]


def test_an_approval_cut_after_its_first_line_grants_nothing(tmp_path: Path, clock: FakeClock) -> None:
    model, escalation_id = _escalated_run(tmp_path / "model", clock)
    log = tmp_path / "model" / "r" / LOG_NAME
    before = log.read_bytes()
    model.approve(escalation_id, by="boss")
    whole = log.read_bytes()
    for cut in _second_line_cuts(len(before), whole):
        root = tmp_path / f"cut{cut}"
        (root / "r").mkdir(parents=True)
        (root / "r" / LOG_NAME).write_bytes(whole[:cut])
        run = Ledger.open(root, "r", clock=clock, actor="tester")

        # Readers count none of the write: no grant, no extension, the whole write is torn.
        snapshot = run.replayed()
        assert snapshot.problem is None and snapshot.torn_bytes == cut - len(before), cut
        assert (snapshot.state.extended_micros, snapshot.state.remaining_micros) == (0, 4 * USD)
        assert run.verify().problems == [] and run.verify().torn_bytes == cut - len(before)
        assert _outcome(run.wait, escalation_id, timeout_s=0) == (4, "escalation_open"), cut

        # The task still waits (its release says so), and nobody takes the headroom.
        code, error = _outcome(run.release, "t1", "1")
        assert (code, error) == (5, "conflict"), cut
        assert _outcome(run.reserve, "b", "4.5")[0] == 4, cut
        assert run.state().extended_micros == 0

        # The next writer set the torn write aside whole; the approval can be given again.
        side_files = sorted(p.name for p in (root / "r").glob(f"{LOG_NAME}.torn-*"))
        assert side_files == [f"{LOG_NAME}.torn-{len(before)}"]
        assert (root / "r" / side_files[0]).read_bytes() == whole[len(before):cut]
        assert _events(root)[len(before.splitlines())]["type"] == "recovery"
        assert run.approve(escalation_id, by="boss")["status"] == "approved"
        assert run.verify().problems == [] and run.verify().torn_bytes == 0
        assert run.state().tasks["t1"].reserved_micros == 7 * USD


_SHORT_WRITE = """
import errno, os, sys
real_write = os.write
def half_then_enospc(fd, data):
    real_write(fd, bytes(data)[: len(data) // 2])
    raise OSError(errno.ENOSPC, "No space left on device")
os.write = half_then_enospc
sys.argv = ["escalate", *sys.argv[1:]]
from escalate.cli import main
main()
"""


def test_a_short_write_is_rolled_back_by_its_writer(tmp_path: Path, clock: FakeClock) -> None:
    run, escalation_id = _escalated_run(tmp_path, clock)
    log = tmp_path / "r" / LOG_NAME
    before = log.read_bytes()
    approver = subprocess.run(
        [sys.executable, "-c", _SHORT_WRITE, "approve", "r", escalation_id, "--by", "boss",
         "--runs-dir", str(tmp_path)], check=False, capture_output=True,
        env={**os.environ, "NO_COLOR": "1"})
    assert approver.returncode == 8 and b"the disk is full" in approver.stderr
    assert log.read_bytes() == before  # nothing of the half write is left
    assert run.replayed().torn_bytes == 0
    assert _outcome(run.wait, escalation_id, timeout_s=0) == (4, "escalation_open")
    assert run.approve(escalation_id, by="boss")["status"] == "approved"
    assert run.verify().problems == []


def test_verify_names_a_group_marker_a_later_line_contradicts(tmp_path: Path, clock: FakeClock) -> None:
    run, escalation_id = _escalated_run(tmp_path, clock)
    run.approve(escalation_id, by="boss")
    run.release("a", "1")
    events = _events(tmp_path)
    log = tmp_path / "r" / LOG_NAME
    events[-1]["more"] = 1  # a marker on the last line: the write looks unfinished (torn)
    log.write_bytes(rechained(events))
    assert run.verify().problems == [] and run.verify().torn_bytes > 0
    del events[-1]["more"]
    events[-3]["more"] = 2  # the approval now claims a third line, but its second ends it
    log.write_bytes(rechained(events))
    report = run.verify()
    assert [line for line, _ in report.problems] == [len(events) - 1]
    assert "began on line 4 needs 1 more line(s) after this one, but this line says 0" \
        in report.problems[0][1]
    assert _outcome(run.state)[0] == 6


def test_init_with_its_recovery_is_one_group(tmp_path: Path, clock: FakeClock) -> None:
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / LOG_NAME).write_bytes(b'{"v":1,"seq":1,"ty')  # a crash during an earlier init
    Ledger.init(tmp_path, "r", cap="10", clock=clock)
    whole = (run_dir / LOG_NAME).read_bytes()
    first, recovery = (orjson.loads(line) for line in whole.splitlines())
    assert (first["type"], first["more"], recovery["type"]) == ("run_opened", 1, "recovery")

    # Cut between the two lines: no run yet, and the next init sets the whole write aside.
    (run_dir / LOG_NAME).write_bytes(whole[: whole.index(b"\n") + 1])
    assert _outcome(lambda: Ledger.open(tmp_path, "r").state())[0] == 2
    Ledger.init(tmp_path, "r", cap="10", clock=clock)
    assert Ledger.open(tmp_path, "r").verify().problems == []
    assert sorted(p.name for p in run_dir.glob(f"{LOG_NAME}.torn-*")) == [
        f"{LOG_NAME}.torn-0", f"{LOG_NAME}.torn-0.1"]


def test_seal_marks_every_line_but_the_last() -> None:
    sealed = seal([{"type": "halt"}, {"type": "halt"}, {"type": "halt"}], seq=4, prev="p", ts="t",
                  actor="a", grouped=True)
    assert [event.get("more") for event, _, _ in sealed] == [2, 1, None]
