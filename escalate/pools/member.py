"""A member run's money in its pool, by period, folded from the run's own lines (what a
ledger's first line says — a run or a pool, and a run's pool — is read by
:func:`escalate.stores.seam.first_event`).

The lines were checked by the run's own fold when they were written; this fold only sums
them by period. Money counts in the period it is added in (a reservation, the delta of an
increase, the part of a release above its reservation), and a release below its
reservation frees the task's money from its most recent period first (``docs/pools.md``:
which period money counts in).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from escalate.core.events import Event, VoidReason, iter_lines, line_hash
from escalate.core.ids import shown_value
from escalate.core.pool_state import PeriodTotals, PoolFacts
from escalate.core.state import RunState
from escalate.errors import CorruptLedger, InputError
from escalate.stores.seam import LedgerStore, Store, first_event_in, first_line, pool_of

if TYPE_CHECKING:
    from escalate.pools.signatures import PoolDecisions


def facts_of(state: RunState) -> PoolFacts:
    if state.pool is None:
        raise InputError(f"{state.run_id} is a run, not a pool; see 'escalate pools list'",
                         code="not_a_pool", pool=state.run_id)
    return state.pool


@dataclass(slots=True)
class Member:
    """One run's money in its pool, by period, as of byte ``offset`` of its log (whose line
    before it hashes to ``head``): the tasks it holds (what each holds from each period it
    added money in) and each period's totals."""

    offset: int = 0
    # task -> [[period, amount], ...]: oldest first, one entry per period money was added in
    holding: dict[str, list[list[Any]]] = field(default_factory=dict)
    periods: dict[str, PeriodTotals] = field(default_factory=dict)
    # The hash of the last line folded: a log edited in place to the same size (its chain
    # rebuilt) ends in another line, so the writer folds it again ("" for none yet).
    head: str = ""

    def fold(self, event: Event, key_at: Callable[[str], str], deltas: dict[str, PeriodTotals]) -> None:
        """Fold one line already checked by the run's own fold, noting each change in
        ``deltas`` too (what the pool's totals must add)."""
        kind = event["type"]
        if kind == "budget_reserved":
            key, amount = key_at(event["ts"]), event["amount_micros"]
            self.holding[event["task"]] = [[key, amount]]
            self._change(deltas, key, reserved=amount)
        elif kind == "budget_increased":
            # The delta counts now, never in the task's first period: a $0 placeholder
            # reserved days ago must not spend today's cap in an earlier day's name.
            key, held = key_at(event["ts"]), self.holding[event["task"]]
            delta = event["to_micros"] - sum(amount for _, amount in held)
            if held[-1][0] == key:
                held[-1][1] += delta
            else:
                held.append([key, delta])
            self._change(deltas, key, reserved=delta)
        elif kind == "released":
            held = self.holding.pop(event["task"])
            above = event["actual_micros"] - sum(amount for _, amount in held)
            freed = max(-above, 0)
            for key, amount in reversed(held):  # a release frees the latest period's money first
                taken = min(freed, amount)
                freed -= taken
                self._change(deltas, key, reserved=-amount, spent=amount - taken)
            if above > 0:  # spent above the reservation: it counts when released (never refused)
                self._change(deltas, key_at(event["ts"]), spent=above)
        elif kind == "escalation_resolved" and event.get("pool_extension_micros"):
            self._change(deltas, key_at(event["ts"]), extended=event["pool_extension_micros"])

    def _change(self, deltas: dict[str, PeriodTotals], key: str, *, reserved: int = 0, spent: int = 0,
                extended: int = 0) -> None:
        change = PeriodTotals(reserved, spent, extended)
        self.periods.setdefault(key, PeriodTotals()).add(change)
        deltas.setdefault(key, PeriodTotals()).add(change)

    def to_bytes(self) -> bytes:
        return orjson.dumps({"offset": self.offset, "holding": self.holding, "head": self.head,
                             "periods": {key: totals.to_list() for key, totals in self.periods.items()}})

    @classmethod
    def from_bytes(cls, data: bytes) -> Member:
        raw = orjson.loads(data)
        periods = {key: PeriodTotals.from_list(values) for key, values in raw["periods"].items()}
        return cls(raw["offset"], raw["holding"], periods, raw["head"])


