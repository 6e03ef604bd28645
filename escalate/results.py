"""What :class:`escalate.Ledger`'s commands return: one JSON-ready dict per answer.

Every amount is integer micros. The same dicts are what ``--json`` prints. Each ``*Answer``
is what a decision answers (:class:`escalate.core.decide.Decision`); the ``*Result`` the
command returns is that answer with the run (or pool) it was given for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, NotRequired, TypedDict

from escalate.core.events import VoidReason
from escalate.core.state import EscalationState
from escalate.errors import Pending, Refused

if TYPE_CHECKING:
    from escalate.core.payloads import EscalationPolicy  # (types only: kept off the hot path)


class TaskAnswer(TypedDict):
    """``reserve``, ``increase`` and ``release``: the task's money after the command.
    ``status`` is what happened (``reserved``, ``increased``, ``released``, ``exists``
    for a repeat, or ``escalated``/``halted`` in shadow mode, which only records)."""

    status: str
    task: str
    reserved_micros: int
    remaining_micros: int
    actual_micros: NotRequired[int | None]
    shadow_escalation_id: NotRequired[str]
    withdrawn_escalation_id: NotRequired[str]  # a release closed the task's open escalation
    pool_remaining_micros: NotRequired[int]  # a member run: what is left of its pool in this period
    pool: NotRequired[str]  # a member run: its pool,
    pool_escalation: NotRequired[EscalationPolicy]  # and the pool's escalation policy, which binds it too


class TaskResult(TaskAnswer):
    """:class:`TaskAnswer`, for ``run``."""

    run: str


class ResolutionAnswer(TypedDict):
    """``approve``, ``pause``, ``cancel`` and ``withdraw`` (and ``wait`` on an approval)."""

    status: str  # approved, paused, cancelled, withdrawn, recorded (short of a quorum), or exists
    escalation_id: str
    task: str
    mode: str | None
    by: str | None
    resolved_at: NotRequired[str | None]
    state: NotRequired[str]
    reserved_micros: NotRequired[int]
    extension_micros: NotRequired[int]
    pool_extension_micros: NotRequired[int]  # approving a pool_cap escalation
    # An approval short of a quorum (status recorded, or exists; state open): who approved
    # so far, and how many must.
    approvals: NotRequired[list[str]]
    quorum: NotRequired[int]


class ResolutionResult(ResolutionAnswer):
    """:class:`ResolutionAnswer`, for ``run``."""

    run: str


class PolicyAnswer(TypedDict):
    """``set_policy``: the escalation policy now in force."""

    status: Literal["changed", "exists"]
    escalation: EscalationPolicy
    pool: NotRequired[str]  # a member run: its pool,
    pool_escalation: NotRequired[EscalationPolicy]  # whose policy binds it too, whatever its own says


class PolicyResult(PolicyAnswer):
    """:class:`PolicyAnswer`, for ``run``."""

    run: str


class ArchiveAnswer(TypedDict):
    """``archive``: the run takes no more writes (``exists``: it was archived already)."""

    status: Literal["archived", "exists"]
    archived: bool


class ArchiveResult(ArchiveAnswer):
    """:class:`ArchiveAnswer`, for ``run``."""

    run: str


class NotifiedAnswer(TypedDict):
    """One notify attempt recorded (``recorded``), or not (``unknown``: no such escalation
    to notify of)."""

    status: Literal["recorded", "unknown"]
    escalation_id: NotRequired[str]
    attempt: NotRequired[int]
    ok: NotRequired[bool]
    detail: NotRequired[str]


class DeliveryResult(TypedDict):
    """One notify attempt: ``attempt`` is ``None`` when it could not be recorded."""

    escalation_id: str
    attempt: int | None
    ok: bool
    detail: str


class SweepAnswer(TypedDict):
    """``sweep``'s write: the escalations it expired (paused by ``timeout``)."""

    status: Literal["swept"]
    expired: list[str]


class SweepResult(SweepAnswer):
    """``sweep``: the escalations this call expired (paused by ``timeout``), the notices it
    sent again, and the ids of those due that it left for the next sweep (its deadline
    passed before they could start)."""

    run: str
    notified: list[DeliveryResult]
    deferred: list[str]


class PoolLogAnswer(TypedDict):
    """A write to a pool's log that a command makes on the way (a run joins, its join is
    voided, its first line recorded): what it did."""

    status: Literal["exists", "joined", "kept", "voided", "opened"]
    reason: NotRequired[VoidReason]


class PoolPolicyAnswer(TypedDict):
    """``pools set``: the pool's escalation policy and cap now in force."""

    status: Literal["changed", "exists"]
    escalation: EscalationPolicy
    cap_micros: int


class PoolPolicyResult(PoolPolicyAnswer):
    """:class:`PoolPolicyAnswer`, for ``pool``."""

    pool: str


def resolution_outcome(run_id: str, escalation: EscalationState) -> ResolutionResult:
    """What ``wait`` answers for a resolved escalation: the approval, or the refusal to raise."""
    facts: dict[str, Any] = {"run": run_id, "escalation_id": escalation.id, "task": escalation.task,
                             "mode": escalation.mode, "by": escalation.by,
                             "resolved_at": escalation.resolved_at}
    if escalation.mode == "extend":
        return {"status": "approved", "reserved_micros": escalation.requested_micros,
                "extension_micros": escalation.extension_micros, "run": run_id,
                "escalation_id": escalation.id, "task": escalation.task, "mode": escalation.mode,
                "by": escalation.by, "resolved_at": escalation.resolved_at}
    if escalation.mode == "cancel":
        raise Refused(f"escalation {escalation.id} was cancelled by {escalation.by}; task "
                      f"{escalation.task} is halted for good — use a new task id", code="cancelled",
                      **facts)
    if escalation.mode == "withdraw":
        raise Pending(f"escalation {escalation.id} was withdrawn by {escalation.by}; task "
                      f"{escalation.task} keeps what it held (a release settled it, or it may ask "
                      "again)", code="withdrawn", **facts)
    raise Pending(f"escalation {escalation.id} was paused by {escalation.by}; task "
                  f"{escalation.task} may ask again later with the same reserve", code="paused", **facts)
