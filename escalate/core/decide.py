"""The decisions of a run's budget: a state and a request in, a :class:`Decision` out.

Reserve, increase and release (with the escalations a refusal opens), for a member run its
pool's checks too, delivery records and archiving a finished run; resolving an escalation
(and expiry) is in :mod:`escalate.core.resolve`, changing the policy in :mod:`escalate.core.policy`.
No I/O here. Each ``decide_*`` function returns the events to append, the answer, and the
error to raise *after* those events are durable (a halt is written, then reported). What
fits and what an extension needs come from :mod:`escalate.core.rules`, as in the fold.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Generic, Never, TypedDict, TypeVar

from escalate.core.events import (
    MAX_DETAIL_LENGTH,
    EscalationKind,
    EscalationReason,
    Priority,
    Resolution,
    ResolvedMode,
    add_seconds,
)
from escalate.core.money import format_usd as usd
from escalate.core.rules import (
    extension_left,
    needed_extension,
    over_cap,
    over_left,
    over_threshold,
    quorum_required,
    release_refusal,
)
from escalate.core.state import EscalationState, Policy, RunState, Task
from escalate.errors import Conflict, EscalateError, Pending, Refused

if TYPE_CHECKING:
    from escalate.core.payloads import (  # (types only: building the TypedDicts is the schema's)
        Escalation,
        EscalationResolved,
        Halt,
        Payload,
        Released,
        RunOpened,
    )
    from escalate.core.pool_state import PoolView  # (a run without a pool never loads it)
    from escalate.results import ArchiveAnswer, NotifiedAnswer, TaskAnswer

    class Shadow(TypedDict, total=False):
        """A refusal's fact: the escalation its write only recorded (shadow mode)."""

        shadow_escalation_id: str

# What a decision answers: one of the ``*Answer`` TypedDicts of :mod:`escalate.results`.
# Covariant, so that a refusal (``Decision[Never]``, :func:`fail`) is any command's decision.
R_co = TypeVar("R_co", covariant=True)


class Decision(Generic[R_co]):
    """What a request does: events to append (payloads with ``type``, as
    :mod:`escalate.core.payloads` defines them), and either the answer or an error to raise
    once those events are durable."""

    # A plain slotted class, not a dataclass: every command imports it, and a dataclass is
    # built (its methods compiled) on import.
    __slots__ = ("error", "events", "result")

    def __init__(self, events: list[Payload] | None = None, result: R_co | None = None,
                 error: EscalateError | None = None) -> None:
        self.events: list[Payload] = [] if events is None else events
        self.result = result
        self.error = error

    def answer(self) -> R_co:
        """The answer, once the events are durable; or the error, raised."""
        if self.error is not None:
            raise self.error
        if self.result is None:  # (no decide function returns neither)
            raise EscalateError("internal error: a decision with neither an answer nor an error")
        return self.result


def run_opened_payload(run_id: str, run_cap: int, task_cap: int | None, policy: Policy) -> RunOpened:
    """The first line of a run."""
    return {
        "type": "run_opened",
        "run": run_id,
        "run_cap_micros": run_cap,
        "task_cap_micros": run_cap if task_cap is None else task_cap,
        "escalation": policy.to_json(),
    }


def decide_notified(state: RunState, escalation_id: str, ok: bool, detail: str) -> Decision[NotifiedAnswer]:
    """Record one delivery attempt of an escalation's notice, after the hook ran; it
    changes no money and no escalation state."""
    escalation = state.escalations.get(escalation_id)
    if escalation is None or escalation.shadow:
        return Decision(result={"status": "unknown"})
    attempt = escalation.notify_attempts + 1
    return Decision(
        events=[{"type": "escalation_notified", "id": escalation_id, "attempt": attempt, "ok": ok,
                 "detail": detail[:MAX_DETAIL_LENGTH]}],
        result={"status": "recorded", "escalation_id": escalation_id, "attempt": attempt, "ok": ok,
                "detail": detail[:MAX_DETAIL_LENGTH]})


