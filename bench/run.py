"""``make bench``: build runs of 1k, 100k and 1M events and measure the speed targets.

Only the standard library and escalate's own dependencies. Every comparison is measured
side by side in one run (A B B A …, alternating the order) and reported as medians, so a
busy machine slows both sides alike. Built runs are cached under ``bench/out/built``;
each benchmark works on fresh copies under ``bench/out/copies``, so the built runs stay
pristine and re-runs are quick. The table is printed and written to
``bench/out/results.md``.

    .venv/bin/python bench/run.py                 # full run (about 10 minutes)
    .venv/bin/python bench/run.py --quick         # smoke test: small runs, few repeats
    .venv/bin/python bench/run.py --sizes 1k,1M   # choose the run sizes
"""

from __future__ import annotations

import argparse
import compileall
import dataclasses
import functools
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

import escalate
from escalate.core import decide
from escalate.core.events import Event, format_ts, seal
from escalate.core.state import Policy
from escalate.service import Ledger

BENCH_DIR = Path(__file__).resolve().parent
# driver.py holds the measurements that also run in another tree's Python (--against).
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))
from driver import CONTENTION_WORST, TaskIds, contention_round, ledger_cycle  # noqa: E402

OUT_DIR = BENCH_DIR / "out"
RUN_ID = "bench"
ACTOR = "bench"
# Bump when the generated logs change shape, so cached runs are rebuilt.
GENERATOR_VERSION = 1

MICROS = 1_000_000
RUN_CAP_MICROS = 100_000_000 * MICROS  # large enough that no generated reservation is refused
TASK_CAP_MICROS = 10 * MICROS
_IN_FLIGHT = 16  # tasks holding a reservation at once in the mixed shape
_HALT_EVERY = 5_000  # about one halt (over the task cap) per this many events
_SEAL_BATCH = 4_096
_START = datetime(2026, 11, 23, 14, 0, 0, tzinfo=UTC)

RUSAGE_WRAPPER = (
    "import resource, subprocess, sys\n"
    "done = subprocess.run(sys.argv[1:])\n"
    "print('maxrss_kb', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, flush=True)\n"
    "sys.exit(done.returncode)\n"
)


# ---------------------------------------------------------------------- building runs


@dataclass(slots=True)
class Expected:
    """The totals a replay of a generated log must give."""

    events: int = 0
    spent_micros: int = 0
    reserved_micros: int = 0
    halts: int = 0
    tasks: int = 0
    released: int = 0

    def check(self, totals: Mapping[str, Any], tasks: int) -> None:
        """Raise ``AssertionError`` unless a replay's totals are what the generator wrote."""
        got = (totals["events"], totals["spent_micros"], totals["reserved_micros"], totals["halts"], tasks)
        want = (self.events, self.spent_micros, self.reserved_micros, self.halts, self.tasks)
        if got != want:
            raise AssertionError(f"replayed (events, spent, reserved, halts, tasks) {got}, expected {want}")


@dataclass(slots=True)
class BuiltRun:
    """A generated run: ``Ledger.open(runs_dir, run_id)`` opens it."""

    runs_dir: Path
    run_id: str
    expected: Expected
    shape: str

    @property
    def log_path(self) -> Path:
        return self.runs_dir / self.run_id / "events.ndjson"


def _mixed_payloads(events: int, rng: random.Random, expected: Expected) -> Iterator[Event]:
    """Reserve/release over many distinct task ids, some increases, a few halts."""
    holding: dict[str, int] = {}  # in-flight task → reserved micros
    next_task = 0
    for emitted in range(events):
        left = events - emitted
        roll = rng.random()
        if left > len(holding) and (not holding or (len(holding) < _IN_FLIGHT and roll < 0.5)):
            next_task += 1
            task = f"task-{next_task:07d}"
            expected.tasks += 1
            if rng.randrange(_HALT_EVERY) == 0:
                expected.halts += 1
                yield {"type": "halt", "task": task, "requested_micros": TASK_CAP_MICROS + MICROS,
                       "remaining_micros": RUN_CAP_MICROS - expected.spent_micros - expected.reserved_micros,
                       "reason": "task_cap"}
                continue
            amount = rng.randrange(10_000, 5 * MICROS, 10_000)
            holding[task] = amount
            expected.reserved_micros += amount
            yield {"type": "budget_reserved", "task": task, "amount_micros": amount}
            continue
        task = rng.choice(list(holding)) if len(holding) < 64 else next(iter(holding))
        reserved = holding[task]
        if rng.random() < 0.2 and reserved < TASK_CAP_MICROS:
            to = min(TASK_CAP_MICROS, reserved + rng.randrange(10_000, 2 * MICROS, 10_000))
            holding[task] = to
            expected.reserved_micros += to - reserved
            yield {"type": "budget_increased", "task": task, "from_micros": reserved, "to_micros": to,
                   "reason": "longer than planned"}
            continue
        actual = reserved * rng.randrange(50, 121) // 100  # some tasks over-run what they held
        del holding[task]
        expected.reserved_micros -= reserved
        expected.spent_micros += actual
        expected.released += 1
        yield {"type": "released", "task": task, "reserved_micros": reserved, "actual_micros": actual}


