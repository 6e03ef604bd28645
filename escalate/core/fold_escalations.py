"""The fold of escalation lines: an escalation opened, resolved, and its notice delivered.

Part of the fold (:mod:`escalate.core.fold` dispatches here): no I/O, and a line no correct
writer could append raises :class:`~escalate.core.state.RuleViolation`. The extension an
approval may grant is re-checked through :mod:`escalate.core.rules`, as the decisions check it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from escalate.core.events import (
    ESCALATION_KINDS,
    ESCALATION_REASONS,
    MAX_DETAIL_LENGTH,
    MAX_QUORUM,
    MAX_REASON_LENGTH,
    PRIORITIES,
    RESOLUTIONS,
    RESOLVED_MODES,
    TIMEOUT_ACTOR,
)
from escalate.core.fold_fields import (
    choice_field,
    id_field,
    int_field,
    name_field,
    signed_field,
    text_field,
    ts_field,
)
from escalate.core.resolve import is_expired
from escalate.core.rules import (
    beyond_signed,
    grant_quorum,
    least_signed,
    listed,
    needed_extension,
    pinned_keys,
    run_extension_left,
    same_approver,
    same_person,
)
from escalate.core.state import EscalationState, ForgedSignature, Policy, RuleViolation, RunState, Task


def apply_escalation(state: RunState, event: Mapping[str, Any]) -> None:
    """``escalation``: a request put in front of a person (or only recorded: ``shadow``)."""
    escalation_id = id_field(event, "id")
    task_id = id_field(event, "task")
    if escalation_id in state.escalations:
        raise RuleViolation(f"escalation id {escalation_id!r} used twice")
    shadow = event.get("shadow")
    if not isinstance(shadow, bool):
        raise RuleViolation("field 'shadow' must be true or false")
    offered = event.get("offered")
    if not isinstance(offered, list) or not all(type(mode) is str and mode in RESOLUTIONS
                                                for mode in offered):
        raise RuleViolation(f"field 'offered' must list modes from {', '.join(RESOLUTIONS)}")
    task = state.tasks.get(task_id)
    # Logs written before escalations named their kind: what the task held tells.
    kind = choice_field(event, "kind", ESCALATION_KINDS,
                   "increase" if task is not None and task.holding else "reserve")
    from_micros = int_field(event, "from_micros") if "from_micros" in event else 0
    requested = int_field(event, "requested_micros")
    remaining = signed_field(event, "remaining_micros")
    escalation = EscalationState(
        id=escalation_id,
        task=task_id,
        kind=kind,
        from_micros=from_micros,
        requested_micros=requested,
        remaining_micros=remaining,
        reason=choice_field(event, "reason", ESCALATION_REASONS),
        offered=offered,
        expires_at=ts_field(event, "expires_at", nullable=True),
        shadow=shadow,
        opened_at=ts_field(event, "ts"),
        requested_by=event.get("actor"),  # checked by apply, as every line's actor
        requested_role=name_field(event, "role") if "role" in event else None,
        request_reason=text_field(event, "request_reason", limit=MAX_REASON_LENGTH),
        priority=choice_field(event, "priority", PRIORITIES, "normal"),
        # Older lines did not record it: the snapshot they did record tells.
        needed_extension_micros=(int_field(event, "needed_extension_micros")
                                 if "needed_extension_micros" in event
                                 else needed_extension(requested - from_micros, remaining)),
        # The quorum that applied when it fired (older lines, and a quorum of 1: none).
        quorum=max(1, int_field(event, "quorum", limit=MAX_QUORUM)) if "quorum" in event else 1,
    )
    _check_pool_cap(state, escalation)
    state.escalations[escalation_id] = escalation
    if shadow:
        escalation.state = "resolved"
        return
    if task is not None and (task.state in ("halted", "released")
                             or task.escalation_id in state.open_escalations):
        raise RuleViolation(f"escalation of task {task_id!r}, which is {task.state}")
    state.open_escalations[escalation_id] = escalation
    if task is None:
        task = Task(state="escalated")
    task.state = "escalated"
    task.escalation_id = escalation_id
    state.tasks[task_id] = task  # (a copy was read: the table keeps rows)


def _check_pool_cap(state: RunState, escalation: EscalationState) -> None:
    """``pool_cap`` hands an escalation's decision to a pool (its keys, approvers, quorum,
    checked by its member's readers: :mod:`escalate.pools.signatures`): in a run of no pool
    it would waive the run's own rules, and no writer gives it there."""
    if escalation.reason == "pool_cap" and state.member_of is None:
        raise _damage(state, f"escalation {escalation.id} names its pool's cap, but run "
                             f"{state.run_id} is in no pool")