def decide_reserve(state: RunState, task_id: str, amount: int, now: str, reason: str = "",
                   priority: Priority = "normal", pool: PoolView | None = None) -> Decision[TaskAnswer]:
    """Reserve ``amount`` for a new task id (or answer a repeat of the same call); ``reason``
    and ``priority`` are for the person an escalation puts it in front of."""
    task = state.tasks.get(task_id)
    if task is not None:
        if task.state == "released":
            return fail(Conflict(
                f"task {task_id} was already released ({usd(task.actual_micros or 0)} actual); "
                "task ids are single-use — reserve under a new task id",
                task=task_id, state="released", actual_micros=task.actual_micros))
        if task.state == "halted":
            return fail(_halted(task_id, task))
        if task.holding and task.escalation_id not in state.open_escalations:
            if task.reserved_micros == amount:
                return Decision(result=_task_result(state, task_id, "exists"))
            return fail(Conflict(
                f"task {task_id} already holds {usd(task.reserved_micros)}, "
                f"not {usd(amount)}; use 'escalate increase' to raise it",
                task=task_id, state=task.state, reserved_micros=task.reserved_micros,
                requested_micros=amount))
        open_escalation = state.open_escalations.get(task.escalation_id or "")
        if open_escalation is not None:
            return _repeat_while_open(state, open_escalation, "reserve", amount, pool)
    return _evaluate(state, task_id, "reserve", 0, amount, reason, now, priority, pool)


def decide_increase(state: RunState, task_id: str, to: int, now: str, reason: str = "",
                    priority: Priority = "normal", pool: PoolView | None = None) -> Decision[TaskAnswer]:
    """Raise a task's reservation to the absolute amount ``to``."""
    task = state.tasks.get(task_id)
    if task is not None and task.state == "halted":
        return fail(_halted(task_id, task))
    if task is not None and task.state == "released":
        return fail(Conflict(
            f"task {task_id} was already released; a released task cannot be increased — "
            "reserve under a new task id",
            task=task_id, state="released", actual_micros=task.actual_micros))
    open_escalation = state.open_escalations.get(task.escalation_id or "") if task else None
    if open_escalation is not None and open_escalation.kind == "increase":
        return _repeat_while_open(state, open_escalation, "increase", to, pool)
    if task is None or not task.holding:
        state_word = task.state if task else "unknown"
        return fail(Conflict(
            f"task {task_id} holds no reservation (state: {state_word}); reserve it first",
            task=task_id, state=state_word))
    if to < task.reserved_micros:
        return fail(Conflict(
            f"task {task_id} holds {usd(task.reserved_micros)}; an increase to "
            f"{usd(to)} would lower it (--to is the new absolute amount)",
            task=task_id, state=task.state, reserved_micros=task.reserved_micros, requested_micros=to))
    if to == task.reserved_micros:
        return Decision(result=_task_result(state, task_id, "exists"))
    return _evaluate(state, task_id, "increase", task.reserved_micros, to, reason, now, priority, pool)


