"""``bench/run.py --against REV``: the working tree and revision REV measured side by side.

REV is checked out in a git worktree under ``.bench/<commit>`` with a virtual environment of
its own (its dependencies pinned to the versions installed here, so only escalate's code
differs); both are kept and reused while the commit is the same. Every target runs in both
trees in one run, alternating (A B, then B A, …), on copies of the same built logs, and is
reported as the two medians and their ratio. A machine whose speed moves within the hour
slows both sides alike, so the ratio holds where a fixed threshold would not.

The library is measured through ``bench/driver.py`` run by each tree's own Python; whole
processes run each tree's own ``escalate`` command. Each target of issue #20 is a gate with
its own limit, shown in its row (:data:`CYCLE_LIMIT` and the rest below); a row over its
limit fails, and the exit status is 1. The PostgreSQL target (REV may have no such store)
measures the working tree alone, against the import floor, on a throwaway server.

``make bench`` compares with the revision recorded in ``bench/baseline.txt``.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from run import (
    BENCH_DIR,
    OUT_DIR,
    BuiltRun,
    PgBench,
    Row,
    _progress,
    build_run,
    cli_env,
    compile_tree,
    count_row,
    escalate_cmd,
    fmt_s,
    interleaved,
    measure_verify,
    on_cpus,
    pg_startup_row,
    ratio_row,
    size_label,
    timed_process,
    verify_built,
    work_copy,
)

REPO = BENCH_DIR.parent
TREES_DIR = REPO / ".bench"
BASELINE_FILE = BENCH_DIR / "baseline.txt"
DRIVER = BENCH_DIR / "driver.py"
# A hot path may be at most this much slower than the revision it is compared with (the
# rule for a row without a limit of its own below: runs show --json).
SLOWER_LIMIT = 1.10
# The targets of issue #20, each its own gate (A: the working tree, B: the revision).
CYCLE_LIMIT = 1.0  # the library's reserve+release, wall and CPU time, at every size: A/B at most
CALLS_LIMIT = 600  # the Python calls (cProfile) of one reserve, at most; and no pathlib parse
STARTUP_LIMIT = 1.1  # escalate reserve, whole process: A / the import floor, at most
REPLAY_LIMIT = 1.0  # cold Ledger.verify(), events/s, the collector on: A/B at least
# (escalate reserve --store postgresql://…: run.PG_STARTUP_LIMIT times the psycopg import floor)
PG_OPEN_ROUND_TRIPS = 1  # Ledger.open on PostgreSQL, at most
IMPORT_FLOOR = "import typer, orjson, filelock"
# The same imports with the collector paused and start-up frozen, as escalate's entry does
# (escalate.__main__, escalate.cli.main): shown beside the floor, not gated.
PAUSED_FLOOR = "import gc; gc.disable(); import typer, orjson, filelock; gc.freeze(); gc.enable()"
WORKERS = 8
# Eight processes on one run: at least this share of the other tree's ops/s, and each
# round's worst single operation (the median over rounds) at most this many times its.
CONTENTION_LIMIT = 0.9
CONTENTION_WORST_LIMIT = 2.0


@dataclass(frozen=True, slots=True)
class Tree:
    """One side of the comparison: its Python (escalate importable) and its command."""

    label: str
    key: str  # names its copies of the built runs
    python: str
    escalate: list[str]


@dataclass(frozen=True, slots=True)
class Rounds:
    """How many alternating rounds each comparison takes."""

    cycles: int
    startup: int
    show: int
    replay: int
    contention: int
    contention_cycles: int
    budget_s: float


def baseline_revision() -> tuple[str, str]:
    """The revision recorded in ``bench/baseline.txt`` and its name: the first line that is
    not a comment, ``<commit> <name>``."""
    for line in BASELINE_FILE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            rev, _, name = line.strip().partition(" ")
            return rev, name.strip() or rev
    raise SystemExit(f"bench: no revision in {BASELINE_FILE}")


def _git(*args: str) -> str:
    done = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"bench: git {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout.strip()


def _quiet(argv: list[str], log: Path, *, may_fail: bool = False) -> bool:
    """Run a setup step with its chatter in ``log``, shown only when it fails (then the
    bench stops, unless ``may_fail``: False is returned)."""
    with log.open("ab") as out:
        done = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0 and not may_fail:
        sys.stderr.write(log.read_text()[-3000:])
        raise SystemExit(f"bench: {' '.join(argv)} exited {done.returncode} (log: {log})")
    return done.returncode == 0


def working_tree() -> Tree:
    """This checkout, as installed in the virtual environment running the bench, its
    bytecode compiled as REV's install has it."""
    compile_tree()
    described = _git("describe", "--always", "--dirty")
    return Tree(f"working tree ({described})", "working", sys.executable, escalate_cmd())


