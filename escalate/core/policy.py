"""The decisions of a person changing a policy (``runs set``, ``pools set``): who may change
it, the ``policy_changed`` line it records, what its signature covers and the check of it,
the extension it may not go below, and a run's change (:func:`decide_policy`; a pool's is
:func:`escalate.pools.decide.decide_pool_policy`). Pure, as :mod:`escalate.core.decide`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from escalate.core.decide import Decision, fail
from escalate.core.money import format_usd as usd
from escalate.core.rules import approver_name, unreachable_quorum
from escalate.core.state import Policy, RunState
from escalate.errors import Conflict, Refused, RefusedFacts

if TYPE_CHECKING:
    from escalate.core.payloads import PolicyChanged  # (types only: building the TypedDicts is the schema's)
    from escalate.core.pool_state import PoolView  # (a run without a pool never loads it)
    from escalate.results import PolicyAnswer


def policy_changer_refused(state: RunState, by: str | None, role: str | None, what: str,
                           command: str, roles: bool = False) -> Refused | None:
    """Once a run (or a pool) names its approvers (or pins keys for some), only they may
    change its settings: otherwise anyone could add themselves. The name checked is
    :func:`~escalate.core.rules.approver_name`'s (``role``: who the store vouches acts)."""
    approvers = state.policy.approvers or tuple(state.policy.approver_keys)
    name = approver_name(state.policy, roles, by, role)
    if approvers and name not in approvers:
        return Refused(f"cannot change {what}: {name} is not one of its approvers "
                       f"({', '.join(approvers)}); ask one of them to run 'escalate {command}'",
                       code="not_an_approver", by=by, approvers=list(approvers))
    return None


def policy_change(state: RunState, policy: Policy, cap_micros: int | None = None) -> PolicyChanged:
    """The ``policy_changed`` line that sets ``policy`` (and, on a pool, ``cap_micros`` when
    it differs), before its ``role`` and signature are added."""
    event: PolicyChanged = {"type": "policy_changed", "escalation": policy.to_json()}
    if state.pool is not None and cap_micros is not None and cap_micros != state.pool.cap_micros:
        event["cap_micros"] = cap_micros
    return event


def policy_signing_content(state: RunState, event: PolicyChanged) -> bytes:
    """What a signature of the policy change ``event`` covers
    (:func:`~escalate.core.sshsig.policy_content`)."""
    from escalate.core import sshsig  # (only a ledger that pins keys loads it)

    return sshsig.policy_content("pool" if state.pool is not None else "run", state.run_id,
                                 event["escalation"], event.get("cap_micros"), state.policy_line)


def policy_signed(state: RunState, event: PolicyChanged, by: str | None, role: str | None, roles: bool,
                  signature: str | None) -> Refused | None:
    """While ``state``'s policy pins approvers' keys, every change to it must be signed by a
    key pinned (before the change) for the name approver lists check (:func:`approver_name`):
    the signature and the key's fingerprint go on ``event``; otherwise why it is refused.
    With no key pinned the change is not signed: the first pinning is trusted on first use."""
    if not state.policy.approver_keys:
        return None
    from escalate.core import sshsig

    what = f"{'pool' if state.pool is not None else 'run'} {state.run_id}"
    command = f"escalate {'pools' if state.pool is not None else 'runs'} set {state.run_id}"
    name = approver_name(state.policy, roles, by, role)
    pinned = state.policy.approver_keys.get(name or "", ())
    facts: RefusedFacts = {"by": by, "approvers": list(state.policy.approver_keys)}
    if not pinned:
        return Refused(f"cannot change the policy of {what}: no key is pinned for {name} (pinned: "
                       f"{', '.join(state.policy.approver_keys)}); a change must be signed by one of them "
                       f"with '{command} --by NAME --sign KEYFILE'", code="not_an_approver", **facts)
    if signature is None:
        return Refused(f"cannot change the policy of {what}: it pins approvers' keys, so a change must be "
                       "signed; add --sign KEYFILE (your private key, or its .pub with ssh-agent)",
                       code="unsigned", **facts)
    try:
        key = sshsig.verify(signature, policy_signing_content(state, event), pinned)
    except sshsig.SignatureError as exc:
        return Refused(f"cannot change the policy of {what}: the signature is not {name}'s over this change "
                       f"({exc}); sign it with a key pinned for {name} (after another change, sign again)",
                       code="bad_signature", **facts)
    event["signature"], event["key"] = signature, key.fingerprint
    return None