def decide_release(state: RunState, task_id: str, actual: int, by: str,
                   pool: PoolView | None) -> Decision[TaskAnswer]:
    """Settle a task's reservation with what it actually cost (refused only past the limit on
    totals). An open escalation of the task is closed first, as ``withdraw`` by ``by``, in the
    same write: the money is spent, and nobody waits on a person to record it."""
    task = state.tasks.get(task_id)
    if task is not None and task.state == "released":
        if task.actual_micros == actual:
            return Decision(result=_task_result(state, task_id, "exists"))
        return fail(Conflict(
            f"task {task_id} was already released with {usd(task.actual_micros or 0)} "
            f"actual, not {usd(actual)}; the first release stands — check the task id",
            task=task_id, state="released", actual_micros=task.actual_micros, requested_micros=actual))
    if task is None or not task.holding:
        state_word = task.state if task else "unknown"
        open_escalation = state.open_escalations.get(task.escalation_id or "") if task else None
        if open_escalation is not None:
            hint = (f"it is waiting on escalation {open_escalation.id}: wait for it with "
                    f"'escalate wait {state.run_id} {open_escalation.id}', or take the request "
                    f"back with 'escalate withdraw {state.run_id} {open_escalation.id}'")
        elif task is None:
            hint = f"reserve it first, or check the task id with 'escalate runs show {state.run_id}'"
        else:
            hint = "nothing was reserved for it, so there is nothing to release"
        return fail(Conflict(
            f"task {task_id} holds no reservation to release (state: {state_word}); {hint}",
            task=task_id, state=state_word))
    if (refused := release_refusal(state, task_id, task.reserved_micros, actual, pool)) is not None:
        return fail(refused)
    withdrawn: list[Payload] = []
    if task.escalation_id in state.open_escalations:
        withdrawn = [resolved_event(task.escalation_id, "withdraw", by)]
    event: Released = {"type": "released", "task": task_id, "reserved_micros": task.reserved_micros,
             "actual_micros": actual}
    result: TaskAnswer = {"status": "released", "task": task_id, "reserved_micros": task.reserved_micros,
              "actual_micros": actual,
              "remaining_micros": state.remaining_micros + task.reserved_micros - actual}
    if task.escalation_id is not None and withdrawn:
        result["withdrawn_escalation_id"] = task.escalation_id
    return Decision(events=[*withdrawn, event], result=result)


def resolved_event(escalation_id: str, mode: ResolvedMode, by: str,
                   role: str | None = None) -> EscalationResolved:
    """An ``escalation_resolved`` line that grants nothing (``role``: the database role
    acting, on the PostgreSQL store)."""
    event: EscalationResolved = {"type": "escalation_resolved", "id": escalation_id, "mode": mode, "by": by,
                    "extension_micros": 0}
    if role is not None:
        event["role"] = role
    return event


def _evaluate(state: RunState, task_id: str, kind: EscalationKind, before: int, to: int, reason: str,
              now: str, priority: Priority, pool: PoolView | None = None) -> Decision[TaskAnswer]:
    """The cap checks and the fire rule for a reservation of ``to`` (``before`` already held):
    the run's first, then, for a member run, its pool's."""
    delta = to - before
    remaining = state.remaining_micros
    cap = over_cap(to, delta, state.task_cap_micros, remaining)
    settle = " — release it to settle what it holds" if kind == "increase" else ""
    if cap == "task_cap":
        halt: Halt = {"type": "halt", "task": task_id, "requested_micros": to,
                "remaining_micros": remaining, "reason": "task_cap"}
        return Decision(events=[halt], error=Refused(
            f"halted {task_id}: {usd(to)} is over the task cap "
            f"{usd(state.task_cap_micros)}; the task is halted for good"
            + (settle or f" — ask for at most {usd(state.task_cap_micros)} under a new task id"),
            code="over_task_cap", task=task_id, requested_micros=to,
            task_cap_micros=state.task_cap_micros, remaining_micros=remaining))
    policy = state.policy
    over_remaining = cap == "run_cap"
    over_approval = over_threshold(policy.approval_threshold_micros, to)
    events: list[Payload] = []
    request = Request(task_id, kind, before, to, reason, priority, now)
    pooled = _pool_escalation(state, pool, request, over_remaining)
    if pooled is not None and not pooled["shadow"]:  # the pool's check binds the run: its approvers decide
        return Decision(events=[pooled], error=_pending(state, pooled, new=True, pool=pool))
    if policy.mode != "off" and (over_remaining or over_approval):
        needed = needed_extension(delta, remaining)
        left = extension_left(policy.max_extension_micros, state.extended_micros)
        escalation = _escalation_event(state, request, remaining,
                                       "run_cap" if over_remaining else "threshold", needed, left, policy)
        events.append(escalation)
        if policy.mode == "enforce":
            return Decision(events=events, error=_pending(state, escalation, new=True))
    if over_remaining:
        events.append({"type": "halt", "task": task_id, "requested_micros": to,
                       "remaining_micros": remaining, "reason": "run_cap"})
        return Decision(events=events, error=Refused(
            f"halted {task_id}: asked for {usd(delta)} with {usd(remaining)} "
            f"left of the {usd(state.cap_micros)} cap; the task is halted for good"
            + (settle or " — ask for less under a new task id"),
            code="over_budget", task=task_id, requested_micros=to, remaining_micros=remaining,
            cap_micros=state.cap_micros, **_shadow(events)))
    refused = None if pool is None else _pool_refusal(pool, request, events, pooled)
    if refused is not None:
        return refused
    if kind == "reserve":
        events.append({"type": "budget_reserved", "task": task_id, "amount_micros": to})
        status = "reserved"
    else:
        events.append({"type": "budget_increased", "task": task_id, "from_micros": before,
                       "to_micros": to, "reason": reason})
        status = "increased"
    return Decision(events=events, result=_fitted(status, request, remaining, events, pool))