def prepare(rev: str, name: str | None = None) -> Tree:
    """REV checked out under ``.bench/<commit>`` and installed in a virtual environment of
    its own, made once per commit. The dependencies it shares with this environment are
    pinned to the versions installed here."""
    commit = _git("rev-parse", "--verify", f"{rev}^{{commit}}")
    home = TREES_DIR / commit[:12]
    venv_bin = home / "venv" / "bin"
    stamp = home / "installed"
    name = name or rev
    label = commit[:7] if commit.startswith(name) else f"{name} ({commit[:7]})"
    tree = Tree(label, f"rev-{commit[:12]}", str(venv_bin / "python"),
                [str(venv_bin / "escalate")])
    if stamp.is_file() and stamp.read_text().strip() == commit:
        return tree
    print(f"  installing {rev} ({commit[:12]}) in {home} …", flush=True)
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    _git("worktree", "prune")
    _git("worktree", "add", "--detach", "--force", str(home / "src"), commit)
    log = home / "install.log"
    _quiet([sys.executable, "-m", "venv", str(home / "venv")], log)
    frozen = subprocess.run([sys.executable, "-m", "pip", "freeze", "--exclude-editable"],
                            capture_output=True, text=True, check=True).stdout
    constraints = home / "constraints.txt"
    constraints.write_text("".join(line + "\n" for line in frozen.splitlines()
                                   if not line.lower().startswith(("escalate", "-e "))))
    install = [str(venv_bin / "python"), "-m", "pip", "install", "--quiet", str(home / "src")]
    if not _quiet([*install, "-c", str(constraints)], log, may_fail=True):
        # An older revision may require other versions: measured with its own, as installed.
        print(f"  {rev} does not install with this environment's versions; installing its own "
              f"(see {log})", flush=True)
        _quiet(install, log)
    stamp.write_text(commit + "\n")
    return tree


def driver_cpu() -> set[int]:
    """The one CPU every driver runs on (the last this process may use), or none to pin to
    where the system cannot pin."""
    if not hasattr(os, "sched_getaffinity"):
        return set()
    return {max(os.sched_getaffinity(0))}


def drivers_of(trees: list[Tree]) -> list[Driver]:
    """One :class:`Driver` per tree; those started are closed if a later one fails to start."""
    drivers: list[Driver] = []
    try:
        for tree in trees:
            drivers.append(Driver(tree))
    except BaseException:
        for driver in drivers:
            driver.close()
        raise
    return drivers


class Driver:
    """A tree's ``driver.py serve``: requests answered one JSON line at a time.

    Both trees' drivers run on one and the same CPU (:func:`driver_cpu`): on a shared machine
    each CPU has its own neighbours and caches, and two drivers left to the scheduler each
    kept mostly to one, so the same code measured up to a quarter slower on one side than on
    the other in one run. They alternate, so they never compete for it."""

    def __init__(self, tree: Tree) -> None:
        self.tree = tree
        self.process = subprocess.Popen([tree.python, str(DRIVER), "serve"], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, env=cli_env())
        if cpu := driver_cpu():
            os.sched_setaffinity(self.process.pid, cpu)

    def ask(self, **request: Any) -> dict[str, Any]:
        """Send one request, return its answer (a driver that died is an error)."""
        stdin: IO[str] | None = self.process.stdin
        stdout: IO[str] | None = self.process.stdout
        assert stdin is not None and stdout is not None
        stdin.write(json.dumps(request) + "\n")
        stdin.flush()
        line = stdout.readline()
        if not line:
            raise RuntimeError(f"the driver of {self.tree.label} exited {self.process.wait()}")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def close(self) -> None:
        """End the driver (closing its input ends its loop; one that does not end within a
        minute is killed)."""
        try:
            if self.process.stdin is not None:
                self.process.stdin.close()
            self.process.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait()


