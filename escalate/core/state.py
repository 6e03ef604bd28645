"""The state a run's log folds into: its totals, its tasks and its escalations.

Plain slotted dataclasses, no I/O: :mod:`escalate.core.fold` builds them line by line, the
decisions (:mod:`escalate.core.decide`) read them, the checkpoint (:mod:`escalate.stores.checkpoint`)
stores them. Task and escalation states are written to JSON as the strings below.
"""

from __future__ import annotations

from collections.abc import Callable, ItemsView, Iterator, Mapping, MutableMapping, ValuesView
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypedDict, TypeVar

from escalate.core.events import (
    ApproversMatch,
    EscalationKind,
    EscalationReason,
    HaltReason,
    Mode,
    Priority,
    Resolution,
    ResolvedMode,
)

if TYPE_CHECKING:
    from escalate.core.payloads import EscalationPolicy
    from escalate.core.pool_state import PoolFacts

# reserved: holds money; released: settled; halted: refused for good; escalated: waits on
# a person; paused: a person paused its escalation (it may ask again).
TaskState = Literal["reserved", "released", "halted", "escalated", "paused"]
EscalationStatus = Literal["open", "resolved"]

class RuleViolation(Exception):
    """An event that no correct writer produces; the reader names its line."""


class ForgedSignature(RuleViolation):
    """A signature the log requires that is missing, or that does not check out against the
    keys pinned for its signer: a forgery (an import refuses it as such, exit 6)."""


@dataclass(slots=True)
class Policy:
    """Per-run escalation policy, as in the ``escalation`` object of ``run_opened``."""

    mode: Mode = "off"
    approval_threshold_micros: int | None = None
    timeout_s: int | None = 3600
    max_extension_micros: int = 0
    renotify_every_s: int | None = None  # None: an open escalation's notice is sent once
    # Who may approve, pause or cancel; empty: anyone but the requester.
    approvers: tuple[str, ...] = ()
    # "vouched": approvers are matched, and requester and resolver compared, on the identity
    # the store vouches for (docs/escalation.md, "Who is who"); "claimed": on the names given.
    approvers_match: ApproversMatch = "claimed"
    # Distinct approvers an approval needs (1: one), for escalations that need a cap
    # extension above ``quorum_above_micros`` (None: for every escalation).
    quorum: int = 1
    quorum_above_micros: int | None = None
    # Pinned public keys (OpenSSH lines) by approver name: while any are pinned, every
    # approve, pause and cancel carries an SSHSIG signature by one of its approver's keys.
    approver_keys: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # A tuple whatever came in (the checkpoint hands in a JSON list): policies compare equal
        # by value in ``runs init``'s idempotency check.
        self.approvers = tuple(self.approvers)
        self.approver_keys = {name: tuple(keys) for name, keys in self.approver_keys.items()}

    def to_json(self) -> EscalationPolicy:
        """The policy as ``run_opened`` and ``policy_changed`` write it; ``approvers`` only when
        set, so a policy without them writes the same bytes as before they existed."""
        data: EscalationPolicy = {
            "mode": self.mode,
            "approval_threshold_micros": self.approval_threshold_micros,
            "timeout_s": self.timeout_s,
            "max_extension_micros": self.max_extension_micros,
        }
        if self.approvers:
            data["approvers"] = list(self.approvers)
        if self.approver_keys:
            data["approver_keys"] = {name: list(keys) for name, keys in self.approver_keys.items()}
        # Written only when set, so runs without it write (and compare) as they always did.
        if self.renotify_every_s is not None:
            data["renotify_every_s"] = self.renotify_every_s
        if self.approvers_match != "claimed":
            data["approvers_match"] = self.approvers_match
        if self.quorum != 1:
            data["quorum"] = self.quorum
            if self.quorum_above_micros is not None:
                data["quorum_above_micros"] = self.quorum_above_micros
        return data


# A task's facts in Task's field order.
TaskFacts = tuple[TaskState, int, bool, int | None, HaltReason | None, str | None]
# A task as the fold keeps it: its facts, or, for the two shapes nearly every task has, one
# int (a run keeps a row per task id it ever saw: 444,392 in the bench's run of a million
# lines; an int is no object the collector watches, and one made per line costs no more
# than storing the amount the line already holds):
#   n >= 0  reserved, holding n micros, no halt reason, no escalation;
#   n < 0   released, no halt reason, no escalation: ~n is reserved << 64 | actual (an
#           actual is at most MAX_MICROS, below 2**64; what it had reserved is >= 0).
# Every other task (halted, escalated, paused, or a row read back from a checkpoint) is its
# facts. task_facts reads either.
TaskRow = TaskFacts | int
_ACTUAL_BITS = 64
_ACTUAL_MASK = (1 << _ACTUAL_BITS) - 1


def task_facts(row: TaskRow) -> TaskFacts:
    """A task's facts from its row, whichever shape it is kept in (:data:`TaskRow`)."""
    if isinstance(row, tuple):
        return row
    if row >= 0:
        return ("reserved", row, True, None, None, None)
    packed = ~row
    return ("released", packed >> _ACTUAL_BITS, False, packed & _ACTUAL_MASK, None, None)


