"""The budget rules, as pure arithmetic on integer micros: what fits, what extension a
request needs, when a release would carry a total past the limit on totals. What remains
is :attr:`escalate.core.state.RunState.remaining_micros`, the one place it is computed. The
decisions (:mod:`escalate.core.decide`) ask them before they write; the fold
(:mod:`escalate.core.fold`) asks them again for every line it reads, as a safety net, so a rule
is written once and both sides agree by construction.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Literal

from escalate.core.money import MAX_TOTAL_MICROS, format_usd
from escalate.errors import TotalLimit

if TYPE_CHECKING:
    from escalate.core.pool_state import PoolView
    from escalate.core.state import Policy, RunState

Cap = Literal["task_cap", "run_cap"]


def over_cap(total_micros: int, new_micros: int, task_cap_micros: int, remaining: int) -> Cap | None:
    """The cap a reservation of ``total_micros`` breaks (``new_micros`` of it not yet held),
    or None when it fits. The task cap is named first: no extension lifts it."""
    if total_micros > task_cap_micros:
        return "task_cap"
    if over_left(new_micros, remaining):
        return "run_cap"
    return None


def over_left(new_micros: int, left_micros: int) -> bool:
    """Whether ``new_micros`` more is over what is left (of a run's cap, or of its pool's in
    the period of the write)."""
    return new_micros > left_micros


def over_threshold(approval_threshold_micros: int | None, to_micros: int) -> bool:
    """Whether a reservation of ``to_micros`` needs a person under the approval threshold
    (None: no threshold)."""
    return approval_threshold_micros is not None and to_micros > approval_threshold_micros


def needed_extension(new_micros: int, remaining: int) -> int:
    """How far the cap must be extended for ``new_micros`` more to fit: 0 when it fits."""
    return max(0, new_micros - remaining)


def extension_left(max_extension_micros: int, extended_micros: int) -> int:
    """What the run's max extension still allows (negative if a policy lowered it)."""
    return max_extension_micros - extended_micros


def run_extension_left(policy: Policy, extended_micros: int, reason: str) -> int:
    """What approving an escalation that fired for ``reason`` may still extend the run by:
    what its max extension has left (:func:`extension_left`), and nothing for a ``pool_cap``
    escalation, which extends the pool, never the run. One rule for the decision and the fold."""
    return 0 if reason == "pool_cap" else extension_left(policy.max_extension_micros, extended_micros)


def task_cap_fits(task_cap_micros: int, run_cap_micros: int) -> bool:
    """A run's task cap is never above its run cap."""
    return task_cap_micros <= run_cap_micros


def past_total_limit(total_micros: int) -> bool:
    """Whether a total (what a run, or its pool in a period, has committed) would pass
    :data:`~escalate.core.money.MAX_TOTAL_MICROS`. Only a release above its reservation can carry
    one there: a reservation must fit a cap (at most the 1e9 USD run or pool cap plus at
    most as much again in extensions), so what a cap bounds stays far below the limit."""
    return total_micros > MAX_TOTAL_MICROS


def vouched_match(policy: Policy, roles: bool) -> bool:
    """Whether ``policy``'s approvers are matched, and requester and resolver compared, on
    the identity the store vouches for: the policy says ``approvers_match: vouched``, or the
    store's identities are database roles and the policy names approvers (approver lists
    there have always named roles). Otherwise on the names given (``claimed``), so that one
    OS user may run a whole script under several ``--by`` names (docs/escalation.md)."""
    return policy.approvers_match == "vouched" or (roles and bool(policy.approvers))


def approver_name(policy: Policy, roles: bool, by: str | None, role: str | None) -> str | None:
    """The name an approver list (and its pinned keys) is checked against: ``role``, the
    vouched identity, under ``approvers_match: vouched`` and wherever the store's
    identities are database roles (PostgreSQL's lists have always named roles); else
    ``by``, the name given."""
    return role if (roles or policy.approvers_match == "vouched") and role is not None else by


def listed(policy: Policy, by: str, role: str | None) -> bool:
    """Whether ``policy``'s approver list names the resolver of a line read from a log
    (``by``, vouched as ``role``) by the name a writer checked it on (:func:`approver_name`)
    — on either store, as the log does not say which store wrote it."""
    return any(approver_name(policy, roles, by, role) in policy.approvers for roles in (False, True))


def pinned_keys(policy: Policy, by: object, role: object) -> tuple[str, ...]:
    """The keys a resolution line's signature is checked against when a log is read: those
    pinned for the name its writer checked, :func:`approver_name` — on either store, as the
    log does not say which store wrote it: the vouched ``role`` under ``approvers_match:
    vouched``; otherwise the name given (the file store), or the role (PostgreSQL, where
    lists name roles). Who signed is then told apart by the key (:func:`same_approver`), and
    the signature names ``by`` (:func:`escalate.core.sshsig.canonical_content`)."""
    if policy.approvers_match == "vouched" and not isinstance(role, str):
        return ()  # (vouched lines always record the role: one without names no signer)
    names = (approver_name(policy, roles, by if isinstance(by, str) else None,
                           role if isinstance(role, str) else None) for roles in (False, True))
    return tuple(key for name in dict.fromkeys(names) if name is not None
                 for key in policy.approver_keys.get(name, ()))


