"""A pool's members are known from its log, never from a folder listing (docs/pools.md):
a member that cannot be read fails closed, a finished run is retired with ``runs archive``
and its money stays counted, and ``pools verify`` checks the pool's log and every
member's — on both stores."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import Location, drop_books, log_bytes

from escalate import Ledger
from escalate.errors import CorruptLedger, Refused
from escalate.pools.pool import Pool


def _pool_of_a(store: Location) -> Ledger:
    """Pool P of $10 (no period) with member a holding all of it."""
    Pool.init(store, "P", cap="10", actor="tester")
    run = Ledger.init(store, "a", pool="P", actor="tester")
    run.reserve("all", "10")
    return run


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
    drop_books(store, "P")
    before = log_bytes(store, "b")
    reserve = cli("reserve", "b", "t", "--estimate", "10", "--json")
    assert reserve.exit_code == 6, reserve.stderr
    assert log_bytes(store, "b") == before  # nothing written
    assert reserve.json()["error"] == "member_unreadable" and reserve.json()["run"] == "a"
    assert "run a of pool P cannot be read" in reserve.stderr and "put the member back as a" in reserve.stderr
    assert "runs init" not in reserve.stderr  # the pool recorded its first line: no new run takes its place
    gate = cli("gate", "--pool", "P", "--json")
    assert gate.exit_code == 6 and gate.json()["run"] == "a"
    shown = cli("pools", "show", "P", "--json")  # a reader shows what it can, and warns
    assert shown.exit_code == 0
    assert [member["run"] for member in shown.json()["unreadable"]] == ["a"]
    assert "warning: the totals leave out run a" in shown.stderr
    _move(store, "a-archived", "a")
    with pytest.raises(Refused) as refused:
        b.reserve("t", "10")
    assert refused.value.code == "over_pool_budget"
    assert Pool.open(store, "P").show()["committed_micros"] == 10_000_000
    assert cli("gate", "--pool", "P", "--allow-halts").exit_code == 0


@pytest.mark.parametrize(("edited", "why"), [(b'"amount_micros":00000000', "line 2 does not parse"),
                                             (b'"amount_micros":20000000', "line 3 breaks the seq or prev")])
def test_a_damaged_member_log_fails_closed(runs_dir: Path, cli: Any, edited: bytes, why: str) -> None:
    _pool_of_a(runs_dir).reserve("nothing", "0")  # a line after the reservation: it vouches for it
    Ledger.init(runs_dir, "b", pool="P", actor="tester")
    log = runs_dir / "a" / "events.ndjson"
    data = log.read_bytes()
    log.write_bytes(data.replace(b'"amount_micros":10000000', edited))
    drop_books(runs_dir, "P")
    reserve = cli("reserve", "b", "t", "--estimate", "10", "--json")
    assert reserve.exit_code == 6, reserve.stderr
    assert reserve.json()["error"] == "member_unreadable"
    assert why in reserve.stderr and "escalate runs verify a" in reserve.stderr
    assert cli("gate", "--pool", "P").exit_code == 6
    log.write_bytes(data)
    assert cli("reserve", "b", "t", "--estimate", "10").exit_code == 3


def test_a_cut_short_init_blocks_the_pool_until_it_is_run_again(store: Location) -> None:
    from escalate.config import utc_now
    from escalate.pools import book as pool_book

    _pool_of_a(store)
    runs = Ledger.open(store, "a").runs_store
    pool_book.join(runs, "P", runs.ledger("c", lock_timeout=5), actor="tester", clock=utc_now,
                   lock_timeout=5, create=lambda: False)  # killed before the run was made
    drop_books(store, "P")
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
    drop_books(store, "P")
    with pytest.raises(Refused) as refused:
        b.reserve("t", "3.01")  # a's $7 still counts, after the books were rebuilt too
    assert refused.value.code == "over_pool_budget"
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
    assert "done (archived)" in cli("runs", "show", "done").stdout


def _pool_of_four(store: Location) -> None:
    """Pool P with members a, b, c, d: its log's line 4 is b's join (after a's join and its
    member_opened), with lines after it."""
    Pool.init(store, "P", cap="10", actor="tester")
    for run_id in "abcd":
        Ledger.init(store, run_id, pool="P", actor="tester")
    Ledger.open(store, "a").reserve("warm", "1")  # the books exist and are current


def _edit_line_4(store: Location) -> None:
    """Change b's join on the pool's line 4 to x's: the same size, the chain broken after it."""
    if isinstance(store, Path):
        log = store / "P" / "events.ndjson"
        info = log.stat()
        log.write_bytes(log.read_bytes().replace(b'"run":"b"', b'"run":"x"', 1))
        # As an editor's save does, whatever the clock's steps: a later modification time.
        os.utime(log, ns=(info.st_atime_ns, info.st_mtime_ns + 1_000_000_000))
        return
    with psycopg.connect(store, autocommit=True) as connection:  # the table's owner, past its trigger
        connection.execute("ALTER TABLE escalate_events DISABLE TRIGGER escalate_events_append_only")
        edited = connection.execute(
            "UPDATE escalate_events SET line = "
            "convert_to(replace(convert_from(line, 'UTF8'), %s, %s), 'UTF8') WHERE ledger = 'P' AND seq = 4",
            ('"run":"b"', '"run":"x"'))
        assert edited.rowcount == 1
        connection.execute("ALTER TABLE escalate_events ENABLE TRIGGER escalate_events_append_only")


