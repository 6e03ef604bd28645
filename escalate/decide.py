"""The decisions: a state and a request in, a :class:`Decision` out.

No I/O here. Each ``decide_*`` function returns the events to append, the answer, and the
error to raise *after* those events are durable (a halt is written, then reported). What
fits and what an extension needs come from :mod:`escalate.rules`, as in the fold.

One action, three words: a person *approves* an escalation (the command), which writes
the resolution mode ``extend`` (the wire format) and answers ``approved`` (the result).
In code names it is a *grant*.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from escalate.errors import Conflict, EscalateError, InputError, Pending, Refused
from escalate.events import MAX_DETAIL_LENGTH, Event, add_seconds, parse_ts
from escalate.money import format_usd as usd
from escalate.rules import extension_left, needed_extension, over_cap
from escalate.state import EscalationState, Policy, RunState, Task


@dataclass(slots=True)
class Decision:
    """What a request does: events to append (payloads with ``type``), the answer, and an
    error to raise once those events are durable."""

    events: list[Event] = field(default_factory=list)
    result: dict[str, Any] = field(default_factory=dict)
    error: EscalateError | None = None


def run_opened_payload(run_id: str, run_cap: int, task_cap: int | None, policy: Policy) -> Event:
    """The first line of a run."""
    return {
        "type": "run_opened",
        "run": run_id,
        "run_cap_micros": run_cap,
        "task_cap_micros": run_cap if task_cap is None else task_cap,
        "escalation": policy.to_json(),
    }


def expire(state: RunState, now: str) -> list[Event]:
    """Resolutions (``pause`` by ``timeout``) for open escalations that :func:`is_expired`
    by ``now``, the writer's own clock."""
    return [
        {"type": "escalation_resolved", "id": e.id, "mode": "pause", "by": "timeout",
         "extension_micros": 0}
        for e in state.open_escalations.values()
        if is_expired(e, state.policy, now)
    ]


