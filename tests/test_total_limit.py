"""The limit on totals (docs/concepts.md): no total of a run, or of a pool in a period, passes
2**53 - 1 micros. A release that would carry one past it is refused (exit 2, nothing
written); a log past it is corrupt (exit 6, named by ``runs verify``); nothing prints a
traceback on a large total. On both stores.

A run gets near the limit in a few calls: tasks reserved at $0 first (a reservation must
fit the cap), then released at $1B each (a release above its reservation is never over a
cap: the money is gone)."""

from __future__ import annotations

from typing import Any

import pytest

from escalate import Ledger, Micros
from escalate.core.events import seal
from escalate.core.money import MAX_MICROS, MAX_TOTAL_MICROS
from escalate.errors import CorruptLedger, TotalLimit
from escalate.pools.pool import Pool
from tests.conftest import Location, drop_books, log_bytes, snapshot_store

LIMIT_USD = "$9,007,199,254.740991"  # MAX_TOTAL_MICROS, as every message shows it
ONE_BILLION = "1000000000"


def _near_limit(store: Location, run_id: str = "r", *, released: int = 9, held: int = 1,
                pool: str | None = None) -> Ledger:
    """A run of a $1B cap that spent ``released`` x $1B, each task reserved at $0, and
    holds ``held`` more tasks at $0 (``t{released}`` …)."""
    options: dict[str, Any] = {"pool": pool} if pool else {}
    run = Ledger.init(store, run_id, cap=ONE_BILLION, actor="tester", **options)
    for number in range(released + held):
        run.reserve(f"t{number}", "0")
    for number in range(released):
        run.release(f"t{number}", ONE_BILLION)
    return run


def test_the_limit_is_exact_in_doubles_and_fits_64_bit_integers() -> None:
    assert MAX_TOTAL_MICROS == 2**53 - 1 == int(float(MAX_TOTAL_MICROS))
    assert MAX_TOTAL_MICROS < 2**63 - 1  # SQLite INTEGER, PostgreSQL bigint
    assert 9 * MAX_MICROS < MAX_TOTAL_MICROS < 10 * MAX_MICROS  # nine $1B releases fit, ten do not


def test_a_release_past_the_limit_is_refused_and_writes_nothing(store: Location, cli: Any) -> None:
    run = _near_limit(store)
    assert run.state().committed_micros == 9 * MAX_MICROS
    before = snapshot_store(store)
    answer = cli("release", "r", "t9", "--actual", ONE_BILLION, "--json")
    assert answer.exit_code == 2
    assert answer.json()["error"] == "total_limit"
    assert answer.json()["limit_micros"] == MAX_TOTAL_MICROS
    assert answer.json()["total_micros"] == 10 * MAX_MICROS
    shown = cli("release", "r", "t9", "--actual", ONE_BILLION)
    assert shown.exit_code == 2 and LIMIT_USD in shown.stderr and str(MAX_TOTAL_MICROS) in shown.stderr
    assert "run r" in shown.stderr and shown.stderr.count("\n") == 1
    with pytest.raises(TotalLimit) as refused:
        run.release("t9", ONE_BILLION)
    assert refused.value.exit_code == 2 and refused.value.code == "total_limit"
    assert snapshot_store(store) == before
    # Up to the limit itself, a release is recorded as ever.
    left = MAX_TOTAL_MICROS - 9 * MAX_MICROS
    assert run.release("t9", Micros(left))["remaining_micros"] == MAX_MICROS - MAX_TOTAL_MICROS
    assert run.state().committed_micros == MAX_TOTAL_MICROS
    assert run.verify().problems == []


