"""The state a run's log folds into: its totals, its tasks and its escalations.

Plain slotted classes, no I/O: :mod:`escalate.core.fold` builds them line by line, the
decisions (:mod:`escalate.core.decide`) read them, the checkpoint (:mod:`escalate.stores.checkpoint`)
stores them. Task and escalation states are written to JSON as the strings below.
"""

from __future__ import annotations

from collections.abc import Callable, ItemsView, Iterable, Iterator, Mapping, MutableMapping, ValuesView
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypedDict, TypeVar

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


class _Fields:
    """Equal when of the same class with equal fields, shown with them in the order the class
    declares them, and unhashable, as a dataclass is. The state's classes are plain slotted classes,
    not dataclasses: every command imports them, and a dataclass is built on import (its
    ``__init__``, ``__repr__`` and ``__eq__`` compiled from generated source: about a fifth of
    what escalate's own modules cost a reserve's process)."""

    __slots__: ClassVar[tuple[str, ...]] = ()
    __hash__ = None  # type: ignore[assignment]  # (mutable: equal by value, so no hash)
    # The fields in the order the class declares them (its annotations), as a dataclass
    # shows them: ``__slots__`` is kept sorted.
    _fields: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls) -> None:
        super().__init_subclass__()
        declared = tuple(name for name in cls.__annotations__ if name in cls.__slots__)
        cls._fields = declared + tuple(name for name in cls.__slots__ if name not in declared)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return all(getattr(self, name) == getattr(other, name) for name in self._fields)

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._fields)
        return f"{self.__class__.__qualname__}({shown})"


class Policy(_Fields):
    """Per-run escalation policy, as in the ``escalation`` object of ``run_opened``."""

    __slots__ = (
        "approval_threshold_micros",
        "approver_keys",
        "approvers",
        "approvers_match",
        "max_extension_micros",
        "mode",
        "quorum",
        "quorum_above_micros",
        "renotify_every_s",
        "timeout_s",
    )
    mode: Mode
    approval_threshold_micros: int | None
    timeout_s: int | None
    max_extension_micros: int
    renotify_every_s: int | None  # None: an open escalation's notice is sent once
    # Who may approve, pause or cancel; empty: anyone but the requester.
    approvers: tuple[str, ...]
    # "vouched": approvers are matched, and requester and resolver compared, on the identity
    # the store vouches for (docs/escalation.md, "Who is who"); "claimed": on the names given.
    approvers_match: ApproversMatch
    # Distinct approvers an approval needs (1: one), for escalations that need a cap
    # extension above ``quorum_above_micros`` (None: for every escalation).
    quorum: int
    quorum_above_micros: int | None
    # Pinned public keys (OpenSSH lines) by approver name: while any are pinned, every
    # approve, pause and cancel carries an SSHSIG signature by one of its approver's keys.
    approver_keys: dict[str, tuple[str, ...]]

    def __init__(self, mode: Mode = "off", approval_threshold_micros: int | None = None,
                 timeout_s: int | None = 3600, max_extension_micros: int = 0,
                 renotify_every_s: int | None = None, approvers: Iterable[str] = (),
                 approvers_match: ApproversMatch = "claimed", quorum: int = 1,
                 quorum_above_micros: int | None = None,
                 approver_keys: Mapping[str, Iterable[str]] | None = None) -> None:
        self.mode = mode
        self.approval_threshold_micros = approval_threshold_micros
        self.timeout_s = timeout_s
        self.max_extension_micros = max_extension_micros
        self.renotify_every_s = renotify_every_s
        # A tuple whatever came in (the checkpoint hands in a JSON list): policies compare equal
        # by value in ``runs init``'s idempotency check.
        self.approvers = tuple(approvers)
        self.approvers_match = approvers_match
        self.quorum = quorum
        self.quorum_above_micros = quorum_above_micros
        self.approver_keys = {} if approver_keys is None else {
            name: tuple(keys) for name, keys in approver_keys.items()}

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


