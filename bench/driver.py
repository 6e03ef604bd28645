"""The measurements that run inside one tree's Python, so that two versions of escalate can
be measured side by side (``bench/run.py --against REV``).

``bench/run.py`` imports these functions for its own tree; for another revision it runs
this file with that revision's virtual environment, where ``import escalate`` is that
version. So this file uses only the library API every measured version has:
``Ledger.init(where, run_id, cap=, actor=)``, ``Ledger.open(where, run_id, actor=)``,
``reserve(task, amount)``, ``release(task, actual)`` and ``verify()``.

    python bench/driver.py serve                                # cycles on request (JSON lines)
    python bench/driver.py verify RUNS_DIR RUN_ID               # one cold replay, as JSON
    python bench/driver.py bare LOG                             # the bare replay of a log, as JSON
    python bench/driver.py contention WHERE TAG WORKERS CYCLES  # one contention round, as JSON
"""

from __future__ import annotations

import cProfile
import json
import multiprocessing
import pstats
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import orjson

from escalate import Ledger

OUT_DIR = Path(__file__).resolve().parent / "out"
ACTOR = "bench"


class TaskIds:
    """Fresh, single-use task ids for every measured cycle."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.count = 0

    def __call__(self) -> str:
        self.count += 1
        return f"{self.prefix}-{self.count}"


def ledger_cycle(location: Path | str, run_id: str, ids: TaskIds) -> Callable[[], float]:
    """One reserve + release through the library, timed, on a run of a runs folder or of a
    PostgreSQL database."""
    handle = Ledger.open(location, run_id, actor=ACTOR)

    def cycle() -> float:
        task = ids()
        started = time.perf_counter()
        handle.reserve(task, "1.00")
        handle.release(task, "0.90")
        return time.perf_counter() - started

    return cycle


def _profiled(call: Callable[[], object]) -> pstats.Stats:
    profile = cProfile.Profile()
    profile.runcall(call)
    return pstats.Stats(profile)


def call_counts(location: Path | str, run_id: str, ids: TaskIds) -> dict[str, int]:
    """The function calls cProfile counts in one reserve and in the release after it (a warm
    handle), and how many of them parse a path (``pathlib``'s ``_parse_args``)."""
    handle = Ledger.open(location, run_id, actor=ACTOR)
    task = ids()
    handle.reserve(task, "1.00")  # warm: imports and the derived cache are not counted
    handle.release(task, "0.90")
    task = ids()
    counts: dict[str, int] = {}
    for name, call in (("reserve", lambda: handle.reserve(task, "1.00")),
                       ("release", lambda: handle.release(task, "0.90"))):
        stats = _profiled(call)
        counts[name] = stats.total_calls  # type: ignore[attr-defined]
        counts[f"{name}_pathlib"] = sum(
            calls for (filename, _, function), (_, calls, *_) in stats.stats.items()  # type: ignore[attr-defined]
            if filename.endswith("pathlib.py") and function in ("_parse_args", "_parse_path"))
    return counts


def _contention_worker(where: str, run_id: str, worker: int, cycles: int, barrier: Any,
                       results: Any) -> None:
    handle = Ledger.open(where, run_id, actor=f"worker-{worker}")
    barrier.wait()
    started = time.monotonic()
    worst_wait = worst_op = 0.0
    for cycle in range(cycles):
        task = f"w{worker}-{cycle}"
        for operation, amount in ((handle.reserve, "1.00"), (handle.release, "0.75")):
            began = time.perf_counter()
            operation(task, amount)
            worst_op = max(worst_op, time.perf_counter() - began)
            # The wait the file store noted (a version or store without the note: 0).
            log = getattr(getattr(handle, "store", None), "log", None)
            worst_wait = max(worst_wait, getattr(log, "lock_wait_s", 0.0))
    results.put((started, time.monotonic(), worst_wait, worst_op, worker))


# The longest lock wait and the longest single operation seen by any contention worker.
CONTENTION_WORST: list[tuple[float, float]] = []
# Each round's longest single operation of each worker, in worker order: a process left
# waiting while the others take turns stands out from the rest.
CONTENTION_BY_WORKER: list[list[float]] = []


def contention_round(workers: int, cycles: int, tag: str, where: str | None = None, *,
                     one_run: bool = True) -> float:
    """``workers`` processes doing reserve/release cycles: durable ops/s. On one fresh run
    (``one_run``), or each process on a run of its own; in a runs folder, or in the store
    ``where`` (a ``postgresql://`` URL). The round's worst lock wait and worst single
    operation are appended to :data:`CONTENTION_WORST`.

    Afterwards every run must verify clean with exact totals.
    """
    if where is None:
        where = str(OUT_DIR / "copies" / "contention")
        shutil.rmtree(Path(where) / f"contention-{tag}", ignore_errors=True)
        for worker in range(workers):
            shutil.rmtree(Path(where) / f"contention-{tag}-{worker}", ignore_errors=True)
    run_ids = [f"contention-{tag}" if one_run else f"contention-{tag}-{worker}" for worker in range(workers)]
    for run_id in set(run_ids):
        Ledger.init(where, run_id, cap="1000000", actor=ACTOR)
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(workers)
    results = context.Queue()
    processes = [context.Process(target=_contention_worker,
                                 args=(where, run_ids[n], n, cycles, barrier, results))
                 for n in range(workers)]
    for process in processes:
        process.start()
    spans: list[tuple[float, float, float, float, int]] = [results.get(timeout=600) for _ in processes]
    for process in processes:
        process.join()
        if process.exitcode != 0:
            raise RuntimeError(f"a contention worker exited {process.exitcode}")
    elapsed = max(span[1] for span in spans) - min(span[0] for span in spans)
    CONTENTION_WORST.append((max(span[2] for span in spans), max(span[3] for span in spans)))
    CONTENTION_BY_WORKER.append([span[3] for span in sorted(spans, key=lambda span: span[4])])
    for run_id in set(run_ids):
        report = Ledger.open(where, run_id).verify()
        totals = report.state.totals()
        writers = run_ids.count(run_id)
        want = (1 + writers * cycles * 2, writers * cycles * 750_000, 0)
        got = (totals["events"], totals["spent_micros"], totals["reserved_micros"])
        if report.problems or got != want:
            raise AssertionError(f"contention run {run_id}: problems {report.problems[:3]}, "
                                 f"(events, spent, reserved) {got}, expected {want}")
    return workers * cycles * 2 / elapsed


def verify_report(runs_dir: str, run_id: str) -> dict[str, Any]:
    """One full replay with the chain checked, timed: its seconds (wall and CPU), lines,
    totals and the first problems. The collector stays as the library leaves it."""
    started, cpu = time.perf_counter(), time.process_time()
    report = Ledger.open(runs_dir, run_id).verify()
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "lines": report.lines,
            "totals": report.state.totals(), "tasks": len(report.state.tasks),
            "problems": report.problems[:3]}


