"""The pool's rules on its decisions: a ``pool_cap`` escalation is approved and resolved in its
member run's log, but the policy that decides it — its pinned keys, its quorum — is in the
pool's log. A run's own fold cannot see it, so whoever reads a run as its pool's member
checks each such decision here against the pool's policy that governs it (read from the
pool's log only once the fold has checked it: :class:`PoolTimeline`), by the rules a run's
own policy is checked by
(:func:`escalate.core.fold_escalations.check_signature`,
:func:`escalate.core.rules.quorum_required`): ``runs verify``, ``gate``,
``pools verify`` and ``gate --pool``, and every fold of a member's money for its pool
(:func:`escalate.pools.member.fold_member`: a pool's books, ``pools show``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import orjson

from escalate.core.events import TIMEOUT_ACTOR, iter_lines, line_hash
from escalate.core.fold_escalations import check_resolver, check_signature
from escalate.core.rules import beyond_signed, grant_quorum, least_signed, needed_extension, same_approver
from escalate.core.state import ForgedSignature, Policy, RuleViolation, RunState
from escalate.stores.seam import LedgerStore, Store, first_event, pool_of


class PoolProblem(NamedTuple):
    """A line of a member's log that breaks its pool's policy, and whether it is a forged or
    missing signature (``forged_signature``) rather than another broken rule."""

    line: int
    problem: str
    forged: bool

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

    def problems(self, timeline: PoolTimeline, pool_id: str) -> list[PoolProblem]:
        """``(line, problem)`` for each decision that breaks the pool policy that governs it
        (:meth:`PoolTimeline.governing`): :func:`check_decision`. None is passed over: one
        that no policy of the pool can govern is a problem itself."""
        found = []
        approvals: dict[Any, list[dict[str, str]]] = {}
        signed: dict[Any, list[int] | None] = {}
        for number, event in self.decided:
            escalation, asked_hash = self.asked[event.get("id")]
            try:
                deciding = timeline.governing(pool_id, number, escalation, event)
                check_decision(deciding, f"pool {pool_id}", self.run_id, escalation, asked_hash, event,
                               approvals, signed)
            except RuleViolation as exc:
                found.append(PoolProblem(number, f"pool_cap escalation: {exc}",
                                         isinstance(exc, ForgedSignature)))
        return found


def check_decision(policy: Policy, whose: str, run_id: str, escalation: Mapping[str, Any], asked_hash: str,
                   event: Mapping[str, Any], approvals: dict[Any, list[dict[str, str]]],
                   signed_grants: dict[Any, list[int] | None]) -> None:
    """The rules a run's fold applies to its own escalations' decisions, applied under the
    pool's ``policy``: the requester never decides, and under ``vouched`` only a listed
    identity does (:func:`check_resolver`); while it pins keys, each is signed by a key
    pinned for its approver (:func:`check_signature`); a grant has the approvals its quorum needs
    (:func:`~escalate.core.rules.quorum_required`) of distinct approvers, told apart by the
    pool's policy (:func:`~escalate.core.rules.same_approver`), for what it grants
    (:func:`~escalate.core.rules.grant_quorum`), and never more than an earlier approval
    signed for (:func:`~escalate.core.rules.beyond_signed`). ``approvals``: each
    escalation's approvals so far; ``signed_grants``: the least grant they signed for."""
    escalation_id = event.get("id")
    approving = event.get("type") == "escalation_approved"
    mode = "extend" if approving else str(event.get("mode"))
    by, role = str(event.get("by")), event.get("role")
    if mode != "withdraw" and by != TIMEOUT_ACTOR:
        asker, asker_role = escalation.get("actor"), escalation.get("role")
        check_resolver(policy, True, str(escalation_id), asker if isinstance(asker, str) else None,
                       asker_role if isinstance(asker_role, str) else None, by,
                       role if isinstance(role, str) else None)
    if policy.approver_keys:
        requested = escalation.get("requested_micros")
        amount = requested if type(requested) is int else -1
        check_signature(policy, whose, run_id, str(escalation_id), amount, asked_hash, event, mode, by)
    if mode != "extend":
        return
    # Approvers count once, told apart by the pool's policy as its writer tells them apart.
    key, vouched = event.get("key"), role if isinstance(role, str) else None
    signer = key if isinstance(key, str) else None
    so_far = approvals.setdefault(escalation_id, [])
    damage = ForgedSignature if policy.approver_keys else RuleViolation
    if any(same_approver(policy, False, earlier, by, vouched, signer) for earlier in so_far):
        raise damage(f"escalation {escalation_id!r} approved twice by {vouched or by!r}")
    granted = _grant(event)
    if approving and "extension_micros" in event:  # (older lines record no amount)
        signed_grants[escalation_id] = least_signed(signed_grants.get(escalation_id), granted)
    elif beyond_signed(granted, signed_grants.get(escalation_id)):
        raise damage(f"escalation {escalation_id} grants {granted[0]} (pool {granted[1]}), more than an "
                     f"earlier approval signed for ({signed_grants[escalation_id]})")
    so_far.append({"by": by, **({"role": vouched} if vouched else {}), **({"key": signer} if signer else {})})
    count = len(so_far)
    needed = grant_quorum([policy], _needed_extension(escalation), (0, 0) if approving else granted)
    if not approving and count < needed:
        raise RuleViolation(f"escalation {escalation_id} granted with {count} of the {needed} approvals "
                            f"the {whose}'s quorum needs")


