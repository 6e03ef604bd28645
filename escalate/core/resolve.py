"""The decisions of a person resolving an escalation (grant, pause, cancel, withdraw; and
the pause by ``timeout`` when nobody did in time); changing a policy is in
:mod:`escalate.core.policy`. Pure, as :mod:`escalate.core.decide`, whose
:class:`~escalate.core.decide.Decision` they return.

One action, three words: a person *approves* an escalation (the command), which writes
the resolution mode ``extend`` (the wire format) and answers ``approved`` (the result).
In code names it is a *grant*.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Never, TypedDict

from escalate.core.decide import Decision, fail, resolved_event
from escalate.core.events import ResolvedMode, parse_ts
from escalate.core.money import format_usd as usd
from escalate.core.rules import (
    approver_name,
    beyond_signed,
    grant_quorum,
    needed_extension,
    over_cap,
    over_threshold,
    run_extension_left,
    same_approver,
    same_person,
    vouched_match,
)
from escalate.core.state import EscalationState, Policy, RunState
from escalate.errors import Conflict, InputError, Refused, RefusedFacts

if TYPE_CHECKING:
    from escalate.core.payloads import (  # (types only: building the TypedDicts is the schema's)
        BudgetIncreased,
        BudgetReserved,
        EscalationApproved,
        EscalationResolved,
        Halt,
    )
    from escalate.core.pool_state import PoolView  # (a run without a pool never loads it)
    from escalate.results import ResolutionAnswer

    class Signed(TypedDict, total=False):
        """A resolution's ``signature`` and ``key`` (none where no key is pinned)."""

        signature: str
        key: str


def expire(state: RunState, now: str) -> list[EscalationResolved]:
    """Resolutions (``pause`` by ``timeout``) for open escalations that :func:`is_expired`
    by ``now``, the write's time (the store's clock: the machine's, or the database server's)."""
    return [
        {"type": "escalation_resolved", "id": e.id, "mode": "pause", "by": "timeout",
         "extension_micros": 0}
        for e in state.open_escalations.values()
        if is_expired(e, state.policy, now)
    ]


def is_expired(escalation: EscalationState, policy: Policy, now: str) -> bool:
    """True when ``escalation`` is past ``expires_at`` by ``now`` (the store's clock), or
    when its deadline lies more than twice its timeout ahead of ``now``: only a clock that
    ran ahead sets such a deadline, and it must not keep the escalation open for as long as
    it ran ahead (a year, say). Pausing is the safe answer: nothing is granted."""
    deadline = escalation.expires_at
    if deadline is None:
        return False
    if deadline <= now:
        return True
    try:
        due = parse_ts(deadline)
        timeout = max(policy.timeout_s or 0, (due - parse_ts(escalation.opened_at)).total_seconds())
        return (due - parse_ts(now)).total_seconds() > 2 * timeout
    except ValueError:  # a timestamp no escalate wrote: only the deadline itself counts
        return False


