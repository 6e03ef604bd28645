"""A pool's policy binds its members (docs/pools.md): a member's own settings may add checks,
never remove or loosen its pool's, and what the pool's check fires on only the pool's
approvers may grant. On both stores: on PostgreSQL an approver list names database roles,
so each person below acts as a role of their own there."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from conftest import FakeClock, Location, log_bytes
from psycopg import sql

from escalate import Ledger
from escalate.errors import Conflict, Pending, Refused
from escalate.pools import Pool

LEAD, BUDDY, WORKER, FRIEND = "pool_lead", "run_buddy", "worker", "worker_friend"
Person = Callable[[str], Location]


@pytest.fixture
def person(store: Location) -> Iterator[Person]:
    """Where a named person acts from: the same runs folder (the name is what they claim),
    or the same database as a role of that name (the role is what approver lists check)."""
    if isinstance(store, Path):
        yield lambda name: store
        return
    made: list[str] = []

    def as_role(name: str) -> str:
        if name not in made:
            with psycopg.connect(store, autocommit=True) as owner:
                row = owner.execute("SELECT current_user").fetchone()
                assert row is not None
                role = sql.Identifier(name)
                owner.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(role))
                # A member of the store's owner: the same tables, a name of its own.
                owner.execute(sql.SQL("CREATE ROLE {} LOGIN IN ROLE {}").format(role,
                                                                                sql.Identifier(str(row[0]))))
            made.append(name)
        parts = urlsplit(store)
        return urlunsplit(parts._replace(netloc=f"{name}@{parts.netloc.rpartition('@')[2]}"))

    yield as_role
    with psycopg.connect(store, autocommit=True) as owner:
        for name in made:
            owner.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))


def _team(store: Location, **settings: Any) -> Pool:
    """Pool ``team``: $1,000, enforce, a $10 approval threshold, decided by the lead."""
    return Pool.init(store, "team", cap="1000", **{"escalation": "enforce", "approval_threshold": "10",
                                                   "approvers": LEAD, "actor": "admin", **settings})


def _as(person: Person, name: str, run_id: str) -> Ledger:
    return Ledger.open(person(name), run_id, actor=name)


def _pool_log(store: Location) -> bytes:
    with Pool.open(store, "team").store.reader() as stream:
        return stream.read()


def _refused(code: str, action: Callable[[], object]) -> Refused:
    with pytest.raises(Refused) as refused:
        action()
    assert refused.value.code == code, refused.value.message
    return refused.value


def test_a_members_own_shadow_mode_does_not_silence_its_pools_enforce(store: Location, person: Person,
                                                                      cli: Any) -> None:
    _team(store)
    Ledger.init(store, "r1", pool="team", actor="admin")
    # Anyone may change the run's own policy (it names no approvers): it loosens nothing of the pool's.
    loosened = cli("runs", "set", "r1", "--escalation", "shadow", "--approval-threshold", "0.01",
                   "--by", WORKER)
    assert loosened.exit_code == 0, loosened.stderr
    asked = cli("reserve", "r1", "t1", "--estimate", "500", "--by", WORKER, "--json")
    assert asked.exit_code == 4, asked.stdout
    state = Ledger.open(store, "r1").state()
    assert state.reserved_micros == 0
    [escalation] = state.escalations.values()
    assert (escalation.reason, escalation.shadow) == ("pool_cap", False)  # no shadow record took its place
    assert cli("gate", "--pool", "team").exit_code == 3  # nothing committed the pool did not approve
    assert (asked.json()["pool"], asked.json()["approvers"]) == ("team", [LEAD])
    assert ("run r1: escalation off → shadow, approval threshold none → $0.01; pool team's escalation "
            f"binds it too, whatever its own: enforce, threshold $10.00, approvers {LEAD}") in loosened.stdout
    # The worker names a friend as the run's approver: still no one but the pool's may grant.
    _as(person, WORKER, "r1").set_policy(approvers=FRIEND)
    before = log_bytes(store, "r1")
    _refused("not_an_approver", lambda: _as(person, FRIEND, "r1").approve(escalation.id, by=FRIEND))
    assert log_bytes(store, "r1") == before
    assert _as(person, LEAD, "r1").approve(escalation.id, by=LEAD)["status"] == "approved"
    assert Ledger.open(store, "r1").state().reserved_micros == 500_000_000
    assert cli("gate", "--pool", "team").exit_code == 0


def test_what_the_pools_check_fires_on_only_the_pools_approvers_resolve(store: Location, person: Person,
                                                                         cli: Any) -> None:
    _team(store)
    Ledger.init(store, "r2", pool="team", escalation="enforce", approval_threshold="1", approvers=BUDDY,
                actor="admin")
    worker = _as(person, WORKER, "r2")
    with pytest.raises(Pending) as asked:
        worker.reserve("t2", "400")  # over the run's own $1 and the pool's $10: the pool's
    esc = asked.value.escalation_id
    assert worker.state().escalations[esc].reason == "pool_cap"
    assert (asked.value.pool, asked.value.approvers) == ("team", [LEAD])
    assert f"ask an approver of pool team ({LEAD})" in asked.value.message
    before = log_bytes(store, "r2")
    buddy = _as(person, BUDDY, "r2")
    for resolve in (buddy.approve, buddy.pause, buddy.cancel):
        refused = _refused("not_an_approver", lambda: resolve(esc, by=BUDDY))  # noqa: B023 (called at once)
        assert f"not an approver of pool team (approvers: {LEAD})" in refused.message
    assert log_bytes(store, "r2") == before
    assert worker.state().reserved_micros == 0
    assert cli("gate", "--pool", "team").exit_code == 3
    # The run's own, stricter check still holds, and is its own approvers' alone.
    with pytest.raises(Pending) as small:
        worker.reserve("t3", "5")
    assert worker.state().escalations[small.value.escalation_id].reason == "threshold"
    _refused("not_an_approver", lambda: _as(person, LEAD, "r2").approve(small.value.escalation_id, by=LEAD))
    assert buddy.approve(small.value.escalation_id, by=BUDDY)["status"] == "approved"
    assert _as(person, LEAD, "r2").approve(esc, by=LEAD)["status"] == "approved"
    assert worker.state().reserved_micros == 405_000_000


def test_a_grant_over_the_pools_threshold_set_since_is_the_pools_approvers(store: Location,
                                                                           person: Person) -> None:
    """An escalation the run's own check opened, which the pool's threshold covers by the
    time it is granted (as one opened by an earlier version of escalate may): the pool's
    approvers grant it, the run's may not."""
    _team(store, approval_threshold=None)
    Ledger.init(store, "r3", pool="team", escalation="enforce", approval_threshold="1", approvers=BUDDY,
                actor="admin")
    with pytest.raises(Pending) as asked:
        _as(person, WORKER, "r3").reserve("t", "400")
    esc = asked.value.escalation_id
    assert Ledger.open(store, "r3").state().escalations[esc].reason == "threshold"
    Pool.open(person(LEAD), "team", actor=LEAD).set_policy(approval_threshold="10")
    before = log_bytes(store, "r3")
    refused = _refused("not_an_approver", lambda: _as(person, BUDDY, "r3").approve(esc, by=BUDDY))
    assert "over pool team's approval threshold $10.00" in refused.message
    assert log_bytes(store, "r3") == before
    assert _as(person, LEAD, "r3").approve(esc, by=LEAD)["status"] == "approved"


