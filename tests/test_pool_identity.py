"""A member's identity is fixed once its log exists (docs/pools.md: a member's identity): the
pool records the chain hash of the member's first line (``member_opened``), and every reader
checks that the log under the member's id starts with that line, names that run and this
pool. A member deleted and created again, replaced by a copy of another member, or swapped
for another run in the pool's last line fails closed (exit 6); a join cut between the run's
first line and ``member_opened`` is completed by the same ``runs init`` again."""

from __future__ import annotations

import multiprocessing
import os
import shutil
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import RESULT_TIMEOUT_S, Location, drop_books, has_run, log_bytes
from test_pool_joins import _pool_lines
from test_pools_banking import _load_golden_pool

from escalate import Ledger
from escalate.pools import Pool

FORK = multiprocessing.get_context("fork")


def _raw(store: Location, ledger_id: str) -> bytes:
    """A ledger's log as the store holds it (a pool's too)."""
    from escalate.stores.seam import open_store

    with open_store(store).ledger(ledger_id, lock_timeout=5).reader() as stream:
        return stream.read()


def _pool_of_a_and_b(runs_dir: Path, cli: Any) -> None:
    """Day pool P of $10, members a (holding $8) and b."""
    assert cli("pools", "init", "P", "--cap", "10", "--period", "day").exit_code == 0
    for run_id in "ab":
        assert cli("runs", "init", run_id, "--pool", "P").exit_code == 0
    assert cli("reserve", "a", "t", "--estimate", "8").exit_code == 0


def test_variant_a_deleted_member_is_not_created_again(runs_dir: Path, cli: Any) -> None:
    """``rm -rf runs/a; escalate runs init a --pool P``: refused, nothing written; the pool
    keeps failing closed (naming a, and how to bring it back) until a's folder is back."""
    _pool_of_a_and_b(runs_dir, cli)
    kept = runs_dir / "a-copy"
    shutil.copytree(runs_dir / "a", kept)
    shutil.rmtree(runs_dir / "a")
    pool_log = _raw(runs_dir, "P")
    made = cli("runs", "init", "a", "--pool", "P", "--json")
    assert made.exit_code == 6, made.stderr
    assert made.json()["error"] == "member_unreadable" and made.json()["run"] == "a"
    assert "the pool recorded the first line of run a, but its log is gone" in made.stderr
    assert "runs init" not in made.stderr and "put the member back as a" in made.stderr
    assert _raw(runs_dir, "P") == pool_log and not has_run(runs_dir, "a")  # nothing written
    refused = cli("reserve", "b", "t2", "--estimate", "8", "--json")
    assert refused.exit_code == 3 and refused.json()["error"] == "over_pool_budget"  # a's $8 still count
    drop_books(runs_dir, "P")
    for args in (["reserve", "b", "t2", "--estimate", "8"], ["gate", "--pool", "P"]):
        lost = cli(*args, "--json")
        assert lost.exit_code == 6 and lost.json()["run"] == "a", (args, lost.stderr)
        assert "runs init" not in lost.stderr
    assert cli("pools", "verify", "P").exit_code != 0
    shutil.copytree(kept, runs_dir / "a")  # the way back the message names
    assert cli("pools", "verify", "P").exit_code == 0
    again = cli("reserve", "b", "t3", "--estimate", "8", "--json")
    assert again.exit_code == 3 and again.json()["error"] == "over_pool_budget"


def test_variant_a_a_new_log_under_the_member_id_fails_closed(runs_dir: Path, cli: Any) -> None:
    """A new log of run a naming pool P, put in place by hand (as an init of an earlier
    version would): its first line is not the one P recorded, so nothing of it is read."""
    _pool_of_a_and_b(runs_dir, cli)
    shutil.rmtree(runs_dir / "a")
    scratch = runs_dir.parent / "scratch"
    Pool.init(scratch, "P", cap="10", period="day", actor="tester")
    Ledger.init(scratch, "a", pool="P", actor="tester")
    shutil.copytree(scratch / "a", runs_dir / "a")  # a's log, but not the one P recorded
    drop_books(runs_dir, "P")
    before = log_bytes(runs_dir, "a")
    for args in (["reserve", "a", "x", "--estimate", "0.01"], ["reserve", "b", "t2", "--estimate", "8"],
                 ["gate", "--pool", "P"]):
        refused = cli(*args, "--json")
        assert refused.exit_code == 6 and refused.json()["run"] == "a", (args, refused.stderr)
        assert "is not the one the pool recorded" in refused.stderr and "runs init" not in refused.stderr
    assert log_bytes(runs_dir, "a") == before
    verified = cli("pools", "verify", "P", "--json")
    assert verified.exit_code != 0
    assert not {member["run"]: member["ok"] for member in verified.json()["members"]}["a"]
    shown = cli("pools", "show", "P", "--json")
    assert [member["run"] for member in shown.json()["unreadable"]] == ["a"]


