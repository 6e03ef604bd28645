"""Escalation rules through the library: the fire rule and offered modes as a decision table,
de-dup, first resolution wins, pause/cancel, increases, and timeouts on an injected clock."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from escalate import Conflict, EscalateError, InputError, Ledger, Pending, Refused
from tests.conftest import FakeClock, Location, has_run, log_bytes, snapshot_store

USD = 1_000_000


def events(store: Location, run: str = "r") -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in log_bytes(store, run).splitlines()]


def ledger_files(store: Location) -> dict[str, bytes]:
    """The logs and their side files: what "nothing appended" is about (a checkpoint may change)."""
    return {name: data for name, data in snapshot_store(store).items()
            if not isinstance(store, Path) or name.endswith("/events.ndjson")
            or "/events.ndjson.torn-" in name}


def make_run(store: Location, clock: FakeClock, **policy: Any) -> Ledger:
    settings: dict[str, Any] = {"cap": "10", "task_cap": "8", "escalation": "enforce",
                                "escalation_timeout_s": 1800}
    settings.update(policy)
    return Ledger.init(store, "r", clock=clock, **settings)


def outcome(call: Callable[[], dict[str, Any]]) -> tuple[int, dict[str, Any]]:
    """(exit code, result or error facts) of a library call."""
    try:
        return 0, call()
    except EscalateError as error:
        return error.exit_code, {"error": error.code, "message": error.message, **error.facts}


# --------------------------------------------------------------------------- the decision table


@dataclass(frozen=True)
class Case:
    """A run (cap $10, task cap $8) with ``policy``, ``setup`` applied, then one request."""

    policy: dict[str, Any]
    setup: tuple[tuple[str, ...], ...]  # ("reserve", task, usd) | ("approve", escalation id)
    request: tuple[str, str, str]  # ("reserve" | "increase", task, usd)
    exit_code: int
    appended: tuple[str, ...]  # event types the request appends
    escalation: dict[str, Any] = field(default_factory=dict)  # expected fields of its escalation


CASES = {
    # off: refusals halt; a threshold means nothing.
    "off under remaining": Case({"escalation": "off"}, (), ("reserve", "t", "5"), 0, ("budget_reserved",)),
    "off ignores threshold": Case({"escalation": "off", "approval_threshold": "2"}, (),
                                  ("reserve", "t", "5"), 0, ("budget_reserved",)),
    "off over remaining halts": Case({"escalation": "off"}, (("reserve", "f", "6"),),
                                     ("reserve", "t", "5"), 3, ("halt",)),
    "off over task cap halts": Case({"escalation": "off"}, (), ("reserve", "t", "8.000001"), 3, ("halt",)),
    # enforce: amount > min(remaining, threshold) escalates.
    "at threshold passes": Case({"approval_threshold": "2"}, (), ("reserve", "t", "2"), 0,
                                ("budget_reserved",)),
    "one micro over threshold": Case(
        {"approval_threshold": "2"}, (), ("reserve", "t", "2.000001"), 4, ("escalation",),
        {"reason": "threshold", "offered": ["extend", "pause", "cancel"], "needed_extension_micros": 0,
         "remaining_micros": 10 * USD, "requested_micros": 2_000_001}),
    "threshold offers extend with no max extension": Case(
        {"approval_threshold": "2", "max_extension": "0"}, (), ("reserve", "t", "3"), 4, ("escalation",),
        {"reason": "threshold", "offered": ["extend", "pause", "cancel"]}),
    "exactly remaining fits": Case({}, (("reserve", "f", "6"),), ("reserve", "t", "4"), 0,
                                   ("budget_reserved",)),
    "over remaining, extension fits": Case(
        {"max_extension": "2"}, (("reserve", "f", "6"),), ("reserve", "t", "5"), 4, ("escalation",),
        {"reason": "run_cap", "offered": ["extend", "pause", "cancel"], "needed_extension_micros": USD,
         "remaining_micros": 4 * USD}),
    "over remaining, no extension allowed": Case(
        {"max_extension": "0"}, (("reserve", "f", "6"),), ("reserve", "t", "5"), 4, ("escalation",),
        {"reason": "run_cap", "offered": ["pause", "cancel"], "needed_extension_micros": USD}),
    "over remaining, extension ceiling reached": Case(
        {"max_extension": "2"},
        (("reserve", "f", "7"), ("reserve", "x", "5"), ("approve", "esc-3")),  # grants the whole $2
        ("reserve", "t", "0.5"), 4, ("escalation",),
        {"reason": "run_cap", "offered": ["pause", "cancel"], "remaining_micros": 0}),
    "over both: the cap is the reason": Case(
        {"approval_threshold": "3", "max_extension": "5"}, (("reserve", "f", "3"), ("reserve", "g", "3")),
        ("reserve", "t", "5"), 4, ("escalation",), {"reason": "run_cap"}),
    "over the task cap halts even in enforce": Case(
        {"approval_threshold": "1", "max_extension": "5"}, (), ("reserve", "t", "9"), 3, ("halt",)),
    # increase: the delta against remaining, the new absolute amount against the threshold.
    "increase over threshold by its new amount": Case(
        {"approval_threshold": "5"}, (("reserve", "t", "4"),), ("increase", "t", "6"), 4, ("escalation",),
        {"reason": "threshold", "kind": "increase", "from_micros": 4 * USD, "requested_micros": 6 * USD}),
    "increase whose delta fits exactly": Case(
        {}, (("reserve", "f", "5"), ("reserve", "t", "4")), ("increase", "t", "5"), 0,
        ("budget_increased",)),
    "increase whose delta is over remaining": Case(
        {"max_extension": "1"}, (("reserve", "f", "5"), ("reserve", "t", "4")), ("increase", "t", "5.5"), 4,
        ("escalation",),
        {"reason": "run_cap", "kind": "increase", "needed_extension_micros": 500_000,
         "remaining_micros": USD, "offered": ["extend", "pause", "cancel"]}),
    "increase over the task cap halts": Case(
        {"approval_threshold": "1"}, (("reserve", "t", "1"),), ("increase", "t", "8.5"), 3, ("halt",)),
    # shadow: behaves as off, records would-fire.
    "shadow records a threshold fire and reserves": Case(
        {"escalation": "shadow", "approval_threshold": "2"}, (), ("reserve", "t", "3"), 0,
        ("escalation", "budget_reserved"), {"shadow": True, "reason": "threshold", "expires_at": None}),
    "shadow records an over-remaining fire and halts": Case(
        {"escalation": "shadow"}, (("reserve", "f", "6"),), ("reserve", "t", "5"), 3,
        ("escalation", "halt"), {"shadow": True, "reason": "run_cap"}),
    "shadow under both records nothing": Case(
        {"escalation": "shadow", "approval_threshold": "5"}, (), ("reserve", "t", "5"), 0,
        ("budget_reserved",)),
    "shadow over the task cap only halts": Case(
        {"escalation": "shadow", "approval_threshold": "1"}, (), ("reserve", "t", "9"), 3, ("halt",)),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_fire_rule_and_offered_modes(store: Location, clock: FakeClock, case: Case) -> None:
    run = make_run(store, clock, **case.policy)
    for step in case.setup:
        if step[0] == "approve":
            run.approve(step[1], by="setup")
            continue
        exit_code, _ = outcome(lambda step=step: getattr(run, step[0])(step[1], step[2]))  # type: ignore[misc]
        assert exit_code in (0, 4)
    before = len(events(store))

    verb, task, amount = case.request
    exit_code, answer = outcome(lambda: getattr(run, verb)(task, amount))

    appended = events(store)[before:]
    assert exit_code == case.exit_code, answer
    assert tuple(e["type"] for e in appended) == case.appended
    fired = [e for e in appended if e["type"] == "escalation"]
    if not case.escalation:
        assert not fired
        return
    [escalation] = fired
    for key, value in case.escalation.items():
        assert escalation[key] == value, key
    assert escalation["task"] == task
    if escalation["shadow"]:
        assert run.state().escalations[escalation["id"]].state == "resolved"  # needs nobody
        assert answer.get("shadow_escalation_id") == escalation["id"]
    else:
        assert answer["escalation_id"] == escalation["id"]
        assert answer["offered"] == escalation["offered"]
        assert escalation["expires_at"] == "2026-11-23T14:30:00.000000Z"
        if escalation["offered"] == ["pause", "cancel"]:
            assert "extend not offered" in answer["message"]
            assert "max extension" in escalation["note"]


# --------------------------------------------------------------------------- de-dup


def test_repeat_while_open_returns_the_same_escalation(store: Location, clock: FakeClock) -> None:
    run = make_run(store, clock, approval_threshold="2")
    with pytest.raises(Pending) as first:
        run.reserve("t", "3")
    tree = ledger_files(store)
    for _ in range(3):
        with pytest.raises(Pending) as again:
            run.reserve("t", "3")
        assert again.value.escalation_id == first.value.escalation_id
        assert again.value.exit_code == 4
        assert "still waiting" in again.value.message
    assert ledger_files(store) == tree
    # A different amount while it is open is a conflict, not a second escalation.
    with pytest.raises(Conflict, match=r"open escalation esc-2 for \$3\.00"):
        run.reserve("t", "4")
    assert ledger_files(store) == tree


# --------------------------------------------------------------------------- resolutions


def test_approve_reserves_in_the_same_write(store: Location, clock: FakeClock) -> None:
    run = make_run(store, clock, max_extension="3")
    run.reserve("f", "8")
    with pytest.raises(Pending):
        run.reserve("t", "4")  # $2 left: needs a $2 extension
    result = run.approve("esc-3", by="alice")
    assert result["status"] == "approved"
    assert result["extension_micros"] == 2 * USD
    resolved, reserved = events(store)[-2:]
    assert (resolved["type"], resolved["mode"], resolved["by"], resolved["extension_micros"]) == \
        ("escalation_resolved", "extend", "alice", 2 * USD)
    assert (reserved["type"], reserved["task"], reserved["amount_micros"]) == \
        ("budget_reserved", "t", 4 * USD)
    assert reserved["seq"] == resolved["seq"] + 1 and reserved["ts"] == resolved["ts"]
    state = run.state()
    assert (state.cap_micros, state.remaining_micros, state.tasks["t"].state) == (12 * USD, 0, "reserved")


def test_approve_rechecks_the_ceiling(store: Location, clock: FakeClock) -> None:
    run = make_run(store, clock, approval_threshold="3", max_extension="1")
    with pytest.raises(Pending) as escalated:
        run.reserve("t", "4")  # threshold only: needs no extension when it opens
    assert escalated.value.offered == ["extend", "pause", "cancel"]
    run.reserve("a", "3")
    run.reserve("b", "3")  # $4 left, still fits
    run.reserve("c", "2")  # $2 left: approving $4 now needs $2 > the $1 max extension
    tree = ledger_files(store)
    with pytest.raises(Refused, match=r"needs an extension of \$2\.00 but only \$1\.00") as refused:
        run.approve("esc-2", by="alice")
    assert refused.value.code == "extension_limit"
    assert ledger_files(store) == tree
    assert run.state().escalations["esc-2"].state == "open"
    # Raising the ceiling (an event) makes the same approval fit.
    assert run.set_policy(max_extension="2")["status"] == "changed"
    assert run.approve("esc-2", by="alice")["extension_micros"] == 2 * USD
    assert run.state().remaining_micros == 0


def test_first_resolution_wins(store: Location, clock: FakeClock) -> None:
    run = make_run(store, clock, approval_threshold="2")
    with pytest.raises(Pending):
        run.reserve("t", "3")
    clock.advance(60)
    run.approve("esc-2", by="alice")
    tree = ledger_files(store)
    for mode, by in [("pause", "bob"), ("cancel", "bob"), ("approve", "bob"), ("pause", "alice")]:
        with pytest.raises(Conflict) as lost:
            getattr(run, mode)("esc-2", by=by)
        assert lost.value.exit_code == 5
        assert "extend by alice at 2026-11-23T14:01:00.000000Z" in lost.value.message
        assert (lost.value.by, lost.value.mode) == ("alice", "extend")
    # The winner repeating itself is success with nothing appended.
    again = run.approve("esc-2", by="alice")
    assert (again["status"], again["by"]) == ("exists", "alice")
    assert ledger_files(store) == tree
    assert sum(e["type"] == "escalation_resolved" for e in events(store)) == 1


def test_pause_parks_the_task_and_a_new_reserve_escalates_again(store: Location, clock: FakeClock) -> None:
    run = make_run(store, clock, approval_threshold="2")
    with pytest.raises(Pending):
        run.reserve("t", "3")
    assert run.pause("esc-2", by="alice")["status"] == "paused"
    assert run.state().tasks["t"].state == "paused"
    with pytest.raises(Pending) as again:
        run.reserve("t", "3")
    assert again.value.escalation_id == "esc-4"
    state = run.state()
    assert (state.escalations["esc-2"].mode, state.escalations["esc-4"].state) == ("pause", "open")
    # A paused task may also come back smaller and pass unseen.
    run.cancel("esc-4", by="alice")
    with pytest.raises(Refused):
        run.reserve("t", "1")


def test_cancel_is_terminal(store: Location, clock: FakeClock) -> None:
    run = make_run(store, clock, approval_threshold="2")
    with pytest.raises(Pending):
        run.reserve("t", "3")
    assert run.cancel("esc-2", by="alice")["status"] == "cancelled"
    halt = events(store)[-1]
    assert (halt["type"], halt["task"], halt["reason"]) == ("halt", "t", "cancelled")
    tree = ledger_files(store)
    for verb, amount in [("reserve", "3"), ("reserve", "1"), ("increase", "4")]:
        with pytest.raises(Refused) as refused:
            getattr(run, verb)("t", amount)
        assert (refused.value.code, refused.value.exit_code) == ("cancelled", 3)
    assert ledger_files(store) == tree


def test_increase_escalation_approved(store: Location, clock: FakeClock) -> None:
    run = make_run(store, clock, approval_threshold="5")
    run.reserve("t", "4")
    with pytest.raises(Pending) as escalated:
        run.increase("t", "6", reason="long diff")
    assert run.state().tasks["t"].state == "escalated"
    assert run.state().reserved_micros == 4 * USD  # the held reservation stays while it waits
    run.approve(escalated.value.escalation_id, by="alice")
    increased = events(store)[-1]
    assert (increased["type"], increased["from_micros"], increased["to_micros"]) == \
        ("budget_increased", 4 * USD, 6 * USD)
    assert run.state().tasks["t"].state == "reserved"


def test_increase_escalation_cancelled_can_still_release(store: Location, clock: FakeClock) -> None:
    run = make_run(store, clock)
    run.reserve("f", "5")
    run.reserve("t", "4")
    with pytest.raises(Pending) as escalated:
        run.increase("t", "6")
    run.cancel(escalated.value.escalation_id, by="alice")
    state = run.state()
    assert (state.tasks["t"].state, state.reserved_micros) == ("halted", 9 * USD)
    with pytest.raises(Refused, match="release it to settle"):
        run.increase("t", "7")
    assert run.release("t", "3.5")["status"] == "released"
    state = run.state()
    assert (state.spent_micros, state.reserved_micros, state.remaining_micros) == \
        (3_500_000, 5 * USD, 1_500_000)


def test_paused_increase_keeps_its_reservation_and_may_ask_again(store: Location, clock: FakeClock) -> None:
    run = make_run(store, clock, approval_threshold="5")
    run.reserve("t", "4")
    with pytest.raises(Pending):
        run.increase("t", "6")
    run.pause("esc-3", by="alice")
    assert run.state().tasks["t"].reserved_micros == 4 * USD
    with pytest.raises(Pending) as again:
        run.increase("t", "6")
    assert again.value.escalation_id == "esc-5"


def test_resolving_unknown_or_shadow_escalations(store: Location, clock: FakeClock) -> None:
    run = make_run(store, clock, escalation="shadow", approval_threshold="2")
    shadow_id = run.reserve("t", "3")["shadow_escalation_id"]
    tree = ledger_files(store)
    with pytest.raises(InputError, match="no escalation esc-99"):
        run.approve("esc-99")
    with pytest.raises(Conflict, match="shadow mode"):
        run.approve(shadow_id)
    with pytest.raises(Conflict, match="shadow mode"):
        run.wait(shadow_id, timeout_s=0)
    assert ledger_files(store) == tree


# --------------------------------------------------------------------------- timeouts


def test_expiry_is_resolved_by_the_next_mutating_command(store: Location, clock: FakeClock) -> None:
    run = make_run(store, clock, approval_threshold="2")  # 30 minutes to decide
    with pytest.raises(Pending):
        run.reserve("t", "3")
    clock.advance(30 * 60 - 1)
    with pytest.raises(Pending) as still:
        run.reserve("t", "3")  # de-dup, one second before expiry
    assert still.value.escalation_id == "esc-2"
    clock.advance(1)
    # Reads never write: the expired escalation shows open until a command touches the run.
    tree = ledger_files(store)
    assert run.state().escalations["esc-2"].state == "open"
    assert ledger_files(store) == tree

    run.reserve("other", "1")
    expired, reserved = events(store)[-2:]
    assert (expired["type"], expired["id"], expired["mode"], expired["by"]) == \
        ("escalation_resolved", "esc-2", "pause", "timeout")
    assert (reserved["type"], reserved["task"]) == ("budget_reserved", "other")
    assert run.state().tasks["t"].state == "paused"

    with pytest.raises(Conflict) as late:
        run.approve("esc-2", by="alice")
    assert "pause by timeout" in late.value.message and "expired at 2026-11-23T14:30:00" in late.value.message
    assert late.value.exit_code == 5


def test_an_expired_escalation_cannot_be_approved(store: Location, clock: FakeClock) -> None:
    run = make_run(store, clock, approval_threshold="2")
    with pytest.raises(Pending):
        run.reserve("t", "3")
    clock.advance(3600)
    with pytest.raises(Conflict, match="already resolved: pause by timeout") as late:
        run.approve("esc-2", by="alice")
    assert late.value.by == "timeout"
    # The approve itself wrote the timeout (it is the next command), and no reservation.
    assert [e["type"] for e in events(store)][-1] == "escalation_resolved"
    assert run.state().reserved_micros == 0
    # The paused task may ask again and gets a fresh escalation with a fresh expiry.
    with pytest.raises(Pending) as again:
        run.reserve("t", "3")
    assert again.value.expires_at == "2026-11-23T15:30:00.000000Z"


def test_sweep_pauses_only_what_expired(store: Location, clock: FakeClock) -> None:
    run = make_run(store, clock, approval_threshold="2")
    with pytest.raises(Pending):
        run.reserve("early", "3")
    clock.advance(20 * 60)
    with pytest.raises(Pending):
        run.reserve("late", "3")
    tree = ledger_files(store)
    assert run.sweep()["expired"] == []
    assert ledger_files(store) == tree  # nothing expired: nothing written

    clock.advance(10 * 60)
    assert run.sweep()["expired"] == ["esc-2"]
    assert run.sweep()["expired"] == []  # the same instant again: already done
    clock.advance(20 * 60)
    assert run.sweep()["expired"] == ["esc-3"]
    state = run.state()
    assert not state.open_escalations
    assert {e.by for e in state.escalations.values()} == {"timeout"}


def test_no_timeout_means_no_expiry(store: Location, clock: FakeClock) -> None:
    run = make_run(store, clock, approval_threshold="2", escalation_timeout_s=None)
    with pytest.raises(Pending) as escalated:
        run.reserve("t", "3")
    assert escalated.value.expires_at is None
    clock.advance(365 * 86400)
    assert run.sweep()["expired"] == []


def test_wait_notices_expiry_without_any_other_writer(store: Location, clock: FakeClock) -> None:
    run = make_run(store, clock, approval_threshold="2")
    with pytest.raises(Pending):
        run.reserve("t", "3")

    def ten_minutes_per_look() -> datetime:
        clock.advance(600)
        return clock()

    waiter = Ledger.open(store, "r", clock=ten_minutes_per_look)
    # Nothing else writes; the waiter's own clock passes expires_at and it sweeps.
    with pytest.raises(Pending) as paused:
        waiter.wait("esc-2", timeout_s=10)
    assert (paused.value.code, paused.value.by) == ("paused", "timeout")
    assert run.state().escalations["esc-2"].by == "timeout"


def test_wait_outcomes_in_process(store: Location, clock: FakeClock) -> None:
    run = make_run(store, clock, approval_threshold="2")
    for task in ("a", "b", "c", "d"):
        with pytest.raises(Pending):
            run.reserve(task, "3")
    run.approve("esc-2", by="alice")
    run.cancel("esc-3", by="alice")
    run.pause("esc-4", by="alice")
    assert run.wait("esc-2", timeout_s=0)["status"] == "approved"
    with pytest.raises(Refused) as cancelled:
        run.wait("esc-3", timeout_s=0)
    with pytest.raises(Pending) as paused:
        run.wait("esc-4", timeout_s=0)
    with pytest.raises(Pending) as still_open:
        run.wait("esc-5", timeout_s=0)
    assert (cancelled.value.code, paused.value.code, still_open.value.code) == \
        ("cancelled", "paused", "escalation_open")


def test_set_policy_is_an_event_and_applies_from_then_on(store: Location, clock: FakeClock) -> None:
    run = make_run(store, clock, escalation="off")
    assert run.reserve("a", "3")["status"] == "reserved"
    assert run.set_policy(escalation="enforce", approval_threshold="2")["status"] == "changed"
    changed = events(store)[-1]
    assert changed["type"] == "policy_changed"
    assert changed["escalation"] == {"mode": "enforce", "approval_threshold_micros": 2 * USD,
                                     "timeout_s": 1800, "max_extension_micros": 0}
    tree = ledger_files(store)
    assert run.set_policy(escalation="enforce")["status"] == "exists"
    assert ledger_files(store) == tree
    with pytest.raises(Pending):
        run.reserve("b", "3")
    run.set_policy(approval_threshold=None)
    assert run.state().policy.approval_threshold_micros is None
    assert run.reserve("c", "3")["status"] == "reserved"
    with pytest.raises(InputError, match="invalid escalation mode"):
        run.set_policy(escalation="sometimes")


def test_lowering_max_extension_below_what_was_granted_conflicts(store: Location, clock: FakeClock) -> None:
    run = make_run(store, clock, max_extension="2")
    run.reserve("f", "8")
    run.reserve("g", "1")
    with pytest.raises(Pending):
        run.reserve("t", "2")
    run.approve("esc-4", by="alice")
    with pytest.raises(Conflict, match=r"below the \$1\.00 already granted"):
        run.set_policy(max_extension="0.5")


def test_init_records_the_policy(store: Location) -> None:
    Ledger.init(store, "r", cap="10", escalation="enforce", approval_threshold="2.5",
                escalation_timeout_s=900, max_extension="4",
                clock=FakeClock(datetime(2026, 1, 1, tzinfo=UTC)))
    opened = events(store)[0]
    assert opened["escalation"] == {"mode": "enforce", "approval_threshold_micros": 2_500_000,
                                    "timeout_s": 900, "max_extension_micros": 4 * USD}


# --------------------------------------------------------------------------- who may resolve


@dataclass(frozen=True)
class WhoCase:
    """A run with ``approvers``; ``requester`` escalates task t (esc-2); ``resolver`` then
    resolves it as ``verb``."""

    approvers: str
    requester: str
    resolver: str
    verb: str  # approve | pause | cancel | withdraw
    exit_code: int
    code: str  # the error code, or the result status


WHO_CASES = {
    "anyone: another actor approves": WhoCase("", "wk", "alice", "approve", 0, "approved"),
    "anyone: the requester may not approve": WhoCase("", "wk", "wk", "approve", 3, "self_approval"),
    "anyone: the requester may not pause": WhoCase("", "wk", "wk", "pause", 3, "self_approval"),
    "anyone: the requester may not cancel": WhoCase("", "wk", "wk", "cancel", 3, "self_approval"),
    "listed approver approves": WhoCase("alice,bob", "wk", "bob", "approve", 0, "approved"),
    "listed approver pauses": WhoCase("alice,bob", "wk", "alice", "pause", 0, "paused"),
    "listed approver cancels": WhoCase("alice,bob", "wk", "alice", "cancel", 0, "cancelled"),
    "unlisted actor may not approve": WhoCase("alice,bob", "wk", "carol", "approve", 3, "not_an_approver"),
    "unlisted actor may not pause": WhoCase("alice,bob", "wk", "carol", "pause", 3, "not_an_approver"),
    "unlisted actor may not cancel": WhoCase("alice,bob", "wk", "carol", "cancel", 3, "not_an_approver"),
    "unlisted requester: self approval": WhoCase("alice,bob", "wk", "wk", "approve", 3, "self_approval"),
    "listed requester may not approve its own": WhoCase("alice,bob", "alice", "alice", "approve", 3,
                                                        "self_approval"),
    "listed requester's escalation, another approver": WhoCase("alice,bob", "alice", "bob", "approve", 0,
                                                               "approved"),
    "timeout is reserved (anyone)": WhoCase("", "wk", "timeout", "approve", 2, "reserved_actor"),
    "timeout is reserved (pause)": WhoCase("alice", "wk", "timeout", "pause", 2, "reserved_actor"),
    "the requester withdraws": WhoCase("alice", "wk", "wk", "withdraw", 0, "withdrawn"),
    "an approver may not withdraw": WhoCase("alice", "wk", "alice", "withdraw", 3, "not_the_requester"),
    "timeout may not withdraw": WhoCase("", "wk", "timeout", "withdraw", 2, "reserved_actor"),
}


@pytest.mark.parametrize("case", WHO_CASES.values(), ids=WHO_CASES.keys())
def test_who_may_resolve(runs_dir: Path, clock: FakeClock, case: WhoCase) -> None:
    make_run(runs_dir, clock, approval_threshold="2", approvers=case.approvers)
    worker = Ledger.open(runs_dir, "r", clock=clock, actor=case.requester)
    with pytest.raises(Pending):
        worker.reserve("t", "3")
    tree = ledger_files(runs_dir)

    code, body = outcome(lambda: getattr(worker, case.verb)("esc-2", by=case.resolver))

    assert (code, body.get("error", body.get("status"))) == (case.exit_code, case.code), body
    if code:
        assert ledger_files(runs_dir) == tree  # nothing written
        assert worker.state().escalations["esc-2"].state == "open"
    if code == 3:
        # Who tried, who asked and who may are facts; the message says who may approve.
        assert (body["by"], body["requested_by"]) == (case.resolver, case.requester)
        who = ", ".join(case.approvers.split(",")) if case.approvers else "anyone but the requester"
        if case.verb == "withdraw":
            who = f"only {case.requester}, who asked"
        assert who in body["message"]
    if code == 0:
        last = [e for e in events(runs_dir) if e["type"] == "escalation_resolved"]
        assert [(e["by"], e["actor"]) for e in last] == [(case.resolver, case.requester)]


def test_a_non_approver_is_refused_before_being_told_who_won(runs_dir: Path, clock: FakeClock) -> None:
    make_run(runs_dir, clock, approval_threshold="2", approvers="alice")
    worker = Ledger.open(runs_dir, "r", clock=clock, actor="wk")
    with pytest.raises(Pending):
        worker.reserve("t", "3")
    worker.approve("esc-2", by="alice")
    with pytest.raises(Refused) as refused:
        worker.pause("esc-2", by="mallory")
    assert (refused.value.code, refused.value.approvers) == ("not_an_approver", ["alice"])


def test_timeout_is_refused_as_any_actor(store: Location, clock: FakeClock) -> None:
    with pytest.raises(InputError) as refused:
        Ledger.init(store, "r", cap="1", actor="timeout")
    assert (refused.value.code, refused.value.exit_code) == ("reserved_actor", 2)
    with pytest.raises(InputError, match="reserved for expiry"):
        Ledger.init(store, "r", cap="1", approvers=["alice", "timeout"])
    assert not has_run(store, "r")


def test_approvers_are_part_of_the_policy(runs_dir: Path, clock: FakeClock) -> None:
    run = make_run(runs_dir, clock, approvers="alice, bob,alice")
    assert events(runs_dir)[0]["escalation"]["approvers"] == ["alice", "bob"]
    assert run.state().policy.approvers == ("alice", "bob")
    # The same settings again are the same run; other approvers are other settings.
    assert not make_run(runs_dir, clock, approvers=["alice", "bob"]).created
    with pytest.raises(Conflict, match=r"approvers alice, bob, not carol"):
        make_run(runs_dir, clock, approvers="carol")
    with pytest.raises(Conflict, match=r"approvers alice, bob, not none"):
        make_run(runs_dir, clock)
    # Only an approver may change the policy once there are approvers: nobody adds themselves.
    log = (runs_dir / "r" / "events.ndjson").read_bytes()
    with pytest.raises(Refused, match="not one of its approvers") as refused:
        Ledger.open(runs_dir, "r", actor="mallory").set_policy(approvers="mallory,alice")
    assert refused.value.code == "not_an_approver"
    assert (runs_dir / "r" / "events.ndjson").read_bytes() == log
    # An approver changes them; an empty list lets anyone (but the requester) approve.
    run = Ledger.open(runs_dir, "r", actor="alice", clock=clock)
    assert run.set_policy(approvers="carol")["escalation"]["approvers"] == ["carol"]
    run = Ledger.open(runs_dir, "r", actor="carol", clock=clock)
    assert run.set_policy(escalation_timeout_s=60)["escalation"]["approvers"] == ["carol"]
    cleared = run.set_policy(approvers="")
    assert "approvers" not in cleared["escalation"]
    assert "approvers" not in events(runs_dir)[-1]["escalation"]
    assert run.state().policy.approvers == ()


def test_a_policy_without_approvers_writes_the_same_bytes(store: Location, clock: FakeClock) -> None:
    """Logs from before approvers existed replay, and new runs without them look the same."""
    make_run(store, clock)
    assert list(events(store)[0]["escalation"]) == ["mode", "approval_threshold_micros", "timeout_s",
                                                       "max_extension_micros"]


@pytest.mark.parametrize("approvers", [
    "alice", ["alice", 7], ["alice", ""], ["a" * 129], ["bell\x07"], {"alice": 1}])
def test_the_fold_checks_the_approvers_it_reads(approvers: Any) -> None:
    from escalate.core.fold import initial_state
    from escalate.core.state import RuleViolation

    line = {"v": 1, "seq": 1, "ts": "2026-11-23T14:00:00.000000Z", "type": "run_opened", "prev": "",
            "actor": "a", "run": "r", "run_cap_micros": 1, "task_cap_micros": 1,
            "escalation": {"mode": "enforce", "approval_threshold_micros": None, "timeout_s": None,
                           "max_extension_micros": 0, "approvers": approvers}}
    with pytest.raises(RuleViolation, match="approvers"):
        initial_state(line, "")


def test_the_checkpoint_keeps_the_requester(runs_dir: Path, clock: FakeClock) -> None:
    make_run(runs_dir, clock, approval_threshold="2")
    worker = Ledger.open(runs_dir, "r", clock=clock, actor="wk")
    with pytest.raises(Pending):
        worker.reserve("t", "3")
    worker.reserve("u", "1")  # a write that loads, and saves, the checkpoint
    assert (runs_dir / "r" / "events.ndjson.cache.sqlite").exists()
    assert worker.state().escalations["esc-2"].requested_by == "wk"
    assert worker.replayed().state.escalations["esc-2"].to_json()["requested_by"] == "wk"
    with pytest.raises(Refused, match="may not resolve their own"):
        worker.approve("esc-2")


RESOLVERS = st.sampled_from(["wk", "carol", "mallory", "Alice", "alice "])


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["approve", "pause", "cancel"]), RESOLVERS,
                          st.sampled_from(["esc-2", "esc-3"])), min_size=1, max_size=8))
def test_no_resolution_by_a_non_approver_ever_writes(attempts: list[tuple[str, str, str]]) -> None:
    with tempfile.TemporaryDirectory() as folder:
        runs_dir = Path(folder)
        clock = FakeClock(datetime(2026, 11, 23, 14, tzinfo=UTC))
        make_run(runs_dir, clock, approval_threshold="2", approvers="alice,bob")
        worker = Ledger.open(runs_dir, "r", clock=clock, actor="wk")
        for task in ("t", "u"):
            with pytest.raises(Pending):
                worker.reserve(task, "3")
        log = (runs_dir / "r" / "events.ndjson").read_bytes()
        for verb, resolver, escalation_id in attempts:
            resolve = getattr(worker, verb)
            code, body = outcome(lambda: resolve(escalation_id, by=resolver))  # noqa: B023 (called at once)
            # (a name with a space at either end is no name at all: bad input, exit 2)
            assert (code, body["error"]) in ((3, "not_an_approver"), (3, "self_approval"),
                                             (2, "invalid_actor")), body
            assert (runs_dir / "r" / "events.ndjson").read_bytes() == log


# --------------------------------------------------------------------------- a finished task settles


def test_release_settles_a_task_whose_increase_waits(runs_dir: Path, clock: FakeClock) -> None:
    # (File runs_dir only, as the other tests of approver lists: on PostgreSQL the list names
    # database roles, tested in test_pg_store.py.)
    make_run(runs_dir, clock, approval_threshold="5", approvers="alice")
    worker = Ledger.open(runs_dir, "r", clock=clock, actor="wk")
    worker.reserve("t", "4")
    with pytest.raises(Pending):
        worker.increase("t", "6")
    released = worker.release("t", "5.5")
    assert (released["status"], released["withdrawn_escalation_id"]) == ("released", "esc-3")
    resolved, settled = events(runs_dir)[-2:]
    assert (resolved["type"], resolved["mode"], resolved["by"], resolved["extension_micros"]) == \
        ("escalation_resolved", "withdraw", "wk", 0)
    assert (settled["type"], settled["reserved_micros"], settled["actual_micros"]) == \
        ("released", 4 * USD, 5_500_000)
    # One write: the same timestamp, and the first line announces the second.
    assert (resolved["ts"], resolved["more"], settled["seq"]) == (settled["ts"], 1, resolved["seq"] + 1)
    state = worker.state()
    escalation = state.escalations["esc-3"]
    assert (escalation.state, escalation.mode, escalation.by) == ("resolved", "withdraw", "wk")
    assert (state.tasks["t"].state, state.spent_micros, state.reserved_micros) == ("released", 5_500_000, 0)
    assert not worker.verify().problems
    # The approver comes too late; waiting tells what happened.
    with pytest.raises(Conflict, match="already resolved: withdraw by wk"):
        worker.approve("esc-3", by="alice")
    with pytest.raises(Pending) as waited:
        worker.wait("esc-3", timeout_s=0)
    assert waited.value.code == "withdrawn"


def test_a_reserve_escalation_is_withdrawn_by_its_requester(store: Location, clock: FakeClock) -> None:
    make_run(store, clock, approval_threshold="2")
    worker = Ledger.open(store, "r", clock=clock, actor="wk")
    with pytest.raises(Pending):
        worker.reserve("t", "3")
    # Nothing is held, so there is nothing to release: the message says how to take it back.
    with pytest.raises(Conflict, match="escalate withdraw r esc-2"):
        worker.release("t", "1")
    withdrawn = worker.withdraw("esc-2")
    assert (withdrawn["status"], withdrawn["by"], withdrawn["mode"]) == ("withdrawn", "wk", "withdraw")
    assert worker.withdraw("esc-2")["status"] == "exists"  # the same again changes nothing
    state = worker.state()
    assert (state.tasks["t"].state, state.tasks["t"].holding, state.reserved_micros) == ("paused", False, 0)
    assert state.escalations["esc-2"].to_json()["mode"] == "withdraw"
    assert worker.reserve("t", "1")["status"] == "reserved"  # it may ask again, smaller
    assert not worker.verify().problems


def test_withdrawing_an_increase_keeps_what_the_task_holds(store: Location, clock: FakeClock) -> None:
    make_run(store, clock, approval_threshold="5")
    worker = Ledger.open(store, "r", clock=clock, actor="wk")
    worker.reserve("t", "4")
    with pytest.raises(Pending):
        worker.increase("t", "6")
    worker.withdraw("esc-3")
    state = worker.state()
    assert (state.tasks["t"].state, state.tasks["t"].holding, state.reserved_micros) == \
        ("reserved", True, 4 * USD)
    assert worker.release("t", "4")["status"] == "released"


def test_the_fold_refuses_a_withdraw_that_grants(store: Location, clock: FakeClock) -> None:
    from escalate.core.fold import apply_payload
    from escalate.core.state import RuleViolation

    make_run(store, clock, approval_threshold="2", max_extension="5")
    worker = Ledger.open(store, "r", clock=clock, actor="wk")
    with pytest.raises(Pending):
        worker.reserve("t", "3")
    state = worker.state()
    with pytest.raises(RuleViolation, match="withdraw resolution cannot grant"):
        apply_payload(state, {"type": "escalation_resolved", "id": "esc-2", "mode": "withdraw",
                              "by": "wk", "extension_micros": 1})