def apply_resolved(state: RunState, event: Mapping[str, Any]) -> None:
    """``escalation_resolved``: an open escalation granted, paused, cancelled or withdrawn."""
    escalation_id = id_field(event, "id")
    escalation = state.open_escalations.pop(escalation_id, None)
    if escalation is None:
        raise RuleViolation(f"resolution of escalation {escalation_id!r}, which is not open")
    mode = choice_field(event, "mode", RESOLVED_MODES)
    extension = int_field(event, "extension_micros")
    by = name_field(event, "by")
    # Who the store vouches resolved it (the OS user, or the database role); older lines: none.
    role = name_field(event, "role") if "role" in event else None
    if by == TIMEOUT_ACTOR:
        _check_expired(state, escalation, mode, ts_field(event, "ts"))
    elif mode != "withdraw":
        _check_resolver(state, escalation, by, role)
    pooled = int_field(event, "pool_extension_micros") if "pool_extension_micros" in event else 0
    if mode == "extend":
        _check_quorum(state, escalation, by, role, _key(event), (extension, pooled))
    if extension and mode != "extend":
        raise RuleViolation(f"a {mode} resolution cannot grant an extension")
    # The pool's extension: its bound is the pool's to check (it needs the other runs).
    if pooled and (mode != "extend" or escalation.reason != "pool_cap"):
        raise RuleViolation("only approving a pool_cap escalation can extend a pool")
    task = state.tasks[escalation.task]
    # An approval extends the cap by what the request needs beyond the remaining budget
    # now (decide_resolution), never more: more would be free money for other tasks.
    held = task.reserved_micros if task.holding else 0
    needed = needed_extension(escalation.requested_micros - held, state.remaining_micros)
    if extension > needed:
        raise RuleViolation(f"extension {extension} is more than the {needed} that escalation "
                            f"{escalation_id} needed")
    if extension > run_extension_left(state.policy, state.extended_micros, escalation.reason):
        raise RuleViolation(
            f"extension {extension} of {escalation_id}: approving a pool_cap escalation extends the pool, "
            "never the run" if escalation.reason == "pool_cap" else
            f"extension {extension} takes the run past its max extension {state.policy.max_extension_micros}")
    check_signed(state, escalation, event, mode, by)
    escalation.state = "resolved"
    escalation.mode = mode
    escalation.by = by
    escalation.resolved_role = role
    escalation.resolved_at = ts_field(event, "ts")
    escalation.extension_micros = extension
    state.extended_micros += extension
    # extend: the reservation line that follows moves the task on; pause parks it;
    # cancel is followed by its halt. withdraw: the task keeps what it holds (a release may
    # follow) or, asking for a first reservation, holds nothing and may ask again.
    if mode == "pause" or (mode == "withdraw" and not task.holding):
        task.state = "paused"
    else:
        task.state = "reserved" if task.holding else "escalated"
    state.tasks[escalation.task] = task  # (a copy was read: the table keeps rows)


def apply_approved(state: RunState, event: Mapping[str, Any]) -> None:
    """``escalation_approved``: one approval of an open escalation short of its quorum."""
    escalation_id = id_field(event, "id")
    escalation = state.open_escalations.get(escalation_id)
    if escalation is None:
        raise RuleViolation(f"approval of escalation {escalation_id!r}, which is not open")
    by = name_field(event, "by")
    role = name_field(event, "role") if "role" in event else None
    quorum = int_field(event, "quorum", limit=MAX_QUORUM)
    if quorum < 2:
        raise RuleViolation(f"an approval short of a quorum names quorum {quorum}")
    # What its signature covers, and what a grant may not exceed (older lines: not recorded).
    signed = (int_field(event, "extension_micros") if "extension_micros" in event else None,
              int_field(event, "pool_extension_micros") if "pool_extension_micros" in event else None)
    _check_resolver(state, escalation, by, role)
    key = _key(event)
    _check_quorum(state, escalation, by, role, key, (0, 0), counted=False)
    check_signed(state, escalation, event, "extend", by)  # (older lines, and unpinned runs: none)
    escalation.approvals.append({"by": by, **({"role": role} if role is not None else {}),
                                 **({"key": key} if key is not None else {})})
    escalation.quorum = max(escalation.quorum, quorum)
    if signed[0] is not None:
        escalation.signed_grant = least_signed(escalation.signed_grant, (signed[0], signed[1] or 0))