@pytest.mark.parametrize("books", ["kept", "lost"])
def test_variant_c_a_member_replaced_by_a_copy_of_another_fails_closed(runs_dir: Path, cli: Any,
                                                                       books: str) -> None:
    """``rm -rf runs/a; cp -r runs/b runs/a``: a log whose first line says run b is never
    read as member a."""
    _pool_of_a_and_b(runs_dir, cli)
    shutil.rmtree(runs_dir / "a")
    shutil.copytree(runs_dir / "b", runs_dir / "a")
    if books == "lost":
        drop_books(runs_dir, "P")
    for args in (["reserve", "a", "x", "--estimate", "0.01"], ["reserve", "b", "t2", "--estimate", "8"],
                 ["gate", "--pool", "P"]):
        refused = cli(*args, "--json")
        if args[1] == "b" and books == "kept":  # the books still count a's $8
            assert refused.exit_code == 3 and refused.json()["error"] == "over_pool_budget"
            continue
        assert refused.exit_code == 6 and refused.json()["run"] == "a", (args, refused.stdout)
        assert "is the log of run 'b', not this member's" in refused.stderr
        assert "runs init" not in refused.stderr
    verified = cli("pools", "verify", "P", "--json")
    assert verified.exit_code != 0
    assert {member["run"]: member["ok"] for member in verified.json()["members"]} == {"a": False, "b": True}


def test_variant_d_the_pool_log_last_line_swapped_for_another_run_fails_closed(runs_dir: Path,
                                                                                cli: Any) -> None:
    """An edit of the pool log's last line in place, at the same size (a known limit of the
    chain: nothing after it vouches for it): the member's id swapped for an unrelated run's."""
    _pool_of_a_and_b(runs_dir, cli)
    assert cli("runs", "init", "u", "--cap", "100").exit_code == 0  # no member of P
    assert cli("runs", "init", "c", "--pool", "P").exit_code == 0
    log = runs_dir / "P" / "events.ndjson"
    lines = log.read_bytes().splitlines(keepends=True)
    last = orjson.loads(lines[-1])
    assert last["type"] == "member_opened" and last["run"] == "c"
    lines[-1] = lines[-1].replace(b'"run":"c"', b'"run":"u"')
    info = log.stat()
    log.write_bytes(b"".join(lines))
    os.utime(log, ns=(info.st_atime_ns, info.st_mtime_ns + 1_000_000_000))
    for args in (["reserve", "b", "t2", "--estimate", "8"], ["gate", "--pool", "P"]):
        refused = cli(*args, "--json")
        assert refused.exit_code == 6, (args, refused.stderr)
    assert cli("pools", "verify", "P").exit_code != 0


def test_variant_d_a_join_swapped_on_the_last_line_names_a_run_that_is_not_the_member(
        runs_dir: Path, cli: Any) -> None:
    """A pool whose last line is a join (its member_opened not written yet, or a pool of an
    earlier version), swapped for an unrelated run of the same id length: that run's first
    line does not name the pool, so the pool fails closed."""
    _pool_of_a_and_b(runs_dir, cli)
    assert cli("runs", "init", "u", "--cap", "100").exit_code == 0
    assert cli("reserve", "u", "t", "--estimate", "1").exit_code == 0
    log = runs_dir / "P" / "events.ndjson"
    lines = log.read_bytes().splitlines(keepends=True)
    joins = [at for at, line in enumerate(lines) if orjson.loads(line)["type"] == "run_joined"]
    lines = lines[:joins[-1] + 1]  # as if b's member_opened was never written
    lines[-1] = lines[-1].replace(b'"run":"b"', b'"run":"u"')
    log.write_bytes(b"".join(lines))
    drop_books(runs_dir, "P")
    refused = cli("reserve", "a", "x", "--estimate", "1", "--json")
    assert refused.exit_code == 6 and refused.json()["run"] == "u"
    assert "is a run of no pool" in refused.stderr
    assert cli("gate", "--pool", "P").exit_code == 6


