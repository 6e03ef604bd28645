"""The approver's view: escalations across runs, most urgent first, each with what it needs
now (``escalate escalations``), and one escalation in full (``escalations show``), for
Python callers as for the CLI.

What an escalation needed when it was asked is in its line; what it needs now is computed
when shown, from what its run (or, for a ``pool_cap`` escalation, its pool in the current
period) has left now: other tasks may have reserved or released since.
"""

from __future__ import annotations

from typing import Any, NotRequired, TypedDict, cast

from escalate.core.decide import fired_limit
from escalate.core.events import PRIORITIES
from escalate.core.ids import check_id
from escalate.core.resolve import grant_delta, unknown_escalation
from escalate.core.rules import extension_left, needed_extension, quorum_required
from escalate.core.state import EscalationState, Policy, RunState
from escalate.errors import EscalateError
from escalate.escalation.delivery import answer_commands
from escalate.pools.pool import Pool, PoolReport
from escalate.reports.runs import iter_run_ids, opened_store
from escalate.service import Ledger
from escalate.stores.seam import Store, StoreLocation


class InboxRow(TypedDict):
    """One escalation of :func:`inbox`: its run and ``Escalation.to_json()``."""

    run: str
    id: str
    task: str
    kind: str
    from_micros: int
    requested_micros: int
    remaining_micros: int
    reason: str
    offered: list[str]
    opened_at: str
    expires_at: str | None
    shadow: bool
    state: str
    mode: str | None
    by: str | None
    resolved_at: str | None
    extension_micros: int
    requested_by: str | None
    requested_role: NotRequired[str]  # who the store vouches asked (absent: not recorded)
    resolved_role: NotRequired[str]  # who the store vouches resolved it
    approvals: NotRequired[list[dict[str, str]]]  # short of its quorum: the approvals so far
    quorum: NotRequired[int]
    request_reason: str
    priority: str
    needed_extension_micros: int
    notify_attempts: int
    notified_at: str | None
    notified_ok: bool | None
    pool: str | None  # reason pool_cap: the pool whose approvers decide it
    # Computed when shown, not recorded: the log's needed_extension_micros is what it needed
    # when asked, and other tasks may have reserved or released since.
    fired: str  # the limit it fired on: run_cap, threshold, pool_cap or pool_threshold
    needed_now_micros: int | None  # the extension approving it needs now (None: not open)
    run_remaining_now_micros: int  # what is left of the run now
    run_pool: str | None  # the pool the run belongs to, whatever fired (None: none)
    pool_remaining_micros: int | None  # what is left of run_pool in its current period


class NoticeAttempt(TypedDict):
    """One attempt to deliver an escalation's notice (an ``escalation_notified`` line)."""

    attempt: int
    at: str
    ok: bool
    detail: str


class EscalationView(InboxRow):
    """``escalations show``: one escalation in full, with the money of its run and pool now,
    its approvals, every notice attempt, and the commands that answer it."""

    run_money: dict[str, int]
    pool_money: dict[str, Any] | None  # None: the run is in no pool, or it cannot be read
    approvers: list[str]  # who may answer it (empty: anyone but the requester)
    # (and, always here: ``approvals``, each ``by``, ``role`` where vouched, ``at`` for the
    # one that granted it; ``quorum``, the distinct approvals that decide it)
    notices: list[NoticeAttempt]
    commands: dict[str, str]  # approve / pause / cancel: empty once it is settled


class SkippedRun(TypedDict):
    run: str
    error: str
    message: str


class Inbox(TypedDict):
    """The approver's inbox: escalations most urgent first, and the runs that could not be read."""

    escalations: list[InboxRow]
    skipped: list[SkippedRun]


def inbox(location: StoreLocation, *, run: str | None = None,
          open_only: bool = False) -> Inbox:
    """Escalations across runs (or of ``run`` only), most urgent first: open before settled,
    then by priority, then newest first; ``open_only`` keeps those waiting for a person.
    An unreadable run is skipped and listed, unless it is ``run``."""
    with opened_store(location) as store:
        run_ids = [run] if run is not None else list(iter_run_ids(store))
        rows: list[InboxRow] = []
        skipped: list[SkippedRun] = []
        pools: dict[str, int | None] = {}  # each pool's remaining, read once for all its runs
        for run_id in run_ids:
            try:
                with Ledger.open(store, run_id) as ledger:
                    state, pool = ledger.state(), ledger.pool_id()
            except EscalateError as error:
                if run is not None:
                    raise
                skipped.append({"run": run_id, "error": error.code, "message": error.message})
                continue
            if pool is not None and pool not in pools:
                pools[pool] = pool_remaining(store, pool)
            rows += [escalation_row(state, item, pool, None if pool is None else pools[pool])
                     for item in state.escalations.values() if not open_only or item.state == "open"]
    # Most urgent first: what waits for a person before what is settled, then by priority,
    # then newest first (two stable sorts).
    rows.sort(key=lambda row: row["opened_at"], reverse=True)
    rows.sort(key=lambda row: (row["state"] != "open" or row["shadow"], -PRIORITIES.index(row["priority"])))
    return {"escalations": rows, "skipped": skipped}