def _check_quorum(state: RunState, escalation: EscalationState, by: str, role: str | None,
                  key: str | None, granted: tuple[int, int], *, counted: bool = True) -> None:
    """An approver counts once: ``by`` (vouched as ``role``, signing with ``key``) approved
    it before, by the decisions' own rule (:func:`~escalate.core.rules.same_approver`; the
    log does not say which store wrote it: the file store's), is a line no writer appends.
    ``counted``: this approval grants ``granted`` (the run's and the pool's extension), so
    the approvals so far and it must make the run's quorum for that grant
    (:func:`~escalate.core.rules.grant_quorum`; a pool's, which this log does not hold, is
    checked by its readers), and it may not grant more than an earlier approval signed for
    (:func:`~escalate.core.rules.beyond_signed`)."""
    if any(same_approver(state.policy, False, approval, by, role, key) for approval in escalation.approvals):
        raise _damage(state, f"escalation {escalation.id!r} approved twice by {role or by!r}")
    if not counted:
        return
    if beyond_signed(granted, escalation.signed_grant):
        # (signed approvals, the pool's keys included, were passed off as approving more: a forgery)
        problem = (f"escalation {escalation.id!r} grants {granted[0]} (pool {granted[1]}), more than an "
                   f"earlier approval signed for ({escalation.signed_grant})")
        raise (ForgedSignature(problem) if any("key" in approval for approval in escalation.approvals)
               else _damage(state, problem))
    needed = grant_quorum([state.policy], escalation.needed_extension_micros, granted, escalation.quorum)
    if len(escalation.approvals) + 1 < needed:
        raise RuleViolation(f"escalation {escalation.id!r} granted with {len(escalation.approvals) + 1} "
                            f"of the {needed} approvals its run's quorum needs")


def _check_expired(state: RunState, escalation: EscalationState, mode: str, ts: str) -> None:
    """The expiry's resolution is a pause written once the escalation expired
    (:func:`~escalate.core.resolve.is_expired`, the rule that writes it, at the line's time):
    one before is a decision nobody signed, in a name no person may take. A write whose
    clock was behind the log stamps the log's last timestamp (``state.last_ts``) and may have
    expired it by the far-ahead rule at a reading the log does not hold: that one passes."""
    if mode != "pause" or not (is_expired(escalation, state.policy, ts) or ts == state.last_ts):
        raise _damage(state, f"escalation {escalation.id} resolved as {mode} by {TIMEOUT_ACTOR} at {ts}, "
                             f"before it expired (expires_at {escalation.expires_at})")


def _key(event: Mapping[str, Any]) -> str | None:
    """The fingerprint of the key that signed a decision line (checked by :func:`check_signed`)."""
    key = event.get("key")
    return key if isinstance(key, str) else None


def _damage(state: RunState, problem: str) -> RuleViolation:
    """A line no writer appends: in a run that pins approvers' keys, one that would pass
    a decision off without the signatures they require, so a forgery (exit 6 on import too)."""
    return ForgedSignature(problem) if state.policy.approver_keys else RuleViolation(problem)


def _check_resolver(state: RunState, escalation: EscalationState, by: str, role: str | None) -> None:
    """The rule the decisions apply (:func:`escalate.core.resolve.decide_resolution`), as far as
    the run's own log tells (:func:`check_resolver`). A member run's escalation may be its
    pool's to decide, by a policy this log does not hold: only two lines naming the same
    person are refused there (its pool's rule is :mod:`escalate.pools.signatures`')."""
    check_resolver(state.policy, state.member_of is None, escalation.id, escalation.requested_by,
                   escalation.requested_role, by, role)


def check_resolver(policy: Policy, deciding: bool, escalation_id: str, requested_by: str | None,
                   requested_role: str | None, by: str, role: str | None) -> None:
    """The requester never resolves (or approves) their own escalation, and the approver
    list names whoever does, by the name the writer checks (:func:`listed`: the vouched
    identity under ``approvers_match: vouched``); ``deciding``: ``policy`` is the one that
    decides the escalation (else only two lines naming the same person are refused). Raises
    :class:`RuleViolation`."""
    vouched = policy.approvers_match == "vouched" and deciding
    if same_person(requested_by, requested_role, by, role, vouched):
        raise RuleViolation(f"escalation {escalation_id!r} resolved by {role or by!r}, who asked for it")
    if deciding and policy.approvers and not listed(policy, by, role):
        raise RuleViolation(f"escalation {escalation_id!r} resolved by {role or by!r}, who is not one "
                            f"of the approvers ({', '.join(policy.approvers)})")