def same_approver(policy: Policy, roles: bool, earlier: Mapping[str, str], by: str, role: str | None,
                  key: str | None) -> bool:
    """Whether an approval by ``by`` (vouched as ``role``, signed with ``key``, a fingerprint)
    is by the approver of ``earlier`` (an approval so far: ``by``, ``role``, ``key``), who
    counts once toward a quorum. The one rule of the decisions and of every reader of a log:
    the same vouched identity where the store has one that counts (:func:`same_person`,
    under ``approvers_match: vouched``, and always on PostgreSQL, ``roles``); the same name
    otherwise; and whatever the names, the same signing key."""
    if key is not None and earlier.get("key") == key:
        return True
    return same_person(earlier["by"], earlier.get("role"), by, role,
                       roles or vouched_match(policy, roles))


def quorum_needed(policy: Policy, needed_extension_micros: int) -> int:
    """Distinct approvers an approval of an escalation needing this cap extension must have
    (``policy.quorum`` above ``quorum_above_micros``, or for every escalation without one)."""
    above = policy.quorum_above_micros
    return policy.quorum if above is None or needed_extension_micros > above else 1


def quorum_required(policies: Iterable[Policy], needed_extension_micros: int, floor: int = 1) -> int:
    """Distinct approvers an open escalation needing this cap extension must have: the
    stricter of each deciding policy's quorum now (a run's, and its pool's where the pool
    decides it) and ``floor``, the quorum its line recorded when it fired (or an approval
    was counted against). One rule for the decisions, the fold and the inbox: a quorum
    lowered after an escalation fired never applies to it; one raised does."""
    return max(floor, *(quorum_needed(policy, needed_extension_micros) for policy in policies))


def grant_quorum(policies: Iterable[Policy], needed_extension_micros: int, granted: tuple[int, int],
                 floor: int = 1) -> int:
    """Distinct approvers a grant of ``granted`` (the run's and the pool's extension it
    makes) must have: :func:`quorum_required` on the larger of what the escalation needed
    when it fired and what is granted now. A grant that grew past a ``quorum_above`` since
    the escalation fired needs the quorum, whatever its line recorded. One rule for the
    writer and every reader of a log."""
    return quorum_required(policies, max(needed_extension_micros, *granted), floor)


def beyond_signed(granted: tuple[int, int], signed: Sequence[int] | None) -> bool:
    """Whether ``granted`` (the run's and the pool's extension a grant makes) is more than
    ``signed``, the least each counted partial approval signed for (None: none recorded an
    amount, as older lines and unsigned approvals do): an earlier approver never approved
    the part above. The writer refuses such a grant; a reader finds it damage."""
    return signed is not None and (granted[0] > signed[0] or granted[1] > signed[1])


def least_signed(signed: Sequence[int] | None, grant: tuple[int, int]) -> list[int]:
    """``signed`` (see :func:`beyond_signed`) with one more approval's ``grant`` counted."""
    return list(grant) if signed is None else [min(signed[0], grant[0]), min(signed[1], grant[1])]


def unreachable_quorum(quorums: Iterable[int], approvers: Sequence[str]) -> int | None:
    """The largest of ``quorums`` when it asks for more distinct approvals than ``approvers``
    names, or None: every quorum can be reached, or nobody is named (anyone may approve,
    so there is nothing to count)."""
    most = max(quorums, default=1)
    return most if approvers and most > len(approvers) else None


def same_person(requested_by: str | None, requested_role: str | None, by: str | None,
                role: str | None, vouched: bool) -> bool:
    """Whether the resolver (``by``, vouched as ``role``) is the requester. Two different
    vouched identities are never the same person, whatever names they give; the same one is,
    when ``vouched``; otherwise (or where a line has no vouched identity) the names tell."""
    if requested_role is not None and role is not None:
        if requested_role != role:
            return False
        if vouched:
            return True
    return requested_by is not None and by == requested_by


def release_refusal(state: RunState, task_id: str, held: int, actual: int,
                    pool: PoolView | None) -> TotalLimit | None:
    """The refusal of releasing ``task_id`` (which holds ``held``) at ``actual`` when that
    carries what the run, or (``pool``) its pool in the release's period, committed past the
    limit; None otherwise."""
    committed = state.committed_micros - held + actual
    if past_total_limit(committed):
        return _past_limit(task_id, actual, f"run {state.run_id}", committed)
    if pool is not None and actual > held:
        # What a release frees comes off the periods the task was counted in; only the part
        # above its reservation is added, to the period of the release (docs/pools.md).
        key = pool.current
        committed = pool.of(key).committed_micros + actual - held
        if past_total_limit(committed):
            # (periods is loaded with the pool's modules; a run's write never loads it)
            from escalate.core.periods import period_name

            return _past_limit(task_id, actual, f"pool {pool.pool_id} in {period_name(pool.period, key)}",
                               committed)
    return None


def _past_limit(task_id: str, actual: int, whose: str, total: int) -> TotalLimit:
    return TotalLimit(
        f"refused to release {task_id} with {format_usd(actual)} actual: the committed total of "
        f"{whose} would be {format_usd(total)}, past the limit of {format_usd(MAX_TOTAL_MICROS)} "
        f"({MAX_TOTAL_MICROS} micros) on every total; nothing was written — check the actual amount",
        task=task_id, total_micros=total, limit_micros=MAX_TOTAL_MICROS)
