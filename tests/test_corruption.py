"""The corruption matrix: every way a log can be damaged or forged is found by
``runs verify`` at the right line, refused by every writer (exit 6, log unchanged), and
shown with a warning by the read commands. Nothing repairs by dropping data."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from escalate import Ledger
from escalate.core.events import line_hash, seal
from escalate.errors import CorruptLedger
from escalate.stores.file.log import LOG_NAME
from tests.conftest import FakeClock

Lines = list[bytes]


def _build(runs_dir: Path, clock: FakeClock) -> Lines:
    """A healthy run of nine events; returns its lines (without newlines)."""
    run = Ledger.init(runs_dir, "r", cap="10", task_cap="5", actor="tester", clock=clock)
    run.reserve("a", "1")             # line 2
    run.reserve("b", "2")             # line 3
    run.increase("b", "3", reason="more")  # line 4
    run.release("a", "0.5")           # line 5
    with pytest.raises(Exception, match="over the task cap"):
        run.reserve("h", "6")         # line 6: halt
    run.reserve("c", "1")             # line 7
    run.release("c", "1.25")          # line 8
    run.reserve("d", "0.25")          # line 9
    return (runs_dir / "r" / LOG_NAME).read_bytes().splitlines()


def _forge(lines: Lines, payload: dict[str, Any], **envelope: Any) -> bytes:
    """A line as a (buggy or hostile) writer would append it after ``lines``: correctly
    chained unless ``envelope`` overrides ``seq``/``prev``/``v``."""
    last = orjson.loads(lines[-1])
    [(event, line, _)] = seal([payload], seq=last["seq"], prev=line_hash(lines[-1]),
                              ts=last["ts"], actor="forger")
    if envelope:
        line = orjson.dumps({**event, **envelope})
    return line


def _edit(line: bytes, **changes: Any) -> bytes:
    return orjson.dumps({**orjson.loads(line), **changes})


def _rewrite(log: Path, lines: Lines) -> bytes:
    """Replace the log as an editor saves a file: a new file renamed over the old one,
    which stays as a backup (so the new file cannot reuse its inode number)."""
    data = b"".join(line + b"\n" for line in lines)
    os.link(log, log.with_name(f"backup-{len(list(log.parent.glob('backup-*')))}"))
    log.with_name("edited").write_bytes(data)
    os.replace(log.with_name("edited"), log)
    return data


def _reserved(lines: Lines, task: str, micros: int) -> bytes:
    return _forge(lines, {"type": "budget_reserved", "task": task, "amount_micros": micros})


def _huge_increase(lines: Lines) -> Lines:
    line = _forge(lines, {"type": "budget_increased", "task": "d", "from_micros": 250_000,
                          "to_micros": 987654321, "reason": ""})
    return [*lines, line.replace(b"987654321", str(2**70).encode())]


# name → (damage, line verify must name first, words in its problem)
Damage = Callable[[Lines], Lines]
CASES: dict[str, tuple[Damage, int, str]] = {
    "edited amount": (lambda ls: [*ls[:2], _edit(ls[2], amount_micros=900_000), *ls[3:]],
                      4, "line 3 was changed"),
    "deleted line": (lambda ls: [*ls[:3], *ls[4:]], 4, "seq 5 where 4 was expected"),
    "swapped lines": (lambda ls: [*ls[:3], ls[4], ls[3], *ls[5:]], 4, "seq 5 where 4 was expected"),
    "inserted line": (lambda ls: [*ls[:3], _forge(ls[:3], {"type": "budget_reserved", "task": "x",
                                                           "amount_micros": 1}), *ls[3:]],
                      5, "seq 4 where 5 was expected"),
    "garbage mid-file": (lambda ls: [*ls[:5], b"\x00garbage{", *ls[5:]], 6, "unparsable JSON"),
    "blank line": (lambda ls: [*ls[:5], b"", *ls[5:]], 6, "unparsable JSON"),
    "not an object": (lambda ls: [*ls[:5], b"[1, 2]", *ls[5:]], 6, "not a JSON object"),
    "complete garbage last line": (lambda ls: [*ls, b"{not json"], 10, "unparsable JSON"),
    "seq repeat": (lambda ls: [*ls, _forge(ls, {"type": "recovery", "torn_bytes": 1, "saved_to": "x"},
                                           seq=9)], 10, "seq 9 where 10 was expected"),
    "broken prev": (lambda ls: [*ls, _forge(ls, {"type": "recovery", "torn_bytes": 1, "saved_to": "x"},
                                            prev="0123456789abcdef")], 10, "does not match"),
    "unknown v": (lambda ls: [*ls, _forge(ls, {"type": "budget_reserved", "task": "x",
                                               "amount_micros": 1}, v=2)], 10, "unknown schema version 2"),
    "unknown v on line 1": (lambda ls: [_edit(ls[0], v=2), *ls[1:]], 1, "unknown schema version 2"),
    "unknown type": (lambda ls: [*ls, _forge(ls, {"type": "budget_stolen", "task": "x"})],
                     10, "unknown event type 'budget_stolen'"),
    "duplicate reservation": (lambda ls: [*ls, _forge(ls, {"type": "budget_reserved", "task": "d",
                                                           "amount_micros": 250_000})],
                              10, "duplicate reservation of task 'd'"),
    "reservation after halt": (lambda ls: [*ls, _forge(ls, {"type": "budget_reserved", "task": "h",
                                                            "amount_micros": 1})],
                               10, "reservation of task 'h' after it was halted"),
    "reservation of a released task": (lambda ls: [*ls, _forge(ls, {"type": "budget_reserved",
                                                                    "task": "a", "amount_micros": 1})],
                                       10, "after it was released"),
    # 5 of the cap of 10 remain after line 9: 4.5 fits, then 1 more does not.
    "over-cap reservation": (lambda ls: [*ls, x := _reserved(ls, "x", 4_500_000),
                                         _reserved([*ls, x], "y", 1_000_000)], 11, "over the cap"),
    "over task cap": (lambda ls: [*ls, _forge(ls, {"type": "budget_reserved", "task": "x",
                                                   "amount_micros": 5_000_001})], 10, "over the task cap"),
    "release of unknown task": (lambda ls: [*ls, _forge(ls, {"type": "released", "task": "ghost",
                                                             "reserved_micros": 0, "actual_micros": 1})],
                                10, "release of task 'ghost', which holds no reservation"),
    "float amount": (lambda ls: [*ls, _forge(ls, {"type": "budget_reserved", "task": "x",
                                                  "amount_micros": 1000.0})], 10, "non-negative integer"),
    "negative amount": (lambda ls: [*ls, _forge(ls, {"type": "budget_reserved", "task": "x",
                                                     "amount_micros": -5})], 10, "non-negative integer"),
    "string amount": (lambda ls: [*ls, _forge(ls, {"type": "budget_reserved", "task": "x",
                                                   "amount_micros": "1"})], 10, "non-negative integer"),
    "huge amount": (_huge_increase, 10, "non-negative integer"),
    "second run_opened": (lambda ls: [*ls, _forge(ls, {"type": "run_opened", "run": "r"})],
                          10, "run_opened may only be the first line"),
    "last line over the task cap": (lambda ls: [*ls[:-1], _edit(ls[-1], amount_micros=9_000_000)],
                                    9, "over the task cap"),
}

# Every mutating call of the library (the CLI's writers are thin layers over these).
WRITERS: list[Callable[[Ledger], Any]] = [
    lambda run: run.reserve("new", "0.1"),
    lambda run: run.increase("d", "0.3"),
    lambda run: run.release("d", "0.1"),
    lambda run: run.set_policy(escalation="shadow"),
    lambda run: run.approve("esc-1"),
    lambda run: run.pause("esc-1"),
    lambda run: run.cancel("esc-1"),
    lambda run: run.sweep(),
]


@pytest.mark.parametrize("case", list(CASES))
def test_damage_is_found_and_refused(case: str, cli: Any, runs_dir: Path, clock: FakeClock) -> None:
    damage, bad_line, words = CASES[case]
    log = runs_dir / "r" / LOG_NAME
    damaged = _rewrite(log, damage(_build(runs_dir, clock)))

    verified = cli("runs", "verify", "r", "--json")
    assert verified.exit_code == 6, verified
    report = verified.json()
    assert report["error"] == "corrupt_ledger" and report["ok"] is False
    assert report["problems"][0]["line"] == bad_line, report["problems"]
    assert words in report["problems"][0]["problem"]
    human = cli("runs", "verify", "r")
    assert human.exit_code == 6 and f"line {bad_line}: " in human.stderr

    refused = cli("reserve", "r", "new", "--estimate", "0.1", "--json")
    assert refused.exit_code == 6, refused
    assert refused.json()["error"] == "corrupt_ledger"
    assert refused.json()["line"] == bad_line and f"line {bad_line}:" in refused.stderr
    run = Ledger.open(runs_dir, "r", actor="tester", clock=clock)
    for write in WRITERS:
        with pytest.raises(CorruptLedger, match=f"line {bad_line}: ") as refusal:
            write(run)
        assert refusal.value.exit_code == 6 and refusal.value.line == bad_line
    assert log.read_bytes() == damaged
    assert not list((runs_dir / "r").glob("*.torn-*"))

    if bad_line > 1:
        shown = cli("runs", "show", "r", "--json")
        assert shown.exit_code == 0, shown
        assert any(f"line {bad_line}" in warning for warning in shown.json()["warnings"])
    listed = cli("runs", "list")
    assert listed.exit_code == 0 and f"line {bad_line}" in listed.stderr
    assert log.read_bytes() == damaged


def test_read_commands_show_the_state_before_the_bad_line(cli: Any, runs_dir: Path,
                                                          clock: FakeClock) -> None:
    lines = _build(runs_dir, clock)
    _rewrite(runs_dir / "r" / LOG_NAME, [*lines[:4], b"?", *lines[4:]])
    shown = cli("runs", "show", "r", "--json").json()
    # Lines 1-4: a holds 1, b holds 3 — and the 5 complete lines after are not a "torn tail".
    assert shown["reserved_micros"] == 4_000_000
    assert not any("unfinished line" in warning for warning in shown["warnings"])
    assert Ledger.open(runs_dir, "r").replayed().torn_bytes == 0


def test_verify_ok_reports_counts_and_head(cli: Any, runs_dir: Path, clock: FakeClock) -> None:
    lines = _build(runs_dir, clock)
    human = cli("runs", "verify", "r")
    assert human.exit_code == 0 and human.stdout.startswith("OK r: 9 lines, seq 1..9")
    report = cli("runs", "verify", "r", "--json").json()
    assert report == {**report, "ok": True, "lines": 9, "events": 9, "torn_bytes": 0, "problems": [],
                      "head": {"seq": 9, "hash": line_hash(lines[-1])}}


def test_an_edit_of_the_last_line_within_the_rules_is_the_known_limit(
        cli: Any, runs_dir: Path, clock: FakeClock) -> None:
    """No later line vouches for the last one: an edit that keeps every rule passes
    verify. The head hash verify prints changes, which is how a saved copy catches it."""
    lines = _build(runs_dir, clock)
    head = cli("runs", "verify", "r", "--json").json()["head"]
    _rewrite(runs_dir / "r" / LOG_NAME, [*lines[:-1], _edit(lines[-1], amount_micros=200_000)])
    after = cli("runs", "verify", "r", "--json")
    assert after.exit_code == 0
    assert after.json()["head"]["seq"] == head["seq"] and after.json()["head"]["hash"] != head["hash"]


def test_verify_reports_every_problem_once_per_damage(cli: Any, runs_dir: Path, clock: FakeClock) -> None:
    lines = _build(runs_dir, clock)
    damaged = [*lines[:2], _edit(lines[2], amount_micros=1), *lines[3:6], b"junk", *lines[6:]]
    _rewrite(runs_dir / "r" / LOG_NAME, damaged)
    problems = cli("runs", "verify", "r", "--json").json()["problems"]
    assert [p["line"] for p in problems] == [4, 7]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_byte_changed_before_the_last_line_is_found(data: st.DataObject, tmp_path: Path,
                                                        clock: FakeClock) -> None:
    root = tmp_path / "prop"
    if not (root / "r").exists():
        _build(root, clock)
        (tmp_path / "healthy").write_bytes((root / "r" / LOG_NAME).read_bytes())
    healthy = (tmp_path / "healthy").read_bytes()
    last_line_start = healthy.rindex(b"\n", 0, len(healthy) - 1) + 1
    position = data.draw(st.integers(0, last_line_start - 1), label="position")
    byte = data.draw(st.integers(0, 255).filter(lambda b: b != healthy[position]), label="byte")
    damaged = healthy[:position] + bytes([byte]) + healthy[position + 1:]
    _rewrite(root / "r" / LOG_NAME, damaged.split(b"\n")[:-1])
    run = Ledger.open(root, "r", actor="tester")
    try:
        assert run.verify().problems
    except CorruptLedger as error:  # the first line: nothing can be folded at all
        assert error.line == 1
    with pytest.raises(CorruptLedger):
        run.reserve("new", "0.1")
    assert (root / "r" / LOG_NAME).read_bytes() == damaged


def test_an_edit_in_place_is_refused_too(cli: Any, runs_dir: Path, clock: FakeClock) -> None:
    lines = _build(runs_dir, clock)
    log = runs_dir / "r" / LOG_NAME
    with log.open("r+b") as handle:  # same file, same size: two lines swapped
        handle.write(b"".join(line + b"\n" for line in [*lines[:3], lines[4], lines[3], *lines[5:]]))
    assert cli("runs", "verify", "r").exit_code == 6
    assert cli("reserve", "r", "new", "--estimate", "0.1").exit_code == 6
