"""The ledger: a pure fold of events into state, and the rules that decide requests.

No I/O here. :func:`apply` folds one event and fails closed (raises :class:`RuleViolation`)
on anything a correct writer could not have produced. The ``decide_*`` functions take a
state and a request and return a :class:`Decision`: the events to append, the answer,
and the error to raise *after* those events are durable (a halt is written, then reported).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from escalate.errors import Conflict, EscalateError, InputError, Pending, Refused
from escalate.events import SCHEMA_VERSION, Event, add_seconds, parse_ts
from escalate.ids import ID_PATTERN, shown_value, valid_id
from escalate.money import MAX_MICROS
from escalate.money import format_usd as usd

MODES = ("off", "shadow", "enforce")
RESOLUTIONS = ("extend", "pause", "cancel")
HALT_REASONS = ("run_cap", "task_cap", "cancelled")
ESCALATION_KINDS = ("reserve", "increase")
ESCALATION_REASONS = ("run_cap", "threshold")
# An escalation's expiry must stay a date (datetime ends in year 9999): 1000 years is plenty.
MAX_TIMEOUT_S = 1000 * 366 * 86400
MAX_ACTOR_LENGTH = 128
# The exact text format_ts writes; parse_ts then rejects a 13th month or a 30 February.
_id_match = ID_PATTERN.fullmatch  # bound once: the fold checks every new task id
_TIMESTAMP = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{6}Z", re.ASCII)


class RuleViolation(Exception):
    """An event that no correct writer produces; the reader names its line."""


@dataclass(slots=True)
class Policy:
    """Per-run escalation policy, as in the ``escalation`` object of ``run_opened``."""

    mode: str = "off"
    approval_threshold_micros: int | None = None
    timeout_s: int | None = 3600
    max_extension_micros: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "approval_threshold_micros": self.approval_threshold_micros,
            "timeout_s": self.timeout_s,
            "max_extension_micros": self.max_extension_micros,
        }


@dataclass(slots=True)
class Task:
    """One task id's life. ``holding`` says whether ``reserved_micros`` is in flight."""

    state: str  # reserved | released | halted | escalated | paused
    reserved_micros: int = 0
    holding: bool = False
    actual_micros: int | None = None
    halt_reason: str | None = None
    escalation_id: str | None = None

    def to_json(self, task_id: str) -> dict[str, Any]:
        """The task as ``runs show --json`` lists it (and as the checkpoint stores it).

        ``reserved_micros`` is what the task holds or, once settled, what it had reserved;
        ``holding`` says whether that money still counts as reserved.
        """
        return {
            "task": task_id,
            "state": self.state,
            "reserved_micros": self.reserved_micros,
            "holding": self.holding,
            "actual_micros": self.actual_micros,
            "halt_reason": self.halt_reason,
            "escalation_id": self.escalation_id,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Task:
        """Inverse of :meth:`to_json`."""
        return cls(data["state"], data["reserved_micros"], data["holding"], data["actual_micros"],
                   data["halt_reason"], data["escalation_id"])


@dataclass(slots=True)
class Escalation:
    """A request put in front of a person (or, with ``shadow``, only recorded)."""

    id: str
    task: str
    kind: str  # reserve | increase
    from_micros: int
    requested_micros: int  # the absolute reservation asked for
    remaining_micros: int
    reason: str  # run_cap | threshold
    offered: list[str]
    expires_at: str | None
    shadow: bool
    opened_at: str
    state: str = "open"  # open | resolved
    mode: str | None = None
    by: str | None = None
    resolved_at: str | None = None
    extension_micros: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "task": self.task,
            "kind": self.kind,
            "from_micros": self.from_micros,
            "requested_micros": self.requested_micros,
            "remaining_micros": self.remaining_micros,
            "reason": self.reason,
            "offered": list(self.offered),
            "opened_at": self.opened_at,
            "expires_at": self.expires_at,
            "shadow": self.shadow,
            "state": self.state,
            "mode": self.mode,
            "by": self.by,
            "resolved_at": self.resolved_at,
            "extension_micros": self.extension_micros,
        }


