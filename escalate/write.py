"""The write engine: one command's critical section on one ledger, ``lock → fold → decide →
append``.

:func:`write` takes the store's transaction, loads the fold, expires what is due, asks a
pure ``decide`` function, seals the new lines and folds them again (nothing is written
that a replay would refuse), appends them all or nothing and keeps the checkpoint. It
returns the decision; making it durable and answering it is the caller's
(:class:`escalate.service.Ledger`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Protocol, TypeVar

from escalate.config import Clock
from escalate.core import fold, resolve
from escalate.core.decide import Decision
from escalate.core.events import TIMEOUT_ACTOR, Event, format_ts, parse_ts, seal
from escalate.core.replay import Replayed
from escalate.core.state import RuleViolation, RunState
from escalate.errors import Conflict, CorruptLedger, EscalateError, InputError
from escalate.stores.checkpoint import CheckpointInvalid
from escalate.stores.seam import LedgerStore, RecoveredFirstLines, Transaction

if TYPE_CHECKING:
    from escalate.core.payloads import Payload
    from escalate.core.pool_state import PoolView  # (a run without a pool never loads it)

R = TypeVar("R")  # what the decision answers (an ``*Answer`` of :mod:`escalate.results`)
# A decision from the state, the write's time, the escalations this write expires and,
# for a run in a pool, what it knows of the pool.
Decide = Callable[[RunState, str, list[str], "PoolView | None"], Decision[R]]


class Inside(Protocol):
    """What else happens inside a write's critical section (a pool's books follow a write to
    a member run, or to the pool's own log: :mod:`escalate.pools.book`)."""

    def loaded(self, transaction: Transaction, replayed: Replayed) -> None:
        """The ledger was loaded, nothing decided yet."""
        ...

    def view(self, now: str) -> PoolView | None:
        """What the decision knows of the pool, for a write at ``now``."""
        ...

    def before_append(self) -> None:
        """Lines are about to be appended."""
        ...

    def finish(self, events: list[Payload], now: str, offset: int, state: RunState) -> None:
        """Last, still inside: ``events`` were appended at ``now`` (none, when nothing was
        written), the log's complete lines end at ``offset``, ``state`` is after them."""
        ...


def asked_by(role: str | None, decide: Decide[R]) -> Decide[R]:
    """``decide``, with ``role`` — who the store vouches is acting (:meth:`LedgerStore.role`:
    the OS user, or the database role, asked by the caller before the write) — on the
    escalations it opens and on those a release withdraws: the vouched identity of the
    requester is what self-approval compares (:func:`escalate.core.rules.same_person`)."""
    def with_role(state: RunState, now: str, expired: list[str], pool: PoolView | None) -> Decision[R]:
        decision = decide(state, now, expired, pool)
        if role is None:
            return decision
        for event in decision.events:
            if event["type"] == "escalation" or (
                    event["type"] == "escalation_resolved" and event.get("by") != TIMEOUT_ACTOR
                    and "role" not in event):
                event["role"] = role
        return decision

    return with_role


class MembershipChanged(Conflict):
    """The run's first line, read under its lock, names another pool (or none) than the one
    this write was dispatched under: nothing was written; dispatch again under ``pool``."""

    pool: str | None

    def __init__(self, run_id: str, pool: str | None) -> None:
        super().__init__(f"run {run_id} changed while this command ran (its pool is now "
                         f"{pool or 'none'}); nothing was written — retry the command",
                         code="run_changed", run=run_id, pool=pool)


def write(store: LedgerStore, decide: Decide[R], *, actor: str, clock: Clock, checkpoint: bool = True,
          inside: Inside | None = None, member_of: str | None = None) -> tuple[int, Decision[R]]:
    """Decide and append in one critical section of ``store``, inside the caller's
    ``store.command()``; returns the seq of the first line the decision wrote (or would
    have) and the decision. Not yet synced. ``checkpoint=False``: never use or keep the
    store's checkpoint (a pool's log, whose state it does not hold). ``member_of``: the
    pool whose lock the caller holds for this run (:class:`MembershipChanged` when the
    run's first line names another)."""
    try:
        return _write_once(store, decide, actor, clock, checkpoint=checkpoint, keep_checkpoint=checkpoint,
                           inside=inside, member_of=member_of)
    except CheckpointInvalid:
        # A checkpoint row failed its checksum, or SQLite a read, before anything was
        # written: decide again from the log alone. That write replaces the checkpoint under
        # the lock (removing it here, unlocked, would pull it from under another thread's
        # command).
        return _write_once(store, decide, actor, clock, checkpoint=False, keep_checkpoint=checkpoint,
                           inside=inside, member_of=member_of)


