"""A task id first seen is checked with the others of its chunk of the log (``ids.all_ids``),
one match for them all; when one is not an id, the replay folds the whole log again with
each id checked on its line. Either way a replay names the same lines with the same
messages, and folds the same state, as checking each id on its line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from escalate import Ledger
from escalate.core.ids import all_ids, valid_id
from escalate.core.replay import replay
from escalate.errors import CorruptLedger
from escalate.stores.file.log import LOG_NAME
from tests.conftest import rechained

# Ids and near misses: the id characters, a newline (the joint), and some that are no id's.
_TEXT = st.text(alphabet="aZ09._:-\n é/", max_size=140) | st.from_regex(r"[a-z0-9][a-z0-9._:-]{0,130}",
                                                                        fullmatch=True)


@given(st.lists(_TEXT, max_size=6))
def test_ids_checked_together_follow_the_rule_of_each(values: list[str]) -> None:
    assert all_ids(values) == all(valid_id(value) for value in values)


@pytest.mark.parametrize("values", [[], ["a"], ["a", "b.c", "d:e-f_g"], ["a" * 128, "b"]])
def test_ids_that_follow_the_rule_hold_together(values: list[str]) -> None:
    assert all_ids(values)


@pytest.mark.parametrize("values", [[""], ["a", ""], ["a\nb"], ["a.", ".b"], ["a..b"], ["a" * 129],
                                    ["a", "-b"], ["é"], ["a b"], ["a\n"]])
def test_a_value_that_is_no_id_fails_them_together(values: list[str]) -> None:
    assert not all_ids(values)


def _log_with(tmp_path: Path, bad: dict[int, Any]) -> Ledger:
    """A run of 300 reservations (one chunk of the log), the task ids of the lines in ``bad``
    (line number: value) replaced, the chain made good again."""
    run = Ledger.init(tmp_path, "r", cap="1000", actor="tester")
    for number in range(300):
        run.reserve(f"t-{number}", "1")
    log = tmp_path / "r" / LOG_NAME
    events = [orjson.loads(line) for line in log.read_bytes().splitlines()]
    for line, value in bad.items():
        events[line - 1]["task"] = value
    log.write_bytes(rechained(events))
    return run


@pytest.mark.parametrize("bad", [{150: "t/150"}, {2: ".t"}, {301: "é"}, {40: "a..b", 200: "x" * 129},
                                 {100: "t-97"}])
def test_a_replay_names_a_task_id_that_is_no_id_on_its_line(tmp_path: Path, bad: dict[int, Any]) -> None:
    run = _log_with(tmp_path, bad)
    log = run.store.log
    each = replay(log, "r", tolerant=True, each_id=True)
    together = replay(log, "r", tolerant=True)
    assert together.problems == each.problems
    assert [line for line, _ in together.problems] == sorted(bad)
    assert together.state == each.state and together.lines == each.lines == 301
    strict = replay(log, "r")
    assert isinstance(strict.problem, CorruptLedger)
    assert (strict.problem.line, strict.problem.problem) == each.problems[0]
    assert strict.state.seq == min(bad) - 1  # nothing folded from the line named on
