"""Ways a run could slip out of its pool's count (docs/reliability.md, attacks), each
closed: a run spends in its pool or not at all, on both stores."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest
from conftest import Location

from escalate import Ledger
from escalate.errors import Refused, UnknownRun
from escalate.pools.pool import Pool


def _full_pool(store: Location) -> None:
    """Pool P of $10 with member A holding all of it."""
    Pool.init(store, "P", cap="10", actor="tester")
    Ledger.init(store, "A", pool="P", actor="tester").reserve("all", "10")


def test_a_long_first_line_does_not_hide_the_pool(store: Location) -> None:
    _full_pool(store)
    approvers = [f"a{number:04d}" + "x" * 120 for number in range(600)]  # a first line of ~77 KB
    run = Ledger.init(store, "B", pool="P", cap="100", approvers=approvers, actor="tester")
    with pytest.raises(Refused) as refused:
        run.reserve("t", "90")
    assert refused.value.code == "over_pool_budget"
    assert "B" in [row["run"] for row in Pool.open(store, "P").show()["runs"]]


def test_a_ledger_made_before_its_run_exists_still_takes_the_pool(store: Location) -> None:
    _full_pool(store)
    early = Ledger(store, "R", actor="tester")  # a long-lived program holds it already
    with pytest.raises(UnknownRun):
        early.reserve("before", "1")
    Ledger.init(store, "R", pool="P", cap="100", actor="tester")
    with pytest.raises(Refused) as refused:
        early.reserve("after", "90")
    assert refused.value.code == "over_pool_budget"


def test_runs_init_over_a_torn_first_write_joins_the_pool(runs_dir: Path) -> None:
    _full_pool(runs_dir)
    (runs_dir / "R").mkdir()
    (runs_dir / "R" / "events.ndjson").write_bytes(b'{"v":1,"seq":1,"type":"run_op')  # a crash in init
    run = Ledger.init(runs_dir, "R", pool="P", cap="100", actor="tester")
    assert "R" in Pool.open(runs_dir, "P").facts.members
    with pytest.raises(Refused) as refused:
        run.reserve("t", "9")
    assert refused.value.code == "over_pool_budget"


def test_a_library_write_to_a_missing_run_is_an_unknown_run(store: Location) -> None:
    with pytest.raises(UnknownRun):
        Ledger(store, "missing", actor="tester").reserve("t", "1")


def _edited(sealed: bytes, edit: Callable[[dict[str, Any]], None]) -> bytes:
    """A value of the books with its JSON changed and whatever precedes the JSON kept."""
    try:
        meta, prefix = orjson.loads(sealed), b""
    except orjson.JSONDecodeError:
        meta, prefix = orjson.loads(sealed[16:]), sealed[:16]  # behind a 16-byte digest
    edit(meta)
    return prefix + orjson.dumps(meta)


def _edit_books(store: Location, edit: Callable[[dict[str, Any]], None]) -> None:
    """Change the pool's meta in its books by hand, as valid JSON (any digest left as it was)."""
    if isinstance(store, Path):
        with sqlite3.connect(store / "P" / "events.ndjson.derived.sqlite") as db:
            (sealed,) = db.execute("SELECT value FROM derived WHERE key = 'meta'").fetchone()
            db.execute("UPDATE derived SET value = ? WHERE key = 'meta'", (_edited(bytes(sealed), edit),))
        return
    with psycopg.connect(store, autocommit=True) as connection:
        (sealed,) = connection.execute(
            "SELECT value FROM escalate_derived WHERE ledger = 'P' AND key = 'meta'").fetchone()
        connection.execute("UPDATE escalate_derived SET value = %s WHERE ledger = 'P' AND key = 'meta'",
                           (_edited(bytes(sealed), edit),))


def test_books_edited_by_hand_are_rebuilt_not_trusted(store: Location) -> None:
    Pool.init(store, "P", cap="10", actor="tester")
    run = Ledger.init(store, "A", pool="P", cap="100", actor="tester")
    run.reserve("t1", "8")
    _edit_books(store, lambda meta: meta.update(cap=1_000_000_000))
    with pytest.raises(Refused) as refused:
        run.reserve("t2", "50")
    assert refused.value.code == "over_pool_budget"
    assert run.reserve("t3", "2")["pool_remaining_micros"] == 0


