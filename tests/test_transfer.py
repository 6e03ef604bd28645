"""Moving runs between stores (docs/scale-out.md): a pool's runs move only with their pool —
an import that would let money escape its pool's count is refused, with nothing written, on
both stores; a run without a pool may move, also under another id."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import Location, has_run, log_bytes, snapshot_store

from escalate import Ledger
from escalate.pools import Pool


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
