"""Hostile input: ids that try to leave the runs root, symlinks, and a fuzz of ids and
amounts through the real command. A refusal (exit 2) leaves the runs root unchanged."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from escalate import Ledger
from escalate.core.ids import check_id
from escalate.errors import InvalidId
from escalate.stores.file.log import LOG_NAME
from tests.conftest import snapshot_tree

HOSTILE_IDS = [
    "a/b", "/etc", "../x", "a\\b", "..", "a..b", ".hidden", ".", "a\x00b", "a\x01b", "a\x7f",
    "a\nb", "a\n", "a\rb", "a\tb", "a b", "", "-a", "_a", "x" * 129, "\u0430bc",  # Cyrillic а
    "ａbc", "é", "a\u200bb", "a\u2215b", "a／b", "run\udcff", "r;rm -rf", "a*", "$HOME",
]


def _commands(bad: str) -> list[tuple[str, ...]]:
    return [
        ("runs", "init", bad, "--cap", "1"),
        ("reserve", bad, "t", "--estimate", "1"),
        ("reserve", "r", bad, "--estimate", "1"),
        ("increase", "r", bad, "--to", "2"),
        ("release", "r", bad, "--actual", "1"),
        ("approve", "r", bad),
        ("runs", "show", bad),
        ("runs", "verify", bad),
    ]


def test_check_id_accepts_the_documented_alphabet() -> None:
    for good in ("r", "run-42", "a.b_c:d-e", "9" * 128, "A1.2"):
        assert check_id(good) == good
    for bad in HOSTILE_IDS:
        with pytest.raises(InvalidId):
            check_id(bad)


@pytest.mark.parametrize("bad", HOSTILE_IDS, ids=repr)
def test_hostile_ids_are_refused_before_any_file_is_touched(bad: str, cli: Any, runs_dir: Path) -> None:
    assert cli("runs", "init", "r", "--cap", "5").exit_code == 0
    assert cli("reserve", "r", "t", "--estimate", "1").exit_code == 0
    before = snapshot_tree(runs_dir.parent)
    for args in _commands(bad):
        result = cli(*args, "--json")
        assert result.exit_code == 2, (args, result)
        assert "Traceback" not in result.stderr
        if not bad.startswith("-"):  # "-a" is an unknown option to the parser: a usage error
            assert result.json()["error"] == "invalid_id"
    assert snapshot_tree(runs_dir.parent) == before


def test_a_missing_runs_root_is_not_created_by_a_refusal(cli: Any, runs_dir: Path) -> None:
    refusals = [*_commands("../x"), ("runs", "init", "r", "--cap", "-1"),
                ("runs", "init", "r", "--cap", "1", "--escalation", "loud"),
                ("reserve", "r", "t", "--estimate", "1"), ("runs", "show", "r"),
                ("runs", "verify", "r"), ("sweep", "r")]
    for args in refusals:
        assert cli(*args).exit_code == 2, args
        assert not runs_dir.exists(), args
    for args in [("sweep",), ("runs", "list"), ("escalations",)]:  # no runs yet: an empty answer
        assert cli(*args).exit_code == 0, args
        assert not runs_dir.exists(), args


def _link_cases(runs_dir: Path, outside: Path) -> dict[str, Path]:
    """Each kind of link escalate must refuse; returns what it must never write to."""
    real = outside / "real"
    Ledger.init(outside, "real", cap="5", actor="tester")
    (runs_dir / "dir-link").symlink_to(real, target_is_directory=True)
    (runs_dir / "log-link").mkdir()
    (runs_dir / "log-link" / LOG_NAME).symlink_to(real / LOG_NAME)
    Ledger.init(runs_dir, "lock-link", cap="5", actor="tester")
    (runs_dir / "lock-link" / f"{LOG_NAME}.lock").unlink()
    (runs_dir / "lock-link" / f"{LOG_NAME}.lock").symlink_to(outside / "created-by-lock")
    return {"dir-link": real, "log-link": real, "lock-link": outside / "created-by-lock"}


def test_symlinked_run_folders_logs_and_locks_are_refused(cli: Any, runs_dir: Path, tmp_path: Path) -> None:
    runs_dir.mkdir()
    outside = tmp_path / "outside"
    _link_cases(runs_dir, outside)
    before = (snapshot_tree(runs_dir.parent), snapshot_tree(outside))
    for run in ("dir-link", "log-link", "lock-link"):
        for args in [("reserve", run, "t", "--estimate", "1"), ("release", run, "t", "--actual", "1"),
                     ("runs", "init", run, "--cap", "5"), ("runs", "set", run, "--escalation", "shadow"),
                     ("runs", "show", run), ("runs", "verify", run), ("sweep", run)]:
            result = cli(*args, "--json")
            assert result.exit_code == 2, (args, result)
            assert result.json()["error"] == "symlink" and "symbolic link" in result.stderr
    assert not (outside / "created-by-lock").exists()
    listed = cli("runs", "list", "--json")
    assert listed.exit_code == 0
    assert {row["run"]: row.get("error") for row in listed.json()["runs"]} == {
        "lock-link": "symlink", "log-link": "symlink"}  # a linked folder is not listed at all
    assert (snapshot_tree(runs_dir.parent), snapshot_tree(outside)) == before


def test_a_run_path_that_is_a_file_is_refused(cli: Any, runs_dir: Path) -> None:
    runs_dir.mkdir()
    (runs_dir / "r").write_bytes(b"not a folder")
    before = snapshot_tree(runs_dir)
    for args in [("reserve", "r", "t", "--estimate", "1"), ("runs", "init", "r", "--cap", "1"),
                 ("runs", "show", "r")]:
        assert cli(*args).exit_code == 2, args
    assert snapshot_tree(runs_dir) == before


def test_free_text_that_cannot_be_written_is_refused(cli: Any, runs_dir: Path) -> None:
    assert cli("runs", "init", "r", "--cap", "5").exit_code == 0
    assert cli("reserve", "r", "t", "--estimate", "1").exit_code == 0
    before = snapshot_tree(runs_dir)
    for args in [("increase", "r", "t", "--to", "2", "--reason", "bad \udcff bytes"),
                 ("increase", "r", "t", "--to", "2", "--reason", "two\nlines"),
                 ("increase", "r", "t", "--to", "2", "--reason", "x" * 1001),
                 ("reserve", "r", "u", "--estimate", "1", "--by", "me\x00"),
                 ("approve", "r", "esc-1", "--by", "\udcff")]:
        result = cli(*args)
        assert result.exit_code == 2, (args, result)
    assert snapshot_tree(runs_dir) == before


# ---------------------------------------------------------------------- fuzzing

ID_TEXT = st.one_of(
    st.text(max_size=140),
    st.text(alphabet="abc.-_:/\\\x00\n é", max_size=8),
    st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,20}", fullmatch=True),
)
AMOUNT_TEXT = st.one_of(
    st.text(max_size=30),
    st.text(alphabet="0123456789.$-+eE, ", max_size=20),
    st.from_regex(r"\$?[0-9]{0,11}(\.[0-9]{0,7})?", fullmatch=True),
    st.sampled_from(["NaN", "inf", "1e3", "1,000", "٣", "1000000000", "1000000000.000001", "0"]),
)
FUZZ_EXAMPLES = 200


def test_fuzzed_ids_and_amounts_through_the_cli(cli: Any, runs_dir: Path) -> None:
    assert cli("runs", "init", "r", "--cap", "1000", "--task-cap", "100").exit_code == 0
    ran: list[int] = []

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(command=st.sampled_from(["init", "reserve", "increase", "release", "reserve-run"]),
           some_id=ID_TEXT, amount=AMOUNT_TEXT, reason=st.text(max_size=20))
    def one(command: str, some_id: str, amount: str, reason: str) -> None:
        ran.append(1)
        args = {
            "init": ("runs", "init", some_id, "--cap", amount),
            "reserve": ("reserve", "r", some_id, "--estimate", amount),
            "reserve-run": ("reserve", some_id, "t", "--estimate", amount),
            "increase": ("increase", "r", some_id, "--to", amount, "--reason", reason),
            "release": ("release", "r", some_id, "--actual", amount),
        }[command]
        before = snapshot_tree(runs_dir)
        result = cli(*args)
        assert result.exit_code in (0, 2, 3, 4, 5, 6, 7), (args, result)
        assert "Traceback" not in result.stderr + result.stdout
        if result.exit_code == 2:
            assert snapshot_tree(runs_dir) == before, args
        elif result.exit_code != 0:
            assert result.stderr.startswith("escalate: "), (args, result)

    one()
    print(f"fuzzed {len(ran)} CLI calls")
    assert len(ran) == FUZZ_EXAMPLES
    assert cli("runs", "verify", "r").exit_code == 0
    # Nothing was written outside the runs root.
    assert sorted(os.listdir(runs_dir.parent)) == ["runs"]