def test_nothing_crashes_at_the_limit(store: Location, cli: Any) -> None:
    run = _near_limit(store, held=3)
    run.release("t9", Micros(MAX_TOTAL_MICROS - 9 * MAX_MICROS))  # the run's total is at the limit
    shown = cli("runs", "show", "r", "--json")
    assert shown.exit_code == 0 and shown.json()["committed_micros"] == MAX_TOTAL_MICROS
    assert shown.json()["remaining_micros"] == MAX_MICROS - MAX_TOTAL_MICROS
    assert cli("runs", "show", "r").exit_code == 0
    listed = cli("runs", "list", "--json")
    assert listed.exit_code == 0 and [row["run"] for row in listed.json()["runs"]] == ["r"]
    assert cli("gate", "r", "--json").exit_code == 3  # over its cap, said as a gate says it
    assert cli("reserve", "r", "more", "--estimate", "0").exit_code == 3  # nothing left of the cap
    assert cli("release", "r", "t10", "--actual", "0").exit_code == 0  # adds nothing: fine
    assert cli("release", "r", "t11", "--actual", "0.000001", "--json").json()["error"] == "total_limit"


def _append_unchecked(run: Ledger, *payloads: dict[str, Any]) -> None:
    """Append correctly chained lines through the store, past the fold's checks (and outside
    any pool's lock): what a buggy writer, an edit, or a version without the limit leaves."""
    with run.store.command(), run.store.transaction(checkpoint=False) as transaction:
        replayed = transaction.load()
        state = replayed.state
        sealed = seal(payloads, seq=state.seq, prev=state.last_hash, ts=state.last_ts, actor="forger")
        transaction.append(replayed, [line + b"\n" for _, line, _ in sealed])


def test_a_log_past_the_limit_is_corrupt(store: Location, cli: Any) -> None:
    run = _near_limit(store)
    line = run.state().seq + 1
    _append_unchecked(run, {"type": "released", "task": "t9", "reserved_micros": 0,
                            "actual_micros": MAX_MICROS})
    before = snapshot_store(store)
    with pytest.raises(CorruptLedger) as corrupt:
        run.reserve("new", "0")
    assert corrupt.value.line == line and "past the limit of 9007199254740991" in corrupt.value.problem
    for writer in (("reserve", "r", "new", "--estimate", "0"), ("release", "r", "t9", "--actual", "1"),
                   ("gate", "r", "--json")):
        assert cli(*writer).exit_code == 6
    verified = cli("runs", "verify", "r")
    assert verified.exit_code == 6 and f"line {line}: release of task 't9'" in verified.stderr
    shown = cli("runs", "show", "r", "--json")  # what the log held before the bad line
    assert shown.exit_code == 0 and shown.json()["committed_micros"] == 9 * MAX_MICROS
    assert cli("runs", "list", "--json").exit_code == 0
    assert snapshot_store(store) == before


def test_a_release_past_the_limit_of_its_pool_is_refused(store: Location, cli: Any) -> None:
    Pool.init(store, "P", cap=ONE_BILLION, actor="tester")
    # Every reservation first: one over a cap (the pool's, here) is refused.
    a, b = (_near_limit(store, run_id, released=0, held=5, pool="P") for run_id in "ab")
    for run, released in ((a, 5), (b, 4)):  # the pool holds 9 x $1B, run b 4 x $1B
        for number in range(released):
            run.release(f"t{number}", ONE_BILLION)
    assert Pool.open(store, "P").show()["committed_micros"] == 9 * MAX_MICROS
    before = {run_id: log_bytes(store, run_id) for run_id in "ab"}  # (the books are derived)
    answer = cli("release", "b", "t4", "--actual", ONE_BILLION, "--json")
    assert answer.exit_code == 2 and answer.json()["error"] == "total_limit"
    assert "pool P" in answer.json()["message"] and LIMIT_USD in answer.json()["message"]
    assert {run_id: log_bytes(store, run_id) for run_id in "ab"} == before
    assert b.release("t4", Micros(MAX_TOTAL_MICROS - 9 * MAX_MICROS))["status"] == "released"
    shown = cli("pools", "show", "P", "--json")
    assert shown.exit_code == 0 and shown.json()["committed_micros"] == MAX_TOTAL_MICROS
    assert cli("gate", "--pool", "P", "--json").exit_code == 3