def _few_task_payloads(events: int, rng: random.Random, expected: Expected) -> Iterator[Event]:
    """The same number of events over few tasks: long chains of small increases."""
    per_task = max(3, events // 100)
    emitted = 0
    while emitted < events:
        expected.tasks += 1
        task = f"task-{expected.tasks:07d}"
        reserved = MICROS
        expected.reserved_micros += reserved
        yield {"type": "budget_reserved", "task": task, "amount_micros": reserved}
        emitted += 1
        steps = min(per_task, events - emitted) - 1  # keep one line for the release
        for _ in range(max(steps, 0)):
            yield {"type": "budget_increased", "task": task, "from_micros": reserved,
                   "to_micros": reserved + 1, "reason": "one more step"}
            reserved += 1
            expected.reserved_micros += 1
            emitted += 1
        if emitted < events:
            actual = reserved - rng.randrange(0, 1000)
            expected.reserved_micros -= reserved
            expected.spent_micros += actual
            expected.released += 1
            yield {"type": "released", "task": task, "reserved_micros": reserved, "actual_micros": actual}
            emitted += 1


_SHAPES: dict[str, Callable[[int, random.Random, Expected], Iterator[Event]]] = {
    "mixed": _mixed_payloads,
    "few-tasks": _few_task_payloads,
}


def build_run(root: Path, events: int, *, shape: str = "mixed", seed: int = 5) -> BuiltRun:
    """A valid run of exactly ``events`` lines under ``root``, written directly as NDJSON.

    Lines are sealed by :func:`escalate.core.events.seal`, so envelopes and the ``prev`` chain
    are the library's own. A run already built with the same size, shape and generator is
    reused.
    """
    if events < 1:
        raise ValueError("a run has at least its run_opened line")
    runs_dir = root / f"{shape}-{events}-g{GENERATOR_VERSION}"
    meta_path = runs_dir / "expected.json"
    log_path = runs_dir / RUN_ID / "events.ndjson"
    if meta_path.is_file() and log_path.is_file():
        meta = orjson.loads(meta_path.read_bytes())
        if meta.get("bytes") == log_path.stat().st_size:
            return BuiltRun(runs_dir, RUN_ID, Expected(**meta["expected"]), shape)
    shutil.rmtree(runs_dir, ignore_errors=True)
    log_path.parent.mkdir(parents=True)
    expected = Expected(events=events)
    opened = decide.run_opened_payload(RUN_ID, RUN_CAP_MICROS, TASK_CAP_MICROS, Policy())
    payloads = _SHAPES[shape](events - 1, random.Random(seed), expected)
    seq, prev, moment = 0, "", _START
    with log_path.open("wb") as out:
        batch: list[Event] = [dict(opened)]
        for payload in payloads:
            batch.append(payload)
            if len(batch) == _SEAL_BATCH:
                seq, prev = _write_batch(out, batch, seq, prev, format_ts(moment))
                moment += timedelta(seconds=1)
                batch = []
        if batch:
            seq, prev = _write_batch(out, batch, seq, prev, format_ts(moment))
    if seq != events:
        raise AssertionError(f"generator wrote {seq} events, not {events}")
    meta = {"bytes": log_path.stat().st_size, "expected": dataclasses.asdict(expected)}
    tmp = meta_path.with_suffix(".tmp")
    tmp.write_bytes(orjson.dumps(meta))
    tmp.replace(meta_path)
    return BuiltRun(runs_dir, RUN_ID, expected, shape)


def _write_batch(out: Any, batch: list[Event], seq: int, prev: str, ts: str) -> tuple[int, str]:
    sealed = seal(batch, seq=seq, prev=prev, ts=ts, actor=ACTOR)
    out.write(b"".join(line + b"\n" for _, line, _ in sealed))
    return seq + len(sealed), sealed[-1][2]


def verify_built(run: BuiltRun) -> None:
    """Replay every line with :meth:`Ledger.verify` and compare with the generator's totals."""
    report = Ledger.open(run.runs_dir, run.run_id).verify()
    if report.problems or report.torn_bytes:
        raise AssertionError(f"{run.log_path} does not verify: {report.problems[:3]}")
    run.expected.check(report.state.totals(), len(report.state.tasks))


def work_copy(run: BuiltRun, name: str) -> BuiltRun:
    """A fresh copy of a built run's log (no derived cache) to benchmark on."""
    runs_dir = OUT_DIR / "copies" / name
    shutil.rmtree(runs_dir, ignore_errors=True)
    (runs_dir / run.run_id).mkdir(parents=True)
    shutil.copyfile(run.log_path, runs_dir / run.run_id / "events.ndjson")
    return BuiltRun(runs_dir, run.run_id, run.expected, run.shape)


# ---------------------------------------------------------------------- measuring


@dataclass(slots=True)
class Row:
    """One line of the results table."""

    target: str
    measured: str
    ratio: str
    verdict: str  # PASS | FAIL | info


@dataclass(slots=True)
class Settings:
    sizes: list[int]
    rounds: int
    cli_rounds: int
    startup_rounds: int
    replay_rounds: int
    contention_cycles: int
    contention_rounds: int
    budget_s: float


def balanced_order(count: int) -> list[int]:
    """One period of the order ``interleaved`` runs ``count`` cases in: each case ``count``
    times, and every ordered pair of cases (a case after itself too) next to each other
    exactly once, the last wrapping to the first (a de Bruijn sequence). For two cases it is
    A B B A. Why: a case that runs right after a case of its own process runs faster (its
    caches are warm), so each case must follow every case equally often; alternating A B C D
    with D C B A lets only the first and the last case follow themselves."""
    sequence: list[int] = []
    digits = [0] * (2 * count + 1)

    def extend(t: int, p: int) -> None:  # Fredricksen–Kessler–Maiorana: Lyndon words in order
        if t > 2:
            if 2 % p == 0:
                sequence.extend(digits[1:p + 1])
            return
        digits[t] = digits[t - p]
        extend(t + 1, p)
        for digit in range(digits[t - p] + 1, count):
            digits[t] = digit
            extend(t + 1, t)

    extend(1, 1)
    return sequence[1:] + sequence[:1]  # begins with the first case, then the second


def interleaved(cases: dict[str, Callable[[], float]], rounds: int, budget_s: float,
                min_rounds: int = 3) -> dict[str, list[float]]:
    """Run the cases in the :func:`balanced_order`, period after period, until each has run
    ``rounds`` times or the time budget is spent (after at least ``min_rounds`` each); a
    period runs whole, so all cases have as many samples (with n cases, a multiple of n). Each
    case returns its own elapsed time."""
    samples: dict[str, list[float]] = {name: [] for name in cases}
    names = list(cases)
    order = [names[index] for index in balanced_order(len(names))]
    started = time.monotonic()
    while len(samples[names[0]]) < rounds:
        for name in order:
            samples[name].append(cases[name]())
        if len(samples[names[0]]) >= min_rounds and time.monotonic() - started > budget_s:
            break
    return samples


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def fmt_s(seconds: float) -> str:
    if seconds < 0.01:
        return f"{seconds * 1e6:,.0f} µs"
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def size_label(events: int) -> str:
    if events >= 1_000_000 and events % 1_000_000 == 0:
        return f"{events // 1_000_000}M"
    if events >= 1_000 and events % 1_000 == 0:
        return f"{events // 1_000}k"
    return str(events)


def parse_size(text: str) -> int:
    text = text.strip().lower()
    factor = {"k": 1_000, "m": 1_000_000}.get(text[-1:], 1)
    return int(text[:-1] if factor > 1 else text) * factor


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def ratio_row(target: str, measured: list[float], base: list[float], limit: float | None, *,
              unit: Callable[[float], str] = fmt_s, higher_is_better: bool = False,
              paired: bool = False) -> Row:
    """Two sides compared, as a row: ``measured / base`` against ``limit`` (None: shown for
    information only): at most ``limit`` for times, at least ``limit`` for rates
    (``higher_is_better``). ``unit`` formats a median. The ratio is that of the two medians,
    or with ``paired`` the worse for A of that and the :func:`paired_ratio` (both shown): a
    pair's two samples ran after different cases, which can favour either side, and a median
    of ratios barely moves when only some of A's operations slow down; the worse of the two
    statistics is never kinder to A than the ratio of the medians alone."""
    ratio = of_medians = median(measured) / median(base)
    shown = f"{unit(median(measured))} vs {unit(median(base))} (n={len(measured)}"
    if paired:
        pairs = paired_ratio(measured, base)
        ratio = min(pairs, of_medians) if higher_is_better else max(pairs, of_medians)
        shown += f"; pairs {pairs:.2f}, medians {of_medians:.2f}"
    shown += ")"
    if limit is None:
        return Row(target, shown, f"{ratio:.2f}", "info")
    ok = ratio >= limit if higher_is_better else ratio <= limit
    # A ratio that rounds to its limit is shown with one more digit, so the verdict reads.
    ratio_shown = f"{ratio:.3f}" if f"{ratio:.2f}" == f"{limit:.2f}" and ratio != limit else f"{ratio:.2f}"
    return Row(target, shown, f"{ratio_shown} ({'≥' if higher_is_better else '≤'} {limit:.3g})", verdict(ok))


def paired_ratio(measured: Sequence[float], base: Sequence[float]) -> float:
    """The median of the ratios of the samples taken side by side: the i-th of one side with
    the i-th of the other, which :func:`interleaved` ran in the same period of its order, a
    few seconds apart at most. A shared machine's speed drifts over minutes, and a slow
    minute then slows both members of a pair; the two medians compared instead take their
    samples from different minutes. (The same code against itself: see docs/performance.md,
    "Paired ratios".)"""
    if len(measured) != len(base) or not measured:
        raise ValueError(f"paired samples must come in pairs: {len(measured)} and {len(base)}")
    return median([a / b for a, b in zip(measured, base, strict=True)])


def count_row(target: str, shown: str, count: int, limit: int) -> Row:
    """A counted measure (calls, round trips) as a row: at most ``limit``, which the row shows."""
    return Row(target, shown, f"{count:,} (≤ {limit:,})", verdict(count <= limit))


def compile_tree() -> None:
    """Compile the measured package's bytecode, as an installed package has it (the working
    tree is installed editable, and where Python may not write bytecode every process would
    compile the sources again)."""
    compileall.compile_dir(str(Path(escalate.__file__).parent), quiet=1)


def escalate_cmd() -> list[str]:
    """The installed ``escalate`` console script, as a shell script would call it."""
    script = Path(sys.executable).with_name("escalate")
    return [str(script)] if script.exists() else [sys.executable, "-m", "escalate"]


def cli_env() -> dict[str, str]:
    # Without PYTHONDONTWRITEBYTECODE: the working tree, installed in place, keeps its modules'
    # bytecode only if a process may write it (a revision compared with was compiled when it
    # was installed), or every process it starts compiles escalate again (half the import floor).
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("ESCALATE_") and k != "PYTHONDONTWRITEBYTECODE"}
    env.update(ESCALATE_ACTOR=ACTOR, NO_COLOR="1")
    return env


