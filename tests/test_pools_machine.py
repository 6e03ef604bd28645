"""A hypothesis state machine over a pool, its runs and a clock that crosses midnights, a
month's end and a daylight-saving change, and jumps weeks ahead (docs/pools.md: periods),
against a small reference model written here: what fits, and the pool's totals per period.
$0 placeholders, increases of tasks from earlier periods, and releases below and above
their reservations: no period ever holds more than its cap (no banking)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from datetime import UTC, date, datetime
from zoneinfo import ZoneInfo

from conftest import FakeClock, Location
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from escalate import Ledger
from escalate.errors import Refused
from escalate.pools.pool import Pool

ZONE = "America/New_York"  # daylight saving ends on 2026-11-01 at 02:00 local time
START = datetime(2026, 10, 31, 20, 0, tzinfo=ZoneInfo(ZONE))  # a Saturday evening
RUN_CAP = 8_000_000
STEPS = [1, 600, 3600, 4 * 3600, 23 * 3600, 86_399, 3 * 86_400, 40 * 86_400]


def model_period(kind: str, moment: datetime) -> str:
    """The reference: the local calendar day, ISO week or month of ``moment``."""
    local: date = moment.astimezone(ZoneInfo(ZONE)).date()
    if kind == "day":
        return f"{local.year:04d}-{local.month:02d}-{local.day:02d}"
    if kind == "week":
        iso = local.isocalendar()
        return f"{iso[0]}-W{iso[1]:02d}"
    return f"{local.year:04d}-{local.month:02d}"


@dataclass
class ModelTask:
    run: str
    added: list[tuple[str, int]]  # (period, amount) for each reservation and increase
    halted: bool = False

    @property
    def held(self) -> int:
        return sum(amount for _, amount in self.added)


class PoolMachine(RuleBasedStateMachine):
    def __init__(self, store: Location, prefix: str) -> None:
        super().__init__()
        self.root = store
        self.prefix = prefix  # each example's pool and runs have ids of their own
        self.clock = FakeClock(START.astimezone(UTC))
        self.tasks: dict[str, ModelTask] = {}
        self.spent: dict[str, int] = {}  # by period
        self.above: dict[str, int] = {}  # by period: what releases spent above their reservations
        self.run_spent: dict[str, int] = {"r0": 0, "r1": 0}
        self.count = 0

    @initialize(kind=st.sampled_from(["day", "week", "month"]), cap=st.integers(3, 12))
    def make(self, kind: str, cap: int) -> None:
        self.kind, self.cap = kind, cap * 1_000_000
        pool_id = f"{self.prefix}-pool"
        self.pool = Pool.init(self.root, pool_id, cap=str(cap), period=kind, tz=ZONE, clock=self.clock)
        self.runs = {run: Ledger.init(self.root, f"{self.prefix}-{run}", pool=pool_id, cap="8",
                                      clock=self.clock) for run in ("r0", "r1")}

    def period_now(self) -> str:
        return model_period(self.kind, self.clock())

    def committed(self, period: str) -> int:
        return self.spent.get(period, 0) + sum(amount for t in self.tasks.values()
                                               for added, amount in t.added if added == period)

    def run_left(self, run: str) -> int:
        return RUN_CAP - self.run_spent[run] - sum(t.held for t in self.tasks.values() if t.run == run)

    @rule(step=st.sampled_from(STEPS))
    def advance(self, step: int) -> None:
        self.clock.advance(step)

    @rule(run=st.sampled_from(["r0", "r1"]), tenths=st.integers(0, 60))
    def reserve(self, run: str, tenths: int) -> None:
        self.count += 1
        task, amount, period = f"t{self.count}", tenths * 100_000, self.period_now()
        fits_run = amount <= self.run_left(run)
        fits_pool = amount <= self.cap - self.committed(period)
        try:
            self.runs[run].reserve(task, str(tenths / 10))
        except Refused as refused:
            assert not (fits_run and fits_pool), refused.message
            assert refused.code == ("over_pool_budget" if fits_run else "over_budget")
            return
        assert fits_run and fits_pool
        self.tasks[task] = ModelTask(run, [(period, amount)])

    def held(self) -> list[str]:
        return sorted(task for task, t in self.tasks.items() if t.added and not t.halted)

    @precondition(lambda self: bool(self.held()))
    @rule(data=st.data(), tenths=st.integers(1, 30))
    def increase(self, data: st.DataObject, tenths: int) -> None:
        task = data.draw(st.sampled_from(self.held()))
        model = self.tasks[task]
        to = model.held + tenths * 100_000
        fits_run = to <= RUN_CAP and to - model.held <= self.run_left(model.run)
        fits_pool = to - model.held <= self.cap - self.committed(self.period_now())  # counts now
        try:
            self.runs[model.run].increase(task, f"{to / 1e6:.6f}")
        except Refused:
            assert not (fits_run and fits_pool)
            model.halted = True
            return
        assert fits_run and fits_pool
        model.added.append((self.period_now(), to - model.held))

    @precondition(lambda self: any(t.added for t in self.tasks.values()))
    @rule(data=st.data(), tenths=st.integers(0, 40))
    def release(self, data: st.DataObject, tenths: int) -> None:
        task = data.draw(st.sampled_from(sorted(task for task, t in self.tasks.items() if t.added)))
        model = self.tasks[task]
        self.runs[model.run].release(task, str(tenths / 10))  # never refused: the money is spent
        # The cost fills the periods the task's money was added in, oldest first, each up to
        # what was added then (so the latest is freed first); the rest counts now.
        cost = tenths * 100_000
        for period, amount in model.added:
            self.spent[period] = self.spent.get(period, 0) + min(cost, amount)
            cost -= min(cost, amount)
        now = self.period_now()
        self.spent[now] = self.spent.get(now, 0) + cost
        self.above[now] = self.above.get(now, 0) + cost
        self.run_spent[model.run] += tenths * 100_000
        model.added = []

    @invariant()
    def the_pool_reports_the_models_totals(self) -> None:
        if not hasattr(self, "pool"):
            return
        periods = {self.period_now(), *self.spent, *(p for t in self.tasks.values() for p, _ in t.added)}
        for period in periods:
            shown = self.pool.show(period if "W" in period or period.count("-") != 1 else f"{period}-01")
            assert shown["period"] == period
            assert shown["committed_micros"] == self.committed(period)
            assert shown["spent_micros"] == self.spent.get(period, 0)
            # No banking: only a release's cost above its reservation (never refused) may
            # take a period past its cap.
            assert shown["committed_micros"] <= self.cap + self.above.get(period, 0)


def test_pools_follow_the_model(store: Location) -> None:
    """Each example opens a pool and runs of its own in ``store`` (a runs folder, or a database)."""
    numbers = itertools.count()
    run_state_machine_as_test(lambda: PoolMachine(store, f"m{next(numbers)}"), settings=settings(
        max_examples=40, stateful_step_count=25, deadline=None,
        suppress_health_check=[HealthCheck.too_slow]))