def test_a_pool_whose_runs_add_up_past_the_limit_is_corrupt(store: Location, cli: Any) -> None:
    """Each run's log holds what its own fold allows, but together they hold more than the pool
    ever let through: the pool's writes and reads refuse it, naming the pool."""
    Pool.init(store, "P", cap=ONE_BILLION, actor="tester")
    a, b = (_near_limit(store, run_id, released=0, held=5, pool="P") for run_id in "ab")
    for run, released in ((a, 5), (b, 4)):
        for number in range(released):
            run.release(f"t{number}", ONE_BILLION)
    _append_unchecked(b, {"type": "released", "task": "t4", "reserved_micros": 0,
                          "actual_micros": MAX_MICROS})  # run b: 5 x $1B; the pool: 10 x $1B
    assert b.verify().problems == []
    before = {run_id: log_bytes(store, run_id) for run_id in "ab"}
    for command in (("reserve", "b", "new", "--estimate", "0"), ("pools", "show", "P", "--json"),
                    ("gate", "--pool", "P", "--json")):
        answer = cli(*command)
        assert answer.exit_code == 6, command
        assert "pool P" in answer.stdout + answer.stderr and "past the limit" in answer.stdout + answer.stderr
    with pytest.raises(CorruptLedger, match=r"pool P: its runs together committed \$10,000,000,000\.00 "):
        b.reserve("new", "0")
    assert {run_id: log_bytes(store, run_id) for run_id in "ab"} == before


def test_a_pool_run_far_past_64_bits_is_no_crash(store: Location, cli: Any) -> None:
    """The totals of the report: 18,500 tasks at $0 released at $1B each, in a log written
    outside the pool, take a pool's money past what 64 bits hold; every command answers."""
    Pool.init(store, "P", cap=ONE_BILLION, actor="tester")
    Ledger.init(store, "a", cap=ONE_BILLION, pool="P", actor="tester").reserve("held", "0")
    b = Ledger.init(store, "b", cap=ONE_BILLION, pool="P", actor="tester")
    tasks = [f"t{number}" for number in range(18_500)]
    _append_unchecked(b, *({"type": "budget_reserved", "task": task, "amount_micros": 0} for task in tasks),
                      *({"type": "released", "task": task, "reserved_micros": 0, "actual_micros": MAX_MICROS}
                        for task in tasks))
    drop_books(store, "P")  # the next writer rebuilds them from the logs
    outcomes = {command: cli(*command.split()) for command in (
        "release a held --actual 0", "pools set P --escalation shadow", "pools show P --json",
        "gate --pool P --json", "runs show b --json")}
    # A policy change moves no money and reads no member (a member that cannot be read never
    # blocks one); every command that counts the pool's money refuses.
    expected = {**dict.fromkeys(outcomes, 6), "pools set P --escalation shadow": 0}
    assert {command: answer.exit_code for command, answer in outcomes.items()} == expected
    assert not any("Traceback" in answer.stdout + answer.stderr for answer in outcomes.values())
    listed = cli("runs", "list", "--json")
    assert listed.exit_code == 0 and {row["run"] for row in listed.json()["runs"]} == {"a", "b"}


def test_a_checkpoint_past_the_limit_is_not_trusted(store: Location, monkeypatch: pytest.MonkeyPatch) -> None:
    """A version without the limit folded, and saved as its checkpoint, a run past it: the
    next writer folds the log instead, and finds the line."""
    import escalate.core.fold
    import escalate.core.rules

    run = _near_limit(store, held=3)
    line = run.state().seq + 1
    with monkeypatch.context() as older:
        for module in (escalate.core.fold, escalate.core.rules):  # as a version without the limit
            older.setattr(module, "MAX_TOTAL_MICROS", 2**63 - 1)
        run.release("t9", ONE_BILLION)
        run.release("t10", "0")  # its checkpoint now holds the total past the limit
    before = snapshot_store(store)
    with pytest.raises(CorruptLedger) as corrupt:
        run.release("t11", "0")
    assert corrupt.value.line == line
    assert {ledger: data for ledger, data in snapshot_store(store).items() if "cache" not in ledger} == \
        {ledger: data for ledger, data in before.items() if "cache" not in ledger}
