"""Moving runs between stores (docs/scale-out.md): a pool's runs move only with their pool —
an import that would let money escape its pool's count is refused, with nothing written, on
both stores; a run without a pool may move, also under another id."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import Location, has_run, log_bytes, snapshot_store

from escalate import Ledger
from escalate.pools.pool import Pool


def _log_file(source: Path, run_id: str, tmp_path: Path) -> Path:
    path = tmp_path / f"{run_id}.ndjson"
    path.write_bytes((source / run_id / "events.ndjson").read_bytes())
    return path


@pytest.fixture
def logs(tmp_path: Path) -> dict[str, Path]:
    """A plain run's, a pool member's and a pool's logs, made in a runs folder of their own."""
    source = tmp_path / "elsewhere"
    Pool.init(source, "team", cap="10", actor="tester")
    Ledger.init(source, "k1", pool="team", cap="10", actor="tester").reserve("a", "8")
    Ledger.init(source, "plain", cap="10", actor="tester").reserve("a", "8")
    return {name: _log_file(source, name, tmp_path) for name in ("k1", "plain", "team")}


@pytest.mark.parametrize(("run_id", "log", "says"), [
    ("k1", "k1", "is the log of run k1, a member of pool team: a pool's runs move only with"),
    ("k2", "k1", "is the log of run k1, a member of pool team"),
    ("team", "team", "is the log of pool team, not of a run"),
])
def test_an_import_that_would_change_whose_money_it_is_is_refused(
        store: Location, cli: Any, logs: dict[str, Path], run_id: str, log: str, says: str) -> None:
    Pool.init(store, "team", cap="10", actor="tester")  # the pool is there: still refused
    before = snapshot_store(store)
    result = cli("runs", "import", run_id, str(logs[log]), "--json")
    assert result.exit_code == 2, result.stdout
    assert result.json()["error"] == "invalid_log"
    assert says in result.stderr and result.stderr.count("\n") == 1
    assert snapshot_store(store) == before
    assert run_id == "team" or not has_run(store, run_id)  # (team: the pool made above)


@pytest.mark.parametrize("run_id", ["plain", "renamed"])
def test_a_run_without_a_pool_moves(store: Location, cli: Any, logs: dict[str, Path], run_id: str) -> None:
    assert cli("runs", "import", run_id, str(logs["plain"]), "--json").exit_code == 0
    assert Ledger.open(store, run_id).state().reserved_micros == 8_000_000


def test_export_with_json_prints_the_log_and_only_an_error_as_json(store: Location, cli: Any) -> None:
    Ledger.init(store, "r", cap="10", actor="tester").reserve("a", "1")
    exported = cli("runs", "export", "r", "--json")
    assert (exported.exit_code, exported.stdout) == (0, log_bytes(store, "r").decode())
    missing = cli("runs", "export", "nope", "--json")
    assert (missing.exit_code, missing.json()["error"]) == (2, "unknown_run")
    usage = " ".join(cli("runs", "export", "--help").stdout.split())
    assert "--json Print an error as one JSON object on stdout (the log is NDJSON either way)." in usage
    assert "errors too" not in usage and "errors only" not in usage


# Writes a run's log to stdout as it goes (never the whole log in memory): one task raised
# again and again with a long reason, about 1 KB a line; "broken" makes the last line's
# chain wrong.
_GENERATOR = r"""
import sys
from escalate.core import decide
from escalate.core.events import format_ts, seal
from escalate.core.state import Policy
from datetime import UTC, datetime

lines, broken = int(sys.argv[1]), sys.argv[2] == "broken"
out, ts = sys.stdout.buffer, format_ts(datetime(2026, 11, 30, tzinfo=UTC))
batch = [decide.run_opened_payload("big", 10**12, 10**12, Policy()),
         {"type": "budget_reserved", "task": "t", "amount_micros": 1}]
seq, prev, amount = 0, "", 1
while seq < lines:
    while len(batch) < 1000 and seq + len(batch) < lines:
        batch.append({"type": "budget_increased", "task": "t", "from_micros": amount,
                      "to_micros": amount + 1, "reason": "r" * 900})
        amount += 1
    sealed = seal(batch, seq=seq, prev=prev, ts=ts, actor="tester")
    seq, prev, batch = seq + len(sealed), sealed[-1][2], []
    if broken and seq == lines:
        sealed[-1] = (sealed[-1][0], sealed[-1][1].replace(b'"prev":"', b'"prev":"0'), "")
    out.write(b"".join(line + b"\n" for _, line, _ in sealed))
"""


