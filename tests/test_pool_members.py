"""A pool's members are known from its log, never from a folder listing (docs/pools.md):
a member that cannot be read fails closed, a finished run is retired with ``runs archive``
and its money stays counted, and ``pools verify`` checks the pool's log and every
member's — on both stores."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import Location

from escalate import Ledger
from escalate.errors import CorruptLedger
from escalate.pools import Pool


def _pool_of_a(store: Location) -> Ledger:
    """Pool P of $10 (no period) with member a holding all of it."""
    Pool.init(store, "P", cap="10", actor="tester")
    run = Ledger.init(store, "a", pool="P", actor="tester")
    run.reserve("all", "10")
    return run


def _rebuild_books(store: Location) -> None:
    """Throw the pool's books away (a reboot does as much): the next writer rebuilds them."""
    if isinstance(store, Path):
        for path in (store / "P").glob("events.ndjson.derived.sqlite*"):
            path.unlink()
        return
    with psycopg.connect(store, autocommit=True) as connection:
        connection.execute("DELETE FROM escalate_derived WHERE ledger = 'P'")


def _move(store: Location, run_id: str, to: str) -> None:
    """``mv runs/RUN runs/TO``, or its like in a database: the ledger answers to another id."""
    if isinstance(store, Path):
        (store / run_id).rename(store / to)
        return
    with psycopg.connect(store, autocommit=True) as connection:
        connection.execute("UPDATE escalate_ledgers SET ledger = %s WHERE ledger = %s", (to, run_id))


def test_a_member_moved_away_frees_no_money(store: Location, cli: Any) -> None:
    _pool_of_a(store)
    b = Ledger.init(store, "b", pool="P", actor="tester")
    _move(store, "a", "a-archived")
    _rebuild_books(store)
    reserve = cli("reserve", "b", "t", "--estimate", "10", "--json")
    assert reserve.exit_code == 6, reserve.stderr
    assert reserve.json()["error"] == "member_unreadable" and reserve.json()["run"] == "a"
    assert "run a of pool P cannot be read" in reserve.stderr and "put it back as a" in reserve.stderr
    gate = cli("gate", "--pool", "P", "--json")
    assert gate.exit_code == 6 and gate.json()["run"] == "a"
    shown = cli("pools", "show", "P", "--json")  # a reader shows what it can, and warns
    assert shown.exit_code == 0
    assert [member["run"] for member in shown.json()["unreadable"]] == ["a"]
    assert "warning: the totals leave out run a" in shown.stderr
    _move(store, "a-archived", "a")
    with pytest.raises(Exception) as refused:
        b.reserve("t", "10")
    assert getattr(refused.value, "code", "") == "over_pool_budget"
    assert Pool.open(store, "P").show()["committed_micros"] == 10_000_000
    assert cli("gate", "--pool", "P", "--allow-halts").exit_code == 0


def test_a_damaged_member_log_fails_closed(runs_dir: Path, cli: Any) -> None:
    _pool_of_a(runs_dir)
    Ledger.init(runs_dir, "b", pool="P", actor="tester")
    log = runs_dir / "a" / "events.ndjson"
    data = log.read_bytes()
    log.write_bytes(data.replace(b'"amount_micros":10000000', b'"amount_micros":00000000'))
    _rebuild_books(runs_dir)
    reserve = cli("reserve", "b", "t", "--estimate", "10", "--json")
    assert reserve.exit_code == 6, reserve.stderr
    assert reserve.json()["error"] == "member_unreadable"
    assert "escalate runs verify a" in reserve.stderr
    assert cli("gate", "--pool", "P").exit_code == 6
    log.write_bytes(data)
    assert cli("reserve", "b", "t", "--estimate", "10").exit_code == 3


def test_a_cut_short_init_blocks_the_pool_until_it_is_run_again(store: Location) -> None:
    from escalate import pool_book
    from escalate.config import utc_now

    _pool_of_a(store)
    runs = Ledger.open(store, "a").runs_store
    pool_book.join(runs, "P", runs.ledger("c", lock_timeout=5), actor="tester", clock=utc_now,
                   lock_timeout=5, create=lambda: False)  # killed before the run was made
    _rebuild_books(store)
    with pytest.raises(CorruptLedger, match="runs init c --pool P' again"):
        Ledger.open(store, "a").release("all", "1")
    Ledger.init(store, "c", pool="P", actor="tester")  # the retry makes it: the pool counts it again
    Ledger.open(store, "a").release("all", "1")
    assert Ledger.open(store, "c").reserve("t", "9")["pool_remaining_micros"] == 0


def test_an_archived_member_keeps_its_money_in_the_pool(store: Location, cli: Any) -> None:
    run = _pool_of_a(store)
    b = Ledger.init(store, "b", pool="P", actor="tester")
    run.release("all", "7")
    archived = cli("runs", "archive", "a", "--json")
    assert archived.exit_code == 0, archived.stderr
    assert archived.json()["status"] == "archived"
    assert cli("runs", "archive", "a", "--json").json()["status"] == "exists"  # a repeat is fine
    _rebuild_books(store)
    with pytest.raises(Exception) as refused:
        b.reserve("t", "3.01")  # a's $7 still counts, after the books were rebuilt too
    assert getattr(refused.value, "code", "") == "over_pool_budget"
    assert b.reserve("u", "3")["pool_remaining_micros"] == 0
    assert Pool.open(store, "P").show()["runs"][0] == {"run": "a", "committed_micros": 7_000_000}
    assert cli("gate", "--pool", "P", "--allow-halts").exit_code == 0
    assert cli("runs", "verify", "a").exit_code == 0  # its log stays readable and verifiable
    write = cli("reserve", "a", "late", "--estimate", "0", "--json")
    assert write.exit_code == 5 and write.json()["error"] == "run_archived"
    assert "run a is archived" in write.stderr


def test_archive_refuses_a_run_that_is_not_finished(store: Location, cli: Any) -> None:
    from conftest import snapshot_store

    from escalate.errors import Pending

    run = Ledger.init(store, "r", cap="10", escalation="enforce", approval_threshold="5", actor="tester")
    run.reserve("held", "1")
    with pytest.raises(Pending):
        run.reserve("asks", "6")
    before = snapshot_store(store)
    refused = cli("runs", "archive", "r", "--json")
    assert refused.exit_code == 5 and refused.json()["error"] == "not_finished"
    assert "tasks holding reservations: held; open escalations: esc-" in refused.stderr
    assert snapshot_store(store) == before
    run.release("held", "1")
    refused = cli("runs", "archive", "r", "--json")
    assert refused.exit_code == 5 and refused.json()["escalations"] == ["esc-3"]
    run.cancel("esc-3", by="lead")
    assert cli("runs", "archive", "r").exit_code == 0


def test_an_archived_run_leaves_runs_list_unless_all(store: Location, cli: Any) -> None:
    Ledger.init(store, "done", cap="1", actor="tester").archive()
    Ledger.init(store, "live", cap="1", actor="tester")
    assert [row["run"] for row in cli("runs", "list", "--json").json()["runs"]] == ["live"]
    every = {row["run"]: row for row in cli("runs", "list", "--all", "--json").json()["runs"]}
    assert set(every) == {"done", "live"}
    assert (every["done"]["archived"], every["done"]["state"]) == (True, "archived")
    assert cli("runs", "show", "done", "--json").json()["archived"] is True