def _grant(event: Mapping[str, Any]) -> tuple[int, int]:
    """The run's and the pool's extension a decision line records (0 where left out, or not
    a number: the fold names such a line)."""
    values = [event.get(key, 0) for key in ("extension_micros", "pool_extension_micros")]
    return (values[0] if type(values[0]) is int else 0, values[1] if type(values[1]) is int else 0)


def _needed_extension(escalation: Mapping[str, Any]) -> int:
    """The cap extension an escalation line says it needed (older lines: from its snapshot,
    as the run's fold reads them)."""
    recorded = escalation.get("needed_extension_micros")
    if type(recorded) is int:
        return recorded
    values = [escalation.get(key, 0) for key in ("requested_micros", "from_micros", "remaining_micros")]
    if not all(type(value) is int for value in values):
        return 0
    return needed_extension(values[0] - values[1], values[2])


class PoolTimeline:
    """The pool's policy over time, from its log checked line by line by the fold every
    reader of a ledger uses (its chain, and each signed policy change against the keys then
    pinned): ``(ts, policy)`` from its first line and each change, in the log's order, and
    the index of the one in force when the member joined (``run_joined``, 0 when the log
    names no join of it). A pool log that fails the fold vouches for no decision. ``anchors``:
    where the member's log ended when a change of who decides was written (``members_at``:
    ``(policy index, lines, hash of the last line)``), which ties a decision to a policy by
    its place in the log rather than by the time it gives."""

    __slots__ = ("anchors", "joined", "policies")

    def __init__(self, pool: LedgerStore, run_id: str) -> None:
        from escalate.core import fold  # (only a member holding a pool decision loads the pool's fold)

        self.policies: list[tuple[str, Policy]] = []
        self.anchors: list[tuple[int, int, str]] = []
        self.joined = 0
        state: RunState | None = None
        with pool.reader() as stream:
            for number, (line, _) in enumerate(iter_lines(stream, 0), start=1):
                try:
                    event = orjson.loads(line)
                    if type(event) is not dict:
                        raise RuleViolation("the line is not a JSON object")
                    if state is None:
                        state = fold.initial_state(event, line_hash(line))
                    else:
                        fold.apply(state, event, line_hash(line))
                except (orjson.JSONDecodeError, RuleViolation) as exc:
                    # (a forged signature there is one here: it would lift the pool's keys)
                    damage = ForgedSignature if isinstance(exc, ForgedSignature) else RuleViolation
                    raise damage(f"its pool's log fails at line {number} ({exc}), so the pool's "
                                 "policy that decides it cannot be trusted") from None
                kind = event.get("type")
                if kind in ("pool_opened", "policy_changed"):
                    self.policies.append((str(event.get("ts")), state.policy))
                    head = (event.get("members_at") or {}).get(run_id)  # (the fold checked its shape)
                    if head is not None:
                        self.anchors.append((len(self.policies) - 1, head[0], head[1]))
                elif kind == "run_joined" and event.get("run") == run_id:
                    self.joined = len(self.policies) - 1

    def governing(self, pool_id: str, number: int, escalation: Mapping[str, Any],
                  event: Mapping[str, Any]) -> Policy:
        """The pool policy that decides ``event`` (line ``number``, an approval or resolution
        of the pool_cap ``escalation``): the last one in force at its time, never one set
        before the member joined, nor before the escalation fired (both times are read:
        backdating a decision never reaches an older, laxer policy than its escalation's),
        and where the pool recorded the member's log (:attr:`anchors`), the one of its place
        in the log, whatever its time. A decision dated before the pool's first line is one
        no writer wrote: :class:`RuleViolation`."""
        times = [value for value in (escalation.get("ts"), event.get("ts")) if type(value) is str]
        if len(times) != 2:
            raise RuleViolation(f"escalation {event.get('id')} is decided at no time")
        when = max(times)
        at = next((index for index, (since, _) in reversed(list(enumerate(self.policies)))
                   if since <= when), None)
        if at is None:
            raise RuleViolation(f"escalation {event.get('id')} is decided at {when}, before its pool "
                                f"{pool_id} was opened")
        low = max((index for index, lines, _ in self.anchors if lines < number), default=self.joined)
        high = min((index for index, lines, _ in self.anchors if lines >= number), default=len(self.policies))
        return self.policies[min(max(at, self.joined, low), high - 1)][1]

    def unanchored(self, member: LedgerStore) -> str | None:
        """Why ``member``'s log is not the one the pool recorded (:attr:`anchors`), or None."""
        return unanchored(member, {lines: hashed for _, lines, hashed in self.anchors})


