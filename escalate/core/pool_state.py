"""What a pool is, as data: its settings and members (folded from its log), its money per
period (derived from its member runs), and the view of both a decision takes.

No I/O here. A pool's log folds into a :class:`~escalate.core.state.RunState` whose ``pool``
is a :class:`PoolFacts` (so the replay engine, the stores and ``verify`` serve pools as
they serve runs); its money lives only in the member runs' logs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from escalate.core.events import Period
from escalate.core.money import MAX_TOTAL_MICROS, format_usd
from escalate.core.periods import ALL
from escalate.core.rules import extension_left, needed_extension, past_total_limit
from escalate.core.state import Policy
from escalate.errors import CorruptLedger


@dataclass(slots=True)
class PoolFacts:
    """A pool's settings and members, from ``pool_opened``, ``run_joined`` and ``policy_changed``;
    ``opened``: the chain hash of each member's first line, from ``member_opened`` (a member
    joined before it was recorded has none); ``at``: where each member's log ended as the
    pool's newest ``members_at`` records it (its lines, the hash of its last line)."""

    cap_micros: int
    period: Period
    tz: str
    members: list[str] = field(default_factory=list)
    opened: dict[str, str] = field(default_factory=dict)
    at: dict[str, tuple[int, str]] = field(default_factory=dict)


@dataclass(slots=True)
class PeriodTotals:
    """The pool's money in one period, summed over its members: what their tasks hold and
    spent of the money added in the period (``docs/pools.md``: which period money counts
    in), and the pool extensions granted in it."""

    reserved_micros: int = 0
    spent_micros: int = 0
    extended_micros: int = 0

    @property
    def committed_micros(self) -> int:
        return self.reserved_micros + self.spent_micros

    def add(self, other: PeriodTotals, sign: int = 1) -> None:
        self.reserved_micros += sign * other.reserved_micros
        self.spent_micros += sign * other.spent_micros
        self.extended_micros += sign * other.extended_micros

    def to_list(self) -> list[int]:
        return [self.reserved_micros, self.spent_micros, self.extended_micros]

    @classmethod
    def from_list(cls, values: list[int]) -> PeriodTotals:
        reserved, spent, extended = values
        return cls(reserved, spent, extended)


def check_total_limit(pool_id: str, key: str, totals: PeriodTotals) -> None:
    """Raise :class:`CorruptLedger` when what the pool's members committed in period ``key``
    adds up past the limit on totals: no write checked by escalate gets there (a release
    past it is refused), so a member's log holds money that was never checked. (The total is
    in the message only: past 2**64 no JSON number can carry it.)"""
    if past_total_limit(totals.committed_micros):
        period = "all time" if key == ALL else f"the period {key}"
        raise CorruptLedger(
            f"pool {pool_id}: its runs together committed {format_usd(totals.committed_micros)} in "
            f"{period}, past the limit of {format_usd(MAX_TOTAL_MICROS)} ({MAX_TOTAL_MICROS} micros) "
            "on every total, which no write through the pool lets happen: a run's log was edited or "
            "written outside the pool; writes are refused — restore the edited log", pool=pool_id,
            period=key, problem="a pool's total past the limit", limit_micros=MAX_TOTAL_MICROS)


@dataclass(frozen=True, slots=True)
class PoolView:
    """What a decision on a member run knows of its pool: the settings, the period the
    write falls in and its totals. Money a write adds counts in that period, whatever the
    age of its task (no banking: ``docs/pools.md``)."""

    pool_id: str
    cap_micros: int
    policy: Policy
    period: Period
    current: str  # the key of the period this write falls in
    totals: Mapping[str, PeriodTotals]

    def of(self, key: str) -> PeriodTotals:
        return self.totals.get(key) or PeriodTotals()

    def cap_in(self, key: str) -> int:
        """The pool's cap in period ``key``, its extensions granted then included."""
        return self.cap_micros + self.of(key).extended_micros

    def remaining(self, key: str) -> int:
        """What is left of the pool in period ``key`` (negative after an over-run, or a cap
        lowered below what is committed)."""
        return self.cap_in(key) - self.of(key).committed_micros

    def extension_left(self) -> int:
        """What the max extension still allows in this period (negative if lowered)."""
        return extension_left(self.policy.max_extension_micros, self.of(self.current).extended_micros)

    def grantable(self, delta: int) -> tuple[int, int]:
        """``(needed, left)``: the pool extension ``delta`` more needs in this period, and
        what may still be granted in it."""
        return needed_extension(delta, self.remaining(self.current)), self.extension_left()
