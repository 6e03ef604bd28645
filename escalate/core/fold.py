"""The fold: a run's log, line by line, into a :class:`~escalate.core.state.RunState`.

No I/O here. :func:`apply` folds one event and fails closed (raises :class:`RuleViolation`)
on anything a correct writer could not have produced; the budget it re-checks through
:mod:`escalate.core.rules`, the same functions the decisions use, as a safety net. Here: the
envelope of every line and the lines that move money; the escalation lines are folded in
:mod:`escalate.core.fold_escalations`, and every field check lives in :mod:`escalate.core.fold_fields`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from escalate.core.events import (
    HALT_REASONS,
    HASH_PATTERN,
    MAX_FILE_NAME_LENGTH,
    PERIODS,
    SCHEMA_VERSION,
    VOID_REASONS,
    parsed_keys,
)
from escalate.core.fold_escalations import apply_approved, apply_escalation, apply_notified, apply_resolved
from escalate.core.fold_fields import (
    choice_field,
    id_field,
    int_field,
    name_field,
    not_int,
    not_task,
    policy_field,
    signed_field,
    ts_field,
)
from escalate.core.ids import ID_PATTERN, shown_value
from escalate.core.money import MAX_MICROS, MAX_TOTAL_MICROS
from escalate.core.rules import over_cap, pinned_keys, task_cap_fits
from escalate.core.state import (
    ForgedSignature,
    RuleViolation,
    RunState,
    TaskFacts,
    TaskRow,
    released_row,
    task_facts,
)

_id_match = ID_PATTERN.fullmatch  # bound once: the fold checks every new task id
# The fields the money lines' handlers read on every line, as orjson's own key objects.
_TASK, _AMOUNT, _FROM, _TO, _RESERVED, _ACTUAL = parsed_keys(
    "task", "amount_micros", "from_micros", "to_micros", "reserved_micros", "actual_micros")


def initial_state(event: Mapping[str, Any], this_hash: str) -> RunState:
    """Start a state from the first line of a log, which must be ``run_opened``."""
    if event.get("v") != SCHEMA_VERSION or type(event.get("v")) is not int:
        raise RuleViolation(f"unknown schema version {event.get('v')!r} (this escalate reads v1)")
    if event.get("type") not in ("run_opened", "pool_opened"):
        raise RuleViolation(f"the first event must be run_opened, got {event.get('type')!r}")
    if event.get("seq") != 1 or type(event.get("seq")) is not int or event.get("prev") != "":
        raise RuleViolation(f"{event['type']} must have seq 1 and an empty prev")
    if event["type"] == "pool_opened":
        return _pool_opened(event, this_hash)
    run_cap = int_field(event, "run_cap_micros")
    task_cap = int_field(event, "task_cap_micros")
    if not task_cap_fits(task_cap, run_cap):
        raise RuleViolation(f"task cap {task_cap} is above the run cap {run_cap}")
    ts = ts_field(event, "ts")
    state = RunState(
        run_id=id_field(event, "run"),
        run_cap_micros=run_cap,
        task_cap_micros=task_cap,
        policy=policy_field(event.get("escalation")),
        opened_at=ts,
        seq=1,
        last_hash=this_hash,
        last_ts=ts,
        last_actor=name_field(event, "actor"),
        member_of=id_field(event, "pool") if "pool" in event else None,
        policy_line=this_hash,
    )
    return state


def _pool_opened(event: Mapping[str, Any], this_hash: str) -> RunState:
    """A pool's first line. Its state holds no money (caps 0: a reservation in a pool's log
    cannot fold); its settings are in ``pool``."""
    from escalate.core.periods import zone
    from escalate.core.pool_state import PoolFacts  # (a run's fold never loads the pool modules)

    tz = event.get("tz")
    try:
        zone(tz)  # checks any value
    except ValueError:
        raise RuleViolation(f"field 'tz' must be a known time zone, got {shown_value(tz)}") from None
    ts = ts_field(event, "ts")
    return RunState(
        run_id=id_field(event, "pool"), run_cap_micros=0, task_cap_micros=0,
        policy=policy_field(event.get("escalation")), opened_at=ts, seq=1, last_hash=this_hash, last_ts=ts,
        last_actor=name_field(event, "actor"), policy_line=this_hash,
        pool=PoolFacts(cap_micros=int_field(event, "cap_micros"),
                       period=choice_field(event, "period", PERIODS), tz=str(tz)))


def _apply_joined(state: RunState, event: Mapping[str, Any]) -> None:
    run_id = id_field(event, "run")
    if state.pool is None:
        raise RuleViolation("run_joined may only be in a pool's log")
    if run_id in state.pool.members:
        raise RuleViolation(f"run {run_id!r} joined twice")
    state.pool.members.append(run_id)


def _apply_join_voided(state: RunState, event: Mapping[str, Any]) -> None:
    run_id = id_field(event, "run")
    choice_field(event, "reason", VOID_REASONS)
    if state.pool is None:
        raise RuleViolation("run_join_voided may only be in a pool's log")
    if run_id not in state.pool.members:
        raise RuleViolation(f"run {run_id!r} voided, but it has no join")
    if run_id in state.pool.opened:
        raise RuleViolation(f"run {run_id!r} voided, but its first line was recorded")
    state.pool.members.remove(run_id)  # never a member: the id may join again


def _apply_member_opened(state: RunState, event: Mapping[str, Any]) -> None:
    run_id = id_field(event, "run")
    first_line = event.get("first_line")
    if not isinstance(first_line, str) or not first_line or not HASH_PATTERN.fullmatch(first_line):
        raise RuleViolation(f"field 'first_line' must be 16 hex characters, got {shown_value(first_line)}")
    if state.pool is None:
        raise RuleViolation("member_opened may only be in a pool's log")
    if run_id not in state.pool.members:
        raise RuleViolation(f"run {run_id!r} opened, but it has no join")
    if run_id in state.pool.opened:
        raise RuleViolation(f"run {run_id!r} opened twice")
    state.pool.opened[run_id] = first_line


def apply(state: RunState, event: Mapping[str, Any], this_hash: str) -> None:
    """Fold one event (after the first) into ``state``; raise :class:`RuleViolation` if it is
    not what a correct writer appends next."""
    # This runs once per line of every replay: subscripts on the fast path (a missing key
    # reads as None, as ``get`` would), one dict lookup to dispatch, no helper calls.
    try:  # one name at a time: no tuple built and taken apart per line
        version = event["v"]
        seq = event["seq"]
        prev = event["prev"]
        kind = event["type"]
        ts = event["ts"]
        actor = event["actor"]
    except KeyError:
        version, seq, prev, kind = event.get("v"), event.get("seq"), event.get("prev"), event.get("type")
        ts, actor = event.get("ts"), event.get("actor")
    # ``type(...) is int`` too: 1.0 and True compare equal to 1, and would be copied forward.
    # A parsed 1 is the interpreter's one small int 1, so ``is`` passes the common line with
    # one test; anything else takes the full check.
    if version is not SCHEMA_VERSION and (version != SCHEMA_VERSION or type(version) is not int):
        raise RuleViolation(f"unknown schema version {version!r} (this escalate reads v1)")
    if seq != state.seq + 1 or type(seq) is not int:
        raise RuleViolation(f"seq {seq!r} where {state.seq + 1} was expected")
    if state.archived:
        raise RuleViolation(f"{shown_value(kind)} after the run was archived (it takes no more lines)")
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
        state.last_actor = name_field(event, "actor")
    handler(state, event)
    if kind == "escalation":  # a signed resolution covers the hash of its escalation's line
        state.escalations[event["id"]].line_hash = this_hash
    elif kind == "policy_changed":  # and a signed policy change the hash of the policy's line
        state.policy_line = this_hash
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


def _apply_reserved(state: RunState, event: Mapping[str, Any], new_ids: list[str] | None = None) -> None:
    try:
        task_id, amount = event[_TASK], event[_AMOUNT]
    except KeyError:
        task_id, amount = event.get("task"), event.get("amount_micros")
    if type(task_id) is not str:
        raise not_task(task_id)
    if type(amount) is not int or amount < 0:
        raise not_int("amount_micros", amount)
    rows = state.tasks.rows  # (state, reserved_micros, holding, actual_micros, halt_reason, escalation_id)
    task = rows.get(task_id)
    escalation_id = None
    if task is not None:
        task = task_facts(task)
        if task[2]:
            raise RuleViolation(f"duplicate reservation of task {task_id!r}")
        if task[0] in ("halted", "released"):
            raise RuleViolation(f"reservation of task {task_id!r} after it was {task[0]}")
        escalation_id = task[5]
        if escalation_id in state.open_escalations:
            raise RuleViolation(f"reservation of task {task_id!r} while its escalation is open")
    elif new_ids is not None:  # the replay checks it with the others of its chunk (ids.all_ids)
        new_ids.append(task_id)
    elif _id_match(task_id) is None or ".." in task_id:  # once, when a task id first appears
        raise not_task(task_id)
    # rules.over_cap and RunState.remaining_micros, inline (once per reservation of every
    # replay); _over names the cap with them.
    if amount > state.task_cap_micros or amount > (state.run_cap_micros + state.extended_micros
                                                   - state.spent_micros - state.reserved_micros):
        _over(state, task_id, amount, amount)
    # A row of facts only for a task that keeps its escalation's id (state.TaskRow).
    rows[task_id] = amount if escalation_id is None else ("reserved", amount, True, None, None, escalation_id)
    state.reserved_micros += amount


def _apply_increased(state: RunState, event: Mapping[str, Any], new_ids: list[str] | None = None) -> None:
    try:
        task_id, before, after = event[_TASK], event[_FROM], event[_TO]
    except KeyError:
        task_id, before, after = event.get("task"), event.get("from_micros"), event.get("to_micros")
    # Signs need no check here: ``from`` must equal what the task holds and ``to`` exceed it.
    if type(before) is not int:
        raise not_int("from_micros", before)
    if type(after) is not int:
        raise not_int("to_micros", after)
    rows = state.tasks.rows
    try:  # a known key is a checked id; any other value (a number, null) finds nothing
        task = rows.get(task_id)
    except TypeError:  # an unhashable value, such as a list
        raise not_task(task_id) from None
    # An int >= 0 holds that much and nothing else (state.TaskRow): none of the checks of a
    # row of facts applies to it.
    if type(task) is int and task >= 0:
        held, facts = task, None
    else:
        facts = _increasable(state, task_id, task)
        held = facts[1]
    if before != held or after <= before:
        raise RuleViolation(
            f"increase of task {task_id!r} from {before} to {after}, "
            f"but it holds {held}"
        )
    delta = after - before
    if after > state.task_cap_micros or delta > (state.run_cap_micros + state.extended_micros
                                                 - state.spent_micros - state.reserved_micros):
        _over(state, task_id, after, delta)  # (rules.over_cap, inline as above)
    rows[task_id] = after if facts is None else ("reserved", after, True, facts[3], facts[4], facts[5])
    state.reserved_micros += delta


def _increasable(state: RunState, task_id: Any, row: TaskRow | None) -> TaskFacts:
    """The facts of a task kept as a row of facts (or no task), if an increase may take it."""
    task = None if row is None else task_facts(row)
    if task is None or not task[2] or task[0] == "released":
        raise RuleViolation(f"increase of task {shown_value(task_id)}, which holds no reservation")
    if task[0] == "halted":
        raise RuleViolation(f"increase of task {task_id!r} after it was halted")
    if task[5] is not None and task[5] in state.open_escalations:
        raise RuleViolation(f"increase of task {task_id!r} while its escalation is open")
    return task


def _over(state: RunState, task_id: str, total: int, delta: int) -> None:
    """Raise for a reservation of ``total`` (``delta`` of it new) that does not fit."""
    if over_cap(total, delta, state.task_cap_micros, state.remaining_micros) == "task_cap":
        raise RuleViolation(f"task {task_id!r} reserved {total}, over the task cap {state.task_cap_micros}")
    raise RuleViolation(
        f"task {task_id!r} took {delta} with only {state.remaining_micros} remaining (over the cap)"
    )


def _apply_released(state: RunState, event: Mapping[str, Any], new_ids: list[str] | None = None) -> None:
    try:
        task_id, reserved, actual = event[_TASK], event[_RESERVED], event[_ACTUAL]
    except KeyError:
        task_id, reserved = event.get("task"), event.get("reserved_micros")
        actual = event.get("actual_micros")
    # ``reserved`` must equal what the task holds, so only its type needs a check.
    if type(reserved) is not int:
        raise not_int("reserved_micros", reserved)
    if type(actual) is not int or not 0 <= actual <= MAX_MICROS:
        raise not_int("actual_micros", actual)
    rows = state.tasks.rows
    try:  # a known key is a checked id; any other value (a number, null) finds nothing
        task = rows.get(task_id)
    except TypeError:  # an unhashable value, such as a list
        raise not_task(task_id) from None
    if type(task) is int and task >= 0:  # holds that much, and nothing else (state.TaskRow)
        held, halt_reason, escalation_id = task, None, None
    else:
        facts = _holding(task_id, task)
        held, halt_reason, escalation_id = facts[1], facts[4], facts[5]
    if reserved != held:
        raise RuleViolation(
            f"release of task {task_id!r} names {reserved} reserved, but it holds {held}"
        )
    if escalation_id is not None and escalation_id in state.open_escalations:
        raise RuleViolation(f"release of task {task_id!r} while its escalation is open")
    # rules.past_total_limit, inline: the one way a total grows that no cap bounds (the new
    # totals worked out once, checked, then stored).
    spent, still_reserved = state.spent_micros + actual, state.reserved_micros - reserved
    if spent + still_reserved > MAX_TOTAL_MICROS:
        raise RuleViolation(
            f"release of task {task_id!r} takes what the run committed to "
            f"{spent + still_reserved}, past the limit of {MAX_TOTAL_MICROS} micros on every total")
    state.reserved_micros = still_reserved
    state.spent_micros = spent
    # Only what the single-use and idempotency rules need is kept for a settled task.
    rows[task_id] = released_row(reserved, actual, halt_reason)


def _holding(task_id: Any, row: TaskRow | None) -> TaskFacts:
    """The facts of a task kept as a row of facts (or none), if it holds a reservation."""
    task = None if row is None else task_facts(row)
    if task is None or not task[2]:
        raise RuleViolation(f"release of task {shown_value(task_id)}, which holds no reservation")
    return task


def _apply_halt(state: RunState, event: Mapping[str, Any]) -> None:
    task_id = id_field(event, "task")
    int_field(event, "requested_micros")
    signed_field(event, "remaining_micros")
    reason = choice_field(event, "reason", HALT_REASONS)
    rows = state.tasks.rows
    row = rows.get(task_id)
    task = None if row is None else task_facts(row)
    if task is not None and task[0] in ("halted", "released"):
        raise RuleViolation(f"halt of task {task_id!r}, which is already {task[0]}")
    if task is not None and task[5] in state.open_escalations:
        raise RuleViolation(f"halt of task {task_id!r} while its escalation is open")
    rows[task_id] = ("halted", 0, False, None, reason, None) if task is None else \
        ("halted", task[1], task[2], task[3], reason, task[5])
    state.halts += 1


def _apply_recovery(state: RunState, event: Mapping[str, Any]) -> None:
    int_field(event, "torn_bytes", limit=2**63)
    name_field(event, "saved_to", limit=MAX_FILE_NAME_LENGTH)
    state.recoveries += 1


def _apply_policy(state: RunState, event: Mapping[str, Any]) -> None:
    if "role" in event:  # the database role that changed it (PostgreSQL store)
        name_field(event, "role")
    policy = policy_field(event.get("escalation"))
    if state.policy.approver_keys:
        _check_policy_signed(state, event)
    state.policy = policy
    if "cap_micros" in event:
        if state.pool is None:
            raise RuleViolation("field 'cap_micros' may only change a pool's cap")
        state.pool.cap_micros = int_field(event, "cap_micros")
    if "members_at" in event:
        _members_at(state, event.get("members_at"))


def _members_at(state: RunState, heads: object) -> None:
    """A pool's record of where its members' logs ended (``pools set``, when who decides its
    escalations changes): each member's line count and its last line's hash."""
    if state.pool is None or not isinstance(heads, dict) or not all(
            run_id in state.pool.members and isinstance(head, list) and len(head) == 2
            and type(head[0]) is int and head[0] > 0
            and isinstance(head[1], str) and HASH_PATTERN.fullmatch(head[1])
            for run_id, head in heads.items()):
        raise RuleViolation("field 'members_at' must map a pool's members to [lines, hash of the last line]")
    state.pool.at.update((run_id, (head[0], head[1])) for run_id, head in heads.items())


def _check_policy_signed(state: RunState, event: Mapping[str, Any]) -> None:
    """While keys are pinned (before this line), a policy change carries an SSHSIG signature
    by a key pinned for its writer (``actor``; the ``role`` under ``approvers_match:
    vouched`` or where lists name roles: :func:`~escalate.core.rules.pinned_keys`) over
    :func:`~escalate.core.sshsig.policy_content`. The first pinning is trusted on first use."""
    from escalate.core import sshsig  # (only a ledger that pins keys, or a signed line, loads it)

    signature, key, actor = event.get("signature"), event.get("key"), event.get("actor")
    if type(signature) is not str or type(key) is not str:
        raise ForgedSignature(f"policy change by {actor} is not signed, but the "
                              f"{'pool' if state.pool is not None else 'run'} pins approvers' keys")
    cap = int_field(event, "cap_micros") if "cap_micros" in event else None
    message = sshsig.policy_content("pool" if state.pool is not None else "run", state.run_id,
                                    event.get("escalation"), cap, state.policy_line)
    try:
        signer = sshsig.verify(signature, message, pinned_keys(state.policy, actor, event.get("role")))
    except sshsig.SignatureError as exc:
        raise ForgedSignature(f"the signature of {actor}'s policy change does not check out against the "
                              f"keys pinned before it: {exc}") from None
    if signer.fingerprint != key:
        raise ForgedSignature(f"field 'key' names {key[:60]!r}, but {signer.fingerprint} signed")


def _apply_archived(state: RunState, event: Mapping[str, Any]) -> None:
    if state.pool is not None:
        raise RuleViolation("run_archived may only be in a run's log")
    held = [task_id for task_id, row in state.tasks.rows.items() if task_facts(row)[2]]
    if held or state.open_escalations:
        raise RuleViolation("run_archived while the run holds reservations or has an escalation open")
    state.archived = True


def _apply_opened_again(state: RunState, event: Mapping[str, Any]) -> None:
    raise RuleViolation(f"{event.get('type')} may only be the first line")


_APPLY: dict[str, Callable[[RunState, Mapping[str, Any]], None]] = {
    "run_opened": _apply_opened_again,
    "budget_reserved": _apply_reserved,
    "budget_increased": _apply_increased,
    "released": _apply_released,
    "halt": _apply_halt,
    "escalation": apply_escalation,
    "escalation_resolved": apply_resolved,
    "recovery": _apply_recovery,
    "policy_changed": _apply_policy,
    "escalation_notified": apply_notified,
    "escalation_approved": apply_approved,
    "pool_opened": _apply_opened_again,
    "run_joined": _apply_joined,
    "run_archived": _apply_archived,
    "run_join_voided": _apply_join_voided,
    "member_opened": _apply_member_opened,
}



# The lines that move money, which make up most of a log: the replay's hot loop folds one of
# these with its handler directly when its envelope is what the chain asks for (see
# escalate.core.replay), and through apply otherwise. The handlers of budget_reserved,
# budget_increased and released, in that order; new_ids (given to all three, used by the
# first): where a reservation leaves a task id it has not seen to the replay, which checks
# them together (ids.all_ids). (Typed to take the loop's state as it keeps it, None before the
# first line, which never reaches them: its first line goes to initial_state.)
MONEY_HANDLERS: tuple[Callable[[Any, Mapping[str, Any], list[str] | None], None], ...] = (
    _apply_reserved, _apply_increased, _apply_released)