def check_signed(state: RunState, escalation: EscalationState, event: Mapping[str, Any], mode: str,
                 by: str) -> None:
    """While the run pins approvers' keys, a person's approve (a partial approval of a
    quorum too), pause or cancel carries an SSHSIG signature by a key pinned for ``by`` over
    the escalation's canonical content (:func:`check_signature`). A ``pool_cap`` escalation
    is the pool's to decide: its signature is checked against the pool's keys by whoever
    reads the run as its pool's member (:mod:`escalate.pools.signatures`). A line with no
    signature in a run that pins no keys (or of a ``pool_cap`` escalation) passes."""
    deciding = None if escalation.reason == "pool_cap" else state.policy
    if deciding is None or not deciding.approver_keys:
        signature, key = event.get("signature"), event.get("key")
        if "signature" in event and (type(signature) is not str or type(key) is not str):
            raise ForgedSignature("fields 'signature' and 'key' must both be text")
        return
    check_signature(deciding, "run", state.run_id, escalation.id, escalation.requested_micros,
                    escalation.line_hash, event, mode, by)


def check_signature(policy: Policy, whose: str, run_id: str, escalation_id: str, requested_micros: int,
                    line_hash: str, event: Mapping[str, Any], mode: str, by: str) -> None:
    """The one rule for a signed decision, whoever pins the keys (``whose``: ``run``, or
    ``pool P``): under ``policy``, which pins approvers' keys, a person's approve (or partial
    approval), pause or cancel of escalation ``escalation_id`` carries ``signature`` and
    ``key``, an SSHSIG signature by a key pinned for ``by`` (:func:`pinned_keys`) over the
    escalation's canonical content (:func:`escalate.core.sshsig.canonical_content`) and that
    key's fingerprint. The requester's withdraw and the expiry grant nothing and are not
    signed. An approval's signature covers the grant its line records too
    (:func:`~escalate.core.sshsig.line_grant`). Raises :class:`ForgedSignature`."""
    from escalate.core import sshsig  # (only a policy that pins keys loads it)

    signature, key = event.get("signature"), event.get("key")
    if signature is None and key is None:
        if mode == "withdraw" or (mode == "pause" and by == TIMEOUT_ACTOR):
            return  # the requester's withdrawal, or the expiry: no approver decided it
        raise ForgedSignature(f"{mode} of escalation {escalation_id} by {by} is not signed, but the "
                              f"{whose} pins approvers' keys")
    if type(signature) is not str or type(key) is not str:
        raise ForgedSignature("fields 'signature' and 'key' must both be text")
    message = sshsig.canonical_content(run_id, escalation_id, mode, requested_micros, line_hash, by,
                                       sshsig.line_grant(mode, event))
    try:
        signer = sshsig.verify(signature, message, pinned_keys(policy, by, event.get("role")))
    except sshsig.SignatureError as exc:
        raise ForgedSignature(f"the signature of {by}'s {mode} of escalation {escalation_id} does not "
                              f"check out against the keys the {whose} pins: {exc}") from None
    if signer.fingerprint != key:
        raise ForgedSignature(f"field 'key' names {key[:60]!r}, but {signer.fingerprint} signed")


def apply_notified(state: RunState, event: Mapping[str, Any]) -> None:
    """``escalation_notified``: one delivery attempt of an escalation's notice."""
    # A delivery record changes no money and no escalation state: only what a sweep needs to
    # decide whether to deliver again. Attempts are counted in order, one by one.
    escalation_id = id_field(event, "id")
    escalation = state.escalations.get(escalation_id)
    if escalation is None or escalation.shadow:
        raise RuleViolation(f"delivery of escalation {escalation_id!r}, which needs nobody or does not exist")
    attempt = int_field(event, "attempt", limit=escalation.notify_attempts + 1)
    if attempt != escalation.notify_attempts + 1:
        raise RuleViolation(f"delivery attempt {attempt} of {escalation_id!r} after attempt "
                            f"{escalation.notify_attempts}")
    ok = event.get("ok")
    if not isinstance(ok, bool):
        raise RuleViolation("field 'ok' must be true or false")
    text_field(event, "detail", limit=MAX_DETAIL_LENGTH)
    escalation.notify_attempts = attempt
    escalation.notified_at = ts_field(event, "ts")
    escalation.notified_ok = ok
    escalation.failed_in_a_row = 0 if ok else escalation.failed_in_a_row + 1
