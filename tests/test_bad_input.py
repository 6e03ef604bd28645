"""Every bad input leaves the runs root byte-for-byte unchanged and says so in one line."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from conftest import FakeClock, snapshot_tree

from escalate import Ledger, Refused

RUN = "r"


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run with every task state: ``held`` reserves $2, ``done`` was released at $1,
    ``stopped`` was halted over the $5 task cap, ``capped`` was halted on an increase and
    still holds $1."""
    root = tmp_path_factory.mktemp("template") / "runs"
    run = Ledger.init(root, RUN, cap="10", task_cap="5", actor="tester", clock=FakeClock())
    run.reserve("held", "2")
    run.reserve("done", "1")
    run.release("done", "1")
    with pytest.raises(Refused):
        run.reserve("stopped", "6")
    run.reserve("capped", "1")
    with pytest.raises(Refused):
        run.increase("capped", "5.5")
    return root


@pytest.fixture
def populated(template: Path, runs_dir: Path) -> Path:
    shutil.copytree(template, runs_dir, ignore=shutil.ignore_patterns("*.cache.sqlite*"))
    return runs_dir


def everything(root: Path) -> tuple[dict[str, bytes], list[str]]:
    """Every file's bytes (but the disposable checkpoint, see ``snapshot_tree``) and every
    folder under ``root``: nothing may appear or change."""
    return snapshot_tree(root), sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_dir())


LONG_ID = "a" * 129
BAD_IDS = ["../x", "a/b", "/abs", ".hidden", "..", "a..b", LONG_ID, "a b", "a\nb", "caf\u00e9", "x\x00y",
           "a\\b", "~root", "*"]