def decide_resolution(state: RunState, escalation_id: str, mode: ResolvedMode, by: str,
                      pool: PoolView | None = None, role: str | None = None,
                      signature: str | None = None, roles: bool = False) -> Decision[ResolutionAnswer]:
    """Grant (mode ``extend``, the ``approve`` command), pause or cancel an open escalation,
    or withdraw it (its requester only); the first resolution wins. Only the run's approvers
    (the pool's, when its check opened it or a grant is over its threshold: :func:`_the_pools`;
    anyone, when neither names any) may grant, pause or cancel, and never the requester.
    ``role``: who the store vouches is acting (the OS user, or the database role),
    recorded; ``roles``: the store's approver lists name database roles (PostgreSQL);
    :func:`~escalate.core.rules.approver_name` says which name a list is checked against.
    ``signature``: an armored SSHSIG signature of the escalation's canonical content, which
    a policy that pins approvers' keys requires (:func:`signed_fields`)."""
    escalation = state.escalations.get(escalation_id)
    if escalation is None:
        return fail(unknown_escalation(state.run_id, escalation_id))
    if escalation.shadow:
        return fail(Conflict(
            f"escalation {escalation_id} was recorded in shadow mode and needs no resolution",
            escalation_id=escalation_id, state="resolved", mode=None))
    refusal = _not_allowed(state, escalation, mode, by, pool, role, roles)
    if refusal is not None:
        return fail(refusal)
    if escalation.state == "resolved":
        facts: dict[str, Any] = {"escalation_id": escalation_id, "state": "resolved", "mode": escalation.mode,
                 "by": escalation.by, "resolved_at": escalation.resolved_at}
        if escalation.mode == mode and escalation.by == by:
            return Decision(result={"status": "exists", "escalation_id": escalation_id, "state": "resolved",
                                    "mode": escalation.mode, "by": escalation.by,
                                    "resolved_at": escalation.resolved_at, "task": escalation.task})
        expired = (f" (it expired at {escalation.expires_at}; task {escalation.task} may ask again)"
                   if escalation.by == "timeout" else "")
        return fail(Conflict(
            f"escalation {escalation_id} was already resolved: {escalation.mode} by "
            f"{escalation.by} at {escalation.resolved_at}{expired}; the first resolution wins — "
            "nothing to do", **facts))
    resolved = resolved_event(escalation_id, mode, by, role)
    facts = {"escalation_id": escalation_id, "task": escalation.task, "mode": mode, "by": by}
    # An approval's grant is worked out first: its signature covers it.
    granted = _grant(state, escalation, resolved, facts, pool) if mode == "extend" else None
    if granted is not None and granted.error is not None:
        return granted  # (an approval the grant could not follow is refused now, not at the last)
    refused = None if mode == "withdraw" else _sign(state, escalation, resolved, pool, roles, signature)
    if refused is not None:
        return fail(refused)
    if mode in ("pause", "withdraw"):
        status = "paused" if mode == "pause" else "withdrawn"
        return Decision(events=[resolved], result={"status": status, "escalation_id": escalation_id,
                                                   "task": escalation.task, "mode": mode, "by": by})
    if mode == "cancel":
        halt: Halt = {"type": "halt", "task": escalation.task,
                      "requested_micros": escalation.requested_micros,
                      "remaining_micros": state.remaining_micros, "reason": "cancelled"}
        return Decision(events=[resolved, halt], result={
            "status": "cancelled", "escalation_id": escalation_id, "task": escalation.task, "mode": mode,
            "by": by})
    assert granted is not None  # (mode extend)
    return _short_of_quorum(state, escalation, by, role, pool, roles, resolved) or granted


def quorum_of(state: RunState, escalation: EscalationState, pool: PoolView | None,
              granted: tuple[int, int] = (0, 0)) -> int:
    """Distinct approvers ``escalation`` needs to grant ``granted`` (the run's and the pool's
    extension): the run's quorum and, where the pool decides it (:func:`_the_pools`), the
    pool's — the stricter holds, as for every check of a pool — on the larger of what it
    needed when it fired and what is granted, and never fewer than the quorum recorded when
    it fired (``escalation.quorum``; :func:`~escalate.core.rules.grant_quorum`): a policy
    lowered afterwards lets nobody grant it alone, nor a grant grown since."""
    policies = [state.policy]
    if pool is not None and _the_pools(pool, escalation, "extend"):
        policies.append(pool.policy)
    return grant_quorum(policies, escalation.needed_extension_micros, granted, escalation.quorum)