def member_quorum_refused(run: tuple[str, Policy], pool: tuple[str, Policy]) -> Conflict | None:
    """The escalations of member run ``run`` (id, policy) that its ``pool`` (id, policy)
    decides are resolved by the pool's approvers (the run's own, when the pool names none)
    and need the stricter of the two quorums: a setting of either ledger under which they
    could never be granted is refused (:func:`~escalate.core.rules.unreachable_quorum`)."""
    (run_id, run_policy), (pool_id, pool_policy) = run, pool
    approvers, whose = ((pool_policy.approvers, f"pool {pool_id}") if pool_policy.approvers
                        else (run_policy.approvers, f"run {run_id}"))
    needed = unreachable_quorum((run_policy.quorum, pool_policy.quorum), approvers)
    if needed is None:
        return None
    return Conflict(f"quorum {needed} could never be reached for the escalations pool {pool_id} decides on "
                    f"run {run_id}: only {len(approvers)} approvers of {whose} may resolve them "
                    f"({', '.join(approvers)}); ask for at most {len(approvers)} approvals, or name more "
                    "approvers", code="unreachable_quorum", quorum=needed, approvers=list(approvers),
                    pool=pool_id)


def extension_lowered(policy: Policy, granted: int, granted_in: str = "") -> Conflict | None:
    """A max extension may not be lowered below what approvals already granted (a run's in
    all, a pool's ``granted_in`` its current period): the ceiling would already be broken."""
    if policy.max_extension_micros >= granted:
        return None
    return Conflict(f"max extension {usd(policy.max_extension_micros)} is below the {usd(granted)} already "
                    f"granted{granted_in}; set --max-extension to at least {usd(granted)}",
                    extended_micros=granted, max_extension_micros=policy.max_extension_micros)


def decide_policy(state: RunState, policy: Policy, by: str | None = None,
                  role: str | None = None, pool: PoolView | None = None, roles: bool = False,
                  signature: str | None = None) -> Decision[PolicyAnswer]:
    """Change the run's escalation policy (recorded as ``policy_changed``). Once a run names
    its approvers, only they may change it: otherwise anyone could add themselves (``role``:
    who the store vouches acts, recorded; ``roles``: :func:`policy_changer_refused`); while
    it pins keys, only with a ``signature`` by one (:func:`policy_signed`). A member run's
    answer names its ``pool``'s policy too: the run's own settings never lift it."""
    result: PolicyAnswer = {"status": "exists", "escalation": policy.to_json()}
    if pool is not None:
        result["pool"], result["pool_escalation"] = pool.pool_id, pool.policy.to_json()
    # (Asked before "unchanged": someone who may not change the policy is told so, as for a change.)
    refusal = policy_changer_refused(state, by, role, f"the escalation policy of run {state.run_id}",
                                     "runs set", roles)
    if refusal is not None:
        return fail(refusal)
    if policy == state.policy:
        return Decision(result=result)
    lowered = extension_lowered(policy, state.extended_micros) or (
        None if pool is None else member_quorum_refused((state.run_id, policy), (pool.pool_id, pool.policy)))
    if lowered is not None:
        return fail(lowered)
    changed = policy_change(state, policy)
    unsigned = policy_signed(state, changed, by, role, roles, signature)
    if unsigned is not None:
        return fail(unsigned)
    if role is not None:
        changed["role"] = role
    return Decision(events=[changed], result={**result, "status": "changed"})