def _rate(value: float) -> str:
    return f"{value:,.0f}/s"


def compare_replay(trees: list[Tree], runs: dict[str, BuiltRun], rounds: Rounds, rows: list[Row]) -> None:
    """Cold ``Ledger.verify()`` of the largest run, each in a fresh process: events/s, and
    events per second of the replay's CPU time (a busy machine stretches the wall time of
    either side by more than a change in the fold moves it). A bare replay of the same log
    (:func:`bare`) runs interleaved with them, and the working tree's ratio to it is shown."""
    events = next(iter(runs.values())).expected.events
    cpu: dict[str, list[float]] = {tree.key: [] for tree in trees}
    cpu[BARE] = []

    def replay(tree: Tree) -> Callable[[], float]:
        def once() -> float:
            _, _, report = measure_verify(runs[tree.key], tree.python, driver_cpu())
            cpu[tree.key].append(events / float(report["cpu_seconds"]))
            return events / float(report["seconds"])
        return once

    def bare_once() -> float:
        seconds, cpu_seconds = bare(runs[trees[0].key])
        cpu[BARE].append(events / cpu_seconds)
        return events / seconds

    cases = {t.key: replay(t) for t in trees}
    cases[BARE] = bare_once
    # Every round, however slow the machine: the gated ratio is only as good as its pairs.
    samples = interleaved(cases, rounds.replay, rounds.budget_s, min_rounds=rounds.replay)
    # The target is events/s (a replay waits on no fsync: its wall time is its work);
    # the CPU time's rate is shown beside it.
    for what, rates, limit in ((f"cold replay: Ledger.verify() @{size_label(events)}, events/s", samples,
                                REPLAY_LIMIT),
                               (f"cold replay @{size_label(events)}, events per second of CPU time", cpu,
                                None)):
        rows.append(ratio_row(what, rates[trees[0].key], rates[trees[1].key], limit, unit=_rate,
                              higher_is_better=True, paired=True))
        _progress(rows[-1])
    what = f"cold replay @{size_label(events)}, A vs a bare replay (orjson.loads, a sum per line), events/s"
    rows.append(ratio_row(what, samples[trees[0].key], samples[BARE], None, unit=_rate,
                          higher_is_better=True, paired=True))
    _progress(rows[-1])


BARE = "bare"  # the bare replay's samples in compare_replay


def bare(run: BuiltRun) -> tuple[float, float]:
    """A bare replay of ``run``'s log in a fresh process of this Python (``driver.py bare``):
    its seconds, wall and CPU. The floor under any replay; the amounts it adds must be the
    generator's."""
    done = subprocess.run([sys.executable, str(DRIVER), "bare", str(run.log_path)], capture_output=True,
                          check=True, preexec_fn=on_cpus(driver_cpu()))
    report = json.loads(done.stdout.decode().strip().splitlines()[-1])
    if (report["lines"], report["spent_micros"]) != (run.expected.events, run.expected.spent_micros):
        raise AssertionError(f"bare replay of {run.log_path}: {report}, expected {run.expected}")
    return report["seconds"], report["cpu_seconds"]