def _write_once(store: LedgerStore, decide: Decide[R], actor: str, clock: Clock, *,
                checkpoint: bool, keep_checkpoint: bool, inside: Inside | None,
                member_of: str | None) -> tuple[int, Decision[R]]:
    with store.transaction(checkpoint=checkpoint) as transaction:
        replayed = transaction.load()
        if replayed.problem is not None:
            raise replayed.problem
        if replayed.state.pool is None and replayed.state.member_of != member_of:
            # (A folder removed and made again in a pool while a Ledger held the old answer:
            # never a write without the lock of the pool the run names.)
            raise MembershipChanged(store.run_id, replayed.state.member_of)
        if inside is not None:
            inside.loaded(transaction, replayed)
        state = replayed.state
        # Deadlines follow the store's clock (the machine's, or the database server's); the
        # lines' timestamps never go back: the log's last one is their floor
        # (docs/escalation.md: what a wrong clock can do).
        clock_now = format_ts(transaction.now(clock))
        now = max(clock_now, floor_ts(store, state))
        _FLOORS_CHECKED[:] = [now]  # (the next command's floor, when this one writes)
        seq, prev = state.seq, state.last_hash
        recovery = transaction.recovery(replayed)
        payloads: list[Payload] = [recovery] if recovery is not None else []
        expiries = resolve.expire(state, clock_now)
        payloads += expiries
        lines = seal_into(state, payloads, now, actor) if payloads else []
        decision = decide(state, clock_now, [event["id"] for event in expiries],
                          None if inside is None else inside.view(now))
        if isinstance(decision.error, InputError):
            raise decision.error  # bad input changes nothing on disk
        if state.archived and (decision.events or expiries):
            raise Conflict(f"run {state.run_id} is archived: it takes no more writes; use a new run",
                           code="run_archived", run=state.run_id, state="archived")
        first_seq = state.seq + 1
        lines += seal_into(state, decision.events, now, actor)
        if len(lines) > 1:
            # Everything one command writes is one group: a reader counts all of it or
            # none (a grant never without its reservation). Sealed again with the
            # markers, which changes only the hashes of the new lines.
            sealed = seal(payloads + decision.events, seq=seq, prev=prev, ts=now,
                          actor=actor, grouped=True)
            lines = [line + b"\n" for _, line, _ in sealed]
            rehash(state, sealed)
        if recovery is not None and not expiries and not decision.events:
            # Only the torn tail would be written: an answer that needs no write (an
            # idempotent repeat, a refusal already on record) leaves it for the next
            # writer, so it works on a full disk or read-only media too. The state folded
            # the recovery, so it is no checkpoint either.
            if inside is not None:
                inside.finish([], now, replayed.offset, state)
            return first_seq, decision
        if lines and inside is not None:
            inside.before_append()
        transaction.append(replayed, lines)
        if inside is not None:
            inside.finish(payloads + decision.events if lines else [], now,
                          replayed.offset + sum(map(len, lines)), state)
        if keep_checkpoint:
            transaction.save_checkpoint(replayed, state, lines)
    return first_seq, decision


def first_lines(payload: Payload, now: str, actor: str) -> tuple[bytes, RecoveredFirstLines]:
    """A new ledger's first line (``run_opened``, ``pool_opened``), and the lines to write
    instead where a crashed create left a torn first line (``LedgerStore.create``)."""
    [(_, line, _)] = seal([payload], seq=0, prev="", ts=now, actor=actor)

    def recovery(torn_bytes: int, saved_to: str) -> bytes:
        # The opening line must stay the first line, so a torn first line is recorded right
        # after it, in one group: a cut between the two leaves no ledger, only a torn tail.
        sealed = seal([payload, {"type": "recovery", "torn_bytes": torn_bytes, "saved_to": saved_to}],
                      seq=0, prev="", ts=now, actor=actor, grouped=True)
        return b"".join(sealed_line + b"\n" for _, sealed_line, _ in sealed)

    return line + b"\n", recovery


# The last timestamp known to be one exactly as escalate writes them (floor_ts): the last
# write's own, or the last floor checked.
_FLOORS_CHECKED: list[str] = []


def floor_ts(store: LedgerStore, state: RunState) -> str:
    """The last line's ``ts``, which the next line's may not go below. The fold checks a
    ``ts`` only where it keeps one for itself; this one it now uses, so it must be a
    timestamp exactly as escalate writes them (checked once per command, not per line)."""
    last_ts = state.last_ts
    if last_ts in _FLOORS_CHECKED:
        return last_ts
    try:
        if format_ts(parse_ts(last_ts)) == last_ts:
            return last_ts
    except (TypeError, ValueError, AttributeError):
        pass
    raise CorruptLedger(
        f"{store.where} line {state.seq}: field 'ts' must be a UTC timestamp like "
        f"2026-11-23T14:00:00.123456Z; writes are refused — inspect with "
        f"'escalate runs verify {state.run_id}'", run=state.run_id, line=state.seq,
        problem="invalid ts", first_suspect_line=state.seq)


def rehash(state: RunState, sealed: list[tuple[Event, bytes, str]]) -> None:
    """The hashes ``state`` keeps, as of ``sealed``: lines sealed again as one group (their
    ``more`` markers, and so every hash after the first, changed since they were folded). A
    signature covers an escalation's line and the line that set the policy: a stale hash in
    the checkpoint would make a signature that the next replay refuses."""
    for event, _, this_hash in sealed:
        if event["type"] == "escalation":
            state.escalations[event["id"]].line_hash = this_hash
        elif event["type"] == "policy_changed":
            state.policy_line = this_hash
    state.last_hash = sealed[-1][2]


def seal_into(state: RunState, payloads: Iterable[Payload], now: str, actor: str) -> list[bytes]:
    """Envelope the payloads after ``state`` and fold them in, so nothing is written that
    a replay would refuse."""
    lines = []
    for event, line, this_hash in seal(payloads, seq=state.seq, prev=state.last_hash, ts=now,
                                       actor=actor):
        try:
            fold.apply(state, event, this_hash)
        except RuleViolation as exc:  # a bug: refuse to write it
            raise EscalateError(f"internal error: refusing to write an invalid event ({exc}); "
                                "nothing was written — please report this bug") from exc
        lines.append(line + b"\n")
    return lines
