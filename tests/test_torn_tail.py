"""Torn tails: a final line without its newline, cut at every byte.

A crash (or power loss) mid-write can leave any prefix of the last line on disk. For
every such prefix: readers see the state of the line before, the next writer sets
exactly those bytes aside and records a ``recovery`` before its own event, and
``runs verify`` is clean afterwards.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import orjson
import pytest

from escalate import Ledger
from escalate.core.replay import replay
from escalate.errors import CorruptLedger, InputError, Refused, UnknownRun
from escalate.stores.file.log import LOG_NAME
from tests.conftest import FakeClock, snapshot_tree


def _log_files(root: Path) -> dict[str, bytes]:
    """The log and its side files (the lock file and any checkpoint may come and go)."""
    return {name: data for name, data in snapshot_tree(root).items()
            if not name.endswith(".lock") and ".cache" not in name}


def _events(run_dir: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in (run_dir / LOG_NAME).read_bytes().splitlines()]


def _money(run: Ledger) -> tuple[Any, ...]:
    state = run.state()
    return (state.seq, state.last_hash, state.spent_micros, state.reserved_micros,
            {task_id: (task.state, task.reserved_micros) for task_id, task in state.tasks.items()})


def _build(root: Path, clock: FakeClock, last: str) -> tuple[bytes, bytes]:
    """A run whose log ends in a complete event of kind ``last``: (log before it, whole log)."""
    run = Ledger.init(root, "r", cap="10", actor="tester", clock=clock)
    run.reserve("a", "1.25")
    run.reserve("b", "2")
    log = root / "r" / LOG_NAME
    before = log.read_bytes()
    if last == "reserve":
        run.reserve("c", "0.000001")
    elif last == "increase":
        # Multi-byte characters, so some cuts fall inside a UTF-8 sequence.
        run.increase("b", "3.5", reason="diff grew — größer ✓")
    else:
        run.release("a", "1.93")
    return before, log.read_bytes()


@pytest.mark.parametrize("last", ["reserve", "increase", "release"])
def test_every_cut_of_the_last_line_is_recovered(tmp_path: Path, clock: FakeClock, last: str) -> None:
    before, whole = _build(tmp_path / "model", clock, last)
    expected = _money(Ledger.open(_write_log(tmp_path / "expected", before), "r", actor="tester"))
    cuts = range(len(before) + 1, len(whole))  # 1 byte of the last line … all of it but "\n"
    assert len(cuts) > 100
    for cut in cuts:
        root = _write_log(tmp_path / f"cut{cut}", whole[:cut])
        run = Ledger.open(root, "r", actor="tester", clock=clock)
        torn = whole[len(before):cut]

        # Every reader ignores the torn tail.
        assert _money(run) == expected, cut
        snapshot = run.replayed()
        assert snapshot.problem is None and snapshot.torn_bytes == len(torn)
        assert run.verify().problems == []

        # The next writer sets exactly those bytes aside, then records it, then writes.
        assert run.reserve("next", "0.5")["status"] == "reserved"
        log = (root / "r" / LOG_NAME).read_bytes()
        assert log.startswith(before), cut
        *_, recovery, reserved = _events(root / "r")
        side_name = f"{LOG_NAME}.torn-{len(before)}"
        assert recovery["type"] == "recovery"
        assert recovery["torn_bytes"] == len(torn) and recovery["saved_to"] == side_name
        assert reserved["type"] == "budget_reserved" and reserved["task"] == "next"
        assert (root / "r" / side_name).read_bytes() == torn
        report = run.verify()
        assert report.problems == [] and report.torn_bytes == 0
        assert run.state().reserved_micros == expected[3] + 500_000


def _write_log(root: Path, data: bytes) -> Path:
    (root / "r").mkdir(parents=True)
    (root / "r" / LOG_NAME).write_bytes(data)
    return root


def test_torn_first_line_from_a_crash_during_init(runs_dir: Path, clock: FakeClock, cli: Any) -> None:
    model = Ledger.init(runs_dir / "model", "r", cap="5", actor="tester", clock=clock)
    first_line = (runs_dir / "model" / "r" / LOG_NAME).read_bytes()
    # Every 5th cut and both ends keep this quick; the last-line test covers every byte.
    cuts = sorted({*range(1, len(first_line), 5), len(first_line) - 1})
    for cut in cuts:
        root = runs_dir / f"cut{cut}"
        _write_log(root, first_line[:cut])
        before = _log_files(root)
        # Readers and writers say what happened and change nothing.
        with pytest.raises(UnknownRun, match="no complete first line"):
            Ledger.open(root, "r").state()
        with pytest.raises(UnknownRun):
            Ledger.open(root, "r").reserve("t", "1")
        assert _log_files(root) == before
        # Creating the run again sets the bytes aside and records them after run_opened.
        run = Ledger.init(root, "r", cap="5", actor="tester", clock=clock)
        opened, recovery = _events(root / "r")
        assert opened["type"] == "run_opened" and opened["seq"] == 1
        assert recovery == {**recovery, "type": "recovery", "seq": 2, "torn_bytes": cut,
                            "saved_to": f"{LOG_NAME}.torn-0"}
        assert (root / "r" / f"{LOG_NAME}.torn-0").read_bytes() == first_line[:cut]
        assert run.verify().problems == []
        assert run.reserve("t", "1")["status"] == "reserved"
    assert model.verify().problems == []
    # The CLI explains it too (exit 2: the run does not exist yet).
    _write_log(runs_dir, first_line[:7])
    shown = cli("runs", "show", "r")
    assert shown.exit_code == 2 and "no complete first line" in shown.stderr
    assert cli("runs", "init", "r", "--cap", "5").exit_code == 0
    assert cli("runs", "verify", "r").exit_code == 0


def test_repeated_torn_tails_at_one_offset_get_distinct_side_files(runs_dir: Path, clock: FakeClock) -> None:
    run = Ledger.init(runs_dir, "r", cap="10", actor="tester", clock=clock)
    run.reserve("a", "1")
    log = runs_dir / "r" / LOG_NAME
    offset = log.stat().st_size
    pieces = [b'{"v":1,"seq":3,"ts":"20', b'{"v":1,"seq":3,"ty', b"\x00\x00\x00"]
    for attempt, piece in enumerate(pieces):
        # The recovery write itself was torn: the log is back at the same offset with a
        # new partial line (as after a crash that lost the recovery's whole write).
        os.truncate(log, offset)
        with log.open("ab") as handle:
            handle.write(piece)
        assert run.reserve(f"t{attempt}", "1")["status"] == "reserved"
        name = f"{LOG_NAME}.torn-{offset}" + (f".{attempt}" if attempt else "")
        assert (runs_dir / "r" / name).read_bytes() == piece
        assert _events(runs_dir / "r")[2] == {**_events(runs_dir / "r")[2], "type": "recovery",
                                              "saved_to": name, "torn_bytes": len(piece)}
        assert run.verify().problems == []
    # Every side file is still there: nothing is overwritten or deleted.
    assert sorted(p.name for p in (runs_dir / "r").glob("*.torn-*")) == sorted(
        f"{LOG_NAME}.torn-{offset}" + (f".{n}" if n else "") for n in range(len(pieces)))


def test_a_copy_left_by_a_crash_before_the_write_does_not_collide(runs_dir: Path) -> None:
    """A crash after the side file was written but before the log changed."""
    run = Ledger.init(runs_dir, "r", cap="10", actor="tester")
    log = runs_dir / "r" / LOG_NAME
    offset = log.stat().st_size
    with log.open("ab") as handle:
        handle.write(b'{"v":1,"se')
    (runs_dir / "r" / f"{LOG_NAME}.torn-{offset}").write_bytes(b'{"v":1,"se')
    run.reserve("t", "1")
    assert (runs_dir / "r" / f"{LOG_NAME}.torn-{offset}.1").read_bytes() == b'{"v":1,"se'
    assert _events(runs_dir / "r")[1]["saved_to"] == f"{LOG_NAME}.torn-{offset}.1"


def test_torn_tail_while_the_command_is_refused(runs_dir: Path, clock: FakeClock) -> None:
    run = Ledger.init(runs_dir, "r", cap="2", actor="tester", clock=clock)
    run.reserve("a", "1")
    log = runs_dir / "r" / LOG_NAME
    intact = log.read_bytes()
    with log.open("ab") as handle:
        handle.write(b'{"v":1,"seq":3')
    torn_tree = _log_files(runs_dir)

    # Bad input, found before or after the lock: nothing on disk changes, the tail stays.
    with pytest.raises(InputError):
        run.reserve("b", "-1")
    with pytest.raises(InputError):
        run.approve("esc-404")
    with pytest.raises(InputError):
        run.set_policy(escalation="sometimes")
    assert _log_files(runs_dir) == torn_tree

    # A refusal that is recorded (a halt) recovers first, then records the halt.
    with pytest.raises(Refused):
        run.reserve("b", "5")
    kinds = [event["type"] for event in _events(runs_dir / "r")]
    assert kinds == ["run_opened", "budget_reserved", "recovery", "halt"]
    assert log.read_bytes().startswith(intact)
    assert run.verify().problems == []


def test_torn_tail_after_a_corrupt_line_is_left_alone(runs_dir: Path) -> None:
    run = Ledger.init(runs_dir, "r", cap="2", actor="tester")
    run.reserve("a", "1")
    log = runs_dir / "r" / LOG_NAME
    with log.open("ab") as handle:
        handle.write(b"not json\n" + b'{"v":1,"se')
    before = _log_files(runs_dir)
    with pytest.raises(CorruptLedger, match="line 3"):
        run.reserve("b", "0.5")
    assert _log_files(runs_dir) == before
    snapshot = run.replayed()
    assert snapshot.problem is not None and snapshot.torn_bytes == 10
    assert replay(run.store.log, "r", tolerant=True).lines == 3


def test_readers_report_the_torn_tail(cli: Any, runs_dir: Path) -> None:
    assert cli("runs", "init", "r", "--cap", "3").exit_code == 0
    assert cli("reserve", "r", "a", "--estimate", "1").exit_code == 0
    with (runs_dir / "r" / LOG_NAME).open("ab") as handle:
        handle.write(b'{"v":1,"seq":3,"ts"')
    before = _log_files(runs_dir)
    shown = cli("runs", "show", "r", "--json")
    assert shown.exit_code == 0
    assert shown.json()["reserved_micros"] == 1_000_000
    assert any("19 bytes of an unfinished line" in w for w in shown.json()["warnings"])
    listed = cli("runs", "list", "--json")
    assert listed.exit_code == 0 and listed.json()["runs"][0]["reserved_micros"] == 1_000_000
    verified = cli("runs", "verify", "r", "--json")
    assert verified.exit_code == 0 and verified.json()["torn_bytes"] == 19
    assert _log_files(runs_dir) == before


class _ReadThenRecover:
    """A log stream whose first read is followed, before the second, by another process's
    write over the torn tail just read (``escalate reserve`` recovering it) — a reader
    without the lock sees the old torn bytes glued to the end of the new lines."""

    def __init__(self, stream: Any, recover: Any) -> None:
        self.stream, self.recover, self.reads = stream, recover, 0

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.reads += 1
        if self.reads == 1:
            self.recover()
        return bytes(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)

    def __enter__(self) -> _ReadThenRecover:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stream.close()


@pytest.mark.parametrize("reader", ["state", "replayed", "verify"])
def test_a_reader_never_reports_a_recovery_it_saw_half_way(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reader: str) -> None:
    import subprocess
    import sys

    from escalate.stores.file.log import FileLog

    root = tmp_path / "runs"
    run = Ledger.init(root, "r", cap="10", actor="tester")
    run.reserve("a", "1")
    log = root / "r" / LOG_NAME
    with log.open("ab") as handle:  # a writer's crash mid-line
        handle.write(b'{"v":1,"seq":3,"ts":"2026-11-23T14:00:00.000000Z","type":"budget_reserved"')

    def recover() -> None:
        subprocess.run([sys.executable, "-m", "escalate", "reserve", "r", "b", "--estimate", "2",
                        "--runs-dir", str(root)], check=True, capture_output=True)

    opened = FileLog.reader
    streams: list[_ReadThenRecover] = []

    def reader_then_recovery(self: FileLog) -> Any:
        stream = opened(self)
        if streams:
            return stream
        streams.append(_ReadThenRecover(stream, recover))
        return streams[0]

    # Opened first: opening reads the run's first line (is it a pool's?), not the log.
    fresh = Ledger.open(root, "r", actor="tester")
    monkeypatch.setattr(FileLog, "reader", reader_then_recovery)
    fresh.store.checkpoint = None  # read the whole log, as a first reader does
    if reader == "state":
        state = fresh.state()
    else:
        replayed = getattr(fresh, reader)()
        assert replayed.problem is None and replayed.problems == []
        state = replayed.state
    assert streams and streams[0].reads >= 2, "the race was not staged"
    # Either the state before the recovery or after it; never a corrupt ledger.
    assert set(state.tasks) in ({"a"}, {"a", "b"})
