"""The storage seam: a store is chosen from a path or URL, and the ledger reaches its run
only through it (docs/architecture.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from escalate import InputError, Ledger, LockTimeout, Pending, StoreUnavailable, UnknownRun
from escalate.stores.file.log import LOG_NAME, FileLog
from tests.conftest import FakeClock

# Nothing listens on port 1: the connection is refused at once.
POSTGRES = "postgresql://ledger:secret@127.0.0.1:1/escalate"


@pytest.mark.parametrize("url", [POSTGRES, "postgres://ledger:secret@127.0.0.1:1/escalate"])
def test_a_postgres_url_is_the_postgres_store_and_an_unreachable_one_is_exit_8(
        url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for call in (lambda: Ledger.init(url, "r", cap="1", actor="tester"),
                 lambda: Ledger.open(url, "r", actor="tester")):
        with pytest.raises(StoreUnavailable, match=r"127\.0\.0\.1:1/escalate is unavailable") as refused:
            call()
        assert refused.value.exit_code == 8 and refused.value.code == "connection_failed"
        assert "secret" not in str(refused.value.to_json())  # a password is never echoed
    assert list(tmp_path.iterdir()) == []  # nothing made on disk (no "postgresql:" folder)


def test_the_cli_reports_an_unreachable_store_in_one_line(
        cli: Any, runs_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ESCALATE_RUNS_DIR")
    monkeypatch.setenv("ESCALATE_STORE", POSTGRES)
    result = cli("runs", "init", "r", "--cap", "1", "--json")
    assert result.exit_code == 8
    assert result.json()["error"] == "connection_failed"
    assert result.stderr.count("\n") == 1 and "retry" in result.stderr and "secret" not in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("url", ["postgressql://worker@db.internal:5432/budgets", "postgresq://db/x",
                                 "mysql://root@db/budgets", "file:///var/runs"])
def test_a_url_of_another_kind_is_bad_input_never_a_folder(
        url: str, cli: Any, runs_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ESCALATE_RUNS_DIR")
    for args in (("runs", "init", "nightly", "--cap", "50"), ("store", "init"), ("runs", "list")):
        result = cli(*args, "--store", url, "--json")
        assert result.exit_code == 2, (args, result.stdout)
        assert result.json()["error"] == "invalid_store" and result.stderr.count("\n") == 1
    with pytest.raises(InputError):
        Ledger.init(url, "nightly", cap="1", actor="tester")
    assert list(tmp_path.iterdir()) == []  # no folder named after the typo


@pytest.mark.parametrize("store", ["host=db.example password=s3cretPW dbname=x", "dbname=budgets",
                                   "postgresql:", "postgres:", "mysql:"])
@pytest.mark.parametrize("option", ["--store", "--runs-dir"])
def test_a_keyword_dsn_or_a_bare_scheme_is_bad_input_never_a_folder(
        store: str, option: str, cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ESCALATE_RUNS_DIR")
    for args in (("runs", "init", "r", "--cap", "1"), ("runs", "list"),
                 ("reserve", "r", "t", "--estimate", "1")):
        result = cli(*args, option, store, "--json")
        assert result.exit_code == 2, (args, result.stdout)
        assert result.json()["error"] == "invalid_store" and result.stderr.count("\n") == 1
        assert "s3cretPW" not in result.stderr + result.stdout  # a password is never echoed
    with pytest.raises(InputError):
        Ledger.init(store, "r", cap="1", actor="tester")
    assert list(tmp_path.iterdir()) == []  # no folder named after it (nor a password in a path)


def _escalated(runs_dir: Path, clock: FakeClock) -> Ledger:
    run = Ledger.init(runs_dir, "r", cap="10", escalation="enforce", approval_threshold="2",
                      escalation_timeout_s=1800, actor="tester", clock=clock)
    with pytest.raises(Pending):
        run.reserve("t", "3")
    return run


def test_sweep_reads_the_log_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    run = _escalated(tmp_path, clock)
    clock.advance(3600)
    opened = FileLog.reader
    reads: list[Path] = []

    def counted(self: FileLog) -> Any:
        reads.append(self.path)
        return opened(self)

    monkeypatch.setattr(FileLog, "reader", counted)
    assert run.sweep()["expired"] == ["esc-2"]
    # At most one fold, under the lock, decides and tells what it expired (none at all from a
    # checkpoint that holds the whole log).
    assert len(reads) <= 1


def test_sweep_reports_only_the_expiries_it_wrote(tmp_path: Path) -> None:
    """Another writer whose clock is ahead expires the escalation while this sweep reads:
    it carries that write's timestamp, but this sweep did not expire it."""
    clock = FakeClock()
    run = _escalated(tmp_path, clock)
    ahead = Ledger.open(tmp_path, "r", actor="other", lock_timeout=0, clock=FakeClock(clock.now))
    assert isinstance(ahead.clock, FakeClock)
    ahead.clock.advance(3600)
    log = tmp_path / "r" / LOG_NAME
    written_by_other: list[int] = []

    def meanwhile(done: int, total: int) -> None:
        if written_by_other:
            return
        try:
            ahead.sweep()
        except LockTimeout:  # this sweep holds the lock: the other writer must wait
            written_by_other.append(len(log.read_bytes().splitlines()))
            return
        written_by_other.append(len(log.read_bytes().splitlines()))

    run.progress = meanwhile
    expired = run.sweep()["expired"]
    ours = [orjson.loads(line) for line in log.read_bytes().splitlines()[written_by_other[0]:]]
    assert expired == [event["id"] for event in ours if event["type"] == "escalation_resolved"]


@pytest.mark.parametrize("command", ["reserve", "state", "verify"])
def test_a_run_folder_moved_away_after_opening_is_an_unknown_run(tmp_path: Path, command: str) -> None:
    Ledger.init(tmp_path, "r", cap="10", actor="tester").reserve("a", "1")
    run = Ledger.open(tmp_path, "r", actor="tester")
    (tmp_path / "r").rename(tmp_path / "r.moved")
    calls = {"reserve": lambda: run.reserve("b", "1"), "state": run.state, "verify": run.verify}
    with pytest.raises(UnknownRun, match="no run r under"):
        calls[command]()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.moved"]
