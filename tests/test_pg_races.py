"""Real OS processes racing on the PostgreSQL store, started together by a barrier (no
sleeps). The races every store must win — 8 processes × 25 reserves of $1 against a $100
cap, the same reservation, readers beside writers, increases and releases — run on both
stores in test_concurrency.py; here are the ones about deciding who acts first on this store:
racing approvers, and the first use of an empty database by many processes at once."""

from __future__ import annotations

from collections import Counter
from typing import Any

import psycopg
import pytest

from escalate import Conflict, Ledger, Pending
from tests.conftest import RESULT_TIMEOUT_S, WORKERS, audit_log, log_bytes, race_processes

MODES = ("approve", "pause", "cancel")
# What each resolution records as its mode, and the line it writes after the resolution.
RECORDED = {"approve": "extend", "pause": "pause", "cancel": "cancel"}
FOLLOWS = {"approve": ["budget_reserved"], "pause": [], "cancel": ["halt"]}


def _resolve(worker: int, barrier: Any, url: str, round_no: int) -> tuple[str, str]:
    mode = MODES[(worker + round_no) % len(MODES)]
    run = Ledger.open(url, "approvals", actor=f"approver-{worker}", lock_timeout=60)
    barrier.wait(RESULT_TIMEOUT_S)
    try:
        getattr(run, mode)("esc-2", by=f"p{worker}")
    except Conflict as lost:
        return mode, f"conflict:{lost.code}"
    return mode, "won"


@pytest.mark.parametrize("store", ["postgres"], indirect=True)
@pytest.mark.parametrize("round_no", range(3))
def test_racing_approvers_exactly_one_wins(store: str, round_no: int) -> None:
    run = Ledger.init(store, "approvals", cap="10", escalation="enforce", approval_threshold="2",
                      max_extension="1", actor="worker")
    with pytest.raises(Pending):
        run.reserve("t", "3")

    outcomes = race_processes(_resolve, store, round_no)

    winners = [mode for mode, outcome in outcomes if outcome == "won"]
    assert len(winners) == 1, outcomes
    assert Counter(outcome for _, outcome in outcomes) == Counter(
        {"won": 1, "conflict:conflict": WORKERS - 1}), outcomes
    [winner] = winners
    found = audit_log(log_bytes(store, "approvals"))
    [resolved] = found.of_type("escalation_resolved")
    assert resolved["mode"] == RECORDED[winner]
    assert [event["type"] for event in found.events[resolved["seq"]:]] == FOLLOWS[winner]
    assert not run.verify().problems
    assert run.state().escalations["esc-2"].state != "open"


def _first_use(worker: int, barrier: Any, url: str) -> int:
    barrier.wait(RESULT_TIMEOUT_S)
    run = Ledger.init(url, f"run-{worker}", cap="10", actor=f"worker-{worker}", lock_timeout=60)
    return int(run.reserve("t", "1")["remaining_micros"])


def test_many_processes_at_once_on_an_empty_database(pg_url: str) -> None:
    """The schema is made on first use; eight first uses at once all succeed, and it is made
    once."""
    assert race_processes(_first_use, pg_url) == [9_000_000] * WORKERS
    with psycopg.connect(pg_url) as connection:
        versions = [v for (v,) in connection.execute(
            "SELECT version FROM escalate_schema_version ORDER BY version").fetchall()]
    assert versions == sorted(set(versions))
    for worker in range(WORKERS):
        found = audit_log(log_bytes(pg_url, f"run-{worker}"))
        assert found.types == Counter(run_opened=1, budget_reserved=1)
