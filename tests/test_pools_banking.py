"""No banking (docs/pools.md: which period money counts in): money counts in the period it is
added in, so what is committed during one period never exceeds that period's cap plus its
extensions, however old the tasks; a release frees a task's money from its most recent
period first. Every test runs on both stores."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import FakeClock, Location

from escalate import Ledger
from escalate.errors import Pending, Refused
from escalate.pools.book import _seal
from escalate.pools.pool import Pool
from escalate.reports.gate import check_pool_gate
from escalate.stores.seam import open_store

GOLDEN = Path(__file__).parent / "golden"
DAY = 86_400
MONDAY = datetime(2026, 11, 23, 14, 0, tzinfo=UTC)


def _day_pool(store: Location, clock: FakeClock, **settings: str) -> tuple[Pool, Ledger]:
    pool = Pool.init(store, "daily", cap="10", period="day", clock=clock, actor="owner", **settings)
    return pool, Ledger.init(store, "r", pool="daily", cap="100", clock=clock, actor="worker")


def _money(pool: Pool, day: str) -> tuple[int, int]:
    """(reserved, spent) of the pool on ``day``."""
    shown = pool.show(day)
    return shown["reserved_micros"], shown["spent_micros"]


def test_placeholders_cannot_save_up_a_daily_cap(store: Location) -> None:
    clock = FakeClock(MONDAY)
    pool, run = _day_pool(store, clock)
    run.reserve("placeholder-1", "0")
    clock.advance(DAY)
    run.reserve("placeholder-2", "0")
    clock.advance(DAY)
    assert run.reserve("today", "10")["pool_remaining_micros"] == 0
    for placeholder in ("placeholder-1", "placeholder-2"):
        with pytest.raises(Refused) as over:
            run.increase(placeholder, "10")  # the $10 more would count today, which is full
        assert over.value.code == "over_pool_budget"
        assert (over.value.facts["period"], over.value.facts["remaining_micros"]) == ("2026-11-25", 0)
    assert pool.show()["committed_micros"] == 10_000_000
    assert [pool.show(day)["committed_micros"] for day in ("2026-11-23", "2026-11-24")] == [0, 0]
    gate = check_pool_gate(pool, allow_halts=True)  # the halted placeholders are the run's own finding
    assert gate.passed and gate.verdict.committed_micros == 10_000_000


def test_an_increase_counts_in_the_period_it_is_added_in(store: Location) -> None:
    # 23:59:59 in Berlin; the increases come after midnight.
    clock = FakeClock(datetime(2026, 11, 30, 22, 59, 59, tzinfo=UTC))
    pool = Pool.init(store, "daily", cap="10", period="day", tz="Europe/Berlin", clock=clock)
    run = Ledger.init(store, "r", pool="daily", cap="100", clock=clock)
    run.reserve("late", "7")
    clock.advance(2)  # 00:00:01 the next day
    assert run.increase("late", "9")["pool_remaining_micros"] == 8_000_000  # $2 of today's $10
    assert run.increase("late", "17")["pool_remaining_micros"] == 0  # yesterday had only $3 left
    with pytest.raises(Refused) as over:
        run.reserve("more", "0.01")
    assert over.value.facts["period"] == "2026-12-01"
    assert (_money(pool, "2026-11-30"), _money(pool, "2026-12-01")) == ((7_000_000, 0), (10_000_000, 0))
    run.release("late", "16")  # never refused; $1 freed from today, yesterday's $7 spent there
    assert (_money(pool, "2026-11-30"), _money(pool, "2026-12-01")) == ((0, 7_000_000), (0, 9_000_000))
    assert not pool.show("2026-11-30")["current"]


def test_a_release_frees_the_most_recent_period_first(store: Location) -> None:
    clock = FakeClock(MONDAY)
    pool, run = _day_pool(store, clock)
    run.reserve("t", "3")  # Monday $3
    clock.advance(DAY)
    run.increase("t", "5")  # Tuesday $2
    clock.advance(DAY)
    run.increase("t", "9")  # Wednesday $4
    run.release("t", "2")  # $7 freed: Wednesday's $4, Tuesday's $2, then $1 of Monday's
    assert [_money(pool, day) for day in ("2026-11-23", "2026-11-24", "2026-11-25")] == [
        (0, 2_000_000), (0, 0), (0, 0)]
    run.reserve("u", "4")  # Wednesday $4 again
    clock.advance(DAY)
    run.increase("u", "6")  # Thursday $2
    run.release("u", "5")  # $1 freed from Thursday; $4 spent Wednesday, $1 Thursday
    assert (_money(pool, "2026-11-25"), _money(pool, "2026-11-26")) == ((0, 4_000_000), (0, 1_000_000))
    assert run.reserve("v", "9")["pool_remaining_micros"] == 0  # Thursday's freed $1 is back


def test_the_part_of_a_release_above_its_reservation_counts_when_released(store: Location) -> None:
    clock = FakeClock(MONDAY)
    pool, run = _day_pool(store, clock)
    run.reserve("t", "4")
    clock.advance(DAY)
    run.reserve("u", "8")
    run.release("t", "6.5")  # $2.50 above what Monday held: spent on Tuesday, never refused
    assert (_money(pool, "2026-11-23"), _money(pool, "2026-11-24")) == ((0, 4_000_000),
                                                                        (8_000_000, 2_500_000))
    assert pool.show()["remaining_micros"] == -500_000
    with pytest.raises(Refused):
        run.reserve("w", "0")


def test_an_old_task_can_be_extended_today(store: Location) -> None:
    """An increase of yesterday's task counts today, so today's extension can cover it."""
    clock = FakeClock(MONDAY)
    pool, run = _day_pool(store, clock, escalation="enforce", max_extension="5")
    run.reserve("old", "6")
    clock.advance(DAY)
    run.reserve("new", "8")
    with pytest.raises(Pending) as asked:
        run.increase("old", "9")  # $3 more today, with $2 left
    assert asked.value.facts["remaining_micros"] == 2_000_000
    assert run.approve(asked.value.escalation_id, by="lead")["pool_extension_micros"] == 1_000_000
    shown = pool.show()
    assert (shown["extended_micros"], shown["committed_micros"], shown["remaining_micros"]) == (
        1_000_000, 11_000_000, 0)
    assert pool.show("2026-11-23")["committed_micros"] == 6_000_000


def _load_golden_pool(store: Location) -> None:
    """The pool and run of ``pool_banked*.ndjson``, written once through the library of an
    earlier version (increases then counted in their task's first period), with a clock
    from Monday 2026-11-23 14:00 UTC: a day pool of $10 (UTC) and a run of $100 in it;
    placeholders of $0 on Monday and Tuesday, $10 reserved on Wednesday, then both
    placeholders increased to $10 on Wednesday — every call accepted then."""
    runs = open_store(store)
    for ledger_id, name in (("banked-pool", "pool_banked"), ("banked-run", "pool_banked_run")):
        def refuse(torn_bytes: int, saved_to: str) -> bytes:
            raise AssertionError("a fresh store holds no torn create")

        assert runs.ledger(ledger_id, lock_timeout=5).create((GOLDEN / f"{name}.ndjson").read_bytes(), refuse)


def test_an_old_log_that_saved_up_a_daily_cap_fails_the_pool_gate(store: Location) -> None:
    _load_golden_pool(store)
    clock = FakeClock(datetime(2026, 11, 25, 15, 0, tzinfo=UTC))
    pool = Pool.open(store, "banked-pool", clock=clock)
    gate = check_pool_gate(pool)
    assert not gate.passed and gate.over_pool
    assert (gate.verdict.committed_micros, pool.show()["remaining_micros"]) == (30_000_000, -20_000_000)
    assert [pool.show(day)["committed_micros"] for day in ("2026-11-23", "2026-11-24")] == [0, 0]
    run = Ledger.open(store, "banked-run", clock=clock, actor="later")
    assert run.verify().problems == []  # the old log still replays
    assert run.state().reserved_micros == 30_000_000
    with pytest.raises(Refused) as over:
        run.reserve("more", "0")  # the writers' books fold the old lines by the same rule
    assert over.value.facts["remaining_micros"] == -20_000_000
    run.release("placeholder-2", "1")  # $9 freed from Wednesday
    assert _money(pool, "2026-11-25") == (20_000_000, 1_000_000)


def test_books_of_the_earlier_format_are_rebuilt_not_trusted(store: Location) -> None:
    """The books an earlier version kept of the golden pool (each task in its first
    period: $10 a day) are sealed and current, but of format 3: never trusted."""
    _load_golden_pool(store)
    runs = open_store(store)
    pool_store = runs.ledger("banked-pool", lock_timeout=5)
    policy = Pool.open(store, "banked-pool").state().policy.to_json()
    ten = 10_000_000
    days = ("2026-11-23", "2026-11-24", "2026-11-25")
    with pool_store.command(), pool_store.transaction(checkpoint=False) as transaction:
        books: dict[str, object] = {
            "meta": {"format": 3, "epoch": transaction.derived_epoch(), "log_size": pool_store.size(),
                     "cap": ten, "policy": policy, "period": "day", "tz": "UTC"},
            "member:banked-run": {
                "offset": runs.ledger("banked-run", lock_timeout=5).size(),
                "holding": {task: [day, ten] for task, day in zip(("placeholder-1", "placeholder-2", "today"),
                                                                  days, strict=True)},
                "periods": {day: [ten, 0, 0] for day in days}},
            **{f"period:{day}": [ten, 0, 0] for day in days}}
        sealed = {key: _seal(key, orjson.dumps(value)) for key, value in books.items()}
        assert transaction.save_derived(sealed, replace=True)
    run = Ledger.open(store, "banked-run", clock=FakeClock(datetime(2026, 11, 25, 15, 0, tzinfo=UTC)))
    with pytest.raises(Refused) as over:
        run.reserve("more", "0")
    assert over.value.facts["remaining_micros"] == -20_000_000
    run.release("placeholder-1", "10")
    assert Pool.open(store, "banked-pool").show("2026-11-25")["spent_micros"] == ten


def test_the_banking_sequence_through_the_cli(store: Location, cli: Any) -> None:
    """The issue's sequence, today's part through the CLI (its clock is the real one): the
    placeholders are made two and one days ago, in a zone where it is about noon now."""
    now = datetime.now(UTC)
    ahead = 12 - now.hour  # hours: a zone whose midnight is far from now
    zone = f"Etc/GMT-{ahead}" if ahead >= 0 else f"Etc/GMT+{-ahead}"
    clock = FakeClock(now - timedelta(days=2))
    Pool.init(store, "daily", cap="10", period="day", tz=zone, clock=clock)
    run = Ledger.init(store, "r", pool="daily", cap="100", clock=clock)
    run.reserve("placeholder-1", "0")
    clock.advance(DAY)
    run.reserve("placeholder-2", "0")
    assert cli("reserve", "r", "today", "--estimate", "10").exit_code == 0
    for placeholder in ("placeholder-1", "placeholder-2"):
        refused = cli("increase", "r", placeholder, "--to", "10", "--json")
        assert (refused.exit_code, refused.json()["error"]) == (3, "over_pool_budget")
    gate = cli("gate", "--pool", "daily", "--allow-halts", "--json")
    assert (gate.exit_code, gate.json()["committed_micros"]) == (0, 10_000_000)