def _fitted(status: str, request: Request, remaining: int, events: list[Payload],
            pool: PoolView | None) -> TaskAnswer:
    """The answer to ``request`` when it fits (``remaining``: the run's before it): the shadow
    escalation it recorded, if any, and for a member run what is left of its pool."""
    delta = request.to - request.before
    result: TaskAnswer = {"status": status, "task": request.task, "reserved_micros": request.to,
                          "remaining_micros": remaining - delta}
    first = events[0]
    if len(events) > 1 and first["type"] == "escalation":  # one only recorded (shadow)
        result["shadow_escalation_id"] = first["id"]
    if pool is not None:
        result["pool_remaining_micros"] = pool.remaining(pool.current) - delta
        result["pool"] = pool.pool_id
        result["pool_escalation"] = pool.policy.to_json()
    return result


class Request:
    """A reservation asked for: ``to`` in all for ``task``, ``before`` of it already held."""

    # A plain slotted class, not a NamedTuple: every command imports it, and a NamedTuple is
    # built on import (each annotation compiled from its text, its methods generated).
    __slots__ = ("before", "kind", "now", "priority", "reason", "task", "to")

    def __init__(self, task: str, kind: EscalationKind, before: int, to: int, reason: str,
                 priority: Priority, now: str) -> None:
        self.task = task
        self.kind = kind
        self.before = before
        self.to = to
        self.reason = reason
        self.priority = priority
        self.now = now


def _shadow(events: list[Payload]) -> Shadow:
    """The refusal's fact naming the escalation this write only recorded (shadow), if any:
    then it is the first of more than one line."""
    first = events[0]
    return {"shadow_escalation_id": first["id"]} if len(events) > 1 and first["type"] == "escalation" else {}


def _pool_escalation(state: RunState, pool: PoolView | None, request: Request,
                     over_run: bool) -> Escalation | None:
    """The escalation (reason ``pool_cap``) the pool's policy opens for ``request``: over what
    is left of the pool in this period, or over the pool's approval threshold. None:
    no pool, or its check does not fire (or its mode is off). The pool's policy binds its
    members: enforced, its check is its approvers' to decide whatever the run's own mode
    or threshold. ``over_run``: the request is over its run's own cap too, which approving
    a ``pool_cap`` escalation never extends; a run that does not escalate then halts first
    (nothing is asked of anyone)."""
    if pool is None or (over_run and state.policy.mode != "enforce"):
        return None
    key = pool.current
    left = pool.remaining(key)
    delta = request.to - request.before
    policy = pool.policy
    if policy.mode == "off" or not (over_left(delta, left) or over_threshold(policy.approval_threshold_micros,
                                                                           request.to)):
        return None
    needed, grantable = pool.grantable(delta)
    blocked = (f"it is over run {state.run_id}'s own cap, which an approval for the pool cannot extend"
               if over_run else None)
    escalation = _escalation_event(state, request, left, "pool_cap", needed, grantable, policy, blocked)
    escalation["pool"] = pool.pool_id
    return escalation