def on_cpus(cpus: Collection[int]) -> Callable[[], None] | None:
    """What a child runs before it starts, to keep it to ``cpus`` (none: where the scheduler
    puts it). Two sides compared in one run are timed on the same CPU: on a shared machine
    one CPU can run a third slower than the other for minutes at a time (a neighbour on its
    core), and a side placed there more often than the other would lose by the placement."""
    return functools.partial(os.sched_setaffinity, 0, cpus) if cpus else None


def timed_process(argv: list[str], *, env: dict[str, str] | None = None, cpus: Collection[int] = ()) -> float:
    """Wall time of one whole process, on ``cpus`` (:func:`on_cpus`); it must exit 0."""
    started = time.perf_counter()
    done = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False,
                          preexec_fn=on_cpus(cpus))
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.decode()[-500:]}")
    return elapsed


def cli_cycle(run: BuiltRun, ids: TaskIds) -> Callable[[], float]:
    """``escalate reserve`` then ``escalate release``, each a whole process, timed together."""
    base = [*escalate_cmd()]
    where = ["--runs-dir", str(run.runs_dir)]
    env = cli_env()

    def cycle() -> float:
        task = ids()
        return (timed_process([*base, "reserve", run.run_id, task, "--estimate", "1.00", *where], env=env)
                + timed_process([*base, "release", run.run_id, task, "--actual", "0.90", *where], env=env))

    return cycle