def test_the_pool_gate_passes_over_joins_that_hold_no_money(store: Location, cli: Any) -> None:
    """A join whose run id was taken meanwhile — by a pool (a race with 'pools init') or by a
    run of no pool — is voided by the init that lost the race (run_join_voided), and never
    breaks the pool's gate. (Before voids, such joins stayed listed and counted as nothing;
    now a join left standing over another ledger fails closed: tests/test_pool_joins.py.)"""
    from escalate.config import utc_now
    from escalate.pools import void

    Pool.init(store, "P", cap="10", actor="tester")
    Ledger.init(store, "A", pool="P", actor="tester").reserve("t", "1")
    Pool.init(store, "Q", cap="5", actor="tester")
    Ledger.init(store, "solo", cap="5", actor="tester").reserve("t", "4")
    runs = Ledger.open(store, "A").runs_store
    for taken in ("Q", "solo"):  # what a 'runs init --pool P' does when it loses the race
        created = void.join(runs, "P", runs.ledger(taken, lock_timeout=5), actor="tester",
                             clock=utc_now, lock_timeout=5, create=lambda: False)  # the id was taken
        assert created is False
    assert Pool.open(store, "P").facts.members == ["A"]  # both joins voided
    result = cli("gate", "--pool", "P", "--json")
    assert result.exit_code == 0, result.stderr
    assert Pool.open(store, "P").show()["committed_micros"] == 1_000_000


@pytest.mark.parametrize("period", ["day", "week", "month"])
def test_a_clock_at_the_end_of_time_in_a_zone_ahead_of_utc_still_answers(runs_dir: Path, period: str) -> None:
    from datetime import UTC, datetime

    from conftest import FakeClock

    clock = FakeClock(datetime(9999, 12, 31, 23, 0, tzinfo=UTC))  # already year 10000 at +14
    pool = Pool.init(runs_dir, "P", cap="10", period=period, tz="Pacific/Kiritimati", clock=clock)
    run = Ledger.init(runs_dir, "r", pool="P", clock=clock, actor="tester")
    assert run.reserve("a", "1")["pool_remaining_micros"] == 9_000_000
    assert pool.show()["period_end"] == "9999-12-31T23:59:59.999999Z"  # the last moment a timestamp names


def test_a_ledger_kept_across_its_run_being_made_again_in_a_pool_takes_the_pool(runs_dir: Path) -> None:
    import shutil

    _full_pool(runs_dir)
    Ledger.init(runs_dir, "X", cap="50", actor="tester")
    early = Ledger.open(runs_dir, "X", actor="tester")  # it knows X as a run without a pool
    early.reserve("before", "1")
    shutil.rmtree(runs_dir / "X")
    Ledger.init(runs_dir, "X", pool="P", cap="50", actor="tester")
    with pytest.raises(Refused) as refused:
        early.reserve("after", "5")
    assert refused.value.code == "over_pool_budget"


def test_a_member_folder_renamed_is_refused_not_left_out_of_its_pool(runs_dir: Path, cli: Any) -> None:
    from escalate.errors import CorruptLedger

    Pool.init(runs_dir, "P", cap="10", actor="tester")
    Ledger.init(runs_dir, "M", pool="P", cap="10", actor="tester").reserve("a", "6")
    (runs_dir / "M").rename(runs_dir / "N")
    with pytest.raises(CorruptLedger) as refused:
        Ledger.open(runs_dir, "N", actor="tester").reserve("b", "3")
    assert "does not list it" in refused.value.message
    for name in (runs_dir / "P").glob("events.ndjson.derived.sqlite*"):
        name.unlink()  # a rebuild of the books changes nothing: N is still refused
    result = cli("reserve", "N", "c", "--estimate", "1", "--json")
    assert result.exit_code == 6 and result.json()["error"] == "member_unreadable"  # M is gone
    assert result.json()["run"] == "M"


def test_a_clock_before_year_1000_leaves_the_run_usable(runs_dir: Path) -> None:
    from datetime import UTC, datetime

    from conftest import FakeClock

    clock = FakeClock(datetime(2026, 11, 30, 12, 0, tzinfo=UTC))
    run = Ledger.init(runs_dir, "r", cap="10", actor="tester", clock=clock)
    clock.now = datetime(999, 5, 1, tzinfo=UTC)  # a clock gone wrong
    run.reserve("a", "1")
    clock.now = datetime(2026, 11, 30, 13, 0, tzinfo=UTC)
    assert run.reserve("b", "1")["remaining_micros"] == 8_000_000  # the log still folds
    assert Ledger.open(runs_dir, "r").verify().problems == []
    old = FakeClock(datetime(1, 1, 1, 3, 0, tzinfo=UTC))  # before the calendar in New York
    pool = Pool.init(runs_dir, "early", cap="5", period="day", tz="America/New_York", clock=old)
    assert pool.show()["period"] == "0001-01-01"