def unanchored(member: LedgerStore, wanted: dict[int, str]) -> str | None:
    """Why ``member``'s log is not the one its pool recorded (``wanted``: line number -> the
    hash that line had; one whose hash is another, or missing), or None."""
    if not wanted:
        return None
    broken = None
    with member.reader() as stream:
        for number, (line, _) in enumerate(iter_lines(stream, 0), start=1):
            if number in wanted and line_hash(line) != wanted.pop(number):
                broken = number
                break
            if not wanted:
                return None
    return (f"its log is not the one its pool recorded when its policy changed (line "
            f"{broken or min(wanted)}): it was rewritten since")


def pool_problems(runs: Store, pool_id: str, decisions: PoolDecisions) -> list[PoolProblem]:
    """The problems of ``decisions`` (a member's, of pool ``pool_id`` in ``runs``) against the
    keys the pool pinned; a member that holds no pool decision costs nothing (the pool's log
    is read only for one that does). A pool that is gone vouches for none of them."""
    if not decisions.decided:
        return []
    pool = runs.ledger(pool_id, lock_timeout=0)  # (only read: no lock is taken)
    if not pool.exists():
        return [PoolProblem(number, f"pool_cap escalation {event.get('id')}: its pool {pool_id} is gone "
                                    f"from {runs.where}, so its approvals cannot be checked", False)
                for number, event in decisions.decided]
    try:
        timeline = PoolTimeline(pool, decisions.run_id)
        rewritten = timeline.unanchored(runs.ledger(decisions.run_id, lock_timeout=0))
        if rewritten is not None:
            raise ForgedSignature(rewritten)  # (it would pass decisions off under a laxer policy)
    except RuleViolation as exc:
        return [PoolProblem(number, f"pool_cap escalation {event.get('id')}: {exc}",
                            isinstance(exc, ForgedSignature))
                for number, event in decisions.decided]
    return decisions.problems(timeline, pool_id)


def member_problems(runs: Store, store: LedgerStore) -> list[PoolProblem]:
    """For a run of a pool (``store``, in ``runs``): :func:`pool_problems` of its whole log,
    read once more (``runs verify``, ``gate``); nothing, and no read, for a run of no pool."""
    first = first_event(store)
    pool_id = pool_of(first) if first is not None and first.get("type") == "run_opened" else None
    if pool_id is None:
        return []
    decisions = PoolDecisions(str(first.get("run")) if first is not None else store.run_id)
    with store.reader() as stream:
        for number, (line, _) in enumerate(iter_lines(stream, 0), start=1):
            if b'"escalation' not in line:
                continue  # (no escalation line, nor a decision of one: not parsed)
            try:
                event = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue  # the fold names that line
            if isinstance(event, dict):
                decisions.see(number, event, line_hash(line))
    if not decisions.decided:  # (pool_problems checks a log holding decisions against every record)
        return _unrecorded(runs, pool_id, store)
    return pool_problems(runs, pool_id, decisions)


def _unrecorded(runs: Store, pool_id: str, store: LedgerStore) -> list[PoolProblem]:
    """A member's log (``store``, of pool ``pool_id`` in ``runs``) against where the pool's
    newest ``members_at`` says it ended: cut or rewritten behind it, the money the pool
    counted there is gone from it. A pool that cannot be read records nothing here (its own
    verify names it)."""
    pool = runs.ledger(pool_id, lock_timeout=0)  # (only read: no lock is taken)
    if not pool.exists():
        return []
    facts = pool.read().state.pool
    at = facts.at.get(store.run_id) if facts is not None else None
    why = None if at is None else unanchored(store, {at[0]: at[1]})
    return [] if why is None or at is None else [PoolProblem(at[0], why, False)]