def member_unreadable(store: LedgerStore, pool_id: str, why: str, *, missing: bool,
                      line: int = 1, taken: bool = False, opened: bool = False) -> CorruptLedger:
    """The error of a member whose log cannot be read (exit 6): its pool cannot count its
    money, so money writes in the pool and ``gate --pool`` refuse until it is back.
    ``taken``: another ledger holds the member's id (:func:`taken_by`); ``opened``: the pool
    recorded the member's first line (``member_opened``), so no new run may take its place."""
    run_id = store.run_id
    remedy = (f"put the member back as {run_id} under {store.where} (its own folder: the pool recorded its "
              f"first line, so no new run can take its place; retire a run with 'escalate runs archive "
              f"{run_id}' instead)"
              if opened else
              f"put it back as {run_id} under {store.where} if it was moved (retire a run with "
              f"'escalate runs archive {run_id}' instead), or run 'escalate runs init {run_id} --pool "
              f"{pool_id}' again if that was cut short" if missing else
              f"put the member back as {run_id} under {store.where} (the other ledger aside first); "
              f"only if {run_id} never was this pool's (its 'escalate runs init {run_id} --pool {pool_id}' "
              "lost a race to another init of that id) run that command again: it voids the join"
              if taken else
              f"inspect it with 'escalate runs verify {run_id}' and restore its log from a copy")
    return CorruptLedger(f"run {run_id} of pool {pool_id} cannot be read ({why}): the pool cannot count "
                         f"its money, so money writes in the pool are refused — {remedy}",
                         code="member_unreadable", run=run_id, pool=pool_id, line=line, problem=why,
                         first_suspect_line=line)


def taken_by(first: dict[str, Any] | None, pool_id: str) -> VoidReason | None:
    """What other ledger holds a member's id, from the first line ``first`` of the ledger
    under that id: a run of no pool, a run of another pool, a pool; None when it is the
    pool's member (or there is no ledger yet)."""
    if first is None:
        return None
    if first.get("type") != "run_opened":
        return "a_pool"
    named = pool_of(first)
    return None if named == pool_id else "run_of_no_pool" if named is None else "run_of_another_pool"


def not_the_member(store: LedgerStore, pool_id: str, first: dict[str, Any],
                   reason: VoidReason, *, opened: bool = False) -> CorruptLedger:
    """:func:`member_unreadable` for a member whose id another ledger holds (``first``, its
    first line; ``reason``: :func:`taken_by`): moved away and replaced, or a join whose init
    lost a race and was never voided. Never counted as nothing: the pool cannot tell the two
    apart."""
    holder = {"a_pool": "a pool", "run_of_no_pool": "a run of no pool",
              "run_of_another_pool": f"a run of pool {pool_of(first)}"}[reason]
    return member_unreadable(store, pool_id, f"{store.run_id} under {store.where} is {holder}, not this "
                             "pool's member", missing=False, taken=True, opened=opened)


def member_first(store: LedgerStore, pool_id: str, opened: str | None) -> dict[str, Any]:
    """The first event of the pool's member ``store``, checked to be the member's own log
    (``docs/pools.md``: a member's identity): it exists, names this pool (:func:`taken_by`)
    and this run, and its first line has the chain hash ``opened`` the pool recorded in
    ``member_opened`` (None: a member joined before the pool recorded first lines, checked
    without it). Else :func:`member_unreadable`: a member moved away and replaced (by a new
    run of the same id, or a copy of another member) is never read as the member."""
    was_opened = opened is not None
    try:
        line = first_line(store)
    except InputError as error:  # the folder is a link, the log no file
        raise member_unreadable(store, pool_id, error.message, missing=True, opened=was_opened) from None
    first = None if line is None else first_event_in(line + b"\n")
    if line is None or first is None:
        raise member_unreadable(store, pool_id, f"no log of run {store.run_id} under {store.where}",
                                missing=True, opened=was_opened)
    taken = taken_by(first, pool_id)
    if taken is not None:
        raise not_the_member(store, pool_id, first, taken, opened=was_opened)
    if first.get("run") != store.run_id:
        raise member_unreadable(store, pool_id, f"the log under {store.run_id} is the log of run "
                                f"{shown_value(first.get('run'))}, not this member's",
                                missing=False, opened=True)
    if opened is not None and line_hash(line) != opened:
        raise member_unreadable(store, pool_id, f"the first line of {store.run_id}'s log is not the one the "
                                "pool recorded: the log was replaced", missing=False, opened=True)
    return first