def _init_killed_before_opened(root: Location, run_id: str) -> None:
    """``runs init RUN --pool P`` killed after the run's first line, before ``member_opened``."""
    from escalate.pools import book

    book.open_member = lambda *args, **kwargs: os._exit(9)  # type: ignore[assignment]
    Ledger.init(root, run_id, pool="P", cap="5", actor="cut")
    os._exit(0)


def test_a_join_cut_before_member_opened_is_completed_by_its_retry(store: Location, cli: Any) -> None:
    Pool.init(store, "P", cap="10", actor="tester")
    process = FORK.Process(target=_init_killed_before_opened, args=(store, "a"))
    process.start()
    process.join(RESULT_TIMEOUT_S)
    assert process.exitcode == 9
    assert [line["type"] for line in _pool_lines(store, "P")] == ["pool_opened", "run_joined"]
    assert has_run(store, "a")
    # Until then a is checked as a member of an earlier version: its first line names P and a.
    assert Pool.open(store, "P").show()["committed_micros"] == 0
    assert cli("pools", "verify", "P").exit_code == 0
    retry = cli("runs", "init", "a", "--pool", "P", "--cap", "5")
    assert retry.exit_code == 0, retry.stderr
    opened = _pool_lines(store, "P")[-1]
    first = log_bytes(store, "a").split(b"\n", 1)[0]
    from escalate.core.events import line_hash

    assert opened == {**opened, "type": "member_opened", "run": "a", "first_line": line_hash(first)}
    assert cli("runs", "init", "a", "--pool", "P", "--cap", "5").exit_code == 0
    assert [line["type"] for line in _pool_lines(store, "P")].count("member_opened") == 1  # once
    Ledger.open(store, "a", actor="tester").reserve("t", "4")
    assert cli("pools", "verify", "P").exit_code == 0
    assert Pool.open(store, "P").show()["committed_micros"] == 4_000_000


def test_a_pool_of_an_earlier_version_keeps_working_and_records_its_member_on_a_retried_init(
        store: Location, cli: Any) -> None:
    """The golden pool has no ``member_opened``: its member is checked as before (its first
    line names the pool and the run), and ``runs init`` of it again records it."""
    _load_golden_pool(store)
    assert cli("pools", "verify", "banked-pool").exit_code == 0
    assert Pool.open(store, "banked-pool").facts.opened == {}
    first = orjson.loads(log_bytes(store, "banked-run").split(b"\n", 1)[0])
    again = cli("runs", "init", "banked-run", "--pool", "banked-pool", "--cap",
                str(first["run_cap_micros"] / 1_000_000))
    assert again.exit_code == 0, again.stderr
    assert list(Pool.open(store, "banked-pool").facts.opened) == ["banked-run"]
    assert cli("pools", "verify", "banked-pool").exit_code == 0


def test_variant_c_a_copy_of_the_same_size_is_refused_by_the_writer_with_current_books(
        runs_dir: Path, cli: Any) -> None:
    """Two members whose logs have the same size, the books current for both: a write to
    ``a`` whose folder is now a copy of ``b``'s is refused by the writer itself (its first
    line names run b), not only at the next rebuild; nothing is written."""
    assert cli("pools", "init", "P", "--cap", "10").exit_code == 0
    for run_id in "ab":
        assert cli("runs", "init", run_id, "--pool", "P").exit_code == 0
        assert cli("reserve", run_id, "warm", "--estimate", "0").exit_code == 0  # the books hold its entry
    sizes = {(runs_dir / run_id / "events.ndjson").stat().st_size for run_id in "ab"}
    assert len(sizes) == 1
    shutil.rmtree(runs_dir / "a")
    shutil.copytree(runs_dir / "b", runs_dir / "a")
    before = log_bytes(runs_dir, "a")
    refused = cli("reserve", "a", "x", "--estimate", "1", "--json")
    assert refused.exit_code == 6 and refused.json()["run"] == "a", refused.stdout
    assert "not this member's" in refused.stderr and "runs init" not in refused.stderr
    assert log_bytes(runs_dir, "a") == before
