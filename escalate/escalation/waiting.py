"""Waiting for a person: ``escalate wait`` and ``reserve --wait`` block until an escalation
is resolved, without holding any lock, and resolve it by ``timeout`` themselves when it
expires (nobody else may ever write to the run again)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from escalate.core import resolve
from escalate.core.durations import MAX_WAIT_S, check_duration, format_duration
from escalate.core.events import format_ts
from escalate.core.ids import check_id
from escalate.core.state import EscalationState, Policy
from escalate.errors import Conflict, InputError, Pending
from escalate.results import ResolutionResult, resolution_outcome

if TYPE_CHECKING:
    from escalate.service import Ledger

_WAIT_POLL_S = 0.05
# How long a wait sleeps at most before it looks at the clock again (expiry follows it).
_WAIT_WAKE_S = 1.0


def wait_for(ledger: Ledger, escalation_id: str, timeout_s: float | None) -> ResolutionResult:
    """:meth:`escalate.Ledger.wait`: poll the log's size, fold when it changed."""
    check_id(escalation_id, what="escalation id")
    if timeout_s is not None:
        check_duration(timeout_s, what="wait timeout", maximum=MAX_WAIT_S)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    last_size = -1
    waiting: tuple[EscalationState, Policy] | None = None
    while True:
        size = ledger.store.size()
        if size != last_size:
            last_size = size
            state = ledger.state()
            escalation = state.escalations.get(escalation_id)
            if escalation is None or escalation.shadow or escalation.state == "resolved":
                # An answer rests only on durable bytes: the writer of what was read may
                # not have synced yet, and this fsync covers every byte written before it.
                ledger.store.sync()
            if escalation is None:
                raise InputError(f"no escalation {escalation_id} in run {ledger.run_id}; list them "
                                 f"with 'escalate escalations --run {ledger.run_id}'",
                                 code="unknown_escalation", escalation_id=escalation_id)
            if escalation.shadow:
                raise Conflict(f"escalation {escalation_id} was recorded in shadow mode and needs "
                               "nobody; there is nothing to wait for", escalation_id=escalation_id,
                               state="resolved", mode=None)
            if escalation.state == "resolved":
                return resolution_outcome(ledger.run_id, escalation)
            waiting = (escalation, state.policy)
        # Expiry follows the store's clock, not the log: nobody else may ever write to this
        # run again.
        now = format_ts(ledger.runs_store.now(ledger.clock)) if waiting is not None else ""
        if waiting is not None and resolve.is_expired(*waiting, now):
            waiting = None
            ledger.sweep(redeliver=False)
            continue
        if deadline is not None and time.monotonic() >= deadline:
            raise Pending(
                f"escalation {escalation_id} is still open after {format_duration(timeout_s or 0)}; "
                f"wait again or ask an approver to run 'escalate approve {ledger.run_id} {escalation_id}'",
                code="escalation_open", escalation_id=escalation_id, run=ledger.run_id)
        wake = _WAIT_WAKE_S if deadline is None else min(_WAIT_WAKE_S, deadline - time.monotonic())
        ledger.store.wait_for_change(last_size, max(wake, 0.0), poll_s=_WAIT_POLL_S)
