"""The one checkpoint codec (escalate.stores.checkpoint): the run-wide blob is derived from
RunState's fields, so every field a fold produces comes back from a checkpoint unchanged,
and a checkpoint of another format is never trusted (it is rebuilt from the log)."""

from __future__ import annotations

import orjson
import pytest

from escalate.core.state import EscalationState, Policy, RunState, Task
from escalate.stores.checkpoint import BLOB_FIELDS, FORMAT, CheckpointInvalid, run_blob, state_from_blob

# A value unlike the default for every field the blob keeps; a new field of RunState needs
# one here, so the round trip below covers it.
UNUSUAL = {
    "run_id": "r-1", "run_cap_micros": 7_000_000, "task_cap_micros": 3_000_000,
    "policy": Policy(mode="enforce", approval_threshold_micros=5, timeout_s=None, max_extension_micros=9,
                     renotify_every_s=60, approvers=("ann", "bo")),
    "opened_at": "2026-01-02T03:04:05.000006Z", "spent_micros": 11, "reserved_micros": 12,
    "extended_micros": 13, "seq": 14, "last_hash": "ab" * 32, "last_ts": "2026-01-02T03:04:06.000000Z",
    "halts": 2, "recoveries": 1, "member_of": "P", "archived": True, "policy_line": "cd" * 8,
}


def _escalation() -> EscalationState:
    return EscalationState(id="e1", task="t", kind="increase", from_micros=1, requested_micros=2,
                           remaining_micros=3, reason="threshold", offered=["extend"],
                           expires_at=None, shadow=False, opened_at="2026-01-02T03:04:05.000006Z")


def test_every_field_a_checkpoint_keeps_comes_back_unchanged() -> None:
    assert set(BLOB_FIELDS) - {"open_escalations"} == set(UNUSUAL), "give the new field a value here"
    escalations = {"e1": _escalation()}
    state = RunState(**UNUSUAL, escalations=escalations)
    state.open_escalations = dict(escalations)
    back = state_from_blob(orjson.loads(run_blob(state, 100, 90, 14, [1, 2, 3, 4, 5])), {}, escalations)
    for name in RunState.__slots__:
        if name in BLOB_FIELDS:
            assert getattr(back, name) == getattr(state, name), name
    assert set(BLOB_FIELDS) == set(RunState.__slots__) - {
        "tasks", "escalations", "last_actor", "pool"}


@pytest.mark.parametrize("change", [{"format": FORMAT - 1}, {"spent_micros": 2**53}])
def test_a_checkpoint_of_another_format_or_past_the_limit_is_not_trusted(change: dict[str, int]) -> None:
    blob = {**orjson.loads(run_blob(RunState(**UNUSUAL), 100, 90, 14, [])), **change}
    with pytest.raises(CheckpointInvalid):
        state_from_blob(blob, {}, {})


def test_a_state_is_equal_to_another_by_its_fields_and_shown_with_them() -> None:
    """The state's classes compare and show as the dataclasses they were: a checkpoint's
    policy (its approvers a JSON list) equals the fold's, a field that differs makes two
    unequal, another class is never equal, and a mutable state has no hash."""
    policy = UNUSUAL["policy"]
    assert isinstance(policy, Policy)
    back = Policy(**orjson.loads(orjson.dumps(policy.to_json())))
    assert back == policy and back.approvers == ("ann", "bo")
    assert Policy(**{**policy.to_json(), "timeout_s": 1}) != policy
    assert _escalation() == _escalation() and _escalation() != policy
    changed = _escalation()
    changed.notify_attempts = 1
    assert changed != _escalation()
    # Shown field by field in the order each class declares them, as the dataclasses were.
    assert repr(Task("reserved", 5, True)) == (
        "Task(state='reserved', reserved_micros=5, holding=True, actual_micros=None, halt_reason=None, "
        "escalation_id=None)")
    assert repr(RunState(**UNUSUAL)).startswith(f"RunState(run_id={UNUSUAL['run_id']!r}, run_cap_micros=")
    assert repr(policy).startswith(f"Policy(mode={policy.mode!r}, approval_threshold_micros=")
    for state in (policy, _escalation(), Task("released"), RunState(**UNUSUAL)):
        with pytest.raises(TypeError):
            hash(state)
