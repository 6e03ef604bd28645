"""A member run's money in its pool, by period, folded from the run's own lines, and what a
ledger's first line says (a run or a pool, and a run's pool: it never changes).

The lines were checked by the run's own fold when they were written; this fold only sums
them by period. Money counts in the period it is added in (a reservation, the delta of an
increase, the part of a release above its reservation), and a release below its
reservation frees the task's money from its most recent period first (``docs/pools.md``:
which period money counts in).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from escalate.errors import InputError
from escalate.events import Event, iter_lines
from escalate.pool_state import PeriodTotals, PoolFacts
from escalate.state import RunState
from escalate.store import LedgerStore, first_event, pool_of


def facts_of(state: RunState) -> PoolFacts:
    if state.pool is None:
        raise InputError(f"{state.run_id} is a run, not a pool; see 'escalate pools list'",
                         code="not_a_pool", pool=state.run_id)
    return state.pool


@dataclass(slots=True)
class Member:
    """One run's money in its pool, by period, as of byte ``offset`` of its log: the tasks
    it holds (what each holds from each period it added money in) and each period's totals."""

    offset: int = 0
    # task -> [[period, amount], ...]: oldest first, one entry per period money was added in
    holding: dict[str, list[list[Any]]] = field(default_factory=dict)
    periods: dict[str, PeriodTotals] = field(default_factory=dict)

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
        return orjson.dumps({"offset": self.offset, "holding": self.holding,
                             "periods": {key: totals.to_list() for key, totals in self.periods.items()}})

    @classmethod
    def from_bytes(cls, data: bytes) -> Member:
        raw = orjson.loads(data)
        return cls(raw["offset"], raw["holding"],
                   {key: PeriodTotals.from_list(values) for key, values in raw["periods"].items()})


def fold_member(store: LedgerStore, pool_id: str, key_at: Callable[[str], str], *,
                stop: int | None = None) -> Member:
    """A member's entry folded from its log: complete writes only (a write cut part-way, or
    a torn tail, counts as nothing, as in the run's own replay), up to byte ``stop``. A run
    that does not name the pool in its first line counts nothing (a join whose ``runs
    init`` found the id taken)."""
    member, ignored = Member(), {}  # type: ignore[var-annotated]
    if not store.exists() or pool_of(first_event(store)) != pool_id:
        return member  # joined, not created yet, or not this pool's
    group: list[Event] = []
    with store.reader() as stream:
        for line, end in iter_lines(stream, 0):
            if stop is not None and end > stop:
                break
            try:
                event = orjson.loads(line)
                group.append(event)
                if event.get("more"):
                    continue  # more lines of the same write follow
                for each in group:
                    member.fold(each, key_at, ignored)
            except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError):
                break  # a damaged log: its run refuses every write until it is repaired
            group = []
            member.offset = end
    return member
