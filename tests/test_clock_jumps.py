"""Wrong clocks (docs/escalation.md, "What a wrong clock can and cannot do"): timestamps
never go back, a deadline set by a clock that ran far ahead does not hold an escalation
open once the clock is right, and `runs verify` warns of an old log whose clock went back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from escalate import EscalateError, Ledger
from escalate.stores.file.log import LOG_NAME
from tests.conftest import FakeClock, rechained

HOUR = 3600
YEAR = 365 * 24 * HOUR


def _events(root: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in (root / "r" / LOG_NAME).read_bytes().splitlines()]


def _run(root: Path, clock: FakeClock) -> Ledger:
    return Ledger.init(root, "r", cap="10", escalation="enforce", approval_threshold="1",
                       escalation_timeout_s=HOUR, clock=clock)


def _escalate(run: Ledger, task: str) -> str:
    with pytest.raises(EscalateError) as pending:
        run.reserve(task, "2")
    return str(pending.value.escalation_id)


def test_timestamps_never_go_back(tmp_path: Path, clock: FakeClock) -> None:
    run = _run(tmp_path, clock)
    run.reserve("a", "1")
    clock.advance(-2 * HOUR)  # this writer's clock is now two hours behind the log
    run.reserve("b", "1")
    stamps = [event["ts"] for event in _events(tmp_path)]
    assert stamps == sorted(stamps) and stamps[-1] == stamps[-2]


def test_a_deadline_set_a_year_ahead_expires_once_the_clock_is_right(
        tmp_path: Path, clock: FakeClock) -> None:
    run = _run(tmp_path, clock)
    clock.advance(YEAR)
    escalation_id = _escalate(run, "t1")  # opened (and due) a year ahead
    clock.advance(-YEAR)
    assert run.sweep()["expired"] == [escalation_id]
    assert run.state().escalations[escalation_id].by == "timeout"


def test_wait_sweeps_a_deadline_set_a_year_ahead(tmp_path: Path, clock: FakeClock) -> None:
    run = _run(tmp_path, clock)
    clock.advance(YEAR)
    escalation_id = _escalate(run, "t1")
    clock.advance(-YEAR)
    with pytest.raises(EscalateError) as paused:
        run.wait(escalation_id, timeout_s=30)
    assert paused.value.code == "paused"


def test_after_a_clock_ran_ahead_timeouts_still_follow_the_clock(tmp_path: Path, clock: FakeClock) -> None:
    run = _run(tmp_path, clock)
    clock.advance(YEAR)
    run.reserve("a", "1")  # the log's last timestamp is now a year ahead: the floor
    clock.advance(-YEAR)
    escalation_id = _escalate(run, "t1")
    clock.advance(HOUR - 1)
    assert run.sweep()["expired"] == []
    clock.advance(1)
    assert run.sweep()["expired"] == [escalation_id]


def test_a_clock_behind_by_less_than_the_timeout_expires_nothing(tmp_path: Path, clock: FakeClock) -> None:
    run = _run(tmp_path, clock)
    escalation_id = _escalate(run, "t1")
    clock.advance(-HOUR / 2)
    assert run.sweep()["expired"] == []
    assert run.state().escalations[escalation_id].state == "open"


def test_verify_warns_of_a_clock_that_went_back_and_writes_go_on(
        runs_dir: Path, clock: FakeClock, cli: Any) -> None:
    tmp_path = runs_dir
    run = _run(tmp_path, clock)
    run.reserve("a", "1")
    run.reserve("b", "1")
    events = _events(tmp_path)
    events[2]["ts"] = "2026-11-23T13:00:00.000000Z"  # as an older escalate wrote it
    (tmp_path / "r" / LOG_NAME).write_bytes(rechained(events))
    report = run.verify()
    assert report.problems == []
    assert [line for line, _ in report.warnings] == [3]
    verified = cli("runs", "verify", "r", "--json")
    assert verified.exit_code == 0 and [w["line"] for w in verified.json()["warnings"]] == [3]
    human = cli("runs", "verify", "r")
    assert human.exit_code == 0 and "line 3: warning: timestamp" in human.stderr
    assert run.reserve("c", "1")["status"] == "reserved"


@pytest.mark.parametrize("ts", ["zzzz", 12345, "2026-11-23 14:00:00", None])
def test_a_last_line_whose_ts_is_no_timestamp_is_refused_not_used_as_a_floor(
        tmp_path: Path, clock: FakeClock, ts: Any) -> None:
    from escalate import CorruptLedger

    run = _run(tmp_path, clock)
    run.reserve("a", "0.5")
    log = tmp_path / "r" / LOG_NAME
    lines = log.read_bytes().splitlines()
    last = orjson.loads(lines[-1])
    last["ts"] = ts  # the last line: no later line's prev vouches for it
    lines[-1] = orjson.dumps(last)
    log.write_bytes(b"\n".join(lines) + b"\n")
    before = log.read_bytes()
    with pytest.raises(CorruptLedger) as refused:
        run.reserve("b", "0.5")
    assert refused.value.exit_code == 6 and "line 2" in refused.value.message
    assert log.read_bytes() == before


def test_a_writes_own_timestamp_is_its_next_floor_unparsed(tmp_path: Path, clock: FakeClock,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The floor a write leaves is its own timestamp, as escalate writes them: the next command
    takes it without parsing it again; any other last timestamp is still checked."""
    from escalate import write

    run = _run(tmp_path, clock)
    clock.advance(1)
    run.reserve("a", "0.5")  # (after its first line's time: the floor it leaves is its own)
    parsed: list[str] = []
    parse = write.parse_ts

    def counted(text: str) -> Any:
        parsed.append(text)
        return parse(text)

    monkeypatch.setattr(write, "parse_ts", counted)
    clock.advance(1)
    run.reserve("b", "0.5")
    assert parsed == []
    other = tmp_path / "other"
    other.mkdir()
    clock.advance(1)
    fresh = _run(other, clock)  # (a new run: its first line is its floor, checked once)
    assert fresh.reserve("c", "0.5")["status"] == "reserved" and len(parsed) == 1


@pytest.mark.parametrize("earlier, later", [
    (20, 10),  # ints that go back: no timestamps, so no clock went back
    ([2], [1]),
    ("2026-11-23T14:00:00.000000Z", 5),
    (5, "2026-11-23T13:00:00.000000Z"),
    ({"a": 1}, {"a": 0}),
    ("deep", "deep"),  # lists nested deeper than a comparison may recurse
])
def test_verify_names_no_clock_for_timestamps_that_are_no_strings(
        tmp_path: Path, clock: FakeClock, earlier: Any, later: Any) -> None:
    """The clock warning compares timestamps only: any other values in ``ts`` (which the
    schema check names) give none, and never stop the fold."""
    from escalate.core.events import line_hash

    run = _run(tmp_path, clock)
    run.reserve("a", "1")
    run.reserve("b", "1")
    events = _events(tmp_path)
    out, prev = [], ""
    for index, event in enumerate(events):
        value = {1: earlier, 2: later}.get(index, event["ts"])
        text = orjson.dumps({**event, "ts": "TS", "prev": prev}).decode()
        ts = "[" * 900 + "]" * 900 if value == "deep" else orjson.dumps(value).decode()
        line = text.replace('"TS"', ts, 1).encode()
        prev = line_hash(line)
        out.append(line + b"\n")
    (tmp_path / "r" / LOG_NAME).write_bytes(b"".join(out))
    report = run.verify()
    assert report.warnings == [] and report.problems == []
    assert report.state.seq == 3