def target_flat_cost(runs: dict[int, BuiltRun], settings: Settings, rows: list[Row]) -> None:
    """Target 1: a reserve+release cycle costs about the same at every size."""
    sizes = sorted(runs)
    small, large = sizes[0], sizes[-1]
    def library(run: BuiltRun, ids: TaskIds) -> Callable[[], float]:
        return ledger_cycle(run.runs_dir, run.run_id, ids)

    for how, make, rounds in (("library", library, settings.rounds),
                              ("CLI", cli_cycle, settings.cli_rounds)):
        ids = TaskIds(f"flat-{how.lower()}")
        cases = {size: make(runs[size], ids) for size in sizes}
        for case in cases.values():
            case()  # warm up: the first call after a copy may build a derived cache
        samples = interleaved({size_label(s): cases[s] for s in sizes}, rounds, settings.budget_s)
        for size in sizes[1:]:
            rows.append(ratio_row(
                f"1 flat cost, {how}: reserve+release @{size_label(size)} vs @{size_label(small)}",
                samples[size_label(size)], samples[size_label(small)], 1.5 if size == large else None))
        _progress(rows[-1])


def target_startup(run: BuiltRun, settings: Settings, rows: list[Row]) -> None:
    """Target 2: ``escalate reserve`` as a whole process vs importing its dependencies."""
    ids = TaskIds("startup")
    env = cli_env()
    reserve = [*escalate_cmd(), "reserve", run.run_id, "", "--estimate", "0.01", "--runs-dir",
               str(run.runs_dir)]
    imports = [sys.executable, "-c", "import typer, orjson, filelock"]

    def escalate_reserve() -> float:
        reserve[3] = ids()
        return timed_process(reserve, env=env)

    escalate_reserve()
    samples = interleaved({"reserve": escalate_reserve, "imports": lambda: timed_process(imports, env=env)},
                          settings.startup_rounds, settings.budget_s)
    rows.append(ratio_row(f"2 start-up: escalate reserve @{size_label(run.expected.events)} vs "
                          "python -c 'import typer, orjson, filelock'",
                          samples["reserve"], samples["imports"], 1.3))
    _progress(rows[-1])


