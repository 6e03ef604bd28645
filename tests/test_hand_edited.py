"""Hand-edited logs with a valid chain: every edit that would crash or mislead a later
command is refused by writers (exit 6, naming the line) and by ``runs verify``, and no read
command prints a traceback or a raw control character taken from the log."""

from __future__ import annotations

import hashlib
import unicodedata
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from escalate import Ledger
from escalate.errors import Pending
from escalate.stores.file.log import LOG_NAME
from tests.conftest import FakeClock, snapshot_tree

Event = dict[str, Any]


def _healthy(runs_dir: Path, clock: FakeClock) -> list[Event]:
    """An enforce-mode run with every field these edits touch; returns its events."""
    run = Ledger.init(runs_dir, "r", cap="10", task_cap="6", escalation="enforce",
                      max_extension="5", actor="tester", clock=clock)
    run.reserve("a", "4")                      # line 2
    run.reserve("b", "5")                      # line 3
    with pytest.raises(Pending):
        run.reserve("c", "3")                  # line 4: escalation esc-4, needs $2 more
    Ledger.open(runs_dir, "r", actor="lead", clock=clock).approve("esc-4")  # lines 5 and 6
    run.release("a", "3.5")                    # line 7: leaves $0.50
    run.increase("b", "5.5", reason="longer")  # line 8: takes that $0.50
    return [orjson.loads(line) for line in (runs_dir / "r" / LOG_NAME).read_bytes().splitlines()]


def _chained(events: list[Event]) -> bytes:
    """The events as a log with seq and prev recomputed (by hashlib, not escalate), as
    someone who edits a log and fixes up the chain would write it."""
    out, prev = [], ""
    for number, event in enumerate(events, start=1):
        line = orjson.dumps({**event, "seq": number, "prev": prev})
        prev = hashlib.sha256(line).hexdigest()[:16]
        out.append(line + b"\n")
    return b"".join(out)


TERMINAL_TRICKS = "\x1b[2J\x1b]0;owned\x07\r"  # clear screen, window title, bell, carriage return

# name → (line to edit, field, new value)
FOLD_EDITS: dict[str, tuple[int, str, Any]] = {
    "expires_at is a number": (4, "expires_at", 5),
    "expires_at is not a date": (4, "expires_at", "2026-02-30T00:00:00.000000Z"),
    "escalation ts is a number": (4, "ts", 12345),
    "resolution ts in another format": (5, "ts", "2026-11-23 14:00:00"),
    "escalation kind steal": (4, "kind", "steal"),
    "escalation reason unknown": (4, "reason", "because"),
    "escalation remaining is text": (4, "remaining_micros", "lots"),
    "needed extension is text": (4, "needed_extension_micros", "many"),
    "priority unknown": (4, "priority", "asap"),
    "request reason with escapes": (4, "request_reason", "fix" + TERMINAL_TRICKS),
    "offered holds a list": (4, "offered", [["extend"]]),
    "actor is a number": (3, "actor", 7),
    "actor with terminal escapes": (3, "actor", "eve" + TERMINAL_TRICKS),
    "actor of 200 characters": (3, "actor", "x" * 200),
    "task with quotes": (2, "task", 'a"b'),
    "task with control characters": (2, "task", "a" + TERMINAL_TRICKS),
    "task leaving the folder": (2, "task", "../a"),
    "task of 100 KB": (2, "task", "a" * 100_000),
    "task id with a space": (3, "task", "b c"),
    "resolved by with escapes": (5, "by", "lead" + TERMINAL_TRICKS),
    "resolution mode unknown": (5, "mode", "steal"),
    "task cap above the run cap": (1, "task_cap_micros", 20_000_000),
    "run id with escapes": (1, "run", "r" + TERMINAL_TRICKS),
    "extension far above what was needed": (5, "extension_micros", 5_000_000),
    "actual above the 1e9 USD bound": (7, "actual_micros", 10**16),
    "timeout beyond any date": (1, "escalation", {"mode": "enforce", "approval_threshold_micros": None,
                                                  "timeout_s": 10**15, "max_extension_micros": 5_000_000}),
}
# Fields the fold does not use: writers go on, runs verify names them, nobody sees raw bytes.
SCHEMA_EDITS: dict[str, tuple[int, str, Any]] = {
    "increase reason with escapes": (8, "reason", "more" + TERMINAL_TRICKS),
    # The fold keeps no reservation's ts, so writers go on; verify names the line.
    "reservation ts is a number": (3, "ts", 12345),
    "reservation ts with escapes": (3, "ts", "2026-11-23T14:00:00" + TERMINAL_TRICKS),
}


def _edited(events: list[Event], line: int, field: str, value: Any) -> bytes:
    changed = [dict(event) for event in events]
    changed[line - 1][field] = value
    return _chained(changed)


def _raw_control(text: str) -> list[str]:
    """Control characters other than the newline that ends a line."""
    return sorted({repr(char) for char in text if char != "\n" and unicodedata.category(char) == "Cc"})


