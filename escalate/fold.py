"""The fold: a run's log, line by line, into a :class:`~escalate.state.RunState`.

No I/O here. :func:`apply` folds one event and fails closed (raises :class:`RuleViolation`)
on anything a correct writer could not have produced; the budget it re-checks through
:mod:`escalate.rules`, the same functions the decisions use, as a safety net.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from escalate.events import (
    ESCALATION_KINDS,
    ESCALATION_REASONS,
    HALT_REASONS,
    MAX_ACTOR_LENGTH,
    MAX_DETAIL_LENGTH,
    MAX_FILE_NAME_LENGTH,
    MAX_REASON_LENGTH,
    MAX_TIMEOUT_S,
    MODES,
    PRIORITIES,
    RESOLUTIONS,
    RESOLVED_MODES,
    SCHEMA_VERSION,
    TIMESTAMP_PATTERN,
    parse_ts,
)
from escalate.ids import ID_PATTERN, shown_value, valid_id
from escalate.money import MAX_MICROS
from escalate.rules import extension_left, needed_extension, over_cap, task_cap_fits
from escalate.state import EscalationState, Policy, RuleViolation, RunState, Task

_id_match = ID_PATTERN.fullmatch  # bound once: the fold checks every new task id
_TIMESTAMP = TIMESTAMP_PATTERN


def _int(event: Mapping[str, Any], key: str, *, nullable: bool = False, limit: int = MAX_MICROS) -> Any:
    value = event.get(key)
    if value is None and nullable:
        return None
    if type(value) is not int or not 0 <= value <= limit:
        raise _not_int(key, value, limit)
    return value


def _signed(event: Mapping[str, Any], key: str) -> int:
    """A signed amount (``remaining_micros`` is negative after an over-run release)."""
    value = event.get(key, 0)
    if type(value) is not int:
        raise RuleViolation(f"field {key!r} must be an integer amount in micros, got {shown_value(value)}")
    return value


def _str(event: Mapping[str, Any], key: str, *, limit: int = MAX_ACTOR_LENGTH) -> str:
    """A printable string of 1 to ``limit`` characters (names, file names): shown to people."""
    value = event.get(key)
    if type(value) is not str or not 0 < len(value) <= limit or not value.isprintable():
        raise RuleViolation(f"field {key!r} must be 1-{limit} printable characters, got {shown_value(value)}")
    return value


def _id(event: Mapping[str, Any], key: str) -> str:
    """A run, task or escalation id, by the rule of :mod:`escalate.ids`."""
    value = event.get(key)
    if not valid_id(value):
        raise RuleViolation(f"field {key!r} must be an id (1-128 of A-Z a-z 0-9 . _ : -, no '..'), "
                            f"got {shown_value(value)}")
    return value


def _timestamp(event: Mapping[str, Any], key: str, *, nullable: bool = False) -> Any:
    """A timestamp exactly as :func:`escalate.events.format_ts` writes it."""
    value = event.get(key)
    if value is None and nullable:
        return None
    if type(value) is str and _TIMESTAMP.fullmatch(value):
        try:
            parse_ts(value)
            return value
        except ValueError:
            pass
    raise RuleViolation(f"field {key!r} must be a UTC timestamp like 2026-11-23T14:00:00.123456Z, "
                        f"got {shown_value(value)}")


def _text(event: Mapping[str, Any], key: str, *, limit: int) -> str:
    """Printable text of at most ``limit`` characters, empty when absent (a reason)."""
    value = event.get(key, "")
    if type(value) is not str or len(value) > limit or not value.isprintable():
        raise RuleViolation(f"field {key!r} must be at most {limit} printable characters, "
                            f"got {shown_value(value)}")
    return value


def _choice(event: Mapping[str, Any], key: str, choices: tuple[str, ...], default: Any = None) -> Any:
    value = event.get(key, default)
    if type(value) is not str or value not in choices:
        raise RuleViolation(f"field {key!r} must be one of {', '.join(choices)}, got {shown_value(value)}")
    return value


def _policy(raw: Any) -> Policy:
    if not isinstance(raw, dict):
        raise RuleViolation("field 'escalation' must be an object")
    mode = raw.get("mode")
    if type(mode) is not str or mode not in MODES:
        raise RuleViolation(f"unknown escalation mode {shown_value(mode)}")
    return Policy(
        mode=mode,
        approval_threshold_micros=_int(raw, "approval_threshold_micros", nullable=True),
        timeout_s=_int(raw, "timeout_s", nullable=True, limit=MAX_TIMEOUT_S),
        max_extension_micros=_int(raw, "max_extension_micros"),
        approvers=_approvers(raw),
        # Absent in runs made before it existed, and in runs that never re-deliver.
        renotify_every_s=_int(raw, "renotify_every_s", nullable=True, limit=MAX_TIMEOUT_S),
    )


def _approvers(raw: dict[str, Any]) -> tuple[str, ...]:
    """``escalation.approvers``: absent or a list of actor names (empty: anyone)."""
    names = raw.get("approvers", [])
    if type(names) is not list:
        raise RuleViolation(f"field 'approvers' must be a list of names, got {shown_value(names)}")
    return tuple(_str({"approvers": name}, "approvers") for name in names)


def initial_state(event: Mapping[str, Any], this_hash: str) -> RunState:
    """Start a state from the first line of a log, which must be ``run_opened``."""
    if event.get("v") != SCHEMA_VERSION or type(event.get("v")) is not int:
        raise RuleViolation(f"unknown schema version {event.get('v')!r} (this escalate reads v1)")
    if event.get("type") != "run_opened":
        raise RuleViolation(f"the first event must be run_opened, got {event.get('type')!r}")
    if event.get("seq") != 1 or type(event.get("seq")) is not int or event.get("prev") != "":
        raise RuleViolation("run_opened must have seq 1 and an empty prev")
    run_cap = _int(event, "run_cap_micros")
    task_cap = _int(event, "task_cap_micros")
    if not task_cap_fits(task_cap, run_cap):
        raise RuleViolation(f"task cap {task_cap} is above the run cap {run_cap}")
    ts = _timestamp(event, "ts")
    state = RunState(
        run_id=_id(event, "run"),
        run_cap_micros=run_cap,
        task_cap_micros=task_cap,
        policy=_policy(event.get("escalation")),
        opened_at=ts,
        seq=1,
        last_hash=this_hash,
        last_ts=ts,
        last_actor=_str(event, "actor"),
    )
    return state


def apply(state: RunState, event: Mapping[str, Any], this_hash: str) -> None:
    """Fold one event (after the first) into ``state``; raise :class:`RuleViolation` if it is
    not what a correct writer appends next."""
    # This runs once per line of every replay: subscripts on the fast path (a missing key
    # reads as None, as ``get`` would), one dict lookup to dispatch, no helper calls.
    try:
        version, seq, prev, kind, ts, actor = (event["v"], event["seq"], event["prev"], event["type"],
                                               event["ts"], event["actor"])
    except KeyError:
        version, seq, prev, kind = event.get("v"), event.get("seq"), event.get("prev"), event.get("type")
        ts, actor = event.get("ts"), event.get("actor")
    # ``type(...) is int`` too: 1.0 and True compare equal to 1, and would be copied forward.
    if version != SCHEMA_VERSION or type(version) is not int:
        raise RuleViolation(f"unknown schema version {version!r} (this escalate reads v1)")
    if seq != state.seq + 1 or type(seq) is not int:
        raise RuleViolation(f"seq {seq!r} where {state.seq + 1} was expected")
    if prev != state.last_hash:
        raise RuleViolation(
            f"prev {prev!r} does not match the previous line's hash "
            f"{state.last_hash!r} (a line was edited, removed or inserted)"
        )
    try:
        handler = _APPLY[kind]
    except (KeyError, TypeError):  # TypeError: an unhashable type, such as a list
        raise RuleViolation(f"unknown event type {shown_value(kind)}") from None
    # Consecutive lines mostly share their actor: check it only when it changes. A line's
    # ts is checked where the fold keeps it (run_opened, escalation, escalation_resolved);
    # on other lines nothing reads it, and runs verify checks it against the schema.
    if actor != state.last_actor:
        state.last_actor = _str(event, "actor")
    handler(state, event)
    state.seq = seq
    state.last_hash = this_hash
    state.last_ts = ts


def apply_payload(state: RunState, event: Mapping[str, Any]) -> None:
    """Fold an event's payload, without the envelope checks of :func:`apply`."""
    kind = event.get("type")
    handler = _APPLY.get(kind) if isinstance(kind, str) else None
    if handler is None:
        raise RuleViolation(f"unknown event type {kind!r}")
    handler(state, event)