def _short_of_quorum(state: RunState, escalation: EscalationState, by: str, role: str | None,
                     pool: PoolView | None, roles: bool,
                     resolved: EscalationResolved) -> Decision[ResolutionAnswer] | None:
    """An approval that leaves ``escalation`` short of its quorum: recorded as
    ``escalation_approved`` (the escalation stays open), carrying the ``signature`` and
    ``key`` of the would-be resolution ``resolved`` (under pinned keys, so replay checks
    every counted approver's signature), or, by someone who approved it
    already, nothing (``exists``). None: this approval completes it (or none is needed).
    Approvers are told apart by who the store vouches for where it has that (PostgreSQL's
    roles always; the file store's OS users under ``approvers_match: vouched``)."""
    granted = (resolved.get("extension_micros", 0), resolved.get("pool_extension_micros", 0))
    needed = quorum_of(state, escalation, pool, granted)
    if needed <= 1:
        return None
    deciding = pool.policy if pool is not None and _the_pools(pool, escalation, "extend") else state.policy
    names = [approval["by"] for approval in escalation.approvals]
    if any(same_approver(deciding, roles, approval, by, role, resolved.get("key"))
           for approval in escalation.approvals):
        return Decision(result={"status": "exists", "state": "open", "escalation_id": escalation.id,
                                "task": escalation.task, "mode": "extend", "by": by, "quorum": needed,
                                "approvals": names})
    if len(escalation.approvals) + 1 >= needed:
        return _beyond_signed(state, escalation, granted, by)
    approved: EscalationApproved = {"type": "escalation_approved", "id": escalation.id, "by": by,
                                    "quorum": needed}
    if role is not None:
        approved["role"] = role
    if "signature" in resolved:
        approved["signature"] = resolved["signature"]
    if "key" in resolved:
        approved["key"] = resolved["key"]
    # What this approver approved (and signed: sshsig.line_grant), as the resolution would
    # record it: the grant may not grow past it without them (_beyond_signed).
    approved["extension_micros"], approved["pool_extension_micros"] = granted
    return Decision(events=[approved],
                    result={"status": "recorded", "state": "open", "escalation_id": escalation.id,
                            "task": escalation.task, "mode": "extend", "by": by, "quorum": needed,
                            "approvals": [*names, by]})


def _beyond_signed(state: RunState, escalation: EscalationState, granted: tuple[int, int],
                   by: str) -> Decision[ResolutionAnswer] | None:
    """The refusal of a final approval granting more than an earlier approval signed for
    (:func:`~escalate.core.rules.beyond_signed`: the money spent since grew the grant), or None."""
    signed = escalation.signed_grant
    if signed is None or not beyond_signed(granted, signed):
        return None
    return fail(Conflict(
        f"cannot approve {escalation.id}: it now grants {usd(granted[0])} (pool {usd(granted[1])}), more "
        f"than the earlier approvals signed for ({usd(signed[0])}, pool {usd(signed[1])}); nothing was "
        f"written — the earlier approvers must approve the larger amount: the requester withdraws it "
        f"('escalate withdraw {state.run_id} {escalation.id}') and asks again, for as much or less",
        code="grant_beyond_approvals", escalation_id=escalation.id, task=escalation.task, by=by,
        state="open"))


def unknown_escalation(run_id: str, escalation_id: str) -> InputError:
    """The error for an escalation id that run ``run_id`` does not have (exit 2)."""
    return InputError(f"no escalation {escalation_id} in run {run_id}; list them with "
                      f"'escalate escalations --run {run_id}'",
                      code="unknown_escalation", escalation_id=escalation_id)


def _not_allowed(state: RunState, escalation: EscalationState, mode: str, by: str,
                 pool: PoolView | None, role: str | None, roles: bool) -> Refused | None:
    """Why ``by`` may not resolve ``escalation`` as ``mode``, or None. Asked before the
    first-resolution-wins answer: who won tells nothing to someone who may not resolve.
    ``by`` is who resolves (a library caller may resolve for a person under its own actor);
    names are claimed, the ``role`` is vouched for by the store (docs/escalation.md, "Who
    is who")."""
    facts: dict[str, Any] = {"escalation_id": escalation.id, "task": escalation.task, "by": by,
                             "requested_by": escalation.requested_by}
    if mode == "withdraw":
        same = same_person(escalation.requested_by, escalation.requested_role, by, role,
                           vouched_match(state.policy, roles))
        if escalation.requested_by is not None and not same:
            return Refused(
                f"cannot withdraw {escalation.id}: only {escalation.requested_by}, who asked, may "
                f"withdraw it" + (f" (a release of task {escalation.task} settles it too)"
                                  if escalation.kind == "increase" else ""),
                code="not_the_requester", **facts)
        return None
    if pool is not None and pool.policy.approvers and _the_pools(pool, escalation, mode):
        threshold = usd(pool.policy.approval_threshold_micros or 0)
        why = "" if escalation.reason == "pool_cap" else \
            f"over pool {pool.pool_id}'s approval threshold {threshold}; "
        return _not_an_approver(state, escalation, by, role, (pool.policy, roles), "pool", pool.pool_id, why)
    # (A pool that names no approvers lets anyone decide its checks, but not lift its member's
    # own list: the stricter of the two holds.)
    return _not_an_approver(state, escalation, by, role, (state.policy, roles), "run", state.run_id)