def pool_remaining(location: Store, pool_id: str) -> int | None:
    """What is left of pool ``pool_id`` in its current period; None when the pool cannot be
    read (its members' escalations are still listed)."""
    try:
        return Pool.open(location, pool_id).show()["remaining_micros"]
    except EscalateError:
        return None


def escalation_row(state: RunState, escalation: EscalationState, pool: str | None,
                   pool_left: int | None) -> InboxRow:
    """``escalation`` of the run ``state`` as the inbox lists it, with what it needs now:
    the extension an approval would grant if given now, from what is left now of the run
    (or, for a ``pool_cap`` escalation, of ``pool``, which has ``pool_left``)."""

    row = escalation.to_json()
    needed: int | None = None
    if escalation.state == "open" and not escalation.shadow:
        left = pool_left if escalation.reason == "pool_cap" else state.remaining_micros
        needed = None if left is None else needed_extension(grant_delta(state, escalation), left)
    # A run belongs to one pool for good: its pool_cap escalations are that pool's. (A cast:
    # EscalationState.to_json() is a plain dict, its optional keys set in place, in order.)
    return cast(InboxRow, {"run": state.run_id, **row,
                           "pool": pool if escalation.reason == "pool_cap" else None,
                           "fired": fired_limit(row), "needed_now_micros": needed,
                           "run_remaining_now_micros": state.remaining_micros, "run_pool": pool,
                           "pool_remaining_micros": pool_left})


def escalation_view(location: StoreLocation, run_id: str,
                    escalation_id: str) -> EscalationView:
    """Escalation ``escalation_id`` of run ``run_id`` in full (:class:`EscalationView`),
    computed now from the run's log and its pool's; an unknown id is :class:`InputError`."""
    with opened_store(location) as store:
        check_id(escalation_id, what="escalation id")
        with Ledger.open(store, run_id) as ledger:
            state, events = ledger.state(), ledger.events()[0]
            pool = ledger.pool_id()
        escalation = state.escalations.get(escalation_id)
        if escalation is None:
            raise unknown_escalation(state.run_id, escalation_id)
        report, pool_policy = _pool_now(store, pool) if pool is not None else (None, None)
        row = escalation_row(state, escalation, pool, None if report is None else report["remaining_micros"])
    # Who decides it: the pool's policy for a pool_cap escalation, the run's otherwise.
    policy = pool_policy if pool_policy is not None and escalation.reason == "pool_cap" else state.policy
    waiting = escalation.state == "open" and not escalation.shadow
    return {
        **row,
        "run_money": {"cap_micros": state.cap_micros, "committed_micros": state.committed_micros,
                      "remaining_micros": state.remaining_micros, "extended_micros": state.extended_micros,
                      "extension_left_micros": extension_left(state.policy.max_extension_micros,
                                                              state.extended_micros)},
        "pool_money": None if report is None or pool_policy is None else {
            "pool": report["pool"], "period": report["period"], "cap_micros": report["cap_micros"],
            "committed_micros": report["committed_micros"], "remaining_micros": report["remaining_micros"],
            "extended_micros": report["extended_micros"],
            "extension_left_micros": extension_left(pool_policy.max_extension_micros,
                                                    report["extended_micros"])},
        "approvers": list(policy.approvers),
        "approvals": _approvals(escalation),
        "quorum": quorum_required([policy], escalation.needed_extension_micros, escalation.quorum),
        "notices": [{"attempt": event["attempt"], "at": event["ts"], "ok": event["ok"],
                     "detail": event.get("detail", "")}
                    for event in events if event.get("type") == "escalation_notified"
                    and event.get("id") == escalation_id],
        "commands": answer_commands(state.run_id, escalation_id, escalation.offered,
                                    signed=bool(policy.approver_keys)) if waiting else {},
    }


def _pool_now(location: Store, pool_id: str) -> tuple[PoolReport | None, Policy | None]:
    """The pool's money now and its policy; both None when it cannot be read (the run's own
    money and the escalation are still shown)."""
    try:
        pool = Pool.open(location, pool_id)
        return pool.show(), pool.state().policy
    except EscalateError:
        return None, None


def _approvals(escalation: EscalationState) -> list[dict[str, str]]:
    """The approvals so far (short of a quorum), then the one that granted it, if any."""
    role = {"role": escalation.resolved_role} if escalation.resolved_role else {}
    granted = [{"by": escalation.by, **role, "at": escalation.resolved_at or ""}] \
        if escalation.mode == "extend" and escalation.by else []
    return [*escalation.approvals, *granted]
