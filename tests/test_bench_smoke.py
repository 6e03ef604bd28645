"""The benchmark's run builder writes runs the library accepts (no timings asserted here)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

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


# ---------------------------------------------------------------------- side by side (--against)


@pytest.fixture
def against(bench: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """bench/against.py with every folder it writes (built runs, copies, checked-out
    revisions) under ``tmp_path``, never in the repository."""
    import against as module
    import run  # bench/ is on sys.path once bench/run.py is loaded

    for owner in (run, module, bench):
        monkeypatch.setattr(owner, "OUT_DIR", tmp_path / "out")
    monkeypatch.setattr(module, "TREES_DIR", tmp_path / "trees")
    return module


def test_the_bare_replay_reads_every_line_and_adds_up_what_was_spent(bench: ModuleType, against: ModuleType,
                                                                      tmp_path: Path) -> None:
    """The floor the cold replay is shown against: every line parsed, the amounts spent summed
    to the generator's total; a total that differs stops the bench."""
    run = bench.build_run(tmp_path, 1_000)
    seconds, cpu_seconds = against.bare(run)
    assert seconds > 0 and cpu_seconds > 0
    run.expected.spent_micros += 1
    with pytest.raises(AssertionError, match="bare replay"):
        against.bare(run)


def test_a_paired_row_compares_the_samples_taken_side_by_side(bench: ModuleType) -> None:
    """A paired row gates on the worse for A of the median of the pairs' ratios (the i-th
    sample of each side, taken in the same period) and the ratio of the two medians: B slowed
    in two periods where A was not does not make A faster, nor does the pairing forgive A its
    own slow periods; a side slower in every pair fails."""
    a, b = [1.0, 1.6, 1.6, 1.0, 1.0], [1.0, 1.6, 1.6, 1.6, 1.6]  # the same but for B's last two
    assert bench.median(a) / bench.median(b) == 0.625
    assert bench.paired_ratio(a, b) == 1.0
    assert bench.ratio_row("t", a, b, 0.9).verdict == "PASS"
    assert bench.ratio_row("t", a, b, 0.9, paired=True).verdict == "FAIL"
    assert bench.paired_ratio(b, a) == 1.0 and bench.median(b) / bench.median(a) == 1.6
    assert bench.ratio_row("t", b, a, 1.1, paired=True).verdict == "FAIL"  # A slow where B was not
    slower = [1.11 * x for x in b]  # 11 % slower in every pair
    assert bench.ratio_row("t", slower, b, 1.1, paired=True).verdict == "FAIL"
    assert bench.ratio_row("t", slower, b, 1.12, paired=True).verdict == "PASS"
    with pytest.raises(ValueError, match="pairs"):
        bench.paired_ratio(a, b[:-1])