def _pool_refusal(pool: PoolView, request: Request, events: list[Payload],
                  pooled: Escalation | None) -> Decision[Never] | None:
    """The pool's checks, once the run's passed and the pool's escalation (``pooled``) is
    one only recorded (shadow, and only if this write records no other): over what is left
    of the pool in this period, the task halts (reason ``pool_cap``). None: it fits."""
    if pooled is not None and not events:
        events.append(pooled)
    key = pool.current
    left = pool.remaining(key)
    delta = request.to - request.before
    if not over_left(delta, left):
        return None
    events.append({"type": "halt", "task": request.task, "requested_micros": request.to,
                   "remaining_micros": left, "reason": "pool_cap"})
    from escalate.core.periods import period_name  # (loaded with the pool's modules; a run never loads it)

    settle = (" — release it to settle what it holds" if request.kind == "increase"
              else " — ask for less under a new task id")
    return Decision(events=events, error=Refused(
        f"halted {request.task}: asked for {usd(delta)} with {usd(left)} left of pool {pool.pool_id}'s "
        f"{usd(pool.cap_in(key))} cap in {period_name(pool.period, key)}; the task is halted for "
        f"good{settle}",
        code="over_pool_budget", task=request.task, requested_micros=request.to, remaining_micros=left,
        pool=pool.pool_id, period=key, cap_micros=pool.cap_in(key), **_shadow(events)))


def _escalation_event(state: RunState, request: Request, remaining: int, reason: EscalationReason,
                      needed: int, left: int, policy: Policy, blocked: str | None = None) -> Escalation:
    """The ``escalation`` line for ``request``: the extension it needs, what of the max
    extension is ``left``, and the deadline of the ``policy`` that governs it; ``blocked``:
    why no approval can grant it (``extend`` is then not offered)."""
    shadow = policy.mode == "shadow"
    offered: list[Resolution] = (["extend", "pause", "cancel"] if needed <= left and blocked is None
                                 else ["pause", "cancel"])
    timeout = policy.timeout_s
    event: Escalation = {
        "type": "escalation",
        # An escalation is always the first event of its decision, so its id names the line
        # it is written on and is unique in the run.
        "id": f"esc-{state.seq + 1}",
        "task": request.task,
        "kind": request.kind,
        "from_micros": request.before,
        "requested_micros": request.to,
        "remaining_micros": remaining,
        "reason": reason,
        "offered": offered,
        "needed_extension_micros": needed,
        "expires_at": None if shadow or timeout is None else add_seconds(request.now, timeout),
        "shadow": shadow,
    }
    if blocked is not None:
        event["note"] = f"extend not offered: {blocked}"
    elif needed > left:
        event["note"] = (f"extend not offered: needs {usd(needed)} but only {usd(max(left, 0))} "
                         "of the max extension is left"
                         + (" in this period" if reason == "pool_cap" else ""))
    event["request_reason"] = request.reason
    event["priority"] = request.priority
    # The quorum that applies as it fires binds it (docs/escalation.md, "Quorum"): lowering
    # the policy afterwards lets nobody grant it alone. A pool's escalation needs the run's too.
    quorum = quorum_required((state.policy, policy), needed)
    if quorum > 1 and not shadow:
        event["quorum"] = quorum
    return event


_WHY = {"run_cap": "over the remaining budget", "threshold": "over the approval threshold",
        "pool_threshold": "over the pool's approval threshold"}


def fired_limit(data: Mapping[str, Any]) -> str:
    """Which limit an escalation fired on: its ``reason``, except that a ``pool_cap`` one
    needing no extension when asked fired on the pool's approval threshold
    (``pool_threshold``), not on what the pool had left."""
    if data["reason"] == "pool_cap" and not data.get("needed_extension_micros", 0):
        return "pool_threshold"
    return str(data["reason"])


def _why(data: Mapping[str, Any]) -> str:
    """Why a person is asked (:func:`fired_limit` in words)."""
    fired = fired_limit(data)
    if fired == "pool_cap":
        return f"over the pool's remaining budget: {usd(data['remaining_micros'])} left"
    return _WHY.get(fired, fired)


