"""Pools as a new user meets them on the command line (docs/pools.md): which periods
``pools show --period`` takes, which zones a pool may follow, where a run's pool shows, the
pool gate's own keys, and the messages that name what changed."""

from __future__ import annotations

import os
import re
import zoneinfo
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from conftest import FakeClock, Location, snapshot_tree
from typer.testing import CliRunner

from escalate import Ledger
from escalate.cli import app
from escalate.core.periods import zone
from escalate.errors import InputError, Pending, Refused
from escalate.pools.pool import Pool

NOON = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)  # a Monday, in ISO week 2026-W49


def _one_line_error(result: Any, code: str) -> None:
    assert result.exit_code == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("escalate: ")
    assert result.json()["error"] == code


@pytest.mark.parametrize("period", ["0001-01-01", "9999-12-31", "0001-W01", "9999-12"])
def test_a_period_at_the_ends_of_the_calendar_is_invalid_not_a_crash(runs_dir: Path, cli: Any,
                                                                     period: str) -> None:
    Pool.init(runs_dir, "days", cap="5", period="day", tz="Pacific/Kiritimati")
    Pool.init(runs_dir, "months", cap="5", period="month", tz="America/Adak")
    for pool in ("days", "months"):
        _one_line_error(cli("pools", "show", pool, "--period", period, "--json"), "invalid_period")


@pytest.mark.parametrize(("kind", "given", "key"), [
    ("day", "2026-11-29", "2026-11-29"), ("week", "2026-11-29", "2026-W48"), ("week", "2026-W48", "2026-W48"),
    ("month", "2026-10-31", "2026-10"), ("month", "2026-10", "2026-10"), ("none", "2026-11-29", "all")])
def test_a_period_is_a_date_or_the_pools_own_key(runs_dir: Path, kind: str, given: str, key: str) -> None:
    pool = Pool.init(runs_dir, "p", cap="5", period=kind, clock=FakeClock(NOON))
    assert pool.show(given)["period"] == key


@pytest.mark.parametrize(("kind", "given"), [
    ("day", "2026-W48"), ("day", "2026-11"), ("day", "2026-1-5"), ("day", "20261129"), ("day", "2026-11-29 "),
    ("week", "2026-11"), ("week", "2025-W53"), ("month", "2026-W48"), ("month", "2026-13"),
    ("none", "2026-02-30"), ("none", "2026-W48"), ("day", "2026-02-30")])
def test_any_other_form_of_period_is_refused_naming_the_forms(runs_dir: Path, kind: str, given: str) -> None:
    pool = Pool.init(runs_dir, "p", cap="5", period=kind, clock=FakeClock(NOON))
    with pytest.raises(InputError) as refused:
        pool.show(given)
    assert refused.value.code == "invalid_period"
    assert "give a date such as 2026-11-30" in refused.value.message
    assert ("a week such as" in refused.value.message) == (kind == "week")
    assert ("a month such as" in refused.value.message) == (kind == "month")


@pytest.mark.parametrize(("kind", "given"), [("day", "2026-12-01"), ("week", "2026-W50"),
                                             ("week", "2026-12-07"), ("month", "2026-12")])
def test_a_period_not_yet_begun_is_refused(runs_dir: Path, kind: str, given: str) -> None:
    pool = Pool.init(runs_dir, "p", cap="5", period=kind, clock=FakeClock(NOON))
    with pytest.raises(InputError, match="has not begun") as refused:
        pool.show(given)
    assert refused.value.code == "invalid_period"


def test_a_zone_that_follows_the_machine_is_refused(runs_dir: Path, cli: Any) -> None:
    before = snapshot_tree(runs_dir) if runs_dir.exists() else {}
    _one_line_error(cli("pools", "init", "p", "--cap", "5", "--period", "day", "--tz", "localtime", "--json"),
                    "invalid_zone")
    assert (snapshot_tree(runs_dir) if runs_dir.exists() else {}) == before
    assert cli("pools", "init", "p", "--cap", "5", "--period", "day", "--tz", "Etc/UTC").exit_code == 0