def released_row(reserved: int, actual: int, halt_reason: HaltReason | None) -> TaskRow:
    """The row of a task released with ``actual`` micros after holding ``reserved``
    (``actual`` from 0 to MAX_MICROS, as the fold checks it)."""
    if halt_reason is None and reserved >= 0:
        return ~(reserved << _ACTUAL_BITS | actual)
    return ("released", reserved, False, actual, halt_reason, None)


@dataclass(slots=True)
class Task:
    """One task id's life. ``holding`` says whether ``reserved_micros`` is in flight."""

    state: TaskState
    reserved_micros: int = 0
    holding: bool = False
    actual_micros: int | None = None
    halt_reason: HaltReason | None = None
    escalation_id: str | None = None

    def row(self) -> TaskFacts:
        """The task's facts, as the fold keeps them (:class:`TaskTable`)."""
        return (self.state, self.reserved_micros, self.holding, self.actual_micros, self.halt_reason,
                self.escalation_id)

    def to_json(self, task_id: str) -> dict[str, Any]:
        """The task as ``runs show --json`` lists it (and as the checkpoint stores it).

        ``reserved_micros`` is what the task holds or, once settled, what it had reserved;
        ``holding`` says whether that money still counts as reserved.
        """
        return task_json(task_id, self.row())

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Task:
        """Inverse of :meth:`to_json`."""
        return cls(*task_row(data))


def task_json(task_id: str, row: TaskRow) -> dict[str, Any]:
    """A task's row as ``runs show --json`` lists it (:meth:`Task.to_json`)."""
    row = task_facts(row)
    return {
        "task": task_id,
        "state": row[0],
        "reserved_micros": row[1],
        "holding": row[2],
        "actual_micros": row[3],
        "halt_reason": row[4],
        "escalation_id": row[5],
    }


def task_row(data: Mapping[str, Any]) -> TaskFacts:
    """Inverse of :func:`task_json`."""
    return (data["state"], data["reserved_micros"], data["holding"], data["actual_micros"],
            data["halt_reason"], data["escalation_id"])


V = TypeVar("V")


class PassItems(ItemsView[str, V]):
    """``items()`` of a mapping whose rows are read best in one pass (the fold's task rows, a
    store's checkpoint rows): a view, as :class:`~collections.abc.Mapping` promises, whose
    iteration is ``each()``."""

    __slots__ = ("_each",)

    def __init__(self, mapping: Mapping[str, V], each: Callable[[], Iterator[tuple[str, V]]]) -> None:
        super().__init__(mapping)
        self._each = each

    def __iter__(self) -> Iterator[tuple[str, V]]:
        return self._each()


class PassValues(ValuesView[V]):
    """``values()`` of such a mapping (:class:`PassItems`)."""

    __slots__ = ("_each",)

    def __init__(self, mapping: Mapping[str, V], each: Callable[[], Iterator[tuple[str, V]]]) -> None:
        super().__init__(mapping)
        self._each = each

    def __iter__(self) -> Iterator[V]:
        for _, value in self._each():
            yield value


class TaskTable(MutableMapping[str, Task]):
    """:attr:`RunState.tasks`: every task by id, in the order first seen.

    The fold keeps each task as a :data:`TaskRow` in :attr:`rows` (a dict, or a store's
    checkpoint rows read as the fold asks for them) and changes a task by writing its row
    again. Read through this mapping, a task is a :class:`Task` made from its row's facts
    (:func:`task_facts`): a copy,
    so changing it changes nothing until it is stored back (``tasks[task_id] = task``).
    """

    __slots__ = ("rows",)

    def __init__(self, rows: MutableMapping[str, TaskRow] | None = None) -> None:
        self.rows: MutableMapping[str, TaskRow] = {} if rows is None else rows

    def __getitem__(self, task_id: str) -> Task:
        return Task(*task_facts(self.rows[task_id]))

    def get(self, task_id: str, default: Any = None) -> Any:
        row = self.rows.get(task_id)
        return default if row is None else Task(*task_facts(row))

    def __contains__(self, task_id: object) -> bool:
        return task_id in self.rows

    def __setitem__(self, task_id: str, task: Task) -> None:
        self.rows[task_id] = task.row()

    def __delitem__(self, task_id: str) -> None:
        raise TypeError("the ledger never forgets a task")

    def __iter__(self) -> Iterator[str]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def items(self) -> ItemsView[str, Task]:
        """Every task in the order first seen (one pass over the rows, as a store reads them)."""
        return PassItems(self, self._each)

    def values(self) -> ValuesView[Task]:
        """The tasks, as :meth:`items`."""
        return PassValues(self, self._each)

    def _each(self) -> Iterator[tuple[str, Task]]:
        for task_id, row in self.rows.items():
            yield task_id, Task(*task_facts(row))