class Task(_Fields):
    """One task id's life. ``holding`` says whether ``reserved_micros`` is in flight."""

    __slots__ = ("actual_micros", "escalation_id", "halt_reason", "holding", "reserved_micros", "state")
    state: TaskState
    reserved_micros: int
    holding: bool
    actual_micros: int | None
    halt_reason: HaltReason | None
    escalation_id: str | None

    def __init__(self, state: TaskState, reserved_micros: int = 0, holding: bool = False,
                 actual_micros: int | None = None, halt_reason: HaltReason | None = None,
                 escalation_id: str | None = None) -> None:
        self.state = state
        self.reserved_micros = reserved_micros
        self.holding = holding
        self.actual_micros = actual_micros
        self.halt_reason = halt_reason
        self.escalation_id = escalation_id

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


class EscalationState(_Fields):
    """A request put in front of a person (or, with ``shadow``, only recorded)."""

    __slots__ = (
        "approvals",
        "by",
        "expires_at",
        "extension_micros",
        "failed_in_a_row",
        "from_micros",
        "id",
        "kind",
        "line_hash",
        "mode",
        "needed_extension_micros",
        "notified_at",
        "notified_ok",
        "notify_attempts",
        "offered",
        "opened_at",
        "priority",
        "quorum",
        "reason",
        "remaining_micros",
        "request_reason",
        "requested_by",
        "requested_micros",
        "requested_role",
        "resolved_at",
        "resolved_role",
        "shadow",
        "signed_grant",
        "state",
        "task",
    )
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
    requested_by: str | None
    # Who the store vouches asked (the line's ``role``: the OS user on the file store, the
    # database role on PostgreSQL; None on lines written before it was recorded).
    requested_role: str | None
    state: EscalationStatus
    mode: ResolvedMode | None
    by: str | None
    # Who the store vouches resolved it (the resolution's ``role``; None: not recorded).
    resolved_role: str | None
    # The approvals so far of an escalation that needs a quorum ({"by", "role"?} each), and
    # the quorum that binds it whatever the policy says later: what its line recorded when it
    # fired, or the most an approval was counted against (escalate.core.rules.quorum_required).
    approvals: list[dict[str, str]]
    quorum: int
    # The least run and pool extension the approvals so far signed for (their lines record
    # it); None: none recorded one. A grant above it is refused (escalate.core.rules.beyond_signed).
    signed_grant: list[int] | None
    resolved_at: str | None
    extension_micros: int
    # What the approver is shown besides who asked: why and how urgently, and the cap
    # extension an approval needs. Older lines have no reason or priority: "", normal.
    request_reason: str
    priority: Priority
    needed_extension_micros: int
    # The hash of the escalation's line: a signed resolution covers it (escalate.core.sshsig).
    line_hash: str
    # Delivery of its notice (escalation_notified): what sweep needs to re-deliver it.
    notify_attempts: int
    notified_at: str | None
    notified_ok: bool | None
    failed_in_a_row: int  # failed attempts since the last delivery: the retry backoff

    def __init__(self, id: str, task: str, kind: EscalationKind, from_micros: int, requested_micros: int,
                 remaining_micros: int, reason: EscalationReason, offered: list[Resolution],
                 expires_at: str | None, shadow: bool, opened_at: str, requested_by: str | None = None,
                 requested_role: str | None = None, state: EscalationStatus = "open",
                 mode: ResolvedMode | None = None, by: str | None = None, resolved_role: str | None = None,
                 approvals: list[dict[str, str]] | None = None, quorum: int = 1,
                 signed_grant: list[int] | None = None, resolved_at: str | None = None,
                 extension_micros: int = 0, request_reason: str = "", priority: Priority = "normal",
                 needed_extension_micros: int = 0, line_hash: str = "", notify_attempts: int = 0,
                 notified_at: str | None = None, notified_ok: bool | None = None,
                 failed_in_a_row: int = 0) -> None:
        self.id = id
        self.task = task
        self.kind = kind
        self.from_micros = from_micros
        self.requested_micros = requested_micros
        self.remaining_micros = remaining_micros
        self.reason = reason
        self.offered = offered
        self.expires_at = expires_at
        self.shadow = shadow
        self.opened_at = opened_at
        self.requested_by = requested_by
        self.requested_role = requested_role
        self.state = state
        self.mode = mode
        self.by = by
        self.resolved_role = resolved_role
        self.approvals = [] if approvals is None else approvals
        self.quorum = quorum
        self.signed_grant = signed_grant
        self.resolved_at = resolved_at
        self.extension_micros = extension_micros
        self.request_reason = request_reason
        self.priority = priority
        self.needed_extension_micros = needed_extension_micros
        self.line_hash = line_hash
        self.notify_attempts = notify_attempts
        self.notified_at = notified_at
        self.notified_ok = notified_ok
        self.failed_in_a_row = failed_in_a_row

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