def _pending(state: RunState, escalation: Escalation | EscalationState, *, new: bool,
             pool: PoolView | None = None) -> Pending:
    """The answer to a request that waits on ``escalation``; ``pool``: the run's, whose
    approvers decide a ``pool_cap`` escalation (the run's own, when it names none): the
    answer names them."""
    data = escalation.to_json() if isinstance(escalation, EscalationState) else escalation
    note = data.get("note") or ""
    verb = "escalated" if new else "still waiting on"
    deciders: dict[str, Any] = {}
    if pool is not None and data["reason"] == "pool_cap":
        deciders = {"pool": pool.pool_id, "approvers": list(pool.policy.approvers or state.policy.approvers)}
    return Pending(
        f"{verb} {data['task']}: {usd(data['requested_micros'])} needs a person "
        f"({_why(data)}); "
        f"escalation {data['id']} offers {'/'.join(data['offered'])}"
        + (f" ({note})" if note else "")
        + f" — run 'escalate wait {state.run_id} {data['id']}' or ask an approver"
        + (f" of pool {deciders['pool']} ({', '.join(deciders['approvers']) or 'anyone but the requester'})"
           if deciders else ""),
        code="escalation_open", escalation_id=data["id"], task=data["task"],
        requested_micros=data["requested_micros"], remaining_micros=data["remaining_micros"],
        offered=list(data["offered"]), expires_at=data["expires_at"], **deciders)


def _repeat_while_open(state: RunState, escalation: EscalationState, kind: str, amount: int,
                       pool: PoolView | None) -> Decision[Never]:
    if escalation.kind == kind and escalation.requested_micros == amount:
        return fail(_pending(state, escalation, new=False, pool=pool))
    return fail(Conflict(
        f"task {escalation.task} has open escalation {escalation.id} for "
        f"{usd(escalation.requested_micros)}, not {usd(amount)}; "
        "wait for its resolution", task=escalation.task, escalation_id=escalation.id,
        requested_micros=amount, escalated_micros=escalation.requested_micros))


def _halted(task_id: str, task: Task) -> Refused:
    code = "cancelled" if task.halt_reason == "cancelled" else "halted"
    hint = " — release it to settle what it holds" if task.holding else ""
    return Refused(f"task {task_id} was halted ({task.halt_reason}) and is terminal; "
                   f"use a new task id{hint}", code=code, task=task_id, state="halted",
                   reason=task.halt_reason)


def fail(error: EscalateError) -> Decision[Never]:
    """A decision that writes nothing and raises ``error``."""
    return Decision(error=error)


def _task_result(state: RunState, task_id: str, status: str) -> TaskAnswer:
    task = state.tasks[task_id]
    return {"status": status, "task": task_id, "reserved_micros": task.reserved_micros,
            "actual_micros": task.actual_micros, "remaining_micros": state.remaining_micros}


def decide_archive(state: RunState) -> Decision[ArchiveAnswer]:
    """Retire a finished run (``run_archived``; a repeat writes nothing). A run that still
    holds reservations or has an escalation open is not finished: :class:`Conflict` naming them."""
    if state.archived:
        return Decision(result={"status": "exists", "archived": True})
    held = sorted(task_id for task_id, task in state.tasks.items() if task.holding)
    waiting = sorted(state.open_escalations)
    if held or waiting:
        what = "; ".join(part for part in (
            held and f"tasks holding reservations: {', '.join(held[:5])}" + (" …" if len(held) > 5 else ""),
            waiting and f"open escalations: {', '.join(waiting[:5])}" + (" …" if len(waiting) > 5 else ""))
            if part)
        return fail(Conflict(f"run {state.run_id} is not finished ({what}); release its tasks and resolve "
                             "its escalations, then archive it", code="not_finished", state="unfinished",
                             held=held, escalations=waiting))
    return Decision(events=[{"type": "run_archived"}], result={"status": "archived", "archived": True})