def test_a_hot_path_more_than_ten_percent_slower_fails_and_exits_1(bench: ModuleType, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The rule make bench applies, on made-up timings: times at most 1.1 times the
    revision's, rates at least 1/1.1 of them; an information row never fails."""
    monkeypatch.setattr(bench, "OUT_DIR", tmp_path / "out")
    base = [0.010, 0.011, 0.009]
    assert bench.ratio_row("t", [0.011, 0.011, 0.011], base, 1.1).verdict == "PASS"
    slower = bench.ratio_row("t", [0.0111, 0.0112, 0.0110], base, 1.1)
    assert (slower.verdict, slower.ratio) == ("FAIL", "1.11 (≤ 1.1)")
    assert bench.ratio_row("t", [0.5], base, None).verdict == "info"
    rates = [1_000.0, 1_100.0, 900.0]
    assert bench.ratio_row("r", [910.0], rates, 0.909, higher_is_better=True).verdict == "PASS"
    fewer = bench.ratio_row("r", [900.0], rates, 0.909, higher_is_better=True)
    assert (fewer.verdict, fewer.ratio) == ("FAIL", "0.90 (≥ 0.909)")
    assert bench._finish([slower, bench.ratio_row("t", [1.0], [1.0], 1.1)], ["--baseline"], 0.0) == 1
    assert bench._finish([bench.ratio_row("t", [1.0], [1.0], 1.1)], ["--baseline"], 0.0) == 0
    written = (tmp_path / "out" / "results.md").read_text()
    assert "with `make bench`" in written
    assert "load average" in written


def test_a_contention_round_reports_each_processs_worst_operation(tmp_path: Path) -> None:
    """The driver's round, as another tree's Python runs it: every process's worst operation,
    in worker order, beside the round's worst."""
    import json
    import subprocess

    done = subprocess.run([sys.executable, str(BENCH.with_name("driver.py")), "contention", str(tmp_path),
                           "t", "3", "2"], capture_output=True, text=True, timeout=120, check=True)
    result = json.loads(done.stdout.splitlines()[-1])
    assert len(result["worst_op_by_worker_s"]) == 3
    assert max(result["worst_op_by_worker_s"]) == result["worst_op_s"] > 0
    assert Ledger.open(tmp_path, "contention-t").state().seq == 1 + 3 * 2 * 2


def test_contention_holds_each_rounds_worst_operation_to_twice_the_revisions_as_a_median(
        against: ModuleType) -> None:
    """Under contention the ops/s must reach 0.9 of the revision's, and the worst single
    operation of each round over the revision's in the same period, the median over rounds,
    at most twice: one unlucky round fails nothing, a worst operation that is long in most rounds does. The
    worst of all rounds is shown beside them, for information."""
    ops = {"a": [1_800.0, 1_700.0, 1_900.0], "b": [2_000.0, 1_900.0, 2_100.0]}
    one_bad_round = {"a": [0.030, 0.200, 0.031], "b": [0.020, 0.021, 0.019]}
    rows = against.contention_rows("8 processes", ops, one_bad_round, "a", "b")
    assert [row.verdict for row in rows] == ["PASS", "PASS", "info"]
    assert rows[1].ratio == "1.63 (≤ 2)" and rows[2].ratio == "9.52"
    assert "200.0 ms vs 21.0 ms" in rows[2].measured
    often_long = {"a": [0.045, 0.043, 0.031], "b": [0.020, 0.021, 0.019]}
    assert against.contention_rows("8", ops, often_long, "a", "b")[1].verdict == "FAIL"
    fewer = {"a": [1_790.0], "b": [2_000.0]}
    assert [row.verdict for row in against.contention_rows("8", fewer, {"a": [0.02], "b": [0.02]},
                                                           "a", "b")] == ["FAIL", "PASS", "info"]
    assert against.contention_rows("8", {"a": [1_800.0], "b": [2_000.0]}, {"a": [0.02], "b": [0.02]},
                                   "a", "b")[0].verdict == "PASS"
    # A process left waiting while the others take turns stands out from the rest; a round
    # where every process is slow alike does not.
    assert against.worst_spread([0.010, 0.011, 0.080, 0.009, 0.010]) == pytest.approx(8.0)
    assert against.worst_spread([0.050, 0.055, 0.050, 0.045]) == pytest.approx(1.1)


@pytest.mark.parametrize("count", [1, 2, 3, 4, 5])
def test_interleaved_cases_follow_every_case_equally_often(bench: ModuleType, count: int) -> None:
    """Two trees at two sizes are four cases, and a case run right after one of its own
    process's is faster: each case must follow every case (itself too) equally often, and
    all cases get as many samples. Forward-then-reversed rounds let only the first and the
    last case follow themselves (the working tree's 1M cycle never did, the revision's
    did every other round)."""
    ran: list[str] = []
    names = [f"case-{n}" for n in range(count)]

    def case(name: str) -> Any:
        return lambda: ran.append(name) or 1.0

    samples = bench.interleaved({name: case(name) for name in names}, 3 * count, 60.0)
    assert {name: len(values) for name, values in samples.items()} == dict.fromkeys(names, 3 * count)
    assert len(ran) == 3 * count * count
    follows: dict[tuple[str, str], int] = {}
    for before, after in zip(ran, ran[1:] + ran[:1], strict=True):  # the last wraps to the first
        follows[before, after] = follows.get((before, after), 0) + 1
    assert follows == {(a, b): 3 for a in names for b in names}


def test_the_recorded_baseline_is_a_commit_of_the_repository(against: ModuleType) -> None:
    rev, name = against.baseline_revision()
    assert name == "0.1.0"
    assert against._git("rev-parse", "--verify", f"{rev}^{{commit}}") == rev


def test_the_driver_answers_cycles_and_call_counts_in_its_own_python(against: ModuleType,
                                                                     bench: ModuleType,
                                                                     tmp_path: Path) -> None:
    """The protocol another tree's Python speaks: a run opened (and warmed), single cycles
    timed, the calls of one reserve and one release counted; each call a real write."""
    run = bench.build_run(tmp_path, 1_000)
    driver = against.Driver(against.working_tree())
    try:
        assert driver.ask(op="open", name="one", where=str(run.runs_dir), run_id=run.run_id,
                          prefix="smoke") == {"ok": True}
        timed = driver.ask(op="cycle", name="one")
        assert timed["seconds"] > 0 and 0 < timed["cpu_seconds"] < 10
        counts = driver.ask(op="calls", where=str(run.runs_dir), run_id=run.run_id, prefix="counted")
    finally:
        driver.close()
    assert driver.process.returncode == 0
    assert counts["reserve"] > 50
    assert counts["release"] > 50
    assert counts["reserve_pathlib"] >= 0
    # the warm-up cycle, the timed one, and the warm-up and counted cycles of "calls"
    assert Ledger.open(run.runs_dir, run.run_id).state().seq == 1_000 + 4 * 2


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="no CPU affinity here")
def test_both_trees_drivers_run_on_one_and_the_same_cpu(against: ModuleType) -> None:
    """Each CPU of a shared machine has its own neighbours and caches: the two sides'
    drivers are pinned to a single CPU, the same one, so neither keeps a luckier one."""
    drivers = [against.Driver(against.working_tree()) for _ in range(2)]
    try:
        cpus = [os.sched_getaffinity(driver.process.pid) for driver in drivers]
    finally:
        for driver in drivers:
            driver.close()
    assert len(cpus[0]) == 1
    assert cpus[0] == cpus[1]
    assert cpus[0] <= os.sched_getaffinity(0)


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="no CPU affinity here")
def test_the_processes_both_sides_time_run_on_the_drivers_cpu(bench: ModuleType, against: ModuleType,
                                                              tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A cold replay, the bare replay beside it and every whole process a comparison times
    run on the drivers' one CPU, so a side is never timed on a slower CPU than the other."""
    cpu = against.driver_cpu()
    assert len(cpu) == 1
    shows = tmp_path / "cpus"
    report = '{"lines": 1, "spent_micros": 0, "seconds": 1.0, "cpu_seconds": 1.0}'
    probe = [sys.executable, "-c",
             f"import os; open({str(shows)!r}, 'a').write(str(os.sched_getaffinity(0)) + '\\n'); "
             f"print({report!r})"]
    bench.timed_process(probe, cpus=cpu)
    real_run = against.subprocess.run
    monkeypatch.setattr(against.subprocess, "run", lambda argv, **kwargs: real_run(probe, **kwargs))
    assert against.bare(bench.BuiltRun(tmp_path, "r", bench.Expected(events=1), "mixed")) == (1.0, 1.0)
    assert shows.read_text().splitlines() == [str(cpu)] * 2


@pytest.mark.slow
def test_against_head_measures_both_trees_side_by_side(against: ModuleType, tmp_path: Path) -> None:
    """The whole --against path on tiny runs: HEAD checked out and installed in a worktree
    of its own, every comparison made, and the environment reused the second time."""
    rows: list[Any] = []
    try:
        heading = against.run_against("HEAD", None, [200, 400], True, rows)
        installed = next((tmp_path / "trees").iterdir())
        stamp = (installed / "installed").stat().st_mtime_ns
        assert against.prepare("HEAD").python == str(installed / "venv" / "bin" / "python")
        assert (installed / "installed").stat().st_mtime_ns == stamp
    finally:
        for tree in (tmp_path / "trees").glob("*/src"):
            against._git("worktree", "remove", "--force", str(tree))
    assert heading[0].startswith("A: working tree")
    targets = [row.target for row in rows]
    for wanted in ("cold replay", "cold replay @400, A vs a bare replay", "Python calls", "pathlib parses",
                   "library: reserve+release @200", "library: reserve+release @400",
                   "escalate reserve, whole process", "contention:", "contention: worst single operation",
                   "runs show --json", "PostgreSQL: round trips of Ledger.open",
                   "PostgreSQL: escalate reserve"):
        assert any(target.startswith(wanted) for target in targets), wanted
    hot = [row for row in rows if row.verdict != "info"]
    # cold replay; calls and pathlib; wall and CPU time at both sizes; whole process;
    # contention (ops/s, worst op); runs show; PostgreSQL's round trips and whole process
    assert len(hot) == 13
    assert all(row.verdict in ("PASS", "FAIL") for row in hot)


def test_a_revision_that_does_not_install_with_these_versions_gets_its_own(
        against: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The dependencies are pinned to this environment's versions; a revision that refuses
    them is installed with its own instead of stopping the bench (the installs are
    recorded here, not run)."""
    steps: list[list[str]] = []

    def step(argv: list[str], log: Path, *, may_fail: bool = False) -> bool:
        steps.append(argv)
        return "-c" not in argv  # the pinned install fails

    monkeypatch.setattr(against, "_quiet", step)
    try:
        tree = against.prepare("HEAD")
    finally:
        for checkout in (tmp_path / "trees").glob("*/src"):
            against._git("worktree", "remove", "--force", str(checkout))
    installs = [argv for argv in steps if "install" in argv]
    assert len(installs) == 2
    assert "-c" in installs[0] and "-c" not in installs[1]
    assert installs[1][-1].endswith("/src")
    assert tree.python.endswith("/venv/bin/python")
    assert (Path(tree.python).parents[2] / "installed").is_file()


def test_the_processes_it_times_may_keep_their_bytecode(bench: ModuleType,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A working tree installed in place compiles its modules in every process it starts
    when bytecode may not be written, and the revision it is compared with does not: the
    processes the bench times may write it."""
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    monkeypatch.setenv("ESCALATE_RUNS_DIR", "elsewhere")
    env = bench.cli_env()
    assert "PYTHONDONTWRITEBYTECODE" not in env and "ESCALATE_RUNS_DIR" not in env
    assert env["ESCALATE_ACTOR"] == bench.ACTOR


# ---------------------------------------------------------------------- make bench's gates


class _FakeDriver:
    """A tree's driver answering with made-up measurements: each cycle takes ``seconds`` (wall
    and CPU alike), one reserve ``calls`` Python calls."""

    def __init__(self, tree: Any, seconds: float, calls: int, pathlib: int = 0) -> None:
        self.tree, self.seconds, self.calls, self.pathlib = tree, seconds, calls, pathlib
        self.prefixes: list[str] = []
        self.closed = False

    def close(self) -> None:
        self.closed = True

    def ask(self, **request: Any) -> dict[str, Any]:
        if request["op"] == "open":
            self.prefixes.append(request["prefix"])
            return {"ok": True}
        if request["op"] == "cycle":
            return {"seconds": self.seconds, "cpu_seconds": self.seconds}
        return {"reserve": self.calls, "release": 270, "reserve_pathlib": self.pathlib, "release_pathlib": 0}


def _gated(bench: ModuleType, against: ModuleType, monkeypatch: pytest.MonkeyPatch, target: str,
           a: float, b: float) -> list[Any]:
    """The rows of ``target``'s comparison when the working tree (A) measures ``a`` and the
    revision (B), the import floor or the limit's other side ``b`` (times in seconds, rates
    in events/s, counts): every measurement made up, the gating real."""
    trees = [against.Tree("A", "working", "python-a", ["escalate-a"]),
             against.Tree("B", "rev", "python-b", ["escalate-b"])]
    run = bench.BuiltRun(Path("runs"), "r", bench.Expected(events=1_000), "mixed")
    runs = {tree.key: run for tree in trees}
    rounds = against.Rounds(cycles=3, startup=3, show=3, replay=3, contention=1, contention_cycles=1,
                            budget_s=60)
    rows: list[Any] = []

    def process(argv: list[str], *, env: Any = None, cpus: Any = ()) -> float:  # A's takes a, all else b
        return a if argv[0] == "escalate-a" else b

    monkeypatch.setattr(against, "timed_process", process)
    if target == "cycles":
        made: list[Any] = []

        def make_drivers() -> list[Any]:
            made.append([_FakeDriver(trees[0], a, 1), _FakeDriver(trees[1], b, 1)])
            return made[-1]

        against.compare_cycles(make_drivers, {1_000: runs, 1_000_000: runs}, rounds, rows, generations=3)
        # Three fresh pairs of drivers, each closed, each opening the runs with task ids of its own.
        assert len(made) == 3 and all(d.closed for pair in made for d in pair)
        assert len({d.prefixes[0] for pair in made for d in pair[:1]}) == 3
    elif target == "calls":
        against.compare_calls([_FakeDriver(trees[0], 1, int(a), int(b)), _FakeDriver(trees[1], 1, 239)],
                              runs, rows)
    elif target == "startup":  # the floor takes b; B takes 1.2 b (a revision above the floor)
        monkeypatch.setattr(against, "timed_process",
                            lambda argv, env=None, cpus=(): {"escalate-a": a, "escalate-b": 1.2 * b}.get(
                                argv[0], b))
        against.compare_startup(trees, runs, rounds, rows)
    elif target == "replay":
        def verify(built: Any, python: str, cpus: Any = ()) -> tuple[float, int, dict[str, float]]:
            seconds = 1_000 / (a if python == "python-a" else b)
            return seconds, 0, {"seconds": seconds, "cpu_seconds": seconds}

        monkeypatch.setattr(against, "measure_verify", verify)
        monkeypatch.setattr(against, "bare", lambda built: (1_000 / b, 1_000 / b))  # (an info row)
        against.compare_replay(trees, runs, rounds, rows)
    elif target == "show":
        against.compare_show(trees, runs, rounds, rows)
    else:  # postgres: a's reserve against the floor's b; Ledger.open's round trips: b
        class Server:
            def imported(self, built: Any) -> str:
                return "postgresql:///made-up"

            def close(self) -> None:
                pass

        monkeypatch.setattr(against, "PgBench", Server)
        monkeypatch.setattr(against, "open_round_trips", lambda url, run_id: int(b))
        monkeypatch.setattr(sys.modules["run"], "timed_process",  # (the module against.py imports)
                            lambda argv, env=None, cpus=(): a if argv[0] == "escalate-a" else 1.0)
        against.compare_postgres(trees[0], run, rounds, rows)
    return rows


# target, A's measure within the limit, A's measure over it, B's (or the floor's), the rows
# gated, and the limit each of them shows.
GATES = [
    ("cycles", 1.0, 1.01, 1.0, 4, "≤ 1"),  # wall and CPU time at 1k and at 1M: no slower than B
    ("calls", 600, 601, 0, 1, "≤ 600"),  # the calls of one reserve (B's pathlib parses: none)
    ("startup", 1.1, 1.11, 1.0, 1, "≤ 1.1"),  # against the import floor, though B is above it
    ("replay", 1.0, 0.99, 1.0, 1, "≥ 1"),  # cold verify, events/s
    ("show", 1.1, 1.11, 1.0, 1, "≤ 1.1"),  # runs show --json: the 10 % rule
    ("postgres", 1.15, 1.16, 1, 1, "≤ 1.15"),  # whole process against the psycopg floor (1 round trip)
]


@pytest.mark.parametrize(("target", "within", "over", "other", "gated", "limit"), GATES,
                         ids=[gate[0] for gate in GATES])
def test_each_target_is_a_gate_with_its_own_limit_and_one_row_over_it_exits_1(
        bench: ModuleType, against: ModuleType, monkeypatch: pytest.MonkeyPatch, target: str,
        within: float, over: float, other: float, gated: int, limit: str) -> None:
    """make bench holds each of issue #20's targets to its own limit, shown in its row: a
    measure at its limit passes, one just over it fails and make bench exits 1."""
    passing = _gated(bench, against, monkeypatch, target, within, other)
    failing = _gated(bench, against, monkeypatch, target, over, other)
    for rows in (passing, failing):
        assert len([row for row in rows if row.verdict != "info"]) >= gated
    assert all(row.verdict in ("PASS", "info") for row in passing), [(r.target, r.ratio) for r in passing]
    failed = [row for row in failing if row.verdict == "FAIL"]
    assert len(failed) == gated, [(r.target, r.ratio, r.verdict) for r in failing]
    assert all(f"({limit})" in row.ratio for row in failed)
    assert bench._finish(passing, ["--baseline"], 0.0) == 0
    assert bench._finish(failing, ["--baseline"], 0.0) == 1


def test_a_pathlib_parse_on_the_hot_path_fails(bench: ModuleType, against: ModuleType,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """No pathlib on the hot path (issue #20): one parse in a reserve+release fails its row."""
    rows = _gated(bench, against, monkeypatch, "calls", 500, 1)
    parses = [(row.ratio, row.verdict) for row in rows if row.target.startswith("pathlib")]
    assert parses == [("1 (≤ 0)", "FAIL")]


def test_postgresql_counts_the_round_trips_of_ledger_open(bench: ModuleType, against: ModuleType,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Two round trips to open a run fail make bench, however fast the process."""
    rows = _gated(bench, against, monkeypatch, "postgres", 1.0, 2)
    assert [(row.ratio, row.verdict) for row in rows if "round trips" in row.target] == [("2 (≤ 1)", "FAIL")]


def test_the_bench_counts_one_round_trip_to_open_a_run_on_postgresql(bench: ModuleType, against: ModuleType,
                                                                     pg_url: str) -> None:
    """The count make bench gates on is libpq's, of the store's own connection: one round
    trip for Ledger.open on a run that exists."""
    Ledger.init(pg_url, "r", cap="10", actor="tester")
    assert against.open_round_trips(pg_url, "r") == 1