@dataclass(slots=True)
class RunState:
    """Totals and per-task facts folded from one run's log."""

    run_id: str
    run_cap_micros: int
    task_cap_micros: int
    policy: Policy
    opened_at: str
    tasks: MutableMapping[str, Task] = field(default_factory=dict)
    escalations: MutableMapping[str, Escalation] = field(default_factory=dict)
    open_escalations: dict[str, Escalation] = field(default_factory=dict)
    spent_micros: int = 0
    reserved_micros: int = 0
    extended_micros: int = 0
    seq: int = 0
    last_hash: str = ""
    last_ts: str = ""
    halts: int = 0
    recoveries: int = 0
    # The last actor the fold checked: the next line by the same actor needs no new check.
    last_actor: str | None = None

    @property
    def cap_micros(self) -> int:
        return self.run_cap_micros + self.extended_micros

    @property
    def committed_micros(self) -> int:
        return self.spent_micros + self.reserved_micros

    @property
    def remaining_micros(self) -> int:
        # Spelled out rather than through the two properties above: the fold checks it on
        # every reservation.
        return self.run_cap_micros + self.extended_micros - self.spent_micros - self.reserved_micros

    def totals(self) -> dict[str, Any]:
        """The run's money, exact, as ``runs show --json`` reports it."""
        return {
            "run": self.run_id,
            "cap_micros": self.cap_micros,
            "run_cap_micros": self.run_cap_micros,
            "task_cap_micros": self.task_cap_micros,
            "spent_micros": self.spent_micros,
            "reserved_micros": self.reserved_micros,
            "committed_micros": self.committed_micros,
            "remaining_micros": self.remaining_micros,
            "extended_micros": self.extended_micros,
            "events": self.seq,
            "halts": self.halts,
            "escalation": self.policy.to_json(),
        }


# --------------------------------------------------------------------------- the fold


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
    )


def open_run(event: Mapping[str, Any], this_hash: str) -> RunState:
    """Start a state from the first line of a log, which must be ``run_opened``."""
    if event.get("v") != SCHEMA_VERSION:
        raise RuleViolation(f"unknown schema version {event.get('v')!r} (this escalate reads v1)")
    if event.get("type") != "run_opened":
        raise RuleViolation(f"the first event must be run_opened, got {event.get('type')!r}")
    if event.get("seq") != 1 or event.get("prev") != "":
        raise RuleViolation("run_opened must have seq 1 and an empty prev")
    run_cap = _int(event, "run_cap_micros")
    task_cap = _int(event, "task_cap_micros")
    if task_cap > run_cap:
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
    if version != SCHEMA_VERSION:
        raise RuleViolation(f"unknown schema version {version!r} (this escalate reads v1)")
    if seq != state.seq + 1:
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
    remaining = state.run_cap_micros + state.extended_micros - state.spent_micros - state.reserved_micros
    if amount > state.task_cap_micros or amount > remaining:
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
    remaining = state.run_cap_micros + state.extended_micros - state.spent_micros - state.reserved_micros
    if after > state.task_cap_micros or delta > remaining:
        _over(state, task_id, after, delta)
    task.state = "reserved"
    task.reserved_micros = after
    state.reserved_micros += delta


def _over(state: RunState, task_id: str, total: int, delta: int) -> None:
    """Raise for a reservation of ``total`` (``delta`` of it new) that does not fit."""
    if total > state.task_cap_micros:
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
    escalation = Escalation(
        id=escalation_id,
        task=task_id,
        kind=kind,
        from_micros=_int(event, "from_micros") if "from_micros" in event else 0,
        requested_micros=_int(event, "requested_micros"),
        remaining_micros=_signed(event, "remaining_micros"),
        reason=_choice(event, "reason", ESCALATION_REASONS),
        offered=offered,
        expires_at=_timestamp(event, "expires_at", nullable=True),
        shadow=shadow,
        opened_at=_timestamp(event, "ts"),
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
    mode = _choice(event, "mode", RESOLUTIONS)
    extension = _int(event, "extension_micros")
    by = _str(event, "by")
    if extension and mode != "extend":
        raise RuleViolation(f"a {mode} resolution cannot grant an extension")
    task = state.tasks[escalation.task]
    # An approval extends the cap by what the request needs beyond the remaining budget
    # now (decide_resolution), never more: more would be free money for other tasks.
    held = task.reserved_micros if task.holding else 0
    needed = max(0, escalation.requested_micros - held - state.remaining_micros)
    if extension > needed:
        raise RuleViolation(f"extension {extension} is more than the {needed} that escalation "
                            f"{escalation_id} needed")
    if state.extended_micros + extension > state.policy.max_extension_micros:
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
    # cancel is followed by its halt.
    task.state = "paused" if mode == "pause" else ("reserved" if task.holding else "escalated")


def _apply_recovery(state: RunState, event: Mapping[str, Any]) -> None:
    _int(event, "torn_bytes", limit=2**63)
    _str(event, "saved_to", limit=255)
    state.recoveries += 1


def _apply_policy(state: RunState, event: Mapping[str, Any]) -> None:
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
}


# --------------------------------------------------------------------------- decisions


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


def is_expired(escalation: Escalation, policy: Policy, now: str) -> bool:
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


def decide_reserve(state: RunState, task_id: str, amount: int, now: str) -> Decision:
    """Reserve ``amount`` for a new task id (or answer a repeat of the same call)."""
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
    return _evaluate(state, task_id, "reserve", 0, amount, "", now)


def decide_increase(state: RunState, task_id: str, to: int, reason: str, now: str) -> Decision:
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
    return _evaluate(state, task_id, "increase", task.reserved_micros, to, reason, now)