def _the_pools(pool: PoolView, escalation: EscalationState, mode: str) -> bool:
    """Whether ``escalation`` on a member run is its pool's approvers' to resolve as ``mode``:
    the pool's check opened it, or, for a grant, the pool's enforced threshold is under what
    it asks now (a threshold set or lowered since, or a log from before a pool's policy bound
    its members: granting it is then theirs, as if the pool's check had opened it)."""
    return escalation.reason == "pool_cap" or (
        mode == "extend" and pool.policy.mode == "enforce"
        and over_threshold(pool.policy.approval_threshold_micros, escalation.requested_micros))


def _not_an_approver(state: RunState, escalation: EscalationState, by: str, role: str | None,
                     deciding: tuple[Policy, bool], kind: str, ledger_id: str,
                     why: str = "") -> Refused | None:
    """Why ``by`` (acting as ``role``) may not resolve ``escalation`` as one of the approvers
    of ``kind`` (run, pool) ``ledger_id``, or None. ``deciding``: that ledger's policy, and
    whether the store's approver lists name database roles; ``why``: what makes it theirs,
    when that is not plain. Who is the requester: :func:`~escalate.core.rules.same_person`."""
    facts: dict[str, Any] = {"escalation_id": escalation.id, "task": escalation.task, "by": by,
                             "requested_by": escalation.requested_by}
    policy, roles = deciding
    approvers = policy.approvers
    same = same_person(escalation.requested_by, escalation.requested_role, by, role,
                       vouched_match(policy, roles))
    who = why + (f"approvers: {', '.join(approvers)}" if approvers else "anyone but the requester may")
    if same and by == escalation.requested_by:
        return Refused(
            f"cannot resolve {escalation.id}: {by} asked for it and may not resolve their own "
            f"escalation ({who}); ask an approver, or take it back with "
            f"'escalate withdraw {state.run_id} {escalation.id}'",
            code="self_approval", approvers=list(approvers), **facts)
    name = approver_name(policy, roles, by, role)
    if approvers and name not in approvers:
        return Refused(
            f"cannot resolve {escalation.id}: {name} is not an approver of {kind} {ledger_id} "
            f"({who}); ask one of them, or change the list with 'escalate {kind}s set "
            f"{ledger_id} --approvers'", code="not_an_approver", approvers=list(approvers),
            **facts)
    if same:
        # (Names are chosen by the client; the vouched identity is not.)
        return Refused(
            f"cannot resolve {escalation.id}: the {'database role' if roles else 'OS user'} {role} asked "
            f"for it and may not resolve its own escalation under another name ({who}); ask an "
            f"approver who acts as someone else", code="self_approval", approvers=list(approvers), **facts)
    return None


def _sign(state: RunState, escalation: EscalationState, resolved: EscalationResolved, pool: PoolView | None,
          roles: bool, signature: str | None) -> Refused | None:
    """Put :func:`signed_fields` on ``resolved`` (a person's decision), or why it is refused."""
    by, role = resolved["by"], resolved.get("role")
    keyed = pool.policy if pool is not None and escalation.reason == "pool_cap" else state.policy
    named = approver_name(keyed, roles, by, role) or by
    signed = signed_fields(state, escalation, resolved["mode"], (by, named), pool, signature, resolved)
    if isinstance(signed, Refused):
        return signed
    if "signature" in signed:
        resolved["signature"], resolved["key"] = signed["signature"], signed["key"]
    return None