@dataclass(slots=True)
class EscalationState:
    """A request put in front of a person (or, with ``shadow``, only recorded)."""

    id: str
    task: str
    kind: EscalationKind
    from_micros: int
    requested_micros: int  # the absolute reservation asked for
    remaining_micros: int
    reason: EscalationReason
    offered: list[Resolution]
    expires_at: str | None
    shadow: bool
    opened_at: str
    # The actor of the escalation's line: who may withdraw it, and who may never resolve it.
    requested_by: str | None = None
    # Who the store vouches asked (the line's ``role``: the OS user on the file store, the
    # database role on PostgreSQL; None on lines written before it was recorded).
    requested_role: str | None = None
    state: EscalationStatus = "open"
    mode: ResolvedMode | None = None
    by: str | None = None
    # Who the store vouches resolved it (the resolution's ``role``; None: not recorded).
    resolved_role: str | None = None
    # The approvals so far of an escalation that needs a quorum ({"by", "role"?} each), and
    # the quorum that binds it whatever the policy says later: what its line recorded when it
    # fired, or the most an approval was counted against (escalate.core.rules.quorum_required).
    approvals: list[dict[str, str]] = field(default_factory=list)
    quorum: int = 1
    # The least run and pool extension the approvals so far signed for (their lines record
    # it); None: none recorded one. A grant above it is refused (escalate.core.rules.beyond_signed).
    signed_grant: list[int] | None = None
    resolved_at: str | None = None
    extension_micros: int = 0
    # What the approver is shown besides who asked: why and how urgently, and the cap
    # extension an approval needs. Older lines have no reason or priority: "", normal.
    request_reason: str = ""
    priority: Priority = "normal"
    needed_extension_micros: int = 0
    # The hash of the escalation's line: a signed resolution covers it (escalate.core.sshsig).
    line_hash: str = ""
    # Delivery of its notice (escalation_notified): what sweep needs to re-deliver it.
    notify_attempts: int = 0
    notified_at: str | None = None
    notified_ok: bool | None = None
    failed_in_a_row: int = 0  # failed attempts since the last delivery: the retry backoff

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
            "requested_by": self.requested_by,
            **({"requested_role": self.requested_role} if self.requested_role is not None else {}),
            "expires_at": self.expires_at,
            "shadow": self.shadow,
            "state": self.state,
            "mode": self.mode,
            "by": self.by,
            **({"resolved_role": self.resolved_role} if self.resolved_role is not None else {}),
            **({"approvals": self.approvals} if self.approvals else {}),
            **({"quorum": self.quorum} if self.approvals or self.quorum > 1 else {}),
            **({"signed_grant": self.signed_grant} if self.signed_grant is not None else {}),
            "resolved_at": self.resolved_at,
            "extension_micros": self.extension_micros,
            "request_reason": self.request_reason,
            "priority": self.priority,
            "needed_extension_micros": self.needed_extension_micros,
            "notify_attempts": self.notify_attempts,
            "notified_at": self.notified_at,
            "notified_ok": self.notified_ok,
            "failed_in_a_row": self.failed_in_a_row,
        }


class Totals(TypedDict):
    """A run's money, exact, as ``runs show --json`` reports it (:meth:`RunState.totals`)."""

    run: str
    cap_micros: int
    run_cap_micros: int
    task_cap_micros: int
    spent_micros: int
    reserved_micros: int
    committed_micros: int
    remaining_micros: int
    extended_micros: int
    events: int
    halts: int
    escalation: EscalationPolicy
    archived: bool  # retired by 'runs archive'


@dataclass(slots=True)
class RunState:
    """Totals and per-task facts folded from one run's log."""

    run_id: str
    run_cap_micros: int
    task_cap_micros: int
    policy: Policy
    opened_at: str
    tasks: TaskTable = field(default_factory=TaskTable)
    # Every escalation, by id: a mapping, so the checkpoint can hand in one read from SQLite.
    escalations: MutableMapping[str, EscalationState] = field(default_factory=dict)
    open_escalations: dict[str, EscalationState] = field(default_factory=dict)
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
    # A pool's log folds into a state too: its settings and members (no money: caps 0).
    pool: PoolFacts | None = None
    # The pool a run's first line names (None: none): a write checks it under the run's lock.
    member_of: str | None = None
    # Retired by ``runs archive`` (run_archived): no line may follow.
    archived: bool = False
    # The hash of the line that set the policy (run_opened, pool_opened, the last
    # policy_changed): a signed policy change covers it, so it cannot be replayed.
    policy_line: str = ""

    @property
    def cap_micros(self) -> int:
        return self.run_cap_micros + self.extended_micros

    @property
    def committed_micros(self) -> int:
        return self.spent_micros + self.reserved_micros

    @property
    def remaining_micros(self) -> int:
        """What is left of the cap, extensions included (negative after an over-run): the
        one place it is computed. Spelled out rather than through the two properties above:
        the fold reads it on every reservation."""
        return self.run_cap_micros + self.extended_micros - self.spent_micros - self.reserved_micros

    def totals(self) -> Totals:
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
            "archived": self.archived,
        }