def test_a_pool_naming_no_approvers_does_not_lift_its_members_own(store: Location, person: Person) -> None:
    _team(store, approvers=())
    Ledger.init(store, "r4", pool="team", escalation="enforce", approvers=BUDDY, actor="admin")
    with pytest.raises(Pending) as asked:
        _as(person, WORKER, "r4").reserve("t", "400")  # the pool's threshold fired
    esc, before = asked.value.escalation_id, log_bytes(store, "r4")
    _refused("not_an_approver", lambda: _as(person, FRIEND, "r4").approve(esc, by=FRIEND))
    assert log_bytes(store, "r4") == before
    assert (asked.value.pool, asked.value.approvers) == ("team", [BUDDY])
    assert _as(person, BUDDY, "r4").approve(esc, by=BUDDY)["status"] == "approved"


def test_over_its_own_cap_and_the_pools_threshold_a_request_is_the_pools_and_not_extendable(
        store: Location) -> None:
    """Approving a pool's escalation never extends the run: a request over both cannot be
    granted by anyone, only paused or cancelled (and asked again for less)."""
    _team(store)
    run = Ledger.init(store, "r5", pool="team", cap="15", escalation="enforce", max_extension="500",
                      actor="admin")
    run.reserve("a", "10")
    with pytest.raises(Pending) as asked:
        run.reserve("t", "12")
    escalation = run.state().escalations[asked.value.escalation_id]
    assert (escalation.reason, escalation.offered) == ("pool_cap", ["pause", "cancel"])
    assert "over run r5's own cap" in asked.value.message


