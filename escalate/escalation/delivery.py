"""Delivering escalations to people: the notices the notify hook is sent, and each attempt
recorded afterwards as ``escalation_notified``.

A notice is sent after the decision it follows is durable and answered; recording the
attempt is a second, separate write (:class:`escalate.service.Ledger` passes it in as
``record``), so nothing here can change a decision or an exit code.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from escalate.core.durations import MAX_SWEEP_DEADLINE_S, check_duration
from escalate.core.events import PRIORITIES, add_seconds
from escalate.core.state import EscalationState
from escalate.errors import InputError
from escalate.results import DeliveryResult

if TYPE_CHECKING:
    from escalate.core.payloads import Payload
    from escalate.core.state import Policy

# Records one attempt (ok, detail) of an escalation's notice; returns the recorded result.
Record = Callable[[bool, str], Mapping[str, Any]]
MAX_PARALLEL = 32

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


@dataclass(frozen=True)
class SweepLimits:
    """How a sweep sends the notices due: ``parallel`` hooks at a time (1 to 32), none
    started after ``deadline_s`` (at most 1h). Checked when made: an :class:`InputError`
    comes before anything is written."""

    parallel: int = 4
    deadline_s: float = 60.0

    def __post_init__(self) -> None:
        if type(self.parallel) is not int or not 1 <= self.parallel <= MAX_PARALLEL:
            raise InputError(f"invalid --parallel {str(self.parallel)[:20]!r}: give a whole number from 1 "
                             f"to {MAX_PARALLEL}", code="invalid_input", value=str(self.parallel)[:20])
        check_duration(self.deadline_s, what="sweep deadline", maximum=MAX_SWEEP_DEADLINE_S)


SWEEP_LIMITS = SweepLimits()  # the defaults: 4 at a time, none started after a minute
Notice = dict[str, Any]


# The command that answers an escalation with each resolution it may offer.
ANSWER_COMMANDS = {"extend": "approve", "pause": "pause", "cancel": "cancel"}


def answer_commands(run_id: str, escalation_id: str, offered: Sequence[str], *,
                    signed: bool = False) -> dict[str, str]:
    """The exact commands that answer an open escalation, by command name (``approve``,
    ``pause``, ``cancel``), for the resolutions it offers; ``signed``: the policy that
    decides it pins approvers' keys, so each takes ``--sign KEYFILE`` (the approver's own
    key). Ids never need shell quoting (:func:`escalate.core.ids.valid_id`); the approver's
    name and store come from their environment (``ESCALATE_ACTOR``, ``ESCALATE_RUNS_DIR`` or
    ``ESCALATE_STORE``)."""
    sign = " --sign KEYFILE" if signed else ""
    return {ANSWER_COMMANDS[mode]: f"escalate {ANSWER_COMMANDS[mode]} {run_id} {escalation_id}{sign}"
            for mode in offered if mode in ANSWER_COMMANDS}


def new_notices(run_id: str, first_seq: int, actor: str, events: list[Payload],
                signed: Callable[[str], bool] = lambda reason: False) -> Iterator[dict[str, Any]]:
    """The notice of each escalation in a write that a person must answer, with the commands
    that answer it (``signed(reason)``: whether the policy deciding an escalation fired for
    ``reason`` pins approvers' keys; asked only when there is a notice)."""
    for event in events:
        if event["type"] == "escalation" and not event["shadow"]:
            yield {"run": run_id, "seq": first_seq, "requested_by": actor, "attempt": 1, **event,
                   "commands": answer_commands(run_id, event["id"], event["offered"],
                                               signed=signed(event["reason"]))}


def notice_again(run_id: str, escalation: EscalationState, *, signed: bool = False) -> dict[str, Any]:
    """An open escalation's notice sent again, with the fields of its ``escalation``
    line (its ``seq`` is in its id), the attempt this is, and the commands that answer it
    (``signed``: as :func:`answer_commands`)."""
    fields = escalation.to_json()
    return {"run": run_id, "seq": int(escalation.id.rpartition("-")[2] or 0),
            "requested_by": escalation.requested_by, "attempt": escalation.notify_attempts + 1,
            "type": "escalation",
            **{key: fields[key] for key in (
                "id", "task", "kind", "from_micros", "requested_micros", "remaining_micros", "reason",
                "offered", "needed_extension_micros", "expires_at", "shadow", "request_reason",
                "priority")},
            "commands": answer_commands(run_id, escalation.id, escalation.offered, signed=signed)}


def deliver(notify_cmd: str, timeout_s: float, notice: dict[str, Any], record: Record) -> DeliveryResult:
    """Run the hook, then record the attempt with ``record``. The decision it follows is
    already durable and answered, so a failure to record is only a warning: it never
    reaches the caller or its exit code."""
    escalation_id = notice["id"]
    from escalate.escalation.notify import run_hook  # (a command that notifies nobody never loads it)

    ok, detail = run_hook(notify_cmd, notice, timeout_s=timeout_s)
    try:
        recorded = record(ok, detail)
    except Exception as exc:  # anything at all: the answer it follows stands regardless
        print(f"escalate: warning: the notify attempt for {escalation_id} was not recorded ({exc}); "
              "the decision stands", file=sys.stderr)
        return {"escalation_id": escalation_id, "attempt": None, "ok": ok, "detail": detail}
    return {"escalation_id": escalation_id, "attempt": recorded.get("attempt"), "ok": ok,
            "detail": detail}


def deliver_all(notices: Sequence[Notice], send: Callable[[Notice], DeliveryResult],
                limits: SweepLimits) -> tuple[list[tuple[Notice, DeliveryResult]], list[Notice]]:
    """Send ``notices`` with ``send`` (which runs the hook and records the attempt),
    ``limits.parallel`` at a time, the most urgent first (each hook is a process of its own,
    so a hanging one holds only its thread, for at most its timeout). A notice not started
    within ``limits.deadline_s`` is not attempted and nothing is recorded for it: it is
    still due at the next sweep. Returns each notice sent with its attempt, and the notices
    left, each in the given order."""
    if not notices:
        return [], []
    from concurrent.futures import ThreadPoolExecutor  # (only a sweep with notices due needs it)

    deadline = time.monotonic() + limits.deadline_s
    ranked = sorted(range(len(notices)), key=lambda index: -_urgency(notices[index]))

    def attempt(index: int) -> DeliveryResult | None:
        return send(notices[index]) if time.monotonic() < deadline else None

    with ThreadPoolExecutor(max_workers=min(limits.parallel, len(notices))) as pool:
        outcomes = dict(zip(ranked, pool.map(attempt, ranked), strict=True))
    sent = [(notice, outcomes[index]) for index, notice in enumerate(notices)]
    return ([(notice, outcome) for notice, outcome in sent if outcome is not None],
            [notice for notice, outcome in sent if outcome is None])


def _urgency(notice: Mapping[str, Any]) -> int:
    priority = notice.get("priority")
    return PRIORITIES.index(priority) if priority in PRIORITIES else PRIORITIES.index("normal")
