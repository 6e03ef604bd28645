"""Pools (docs/pools.md): one cap over many runs, per period; the commands, the refusals,
the periods and the corner cases of the issue."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import FakeClock, Location, snapshot_tree

from escalate import Ledger
from escalate.errors import Conflict, InputError, Pending, Refused
from escalate.pools.pool import Pool, list_pools

BERLIN_EVENING = datetime(2026, 11, 30, 20, 0, tzinfo=UTC)  # 21:00 in Berlin


@pytest.fixture
def evening() -> FakeClock:
    return FakeClock(BERLIN_EVENING)


def _pool(runs_dir: Location, clock: FakeClock, **settings: Any) -> Pool:
    options: dict[str, Any] = {"cap": "10", "period": "day", "tz": "Europe/Berlin", **settings}
    return Pool.init(runs_dir, "team", clock=clock, actor="owner", **options)


def _run(runs_dir: Location, clock: FakeClock, run_id: str, **settings: Any) -> Ledger:
    return Ledger.init(runs_dir, run_id, pool="team", clock=clock, actor="worker", **settings)


def test_the_worked_example_of_the_docs(store: Location, evening: FakeClock) -> None:
    Pool.init(store, "team-a", cap="200", period="day", tz="Europe/Berlin", max_extension="50",
              escalation="enforce", clock=evening)
    api = Ledger.init(store, "nightly-api", pool="team-a", cap="150", clock=evening, actor="ci")
    web = Ledger.init(store, "nightly-web", pool="team-a", cap="150", clock=evening, actor="ci")
    assert api.reserve("build", "120")["pool_remaining_micros"] == 80_000_000
    with pytest.raises(Pending) as first:
        web.reserve("e2e", "110")
    assert first.value.escalation_id == "esc-2"
    approved = web.approve("esc-2", by="lead")
    assert approved["pool_extension_micros"] == 30_000_000 and approved["extension_micros"] == 0
    with pytest.raises(Pending) as second:
        web.reserve("lint", "25")
    assert second.value.escalation_id == "esc-5"
    assert second.value.facts["offered"] == ["pause", "cancel"]  # $25 needed, $20 of the ceiling left
    with pytest.raises(Refused) as refused:
        web.approve("esc-5", by="lead")
    assert refused.value.code == "extension_limit"
    assert "only $20.00 of the pool's max extension is left for it" in refused.value.message
    web.pause("esc-5", by="lead")
    shown = Pool.open(store, "team-a", clock=evening).show()
    assert (shown["period"], shown["cap_micros"]) == ("2026-11-30", 230_000_000)
    assert shown["extended_micros"] == 30_000_000
    assert (shown["committed_micros"], shown["remaining_micros"]) == (230_000_000, 0)
    assert shown["period_end"] == "2026-11-30T23:00:00.000000Z"  # midnight in Berlin
    evening.advance(4 * 3600)  # a new day: $200 and a $50 ceiling again (yesterday's tasks stay there)
    assert web.reserve("lint", "25")["status"] == "reserved"


def test_a_reservation_over_the_pool_halts_with_pool_cap(runs_dir: Path, evening: FakeClock, cli: Any,
                                                         audit: Any) -> None:
    _pool(runs_dir, evening, period="none")  # the CLI's clock is the real one
    a, b = _run(runs_dir, evening, "a"), _run(runs_dir, evening, "b", cap="8")
    a.reserve("t1", "6")
    result = cli("reserve", "b", "t2", "--estimate", "5", "--json")
    assert result.exit_code == 3
    assert result.json()["error"] == "over_pool_budget"
    assert "left of pool team's $10.00 cap in all time" in result.stderr
    halt = audit(runs_dir / "b" / "events.ndjson").of_type("halt")[0]
    assert (halt["reason"], halt["remaining_micros"]) == ("pool_cap", 4_000_000)
    assert b.reserve("t3", "4")["pool_remaining_micros"] == 0  # exactly what is left fits


def test_the_pool_lock_is_taken_before_the_run_lock(runs_dir: Path, evening: FakeClock,
                                                    lock_holder: Any) -> None:
    _pool(runs_dir, evening)
    run = Ledger.init(runs_dir, "a", pool="team", clock=evening, lock_timeout=0.2)
    with lock_holder(runs_dir / "team" / "events.ndjson.lock"), pytest.raises(Exception) as waited:
        run.reserve("t", "1")
    assert getattr(waited.value, "code", "") == "lock_timeout"
    assert "team" in str(waited.value)


def test_weeks_and_months_follow_the_calendar_of_the_zone(store: Location) -> None:
    clock = FakeClock(datetime(2026, 11, 29, 23, 30, tzinfo=UTC))  # Monday 00:30 in Berlin
    week = Pool.init(store, "weekly", cap="5", period="week", tz="Europe/Berlin", clock=clock)
    shown = week.show()
    assert (shown["period"], shown["period_start"]) == ("2026-W49", "2026-11-29T23:00:00.000000Z")
    assert week.show("2026-11-29")["period"] == "2026-W48"  # Sunday: the week before
    month = Pool.init(store, "monthly", cap="5", period="month", tz="America/New_York", clock=clock)
    assert month.show()["period"] == "2026-11"  # still November 29 in New York
    assert month.show()["period_end"] == "2026-12-01T05:00:00.000000Z"
    assert month.show("2026-10")["period_start"] == "2026-10-01T04:00:00.000000Z"  # before DST ended


def test_lowering_the_cap_below_what_is_committed_refuses_new_money(store: Location,
                                                                   evening: FakeClock) -> None:
    pool = _pool(store, evening)
    run = _run(store, evening, "a")
    run.reserve("t1", "8")
    assert pool.set_policy(cap="5")["status"] == "changed"
    assert pool.show()["remaining_micros"] == -3_000_000
    with pytest.raises(Refused):
        run.reserve("t2", "0.01")
    run.release("t1", "8")  # settling is never refused
    assert Pool.open(store, "team").facts.cap_micros == 5_000_000


def _files(runs_dir: Path) -> dict[str, bytes]:
    """Every file but the checkpoints: the run checkpoints and the pool's books (SQLite's index
    of its write-ahead log changes as it is read) are derived and disposable."""
    return {name: data for name, data in snapshot_tree(runs_dir).items() if ".derived.sqlite" not in name}


def test_ids_of_pools_and_runs_never_cross(runs_dir: Path, evening: FakeClock, cli: Any) -> None:
    _pool(runs_dir, evening)
    _run(runs_dir, evening, "a")
    before = _files(runs_dir)
    for args in (["runs", "show", "team"], ["reserve", "team", "t", "--estimate", "1"],
                 ["runs", "verify", "team"], ["runs", "set", "team", "--escalation", "enforce"],
                 ["runs", "init", "team", "--cap", "5"], ["pools", "show", "a"],
                 ["pools", "set", "a", "--cap", "3"], ["pools", "init", "a", "--cap", "3"],
                 ["gate", "--pool", "a"], ["runs", "init", "b", "--pool", "a"],
                 ["runs", "init", "b", "--pool", "nobody"], ["runs", "init", "b"],
                 ["pools", "init", "p", "--cap", "5", "--tz", "Mars/Olympus"],
                 ["pools", "init", "p", "--cap", "5", "--period", "fortnight"],
                 ["pools", "show", "team", "--period", "2026-13-01"], ["pools", "set", "team"],
                 ["pools", "set", "team", "--cap", "0"], ["pools", "set", "team", "--escalation", "maybe"],
                 ["pools", "set", "team", "--max-extension", "-1"], ["pools", "init", "p", "--cap", "1e3"],
                 ["pools", "init", "../p", "--cap", "5"], ["pools", "verify", "a"],
                 ["pools", "verify", "nobody"], ["runs", "archive", "team"], ["runs", "archive", "nobody"]):
        result = cli(*args, "--json")
        assert result.exit_code == 2, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("escalate: ")
        assert "error" in result.json()
    assert _files(runs_dir) == before
    assert [row["run"] for row in cli("runs", "list", "--json").json()["runs"]] == ["a"]
    assert [row["pool"] for row in cli("pools", "list", "--json").json()["pools"]] == ["team"]


def test_a_run_never_joins_or_leaves_a_pool_after_it_is_created(store: Location, evening: FakeClock) -> None:
    _pool(store, evening)
    Ledger.init(store, "solo", cap="5", clock=evening)
    _run(store, evening, "member", cap="5")
    with pytest.raises(Conflict, match="never joins or leaves"):
        _run(store, evening, "solo", cap="5")
    with pytest.raises(Conflict, match="in pool team"):
        Ledger.init(store, "member", cap="5", clock=evening)
    assert _run(store, evening, "member", cap="5").created is False  # the same init again
    assert Pool.open(store, "team").facts.members == ["member"]


def test_an_init_cut_between_the_join_and_the_run_is_completed_by_its_retry(
        runs_dir: Path, evening: FakeClock, monkeypatch: pytest.MonkeyPatch) -> None:
    from escalate.stores.file.store import FileLedger

    _pool(runs_dir, evening)
    real_create = FileLedger.create

    def crash(self: FileLedger, *args: Any) -> bool:
        raise KeyboardInterrupt  # as a crash right after the join

    monkeypatch.setattr(FileLedger, "create", crash)
    with pytest.raises(KeyboardInterrupt):
        _run(runs_dir, evening, "a")
    monkeypatch.setattr(FileLedger, "create", real_create)
    assert Pool.open(runs_dir, "team").facts.members == ["a"]  # a harmless join: nothing to count
    assert Pool.open(runs_dir, "team", clock=evening).show()["committed_micros"] == 0
    run = _run(runs_dir, evening, "a")
    assert run.created and run.reserve("t", "10")["status"] == "reserved"
    with pytest.raises(Refused):
        _run(runs_dir, evening, "b").reserve("t", "0.01")
    assert Pool.open(runs_dir, "team").facts.members == ["a", "b"]


def test_pool_escalations_are_for_the_pools_approvers(runs_dir: Path, evening: FakeClock) -> None:
    # File store only: on PostgreSQL approver lists name database roles (test_pg_store.py).
    _pool(runs_dir, evening, escalation="enforce", approvers="pool-lead", max_extension="5")
    run = _run(runs_dir, evening, "a", cap="100", approvers="run-lead")
    with pytest.raises(Pending) as asked:
        run.reserve("big", "12")
    with pytest.raises(Refused) as refused:
        run.approve(asked.value.escalation_id, by="run-lead")
    assert refused.value.code == "not_an_approver" and "pool team" in refused.value.message
    assert run.approve(asked.value.escalation_id, by="pool-lead")["pool_extension_micros"] == 2_000_000


def test_a_run_escalation_approved_must_fit_the_pool(store: Location, evening: FakeClock) -> None:
    _pool(store, evening)
    other = _run(store, evening, "other")
    run = _run(store, evening, "a", cap="5", escalation="enforce", approval_threshold="1")
    with pytest.raises(Pending) as asked:
        run.reserve("big", "4")  # over the run's threshold: a run escalation
    other.reserve("t", "7")
    with pytest.raises(Refused) as refused:
        run.approve(asked.value.escalation_id, by="lead")  # the run has room, the pool $3 left
    assert refused.value.code == "extension_limit" and "pool team" in refused.value.message


def test_a_run_escalation_the_pool_cannot_fit_says_what_is_short(store: Location, evening: FakeClock) -> None:
    _pool(store, evening, max_extension="5")  # none of its $5 granted: still not the run's to give
    other = _run(store, evening, "other")
    run = _run(store, evening, "a", cap="5", escalation="enforce", approval_threshold="1")
    with pytest.raises(Pending) as asked:
        run.reserve("big", "4")
    other.reserve("t", "7")
    with pytest.raises(Refused) as refused:
        run.approve(asked.value.escalation_id, by="lead")  # the run's escalation, approved for the run
    message = refused.value.message
    assert refused.value.code == "extension_limit"
    assert "pool team has $3.00 left in the day 2026-11-30 and this grant needs $4.00 of it ($1.00 short)" \
        in message, message
    assert "approving the run's escalation cannot extend the pool" in message
    assert "max extension is left" not in message
    assert refused.value.facts["pool_remaining_micros"] == 3_000_000
    assert "extension_left_micros" not in refused.value.facts


def test_the_gate_for_a_pool(runs_dir: Path, evening: FakeClock, cli: Any, tmp_path: Path,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    _pool(runs_dir, evening, period="none")
    run = _run(runs_dir, evening, "a")
    run.reserve("t", "4")
    run.release("t", "3")
    assert cli("gate", "--pool", "team").exit_code == 0
    summary = tmp_path / "summary.md"
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    with pytest.raises(Refused):
        _run(runs_dir, evening, "b", cap="100").reserve("huge", "11")  # over the pool: a halt in run b
    failed = cli("gate", "--pool", "team")
    assert failed.exit_code == 3
    assert "::error title=escalate gate::pool team: run b: 1 task halted (huge: pool_cap)" in failed.stdout
    assert "## escalate gate ❌ failed: pool `team`" in summary.read_text()
    assert cli("gate").exit_code == 2 and cli("gate", "a", "--pool", "team").exit_code == 2


def test_show_json_keys_and_markdown(store: Location, evening: FakeClock, cli: Any) -> None:
    _pool(store, evening, period="none")
    _run(store, evening, "a").reserve("t", "2")
    shown = cli("pools", "show", "team", "--json").json()
    assert {"pool", "period", "period_start", "period_end", "cap_micros", "extended_micros", "spent_micros",
            "reserved_micros", "committed_micros", "remaining_micros", "runs"} <= set(shown)
    assert shown["runs"] == [{"run": "a", "committed_micros": 2_000_000}]
    markdown = cli("pools", "show", "team", "--format", "markdown").stdout
    assert markdown.startswith("## escalate pool `team`") and "| `a` | $2.00 |" in markdown
    table = cli("pools", "show", "team").stdout
    assert "no period" in table and "a: committed $2.00" in table


def test_pool_lines_validate_against_the_schema(runs_dir: Path, evening: FakeClock) -> None:
    from escalate.core.schema import validate_event

    _pool(runs_dir, evening, escalation="enforce", max_extension="3")
    run = _run(runs_dir, evening, "a", cap="100")
    with pytest.raises(Pending) as asked:
        run.reserve("t", "12")
    run.approve(asked.value.escalation_id, by="lead")
    Pool.open(runs_dir, "team", actor="owner").set_policy(cap="20")
    kinds = set()
    for ledger in ("team", "a"):
        for line in (runs_dir / ledger / "events.ndjson").read_bytes().splitlines():
            event = orjson.loads(line)
            validate_event(event)
            kinds.add(event["type"])
    assert {"pool_opened", "run_joined", "policy_changed", "escalation", "escalation_resolved"} <= kinds
    assert list_pools(runs_dir)[0]["cap_micros"] == 20_000_000


def test_a_bad_zone_or_period_is_an_input_error_in_the_library(runs_dir: Path) -> None:
    with pytest.raises(InputError):
        Pool.init(runs_dir, "p", cap="1", tz="Not/AZone")
    with pytest.raises(InputError):
        Pool.init(runs_dir, "p", cap="1", period="hourly")
    assert not runs_dir.exists() or not any(runs_dir.iterdir())


def test_shadow_pools_record_what_would_have_asked_a_person(runs_dir: Path, evening: FakeClock,
                                                            audit: Any) -> None:
    _pool(runs_dir, evening, escalation="shadow", approval_threshold="3")
    run = _run(runs_dir, evening, "a", cap="100")
    assert run.reserve("medium", "4")["shadow_escalation_id"] == "esc-2"  # over the threshold: recorded
    with pytest.raises(Refused) as refused:
        run.reserve("big", "7")  # over the pool: recorded, then halted
    assert refused.value.code == "over_pool_budget" and "shadow_escalation_id" in refused.value.facts
    escalations = audit(runs_dir / "a" / "events.ndjson").of_type("escalation")
    assert [(e["reason"], e["shadow"], e["pool"]) for e in escalations] == [("pool_cap", True, "team")] * 2
    assert escalations[1]["needed_extension_micros"] == 1_000_000