# The payload handlers check their fields inline (``type(x) is int``), in the order the
# messages name them; these build the messages.


def _not_int(key: str, value: Any, limit: int = MAX_MICROS) -> RuleViolation:
    return RuleViolation(f"field {key!r} must be a non-negative integer of at most {limit}, "
                         f"got {shown_value(value)}")


def _not_task(task_id: Any) -> RuleViolation:
    return RuleViolation("field 'task' must be an id (1-128 of A-Z a-z 0-9 . _ : -, no '..'), "
                         f"got {shown_value(task_id)}")


def _apply_reserved(state: RunState, event: Mapping[str, Any]) -> None:
    try:
        task_id, amount = event["task"], event["amount_micros"]
    except KeyError:
        task_id, amount = event.get("task"), event.get("amount_micros")
    if type(task_id) is not str:
        raise _not_task(task_id)
    if type(amount) is not int or amount < 0:
        raise _not_int("amount_micros", amount)
    tasks = state.tasks
    task = tasks.get(task_id)
    escalation_id = None
    if task is not None:
        if task.holding:
            raise RuleViolation(f"duplicate reservation of task {task_id!r}")
        if task.state in ("halted", "released"):
            raise RuleViolation(f"reservation of task {task_id!r} after it was {task.state}")
        escalation_id = task.escalation_id
        if escalation_id in state.open_escalations:
            raise RuleViolation(f"reservation of task {task_id!r} while its escalation is open")
    elif _id_match(task_id) is None or ".." in task_id:  # once, when a task id first appears
        raise _not_task(task_id)
    if over_cap(amount, amount, state.task_cap_micros, state.remaining_micros) is not None:
        _over(state, task_id, amount, amount)
    tasks[task_id] = Task("reserved", amount, True, None, None, escalation_id)
    state.reserved_micros += amount