def measure_verify(run: BuiltRun, python: str = sys.executable,
                   cpus: Collection[int] = ()) -> tuple[float, int, dict[str, Any]]:
    """``Ledger.verify()`` in a fresh child of ``python`` (a tree's interpreter), on ``cpus``
    (:func:`on_cpus`): (seconds, peak RSS in KiB, its report).

    The peak comes from ``getrusage(RUSAGE_CHILDREN)`` in a small wrapper process whose only
    child is the replay, so earlier children of this script do not mask it.
    """
    child = [python, str(BENCH_DIR / "driver.py"), "verify", str(run.runs_dir), run.run_id]
    done = subprocess.run([sys.executable, "-c", RUSAGE_WRAPPER, *child], capture_output=True, check=False,
                          preexec_fn=on_cpus(cpus))
    if done.returncode != 0:
        raise RuntimeError(f"verify child failed: {done.stderr.decode()[-1000:]}")
    report_line, rss_line = done.stdout.decode().strip().splitlines()[-2:]
    report = orjson.loads(report_line)
    run.expected.check(report["totals"], report["tasks"])
    if report["problems"]:
        raise AssertionError(f"{run.log_path} does not verify: {report['problems'][:3]}")
    return report["seconds"], int(rss_line.split()[1]), report


def target_replay(runs: dict[int, BuiltRun], few: BuiltRun, settings: Settings, rows: list[Row]) -> None:
    """Target 3: cold replay speed on the largest run, and memory by number of released tasks."""
    large = runs[max(runs)]
    measured: list[tuple[float, int]] = []
    for _ in range(settings.replay_rounds):
        seconds, rss_kb, _ = measure_verify(large)
        measured.append((seconds, rss_kb))
    seconds = median([s for s, _ in measured])
    rate = large.expected.events / seconds
    rows.append(Row(f"3 cold replay: Ledger.verify() @{size_label(large.expected.events)}",
                    f"{rate:,.0f} events/s ({fmt_s(seconds)}, n={len(measured)})",
                    "≥ 300,000 events/s", verdict(rate >= 300_000)))
    _progress(rows[-1])
    many_rss = median([rss for _, rss in measured])
    _, few_rss, _ = measure_verify(few)
    _, small_rss, _ = measure_verify(runs[min(runs)])
    rows.append(Row(
        f"3 peak memory of that replay: {large.expected.released:,} released tasks vs "
        f"{few.expected.released:,} (same {size_label(few.expected.events)} events) vs "
        f"the {size_label(min(runs))} run",
        f"{many_rss / 1024:.0f} MiB vs {few_rss / 1024:.0f} MiB vs {small_rss / 1024:.0f} MiB",
        f"+{(many_rss - few_rss) * 1024 / max(large.expected.released - few.expected.released, 1):.0f} "
        "bytes per released task", "info"))
    _progress(rows[-1])


def target_contention(settings: Settings, rows: list[Row], workers: int = 8) -> None:
    """Target 4: fsynced reserve-or-release operations per second with 8 processes on one run."""
    cases = {"current": lambda: contention_round(workers, settings.contention_cycles, "current")}
    # Each case returns ops/s here, not seconds: the median is taken all the same.
    samples = interleaved(cases, settings.contention_rounds, settings.budget_s, min_rounds=1)
    rate = median(samples["current"])
    rows.append(Row(f"4 contention: {workers} processes, {settings.contention_cycles} reserve+release "
                    "cycles each, one run",
                    f"{rate:,.0f} ops/s (n={len(samples['current'])})", "≥ 1,500 ops/s",
                    verdict(rate >= 1_500)))
    _progress(rows[-1])
    worst_wait = max(wait for wait, _ in CONTENTION_WORST)
    worst_op = max(op for _, op in CONTENTION_WORST)
    rows.append(Row(f"4 worst lock wait / worst single operation in those rounds ({workers} processes)",
                    f"{fmt_s(worst_wait)} / {fmt_s(worst_op)}", "—", "info"))
    _progress(rows[-1])