# escalate's command line, then the peak resident memory of this process image (VmHWM:
# counted from exec, unlike ru_maxrss, which keeps the forking test process's size).
_MEASURED = r"""
import runpy, sys
peak_file = sys.argv.pop(1)
try:
    runpy.run_module("escalate", run_name="__main__", alter_sys=True)
finally:
    with open("/proc/self/status") as status, open(peak_file, "w") as out:
        out.write(next(line for line in status if line.startswith("VmHWM:")).split()[1])
"""


# 120,000 lines of about 1 KB: 115 MiB through stdin.
BIG_LINES = 120_000


@pytest.fixture(scope="module")
def big_logs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The generator's two logs ("whole", and "broken" in its last line), written once for
    both stores."""
    folder = tmp_path_factory.mktemp("big-logs")
    for kind in ("whole", "broken"):
        with (folder / kind).open("wb") as out:
            subprocess.run([sys.executable, "-c", _GENERATOR, str(BIG_LINES), kind], stdout=out, check=True)
    return {kind: folder / kind for kind in ("whole", "broken")}


def _import_through_a_pipe(log: Path, env: dict[str, str], peak_file: Path) -> tuple[int, str, int]:
    """``runs import big -`` fed ``log`` through a pipe by another process: the exit code,
    stderr and the importer's peak resident memory in MiB."""
    feeder = subprocess.Popen(["cat", str(log)], stdout=subprocess.PIPE)
    command = [sys.executable, "-c", _MEASURED, str(peak_file), "runs", "import", "big", "-"]
    importer = subprocess.Popen(command, stdin=feeder.stdout, stderr=subprocess.PIPE,
                                stdout=subprocess.DEVNULL, env={**os.environ, **env})
    assert feeder.stdout is not None and importer.stderr is not None
    feeder.stdout.close()
    stderr = importer.stderr.read().decode()
    assert feeder.wait(timeout=120) == 0
    return importer.wait(timeout=120), stderr, int(peak_file.read_text()) // 1024


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the peak memory from /proc")
def test_an_import_from_stdin_reads_in_bounded_memory(store: Location, tmp_path: Path,
                                                     big_logs: dict[str, Path]) -> None:
    # The importer stays far below the 115 MiB it reads.
    lines = BIG_LINES
    spool = tmp_path / "spool"
    spool.mkdir()
    env = {"TMPDIR": str(spool)}  # where the importer copies stdin to
    before = snapshot_store(store)
    code, stderr, peak_mib = _import_through_a_pipe(big_logs["broken"], env, tmp_path / "peak")
    assert code == 2 and f"stdin line {lines}:" in stderr and "nothing was imported" in stderr, stderr
    assert stderr.count("\n") == 1
    assert snapshot_store(store) == before and not has_run(store, "big")
    assert peak_mib < 100, peak_mib
    assert list(spool.iterdir()) == []

    code, stderr, peak_mib = _import_through_a_pipe(big_logs["whole"], env, tmp_path / "peak")
    assert code == 0, stderr
    assert peak_mib < 100, peak_mib
    assert list(spool.iterdir()) == []
    report = Ledger.open(store, "big").verify()
    assert report.problems == [] and report.lines == lines
    assert report.state.tasks["t"].reserved_micros == lines - 1 == report.state.reserved_micros


@pytest.mark.parametrize("head", [b"a" * 60_000, b'{"type":"run_opened"'])
def test_an_import_whose_first_line_is_not_complete_says_so_and_imports_nothing(
        store: Location, cli: Any, head: bytes) -> None:
    before = snapshot_store(store)
    result = cli("runs", "import", "x", "-", "--json", input=head.decode())
    assert result.exit_code == 2, result.stdout
    assert result.json()["error"] == "invalid_log" and result.stderr.count("\n") == 1
    assert f"stdin line 1: the first line is not a complete line ({len(head)} bytes" in result.stderr
    assert "nothing was imported" in result.stderr
    assert "runs init" not in result.stderr and "crash" not in result.stderr  # (advice for another command)
    assert snapshot_store(store) == before and not has_run(store, "x")
