"""The decisions on a pool's own log: a run joins, the policy or the cap changes. Pure, as
:mod:`escalate.core.decide`; the money of a pool is decided with its member runs' writes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from escalate.core.decide import Decision, fail
from escalate.core.events import VoidReason
from escalate.core.policy import (
    extension_lowered,
    member_quorum_refused,
    policy_change,
    policy_changer_refused,
    policy_signed,
)
from escalate.core.state import Policy, RunState
from escalate.errors import InputError

if TYPE_CHECKING:
    from escalate.results import PoolLogAnswer, PoolPolicyAnswer


def not_a_pool(state: RunState) -> InputError:
    return InputError(f"{state.run_id} is a run, not a pool; see 'escalate pools list', or use "
                      f"'escalate runs show {state.run_id}'", code="not_a_pool", pool=state.run_id)


def decide_join(state: RunState, run_id: str) -> Decision[PoolLogAnswer]:
    """``run_joined`` for a new member (a repeat writes nothing: a retried ``runs init``)."""
    if state.pool is None:
        return fail(not_a_pool(state))
    if run_id in state.pool.members:
        return Decision(result={"status": "exists"})
    return Decision(events=[{"type": "run_joined", "run": run_id}], result={"status": "joined"})


def decide_void(state: RunState, run_id: str, taken: VoidReason | None) -> Decision[PoolLogAnswer]:
    """``run_join_voided`` for a join of ``run_id`` whose id another ledger holds (``taken``:
    :func:`escalate.pools.member.taken_by`, read in the pool's critical section); nothing
    when the run is the pool's member, not created yet, or not joined."""
    if state.pool is None:
        return fail(not_a_pool(state))
    if taken is None or run_id not in state.pool.members:
        return Decision(result={"status": "kept"})
    return Decision(events=[{"type": "run_join_voided", "run": run_id, "reason": taken}],
                    result={"status": "voided", "reason": taken})


def decide_opened(state: RunState, run_id: str, first_line: str | None) -> Decision[PoolLogAnswer]:
    """``member_opened`` for a member whose first line is written (``first_line``: its chain
    hash, read in the pool's critical section; None when the ledger under the id is not this
    pool's run of that id, or not there); nothing when recorded already, or not joined."""
    if state.pool is None:
        return fail(not_a_pool(state))
    if first_line is None or run_id not in state.pool.members or run_id in state.pool.opened:
        return Decision(result={"status": "kept"})
    return Decision(events=[{"type": "member_opened", "run": run_id, "first_line": first_line}],
                    result={"status": "opened"})


def decide_pool_policy(state: RunState, policy: Policy, cap_micros: int | None, by: str,
                       role: str | None = None, granted: tuple[int, str] | None = None,
                       roles: bool = False, signature: str | None = None,
                       members: Mapping[str, Policy] | None = None,
                       heads: Mapping[str, RunState] | None = None) -> Decision[PoolPolicyAnswer]:
    """Change a pool's escalation policy and (``cap_micros``) its cap, as ``policy_changed``.
    A cap below what is committed is allowed: new reservations are refused until releases
    or the next period make room; a max extension below what was granted in the current
    period (``granted``: the amount, and `` in the day …``) is not, as a run's. Once the
    pool names approvers, only they may change it (``role``: who the store vouches acts,
    recorded; ``roles``: the store's approver lists name database roles;
    :func:`~escalate.core.policy.policy_changer_refused` checks them); while it pins keys, only
    with a ``signature`` by one (:func:`~escalate.core.policy.policy_signed`). ``members``:
    the member runs' policies, read when the approvers or the quorum change: none may be
    left with escalations nobody could grant (:func:`~escalate.core.policy.member_quorum_refused`).
    ``heads``: the member runs' states, read when what decides a ``pool_cap`` escalation
    changes (:func:`deciders`): the line records where each member's log ends
    (``members_at``), so a reader holds each decision to the policy of its place in the
    log, whatever time the line gives (:class:`escalate.pools.signatures.PoolTimeline`)."""
    if state.pool is None:
        return fail(not_a_pool(state))
    cap = state.pool.cap_micros if cap_micros is None else cap_micros
    result: PoolPolicyAnswer = {"status": "exists", "escalation": policy.to_json(), "cap_micros": cap}
    # (Asked before "unchanged": someone who may not change the pool is told so, as for a change.)
    refusal = policy_changer_refused(state, by, role, f"pool {state.run_id}", "pools set", roles)
    if refusal is not None:
        return fail(refusal)
    if policy == state.policy and cap == state.pool.cap_micros:
        return Decision(result=result)
    lowered = None if granted is None else extension_lowered(policy, *granted)
    for run_id, run_policy in (members or {}).items():
        lowered = lowered or member_quorum_refused((run_id, run_policy), (state.run_id, policy))
    if lowered is not None:
        return fail(lowered)
    event = policy_change(state, policy, cap)
    unsigned = policy_signed(state, event, by, role, roles, signature)
    if unsigned is not None:
        return fail(unsigned)
    if role is not None:
        event["role"] = role
    if heads and deciders(policy) != deciders(state.policy):
        event["members_at"] = {run_id: [member.seq, member.last_hash] for run_id, member in heads.items()}
    return Decision(events=[event], result={**result, "status": "changed"})


def deciders(policy: Policy) -> tuple[object, ...]:
    """What of a pool's policy decides a ``pool_cap`` escalation's approvals: its keys, its
    approvers and how they are matched, its quorum."""
    return (policy.approver_keys, policy.approvers, policy.approvers_match, policy.quorum,
            policy.quorum_above_micros)