def bare_replay(log: str) -> dict[str, Any]:
    """The floor under any replay, timed: each line of ``log`` parsed (``orjson.loads``) and
    its amount spent added up, nothing checked, nothing hashed (what issue #20 calls the
    peer's bare replay, written here: none of the peer's code)."""
    started, cpu = time.perf_counter(), time.process_time()
    loads, lines, spent = orjson.loads, 0, 0
    with open(log, "rb") as stream:
        for line in stream:
            spent += loads(line).get("actual_micros", 0)
            lines += 1
    return {"seconds": time.perf_counter() - started, "cpu_seconds": time.process_time() - cpu,
            "lines": lines, "spent_micros": spent}


def serve() -> None:
    """Answer one JSON request per line on stdin with one JSON line on stdout, keeping the
    opened runs between requests, so cycles of two trees can alternate one by one."""
    cycles: dict[str, Callable[[], float]] = {}
    for line in sys.stdin:
        request = json.loads(line)
        op = request["op"]
        if op == "open":  # a handle on a run, warmed by one cycle (its derived cache built)
            cycle = ledger_cycle(request["where"], request["run_id"], TaskIds(request["prefix"]))
            cycle()
            cycles[request["name"]] = cycle
            answer: dict[str, Any] = {"ok": True}
        elif op == "cycle":  # its wall time, and the CPU time this process spent in it
            cpu = time.process_time()
            seconds = cycles[request["name"]]()
            answer = {"seconds": seconds, "cpu_seconds": time.process_time() - cpu}
        elif op == "calls":
            answer = call_counts(request["where"], request["run_id"], TaskIds(request["prefix"]))
        else:
            raise SystemExit(f"driver: unknown request {op!r}")
        print(json.dumps(answer), flush=True)


def main(argv: Sequence[str]) -> int:
    """The entry point for another tree's Python (see the module's docstring)."""
    match list(argv):
        case ["serve"]:
            serve()
        case ["verify", runs_dir, run_id]:
            print(json.dumps(verify_report(runs_dir, run_id), default=str), flush=True)
        case ["bare", log]:
            print(json.dumps(bare_replay(log)), flush=True)
        case ["contention", where, tag, workers, cycles]:
            ops_s = contention_round(int(workers), int(cycles), tag, where)
            wait_s, op_s = CONTENTION_WORST[-1]
            print(json.dumps({"ops_s": ops_s, "worst_wait_s": wait_s, "worst_op_s": op_s,
                              "worst_op_by_worker_s": CONTENTION_BY_WORKER[-1]}), flush=True)
        case _:
            print(__doc__, file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