def target_show(run: BuiltRun, settings: Settings, rows: list[Row]) -> None:
    """Target 5: ``escalate runs show --json`` on the largest run with a warm cache."""
    argv = [*escalate_cmd(), "runs", "show", run.run_id, "--json", "--runs-dir", str(run.runs_dir)]
    env = cli_env()
    first = subprocess.run(argv, env=env, capture_output=True, check=False)  # warms the cache
    if first.returncode != 0:
        raise RuntimeError(f"runs show exited {first.returncode}: {first.stderr.decode()[-500:]}")
    if orjson.loads(first.stdout)["events"] < run.expected.events:
        raise AssertionError("runs show --json reports fewer events than the run has")
    samples = interleaved({"show": lambda: timed_process(argv, env=env)}, settings.cli_rounds,
                          settings.budget_s)
    measured = median(samples["show"])
    rows.append(Row(f"5 runs show --json @{size_label(run.expected.events)}, warm cache",
                    f"{fmt_s(measured)} (n={len(samples['show'])}, {len(first.stdout) / 1e6:.0f} MB of JSON)",
                    "< 1 s", verdict(measured < 1)))
    _progress(rows[-1])


# ---------------------------------------------------------------------- pools

POOL_ID = "bench-pool"


def build_pool(root: Path, members: int) -> Path:
    """A pool of ``members`` runs (made through the library: each joins under the pool's
    lock), plus a run without a pool; kept and reused like the built runs."""
    from escalate.pools.pool import Pool

    runs_dir = root / f"pool-{size_label(members)}"
    if (runs_dir / ".complete").exists():
        return runs_dir
    shutil.rmtree(runs_dir, ignore_errors=True)
    Pool.init(runs_dir, POOL_ID, cap="1000000000", actor=ACTOR)
    for number in range(members):
        Ledger.init(runs_dir, f"member-{number}", pool=POOL_ID, cap="1000000", actor=ACTOR)
    Ledger.init(runs_dir, "plain", cap="1000000", actor=ACTOR)
    (runs_dir / ".complete").touch()
    return runs_dir


def target_pool(settings: Settings, rows: list[Row], members: int) -> None:
    """Target 6: a reserve on a run of a pool of ``members`` runs costs at most twice a
    reserve on a run without a pool (the release after each is not timed)."""
    built = build_pool(OUT_DIR / "built", members)
    runs_dir = OUT_DIR / "copies" / built.name
    shutil.rmtree(runs_dir, ignore_errors=True)
    shutil.copytree(built, runs_dir)
    ids = TaskIds("pool")

    def reserve(run_id: str) -> Callable[[], float]:
        handle = Ledger.open(runs_dir, run_id, actor=ACTOR)
        handle.reserve(ids(), "0")  # warms the run's checkpoint (and the pool's books)

        def timed() -> float:
            task = ids()
            started = time.perf_counter()
            handle.reserve(task, "1.00")
            elapsed = time.perf_counter() - started
            handle.release(task, "0.90")
            return elapsed

        return timed

    cases = {"plain": reserve("plain"), "pool": reserve(f"member-{members // 2}")}
    samples = interleaved(cases, settings.rounds * 4, settings.budget_s)
    rows.append(ratio_row(f"6 pool: reserve on a run of a {size_label(members)}-run pool vs a run "
                          "without a pool", samples["pool"], samples["plain"], 2))
    _progress(rows[-1])


# ---------------------------------------------------------------------- the PostgreSQL store


class PgBench:
    """A throwaway PostgreSQL server for the bench (as the tests start one, but durable: a
    commit waits for its WAL to reach the disk, as the file store's fsync does), and fresh
    databases on it."""

    def __init__(self) -> None:
        # The test helper is shared; the bench runs from a checkout (make bench).
        sys.path.insert(0, str(BENCH_DIR.parent))
        from tests.pg_throwaway import ThrowawayServer

        self.server = ThrowawayServer(durable=True)
        self.server.start()
        self._count = 0

    def database(self) -> str:
        """The URL of a new, empty database."""
        import psycopg

        self._count += 1
        name = f"bench_{self._count}"
        with psycopg.connect(self.server.url(), autocommit=True) as admin:
            admin.execute(f"CREATE DATABASE {name}".encode())
        return self.server.url(name)

    def imported(self, run: BuiltRun) -> str:
        """A new database holding a copy of the built run, loaded as ``runs import`` does
        (every line checked, then one bulk insert): not a million commands."""
        from escalate.transfer import import_log

        url = self.database()
        import_log(url, run.run_id, run.log_path.read_bytes(), actor=ACTOR)
        return url

    def close(self) -> None:
        self.server.remove()


def target_postgres(runs: dict[int, BuiltRun], settings: Settings, rows: list[Row]) -> None:
    """Target 7 (issue 12): the PostgreSQL store beside the file store, in one run."""
    pg = PgBench()
    try:
        _pg_flat_cost(pg, runs, settings, rows)
        _pg_startup(pg, runs[min(runs)], settings, rows)
        _pg_throughput(pg, settings, rows)
    finally:
        pg.close()


