"""The signatures on a pool's decisions: a ``pool_cap`` escalation is approved and resolved in
its member run's log, but the keys that may sign it are pinned in the pool's log. A run's
own fold cannot see them, so whoever reads a run as its pool's member checks each such
decision here against the keys the pool pinned when it was written (its policy as of the
line's time), by the rule a run's own keys are checked by
(:func:`escalate.core.fold_escalations.check_signature`): ``runs verify``, ``gate``,
``pools verify`` and ``gate --pool``, and every fold of a member's money for its pool
(:func:`escalate.pools.member.fold_member`: a pool's books, ``pools show``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from escalate.core.events import iter_lines, line_hash
from escalate.core.fold_escalations import check_signature
from escalate.core.fold_fields import policy_field
from escalate.core.replay import read_events
from escalate.core.state import Policy, RuleViolation
from escalate.stores.seam import LedgerStore, Store, first_event, pool_of

# The lines of a member's log that decide a pool_cap escalation (the escalation_approved
# lines of a quorum, and its escalation_resolved).
_DECISIONS = ("escalation_approved", "escalation_resolved")


class PoolDecisions:
    """What a member run's log holds of its pool's decisions, collected as its lines are read
    (:meth:`see`, cheap for every other line): each ``pool_cap`` escalation with its line's
    hash, and each approval or resolution of one with its line number."""

    __slots__ = ("asked", "decided", "run_id")

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id  # the run's id as its first line names it (what a signature covers)
        self.asked: dict[Any, tuple[Mapping[str, Any], str]] = {}
        self.decided: list[tuple[int, Mapping[str, Any]]] = []

    def see(self, number: int, event: Mapping[str, Any], this_hash: str) -> None:
        """Note line ``number`` (``event``, whose line hashes to ``this_hash``) if the pool decides it."""
        kind = event.get("type")
        if kind == "escalation":
            if event.get("reason") == "pool_cap":
                self.asked[event.get("id")] = (event, this_hash)
        elif kind in _DECISIONS and event.get("id") in self.asked:
            self.decided.append((number, event))

    def problems(self, pool_events: list[Any], pool_id: str) -> list[tuple[int, str]]:
        """``(line, problem)`` for each decision the pool's pinned keys (as of the line's
        time, from ``pool_events``, the pool's log) do not vouch for: unsigned, or not
        signed by a key the pool pinned for its approver."""
        timeline = _policies(pool_events)
        found = []
        for number, event in self.decided:
            mode = "extend" if event.get("type") == "escalation_approved" else event.get("mode")
            ts = str(event.get("ts"))
            deciding = next((policy for since, policy in reversed(timeline) if since <= ts), None)
            if deciding is None or not deciding.approver_keys or mode not in ("extend", "pause", "cancel"):
                continue
            escalation, asked_hash = self.asked[event.get("id")]
            requested = escalation.get("requested_micros")
            try:
                check_signature(deciding, f"pool {pool_id}", self.run_id, str(event.get("id")),
                                requested if type(requested) is int else -1, asked_hash, event,
                                str(mode), str(event.get("by")))
            except RuleViolation as exc:
                found.append((number, f"pool_cap escalation: {exc}"))
        return found


def _policies(pool_events: list[Any]) -> list[tuple[str, Policy]]:
    """The pool's policy over time: ``(ts, policy)`` from its first line and each change."""
    timeline = []
    for event in pool_events:
        if isinstance(event, dict) and event.get("type") in ("pool_opened", "policy_changed"):
            try:
                timeline.append((str(event.get("ts")), policy_field(event.get("escalation"))))
            except RuleViolation:
                continue  # ``pools verify`` names that line in the pool's own report
    return timeline


def pool_problems(runs: Store, pool_id: str, decisions: PoolDecisions) -> list[tuple[int, str]]:
    """The problems of ``decisions`` (a member's, of pool ``pool_id`` in ``runs``) against the
    keys the pool pinned; a member that holds no pool decision costs nothing (the pool's log
    is read only for one that does). A pool that is gone vouches for none of them."""
    if not decisions.decided:
        return []
    pool = runs.ledger(pool_id, lock_timeout=0)  # (only read: no lock is taken)
    if not pool.exists():
        return [(number, f"pool_cap escalation {event.get('id')}: its pool {pool_id} is gone from "
                         f"{runs.where}, so its approvals cannot be checked")
                for number, event in decisions.decided]
    with pool.reader() as stream:
        pool_events, _ = read_events(stream, last=None, after_offset=0)
    return decisions.problems(pool_events, pool_id)


def member_problems(runs: Store, store: LedgerStore) -> list[tuple[int, str]]:
    """For a run of a pool (``store``, in ``runs``): :func:`pool_problems` of its whole log,
    read once more (``runs verify``, ``gate``); nothing, and no read, for a run of no pool."""
    first = first_event(store)
    pool_id = pool_of(first) if first is not None and first.get("type") == "run_opened" else None
    if pool_id is None:
        return []
    decisions = PoolDecisions(str(first.get("run")) if first is not None else store.run_id)
    with store.reader() as stream:
        for number, (line, _) in enumerate(iter_lines(stream, 0), start=1):
            try:
                event = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue  # the fold names that line
            if isinstance(event, dict):
                decisions.see(number, event, line_hash(line))
    return pool_problems(runs, pool_id, decisions)