def _apply_increased(state: RunState, event: Mapping[str, Any]) -> None:
    try:
        task_id, before, after = event["task"], event["from_micros"], event["to_micros"]
    except KeyError:
        task_id, before, after = event.get("task"), event.get("from_micros"), event.get("to_micros")
    # Signs need no check here: ``from`` must equal what the task holds and ``to`` exceed it.
    if type(before) is not int:
        raise _not_int("from_micros", before)
    if type(after) is not int:
        raise _not_int("to_micros", after)
    try:  # a known key is a checked id; any other value (a number, null) finds nothing
        task = state.tasks.get(task_id)
    except TypeError:  # an unhashable value, such as a list
        raise _not_task(task_id) from None
    if task is None or not task.holding or task.state == "released":
        raise RuleViolation(f"increase of task {shown_value(task_id)}, which holds no reservation")
    if task.state == "halted":
        raise RuleViolation(f"increase of task {task_id!r} after it was halted")
    if task.escalation_id is not None and task.escalation_id in state.open_escalations:
        raise RuleViolation(f"increase of task {task_id!r} while its escalation is open")
    if before != task.reserved_micros or after <= before:
        raise RuleViolation(
            f"increase of task {task_id!r} from {before} to {after}, "
            f"but it holds {task.reserved_micros}"
        )
    delta = after - before
    if over_cap(after, delta, state.task_cap_micros, state.remaining_micros) is not None:
        _over(state, task_id, after, delta)
    task.state = "reserved"
    task.reserved_micros = after
    state.reserved_micros += delta


def _over(state: RunState, task_id: str, total: int, delta: int) -> None:
    """Raise for a reservation of ``total`` (``delta`` of it new) that does not fit."""
    if over_cap(total, delta, state.task_cap_micros, state.remaining_micros) == "task_cap":
        raise RuleViolation(f"task {task_id!r} reserved {total}, over the task cap {state.task_cap_micros}")
    raise RuleViolation(
        f"task {task_id!r} took {delta} with only {state.remaining_micros} remaining (over the cap)"
    )


