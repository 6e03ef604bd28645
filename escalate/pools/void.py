"""A join that holds no run of the pool, voided in the pool's log (``run_join_voided``).

``runs init RUN --pool POOL`` appends ``run_joined`` before it creates the run. If another
init created a ledger under that id meanwhile (a run of no pool, a run of another pool, a
pool: a race), the join holds no run of the pool: the losing init voids it, in the pool's
critical section, before it reports that the id exists (:func:`join`). A join that is not
voided, but whose id another ledger holds, is a member that cannot be read (exit 6): the
pool cannot tell a lost race from a member moved away and replaced, so it never counts it
as nothing (:func:`escalate.pools.member.not_the_member`). A loser killed before its void
is finished by running the same ``runs init`` again (:func:`void_if_taken`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from escalate.config import Clock
from escalate.core.state import RunState
from escalate.pools import book
from escalate.pools.decide import decide_void
from escalate.pools.member import taken_by
from escalate.stores.seam import LedgerStore, Store, first_event

if TYPE_CHECKING:
    from escalate.service import Ledger


def join(runs: Store, pool_id: str, run_store: LedgerStore, *, actor: str, clock: Clock,
         lock_timeout: float, create: Callable[[], bool]) -> bool:
    """:func:`escalate.pools.book.join`, and when ``create`` found the id taken by another
    ledger, the join voided; returns what ``create`` did."""
    created = book.join(runs, pool_id, run_store, actor=actor, clock=clock, lock_timeout=lock_timeout,
                        create=create)
    if not created:
        void_taken_join(runs, pool_id, run_store, actor=actor, clock=clock, lock_timeout=lock_timeout)
    # The run's first line is durable now (or another init's is): the pool records it.
    book.open_member(runs, pool_id, run_store, actor=actor, clock=clock, lock_timeout=lock_timeout)
    return created


def void_taken_join(runs: Store, pool_id: str, run_store: LedgerStore, *, actor: str, clock: Clock,
                    lock_timeout: float) -> bool:
    """Void the pool's join of ``run_store``'s id when another ledger holds that id (read in
    the pool's critical section: a member's first line names the pool, and only a join
    creates one); True when it was voided."""
    pool_store = runs.ledger(pool_id, lock_timeout=lock_timeout)
    with pool_store.command():
        _, decision = book.write_pool(
            runs, pool_store,
            lambda state, now, _, pool: decide_void(state, run_store.run_id,
                                                    taken_by(first_event(run_store), pool_id)),
            actor=actor, clock=clock, lock_timeout=lock_timeout)
    if decision.error is not None:
        raise decision.error
    return bool(decision.events)


def void_if_taken(run: Ledger, pool: RunState) -> bool:
    """Whether ``run``'s ledger exists (``runs init --pool`` then joins nothing). When
    ``pool`` lists it but another ledger holds the id (an init that lost the race was killed
    before its void), the join is voided now: the retry does what the loser would have; when
    it is the pool's run whose first line the pool has not recorded (an init cut before its
    ``member_opened``), it is recorded now."""
    first = first_event(run.store)
    if first is None:
        return False
    if pool.pool is not None and run.run_id in pool.pool.members and taken_by(first, pool.run_id) is not None:
        void_taken_join(run.runs_store, pool.run_id, run.store, actor=run.actor, clock=run.clock,
                        lock_timeout=run.lock_timeout)
    elif pool.pool is not None and run.run_id in pool.pool.members and run.run_id not in pool.pool.opened:
        # An init cut between the run's first line and ``member_opened``: the retry records it.
        book.open_member(run.runs_store, pool.run_id, run.store, actor=run.actor, clock=run.clock,
                         lock_timeout=run.lock_timeout)
    return True
