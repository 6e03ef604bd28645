"""The signatures on a pool's decisions: a ``pool_cap`` escalation is resolved in its member
run's log, but the keys that may sign it are pinned in the pool's log. A run's own fold
cannot see them, so ``pools verify`` checks each such resolution against the keys the
pool pinned when it was written (its policy as of the resolution's time)."""

from __future__ import annotations

from typing import Any

from escalate.core import sshsig
from escalate.core.events import TIMEOUT_ACTOR
from escalate.core.fold_fields import policy_field
from escalate.core.rules import pinned_keys
from escalate.core.state import Policy, RuleViolation


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


def pool_cap_problems(pool_events: list[Any], member_events: list[Any]) -> list[tuple[int, str]]:
    """``(line, problem)`` for each ``pool_cap`` resolution in a member run's log that the
    pool's pinned keys (as of that resolution) do not vouch for: unsigned, or not signed
    by a key the pool pinned for its resolver (the role, on PostgreSQL)."""
    timeline = _policies(pool_events)
    members = [event for event in member_events if isinstance(event, dict)]
    run_id = str(members[0].get("run")) if members else ""
    asked: dict[Any, tuple[dict[str, Any], str]] = {}
    problems = []
    for at, event in enumerate(members):
        if event.get("type") == "escalation" and event.get("reason") == "pool_cap":
            following = members[at + 1].get("prev") if at + 1 < len(members) else None
            asked[event.get("id")] = (event, str(following))
        if event.get("type") != "escalation_resolved" or event.get("id") not in asked:
            continue
        mode, by = event.get("mode"), event.get("by")
        if mode not in ("extend", "pause", "cancel") or (mode == "pause" and by == TIMEOUT_ACTOR):
            continue
        ts = str(event.get("ts"))
        deciding = next((policy for since, policy in reversed(timeline) if since <= ts), None)
        keys = deciding.approver_keys if deciding is not None else {}
        if deciding is None or not keys:
            continue
        escalation, line_hash = asked[event.get("id")]
        role = event.get("role")
        pinned = pinned_keys(deciding, by, role)
        name = role if deciding.approvers_match == "vouched" or not isinstance(by, str) else by
        signature = event.get("signature")
        seq = event.get("seq")
        line = seq if isinstance(seq, int) else at + 1
        if not isinstance(signature, str):
            problems.append((line, f"{mode} of pool_cap escalation {event.get('id')} by {name} is not "
                                   "signed, but the pool pins approvers' keys"))
            continue
        content = sshsig.canonical_content(run_id, str(event.get("id")), str(mode),
                                           escalation.get("requested_micros", -1), line_hash)
        try:
            sshsig.verify(signature, content, pinned)
        except sshsig.SignatureError as exc:
            problems.append((line, f"the signature of {name}'s {mode} of pool_cap escalation "
                                   f"{event.get('id')} does not check out against the keys the pool "
                                   f"pins: {exc}"))
    return problems