def is_expired(escalation: EscalationState, policy: Policy, now: str) -> bool:
    """True when ``escalation`` is past ``expires_at`` by ``now`` (a writer's own clock), or
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


# Re-delivering a failed notice: 1 min after the failure, then 2, 4 … at most 1 h apart.
RETRY_FIRST_S = 60
RETRY_MAX_S = 3600


def retry_delay_s(failures: int) -> int:
    """How long after its ``failures``-th failed delivery a notice is sent again."""
    return min(RETRY_FIRST_S << min(max(failures - 1, 0), 16), RETRY_MAX_S)


def delivery_due(escalation: EscalationState, policy: Policy, now: str) -> bool:
    """Whether ``sweep`` should send an open escalation's notice again by ``now``: after a
    failed attempt when its backoff has passed; after a delivered one every
    ``renotify_every_s`` (when the policy sets it); never attempted (no hook was set, or
    its writer died first) a minute after it opened, so a request being delivered right
    now is not sent twice."""
    if escalation.shadow or escalation.state != "open":
        return False
    if escalation.notified_at is None:
        last, delay = escalation.opened_at, RETRY_FIRST_S
    elif escalation.notified_ok:
        if policy.renotify_every_s is None:
            return False
        last, delay = escalation.notified_at, policy.renotify_every_s
    else:
        # Counted from the last delivery: reminders that went through are no failures.
        last, delay = escalation.notified_at, retry_delay_s(escalation.failed_in_a_row)
    try:
        return add_seconds(last, delay) <= now
    except ValueError:  # a timestamp no escalate wrote: deliver rather than stay silent
        return True


def decide_notified(state: RunState, escalation_id: str, ok: bool, detail: str) -> Decision:
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
                   priority: str = "normal") -> Decision:
    """Reserve ``amount`` for a new task id (or answer a repeat of the same call); ``reason``
    and ``priority`` are for the person an escalation puts it in front of."""
    task = state.tasks.get(task_id)
    if task is not None:
        if task.state == "released":
            return _fail(Conflict(
                f"task {task_id} was already released ({usd(task.actual_micros or 0)} actual); "
                "task ids are single-use — reserve under a new task id",
                task=task_id, state="released", actual_micros=task.actual_micros))
        if task.state == "halted":
            return _fail(_halted(task_id, task))
        if task.holding and task.escalation_id not in state.open_escalations:
            if task.reserved_micros == amount:
                return Decision(result=_task_result(state, task_id, "exists"))
            return _fail(Conflict(
                f"task {task_id} already holds {usd(task.reserved_micros)}, "
                f"not {usd(amount)}; use 'escalate increase' to raise it",
                task=task_id, state=task.state, reserved_micros=task.reserved_micros,
                requested_micros=amount))
        open_escalation = state.open_escalations.get(task.escalation_id or "")
        if open_escalation is not None:
            return _repeat_while_open(state, open_escalation, "reserve", amount)
    return _evaluate(state, task_id, "reserve", 0, amount, reason, now, priority)


def decide_increase(state: RunState, task_id: str, to: int, reason: str, now: str,
                    priority: str = "normal") -> Decision:
    """Raise a task's reservation to the absolute amount ``to``."""
    task = state.tasks.get(task_id)
    if task is not None and task.state == "halted":
        return _fail(_halted(task_id, task))
    if task is not None and task.state == "released":
        return _fail(Conflict(
            f"task {task_id} was already released; a released task cannot be increased — "
            "reserve under a new task id",
            task=task_id, state="released", actual_micros=task.actual_micros))
    open_escalation = state.open_escalations.get(task.escalation_id or "") if task else None
    if open_escalation is not None and open_escalation.kind == "increase":
        return _repeat_while_open(state, open_escalation, "increase", to)
    if task is None or not task.holding:
        state_word = task.state if task else "unknown"
        return _fail(Conflict(
            f"task {task_id} holds no reservation (state: {state_word}); reserve it first",
            task=task_id, state=state_word))
    if to < task.reserved_micros:
        return _fail(Conflict(
            f"task {task_id} holds {usd(task.reserved_micros)}; an increase to "
            f"{usd(to)} would lower it (--to is the new absolute amount)",
            task=task_id, state=task.state, reserved_micros=task.reserved_micros, requested_micros=to))
    if to == task.reserved_micros:
        return Decision(result=_task_result(state, task_id, "exists"))
    return _evaluate(state, task_id, "increase", task.reserved_micros, to, reason, now, priority)