FAILURES = [
    # ---- amounts (exit 2)
    *[pytest.param(["reserve", RUN, "new", "--estimate", bad], 2, id=f"reserve-amount-{i}")
      for i, bad in enumerate(["", "NaN", "inf", "-1", "1e2", "1,000", "0.0000001", "\u0663",
                               "1000000001", "$", "abc", "0x1"])],
    pytest.param(["increase", RUN, "held", "--to", "2.0000001"], 2, id="increase-seven-decimals"),
    pytest.param(["increase", RUN, "held", "--to", "-3"], 2, id="increase-negative"),
    pytest.param(["release", RUN, "held", "--actual", "NaN"], 2, id="release-nan"),
    pytest.param(["release", RUN, "held", "--actual", "1 000"], 2, id="release-space-separator"),
    pytest.param(["runs", "init", "fresh", "--cap", "inf"], 2, id="init-cap-inf"),
    pytest.param(["runs", "init", "fresh", "--cap", "0"], 2, id="init-cap-zero"),
    pytest.param(["runs", "init", "fresh", "--cap", "1", "--task-cap", "2"], 2, id="init-task-cap-above-cap"),
    pytest.param(["runs", "init", "fresh", "--cap", "1", "--task-cap", "1e0"], 2,
                 id="init-task-cap-exponent"),
    pytest.param(["runs", "init", "fresh", "--cap", "1", "--escalation", "sometimes"], 2, id="init-bad-mode"),
    # ---- ids (exit 2); some start with '-' or contain NUL and fail in the parser, also exit 2
    *[pytest.param(["runs", "init", bad, "--cap", "1"], 2, id=f"init-run-id-{i}")
      for i, bad in enumerate(BAD_IDS)],
    *[pytest.param(["reserve", bad, "t", "--estimate", "1"], 2, id=f"reserve-run-id-{i}")
      for i, bad in enumerate(BAD_IDS)],
    *[pytest.param(["reserve", RUN, bad, "--estimate", "1"], 2, id=f"reserve-task-id-{i}")
      for i, bad in enumerate(BAD_IDS)],
    pytest.param(["increase", RUN, "../held", "--to", "3"], 2, id="increase-task-traversal"),
    pytest.param(["release", RUN, "a/b", "--actual", "1"], 2, id="release-task-slash"),
    pytest.param(["runs", "show", "../r"], 2, id="show-run-traversal"),
    pytest.param(["runs", "show", ".hidden"], 2, id="show-run-hidden"),
    # ---- unknown run (exit 2)
    pytest.param(["reserve", "ghost", "t", "--estimate", "1"], 2, id="reserve-unknown-run"),
    pytest.param(["increase", "ghost", "t", "--to", "1"], 2, id="increase-unknown-run"),
    pytest.param(["release", "ghost", "t", "--actual", "1"], 2, id="release-unknown-run"),
    pytest.param(["runs", "show", "ghost"], 2, id="show-unknown-run"),
    # ---- usage: unknown and missing options, bad option values (exit 2)
    pytest.param(["reserve", RUN, "new", "--estimate", "1", "--bogus"], 2, id="unknown-option"),
    pytest.param(["reserve", RUN, "new", "--estimate", "1", "extra"], 2, id="extra-argument"),
    pytest.param(["runs", "list", "--bogus"], 2, id="list-unknown-option"),
    pytest.param(["runs", "frobnicate"], 2, id="unknown-runs-command"),
    pytest.param(["frobnicate"], 2, id="unknown-command"),
    pytest.param(["reserve", RUN, "new"], 2, id="reserve-missing-estimate"),
    pytest.param(["reserve", RUN, "new", "--estimate"], 2, id="reserve-estimate-without-value"),
    pytest.param(["reserve", RUN], 2, id="reserve-missing-task"),
    pytest.param(["increase", RUN, "held"], 2, id="increase-missing-to"),
    pytest.param(["release", RUN, "held"], 2, id="release-missing-actual"),
    pytest.param(["runs", "init", "fresh"], 2, id="init-missing-cap"),
    pytest.param(["runs", "show"], 2, id="show-missing-run"),
    pytest.param(["reserve", RUN, "new", "--estimate", "1", "--lock-timeout", "soon"], 2,
                 id="bad-lock-timeout"),
    pytest.param(["reserve", RUN, "new", "--estimate", "1", "--lock-timeout", "-1"], 2,
                 id="negative-lock-timeout"),
    pytest.param(["reserve", RUN, "new", "--estimate", "1", "--by", "bad\tname"], 2, id="unprintable-actor"),
    # An explicitly empty --by is refused, not replaced by ESCALATE_ACTOR (set here) or the OS user.
    pytest.param(["reserve", RUN, "new", "--estimate", "1", "--by", ""], 2, id="empty-actor-reserve"),
    pytest.param(["increase", RUN, "held", "--to", "3", "--by="], 2, id="empty-actor-increase"),
    pytest.param(["release", RUN, "held", "--actual", "1", "--by", ""], 2, id="empty-actor-release"),
    pytest.param(["runs", "init", "fresh", "--cap", "1", "--by", ""], 2, id="empty-actor-init"),
    pytest.param(["approve", RUN, "esc-1", "--by", ""], 2, id="empty-actor-approve"),
    # ---- conflicts append nothing (exit 5)
    pytest.param(["reserve", RUN, "held", "--estimate", "3"], 5, id="reserve-different-amount"),
    pytest.param(["increase", RUN, "held", "--to", "1"], 5, id="increase-lower"),
    pytest.param(["increase", RUN, "nobody", "--to", "1"], 5, id="increase-unreserved"),
    pytest.param(["release", RUN, "nobody", "--actual", "1"], 5, id="release-unreserved"),
    pytest.param(["release", RUN, "stopped", "--actual", "1"], 5, id="release-halted-without-hold"),
    pytest.param(["reserve", RUN, "done", "--estimate", "1"], 5, id="reserve-released-task"),
    pytest.param(["increase", RUN, "done", "--to", "2"], 5, id="increase-released-task"),
    pytest.param(["release", RUN, "done", "--actual", "2"], 5, id="release-again-different-actual"),
    pytest.param(["runs", "init", RUN, "--cap", "11"], 5, id="init-different-settings"),
    # ---- halted tasks are terminal: asking again appends nothing (exit 3)
    pytest.param(["reserve", RUN, "stopped", "--estimate", "1"], 3, id="reserve-halted-task"),
    pytest.param(["increase", RUN, "capped", "--to", "2"], 3, id="increase-halted-task"),
    pytest.param(["reserve", RUN, "capped", "--estimate", "1"], 3, id="reserve-increase-halted-task"),
]