def compare_calls(drivers: list[Driver], runs: dict[str, BuiltRun], rows: list[Row]) -> None:
    """The Python calls (cProfile) of one reserve, at most :data:`CALLS_LIMIT`, and the paths
    parsed by ``pathlib`` in one reserve and the release after it, none; each tree's count of
    the whole cycle beside them."""
    counts = [d.ask(op="calls", where=str(runs[d.tree.key].runs_dir), run_id=runs[d.tree.key].run_id,
                    prefix="calls") for d in drivers]

    def cycle(c: dict[str, Any]) -> str:
        return f"{c['reserve'] + c['release']:,} ({c['reserve']:,} + {c['release']:,})"

    def parses(c: dict[str, Any]) -> int:
        return int(c["reserve_pathlib"] + c["release_pathlib"])

    size = size_label(next(iter(runs.values())).expected.events)
    working, against = counts
    rows.append(count_row(f"Python calls (cProfile) of one reserve @{size}",
                          f"{working['reserve']:,} vs {against['reserve']:,}; reserve+release "
                          f"{cycle(working)} vs {cycle(against)}", working["reserve"], CALLS_LIMIT))
    _progress(rows[-1])
    rows.append(count_row(f"pathlib parses in one reserve+release @{size}",
                          f"{parses(working)} vs {parses(against)}", parses(working), 0))
    _progress(rows[-1])


CYCLE_GENERATIONS = 8  # fresh pairs of drivers the library cycles are spread over (2 with --quick)