def signed_fields(state: RunState, escalation: EscalationState, mode: str, names: tuple[str, str],
                  pool: PoolView | None, signature: str | None,
                  resolved: EscalationResolved) -> Signed | Refused:
    """The ``signature`` and ``key`` of a resolution line, or why it is refused: while the
    deciding policy (the pool's, for a ``pool_cap`` escalation) pins approvers' keys, a
    resolution by ``line_by`` (``names``: the name its line records, and the name keys are
    pinned for) needs a signature, naming ``line_by``, by a key pinned for ``by``
    (docs/escalation.md): the name given, or on PostgreSQL the database role, as approver
    lists name them. An approval's signature covers the grant ``resolved`` makes
    (:func:`~escalate.core.sshsig.line_grant`)."""
    line_by, by = names
    policy = pool.policy if pool is not None and escalation.reason == "pool_cap" else state.policy
    if not policy.approver_keys:
        return {}
    from escalate.core import sshsig  # (only a policy that pins keys loads it)

    facts: RefusedFacts = {"escalation_id": escalation.id, "task": escalation.task, "by": by}
    pinned = policy.approver_keys.get(by, ())
    if not pinned:
        return Refused(f"cannot resolve {escalation.id}: no key is pinned for {by} (pinned: "
                       f"{', '.join(policy.approver_keys)}); resolve under a name with a pinned key",
                       code="not_an_approver", **facts)
    if signature is None:
        return Refused(f"cannot resolve {escalation.id}: the policy pins approvers' keys, so the "
                       f"resolution must be signed; add --sign KEYFILE (your private key, or its .pub "
                       f"with ssh-agent)", code="unsigned", **facts)
    message = sshsig.canonical_content(state.run_id, escalation.id, mode, escalation.requested_micros,
                                       escalation.line_hash, line_by, sshsig.line_grant(mode, resolved))
    try:
        key = sshsig.verify(signature, message, pinned)
    except sshsig.SignatureError as exc:
        return Refused(f"cannot resolve {escalation.id}: the signature is not {by}'s over this "
                       f"resolution ({exc}); sign with a key pinned for {by} (an approval's signature covers "
                       f"the extension it grants now{_granting(resolved)})", code="bad_signature", **facts)
    return {"signature": signature, "key": key.fingerprint}


def _granting(resolved: EscalationResolved) -> str:
    """``: run $X, pool $Y``, what an approval grants (nothing for a pause or cancel)."""
    if resolved["mode"] != "extend":
        return ""
    return (f": run {usd(resolved.get('extension_micros', 0))}, pool "
            f"{usd(resolved.get('pool_extension_micros', 0))}")


def _grant(state: RunState, escalation: EscalationState, resolved: EscalationResolved, facts: dict[str, Any],
           pool: PoolView | None) -> Decision[ResolutionAnswer]:
    """``extend``: re-check the ceilings now; the reservation goes in the same write. A
    ``pool_cap`` escalation extends the pool (for this period), any other the run; a member
    run's grant must fit its pool too."""
    task = state.tasks[escalation.task]
    escalation_id = escalation.id
    before = task.reserved_micros if task.holding else 0
    delta = grant_delta(state, escalation)
    remaining = state.remaining_micros
    if over_cap(escalation.requested_micros, delta, state.task_cap_micros, remaining) == "task_cap":
        return fail(Refused(
            f"cannot approve {escalation_id}: {usd(escalation.requested_micros)} is over the task cap "
            f"{usd(state.task_cap_micros)}; pause or cancel it", code="over_task_cap", **facts))
    needed = needed_extension(delta, remaining)
    left = run_extension_left(state.policy, state.extended_micros, escalation.reason)
    if needed > left:
        return fail(Refused(
            f"cannot approve {escalation_id}: it needs an extension of {usd(needed)} but only "
            f"{usd(max(left, 0))} of the max extension is left; pause or cancel it, or raise "
            "--max-extension with 'escalate runs set'",
            code="extension_limit", needed_micros=needed, extension_left_micros=left, **facts))
    if pool is not None:
        refused = _pool_grant(pool, escalation, delta, resolved, facts)
        if refused is not None:
            return refused
    elif escalation.reason == "pool_cap":
        return fail(Refused(f"cannot approve {escalation_id}: its run is in no pool to extend; pause or "
                            "cancel it", code="extension_limit", **facts))
    resolved["extension_micros"] = needed
    if escalation.kind == "increase" and task.holding:
        grant: BudgetIncreased | BudgetReserved = {
            "type": "budget_increased", "task": escalation.task, "from_micros": before,
            "to_micros": escalation.requested_micros, "reason": f"approved {escalation_id}"}
    else:
        grant = {"type": "budget_reserved", "task": escalation.task,
                 "amount_micros": escalation.requested_micros}
    result: ResolutionAnswer = {"status": "approved", "extension_micros": needed,
                                "reserved_micros": escalation.requested_micros,
                                "escalation_id": escalation_id, "task": escalation.task, "mode": "extend",
                                "by": facts["by"]}
    if "pool_extension_micros" in resolved:
        result["pool_extension_micros"] = resolved["pool_extension_micros"]
    return Decision(events=[resolved, grant], result=result)


