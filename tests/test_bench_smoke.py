"""The benchmark's run builder writes runs the library accepts (no timings asserted here)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from escalate import Ledger
from escalate.transfer import import_log

BENCH = Path(__file__).resolve().parents[1] / "bench" / "run.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("escalate_bench_run", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("shape", ["mixed", "few-tasks"])
def test_built_run_verifies_clean_with_the_expected_totals(bench: ModuleType, tmp_path: Path,
                                                            shape: str) -> None:
    run = bench.build_run(tmp_path, 1_000, shape=shape)
    report = Ledger.open(run.runs_dir, run.run_id).verify()
    assert report.problems == []
    assert report.torn_bytes == 0
    assert report.lines == 1_000
    assert report.state.seq == 1_000
    run.expected.check(report.state.totals(), len(report.state.tasks))
    if shape == "mixed":
        assert run.expected.released > 300
        assert run.expected.halts >= 1
    else:
        assert run.expected.tasks <= 100


def test_a_built_run_is_reused_and_takes_new_writes(bench: ModuleType, tmp_path: Path) -> None:
    first = bench.build_run(tmp_path, 1_000)
    written = first.log_path.stat().st_mtime_ns
    again = bench.build_run(tmp_path, 1_000)
    assert again.log_path.stat().st_mtime_ns == written
    ledger = Ledger.open(again.runs_dir, again.run_id, actor="tester")
    ledger.reserve("after-build", "1.00")
    ledger.release("after-build", "0.50")
    assert ledger.state().seq == 1_002


def test_the_postgresql_cases_run_and_check_their_runs(bench: ModuleType, pg_url: str,
                                                       tmp_path: Path) -> None:
    """Target 7's pieces on a small scale: a built run imported into the database takes a
    reserve+release cycle, and the throughput rounds (one run, a run per process) verify
    every run they wrote."""
    run = bench.build_run(tmp_path, 1_000)
    import_log(pg_url, run.run_id, run.log_path.read_bytes(), actor="tester")
    cycle = bench.ledger_cycle(pg_url, run.run_id, bench.TaskIds("smoke"))
    assert cycle() > 0
    assert Ledger.open(pg_url, run.run_id).state().seq == 1_002
    assert bench.contention_round(2, 3, "smoke-one", pg_url) > 0
    assert bench.contention_round(2, 3, "smoke-each", pg_url, one_run=False) > 0
    assert Ledger.open(pg_url, "contention-smoke-each-1").state().seq == 1 + 3 * 2