def _apply_released(state: RunState, event: Mapping[str, Any]) -> None:
    try:
        task_id, reserved, actual = event["task"], event["reserved_micros"], event["actual_micros"]
    except KeyError:
        task_id, reserved = event.get("task"), event.get("reserved_micros")
        actual = event.get("actual_micros")
    # ``reserved`` must equal what the task holds, so only its type needs a check.
    if type(reserved) is not int:
        raise _not_int("reserved_micros", reserved)
    if type(actual) is not int or not 0 <= actual <= MAX_MICROS:
        raise _not_int("actual_micros", actual)
    try:  # a known key is a checked id; any other value (a number, null) finds nothing
        task = state.tasks.get(task_id)
    except TypeError:  # an unhashable value, such as a list
        raise _not_task(task_id) from None
    if task is None or not task.holding:
        raise RuleViolation(f"release of task {shown_value(task_id)}, which holds no reservation")
    if reserved != task.reserved_micros:
        raise RuleViolation(
            f"release of task {task_id!r} names {reserved} reserved, but it holds {task.reserved_micros}"
        )
    if task.escalation_id is not None and task.escalation_id in state.open_escalations:
        raise RuleViolation(f"release of task {task_id!r} while its escalation is open")
    state.reserved_micros -= reserved
    state.spent_micros += actual
    # Only what the single-use and idempotency rules need is kept for a settled task
    # (settled in place: no new object per release).
    task.state = "released"
    task.holding = False
    task.actual_micros = actual
    if task.escalation_id is not None:
        task.escalation_id = None


def _apply_halt(state: RunState, event: Mapping[str, Any]) -> None:
    task_id = _id(event, "task")
    _int(event, "requested_micros")
    _signed(event, "remaining_micros")
    reason = _choice(event, "reason", HALT_REASONS)
    task = state.tasks.get(task_id)
    if task is not None and task.state in ("halted", "released"):
        raise RuleViolation(f"halt of task {task_id!r}, which is already {task.state}")
    if task is not None and task.escalation_id in state.open_escalations:
        raise RuleViolation(f"halt of task {task_id!r} while its escalation is open")
    if task is None:
        state.tasks[task_id] = Task(state="halted", halt_reason=reason)
    else:
        task.state = "halted"
        task.halt_reason = reason
    state.halts += 1


def _apply_escalation(state: RunState, event: Mapping[str, Any]) -> None:
    escalation_id = _id(event, "id")
    task_id = _id(event, "task")
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
    kind = _choice(event, "kind", ESCALATION_KINDS,
                   "increase" if task is not None and task.holding else "reserve")
    from_micros = _int(event, "from_micros") if "from_micros" in event else 0
    requested = _int(event, "requested_micros")
    remaining = _signed(event, "remaining_micros")
    escalation = EscalationState(
        id=escalation_id,
        task=task_id,
        kind=kind,
        from_micros=from_micros,
        requested_micros=requested,
        remaining_micros=remaining,
        reason=_choice(event, "reason", ESCALATION_REASONS),
        offered=offered,
        expires_at=_timestamp(event, "expires_at", nullable=True),
        shadow=shadow,
        opened_at=_timestamp(event, "ts"),
        requested_by=event.get("actor"),  # checked by apply, as every line's actor
        request_reason=_text(event, "request_reason", limit=MAX_REASON_LENGTH),
        priority=_choice(event, "priority", PRIORITIES, "normal"),
        # Older lines did not record it: the snapshot they did record tells.
        needed_extension_micros=(_int(event, "needed_extension_micros") if "needed_extension_micros" in event
                                 else needed_extension(requested - from_micros, remaining)),
    )
    state.escalations[escalation_id] = escalation
    if shadow:
        escalation.state = "resolved"
        return
    if task is not None and (task.state in ("halted", "released")
                             or task.escalation_id in state.open_escalations):
        raise RuleViolation(f"escalation of task {task_id!r}, which is {task.state}")
    state.open_escalations[escalation_id] = escalation
    if task is None:
        state.tasks[task_id] = Task(state="escalated", escalation_id=escalation_id)
    else:
        task.state = "escalated"
        task.escalation_id = escalation_id