class RunState(_Fields):
    """Totals and per-task facts folded from one run's log."""

    __slots__ = (
        "archived",
        "escalations",
        "extended_micros",
        "halts",
        "last_actor",
        "last_hash",
        "last_ts",
        "member_of",
        "open_escalations",
        "opened_at",
        "policy",
        "policy_line",
        "pool",
        "recoveries",
        "reserved_micros",
        "run_cap_micros",
        "run_id",
        "seq",
        "spent_micros",
        "task_cap_micros",
        "tasks",
    )
    run_id: str
    run_cap_micros: int
    task_cap_micros: int
    policy: Policy
    opened_at: str
    tasks: TaskTable
    # Every escalation, by id: a mapping, so the checkpoint can hand in one read from SQLite.
    escalations: MutableMapping[str, EscalationState]
    open_escalations: dict[str, EscalationState]
    spent_micros: int
    reserved_micros: int
    extended_micros: int
    seq: int
    last_hash: str
    last_ts: str
    halts: int
    recoveries: int
    # The last actor the fold checked: the next line by the same actor needs no new check.
    last_actor: str | None
    # A pool's log folds into a state too: its settings and members (no money: caps 0).
    pool: PoolFacts | None
    # The pool a run's first line names (None: none): a write checks it under the run's lock.
    member_of: str | None
    # Retired by ``runs archive`` (run_archived): no line may follow.
    archived: bool
    # The hash of the line that set the policy (run_opened, pool_opened, the last
    # policy_changed): a signed policy change covers it, so it cannot be replayed.
    policy_line: str

    def __init__(self, run_id: str, run_cap_micros: int, task_cap_micros: int, policy: Policy, opened_at: str,
                 tasks: TaskTable | None = None,
                 escalations: MutableMapping[str, EscalationState] | None = None,
                 open_escalations: dict[str, EscalationState] | None = None, spent_micros: int = 0,
                 reserved_micros: int = 0, extended_micros: int = 0, seq: int = 0, last_hash: str = "",
                 last_ts: str = "", halts: int = 0, recoveries: int = 0, last_actor: str | None = None,
                 pool: PoolFacts | None = None, member_of: str | None = None, archived: bool = False,
                 policy_line: str = "") -> None:
        self.run_id = run_id
        self.run_cap_micros = run_cap_micros
        self.task_cap_micros = task_cap_micros
        self.policy = policy
        self.opened_at = opened_at
        self.tasks = TaskTable() if tasks is None else tasks
        self.escalations = {} if escalations is None else escalations
        self.open_escalations = {} if open_escalations is None else open_escalations
        self.spent_micros = spent_micros
        self.reserved_micros = reserved_micros
        self.extended_micros = extended_micros
        self.seq = seq
        self.last_hash = last_hash
        self.last_ts = last_ts
        self.halts = halts
        self.recoveries = recoveries
        self.last_actor = last_actor
        self.pool = pool
        self.member_of = member_of
        self.archived = archived
        self.policy_line = policy_line

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


