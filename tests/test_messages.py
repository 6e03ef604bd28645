"""Refusals name the real difference and the next step that can work."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from escalate import Conflict, InputError, Ledger, Pending


def test_init_again_names_the_setting_that_differs(runs_dir: Path) -> None:
    Ledger.init(runs_dir, "r", cap="10")
    with pytest.raises(Conflict) as caught:
        Ledger.init(runs_dir, "r", cap="10", task_cap="5")
    assert "task cap $10.00, not $5.00" in caught.value.message
    assert "cap $10.00, not" not in caught.value.message.replace("task cap", "")
    with pytest.raises(Conflict) as caught:
        Ledger.init(runs_dir, "r", cap="10", escalation="enforce")
    assert "mode off, not enforce" in caught.value.message
    assert "escalate runs set" in caught.value.message
    with pytest.raises(Conflict) as caught:  # money and durations read as people write them
        Ledger.init(runs_dir, "r", cap="10", max_extension="5", escalation_timeout_s=1800)
    assert "max extension $0.00, not $5.00" in caught.value.message
    assert "timeout 1h, not 30m" in caught.value.message


def test_release_of_a_task_that_never_held_money_says_so(runs_dir: Path) -> None:
    run = Ledger.init(runs_dir, "r", cap="10", task_cap="2", escalation="enforce",
                      approval_threshold="1")
    with pytest.raises(Exception):  # noqa: B017 - halted over the task cap
        run.reserve("big", "5")
    with pytest.raises(Conflict) as caught:
        run.release("big", "1")
    assert "reserve it first" not in caught.value.message
    assert "nothing was reserved" in caught.value.message
    with pytest.raises(Pending) as pending:
        run.reserve("asks", "1.5")
    with pytest.raises(Conflict) as caught:
        run.release("asks", "1")
    escalation_id = pending.value.escalation_id
    assert f"escalate wait r {escalation_id}" in caught.value.message


@pytest.mark.parametrize("timeout", ["0", "0.5"])
def test_an_escalation_timeout_under_a_second_is_refused(cli: Any, runs_dir: Path, timeout: str) -> None:
    done = cli("runs", "init", "r", "--cap", "5", "--escalation", "enforce",
               "--escalation-timeout", timeout)
    assert done.exit_code == 2
    assert "at least 1s" in done.stderr
    assert not (runs_dir / "r").exists()


def test_a_runs_folder_that_is_a_file_is_bad_input(cli: Any, tmp_path: Path) -> None:
    a_file = tmp_path / "afile"
    a_file.write_text("not a folder")
    done = cli("runs", "init", "x", "--cap", "1", "--runs-dir", str(a_file))
    assert done.exit_code == 2
    assert "is a file" in done.stderr
    assert a_file.read_text() == "not a folder"
    with pytest.raises(InputError):
        Ledger.init(a_file, "x", cap="1")


def test_a_copied_run_folder_is_shown_under_its_own_name(cli: Any, runs_dir: Path) -> None:
    Ledger.init(runs_dir, "nightly", cap="5").reserve("t", "1")
    shutil.copytree(runs_dir / "nightly", runs_dir / "copy",
                    ignore=shutil.ignore_patterns("*.cache.sqlite*"))
    assert cli("runs", "show", "copy", "--json").json()["run"] == "copy"
    listed = {row["run"] for row in cli("runs", "list", "--json").json()["runs"]}
    assert listed == {"nightly", "copy"}


def test_runs_show_of_a_corrupt_log_says_it_is_incomplete(cli: Any, runs_dir: Path) -> None:
    run = Ledger.init(runs_dir, "r", cap="5")
    run.reserve("a", "1")
    run.reserve("b", "1")
    assert cli("runs", "show", "r", "--json").json()["complete"] is True
    log = runs_dir / "r" / "events.ndjson"
    lines = log.read_bytes().splitlines(keepends=True)
    lines[1] = lines[1].replace(b'"amount_micros":1000000', b'"amount_micros":2000000')
    log.write_bytes(b"".join(lines))
    shown = cli("runs", "show", "r", "--json")
    assert shown.exit_code == 0
    view = shown.json()
    assert view["complete"] is False
    assert view["warnings"] and "line 3" in view["warnings"][0]