@pytest.mark.parametrize("name", ["right/Europe/Berlin", "posix/Europe/Berlin", "posixrules", "Factory",
                                  "europe/berlin", "Europe/Berlin/", "./UTC", "/usr/share/zoneinfo/UTC"])
def test_only_iana_zone_names_are_taken(runs_dir: Path, cli: Any, name: str) -> None:
    before = snapshot_tree(runs_dir) if runs_dir.exists() else {}
    _one_line_error(cli("pools", "init", "p", "--cap", "5", "--period", "day", "--tz", name, "--json"),
                    "invalid_zone")
    assert (snapshot_tree(runs_dir) if runs_dir.exists() else {}) == before


@pytest.mark.parametrize("name", ["UTC", "Etc/UTC", "Etc/GMT+5", "EST5EDT", "US/Eastern", "Europe/Berlin"])
def test_iana_names_and_their_links_are_taken(store: Location, name: str) -> None:
    assert Pool.init(store, "p", cap="5", period="day", tz=name).facts.tz == name


def test_a_pool_opened_with_a_zone_now_refused_replays_as_written(store: Location,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # Written by a version that took right/ zones: its periods stay the ones it has counted in.
    with monkeypatch.context() as old_version:
        old_version.setattr("escalate.pools.pool.check_new_zone", zone)
        Pool.init(store, "p", cap="5", period="day", tz="right/Europe/Berlin", clock=FakeClock(NOON))
    pool = Pool.open(store, "p", clock=FakeClock(NOON))
    assert pool.facts.tz == "right/Europe/Berlin"
    shown = pool.show()
    assert (shown["period"], shown["period_start"]) == ("2026-11-30", "2026-11-29T22:00:00.000000Z")
    Ledger.init(store, "member", pool="p", cap="5", clock=FakeClock(NOON)).reserve("t", "2")
    assert pool.show()["reserved_micros"] == 2_000_000
    with pytest.raises(InputError) as refused:
        Pool.init(store, "q", cap="5", period="day", tz="right/Europe/Berlin")
    assert refused.value.code == "invalid_zone"


def test_a_zone_name_linked_to_etc_localtime_is_refused(tmp_path: Path, runs_dir: Path) -> None:
    # A zone folder where one more name is a link to the machine's zone, as localtime is.
    folder = tmp_path / "zones"
    (folder / "Europe").mkdir(parents=True)
    system = next(Path(root) for root in zoneinfo.TZPATH if (Path(root) / "Europe" / "Berlin").exists())
    (folder / "Europe" / "Berlin").write_bytes((system / "Europe" / "Berlin").read_bytes())
    os.symlink(system / "Europe" / "Berlin", tmp_path / "machine-zone")  # stands for /etc/localtime
    os.symlink(tmp_path / "machine-zone", folder / "Here")
    os.symlink("Europe/Berlin", folder / "Germany")  # a link inside the folder is a fixed zone
    zoneinfo.reset_tzpath([str(folder)])
    try:
        with pytest.raises(InputError, match="each machine") as refused:
            Pool.init(runs_dir, "p", cap="5", period="day", tz="Here")
        assert refused.value.code == "invalid_zone"
        assert Pool.init(runs_dir, "p", cap="5", period="day", tz="Germany").facts.tz == "Germany"
    finally:
        zoneinfo.reset_tzpath()


def test_runs_show_and_list_name_the_pool_and_what_it_has_left(runs_dir: Path, cli: Any) -> None:
    Pool.init(runs_dir, "team", cap="10")
    Ledger.init(runs_dir, "member", pool="team", cap="100").reserve("t", "6")
    Ledger.init(runs_dir, "other", pool="team", cap="100")
    Ledger.init(runs_dir, "solo", cap="7")
    shown = cli("runs", "show", "other", "--json").json()
    assert (shown["pool"], shown["pool_remaining_micros"], shown["remaining_micros"]) == (
        "team", 4_000_000, 100_000_000)
    alone = cli("runs", "show", "solo", "--json").json()
    assert (alone["pool"], alone["pool_remaining_micros"]) == (None, None)
    table = cli("runs", "show", "other").stdout
    assert "pool remaining" in table and "$4.00" in table and "team" in table
    assert "pool" not in cli("runs", "show", "solo").stdout
    assert "| left in pool `team` | $4.00 |" in cli("runs", "show", "other", "-f", "markdown").stdout
    listed = {row["run"]: row["pool"] for row in cli("runs", "list", "--json").json()["runs"]}
    assert listed == {"member": "team", "other": "team", "solo": None}
    header = next(line for line in cli("runs", "list").stdout.splitlines() if line.startswith("run "))
    assert header.split()[:2] == ["run", "pool"]


def test_the_inbox_names_the_reason_and_the_pool_of_an_escalation(runs_dir: Path, cli: Any) -> None:
    Pool.init(runs_dir, "team", cap="5", escalation="enforce")
    run = Ledger.init(runs_dir, "a", pool="team", cap="100", escalation="enforce", approval_threshold="2")
    assert cli("reserve", "a", "big", "--estimate", "6", "--reason", "the e2e suite").exit_code == 4
    assert cli("reserve", "a", "huge", "--estimate", "3").exit_code == 4  # the run's own threshold only
    rows = {row["task"]: row for row in cli("escalations", "--json").json()["escalations"]}
    assert (rows["big"]["reason"], rows["big"]["pool"]) == ("pool_cap", "team")
    assert (rows["huge"]["reason"], rows["huge"]["pool"]) == ("threshold", None)
    wide = CliRunner().invoke(app, ["escalations", "--wide"], env={"COLUMNS": "250"}).stdout
    assert "pool_cap of pool team: the e2e suite" in wide and "│ threshold" in wide
    assert run.state().open_escalations


def test_the_pool_gate_has_keys_of_its_own_and_names_its_period(runs_dir: Path, cli: Any, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    Pool.init(runs_dir, "team", cap="10", period="day", tz="Europe/Berlin")
    Ledger.init(runs_dir, "a", pool="team", cap="100").reserve("t", "4")
    passed = cli("gate", "--pool", "team", "--json").json()
    day = Pool.open(runs_dir, "team").show()["period"]
    assert {"run", "run_cap_micros", "task_cap_micros", "events", "halts"}.isdisjoint(passed)
    assert {key: passed[key] for key in ("pool", "period", "cap_micros", "committed_micros", "passed")} == {
        "pool": "team", "period": day, "cap_micros": 10_000_000, "committed_micros": 4_000_000,
        "passed": True}
    assert passed["period_start"] < passed["period_end"]
    assert f"gate passed for pool team (day {day})" in cli("gate", "--pool", "team").stdout
    summary = tmp_path / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    with pytest.raises(Refused):
        Ledger.init(runs_dir, "b", pool="team", cap="5").reserve("big", "6")  # over b's own cap: a halt
    failed = cli("gate", "--pool", "team", "--json")
    assert failed.exit_code == 3 and failed.json()["pool"] == "team" and "run" not in failed.json()
    assert failed.stderr.strip().endswith("see 'escalate runs show b'")
    assert f"pool team (day {day})" in failed.stderr
    assert f"the current day {day}" in summary.read_text()


def test_the_pool_gate_over_its_cap_points_at_pools_show(runs_dir: Path, cli: Any) -> None:
    Pool.init(runs_dir, "team", cap="10")
    Ledger.init(runs_dir, "a", pool="team", cap="100").reserve("t", "4")
    failed = cli("gate", "--pool", "team", "--max-spent", "3")
    assert failed.exit_code == 3 and failed.stderr.strip().endswith("see 'escalate pools show team'")


def test_pools_init_conflicts_in_dollars_and_pools_set_names_what_changed(runs_dir: Path, cli: Any) -> None:
    Pool.init(runs_dir, "team", cap="10", approval_threshold="4", escalation="enforce")
    conflict = cli("pools", "init", "team", "--cap", "12")
    assert conflict.exit_code == 5 and "cap $10.00" in conflict.stderr and "micros" not in conflict.stderr
    changed = cli("pools", "set", "team", "--cap", "15", "--no-approval-threshold")
    assert changed.exit_code == 0, changed.stderr
    assert changed.stdout.strip() == "pool team: cap $10.00 → $15.00, approval threshold $4.00 → none"
    assert Pool.open(runs_dir, "team").state().policy.approval_threshold_micros is None
    assert "unchanged" in cli("pools", "set", "team", "--cap", "15").stdout
    _one_line_error(cli("pools", "set", "team", "--approval-threshold", "2", "--no-approval-threshold",
                        "--json"), "usage")


def test_a_pool_escalation_says_which_limit_fired(runs_dir: Path) -> None:
    Pool.init(runs_dir, "team", cap="10", escalation="enforce", approval_threshold="3")
    run = Ledger.init(runs_dir, "a", pool="team", cap="100")
    with pytest.raises(Pending, match=r"over the pool's approval threshold\)"):
        run.reserve("t", "4")
    with pytest.raises(Pending, match=r"over the pool's remaining budget: \$10.00 left\)"):
        run.reserve("u", "11")


def test_a_run_cap_above_the_pools_cap_warns(runs_dir: Path, cli: Any) -> None:
    Pool.init(runs_dir, "team", cap="200")
    over = cli("runs", "init", "r1", "--pool", "team", "--cap", "500")
    assert over.exit_code == 0
    assert "warning: run r1's cap $500.00 is above pool team's cap $200.00" in over.stderr
    assert cli("runs", "init", "r2", "--pool", "team", "--cap", "50").stderr == ""
    assert cli("runs", "init", "r3", "--pool", "team").stderr == ""


def test_only_a_pools_approvers_may_change_it(runs_dir: Path, cli: Any) -> None:
    Pool.init(runs_dir, "team", cap="10", approvers="lead")
    log = runs_dir / "team" / "events.ndjson"
    before = log.read_bytes()
    refused = cli("pools", "set", "team", "--cap", "20", "--by", "intern", "--json")
    assert refused.exit_code == 3 and refused.json()["error"] == "not_an_approver"
    assert log.read_bytes() == before
    assert cli("pools", "set", "team", "--cap", "20", "--by", "lead").exit_code == 0


def test_runs_list_with_a_pool_column_still_fits_80_columns(runs_dir: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    Pool.init(runs_dir, "team-a", cap="200", actor="tester")
    Ledger.init(runs_dir, "nightly-api", pool="team-a", cap="150", actor="tester").reserve("t", "5")
    Ledger.init(runs_dir, "plain", cap="10", actor="tester")
    shown = CliRunner().invoke(app, ["runs", "list"], env={"COLUMNS": "80"}).stdout.splitlines()
    assert max(len(line) for line in shown) <= 80
    rows = [line for line in shown if line.startswith(("nightly-api", "plain"))]
    assert len(rows) == 2 and len(shown) == 2 + 3  # title, header, rule: no wrapped cell
    assert "team-a" in rows[0] + rows[1]


def test_a_non_approvers_pools_set_is_refused_even_when_it_changes_nothing(store: Location, cli: Any) -> None:
    Pool.init(store, "team", cap="10", approvers="lead", actor="tester")
    events = Pool.open(store, "team").state().seq
    changing = cli("pools", "set", "team", "--cap", "20", "--by", "intern")
    assert changing.exit_code == 3
    # The one refused is --by on a runs folder, the database role on PostgreSQL.
    assert re.fullmatch(r"escalate: cannot change pool team: \w+ is not one of its approvers \(lead\); "
                        r"ask one of them to run 'escalate pools set'\n", changing.stderr)
    same = cli("pools", "set", "team", "--cap", "10", "--approvers", "lead", "--by", "intern")
    assert (same.exit_code, same.stderr) == (3, changing.stderr)  # as a real change would be
    assert Pool.open(store, "team").state().seq == events  # neither wrote a line
