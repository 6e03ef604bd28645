"""The library takes USD as str or Decimal, or micros said explicitly: never a bare int or float."""

from __future__ import annotations

import dataclasses
from decimal import Decimal
from typing import Any

import pytest

import escalate
from escalate import InvalidAmount, Ledger, Micros
from escalate.pools.pool import Pool
from escalate.settings import PolicyOptions, PolicySettings, RunPolicyOptions, make_policy
from tests.conftest import Location, has_run, log_bytes, snapshot_store


@pytest.mark.parametrize("cap", [10, 10.0, True, 2**70])
def test_init_refuses_a_bare_number_and_names_both_forms(store: Location, cap: Any) -> None:
    with pytest.raises(InvalidAmount) as caught:
        Ledger.init(store, "r", cap=cap)
    message = caught.value.message
    assert message.startswith("invalid cap ") and type(cap).__name__ in message
    assert "str or Decimal" in message and "escalate.Micros(" in message
    assert caught.value.exit_code == 2
    assert not has_run(store, "r")


@pytest.mark.parametrize("call", [
    lambda run: run.reserve("t", 5),
    lambda run: run.reserve("t", 2.5),
    lambda run: run.reserve("t", False),
    lambda run: run.increase("held", 3),
    lambda run: run.release("held", 1),
    lambda run: run.set_policy(max_extension=5),
    lambda run: run.set_policy(approval_threshold=1.5),
])
def test_commands_refuse_a_bare_number_and_write_nothing(store: Location, call: Any) -> None:
    run = Ledger.init(store, "r", cap="10")
    run.reserve("held", "2")
    before = snapshot_store(store)
    with pytest.raises(InvalidAmount, match=r"give USD as str or Decimal .*escalate\.Micros\("):
        call(run)
    assert snapshot_store(store) == before


def test_micros_are_taken_as_micros(store: Location) -> None:
    run = Ledger.init(store, "r", cap=Micros(10_000_000), max_extension=Micros(1))
    same = Ledger.init(store, "r", cap=Decimal("10"), max_extension="0.000001")
    assert same.state().totals() == run.state().totals()
    assert run.reserve("t", Micros(2_500_000))["remaining_micros"] == 7_500_000
    assert run.release("t", escalate.Micros(1))["remaining_micros"] == 9_999_999


@pytest.mark.parametrize("value", ["5", 2.5, True, Decimal(5), None])
def test_micros_takes_only_an_int(value: Any) -> None:
    # Micros("5") would otherwise be int("5"): text or a float turned into micros by accident.
    with pytest.raises(InvalidAmount, match="Micros takes an int count of micros"):
        Micros(value)


def test_micros_is_an_int_that_says_what_it_is() -> None:
    assert Micros(2_500_000) == 2_500_000 and isinstance(Micros(7), int)
    assert repr(Micros(7)) == "Micros(7)"
    assert Micros(Micros(7)) == 7


def test_set_policy_refuses_an_unknown_setting(store: Location) -> None:
    run = Ledger.init(store, "r", cap="10", escalation="enforce")
    before = snapshot_store(store)
    with pytest.raises(TypeError, match="max_extention"):
        run.set_policy(max_extention="5")  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        run.set_policy("shadow")  # type: ignore[misc]
    assert snapshot_store(store) == before


def test_policy_settings_are_one_frozen_object_the_keywords_become(store: Location) -> None:
    # One declaration of the settings: the keywords init and set_policy take are its fields,
    # a pool's are the same but the reminders, and the object cannot be edited in place.
    names = {field.name for field in dataclasses.fields(PolicySettings)}
    assert RunPolicyOptions.__optional_keys__ == names
    assert PolicyOptions.__optional_keys__ == names - {"renotify_every_s"}
    settings = PolicySettings(escalation="enforce", approval_threshold="2")
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.quorum = 2  # type: ignore[misc]
    run = Ledger.init(store, "r", cap="10", escalation="enforce", approval_threshold="2")
    assert run.state().policy == make_policy(settings)
    assert make_policy(PolicySettings.of(run.state().policy)) == run.state().policy
    with pytest.raises(TypeError, match="renotify_every_s"):
        Pool.init(store, "p", cap="10", renotify_every_s=600)  # type: ignore[call-arg]
    assert not has_run(store, "p")


def test_set_policy_changes_only_what_it_names(store: Location) -> None:
    run = Ledger.init(store, "r", cap="10", escalation="enforce", approval_threshold="2",
                      escalation_timeout_s=600, max_extension="3")
    assert run.set_policy()["status"] == "exists"
    run.set_policy(max_extension="5")
    assert run.state().policy.to_json() == {"mode": "enforce", "approval_threshold_micros": 2_000_000,
                                            "timeout_s": 600, "max_extension_micros": 5_000_000}
    run.set_policy(approval_threshold=None, escalation_timeout_s=None, escalation="shadow")
    assert run.state().policy.to_json() == {"mode": "shadow", "approval_threshold_micros": None,
                                            "timeout_s": None, "max_extension_micros": 5_000_000}


@pytest.mark.parametrize("call", [
    lambda root: Ledger.open(root, "r", actor=5),  # type: ignore[arg-type]
    lambda root: Ledger.open(root, "r").approve("esc-2", by=7),  # type: ignore[arg-type]
    lambda root: Ledger.open(root, "r").increase("t", "2", reason=None),  # type: ignore[arg-type]
    lambda root: Ledger.open(root, "r", lock_timeout=10**400),
    lambda root: Ledger.open(root, "r", lock_timeout=True),
])
def test_wrong_types_in_the_library_are_input_errors_not_crashes(store: Location, call: Any) -> None:
    from escalate import InputError

    Ledger.init(store, "r", cap="10", escalation="enforce", approval_threshold="1").reserve("t", "1")
    before = log_bytes(store, "r")
    with pytest.raises(InputError) as refused:
        call(store)
    assert refused.value.exit_code == 2 and "Trues" not in refused.value.message
    assert log_bytes(store, "r") == before


def test_a_clock_at_the_end_of_time_still_escalates(store: Location) -> None:
    from datetime import UTC, datetime

    from escalate import Pending

    late = Ledger.init(store, "r", cap="10", escalation="enforce", approval_threshold="1",
                       clock=lambda: datetime(9999, 12, 31, 23, 30, tzinfo=UTC))
    with pytest.raises(Pending) as pending:
        late.reserve("t", "5")
    escalation = late.state().escalations[pending.value.escalation_id]
    assert escalation.expires_at == "9999-12-31T23:59:59.999999Z"