def own_first_line(store: LedgerStore, pool_id: str) -> str | None:
    """The chain hash of ``store``'s first line when it is a run of pool ``pool_id`` under its
    own id (what ``member_opened`` records); None otherwise, or when there is none yet."""
    line = first_line(store)
    first = None if line is None else first_event_in(line + b"\n")
    if line is None or first is None or taken_by(first, pool_id) is not None:
        return None
    if first.get("run") != store.run_id:
        return None
    return line_hash(line)


def fold_member(store: LedgerStore, pool_id: str, key_at: Callable[[str], str], runs: Store, *,
                stop: int | None = None, opened: str | None = None,
                at: tuple[int, str] | None = None) -> Member:
    """A member's entry folded from its log: complete writes only (a write cut part-way, or
    a torn tail, counts as nothing, as in the run's own replay), up to byte ``stop``. A member
    with no log (moved away, deleted, its creation cut short), a damaged one (a line that does
    not parse, a broken chain), one whose id another ledger holds (:func:`not_the_member`:
    a join that lost a race is voided in the pool's log, and is then no member), or not the
    log the pool recorded (``opened``: :func:`member_first`) is :func:`member_unreadable`:
    never counted as nothing. So is one holding an approval of a ``pool_cap`` escalation that
    the keys its pool pins (in ``runs``) do not vouch for (:mod:`escalate.pools.signatures`):
    its grant is never counted. ``at``: where the pool's newest ``members_at`` says the log
    ended (its lines, the hash of the last): a log shorter than that, or whose line there
    hashes otherwise, was cut or rewritten since, and is :func:`member_unreadable` too."""
    from escalate.pools.signatures import PoolDecisions

    member, ignored = Member(), dict[str, PeriodTotals]()
    member_first(store, pool_id, opened)
    decisions = PoolDecisions(store.run_id)
    group: list[Event] = []
    number, prev = 0, ""
    with store.reader() as stream:
        for line, end in iter_lines(stream, 0):
            if stop is not None and end > stop:
                break
            number += 1
            try:
                event = orjson.loads(line)
                # The chain, as the run's own fold checks it: an edited line is refused.
                if event["seq"] != number or event["prev"] != prev:
                    raise member_unreadable(store, pool_id, f"line {number} breaks the seq or prev "
                                            "chain: a line was changed, removed or inserted",
                                            missing=False, line=number)
                prev = line_hash(line)
                if at is not None and number == at[0] and prev != at[1]:
                    raise not_as_recorded(store, pool_id, number)
                if number == 1 and opened is not None and prev != opened:  # swapped since member_first
                    raise member_unreadable(store, pool_id, "its first line changed while it was read",
                                            missing=False, opened=True)
                decisions.see(number, event, prev)
                group.append(event)
                if event.get("more"):
                    continue  # more lines of the same write follow
                for each in group:
                    member.fold(each, key_at, ignored)
            except orjson.JSONDecodeError:
                raise member_unreadable(store, pool_id, f"line {number} does not parse", missing=False,
                                        line=number) from None
            except (AttributeError, KeyError, TypeError, ValueError):
                raise member_unreadable(store, pool_id, f"line {number} is not what a writer wrote",
                                        missing=False, line=number) from None
            group = []
            member.offset, member.head = end, prev
    if at is not None and number < at[0]:
        raise not_as_recorded(store, pool_id, at[0])
    _check_decisions(store, pool_id, runs, decisions)
    return member


def not_as_recorded(store: LedgerStore, pool_id: str, line: int) -> CorruptLedger:
    """:func:`member_unreadable` for a member whose log was cut or rewritten behind where
    its pool recorded it (``members_at``): what it held there is no longer counted."""
    return member_unreadable(store, pool_id, f"its log is not the one its pool recorded (line {line} is "
                             "missing or changed): it was cut or rewritten since", missing=False, line=line)


def _check_decisions(store: LedgerStore, pool_id: str, runs: Store, decisions: PoolDecisions) -> None:
    """:func:`member_unreadable` naming the first line of the member's that decides a
    ``pool_cap`` escalation without the signature its pool's keys require."""
    from escalate.pools.signatures import pool_problems

    for line, problem, _ in pool_problems(runs, pool_id, decisions)[:1]:
        raise member_unreadable(store, pool_id, f"line {line}: {problem}", missing=False, line=line)