def test_pools_verify_finds_an_edit_of_the_pool_log_at_the_same_size(store: Location, cli: Any) -> None:
    _pool_of_four(store)
    assert cli("pools", "verify", "P").exit_code == 0
    _edit_line_4(store)
    verified = cli("pools", "verify", "P", "--json")
    assert verified.exit_code == 6 and verified.json()["error"] == "corrupt_ledger"
    assert verified.json()["problems"][0]["line"] == 5
    assert "line 4 was changed after this line was written" in verified.json()["problems"][0]["problem"]
    assert {member["run"]: member["ok"] for member in verified.json()["members"]} == {
        "a": True, "x": False, "c": True, "d": True}  # the folded log names x, which has no log
    for args in (["pools", "show", "P"], ["gate", "--pool", "P"]):
        refused = cli(*args)
        assert refused.exit_code == 6, args
        assert "inspect with 'escalate pools verify P'" in refused.stderr
    runs_verify = cli("runs", "verify", "P", "--json")
    assert runs_verify.exit_code == 2 and runs_verify.json()["error"] == "is_a_pool"
    assert "escalate pools verify P" in runs_verify.stderr


@pytest.mark.parametrize("settled", [False, True], ids=["just-written", "settled"])
def test_writers_notice_an_edit_of_the_pool_log_at_the_same_size(runs_dir: Path, cli: Any, settled: bool,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a rebuild of the books: a log changed since they were saved is checked whole.
    ``settled``: its times were recorded (just written: they could not tell a change yet)."""
    from escalate.stores.file import store as file_store

    if settled:
        monkeypatch.setattr(file_store, "_SETTLED_NS", 0)
    _pool_of_four(runs_dir)
    assert Ledger.open(runs_dir, "c").reserve("t", "1")["status"] == "reserved"
    books = runs_dir / "P" / "events.ndjson.derived.sqlite"
    kept = books.stat().st_ino
    _edit_line_4(runs_dir)
    for args in (["reserve", "c", "u", "--estimate", "1"], ["release", "a", "warm", "--actual", "1"]):
        refused = cli(*args)
        assert refused.exit_code == 6, (args, refused.stderr)
        assert "line 5" in refused.stderr and "inspect with 'escalate pools verify P'" in refused.stderr
    assert books.stat().st_ino == kept  # nothing was rebuilt: the writers checked the log itself