def _apply_resolved(state: RunState, event: Mapping[str, Any]) -> None:
    escalation_id = _id(event, "id")
    escalation = state.open_escalations.pop(escalation_id, None)
    if escalation is None:
        raise RuleViolation(f"resolution of escalation {escalation_id!r}, which is not open")
    mode = _choice(event, "mode", RESOLVED_MODES)
    extension = _int(event, "extension_micros")
    by = _str(event, "by")
    if "role" in event:
        _str(event, "role")
    if extension and mode != "extend":
        raise RuleViolation(f"a {mode} resolution cannot grant an extension")
    task = state.tasks[escalation.task]
    # An approval extends the cap by what the request needs beyond the remaining budget
    # now (decide_resolution), never more: more would be free money for other tasks.
    held = task.reserved_micros if task.holding else 0
    needed = needed_extension(escalation.requested_micros - held, state.remaining_micros)
    if extension > needed:
        raise RuleViolation(f"extension {extension} is more than the {needed} that escalation "
                            f"{escalation_id} needed")
    if extension > extension_left(state.policy.max_extension_micros, state.extended_micros):
        raise RuleViolation(
            f"extension {extension} takes the run past its max extension "
            f"{state.policy.max_extension_micros}"
        )
    escalation.state = "resolved"
    escalation.mode = mode
    escalation.by = by
    escalation.resolved_at = _timestamp(event, "ts")
    escalation.extension_micros = extension
    state.extended_micros += extension
    # extend: the reservation line that follows moves the task on; pause parks it;
    # cancel is followed by its halt. withdraw: the task keeps what it holds (a release may
    # follow) or, asking for a first reservation, holds nothing and may ask again.
    if mode == "pause" or (mode == "withdraw" and not task.holding):
        task.state = "paused"
    else:
        task.state = "reserved" if task.holding else "escalated"


def _apply_notified(state: RunState, event: Mapping[str, Any]) -> None:
    # A delivery record changes no money and no escalation state: only what a sweep needs to
    # decide whether to deliver again. Attempts are counted in order, one by one.
    escalation_id = _id(event, "id")
    escalation = state.escalations.get(escalation_id)
    if escalation is None or escalation.shadow:
        raise RuleViolation(f"delivery of escalation {escalation_id!r}, which needs nobody or does not exist")
    attempt = _int(event, "attempt", limit=escalation.notify_attempts + 1)
    if attempt != escalation.notify_attempts + 1:
        raise RuleViolation(f"delivery attempt {attempt} of {escalation_id!r} after attempt "
                            f"{escalation.notify_attempts}")
    ok = event.get("ok")
    if not isinstance(ok, bool):
        raise RuleViolation("field 'ok' must be true or false")
    _text(event, "detail", limit=MAX_DETAIL_LENGTH)
    escalation.notify_attempts = attempt
    escalation.notified_at = _timestamp(event, "ts")
    escalation.notified_ok = ok
    escalation.failed_in_a_row = 0 if ok else escalation.failed_in_a_row + 1


def _apply_recovery(state: RunState, event: Mapping[str, Any]) -> None:
    _int(event, "torn_bytes", limit=2**63)
    _str(event, "saved_to", limit=MAX_FILE_NAME_LENGTH)
    state.recoveries += 1


def _apply_policy(state: RunState, event: Mapping[str, Any]) -> None:
    if "role" in event:
        _str(event, "role")
    state.policy = _policy(event.get("escalation"))


def _apply_opened_again(state: RunState, event: Mapping[str, Any]) -> None:
    raise RuleViolation("run_opened may only be the first line")


_APPLY: dict[str, Callable[[RunState, Mapping[str, Any]], None]] = {
    "run_opened": _apply_opened_again,
    "budget_reserved": _apply_reserved,
    "budget_increased": _apply_increased,
    "released": _apply_released,
    "halt": _apply_halt,
    "escalation": _apply_escalation,
    "escalation_resolved": _apply_resolved,
    "recovery": _apply_recovery,
    "policy_changed": _apply_policy,
    "escalation_notified": _apply_notified,
}