def _readers_show_nothing_raw(cli: Callable[..., Any], tmp_path: Path,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    summary = tmp_path / "summary.md"
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    for args in (("runs", "show", "r"), ("runs", "show", "r", "--events", "20", "--all"),
                 ("runs", "show", "r", "--format", "markdown", "--events", "20"),
                 ("runs", "show", "r", "--json", "--events", "20"), ("gate", "r"), ("runs", "list"),
                 ("escalations", "--run", "r"), ("runs", "verify", "r")):
        result = cli(*args)
        shown = result.stdout + result.stderr
        assert "Traceback" not in shown, (args, shown[-2000:])
        assert result.exit_code in (0, 3, 4, 6), (args, result.exit_code, shown[-2000:])
        assert not _raw_control(shown), (args, _raw_control(shown))
    written = summary.read_text(encoding="utf-8") if summary.exists() else ""
    assert not _raw_control(written)


@pytest.mark.parametrize("name", FOLD_EDITS)
def test_an_edit_the_fold_uses_is_refused_and_never_shown_raw(
        name: str, cli: Any, runs_dir: Path, clock: FakeClock, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    line, field, value = FOLD_EDITS[name]
    log = runs_dir / "r" / LOG_NAME
    log.write_bytes(_edited(_healthy(runs_dir, clock), line, field, value))
    before = snapshot_tree(runs_dir)

    verified = cli("runs", "verify", "r", "--json")
    assert verified.exit_code == 6, verified
    assert verified.json()["problems"][0]["line"] == line, verified.json()["problems"][:2]
    for writer in (("reserve", "r", "new", "--estimate", "0.01"), ("release", "r", "b", "--actual", "1"),
                   ("approve", "r", "esc-4", "--by", "boss"), ("sweep", "r")):
        result = cli(*writer)
        assert result.exit_code == 6, (writer, result)
        assert f"line {line}:" in result.stderr, (writer, result.stderr[:500])
        assert len(result.stderr) < 2000  # a 100 KB value is cut, not echoed
    assert snapshot_tree(runs_dir) == before
    _readers_show_nothing_raw(cli, tmp_path, monkeypatch)


@pytest.mark.parametrize("name", SCHEMA_EDITS)
def test_an_edit_only_the_schema_sees_is_named_by_verify(
        name: str, cli: Any, runs_dir: Path, clock: FakeClock, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    line, field, value = SCHEMA_EDITS[name]
    (runs_dir / "r" / LOG_NAME).write_bytes(_edited(_healthy(runs_dir, clock), line, field, value))
    verified = cli("runs", "verify", "r")
    assert verified.exit_code == 6, verified
    assert f"line {line}: does not match the event schema: field {field!r}" in verified.stderr
    _readers_show_nothing_raw(cli, tmp_path, monkeypatch)


def test_the_healthy_run_verifies_and_its_chain_helper_matches_escalate(
        cli: Any, runs_dir: Path, clock: FakeClock) -> None:
    events = _healthy(runs_dir, clock)
    assert _chained(events) == (runs_dir / "r" / LOG_NAME).read_bytes()
    assert cli("runs", "verify", "r").exit_code == 0
    assert {event["type"] for event in events} >= {"run_opened", "budget_reserved", "escalation",
                                                   "escalation_resolved", "released", "budget_increased"}


def test_the_approval_grants_exactly_what_was_needed(runs_dir: Path, clock: FakeClock) -> None:
    events = _healthy(runs_dir, clock)
    assert events[4]["type"] == "escalation_resolved" and events[4]["extension_micros"] == 2_000_000
    # One micro more than needed is already refused.
    (runs_dir / "r" / LOG_NAME).write_bytes(_edited(events, 5, "extension_micros", 2_000_001))
    report = Ledger.open(runs_dir, "r").verify()
    assert report.problems[0][0] == 5 and "more than the 2000000" in report.problems[0][1]


def test_a_shown_value_is_cut_and_escaped() -> None:
    from escalate.core.text import printable

    assert printable("a\x1b[2Jb\u202e\n") == "a\\x1b[2Jb\\u202e\\n"
    assert len(printable("x" * 100_000)) == 200
    assert printable("plain") == "plain"



@pytest.mark.parametrize("edit", [
    {"seq": 2.0}, {"v": True}, {"more": 0}, {"ts": "zzzz"}, {"ts": "2026-12-01T99:00:00.000000Z"},
])
def test_a_last_line_a_writer_never_writes_is_refused_by_writers_and_the_gate(
        cli: Any, runs_dir: Path, edit: dict[str, Any]) -> None:
    """The last line, which no later line vouches for, edited so that it still compares
    equal or looks like a timestamp: a writer must not copy it forward, nor a gate pass it."""
    run = Ledger.init(runs_dir, "r", cap="10")
    run.reserve("a", "1")
    log = runs_dir / "r" / "events.ndjson"
    lines = log.read_bytes().splitlines()
    last = orjson.loads(lines[-1])
    last.update(edit)
    lines[-1] = orjson.dumps(last)
    log.write_bytes(b"\n".join(lines) + b"\n")
    before = log.read_bytes()
    assert cli("reserve", "r", "b", "--estimate", "1").exit_code == 6
    assert cli("gate", "r").exit_code == 6
    assert cli("runs", "verify", "r").exit_code == 6
    assert log.read_bytes() == before


def test_the_gate_fails_what_only_the_schema_sees(cli: Any, runs_dir: Path) -> None:
    run = Ledger.init(runs_dir, "r", cap="10")
    run.reserve("a", "1")
    run.increase("a", "2", reason="fine")
    log = runs_dir / "r" / "events.ndjson"
    # An escape sequence in a field the fold does not use (the line is the last: no chain breaks).
    log.write_bytes(log.read_bytes().replace(b'"reason":"fine"', b'"reason":"\\u001b[2Jx"'))
    lines = log.read_bytes().splitlines()
    assert len(lines) == 3  # the edited line is the last: the chain still holds
    assert cli("gate", "r").exit_code == 6
    assert cli("runs", "verify", "r").exit_code == 6