def grant_of(state: RunState, escalation: EscalationState, pool_left: int | None) -> tuple[int, int]:
    """The run's and the pool's extension approving ``escalation`` grants now, as
    :func:`_grant` works them out (``pool_left``: what its pool has left in this period, for
    a ``pool_cap`` escalation): what an approver signs (``Ledger.signing_content``)."""
    delta = grant_delta(state, escalation)
    pooled = 0 if pool_left is None or escalation.reason != "pool_cap" else needed_extension(delta, pool_left)
    return needed_extension(delta, state.remaining_micros), pooled


def grant_delta(state: RunState, escalation: EscalationState) -> int:
    """What approving ``escalation`` now adds to what its task holds: the money an approval
    must find room for, in the run and (for a member run) in its pool."""
    task = state.tasks.get(escalation.task)
    return escalation.requested_micros - (task.reserved_micros if task is not None and task.holding else 0)


def _pool_grant(pool: PoolView, escalation: EscalationState, delta: int, resolved: EscalationResolved,
                facts: dict[str, Any]) -> Decision[Never] | None:
    """A grant on a member run: it must fit the pool in this period (where the money
    counts); approving a ``pool_cap`` escalation may extend the pool by what this period's
    max extension has left."""
    from escalate.core.periods import period_name  # (loaded with the pool's modules; a run never loads it)

    needed, left = pool.grantable(delta)
    key = pool.current
    if needed and escalation.reason != "pool_cap":
        # A run's escalation extends the run only: the pool's max extension is not its to grant.
        remaining = pool.remaining(key)
        return fail(Refused(
            f"cannot approve {escalation.id}: pool {pool.pool_id} has {usd(max(remaining, 0))} left in "
            f"{period_name(pool.period, key)} and this grant needs {usd(delta)} of it ({usd(needed)} "
            "short); approving the run's escalation cannot extend the pool — pause or cancel it, or ask "
            f"the pool's approvers to raise its cap with 'escalate pools set {pool.pool_id}'",
            code="extension_limit", needed_micros=needed, pool_remaining_micros=remaining,
            pool=pool.pool_id, period=key, **facts))
    if needed > left:
        return fail(Refused(
            f"cannot approve {escalation.id}: pool {pool.pool_id} has {usd(pool.remaining(key))} left in "
            f"{period_name(pool.period, key)} and it needs an extension of {usd(needed)}, but only "
            f"{usd(max(left, 0))} of the pool's max extension is left for it; pause or cancel it, or "
            f"raise --max-extension with 'escalate pools set {pool.pool_id}'",
            code="extension_limit", needed_micros=needed, extension_left_micros=left, pool=pool.pool_id,
            period=key, **facts))
    if needed:
        resolved["pool_extension_micros"] = needed
    return None