@pytest.mark.parametrize(("args", "exit_code"), FAILURES)
@pytest.mark.parametrize("json_out", [False, True], ids=["human", "json"])
def test_bad_input_changes_nothing(cli: Any, populated: Path, args: list[str], exit_code: int,
                                   json_out: bool) -> None:
    # Snapshot the folder above the runs root too: a traversal would land there.
    outside = populated.parent
    before = everything(outside)
    result = cli(*args, *(["--json"] if json_out else []))
    assert result.exit_code == exit_code, (result.stdout, result.stderr)
    assert everything(outside) == before
    [line] = result.stderr.splitlines()
    assert line.startswith("escalate: ")
    if json_out and args[-1] != "--estimate":  # there "--json" is taken as the missing value
        # One JSON object on stdout, errors included, usage errors too
        # (docs/getting-started.md, docs/exit-codes.md).
        assert len(result.stdout.splitlines()) == 1
        payload = result.json()
        assert payload["exit_code"] == exit_code
        assert payload["error"] and payload["message"] in line
    else:
        assert result.stdout == ""


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["reserve", RUN, "held", "--estimate", "2"], id="reserve-same-amount"),
        pytest.param(["reserve", RUN, "held", "--estimate", "$2.000000"],
                     id="reserve-same-amount-other-spelling"),
        pytest.param(["increase", RUN, "held", "--to", "2"], id="increase-to-current"),
        pytest.param(["release", RUN, "done", "--actual", "1"], id="release-same-actual"),
        pytest.param(["runs", "init", RUN, "--cap", "10", "--task-cap", "5"], id="init-same-settings"),
    ],
)
@pytest.mark.parametrize("json_out", [False, True], ids=["human", "json"])
def test_idempotent_repeats_change_nothing(cli: Any, populated: Path, args: list[str],
                                           json_out: bool) -> None:
    before = everything(populated.parent)
    result = cli(*args, *(["--json"] if json_out else []))
    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""
    assert everything(populated.parent) == before
    if json_out and args[0] != "runs":
        assert result.json()["status"] == "exists"


@pytest.mark.parametrize("bad", BAD_IDS)
def test_library_refuses_bad_ids_before_touching_disk(populated: Path, bad: str) -> None:
    from escalate import InvalidId

    before = everything(populated.parent)
    with pytest.raises(InvalidId) as caught:
        Ledger.init(populated, bad, cap="1")
    assert caught.value.exit_code == 2
    run = Ledger.open(populated, RUN)
    for method in (run.reserve, run.increase, run.release):
        with pytest.raises(InvalidId):
            method(bad, "1")
    assert everything(populated.parent) == before


def test_a_128_character_id_is_fine(cli: Any, populated: Path) -> None:
    longest = "a" * 128
    assert cli("reserve", RUN, longest, "--estimate", "0.5").exit_code == 0
    assert cli("runs", "init", longest, "--cap", "1").exit_code == 0
    assert (populated / longest / "events.ndjson").is_file()


def test_an_empty_by_names_the_problem(cli: Any, populated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    result = cli("reserve", RUN, "new", "--estimate", "1", "--by", "", "--json")
    assert (result.exit_code, result.json()["error"]) == (2, "invalid_actor")
    assert "--by is empty" in result.stderr
    # An empty ESCALATE_ACTOR counts as unset, like every option's variable.
    monkeypatch.setenv("ESCALATE_ACTOR", "")
    assert cli("reserve", RUN, "new", "--estimate", "1").exit_code == 0
