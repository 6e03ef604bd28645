"""A pool's member is the run whose first line names the pool, under the id its log joined
(docs/pools.md: members). A member whose id another ledger holds — moved away and
replaced, or a join whose ``runs init`` lost a race — is a member that cannot be read
(exit 6), never counted as nothing; the loser of a race voids its own join
(``run_join_voided``), and a loser killed before that is finished by running its
``runs init`` again. On both stores, with real processes."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import RESULT_TIMEOUT_S, Location, drop_books, log_bytes, race_processes
from test_pool_members import _move, _pool_of_a

from escalate import Ledger
from escalate.errors import EscalateError
from escalate.pools import Pool

FORK = multiprocessing.get_context("fork")


def _pool_lines(store: Location, pool_id: str) -> list[dict[str, Any]]:
    from escalate.stores.seam import open_store

    with open_store(store).ledger(pool_id, lock_timeout=5).reader() as stream:
        return [orjson.loads(line) for line in stream.read().splitlines()]


@pytest.mark.parametrize("books", ["kept", "lost"])
@pytest.mark.parametrize("pool", [None, "Q"])
def test_a_member_replaced_by_another_run_of_its_id_frees_no_money(runs_dir: Path, cli: Any, books: str,
                                                                    pool: str | None) -> None:
    """``mv runs/a runs/a-old; escalate runs init a ...``: the pool counts a's money still, or
    refuses. (On PostgreSQL a ledger cannot be moved away: its lines are append-only, so
    only the race below can put another ledger under a member's id.)"""
    store = runs_dir
    _pool_of_a(store)  # a holds all of P's $10
    Ledger.init(store, "b", pool="P", actor="tester")
    _move(store, "a", "a-old")
    if pool is not None:
        Pool.init(store, pool, cap="100", actor="tester")
    made = cli("runs", "init", "a", "--cap", "100", *(["--pool", pool] if pool else []))
    assert made.exit_code == 0, made.stderr  # a new run a: no member of P
    if books == "lost":
        drop_books(store, "P")  # a reboot may lose them: the next writer folds every member
    before = log_bytes(store, "b")
    reserve = cli("reserve", "b", "t2", "--estimate", "10", "--json")
    if books == "lost":
        assert reserve.exit_code == 6, reserve.stderr
        assert reserve.json()["error"] == "member_unreadable" and reserve.json()["run"] == "a"
        assert "put the member back as a" in reserve.stderr
        assert log_bytes(store, "b") == before  # nothing written
    else:
        assert reserve.exit_code == 3, reserve.stderr  # the books still count a's $10
        assert reserve.json()["error"] == "over_pool_budget"
    gate = cli("gate", "--pool", "P", "--json")
    assert gate.exit_code == 6, gate.stdout
    assert gate.json()["error"] == "member_unreadable" and gate.json()["run"] == "a"
    assert "is a run of " + ("no pool" if pool is None else "pool Q") in gate.stderr
    assert cli("pools", "verify", "P").exit_code != 0
    # The way back: the member's folder in its place.
    _move(store, "a", "a-new")
    _move(store, "a-old", "a")
    assert cli("gate", "--pool", "P", "--allow-halts").exit_code == 0  # (b's refusal halted t2)
    again = cli("reserve", "b", "t3", "--estimate", "1", "--json")
    assert again.exit_code == 3 and again.json()["error"] == "over_pool_budget"


def _lose_the_race(root: Location, run_id: str, made: Any, die: bool) -> None:
    """``runs init RUN --pool P`` that read no ledger under RUN just before a rival created
    one (it waits for ``made``), so its join loses; ``die``: killed before it voids it."""
    from escalate import service
    from escalate.pools import void as pool_void

    real = pool_void.first_event

    def read_before_the_rival(store: Any) -> None:
        """The read before the join (once): what it saw a moment before the rival's create."""
        assert made.wait(RESULT_TIMEOUT_S)  # the rival's ledger exists now
        pool_void.first_event = real  # the void, later, reads what is there

    pool_void.first_event = read_before_the_rival  # type: ignore[assignment]
    if die:
        pool_void.void_taken_join = lambda *args, **kwargs: os._exit(9)  # type: ignore[assignment]
    try:
        service.Ledger.init(root, run_id, pool="P", cap="5", actor="loser")
    except EscalateError as error:
        os._exit(2 if error.code == "is_a_pool" else 5)
    os._exit(0)


def _rival(root: Location, run_id: str, rival: str, made: Any) -> None:
    if rival == "a pool":
        Pool.init(root, run_id, cap="7", actor="rival")
    else:
        Ledger.init(root, run_id, cap="100", pool="Q" if rival == "a run of pool Q" else None, actor="rival")
    made.set()


def _race(store: Location, run_id: str, rival: str, *, die: bool) -> int | None:
    """The loser and its rival as two processes; the loser's exit code."""
    made = FORK.Event()
    loser = FORK.Process(target=_lose_the_race, args=(store, run_id, made, die))
    other = FORK.Process(target=_rival, args=(store, run_id, rival, made))
    loser.start()
    other.start()
    other.join(RESULT_TIMEOUT_S)
    loser.join(RESULT_TIMEOUT_S)
    assert other.exitcode == 0
    return loser.exitcode


RIVALS = ["a run of no pool", "a run of pool Q", "a pool"]


@pytest.mark.parametrize("rival", RIVALS)
def test_the_loser_of_a_join_race_voids_its_join(store: Location, cli: Any, rival: str) -> None:
    Pool.init(store, "P", cap="10", actor="tester")
    Pool.init(store, "Q", cap="10", actor="tester")
    assert _race(store, "x", rival, die=False) == (2 if rival == "a pool" else 5)  # the id exists
    voided = _pool_lines(store, "P")[-1]
    assert voided["type"] == "run_join_voided" and voided["run"] == "x"
    reasons = {"a run of no pool": "run_of_no_pool", "a run of pool Q": "run_of_another_pool",
               "a pool": "a_pool"}
    assert voided["reason"] == reasons[rival]
    assert "x" not in Pool.open(store, "P").facts.members
    assert cli("gate", "--pool", "P").exit_code == 0
    assert cli("pools", "verify", "P").exit_code == 0
    if rival != "a pool":  # the winner's money counts where it belongs, and only there
        Ledger.open(store, "x", actor="tester").reserve("t", "4")
        assert Pool.open(store, "P").show()["committed_micros"] == 0
        assert Pool.open(store, "Q").show()["committed_micros"] == (4_000_000 if "Q" in rival else 0)


@pytest.mark.parametrize("rival", RIVALS)
def test_a_loser_killed_before_its_void_fails_closed_until_its_init_runs_again(
        store: Location, cli: Any, rival: str) -> None:
    _pool_of_a(store)
    Pool.init(store, "Q", cap="10", actor="tester")
    assert _race(store, "x", rival, die=True) == 9
    assert _pool_lines(store, "P")[-1]["type"] == "run_joined"  # the join stands, not voided
    drop_books(store, "P")
    before = log_bytes(store, "a")
    reserve = cli("reserve", "a", "t", "--estimate", "0", "--json")
    assert reserve.exit_code == 6 and reserve.json()["run"] == "x"
    assert log_bytes(store, "a") == before
    gate = cli("gate", "--pool", "P", "--json")
    assert gate.exit_code == 6 and gate.json()["run"] == "x"
    assert "escalate runs init x --pool P' lost a race" in gate.stderr and "it voids the join" in gate.stderr
    # The way out the message names: the same init again finds the join lost, and voids it.
    retry = cli("runs", "init", "x", "--pool", "P")
    assert retry.exit_code == (2 if rival == "a pool" else 5), retry.stderr  # the id is taken, as before
    assert _pool_lines(store, "P")[-1]["type"] == "run_join_voided"
    assert cli("gate", "--pool", "P").exit_code == 0
    assert cli("runs", "init", "b", "--pool", "P", "--cap", "100").exit_code == 0
    refused = cli("reserve", "b", "more", "--estimate", "1", "--json")
    assert refused.exit_code == 3 and refused.json()["error"] == "over_pool_budget"  # a's $10 still count
    assert cli("runs", "init", "x", "--pool", "P").exit_code == retry.exit_code  # nothing more to void
    assert [line["type"] for line in _pool_lines(store, "P")].count("run_join_voided") == 1


def _init_in_a_race(worker: int, barrier: Any, root: Location, run_id: str) -> str:
    barrier.wait(RESULT_TIMEOUT_S)
    try:
        if worker % 4 == 0:
            Ledger.init(root, run_id, pool="P", cap="5", actor=f"w{worker}")
        elif worker % 4 == 1:
            Ledger.init(root, run_id, cap="100", actor=f"w{worker}")
        elif worker % 4 == 2:
            Pool.init(root, run_id, cap="7", actor=f"w{worker}")
        else:
            Ledger.init(root, run_id, pool="Q", cap="5", actor=f"w{worker}")
    except EscalateError as error:
        return error.code
    return "made"


def test_inits_racing_for_one_id_never_leave_a_pool_stuck_nor_money_freed(store: Location, cli: Any) -> None:
    from escalate.stores.seam import first_event, open_store

    Pool.init(store, "P", cap="10", actor="tester")
    Pool.init(store, "Q", cap="10", actor="tester")
    runs = open_store(store)
    for round_no in range(6):
        run_id = f"x{round_no}"
        outcomes = race_processes(_init_in_a_race, store, run_id, workers=4)
        assert outcomes.count("made") >= 1
        first = first_event(runs.ledger(run_id, lock_timeout=5))
        assert first is not None
        for pool_id in ("P", "Q"):
            member = first["type"] == "run_opened" and first.get("pool") == pool_id
            listed = run_id in Pool.open(store, pool_id).facts.members
            assert listed == member, (round_no, pool_id, outcomes)
            assert cli("gate", "--pool", pool_id).exit_code == 0
        if first["type"] == "run_opened":
            Ledger.open(store, run_id, actor="tester").reserve("t", "1")
    pooled = 0
    for round_no in range(6):
        first = first_event(runs.ledger(f"x{round_no}", lock_timeout=5)) or {}
        pooled += first.get("type") == "run_opened" and first.get("pool") in ("P", "Q")
    counted = sum(Pool.open(store, pool_id).show()["committed_micros"] for pool_id in ("P", "Q"))
    assert counted == pooled * 1_000_000  # every member's $1, in its own pool


def test_a_void_of_a_join_that_is_not_there_is_refused_by_the_fold(runs_dir: Path, cli: Any) -> None:
    from escalate.core.events import line_hash

    Pool.init(runs_dir, "P", cap="10", actor="tester")
    Ledger.init(runs_dir, "m", pool="P", actor="tester")
    log = runs_dir / "P" / "events.ndjson"
    last = log.read_bytes().splitlines()[-1]
    forged = {**orjson.loads(last), "prev": line_hash(last), "type": "run_join_voided", "run": "nobody",
              "reason": "run_of_no_pool"}
    forged["seq"] += 1
    log.write_bytes(log.read_bytes() + orjson.dumps(forged) + b"\n")
    verify = cli("pools", "verify", "P", "--json")
    assert verify.exit_code != 0 and "has no join" in verify.stdout