def _pg_flat_cost(pg: PgBench, runs: dict[int, BuiltRun], settings: Settings, rows: list[Row]) -> None:
    small, large = min(runs), max(runs)
    ids = TaskIds("pg-flat")
    cases: dict[str, Callable[[], float]] = {}
    for size in (small, large):
        t0 = time.monotonic()
        url = pg.imported(runs[size])
        print(f"  PostgreSQL: run of {size_label(size)} events imported in {time.monotonic() - t0:.1f} s",
              flush=True)
        cases[f"pg@{size_label(size)}"] = ledger_cycle(url, runs[size].run_id, ids)
        cases[f"file@{size_label(size)}"] = ledger_cycle(runs[size].runs_dir, runs[size].run_id, ids)
    for case in cases.values():
        case()  # warm up: the first command builds the checkpoint
    samples = interleaved(cases, settings.rounds, settings.budget_s)
    for store in ("pg", "file"):
        rows.append(ratio_row(
            f"7 {'PostgreSQL' if store == 'pg' else 'file store'} flat cost, library: reserve+release "
            f"@{size_label(large)} vs @{size_label(small)}", samples[f"{store}@{size_label(large)}"],
            samples[f"{store}@{size_label(small)}"], 1.5 if store == "pg" else None))
        _progress(rows[-1])


# escalate reserve on PostgreSQL, whole process, against importing what it needs: at most
# this many times it (issue #20; the earlier bar, 1.5 times the file store, was withdrawn:
# importing psycopg is the floor there).
PG_IMPORT_FLOOR = "import typer, orjson, filelock, psycopg"
PG_STARTUP_LIMIT = 1.15


def pg_startup_row(url: str, run: BuiltRun, rounds: int, budget_s: float, *,
                   escalate: Sequence[str] | None = None, python: str = sys.executable,
                   cpus: Collection[int] = ()) -> Row:
    """``escalate reserve --store url`` on ``run`` as a whole process (``escalate``: a tree's
    command) against the import floor ``python -c 'import typer, orjson, filelock,
    psycopg'``, interleaved: at most :data:`PG_STARTUP_LIMIT` times it."""
    ids = TaskIds("pg-startup")
    env = cli_env()
    command = list(escalate or escalate_cmd())
    cases: dict[str, Callable[[], float]] = {
        "reserve": lambda: timed_process([*command, "reserve", run.run_id, ids(), "--estimate", "0.01",
                                          "--store", url], env=env, cpus=cpus),
        "floor": lambda: timed_process([python, "-c", PG_IMPORT_FLOOR], env=env, cpus=cpus),
    }
    for case in cases.values():
        case()
    samples = interleaved(cases, rounds, budget_s)
    return ratio_row(f"PostgreSQL: escalate reserve, whole process @{size_label(run.expected.events)}, "
                     f"against the import floor python -c '{PG_IMPORT_FLOOR}'",
                     samples["reserve"], samples["floor"], PG_STARTUP_LIMIT, paired=True)


def _pg_startup(pg: PgBench, run: BuiltRun, settings: Settings, rows: list[Row]) -> None:
    """``escalate reserve`` as a whole process on PostgreSQL against its import floor."""
    row = pg_startup_row(pg.imported(run), run, settings.startup_rounds, settings.budget_s)
    rows.append(dataclasses.replace(row, target=f"7 {row.target}"))
    _progress(rows[-1])


def _pg_throughput(pg: PgBench, settings: Settings, rows: list[Row], workers: int = 8) -> None:
    """8 processes through the library on one hot run, and on 8 runs at once: ops/s."""
    url = pg.database()
    tags = TaskIds("round")  # a fresh run (or runs) for every round

    def rounds(where: str | None, one_run: bool) -> Callable[[], float]:
        return lambda: contention_round(workers, settings.contention_cycles, tags(), where, one_run=one_run)

    for one_run, what, floor in ((True, "one hot run", 500), (False, f"{workers} runs at once", 1_500)):
        cases = {"pg": rounds(url, one_run), "file": rounds(None, one_run)}
        # Each case returns ops/s here, not seconds: the median is taken all the same.
        samples = interleaved(cases, settings.contention_rounds, settings.budget_s, min_rounds=1)
        rate, beside = median(samples["pg"]), median(samples["file"])
        rows.append(Row(f"7 PostgreSQL, {workers} processes through the library, {what} "
                        f"({settings.contention_cycles} reserve+release cycles each)",
                        f"{rate:,.0f} ops/s vs file store {beside:,.0f} ops/s (n={len(samples['pg'])})",
                        f"≥ {floor:,} ops/s", verdict(rate >= floor)))
        _progress(rows[-1])


# ---------------------------------------------------------------------- report


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{os.cpu_count()} CPUs ({cpu}), Python {platform.python_version()}, "
            f"{platform.system()} {platform.release()}")