def test_a_member_shows_the_pool_policy_that_binds_it(store: Location, cli: Any) -> None:
    _team(store)
    Ledger.init(store, "r1", pool="team", actor="admin")
    Ledger.init(store, "solo", cap="5", actor="admin")
    binding = f"enforce, threshold $10.00, approvers {LEAD}"
    reserved = cli("reserve", "r1", "t1", "--estimate", "5")
    assert reserved.exit_code == 0, reserved.stderr
    assert f"(remaining $995.00; pool team: $995.00 left, escalation {binding})" in reserved.stdout
    answer = cli("reserve", "r1", "t2", "--estimate", "1", "--json").json()
    assert (answer["pool"], answer["pool_escalation"]["mode"], answer["pool_escalation"]["approvers"]) == (
        "team", "enforce", [LEAD])
    shown = cli("runs", "show", "r1").stdout
    own = [line.split() for line in shown.splitlines() if line.startswith("escalation ")]
    assert own == [["escalation", "off"]]
    assert f"pool escalation  {binding} (binds this run too)" in shown
    as_json = cli("runs", "show", "r1", "--json").json()
    assert (as_json["escalation"]["mode"], as_json["pool_escalation"]["mode"]) == ("off", "enforce")
    assert as_json["pool_escalation"]["approval_threshold_micros"] == 10_000_000
    assert cli("runs", "show", "solo", "--json").json()["pool_escalation"] is None
    assert "pool escalation" not in cli("runs", "show", "solo").stdout


def test_lowering_a_pools_max_extension_below_this_periods_grants_is_refused(store: Location,
                                                                             cli: Any) -> None:
    Pool.init(store, "team", cap="10", max_extension="5", escalation="enforce", actor="admin")
    run = Ledger.init(store, "r1", pool="team", cap="100", actor="admin")
    run.reserve("a", "8")
    with pytest.raises(Pending) as asked:
        run.reserve("b", "5")
    Ledger.open(store, "r1", actor="lead").approve(asked.value.escalation_id)  # +$3 for the pool
    before = _pool_log(store)
    lowered = cli("pools", "set", "team", "--max-extension", "2", "--json")
    assert lowered.exit_code == 5, lowered.stdout
    assert lowered.json()["error"] == "conflict"
    assert "max extension $2.00 is below the $3.00 already granted" in lowered.json()["message"]
    assert _pool_log(store) == before
    assert Pool.open(store, "team").state().policy.max_extension_micros == 5_000_000
    assert cli("pools", "set", "team", "--max-extension", "3").exit_code == 0  # exactly what was granted


def test_a_pools_max_extension_counts_what_its_current_period_granted(store: Location) -> None:
    clock = FakeClock(datetime(2026, 11, 30, 12, 0, tzinfo=UTC))
    Pool.init(store, "team", cap="10", period="day", max_extension="5", escalation="enforce", actor="admin",
              clock=clock)
    run = Ledger.init(store, "r1", pool="team", cap="100", actor="admin", clock=clock)
    run.reserve("a", "8")
    with pytest.raises(Pending) as asked:
        run.reserve("b", "5")
    Ledger.open(store, "r1", actor="lead", clock=clock).approve(asked.value.escalation_id)
    with pytest.raises(Conflict, match=r"below the \$3\.00 already granted in the day 2026-11-30"):
        Pool.open(store, "team", clock=clock).set_policy(max_extension="2.99")
    clock.advance(24 * 3600)  # a new day has granted nothing yet
    assert Pool.open(store, "team", clock=clock).set_policy(max_extension="1")["status"] == "changed"