def compare_cycles(make_drivers: Callable[[], list[Driver]], sizes: dict[int, dict[str, BuiltRun]],
                   rounds: Rounds, rows: list[Row], generations: int = CYCLE_GENERATIONS) -> None:
    """One reserve+release through the library, alternating tree and size cycle by cycle:
    its wall time, and its CPU time (which an fsync slowed by a busy disk does not blur).

    The cycles are spread over ``generations`` pairs of drivers, one started after the other
    (``make_drivers``: one driver per tree), each taking its share of the rounds: one
    process's layout in memory makes all its cycles a few percent faster or slower for its
    whole life, and with one driver a side that luck decided a run (the same code against
    itself read 0.92–1.06). The samples of all generations are pooled, pairs kept."""
    samples: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    for generation in range(generations):
        drivers = make_drivers()
        try:
            for name, values in _cycle_generation(drivers, sizes, -(-rounds.cycles // generations),
                                                  generation, cpu).items():
                samples.setdefault(name, []).extend(values)
        finally:
            for driver in drivers:  # (close() kills a driver that does not end: never raises)
                driver.close()
    working, against = (d.tree.key for d in drivers)
    for size in sizes:
        rows.append(ratio_row(f"library: reserve+release @{size_label(size)}", samples[f"{working}@{size}"],
                              samples[f"{against}@{size}"], CYCLE_LIMIT, paired=True))
        _progress(rows[-1])
        rows.append(ratio_row(f"library: reserve+release @{size_label(size)}, CPU time",
                              cpu[f"{working}@{size}"], cpu[f"{against}@{size}"], CYCLE_LIMIT, paired=True))
        _progress(rows[-1])


def _cycle_generation(drivers: list[Driver], sizes: dict[int, dict[str, BuiltRun]], rounds: int,
                      generation: int, cpu: dict[str, list[float]]) -> dict[str, list[float]]:
    """One generation of :func:`compare_cycles`: each driver opens each size's run (its task
    ids new to the run) and the cases alternate, all ``rounds`` of them (no time budget: each
    generation takes its full share); their wall times, CPU times into ``cpu``."""

    def cycle(driver: Driver, name: str) -> Callable[[], float]:
        def timed() -> float:
            answer = driver.ask(op="cycle", name=name)
            cpu.setdefault(name, []).append(float(answer["cpu_seconds"]))
            return float(answer["seconds"])

        return timed

    cases: dict[str, Callable[[], float]] = {}
    for size, runs in sizes.items():
        for driver in drivers:
            name = f"{driver.tree.key}@{size}"
            run = runs[driver.tree.key]
            if generation == 0:
                print(f"  {driver.tree.label}: opening the {size_label(size)} run …", flush=True)
            driver.ask(op="open", name=name, where=str(run.runs_dir), run_id=run.run_id,
                       prefix=f"cycle-g{generation}")
            cases[name] = cycle(driver, name)
    return interleaved(cases, rounds, 0.0, min_rounds=rounds)


def compare_startup(trees: list[Tree], runs: dict[str, BuiltRun], rounds: Rounds, rows: list[Row]) -> None:
    """``escalate reserve`` as a whole process in each tree, and the import floor beside them.
    The working tree is held to the floor the issue names (at most :data:`STARTUP_LIMIT` times
    it): the design makes ``filelock`` the lock (0.1.0 locked with ``fcntl`` itself). That
    floor runs with the collector on; the same imports with it paused as escalate's entry
    pauses it (:data:`PAUSED_FLOOR`) are shown beside it, and so is A/B."""
    env = cli_env()
    count = [0]

    def reserve(tree: Tree) -> Callable[[], float]:
        run = runs[tree.key]

        def timed() -> float:
            count[0] += 1
            return timed_process([*tree.escalate, "reserve", run.run_id, f"startup-{count[0]}",
                                  "--estimate", "0.01", "--runs-dir", str(run.runs_dir)], env=env,
                                 cpus=driver_cpu())

        return timed

    cases = {t.key: reserve(t) for t in trees}
    cases["floor"] = lambda: timed_process([sys.executable, "-c", IMPORT_FLOOR], env=env, cpus=driver_cpu())
    cases["paused"] = lambda: timed_process([sys.executable, "-c", PAUSED_FLOOR], env=env, cpus=driver_cpu())
    for case in cases.values():
        case()
    samples = interleaved(cases, rounds.startup, rounds.budget_s)
    working, against = (t.key for t in trees)
    size = size_label(runs[working].expected.events)
    rows.append(ratio_row(f"escalate reserve, whole process @{size}, against the import floor "
                          f"python -c '{IMPORT_FLOOR}'", samples[working], samples["floor"], STARTUP_LIMIT,
                          paired=True))
    _progress(rows[-1])
    rows.append(ratio_row(f"escalate reserve, whole process @{size}, A vs B", samples[working],
                          samples[against], None, paired=True))
    _progress(rows[-1])
    rows.append(ratio_row(f"  {trees[1].label}: escalate reserve vs the import floor",
                          samples[against], samples["floor"], None, paired=True))
    _progress(rows[-1])
    rows.append(ratio_row("  escalate reserve vs that floor with the collector paused as its entry does "
                          "(gc.disable(), the imports, gc.freeze(), gc.enable())", samples[working],
                          samples["paused"], None, paired=True))
    _progress(rows[-1])


def compare_contention(trees: list[Tree], rounds: Rounds, rows: list[Row]) -> None:
    """Eight processes doing reserve+release cycles on one fresh run, in each tree: ops/s,
    and each round's worst single operation (:func:`contention_rows`)."""
    where = OUT_DIR / "copies" / "contention"
    where.mkdir(parents=True, exist_ok=True)
    worst: dict[str, list[float]] = {t.key: [] for t in trees}
    spread: dict[str, list[float]] = {t.key: [] for t in trees}
    count = [0]

    def contention(tree: Tree) -> Callable[[], float]:
        def one_round() -> float:
            count[0] += 1
            tag = f"{tree.key}-{count[0]}"
            done = subprocess.run([tree.python, str(DRIVER), "contention", str(where), tag, str(WORKERS),
                                   str(rounds.contention_cycles)], capture_output=True, text=True,
                                  env=cli_env(), check=False)
            shutil.rmtree(where / f"contention-{tag}", ignore_errors=True)
            if done.returncode != 0:
                raise RuntimeError(f"contention in {tree.label} exited {done.returncode}: "
                                   f"{done.stderr[-800:]}")
            result = json.loads(done.stdout.splitlines()[-1])
            worst[tree.key].append(result["worst_op_s"])
            spread[tree.key].append(worst_spread(result["worst_op_by_worker_s"]))
            return float(result["ops_s"])

        return one_round

    samples = interleaved({t.key: contention(t) for t in trees}, rounds.contention, rounds.budget_s,
                          min_rounds=1)
    what = f"{WORKERS} processes × {rounds.contention_cycles} reserve+release cycles on one run"
    working, against = (t.key for t in trees)
    for row in contention_rows(what, samples, worst, working, against):
        rows.append(row)
        _progress(row)
    rows.append(ratio_row("contention: the slowest process's worst operation over the median "
                          "process's, median over rounds", spread[working], spread[against], None,
                          unit=lambda v: f"{v:.2f}", paired=True))
    _progress(rows[-1])


def worst_spread(by_worker: list[float]) -> float:
    """How far one process's worst operation stands out from the others': the longest over
    the median process's. A waiter left behind while the others take turns shows here, where
    every process's operations are slow alike on a busy machine does not."""
    return max(by_worker) / statistics.median(by_worker)


def contention_rows(what: str, ops_s: dict[str, list[float]], worst_op_s: dict[str, list[float]],
                    working: str, against: str) -> list[Row]:
    """The contention rows from each round's ops/s and worst single operation, per tree.

    The worst operation is held to :data:`CONTENTION_WORST_LIMIT` times the other tree's as
    the median over rounds of each round's worst (the worse for A of the pairs' and the
    medians' ratio, :func:`~run.ratio_row`), like every other row: the worst of all
    rounds together is one sample in some 8,000, and moved from 1.06 to 2.83 times 0.1.0's
    between runs of the same code. That worst of all rounds is shown beside it."""
    worst_all = {key: max(worst_op_s[key]) for key in (working, against)}
    return [
        ratio_row(f"contention: {what}, ops/s", ops_s[working], ops_s[against], CONTENTION_LIMIT,
                  unit=lambda v: f"{v:,.0f} ops/s", higher_is_better=True, paired=True),
        ratio_row("contention: worst single operation of a round, median over rounds",
                  worst_op_s[working], worst_op_s[against], CONTENTION_WORST_LIMIT, paired=True),
        Row(f"contention: worst single operation of all {len(worst_op_s[working])} rounds",
            f"{fmt_s(worst_all[working])} vs {fmt_s(worst_all[against])}",
            f"{worst_all[working] / worst_all[against]:.2f}", "info"),
    ]


def compare_show(trees: list[Tree], runs: dict[str, BuiltRun], rounds: Rounds, rows: list[Row]) -> None:
    """``escalate runs show --json`` on the largest run, warm cache, whole process."""
    env = cli_env()

    def show(tree: Tree) -> Callable[[], float]:
        argv = [*tree.escalate, "runs", "show", runs[tree.key].run_id, "--json", "--runs-dir",
                str(runs[tree.key].runs_dir)]
        timed_process(argv, env=env, cpus=driver_cpu())  # warms the cache
        return lambda: timed_process(argv, env=env, cpus=driver_cpu())

    cases = {t.key: show(t) for t in trees}
    samples = interleaved(cases, rounds.show, rounds.budget_s)
    working, against = (t.key for t in trees)
    rows.append(ratio_row(f"runs show --json @{size_label(runs[working].expected.events)}, warm cache",
                          samples[working], samples[against], SLOWER_LIMIT, paired=True))
    _progress(rows[-1])


def open_round_trips(url: str, run_id: str) -> int:
    """The round trips of ``Ledger.open`` on a store opened from ``url``, as a command opens
    it: its own connection, made first (connecting sends no query), traced by libpq while the
    run is opened (:class:`tests.pg_throwaway.RoundTrips`)."""
    from escalate import Ledger
    from escalate.stores.postgres.store import PgStore
    from tests.pg_throwaway import RoundTrips  # (PgBench put the checkout on the path)

    with PgStore(url) as store:
        with store.connection(schema=False) as connection:
            pass
        with RoundTrips(connection) as trips:
            Ledger.open(store, run_id, actor="bench").close()
    return trips.count


def compare_postgres(tree: Tree, run: BuiltRun, rounds: Rounds, rows: list[Row]) -> None:
    """The PostgreSQL store in the working tree alone (a revision may have no such store):
    on a throwaway durable server holding a copy of ``run`` (:class:`run.PgBench`), the round
    trips of ``Ledger.open`` (at most :data:`PG_OPEN_ROUND_TRIPS`), and ``escalate reserve
    --store postgresql://…`` as a whole process against the import floor
    ``python -c 'import typer, orjson, filelock, psycopg'``, interleaved (at most
    :data:`run.PG_STARTUP_LIMIT` times it, :func:`run.pg_startup_row`)."""
    started = time.monotonic()
    pg = PgBench()
    try:
        url = pg.imported(run)
        print(f"  PostgreSQL: a throwaway server, the {size_label(run.expected.events)} run imported "
              f"in {time.monotonic() - started:.1f} s", flush=True)
        trips = open_round_trips(url, run.run_id)
        rows.append(count_row("PostgreSQL: round trips of Ledger.open", f"{trips}", trips,
                              PG_OPEN_ROUND_TRIPS))
        _progress(rows[-1])
        rows.append(pg_startup_row(url, run, rounds.startup, rounds.budget_s, escalate=tree.escalate,
                                   python=tree.python, cpus=driver_cpu()))
        _progress(rows[-1])
    finally:
        pg.close()


# What --only may name in a comparison, in the order they run.
TARGETS = ("replay", "calls", "cycles", "startup", "contention", "show", "postgres")


def run_against(rev: str, name: str | None, sizes: list[int], quick: bool, rows: list[Row],
                only: set[str] | None = None) -> list[str]:
    """Measure every target (or those in ``only``, of :data:`TARGETS`) in the working tree
    and in ``rev`` (called ``name``) side by side; the rows are appended to ``rows``.
    Returns the lines that head the table (what was compared)."""
    wanted = set(TARGETS) if only is None else only
    if unknown := wanted - set(TARGETS):
        raise SystemExit(f"bench: no target {', '.join(sorted(unknown))} to compare; "
                         f"choose from {', '.join(TARGETS)}")
    rounds = Rounds(cycles=15 if quick else 401, startup=3 if quick else 21, show=2 if quick else 7,
                    replay=1 if quick else 15, contention=1 if quick else 9,
                    contention_cycles=10 if quick else 50, budget_s=20 if quick else 90)
    trees = [working_tree(), prepare(rev, name)]
    heading = [f"A: {trees[0].label}", f"B: {trees[1].label}",
               "each row: the median of A vs the median of B (or the import floor); its ratio the "
               "worse for A of the median of the ratios of their pairs (samples taken side by side) "
               "and the ratio of the medians, both shown; a row with a limit fails beyond it (issue "
               f"#20's targets; other hot paths: at most {SLOWER_LIMIT - 1:.0%} slower than B)"]
    for line in heading:
        print(line, flush=True)
    if wanted <= {"contention"}:  # it makes its own runs
        compare_contention(trees, rounds, rows)
        return heading
    built = {}
    for size in sizes:
        started = time.monotonic()
        built[size] = build_run(OUT_DIR / "built", size)
        print(f"  run of {size_label(size)} events ready in {time.monotonic() - started:.1f} s", flush=True)
    verify_built(built[sizes[0]])
    copies = {size: {t.key: work_copy(built[size], f"{t.key}-{size_label(size)}") for t in trees}
              for size in sizes}
    if "replay" in wanted:
        compare_replay(trees, copies[sizes[-1]], rounds, rows)  # first: it checks the generator's totals
    if "calls" in wanted:
        drivers = drivers_of(trees)
        try:
            compare_calls(drivers, copies[sizes[0]], rows)
        finally:
            for driver in drivers:
                driver.close()
    if "cycles" in wanted:
        compare_cycles(lambda: drivers_of(trees), copies, rounds, rows,
                       generations=2 if quick else CYCLE_GENERATIONS)
    if "startup" in wanted:
        compare_startup(trees, copies[sizes[0]], rounds, rows)
    if "contention" in wanted:
        compare_contention(trees, rounds, rows)
    if "show" in wanted:
        compare_show(trees, copies[sizes[-1]], rounds, rows)
    if "postgres" in wanted:
        compare_postgres(trees[0], built[sizes[0]], rounds, rows)
    return heading
