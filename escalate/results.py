"""What :class:`escalate.Ledger`'s commands return: one JSON-ready dict per answer.

Every amount is integer micros. The same dicts are what ``--json`` prints.
"""

from __future__ import annotations

from typing import Any, Literal, NotRequired, TypedDict

from escalate.core.state import EscalationState
from escalate.errors import Pending, Refused


class TaskResult(TypedDict):
    """``reserve``, ``increase`` and ``release``: the task's money after the command.
    ``status`` is what happened (``reserved``, ``increased``, ``released``, ``exists``
    for a repeat, or ``escalated``/``halted`` in shadow mode, which only records)."""

    run: str
    status: str
    task: str
    reserved_micros: int
    remaining_micros: int
    actual_micros: NotRequired[int | None]
    shadow_escalation_id: NotRequired[str]
    withdrawn_escalation_id: NotRequired[str]  # a release closed the task's open escalation
    pool_remaining_micros: NotRequired[int]  # a member run: what is left of its pool in this period
    pool: NotRequired[str]  # a member run: its pool,
    pool_escalation: NotRequired[dict[str, Any]]  # and the pool's escalation policy, which binds it too


class ResolutionResult(TypedDict):
    """``approve``, ``pause``, ``cancel`` and ``withdraw`` (and ``wait`` on an approval)."""

    run: str
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


class PolicyResult(TypedDict):
    """``set_policy``: the escalation policy now in force."""

    run: str
    status: Literal["changed", "exists"]
    escalation: dict[str, Any]
    pool: NotRequired[str]  # a member run: its pool,
    pool_escalation: NotRequired[dict[str, Any]]  # whose policy binds it too, whatever its own says


class DeliveryResult(TypedDict):
    """One notify attempt: ``attempt`` is ``None`` when it could not be recorded."""

    escalation_id: str
    attempt: int | None
    ok: bool
    detail: str


class SweepResult(TypedDict):
    """``sweep``: the escalations this call expired (paused by ``timeout``), the notices it
    sent again, and the ids of those due that it left for the next sweep (its deadline
    passed before they could start)."""

    run: str
    status: Literal["swept"]
    expired: list[str]
    notified: list[DeliveryResult]
    deferred: list[str]


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