def decide_release(state: RunState, task_id: str, actual: int, by: str) -> Decision:
    """Settle a task's reservation with what it actually cost (never refused for size).
    An open escalation of the task is closed first, as ``withdraw`` by ``by``, in the same
    write: the money is spent, and nobody waits on a person to record it."""
    task = state.tasks.get(task_id)
    if task is not None and task.state == "released":
        if task.actual_micros == actual:
            return Decision(result=_task_result(state, task_id, "exists"))
        return _fail(Conflict(
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
        return _fail(Conflict(
            f"task {task_id} holds no reservation to release (state: {state_word}); {hint}",
            task=task_id, state=state_word))
    withdrawn: list[Event] = []
    if task.escalation_id in state.open_escalations:
        withdrawn = [_resolved_event(task.escalation_id, "withdraw", by)]
    event = {"type": "released", "task": task_id, "reserved_micros": task.reserved_micros,
             "actual_micros": actual}
    result = {"status": "released", "task": task_id, "reserved_micros": task.reserved_micros,
              "actual_micros": actual,
              "remaining_micros": state.remaining_micros + task.reserved_micros - actual}
    if withdrawn:
        result["withdrawn_escalation_id"] = task.escalation_id
    return Decision(events=[*withdrawn, event], result=result)


def _resolved_event(escalation_id: str, mode: str, by: str, role: str | None = None) -> Event:
    event: Event = {"type": "escalation_resolved", "id": escalation_id, "mode": mode, "by": by,
                    "extension_micros": 0}
    if role is not None:
        event["role"] = role
    return event


def decide_resolution(state: RunState, escalation_id: str, mode: str, by: str,
                      role: str | None = None) -> Decision:
    """Grant (mode ``extend``, the ``approve`` command), pause or cancel an open escalation,
    or withdraw it (its requester only); the first resolution wins. Only the run's approvers
    (anyone, when it names none) may grant, pause or cancel, and never the requester.
    ``role``: the database role acting (PostgreSQL store), recorded, and the name an
    approver list is checked against."""
    escalation = state.escalations.get(escalation_id)
    if escalation is None:
        return _fail(InputError(
            f"no escalation {escalation_id} in run {state.run_id}; list them with "
            f"'escalate escalations --run {state.run_id}'",
            code="unknown_escalation", escalation_id=escalation_id))
    if escalation.shadow:
        return _fail(Conflict(
            f"escalation {escalation_id} was recorded in shadow mode and needs no resolution",
            escalation_id=escalation_id, state="resolved", mode=None))
    refusal = _not_allowed(state, escalation, mode, by, role)
    if refusal is not None:
        return _fail(refusal)
    if escalation.state == "resolved":
        facts = {"escalation_id": escalation_id, "state": "resolved", "mode": escalation.mode,
                 "by": escalation.by, "resolved_at": escalation.resolved_at}
        if escalation.mode == mode and escalation.by == by:
            return Decision(result={"status": "exists", **facts, "task": escalation.task})
        expired = (f" (it expired at {escalation.expires_at}; task {escalation.task} may ask again)"
                   if escalation.by == "timeout" else "")
        return _fail(Conflict(
            f"escalation {escalation_id} was already resolved: {escalation.mode} by "
            f"{escalation.by} at {escalation.resolved_at}{expired}; the first resolution wins — "
            "nothing to do", **facts))
    resolved = _resolved_event(escalation_id, mode, by, role)
    facts = {"escalation_id": escalation_id, "task": escalation.task, "mode": mode, "by": by}
    if mode in ("pause", "withdraw"):
        status = "paused" if mode == "pause" else "withdrawn"
        return Decision(events=[resolved], result={"status": status, **facts})
    if mode == "cancel":
        halt = {"type": "halt", "task": escalation.task, "requested_micros": escalation.requested_micros,
                "remaining_micros": state.remaining_micros, "reason": "cancelled"}
        return Decision(events=[resolved, halt], result={"status": "cancelled", **facts})
    return _grant(state, escalation, resolved, facts)


def _not_allowed(state: RunState, escalation: EscalationState, mode: str, by: str,
                 role: str | None) -> Refused | None:
    """Why ``by`` may not resolve ``escalation`` as ``mode``, or None. Asked before the
    first-resolution-wins answer: who won tells nothing to someone who may not resolve.
    ``by`` is who resolves (a library caller may resolve for a person under its own actor);
    names are claimed, not authenticated, on the file store (docs/escalation.md)."""
    facts = {"escalation_id": escalation.id, "task": escalation.task, "by": by,
             "requested_by": escalation.requested_by}
    if mode == "withdraw":
        if escalation.requested_by is not None and by != escalation.requested_by:
            return Refused(
                f"cannot withdraw {escalation.id}: only {escalation.requested_by}, who asked, may "
                f"withdraw it" + (f" (a release of task {escalation.task} settles it too)"
                                  if escalation.kind == "increase" else ""),
                code="not_the_requester", **facts)
        return None
    approvers = state.policy.approvers
    who = f"approvers: {', '.join(approvers)}" if approvers else "anyone but the requester may"
    if by == escalation.requested_by:
        return Refused(
            f"cannot resolve {escalation.id}: {by} asked for it and may not resolve their own "
            f"escalation ({who}); ask an approver, or take it back with "
            f"'escalate withdraw {state.run_id} {escalation.id}'",
            code="self_approval", approvers=list(approvers), **facts)
    if approvers and (role or by) not in approvers:
        return Refused(
            f"cannot resolve {escalation.id}: {role or by} is not an approver of run {state.run_id} "
            f"({who}); ask one of them, or change the list with 'escalate runs set "
            f"{state.run_id} --approvers'", code="not_an_approver", approvers=list(approvers),
            **facts)
    return None


def _grant(state: RunState, escalation: EscalationState, resolved: Event, facts: dict[str, Any]) -> Decision:
    """``extend``: re-check the ceiling now; the reservation goes in the same write."""
    task = state.tasks[escalation.task]
    escalation_id = escalation.id
    before = task.reserved_micros if task.holding else 0
    delta = escalation.requested_micros - before
    remaining = state.remaining_micros
    if over_cap(escalation.requested_micros, delta, state.task_cap_micros, remaining) == "task_cap":
        return _fail(Refused(
            f"cannot approve {escalation_id}: {usd(escalation.requested_micros)} is over the task cap "
            f"{usd(state.task_cap_micros)}; pause or cancel it", code="over_task_cap", **facts))
    needed = needed_extension(delta, remaining)
    left = extension_left(state.policy.max_extension_micros, state.extended_micros)
    if needed > left:
        return _fail(Refused(
            f"cannot approve {escalation_id}: it needs an extension of {usd(needed)} but only "
            f"{usd(max(left, 0))} of the max extension is left; pause or cancel it, or raise "
            "--max-extension with 'escalate runs set'",
            code="extension_limit", needed_micros=needed, extension_left_micros=left, **facts))
    resolved["extension_micros"] = needed
    if escalation.kind == "increase" and task.holding:
        grant: Event = {"type": "budget_increased", "task": escalation.task, "from_micros": before,
                        "to_micros": escalation.requested_micros, "reason": f"approved {escalation_id}"}
    else:
        grant = {"type": "budget_reserved", "task": escalation.task,
                 "amount_micros": escalation.requested_micros}
    return Decision(events=[resolved, grant],
                    result={"status": "approved", "extension_micros": needed,
                            "reserved_micros": escalation.requested_micros, **facts})


def decide_policy(state: RunState, policy: Policy, by: str | None = None,
                  role: str | None = None) -> Decision:
    """Change the run's escalation policy (recorded as ``policy_changed``). Once a run names
    its approvers, only they may change it: otherwise anyone could add themselves (``role``:
    the database role acting, recorded, and checked instead of ``by``)."""
    if policy == state.policy:
        return Decision(result={"status": "exists", "escalation": policy.to_json()})
    approvers = state.policy.approvers
    if approvers and (role or by) not in approvers:
        return _fail(Refused(
            f"cannot change the escalation policy of run {state.run_id}: {role or by} is not one of its "
            f"approvers ({', '.join(approvers)}); ask one of them to run 'escalate runs set'",
            code="not_an_approver", by=by, approvers=list(approvers)))
    if policy.max_extension_micros < state.extended_micros:
        return _fail(Conflict(
            f"max extension {usd(policy.max_extension_micros)} is below the "
            f"{usd(state.extended_micros)} already granted; set --max-extension to at least "
            f"{usd(state.extended_micros)}", extended_micros=state.extended_micros))
    changed: Event = {"type": "policy_changed", "escalation": policy.to_json()}
    if role is not None:
        changed["role"] = role
    return Decision(events=[changed], result={"status": "changed", "escalation": policy.to_json()})


def _evaluate(state: RunState, task_id: str, kind: str, before: int, to: int, reason: str,
              now: str, priority: str) -> Decision:
    """The cap checks and the fire rule for a reservation of ``to`` (``before`` already held)."""
    delta = to - before
    remaining = state.remaining_micros
    cap = over_cap(to, delta, state.task_cap_micros, remaining)
    settle = " — release it to settle what it holds" if kind == "increase" else ""
    if cap == "task_cap":
        halt = {"type": "halt", "task": task_id, "requested_micros": to,
                "remaining_micros": remaining, "reason": "task_cap"}
        return Decision(events=[halt], error=Refused(
            f"halted {task_id}: {usd(to)} is over the task cap "
            f"{usd(state.task_cap_micros)}; the task is halted for good"
            + (settle or f" — ask for at most {usd(state.task_cap_micros)} under a new task id"),
            code="over_task_cap", task=task_id, requested_micros=to,
            task_cap_micros=state.task_cap_micros, remaining_micros=remaining))
    policy = state.policy
    over_remaining = cap == "run_cap"
    over_threshold = policy.approval_threshold_micros is not None and to > policy.approval_threshold_micros
    events: list[Event] = []
    if policy.mode != "off" and (over_remaining or over_threshold):
        escalation = _escalation_event(state, task_id, kind, before, to, remaining, over_remaining,
                                       shadow=policy.mode == "shadow", now=now)
        escalation["request_reason"] = reason
        escalation["priority"] = priority
        events.append(escalation)
        if policy.mode == "enforce":
            return Decision(events=events, error=_pending(state.run_id, escalation, new=True))
    if over_remaining:
        events.append({"type": "halt", "task": task_id, "requested_micros": to,
                       "remaining_micros": remaining, "reason": "run_cap"})
        return Decision(events=events, error=Refused(
            f"halted {task_id}: asked for {usd(delta)} with {usd(remaining)} "
            f"left of the {usd(state.cap_micros)} cap; the task is halted for good"
            + (settle or " — ask for less under a new task id"),
            code="over_budget", task=task_id, requested_micros=to, remaining_micros=remaining,
            cap_micros=state.cap_micros,
            **({"shadow_escalation_id": events[0]["id"]} if len(events) > 1 else {})))
    if kind == "reserve":
        events.append({"type": "budget_reserved", "task": task_id, "amount_micros": to})
        status = "reserved"
    else:
        events.append({"type": "budget_increased", "task": task_id, "from_micros": before,
                       "to_micros": to, "reason": reason})
        status = "increased"
    return Decision(events=events, result={
        "status": status, "task": task_id, "reserved_micros": to,
        "remaining_micros": remaining - delta,
        **({"shadow_escalation_id": events[0]["id"]} if len(events) > 1 else {})})


def _escalation_event(state: RunState, task_id: str, kind: str, before: int, to: int,
                      remaining: int, over_remaining: bool, *, shadow: bool, now: str) -> Event:
    needed = needed_extension(to - before, remaining)
    left = extension_left(state.policy.max_extension_micros, state.extended_micros)
    offered = ["extend", "pause", "cancel"] if needed <= left else ["pause", "cancel"]
    timeout = state.policy.timeout_s
    event: Event = {
        "type": "escalation",
        # An escalation is always the first event of its decision, so its id names the line
        # it is written on and is unique in the run.
        "id": f"esc-{state.seq + 1}",
        "task": task_id,
        "kind": kind,
        "from_micros": before,
        "requested_micros": to,
        "remaining_micros": remaining,
        "reason": "run_cap" if over_remaining else "threshold",
        "offered": offered,
        "needed_extension_micros": needed,
        "expires_at": None if shadow or timeout is None else add_seconds(now, timeout),
        "shadow": shadow,
    }
    if needed > left:
        event["note"] = (f"extend not offered: needs {usd(needed)} but only {usd(max(left, 0))} "
                         "of the max extension is left")
    return event


def _pending(run_id: str, escalation: Event | EscalationState, *, new: bool) -> Pending:
    data = escalation if isinstance(escalation, dict) else escalation.to_json()
    note = data.get("note") or ""
    verb = "escalated" if new else "still waiting on"
    return Pending(
        f"{verb} {data['task']}: {usd(data['requested_micros'])} needs a person "
        f"({'over the remaining budget' if data['reason'] == 'run_cap' else 'over the approval threshold'}); "
        f"escalation {data['id']} offers {'/'.join(data['offered'])}"
        + (f" ({note})" if note else "")
        + f" — run 'escalate wait {run_id} {data['id']}' or ask an approver",
        code="escalation_open", escalation_id=data["id"], task=data["task"],
        requested_micros=data["requested_micros"], remaining_micros=data["remaining_micros"],
        offered=list(data["offered"]), expires_at=data["expires_at"])


def _repeat_while_open(state: RunState, escalation: EscalationState, kind: str, amount: int) -> Decision:
    if escalation.kind == kind and escalation.requested_micros == amount:
        return _fail(_pending(state.run_id, escalation, new=False))
    return _fail(Conflict(
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


def _fail(error: EscalateError) -> Decision:
    return Decision(error=error)


def _task_result(state: RunState, task_id: str, status: str) -> dict[str, Any]:
    task = state.tasks[task_id]
    return {"status": status, "task": task_id, "reserved_micros": task.reserved_micros,
            "actual_micros": task.actual_micros, "remaining_micros": state.remaining_micros}