def table(rows: list[Row]) -> str:
    header = ("target", "measured (median)", "ratio / threshold", "result")
    cells = [header, *[(r.target, r.measured, r.ratio, r.verdict) for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(4)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def markdown(rows: list[Row], command: str, took_s: float, heading: Sequence[str] = ()) -> str:
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    out = [
        f"Measured {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')} with `{command}` "
        f"in {took_s / 60:.1f} min on {machine()}; load average {load} (1, 5, 15 min) at the end.",
        "",
        *[f"{line}  " for line in heading],
        *([""] if heading else []),
        "| target | measured (median) | ratio / threshold | result |",
        "|---|---|---|---|",
    ]
    out += [f"| {r.target} | {r.measured} | {r.ratio} | {r.verdict} |" for r in rows]
    return "\n".join(out) + "\n"


def _progress(row: Row) -> None:
    print(f"  {row.verdict:<4}  {row.target}: {row.measured}  [{row.ratio}]", flush=True)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Measure escalate's speed targets (issue 5).")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: runs of 1k and 20k events, few repeats")
    parser.add_argument("--sizes", help="comma-separated run sizes in events, e.g. 1k,100k,1M "
                        "(the smallest and largest are compared)")
    parser.add_argument("--only", help="comma-separated targets to run (1-7; 6: pools, 7: the "
                        "PostgreSQL store beside the file store; with --against: replay, calls, "
                        "cycles, startup, contention, show, postgres); default all")
    parser.add_argument("--against", metavar="REV", help="measure the working tree and git revision "
                        "REV side by side (REV installed under .bench/); exit 1 when a target is "
                        "beyond its limit (issue #20's, shown in each row); sizes default to 1k,1M")
    parser.add_argument("--baseline", action="store_true",
                        help="--against the revision recorded in bench/baseline.txt (make bench)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    started = time.monotonic()
    quick = args.quick
    if args.against or args.baseline:
        import against

        rows: list[Row] = []
        sizes = sorted({parse_size(s) for s in (args.sizes or ("1k,20k" if quick else "1k,1M")).split(",")})
        print(f"escalate bench on {machine()}", flush=True)
        rev, name = (args.against, None) if args.against else against.baseline_revision()
        heading = against.run_against(rev, name, sizes, quick, rows,
                                      set(args.only.split(",")) if args.only else None)
        return _finish(rows, argv, started, heading)
    default_sizes = "1k,20k" if quick else "1k,100k,1M"
    settings = Settings(
        sizes=sorted({parse_size(s) for s in (args.sizes or default_sizes).split(",")}),
        rounds=5 if quick else 15,
        cli_rounds=3 if quick else 7,
        startup_rounds=5 if quick else 21,
        replay_rounds=1 if quick else 3,
        contention_cycles=10 if quick else 60,
        contention_rounds=1 if quick else 3,
        budget_s=20 if quick else 75,
    )
    if len(settings.sizes) < 2:
        print("bench: give at least two sizes to compare", file=sys.stderr)
        return 2
    only = set((args.only or "1,2,3,4,5,6,7").split(","))
    compile_tree()
    built_root = OUT_DIR / "built"
    print(f"escalate bench on {machine()}", flush=True)
    rows = []
    if only <= {"4", "6"}:  # contention and pools make their own runs
        if "4" in only:
            target_contention(settings, rows)
        if "6" in only:
            target_pool(settings, rows, 100 if quick else 1_000)
        return _finish(rows, argv, started)
    runs: dict[int, BuiltRun] = {}
    for size in settings.sizes:
        t0 = time.monotonic()
        runs[size] = build_run(built_root, size)
        print(f"  run of {size_label(size)} events ready in {time.monotonic() - t0:.1f} s", flush=True)
    verify_built(runs[settings.sizes[0]])
    few = build_run(built_root, settings.sizes[-1], shape="few-tasks")
    work = {size: work_copy(run, f"mixed-{size_label(size)}") for size, run in runs.items()}
    if "3" in only:
        target_replay(work, work_copy(few, f"few-{size_label(settings.sizes[-1])}"), settings, rows)
    if "1" in only:
        target_flat_cost(work, settings, rows)
    if "2" in only:
        target_startup(work[settings.sizes[0]], settings, rows)
    if "4" in only:
        target_contention(settings, rows)
    if "5" in only:
        target_show(work[settings.sizes[-1]], settings, rows)
    if "6" in only:
        target_pool(settings, rows, 100 if quick else 1_000)
    if "7" in only:
        target_postgres(work, settings, rows)
    return _finish(rows, argv, started)


def _finish(rows: list[Row], argv: Sequence[str] | None, started: float, heading: Sequence[str] = ()) -> int:
    """Print the table, write ``bench/out/results.md``; 1 if a target failed."""
    took = time.monotonic() - started
    given = list(sys.argv[1:] if argv is None else argv)
    command = "make bench" if given == ["--baseline"] else " ".join(["bench/run.py", *given])
    print()
    print(table(rows))
    OUT_DIR.mkdir(exist_ok=True)
    (OUT_DIR / "results.md").write_text(markdown(rows, command, took, heading))
    print(f"\nwritten to {OUT_DIR / 'results.md'} ({took / 60:.1f} min)")
    return 1 if any(r.verdict == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    sys.modules.setdefault("run", sys.modules[__name__])  # against.py imports this module as run
    sys.exit(main())