def decide_release(state: RunState, task_id: str, actual: int) -> Decision:
    """Settle a task's reservation with what it actually cost (never refused for size)."""
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
                    f"'escalate wait {state.run_id} {open_escalation.id}'")
        elif task is None:
            hint = f"reserve it first, or check the task id with 'escalate runs show {state.run_id}'"
        else:
            hint = "nothing was reserved for it, so there is nothing to release"
        return _fail(Conflict(
            f"task {task_id} holds no reservation to release (state: {state_word}); {hint}",
            task=task_id, state=state_word))
    if task.escalation_id in state.open_escalations:
        return _fail(Conflict(
            f"task {task_id} has open escalation {task.escalation_id}; resolve it first "
            f"(escalate pause|cancel {state.run_id} {task.escalation_id})",
            task=task_id, state=task.state, escalation_id=task.escalation_id))
    event = {"type": "released", "task": task_id, "reserved_micros": task.reserved_micros,
             "actual_micros": actual}
    result = {"status": "released", "task": task_id, "reserved_micros": task.reserved_micros,
              "actual_micros": actual,
              "remaining_micros": state.remaining_micros + task.reserved_micros - actual}
    return Decision(events=[event], result=result)


def decide_resolution(state: RunState, escalation_id: str, mode: str, by: str) -> Decision:
    """approve (``extend``), pause or cancel an open escalation; first resolution wins."""
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
    resolved: Event = {"type": "escalation_resolved", "id": escalation_id, "mode": mode, "by": by,
                       "extension_micros": 0}
    task = state.tasks[escalation.task]
    facts = {"escalation_id": escalation_id, "task": escalation.task, "mode": mode, "by": by}
    if mode == "pause":
        return Decision(events=[resolved], result={"status": "paused", **facts})
    if mode == "cancel":
        halt = {"type": "halt", "task": escalation.task, "requested_micros": escalation.requested_micros,
                "remaining_micros": state.remaining_micros, "reason": "cancelled"}
        return Decision(events=[resolved, halt], result={"status": "cancelled", **facts})
    # extend: re-check the ceiling now; the reservation goes in the same write.
    before = task.reserved_micros if task.holding else 0
    delta = escalation.requested_micros - before
    if escalation.requested_micros > state.task_cap_micros:
        return _fail(Refused(
            f"cannot approve {escalation_id}: {usd(escalation.requested_micros)} is over the task cap "
            f"{usd(state.task_cap_micros)}; pause or cancel it", code="over_task_cap", **facts))
    needed = max(0, delta - state.remaining_micros)
    left = state.policy.max_extension_micros - state.extended_micros
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


def decide_policy(state: RunState, policy: Policy) -> Decision:
    """Change the run's escalation policy (recorded as ``policy_changed``)."""
    if policy == state.policy:
        return Decision(result={"status": "exists", "escalation": policy.to_json()})
    if policy.max_extension_micros < state.extended_micros:
        return _fail(Conflict(
            f"max extension {usd(policy.max_extension_micros)} is below the "
            f"{usd(state.extended_micros)} already granted; set --max-extension to at least "
            f"{usd(state.extended_micros)}", extended_micros=state.extended_micros))
    return Decision(events=[{"type": "policy_changed", "escalation": policy.to_json()}],
                    result={"status": "changed", "escalation": policy.to_json()})


def _evaluate(state: RunState, task_id: str, kind: str, before: int, to: int, reason: str,
              now: str) -> Decision:
    """The cap checks and the fire rule for a reservation of ``to`` (``before`` already held)."""
    delta = to - before
    remaining = state.remaining_micros
    settle = " — release it to settle what it holds" if kind == "increase" else ""
    if to > state.task_cap_micros:
        halt = {"type": "halt", "task": task_id, "requested_micros": to,
                "remaining_micros": remaining, "reason": "task_cap"}
        return Decision(events=[halt], error=Refused(
            f"halted {task_id}: {usd(to)} is over the task cap "
            f"{usd(state.task_cap_micros)}; the task is halted for good"
            + (settle or f" — ask for at most {usd(state.task_cap_micros)} under a new task id"),
            code="over_task_cap", task=task_id, requested_micros=to,
            task_cap_micros=state.task_cap_micros, remaining_micros=remaining))
    policy = state.policy
    over_remaining = delta > remaining
    over_threshold = policy.approval_threshold_micros is not None and to > policy.approval_threshold_micros
    events: list[Event] = []
    if policy.mode != "off" and (over_remaining or over_threshold):
        escalation = _escalation_event(state, task_id, kind, before, to, remaining, over_remaining,
                                       shadow=policy.mode == "shadow", now=now)
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
    needed = max(0, to - before - remaining)
    left = state.policy.max_extension_micros - state.extended_micros
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


def _pending(run_id: str, escalation: Event | Escalation, *, new: bool) -> Pending:
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


def _repeat_while_open(state: RunState, escalation: Escalation, kind: str, amount: int) -> Decision:
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

